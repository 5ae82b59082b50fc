//! Per-request routing: HTTP-matched TrafficSplits and Gateway API
//! HTTPRoutes and GRPCRoutes (`routes::HttpRoutes`).
//!
//! `mesh_connect4` sends connects to such a service's VIP here (the
//! kernel cannot read requests). We serve the client's HTTP/1.1 or HTTP/2
//! (gRPC included) with hyper (`super::http`) and route each request on its
//! own ([`HttpRoutes::route`]), applying the rule's filters (header edits,
//! redirect, rewrite): one client connection may reach several
//! endpoints, each over its own upstream connection in the client's HTTP
//! version, opened on first use and reused while it stays open. An
//! endpoint on this node is reached directly after the same check the
//! destination side of a tunnel makes; one on another node through a
//! tunnel, whose far end checks policy as for any flow.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use http_body_util::{BodyExt, Full};
use hyper::body::Body as _;

use hyper::{Request, Response, StatusCode, Version, body::Incoming};
use tokio::{net::TcpStream, sync::Mutex};

use super::{
    PeerKey,
    http::{Body, Sender, answer, is_grpc},
    outbound::{Outbound, Tunnels, open_tunnel},
};
use crate::{
    authz::{Admission, HttpCheck, HttpRequest},
    resilience::{ClientPolicy, outlier::Change},
    routes::{Filters, HttpRoutes, RETRY_BODY_LIMIT, Redirect, Slot, Way},
};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// An open connection to one endpoint, and the HTTP rules its destination
/// applies (same-node endpoints only; the far agent checks its own).
#[derive(Clone)]
struct Upstream {
    sender: Sender,
    check: Option<Arc<dyn HttpCheck>>,
    /// Counts towards the TrafficPolicy's maxConnections while it lives.
    _permit: Option<Arc<tokio::sync::OwnedSemaphorePermit>>,
}

type Upstreams = Arc<Mutex<HashMap<SocketAddr, Upstream>>>;

