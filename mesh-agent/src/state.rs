//! What the agent knows about the cluster: the meshed pods (workloads), with
//! stable ids the kernel programs use. Sources produce a [`Snapshot`]; the
//! rest of the agent reads the latest one from a watch channel.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
};

use tokio::sync::watch;

/// A workload identity: a Kubernetes ServiceAccount. Policy speaks of it,
/// the kernel maps carry its [`Identity::kernel_id`], certificates carry
/// its SPIFFE form (`identity::SpiffeId::of`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Identity {
    pub namespace: String,
    pub service_account: String,
}

impl Identity {
    pub fn new(namespace: &str, service_account: &str) -> Self {
        Identity {
            namespace: namespace.into(),
            service_account: service_account.into(),
        }
    }

    /// The id `mesh_workloads`, `mesh_endpoints` and `mesh_policy` use:
    /// stable across agents and restarts, so every node's maps agree.
    pub fn kernel_id(&self) -> u32 {
        stable_id(&self.to_string())
    }
}

/// `namespace/serviceaccount`, as audit records and policy explanations print it.
impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.service_account)
    }
}

/// A meshed pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    /// `metadata.uid` (empty when a file source leaves it out).
    pub uid: String,
    pub service_account: String,
    pub node: String,
    /// `status.podIPs`: one address per family (dual-stack), the first
    /// being `status.podIP`. Every one is an endpoint of the pod.
    pub ips: Vec<IpAddr>,
    /// `status.qosClass`: where the kubelet puts its cgroup.
    pub qos_class: Option<String>,
    /// `spec.hostNetwork`: it shares the node's network namespace and
    /// address, so it is never meshed (neither enrolled nor an endpoint).
    pub host_network: bool,
    /// Its [`ADMISSION_ANNOTATION`], when set.
    pub admission: Option<AdmissionMode>,
    /// `metadata.labels`, for Gateway API AuthorizationPolicy selectors.
    pub labels: BTreeMap<String, String>,
}

/// The pod and namespace annotation that sets inbound admission.
pub const ADMISSION_ANNOTATION: &str = "mesh.dev/admission";

/// Inbound admission (README, "Inbound admission"): who may reach a meshed
/// pod besides flows the mesh vouches for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AdmissionMode {
    /// Only attested flows: the local agent's tunneled flows, same-node
    /// meshed pods whose connect passed policy, the probe cgroup.
    Strict,
    /// Everything is admitted; each unattested flow is audited.
    Permissive,
    /// No admission check (the pod is reachable as without a mesh).
    Off,
}

impl AdmissionMode {
    /// An annotation's value. Anything else is read as strict (a typo
    /// never opens a pod) and the error says so.
    pub fn from_annotation(value: &str) -> Result<AdmissionMode, String> {
        match value {
            "strict" => Ok(AdmissionMode::Strict),
            "permissive" => Ok(AdmissionMode::Permissive),
            "off" => Ok(AdmissionMode::Off),
            other => Err(format!(
                "{ADMISSION_ANNOTATION}: {other:?} is not strict, permissive or off; read as strict"
            )),
        }
    }

    /// Reads an annotation map, logging a bad value (which counts as strict).
    pub fn annotated(annotations: Option<&BTreeMap<String, String>>, what: &str) -> Option<AdmissionMode> {
        let value = annotations?.get(ADMISSION_ANNOTATION)?;
        Some(AdmissionMode::from_annotation(value).unwrap_or_else(|e| {
            tracing::warn!(object = what, error = %e, "bad admission annotation");
            AdmissionMode::Strict
        }))
    }

    /// As `mesh_common::Workload::admission` holds it.
    pub fn kernel_value(self) -> u8 {
        match self {
            AdmissionMode::Strict => mesh_common::ADMISSION_STRICT,
            AdmissionMode::Permissive => mesh_common::ADMISSION_PERMISSIVE,
            AdmissionMode::Off => mesh_common::ADMISSION_OFF,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AdmissionMode::Strict => "strict",
            AdmissionMode::Permissive => "permissive",
            AdmissionMode::Off => "off",
        }
    }
}

impl Pod {
    /// `namespace/name`, how logs and the admin API name a workload.
    pub fn workload_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn identity(&self) -> Identity {
        Identity::new(&self.namespace, &self.service_account)
    }

    /// `status.podIP`, the primary address.
    pub fn primary_ip(&self) -> Option<IpAddr> {
        self.ips.first().copied()
    }

