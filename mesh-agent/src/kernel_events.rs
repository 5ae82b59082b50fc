//! The kernel's side of the audit trail: `mesh_events` (every decision at
//! `connect()`) decoded into audit records, and the aya-log ring of kernel
//! debug lines. Both are read on plain threads so the kernel never waits
//! for the async runtime.
use std::sync::Arc;

use mesh_common::PolicyEvent;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    audit::{Audit, AuditRecord},
    authz::Proto,
    policy::InForce,
    state::{Pod, SnapshotRx, Store},
};

/// Drains `mesh_events` (decisions at connect()) into the audit trail, on
/// its own thread: the kernel never waits for us; if we fall behind, the
/// kernel counts what it could not queue (events_dropped).
pub fn drain_kernel_events(
    mut ring: aya::maps::RingBuf<aya::maps::MapData>,
    audit: Arc<Audit>,
    snapshots: SnapshotRx,
    policy: watch::Receiver<Arc<InForce>>,
    stop: CancellationToken,
) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd as _;
    std::thread::spawn(move || {
        while !stop.is_cancelled() {
            let ready = {
                let mut fds = [PollFd::new(ring.as_fd(), PollFlags::POLLIN)];
                poll(&mut fds, PollTimeout::from(500u16))
            };
            match ready {
                Err(nix::Error::EINTR) => continue,
                Err(e) => {
                    tracing::error!(error = %e, "audit: cannot poll mesh_events; kernel decisions are no longer audited");
                    return;
                }
                Ok(_) => {}
            }
            while let Some(item) = ring.next() {
                tracing::debug!(len = item.len(), "audit: kernel event");
                let Some(ev) = PolicyEvent::decode(&item) else {
                    tracing::warn!(
                        len = item.len(),
                        "audit: a kernel event of the wrong size (agent and mesh-ebpf out of sync?)"
                    );
                    continue;
                };
                audit.record(kernel_record(&ev, &snapshots.borrow(), &policy.borrow()));
            }
        }
    });
}

/// A kernel decision as an audit record, named from the snapshot and the
/// policy in force.
fn kernel_record(ev: &PolicyEvent, snap: &Store, policy: &InForce) -> AuditRecord {
    let src = snap.pod_by_workload_id(ev.workload_id);
    let dst_ip = std::net::Ipv4Addr::from(ev.dst_ipv4.to_ne_bytes());
    let dst = snap.pod_by_ip(dst_ip);
    let ident = |p: Option<&Pod>| p.map(|p| p.identity().to_string()).unwrap_or_default();
    let allowed = ev.verdict == mesh_common::VERDICT_ALLOW;
    let (rule, target, reason) = match (src, dst) {
        (Some(s), Some(d)) => {
            let dec = policy
                .policy
                .evaluate(policy.mode, &s.identity(), &d.identity(), ev.dst_port, Proto::Tcp);
            (dec.rule, dec.target.unwrap_or_default(), dec.reason)
        }
        _ => (String::new(), String::new(), String::new()),
    };
    let (rule, reason) = if allowed {
        (rule, reason)
    } else {
        ("default-deny".into(), format!("connect() refused with EPERM: {reason}"))
    };
    AuditRecord {
        time: wall_time_of(ev.time_ns),
        kind: "policy".into(),
        enforced_at: "source".into(),
        verdict: if allowed { "allow" } else { "deny" }.into(),
        source_workload: src.map(|p| p.workload_name()).unwrap_or_default(),
        source_identity: ident(src),
        destination_workload: dst.map(|p| p.workload_name()).unwrap_or_default(),
        destination_identity: ident(dst),
        destination_address: format!("{dst_ip}:{}", ev.dst_port),
        port: ev.dst_port,
        protocol: "tcp".into(),
        rule,
        traffic_target: if allowed { target } else { String::new() },
        generation: policy.policy.generation,
        reason,
        ..Default::default()
    }
}

/// A CLOCK_MONOTONIC instant as wall-clock RFC 3339.
fn wall_time_of(mono_ns: u64) -> String {
    let now_mono = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(mono_ns);
    let age = std::time::Duration::from_nanos(now_mono.saturating_sub(mono_ns));
    let at = time::OffsetDateTime::now_utc() - age;
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Drains the kernel programs' aya-log ring buffer on its own thread, so a
/// burst of kernel debug lines never stalls the async runtime.
pub fn forward_kernel_logs(mut logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd as _;
    std::thread::spawn(move || {
        loop {
            let ready = {
                let mut fds = [PollFd::new(logger.as_fd(), PollFlags::POLLIN)];
                poll(&mut fds, PollTimeout::from(1000u16))
            };
            if ready.is_err() {
                return;
            }
            logger.flush();
        }
    });
}
