//! The file source: every `*.yaml`/`*.yml` file in a directory, each holding
//! any number of `---`-separated Kubernetes-style documents. Known kinds are
//! parsed, unknown kinds are skipped (so SMI policy can share the directory).
//!
//! The directory is polled (every 200 ms) rather than watched with inotify: it is tiny,
//! polling also catches files replaced by a ConfigMap's symlink swap, and it
//! needs no extra crate.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use serde::Deserialize;

use super::SourceError;
use crate::state::{
    ADMISSION_ANNOTATION, AdmissionMode, GatewaySet, Named, Pod, PolicyMode, SmiSet, Snapshot, SnapshotTx,
};

/// How often the directory is checked: a policy edit must be in force in
/// well under a second, and a stat of a few files costs next to nothing.
const POLL: Duration = Duration::from_millis(200);

/// A document's identity within a file: kind, namespace, name.
type DocId = (String, String, String);

/// What one file contributes to a snapshot.
#[derive(Clone, Debug, Default)]
struct FileDocs {
    /// The documents that parsed, as read: a refused document falls back
    /// to its entry here from the file's previous version.
    good: BTreeMap<DocId, serde_yaml::Value>,
    pods: Vec<Pod>,
    nodes: Vec<(String, Ipv4Addr)>,
    services: Vec<k8s_openapi::api::core::v1::Service>,
    slices: Vec<k8s_openapi::api::discovery::v1::EndpointSlice>,
    service_accounts: Vec<String>,
    smi: SmiSet,
    gateway: GatewaySet,
    mode: Option<PolicyMode>,
    admission: Option<AdmissionMode>,
    namespaces: Vec<(String, AdmissionMode)>,
}

/// The mesh-wide settings document: `kind: MeshConfig`, `spec.policyMode`.
pub const MESH_CONFIG_API: &str = "mesh.dev/v1alpha1";

/// Parses one file, document by document: a document that does not parse
/// is refused alone (its error names the file and document) and keeps its
/// version from `previous` (the file's last good read) when it had one;
/// every other document applies. A file that cannot be read, or whose YAML
/// stream breaks, fails whole (its last good content stays, see [`Reader`]).
fn parse_file(file: &Path, previous: Option<&FileDocs>) -> Result<(FileDocs, Vec<SourceError>), SourceError> {
    let text = read_regular(file)?;
    let mut docs = FileDocs::default();
    let mut refused = Vec::new();
    for (doc, de) in serde_yaml::Deserializer::from_str(&text).enumerate() {
        let invalid = |reason: String| SourceError::Invalid {
            file: file.into(),
            doc: doc + 1,
            reason,
        };
        // A syntax error ends the stream: nothing after it can be trusted.
        let value = serde_yaml::Value::deserialize(de).map_err(|e| invalid(format!("not YAML: {e}")))?;
        if value.is_null() {
            continue; // empty document, e.g. a trailing `---`
        }
        let id = doc_id(&value);
        match add_doc(&mut docs, value.clone(), file) {
            Ok(()) => {
                if let Some(id) = id {
                    docs.good.insert(id, value);
                }
            }
            Err(reason) => {
                let kept = id
                    .as_ref()
                    .and_then(|id| previous.and_then(|p| p.good.get(id)).map(|v| (id, v)))
                    .and_then(|(id, old)| add_doc(&mut docs, old.clone(), file).ok().map(|()| (id, old)));
                if let Some((id, old)) = kept {
                    docs.good.insert(id.clone(), old.clone());
                }
                let reason = if kept.is_some() {
                    format!("{reason}; its previous version stays in force")
                } else {
                    reason
                };
                refused.push(invalid(reason));
            }
        }
    }
    Ok((docs, refused))
}

/// kind, metadata.namespace (default "default"), metadata.name, if present.
fn doc_id(value: &serde_yaml::Value) -> Option<DocId> {
    // With its API group: SMI and Gateway API both have a TCPRoute.
    let api = value.get("apiVersion").and_then(|v| v.as_str()).unwrap_or("");
    let kind = format!("{api} {}", value.get("kind")?.as_str()?);
    let meta = value.get("metadata")?;
    let name = meta.get("name")?.as_str()?.to_string();
    let ns = meta
        .get("namespace")
        .and_then(|n| n.as_str())
        .unwrap_or("default")
        .to_string();
    Some((kind, ns, name))
}

