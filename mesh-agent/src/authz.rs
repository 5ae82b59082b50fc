//! The authorization seam between whoever decides (the `policy` module) and
//! whoever carries traffic (the `tunnel` module): the questions the datapath
//! asks, the answers it gets, and a typed denial. Neither side imports the
//! other; both import this (ARCHITECTURE.md, "Layers").
use std::net::SocketAddr;

use std::sync::Arc;

use crate::{identity::SpiffeId, state::Pod};

/// The transport protocol a flow or rule is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// How audit records and messages name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// What the policy looks at in an HTTP request.
#[derive(Clone, Copy, Debug)]
pub struct HttpRequest<'a> {
    pub method: &'a str,
    /// The URI path, matched by `pathRegex` anchored at `^`.
    pub path: &'a str,
    /// The URI query, without `?` (empty when there is none).
    pub query: &'a str,
    pub headers: &'a [(String, String)],
}

/// Why a flow or request was refused: what the operator reads in the audit
/// trail and in the 403 body.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Denial {
    /// The rule that decided (`default-deny`, ...).
    pub rule: String,
    pub reason: String,
    /// Set when a rate limit refused it: answered 429 with `Retry-After`
    /// (the wait until a token is there) instead of 403.
    pub retry_after: Option<std::time::Duration>,
}

/// How an allowed flow is carried: bytes as they are, or HTTP/1.1 requests
/// each checked before they reach the pod.
pub enum Admission {
    Open,
    Http(Arc<dyn HttpCheck>),
}

/// The destination side's decision for one flow (TCP) or session (UDP).
pub trait Authorizer: Send + Sync {
    /// `address` is the pod's address (either family) and port the flow is for.
    fn authorize(
        &self,
        source: &SpiffeId,
        destination: &Pod,
        address: SocketAddr,
        proto: Proto,
    ) -> Result<Admission, Denial>;
}

/// The decision for each HTTP request of a flow an [`Authorizer`] admitted.
pub trait HttpCheck: Send + Sync {
    fn check(&self, request: &HttpRequest<'_>) -> Result<(), Denial>;
}

/// Allows everything (tools and tests that play a peer).
pub struct AllowAll;

impl Authorizer for AllowAll {
    fn authorize(&self, _: &SpiffeId, _: &Pod, _: SocketAddr, _: Proto) -> Result<Admission, Denial> {
        Ok(Admission::Open)
    }
}