/// Serves one captured client connection until it closes (or the agent's
/// drain ends it).
pub async fn serve(
    outbound: Arc<Outbound>,
    tunnels: Arc<Tunnels>,
    downstream: TcpStream,
    workload_id: u32,
    split: Arc<HttpRoutes>,
    flow_id: u64,
) {
    let _flow = outbound.drain.flow();
    let _ = downstream.set_nodelay(true);
    let upstreams = Upstreams::default();
    let ending = outbound.clone();
    let source: Arc<str> = outbound
        .snapshots
        .borrow()
        .pod_by_workload_id(workload_id)
        .map_or_else(
            || format!("unknown(id={workload_id})"),
            |p| format!("{}/{}", p.namespace, p.service_account),
        )
        .into();
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (outbound, tunnels, split, upstreams, source) = (
            outbound.clone(),
            tunnels.clone(),
            split.clone(),
            upstreams.clone(),
            source.clone(),
        );
        async move {
            let received = Instant::now();
            let mut route = String::new();
            let mut req = req;
            // The client span: the request leaves (every attempt, a
            // mirror's copy) with its traceparent.
            let span = tunnels.traces.as_ref().map(|t| {
                let method = req.method().as_str().to_string();
                let attributes = vec![
                    opentelemetry::KeyValue::new("http.request.method", method.clone()),
                    opentelemetry::KeyValue::new("url.path", req.uri().path().to_string()),
                    opentelemetry::KeyValue::new("server.address", split.service.clone()),
                    opentelemetry::KeyValue::new("mesh.source", source.to_string()),
                ];
                t.request_span(
                    req.headers_mut(),
                    opentelemetry::trace::SpanKind::Client,
                    format!("{method} {}", split.service),
                    attributes,
                )
            });
            let resp = forward(
                &outbound,
                &tunnels,
                &split,
                &upstreams,
                workload_id,
                flow_id,
                &mut route,
                req,
            )
            .await;
            let status = resp.status().as_u16();
            if let Some(span) = span {
                span.finish(status, vec![opentelemetry::KeyValue::new("mesh.route", route.clone())]);
            }
            tunnels
                .metrics
                .request(&route, &split.service, &source, status, received.elapsed());
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    let result = tokio::select! {
        r = super::http::serve(downstream, service) => r,
        // Dropping the connections closes both sides (FIN).
        () = ending.drain.ending() => Ok(()),
    };
    tracing::info!(error = result.err(), "split connection closed");
}

#[allow(clippy::too_many_arguments)]
async fn forward(
    outbound: &Arc<Outbound>,
    tunnels: &Arc<Tunnels>,
    split: &Arc<HttpRoutes>,
    upstreams: &Upstreams,
    workload_id: u32,
    flow_id: u64,
    route: &mut String,
    req: Request<Incoming>,
) -> Response<Body> {
    let received = Instant::now();
    let grpc = is_grpc(&req);
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let (method, path) = (req.method().as_str().to_string(), req.uri().path().to_string());
    let query = req.uri().query().unwrap_or("").to_string();
    let http = HttpRequest {
        method: &method,
        path: &path,
        query: &query,
        headers: &headers,
    };
    let (label, slot, filters, mirror) = match split.route(&http) {
        Way::Rule(rule, slot) => {
            route.clone_from(&rule.name);
            ("backend", slot, Some(&rule.filters), rule.mirror.as_ref())
        }
        Way::Otherwise(slot) => {
            *route = "root".into();
            ("root", slot, None, None)
        }
        Way::NoRoute => {
            *route = "no_route".into();
            tunnels.metrics.split_request(&split.source, "no_route");
            return answer(
                grpc,
                StatusCode::NOT_FOUND,
                format!("mesh: no route of {} matches {method} {path}\n", split.source),
            );
        }
    };
    if let Some(redirect) = filters.and_then(|f| f.redirect.as_ref()) {
        tunnels.metrics.split_request(&split.source, "redirect");
        return redirect_to(redirect, &req, split);
    }
    let policy = split.resilience.as_deref();
    // Held until the answer's headers: maxPendingRequests.
    let _pending = match policy.and_then(|p| p.pending.clone().map(|s| (p, s))) {
        None => None,
        Some((p, permits)) => match permits.try_acquire_owned() {
            Ok(permit) => Some(permit),
            Err(_) => {
                tunnels.metrics.split_request(&split.source, "overflow");
                return overflow(grpc, split, p, "maxPendingRequests", "requests in flight");
            }
        },
    };
    if let Some(p) = policy {
        if let Some(delay) = p.delay() {
            tunnels.metrics.split_request(&split.source, "fault_delay");
            tokio::time::sleep(delay).await;
        }
        if let Some(status) = p.abort() {
            tunnels.metrics.split_request(&split.source, "fault_abort");
            let mut resp = answer(
                grpc,
                StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                format!("mesh: fault injected by {} (abort)\n", p.name),
            );
            resp.headers_mut()
                .insert("x-mesh-fault", hyper::header::HeaderValue::from_static("abort"));
            return resp;
        }
    }
    let endpoint = match slot {
        Some(Slot::Endpoint(e)) => e,
        Some(Slot::AllEjected) => {
            tunnels.metrics.split_request(&split.source, "all_ejected");
            return answer(
                grpc,
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "mesh: every endpoint of {} is ejected by outlier detection ({}); each is probed again when its ejection ends\n",
                    split.service,
                    policy.map_or("", |p| p.name.as_str())
                ),
            );
        }
        Some(Slot::Invalid) | None if label == "backend" => {
            tunnels.metrics.split_request(&split.source, "invalid_backend");
            return answer(
                grpc,
                StatusCode::INTERNAL_SERVER_ERROR,
                format!(
                    "mesh: the matching rule of {} has no valid backend for this request\n",
                    split.source
                ),
            );
        }
        _ => {
            tunnels.metrics.split_request(&split.source, "no_endpoint");
            let side = if label == "backend" {
                "the route's backends"
            } else {
                "the root service"
            };
            return answer(
                grpc,
                StatusCode::SERVICE_UNAVAILABLE,
                format!("mesh: no ready endpoint in {side} of {}\n", split.service),
            );
        }
    };
    tracing::debug!(%method, %path, %endpoint, route = label, version = ?req.version(), "request routed");
    let retry = filters.and_then(|f| f.retry.as_ref());
    let timeouts = filters.map(|f| f.timeouts).unwrap_or_default();
    let (parts, body) = req.into_parts();
    // A retried request is sent again whole, so its body must be kept:
    // only one of known length within the limit is; others go once.
    let (kept, mut streamed) = match retry.is_some() || mirror.is_some() {
        true if body.size_hint().upper().is_some_and(|n| n <= RETRY_BODY_LIMIT) => match body.collect().await {
            Ok(b) => (Some(b.to_bytes()), None),
            Err(e) => {
                return answer(
                    grpc,
                    StatusCode::BAD_REQUEST,
                    format!("mesh: reading the request body: {e}\n"),
                );
            }
        },
        _ => (None, Some(body)),
    };
    let retries = match (retry, &kept) {
        (Some(r), Some(_)) => r.attempts,
        _ => 0,
    };
    if let Some(m) = mirror
        && rand::random_range(0..100u8) < m.percent
    {
        match (&kept, m.pool.next()) {
            (Some(bytes), Some(Slot::Endpoint(to))) => {
                let copy = rebuild(&parts, Body::Right(Full::new(bytes.clone())));
                let (o, t, sp, u) = (outbound.clone(), tunnels.clone(), split.clone(), upstreams.clone());
                let (method, query, filters) = (method.clone(), query.clone(), filters.cloned());
                // Its own task: the client's answer never waits for the mirror's.
                tokio::spawn(async move {
                    let routed = Routed {
                        grpc,
                        label: "mirror",
                        filters: filters.as_ref(),
                        method: &method,
                        query: &query,
                    };
                    let (resp, _) = to_endpoint(&o, &t, &sp, &u, workload_id, flow_id, to, routed, copy).await;
                    tracing::debug!(mirror = %to, status = resp.status().as_u16(), "mirrored request answered; dropped");
                    let _ = resp.into_body().collect().await;
                });
            }
            // A body of unknown length is not kept, so it cannot be copied.
            _ => tunnels.metrics.split_request(&split.source, "mirror_skipped"),
        }
    }
    let deadline = timeouts.request.map(|t| received + t);
    let backoff = retry.map_or(Duration::ZERO, |r| r.backoff);
    let mut endpoint = endpoint;
    for attempt in 0..=retries {
        if attempt > 0 {
            tokio::time::sleep(backoff).await;
            tunnels.metrics.split_request(&split.source, "retry");
            // Each attempt takes the rule's next endpoint, as the first did.
            if let Way::Rule(_, Some(Slot::Endpoint(e))) | Way::Otherwise(Some(Slot::Endpoint(e))) = split.route(&http)
            {
                endpoint = e;
            }
        }
        let body = match (&kept, streamed.take()) {
            (Some(bytes), _) => Body::Right(Full::new(bytes.clone())),
            (None, Some(body)) => Body::Left(body),
            (None, None) => unreachable!("a streamed body is sent once"),
        };
        let req = rebuild(&parts, body);
        let reach = to_endpoint(
            outbound,
            tunnels,
            split,
            upstreams,
            workload_id,
            flow_id,
            endpoint,
            Routed {
                grpc,
                label,
                filters,
                method: &method,
                query: &query,
            },
            req,
        );
        // The attempt's limit: its own, within what is left of the request's.
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let limit = match (timeouts.backend_request, left) {
            (Some(b), Some(l)) if b < l => Some((b, "backendRequest")),
            (_, Some(l)) => Some((l, "request")),
            (Some(b), None) => Some((b, "backendRequest")),
            (None, None) => None,
        };
        let (resp, reached) = match limit {
            None => reach.await,
            Some((limit, which)) => match tokio::time::timeout(limit, reach).await {
                Ok(done) => done,
                Err(_) => {
                    // Abandoned mid-exchange: its connection is not reused.
                    upstreams.lock().await.remove(&endpoint);
                    tunnels.metrics.split_request(&split.source, "timeout");
                    tracing::info!(%method, %path, %endpoint, timeout = ?limit, setting = which, attempt, "request timed out");
                    let total = if which == "request" {
                        timeouts.request.unwrap_or(limit)
                    } else {
                        limit
                    };
                    let resp = answer(
                        grpc,
                        StatusCode::GATEWAY_TIMEOUT,
                        format!("mesh: no response from {endpoint} within the route's {which} timeout of {total:?}\n"),
                    );
                    // Only a backendRequest timeout leaves time to try again.
                    (
                        resp,
                        if which == "request" {
                            Reached::Final
                        } else {
                            Reached::Upstream
                        },
                    )
                }
            },
        };
        if let Some(ejections) = policy.and_then(|p| p.ejections.as_ref())
            && !matches!(reached, Reached::Overflow)
        {
            let failed = matches!(reached, Reached::NotConnected) || resp.status().is_server_error();
            match ejections.record(endpoint, failed) {
                Change::Ejected(time) => {
                    tunnels.metrics.ejection(&split.service, endpoint);
                    tracing::warn!(service = %split.service, %endpoint, ejected_for = ?time, status = resp.status().as_u16(),
                        "endpoint ejected by outlier detection (TrafficPolicy); it is probed again when the time is up");
                }
                Change::Restored => {
                    tracing::info!(service = %split.service, %endpoint, "ejected endpoint answered its probe: back in service")
                }
                Change::None => {}
            }
        }
        // No retry the request's timeout would cut short: the client gets
        // the last real answer instead.
        let again = attempt < retries
            && !deadline.is_some_and(|d| Instant::now() + backoff >= d)
            && match reached {
                Reached::Final | Reached::Overflow => false,
                Reached::NotConnected => true,
                Reached::Upstream => retry.is_some_and(|r| r.codes.contains(&resp.status().as_u16())),
            };
        if !again {
            return resp;
        }
        tracing::debug!(%method, %path, %endpoint, status = resp.status().as_u16(), attempt, "retrying");
        // Read the refused answer to its end so an HTTP/1.1 connection can
        // carry the retry; a large or endless one costs the connection.
        let body = resp.into_body();
        let small = body.size_hint().upper().is_some_and(|n| n <= RETRY_BODY_LIMIT);
        if !(small && body.collect().await.is_ok()) {
            upstreams.lock().await.remove(&endpoint);
        }
    }
    // Not reached: the last attempt never tries again.
    answer(grpc, StatusCode::BAD_GATEWAY, "mesh: no attempt answered\n".into())
}

