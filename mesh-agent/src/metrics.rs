//! Prometheus `/metrics` (prometheus-client text format) on 15020. Modules
//! register their own families into the one registry at start-up.
use std::{net::SocketAddr, sync::Arc};

use axum::{Router, http::header, response::IntoResponse, routing::get};
use prometheus_client::{encoding::text::encode, registry::Registry};

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen on {addr} for /metrics: {err} (set --metrics-addr)")]
    Bind { addr: SocketAddr, err: std::io::Error },
}

pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, MetricsError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|err| MetricsError::Bind { addr, err })
}

/// Stops when the agent drains (the successor serves the port then).
pub async fn serve(listener: tokio::net::TcpListener, registry: Arc<Registry>, drain: crate::drain::Drain) {
    let app = Router::new().route(
        "/metrics",
        get(move |headers: axum::http::HeaderMap| {
            let registry = registry.clone();
            async move {
                let mut body = String::new();
                if let Err(e) = encode(&mut body, &registry) {
                    return (axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
                }
                // Prometheus asks for OpenMetrics; anything else (promtool,
                // curl, older scrapers) gets the classic text format.
                let openmetrics = headers
                    .get(header::ACCEPT)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.contains("application/openmetrics-text"));
                if openmetrics {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        body,
                    )
                        .into_response()
                } else {
                    (
                        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
                        to_text_format(&body),
                    )
                        .into_response()
                }
            }
        }),
    );
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(drain.draining())
        .await
    {
        tracing::error!(error = %e, "metrics server stopped");
    }
}

