//! The outbound capture listener (15001).
//!
//! `mesh_connect4` rewrote the pod's connect() to this listener and recorded
//! the original destination; here we take that record by the accepted
//! socket's addresses, connect to the destination, and copy both ways with
//! half-close preserved. The agent's own sockets are never captured: capture
//! is attached to the pods' cgroup subtree, and the agent is not in it.
use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{
    io::AsyncWriteExt as _,
    net::{TcpListener, TcpStream},
};
use tracing::Instrument as _;

use crate::{redirect::Redirect, state::SnapshotRx};

#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error(
        "cannot listen on {addr}: {err} (is another agent running on this node, or --capture-ip not an address of this node?)"
    )]
    Bind { addr: SocketAddr, err: std::io::Error },
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn bind(ip: Ipv4Addr, port: u16) -> Result<TcpListener, OutboundError> {
    let addr = SocketAddr::from((ip, port));
    TcpListener::bind(addr)
        .await
        .map_err(|err| OutboundError::Bind { addr, err })
}

pub async fn serve(listener: TcpListener, redirect: Arc<Redirect>, snapshots: SnapshotRx) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "outbound accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let redirect = redirect.clone();
        let snapshots = snapshots.clone();
        tokio::spawn(async move {
            let Ok(local) = stream.local_addr() else { return };
            let (SocketAddr::V4(peer), SocketAddr::V4(local)) = (peer, local) else {
                return;
            };
            let Some(orig) = redirect.take_flow(peer, local) else {
                tracing::warn!(client = %peer, "no capture record for this connection (it did not come through mesh_connect4); closing");
                return;
            };
            let dst = SocketAddrV4::new(Ipv4Addr::from(orig.ipv4.to_ne_bytes()), orig.port);
            let snap = snapshots.borrow().clone();
            let ids = snap.workload_ids();
            let source = ids
                .iter()
                .find(|(_, id)| **id == orig.workload_id)
                .map(|(name, _)| name.clone())
                .unwrap_or_else(|| format!("unknown(id={})", orig.workload_id));
            let destination = snap.pod_by_ip(*dst.ip()).map(|p| p.workload_name()).unwrap_or_default();
            let span = tracing::info_span!("outbound", source_workload = %source, client = %peer, original_dst = %dst, destination_workload = %destination);
            proxy(stream, dst).instrument(span).await;
        });
    }
}

async fn proxy(mut downstream: TcpStream, dst: SocketAddrV4) {
    let started = Instant::now();
    let mut upstream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(dst)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "connect to original destination failed");
            return;
        }
        Err(_) => {
            tracing::warn!(
                timeout_ms = CONNECT_TIMEOUT.as_millis() as u64,
                "connect to original destination timed out"
            );
            return;
        }
    };
    let _ = downstream.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (mut down_r, mut down_w) = downstream.split();
    let (mut up_r, mut up_w) = upstream.split();
    // Each direction shuts down its write side when its read side hits EOF,
    // so a half-close travels end to end.
    let to_upstream = async {
        let n = tokio::io::copy(&mut down_r, &mut up_w).await;
        let _ = up_w.shutdown().await;
        n
    };
    let to_downstream = async {
        let n = tokio::io::copy(&mut up_r, &mut down_w).await;
        let _ = down_w.shutdown().await;
        n
    };
    let (sent, received) = tokio::join!(to_upstream, to_downstream);
    let duration_ms = started.elapsed().as_millis() as u64;
    match (sent, received) {
        (Ok(sent), Ok(received)) => {
            tracing::info!(
                bytes_sent = sent,
                bytes_received = received,
                duration_ms,
                "connection closed"
            )
        }
        (sent, received) => tracing::info!(
            upstream = ?sent.map_err(|e| e.to_string()),
            downstream = ?received.map_err(|e| e.to_string()),
            duration_ms,
            "connection ended with an error"
        ),
    }
}
