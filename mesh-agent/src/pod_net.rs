//! Finds an enrolled pod's veth: which interface of this node's network
//! namespace is the host end of the pod's interface, and the pod
//! interface's MAC (what `mesh_fast_path` needs to deliver to the pod).
//!
//! The pod's own network namespace is the authority: a thread enters it
//! (through a process of the pod's cgroup), lists its links and addresses
//! over rtnetlink, and picks the veth that holds the pod's address; that
//! veth's peer index (IFLA_LINK) names the host end. Nothing here trusts a
//! packet or a name: a pod cannot claim another pod's address this way,
//! because the kernel reports which interface of *its* namespace holds what.
use std::{collections::BTreeMap, fs::File, io, net::IpAddr, os::unix::fs::MetadataExt as _, path::Path};

use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage},
    link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

use crate::{enrol::PodNet, redirect::FastPathRow};

/// The host end of a pod's veth, in this (the agent's) network namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodLink {
    pub host_ifindex: u32,
    /// The pod-side interface, in the pod's namespace (the host end's iflink).
    pub pod_ifindex: u32,
    /// The MAC of the pod's interface (frames to the pod carry it).
    pub pod_mac: [u8; 6],
}

#[derive(Debug, thiserror::Error)]
pub enum PodNetError {
    #[error("no process in cgroup {0} (a pod's network namespace is found through one of its processes)")]
    NoProcess(String),
    #[error("cannot open the network namespace of pid {pid}: {err}")]
    Netns { pid: u32, err: io::Error },
    #[error("the pod shares this node's network namespace (hostNetwork): no veth to deliver to")]
    HostNetwork,
    #[error("rtnetlink in the pod's namespace: {0}")]
    Netlink(String),
    #[error("no veth in the pod's namespace holds {0:?}")]
    NoVeth(Vec<IpAddr>),
    #[error("interface {0} of this namespace is not the peer of the pod's veth")]
    NotPeer(u32),
}

/// Each enrolled pod's veth, found once per pod cgroup and re-checked
/// every tick (its host end must still be the pod's peer); a pod whose
/// veth cannot be found yet (no process yet, say) is tried again.
#[derive(Default)]
pub struct PodLinks {
    found: BTreeMap<u64, (Vec<IpAddr>, PodLink)>,
    /// The last failure logged per pod cgroup, so each is logged once.
    failed: BTreeMap<u64, String>,
}

impl PodLinks {
    /// The fast-path rows for `pods` (blocking: netlink in pod namespaces).
    pub fn refresh(&mut self, pods: &[PodNet]) -> Vec<FastPathRow> {
        // This namespace's links (index -> peer index), read once per tick.
        let here = match peers_here() {
            Ok(here) => here,
            Err(err) => {
                tracing::warn!(error = %err, "cannot list this node's links: the fast path keeps what it had");
                return self.rows(pods);
            }
        };
        let still_peer = |link: &PodLink| here.get(&link.host_ifindex) == Some(&link.pod_ifindex);
        self.found
            .retain(|id, (ips, link)| pods.iter().any(|p| p.cgroup_id == *id && p.ips == *ips) && still_peer(link));
        self.failed.retain(|id, _| pods.iter().any(|p| p.cgroup_id == *id));
        for pod in pods {
            if !self.found.contains_key(&pod.cgroup_id) {
                match pod_link(&pod.cgroup, &pod.ips, &here) {
                    Ok(link) => {
                        tracing::debug!(pod = %pod.pod, host_ifindex = link.host_ifindex, "found the pod's veth");
                        self.failed.remove(&pod.cgroup_id);
                        self.found.insert(pod.cgroup_id, (pod.ips.clone(), link));
                    }
                    Err(err) => {
                        let text = err.to_string();
                        if self.failed.get(&pod.cgroup_id) != Some(&text) {
                            tracing::info!(pod = %pod.pod, reason = %text, "no fast path for this pod yet: its traffic takes the bridge");
                            self.failed.insert(pod.cgroup_id, text);
                        }
                    }
                }
            }
        }
        self.rows(pods)
    }

    fn rows(&self, pods: &[PodNet]) -> Vec<FastPathRow> {
        pods.iter()
            .filter_map(|pod| self.found.get(&pod.cgroup_id))
            .map(|(ips, link)| FastPathRow {
                ips: ips.clone(),
                host_ifindex: link.host_ifindex,
                pod_mac: link.pod_mac,
            })
            .collect()
    }
}

/// Finds the pod's veth through a process of `cgroup` (or a cgroup below
/// it); `here` is this namespace's links (index -> peer index).
pub fn pod_link(cgroup: &Path, ips: &[IpAddr], here: &BTreeMap<u32, u32>) -> Result<PodLink, PodNetError> {
    let pid = first_pid(cgroup).ok_or_else(|| PodNetError::NoProcess(cgroup.display().to_string()))?;
    let netns = File::open(format!("/proc/{pid}/ns/net")).map_err(|err| PodNetError::Netns { pid, err })?;
    let ours = std::fs::metadata("/proc/thread-self/ns/net").map_err(|err| PodNetError::Netns { pid, err })?;
    let theirs = netns.metadata().map_err(|err| PodNetError::Netns { pid, err })?;
    if ours.ino() == theirs.ino() && ours.dev() == theirs.dev() {
        return Err(PodNetError::HostNetwork);
    }
    let ips = ips.to_vec();
    // setns(CLONE_NEWNET) changes only the calling thread, and this one
    // ends right after: no other thread ever runs in the pod's namespace.
    let link = std::thread::spawn(move || -> Result<PodLink, PodNetError> {
        nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| PodNetError::Netns {
            pid,
            err: io::Error::from(e),
        })?;
        veth_holding(&ips)
    })
    .join()
    .map_err(|_| PodNetError::Netlink("the namespace thread panicked".into()))??;
    // The host end must name the pod's interface as its own peer.
    if here.get(&link.host_ifindex) != Some(&link.pod_ifindex) {
        return Err(PodNetError::NotPeer(link.host_ifindex));
    }
    Ok(link)
}

