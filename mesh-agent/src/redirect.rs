//! Loads, attaches and pins the kernel programs, and is the only writer of
//! the kernel maps.
//!
//! State outlives the agent: maps and links are pinned under the bpffs
//! directory, so while the agent restarts, same-node connections stay spliced
//! and captured connects are refused at once (fail closed). A new agent
//! adopts the pins: it reuses the maps and swaps its programs in before
//! letting go of the old ones, so there is no moment without capture.
use std::{
    collections::{BTreeMap, HashSet},
    fs::File,
    net::Ipv4Addr,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuHashMap, SockHash},
    programs::{
        CgroupAttachMode, CgroupSockAddr, SkMsg, SockOps,
        cgroup_sock_addr::CgroupSockAddrLink,
        links::{FdLink, PinnedLink},
    },
};
use mesh_common::{
    Backend, BackendKey, CaptureStats, Config, Endpoint, MAP_LAYOUT_VERSION, OrigDst, PolicyKey, PolicyValue,
    ServiceKey, ServiceValue, SockKey, SpliceStats, TrafficKey, TrafficStats, Workload, maps, programs,
};

use crate::state::Snapshot;

/// The BPF object built from `mesh-ebpf` by build.rs.
static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh"));

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
    pub pod_cgroup_root: &'a Path,
    pub capture_ip: Ipv4Addr,
    pub outbound_port: u16,
    pub fail_open: bool,
    pub kernel_debug: bool,
    pub splice: bool,
}

/// bpf_link cgroup attachments are always multi-attach; the kernel rejects
/// any flag (EINVAL), which aya's `Single` maps to.
const LINK_MODE: CgroupAttachMode = CgroupAttachMode::Single;

/// Names the pinned links in the bpffs directory.
const LINK_CONNECT4: &str = "link_connect4";
const LINK_SENDMSG4: &str = "link_sendmsg4";
const LINK_RECVMSG4: &str = "link_recvmsg4";
const LINK_SOCKOPS_PODS: &str = "link_sockops_pods";
/// Pinned by earlier agents; released on start.
const LINK_SOCKOPS_AGENT: &str = "link_sockops_agent";
const LINK_SK_MSG: &str = "link_sk_msg";

pub struct Redirect {
    // Kept for the programs' lifetime; links are pinned, so dropping this
    // does not detach anything.
    _ebpf: Ebpf,
    _links: Vec<PinnedLink>,
    config: Mutex<Array<MapData, Config>>,
    config_value: Mutex<Config>,
    workloads: Mutex<HashMap<MapData, u64, Workload>>,
    endpoints: Mutex<HashMap<MapData, u32, Endpoint>>,
    flows: Mutex<HashMap<MapData, SockKey, OrigDst>>,
    policy: Mutex<PolicyState>,
    splice: PerCpuArray<MapData, SpliceStats>,
    capture: PerCpuArray<MapData, CaptureStats>,
    traffic: Mutex<PerCpuHashMap<MapData, TrafficKey, TrafficStats>>,
    services: Mutex<ServiceState>,
    pub kernel_logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// `mesh_events`, for the audit trail's drain (taken by the app).
    pub kernel_events: Option<aya::maps::RingBuf<MapData>>,
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, RedirectError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(RedirectError::MissingMap(name))?;
    T::try_from(map).map_err(|err| RedirectError::Map { name, err })
}

fn open_cgroup(path: &Path) -> Result<File, RedirectError> {
    File::open(path).map_err(|e| RedirectError::Cgroup(path.into(), e))
}

/// The layout version of the pins in `dir`: None when nothing is pinned,
/// 0 when an agent created the maps but never configured them, u32::MAX
/// when `mesh_config` is unreadable (another layout, whatever it says).
pub fn pinned_layout(dir: &Path) -> Option<u32> {
    pinned_config(dir).map(|c| c.map_or(u32::MAX, |c| c.layout_version))
}

