//! Loads, attaches and pins the kernel programs, and is the only writer of
//! the kernel maps.
//!
//! State outlives the agent: maps and links are pinned under the bpffs
//! directory, so while the agent restarts, policy stays in force and
//! captured connects are refused at once (fail closed). A new agent
//! adopts the pins: it reuses the maps and swaps its programs in before
//! letting go of the old ones, so there is no moment without capture.
//!
//! Files: `loader` (load, attach, adopt links), `pins` (the pinned state on
//! bpffs), `sys` (raw bpf(2) calls aya lacks), and one writer per group of
//! maps (`workloads`, `policy`, `services`, `stats`). The writers take plain
//! rows (`crate::tables`); what a row means is decided elsewhere.
mod admit;
mod fast_path;
mod loader;
mod pins;
mod policy;
mod services;
mod stats;
mod sys;
mod udp_slots;
mod workloads;

use std::{
    collections::{BTreeMap, HashSet},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuHashMap},
    programs::links::PinnedLink,
};
use mesh_common::{
    Addr, Admit, AdmitKey, CaptureStats, Config, Endpoint, FastPathStats, OrigDst, SockKey, TrafficKey, TrafficStats,
    UdpSenderKey, UdpSlot, Workload, maps,
};

pub use admit::admit_key;
pub use fast_path::FastPathRow;
pub use pins::{agent_alive, pinned_layout, remove_pins};
use policy::PolicyState;
use services::ServiceState;
pub use udp_slots::SlotTarget;

#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("loading the eBPF object failed: {0} (is this kernel >= 6.6 with BTF and BPF JIT?)")]
    Load(#[source] aya::EbpfError),
    #[error("the kernel rejected program {name}: {err} (run with RUST_LOG=debug for the verifier log)")]
    Program {
        name: &'static str,
        #[source]
        err: aya::programs::ProgramError,
    },
    #[error("cannot attach {name} to cgroup {cgroup}: {err}")]
    Attach {
        name: &'static str,
        cgroup: PathBuf,
        #[source]
        err: aya::programs::ProgramError,
    },
    #[error("cannot open cgroup {0}: {1} (check that it exists on the cgroup2 mount)")]
    Cgroup(PathBuf, #[source] std::io::Error),
    #[error("pinning {0} failed: {1} (is the bpffs directory writable?)")]
    Pin(PathBuf, String),
    #[error(
        "maps pinned in {dir} have layout v{found} (4294967295: unreadable), newer than this agent's v{ours}: run the newer \
         agent, or `mesh-agent uninstall --bpffs-dir {dir}` to replace them deliberately"
    )]
    IncompatiblePins { dir: PathBuf, found: u32, ours: u32 },
    #[error(
        "the policy compiles to {rules} kernel rules, and mesh_policy holds {capacity} with the {in_force} of the \
         generation in force kept until the switch: refused whole, the policy in force stays (allow fewer \
         source x destination x port combinations, e.g. with wider TCPRoutes)"
    )]
    PolicyTooLarge {
        rules: usize,
        in_force: usize,
        capacity: usize,
    },
    #[error("map {0} missing from the eBPF object (agent and mesh-ebpf out of sync; rebuild)")]
    MissingMap(&'static str),
    #[error("map {name}: {err}")]
    Map {
        name: &'static str,
        #[source]
        err: aya::maps::MapError,
    },
}

/// Settings the kernel programs need.
pub struct RedirectOptions<'a> {
    pub bpffs_dir: &'a Path,
    /// The kubelet's pod cgroup root: the programs attach here.
    pub pod_cgroup_root: &'a Path,
    /// Its level below the cgroup2 root (`enrol::cgroup_level`).
    pub pod_cgroup_level: u8,
    pub capture_ip: Ipv4Addr,
    pub capture_ip6: Option<Ipv6Addr>,
    pub outbound_port: u16,
    /// (first port, slots) of the agent's pod-to-pod UDP relay ports.
    pub udp_relay: Option<(u16, u16)>,
    pub fail_open: bool,
    pub kernel_debug: bool,
    /// Deliver same-node pod-to-pod packets veth to veth (`mesh_fast_path`).
    pub fast_path: bool,
    /// The host cgroup whose connects to pods are vouched for (the
    /// kubelet's: probes), if any.
    pub probe_cgroup: Option<&'a Path>,
}

