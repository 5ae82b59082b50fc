//! Loads the eBPF object, attaches its programs (adopting the links a
//! previous agent pinned, so capture never lapses) and opens its maps.
use std::{collections::BTreeMap, fs::File, path::Path, sync::Mutex};

use aya::{
    Ebpf, EbpfLoader,
    maps::MapData,
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, SchedClassifier, SockOps,
        cgroup_sock_addr::CgroupSockAddrLink,
        links::{FdLink, PinnedLink},
    },
};
use mesh_common::{Addr, Config, MAP_LAYOUT_VERSION, maps, programs};

use super::{
    ALIVE_WINDOW_NS, Redirect, RedirectError, RedirectOptions,
    fast_path::FastPathState,
    monotonic_ns,
    pins::{check_pinned_layout, pinned_policy, release, repin},
    policy::PolicyState,
    services::ServiceState,
    sys::update_pinned_link,
};

/// The BPF object built from `mesh-ebpf` by build.rs.
static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh"));

/// bpf_link cgroup attachments are always multi-attach; the kernel rejects
/// any flag (EINVAL), which aya's `Single` maps to.
const LINK_MODE: CgroupAttachMode = CgroupAttachMode::Single;

/// Names the pinned links in the bpffs directory.
const LINK_CONNECT4: &str = "link_connect4";
const LINK_SENDMSG4: &str = "link_sendmsg4";
const LINK_RECVMSG4: &str = "link_recvmsg4";
const LINK_CONNECT6: &str = "link_connect6";
const LINK_SENDMSG6: &str = "link_sendmsg6";
const LINK_RECVMSG6: &str = "link_recvmsg6";
const LINK_SOCKOPS_PODS: &str = "link_sockops_pods";
/// Pinned by earlier agents; released on start.
const LINK_SOCKOPS_AGENT: &str = "link_sockops_agent";
/// Pinned by agents that had the sockmap splice (map layout 8 and older).
const LINK_SK_MSG: &str = "link_sk_msg";
const LINK_INBOUND: &str = "link_inbound";
const LINK_PROBE: &str = "link_probe";

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

pub(super) fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, RedirectError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or(RedirectError::MissingMap(name))?;
    prog.try_into().map_err(|err| RedirectError::Program { name, err })
}