fn pinned_config(dir: &Path) -> Option<Option<Config>> {
    let path = dir.join(maps::CONFIG);
    if !path.exists() {
        return None;
    }
    Some(
        MapData::from_pin(&path)
            .ok()
            .and_then(|data| Array::<MapData, Config>::try_from(aya::maps::Map::Array(data)).ok())
            .and_then(|arr| arr.get(&0, 0).ok()),
    )
}

/// Whether an agent's heartbeat in the pinned `mesh_config` is current.
pub fn agent_alive(dir: &Path) -> bool {
    matches!(pinned_config(dir), Some(Some(c)) if c.layout_version == MAP_LAYOUT_VERSION && c.alive_until_ns > monotonic_ns())
}

/// Removes every pin in `dir` (maps and links) and the directory. With no
/// process holding them, that detaches the programs and frees the maps:
/// pods' traffic then flows unmeshed. Returns the names removed.
pub fn remove_pins(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        std::fs::remove_file(entry.path())?;
        removed.push(entry.file_name().to_string_lossy().to_string());
    }
    std::fs::remove_dir(dir)?;
    removed.sort();
    Ok(removed)
}

/// Pins of an older map layout are replaced, and the agent says so; pins
/// of a newer one (a downgrade) are refused (see `MAP_LAYOUT_VERSION`).
fn check_pinned_layout(dir: &Path) -> Result<(), RedirectError> {
    let found = match pinned_layout(dir) {
        None | Some(0) => return Ok(()),
        Some(v) if v == MAP_LAYOUT_VERSION => return Ok(()),
        Some(v) => v,
    };
    if found < MAP_LAYOUT_VERSION {
        tracing::warn!(
            dir = %dir.display(),
            pinned_layout = found,
            layout = MAP_LAYOUT_VERSION,
            "pinned maps and programs have an older layout: replacing them (connections spliced by the old programs fall back to TCP; new connects use the new ones)"
        );
        let removed = remove_pins(dir).map_err(|e| RedirectError::Pin(dir.into(), e.to_string()))?;
        tracing::info!(removed = ?removed, "old pins removed");
        std::fs::create_dir_all(dir).map_err(|e| RedirectError::Pin(dir.into(), e.to_string()))?;
        return Ok(());
    }
    Err(RedirectError::IncompatiblePins {
        dir: dir.into(),
        found,
        ours: MAP_LAYOUT_VERSION,
    })
}

