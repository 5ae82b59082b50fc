//! Finds each enrolled pod's veth: which interface of this node's network
//! namespace is the host end of the pod's interface, and the pod
//! interface's MAC (what `mesh_fast_path` needs to deliver to the pod).
//!
//! Read over rtnetlink without entering any pod: every veth here names its
//! peer's namespace (IFLA_LINK_NETNSID) and index (IFLA_LINK), and the
//! kernel answers address and link dumps for that namespace by id
//! (IFA/IFLA_TARGET_NETNSID, Linux >= 4.20), which takes CAP_NET_ADMIN, as
//! the DaemonSet has; entering the namespace (setns) would take
//! CAP_SYS_ADMIN. The kernel reports which interface of which namespace
//! holds which address, so a packet cannot claim one; an address that two
//! veths' peers hold (a pod that added a neighbour's address) is ambiguous
//! and gets no fast path.
use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::IpAddr,
};

use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage},
    link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

use crate::{enrol::PodNet, redirect::FastPathRow};

#[derive(Debug, thiserror::Error)]
#[error("rtnetlink: {0} (listing this node's veths and their peers' addresses needs CAP_NET_ADMIN)")]
pub struct PodNetError(String);

impl From<io::Error> for PodNetError {
    fn from(e: io::Error) -> Self {
        PodNetError(e.to_string())
    }
}

/// The host end of a veth of this namespace and what its peer holds.
#[derive(Debug)]
struct Peer {
    host_ifindex: u32,
    mac: [u8; 6],
    ips: BTreeSet<IpAddr>,
}

/// A veth of this namespace: (host index, peer's namespace id, peer's index).
type Veth = (u32, i32, u32);

/// Reads every veth peer's addresses on each call (an unchanged veth list
/// says nothing of them: a CNI gives a pod its address after creating the
/// veth, and a pod with CAP_NET_ADMIN can add a neighbour's address), and
/// logs each pod's lack of a veth once.
#[derive(Default)]
pub struct PodLinks {
    missing: BTreeSet<String>,
}

impl PodLinks {
    /// The fast-path rows for `pods` (blocking: netlink dumps).
    pub fn refresh(&mut self, pods: &[PodNet]) -> Result<Vec<FastPathRow>, PodNetError> {
        let socket = open()?;
        let peers = peers_of(&socket, &veths_here(&socket)?)?;
        // An address held behind two veths is nobody's.
        let mut holders: BTreeMap<IpAddr, Vec<&Peer>> = BTreeMap::new();
        for p in &peers {
            for ip in &p.ips {
                holders.entry(*ip).or_default().push(p);
            }
        }
        let mut rows = Vec::with_capacity(pods.len());
        let mut missing = BTreeSet::new();
        for pod in pods {
            let found: BTreeSet<(u32, [u8; 6])> = pod
                .ips
                .iter()
                .map(|ip| match holders.get(ip).map(Vec::as_slice) {
                    Some([one]) => Some((one.host_ifindex, one.mac)),
                    _ => None,
                })
                .collect::<Option<_>>()
                .unwrap_or_default();
            // Every address of the pod behind one and the same veth.
            match found.iter().collect::<Vec<_>>().as_slice() {
                [(host_ifindex, pod_mac)] => rows.push(FastPathRow {
                    ips: pod.ips.clone(),
                    host_ifindex: *host_ifindex,
                    pod_mac: *pod_mac,
                }),
                _ => {
                    if !self.missing.contains(&pod.pod) {
                        tracing::info!(pod = %pod.pod, ips = ?pod.ips, "no single veth of this node holds the pod's addresses: its traffic takes the bridge");
                    }
                    missing.insert(pod.pod.clone());
                }
            }
        }
        self.missing = missing;
        Ok(rows)
    }
}

fn open() -> Result<Socket, PodNetError> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    // The kernel honours a dump's target namespace only in strict mode.
    socket.set_netlink_get_strict_chk(true)?;
    Ok(socket)
}