/// OpenMetrics (what prometheus-client writes) to the Prometheus text
/// format 0.0.4: a counter's HELP and TYPE name its `_total` samples, and
/// there is no `# EOF` or `# UNIT`. Written by hand because prometheus-client
/// has no 0.0.4 encoder; our families use no info or exemplars, which the
/// two formats would need more for.
pub fn to_text_format(openmetrics: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ")
            && let Some((name, "counter")) = rest.split_once(' ')
        {
            counters.insert(name);
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = line
            .strip_prefix("# HELP ")
            .map(|r| ("# HELP ", r))
            .or_else(|| line.strip_prefix("# TYPE ").map(|r| ("# TYPE ", r)));
        match meta {
            Some((prefix, rest)) => match rest.split_once(' ') {
                Some((name, tail)) if counters.contains(name) => {
                    out.push_str(&format!("{prefix}{name}_total {tail}"));
                }
                _ => out.push_str(line),
            },
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

use mesh_common::{CaptureStats, FastPathStats, TrafficKey, TrafficStats};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
};

use crate::state::{Pod, Store};

/// Who talked to whom, and how. Workloads are `namespace/pod`, identities
/// `namespace/serviceaccount` (as in the audit trail); empty when unknown.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    pub source_workload: String,
    pub source_namespace: String,
    pub source_identity: String,
    pub destination_workload: String,
    pub destination_namespace: String,
    pub destination_identity: String,
    /// `same_node` (pod to pod on one node, counted by the kernel), `local`
    /// (same node through the agent, for HTTP rules) or `tunnel` (cross node).
    pub path: &'static str,
}

impl ConnectionLabels {
    pub fn new(source: Option<&Pod>, destination: Option<&Pod>, path: &'static str) -> Self {
        let parts = |p: Option<&Pod>| match p {
            Some(p) => (p.workload_name(), p.namespace.clone(), p.identity().to_string()),
            None => Default::default(),
        };
        let (source_workload, source_namespace, source_identity) = parts(source);
        let (destination_workload, destination_namespace, destination_identity) = parts(destination);
        ConnectionLabels {
            source_workload,
            source_namespace,
            source_identity,
            destination_workload,
            destination_namespace,
            destination_identity,
            path,
        }
    }
}

/// Connections and bytes by workload pair and path, whoever carried them:
/// the agent counts what it proxies, the kernel (`mesh_traffic`) same-node
/// pod-to-pod connections. Bytes are counted when a connection closes.
#[derive(Clone, Default)]
pub struct ConnectionMetrics {
    pub opened: Family<ConnectionLabels, Counter>,
    pub closed: Family<ConnectionLabels, Counter>,
    pub sent_bytes: Family<ConnectionLabels, Counter>,
    pub received_bytes: Family<ConnectionLabels, Counter>,
}

impl ConnectionMetrics {
    pub fn register(&self, r: &mut prometheus_client::registry::Registry) {
        r.register(
            "mesh_connections_opened",
            "Meshed TCP connections opened, by workloads, identities and path",
            self.opened.clone(),
        );
        r.register(
            "mesh_connections_closed",
            "Meshed TCP connections closed, by workloads, identities and path",
            self.closed.clone(),
        );
        r.register(
            "mesh_connection_sent_bytes",
            "Bytes from the source (connecting) workload to the destination",
            self.sent_bytes.clone(),
        );
        r.register(
            "mesh_connection_received_bytes",
            "Bytes from the destination workload back to the source",
            self.received_bytes.clone(),
        );
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

/// The kernel's per-CPU counters (`mesh_capture`, `mesh_fast_stats`), summed
/// over CPUs and exported as Prometheus counters.
#[derive(Clone, Default)]
pub struct KernelMetrics {
    connects: Family<OutcomeLabels, Counter>,
    fast_path_bytes: Counter,
    fast_path_packets: Counter,
    events_dropped: Counter,
    connections: ConnectionMetrics,
    last: std::sync::Arc<std::sync::Mutex<Last>>,
}

#[derive(Default)]
struct Last {
    fast_path: FastPathStats,
    capture: CaptureStats,
    traffic: std::collections::HashMap<TrafficKey, TrafficStats>,
}

impl KernelMetrics {
    /// Same-node connections are counted into the shared `connections`.
    pub fn new(connections: ConnectionMetrics) -> Self {
        KernelMetrics {
            connections,
            ..Default::default()
        }
    }

    pub fn register(&self, r: &mut prometheus_client::registry::Registry) {
        r.register(
            "mesh_kernel_connects",
            "connect() calls of enrolled pods seen by mesh_connect4, by outcome",
            self.connects.clone(),
        );
        r.register(
            "mesh_kernel_fast_path_bytes",
            "Bytes of same-node pod-to-pod packets mesh_fast_path handed veth to veth",
            self.fast_path_bytes.clone(),
        );
        r.register(
            "mesh_kernel_fast_path_packets",
            "Same-node pod-to-pod packets mesh_fast_path handed veth to veth",
            self.fast_path_packets.clone(),
        );
        r.register(
            "mesh_kernel_audit_events_dropped",
            "Kernel decisions whose audit event did not fit in mesh_events",
            self.events_dropped.clone(),
        );
    }

    /// Adds what the kernel counted since the last call.
    pub fn update(&self, fast_path: FastPathStats, capture: CaptureStats) {
        let mut last = self.last.lock().expect("kernel metrics");
        let (lf, lc) = (last.fast_path, last.capture);
        let d = |now: u64, before: u64| now.saturating_sub(before);
        for (outcome, now, before) in [
            ("redirected", capture.redirected, lc.redirected),
            ("same_node", capture.same_node, lc.same_node),
            ("passthrough", capture.passthrough, lc.passthrough),
            ("failed_open", capture.failed_open, lc.failed_open),
            ("denied", capture.denied, lc.denied),
            ("load_balanced", capture.load_balanced, lc.load_balanced),
            ("no_endpoint", capture.no_endpoint, lc.no_endpoint),
            ("no_relay", capture.no_relay, lc.no_relay),
        ] {
            self.connects
                .get_or_create(&OutcomeLabels { outcome })
                .inc_by(d(now, before));
        }
        self.fast_path_bytes.inc_by(d(fast_path.bytes, lf.bytes));
        self.fast_path_packets.inc_by(d(fast_path.packets, lf.packets));
        self.events_dropped.inc_by(d(capture.events_dropped, lc.events_dropped));
        last.fast_path = fast_path;
        last.capture = capture;
    }

    /// Adds the same-node traffic per workload pair since the last call.
    /// Pairs absent from `now` (pruned) are forgotten; a pair whose
    /// counters went down was re-created, so all of it is new.
    pub fn update_traffic(&self, now: &[(TrafficKey, TrafficStats)], snap: &Store) {
        let mut last = self.last.lock().expect("kernel metrics");
        let mut seen = std::collections::HashMap::with_capacity(now.len());
        for (key, stats) in now {
            let before = last.traffic.get(key).copied().unwrap_or_default();
            let d = |now: u64, before: u64| if now >= before { now - before } else { now };
            let labels = ConnectionLabels::new(
                snap.pod_by_workload_id(key.client_workload),
                snap.pod_by_workload_id(key.server_workload),
                "same_node",
            );
            let c = &self.connections;
            for (family, n, b) in [
                (&c.opened, stats.opened, before.opened),
                (&c.closed, stats.closed, before.closed),
                (&c.sent_bytes, stats.sent_bytes, before.sent_bytes),
                (&c.received_bytes, stats.received_bytes, before.received_bytes),
            ] {
                let delta = d(n, b);
                if delta > 0 {
                    family.get_or_create(&labels).inc_by(delta);
                }
            }
            seen.insert(*key, *stats);
        }
        last.traffic = seen;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::{gauge::Gauge, histogram::Histogram};

    #[test]
    fn text_format_names_counters_by_their_samples_and_has_no_eof() {
        let mut r = Registry::default();
        let c: Family<OutcomeLabels, Counter> = Family::default();
        c.get_or_create(&OutcomeLabels { outcome: "denied" }).inc_by(3);
        r.register("mesh_test_connects", "Connects", c);
        let g: Gauge = Gauge::default();
        g.set(7);
        r.register("mesh_test_generation", "Generation", g);
        let h = Histogram::new([0.1, 1.0]);
        h.observe(0.5);
        r.register("mesh_test_seconds", "Latency", h);
        let mut om = String::new();
        encode(&mut om, &r).unwrap();
        let text = to_text_format(&om);
        assert!(text.contains("# HELP mesh_test_connects_total Connects."), "{text}");
        assert!(text.contains("# TYPE mesh_test_connects_total counter"), "{text}");
        assert!(
            text.contains("mesh_test_connects_total{outcome=\"denied\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE mesh_test_generation gauge\nmesh_test_generation 7"),
            "{text}"
        );
        assert!(text.contains("# TYPE mesh_test_seconds histogram"), "{text}");
        assert!(text.contains("mesh_test_seconds_bucket{le=\"1.0\"} 1"), "{text}");
        assert!(!text.contains("# EOF"), "{text}");
    }
}
