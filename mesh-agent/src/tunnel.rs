//! Moving captured connections' bytes between nodes.
//!
//! `outbound` accepts what the kernel redirected to the agent and opens a
//! tunnel stream to the destination node's agent; `inbound` is the other
//! end. Two transports carry the streams, both mutual TLS 1.3 between
//! workload identities: `quic` (quinn; default) and `hbone` (HTTP/2 CONNECT
//! over TCP, for networks that drop UDP).
pub mod copy;
pub mod deliver;
pub mod hbone;
pub mod header;
pub mod http;
pub mod inbound;
pub mod outbound;
pub mod pool;
pub mod quic;
pub mod source_port;
pub mod split;
pub mod start;
pub mod tls;
pub mod udp;
pub mod udp_slots;

use std::{net::SocketAddr, time::Duration};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

use crate::identity::SpiffeId;

/// Limits both transports share: connections per peer key, streams per
/// connection (beyond them new streams wait: backpressure), and how long a
/// handshake may take. 16 x 1,000 = 16,000 concurrent flows per (source
/// identity, destination node): a busy pod's 10,000 idle connections fit
/// (with 4 x 256 the 1,025th flow waited for a free stream).
pub const MAX_CONNS_PER_PEER: usize = 16;
pub const MAX_STREAMS_PER_CONN: u32 = 1000;
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a tunnel goes and whom it speaks for: one pooled connection set per key.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerKey {
    pub source: SpiffeId,
    pub destination: SpiffeId,
    pub node_addr: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("peer node {addr}: {detail}")]
    Connect { addr: SocketAddr, detail: String },
    #[error("peer node {addr} presented the wrong identity or an untrusted certificate: {detail}")]
    PeerIdentity { addr: SocketAddr, detail: String },
    #[error("peer node {addr} did not answer within {timeout:?}{hint}")]
    Timeout {
        addr: SocketAddr,
        timeout: Duration,
        hint: &'static str,
    },
    #[error("peer node {addr} refused the flow: {detail}")]
    Refused { addr: SocketAddr, detail: String },
    #[error("peer node {addr} is draining (its agent is being replaced) and takes no new QUIC connection")]
    Draining { addr: SocketAddr },
    #[error("no certificate for {0} yet (is the CA reachable?)")]
    NoCertificate(SpiffeId),
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FlowLabels {
    pub transport: &'static str,
    pub direction: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByteLabels {
    pub transport: &'static str,
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabels {
    pub transport: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabels {
    pub transport: &'static str,
    pub reason: &'static str,
}

#[derive(Clone)]
pub struct TunnelMetrics {
    /// Shared with the kernel's spliced counts (registered by the app).
    pub connections: crate::metrics::ConnectionMetrics,
    pub flows: Family<FlowLabels, Counter>,
    pub sent: Family<ByteLabels, Counter>,
    pub received: Family<ByteLabels, Counter>,
    pub handshake_seconds: Family<TransportLabels, Histogram>,
    pub rejected: Family<RejectLabels, Counter>,
    pub split_requests: Family<SplitLabels, Counter>,
    pub requests: Family<RequestLabels, Counter>,
    pub request_seconds: Family<RequestRouteLabels, Histogram>,
    pub ejections: Family<EjectionLabels, Counter>,
}

/// An endpoint ejected by a TrafficPolicy's outlier detection.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EjectionLabels {
    pub service: String,
    pub endpoint: String,
}

/// One request served on the L7 path of the client's node.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The rule that took it (`HTTPRoute ns/name rule 0 match 0`), `root`
    /// (a TrafficSplit's unmatched requests) or `no_route`.
    pub route: String,
    /// `namespace/name:port` of the Service the client called.
    pub service: String,
    /// The client's identity, `namespace/serviceaccount`.
    pub source: String,
    /// 1xx .. 5xx of the answer's status (a gRPC status rides in a 200).
    pub status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestRouteLabels {
    pub route: String,
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SplitLabels {
    pub traffic_split: String,
    /// backend (matched), root (unmatched), no_endpoint, upstream_failed, denied.
    pub route: &'static str,
}

impl Default for TunnelMetrics {
    fn default() -> Self {
        TunnelMetrics {
            connections: Default::default(),
            flows: Family::default(),
            sent: Family::default(),
            received: Family::default(),
            handshake_seconds: Family::new_with_constructor(|| {
                Histogram::new([0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0])
            }),
            rejected: Family::default(),
            split_requests: Family::default(),
            requests: Family::default(),
            request_seconds: Family::new_with_constructor(|| {
                Histogram::new([
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
                ])
            }),
            ejections: Family::default(),
        }
    }
}

impl TunnelMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "mesh_tunnel_flows",
            "Tunneled flows by transport, direction and result",
            self.flows.clone(),
        );
        r.register(
            "mesh_tunnel_sent_bytes",
            "Bytes sent into tunnels (outbound) or to pods (inbound)",
            self.sent.clone(),
        );
        r.register(
            "mesh_tunnel_received_bytes",
            "Bytes received from tunnels or pods",
            self.received.clone(),
        );
        r.register(
            "mesh_tunnel_handshake_seconds",
            "Tunnel connection handshake latency",
            self.handshake_seconds.clone(),
        );
        r.register(
            "mesh_tunnel_rejected",
            "Tunnel connections or streams refused, by reason",
            self.rejected.clone(),
        );
        r.register(
            "mesh_split_requests",
            "Requests of HTTP-matched TrafficSplits, by where they were routed",
            self.split_requests.clone(),
        );
        r.register(
            "mesh_http_requests",
            "Requests served on the client's node's L7 path, by route, Service, client identity and status class",
            self.requests.clone(),
        );
        r.register(
            "mesh_http_request_duration_seconds",
            "From when the agent has a request to its answer's headers, by route and Service",
            self.request_seconds.clone(),
        );
        r.register(
            "mesh_endpoint_ejections",
            "Endpoints ejected by a TrafficPolicy's outlier detection on this node, by Service and endpoint",
            self.ejections.clone(),
        );
    }

    pub fn request(&self, route: &str, service: &str, source: &str, status: u16, took: std::time::Duration) {
        let status_class = match status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.requests
            .get_or_create(&RequestLabels {
                route: route.to_string(),
                service: service.to_string(),
                source: source.to_string(),
                status_class,
            })
            .inc();
        self.request_seconds
            .get_or_create(&RequestRouteLabels {
                route: route.to_string(),
                service: service.to_string(),
            })
            .observe(took.as_secs_f64());
    }

    pub fn ejection(&self, service: &str, endpoint: std::net::SocketAddr) {
        self.ejections
            .get_or_create(&EjectionLabels {
                service: service.to_string(),
                endpoint: endpoint.to_string(),
            })
            .inc();
    }

    pub fn split_request(&self, split: &str, route: &'static str) {
        self.split_requests
            .get_or_create(&SplitLabels {
                traffic_split: split.to_string(),
                route,
            })
            .inc();
    }

    pub fn flow(&self, transport: &'static str, direction: &'static str, result: &'static str) {
        self.flows
            .get_or_create(&FlowLabels {
                transport,
                direction,
                result,
            })
            .inc();
    }

    /// `a_to_b` is what came from the local end, `b_to_a` what went back.
    pub fn bytes(&self, transport: &'static str, direction: &'static str, a_to_b: u64, b_to_a: u64) {
        self.sent
            .get_or_create(&ByteLabels { transport, direction })
            .inc_by(a_to_b);
        self.received
            .get_or_create(&ByteLabels { transport, direction })
            .inc_by(b_to_a);
    }

    pub fn reject(&self, transport: &'static str, reason: &'static str) {
        self.rejected.get_or_create(&RejectLabels { transport, reason }).inc();
    }
}

/// Runs the accepting side of a handshake under `timeout`. A failure or a
/// stall is logged and counted; the caller just drops the connection.
pub async fn accept_within<T, E: std::fmt::Display>(
    transport: &'static str,
    metrics: &TunnelMetrics,
    remote: SocketAddr,
    timeout: Duration,
    handshake: impl std::future::Future<Output = Result<T, E>>,
) -> Option<T> {
    match tokio::time::timeout(timeout, handshake).await {
        Ok(Ok(t)) => Some(t),
        Ok(Err(e)) => {
            metrics.reject(transport, "handshake");
            tracing::warn!(transport, peer = %remote, error = %e, "tunnel: handshake from a peer failed");
            None
        }
        Err(_) => {
            metrics.reject(transport, "handshake_timeout");
            tracing::warn!(transport, peer = %remote, "tunnel: peer stalled mid-handshake");
            None
        }
    }
}

/// Which transport outbound flows use (both are always served inbound).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    Quic,
    Tcp,
}
