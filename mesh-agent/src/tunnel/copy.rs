//! Copies both directions of a flow with half-close preserved: when one side
//! finishes sending, the other side's write half is shut down, and the
//! opposite direction keeps going. Bounded buffers: a slow reader slows
//! the writer (backpressure), it never grows memory past the cap.
//!
//! A failure looks like a failure: when either direction breaks (a reset,
//! a lost tunnel), nothing is shut down cleanly; the copy stops and returns
//! the error, and the caller resets the socket and aborts the tunnel stream
//! ([`StreamWrite::abort`]), so each end sees a reset, never a FIN.
use std::{
    future::Future,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

#[derive(Debug, Default, Clone, Copy)]
pub struct Copied {
    /// Bytes from `a` to `b`.
    pub a_to_b: u64,
    /// Bytes from `b` to `a`.
    pub b_to_a: u64,
    /// `ending` fired: the flow was ended (cleanly) by a draining agent.
    pub ended_by_drain: bool,
}

/// How long an ended flow's readers are drained so that closing the sockets
/// does not reset them (unread data turns a close into RST).
const ENDING_LINGER: Duration = Duration::from_secs(1);

/// Copies until both directions end, or until `ending` resolves: then both
/// write halves are shut down (FIN), what still arrives is read and dropped
/// until each side closes (up to a second), and the flow ends cleanly.
pub async fn bidirectional<AR, AW, BR, BW>(
    a_read: &mut AR,
    a_write: &mut AW,
    b_read: &mut BR,
    b_write: &mut BW,
    ending: impl Future<Output = ()>,
) -> (Copied, Option<std::io::Error>)
where
    AR: AsyncRead + Unpin,
    AW: AsyncWrite + Unpin,
    BR: AsyncRead + Unpin,
    BW: AsyncWrite + Unpin,
{
    let (a_to_b, b_to_a) = (AtomicU64::new(0), AtomicU64::new(0));
    let both = async {
        // Only a clean end of one direction is passed on as a half-close.
        let forward = async {
            copy_buf(a_read, b_write, &a_to_b).await?;
            let _ = b_write.shutdown().await;
            Ok::<(), std::io::Error>(())
        };
        let backward = async {
            copy_buf(b_read, a_write, &b_to_a).await?;
            let _ = a_write.shutdown().await;
            Ok::<(), std::io::Error>(())
        };
        tokio::try_join!(forward, backward)
    };
    let outcome = tokio::select! {
        r = both => Some(r.err()),
        () = ending => None,
    };
    let ended_by_drain = outcome.is_none();
    let err = match outcome {
        Some(err) => err,
        None => {
            // Boxed: only ended flows pay for this future's space.
            Box::pin(end_cleanly(a_read, a_write, b_read, b_write)).await;
            None
        }
    };
    crate::memory::flow_ended();
    let copied = Copied {
        a_to_b: a_to_b.into_inner(),
        b_to_a: b_to_a.into_inner(),
        ended_by_drain,
    };
    (copied, err)
}

/// The write half of a flow's tunnel end (or of a local socket), which can
/// also end the stream as broken.
pub trait StreamWrite: AsyncWrite + Send + Unpin {
    /// Ends the stream as broken: the far end reads an error, not an EOF.
    fn abort(&mut self);
}

/// QUIC: a dropped stream is finished (a clean end), so a broken one is
/// reset explicitly.
impl StreamWrite for quinn::SendStream {
    fn abort(&mut self) {
        let _ = self.reset(quinn::VarInt::from_u32(RESET_BROKEN));
    }
}

/// HTTP/2 CONNECT (hyper upgraded): a stream dropped without END_STREAM is
/// reset (RST_STREAM CANCEL) by h2, so not shutting it down is the abort.
impl<T: AsyncRead + AsyncWrite + Send> StreamWrite for tokio::io::WriteHalf<T> {
    fn abort(&mut self) {}
}

/// A local socket: the caller resets it (SO_LINGER 0) with its read half.
impl StreamWrite for tokio::net::tcp::OwnedWriteHalf {
    fn abort(&mut self) {}
}

impl StreamWrite for Box<dyn StreamWrite> {
    fn abort(&mut self) {
        (**self).abort();
    }
}

/// The QUIC stream error code of a flow that broke on the other side.
pub const RESET_BROKEN: u32 = 3;

async fn end_cleanly(
    a_read: &mut (impl AsyncRead + Unpin),
    a_write: &mut (impl AsyncWrite + Unpin),
    b_read: &mut (impl AsyncRead + Unpin),
    b_write: &mut (impl AsyncWrite + Unpin),
) {
    let _ = tokio::join!(a_write.shutdown(), b_write.shutdown());
    let _ = tokio::time::timeout(ENDING_LINGER, async { tokio::join!(discard(a_read), discard(b_read)) }).await;
}

async fn discard(r: &mut (impl AsyncRead + Unpin)) {
    let mut buf = [0u8; 1024];
    while matches!(r.read(&mut buf).await, Ok(n) if n > 0) {}
}

/// Per-direction buffer: an idle flow holds only `BUF_START`; a read that
/// fills the buffer means more is waiting, so it grows (x4: 256 B, 1, 4,
/// 16, 64 KiB), costing a flow a few extra reads once. Measured with `cargo
/// xtask bench`: 10,000 idle tunneled connections cost the client-side
/// agent 167 MiB with fixed 16 KiB buffers, 83 MiB with these and boxed
/// connect futures (outbound.rs); a 64 KiB cap instead of 16 KiB took a
/// bulk flow a quarter of the reads and writes (mTLS/TCP throughput 0.39x
/// -> 0.42x of no mesh). The cap bounds what a slow reader can make the
/// agent hold, with the tunnel stream's window.
const BUF_START: usize = 256;
const BUF_MAX: usize = 64 * 1024;

async fn copy_buf(
    r: &mut (impl AsyncRead + Unpin),
    w: &mut (impl AsyncWrite + Unpin),
    total: &AtomicU64,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; BUF_START];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            w.flush().await?;
            return Ok(());
        }
        w.write_all(&buf[..n]).await?;
        total.fetch_add(n as u64, Ordering::Relaxed);
        if n == buf.len() && buf.len() < BUF_MAX {
            buf.resize((buf.len() * 4).min(BUF_MAX), 0);
        }
    }
}
