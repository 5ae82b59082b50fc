//! The one place a policy decision becomes a `mesh_events` record, so every
//! hook audits the same fields the same way (the agent decodes them with
//! `PolicyEvent::decode`).
use aya_ebpf::helpers::bpf_ktime_get_ns;
use mesh_common::{
    ADMISSION_STRICT, Addr, AdmitKey, Config, EVENT_ADMISSION, EVENT_POLICY, Endpoint, PolicyEvent, VERDICT_ALLOW,
    VERDICT_DENY, Workload,
};

use crate::{
    connect4::count,
    maps::{EVENTS_BYTES, mesh_events},
};

/// Where a decided flow was going.
pub struct Destination<'a> {
    pub addr: Addr,
    /// Host byte order.
    pub port: u16,
    pub endpoint: &'a Endpoint,
}

/// Queues one decision; a full ring is counted (`events_dropped`), never silent.
#[inline(always)]
pub fn emit(cfg: &Config, workload: &Workload, dst: &Destination<'_>, protocol: u8, allowed: bool) {
    let event = PolicyEvent {
        time_ns: unsafe { bpf_ktime_get_ns() },
        workload_id: workload.workload_id,
        src_identity: workload.identity_id,
        dst_identity: dst.endpoint.identity_id,
        dst_port: dst.port,
        protocol,
        verdict: if allowed { VERDICT_ALLOW } else { VERDICT_DENY },
        generation: cfg.policy_generation,
        kind: EVENT_POLICY,
        mode: 0,
        src_port: 0,
        dst: dst.addr,
        src: Addr::UNSPECIFIED,
    };
    output(&event);
}

/// Queues one unattested inbound flow to `workload` (dropped in strict mode).
#[inline(always)]
pub fn emit_admission(cfg: &Config, workload: &Workload, flow: &AdmitKey, mode: u8) {
    let event = PolicyEvent {
        time_ns: unsafe { bpf_ktime_get_ns() },
        workload_id: workload.workload_id,
        src_identity: 0,
        dst_identity: workload.identity_id,
        dst_port: flow.local_port,
        protocol: flow.protocol,
        verdict: if mode == ADMISSION_STRICT {
            VERDICT_DENY
        } else {
            VERDICT_ALLOW
        },
        generation: cfg.policy_generation,
        kind: EVENT_ADMISSION,
        mode,
        src_port: flow.peer_port,
        dst: flow.local,
        src: flow.peer,
    };
    output(&event);
}

/// Queued without waking the agent, which drains on a timer
/// (`kernel_events`), so a connect() does not hand its CPU to the audit
/// writer in the middle of the caller's request; once the ring is half
/// full the agent is woken at once, so a burst is not dropped.
#[inline(always)]
fn output(event: &PolicyEvent) {
    use aya_ebpf::bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP};
    let ring = core::ptr::from_ref(&mesh_events).cast_mut().cast();
    let queued = unsafe { aya_ebpf::helpers::generated::bpf_ringbuf_query(ring, u64::from(BPF_RB_AVAIL_DATA)) };
    let wake = if queued > EVENTS_BYTES / 2 {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    if mesh_events.output(event, u64::from(wake)).is_err() {
        count(|s| &mut s.events_dropped);
    }
}