/// This namespace's veths whose peer is in another namespace: (host index,
/// peer's namespace id, peer's index).
fn veths_here(socket: &Socket) -> Result<Vec<Veth>, PodNetError> {
    let mut out = Vec::new();
    dump(socket, RouteNetlinkMessage::GetLink(LinkMessage::default()), |msg| {
        let RouteNetlinkMessage::NewLink(l) = msg else { return };
        let (mut veth, mut peer, mut netns) = (false, None, None);
        for attr in &l.attributes {
            match attr {
                LinkAttribute::LinkInfo(infos) => {
                    veth = infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth)));
                }
                LinkAttribute::Link(p) => peer = Some(*p),
                LinkAttribute::LinkNetNsId(n) => netns = Some(*n),
                _ => {}
            }
        }
        if let (true, Some(peer), Some(netns)) = (veth, peer, netns) {
            out.push((l.header.index, netns, peer));
        }
    })?;
    Ok(out)
}

/// What each veth's peer holds: its MAC and addresses, read in the peer's
/// namespace by id.
fn peers_of(socket: &Socket, veths: &[Veth]) -> Result<Vec<Peer>, PodNetError> {
    let mut by_netns: BTreeMap<i32, Vec<(u32, u32)>> = BTreeMap::new();
    for &(host, netns, peer) in veths {
        by_netns.entry(netns).or_default().push((host, peer));
    }
    let mut out = Vec::new();
    for (netns, pairs) in by_netns {
        let mut macs: BTreeMap<u32, [u8; 6]> = BTreeMap::new();
        let mut links = LinkMessage::default();
        links.attributes.push(LinkAttribute::IfNetnsId(netns));
        // A namespace gone since the link dump answers with an error: skip it.
        let listed = dump(socket, RouteNetlinkMessage::GetLink(links), |msg| {
            if let RouteNetlinkMessage::NewLink(l) = msg
                && let Some(mac) = l.attributes.iter().find_map(|a| match a {
                    LinkAttribute::Address(a) if a.len() == 6 => <[u8; 6]>::try_from(a.as_slice()).ok(),
                    _ => None,
                })
            {
                macs.insert(l.header.index, mac);
            }
        });
        let mut ips: BTreeMap<u32, BTreeSet<IpAddr>> = BTreeMap::new();
        let mut addrs = AddressMessage::default();
        addrs.attributes.push(AddressAttribute::TargetNetNsId(netns));
        let listed = listed.and_then(|()| {
            dump(socket, RouteNetlinkMessage::GetAddress(addrs), |msg| {
                if let RouteNetlinkMessage::NewAddress(a) = msg {
                    for attr in &a.attributes {
                        if let AddressAttribute::Address(ip) | AddressAttribute::Local(ip) = attr {
                            ips.entry(a.header.index).or_default().insert(*ip);
                        }
                    }
                }
            })
        });
        if let Err(err) = listed {
            tracing::debug!(netns, error = %err, "cannot read a veth peer's namespace; skipped");
            continue;
        }
        for (host, peer) in pairs {
            if let (Some(mac), Some(ips)) = (macs.get(&peer), ips.remove(&peer)) {
                out.push(Peer {
                    host_ifindex: host,
                    mac: *mac,
                    ips,
                });
            }
        }
    }
    Ok(out)
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
    socket.send(&buf, 0)?;
    let mut rx = vec![0u8; 64 * 1024];
    loop {
        let size = socket.recv(&mut &mut rx[..], 0)?;
        let mut offset = 0;
        while offset < size {
            let msg: NetlinkMessage<RouteNetlinkMessage> =
                NetlinkMessage::deserialize(&rx[offset..size]).map_err(|e| PodNetError(e.to_string()))?;
            match &msg.payload {
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => return Err(PodNetError(format!("{e:?}"))),
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
