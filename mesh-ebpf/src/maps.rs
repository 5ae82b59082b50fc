#![allow(non_upper_case_globals)] // the static's name is the kernel map name
//! The maps shared by the programs. The agent's `redirect` module is the only
//! userspace writer; see the README's map table for who writes what.
use aya_ebpf::{
    btf_maps::{Array, HashMap, LruHashMap, LruPerCpuHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    helpers::bpf_get_current_ancestor_cgroup_id,
    macros::btf_map,
};
use mesh_common::{
    Addr, Admit, AdmitKey, Backend, BackendKey, CaptureStats, Config, Endpoint, FastPathStats, OrigDst,
    POD_CGROUP_DEPTH, PodDev, PodFlow, PolicyEvent, PolicyKey, PolicyValue, ServiceKey, ServiceValue, SockKey,
    TrafficKey, TrafficStats, UdpFlowKey, UdpPeerKey, UdpSenderKey, UdpService, UdpSlot, Workload,
};

/// Pod-level cgroup id -> enrolled pod of this node.
#[btf_map(pin_by_name)]
pub static mesh_workloads: HashMap<u64, Workload, 4096> = HashMap::new();

/// Pod address (either family) -> meshed pod, on any node.
#[btf_map(pin_by_name)]
pub static mesh_endpoints: HashMap<Addr, Endpoint, 65536> = HashMap::new();

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

/// Enrolled pods of this node -> their host-side veth and MAC (`mesh_fast_path`).
#[btf_map(pin_by_name)]
pub static mesh_pod_devs: HashMap<Addr, PodDev, 8192> = HashMap::new();

/// Service VIP:port -> its slot table in force (see ServiceValue).
#[btf_map(pin_by_name)]
pub static mesh_services: HashMap<ServiceKey, ServiceValue, 16384> = HashMap::new();

/// Service id -> this CPU's next turn in the service's slot table
/// (`connect4::pick_backend`); only the kernel writes it.
#[btf_map(pin_by_name)]
pub static mesh_lb_cursor: LruPerCpuHashMap<u32, u32, 16384> = LruPerCpuHashMap::new();

/// Slot tables of every service; not preallocated (a TrafficSplit takes
/// 1,000 slots, a plain service one per endpoint).
#[btf_map(pin_by_name)]
pub static mesh_backends: HashMap<BackendKey, Backend, 1048576, { aya_ebpf::bindings::BPF_F_NO_PREALLOC as usize }> =
    HashMap::new();

/// UDP sockets' rewritten peers -> the VIP they stand for; written on every
/// rewritten send, read on receive. LRU: nothing tells us a socket closed.
#[btf_map(pin_by_name)]
pub static mesh_udp_peers: LruHashMap<UdpPeerKey, UdpService, 65536> = LruHashMap::new();

/// Relay slot -> the remote pod UDP address it stands for (see
/// `udp::relay_slot`); the agent retires idle ones.
#[btf_map(pin_by_name)]
pub static mesh_udp_slots: HashMap<u32, UdpSlot, 4096> = HashMap::new();

/// (workload, slot) -> the destination that workload's socket sent to
/// through the slot: the agent relays only datagrams whose sender is
/// recorded here. LRU: nothing says when a pod stops sending.
#[btf_map(pin_by_name)]
pub static mesh_udp_sender: LruHashMap<UdpSenderKey, UdpSlot, 65536> = LruHashMap::new();

/// Same-node UDP exchanges policy allowed, from the answering side (see
/// `udp::may_answer`). LRU: UDP never says an exchange is over.
#[btf_map(pin_by_name)]
pub static mesh_udp_answer: LruHashMap<UdpFlowKey, u8, 65536> = LruHashMap::new();

/// Flows the mesh vouches for, as the receiving pod sees them (see
/// `inbound.rs`). LRU: a record whose flow never started just ages out
/// (each also carries its own deadline).
#[btf_map(pin_by_name)]
pub static mesh_admit: LruHashMap<AdmitKey, Admit, 65536> = LruHashMap::new();

/// Unattested flows -> when their refusal was last audited.
#[btf_map(pin_by_name)]
pub static mesh_refused: LruHashMap<AdmitKey, u64, 16384> = LruHashMap::new();

/// L4 allow rules of the policy generations in force (see Config).
#[btf_map(pin_by_name)]
pub static mesh_policy: HashMap<PolicyKey, PolicyValue, { mesh_common::POLICY_CAPACITY as usize }> = HashMap::new();

/// Every policy decision at connect(), for the agent's audit trail (256 KiB:
/// about 8,000 events between two drains).
#[btf_map(pin_by_name)]
pub static mesh_events: RingBuf<PolicyEvent, { EVENTS_BYTES as usize }> = RingBuf::new();
pub const EVENTS_BYTES: u64 = 262_144;

/// Same-node pod-to-pod sockets -> their workload pair and end; removed when
/// the socket closes (LRU in case a close is missed).
#[btf_map(pin_by_name)]
pub static mesh_pod_flows: LruHashMap<SockKey, PodFlow, 65536> = LruHashMap::new();

/// Same-node traffic per workload pair; the agent prunes pairs whose pods are gone.
#[btf_map(pin_by_name)]
pub static mesh_traffic: PerCpuHashMap<TrafficKey, TrafficStats, 16384> = PerCpuHashMap::new();

#[btf_map(pin_by_name)]
pub static mesh_fast_stats: PerCpuArray<FastPathStats, 1> = PerCpuArray::new();

#[btf_map(pin_by_name)]
pub static mesh_capture: PerCpuArray<CaptureStats, 1> = PerCpuArray::new();

#[inline(always)]
pub fn config() -> Option<&'static Config> {
    mesh_config.get(0)
}

/// The enrolled pod the calling task belongs to, by its pod-level ancestor
/// cgroup: kernel-attested, and the same for a process in a container's
/// cgroup or in any cgroup it made below (ARCHITECTURE.md, "Pods and
/// cgroups"). `mesh_workloads` holds only pod-level cgroups, and pods do
/// not nest, so the first ancestor found there is the pod.
#[inline(always)]
pub fn current_workload() -> Option<&'static Workload> {
    let base = i32::from(config()?.pod_cgroup_level);
    let mut level = 1;
    while level <= i32::from(POD_CGROUP_DEPTH) {
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(base + level) };
        if id == 0 {
            return None; // the task's cgroup is shallower: not below a pod
        }
        if let Some(w) = unsafe { mesh_workloads.get(&id) } {
            return Some(w);
        }
        level += 1;
    }
    None
}

/// This CPU's counters for a workload pair, created on first use. None only
/// when `mesh_traffic` is full: the pair is then counted in the totals only.
#[inline(always)]
pub fn traffic(key: &TrafficKey) -> Option<&'static mut TrafficStats> {
    if let Some(p) = mesh_traffic.get_ptr_mut(key) {
        return Some(unsafe { &mut *p });
    }
    let _ = mesh_traffic.insert(
        key,
        &TrafficStats::default(),
        u64::from(aya_ebpf::bindings::BPF_NOEXIST),
    );
    mesh_traffic.get_ptr_mut(key).map(|p| unsafe { &mut *p })
}
