//! UDP from enrolled pods (cgroup/sendmsg4/6, recvmsg4/6, and connect4/6
//! for connected UDP sockets): to service VIPs and straight to pods.
//!
//! A datagram to a VIP is addressed, before it leaves the socket, to one of
//! the service's endpoints (picked per datagram from the same slot table as
//! TCP; a connected socket keeps the pick of its connect()). An endpoint on
//! another node is reached through the agent: the slot carries the agent's
//! relay port for it, and the agent tunnels the datagram over QUIC.
//!
//! A datagram to a meshed pod is checked against UDP policy (a denial is
//! EPERM and audited); to a pod of this node it goes straight there, to a
//! pod on another node through one of the agent's relay ports, a slot this
//! program claims for that pod address (`relay_slot`), recording which
//! workload sent through it (`mesh_udp_sender`: the agent's proof of the
//! sender, from the socket's cgroup).
//!
//! A pod may answer a same-node pod that sent to it and that policy
//! allowed (`mesh_udp_answer`, written at the send): SMI allows a flow from
//! source to destination, and UDP has no connection to carry the replies.
//!
//! Every datagram an unconnected pod socket sends admits the replies from
//! where it went (`inbound::vouch_answers`, inbound admission).
//!
//! Either way the socket's rewritten peer is remembered by socket cookie, so
//! replies are shown to the application as coming from the address it sent
//! to (the VIP, or the pod), as a DNS client expects.
use aya_ebpf::{
    bindings::{BPF_NOEXIST, bpf_sock_addr},
    helpers::bpf_get_socket_cookie,
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use mesh_common::{
    Addr, Config, Endpoint, POLICY_ENFORCING, PROTO_UDP, ServiceKey, ServiceValue, UDP_SLOT_ACTIVE, UdpFlowKey,
    UdpPeerKey, UdpSenderKey, UdpService, UdpSlot, Workload,
};

use crate::{
    addr,
    connect4::{ALLOW, DENY, agent_address, agent_serves, allowed, count, pick_backend},
    events::{Destination, emit},
    inbound::vouch_answers,
    maps::{
        config, current_workload, mesh_endpoints, mesh_services, mesh_udp_answer, mesh_udp_peers, mesh_udp_sender,
        mesh_udp_slots,
    },
};

#[cgroup_sock_addr(sendmsg4)]
pub fn mesh_sendmsg4(ctx: SockAddrContext) -> i32 {
    let sa: &mut bpf_sock_addr = unsafe { &mut *ctx.sock_addr };
    match current_workload() {
        Some(workload) => send_and_vouch::<false>(&ctx, sa, workload),
        None => ALLOW, // not an enrolled pod
    }
}

/// AF_INET6 sockets: native IPv6 and IPv4-mapped destinations.
#[cgroup_sock_addr(sendmsg6)]
pub fn mesh_sendmsg6(ctx: SockAddrContext) -> i32 {
    let sa: &mut bpf_sock_addr = unsafe { &mut *ctx.sock_addr };
    match current_workload() {
        Some(workload) => send_and_vouch::<true>(&ctx, sa, workload),
        None => ALLOW,
    }
}

/// An unconnected socket's send; once it goes, replies from where it went
/// (after any rewrite: the pod, the agent's relay port) are admitted.
#[inline(always)]
fn send_and_vouch<const V6: bool>(ctx: &SockAddrContext, sa: &mut bpf_sock_addr, workload: &Workload) -> i32 {
    let verdict = send::<V6>(ctx, sa, workload);
    if verdict == ALLOW {
        let peer = addr::address::<V6>(sa);
        let me = own_address::<V6>(ctx, workload, &peer);
        vouch_answers(&me, &peer, addr::port(sa));
    }
    verdict
}

/// Shows a reply from a rewritten peer as coming from the VIP the
/// application addressed. recvmsg4 must return 1.
#[cgroup_sock_addr(recvmsg4)]
pub fn mesh_recvmsg4(ctx: SockAddrContext) -> i32 {
    show_vip::<false>(&ctx)
}

/// The same for AF_INET6 sockets.
#[cgroup_sock_addr(recvmsg6)]
pub fn mesh_recvmsg6(ctx: SockAddrContext) -> i32 {
    show_vip::<true>(&ctx)
}

#[inline(always)]
fn show_vip<const V6: bool>(ctx: &SockAddrContext) -> i32 {
    let sa: &mut bpf_sock_addr = unsafe { &mut *ctx.sock_addr };
    let key = UdpPeerKey {
        cookie: unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) },
        addr: addr::address::<V6>(sa),
        port: addr::port(sa),
        _pad: 0,
        _pad2: 0,
    };
    if let Some(svc) = unsafe { mesh_udp_peers.get(&key) } {
        addr::set::<V6>(sa, &svc.vip, svc.port);
    }
    ALLOW
}

