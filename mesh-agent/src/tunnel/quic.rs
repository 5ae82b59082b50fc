//! The QUIC transport (quinn, UDP 15008): one connection per peer key,
//! reused and kept alive while it carries streams, closed after a minute
//! idle; one bidirectional stream per captured TCP flow, opened by a
//! length-prefixed protobuf header. Stream limits give backpressure: when a
//! connection is full, `open_bi` waits instead of buffering.
use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use quinn::{
    Connection, Endpoint, RecvStream, SendStream, TransportConfig, VarInt,
    crypto::rustls::{QuicClientConfig, QuicServerConfig},
};

use super::{
    HANDSHAKE_TIMEOUT, MAX_CONNS_PER_PEER, MAX_STREAMS_PER_CONN, PeerKey, TunnelError, TunnelMetrics,
    header::{self, FlowHeader},
    inbound::{Flow, Inbound, Refusal},
    pool::{Lease, Pool, PooledConn},
    tls::{ALPN_QUIC, TunnelTls, peer_identity, sni_for},
};

const TRANSPORT: &str = "quic";
const IDLE_CLOSE: Duration = Duration::from_secs(60);
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Stream reset codes the accepting side sends, so the dialler can say why.
pub const RESET_BAD_HEADER: u32 = 1;
pub const RESET_REFUSED: u32 = 2;

fn transport_config() -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(MAX_STREAMS_PER_CONN))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        // A dead peer is noticed in about 4 s, not at TCP's minutes.
        .keep_alive_interval(Some(Duration::from_secs(1)))
        .max_idle_timeout(Some(Duration::from_secs(4).try_into().expect("small")))
        // Flow-control windows bound what a slow reader can make us buffer.
        .stream_receive_window(VarInt::from_u32(1 << 20))
        .receive_window(VarInt::from_u32(16 << 20))
        .send_window(16 << 20);
    Arc::new(t)
}

impl PooledConn for Connection {
    fn is_alive(&self) -> bool {
        self.close_reason().is_none()
    }

    fn close_idle(&self) {
        self.close(VarInt::from_u32(0), b"idle");
    }
}

pub struct Quic {
    endpoint: Endpoint,
    tls: TunnelTls,
    pool: Pool<Connection>,
    metrics: TunnelMetrics,
}

impl Quic {
    pub fn bind(addr: SocketAddr, tls: TunnelTls, metrics: TunnelMetrics) -> std::io::Result<Arc<Self>> {
        let server = tls.server_config(ALPN_QUIC);
        Self::bind_with(addr, server, tls, metrics)
    }

    /// As `bind`, with the accepting side's TLS configuration given (tests
    /// use it to play an impostor).
    pub fn bind_with(
        addr: SocketAddr,
        server: rustls::ServerConfig,
        tls: TunnelTls,
        metrics: TunnelMetrics,
    ) -> std::io::Result<Arc<Self>> {
        let crypto = QuicServerConfig::try_from(server).map_err(std::io::Error::other)?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(transport_config());
        let endpoint = Endpoint::server(server, addr)?;
        let quic = Arc::new(Quic {
            endpoint,
            tls,
            pool: Pool::new(MAX_CONNS_PER_PEER, MAX_STREAMS_PER_CONN as usize),
            metrics,
        });
        tokio::spawn(quic.clone().reap_idle());
        Ok(quic)
    }

    /// Opens a stream for one flow to `key`'s node and writes its header.
    pub async fn open(
        &self,
        key: &PeerKey,
        header: &FlowHeader,
    ) -> Result<(SendStream, RecvStream, Lease<Connection>), TunnelError> {
        let (mut send, recv, lease) = self.open_raw(key).await?;
        header::write(&mut send, header)
            .await
            .map_err(|e| TunnelError::Connect {
                addr: key.node_addr,
                detail: e.to_string(),
            })?;
        Ok((send, recv, lease))
    }

    /// A stream without a header (tests use it to send a broken one).
    pub async fn open_raw(&self, key: &PeerKey) -> Result<(SendStream, RecvStream, Lease<Connection>), TunnelError> {
        let lease = self.pool.get(key, || self.connect(key)).await?;
        let (send, recv) = lease.open_bi().await.map_err(|e| TunnelError::Connect {
            addr: key.node_addr,
            detail: e.to_string(),
        })?;
        Ok((send, recv, lease))
    }

