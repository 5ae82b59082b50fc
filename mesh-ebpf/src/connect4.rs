//! `connect()` capture for enrolled pods (cgroup/connect4 and connect6:
//! one path for both families, addresses keyed as [`Addr`]).
//!
//! A service VIP is first replaced by one of its endpoints, picked at random
//! from the service's weighted slot table (socket-level load balancing: the
//! socket is connected to the pod, nothing is translated per packet).
//! Same-node meshed destinations are left alone (the kernel connects them directly; `fast_path` delivers their packets);
//! other-node meshed destinations are rewritten to the agent's outbound
//! listener and the original destination is recorded by socket cookie.
use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use aya_log_ebpf::debug;
use mesh_common::{
    ANY_PORT, Addr, Backend, BackendKey, CaptureStats, Config, OrigDst, POLICY_ENFORCING, POLICY_FLAG_HTTP, PROTO_TCP,
    PolicyKey, SERVICE_VIA_AGENT, ServiceKey, ServiceValue,
};

use crate::{
    addr,
    events::{Destination, emit},
    maps::{
        config, current_workload, mesh_backends, mesh_capture, mesh_cookies, mesh_endpoints, mesh_lb_cursor,
        mesh_policy, mesh_services,
    },
};

/// connect() proceeds; 0 makes it fail with EPERM.
pub(crate) const ALLOW: i32 = 1;
pub(crate) const DENY: i32 = 0;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    try_connect::<false>(&ctx)
}

/// AF_INET6 sockets: native IPv6, and IPv4-mapped destinations (found in
/// the maps as the IPv4 addresses they are).
#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    try_connect::<true>(&ctx)
}

pub(crate) fn count(field: fn(&mut CaptureStats) -> &mut u64) {
    if let Some(stats) = mesh_capture.get_ptr_mut(0) {
        // Per-CPU slot: no other writer runs on this CPU meanwhile.
        *field(unsafe { &mut *stats }) += 1;
    }
}

#[inline(always)]
fn try_connect<const V6: bool>(ctx: &SockAddrContext) -> i32 {
    let sa: &mut bpf_sock_addr = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM && sa.type_ != SOCK_DGRAM {
        return ALLOW;
    }
    // The calling task's pod, by its pod-level ancestor cgroup: kernel-attested.
    let Some(workload) = current_workload() else {
        return ALLOW; // not an enrolled pod
    };
    if sa.type_ == SOCK_DGRAM {
        // A connected UDP socket: its service is resolved once, here.
        return crate::udp::send::<V6>(ctx, sa, workload);
    }
    let mut dst_ip = addr::address::<V6>(sa);
    let mut dst_port = addr::port(sa);
    let service = ServiceKey {
        vip: dst_ip,
        port: dst_port,
        protocol: PROTO_TCP,
        _pad: 0,
    };
    if let Some(svc) = unsafe { mesh_services.get(&service) } {
        // An HTTP-matched split: the agent routes each request, so it gets
        // the connection with the VIP as its destination. Policy is then
        // the destination's to decide, per backend (there is no endpoint
        // yet to decide on here).
        if svc.flags & SERVICE_VIA_AGENT != 0
            && let Some(cfg) = config()
            && agent_serves(cfg)
        {
            return to_agent::<V6>(ctx, sa, cfg, workload.workload_id, dst_ip, dst_port);
        }
        let Some(backend) = pick_backend(svc) else {
            return DENY;
        };
        dst_ip = backend.addr;
        dst_port = backend.port;
        if !addr::set::<V6>(sa, &dst_ip, dst_port) {
            return DENY; // an IPv6 endpoint for an AF_INET socket: a table of the wrong family
        }
        count(|s| &mut s.load_balanced);
    }
    let Some(endpoint) = (unsafe { mesh_endpoints.get(&dst_ip) }) else {
        count(|s| &mut s.passthrough);
        return ALLOW;
    };
    let Some(cfg) = config() else { return ALLOW };
    // Policy first, for same-node and cross-node alike: a denied flow fails
    // here, at once, and never reaches the network.
    let mut needs_agent = false;
    if cfg.policy_mode == POLICY_ENFORCING {
        let found = allowed(
            cfg.policy_generation,
            workload.identity_id,
            endpoint.identity_id,
            dst_port,
            PROTO_TCP,
        );
        emit(
            cfg,
            workload,
            &Destination {
                addr: dst_ip,
                port: dst_port,
                endpoint,
            },
            PROTO_TCP,
            found.is_some(),
        );
        match found {
            None => {
                count(|s| &mut s.denied);
                if cfg.debug != 0 {
                    debug!(ctx, "deny workload {} -> port {}", workload.workload_id, dst_port);
                }
                return DENY;
            }
            // HTTP rules need the agent to read requests, even on the same node.
            Some(flags) => needs_agent = flags & POLICY_FLAG_HTTP != 0,
        }
    }
    if endpoint.same_node != 0 && !needs_agent {
        count(|s| &mut s.same_node);
        return ALLOW;
    }
    if !agent_serves(cfg) {
        return ALLOW;
    }
    to_agent::<V6>(ctx, sa, cfg, workload.workload_id, dst_ip, dst_port)
}

