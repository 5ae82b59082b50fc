//! Gateway API resources from the Kubernetes API: HTTPRoute, GRPCRoute,
//! TCPRoute, UDPRoute and the GEP-3779 AuthorizationPolicy, read with
//! untyped (`DynamicObject`) reflectors and parsed one object at a time,
//! and route status (`Accepted`, `ResolvedRefs`) written back.
//!
//! Untyped on purpose: a typed reflector fails its whole list on one object
//! that does not parse, so one route with a field this mesh does not
//! implement would stop every route from being read. Here that one route is
//! refused (its status says why; its last good version stays in force) and
//! the rest apply.
//!
//! Gateway API is optional in a cluster: a kind whose CRD is not installed
//! counts as an empty list, so the agent still starts; its watcher keeps
//! retrying and picks the kind up when the CRD appears.
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt as _;
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, ListParams, Patch, PatchParams},
    core::GroupVersionKind,
    runtime::{WatchStreamExt as _, reflector, watcher},
};
use serde_json::{Value, json};

use crate::{
    gateway::{AuthorizationPolicySpec, GRPCRouteSpec, HTTPRouteSpec, L4RouteSpec},
    state::{GatewaySet, JudgeRoutes, Named, RefusedRoute, Snapshot},
};

/// The `controllerName` of this mesh's entries in `status.parents`.
pub const CONTROLLER_NAME: &str = "mesh.dev/mesh-agent";

/// One Gateway API kind the mesh reads, with the versions it accepts in
/// the order it prefers them (TCPRoute and UDPRoute are `v1` in the
/// Standard channel since Gateway API v1.6, `v1alpha2` before).
struct Kind {
    kind: &'static str,
    group: &'static str,
    plural: &'static str,
    versions: &'static [&'static str],
    /// Whether it has route status (AuthorizationPolicy's is ancestor-based
    /// and not written yet).
    route: bool,
}

const STANDARD: &str = "gateway.networking.k8s.io";

const KINDS: [Kind; 6] = [
    Kind {
        kind: "HTTPRoute",
        group: STANDARD,
        plural: "httproutes",
        versions: &["v1"],
        route: true,
    },
    Kind {
        kind: "GRPCRoute",
        group: STANDARD,
        plural: "grpcroutes",
        versions: &["v1"],
        route: true,
    },
    Kind {
        kind: "TCPRoute",
        group: STANDARD,
        plural: "tcproutes",
        versions: &["v1", "v1alpha2"],
        route: true,
    },
    Kind {
        kind: "UDPRoute",
        group: STANDARD,
        plural: "udproutes",
        versions: &["v1", "v1alpha2"],
        route: true,
    },
    Kind {
        kind: "AuthorizationPolicy",
        group: "gateway.networking.x-k8s.io",
        plural: "authorizationpolicies",
        versions: &["v1alpha1"],
        route: false,
    },
    // The mesh's own policy attachment, read the same way.
    Kind {
        kind: "TrafficPolicy",
        group: "mesh.dev",
        plural: "trafficpolicies",
        versions: &["v1alpha1"],
        route: false,
    },
];

struct Watched {
    kind: &'static Kind,
    resource: ApiResource,
    store: reflector::Store<DynamicObject>,
    /// Whether the API server served the kind when the agent started.
    installed: bool,
}

/// The last version of each object that parsed, by `Kind ns/name`: what
/// stays in force while a newer version is refused.
#[derive(Default)]
struct LastGood {
    http: BTreeMap<String, HTTPRouteSpec>,
    grpc: BTreeMap<String, GRPCRouteSpec>,
    tcp: BTreeMap<String, L4RouteSpec>,
    udp: BTreeMap<String, L4RouteSpec>,
    authz: BTreeMap<String, AuthorizationPolicySpec>,
    traffic: BTreeMap<String, crate::traffic_policy::TrafficPolicySpec>,
}

pub struct GatewayStores {
    client: Client,
    watched: Vec<Watched>,
    last_good: Mutex<LastGood>,
}

/// The first version of `kind` the API server serves, if any.
async fn served_version(client: &Client, kind: &'static Kind) -> Option<ApiResource> {
    for version in kind.versions {
        let resource =
            ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(kind.group, version, kind.kind), kind.plural);
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
        match api.list(&ListParams::default().limit(1)).await {
            Ok(_) => return Some(resource),
            Err(kube::Error::Api(e)) if e.code == 404 => continue,
            Err(e) => {
                // Not "absent": the watcher below retries and reports it.
                tracing::warn!(kind = kind.kind, error = %e, "kubernetes source: cannot list Gateway API kind; retrying");
                return Some(resource);
            }
        }
    }
    None
}

