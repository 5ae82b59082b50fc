//! The mTLS-over-TCP transport (HBONE-style, TCP 15008): HTTP/2 CONNECT with
//! the original destination as the authority, inside mutual TLS 1.3 between
//! workload identities. For networks that drop UDP. hyper does the HTTP/2
//! (and its flow control gives backpressure); a CONNECT stream becomes a
//! byte stream through hyper's upgrade.
use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{
    Method, Request, Response, StatusCode, body::Incoming, client::conn::http2::SendRequest, upgrade::Upgraded,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};

use crate::drain::Drain;

use super::{
    HANDSHAKE_TIMEOUT, MAX_CONNS_PER_PEER, MAX_STREAMS_PER_CONN, PeerKey, TunnelError, TunnelMetrics,
    inbound::{Flow, Inbound, Refusal},
    pool::{Lease, Pool, PooledConn},
    tls::{ALPN_H2, TunnelTls, peer_identity, sni_for},
};

const TRANSPORT: &str = "tcp";
pub const FLOW_ID_HEADER: &str = "mesh-flow-id";
/// `1` when the source agent serves the flow as HTTP (`FlowHeader.http`).
pub const HTTP_HEADER: &str = "mesh-http";
pub const REFUSAL_HEADER: &str = "mesh-refusal";

impl PooledConn for SendRequest<Empty<Bytes>> {
    fn is_alive(&self) -> bool {
        !self.is_closed()
    }
}

pub struct Hbone {
    tls: TunnelTls,
    pool: Pool<SendRequest<Empty<Bytes>>>,
    metrics: TunnelMetrics,
}

impl Hbone {
    pub fn new(tls: TunnelTls, metrics: TunnelMetrics) -> Arc<Self> {
        Arc::new(Hbone {
            tls,
            pool: Pool::new(MAX_CONNS_PER_PEER, MAX_STREAMS_PER_CONN as usize),
            metrics,
        })
    }

    /// Opens a CONNECT stream for one flow to `key`'s node.
    pub async fn open(
        &self,
        key: &PeerKey,
        dst: SocketAddr,
        flow_id: u64,
        http: bool,
    ) -> Result<(TokioIo<Upgraded>, Lease<SendRequest<Empty<Bytes>>>), TunnelError> {
        let addr = key.node_addr;
        // A pooled connection whose peer agent is draining answers a new
        // stream with GOAWAY / REFUSED_STREAM before any byte of the flow
        // is sent: retire it and ask once more on a new connection (which
        // the successor agent accepts).
        let mut retried = false;
        let (resp, lease) = loop {
            let lease = self.pool.get(key, || self.connect(key)).await?;
            let req = Request::builder()
                .method(Method::CONNECT)
                .uri(dst.to_string())
                .header(FLOW_ID_HEADER, flow_id.to_string())
                .header(HTTP_HEADER, if http { "1" } else { "0" })
                .body(Empty::new())
                .expect("valid request");
            let mut sender = (*lease).clone();
            // A peer that never answers the CONNECT (its end broken after
            // the handshake) fails the flow rather than holding it forever.
            let answered = match tokio::time::timeout(HANDSHAKE_TIMEOUT, sender.send_request(req)).await {
                Ok(answer) => answer.map_err(|e| e.to_string()),
                Err(_) => Err(format!("no answer to CONNECT within {HANDSHAKE_TIMEOUT:?}")),
            };
            match answered {
                Ok(resp) => break (resp, lease),
                Err(e) if !retried => {
                    tracing::debug!(peer = %addr, error = %e, "tunnel: HTTP/2 connection refused a stream; retrying on a new one");
                    lease.retire();
                    retried = true;
                }
                Err(e) => {
                    return Err(TunnelError::Connect {
                        addr,
                        detail: e.to_string(),
                    });
                }
            }
        };
        if resp.status() != StatusCode::OK {
            let why = resp
                .headers()
                .get(REFUSAL_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("no reason given")
                .to_string();
            return Err(TunnelError::Refused {
                addr,
                detail: format!("{}: {why}", resp.status()),
            });
        }
        let upgraded = hyper::upgrade::on(resp).await.map_err(|e| TunnelError::Connect {
            addr,
            detail: e.to_string(),
        })?;
        Ok((TokioIo::new(upgraded), lease))
    }

    async fn connect(&self, key: &PeerKey) -> Result<SendRequest<Empty<Bytes>>, TunnelError> {
        let addr = key.node_addr;
        if self
            .tls
            .manager
            .wait_current(&key.source, HANDSHAKE_TIMEOUT)
            .await
            .is_none()
        {
            return Err(TunnelError::NoCertificate(key.source.clone()));
        }
        let started = Instant::now();
        let timeout = |_| TunnelError::Timeout {
            addr,
            timeout: HANDSHAKE_TIMEOUT,
            hint: "",
        };
        let tcp = tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(timeout)?
            .map_err(|e| TunnelError::Connect {
                addr,
                detail: format!("TCP {}: {e}", addr.port()),
            })?;
        let _ = tcp.set_nodelay(true);
        let connector =
            tokio_rustls::TlsConnector::from(Arc::new(self.tls.client_config(&key.source, &key.destination, ALPN_H2)));
        let name = rustls_pki_types::ServerName::try_from(sni_for(&key.destination)).expect("valid DNS name");
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, tcp)).await {
            Err(e) => {
                self.metrics.reject(TRANSPORT, "handshake_timeout");
                return Err(timeout(e));
            }
            Ok(Err(e)) => {
                self.metrics.reject(TRANSPORT, "handshake");
                return Err(TunnelError::PeerIdentity {
                    addr,
                    detail: e.to_string(),
                });
            }
            Ok(Ok(t)) => t,
        };
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(1))
            .keep_alive_timeout(Duration::from_secs(3))
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| TunnelError::Connect {
                addr,
                detail: e.to_string(),
            })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(peer = %addr, error = %e, "tunnel: HTTP/2 connection ended");
            }
        });
        self.metrics
            .handshake_seconds
            .get_or_create(&super::TransportLabels { transport: TRANSPORT })
            .observe(started.elapsed().as_secs_f64());
        tracing::info!(peer = %addr, source = %key.source, destination = %key.destination, "tunnel: HTTP/2 connection up");
        Ok(sender)
    }

    /// Accepts peers' TLS connections and their CONNECT streams.
    /// Once `drain` says so, stops accepting and sends every peer GOAWAY;
    /// streams already open are served to their end.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, inbound: Arc<Inbound>, drain: Drain) {
        let server = self.tls.server_config(ALPN_H2);
        self.serve_with(listener, server, inbound, drain).await
    }

    /// As `serve`, with the TLS configuration given (tests use it to play an impostor).
    pub async fn serve_with(
        self: Arc<Self>,
        listener: TcpListener,
        server: rustls::ServerConfig,
        inbound: Arc<Inbound>,
        drain: Drain,
    ) {
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = drain.draining() => return,
            };
            let Ok((tcp, remote)) = accepted else {
                continue;
            };
            let drain = drain.clone();
            let acceptor = acceptor.clone();
            let inbound = inbound.clone();
            let metrics = self.metrics.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let Some(tls) =
                    super::accept_within(TRANSPORT, &metrics, remote, HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                else {
                    return;
                };
                let Some(peer) = peer_identity(tls.get_ref().1.peer_certificates(), &inbound.trust_domain) else {
                    metrics.reject(TRANSPORT, "no_identity");
                    return;
                };
                let service = hyper::service::service_fn(move |req| {
                    let (inbound, metrics, peer) = (inbound.clone(), metrics.clone(), peer.clone());
                    async move { Ok::<_, Infallible>(handle(req, inbound, metrics, peer, remote)) }
                });
                let builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .max_concurrent_streams(MAX_STREAMS_PER_CONN)
                    .keep_alive_interval(Duration::from_secs(1))
                    .keep_alive_timeout(Duration::from_secs(3))
                    .clone();
                let conn = builder.serve_connection(TokioIo::new(tls), service);
                tokio::pin!(conn);
                let served = tokio::select! {
                    served = conn.as_mut() => served,
                    () = drain.draining() => {
                        conn.as_mut().graceful_shutdown();
                        conn.await
                    }
                };
                if let Err(e) = served {
                    tracing::debug!(peer = %remote, error = %e, "tunnel: HTTP/2 peer connection ended");
                }
            });
        }
    }
}