/// What an attempt's answer says about trying again.
enum Reached {
    /// The endpoint answered (or its backendRequest timeout passed).
    Upstream,
    /// The endpoint could not be reached: the request never left.
    NotConnected,
    /// The agent's own final word (a policy denial, a broken exchange).
    Final,
    /// A TrafficPolicy limit of this node was reached: the request never left.
    Overflow,
}

/// The 503 of a full TrafficPolicy limit.
fn overflow(grpc: bool, split: &HttpRoutes, p: &ClientPolicy, setting: &str, what: &str) -> Response<Body> {
    let limit = match setting {
        "maxPendingRequests" => p.settings.max_pending_requests,
        _ => p.settings.max_connections,
    };
    let mut resp = answer(
        grpc,
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "mesh: {} has {} {what} from this node, the {setting} of {}\n",
            split.service,
            limit.unwrap_or(0),
            p.name
        ),
    );
    resp.headers_mut()
        .insert("x-mesh-overflow", hyper::header::HeaderValue::from_static("true"));
    resp
}

/// A request from its parts (which are not Clone: extensions are not).
fn rebuild(parts: &hyper::http::request::Parts, body: Body) -> Request<Body> {
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    req
}

/// What routing decided about a request, for the attempt at its endpoint.
struct Routed<'a> {
    grpc: bool,
    label: &'static str,
    filters: Option<&'a Filters>,
    method: &'a str,
    query: &'a str,
}

