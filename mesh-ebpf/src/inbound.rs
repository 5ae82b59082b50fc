//! Inbound admission (cgroup_skb/ingress on the kubelet's pod cgroup root).
//!
//! A flow reaches a pod in strict mode only when the mesh attests where it
//! came from: a record in `mesh_admit` keyed by the flow as the pod sees
//! it, written before the flow's first packet left its sender (sockops at
//! a meshed pod's connect, which policy passed; sendmsg for UDP; the
//! agent before it connects a tunneled flow; `mesh_probe` for the kubelet's
//! cgroup), or a same-node pod's UDP send that policy allowed
//! (`mesh_udp_answer`). Anything else is dropped: a host process, an
//! unenrolled pod, a pod of a node without an agent.
//!
//! Only what opens a flow is judged: a SYN to a listening socket (its
//! handshake never completes, so there is no connection the app can
//! accept) and a datagram to an unconnected UDP socket (a connected one
//! only receives from the peer it chose). Established flows, replies
//! and SYN-ACKs pass untouched. This runs after the kernel found the
//! receiving socket, whose cgroup names the pod.
use aya_ebpf::{
    EbpfContext as _,
    bindings::{__sk_buff, BPF_TCP_ESTABLISHED, BPF_TCP_LISTEN},
    helpers::{bpf_ktime_get_ns, bpf_sk_fullsock, bpf_skb_ancestor_cgroup_id},
    macros::cgroup_skb,
    programs::SkBuffContext,
};
use mesh_common::{
    ADMISSION_PERMISSIVE, ADMISSION_STRICT, ADMIT_BY_ANSWER, Addr, Admit, AdmitKey, POD_CGROUP_DEPTH, PROTO_TCP,
    PROTO_UDP, SockKey, UdpFlowKey, Workload,
};

use crate::{
    connect4::count,
    events::emit_admission,
    maps::{config, mesh_admit, mesh_endpoints, mesh_refused, mesh_udp_answer, mesh_workloads},
};

const PASS: i32 = 1;
const DROP: i32 = 0;
/// A refused flow is audited again only after this long (a SYN is
/// retransmitted for about two minutes; a UDP peer may keep sending).
const REAUDIT_NS: u64 = 60_000_000_000;

#[cgroup_skb(ingress)]
pub fn mesh_inbound(ctx: SkBuffContext) -> i32 {
    admit(&ctx)
}