fn refuse(status: StatusCode, why: &str) -> Response<Empty<Bytes>> {
    let mut resp = Response::new(Empty::new());
    *resp.status_mut() = status;
    if let Ok(v) = why.parse() {
        resp.headers_mut().insert(REFUSAL_HEADER, v);
    }
    resp
}

fn handle(
    req: Request<Incoming>,
    inbound: Arc<Inbound>,
    metrics: TunnelMetrics,
    peer: crate::identity::SpiffeId,
    remote: SocketAddr,
) -> Response<Empty<Bytes>> {
    if req.method() != Method::CONNECT {
        metrics.reject(TRANSPORT, "bad_header");
        return refuse(StatusCode::METHOD_NOT_ALLOWED, "only CONNECT");
    }
    let Some(dst) = req
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
    else {
        metrics.reject(TRANSPORT, "bad_header");
        return refuse(StatusCode::BAD_REQUEST, "authority must be ip:port");
    };
    let flow_id: u64 = req
        .headers()
        .get(FLOW_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let http = req.headers().get(HTTP_HEADER).is_some_and(|v| v == "1");
    let admission = match inbound.check(&peer, dst) {
        Ok(a) => a,
        Err(refusal) => {
            let reason = match refusal {
                Refusal::NotLocal(_) => "not_local",
                Refusal::Denied { .. } => "policy",
            };
            metrics.reject(TRANSPORT, reason);
            tracing::warn!(peer = %remote, identity = %peer, flow_id, error = %refusal, "tunnel: flow refused");
            return refuse(StatusCode::FORBIDDEN, &refusal.to_string());
        }
    };
    tokio::spawn(async move {
        match hyper::upgrade::on(req).await {
            Ok(upgraded) => {
                let (r, w) = tokio::io::split(TokioIo::new(upgraded));
                inbound
                    .serve_flow(
                        Flow {
                            transport: TRANSPORT,
                            peer: &peer,
                            dst,
                            flow_id,
                            admission,
                            http,
                        },
                        r,
                        w,
                    )
                    .await;
            }
            Err(e) => tracing::warn!(peer = %remote, flow_id, error = %e, "tunnel: CONNECT upgrade failed"),
        }
    });
    Response::new(Empty::new())
}