    /// The pod's IPv6 address, when it has one.
    pub fn ipv6(&self) -> Option<std::net::Ipv6Addr> {
        self.ips.iter().find_map(|ip| match ip {
            IpAddr::V6(v6) => Some(*v6),
            IpAddr::V4(_) => None,
        })
    }

    /// The pod's IPv4 address, when it has one.
    pub fn ipv4(&self) -> Option<Ipv4Addr> {
        self.ips.iter().find_map(|ip| match ip {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        })
    }
}

/// An SMI resource as read: where it came from, its name, its spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Named<T> {
    pub namespace: String,
    pub name: String,
    pub spec: T,
}

/// The SMI resources of a snapshot, unvalidated (the policy compiler
/// validates them, one by one).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SmiSet {
    pub traffic_targets: Vec<Named<crate::smi::TrafficTargetSpec>>,
    pub http_route_groups: Vec<Named<crate::smi::HTTPRouteGroupSpec>>,
    pub tcp_routes: Vec<Named<crate::smi::TCPRouteSpec>>,
    pub udp_routes: Vec<Named<crate::smi::UDPRouteSpec>>,
    pub traffic_splits: Vec<Named<crate::smi::TrafficSplitSpec>>,
}

/// A route kind and name, as messages name it: `HTTPRoute t/name`.
pub type RouteName = String;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefusedRoute {
    pub name: RouteName,
    pub reason: String,
}

/// How a compiler judged a snapshot's Gateway API routes: those in force,
/// each with the backends that did not resolve, and those refused.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteVerdicts {
    pub accepted: BTreeMap<RouteName, Vec<String>>,
    pub refused: Vec<RefusedRoute>,
}

/// The route compiler as the Kubernetes source's status writer calls it
/// (given by `app`, so the source does not depend on the compilers).
pub type JudgeRoutes = Arc<dyn Fn(&Snapshot) -> RouteVerdicts + Send + Sync>;

/// The Gateway API resources of a snapshot, unvalidated (`gateway_routes`
/// validates them, one by one). TCPRoute and UDPRoute here are Gateway
/// API's (attached to a Service), not SMI's traffic specs of the same name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GatewaySet {
    pub http_routes: Vec<Named<crate::gateway::HTTPRouteSpec>>,
    pub grpc_routes: Vec<Named<crate::gateway::GRPCRouteSpec>>,
    pub tcp_routes: Vec<Named<crate::gateway::L4RouteSpec>>,
    pub udp_routes: Vec<Named<crate::gateway::L4RouteSpec>>,
    pub authorization_policies: Vec<Named<crate::gateway::AuthorizationPolicySpec>>,
    /// The mesh's own policy attachment (`mesh.dev/v1alpha1`), read with them.
    pub traffic_policies: Vec<Named<crate::traffic_policy::TrafficPolicySpec>>,
}

/// A Service with its endpoints (from EndpointSlices).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    /// `spec.clusterIPs` (one per family, dual-stack); empty for headless Services.
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub endpoints: Vec<ServiceEndpoint>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: String,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServiceEndpoint {
    pub ip: IpAddr,
    pub ready: bool,
    pub node: Option<String>,
    /// (port name, target port) as the slice lists them.
    pub ports: Vec<(Option<String>, u16)>,
}

/// Mesh-wide policy mode (README, "SMI access policy").
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PolicyMode {
    /// The SMI spec: meshed traffic no TrafficTarget allows is denied.
    Enforcing,
    /// Everything allowed (still encrypted); decisions are still logged.
    Permissive,
}

/// One consistent view of the cluster, as a source last read it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Keyed by `namespace/name`.
    pub pods: BTreeMap<String, Pod>,
    /// Node name -> the address its agent's tunnel listens on (InternalIP).
    pub nodes: BTreeMap<String, Ipv4Addr>,
    pub smi: SmiSet,
    pub gateway: GatewaySet,
    /// Keyed by `namespace/name`.
    pub services: BTreeMap<String, Service>,
    /// `namespace/name` of every ServiceAccount the source knows.
    pub service_accounts: std::collections::BTreeSet<String>,
    /// Set by a MeshConfig document; the agent's flag applies otherwise.
    pub mode: Option<PolicyMode>,
    /// MeshConfig `spec.admission`, when set.
    pub admission: Option<AdmissionMode>,
    /// Namespaces whose [`ADMISSION_ANNOTATION`] is set.
    pub namespace_admission: BTreeMap<String, AdmissionMode>,
    /// Files that failed to read, with why (their last good content is used).
    pub errors: Vec<String>,
    /// Source generation, bumped on every accepted change.
    pub generation: u64,
}