#[inline(always)]
fn admit(ctx: &SkBuffContext) -> i32 {
    let skb: *mut __sk_buff = ctx.as_ptr().cast::<__sk_buff>();
    let sk = unsafe { (*skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return PASS;
    }
    let state = unsafe { core::ptr::read_volatile(&(*sk).state) };
    let Some(flow) = parse(ctx) else {
        return unparsed(ctx, sk, state);
    };
    match flow.key.protocol {
        PROTO_TCP if state != BPF_TCP_LISTEN || !flow.opens => return PASS,
        PROTO_UDP if state == BPF_TCP_ESTABLISHED => return PASS,
        PROTO_TCP | PROTO_UDP => {}
        _ => return PASS,
    }
    let key = flow.key;
    if key.peer == key.local || key.peer.is_loopback() {
        return PASS; // the pod's own network namespace
    }
    let Some(workload) = receiving_workload(skb) else {
        return PASS; // not an enrolled pod
    };
    let mode = workload.admission;
    if mode != ADMISSION_STRICT && mode != ADMISSION_PERMISSIVE {
        return PASS;
    }
    if attested(&key) {
        return PASS;
    }
    unattested(workload, &key, mode)
}

/// A packet whose ports could not be read (an IPv6 extension header chain
/// too long to walk): refused when it is for a socket that could open a
/// flow, as an unattested flow would be.
#[inline(always)]
fn unparsed(ctx: &SkBuffContext, sk: *mut aya_ebpf::bindings::bpf_sock, state: u32) -> i32 {
    let full = unsafe { bpf_sk_fullsock(sk) };
    if full.is_null() {
        return PASS;
    }
    let protocol = unsafe { core::ptr::read_volatile(&(*full).protocol) } as u8;
    let opens =
        (protocol == PROTO_TCP && state == BPF_TCP_LISTEN) || (protocol == PROTO_UDP && state != BPF_TCP_ESTABLISHED);
    if !opens {
        return PASS;
    }
    let Some(workload) = receiving_workload(ctx.as_ptr().cast::<__sk_buff>()) else {
        return PASS;
    };
    let key = AdmitKey {
        protocol,
        ..AdmitKey::default()
    };
    match workload.admission {
        ADMISSION_STRICT | ADMISSION_PERMISSIVE => unattested(workload, &key, workload.admission),
        _ => PASS,
    }
}

/// Whether the mesh vouches for this flow.
#[inline(always)]
fn attested(key: &AdmitKey) -> bool {
    if let Some(a) = unsafe { mesh_admit.get(key) }
        && a.until_ns >= unsafe { bpf_ktime_get_ns() }
    {
        return true;
    }
    if key.protocol != PROTO_UDP {
        return false;
    }
    // A same-node pod's datagram policy allowed (written at its send; port
    // 0 for a socket connected before its port was chosen).
    let mut answer = UdpFlowKey {
        server: key.local,
        client: key.peer,
        server_port: key.local_port,
        client_port: key.peer_port,
    };
    if unsafe { mesh_udp_answer.get(&answer) }.is_some() {
        return true;
    }
    answer.client_port = 0;
    unsafe { mesh_udp_answer.get(&answer) }.is_some()
}

/// Counts and audits an unattested flow once per `REAUDIT_NS`; drops it
/// in strict mode.
#[inline(always)]
fn unattested(workload: &Workload, key: &AdmitKey, mode: u8) -> i32 {
    let now = unsafe { bpf_ktime_get_ns() };
    let seen = unsafe { mesh_refused.get(key) }.copied();
    let fresh = match seen {
        Some(at) => now.wrapping_sub(at) > REAUDIT_NS,
        None => true,
    };
    if fresh {
        let _ = mesh_refused.insert(key, &now, 0);
        if let Some(cfg) = config() {
            emit_admission(cfg, workload, key, mode);
        }
        if mode == ADMISSION_STRICT {
            count(|s| &mut s.inbound_refused);
        } else {
            count(|s| &mut s.inbound_unattested);
        }
    } else if mode == ADMISSION_STRICT {
        count(|s| &mut s.inbound_redropped);
    }
    if mode == ADMISSION_STRICT { DROP } else { PASS }
}

/// The enrolled pod whose socket receives this packet, by the socket's
/// pod-level ancestor cgroup (as `maps::current_workload` does for the
/// calling task).
#[inline(always)]
fn receiving_workload(skb: *mut __sk_buff) -> Option<&'static Workload> {
    let base = i32::from(config()?.pod_cgroup_level);
    let mut level = 1;
    while level <= i32::from(POD_CGROUP_DEPTH) {
        let id = unsafe { bpf_skb_ancestor_cgroup_id(skb, base + level) };
        if id == 0 {
            return None;
        }
        if let Some(w) = unsafe { mesh_workloads.get(&id) } {
            return Some(w);
        }
        level += 1;
    }
    None
}

struct Flow {
    key: AdmitKey,
    /// TCP: SYN without ACK (a connection being opened).
    opens: bool,
}

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_DSTOPTS: u8 = 60;