impl Redirect {
    pub fn load(opts: &RedirectOptions<'_>) -> Result<Self, RedirectError> {
        let dir = opts.bpffs_dir;
        check_pinned_layout(dir)?;
        // aya-log level lives in the object; 0 silences the kernel side.
        let log_level: u8 = if opts.kernel_debug { 4 } else { 0 };
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(dir)
            .override_global("AYA_LOG_LEVEL", &log_level, false)
            .load(BPF_OBJECT)
            .map_err(RedirectError::Load)?;
        let kernel_logger = if opts.kernel_debug {
            match aya_log::EbpfLogger::init(&mut ebpf) {
                Ok(l) => Some(l),
                Err(e) => {
                    tracing::warn!(error = %e, "kernel debug logging unavailable");
                    None
                }
            }
        } else {
            None
        };

        let pods = open_cgroup(opts.pod_cgroup_root)?;
        let mut links = Vec::new();

        // connect4 (TCP and connected UDP), sendmsg4 and recvmsg4 (UDP to
        // VIPs): swap the program inside the pinned link atomically, so pods
        // are never uncaptured during an agent restart.
        for (name, link_name) in [
            (programs::CONNECT4, LINK_CONNECT4),
            (programs::SENDMSG4, LINK_SENDMSG4),
            (programs::RECVMSG4, LINK_RECVMSG4),
        ] {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load().map_err(|err| RedirectError::Program { name, err })?;
            let pin = dir.join(link_name);
            let adopted = PinnedLink::from_pin(&pin)
                .ok()
                .and_then(|p| CgroupSockAddrLink::try_from(FdLink::from(p)).ok());
            let id = match adopted {
                Some(old) => {
                    tracing::info!(link = %pin.display(), "adopting pinned {} link", name.trim_start_matches("mesh_"));
                    prog.attach_to_link(old)
                }
                None => prog.attach(&pods, LINK_MODE),
            }
            .map_err(|err| RedirectError::Attach {
                name,
                cgroup: opts.pod_cgroup_root.into(),
                err,
            })?;
            let link = prog.take_link(id).map_err(|err| RedirectError::Program { name, err })?;
            links.push(repin(
                FdLink::try_from(link).map_err(|e| RedirectError::Pin(pin.clone(), e.to_string()))?,
                &pin,
            )?);
        }

        // sockops: no in-place update in aya, so attach the new program next
        // to the old one (multi-attach), then release the old link.
        {
            let name = programs::SOCKOPS;
            let prog: &mut SockOps = program(&mut ebpf, name)?;
            prog.load().map_err(|err| RedirectError::Program { name, err })?;
            let pin = dir.join(LINK_SOCKOPS_PODS);
            let old = PinnedLink::from_pin(&pin).ok();
            let id = prog.attach(&pods, LINK_MODE).map_err(|err| RedirectError::Attach {
                name,
                cgroup: opts.pod_cgroup_root.into(),
                err,
            })?;
            let link = prog.take_link(id).map_err(|err| RedirectError::Program { name, err })?;
            let fd = FdLink::try_from(link).map_err(|e| RedirectError::Pin(pin.clone(), e.to_string()))?;
            release(old);
            links.push(repin(fd, &pin)?);
            // Earlier agents also ran sockops in their own cgroup, to splice
            // the pod-to-agent hop (see mesh-ebpf sockops.rs for why no more).
            release(PinnedLink::from_pin(dir.join(LINK_SOCKOPS_AGENT)).ok());
        }

        // sk_msg attaches to the sockhash, one program per map. A running
        // predecessor (a rolling restart) still holds the pinned link, so it
        // cannot be released and replaced: swap the program inside it.
        // Sockets already in the map keep the program they were added with,
        // so established splices are unaffected.
        {
            let name = programs::SK_MSG;
            let pin = dir.join(LINK_SK_MSG);
            let socks: SockHash<MapData, SockKey> = take_map(&mut ebpf, maps::SOCKS)?;
            let prog: &mut SkMsg = program(&mut ebpf, name)?;
            prog.load().map_err(|err| RedirectError::Program { name, err })?;
            let adopted = {
                let prog_fd = prog.fd().map_err(|err| RedirectError::Program { name, err })?;
                match update_pinned_link(&pin, std::os::fd::AsFd::as_fd(prog_fd)) {
                    Ok(adopted) => adopted,
                    Err(e) => {
                        tracing::warn!(link = %pin.display(), error = %e, "cannot update the pinned sk_msg link; replacing it");
                        release(PinnedLink::from_pin(&pin).ok());
                        false
                    }
                }
            };
            if adopted {
                tracing::info!(link = %pin.display(), "adopting pinned sk_msg link");
                links.push(PinnedLink::from_pin(&pin).map_err(|e| RedirectError::Pin(pin.clone(), e.to_string()))?);
            } else {
                let id = prog.attach(socks.fd()).map_err(|err| RedirectError::Attach {
                    name,
                    cgroup: dir.join(maps::SOCKS),
                    err,
                })?;
                let link = prog.take_link(id).map_err(|err| RedirectError::Program { name, err })?;
                let fd = FdLink::try_from(link).map_err(|e| RedirectError::Pin(pin.clone(), e.to_string()))?;
                links.push(repin(fd, &pin)?);
            }
        }

        let config = Config {
            layout_version: MAP_LAYOUT_VERSION,
            agent_ipv4: u32::from_ne_bytes(opts.capture_ip.octets()),
            agent_port: opts.outbound_port,
            fail_open: u8::from(opts.fail_open),
            debug: u8::from(opts.kernel_debug),
            splice: u8::from(opts.splice),
            // Until a policy is compiled, allow (as with no agent): the agent
            // switches to enforcing with the first policy generation.
            policy_mode: mesh_common::POLICY_OFF,
            _pad: [0; 2],
            policy_generation: 0,
            _pad2: 0,
            alive_until_ns: monotonic_ns() + ALIVE_WINDOW_NS,
        };
        let kernel_events = take_map(&mut ebpf, maps::EVENTS)?;
        let redirect = Redirect {
            config: Mutex::new(take_map(&mut ebpf, maps::CONFIG)?),
            config_value: Mutex::new(config),
            workloads: Mutex::new(take_map(&mut ebpf, maps::WORKLOADS)?),
            endpoints: Mutex::new(take_map(&mut ebpf, maps::ENDPOINTS)?),
            flows: Mutex::new(take_map(&mut ebpf, maps::FLOWS)?),
            policy: Mutex::new(PolicyState {
                map: take_map(&mut ebpf, maps::POLICY)?,
                generation: 0,
                last: None,
            }),
            splice: take_map(&mut ebpf, maps::SPLICE)?,
            capture: take_map(&mut ebpf, maps::CAPTURE)?,
            traffic: Mutex::new(take_map(&mut ebpf, maps::TRAFFIC)?),
            services: Mutex::new(ServiceState {
                services: take_map(&mut ebpf, maps::SERVICES)?,
                backends: take_map(&mut ebpf, maps::BACKENDS)?,
                written: BTreeMap::new(),
                swept: false,
            }),
            _ebpf: ebpf,
            _links: links,
            kernel_events: Some(kernel_events),
            kernel_logger,
        };
        redirect.write_config()?;
        Ok(redirect)
    }