pub struct Redirect {
    // Kept for the programs' lifetime; cgroup links are pinned, so dropping
    // this does not detach them (the fast path's per-veth links do go).
    ebpf: Mutex<Ebpf>,
    _links: Vec<PinnedLink>,
    config: Mutex<Array<MapData, Config>>,
    config_value: Mutex<Config>,
    workloads: Mutex<HashMap<MapData, u64, Workload>>,
    endpoints: Mutex<HashMap<MapData, Addr, Endpoint>>,
    udp_slots: Mutex<HashMap<MapData, u32, UdpSlot>>,
    udp_senders: Mutex<HashMap<MapData, UdpSenderKey, UdpSlot>>,
    admit: Mutex<HashMap<MapData, AdmitKey, Admit>>,
    flows: Mutex<HashMap<MapData, SockKey, OrigDst>>,
    policy: Mutex<PolicyState>,
    fast_stats: PerCpuArray<MapData, FastPathStats>,
    fast_path: Mutex<fast_path::FastPathState>,
    capture: PerCpuArray<MapData, CaptureStats>,
    traffic: Mutex<PerCpuHashMap<MapData, TrafficKey, TrafficStats>>,
    services: Mutex<ServiceState>,
    pub kernel_logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// `mesh_events`, for the audit trail's drain (taken by the app).
    pub kernel_events: Option<aya::maps::RingBuf<MapData>>,
}

impl Redirect {
    /// Whether this agent still owns the kernel maps: the newest agent to
    /// load claimed them (`Config::owner_pid`) and only the owner writes
    /// the config, so the owner's heartbeat is the one in it. Ours, or a
    /// claim whose heartbeat stopped (that agent died): we write.
    fn owns_kernel(&self) -> bool {
        let Ok(pinned) = self.config.lock().expect("config lock").get(&0, 0) else {
            return true;
        };
        pinned.owner_pid == 0 || pinned.owner_pid == std::process::id() || pinned.alive_until_ns < monotonic_ns()
    }

    fn write_config(&self) -> Result<(), RedirectError> {
        if !self.owns_kernel() {
            tracing::debug!("a newer agent owns the kernel maps: not writing mesh_config");
            return Ok(());
        }
        self.claim_kernel()
    }

    /// What the kernel enforces right now, from the pinned `mesh_config`:
    /// (enforcing, policy generation), whoever wrote it.
    pub fn kernel_policy(&self) -> Option<(bool, u32)> {
        let c = self.config.lock().expect("config lock").get(&0, 0).ok()?;
        Some((c.policy_mode == mesh_common::POLICY_ENFORCING, c.policy_generation))
    }

    /// Writes our config whoever owned the maps: what a newly loaded agent
    /// does once, to claim them.
    pub(super) fn claim_kernel(&self) -> Result<(), RedirectError> {
        let value = *self.config_value.lock().expect("config lock");
        self.config
            .lock()
            .expect("config lock")
            .set(0, &value, 0)
            .map_err(|err| RedirectError::Map {
                name: maps::CONFIG,
                err,
            })
    }

    /// Tells the kernel the agent is alive for the next few seconds; only
    /// consulted in fail-open mode.
    pub fn heartbeat(&self) -> Result<(), RedirectError> {
        self.config_value.lock().expect("config lock").alive_until_ns = monotonic_ns() + ALIVE_WINDOW_NS;
        self.write_config()
    }

    /// Takes the capture record of an accepted connection: `client` is the
    /// pod's address (the accepted socket's peer), `listener` the local one.
    /// Either family; an IPv4 client of a dual-stack listener (IPv4-mapped)
    /// is the same key as on an IPv4 one.
    pub fn take_flow(&self, client: SocketAddr, listener: SocketAddr) -> Option<OrigDst> {
        let key = SockKey {
            local: Addr::from(client.ip()),
            remote: Addr::from(listener.ip()),
            local_port: client.port(),
            remote_port: listener.port(),
        };
        let mut flows = self.flows.lock().expect("flows lock");
        let orig = flows.get(&key, 0).ok()?;
        let _ = flows.remove(&key);
        Some(orig)
    }
}

fn replace_all<K, V>(
    map: &mut HashMap<MapData, K, V>,
    want: &BTreeMap<K, V>,
    name: &'static str,
) -> Result<(), RedirectError>
where
    K: aya::Pod + Ord + std::hash::Hash + Eq,
    V: aya::Pod + PartialEq,
{
    let have: HashSet<K> = map.keys().filter_map(Result::ok).collect();
    for stale in have.iter().filter(|k| !want.contains_key(k)) {
        let _ = map.remove(stale);
    }
    for (k, v) in want {
        if map.get(k, 0).ok().as_ref() != Some(v) {
            map.insert(k, v, 0).map_err(|err| RedirectError::Map { name, err })?;
        }
    }
    Ok(())
}

const ALIVE_WINDOW_NS: u64 = 3_000_000_000;

/// CLOCK_MONOTONIC, the clock bpf_ktime_get_ns() reads.
fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}
