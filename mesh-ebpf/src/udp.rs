//! UDP to service VIPs (cgroup/sendmsg4, cgroup/recvmsg4, and connect4 for
//! connected UDP sockets).
//!
//! A datagram to a VIP is addressed, before it leaves the socket, to one of
//! the service's endpoints (picked per datagram from the same slot table as
//! TCP; a connected socket keeps the pick of its connect()). An endpoint on
//! another node is reached through the agent: the slot carries the agent's
//! relay port for it, and the agent tunnels the datagram over QUIC. The
//! socket's rewritten peer is remembered by socket cookie, so its replies
//! are shown to the application as coming from the VIP, as a DNS client
//! expects.
use aya_ebpf::{
    bindings::bpf_sock_addr, helpers::bpf_get_socket_cookie, macros::cgroup_sock_addr, programs::SockAddrContext,
};
use mesh_common::{POLICY_ENFORCING, PROTO_UDP, ServiceKey, UdpPeerKey, UdpService, Workload};

use crate::{
    addr,
    connect4::{ALLOW, DENY, agent_address, agent_serves, allowed, count, pick_backend},
    events::{Destination, emit},
    maps::{config, current_workload, mesh_endpoints, mesh_services, mesh_udp_peers},
};

#[cgroup_sock_addr(sendmsg4)]
pub fn mesh_sendmsg4(ctx: SockAddrContext) -> i32 {
    let sa: &mut bpf_sock_addr = unsafe { &mut *ctx.sock_addr };
    match current_workload() {
        Some(workload) => to_service::<false>(&ctx, sa, workload),
        None => ALLOW, // not an enrolled pod
    }
}

/// AF_INET6 sockets: native IPv6 and IPv4-mapped destinations.
#[cgroup_sock_addr(sendmsg6)]
pub fn mesh_sendmsg6(ctx: SockAddrContext) -> i32 {
    let sa: &mut bpf_sock_addr = unsafe { &mut *ctx.sock_addr };
    match current_workload() {
        Some(workload) => to_service::<true>(&ctx, sa, workload),
        None => ALLOW,
    }
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

/// Resolves a UDP destination that is a service VIP; anything else passes.
#[inline(always)]
pub fn to_service<const V6: bool>(ctx: &SockAddrContext, sa: &mut bpf_sock_addr, workload: &Workload) -> i32 {
    let vip = addr::address::<V6>(sa);
    let vip_port = addr::port(sa);
    let service = ServiceKey {
        vip,
        port: vip_port,
        protocol: PROTO_UDP,
        _pad: 0,
    };
    let Some(svc) = (unsafe { mesh_services.get(&service) }) else {
        return ALLOW;
    };
    let Some(backend) = pick_backend(svc) else {
        return DENY;
    };
    let Some(cfg) = config() else { return ALLOW };
    if cfg.policy_mode == POLICY_ENFORCING
        && let Some(endpoint) = unsafe { mesh_endpoints.get(&backend.addr) }
        && allowed(
            cfg.policy_generation,
            workload.identity_id,
            endpoint.identity_id,
            backend.port,
            PROTO_UDP,
        )
        .is_none()
    {
        // Denials are audited; allowed datagrams are only counted (one
        // event per datagram would flood the ring).
        emit(
            cfg,
            workload,
            &Destination {
                addr: backend.addr,
                port: backend.port,
                endpoint,
            },
            PROTO_UDP,
            false,
        );
        count(|s| &mut s.denied);
        return DENY;
    }
    let (ip, port) = if backend.relay_port == 0 {
        (backend.addr, backend.port)
    } else if agent_serves(cfg) {
        count(|s| &mut s.redirected);
        (agent_address(cfg, &backend.addr), backend.relay_port)
    } else if cfg.fail_open != 0 {
        (backend.addr, backend.port) // the agent is gone: straight there, unencrypted
    } else {
        return DENY;
    };
    if !addr::set::<V6>(sa, &ip, port) {
        return DENY; // an IPv6 endpoint for an AF_INET socket: a table of the wrong family
    }
    let peer = UdpPeerKey {
        cookie: unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) },
        addr: ip,
        port,
        _pad: 0,
        _pad2: 0,
    };
    let shown = UdpService {
        vip,
        port: vip_port,
        _pad: 0,
    };
    // Without the record replies would show the real peer; the datagram
    // still goes (a full LRU map evicts, it does not fail).
    let _ = mesh_udp_peers.insert(&peer, &shown, 0);
    count(|s| &mut s.load_balanced);
    ALLOW
}
