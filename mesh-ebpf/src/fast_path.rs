//! Same-node pod-to-pod delivery below TCP (tc/TCX ingress on each enrolled
//! pod's host-side veth).
//!
//! Without it a packet from pod A to pod B on the same node crosses A's
//! veth, the node's bridge and B's veth, with a softirq backlog hop at each
//! veth. Here, on A's host-side veth, a unicast IPv4/IPv6 frame addressed
//! to an enrolled pod of this node (its address and its MAC, `mesh_pod_devs`)
//! is handed with `bpf_redirect_peer` straight to B's pod-side interface,
//! in the same softirq. Only the delivery changes: both ends are ordinary
//! TCP (or UDP) sockets, so backpressure, ordering, half-close, resets,
//! `MSG_PEEK`, `splice(2)` and everything else an application can observe
//! are the kernel's own. Anything else (ARP, neighbour discovery,
//! multicast, a frame for the bridge's MAC, an unknown address) goes on
//! to the bridge as before. Policy is not decided here: it was decided at
//! `connect()`/`sendmsg()`, and inbound admission runs at B's socket.
use aya_ebpf::{bindings::TC_ACT_OK, helpers::generated::bpf_redirect_peer, macros::classifier, programs::TcContext};
use mesh_common::Addr;

use crate::maps::{config, mesh_fast_stats, mesh_pod_devs};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
/// Offsets of the destination address in the IPv4 and IPv6 headers.
const IPV4_DST: usize = 16;
const IPV6_DST: usize = 24;

#[classifier]
pub fn mesh_fast_path(ctx: TcContext) -> i32 {
    deliver(&ctx).unwrap_or(TC_ACT_OK as i32)
}

#[inline(always)]
fn deliver(ctx: &TcContext) -> Option<i32> {
    if config()?.fast_path == 0 {
        return None;
    }
    let ethertype = u16::from_be(ctx.load::<u16>(12).ok()?);
    let dst = match ethertype {
        ETH_P_IP => Addr::from_ipv4_be(ctx.load::<u32>(ETH_HLEN + IPV4_DST).ok()?),
        ETH_P_IPV6 => Addr {
            words: ctx.load::<[u32; 4]>(ETH_HLEN + IPV6_DST).ok()?,
        },
        _ => return None,
    };
    let dev = unsafe { mesh_pod_devs.get(&dst) }?;
    let dst_mac = ctx.load::<[u8; 6]>(0).ok()?;
    if dst_mac != dev.mac {
        return None;
    }
    let len = u64::from(ctx.len());
    // Fails only for a bad flag; the kernel drops the packet later if the
    // device has gone (the entry outlived its pod: a lost packet, resent).
    let verdict = unsafe { bpf_redirect_peer(dev.ifindex, 0) } as i32;
    if let Some(stats) = mesh_fast_stats.get_ptr_mut(0) {
        let stats = unsafe { &mut *stats };
        stats.packets += 1;
        stats.bytes += len;
    }
    Some(verdict)
}