impl Redirect {
    pub fn load(opts: &RedirectOptions<'_>) -> Result<Self, RedirectError> {
        let dir = opts.bpffs_dir;
        check_pinned_layout(dir)?;
        // Read before the programs are swapped in: what the kernel enforces now.
        let (policy_mode, policy_generation) = pinned_policy(dir).unwrap_or((mesh_common::POLICY_OFF, 0));
        if policy_mode != mesh_common::POLICY_OFF {
            tracing::info!(
                generation = policy_generation,
                "the pinned policy stays in force until this agent's first policy replaces it"
            );
        }
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

        // The programs swapped in below find a process's pod from this
        // level: put it in force first (the rest of the pinned config is
        // left as the previous agent wrote it until `write_config`).
        {
            let name = maps::CONFIG;
            let map = ebpf.map_mut(name).ok_or(RedirectError::MissingMap(name))?;
            let mut config: aya::maps::Array<&mut MapData, Config> =
                aya::maps::Array::try_from(map).map_err(|err| RedirectError::Map { name, err })?;
            let mut current = config.get(&0, 0).unwrap_or_default();
            current.pod_cgroup_level = opts.pod_cgroup_level;
            config
                .set(0, &current, 0)
                .map_err(|err| RedirectError::Map { name, err })?;
        }
        let pods = open_cgroup(opts.pod_cgroup_root)?;
        let mut links = Vec::new();

        // connect4/6 (TCP and connected UDP), sendmsg4/6 and recvmsg4/6 (UDP
        // to VIPs; the *6 hooks act on IPv4-mapped addresses): swap the
        // program inside the pinned link atomically, so pods are never
        // uncaptured during an agent restart.
        for (name, link_name) in [
            (programs::CONNECT4, LINK_CONNECT4),
            (programs::SENDMSG4, LINK_SENDMSG4),
            (programs::RECVMSG4, LINK_RECVMSG4),
            (programs::CONNECT6, LINK_CONNECT6),
            (programs::SENDMSG6, LINK_SENDMSG6),
            (programs::RECVMSG6, LINK_RECVMSG6),
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

        // The sockmap splice is gone (it changed what read() and write()
        // return); an older agent's sk_msg link is released.
        release(PinnedLink::from_pin(dir.join(LINK_SK_MSG)).ok());
        // The fast path attaches per pod veth as pods are found
        // (`sync_fast_path`); here it is only loaded.
        let fast_path = opts.fast_path
            && {
                let name = programs::FAST_PATH;
                let prog: &mut SchedClassifier = program(&mut ebpf, name)?;
                match prog.load() {
                    Ok(()) => true,
                    Err(err) => {
                        tracing::warn!(error = %err, "the kernel refused the fast-path program: same-node traffic takes the bridge");
                        false
                    }
                }
            };

        links.push(attach_inbound(&mut ebpf, dir, &pods, opts.pod_cgroup_root)?);
        if let Some(link) = attach_probe(&mut ebpf, dir, opts.probe_cgroup)? {
            links.push(link);
        }

        let config = Config {
            layout_version: MAP_LAYOUT_VERSION,
            agent_ipv4: u32::from_ne_bytes(opts.capture_ip.octets()),
            agent_port: opts.outbound_port,
            fail_open: u8::from(opts.fail_open),
            debug: u8::from(opts.kernel_debug),
            fast_path: u8::from(fast_path),
            // The pinned policy (a predecessor's) stays in force; on a first
            // start there is none, and everything is allowed, as with no
            // agent, until the first policy generation.
            policy_mode,
            pod_cgroup_level: opts.pod_cgroup_level,
            _pad: 0,
            policy_generation,
            udp_relay_base: opts.udp_relay.map_or(0, |(base, _)| base),
            udp_relay_slots: opts.udp_relay.map_or(0, |(_, n)| n),
            alive_until_ns: monotonic_ns() + ALIVE_WINDOW_NS,
            agent_ipv6: opts
                .capture_ip6
                .map_or(Addr::UNSPECIFIED, |ip| Addr::from(std::net::IpAddr::V6(ip))),
            owner_pid: std::process::id(),
            _pad3: 0,
        };
        let kernel_events = take_map(&mut ebpf, maps::EVENTS)?;
        let redirect = Redirect {
            config: Mutex::new(take_map(&mut ebpf, maps::CONFIG)?),
            config_value: Mutex::new(config),
            workloads: Mutex::new(take_map(&mut ebpf, maps::WORKLOADS)?),
            endpoints: Mutex::new(take_map(&mut ebpf, maps::ENDPOINTS)?),
            udp_slots: Mutex::new(take_map(&mut ebpf, maps::UDP_SLOTS)?),
            udp_senders: Mutex::new(take_map(&mut ebpf, maps::UDP_SENDERS)?),
            admit: Mutex::new(take_map(&mut ebpf, maps::ADMIT)?),
            flows: Mutex::new(take_map(&mut ebpf, maps::FLOWS)?),
            policy: Mutex::new(PolicyState {
                map: take_map(&mut ebpf, maps::POLICY)?,
                generation: policy_generation,
                last: None,
            }),
            fast_stats: take_map(&mut ebpf, maps::FAST_STATS)?,
            fast_path: Mutex::new(FastPathState {
                devs: take_map(&mut ebpf, maps::POD_DEVS)?,
                links: BTreeMap::new(),
                enabled: fast_path,
            }),
            capture: take_map(&mut ebpf, maps::CAPTURE)?,
            traffic: Mutex::new(take_map(&mut ebpf, maps::TRAFFIC)?),
            services: Mutex::new(ServiceState {
                services: take_map(&mut ebpf, maps::SERVICES)?,
                backends: take_map(&mut ebpf, maps::BACKENDS)?,
                written: BTreeMap::new(),
                swept: false,
            }),
            ebpf: Mutex::new(ebpf),
            _links: links,
            kernel_events: Some(kernel_events),
            kernel_logger,
        };
        redirect.claim_kernel()?;
        Ok(redirect)
    }
}

/// Inbound admission (cgroup_skb/ingress on the pod root): the program is
/// swapped inside the pinned link, so no packet to a strict
/// pod is ever judged by no program during a restart.
fn attach_inbound(ebpf: &mut Ebpf, dir: &Path, pods: &File, pods_path: &Path) -> Result<PinnedLink, RedirectError> {
    let name = programs::INBOUND;
    let pin = dir.join(LINK_INBOUND);
    let prog: &mut CgroupSkb = program(ebpf, name)?;
    prog.load().map_err(|err| RedirectError::Program { name, err })?;
    let adopted = {
        let prog_fd = prog.fd().map_err(|err| RedirectError::Program { name, err })?;
        match update_pinned_link(&pin, std::os::fd::AsFd::as_fd(prog_fd)) {
            Ok(adopted) => adopted,
            Err(e) => {
                tracing::warn!(link = %pin.display(), error = %e, "cannot update the pinned inbound link; replacing it");
                false
            }
        }
    };
    if adopted {
        tracing::info!(link = %pin.display(), "adopting pinned inbound link");
        return PinnedLink::from_pin(&pin).map_err(|e| RedirectError::Pin(pin.clone(), e.to_string()));
    }
    // Attached before the old link (if any) goes: two programs judging for
    // a moment is stricter, never weaker.
    let old = PinnedLink::from_pin(&pin).ok();
    let id = prog
        .attach(pods, CgroupSkbAttachType::Ingress, LINK_MODE)
        .map_err(|err| RedirectError::Attach {
            name,
            cgroup: pods_path.into(),
            err,
        })?;
    let link = prog.take_link(id).map_err(|err| RedirectError::Program { name, err })?;
    let fd = FdLink::try_from(link).map_err(|e| RedirectError::Pin(pin.clone(), e.to_string()))?;
    release(old);
    repin(fd, &pin)
}

/// `mesh_probe` on the probe cgroup (the kubelet's), replacing the
/// previous agent's link; none configured: the previous link is released.
fn attach_probe(ebpf: &mut Ebpf, dir: &Path, cgroup: Option<&Path>) -> Result<Option<PinnedLink>, RedirectError> {
    let name = programs::PROBE;
    let pin = dir.join(LINK_PROBE);
    let old = PinnedLink::from_pin(&pin).ok();
    let Some(path) = cgroup else {
        release(old);
        return Ok(None);
    };
    let prog: &mut SockOps = program(ebpf, name)?;
    prog.load().map_err(|err| RedirectError::Program { name, err })?;
    let id = prog
        .attach(open_cgroup(path)?, LINK_MODE)
        .map_err(|err| RedirectError::Attach {
            name,
            cgroup: path.into(),
            err,
        })?;
    let link = prog.take_link(id).map_err(|err| RedirectError::Program { name, err })?;
    let fd = FdLink::try_from(link).map_err(|e| RedirectError::Pin(pin.clone(), e.to_string()))?;
    release(old);
    Ok(Some(repin(fd, &pin)?))
}