    async fn connect(&self, key: &PeerKey) -> Result<Connection, TunnelError> {
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
        let crypto = QuicClientConfig::try_from(self.tls.client_config(&key.source, &key.destination, ALPN_QUIC))
            .map_err(|e| TunnelError::Connect {
                addr,
                detail: e.to_string(),
            })?;
        let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
        cfg.transport_config(transport_config());
        let started = Instant::now();
        let connecting = self
            .endpoint
            .connect_with(cfg, addr, &sni_for(&key.destination))
            .map_err(|e| TunnelError::Connect {
                addr,
                detail: e.to_string(),
            })?;
        let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting).await {
            Err(_) => {
                self.metrics.reject(TRANSPORT, "handshake_timeout");
                return Err(TunnelError::Timeout {
                    addr,
                    timeout: HANDSHAKE_TIMEOUT,
                    hint: "; if UDP 15008 is blocked between nodes, set --tunnel-transport=tcp",
                });
            }
            Ok(Err(e)) => {
                self.metrics.reject(TRANSPORT, "handshake");
                let detail = e.to_string();
                return Err(if detail.contains("certificate") || detail.contains("presented") {
                    TunnelError::PeerIdentity { addr, detail }
                } else {
                    TunnelError::Connect { addr, detail }
                });
            }
            Ok(Ok(c)) => c,
        };
        self.metrics
            .handshake_seconds
            .get_or_create(&super::TransportLabels { transport: TRANSPORT })
            .observe(started.elapsed().as_secs_f64());
        tracing::info!(peer = %addr, source = %key.source, destination = %key.destination, "tunnel: QUIC connection up");
        Ok(conn)
    }

    /// Closes connections that carried no stream for a minute.
    async fn reap_idle(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            self.pool.reap(IDLE_CLOSE);
        }
    }

    /// Accepts peers' connections and streams until the endpoint closes.
    pub async fn serve(self: Arc<Self>, inbound: Arc<Inbound>) {
        while let Some(incoming) = self.endpoint.accept().await {
            let inbound = inbound.clone();
            let metrics = self.metrics.clone();
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                let Some(conn) = super::accept_within(
                    TRANSPORT,
                    &metrics,
                    remote,
                    HANDSHAKE_TIMEOUT,
                    std::future::IntoFuture::into_future(incoming),
                )
                .await
                else {
                    return;
                };
                let td = inbound.trust_domain.clone();
                let identity = conn
                    .peer_identity()
                    .and_then(|any| any.downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>().ok())
                    .and_then(|certs| peer_identity(Some(&certs), &td));
                let Some(peer) = identity else {
                    metrics.reject(TRANSPORT, "no_identity");
                    conn.close(VarInt::from_u32(1), b"no identity");
                    return;
                };
                while let Ok((send, recv)) = conn.accept_bi().await {
                    let inbound = inbound.clone();
                    let peer = peer.clone();
                    let metrics = metrics.clone();
                    tokio::spawn(async move { serve_stream(&inbound, &metrics, remote, peer, send, recv).await });
                }
            });
        }
    }
}

async fn serve_stream(
    inbound: &Inbound,
    metrics: &TunnelMetrics,
    remote: SocketAddr,
    peer: crate::identity::SpiffeId,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let (header, dst) = match tokio::time::timeout(HEADER_TIMEOUT, header::read(&mut recv)).await {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            metrics.reject(TRANSPORT, "bad_header");
            tracing::warn!(peer = %remote, identity = %peer, error = %e, "tunnel: bad flow header");
            let _ = send.reset(VarInt::from_u32(RESET_BAD_HEADER));
            return;
        }
        Err(_) => {
            metrics.reject(TRANSPORT, "header_timeout");
            tracing::warn!(peer = %remote, identity = %peer, "tunnel: no flow header within 5 s");
            let _ = send.reset(VarInt::from_u32(RESET_BAD_HEADER));
            return;
        }
    };
    let admission = match inbound.check(&peer, dst) {
        Ok(a) => a,
        Err(refusal) => {
            metrics.reject(
                TRANSPORT,
                match refusal {
                    Refusal::NotLocal(_) => "not_local",
                    Refusal::Denied { .. } => "policy",
                },
            );
            tracing::warn!(peer = %remote, identity = %peer, flow_id = header.flow_id, error = %refusal, "tunnel: flow refused");
            let _ = send.reset(VarInt::from_u32(RESET_REFUSED));
            let _ = recv.stop(VarInt::from_u32(RESET_REFUSED));
            return;
        }
    };
    inbound
        .serve_flow(
            Flow {
                transport: TRANSPORT,
                peer: &peer,
                dst,
                flow_id: header.flow_id,
                admission,
            },
            recv,
            send,
        )
        .await;
}