/// A UDP destination: a service VIP, a meshed pod, or (passing) anything else.
#[inline(always)]
pub fn send<const V6: bool>(ctx: &SockAddrContext, sa: &mut bpf_sock_addr, workload: &Workload) -> i32 {
    let dst = addr::address::<V6>(sa);
    let port = addr::port(sa);
    let service = ServiceKey {
        vip: dst,
        port,
        protocol: PROTO_UDP,
        _pad: 0,
    };
    let me = own_address::<V6>(ctx, workload, &dst);
    if let Some(svc) = unsafe { mesh_services.get(&service) } {
        return to_service::<V6>(ctx, sa, workload, svc, dst, port, &me);
    }
    let Some(endpoint) = (unsafe { mesh_endpoints.get(&dst) }) else {
        return ALLOW; // not meshed
    };
    if may_answer(&me, &dst, port) {
        return ALLOW; // an answer to a pod of this node that sent here
    }
    to_pod::<V6>(ctx, sa, workload, endpoint, dst, port, &me)
}

/// The socket's own address and port as a peer will see them: its bound
/// address, or (unbound) the pod's address of the destination's family.
/// sendmsg runs after the port is chosen; connect() before, so a connected
/// socket may show port 0 here (see `UdpFlowKey`).
#[inline(always)]
fn own_address<const V6: bool>(ctx: &SockAddrContext, workload: &Workload, dst: &Addr) -> (Addr, u16) {
    let sk = unsafe { &*(*ctx.sock_addr).__bindgen_anon_1.sk };
    let port = addr::field(&sk.src_port) as u16;
    let bound = if V6 {
        Addr {
            words: addr::words(&sk.src_ip6),
        }
    } else {
        Addr::from_ipv4_be(addr::field(&sk.src_ip4))
    };
    let unbound = bound.is_unspecified() || (bound.is_ipv4() && bound.ipv4_be() == 0);
    if !unbound {
        return (bound, port);
    }
    let own = if dst.is_ipv4() {
        Addr::from_ipv4_be(workload.ipv4)
    } else {
        workload.ipv6
    };
    (own, port)
}

/// Whether `me` is answering a same-node pod that sent to it (exactly this
/// port of it, or, for a connected socket, any).
#[inline(always)]
fn may_answer(me: &(Addr, u16), dst: &Addr, port: u16) -> bool {
    let mut key = UdpFlowKey {
        server: me.0,
        client: *dst,
        server_port: me.1,
        client_port: port,
    };
    if unsafe { mesh_udp_answer.get(&key) }.is_some() {
        return true;
    }
    key.client_port = 0;
    unsafe { mesh_udp_answer.get(&key) }.is_some()
}

/// Lets a same-node pod `server:server_port` answer this socket.
#[inline(always)]
fn allow_answers(me: &(Addr, u16), server: &Addr, server_port: u16) {
    let key = UdpFlowKey {
        server: *server,
        client: me.0,
        server_port,
        client_port: me.1,
    };
    let _ = mesh_udp_answer.insert(&key, &1, 0);
}

#[inline(always)]
fn to_service<const V6: bool>(
    ctx: &SockAddrContext,
    sa: &mut bpf_sock_addr,
    workload: &Workload,
    svc: &ServiceValue,
    vip: Addr,
    vip_port: u16,
    me: &(Addr, u16),
) -> i32 {
    let Some(backend) = pick_backend(svc) else {
        return DENY;
    };
    let Some(cfg) = config() else { return ALLOW };
    if let Some(endpoint) = unsafe { mesh_endpoints.get(&backend.addr) }
        && !udp_allowed(cfg, workload, endpoint, &backend.addr, backend.port)
    {
        return DENY;
    }
    let (ip, port) = if backend.relay_port == 0 {
        allow_answers(me, &backend.addr, backend.port);
        (backend.addr, backend.port)
    } else if agent_serves(cfg) {
        count(|s| &mut s.redirected);
        (agent_address(cfg, &backend.addr), backend.relay_port)
    } else if cfg.fail_open != 0 {
        (backend.addr, backend.port) // the agent is gone: straight there, unencrypted
    } else {
        return DENY;
    };
    count(|s| &mut s.load_balanced);
    rewrite::<V6>(ctx, sa, ip, port, vip, vip_port)
}

