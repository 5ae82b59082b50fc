//! The QUIC transport (quinn): `QuicServer` accepts on UDP 15008, `Quic`
//! dials from its own ephemeral port (so a successor agent can dial while
//! its predecessor still serves 15008). One connection per peer key, reused
//! and kept alive while it carries streams, closed after a minute idle; one
//! bidirectional stream per captured TCP flow, opened by a length-prefixed
//! protobuf header. Stream limits give backpressure: when a connection is
//! full, `open_bi` waits instead of buffering.
//!
//! Draining (ARCHITECTURE.md, "Lifecycle of an agent"): the server refuses new connections and
//! sends each peer a GOAWAY on a unidirectional stream; the peer stops
//! opening streams on that connection, and a refused dial falls back to the
//! TCP transport, whose listener the successor already serves.
use std::{
    io::IoSliceMut,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use quinn::{
    AsyncUdpSocket, Connection, ConnectionError, Endpoint, RecvStream, SendStream, TransportConfig, TransportErrorCode,
    UdpPoller, VarInt,
    crypto::rustls::{QuicClientConfig, QuicServerConfig},
    udp::{RecvMeta, Transmit},
};

use crate::drain::{Drain, Phase};

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
/// What a draining server says on its unidirectional stream.
const GOAWAY: &[u8] = b"goaway";

/// `uni_streams`: the dialler accepts one, the server's GOAWAY.
fn transport_config(uni_streams: u32) -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(MAX_STREAMS_PER_CONN))
        .max_concurrent_uni_streams(VarInt::from_u32(uni_streams))
        // A dead peer is noticed in about 4 s, not at TCP's minutes.
        .keep_alive_interval(Some(Duration::from_secs(1)))
        .max_idle_timeout(Some(Duration::from_secs(4).try_into().expect("small")))
        // Flow-control windows bound what a slow reader can make us buffer.
        .stream_receive_window(VarInt::from_u32(1 << 20))
        .receive_window(VarInt::from_u32(16 << 20))
        .send_window(16 << 20);
    Arc::new(t)
}

/// A dialled connection and whether its server said GOAWAY.
pub struct QuicConn {
    conn: Connection,
    goaway: Arc<AtomicBool>,
}

impl std::ops::Deref for QuicConn {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.conn
    }
}

impl PooledConn for QuicConn {
    fn is_alive(&self) -> bool {
        self.conn.close_reason().is_none() && !self.goaway.load(Ordering::Relaxed)
    }

    fn close_idle(&self) {
        self.conn.close(VarInt::from_u32(0), b"idle");
    }
}

/// Where datagrams arriving on dialled connections go (UDP replies).
pub type DatagramSink = Arc<dyn Fn(Bytes) + Send + Sync>;

/// The dialling side: its own endpoint on an ephemeral port.
pub struct Quic {
    endpoint: Endpoint,
    tls: TunnelTls,
    pool: Pool<QuicConn>,
    metrics: TunnelMetrics,
    datagrams: std::sync::OnceLock<DatagramSink>,
}

impl Quic {
    /// A dialler bound to `addr` (port 0: any).
    pub fn client(addr: SocketAddr, tls: TunnelTls, metrics: TunnelMetrics) -> std::io::Result<Arc<Self>> {
        let endpoint = Endpoint::client(addr)?;
        let quic = Arc::new(Quic {
            endpoint,
            tls,
            pool: Pool::new(MAX_CONNS_PER_PEER, MAX_STREAMS_PER_CONN as usize),
            metrics,
            datagrams: std::sync::OnceLock::new(),
        });
        tokio::spawn(quic.clone().reap_idle());
        Ok(quic)
    }

    /// Opens a stream for one flow to `key`'s node and writes its header.
    pub async fn open(
        &self,
        key: &PeerKey,
        header: &FlowHeader,
    ) -> Result<(SendStream, RecvStream, Lease<QuicConn>), TunnelError> {
        let (mut send, recv, lease) = self.open_raw(key).await?;
        header::write(&mut send, header)
            .await
            .map_err(|e| TunnelError::Connect {
                addr: key.node_addr,
                detail: e.to_string(),
            })?;
        Ok((send, recv, lease))
    }

    /// Sets where datagrams from peers go; once, before the first dial.
    pub fn on_datagram(&self, sink: DatagramSink) {
        let _ = self.datagrams.set(sink);
    }

    /// Sends one datagram on a pooled connection to `key`'s node.
    pub async fn send_datagram(&self, key: &PeerKey, datagram: Bytes) -> Result<(), TunnelError> {
        let lease = self.pool.get(key, || self.connect(key)).await?;
        lease.send_datagram(datagram).map_err(|e| TunnelError::Connect {
            addr: key.node_addr,
            detail: format!("datagram: {e}"),
        })
    }

    /// A stream without a header (tests use it to send a broken one).
    pub async fn open_raw(&self, key: &PeerKey) -> Result<(SendStream, RecvStream, Lease<QuicConn>), TunnelError> {
        let lease = self.pool.get(key, || self.connect(key)).await?;
        let (send, recv) = lease.open_bi().await.map_err(|e| TunnelError::Connect {
            addr: key.node_addr,
            detail: e.to_string(),
        })?;
        Ok((send, recv, lease))
    }

