//! Plain rows for the kernel maps: what `policy`, `services` and `enrol`
//! produce and `redirect` (the only writer of kernel maps) writes. Keeping
//! them here lets the writer know nothing of SMI, Services or cgroup
//! layouts, and the compilers nothing of aya.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

/// One L4 allow rule of `mesh_policy` (see `mesh_common::PolicyKey`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PolicyRow {
    /// Source identity id ([`stable_id`] of `namespace/serviceaccount`).
    pub src: u32,
    pub dst: u32,
    /// A port, or `mesh_common::ANY_PORT`.
    pub port: u16,
    /// `mesh_common::PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// Index of the allowing TrafficTarget in the compiled policy.
    pub rule: u32,
    /// `mesh_common::POLICY_FLAG_HTTP`: the agent must see the flow.
    pub flags: u32,
}

/// An enrolled pod of this node (`mesh_workloads`), by the cgroup id of its
/// processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkloadRow {
    pub cgroup_id: u64,
    pub workload_id: u32,
    /// The pod's addresses, one per family if it has them: the source the
    /// kernel attributes to an unbound socket of the pod.
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    pub identity_id: u32,
    /// Inbound admission: `mesh_common::ADMISSION_{OFF,STRICT,PERMISSIVE}`.
    pub admission: u8,
}

/// A meshed pod anywhere in the cluster (`mesh_endpoints`), by one of its
/// addresses (a dual-stack pod has a row per family).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointRow {
    pub ip: IpAddr,
    pub workload_id: u32,
    pub identity_id: u32,
    pub same_node: bool,
}

/// One service port's table (`mesh_services` + `mesh_backends`): the kernel
/// picks `slots[random % len]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceTable {
    /// `namespace/name:port`, for logs.
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    /// `mesh_common::PROTO_TCP` or `PROTO_UDP`.
    pub protocol: u8,
    /// (pod IP, target port); empty: no ready endpoint.
    pub slots: Vec<(IpAddr, u16)>,
    /// The TrafficSplit in force for it, `namespace/name`.
    pub split: Option<String>,
    /// An HTTP-matched split: connects go to the agent, which routes each
    /// request; `slots` (the root's own endpoints) serve only while no
    /// agent is configured on the node.
    pub via_agent: bool,
    /// UDP: the agent's relay port for each endpoint on another node
    /// (filled by `tunnel::udp::Relays::assign`); the others are sent to directly.
    pub relays: BTreeMap<SocketAddr, u16>,
}

impl ServiceTable {
    /// Stable per service port, so an agent restart rewrites the same ids.
    pub fn id(&self) -> u32 {
        stable_id(&format!("service/{}", self.name))
    }
}

/// The 32-bit ids the kernel maps use (identities, workloads, services):
/// FNV-1a of a name, so every node's agents and every restart agree without
/// talking to each other; 0 is reserved for "unknown".
pub fn stable_id(name: &str) -> u32 {
    name.bytes()
        .fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193))
        .max(1)
}