impl Snapshot {
    /// A pod's inbound admission and what set it: its annotation, its
    /// namespace's, the MeshConfig's, else strict when policy is enforced
    /// and permissive (audit only) when it is not.
    pub fn admission_of(&self, pod: &Pod, policy: PolicyMode) -> (AdmissionMode, &'static str) {
        if let Some(m) = pod.admission {
            return (m, "pod annotation");
        }
        if let Some(m) = self.namespace_admission.get(&pod.namespace) {
            return (*m, "namespace annotation");
        }
        if let Some(m) = self.admission {
            return (m, "MeshConfig");
        }
        match policy {
            PolicyMode::Enforcing => (AdmissionMode::Strict, "default in enforcing mode"),
            PolicyMode::Permissive => (AdmissionMode::Permissive, "default in permissive mode"),
        }
    }

    /// Workload ids for every pod: FNV-1a of `namespace/name`, so they survive
    /// an agent restart (records written by the kernel before the restart
    /// still name the right pod); collisions probe to the next free id.
    pub fn workload_ids(&self) -> BTreeMap<String, u32> {
        let mut used = HashSet::new();
        let mut ids = BTreeMap::new();
        for key in self.pods.keys() {
            let mut id = stable_id(key);
            while !used.insert(id) {
                id = id.wrapping_add(1).max(1);
            }
            ids.insert(key.clone(), id);
        }
        ids
    }

    /// Whether two snapshots say the same thing (ignoring the generation):
    /// sources publish only when this is false.
    pub fn same_content(&self, other: &Snapshot) -> bool {
        self.pods == other.pods
            && self.nodes == other.nodes
            && self.smi == other.smi
            && self.gateway == other.gateway
            && self.services == other.services
            && self.service_accounts == other.service_accounts
            && self.mode == other.mode
            && self.admission == other.admission
            && self.namespace_admission == other.namespace_admission
            && self.errors == other.errors
    }
}

/// A published snapshot with its lookups built once (ztunnel's
/// `WorkloadStore`): the connection path asks by address or by kernel
/// workload id, the kubelet layout by pod UID, and none of them scans.
#[derive(Debug, Default)]
pub struct Store {
    snapshot: Snapshot,
    by_ip: HashMap<IpAddr, Arc<Pod>>,
    by_workload_id: HashMap<u32, Arc<Pod>>,
    by_uid: HashMap<String, Arc<Pod>>,
    workload_ids: BTreeMap<String, u32>,
}

impl Store {
    pub fn new(snapshot: Snapshot) -> Self {
        let workload_ids = snapshot.workload_ids();
        let (mut by_ip, mut by_workload_id, mut by_uid) = (HashMap::new(), HashMap::new(), HashMap::new());
        for (key, pod) in &snapshot.pods {
            let pod = Arc::new(pod.clone());
            // Two pods claiming one address: the first by name answers, as a
            // scan in name order did.
            for ip in &pod.ips {
                by_ip.entry(*ip).or_insert_with(|| pod.clone());
            }
            if !pod.uid.is_empty() {
                by_uid.insert(pod.uid.clone(), pod.clone());
            }
            by_workload_id.insert(workload_ids[key], pod);
        }
        Store {
            snapshot,
            by_ip,
            by_workload_id,
            by_uid,
            workload_ids,
        }
    }

    /// The pod with this address, of either family (an IPv4-mapped IPv6
    /// address is the IPv4 address it maps).
    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<&Pod> {
        self.by_ip.get(&ip.to_canonical()).map(|p| &**p)
    }

    pub fn pod_by_workload_id(&self, id: u32) -> Option<&Pod> {
        self.by_workload_id.get(&id).map(|p| &**p)
    }

    pub fn pod_by_uid(&self, uid: &str) -> Option<&Pod> {
        self.by_uid.get(uid).map(|p| &**p)
    }

    /// The kernel workload id of every pod, by `namespace/name`.
    pub fn workload_ids(&self) -> &BTreeMap<String, u32> {
        &self.workload_ids
    }

    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }
}

impl std::ops::Deref for Store {
    type Target = Snapshot;

