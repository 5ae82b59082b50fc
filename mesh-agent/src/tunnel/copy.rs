//! Copies both directions of a flow with half-close preserved: when one side
//! finishes sending, the other side's write half is shut down, and the
//! opposite direction keeps going. Bounded buffers: a slow reader slows
//! the writer (backpressure), it never grows memory past the cap.
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};

#[derive(Debug, Default, Clone, Copy)]
pub struct Copied {
    /// Bytes from `a` to `b`.
    pub a_to_b: u64,
    /// Bytes from `b` to `a`.
    pub b_to_a: u64,
}

pub async fn bidirectional<AR, AW, BR, BW>(
    a_read: &mut AR,
    a_write: &mut AW,
    b_read: &mut BR,
    b_write: &mut BW,
) -> (Copied, Option<std::io::Error>)
where
    AR: AsyncRead + Unpin,
    AW: AsyncWrite + Unpin,
    BR: AsyncRead + Unpin,
    BW: AsyncWrite + Unpin,
{
    let forward = async {
        let r = copy_buf(a_read, b_write).await;
        let _ = b_write.shutdown().await;
        r
    };
    let backward = async {
        let r = copy_buf(b_read, a_write).await;
        let _ = a_write.shutdown().await;
        r
    };
    let (f, b) = tokio::join!(forward, backward);
    crate::memory::flow_ended();
    let copied = Copied {
        a_to_b: *f.as_ref().unwrap_or(&0),
        b_to_a: *b.as_ref().unwrap_or(&0),
    };
    (copied, f.err().or(b.err()))
}

/// Per-direction buffer: an idle flow holds only `BUF_START`; a read that
/// fills the buffer means more is waiting, so it grows (x4: 256 B, 1, 4,
/// 16 KiB), costing a flow a few extra reads once. Measured with `cargo
/// xtask bench`: 10,000 idle tunneled connections cost the client-side
/// agent 167 MiB with fixed 16 KiB buffers, 83 MiB with these and boxed
/// connect futures (outbound.rs). The cap bounds what a slow reader can
/// make the agent hold, with the tunnel stream's window.
const BUF_START: usize = 256;
const BUF_MAX: usize = 16 * 1024;

async fn copy_buf(r: &mut (impl AsyncRead + Unpin), w: &mut (impl AsyncWrite + Unpin)) -> std::io::Result<u64> {
    use tokio::io::AsyncReadExt as _;
    let mut total = 0u64;
    let mut buf = vec![0u8; BUF_START];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            w.flush().await?;
            return Ok(total);
        }
        w.write_all(&buf[..n]).await?;
        total += n as u64;
        if n == buf.len() && buf.len() < BUF_MAX {
            buf.resize((buf.len() * 4).min(BUF_MAX), 0);
        }
    }
}
