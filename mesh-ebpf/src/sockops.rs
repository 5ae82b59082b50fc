//! Socket bookkeeping on established TCP connections (sockops).
//!
//! Active side: a captured connection's cookie record is re-keyed by the
//! socket's addresses (the agent only sees those). Both sides: a same-node
//! pod-to-pod socket is counted per workload pair (`mesh_pod_flows`,
//! `mesh_traffic`). Payload always takes TCP: the same-node fast path is
//! below it (`fast_path`), so applications see plain TCP.
use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE,
    },
    helpers::bpf_get_socket_cookie,
    macros::sock_ops,
    programs::SockOpsContext,
};
use mesh_common::{ADMIT_BY_POD, Addr, PodFlow, SockKey, TrafficKey};

use crate::{
    addr::{field, socket_pair, words},
    inbound::{settle_connect, vouch_connect},
    maps::{config, current_workload, mesh_cookies, mesh_endpoints, mesh_flows, mesh_pod_flows, traffic},
};

#[sock_ops]
pub fn mesh_sockops(ctx: SockOpsContext) -> u32 {
    try_sockops(&ctx);
    0
}

fn try_sockops(ctx: &SockOpsContext) {
    // Both families; an AF_INET6 socket to an IPv4-mapped peer (what a
    // dual-stack program such as Java uses for IPv4) is keyed as the IPv4
    // socket it is, so the agent and the counters see one flow whatever the
    // socket family.
    let Some(key) = sock_key(ctx) else { return };
    let op = ctx.op();
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        // The SYN is about to leave a pod's socket whose connect() policy
        // passed (a denied one never gets here): vouch for it to a pod of
        // this node (inbound admission). Only an enrolled pod's connects
        // were checked, so only those are vouched for.
        if current_workload().is_some() {
            vouch_connect(&key, ADMIT_BY_POD);
        }
        return;
    }
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        settle_connect(&key);
    }
    if op == BPF_SOCK_OPS_STATE_CB {
        if ctx.arg(1) == BPF_TCP_CLOSE {
            closed(ctx, &key);
        }
        return;
    }
    if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        return;
    }
    // Two network namespaces can hold the same loopback 4-tuple: never key those.
    if key.local.is_loopback() || key.remote.is_loopback() {
        return;
    }
    let Some(cfg) = config() else { return };
    let active = op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB;
    if active {
        // Re-key the capture record: the agent needs it to route the flow.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
        if let Some(orig) = unsafe { mesh_cookies.get(&cookie) } {
            let orig = *orig;
            let _ = mesh_flows.insert(&key, &orig, 0);
            let _ = mesh_cookies.remove(&cookie);
        }
    }
    let (agent_side, agent_port) = if active {
        (&key.remote, key.remote_port)
    } else {
        (&key.local, key.local_port)
    };
    let to_agent = agent_port == cfg.agent_port
        && ((agent_side.is_ipv4() && agent_side.ipv4_be() == cfg.agent_ipv4) || *agent_side == cfg.agent_ipv6);
    if to_agent {
        // The agent counts what it carries.
        return;
    }
    let (Some(local), Some(remote)) = (same_node_workload(&key.local), same_node_workload(&key.remote)) else {
        return;
    };
    // Pod to pod: count it per workload pair (the agent counts what it carries).
    let pair = if active {
        TrafficKey {
            client_workload: local,
            server_workload: remote,
        }
    } else {
        TrafficKey {
            client_workload: remote,
            server_workload: local,
        }
    };
    let flow = PodFlow {
        key: pair,
        is_client: u32::from(active),
        _pad: 0,
    };
    if mesh_pod_flows.insert(&key, &flow, 0).is_ok() {
        let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
        if active && let Some(t) = traffic(&pair) {
            t.opened += 1;
        }
    }
}

pub(crate) fn sock_key(ctx: &SockOpsContext) -> Option<SockKey> {
    // Every address field is loaded up front, each straight from the
    // context, and only the values are chosen by family: the verifier
    // refuses a context read through a computed pointer, which is what
    // LLVM makes of branches that load different fields into one variable.
    let ops = unsafe { &*ctx.ops };
    let v4 = (field(&ops.local_ip4), field(&ops.remote_ip4));
    let v6 = (words(&ops.local_ip6), words(&ops.remote_ip6));
    let (local, remote) = socket_pair(ctx.family(), v4, v6)?;
    Some(SockKey {
        local,
        remote,
        local_port: ctx.local_port() as u16,
        // remote_port holds the network-order port in its upper 16 bits.
        remote_port: u16::from_be((ctx.remote_port() >> 16) as u16),
    })
}

/// A same-node pod-to-pod socket closed: the client side counts the
/// connection, and each side counts the payload it sent that the other end
/// acknowledged (the client's is "sent", the server's "received"). What a
/// socket sent and got acked is exact whenever the peer's FIN arrives; what
/// it received is not (a peer FIN reaching the socket only after it became
/// a FIN_WAIT2 time-wait mini-socket is missing from it).
fn closed(ctx: &SockOpsContext, key: &SockKey) {
    let Some(flow) = (unsafe { mesh_pod_flows.get(key) }) else {
        return;
    };
    let flow = *flow;
    let _ = mesh_pod_flows.remove(key);
    let Some(t) = traffic(&flow.key) else { return };
    let client = flow.is_client != 0;
    if client {
        t.closed += 1;
    }
    let acked = unsafe { core::ptr::read_volatile(&(*ctx.ops).bytes_acked) };
    // TCP counts sequence space: the active side's SYN is in what was acked
    // (the passive side's socket is created once its SYN-ACK was acked), and
    // our FIN once acknowledged, which the state left says: FIN_WAIT2 (5),
    // LAST_ACK (9) and CLOSING (11) are left for CLOSE with it acked.
    let syn = u64::from(client);
    let our_fin = u64::from(matches!(ctx.arg(0), 5 | 9 | 11));
    let sent = acked.saturating_sub(syn + our_fin);
    if client {
        t.sent_bytes += sent;
    } else {
        t.received_bytes += sent;
    }
}

#[inline(always)]
fn same_node_workload(addr: &Addr) -> Option<u32> {
    match unsafe { mesh_endpoints.get(addr) } {
        Some(ep) if ep.same_node != 0 => Some(ep.workload_id),
        _ => None,
    }
}
