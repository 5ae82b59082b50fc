//! sockops on the probe cgroup (the kubelet's, `--probe-cgroup`): its
//! connects to pods of this node are vouched for, so liveness and
//! readiness probes reach pods in strict admission while every other host
//! process is refused (see `inbound.rs`).
use aya_ebpf::{
    bindings::{BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_TCP_CONNECT_CB},
    macros::sock_ops,
    programs::SockOpsContext,
};
use mesh_common::ADMIT_BY_PROBE;

use crate::{
    inbound::{settle_connect, vouch_connect},
    sockops::sock_key,
};

#[sock_ops]
pub fn mesh_probe(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        return 0;
    }
    let Some(key) = sock_key(&ctx) else { return 0 };
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        vouch_connect(&key, ADMIT_BY_PROBE);
    } else {
        settle_connect(&key);
    }
    0
}