/// Straight to a meshed pod: policy, then direct (same node) or through a
/// relay slot of the agent (another node).
#[inline(always)]
fn to_pod<const V6: bool>(
    ctx: &SockAddrContext,
    sa: &mut bpf_sock_addr,
    workload: &Workload,
    endpoint: &Endpoint,
    dst: Addr,
    port: u16,
    me: &(Addr, u16),
) -> i32 {
    let Some(cfg) = config() else { return ALLOW };
    if !udp_allowed(cfg, workload, endpoint, &dst, port) {
        return DENY;
    }
    if endpoint.same_node != 0 {
        allow_answers(me, &dst, port);
        return ALLOW;
    }
    if !agent_serves(cfg) {
        // No agent has configured this node yet, or it is gone in
        // fail-open mode: as for TCP, the datagram goes as it is.
        return ALLOW;
    }
    let Some(slot) = relay_slot(cfg, &dst, port) else {
        // Never in the clear: without a slot the datagram is refused.
        count(|s| &mut s.no_relay);
        return DENY;
    };
    let sent = UdpSlot {
        addr: dst,
        port,
        state: UDP_SLOT_ACTIVE,
        _pad: 0,
    };
    let sender = UdpSenderKey {
        workload_id: workload.workload_id,
        slot,
    };
    if mesh_udp_sender.insert(&sender, &sent, 0).is_err() {
        return DENY; // the agent would drop it unattested
    }
    count(|s| &mut s.redirected);
    rewrite::<V6>(
        ctx,
        sa,
        agent_address(cfg, &dst),
        cfg.udp_relay_base.wrapping_add(slot as u16),
        dst,
        port,
    )
}

/// UDP policy for one datagram (enforcing mode); denials are audited,
/// allowed datagrams only counted (one event per datagram would flood the ring).
#[inline(always)]
fn udp_allowed(cfg: &Config, workload: &Workload, endpoint: &Endpoint, dst: &Addr, port: u16) -> bool {
    if cfg.policy_mode != POLICY_ENFORCING
        || allowed(
            cfg.policy_generation,
            workload.identity_id,
            endpoint.identity_id,
            port,
            PROTO_UDP,
        )
        .is_some()
    {
        return true;
    }
    emit(
        cfg,
        workload,
        &Destination {
            addr: *dst,
            port,
            endpoint,
        },
        PROTO_UDP,
        false,
    );
    count(|s| &mut s.denied);
    false
}

/// How many slots a destination may probe from its hash before it is
/// refused (the table is then, around its hash, full).
const SLOT_PROBES: u32 = 8;

/// The relay slot standing for `dst:port`: the one already claimed for it,
/// else the first free one of its probe sequence, claimed here (an insert
/// that fails because another CPU claimed the slot first re-reads it).
#[inline(always)]
fn relay_slot(cfg: &Config, dst: &Addr, port: u16) -> Option<u32> {
    let slots = u32::from(cfg.udp_relay_slots);
    if slots == 0 {
        return None;
    }
    let want = UdpSlot {
        addr: *dst,
        port,
        state: UDP_SLOT_ACTIVE,
        _pad: 0,
    };
    let hash = dst.words[0]
        ^ dst.words[1]
        ^ dst.words[2].rotate_left(7)
        ^ dst.words[3].rotate_left(13)
        ^ u32::from(port).wrapping_mul(0x9e37_79b9);
    let mut i = 0;
    while i < SLOT_PROBES {
        let slot = hash.wrapping_add(i) % slots;
        let taken = match unsafe { mesh_udp_slots.get(&slot) } {
            Some(s) => Some(*s),
            None if mesh_udp_slots.insert(&slot, &want, u64::from(BPF_NOEXIST)).is_ok() => return Some(slot),
            None => unsafe { mesh_udp_slots.get(&slot) }.copied(),
        };
        if taken == Some(want) {
            return Some(slot);
        }
        i += 1;
    }
    None
}

/// Rewrites the datagram's destination to `ip:port` and remembers, for the
/// socket, that replies from there are to be shown as from `shown:shown_port`.
#[inline(always)]
fn rewrite<const V6: bool>(
    ctx: &SockAddrContext,
    sa: &mut bpf_sock_addr,
    ip: Addr,
    port: u16,
    shown: Addr,
    shown_port: u16,
) -> i32 {
    if !addr::set::<V6>(sa, &ip, port) {
        return DENY; // an IPv6 address for an AF_INET socket: a table of the wrong family
    }
    let peer = UdpPeerKey {
        cookie: unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) },
        addr: ip,
        port,
        _pad: 0,
        _pad2: 0,
    };
    let shown = UdpService {
        vip: shown,
        port: shown_port,
        _pad: 0,
    };
    // Without the record replies would show the real peer; the datagram
    // still goes (a full LRU map evicts, it does not fail).
    let _ = mesh_udp_peers.insert(&peer, &shown, 0);
    ALLOW
}
