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

pub async fn serve(listener: tokio::net::TcpListener, registry: Arc<Registry>) {
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            async move {
                let mut body = String::new();
                match encode(&mut body, &registry) {
                    Ok(()) => (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        body,
                    )
                        .into_response(),
                    Err(e) => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
                }
            }
        }),
    );
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "metrics server stopped");
    }
}

use mesh_common::{CaptureStats, SpliceStats};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

/// The kernel's per-CPU counters (`mesh_capture`, `mesh_splice`), summed
/// over CPUs and exported as Prometheus counters.
#[derive(Clone, Default)]
pub struct KernelMetrics {
    connects: Family<OutcomeLabels, Counter>,
    spliced_bytes: Counter,
    spliced_messages: Counter,
    events_dropped: Counter,
    last: std::sync::Arc<std::sync::Mutex<(SpliceStats, CaptureStats)>>,
}

impl KernelMetrics {
    pub fn register(&self, r: &mut prometheus_client::registry::Registry) {
        r.register(
            "mesh_kernel_connects",
            "connect() calls of enrolled pods seen by mesh_connect4, by outcome",
            self.connects.clone(),
        );
        r.register(
            "mesh_kernel_spliced_bytes",
            "Bytes spliced socket to socket by mesh_sk_msg",
            self.spliced_bytes.clone(),
        );
        r.register(
            "mesh_kernel_spliced_messages",
            "Messages spliced by mesh_sk_msg",
            self.spliced_messages.clone(),
        );
        r.register(
            "mesh_kernel_audit_events_dropped",
            "Kernel decisions whose audit event did not fit in mesh_events",
            self.events_dropped.clone(),
        );
    }

    /// Adds what the kernel counted since the last call.
    pub fn update(&self, splice: SpliceStats, capture: CaptureStats) {
        let mut last = self.last.lock().expect("kernel metrics");
        let (ls, lc) = *last;
        let d = |now: u64, before: u64| now.saturating_sub(before);
        for (outcome, now, before) in [
            ("redirected", capture.redirected, lc.redirected),
            ("same_node", capture.same_node, lc.same_node),
            ("passthrough", capture.passthrough, lc.passthrough),
            ("failed_open", capture.failed_open, lc.failed_open),
            ("denied", capture.denied, lc.denied),
        ] {
            self.connects
                .get_or_create(&OutcomeLabels { outcome })
                .inc_by(d(now, before));
        }
        self.spliced_bytes.inc_by(d(splice.bytes, ls.bytes));
        self.spliced_messages.inc_by(d(splice.messages, ls.messages));
        self.events_dropped.inc_by(d(capture.events_dropped, lc.events_dropped));
        *last = (splice, capture);
    }
}