/// Adds one document to `docs`, or says why not.
fn add_doc(docs: &mut FileDocs, value: serde_yaml::Value, file: &Path) -> Result<(), String> {
    let head: TypeMeta = serde_yaml::from_value(value.clone()).map_err(|e| format!("missing kind: {e}"))?;
    let kind = head.kind.as_str();
    if let Some(api) = head
        .api_version
        .as_deref()
        .filter(|v| crate::gateway::is_gateway_api(v))
    {
        if !crate::gateway::accepts(api, kind) {
            return Err(format!(
                "{kind} {api} is not supported (this mesh reads HTTPRoute and GRPCRoute \
                 gateway.networking.k8s.io/v1, TCPRoute and UDPRoute v1alpha2 or v1, and AuthorizationPolicy \
                 gateway.networking.x-k8s.io/v1alpha1)"
            ));
        }
        let g = &mut docs.gateway;
        match kind {
            "HTTPRoute" => g.http_routes.push(resource_doc(value, kind)?),
            "GRPCRoute" => g.grpc_routes.push(resource_doc(value, kind)?),
            "TCPRoute" => g.tcp_routes.push(resource_doc(value, kind)?),
            "UDPRoute" => g.udp_routes.push(resource_doc(value, kind)?),
            _ => g.authorization_policies.push(resource_doc(value, kind)?),
        }
        return Ok(());
    }
    // The SMI spec's own examples omit apiVersion; accept that for SMI kinds.
    let api = match (&head.api_version, crate::smi::default_api_version(kind)) {
        (Some(v), Some(want)) if v != want => {
            return Err(format!("{kind} {v} is not supported (this mesh reads {want})"));
        }
        (Some(v), _) => v.clone(),
        (None, Some(want)) => want.to_string(),
        (None, None) => return Err(format!("{kind}: apiVersion is required")),
    };
    match (api.as_str(), kind) {
        ("v1", "Node") => {
            let node: NodeDoc = serde_yaml::from_value(value).map_err(|e| format!("bad Node: {e}"))?;
            docs.nodes.push(node.internal_ip()?);
        }
        ("v1", "Pod") => {
            let pod: PodDoc = serde_yaml::from_value(value).map_err(|e| format!("bad Pod: {e}"))?;
            docs.pods.push(pod.into_pod()?);
        }
        ("v1", "Service") => docs
            .services
            .push(serde_yaml::from_value(value).map_err(|e| format!("bad Service: {e}"))?),
        ("discovery.k8s.io/v1", "EndpointSlice") => docs
            .slices
            .push(serde_yaml::from_value(value).map_err(|e| format!("bad EndpointSlice: {e}"))?),
        ("v1", "ServiceAccount") => {
            let sa: k8s_openapi::api::core::v1::ServiceAccount =
                serde_yaml::from_value(value).map_err(|e| format!("bad ServiceAccount: {e}"))?;
            docs.service_accounts.extend(super::k8s::service_account(&sa));
        }
        (MESH_CONFIG_API, "TrafficPolicy") => docs.gateway.traffic_policies.push(resource_doc(value, kind)?),
        (MESH_CONFIG_API, "MeshConfig") => {
            let cfg: MeshConfigDoc = serde_yaml::from_value(value).map_err(|e| format!("bad MeshConfig: {e}"))?;
            docs.mode = cfg.spec.policy_mode.or(docs.mode);
            docs.admission = cfg.spec.admission.or(docs.admission);
        }
        ("v1", "Namespace") => {
            let ns: MetaOnly = serde_yaml::from_value(value).map_err(|e| format!("bad Namespace: {e}"))?;
            if let Some(value) = ns.metadata.annotations.get(ADMISSION_ANNOTATION) {
                let mode = AdmissionMode::from_annotation(value)
                    .map_err(|e| format!("Namespace {}: {e}", ns.metadata.name))
                    .unwrap_or_else(|e| {
                        tracing::warn!(file = %file.display(), error = %e, "source: bad admission annotation");
                        AdmissionMode::Strict
                    });
                docs.namespaces.push((ns.metadata.name, mode));
            }
        }
        (_, "TrafficTarget") => docs.smi.traffic_targets.push(resource_doc(value, kind)?),
        (_, "HTTPRouteGroup") => docs.smi.http_route_groups.push(resource_doc(value, kind)?),
        (_, "TCPRoute") => docs.smi.tcp_routes.push(resource_doc(value, kind)?),
        (_, "UDPRoute") => docs.smi.udp_routes.push(resource_doc(value, kind)?),
        (_, "TrafficSplit") => docs.smi.traffic_splits.push(resource_doc(value, kind)?),
        _ => tracing::debug!(file = %file.display(), kind, "source: skipping an unknown kind"),
    }
    Ok(())
}

