//! The Kubernetes source: kube reflectors over Pods, Nodes, Services and
//! the SMI resources, and (in [`super::gateway_kube`]) the Gateway API
//! kinds, folded into the same [`Snapshot`] the file source produces.
//!
//! Nothing is published until every reflector has its first full list, so
//! the agent never enforces a partial view (in enforcing mode, pods without
//! their TrafficTargets would mean denials that no one wrote). Tested with a
//! fake API server behind `kube::Client::new` (kube's mock-service pattern),
//! since no API server can run here.
use std::{sync::Arc, time::Duration};

use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod as K8sPod, Service as K8sService, ServiceAccount},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource,
    runtime::{WatchStreamExt as _, reflector, watcher},
};

use crate::{
    smi::{HTTPRouteGroup, TCPRoute, TrafficSplit, TrafficTarget, UDPRoute},
    state::{AdmissionMode, Named, Pod, SmiSet, Snapshot, SnapshotTx},
};

/// Everything the reflectors hold.
struct Stores {
    pods: reflector::Store<K8sPod>,
    nodes: reflector::Store<Node>,
    services: reflector::Store<K8sService>,
    slices: reflector::Store<EndpointSlice>,
    service_accounts: reflector::Store<ServiceAccount>,
    /// For their admission annotation.
    namespaces: reflector::Store<Namespace>,
    traffic_targets: reflector::Store<TrafficTarget>,
    http_route_groups: reflector::Store<HTTPRouteGroup>,
    tcp_routes: reflector::Store<TCPRoute>,
    udp_routes: reflector::Store<UDPRoute>,
    traffic_splits: reflector::Store<TrafficSplit>,
}

/// Starts a reflector for `K` (all namespaces); every event pokes `changed`.
fn reflect<K>(client: &Client, changed: Arc<tokio::sync::Notify>) -> reflector::Store<K>
where
    K: Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    let (store, writer) = reflector::store::<K>();
    let api: Api<K> = Api::all(client.clone());
    let stream = reflector(writer, watcher(api, watcher::Config::default())).default_backoff();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            if let Err(e) = event {
                tracing::warn!(kind = %K::kind(&()), error = %e, "kubernetes source: watch error; retrying");
            }
            changed.notify_one();
        }
    });
    store
}