impl GatewayStores {
    /// Probes which kinds are installed and starts a reflector for each
    /// kind (installed or not: a CRD installed later is picked up).
    pub async fn start(client: &Client, changed: Arc<tokio::sync::Notify>) -> GatewayStores {
        let mut watched = Vec::new();
        for kind in &KINDS {
            let served = served_version(client, kind).await;
            let installed = served.is_some();
            if !installed {
                tracing::info!(
                    kind = kind.kind,
                    versions = ?kind.versions,
                    "kubernetes source: Gateway API kind not installed (no CRD); read as empty until it is"
                );
            }
            let resource = served.unwrap_or_else(|| {
                ApiResource::from_gvk_with_plural(
                    &GroupVersionKind::gvk(kind.group, kind.versions[0], kind.kind),
                    kind.plural,
                )
            });
            let writer = reflector::store::Writer::new(resource.clone());
            let store = writer.as_reader();
            let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
            let stream = reflector(writer, watcher(api, watcher::Config::default())).default_backoff();
            let changed = changed.clone();
            tokio::spawn(async move {
                let mut stream = std::pin::pin!(stream);
                while let Some(event) = stream.next().await {
                    if let Err(e) = event {
                        if installed {
                            tracing::warn!(kind = kind.kind, error = %e, "kubernetes source: watch error; retrying");
                        } else {
                            tracing::debug!(kind = kind.kind, error = %e, "kubernetes source: kind still not installed");
                        }
                    }
                    changed.notify_one();
                }
            });
            watched.push(Watched {
                kind,
                resource,
                store,
                installed,
            });
        }
        GatewayStores {
            client: client.clone(),
            watched,
            last_good: Mutex::default(),
        }
    }

    /// Waits for the first full list of every installed kind.
    pub async fn wait_until_ready(&self) -> Result<(), reflector::store::WriterDropped> {
        for w in self.watched.iter().filter(|w| w.installed) {
            w.store.wait_until_ready().await?;
        }
        Ok(())
    }

    /// Parses every object into `snap.gateway`; returns the objects refused
    /// (each with why; its last good version, if any, is used instead).
    pub fn fold(&self, snap: &mut Snapshot) -> Vec<RefusedRoute> {
        let mut refused = Vec::new();
        let mut last = self.last_good.lock().expect("last-good lock");
        let mut set = GatewaySet::default();
        for w in &self.watched {
            let objects = w.store.state();
            match w.kind.kind {
                "HTTPRoute" => set.http_routes = parse_all(w.kind.kind, &objects, &mut last.http, &mut refused),
                "GRPCRoute" => set.grpc_routes = parse_all(w.kind.kind, &objects, &mut last.grpc, &mut refused),
                "TCPRoute" => set.tcp_routes = parse_all(w.kind.kind, &objects, &mut last.tcp, &mut refused),
                "UDPRoute" => set.udp_routes = parse_all(w.kind.kind, &objects, &mut last.udp, &mut refused),
                "AuthorizationPolicy" => {
                    set.authorization_policies = parse_all(w.kind.kind, &objects, &mut last.authz, &mut refused)
                }
                _ => set.traffic_policies = parse_all(w.kind.kind, &objects, &mut last.traffic, &mut refused),
            }
        }
        snap.gateway = set;
        refused
    }