/// The text of a regular file. Anything else is refused with what it is: a
/// FIFO would block the reader forever (opened non-blocking as well, in
/// case one replaces the file after the check), a symlink loop never
/// resolves, a directory has no text.
fn read_regular(file: &Path) -> Result<String, SourceError> {
    use std::{io::Read as _, os::unix::fs::OpenOptionsExt as _};
    let read_err = |err| SourceError::ReadFile { file: file.into(), err };
    let meta = std::fs::metadata(file).map_err(read_err)?;
    if !meta.is_file() {
        use std::os::unix::fs::FileTypeExt as _;
        let t = meta.file_type();
        let what = if t.is_fifo() {
            "a FIFO"
        } else if t.is_dir() {
            "a directory"
        } else if t.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        };
        return Err(SourceError::NotRegular {
            file: file.into(),
            what,
        });
    }
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(file)
        .map_err(read_err)?;
    let mut text = String::new();
    f.read_to_string(&mut text).map_err(read_err)?;
    Ok(text)
}

/// An SMI or Gateway API document's name and spec; errors name the resource.
fn resource_doc<T: serde::de::DeserializeOwned>(value: serde_yaml::Value, kind: &str) -> Result<Named<T>, String> {
    #[derive(Deserialize)]
    struct Doc {
        metadata: ObjectMeta,
        spec: Option<serde_yaml::Value>,
        #[serde(flatten)]
        rest: BTreeMap<String, serde_yaml::Value>,
    }
    let meta: MetaOnly =
        serde_yaml::from_value(value.clone()).map_err(|e| format!("{kind}: metadata.name is required ({e})"))?;
    let name = format!("{}/{}", meta.metadata.namespace, meta.metadata.name);
    let doc: Doc = serde_yaml::from_value(value).map_err(|e| format!("{kind} {name}: {e}"))?;
    // Fields beside `spec` (the A/B example of the SMI spec puts `matches`
    // at the top level) would be read as an empty spec: refused instead.
    if let Some(field) = doc.rest.keys().find(|k| !matches!(k.as_str(), "apiVersion" | "kind")) {
        return Err(format!(
            "{kind} {name}: unknown top-level field {field} (did you mean spec.{field}?); refused"
        ));
    }
    let Some(spec) = doc.spec.filter(|s| !s.is_null()) else {
        return Err(format!("{kind} {name}: spec is required; refused"));
    };
    let spec: T = super::strict_spec(spec, kind, &name)?;
    Ok(Named {
        namespace: doc.metadata.namespace,
        name: doc.metadata.name,
        spec,
    })
}

#[derive(Deserialize)]
struct MetaOnly {
    metadata: ObjectMeta,
}

