//! The agent's local admin API, on one loopback port (`--admin-addr`,
//! 127.0.0.1:15000): HTTP for people and tools, gRPC for the audit stream.
//! Health for the kubelet is on `--health-addr` (15021).
//!
//! - `GET /config_dump`: workloads, services, the compiled policy, the
//!   certificates (serials and expiry, never keys), kernel counters.
//! - `GET /readyz`: 200 once the kernel programs are attached, the first
//!   snapshot and policy are in force and every local identity has a
//!   certificate; 503 with the reasons otherwise.
//! - `PUT /logging?level=<filter>`: changes the log filter at run time.
use std::{collections::HashMap, net::SocketAddr, sync::Arc};

use axum::{
    Json, Router,
    extract::{Query, State},
    http::StatusCode,
    routing::{get, put},
};
use tokio::sync::watch;

use crate::{
    audit::Audit,
    drain::Drain,
    identity::{SpiffeId, manager::IdentityManager},
    policy::InForce,
    redirect::Redirect,
    state::SnapshotRx,
};

#[derive(Clone)]
pub struct AdminState {
    pub node: String,
    pub snapshots: SnapshotRx,
    pub policy: watch::Receiver<Arc<InForce>>,
    pub traffic_policies: watch::Receiver<Arc<crate::resilience::InForce>>,
    pub identities: Option<Arc<IdentityManager>>,
    pub trust_domain: String,
    pub redirect: Arc<Redirect>,
}

impl AdminState {
    /// Why the node is not ready yet; empty when it is.
    pub fn not_ready(&self) -> Vec<String> {
        let mut why = Vec::new();
        let snap = self.snapshots.borrow().clone();
        if snap.generation == 0 {
            why.push("no snapshot from the source yet".to_string());
        }
        if self.policy.borrow().policy.generation == 0 {
            why.push("no policy in force yet".to_string());
        }
        if let Some(ids) = &self.identities {
            for p in snap.pods.values().filter(|p| p.node == self.node) {
                if let Ok(id) = SpiffeId::of(&self.trust_domain, &p.identity())
                    && ids.current(&id).is_none()
                {
                    why.push(format!("no certificate yet for {id}"));
                }
            }
        }
        why.sort();
        why.dedup();
        why
    }