    fn write_config(&self) -> Result<(), RedirectError> {
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

    /// Makes the kernel maps match the snapshot: this node's pods are
    /// enrolled by cgroup id, every pod is a known endpoint.
    pub fn sync(&self, snap: &Snapshot, node: &str, pod_cgroup_root: &Path) -> Result<SyncReport, RedirectError> {
        let ids = snap.workload_ids();
        let mut want_workloads = BTreeMap::new();
        let mut want_endpoints = BTreeMap::new();
        let mut report = SyncReport::default();
        for (key, pod) in &snap.pods {
            let id = ids[key];
            let ipv4 = u32::from_ne_bytes(pod.ip.octets());
            let same_node = pod.node == node;
            let identity_id = crate::state::identity_id(&pod.namespace, &pod.service_account);
            want_endpoints.insert(
                ipv4,
                Endpoint {
                    workload_id: id,
                    node_id: 0,
                    same_node: u32::from(same_node),
                    identity_id,
                },
            );
            if same_node {
                let dir = pod_cgroup_root.join(format!("{}_{}", pod.namespace, pod.name));
                match std::fs::metadata(&dir) {
                    // On cgroup2 the directory's inode number is the cgroup id
                    // that bpf_get_current_cgroup_id() returns.
                    Ok(meta) => {
                        want_workloads.insert(
                            meta.ino(),
                            Workload {
                                workload_id: id,
                                ipv4,
                                identity_id,
                                _pad: 0,
                            },
                        );
                        report.enrolled += 1;
                    }
                    Err(_) => report.missing_cgroup.push(dir),
                }
            }
        }
        replace_all(
            &mut self.workloads.lock().expect("lock"),
            &want_workloads,
            maps::WORKLOADS,
        )?;
        replace_all(
            &mut self.endpoints.lock().expect("lock"),
            &want_endpoints,
            maps::ENDPOINTS,
        )?;
        report.endpoints = want_endpoints.len();
        self.prune_traffic(&ids.values().copied().collect());
        Ok(report)
    }

    /// Puts a compiled policy in force in the kernel: the new generation's
    /// entries are written first, then `mesh_config` switches to them in
    /// one write, then the old generation's entries are deleted.
    pub fn sync_policy(&self, rules: &[crate::policy::KernelRule], enforcing: bool) -> Result<(), RedirectError> {
        let mut st = self.policy.lock().expect("policy lock");
        if st.last.as_ref().is_some_and(|(r, e)| r == rules && *e == enforcing) {
            return Ok(());
        }
        let generation = st.generation.wrapping_add(1).max(1);
        for r in rules {
            let key = PolicyKey {
                generation,
                src_identity: r.src,
                dst_identity: r.dst,
                port: r.port,
                protocol: r.proto,
                _pad: 0,
            };
            st.map
                .insert(
                    &key,
                    &PolicyValue {
                        rule: r.rule,
                        flags: r.flags,
                    },
                    0,
                )
                .map_err(|err| RedirectError::Map {
                    name: maps::POLICY,
                    err,
                })?;
        }
        {
            let mut cfg = self.config_value.lock().expect("config lock");
            cfg.policy_generation = generation;
            cfg.policy_mode = if enforcing {
                mesh_common::POLICY_ENFORCING
            } else {
                mesh_common::POLICY_OFF
            };
        }
        self.write_config()?;
        let stale: Vec<PolicyKey> = st
            .map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.generation != generation)
            .collect();
        for k in stale {
            let _ = st.map.remove(&k);
        }
        st.generation = generation;
        st.last = Some((rules.to_vec(), enforcing));
        Ok(())
    }