/// One attempt: the endpoint's connection (opened on first use), the
/// rule's request edits, the destination's HTTP rules, the response.
#[allow(clippy::too_many_arguments)]
async fn to_endpoint(
    outbound: &Outbound,
    tunnels: &Tunnels,
    split: &HttpRoutes,
    upstreams: &Upstreams,
    workload_id: u32,
    flow_id: u64,
    endpoint: SocketAddr,
    routed: Routed<'_>,
    req: Request<Body>,
) -> (Response<Body>, Reached) {
    let Routed {
        grpc,
        label,
        filters,
        method,
        query,
    } = routed;
    let upstream = {
        let mut upstreams = upstreams.lock().await;
        let usable = upstreams
            .get(&endpoint)
            .filter(|u| !u.sender.is_closed() && u.sender.speaks(req.version()));
        match usable {
            Some(u) => u.clone(),
            None => match connect(outbound, tunnels, workload_id, endpoint, flow_id, req.version()).await {
                Ok(mut u) => {
                    let policy = split.resilience.as_deref();
                    if let Some((p, permits)) = policy.and_then(|p| p.connections.clone().map(|s| (p, s))) {
                        // Any old connection to it is replaced: its permit goes first.
                        upstreams.remove(&endpoint);
                        match permits.try_acquire_owned() {
                            Ok(permit) => u._permit = Some(Arc::new(permit)),
                            Err(_) => {
                                tunnels.metrics.split_request(&split.source, "overflow");
                                return (
                                    overflow(grpc, split, p, "maxConnections", "connections"),
                                    Reached::Overflow,
                                );
                            }
                        }
                    }
                    upstreams.insert(endpoint, u.clone());
                    u
                }
                Err(reason) => {
                    tunnels.metrics.split_request(&split.source, "upstream_failed");
                    tracing::warn!(%endpoint, reason, "split: cannot reach the endpoint");
                    let resp = answer(grpc, StatusCode::BAD_GATEWAY, format!("mesh: {endpoint}: {reason}\n"));
                    return (resp, Reached::NotConnected);
                }
            },
        }
    };
    let mut req = req;
    if let Some(f) = filters {
        edit_request(f, &mut req);
    }
    // Policy sees the request the pod will see.
    let edited_path = req.uri().path().to_string();
    let edited_headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    if let Some(check) = &upstream.check
        && let Err(denial) = check.check(&HttpRequest {
            method,
            path: &edited_path,
            query,
            headers: &edited_headers,
        })
    {
        let what = if denial.retry_after.is_some() {
            "rate_limited"
        } else {
            "denied"
        };
        tunnels.metrics.split_request(&split.source, what);
        return (super::http::deny(grpc, &denial), Reached::Final);
    }
    tunnels.metrics.split_request(&split.source, label);
    match upstream.sender.send(req).await {
        Ok(resp) => {
            let mut resp = resp.map(Body::Left);
            if let Some(f) = filters {
                f.response_headers.apply(resp.headers_mut());
            }
            (resp, Reached::Upstream)
        }
        Err(e) => {
            upstreams.lock().await.remove(&endpoint);
            let resp = answer(
                grpc,
                StatusCode::BAD_GATEWAY,
                format!("mesh: upstream {endpoint}: {e}\n"),
            );
            (resp, Reached::Final)
        }
    }
}