    /// Writes this mesh's `status.parents` entries of every route bound to
    /// a Service, where they differ from what is stored. Every agent runs
    /// this on the same view and computes the same status; the write is
    /// conditional on the object's resourceVersion, so agents racing for
    /// one change cost one write and some 409s, and the rest see no
    /// difference afterwards.
    pub async fn write_status(&self, judge: &JudgeRoutes, snap: &Snapshot, parse_refused: &[RefusedRoute]) {
        let verdicts = judge(snap);
        for w in self.watched.iter().filter(|w| w.kind.route) {
            for object in w.store.state() {
                let (Some(ns), Some(name)) = (object.metadata.namespace.as_deref(), object.metadata.name.as_deref())
                else {
                    continue;
                };
                let route = format!("{} {ns}/{name}", w.kind.kind);
                let refused = parse_refused
                    .iter()
                    .chain(&verdicts.refused)
                    .find(|r| r.name == route)
                    .map(|r| r.reason.as_str());
                let Some(conditions) = conditions(refused, verdicts.accepted.get(&route)) else {
                    continue; // bound to a Gateway only: not this mesh's to report
                };
                let generation = object.metadata.generation.unwrap_or(0);
                let Some(parents) = status_parents(&object.data, &conditions, generation) else {
                    continue; // already says so
                };
                let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), ns, &w.resource);
                let patch = json!({
                    "metadata": {"resourceVersion": object.metadata.resource_version},
                    "status": {"parents": parents},
                });
                match api
                    .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    Ok(_) => tracing::info!(route = %route, "route status written"),
                    Err(kube::Error::Api(e)) if e.code == 409 => {
                        tracing::debug!(route = %route, "route status changed meanwhile (another agent wrote it)")
                    }
                    Err(e) => tracing::warn!(
                        route = %route,
                        error = %e,
                        "cannot write route status: check that the agent's ClusterRole may patch {}/status",
                        w.kind.plural
                    ),
                }
            }
        }
    }
}

fn parse_all<T: serde::de::DeserializeOwned + Clone>(
    kind: &str,
    objects: &[Arc<DynamicObject>],
    last_good: &mut BTreeMap<String, T>,
    refused: &mut Vec<RefusedRoute>,
) -> Vec<Named<T>> {
    let mut out = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for o in objects {
        let namespace = o.metadata.namespace.clone().unwrap_or_else(|| "default".into());
        let name = o.metadata.name.clone().unwrap_or_default();
        let key = format!("{namespace}/{name}");
        seen.insert(key.clone());
        let spec = match o.data.get("spec") {
            Some(spec) => super::strict_spec::<T, _>(spec.clone(), kind, &key),
            None => Err(format!("{kind} {key}: spec is required; refused")),
        };
        let spec = match spec {
            Ok(spec) => {
                last_good.insert(key.clone(), spec.clone());
                spec
            }
            Err(reason) => {
                let kept = last_good.get(&key).cloned();
                tracing::warn!(resource = %format!("{kind} {key}"), reason = %reason, previous_version_in_force = kept.is_some(), "Gateway API resource refused");
                refused.push(RefusedRoute {
                    name: format!("{kind} {key}"),
                    reason,
                });
                match kept {
                    Some(spec) => spec,
                    None => continue,
                }
            }
        };
        out.push(Named { namespace, name, spec });
    }
    last_good.retain(|k, _| seen.contains(k));
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    out
}

/// One condition as Gateway API writes it (without its transition time).
#[derive(Clone, Debug, PartialEq)]
struct Condition {
    kind: &'static str,
    status: &'static str,
    reason: &'static str,
    message: String,
}

/// The route's conditions: `None` when the mesh does not serve it (no
/// Service parent). A refused route reports only `Accepted: False`, since
/// its references were not resolved.
fn conditions(refused: Option<&str>, accepted: Option<&Vec<String>>) -> Option<Vec<Condition>> {
    if let Some(reason) = refused {
        return Some(vec![Condition {
            kind: "Accepted",
            status: "False",
            reason: "UnsupportedValue",
            message: reason.to_string(),
        }]);
    }
    let unresolved = accepted?;
    let mut out = vec![Condition {
        kind: "Accepted",
        status: "True",
        reason: "Accepted",
        message: "in force on the mesh's nodes".into(),
    }];
    out.push(if unresolved.is_empty() {
        Condition {
            kind: "ResolvedRefs",
            status: "True",
            reason: "ResolvedRefs",
            message: "every backend resolved".into(),
        }
    } else {
        Condition {
            kind: "ResolvedRefs",
            status: "False",
            reason: "BackendNotFound",
            message: format!("requests for these backends get a 500: {}", unresolved.join("; ")),
        }
    });
    Some(out)
}