/// A pid in the cgroup or, depth first, in one below it (containers).
fn first_pid(cgroup: &Path) -> Option<u32> {
    if let Ok(text) = std::fs::read_to_string(cgroup.join("cgroup.procs"))
        && let Some(pid) = text.lines().find_map(|l| l.trim().parse().ok())
    {
        return Some(pid);
    }
    std::fs::read_dir(cgroup)
        .ok()?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .find_map(|e| first_pid(&e.path()))
}

/// In the current thread's namespace: the veth holding one of `ips`.
fn veth_holding(ips: &[IpAddr]) -> Result<PodLink, PodNetError> {
    let socket = open()?;
    let mut index = None;
    dump(
        &socket,
        RouteNetlinkMessage::GetAddress(AddressMessage::default()),
        |msg| {
            if let RouteNetlinkMessage::NewAddress(a) = msg
            && a.attributes.iter().any(
                |attr| matches!(attr, AddressAttribute::Address(ip) | AddressAttribute::Local(ip) if ips.contains(ip)),
            )
        {
            index.get_or_insert(a.header.index);
        }
        },
    )?;
    let index = index.ok_or_else(|| PodNetError::NoVeth(ips.to_vec()))?;
    let mut found = None;
    dump(&socket, RouteNetlinkMessage::GetLink(LinkMessage::default()), |msg| {
        let RouteNetlinkMessage::NewLink(l) = msg else { return };
        if l.header.index != index {
            return;
        }
        let (mut veth, mut peer, mut mac, mut other_netns) = (false, None, None, false);
        for attr in &l.attributes {
            match attr {
                LinkAttribute::LinkInfo(infos) => {
                    veth = infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth)));
                }
                LinkAttribute::Link(p) => peer = Some(*p),
                LinkAttribute::Address(a) if a.len() == 6 => mac = a.as_slice().try_into().ok(),
                LinkAttribute::LinkNetNsId(_) => other_netns = true,
                _ => {}
            }
        }
        if let (true, true, Some(host_ifindex), Some(pod_mac)) = (veth, other_netns, peer, mac) {
            found = Some(PodLink {
                host_ifindex,
                pod_ifindex: index,
                pod_mac,
            });
        }
    })?;
    found.ok_or_else(|| PodNetError::NoVeth(ips.to_vec()))
}

fn open() -> Result<Socket, PodNetError> {
    let err = |e: io::Error| PodNetError::Netlink(e.to_string());
    let mut socket = Socket::new(NETLINK_ROUTE).map_err(err)?;
    socket.bind_auto().map_err(err)?;
    socket.connect(&SocketAddr::new(0, 0)).map_err(err)?;
    Ok(socket)
}

/// Sends a dump request and hands each answer to `each`.
fn dump(
    socket: &Socket,
    request: RouteNetlinkMessage,
    mut each: impl FnMut(&RouteNetlinkMessage),
) -> Result<(), PodNetError> {
    let mut packet = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(request));
    packet.header.flags = NLM_F_DUMP | NLM_F_REQUEST;
    packet.header.sequence_number = 1;
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0).map_err(|e| PodNetError::Netlink(e.to_string()))?;
    let mut rx = vec![0u8; 64 * 1024];
    loop {
        let size = socket
            .recv(&mut &mut rx[..], 0)
            .map_err(|e| PodNetError::Netlink(e.to_string()))?;
        let mut offset = 0;
        while offset < size {
            let msg: NetlinkMessage<RouteNetlinkMessage> =
                NetlinkMessage::deserialize(&rx[offset..size]).map_err(|e| PodNetError::Netlink(e.to_string()))?;
            match &msg.payload {
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => return Err(PodNetError::Netlink(format!("{e:?}"))),
                NetlinkPayload::InnerMessage(inner) => each(inner),
                _ => {}
            }
            if msg.header.length == 0 {
                break;
            }
            offset += msg.header.length as usize;
        }
    }
}

/// Every link of the calling thread's namespace with a peer: index -> peer
/// index (IFLA_LINK), over rtnetlink (sysfs may show another namespace).
fn peers_here() -> Result<BTreeMap<u32, u32>, PodNetError> {
    let socket = open()?;
    let mut out = BTreeMap::new();
    dump(&socket, RouteNetlinkMessage::GetLink(LinkMessage::default()), |msg| {
        if let RouteNetlinkMessage::NewLink(l) = msg
            && let Some(peer) = l.attributes.iter().find_map(|a| match a {
                LinkAttribute::Link(p) => Some(*p),
                _ => None,
            })
        {
            out.insert(l.header.index, peer);
        }
    })?;
    Ok(out)
}
