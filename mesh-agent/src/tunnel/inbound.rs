//! The destination side of a tunnel, shared by both transports: the peer's
//! SPIFFE ID (from its verified client certificate) and the requested
//! destination go to the policy hook; allowed flows are connected to the
//! local pod and copied both ways.
use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

use super::{TunnelMetrics, copy};
use crate::{
    identity::SpiffeId,
    state::{Pod, SnapshotRx},
};

/// The policy hook on the inbound path. Until SMI policy lands, `AllowAll`.
pub trait Authorizer: Send + Sync {
    fn authorize(&self, source: &SpiffeId, destination: &Pod, port: u16) -> Result<(), String>;
}

pub struct AllowAll;

impl Authorizer for AllowAll {
    fn authorize(&self, _: &SpiffeId, _: &Pod, _: u16) -> Result<(), String> {
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("{0} is not a meshed workload on this node")]
    NotLocal(SocketAddr),
    #[error("policy denied {from} -> {destination}: {reason}")]
    Denied {
        from: SpiffeId,
        destination: SocketAddr,
        reason: String,
    },
}

pub struct Inbound {
    pub node: String,
    pub trust_domain: String,
    pub snapshots: SnapshotRx,
    pub authorizer: Arc<dyn Authorizer>,
    pub metrics: TunnelMetrics,
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl Inbound {
    /// Whether `peer` may reach `dst`. Only pods of this node are reachable:
    /// the tunnel is never an open relay.
    #[allow(clippy::result_large_err)] // once per flow; boxing buys nothing
    pub fn check(&self, peer: &SpiffeId, dst: SocketAddr) -> Result<Pod, Refusal> {
        let SocketAddr::V4(v4) = dst else {
            return Err(Refusal::NotLocal(dst));
        };
        let snap = self.snapshots.borrow().clone();
        let pod = snap
            .pod_by_ip(*v4.ip())
            .filter(|p| p.node == self.node)
            .cloned()
            .ok_or(Refusal::NotLocal(dst))?;
        self.authorizer
            .authorize(peer, &pod, dst.port())
            .map_err(|reason| Refusal::Denied {
                from: peer.clone(),
                destination: dst,
                reason,
            })?;
        Ok(pod)
    }

    /// Connects an allowed flow to its pod and copies until both sides end.
    pub async fn serve_flow<R, W>(
        &self,
        transport: &'static str,
        peer: &SpiffeId,
        dst: SocketAddr,
        flow_id: u64,
        mut r: R,
        mut w: W,
    ) where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let started = Instant::now();
        let upstream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(dst)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::warn!(transport, flow_id, peer = %peer, destination = %dst, error = %e, "inbound: connect to the pod failed");
                self.metrics.flow(transport, "inbound", "connect_failed");
                return;
            }
            Err(_) => {
                tracing::warn!(transport, flow_id, peer = %peer, destination = %dst, "inbound: connect to the pod timed out");
                self.metrics.flow(transport, "inbound", "connect_failed");
                return;
            }
        };
        let _ = upstream.set_nodelay(true);
        let (mut ur, mut uw) = upstream.into_split();
        let (copied, err) = copy::bidirectional(&mut r, &mut w, &mut ur, &mut uw).await;
        if err.is_some() {
            // Tell the pod the flow broke (RST), rather than a clean end.
            if let Ok(s) = ur.reunite(uw) {
                super::outbound::reset(s);
            }
        }
        self.metrics.bytes(transport, "inbound", copied.a_to_b, copied.b_to_a);
        self.metrics
            .flow(transport, "inbound", if err.is_some() { "error" } else { "ok" });
        tracing::info!(
            transport, flow_id, peer = %peer, destination = %dst,
            bytes_in = copied.a_to_b, bytes_out = copied.b_to_a,
            duration_ms = started.elapsed().as_millis() as u64,
            error = err.map(|e| e.to_string()),
            "inbound flow closed"
        );
    }
}