    /// Takes the capture record of an accepted connection: `client` is the
    /// pod's address (the accepted socket's peer), `listener` the local one.
    pub fn take_flow(&self, client: std::net::SocketAddrV4, listener: std::net::SocketAddrV4) -> Option<OrigDst> {
        let key = SockKey {
            local_ipv4: u32::from_ne_bytes(client.ip().octets()),
            remote_ipv4: u32::from_ne_bytes(listener.ip().octets()),
            local_port: client.port(),
            remote_port: listener.port(),
        };
        let mut flows = self.flows.lock().expect("flows lock");
        let orig = flows.get(&key, 0).ok()?;
        let _ = flows.remove(&key);
        Some(orig)
    }

    pub fn splice_stats(&self) -> SpliceStats {
        let mut total = SpliceStats::default();
        if let Ok(per_cpu) = self.splice.get(&0, 0) {
            for s in per_cpu.iter() {
                total.messages += s.messages;
                total.bytes += s.bytes;
            }
        }
        total
    }

    /// Puts the services' slot tables in force. A changed table is written
    /// under a new generation, switched to in one write of its
    /// `mesh_services` entry, then the old slots are deleted: a connect sees
    /// the old table or the new one, never a mix. Services that are gone
    /// are removed (their VIPs are no longer translated).
    pub fn sync_services(&self, tables: &[crate::services::ServiceTable]) -> Result<usize, RedirectError> {
        let mut st = self.services.lock().expect("services lock");
        let mut want = BTreeMap::new();
        for t in tables {
            let key = ServiceKey {
                vip: u32::from_ne_bytes(t.vip.octets()),
                port: t.port,
                protocol: t.protocol,
                _pad: 0,
            };
            want.insert(key, t);
        }
        let mut changed = 0;
        for (key, t) in &want {
            let slots: Vec<Slot> = t
                .slots
                .iter()
                .map(|(ip, port)| {
                    let relay = t.relays.get(&std::net::SocketAddrV4::new(*ip, *port));
                    (*ip, *port, relay.copied().unwrap_or(0))
                })
                .collect();
            let previous = st.written.get(key).cloned();
            let flags = if t.via_agent { mesh_common::SERVICE_VIA_AGENT } else { 0 };
            if previous
                .as_ref()
                .is_some_and(|(v, written)| *written == slots && v.flags == flags)
            {
                continue;
            }
            // After a restart the pinned entry tells which generation is live.
            let live = previous
                .as_ref()
                .map(|(v, _)| v.generation)
                .or_else(|| st.services.get(key, 0).ok().map(|v| v.generation));
            let generation = live.map_or(1, |g| g.wrapping_add(1).max(1));
            let value = ServiceValue {
                service_id: t.id(),
                generation,
                slots: slots.len() as u32,
                flags,
            };
            for (i, (ip, port, relay_port)) in slots.iter().enumerate() {
                let slot = BackendKey {
                    service_id: value.service_id,
                    generation,
                    slot: i as u32,
                    _pad: 0,
                };
                let backend = Backend {
                    ipv4: u32::from_ne_bytes(ip.octets()),
                    port: *port,
                    relay_port: *relay_port,
                };
                st.backends
                    .insert(&slot, &backend, 0)
                    .map_err(|err| RedirectError::Map {
                        name: maps::BACKENDS,
                        err,
                    })?;
            }
            st.services.insert(key, &value, 0).map_err(|err| RedirectError::Map {
                name: maps::SERVICES,
                err,
            })?;
            if let Some((old, slots)) = &previous {
                delete_slots(&mut st.backends, old, slots.len());
            }
            st.written.insert(*key, (value, slots));
            changed += 1;
        }
        if !st.swept {
            // First sync after a restart: drop what an earlier agent pinned
            // that is not in force now (old generations, removed services).
            let stale: Vec<ServiceKey> = st
                .services
                .keys()
                .filter_map(Result::ok)
                .filter(|k| !want.contains_key(k))
                .collect();
            for k in stale {
                let _ = st.services.remove(&k);
            }
            let live: HashSet<(u32, u32)> = st.written.values().map(|(v, _)| (v.service_id, v.generation)).collect();
            let orphans: Vec<BackendKey> = st
                .backends
                .keys()
                .filter_map(Result::ok)
                .filter(|k| !live.contains(&(k.service_id, k.generation)))
                .collect();
            for k in orphans {
                let _ = st.backends.remove(&k);
            }
            st.swept = true;
        }
        let gone: Vec<ServiceKey> = st.written.keys().filter(|k| !want.contains_key(k)).copied().collect();
        for key in gone {
            let _ = st.services.remove(&key);
            if let Some((old, slots)) = st.written.remove(&key) {
                delete_slots(&mut st.backends, &old, slots.len());
            }
            changed += 1;
        }
        Ok(changed)
    }

