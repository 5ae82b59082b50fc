#![allow(non_upper_case_globals)] // the static's name is the kernel map name
//! The maps shared by the programs. The agent's `redirect` module is the only
//! userspace writer; see the README's map table for who writes what.
use aya_ebpf::{
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf, SockHash},
    macros::btf_map,
};
use mesh_common::{
    CaptureStats, Config, Endpoint, OrigDst, PolicyEvent, PolicyKey, PolicyValue, SockKey, SpliceStats, Workload,
};

/// cgroup id -> enrolled pod of this node.
#[btf_map(pin_by_name)]
pub static mesh_workloads: HashMap<u64, Workload, 4096> = HashMap::new();

/// IPv4 (network order) -> meshed pod, on any node.
#[btf_map(pin_by_name)]
pub static mesh_endpoints: HashMap<u32, Endpoint, 65536> = HashMap::new();

#[btf_map(pin_by_name)]
pub static mesh_config: Array<Config, 1> = Array::new();

/// Socket cookie -> original destination; short-lived, from connect() to
/// established. LRU so a connect that never completes cannot fill it.
#[btf_map(pin_by_name)]
pub static mesh_cookies: LruHashMap<u64, OrigDst, 65536> = LruHashMap::new();

/// The same record keyed by the client socket's addresses; the agent takes it
/// when it accepts. LRU for flows the agent never accepts.
#[btf_map(pin_by_name)]
pub static mesh_flows: LruHashMap<SockKey, OrigDst, 65536> = LruHashMap::new();

/// Sockets whose payload `mesh_sk_msg` splices. The kernel drops a socket from
/// it when the socket closes.
#[btf_map(pin_by_name)]
pub static mesh_socks: SockHash<SockKey, 65536> = SockHash::new();

/// L4 allow rules of the policy generations in force (see Config).
#[btf_map(pin_by_name)]
pub static mesh_policy: HashMap<PolicyKey, PolicyValue, 65536> = HashMap::new();

/// Every policy decision at connect(), for the agent's audit trail (256 KiB:
/// about 8,000 events between two drains).
#[btf_map(pin_by_name)]
pub static mesh_events: RingBuf<PolicyEvent, 262144> = RingBuf::new();

#[btf_map(pin_by_name)]
pub static mesh_splice: PerCpuArray<SpliceStats, 1> = PerCpuArray::new();

#[btf_map(pin_by_name)]
pub static mesh_capture: PerCpuArray<CaptureStats, 1> = PerCpuArray::new();

#[inline(always)]
pub fn config() -> Option<&'static Config> {
    mesh_config.get(0)
}

#[inline(always)]
pub fn is_loopback(ipv4_be: u32) -> bool {
    // Network order in memory: the first octet is the lowest byte.
    ipv4_be & 0xff == 127
}
