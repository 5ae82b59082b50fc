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
pub use crate::authz::{Admission, AllowAll};
use crate::{
    authz::{Authorizer, Denial, HttpCheck, HttpRequest, Proto},
    drain::Drain,
    identity::SpiffeId,
    state::SnapshotRx,
};

#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("{0} is not a meshed workload on this node")]
    NotLocal(SocketAddr),
    #[error("policy denied {from} -> {destination}: {denial}")]
    Denied {
        from: SpiffeId,
        destination: SocketAddr,
        denial: Denial,
    },
}

/// One admitted flow, as a transport hands it over.
pub struct Flow<'a> {
    pub transport: &'static str,
    /// The verified source identity (client certificate, or the cgroup for
    /// same-node flows the kernel sent to the agent).
    pub peer: &'a SpiffeId,
    pub dst: SocketAddr,
    pub flow_id: u64,
    pub admission: Admission,
    /// The source agent serves it as HTTP (`FlowHeader.http`).
    pub http: bool,
}

pub struct Inbound {
    pub node: String,
    pub trust_domain: String,
    pub snapshots: SnapshotRx,
    pub authorizer: Arc<dyn Authorizer>,
    pub metrics: TunnelMetrics,
    /// Flows count towards the drain and end cleanly when it ends.
    pub drain: Drain,
    /// Where the agent vouches for the flows it opens to pods (inbound admission).
    pub voucher: Arc<dyn super::deliver::Voucher>,
    /// Server spans for the HTTP flows it serves, when exported.
    pub traces: crate::traces::TracesHandle,
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl Inbound {
    /// Whether `peer` may reach `dst`. Only pods of this node are reachable:
    /// the tunnel is never an open relay.
    #[allow(clippy::result_large_err)] // once per flow; boxing buys nothing
    pub fn check(&self, peer: &SpiffeId, dst: SocketAddr) -> Result<Admission, Refusal> {
        self.check_proto(peer, dst, Proto::Tcp)
    }

    /// The same for UDP datagrams (once per client and endpoint).
    #[allow(clippy::result_large_err)]
    pub fn check_udp(&self, peer: &SpiffeId, dst: SocketAddr) -> Result<Admission, Refusal> {
        self.check_proto(peer, dst, Proto::Udp)
    }

    #[allow(clippy::result_large_err)]
    fn check_proto(&self, peer: &SpiffeId, dst: SocketAddr, proto: Proto) -> Result<Admission, Refusal> {
        let snap = self.snapshots.borrow().clone();
        let pod = snap
            .pod_by_ip(dst.ip())
            .filter(|p| p.node == self.node)
            .cloned()
            .ok_or(Refusal::NotLocal(dst))?;
        self.authorizer
            .authorize(peer, &pod, dst, proto)
            .map_err(|denial| Refusal::Denied {
                from: peer.clone(),
                destination: dst,
                denial,
            })
    }

    /// Connects an allowed flow to its pod and copies until both sides end.
    pub async fn serve_flow<R, W>(&self, flow: Flow<'_>, mut r: R, mut w: W)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: copy::StreamWrite + Send + 'static,
    {
        let Flow {
            transport,
            peer,
            dst,
            flow_id,
            admission,
            http,
        } = flow;
        let started = Instant::now();
        let _flow = self.drain.flow();
        let upstream = match tokio::time::timeout(CONNECT_TIMEOUT, super::deliver::connect_tcp(&self.voucher, dst))
            .await
        {
            Ok(Ok(s)) => s,
            // The client already holds a connection (to its agent): a
            // refused or unreachable pod reaches it as a reset.
            Ok(Err(e)) => {
                tracing::warn!(transport, flow_id, peer = %peer, destination = %dst, error = %e, "inbound: connect to the pod failed");
                self.metrics.flow(transport, "inbound", "connect_failed");
                w.abort();
                return;
            }
            Err(_) => {
                tracing::warn!(transport, flow_id, peer = %peer, destination = %dst, "inbound: connect to the pod timed out");
                self.metrics.flow(transport, "inbound", "connect_failed");
                w.abort();
                return;
            }
        };
        let _ = upstream.set_nodelay(true);
        // Requests are read when HTTP rules apply, or for their spans.
        let check = match admission {
            Admission::Http(check) => Some(check),
            Admission::Open => None,
        };
        if check.is_some() || (http && self.traces.is_some()) {
            let spans = self.traces.clone().map(|t| (t, peer.to_string(), dst));
            let result = tokio::select! {
                result = serve_http(r, w, upstream, check, spans) => result,
                // Dropping hyper's connections closes both sockets (FIN).
                () = self.drain.ending() => Ok(()),
            };
            self.metrics
                .flow(transport, "inbound", if result.is_err() { "error" } else { "ok" });
            tracing::info!(transport, flow_id, peer = %peer, destination = %dst, http = true,
                duration_ms = started.elapsed().as_millis() as u64, error = result.err(), "inbound flow closed");
            return;
        }
        let (mut ur, mut uw) = upstream.into_split();
        let (copied, err) = copy::bidirectional(&mut r, &mut w, &mut ur, &mut uw, self.drain.ending()).await;
        if err.is_some() {
            // Tell both ends the flow broke (RST), rather than a clean end.
            w.abort();
            if let Ok(s) = ur.reunite(uw) {
                super::outbound::reset(s);
            }
        }
        self.metrics.bytes(transport, "inbound", copied.a_to_b, copied.b_to_a);
        self.metrics
            .flow(transport, "inbound", if err.is_some() { "error" } else { "ok" });
        tracing::info!(
            transport, flow_id, peer = %peer, destination = %dst,
            bytes_in = copied.a_to_b, bytes_out = copied.b_to_a, ended_by_drain = copied.ended_by_drain,
            duration_ms = started.elapsed().as_millis() as u64,
            error = err.map(|e| e.to_string()),
            "inbound flow closed"
        );
    }
}

/// Carries HTTP/1.1 or HTTP/2 between the tunnel and the pod, checking
/// every request: a denied one gets a 403 (a gRPC call PERMISSION_DENIED)
/// with a short reason and never reaches the pod; allowed ones pass
/// untouched, to the pod in the version the client spoke (hyper on both
/// sides; the pod connection is opened in that version on the first request).
async fn serve_http<R, W>(
    r: R,
    w: W,
    upstream: TcpStream,
    check: Option<Arc<dyn HttpCheck>>,
    spans: Option<(Arc<crate::traces::Traces>, String, SocketAddr)>,
) -> Result<(), String>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    use hyper::{Request, StatusCode, body::Incoming};

    use super::http::{Body, Sender, answer, is_grpc};

    let pod = Arc::new(tokio::sync::Mutex::new(Some(upstream)));
    let sender: Arc<tokio::sync::OnceCell<Sender>> = Arc::default();
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let (check, pod, sender, spans) = (check.clone(), pod.clone(), sender.clone(), spans.clone());
        async move {
            let grpc = is_grpc(&req);
            // The server span: the child of the client agent's span, and
            // the parent of whatever the pod does with the request.
            let span = spans.as_ref().map(|(traces, peer, dst)| {
                let name = req.method().as_str().to_string();
                let attributes = vec![
                    opentelemetry::KeyValue::new("http.request.method", name.clone()),
                    opentelemetry::KeyValue::new("url.path", req.uri().path().to_string()),
                    opentelemetry::KeyValue::new("mesh.source", peer.clone()),
                    opentelemetry::KeyValue::new("mesh.endpoint", dst.to_string()),
                ];
                traces.request_span(
                    req.headers_mut(),
                    opentelemetry::trace::SpanKind::Server,
                    name,
                    attributes,
                )
            });
            let headers: Vec<(String, String)> = req
                .headers()
                .iter()
                .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
                .collect();
            let verdict = check.as_ref().map_or(Ok(()), |c| {
                c.check(&HttpRequest {
                    method: req.method().as_str(),
                    path: req.uri().path(),
                    query: req.uri().query().unwrap_or(""),
                    headers: &headers,
                })
            });
            if let Err(denial) = verdict {
                let resp = super::http::deny(grpc, &denial);
                if let Some(s) = span {
                    s.finish(resp.status().as_u16(), vec![]);
                }
                return Ok(resp);
            }
            let version = req.version();
            let opened = sender
                .get_or_try_init(|| async {
                    let stream = pod.lock().await.take().ok_or("the pod connection is gone")?;
                    Sender::handshake(stream, version, ()).await
                })
                .await;
            let resp: hyper::Response<Body> = match opened {
                Err(e) => answer(grpc, StatusCode::BAD_GATEWAY, format!("upstream: {e}\n")),
                Ok(s) if !s.speaks(version) => answer(
                    grpc,
                    StatusCode::BAD_GATEWAY,
                    "upstream: the client changed HTTP version mid-connection\n".into(),
                ),
                Ok(s) => match s.send(req.map(Body::Left)).await {
                    Ok(resp) => resp.map(Body::Left),
                    Err(e) => answer(grpc, StatusCode::BAD_GATEWAY, format!("upstream: {e}\n")),
                },
            };
            if let Some(s) = span {
                s.finish(resp.status().as_u16(), vec![]);
            }
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    super::http::serve(tokio::io::join(r, w), service).await
}
