//! The file source: every `*.yaml`/`*.yml` file in a directory, each holding
//! any number of `---`-separated Kubernetes-style documents. Known kinds are
//! parsed, unknown kinds are skipped (so SMI policy can share the directory).
//!
//! The directory is polled (1 s) rather than watched with inotify: it is tiny,
//! polling also catches files replaced by a ConfigMap's symlink swap, and it
//! needs no extra crate.
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use serde::Deserialize;

use super::SourceError;
use crate::state::{Pod, Snapshot, SnapshotTx};

/// Reads the whole directory into a snapshot; any invalid document fails the
/// whole read, so a half-valid directory never replaces a good snapshot.
pub fn load(dir: &Path) -> Result<Snapshot, SourceError> {
    let mut snapshot = Snapshot::default();
    let mut by_ip: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    for file in yaml_files(dir)? {
        let text = std::fs::read_to_string(&file).map_err(|err| SourceError::ReadFile {
            file: file.clone(),
            err,
        })?;
        for (doc, de) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let invalid = |reason: String| SourceError::Invalid {
                file: file.clone(),
                doc: doc + 1,
                reason,
            };
            let value = serde_yaml::Value::deserialize(de).map_err(|e| invalid(format!("not YAML: {e}")))?;
            if value.is_null() {
                continue; // empty document, e.g. a trailing `---`
            }
            let head: TypeMeta =
                serde_yaml::from_value(value.clone()).map_err(|e| invalid(format!("missing apiVersion/kind: {e}")))?;
            if (head.api_version.as_str(), head.kind.as_str()) == ("v1", "Node") {
                let node: NodeDoc = serde_yaml::from_value(value).map_err(|e| invalid(format!("bad Node: {e}")))?;
                let (name, ip) = node.internal_ip().map_err(invalid)?;
                snapshot.nodes.insert(name, ip);
                continue;
            }
            if (head.api_version.as_str(), head.kind.as_str()) != ("v1", "Pod") {
                continue;
            }
            let doc_pod: PodDoc = serde_yaml::from_value(value).map_err(|e| invalid(format!("bad Pod: {e}")))?;
            let pod = doc_pod.into_pod().map_err(invalid)?;
            if let Some(first) = by_ip.insert(pod.ip, pod.workload_name()) {
                return Err(SourceError::DuplicateIp {
                    first,
                    second: pod.workload_name(),
                    ip: pod.ip,
                });
            }
            snapshot.pods.insert(pod.workload_name(), pod);
        }
    }
    Ok(snapshot)
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
    loop {
        let fp = fingerprint(&dir);
        if last_seen.as_ref() != Some(&fp) {
            last_seen = Some(fp);
            match load(&dir) {
                Ok(mut snap) => {
                    let changed = {
                        let cur = tx.borrow();
                        cur.pods != snap.pods || cur.nodes != snap.nodes
                    };
                    if changed {
                        generation += 1;
                        snap.generation = generation;
                        tracing::info!(pods = snap.pods.len(), generation, dir = %dir.display(), "source: new snapshot");
                        let _ = tx.send(Arc::new(snap));
                    }
                }
                Err(err) => {
                    tracing::error!(error = %err, dir = %dir.display(), "source: rejected; keeping the last good snapshot");
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TypeMeta {
    api_version: String,
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
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodSpec {
    node_name: Option<String>,
    service_account_name: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodStatus {
    #[serde(rename = "podIP")]
    pod_ip: Option<String>,
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
        let ip: Ipv4Addr = ip
            .parse()
            .map_err(|_| format!("Pod {name}: status.podIP {ip:?} is not an IPv4 address"))?;
        Ok(Pod {
            namespace: self.metadata.namespace,
            service_account: self.spec.service_account_name.unwrap_or_else(|| "default".into()),
            name,
            node,
            ip,
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
            (a.service_account.as_str(), a.node.as_str(), a.ip),
            ("web", "n1", Ipv4Addr::new(198, 18, 1, 10))
        );
        assert_eq!(s.pods["default/b"].service_account, "default");
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
        assert!(load(&d.0).unwrap_err().to_string().contains("InternalIP"));
    }

    #[test]
    fn bad_documents_name_the_file_and_document() {
        let d = dir_with(&[(
            "pods.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {nodeName: n1}\nstatus: {podIP: 300.1.1.1}\n",
        )]);
        let err = load(&d.0).unwrap_err().to_string();
        assert!(
            err.contains("pods.yaml") && err.contains("document 1") && err.contains("podIP"),
            "{err}"
        );
        let d = dir_with(&[("pods.yaml", "kind: [unclosed")]);
        assert!(load(&d.0).unwrap_err().to_string().contains("not YAML"));
        let dup = PODS.replace("198.18.2.10", "198.18.1.10");
        let d = dir_with(&[("pods.yaml", &dup)]);
        assert!(
            load(&d.0)
                .unwrap_err()
                .to_string()
                .contains("both claim IP 198.18.1.10")
        );
    }

    #[tokio::test]
    async fn a_bad_edit_keeps_the_last_good_snapshot() {
        let d = dir_with(&[("pods.yaml", PODS)]);
        let (tx, mut rx) = crate::state::channel();
        let task = tokio::spawn(watch(d.0.clone(), tx));
        rx.changed().await.unwrap();
        assert_eq!(rx.borrow().pods.len(), 2);
        std::fs::write(
            d.0.join("pods.yaml"),
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\n",
        )
        .unwrap();
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(rx.borrow().pods.len(), 2, "invalid edit must not replace the snapshot");
        std::fs::write(d.0.join("pods.yaml"), PODS.split("---").next().unwrap()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rx.borrow().pods.len(), 1);
        task.abort();
    }
}
