//! HTTP-matched TrafficSplits, per request.
//!
//! `mesh_connect4` sends connects to such a split's root VIP here (the
//! kernel cannot read requests). We serve the client's HTTP/1.1 or HTTP/2
//! (gRPC included) with hyper (`super::http`) and route each request on its
//! own ([`HttpSplit::route`]): one client connection may reach several
//! endpoints, each over its own upstream connection in the client's HTTP
//! version, opened on first use and reused while it stays open. An
//! endpoint on this node is reached directly after the same check the
//! destination side of a tunnel makes; one on another node through a
//! tunnel, whose far end checks policy as for any flow.
use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use hyper::{Request, Response, StatusCode, Version, body::Incoming};
use tokio::{net::TcpStream, sync::Mutex};

use super::{
    PeerKey,
    http::{Body, Sender, answer, is_grpc},
    outbound::{Outbound, Tunnels, open_tunnel},
};
use crate::{
    authz::{Admission, HttpCheck, HttpRequest},
    services::{HttpSplit, Routed},
};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// An open connection to one endpoint, and the HTTP rules its destination
/// applies (same-node endpoints only; the far agent checks its own).
#[derive(Clone)]
struct Upstream {
    sender: Sender,
    check: Option<Arc<dyn HttpCheck>>,
}

type Upstreams = Arc<Mutex<HashMap<SocketAddr, Upstream>>>;

/// Serves one captured client connection until it closes (or the agent's
/// drain ends it).
pub async fn serve(
    outbound: Arc<Outbound>,
    tunnels: Arc<Tunnels>,
    downstream: TcpStream,
    workload_id: u32,
    split: Arc<HttpSplit>,
    flow_id: u64,
) {
    let _flow = outbound.drain.flow();
    let _ = downstream.set_nodelay(true);
    let upstreams = Upstreams::default();
    let ending = outbound.clone();
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (outbound, tunnels, split, upstreams) =
            (outbound.clone(), tunnels.clone(), split.clone(), upstreams.clone());
        async move {
            Ok::<_, std::convert::Infallible>(
                forward(&outbound, &tunnels, &split, &upstreams, workload_id, flow_id, req).await,
            )
        }
    });
    let result = tokio::select! {
        r = super::http::serve(downstream, service) => r,
        // Dropping the connections closes both sides (FIN).
        () = ending.drain.ending() => Ok(()),
    };
    tracing::info!(error = result.err(), "split connection closed");
}

async fn forward(
    outbound: &Outbound,
    tunnels: &Tunnels,
    split: &HttpSplit,
    upstreams: &Upstreams,
    workload_id: u32,
    flow_id: u64,
    req: Request<Incoming>,
) -> Response<Body> {
    let grpc = is_grpc(&req);
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let (method, path) = (req.method().as_str().to_string(), req.uri().path().to_string());
    let http = HttpRequest {
        method: &method,
        path: &path,
        headers: &headers,
    };
    let Routed { endpoint, matched } = split.route(&http);
    let route = if matched { "backend" } else { "root" };
    let Some(endpoint) = endpoint else {
        tunnels.metrics.split_request(&split.split, "no_endpoint");
        let side = if matched {
            "the split's backends"
        } else {
            "the root service"
        };
        return answer(
            grpc,
            StatusCode::SERVICE_UNAVAILABLE,
            format!("mesh: no ready endpoint in {side} of {}\n", split.service),
        );
    };
    tracing::debug!(%method, %path, %endpoint, route, version = ?req.version(), "request routed");
    let upstream = {
        let mut upstreams = upstreams.lock().await;
        let usable = upstreams
            .get(&endpoint)
            .filter(|u| !u.sender.is_closed() && u.sender.speaks(req.version()));
        match usable {
            Some(u) => u.clone(),
            None => match connect(outbound, tunnels, workload_id, endpoint, flow_id, req.version()).await {
                Ok(u) => {
                    upstreams.insert(endpoint, u.clone());
                    u
                }
                Err(reason) => {
                    tunnels.metrics.split_request(&split.split, "upstream_failed");
                    tracing::warn!(%endpoint, reason, "split: cannot reach the endpoint");
                    return answer(grpc, StatusCode::BAD_GATEWAY, format!("mesh: {endpoint}: {reason}\n"));
                }
            },
        }
    };
    if let Some(check) = &upstream.check
        && let Err(denial) = check.check(&http)
    {
        tunnels.metrics.split_request(&split.split, "denied");
        return answer(
            grpc,
            StatusCode::FORBIDDEN,
            format!("denied by mesh policy: {denial}\n"),
        );
    }
    tunnels.metrics.split_request(&split.split, route);
    match upstream.sender.send(req).await {
        Ok(resp) => resp.map(Body::Left),
        Err(e) => {
            upstreams.lock().await.remove(&endpoint);
            answer(
                grpc,
                StatusCode::BAD_GATEWAY,
                format!("mesh: upstream {endpoint}: {e}\n"),
            )
        }
    }
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
        return Ok(Upstream { sender, check });
    }
    let key = PeerKey {
        source,
        destination,
        node_addr: SocketAddr::from((node_ip, tunnels.port)),
    };
    let stream = Box::pin(open_tunnel(tunnels, &key, endpoint, flow_id))
        .await
        .map_err(|e| e.to_string())?;
    let lease = stream.lease;
    let io = tokio::io::join(stream.read, stream.write);
    // The pooled tunnel connection stays leased while the upstream lives.
    let sender = Sender::handshake(io, version, lease).await?;
    Ok(Upstream { sender, check: None })
}
