//! What the agent knows about the cluster: the meshed pods (workloads), with
//! stable ids the kernel programs use. Sources produce a [`Snapshot`]; the
//! rest of the agent reads the latest one from a watch channel.
use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    sync::Arc,
};

use tokio::sync::watch;

/// A meshed pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub node: String,
    pub ip: Ipv4Addr,
}

impl Pod {
    /// `namespace/name`, how logs and the admin API name a workload.
    pub fn workload_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
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

/// A Service with its endpoints (from EndpointSlices).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    /// None for headless Services.
    pub cluster_ip: Option<Ipv4Addr>,
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
    pub ip: Ipv4Addr,
    pub ready: bool,
    pub node: Option<String>,
    /// (port name, target port) as the slice lists them.
    pub ports: Vec<(Option<String>, u16)>,
}

/// Mesh-wide policy mode (DESIGN.md section 5).
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
    /// Keyed by `namespace/name`.
    pub services: BTreeMap<String, Service>,
    /// `namespace/name` of every ServiceAccount the source knows.
    pub service_accounts: std::collections::BTreeSet<String>,
    /// Set by a MeshConfig document; the agent's flag applies otherwise.
    pub mode: Option<PolicyMode>,
    /// Files that failed to read, with why (their last good content is used).
    pub errors: Vec<String>,
    /// Source generation, bumped on every accepted change.
    pub generation: u64,
}

impl Snapshot {
    /// Workload ids for every pod: FNV-1a of `namespace/name`, so they survive
    /// an agent restart (records written by the kernel before the restart
    /// still name the right pod); collisions probe to the next free id.
    pub fn workload_ids(&self) -> BTreeMap<String, u32> {
        let mut used: HashMap<u32, ()> = HashMap::new();
        let mut ids = BTreeMap::new();
        for key in self.pods.keys() {
            let mut id = fnv1a(key.as_bytes()).max(1);
            while used.contains_key(&id) {
                id = id.wrapping_add(1).max(1);
            }
            used.insert(id, ());
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
            && self.services == other.services
            && self.service_accounts == other.service_accounts
            && self.mode == other.mode
            && self.errors == other.errors
    }

    pub fn pod_by_ip(&self, ip: Ipv4Addr) -> Option<&Pod> {
        self.pods.values().find(|p| p.ip == ip)
    }

    /// Every pod by its kernel workload id (one pass, for bulk lookups).
    pub fn pods_by_workload_id(&self) -> HashMap<u32, &Pod> {
        self.workload_ids()
            .into_iter()
            .filter_map(|(k, id)| self.pods.get(&k).map(|p| (id, p)))
            .collect()
    }

    pub fn pod_by_workload_id(&self, id: u32) -> Option<&Pod> {
        let ids = self.workload_ids();
        ids.iter().find(|(_, v)| **v == id).and_then(|(k, _)| self.pods.get(k))
    }
}

/// The id the kernel maps use for an identity (namespace + ServiceAccount).
/// A 32-bit hash: stable across agents and restarts, so every node's maps
/// agree; 0 is reserved for "unknown".
pub fn identity_id(namespace: &str, service_account: &str) -> u32 {
    fnv1a(format!("{namespace}/{service_account}").as_bytes()).max(1)
}

fn fnv1a(bytes: &[u8]) -> u32 {
    bytes
        .iter()
        .fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(*b)).wrapping_mul(0x0100_0193))
}

pub type SnapshotRx = watch::Receiver<Arc<Snapshot>>;
pub type SnapshotTx = watch::Sender<Arc<Snapshot>>;

pub fn channel() -> (SnapshotTx, SnapshotRx) {
    watch::channel(Arc::new(Snapshot::default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str, ip: [u8; 4]) -> Pod {
        Pod {
            namespace: ns.into(),
            name: name.into(),
            service_account: "default".into(),
            node: "n1".into(),
            ip: Ipv4Addr::from(ip),
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
}
