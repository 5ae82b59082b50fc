//! Socket-to-socket splicing (sk_msg verdict on `mesh_socks`).
//!
//! A message sent on a spliced socket goes straight to the peer socket's
//! receive queue, skipping TCP/IP. If the peer is not in the map (not yet
//! established, or not spliced), the message takes the normal stack.
use aya_ebpf::{
    bindings::{BPF_F_INGRESS, sk_action::SK_PASS},
    macros::sk_msg,
    programs::SkMsgContext,
};
use mesh_common::SockKey;

use crate::{
    addr::{field, socket_pair, words},
    maps::{mesh_socks, mesh_splice, mesh_spliced, traffic},
};

#[sk_msg]
pub fn mesh_sk_msg(ctx: SkMsgContext) -> u32 {
    // Each field straight from the context (see addr::socket_pair).
    let md = unsafe { &*ctx.msg };
    let family = field(&md.family);
    let v4 = (field(&md.local_ip4), field(&md.remote_ip4));
    let v6 = (words(&md.local_ip6), words(&md.remote_ip6));
    let Some((local, remote)) = socket_pair(family, v4, v6) else {
        return SK_PASS;
    };
    let me = SockKey {
        local,
        remote,
        local_port: field(&md.local_port) as u16,
        remote_port: u16::from_be((field(&md.remote_port) >> 16) as u16),
    };
    let mut peer = me.peer();
    if mesh_socks.redirect_msg(&ctx, &mut peer, u64::from(BPF_F_INGRESS)) == i64::from(SK_PASS)
        && let Some(stats) = mesh_splice.get_ptr_mut(0)
    {
        let stats = unsafe { &mut *stats };
        stats.messages += 1;
        stats.bytes += u64::from(ctx.size());
    }
    // Pod-to-pod connections count per workload pair, every byte: the first
    // message can race the peer's entry into mesh_socks and take the stack.
    if let Some(flow) = unsafe { mesh_spliced.get(&me) } {
        let (pair, is_client) = (flow.key, flow.is_client != 0);
        if let Some(t) = traffic(&pair) {
            if is_client {
                t.sent_bytes += u64::from(ctx.size());
            } else {
                t.received_bytes += u64::from(ctx.size());
            }
        }
    }
    // Never drop: an unspliced message simply takes the TCP/IP path.
    SK_PASS
}