    fn deref(&self) -> &Snapshot {
        &self.snapshot
    }
}

/// The kernel-map id of a name (see [`crate::tables::stable_id`]).
fn stable_id(name: &str) -> u32 {
    crate::tables::stable_id(name)
}

pub type SnapshotRx = watch::Receiver<Arc<Store>>;

/// The sources' end of the channel: every publication is indexed once here.
#[derive(Clone)]
pub struct SnapshotTx(watch::Sender<Arc<Store>>);

impl SnapshotTx {
    pub fn publish(&self, snapshot: Snapshot) {
        self.0.send_replace(Arc::new(Store::new(snapshot)));
    }

    /// The snapshot last published (to compare a new read against).
    pub fn borrow(&self) -> watch::Ref<'_, Arc<Store>> {
        self.0.borrow()
    }
}

pub fn channel() -> (SnapshotTx, SnapshotRx) {
    let (tx, rx) = watch::channel(Arc::new(Store::default()));
    (SnapshotTx(tx), rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str, ip: [u8; 4]) -> Pod {
        Pod {
            namespace: ns.into(),
            name: name.into(),
            uid: String::new(),
            service_account: "default".into(),
            node: "n1".into(),
            ips: vec![IpAddr::from(ip)],
            qos_class: None,
            host_network: false,
            labels: BTreeMap::new(),
            admission: None,
        }
    }

    #[test]
    fn workload_ids_are_stable_unique_and_nonzero() {
        let mut s = Snapshot::default();
        for i in 0..500u16 {
            let p = pod("ns", &format!("p{i}"), [198, 18, (i >> 8) as u8, i as u8]);
            s.pods.insert(p.workload_name(), p);
        }
        let a = s.workload_ids();
        let b = s.clone().workload_ids();
        assert_eq!(a, b);
        let mut seen: Vec<u32> = a.values().copied().collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 500);
        assert!(!seen.contains(&0));
    }

    /// The connection path's lookups (by address, by kernel workload id, by
    /// pod UID) at 100, 1,000 and 10,000 pods, side by side with the scan
    /// they replaced. Prints ns per lookup and the ratio to 100 pods; the
    /// assertions check the answers, not the clock.
    #[test]
    fn lookups_stay_flat() {
        println!("pods    by_ip   by_workload_id  by_uid   scan_by_ip (ns per lookup)");
        let mut first = None;
        for n in [100u32, 1_000, 10_000] {
            let mut snap = Snapshot::default();
            for i in 0..n {
                let mut p = pod("ns", &format!("p{i}"), [198, 18, (i >> 8) as u8, i as u8]);
                p.uid = format!("uid-{i}");
                snap.pods.insert(p.workload_name(), p);
            }
            let store = Store::new(snap);
            let ids: Vec<(IpAddr, u32, String)> = store
                .pods
                .iter()
                .map(|(k, p)| (p.ips[0], store.workload_ids()[k], p.uid.clone()))
                .collect();
            let rounds = 200_000usize;
            let time = |f: &dyn Fn(usize) -> bool| {
                let t = std::time::Instant::now();
                let mut hits = 0usize;
                for i in 0..rounds {
                    hits += usize::from(f(i));
                }
                assert_eq!(hits, rounds, "every lookup finds its pod");
                t.elapsed().as_nanos() as f64 / rounds as f64
            };
            let at = |i: usize| &ids[(i * 7919) % ids.len()];
            let by_ip = time(&|i| store.pod_by_ip(at(i).0).is_some_and(|p| p.ips[0] == at(i).0));
            let by_id = time(&|i| store.pod_by_workload_id(at(i).1).is_some());
            let by_uid = time(&|i| store.pod_by_uid(&at(i).2).is_some_and(|p| p.uid == at(i).2));
            // What every connection paid before the index: a scan in name order.
            let scan_rounds = 2_000usize;
            let t = std::time::Instant::now();
            for i in 0..scan_rounds {
                assert!(store.pods.values().any(|p| p.ips[0] == at(i).0));
            }
            let scan = t.elapsed().as_nanos() as f64 / scan_rounds as f64;
            let base = *first.get_or_insert(by_ip);
            println!(
                "{n:>6} {by_ip:>7.0} {by_id:>15.0} {by_uid:>7.0} {scan:>12.0}   (by_ip {:.2}x of 100 pods; scan {:.0}x of by_ip)",
                by_ip / base,
                scan / by_ip
            );
        }
    }
}