    /// Spliced traffic per workload pair (`mesh_traffic`), summed over CPUs.
    pub fn traffic_stats(&self) -> Vec<(TrafficKey, TrafficStats)> {
        let map = self.traffic.lock().expect("traffic lock");
        map.iter()
            .filter_map(Result::ok)
            .map(|(key, per_cpu)| {
                let total = per_cpu.iter().fold(TrafficStats::default(), |mut t, s| {
                    t.opened += s.opened;
                    t.closed += s.closed;
                    t.sent_bytes += s.sent_bytes;
                    t.received_bytes += s.received_bytes;
                    t
                });
                (key, total)
            })
            .collect()
    }

    /// Forgets the pairs of workloads that no longer exist, so a node's
    /// pod churn cannot fill `mesh_traffic` (16,384 pairs).
    fn prune_traffic(&self, live: &std::collections::BTreeSet<u32>) {
        let mut map = self.traffic.lock().expect("traffic lock");
        let gone: Vec<TrafficKey> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !live.contains(&k.client_workload) || !live.contains(&k.server_workload))
            .collect();
        for k in gone {
            let _ = map.remove(&k);
        }
    }

    pub fn capture_stats(&self) -> CaptureStats {
        let mut total = CaptureStats::default();
        if let Ok(per_cpu) = self.capture.get(&0, 0) {
            for s in per_cpu.iter() {
                total.redirected += s.redirected;
                total.same_node += s.same_node;
                total.passthrough += s.passthrough;
                total.failed_open += s.failed_open;
                total.denied += s.denied;
                total.events_dropped += s.events_dropped;
                total.load_balanced += s.load_balanced;
                total.no_endpoint += s.no_endpoint;
            }
        }
        total
    }
}