/// The object's `status.parents` with this mesh's entries (one per Service
/// parentRef) replaced, other controllers' entries kept; `None` when what
/// is stored already says the same. A condition whose status did not
/// change keeps its lastTransitionTime.
fn status_parents(data: &Value, conditions: &[Condition], generation: i64) -> Option<Vec<Value>> {
    let stored: Vec<Value> = data
        .pointer("/status/parents")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let ours = |p: &Value| p["controllerName"] == CONTROLLER_NAME;
    let service_parents: Vec<Value> = data
        .pointer("/spec/parentRefs")
        .and_then(Value::as_array)
        .map(|refs| {
            refs.iter()
                .filter(|r| {
                    r["kind"] == "Service"
                        && matches!(r["group"].as_str(), Some("" | "core"))
                        && r.get("name").is_some()
                })
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    if service_parents.is_empty() {
        return None;
    }
    let now = k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .ok()?
        .to_string();
    let mut fresh = Vec::new();
    for parent in &service_parents {
        let before = stored.iter().find(|p| ours(p) && &p["parentRef"] == parent);
        let conds: Vec<Value> = conditions
            .iter()
            .map(|c| {
                let kept_time = before
                    .and_then(|b| b["conditions"].as_array())
                    .and_then(|cs| cs.iter().find(|x| x["type"] == c.kind && x["status"] == c.status))
                    .and_then(|x| x["lastTransitionTime"].as_str().map(str::to_string));
                json!({
                    "type": c.kind, "status": c.status, "reason": c.reason, "message": c.message,
                    "observedGeneration": generation,
                    "lastTransitionTime": kept_time.unwrap_or_else(|| now.clone()),
                })
            })
            .collect();
        fresh.push(json!({"parentRef": parent, "controllerName": CONTROLLER_NAME, "conditions": conds}));
    }
    let mine_before: Vec<&Value> = stored.iter().filter(|p| ours(p)).collect();
    if mine_before.len() == fresh.len() && mine_before.iter().zip(&fresh).all(|(a, b)| *a == b) {
        return None;
    }
    let mut parents: Vec<Value> = stored.into_iter().filter(|p| !ours(p)).collect();
    parents.extend(fresh);
    Some(parents)
}

/// Runs [`GatewayStores::write_status`] for each published view, and again
/// every 30 s (a write that lost a race converges on the next pass).
pub async fn status_loop(
    stores: Arc<GatewayStores>,
    judge: JudgeRoutes,
    mut views: tokio::sync::watch::Receiver<(Snapshot, Vec<RefusedRoute>)>,
) {
    loop {
        let (snap, refused) = views.borrow_and_update().clone();
        if snap.generation > 0 {
            stores.write_status(&judge, &snap, &refused).await;
        }
        tokio::select! {
            changed = views.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(Duration::from_secs(30)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cond(kind: &'static str, status: &'static str) -> Condition {
        Condition {
            kind,
            status,
            reason: "R",
            message: "m".into(),
        }
    }

    /// Other controllers' entries stay; ours are replaced per Service
    /// parent; an unchanged status is not written again, and a condition
    /// that keeps its status keeps its transition time.
    #[test]
    fn status_parents_replace_only_this_meshs_entries() {
        let mut data = json!({
            "spec": {"parentRefs": [
                {"group": "", "kind": "Service", "name": "echo", "port": 80},
                {"name": "a-gateway"},
            ]},
            "status": {"parents": [
                {"parentRef": {"name": "a-gateway"}, "controllerName": "example.com/gateway", "conditions": []},
            ]},
        });
        let conds = [cond("Accepted", "True"), cond("ResolvedRefs", "True")];
        let parents = status_parents(&data, &conds, 2).expect("first write");
        assert_eq!(parents.len(), 2);
        assert_eq!(parents[0]["controllerName"], "example.com/gateway");
        assert_eq!(parents[1]["parentRef"]["name"], "echo");
        assert_eq!(parents[1]["conditions"][0]["observedGeneration"], 2);
        data["status"]["parents"] = Value::Array(parents.clone());
        assert_eq!(status_parents(&data, &conds, 2), None, "already written");
        let time = parents[1]["conditions"][0]["lastTransitionTime"].clone();
        let changed = [cond("Accepted", "True"), cond("ResolvedRefs", "False")];
        let again = status_parents(&data, &changed, 3).expect("ResolvedRefs changed");
        assert_eq!(again[1]["conditions"][0]["lastTransitionTime"], time);
        assert_eq!(again[1]["conditions"][1]["status"], "False");
        let gateway_only = json!({"spec": {"parentRefs": [{"name": "a-gateway"}]}});
        assert_eq!(status_parents(&gateway_only, &conds, 1), None);
    }
}