    pub fn config_dump(&self) -> serde_json::Value {
        let snap = self.snapshots.borrow().clone();
        let in_force = self.policy.borrow().clone();
        let now = std::time::SystemTime::now();
        let certificates: Vec<serde_json::Value> = self
            .identities
            .iter()
            .flat_map(|m| m.identities())
            .map(|c| {
                serde_json::json!({
                    "identity": c.identity.to_string(),
                    "serial": c.serial,
                    "expires_in_s": c.not_after.duration_since(now).map(|d| d.as_secs()).unwrap_or(0),
                })
            })
            .collect();
        let traffic_policies = self.traffic_policies.borrow().clone();
        let capture = self.redirect.capture_stats();
        let fast_path = self.redirect.fast_path_stats();
        serde_json::json!({
            "node": self.node,
            "source_generation": snap.generation,
            "source_errors": snap.errors,
            "workloads": snap.pods.values().map(|p| serde_json::json!({
                "name": p.workload_name(), "ip": p.primary_ip().map(|ip| ip.to_string()), "ips": p.ips.iter().map(|ip| ip.to_string()).collect::<Vec<_>>(), "node": p.node,
                "service_account": p.service_account, "local": p.node == self.node,
            })).collect::<Vec<_>>(),
            "nodes": snap.nodes.iter().map(|(n, ip)| (n.clone(), ip.to_string())).collect::<HashMap<_, _>>(),
            "services": snap.services.values().map(|s| serde_json::json!({
                "name": format!("{}/{}", s.namespace, s.name),
                "cluster_ip": s.cluster_ips.first().map(|ip| ip.to_string()),
                "cluster_ips": s.cluster_ips.iter().map(|ip| ip.to_string()).collect::<Vec<_>>(),
                "ports": s.ports.iter().map(|p| p.port).collect::<Vec<_>>(),
                "endpoints": s.endpoints.iter().map(|e| serde_json::json!({"ip": e.ip.to_string(), "ready": e.ready, "node": e.node})).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "policy": {
                "mode": format!("{:?}", in_force.mode).to_lowercase(),
                "generation": in_force.policy.generation,
                "traffic_targets": in_force.policy.targets.iter().map(|t| serde_json::json!({
                    "name": t.name,
                    "destination": t.destination.to_string(),
                    "sources": t.sources.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                    "tcp": t.tcp.iter().map(|r| serde_json::json!({"route": r.route, "ports": r.ports})).collect::<Vec<_>>(),
                    "udp": t.udp.iter().map(|r| serde_json::json!({"route": r.route, "ports": r.ports})).collect::<Vec<_>>(),
                    "http_matches": t.http.iter().map(|m| format!("{}#{}", m.group, m.name)).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
                "refused": in_force.policy.rejected.iter().map(|r| serde_json::json!({"kind": r.kind, "name": r.name, "reason": r.reason})).collect::<Vec<_>>(),
            },
            "traffic_policies": {
                "client": traffic_policies.client.iter().map(|((svc, port), c)| serde_json::json!({
                    "policy": c.name,
                    "service": format!("{svc}:{port}"),
                    "settings": c.settings.describe(),
                    "ejected": c.ejections.iter().flat_map(|e| e.ejected()).map(|e| serde_json::json!({
                        "endpoint": e.endpoint.to_string(), "next_probe_in_ms": e.left.as_millis() as u64, "times": e.times,
                    })).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
                "rate_limits": traffic_policies.limits.values().map(|l| serde_json::json!({
                    "policy": l.name,
                    "settings": l.settings.describe(),
                    "rejected": l.rejected.load(std::sync::atomic::Ordering::Relaxed),
                })).collect::<Vec<_>>(),
                "refused": traffic_policies.refused.iter().map(|r| serde_json::json!({
                    "name": r.name, "reason": r.reason, "previous_version_in_force": r.kept_previous,
                })).collect::<Vec<_>>(),
            },
            "certificates": certificates,
            "kernel": {
                "policy_mode": self.redirect.kernel_policy().map(|(enforcing, _)| if enforcing { "enforcing" } else { "allow-all" }),
                "policy_generation": self.redirect.kernel_policy().map(|(_, generation)| generation),
                "redirected": capture.redirected, "same_node": capture.same_node, "passthrough": capture.passthrough,
                "failed_open": capture.failed_open, "denied": capture.denied, "events_dropped": capture.events_dropped,
                "load_balanced": capture.load_balanced, "no_endpoint": capture.no_endpoint, "no_relay": capture.no_relay,
                "fast_path_packets": fast_path.packets, "fast_path_bytes": fast_path.bytes, "fast_path_links": self.redirect.fast_path_links(),
            },
            "not_ready": self.not_ready(),
        })
    }
}

async fn readyz(State(s): State<AdminState>) -> (StatusCode, String) {
    let why = s.not_ready();
    if why.is_empty() {
        (StatusCode::OK, "ready\n".into())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("{}\n", why.join("\n")))
    }
}

async fn set_log_level(Query(q): Query<HashMap<String, String>>) -> (StatusCode, String) {
    let Some(level) = q.get("level") else {
        return (
            StatusCode::BAD_REQUEST,
            "give ?level=<filter>, e.g. info or mesh_agent::tunnel=debug\n".into(),
        );
    };
    match crate::logging::set_filter(level) {
        Ok(()) => {
            tracing::info!(filter = %level, "log filter changed");
            (StatusCode::OK, format!("log filter is now {level}\n"))
        }
        Err(e) => (StatusCode::BAD_REQUEST, format!("{e}\n")),
    }
}

/// Serves the admin API (HTTP and the audit gRPC service) on `listener`.
/// Stops when the agent drains (the successor serves the port then).
pub async fn serve(listener: tokio::net::TcpListener, state: AdminState, audit: Arc<Audit>, drain: Drain) {
    let grpc = tonic::service::Routes::new(crate::audit::proto::audit_trail_server::AuditTrailServer::new(
        crate::audit::AuditService(audit),
    ))
    .into_axum_router();
    let app = Router::new()
        .route(
            "/config_dump",
            get(|State(s): State<AdminState>| async move { Json(s.config_dump()) }),
        )
        .route("/readyz", get(readyz))
        .route("/logging", put(set_log_level).post(set_log_level))
        .with_state(state)
        .merge(grpc);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(drain.draining())
        .await
    {
        tracing::error!(error = %e, "admin API stopped");
    }
}

/// `/healthz` (the process answers) and `/readyz` for the kubelet.
pub async fn serve_health(listener: tokio::net::TcpListener, state: AdminState, drain: Drain) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(drain.draining())
        .await
    {
        tracing::error!(error = %e, "health endpoint stopped");
    }
}

/// The admin address the CLI talks to, as a URL base.
pub fn base(addr: SocketAddr) -> String {
    format!("http://{addr}")
}