/// The next slot of the service's table in force, taking turns: the agent
/// lays each table out interleaved (`services::interleave`), so every run
/// of consecutive connects from one CPU spreads by the weights exactly (a
/// 50/50 split is 50/50 over any 1,000 of them, where a random pick strays
/// by more than 2 points in 7% of 2,000-connect runs). Each CPU starts at
/// a random turn. `None` (counted as `no_endpoint`, the caller refuses at
/// once rather than let the client wait on an address nobody serves) when
/// it has no ready endpoint, or when the slot was deleted under us while
/// the agent swapped the table (a rare race; the client retries).
#[inline(always)]
pub(crate) fn pick_backend(svc: &ServiceValue) -> Option<&'static Backend> {
    let backend = if svc.slots == 0 {
        None
    } else {
        // Per-CPU value: programs on one CPU do not interleave.
        let turn = match mesh_lb_cursor.get_ptr_mut(&svc.service_id) {
            Some(cursor) => unsafe {
                let turn = *cursor;
                *cursor = turn.wrapping_add(1);
                turn
            },
            None => {
                let turn = unsafe { bpf_get_prandom_u32() };
                let _ = mesh_lb_cursor.insert(&svc.service_id, &turn.wrapping_add(1), 0);
                turn
            }
        };
        let slot = BackendKey {
            service_id: svc.service_id,
            generation: svc.generation,
            slot: turn % svc.slots,
            _pad: 0,
        };
        unsafe { mesh_backends.get(&slot) }
    };
    if backend.is_none() {
        count(|s| &mut s.no_endpoint);
    }
    backend
}

/// Whether captured connects go to the agent: one has configured this node,
/// and it is alive or fail-open is off (then a dead agent refuses them).
#[inline(always)]
pub(crate) fn agent_serves(cfg: &Config) -> bool {
    if cfg.agent_ipv4 == 0 {
        return false; // no agent has configured this node yet
    }
    if cfg.fail_open != 0 && unsafe { bpf_ktime_get_ns() } > cfg.alive_until_ns {
        count(|s| &mut s.failed_open);
        return false;
    }
    true
}

/// Records the original destination by socket cookie and rewrites the
/// connect to the agent's outbound listener.
#[inline(always)]
fn to_agent<const V6: bool>(
    ctx: &SockAddrContext,
    sa: &mut bpf_sock_addr,
    cfg: &Config,
    workload_id: u32,
    dst_ip: Addr,
    dst_port: u16,
) -> i32 {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let orig = OrigDst {
        addr: dst_ip,
        port: dst_port,
        _pad: 0,
        workload_id,
    };
    if mesh_cookies.insert(&cookie, &orig, 0).is_err() {
        // Without the record the agent could not route the flow; leave it.
        count(|s| &mut s.passthrough);
        return ALLOW;
    }
    if cfg.debug != 0 {
        debug!(ctx, "capture workload {} -> port {}", workload_id, dst_port);
    }
    if !addr::set::<V6>(sa, &agent_address(cfg, &dst_ip), cfg.agent_port) {
        return DENY; // unreachable: an AF_INET socket only addresses IPv4
    }
    count(|s| &mut s.redirected);
    ALLOW
}

/// The agent listener for a destination of this family: its IPv6 address
/// for IPv6, else (IPv4, or a node without IPv6) its IPv4 one, which an
/// AF_INET6 socket reaches IPv4-mapped.
#[inline(always)]
pub(crate) fn agent_address(cfg: &Config, dst: &Addr) -> Addr {
    if dst.is_ipv4() || cfg.agent_ipv6.is_unspecified() {
        Addr::from_ipv4_be(cfg.agent_ipv4)
    } else {
        cfg.agent_ipv6
    }
}

/// The flags of the allow rule for this exact port, or for any port, in the
/// generation in force; `None` when no rule allows it.
#[inline(always)]
pub(crate) fn allowed(generation: u32, src: u32, dst: u32, port: u16, protocol: u8) -> Option<u32> {
    let mut key = PolicyKey {
        generation,
        src_identity: src,
        dst_identity: dst,
        port,
        protocol,
        _pad: 0,
    };
    if let Some(v) = mesh_policy.get_ptr(&key) {
        return Some(unsafe { (*v).flags });
    }
    key.port = ANY_PORT;
    mesh_policy.get_ptr(&key).map(|v| unsafe { (*v).flags })
}