/// RequestHeaderModifier and URLRewrite, applied before the request leaves.
fn edit_request<B>(f: &Filters, req: &mut Request<B>) {
    f.request_headers.apply(req.headers_mut());
    if f.rewrite_path.is_none() && f.rewrite_host.is_none() {
        return;
    }
    let uri = req.uri().clone();
    let path = match &f.rewrite_path {
        Some(edit) => edit.apply(uri.path()),
        None => uri.path().to_string(),
    };
    let path_and_query = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let mut parts = uri.into_parts();
    parts.path_and_query = path_and_query.parse().ok();
    if let Some(host) = &f.rewrite_host {
        if parts.authority.is_some() {
            // HTTP/2: the authority is part of the URI.
            let port = parts.authority.as_ref().and_then(|a| a.port_u16());
            let authority = port.map_or_else(|| host.clone(), |p| format!("{host}:{p}"));
            parts.authority = authority.parse().ok();
        }
        if let Ok(v) = hyper::header::HeaderValue::from_str(host) {
            req.headers_mut().insert(hyper::header::HOST, v);
        }
    }
    if let Ok(uri) = hyper::Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
}

/// A RequestRedirect's answer: the request's own scheme, host, port and
/// path except where the filter says otherwise; the port is left out when
/// it is the scheme's well-known one.
fn redirect_to(r: &Redirect, req: &Request<Incoming>, split: &HttpRoutes) -> Response<Body> {
    let authority = req
        .uri()
        .authority()
        .map(|a| a.to_string())
        .or_else(|| {
            req.headers()
                .get(hyper::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default();
    let (req_host, req_port) = match authority.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() => (h.to_string(), p.parse::<u16>().ok()),
        _ => (authority.clone(), None),
    };
    let scheme = r.scheme.clone().unwrap_or_else(|| "http".into());
    let host = r.hostname.clone().unwrap_or(req_host);
    let port = match (r.port, &r.scheme) {
        (Some(p), _) => Some(p),
        (None, Some(s)) => Some(if s == "https" { 443 } else { 80 }),
        // The service port the client dialled.
        (None, None) => req_port.or_else(|| split.service.rsplit(':').next().and_then(|p| p.parse().ok())),
    };
    let well_known = matches!(
        (scheme.as_str(), port),
        ("http", Some(80)) | ("https", Some(443)) | (_, None)
    );
    let path = match &r.path {
        Some(edit) => edit.apply(req.uri().path()),
        None => req.uri().path().to_string(),
    };
    let query = req.uri().query().map(|q| format!("?{q}")).unwrap_or_default();
    let location = if well_known {
        format!("{scheme}://{host}{path}{query}")
    } else {
        format!("{scheme}://{host}:{}{path}{query}", port.unwrap_or(80))
    };
    Response::builder()
        .status(StatusCode::from_u16(r.status).unwrap_or(StatusCode::FOUND))
        .header(hyper::header::LOCATION, location)
        .body(Body::Right(Default::default()))
        .expect("valid response")
}

/// Opens an HTTP connection in `version` to `endpoint` on behalf of the
/// client workload: directly on this node, else through a tunnel.
async fn connect(
    outbound: &Outbound,
    tunnels: &Tunnels,
    workload_id: u32,
    endpoint: SocketAddr,
    flow_id: u64,
    version: Version,
) -> Result<Upstream, String> {
    let route = outbound.route(mesh_common::OrigDst {
        addr: mesh_common::Addr::from(endpoint.ip()),
        port: endpoint.port(),
        workload_id,
        ..Default::default()
    });
    let (Some(source), Some(destination), Some(node_ip)) = (route.source, route.destination, route.node_ip) else {
        return Err("the client or the endpoint workload, or the endpoint's node, is unknown to this agent".into());
    };
    if route.same_node {
        let check = match tunnels.inbound.check(&source, endpoint) {
            Ok(Admission::Open) => None,
            Ok(Admission::Http(check)) => Some(check),
            Err(refusal) => return Err(refusal.to_string()),
        };
        let stream = tokio::time::timeout(
            CONNECT_TIMEOUT,
            super::deliver::connect_tcp(&tunnels.inbound.voucher, endpoint),
        )
        .await
        .map_err(|_| format!("connect timed out after {CONNECT_TIMEOUT:?}"))?
        .map_err(|e| format!("connect: {e}"))?;
        let _ = stream.set_nodelay(true);
        let sender = Sender::handshake(stream, version, ()).await?;
        return Ok(Upstream {
            sender,
            check,
            _permit: None,
        });
    }
    let key = PeerKey {
        source,
        destination,
        node_addr: SocketAddr::from((node_ip, tunnels.port)),
    };
    let stream = Box::pin(open_tunnel(tunnels, &key, endpoint, flow_id, true))
        .await
        .map_err(|e| e.to_string())?;
    let lease = stream.lease;
    let io = tokio::io::join(stream.read, stream.write);
    // The pooled tunnel connection stays leased while the upstream lives.
    let sender = Sender::handshake(io, version, lease).await?;
    Ok(Upstream {
        sender,
        check: None,
        _permit: None,
    })
}
