//! The one place a policy decision becomes a `mesh_events` record, so every
//! hook audits the same fields the same way (the agent decodes them with
//! `PolicyEvent::decode`).
use aya_ebpf::helpers::bpf_ktime_get_ns;
use mesh_common::{Addr, Config, Endpoint, PolicyEvent, VERDICT_ALLOW, VERDICT_DENY, Workload};

use crate::{connect4::count, maps::mesh_events};

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
        _pad: 0,
        dst: dst.addr,
    };
    if mesh_events.output(&event, 0).is_err() {
        count(|s| &mut s.events_dropped);
    }
}
