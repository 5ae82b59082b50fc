//! The outbound capture listener (15001).
//!
//! `the connect hooks` rewrote the pod's connect() to this listener and recorded
//! the original destination; here we take that record by the accepted
//! socket's addresses and carry the flow to the destination node's agent
//! through a tunnel that authenticates the source workload (its client
//! certificate) and the destination workload (the certificate the peer must
//! present). The agent's own sockets are never captured: capture is attached
//! to the pods' cgroup subtree, and the agent is not in it.
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{
    io::AsyncRead,
    net::{TcpListener, TcpStream},
};
use tracing::Instrument as _;

use crate::metrics::ConnectionLabels;

use super::{
    PeerKey, Transport, TunnelError, TunnelMetrics, copy,
    hbone::Hbone,
    header::{FlowHeader, Protocol},
    quic::Quic,
};
use crate::{drain::Drain, identity::SpiffeId, redirect::Redirect, services::HttpSplits, state::SnapshotRx};

#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error(
        "cannot listen on {addr}: {err} (is another agent running on this node, or --capture-ip not an address of this node?)"
    )]
    Bind { addr: SocketAddr, err: std::io::Error },
}

const NO_TUNNEL: &str = "no tunnel: this agent has no workload certificates (configure --ca-addr or --local-ca-dir)";

pub async fn bind(ip: IpAddr, port: u16) -> Result<TcpListener, OutboundError> {
    let addr = SocketAddr::from((ip, port));
    let err = |err| OutboundError::Bind { addr, err };
    // A deep accept queue: a burst of pods connecting at once must neither
    // overflow it nor push the kernel into SYN cookies (tokio's default
    // backlog is 1,024; the kernel caps this at net.core.somaxconn).
    let socket = if ip.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    socket.listen(8192).map_err(err)
}

/// The tunnel side of outbound flows; absent when the agent has no source
/// of workload certificates, in which case cross-node flows are refused.
pub struct Tunnels {
    pub transport: Transport,
    pub quic: Arc<Quic>,
    pub hbone: Arc<Hbone>,
    pub trust_domain: String,
    pub port: u16,
    pub metrics: TunnelMetrics,
    /// Same-node flows the kernel sends here (HTTP rules apply) are
    /// served as if they had arrived through a tunnel.
    pub inbound: Arc<super::inbound::Inbound>,
    /// Request spans of the L7 path, when exported.
    pub traces: crate::traces::TracesHandle,
}

pub struct Outbound {
    pub redirect: Arc<Redirect>,
    pub snapshots: SnapshotRx,
    /// HTTP-matched TrafficSplits: their VIPs' connects come here.
    pub http_splits: tokio::sync::watch::Receiver<Arc<HttpSplits>>,
    pub tunnels: Option<Arc<Tunnels>>,
    pub drain: Drain,
}

/// Accepts captured connections until the agent drains (the listener then
/// belongs to the successor, or closes).
pub async fn serve(listener: TcpListener, outbound: Arc<Outbound>) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = outbound.drain.draining() => return,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "outbound accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let outbound = outbound.clone();
        tokio::spawn(async move { outbound.handle(stream, peer).await });
    }
}

/// Where a captured flow goes, resolved from the capture record.
pub(super) struct Route {
    source_name: String,
    pub(super) source: Option<SpiffeId>,
    destination_name: String,
    pub(super) destination: Option<SpiffeId>,
    pub(super) node_ip: Option<Ipv4Addr>,
    dst: SocketAddr,
    pub(super) same_node: bool,
    labels: ConnectionLabels,
}

impl Outbound {
    async fn handle(self: &Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let Ok(local) = stream.local_addr() else { return };
        let Some(orig) = self.redirect.take_flow(peer, local) else {
            tracing::warn!(client = %peer, "no capture record for this connection (it did not come through the connect hooks); closing");
            return;
        };
        let flow_id: u64 = rand::random();
        let vip = SocketAddr::new(IpAddr::from(orig.addr), orig.port);
        let split = self.http_splits.borrow().get(&vip).cloned();
        if let Some(split) = split {
            let Some(tunnels) = &self.tunnels else {
                refuse(stream, NO_TUNNEL);
                return;
            };
            let span = tracing::info_span!("split", client = %peer, service = %split.service,
                traffic_split = %split.source, flow_id);
            Box::pin(super::split::serve(
                self.clone(),
                tunnels.clone(),
                stream,
                orig.workload_id,
                split,
                flow_id,
            ))
            .instrument(span)
            .await;
            return;
        }
        let route = self.route(orig);
        let transport = self.tunnels.as_ref().map_or("none", |t| match t.transport {
            Transport::Quic => "quic",
            Transport::Tcp => "tcp",
        });
        let span = tracing::info_span!("outbound", source_workload = %route.source_name, client = %peer,
            original_dst = %route.dst, destination_workload = %route.destination_name, flow_id, transport);
        self.proxy(stream, route, flow_id).instrument(span).await;
    }