#[derive(Deserialize)]
struct MeshConfigDoc {
    spec: MeshConfigSpec,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct MeshConfigSpec {
    #[serde(default)]
    policy_mode: Option<PolicyMode>,
    /// Inbound admission for pods whose namespace and own annotation set none.
    #[serde(default)]
    admission: Option<AdmissionMode>,
}

/// Reads the directory file by file. A file that fails to read or parse is
/// reported (by name, with the document and reason) and its last good
/// content stays in force; every other file applies. A typo never opens
/// or closes the mesh.
#[derive(Default)]
pub struct Reader {
    last_good: BTreeMap<PathBuf, FileDocs>,
}

impl Reader {
    pub fn read(&mut self, dir: &Path) -> Result<Snapshot, SourceError> {
        let files = yaml_files(dir)?;
        self.last_good.retain(|f, _| files.contains(f));
        let mut errors = Vec::new();
        for file in &files {
            match parse_file(file, self.last_good.get(file)) {
                Ok((docs, refused)) => {
                    errors.extend(refused.iter().map(ToString::to_string));
                    self.last_good.insert(file.clone(), docs);
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        let mut snapshot = Snapshot {
            errors,
            ..Snapshot::default()
        };
        let mut by_ip: BTreeMap<IpAddr, String> = BTreeMap::new();
        for (file, docs) in &self.last_good {
            for pod in &docs.pods {
                // A pod claiming an address another pod has is refused (the
                // first keeps it); the rest of the snapshot still applies.
                if let Some((ip, first)) = pod.ips.iter().find_map(|ip| by_ip.get(ip).map(|f| (*ip, f.clone()))) {
                    let err = SourceError::DuplicateIp {
                        first,
                        second: pod.workload_name(),
                        ip,
                    };
                    snapshot.errors.push(format!("{}: {err}", file.display()));
                    continue;
                }
                for ip in &pod.ips {
                    by_ip.insert(*ip, pod.workload_name());
                }
                snapshot.pods.insert(pod.workload_name(), pod.clone());
            }
            snapshot.nodes.extend(docs.nodes.iter().cloned());
            snapshot.service_accounts.extend(docs.service_accounts.iter().cloned());
            let smi = &mut snapshot.smi;
            smi.traffic_targets.extend(docs.smi.traffic_targets.iter().cloned());
            smi.http_route_groups.extend(docs.smi.http_route_groups.iter().cloned());
            smi.tcp_routes.extend(docs.smi.tcp_routes.iter().cloned());
            smi.udp_routes.extend(docs.smi.udp_routes.iter().cloned());
            smi.traffic_splits.extend(docs.smi.traffic_splits.iter().cloned());
            let g = &mut snapshot.gateway;
            g.http_routes.extend(docs.gateway.http_routes.iter().cloned());
            g.grpc_routes.extend(docs.gateway.grpc_routes.iter().cloned());
            g.tcp_routes.extend(docs.gateway.tcp_routes.iter().cloned());
            g.udp_routes.extend(docs.gateway.udp_routes.iter().cloned());
            g.authorization_policies
                .extend(docs.gateway.authorization_policies.iter().cloned());
            g.traffic_policies.extend(docs.gateway.traffic_policies.iter().cloned());
            snapshot.mode = docs.mode.or(snapshot.mode);
            snapshot.admission = docs.admission.or(snapshot.admission);
            snapshot.namespace_admission.extend(docs.namespaces.iter().cloned());
        }
        let services: Vec<_> = self.last_good.values().flat_map(|d| d.services.iter()).collect();
        let slices: Vec<_> = self.last_good.values().flat_map(|d| d.slices.iter()).collect();
        snapshot.services = super::k8s::services(&services, &slices);
        Ok(snapshot)
    }
}

/// Reads a directory once (the CLI and the CA's first read).
pub fn load(dir: &Path) -> Result<Snapshot, SourceError> {
    Reader::default().read(dir)
}

fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>, SourceError> {
    let entries = std::fs::read_dir(dir).map_err(|err| SourceError::ReadDir { dir: dir.into(), err })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    Ok(files)
}

/// A fingerprint of the directory: names, sizes and mtimes.
fn fingerprint(dir: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    yaml_files(dir)
        .unwrap_or_default()
        .into_iter()
        .map(|p| {
            let meta = std::fs::metadata(&p).ok();
            let len = meta.as_ref().map_or(0, |m| m.len());
            let mtime = meta.and_then(|m| m.modified().ok());
            (p, len, mtime)
        })
        .collect()
}

/// Polls `dir` and publishes each new valid snapshot. An invalid directory
/// is logged (with the file and document at fault) and the last good
/// snapshot stays in force.
pub async fn watch(dir: PathBuf, tx: SnapshotTx) {
    let mut last_seen = None;
    let mut generation = tx.borrow().generation;
    let mut reader = Reader::default();
    loop {
        let fp = fingerprint(&dir);
        if last_seen.as_ref() != Some(&fp) {
            last_seen = Some(fp);
            match reader.read(&dir) {
                Ok(mut snap) => {
                    for e in &snap.errors {
                        tracing::error!(error = %e, "source: file rejected; its last good content stays in force");
                    }
                    let changed = !tx.borrow().same_content(&snap);
                    if changed {
                        generation += 1;
                        snap.generation = generation;
                        tracing::info!(pods = snap.pods.len(), generation, dir = %dir.display(), "source: new snapshot");
                        tx.publish(snap);
                    }
                }
                Err(err) => {
                    tracing::error!(error = %err, dir = %dir.display(), "source: rejected; keeping the last good snapshot");
                }
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TypeMeta {
    api_version: Option<String>,
    kind: String,
}

#[derive(Deserialize)]
struct NodeDoc {
    metadata: ObjectMeta,
    #[serde(default)]
    status: NodeStatus,
}

#[derive(Default, Deserialize)]
struct NodeStatus {
    #[serde(default)]
    addresses: Vec<NodeAddress>,
}

#[derive(Deserialize)]
struct NodeAddress {
    #[serde(rename = "type")]
    kind: String,
    address: String,
}

impl NodeDoc {
    fn internal_ip(self) -> Result<(String, Ipv4Addr), String> {
        let name = self.metadata.name;
        let addr = self
            .status
            .addresses
            .iter()
            .find(|a| a.kind == "InternalIP")
            .ok_or_else(|| format!("Node {name}: status.addresses has no InternalIP"))?;
        let ip = addr
            .address
            .parse()
            .map_err(|_| format!("Node {name}: InternalIP {:?} is not an IPv4 address", addr.address))?;
        Ok((name, ip))
    }
}

#[derive(Deserialize)]
struct PodDoc {
    metadata: ObjectMeta,
    #[serde(default)]
    spec: PodSpec,
    #[serde(default)]
    status: PodStatus,
}

#[derive(Deserialize)]
struct ObjectMeta {
    name: String,
    #[serde(default = "default_ns")]
    namespace: String,
    #[serde(default)]
    uid: String,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodSpec {
    node_name: Option<String>,
    service_account_name: Option<String>,
    #[serde(default)]
    host_network: bool,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodStatus {
    #[serde(rename = "podIP")]
    pod_ip: Option<String>,
    /// Dual-stack: every address, `podIP` first.
    #[serde(rename = "podIPs", default)]
    pod_ips: Vec<PodIpDoc>,
    qos_class: Option<String>,
}

#[derive(Deserialize)]
struct PodIpDoc {
    ip: String,
}

fn default_ns() -> String {
    "default".into()
}

impl PodDoc {
    fn into_pod(self) -> Result<Pod, String> {
        let name = self.metadata.name;
        let node = self
            .spec
            .node_name
            .ok_or_else(|| format!("Pod {name}: spec.nodeName is required"))?;
        let ip = self
            .status
            .pod_ip
            .ok_or_else(|| format!("Pod {name}: status.podIP is required"))?;
        let listed: Vec<String> = self.status.pod_ips.into_iter().map(|p| p.ip).collect();
        let ips = super::k8s::pod_ips(&ip, &listed).map_err(|e| format!("Pod {name}: {e}"))?;
        Ok(Pod {
            namespace: self.metadata.namespace,
            uid: self.metadata.uid,
            service_account: self.spec.service_account_name.unwrap_or_else(|| "default".into()),
            name,
            node,
            ips,
            qos_class: self.status.qos_class,
            host_network: self.spec.host_network,
            labels: self.metadata.labels,
            admission: AdmissionMode::annotated(Some(&self.metadata.annotations), "pod"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with(files: &[(&str, &str)]) -> tempdir::Dir {
        let d = tempdir::Dir::new();
        for (name, text) in files {
            std::fs::write(d.0.join(name), text).unwrap();
        }
        d
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                let p = std::env::temp_dir().join(format!(
                    "mesh-src-{}-{:?}",
                    std::process::id(),
                    std::thread::current().id()
                ));
                let _ = std::fs::remove_dir_all(&p);
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    const PODS: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: shop}\nspec: {nodeName: n1, serviceAccountName: web}\nstatus: {podIP: 198.18.1.10}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: b}\nspec: {nodeName: n2}\nstatus: {podIP: 198.18.2.10}\n---\n";

    /// Admission comes from the pod's annotation, then its namespace's,
    /// then MeshConfig, then the policy mode; a bad value reads as strict.
    #[test]
    fn admission_is_resolved_most_specific_first() {
        use crate::state::AdmissionMode::{Off, Permissive, Strict};
        let pods = "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: shop, annotations: {mesh.dev/admission: off}}\n\
                    spec: {nodeName: n1}\nstatus: {podIP: 198.18.1.10}\n---\n\
                    apiVersion: v1\nkind: Pod\nmetadata: {name: b, namespace: shop}\nspec: {nodeName: n1}\nstatus: {podIP: 198.18.1.11}\n---\n\
                    apiVersion: v1\nkind: Pod\nmetadata: {name: c, namespace: other}\nspec: {nodeName: n1}\nstatus: {podIP: 198.18.1.12}\n---\n\
                    apiVersion: v1\nkind: Pod\nmetadata: {name: d, namespace: other, annotations: {mesh.dev/admission: opne}}\n\
                    spec: {nodeName: n1}\nstatus: {podIP: 198.18.1.13}\n";
        let ns =
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, annotations: {mesh.dev/admission: permissive}}\n";
        let d = dir_with(&[("pods.yaml", pods), ("ns.yaml", ns)]);
        let snap = load(&d.0).unwrap();
        let of = |k: &str, m| snap.admission_of(&snap.pods[k], m).0;
        assert_eq!(of("shop/a", PolicyMode::Enforcing), Off);
        assert_eq!(of("shop/b", PolicyMode::Enforcing), Permissive);
        assert_eq!(of("other/c", PolicyMode::Enforcing), Strict);
        assert_eq!(of("other/c", PolicyMode::Permissive), Permissive);
        assert_eq!(of("other/d", PolicyMode::Permissive), Strict, "a typo reads as strict");
        let mesh = "apiVersion: mesh.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec: {admission: off}\n";
        std::fs::write(d.0.join("mesh.yaml"), mesh).unwrap();
        let snap = load(&d.0).unwrap();
        assert_eq!(snap.admission_of(&snap.pods["other/c"], PolicyMode::Enforcing).0, Off);
        assert_eq!(snap.mode, None, "a MeshConfig without policyMode leaves the flag's");
    }

    #[test]
    fn reads_pods_and_skips_other_kinds() {
        let d = dir_with(&[
            ("pods.yaml", PODS),
            (
                "tt.yaml",
                "apiVersion: access.smi-spec.io/v1alpha3\nkind: TrafficTarget\nmetadata: {name: x}\n",
            ),
            ("notes.txt", "ignored"),
        ]);
        let s = load(&d.0).unwrap();
        assert_eq!(s.pods.len(), 2);
        let a = &s.pods["shop/a"];
        assert_eq!(
            (a.service_account.as_str(), a.node.as_str(), a.ips.as_slice()),
            ("web", "n1", [IpAddr::from([198, 18, 1, 10])].as_slice())
        );
        assert_eq!(s.pods["default/b"].service_account, "default");
    }

    #[test]
    fn reads_services_endpoint_slices_and_service_accounts() {
        let d = dir_with(&[(
            "svc.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {clusterIP: 198.19.0.10, ports: [{port: 80}]}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv4\nmetadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}\nports: [{port: 8080}]\nendpoints: [{addresses: [198.18.1.10]}]\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {name: web, namespace: shop}\n",
        )]);
        let s = load(&d.0).unwrap();
        assert!(s.errors.is_empty(), "{:?}", s.errors);
        assert_eq!(s.services["shop/web"].endpoints.len(), 1);
        assert!(s.service_accounts.contains("shop/web"));
    }

    #[test]
    fn reads_node_addresses() {
        let d = dir_with(&[(
            "nodes.yaml",
            "apiVersion: v1\nkind: Node\nmetadata: {name: n1}\nstatus: {addresses: [{type: Hostname, address: n1}, {type: InternalIP, address: 198.18.0.11}]}\n",
        )]);
        assert_eq!(load(&d.0).unwrap().nodes["n1"], Ipv4Addr::new(198, 18, 0, 11));
        let d = dir_with(&[(
            "nodes.yaml",
            "apiVersion: v1\nkind: Node\nmetadata: {name: n1}\nstatus: {addresses: []}\n",
        )]);
        assert!(load(&d.0).unwrap().errors[0].contains("InternalIP"));
    }

    /// A typo, an unknown field, a FIFO, a symlink loop and a duplicate Pod
    /// IP are each refused with their path; everything else still loads,
    /// and reading never blocks.
    #[test]
    fn bad_entries_are_refused_by_path_and_the_rest_still_loads() {
        let d = dir_with(&[
            ("pods.yaml", PODS),
            (
                "typo.yaml",
                "kind: TCPRoute\nmetadata: {name: db, namespace: shop}\nspec: {matches: {port: [7070]}}\n",
            ),
            (
                "unknown.yaml",
                "kind: TrafficTarget\nmetadata: {name: x, namespace: shop}\nspec: {destination: {kind: ServiceAccount, name: web}, sorces: []}\n",
            ),
            (
                "good.yaml",
                "kind: TCPRoute\nmetadata: {name: ok, namespace: shop}\nspec: {matches: {ports: [80]}}\n",
            ),
            // The SMI spec's A/B example: its HTTPRouteGroup has `matches`
            // without `spec`; the TrafficSplit after it still loads.
            (
                "ab.yaml",
                "kind: HTTPRouteGroup\nmetadata: {name: ab-test, namespace: shop}\nmatches:\n- name: firefox-users\n  headers: {user-agent: \".*Firefox.*\"}\n---\n\
                 kind: TrafficSplit\nmetadata: {name: ab-test, namespace: shop}\nspec: {service: website, backends: [{service: website-v2, weight: 100}]}\n---\n\
                 kind: TCPRoute\nmetadata: {name: bare, namespace: shop}\n",
            ),
            (
                "zz-dup.yaml",
                "apiVersion: v1\nkind: Pod\nmetadata: {name: twin, namespace: shop}\nspec: {nodeName: n1}\nstatus: {podIP: 198.18.1.10}\n",
            ),
        ]);
        let fifo = d.0.join("fifo.yaml");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        std::os::unix::fs::symlink("loop-b.yaml", d.0.join("loop-a.yaml")).unwrap();
        std::os::unix::fs::symlink("loop-a.yaml", d.0.join("loop-b.yaml")).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let dir = d.0.clone();
        std::thread::spawn(move || tx.send(load(&dir)).unwrap());
        let s = rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("reading the directory blocked")
            .unwrap();
        let has = |file: &str, what: &str| s.errors.iter().any(|e| e.contains(file) && e.contains(what));
        assert!(has("typo.yaml", "unknown field spec.matches.port"), "{:#?}", s.errors);
        assert!(has("unknown.yaml", "unknown field spec.sorces"), "{:#?}", s.errors);
        assert!(has("fifo.yaml", "a FIFO"), "{:#?}", s.errors);
        assert!(has("loop-a.yaml", "symbolic links"), "{:#?}", s.errors);
        assert!(has("zz-dup.yaml", "shop/twin is refused"), "{:#?}", s.errors);
        assert!(
            has("ab.yaml", "document 1") && has("ab.yaml", "unknown top-level field matches"),
            "{:#?}",
            s.errors
        );
        assert!(
            has("ab.yaml", "document 3") && has("ab.yaml", "spec is required"),
            "{:#?}",
            s.errors
        );
        assert_eq!(s.smi.traffic_splits.len(), 1, "the split beside the bad group loads");
        assert!(s.smi.http_route_groups.is_empty());
        // Everything valid still loaded: the good route and both original pods.
        assert_eq!(s.smi.tcp_routes.len(), 1);
        assert_eq!(s.smi.tcp_routes[0].name, "ok");
        assert!(s.smi.traffic_targets.is_empty());
        assert!(s.pods.contains_key("shop/a") && !s.pods.contains_key("shop/twin"));
    }

    #[test]
    fn bad_documents_name_the_file_and_document() {
        let first_error = |files: &[(&str, &str)]| {
            let d = dir_with(files);
            load(&d.0).unwrap().errors.first().cloned().unwrap_or_default()
        };
        let err = first_error(&[(
            "pods.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {nodeName: n1}\nstatus: {podIP: 300.1.1.1}\n",
        )]);
        assert!(
            err.contains("pods.yaml") && err.contains("document 1") && err.contains("podIP"),
            "{err}"
        );
        assert!(first_error(&[("pods.yaml", "kind: [unclosed")]).contains("not YAML"));
        let err = first_error(&[(
            "r.yaml",
            "kind: TCPRoute\nmetadata: {name: db, namespace: shop}\nspec: {matches: {ports: [70000]}}\n",
        )]);
        assert!(err.contains("TCPRoute shop/db"), "{err}");
        let dup = PODS.replace("198.18.2.10", "198.18.1.10");
        let d = dir_with(&[("pods.yaml", &dup)]);
        let s = load(&d.0).unwrap();
        assert!(s.errors[0].contains("both claim IP 198.18.1.10"), "{:?}", s.errors);
        assert!(s.pods.contains_key("shop/a") && !s.pods.contains_key("default/b"));
    }

    #[test]
    fn a_broken_file_keeps_its_last_good_content_and_the_others_apply() {
        let d = dir_with(&[
            ("pods.yaml", PODS),
            (
                "routes.yaml",
                "kind: TCPRoute\nmetadata: {name: web}\nspec: {matches: {ports: [80]}}\n",
            ),
        ]);
        let mut reader = Reader::default();
        let s = reader.read(&d.0).unwrap();
        assert_eq!((s.pods.len(), s.smi.tcp_routes.len()), (2, 1));
        std::fs::write(d.0.join("routes.yaml"), "kind: TCPRoute\nmetadata: {name: web\n").unwrap();
        std::fs::write(
            d.0.join("more.yaml"),
            "kind: TCPRoute\nmetadata: {name: db}\nspec: {matches: {ports: [5432]}}\n",
        )
        .unwrap();
        let s = reader.read(&d.0).unwrap();
        assert_eq!(
            s.smi.tcp_routes.len(),
            2,
            "the good new file applies, the broken one keeps its last good route"
        );
        assert_eq!(s.errors.len(), 1);
        assert!(s.errors[0].contains("routes.yaml"), "{:?}", s.errors);
    }

    #[tokio::test]
    async fn an_edit_to_services_alone_publishes_a_snapshot() {
        let svc = |port: u16| {
            format!("apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec: {{ports: [{{port: {port}}}]}}\n")
        };
        let d = dir_with(&[("pods.yaml", PODS), ("svc.yaml", &svc(80))]);
        let (tx, mut rx) = crate::state::channel();
        let task = tokio::spawn(watch(d.0.clone(), tx));
        rx.changed().await.unwrap();
        assert_eq!(rx.borrow_and_update().services["default/web"].ports[0].port, 80);
        std::fs::write(d.0.join("svc.yaml"), svc(8080)).unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rx.borrow().services["default/web"].ports[0].port, 8080);
        task.abort();
    }

    #[tokio::test]
    async fn a_bad_edit_keeps_the_last_good_snapshot() {
        let d = dir_with(&[("pods.yaml", PODS)]);
        let (tx, mut rx) = crate::state::channel();
        let task = tokio::spawn(watch(d.0.clone(), tx));
        rx.changed().await.unwrap();
        assert_eq!(rx.borrow().pods.len(), 2);
        // shop/a loses its podIP: that document is refused alone and its
        // previous version stays; default/b's edit (another node) applies.
        let edit = PODS
            .replace("status: {podIP: 198.18.1.10}", "status: {}")
            .replace("nodeName: n2", "nodeName: n3");
        std::fs::write(d.0.join("pods.yaml"), edit).unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .unwrap()
            .unwrap();
        {
            let snap = rx.borrow_and_update();
            assert_eq!(
                snap.pods.len(),
                2,
                "an invalid document must not change what is in force"
            );
            assert_eq!(snap.pods["shop/a"].ips, [IpAddr::from([198, 18, 1, 10])]);
            assert_eq!(
                snap.pods["default/b"].node, "n3",
                "the valid document beside it applies"
            );
            assert_eq!(snap.errors.len(), 1, "but it is reported");
            assert!(snap.errors[0].contains("previous version stays"), "{:?}", snap.errors);
        }
        std::fs::write(d.0.join("pods.yaml"), PODS.split("---").next().unwrap()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rx.borrow().pods.len(), 1);
        task.abort();
    }
}
