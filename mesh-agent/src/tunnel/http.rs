//! HTTP on the agent's L7 paths (per-request splits, HTTP policy checks):
//! HTTP/1.1 and HTTP/2 with prior knowledge (h2c, which gRPC uses) from the
//! same listener, and each upstream spoken to in the version its client
//! chose, so a gRPC call stays a gRPC call end to end (trailers included).
//!
//! hyper does the protocols; this module only picks the version, keeps one
//! upstream connection usable by concurrent HTTP/2 streams, and words the
//! agent's own answers so gRPC clients read them as gRPC statuses.
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::{Request, Response, StatusCode, Version, body::Incoming, client::conn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::Mutex,
};

/// A body as the agent sends it on: the peer's as it streams, or one the
/// agent holds whole (its own short answer, a request kept for retries).
pub type Body = Either<Incoming, Full<Bytes>>;

/// Serves HTTP/1.1 or HTTP/2 (told apart by the HTTP/2 connection preface)
/// on `io` until the client closes it.
pub async fn serve<I, S>(io: I, service: S) -> Result<(), String>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<Body>, Error = std::convert::Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(io), service)
        .await
        .map_err(|e| e.to_string())
}

/// An open upstream connection in one HTTP version. Cloning shares it:
/// HTTP/2 streams run side by side, HTTP/1.1 requests take turns.
#[derive(Clone)]
pub enum Sender {
    Http1(Arc<Mutex<conn::http1::SendRequest<Body>>>),
    Http2(conn::http2::SendRequest<Body>),
}

impl Sender {
    /// Opens `version` (HTTP/2 for HTTP/2, HTTP/1.1 otherwise) on `io`; the
    /// connection runs on its own task while `on_close` is held.
    pub async fn handshake<I, G>(io: I, version: Version, on_close: G) -> Result<Sender, String>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        G: Send + 'static,
    {
        let io = TokioIo::new(io);
        if version == Version::HTTP_2 {
            let (sender, conn) = conn::http2::Builder::new(TokioExecutor::new())
                .handshake(io)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(async move {
                let _held = on_close;
                let _ = conn.await;
            });
            return Ok(Sender::Http2(sender));
        }
        let (sender, conn) = conn::http1::handshake(io).await.map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _held = on_close;
            let _ = conn.await;
        });
        Ok(Sender::Http1(Arc::new(Mutex::new(sender))))
    }

    /// Whether the version fits a request (a downstream connection keeps
    /// one version, but its upstreams are keyed by endpoint only).
    pub fn speaks(&self, version: Version) -> bool {
        matches!(self, Sender::Http2(_)) == (version == Version::HTTP_2)
    }

    pub fn is_closed(&self) -> bool {
        match self {
            // Busy means open: only an idle HTTP/1.1 connection can be asked.
            Sender::Http1(s) => s.try_lock().is_ok_and(|s| s.is_closed()),
            Sender::Http2(s) => s.is_closed(),
        }
    }

    /// Sends a request: the client's body as it streams, or one the agent
    /// kept (to send again on a retry).
    pub async fn send(&self, req: Request<Body>) -> Result<Response<Incoming>, hyper::Error> {
        match self {
            Sender::Http1(s) => {
                let mut s = s.lock().await;
                s.ready().await?;
                s.send_request(req).await
            }
            Sender::Http2(s) => {
                let mut s = s.clone();
                s.ready().await?;
                s.send_request(req).await
            }
        }
    }
}

/// Whether a request is a gRPC call (its answers must be gRPC statuses).
pub fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// The agent's own answer: plain text for HTTP clients; for a gRPC call a
/// trailers-only response whose `grpc-status` is what the HTTP status maps
/// to in gRPC's own table (403 PERMISSION_DENIED, 502/503/504 UNAVAILABLE,
/// 404 UNIMPLEMENTED), so a gRPC client reports the reason instead of a
/// protocol error.
pub fn answer(grpc: bool, status: StatusCode, message: String) -> Response<Body> {
    if grpc {
        let code = match status {
            StatusCode::FORBIDDEN => 7,
            StatusCode::TOO_MANY_REQUESTS => 8, // RESOURCE_EXHAUSTED
            StatusCode::NOT_FOUND => 12,
            StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT => 14,
            _ => 2, // UNKNOWN
        };
        return Response::builder()
            .status(StatusCode::OK)
            .header(hyper::header::CONTENT_TYPE, "application/grpc")
            .header("grpc-status", code)
            .header("grpc-message", grpc_message(message.trim_end()))
            .body(Either::Right(Full::default()))
            .expect("valid response");
    }
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, "text/plain")
        .body(Either::Right(Full::from(message)))
        .expect("valid response")
}

/// The answer to a refused request: 403 for a policy denial, 429 with
/// `Retry-After` (whole seconds, rounded up) for a rate limit.
pub fn deny(grpc: bool, denial: &crate::authz::Denial) -> Response<Body> {
    let Some(wait) = denial.retry_after else {
        return answer(
            grpc,
            StatusCode::FORBIDDEN,
            format!("denied by mesh policy: {denial}\n"),
        );
    };
    let mut resp = answer(grpc, StatusCode::TOO_MANY_REQUESTS, format!("mesh: {denial}\n"));
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    resp.headers_mut()
        .insert(hyper::header::RETRY_AFTER, secs.max(1).into());
    resp
}

/// `grpc-message` is percent-encoded: every byte outside 0x20-0x7E, and `%`.
fn grpc_message(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_answers_are_trailers_only_with_the_mapped_status() {
        let r = answer(true, StatusCode::FORBIDDEN, "denied by mesh policy: 100% no\n".into());
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "7");
        assert_eq!(r.headers()["grpc-message"], "denied by mesh policy: 100%25 no");
        assert_eq!(r.headers()["content-type"], "application/grpc");
        let r = answer(true, StatusCode::SERVICE_UNAVAILABLE, "none".into());
        assert_eq!(r.headers()["grpc-status"], "14");
        let r = answer(false, StatusCode::FORBIDDEN, "no\n".into());
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert_eq!(grpc_message("é"), "%C3%A9");
    }
}