    pub(super) fn route(&self, orig: mesh_common::OrigDst) -> Route {
        let snap = self.snapshots.borrow().clone();
        let dst = SocketAddr::new(IpAddr::from(orig.addr), orig.port);
        let td = self
            .tunnels
            .as_ref()
            .map(|t| t.trust_domain.clone())
            .unwrap_or_default();
        let src_pod = snap.pod_by_workload_id(orig.workload_id);
        let dst_pod = snap.pod_by_ip(dst.ip());
        let same_node = match (dst_pod, &self.tunnels) {
            (Some(p), Some(t)) => p.node == t.inbound.node,
            _ => false,
        };
        Route {
            labels: ConnectionLabels::new(src_pod, dst_pod, if same_node { "local" } else { "tunnel" }),
            source_name: src_pod
                .map(|p| p.workload_name())
                .unwrap_or_else(|| format!("unknown(id={})", orig.workload_id)),
            source: src_pod.and_then(|p| SpiffeId::of(&td, &p.identity()).ok()),
            destination_name: dst_pod.map(|p| p.workload_name()).unwrap_or_default(),
            destination: dst_pod.and_then(|p| SpiffeId::of(&td, &p.identity()).ok()),
            node_ip: dst_pod.and_then(|p| snap.nodes.get(&p.node).copied()),
            same_node,
            dst,
        }
    }

    async fn proxy(&self, downstream: TcpStream, route: Route, flow_id: u64) {
        let started = Instant::now();
        let _flow = self.drain.flow();
        let _ = downstream.set_nodelay(true);
        let Some(tunnels) = &self.tunnels else {
            refuse(downstream, NO_TUNNEL);
            return;
        };
        let (Some(source), Some(destination), Some(node_ip)) = (route.source, route.destination, route.node_ip) else {
            refuse(
                downstream,
                "cannot route: source or destination workload, or the destination node's InternalIP, is unknown to the source",
            );
            tunnels.metrics.flow(transport_name(tunnels), "outbound", "unroutable");
            return;
        };
        let labels = route.labels.clone();
        tunnels.metrics.connections.opened.get_or_create(&labels).inc();
        let _closed = Closed {
            metrics: &tunnels.metrics,
            labels: labels.clone(),
        };
        if route.same_node {
            // The kernel routes a same-node flow here only when HTTP rules
            // apply to it: check it as the destination would.
            let dst = route.dst;
            match tunnels.inbound.check(&source, dst) {
                Ok(admission) => {
                    let (r, w) = downstream.into_split();
                    Box::pin(tunnels.inbound.serve_flow(
                        super::inbound::Flow {
                            transport: "local",
                            peer: &source,
                            dst,
                            flow_id,
                            admission,
                            http: false,
                        },
                        r,
                        w,
                    ))
                    .await;
                }
                Err(refusal) => refuse(downstream, &refusal.to_string()),
            }
            return;
        }
        let key = PeerKey {
            source,
            destination,
            node_addr: SocketAddr::from((node_ip, tunnels.port)),
        };
        let (mut down_r, mut down_w) = downstream.into_split();
        let result = match Box::pin(open_tunnel(tunnels, &key, route.dst, flow_id, false)).await {
            Ok(mut t) => {
                let copied =
                    copy::bidirectional(&mut down_r, &mut down_w, &mut t.read, &mut t.write, self.drain.ending()).await;
                if copied.1.is_some() {
                    // The far agent resets the server's socket in turn.
                    t.write.abort();
                }
                Ok(copied)
            }
            Err(e) => Err(e),
        };
        let downstream = down_r.reunite(down_w).ok();
        let duration_ms = started.elapsed().as_millis() as u64;
        let transport = transport_name(tunnels);
        if let Ok((copied, _)) = &result {
            let c = &tunnels.metrics.connections;
            c.sent_bytes.get_or_create(&labels).inc_by(copied.a_to_b);
            c.received_bytes.get_or_create(&labels).inc_by(copied.b_to_a);
        }
        match result {
            Ok((copied, None)) => {
                tunnels
                    .metrics
                    .bytes(transport, "outbound", copied.a_to_b, copied.b_to_a);
                tunnels.metrics.flow(transport, "outbound", "ok");
                tracing::info!(
                    bytes_sent = copied.a_to_b,
                    bytes_received = copied.b_to_a,
                    duration_ms,
                    ended_by_drain = copied.ended_by_drain,
                    "connection closed"
                );
            }
            Ok((copied, Some(e))) => {
                tunnels
                    .metrics
                    .bytes(transport, "outbound", copied.a_to_b, copied.b_to_a);
                tunnels.metrics.flow(transport, "outbound", "error");
                tracing::warn!(error = %e, bytes_sent = copied.a_to_b, bytes_received = copied.b_to_a, duration_ms, "connection broken in the tunnel; resetting the client");
                if let Some(d) = downstream {
                    reset(d);
                }
            }
            Err(e) => {
                tunnels.metrics.flow(transport, "outbound", "tunnel_failed");
                tracing::warn!(error = %e, duration_ms, "tunnel failed; resetting the client");
                if let Some(d) = downstream {
                    reset(d);
                }
            }
        }
    }
}