    async fn connect(&self, key: &PeerKey) -> Result<QuicConn, TunnelError> {
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
        cfg.transport_config(transport_config(1));
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
            Ok(Err(ConnectionError::ConnectionClosed(c))) if c.error_code == TransportErrorCode::CONNECTION_REFUSED => {
                self.metrics.reject(TRANSPORT, "peer_draining");
                return Err(TunnelError::Draining { addr });
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
        let goaway = Arc::new(AtomicBool::new(false));
        tokio::spawn(watch_goaway(conn.clone(), goaway.clone()));
        if let Some(sink) = self.datagrams.get().cloned() {
            let conn = conn.clone();
            tokio::spawn(async move {
                while let Ok(d) = conn.read_datagram().await {
                    sink(d);
                }
            });
        }
        Ok(QuicConn { conn, goaway })
    }

    /// Closes connections that carried no stream for a minute.
    async fn reap_idle(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            self.pool.reap(IDLE_CLOSE);
        }
    }
}

/// Marks a dialled connection as not for new streams once its server says GOAWAY.
async fn watch_goaway(conn: Connection, goaway: Arc<AtomicBool>) {
    if let Ok(mut stream) = conn.accept_uni().await
        && let Ok(said) = stream.read_to_end(GOAWAY.len()).await
        && said == GOAWAY
    {
        goaway.store(true, Ordering::Relaxed);
        tracing::info!(peer = %conn.remote_address(), "tunnel: peer agent is draining; new flows take a new connection");
    }
}

/// The accepting side, on UDP 15008. Its socket can be handed to a
/// successor: `release` stops this endpoint from ever touching it again.
pub struct QuicServer {
    endpoint: Endpoint,
    socket: Arc<Releasable>,
    /// Another descriptor of the same socket, for the successor.
    handoff_copy: std::net::UdpSocket,
    metrics: TunnelMetrics,
}

impl QuicServer {
    /// Serves on `socket` (bound here, or received from a predecessor).
    pub fn new(socket: std::net::UdpSocket, tls: &TunnelTls, metrics: TunnelMetrics) -> std::io::Result<Arc<Self>> {
        Self::with_tls(socket, tls.server_config(ALPN_QUIC), metrics)
    }

    /// As `new`, with the TLS configuration given (tests use it to play an impostor).
    pub fn with_tls(
        socket: std::net::UdpSocket,
        server: rustls::ServerConfig,
        metrics: TunnelMetrics,
    ) -> std::io::Result<Arc<Self>> {
        let crypto = QuicServerConfig::try_from(server).map_err(std::io::Error::other)?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        config.transport_config(transport_config(0));
        let handoff_copy = socket.try_clone()?;
        let runtime = Arc::new(quinn::TokioRuntime);
        let socket = Arc::new(Releasable {
            inner: quinn::Runtime::wrap_udp_socket(&*runtime, socket)?,
            released: AtomicBool::new(false),
        });
        let endpoint = Endpoint::new_with_abstract_socket(
            quinn::EndpointConfig::default(),
            Some(config),
            socket.clone(),
            runtime,
        )?;
        Ok(Arc::new(QuicServer {
            endpoint,
            socket,
            handoff_copy,
            metrics,
        }))
    }

    /// The socket, to hand to a successor after `release`.
    pub fn handoff_copy(&self) -> &std::net::UdpSocket {
        &self.handoff_copy
    }

    /// Closes every connection and stops using the socket for good (the
    /// successor reads it from now on).
    pub async fn release(&self) {
        self.endpoint.close(VarInt::from_u32(0), b"drained");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
        self.socket.released.store(true, Ordering::SeqCst);
    }

    /// Accepts peers' connections and streams until the endpoint closes.
    /// Once `drain` says so, new connections are refused and every peer is
    /// told GOAWAY; streams still opened on a connection are served.
    pub async fn serve(self: Arc<Self>, inbound: Arc<Inbound>, drain: Drain) {
        while let Some(incoming) = self.endpoint.accept().await {
            if drain.phase() != Phase::Serving {
                self.metrics.reject(TRANSPORT, "draining");
                incoming.refuse();
                continue;
            }
            let inbound = inbound.clone();
            let metrics = self.metrics.clone();
            let drain = drain.clone();
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
                tokio::spawn(super::udp::serve_datagrams(inbound.clone(), conn.clone(), peer.clone()));
                let draining = drain.draining();
                tokio::pin!(draining);
                let mut told = false;
                loop {
                    let (send, recv) = tokio::select! {
                        accepted = conn.accept_bi() => match accepted {
                            Ok(streams) => streams,
                            Err(_) => break,
                        },
                        () = &mut draining, if !told => {
                            told = true;
                            tokio::spawn(say_goaway(conn.clone()));
                            continue;
                        }
                    };
                    let inbound = inbound.clone();
                    let peer = peer.clone();
                    let metrics = metrics.clone();
                    // Counted from its arrival (its header is still to be
                    // read): the drain must not end under it.
                    let flow = drain.flow();
                    tokio::spawn(async move {
                        serve_stream(&inbound, &metrics, remote, peer, send, recv).await;
                        drop(flow);
                    });
                }
            });
        }
    }
}

async fn say_goaway(conn: Connection) {
    if let Ok(mut stream) = conn.open_uni().await {
        let _ = stream.write_all(GOAWAY).await;
        let _ = stream.finish();
    }
}

/// quinn's socket, with a switch that makes the endpoint stop reading and
/// writing it: after a handoff the successor owns the datagrams, and even a
/// stateless reset from the old endpoint would be wrong. (quinn's own
/// `rebind` keeps reading the old socket until traffic shows up on the new.)
#[derive(Debug)]
struct Releasable {
    inner: Arc<dyn AsyncUdpSocket>,
    released: AtomicBool,
}

impl AsyncUdpSocket for Releasable {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> std::io::Result<()> {
        if self.released.load(Ordering::SeqCst) {
            return Ok(()); // dropped, as a lossy network would
        }
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<std::io::Result<usize>> {
        if self.released.load(Ordering::SeqCst) {
            return Poll::Pending;
        }
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
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
                http: header.http,
            },
            recv,
            send,
        )
        .await;
}
