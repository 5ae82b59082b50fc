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

/// How often the audit drain reads `mesh_events`.
const DRAIN_PERIOD_MS: u16 = 100;

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
            // The kernel queues events without a wakeup until the ring is
            // half full (mesh-ebpf events.rs): drain on a timer, in batches.
            let ready = {
                let mut fds = [PollFd::new(ring.as_fd(), PollFlags::POLLIN)];
                poll(&mut fds, PollTimeout::from(DRAIN_PERIOD_MS))
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
    if ev.kind == mesh_common::EVENT_ADMISSION {
        return admission_record(ev, snap, policy);
    }
    let src = snap.pod_by_workload_id(ev.workload_id);
    let dst_ip = std::net::IpAddr::from(ev.dst);
    let dst = snap.pod_by_ip(dst_ip);
    let ident = |p: Option<&Pod>| p.map(|p| p.identity().to_string()).unwrap_or_default();
    let allowed = ev.verdict == mesh_common::VERDICT_ALLOW;
    // sendmsg4/6 audit UDP denials: explain them with the UDP rules.
    let proto = if ev.protocol == mesh_common::PROTO_UDP {
        Proto::Udp
    } else {
        Proto::Tcp
    };
    let (rule, target, reason) = match (src, dst) {
        (Some(s), Some(d)) => {
            let dec = policy
                .policy
                .evaluate(policy.mode, &s.identity(), &d.identity(), ev.dst_port, proto);
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
        destination_address: std::net::SocketAddr::new(dst_ip, ev.dst_port).to_string(),
        port: ev.dst_port,
        protocol: proto.as_str().into(),
        rule,
        traffic_target: if allowed { target } else { String::new() },
        generation: policy.policy.generation,
        reason,
        ..Default::default()
    }
}

/// An inbound flow to a pod that the mesh did not vouch for: dropped
/// (strict) or admitted and audited (permissive).
fn admission_record(ev: &PolicyEvent, snap: &Store, policy: &InForce) -> AuditRecord {
    let dst = snap.pod_by_workload_id(ev.workload_id);
    let src_ip = std::net::IpAddr::from(ev.src);
    let src = snap.pod_by_ip(src_ip);
    let dst_ip = std::net::IpAddr::from(ev.dst);
    let strict = ev.mode == mesh_common::ADMISSION_STRICT;
    let from = match src {
        Some(p) if p.node == dst.map(|d| d.node.as_str()).unwrap_or_default() => {
            format!(
                "pod {} without a vouched connect (not enrolled, or its connect bypassed the mesh)",
                p.workload_name()
            )
        }
        Some(p) => format!(
            "pod {} on node {} sent it directly, not through the mesh's tunnel",
            p.workload_name(),
            p.node
        ),
        None => "a host process or an address outside the mesh (not the agent, not the probe cgroup)".to_string(),
    };
    AuditRecord {
        time: wall_time_of(ev.time_ns),
        kind: "admission".into(),
        enforced_at: "destination-kernel".into(),
        verdict: if strict { "deny" } else { "allow" }.into(),
        source_workload: src.map(|p| p.workload_name()).unwrap_or_default(),
        source_identity: src.map(|p| p.identity().to_string()).unwrap_or_default(),
        source_address: std::net::SocketAddr::new(src_ip, ev.src_port).to_string(),
        destination_workload: dst.map(|p| p.workload_name()).unwrap_or_default(),
        destination_identity: dst.map(|p| p.identity().to_string()).unwrap_or_default(),
        destination_address: std::net::SocketAddr::new(dst_ip, ev.dst_port).to_string(),
        port: ev.dst_port,
        protocol: if ev.protocol == mesh_common::PROTO_UDP {
            "udp"
        } else {
            "tcp"
        }
        .into(),
        rule: if strict {
            "admission/strict"
        } else {
            "admission/permissive"
        }
        .into(),
        generation: policy.policy.generation,
        reason: format!(
            "unattested: {from}; {}",
            if strict {
                "dropped before the handshake (strict admission)"
            } else {
                "admitted (permissive admission)"
            }
        ),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{PolicyMode, Snapshot};

    fn pod(name: &str, ip: [u8; 4]) -> Pod {
        Pod {
            namespace: "t".into(),
            name: name.into(),
            uid: String::new(),
            service_account: name.into(),
            node: "n1".into(),
            ips: vec![ip.into()],
            qos_class: None,
            host_network: false,
            labels: Default::default(),
            admission: None,
        }
    }

    /// A denied datagram (sendmsg4) is audited as UDP and explained by the
    /// UDP rules; a denied connect as TCP.
    #[test]
    fn kernel_decisions_are_audited_with_their_protocol() {
        let mut snap = Snapshot::default();
        for p in [pod("a", [198, 18, 1, 10]), pod("b", [198, 18, 1, 11])] {
            snap.pods.insert(p.workload_name(), p);
        }
        let store = Store::new(snap);
        let policy = InForce {
            policy: Arc::default(),
            mode: PolicyMode::Enforcing,
        };
        for (protocol, want) in [(mesh_common::PROTO_UDP, "udp"), (mesh_common::PROTO_TCP, "tcp")] {
            let ev = PolicyEvent {
                workload_id: store.workload_ids()["t/a"],
                dst: mesh_common::Addr::from(std::net::IpAddr::from([198, 18, 1, 11])),
                dst_port: 53,
                protocol,
                verdict: mesh_common::VERDICT_DENY,
                ..Default::default()
            };
            let r = kernel_record(&ev, &store, &policy);
            assert_eq!(r.protocol, want);
            assert!(r.reason.contains(&format!("53/{want}")), "{}", r.reason);
            assert_eq!((r.source_workload.as_str(), r.verdict.as_str()), ("t/a", "deny"));
        }
    }
}