/// The packet's flow, from its IP and TCP/UDP headers (the data starts at
/// the network header here). None: an IPv6 header chain this does not walk.
#[inline(always)]
fn parse(ctx: &SkBuffContext) -> Option<Flow> {
    let first: u8 = ctx.load(0).ok()?;
    let (peer, local, mut protocol, mut l4) = match first >> 4 {
        4 => {
            let protocol: u8 = ctx.load(9).ok()?;
            let src: u32 = ctx.load(12).ok()?;
            let dst: u32 = ctx.load(16).ok()?;
            (
                Addr::from_ipv4_be(src),
                Addr::from_ipv4_be(dst),
                protocol,
                usize::from(first & 0x0f) * 4,
            )
        }
        6 => {
            let next: u8 = ctx.load(6).ok()?;
            let src: [u32; 4] = ctx.load(8).ok()?;
            let dst: [u32; 4] = ctx.load(24).ok()?;
            (Addr { words: src }, Addr { words: dst }, next, 40)
        }
        _ => return None,
    };
    // IPv6 options headers before the transport header (a sender could add
    // one to hide its ports): walk a few, give up (None) on more.
    let mut hops = 0;
    while protocol == IPPROTO_HOPOPTS || protocol == IPPROTO_ROUTING || protocol == IPPROTO_DSTOPTS {
        if hops == 4 {
            return None;
        }
        let hdr: [u8; 2] = ctx.load(l4).ok()?;
        protocol = hdr[0];
        l4 += (usize::from(hdr[1]) + 1) * 8;
        hops += 1;
    }
    if protocol != PROTO_TCP && protocol != PROTO_UDP {
        return Some(Flow {
            key: AdmitKey {
                protocol,
                ..AdmitKey::default()
            },
            opens: false,
        });
    }
    let ports: [u16; 2] = ctx.load(l4).ok()?;
    let opens = if protocol == PROTO_TCP {
        let flags: u8 = ctx.load(l4 + 13).ok()?;
        flags & 0x02 != 0 && flags & 0x10 == 0
    } else {
        true
    };
    Some(Flow {
        key: AdmitKey {
            peer,
            local,
            peer_port: u16::from_be(ports[0]),
            local_port: u16::from_be(ports[1]),
            protocol,
            _pad: [0; 3],
        },
        opens,
    })
}

/// How long a vouched TCP connect admits its SYN: as long as the kernel
/// retransmits an unanswered SYN (tcp_syn_retries 6: 127 s). The record
/// goes as soon as the connection is established.
const CONNECT_ADMIT_NS: u64 = 130_000_000_000;

/// Vouches for a connect about to send its SYN (sockops TCP_CONNECT_CB) to
/// a pod of this node: the flow as that pod will see it.
#[inline(always)]
pub fn vouch_connect(sock: &SockKey, by: u32) {
    match unsafe { mesh_endpoints.get(&sock.remote) } {
        Some(ep) if ep.same_node != 0 => {}
        _ => return,
    }
    let admit = Admit {
        until_ns: unsafe { bpf_ktime_get_ns() } + CONNECT_ADMIT_NS,
        by,
        _pad: 0,
    };
    let _ = mesh_admit.insert(&connect_key(sock), &admit, 0);
}

/// The connect is established: its SYN needs no admission any more.
#[inline(always)]
pub fn settle_connect(sock: &SockKey) {
    let _ = mesh_admit.remove(&connect_key(sock));
}

#[inline(always)]
fn connect_key(sock: &SockKey) -> AdmitKey {
    AdmitKey {
        peer: sock.local,
        local: sock.remote,
        peer_port: sock.local_port,
        local_port: sock.remote_port,
        protocol: PROTO_TCP,
        _pad: [0; 3],
    }
}

/// How long a UDP send admits the replies to it, refreshed (at most every
/// 10 s) while the socket keeps sending.
const ANSWER_ADMIT_NS: u64 = 120_000_000_000;
const ANSWER_REFRESH_NS: u64 = 10_000_000_000;

/// A pod's unconnected UDP socket at `me` sent to `peer`: replies from
/// there are admitted (a DNS answer, a pod's reply, the agent's relay).
#[inline(always)]
pub fn vouch_answers(me: &(Addr, u16), peer: &Addr, peer_port: u16) {
    if me.1 == 0 {
        return; // not bound yet: sendmsg runs after autobind, so never here
    }
    let key = AdmitKey {
        peer: *peer,
        local: me.0,
        peer_port,
        local_port: me.1,
        protocol: PROTO_UDP,
        _pad: [0; 3],
    };
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(a) = unsafe { mesh_admit.get(&key) }
        && a.until_ns > now + ANSWER_ADMIT_NS - ANSWER_REFRESH_NS
    {
        return;
    }
    let admit = Admit {
        until_ns: now + ANSWER_ADMIT_NS,
        by: ADMIT_BY_ANSWER,
        _pad: 0,
    };
    let _ = mesh_admit.insert(&key, &admit, 0);
}