struct ServiceState {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, BackendKey, Backend>,
    /// What this agent wrote, so an unchanged table is not rewritten.
    written: BTreeMap<ServiceKey, (ServiceValue, Vec<Slot>)>,
    swept: bool,
}

struct PolicyState {
    map: HashMap<MapData, PolicyKey, PolicyValue>,
    generation: u32,
    last: Option<(Vec<crate::policy::KernelRule>, bool)>,
}

#[derive(Debug, Default)]
pub struct SyncReport {
    pub enrolled: usize,
    pub endpoints: usize,
    /// Pods of this node whose cgroup does not exist (yet).
    pub missing_cgroup: Vec<PathBuf>,
}

/// A written slot: endpoint IP, target port, UDP relay port (0: none).
type Slot = (std::net::Ipv4Addr, u16, u16);

fn delete_slots(backends: &mut HashMap<MapData, BackendKey, Backend>, old: &ServiceValue, n: usize) {
    for slot in 0..n as u32 {
        let _ = backends.remove(&BackendKey {
            service_id: old.service_id,
            generation: old.generation,
            slot,
            _pad: 0,
        });
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, RedirectError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or(RedirectError::MissingMap(name))?;
    prog.try_into().map_err(|err| RedirectError::Program { name, err })
}

/// Pins a fresh link at `pin`, replacing whatever link was pinned there.
fn repin(link: FdLink, pin: &Path) -> Result<PinnedLink, RedirectError> {
    let pinned_id = PinnedLink::from_pin(pin).ok().and_then(|p| link_id(&FdLink::from(p)));
    if pinned_id.is_some() && pinned_id == link_id(&link) {
        // The adopted link itself: already pinned at that path.
        return PinnedLink::from_pin(pin).map_err(|e| RedirectError::Pin(pin.into(), e.to_string()));
    }
    let _ = std::fs::remove_file(pin);
    link.pin(pin).map_err(|e| RedirectError::Pin(pin.into(), e.to_string()))
}

fn link_id(link: &FdLink) -> Option<u32> {
    link.info().ok().map(|i| i.id())
}

/// Puts `prog` into the link pinned at `pin` (BPF_LINK_UPDATE; aya has no
/// public call for it on sk_msg links). Ok(false): nothing is pinned there.
#[allow(unsafe_code)]
fn update_pinned_link(pin: &Path, prog: std::os::fd::BorrowedFd<'_>) -> std::io::Result<bool> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_UPDATE: libc::c_long = 29;
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let path = std::ffi::CString::new(pin.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other)?;
    let get = ObjGet {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    let fd = match sys_bpf(BPF_OBJ_GET, &get) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(false),
        Err(e) => return Err(e),
    };
    // SAFETY: BPF_OBJ_GET returned a new descriptor owned by nobody else.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let update = LinkUpdate {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    sys_bpf(BPF_LINK_UPDATE, &update)?;
    Ok(true)
}

/// bpf(2) with `attr` as the command's attribute struct.
#[allow(unsafe_code)]
fn sys_bpf<T>(cmd: libc::c_long, attr: &T) -> std::io::Result<libc::c_long> {
    // SAFETY: the kernel reads `size_of::<T>()` bytes of a live struct (a
    // prefix of union bpf_attr; the rest counts as zero); pointers inside
    // it are the caller's and outlive the call.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *const T, std::mem::size_of::<T>()) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Unpins and closes an old link, which detaches it.
fn release(old: Option<PinnedLink>) {
    if let Some(old) = old {
        match old.unpin() {
            Ok(fd) => drop(fd),
            Err(e) => tracing::warn!(error = %e, "could not unpin an old link"),
        }
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