/// A tunnel stream of either transport, as one type: a single copy loop
/// (one future per idle flow) serves both.
pub(super) struct TunnelStream {
    pub(super) read: Box<dyn AsyncRead + Send + Unpin>,
    pub(super) write: Box<dyn copy::StreamWrite>,
    /// The pooled connection's lease, held while the flow lives.
    pub(super) lease: Box<dyn Send>,
}

pub(super) async fn open_tunnel(
    tunnels: &Tunnels,
    key: &PeerKey,
    dst: SocketAddr,
    flow_id: u64,
    http: bool,
) -> Result<TunnelStream, TunnelError> {
    if tunnels.transport == Transport::Quic {
        let header = FlowHeader {
            destination: dst.to_string(),
            protocol: Protocol::Tcp as i32,
            flow_id,
            http,
        };
        match tunnels.quic.open(key, &header).await {
            Ok((send, recv, lease)) => {
                return Ok(TunnelStream {
                    read: Box::new(recv),
                    write: Box::new(send),
                    lease: Box::new(lease),
                });
            }
            // The peer's agent is being replaced; its successor already
            // serves the TCP transport.
            Err(TunnelError::Draining { .. }) => {
                tracing::debug!(peer = %key.node_addr, "peer draining: this flow takes the TCP transport");
            }
            Err(e) => return Err(e),
        }
    }
    let (io, lease) = tunnels.hbone.open(key, dst, flow_id, http).await?;
    let (read, write) = tokio::io::split(io);
    Ok(TunnelStream {
        read: Box::new(read),
        write: Box::new(write),
        lease: Box::new(lease),
    })
}

/// Counts a connection as closed however `proxy` returns.
struct Closed<'a> {
    metrics: &'a TunnelMetrics,
    labels: ConnectionLabels,
}

impl Drop for Closed<'_> {
    fn drop(&mut self) {
        self.metrics.connections.closed.get_or_create(&self.labels).inc();
    }
}

fn transport_name(t: &Tunnels) -> &'static str {
    match t.transport {
        Transport::Quic => "quic",
        Transport::Tcp => "tcp",
    }
}

/// Refuses a flow: logged, and the client gets a reset rather than a hang.
fn refuse(stream: TcpStream, why: &str) {
    tracing::warn!(reason = why, "flow refused");
    reset(stream);
}

/// Closes with RST (SO_LINGER 0): the application sees a reset, not a clean end.
pub fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

#[cfg(test)]
mod tests {
    fn future_size<A, B, C, F: std::future::Future>(_: impl FnOnce(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every open flow keeps its task's future allocated for its whole life,
    /// so its size is memory per idle connection: connect-time futures
    /// (handshakes, h2) are boxed and freed once the flow is copying.
    /// Measured (debug build): 7,944 bytes before boxing, 2,592 after;
    /// 2,984 with the drain (an ending cleanup is boxed, on demand).
    #[test]
    fn an_idle_flow_holds_a_small_future() {
        let size = future_size(super::Outbound::handle);
        assert!(size < 4096, "Outbound::handle's future is {size} bytes");
    }
}