/// Watches the API server and publishes snapshots until the process ends.
pub async fn watch(client: Client, judge_routes: Option<crate::state::JudgeRoutes>, tx: SnapshotTx) {
    let changed = Arc::new(tokio::sync::Notify::new());
    let stores = Stores {
        pods: reflect(&client, changed.clone()),
        nodes: reflect(&client, changed.clone()),
        services: reflect(&client, changed.clone()),
        slices: reflect(&client, changed.clone()),
        service_accounts: reflect(&client, changed.clone()),
        namespaces: reflect(&client, changed.clone()),
        traffic_targets: reflect(&client, changed.clone()),
        http_route_groups: reflect(&client, changed.clone()),
        tcp_routes: reflect(&client, changed.clone()),
        udp_routes: reflect(&client, changed.clone()),
        traffic_splits: reflect(&client, changed.clone()),
    };
    let gateway = Arc::new(super::gateway_kube::GatewayStores::start(&client, changed.clone()).await);
    // A partial view is never published.
    let ready = async {
        stores.pods.wait_until_ready().await?;
        stores.nodes.wait_until_ready().await?;
        stores.services.wait_until_ready().await?;
        stores.slices.wait_until_ready().await?;
        stores.service_accounts.wait_until_ready().await?;
        stores.namespaces.wait_until_ready().await?;
        stores.traffic_targets.wait_until_ready().await?;
        stores.http_route_groups.wait_until_ready().await?;
        stores.tcp_routes.wait_until_ready().await?;
        stores.udp_routes.wait_until_ready().await?;
        stores.traffic_splits.wait_until_ready().await?;
        gateway.wait_until_ready().await
    };
    if ready.await.is_err() {
        tracing::error!("kubernetes source: a reflector stopped before its first list");
        return;
    }
    tracing::info!("kubernetes source: initial lists complete");
    let (status_tx, status_rx) = tokio::sync::watch::channel((Snapshot::default(), Vec::new()));
    if let Some(judge) = judge_routes {
        tokio::spawn(super::gateway_kube::status_loop(gateway.clone(), judge, status_rx));
    }
    let mut generation = tx.borrow().generation;
    loop {
        let mut snap = snapshot(&stores);
        let gateway_refused = gateway.fold(&mut snap);
        let changed_since = {
            let cur = tx.borrow();
            cur.generation == 0 || !cur.same_content(&snap)
        };
        if changed_since {
            generation += 1;
            snap.generation = generation;
            tracing::info!(pods = snap.pods.len(), generation, "kubernetes source: new snapshot");
            tx.publish(snap.clone());
        }
        // Status follows every change, published or not (a refused edit
        // leaves the snapshot as it was but changes the route's status).
        snap.generation = generation;
        status_tx.send_replace((snap, gateway_refused));
        changed.notified().await;
        // Coalesce a burst of events (a rollout) into one snapshot.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn snapshot(s: &Stores) -> Snapshot {
    let mut snap = Snapshot::default();
    for p in s.pods.state() {
        if let Some(pod) = pod(&p) {
            snap.pods.insert(pod.workload_name(), pod);
        }
    }
    for n in s.nodes.state() {
        if let Some((name, ip)) = node(&n) {
            snap.nodes.insert(name, ip);
        }
    }
    for ns in s.namespaces.state() {
        let Some(name) = ns.metadata.name.clone() else { continue };
        if let Some(mode) = AdmissionMode::annotated(ns.metadata.annotations.as_ref(), "namespace") {
            snap.namespace_admission.insert(name, mode);
        }
    }
    let services = s.services.state();
    let slices = s.slices.state();
    snap.services = super::k8s::services(
        &services.iter().map(|a| a.as_ref()).collect::<Vec<_>>(),
        &slices.iter().map(|a| a.as_ref()).collect::<Vec<_>>(),
    );
    snap.service_accounts = s
        .service_accounts
        .state()
        .iter()
        .filter_map(|sa| super::k8s::service_account(sa))
        .collect();
    snap.smi = SmiSet {
        traffic_targets: named(&s.traffic_targets.state(), |r| r.spec.clone()),
        http_route_groups: named(&s.http_route_groups.state(), |r| r.spec.clone()),
        tcp_routes: named(&s.tcp_routes.state(), |r| r.spec.clone()),
        udp_routes: named(&s.udp_routes.state(), |r| r.spec.clone()),
        traffic_splits: named(&s.traffic_splits.state(), |r| r.spec.clone()),
    };
    snap
}

fn named<K: Resource, T>(items: &[Arc<K>], spec: impl Fn(&K) -> T) -> Vec<Named<T>> {
    let mut out: Vec<Named<T>> = items
        .iter()
        .map(|r| Named {
            namespace: r.meta().namespace.clone().unwrap_or_else(|| "default".into()),
            name: r.meta().name.clone().unwrap_or_default(),
            spec: spec(r),
        })
        .collect();
    // Reflector order is arbitrary; snapshots compare equal when nothing changed.
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    out
}

/// A meshed pod: scheduled, with an IP, not finished.
fn pod(p: &K8sPod) -> Option<Pod> {
    let spec = p.spec.as_ref()?;
    let status = p.status.as_ref()?;
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    Some(Pod {
        namespace: p.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
        name: p.metadata.name.clone()?,
        uid: p.metadata.uid.clone().unwrap_or_default(),
        service_account: spec.service_account_name.clone().unwrap_or_else(|| "default".into()),
        node: spec.node_name.clone()?,
        ips: {
            let listed: Vec<String> = status.pod_ips.iter().flatten().map(|p| p.ip.clone()).collect();
            match crate::source::k8s::pod_ips(status.pod_ip.as_ref()?, &listed) {
                Ok(ips) => ips,
                Err(e) => {
                    tracing::warn!(pod = ?p.metadata.name, error = %e, "pod skipped: its addresses do not parse");
                    return None;
                }
            }
        },
        qos_class: status.qos_class.clone(),
        host_network: spec.host_network.unwrap_or(false),
        labels: p.metadata.labels.clone().unwrap_or_default(),
        admission: AdmissionMode::annotated(p.metadata.annotations.as_ref(), "pod"),
    })
}

fn node(n: &Node) -> Option<(String, std::net::Ipv4Addr)> {
    let addr = n
        .status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .find(|a| a.type_ == "InternalIP")?;
    Some((n.metadata.name.clone()?, addr.address.parse().ok()?))
}

#[cfg(test)]
mod tests {
    //! A fake API server behind `kube::Client::new`: lists answer with fixed
    //! objects, watches stay open with no events.
    use std::{convert::Infallible, pin::Pin};

    use bytes::Bytes;
    use futures::Stream;
    use http_body_util::StreamBody;
    use hyper::body::Frame;

    use super::*;

    type FakeBody = StreamBody<Pin<Box<dyn Stream<Item = Result<Frame<Bytes>, Infallible>> + Send>>>;

    fn list(kind: &str, api_version: &str, items: serde_json::Value) -> Bytes {
        serde_json::to_vec(&serde_json::json!({
            "apiVersion": api_version, "kind": format!("{kind}List"),
            "metadata": {"resourceVersion": "1"}, "items": items,
        }))
        .unwrap()
        .into()
    }

    fn fake_api(req: http::Request<kube::client::Body>) -> http::Response<FakeBody> {
        let path = req.uri().path().to_string();
        let watching = req.uri().query().unwrap_or("").contains("watch=true");
        let stream: Pin<Box<dyn Stream<Item = Result<Frame<Bytes>, Infallible>> + Send>> = if watching {
            Box::pin(futures::stream::pending())
        } else {
            let body = match path.as_str() {
                "/api/v1/pods" => list(
                    "Pod",
                    "v1",
                    serde_json::json!([
                        {"metadata": {"name": "web-0", "namespace": "shop"},
                         "spec": {"nodeName": "n1", "serviceAccountName": "web", "containers": []},
                         "status": {"podIP": "198.18.1.10", "phase": "Running"}},
                        {"metadata": {"name": "pending", "namespace": "shop"},
                         "spec": {"containers": []}, "status": {"phase": "Pending"}},
                    ]),
                ),
                "/api/v1/nodes" => list(
                    "Node",
                    "v1",
                    serde_json::json!([
                        {"metadata": {"name": "n1"}, "status": {"addresses": [{"type": "InternalIP", "address": "198.18.0.11"}]}},
                    ]),
                ),
                "/apis/access.smi-spec.io/v1alpha3/traffictargets" => list(
                    "TrafficTarget",
                    "access.smi-spec.io/v1alpha3",
                    serde_json::json!([
                        {"apiVersion": "access.smi-spec.io/v1alpha3", "kind": "TrafficTarget",
                         "metadata": {"name": "front-to-web", "namespace": "shop"},
                         "spec": {"destination": {"kind": "ServiceAccount", "name": "web"},
                                  "rules": [{"kind": "TCPRoute", "name": "p80"}],
                                  "sources": [{"kind": "ServiceAccount", "name": "front"}]}},
                    ]),
                ),
                "/api/v1/services" => list(
                    "Service",
                    "v1",
                    serde_json::json!([
                        {"metadata": {"name": "web", "namespace": "shop"},
                         "spec": {"clusterIP": "198.19.0.10", "ports": [{"port": 80}]}},
                    ]),
                ),
                "/apis/discovery.k8s.io/v1/endpointslices" => list(
                    "EndpointSlice",
                    "discovery.k8s.io/v1",
                    serde_json::json!([
                        {"metadata": {"name": "web-1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
                         "addressType": "IPv4", "ports": [{"port": 8080}],
                         "endpoints": [{"addresses": ["198.18.1.10"], "nodeName": "n1"}]},
                    ]),
                ),
                "/api/v1/namespaces" => list(
                    "Namespace",
                    "v1",
                    serde_json::json!([
                        {"metadata": {"name": "shop", "annotations": {"mesh.dev/admission": "permissive"}}},
                        {"metadata": {"name": "plain"}},
                    ]),
                ),
                "/api/v1/serviceaccounts" => list(
                    "ServiceAccount",
                    "v1",
                    serde_json::json!([
                        {"metadata": {"name": "web", "namespace": "shop"}},
                    ]),
                ),
                "/apis/specs.smi-spec.io/v1alpha4/tcproutes" => list(
                    "TCPRoute",
                    "specs.smi-spec.io/v1alpha4",
                    serde_json::json!([
                        {"apiVersion": "specs.smi-spec.io/v1alpha4", "kind": "TCPRoute",
                         "metadata": {"name": "p80", "namespace": "shop"}, "spec": {"matches": {"ports": [80]}}},
                    ]),
                ),
                other => {
                    let (group_version, kind) = match other {
                        p if p.contains("httproutegroups") => ("specs.smi-spec.io/v1alpha4", "HTTPRouteGroup"),
                        p if p.contains("udproutes") => ("specs.smi-spec.io/v1alpha4", "UDPRoute"),
                        _ => ("split.smi-spec.io/v1alpha4", "TrafficSplit"),
                    };
                    list(kind, group_version, serde_json::json!([]))
                }
            };
            Box::pin(futures::stream::once(async move { Ok(Frame::data(body)) }))
        };
        http::Response::new(StreamBody::new(stream))
    }

    /// The agent's own route compiler, as `app` gives it.
    fn judge() -> crate::state::JudgeRoutes {
        Arc::new(|s| crate::gamma::Gamma::compile(s).verdicts())
    }

    #[tokio::test]
    async fn reflectors_fold_into_one_snapshot_only_after_every_first_list() {
        let service = tower::service_fn(|req| async move { Ok::<_, Infallible>(fake_api(req)) });
        let client = Client::new(service, "default");
        let (tx, mut rx) = crate::state::channel();
        let task = tokio::spawn(watch(client, Some(judge()), tx));
        tokio::time::timeout(Duration::from_secs(10), rx.changed())
            .await
            .expect("a snapshot")
            .unwrap();
        let snap = rx.borrow().clone();
        assert_eq!(snap.generation, 1);
        assert_eq!(snap.pods.len(), 1, "the pending pod without node or IP is not meshed");
        let web = &snap.pods["shop/web-0"];
        assert_eq!((web.service_account.as_str(), web.node.as_str()), ("web", "n1"));
        assert_eq!(snap.nodes["n1"].to_string(), "198.18.0.11");
        assert_eq!(snap.smi.traffic_targets.len(), 1);
        assert_eq!(snap.services["shop/web"].endpoints.len(), 1);
        assert!(snap.service_accounts.contains("shop/web"));
        assert_eq!(
            snap.namespace_admission,
            [("shop".to_string(), crate::state::AdmissionMode::Permissive)].into()
        );
        // The same compiler as for files: the policy this source yields works.
        let policy = crate::policy::Policy::compile(&snap.smi, snap.generation);
        assert!(policy.rejected.is_empty(), "{:?}", policy.rejected);
        let id = |sa: &str| crate::state::Identity {
            namespace: "shop".into(),
            service_account: sa.into(),
        };
        let d = policy.evaluate(
            crate::state::PolicyMode::Enforcing,
            &id("front"),
            &id("web"),
            80,
            crate::authz::Proto::Tcp,
        );
        assert_eq!(d.target.as_deref(), Some("shop/front-to-web"));
        task.abort();
    }

    /// Gateway API kinds: one route refused for a field the mesh does not
    /// implement while the others apply, a kind without CRD read as empty
    /// (the agent still starts), TCPRoute found at v1alpha2, and route
    /// status written back with this mesh's controllerName.
    #[tokio::test]
    async fn gateway_api_routes_are_read_one_by_one_and_their_status_written_back() {
        let patches: Arc<std::sync::Mutex<Vec<(String, serde_json::Value)>>> = Default::default();
        let seen = patches.clone();
        let route = |name: &str, rules: serde_json::Value| {
            serde_json::json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                "metadata": {"name": name, "namespace": "shop", "generation": 4, "resourceVersion": "7"},
                "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}], "rules": rules}})
        };
        let routes = serde_json::json!([
            route(
                "good",
                serde_json::json!([{"backendRefs": [{"name": "web", "port": 80}]}])
            ),
            route(
                "unresolved",
                serde_json::json!([{"matches": [{"path": {"type": "PathPrefix", "value": "/x"}}],
                "backendRefs": [{"name": "nope", "port": 80}]}])
            ),
            route(
                "sticky",
                serde_json::json!([{"sessionPersistence": {"type": "Cookie"}, "backendRefs": [{"name": "web", "port": 80}]}])
            ),
        ]);
        let service = tower::service_fn(move |req: http::Request<kube::client::Body>| {
            let (seen, routes) = (seen.clone(), routes.clone());
            async move {
                let path = req.uri().path().to_string();
                let not_found = || {
                    let body = serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                        "reason": "NotFound", "code": 404, "message": "the server could not find the requested resource"});
                    let stream: Pin<Box<dyn Stream<Item = Result<Frame<Bytes>, Infallible>> + Send>> =
                        Box::pin(futures::stream::once(async move {
                            Ok(Frame::data(Bytes::from(body.to_string())))
                        }));
                    let mut r = http::Response::new(StreamBody::new(stream));
                    *r.status_mut() = http::StatusCode::NOT_FOUND;
                    r
                };
                let once = |body: Bytes| {
                    let stream: Pin<Box<dyn Stream<Item = Result<Frame<Bytes>, Infallible>> + Send>> =
                        Box::pin(futures::stream::once(async move { Ok(Frame::data(body)) }));
                    http::Response::new(StreamBody::new(stream))
                };
                if req.method() == http::Method::PATCH {
                    use http_body_util::BodyExt as _;
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    seen.lock()
                        .unwrap()
                        .push((path, serde_json::from_slice(&body).unwrap()));
                    return Ok::<_, Infallible>(once(Bytes::from(
                        serde_json::json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                            "metadata": {"name": "x", "namespace": "shop"}})
                        .to_string(),
                    )));
                }
                let watching = req.uri().query().unwrap_or("").contains("watch=true");
                if path.starts_with("/apis/gateway")
                    && (path.contains("udproutes")
                        || path.contains("authorizationpolicies")
                        || path.contains("/v1/tcproutes"))
                {
                    return Ok(not_found());
                }
                if watching && path.starts_with("/apis/gateway") {
                    let stream: Pin<Box<dyn Stream<Item = Result<Frame<Bytes>, Infallible>> + Send>> =
                        Box::pin(futures::stream::pending());
                    return Ok(http::Response::new(StreamBody::new(stream)));
                }
                Ok(match path.as_str() {
                    "/apis/gateway.networking.k8s.io/v1/httproutes" => {
                        once(list("HTTPRoute", "gateway.networking.k8s.io/v1", routes))
                    }
                    "/apis/gateway.networking.k8s.io/v1/grpcroutes" => {
                        once(list("GRPCRoute", "gateway.networking.k8s.io/v1", serde_json::json!([])))
                    }
                    "/apis/gateway.networking.k8s.io/v1alpha2/tcproutes" => once(list(
                        "TCPRoute",
                        "gateway.networking.k8s.io/v1alpha2",
                        serde_json::json!([]),
                    )),
                    _ => fake_api(req),
                })
            }
        });
        let client = Client::new(service, "default");
        let (tx, mut rx) = crate::state::channel();
        let task = tokio::spawn(watch(client, Some(judge()), tx));
        tokio::time::timeout(Duration::from_secs(10), rx.changed())
            .await
            .expect("a snapshot although UDPRoute and AuthorizationPolicy are not installed")
            .unwrap();
        let snap = rx.borrow().clone();
        let names: Vec<&str> = snap.gateway.http_routes.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            ["good", "unresolved"],
            "the route with sessionPersistence is refused alone"
        );
        let status_of = |route: &str| {
            let path = format!("/apis/gateway.networking.k8s.io/v1/namespaces/shop/httproutes/{route}/status");
            patches
                .lock()
                .unwrap()
                .iter()
                .find(|(p, _)| *p == path)
                .map(|(_, b)| b.clone())
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while ["good", "unresolved", "sticky"].iter().any(|r| status_of(r).is_none()) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "status written: {:?}",
                patches.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let conditions = |route: &str| -> Vec<(String, String, String)> {
            let body = status_of(route).unwrap();
            assert_eq!(body["metadata"]["resourceVersion"], "7", "conditional on what was read");
            let parent = &body["status"]["parents"][0];
            assert_eq!(parent["controllerName"], super::super::gateway_kube::CONTROLLER_NAME);
            assert_eq!(parent["parentRef"]["name"], "web");
            parent["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| {
                    assert_eq!(c["observedGeneration"], 4);
                    (
                        c["type"].as_str().unwrap().to_string(),
                        c["status"].as_str().unwrap().to_string(),
                        c["message"].as_str().unwrap().to_string(),
                    )
                })
                .collect()
        };
        let good = conditions("good");
        assert_eq!((good[0].1.as_str(), good[1].1.as_str()), ("True", "True"), "{good:?}");
        let unresolved = conditions("unresolved");
        assert_eq!(
            (
                unresolved[0].1.as_str(),
                unresolved[1].0.as_str(),
                unresolved[1].1.as_str()
            ),
            ("True", "ResolvedRefs", "False"),
            "{unresolved:?}"
        );
        let refused = conditions("sticky");
        assert_eq!((refused[0].0.as_str(), refused[0].1.as_str()), ("Accepted", "False"));
        assert!(refused[0].2.contains("spec.rules.0.sessionPersistence"), "{refused:?}");
        task.abort();
    }
}
