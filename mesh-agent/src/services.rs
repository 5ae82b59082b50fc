//! Services and SMI TrafficSplits, compiled into the slot tables that
//! `mesh_connect4` picks endpoints from (socket-level load balancing).
//!
//! A service port without a TrafficSplit spreads connections evenly over its
//! ready endpoints: one slot each. A TrafficSplit on the root service spreads
//! them over its backend services by weight: [`SPLIT_SLOTS`] slots shared out
//! by weight, then evenly among each backend's ready endpoints (largest
//! remainder rounding, so a 90/10 split is exactly 900/100 slots).
//!
//! A TrafficSplit with `matches` (HTTPRouteGroups) splits per request, which
//! the kernel cannot do: its root service's table is marked "via agent", so
//! `mesh_connect4` hands those connections to the agent, and the agent
//! routes each request ([`HttpSplit::route`]): matching requests by weight
//! over the backends, all others to the root service's own endpoints, as
//! the SMI spec says.
//!
//! Gateway API routes bound to a Service port (`gamma`) take precedence
//! over an SMI TrafficSplit on the same port: HTTPRoutes and GRPCRoutes
//! make the port "via agent" with their rules (unmatched requests get a
//! 404), a TCPRoute or UDPRoute replaces the port's slots with its weighted
//! backends.
//!
//! A TrafficSplit that does not make sense (weights summing to 0, a negative
//! weight, a backend service that does not exist or lacks one of the root's
//! ports) is refused with its reason, and the last good version of the same
//! TrafficSplit stays in force.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

pub use crate::tables::ServiceTable;
use crate::{
    gamma::{Backend, Gamma},
    policy::HttpMatch,
    routes::{HttpRoutes, Mirror, Pool, RequestMatch, Rule, Slot},
    smi::TrafficSplitSpec,
    state::{Named, Service, ServicePort, Snapshot},
};

/// Slots of a split service's table: shares are exact to 0.1%.
pub const SPLIT_SLOTS: u64 = 1000;

/// The per-request routing in force (HTTP-matched splits, Gateway API
/// HTTP and gRPC routes), by root VIP:port.
pub type HttpSplits = BTreeMap<SocketAddr, Arc<HttpRoutes>>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefusedSplit {
    pub name: String,
    pub reason: String,
    /// Whether an earlier version of it is still in force.
    pub kept_previous: bool,
}

/// The TrafficSplits last accepted, by `namespace/name`: what stays in force
/// when a new version is refused.
#[derive(Debug, Default)]
pub struct Splits {
    accepted: BTreeMap<String, Named<TrafficSplitSpec>>,
    /// TrafficPolicies' state, kept across compiles.
    resilience: crate::resilience::Registry,
}

#[derive(Debug, Default)]
pub struct Compiled {
    pub tables: Vec<ServiceTable>,
    pub refused: Vec<RefusedSplit>,
    pub http: HttpSplits,
    /// Gateway API routes in force (with the backends that did not
    /// resolve) and refused: their Accepted and ResolvedRefs conditions.
    pub routes_accepted: BTreeMap<String, Vec<String>>,
    pub routes_refused: Vec<crate::gamma::RefusedRoute>,
    /// TrafficPolicies in force by Service port, with the endpoint index
    /// of their rate limits, and those refused.
    pub traffic_policies: crate::resilience::InForce,
}

impl Splits {
    /// Compiles every ClusterIP service port of the snapshot, applying the
    /// TrafficSplits that validate (or their last good versions).
    pub fn compile(&mut self, snap: &Snapshot) -> Compiled {
        let mut refused = Vec::new();
        let mut in_force: BTreeMap<String, Named<TrafficSplitSpec>> = BTreeMap::new();
        let present: BTreeSet<String> = snap
            .smi
            .traffic_splits
            .iter()
            .map(|s| format!("{}/{}", s.namespace, s.name))
            .collect();
        for split in &snap.smi.traffic_splits {
            let name = format!("{}/{}", split.namespace, split.name);
            match validate(split, snap) {
                Ok(()) => {
                    in_force.insert(name, split.clone());
                }
                Err(reason) => {
                    let previous = self.accepted.get(&name).filter(|p| validate(p, snap).is_ok());
                    if let Some(p) = previous {
                        in_force.insert(name.clone(), p.clone());
                    }
                    refused.push(RefusedSplit {
                        name,
                        reason,
                        kept_previous: previous.is_some(),
                    });
                }
            }
        }
        // Deleted splits are forgotten; refused ones keep their last good version.
        self.accepted.retain(|k, _| present.contains(k));
        for (k, v) in &in_force {
            if !refused.iter().any(|r| &r.name == k) {
                self.accepted.insert(k.clone(), v.clone());
            }
        }
        // One split per root service: the first by name wins.
        let mut by_root: BTreeMap<String, &Named<TrafficSplitSpec>> = BTreeMap::new();
        for (name, split) in &in_force {
            let root = format!("{}/{}", split.namespace, service_name(&split.spec.service));
            if let Some(first) = by_root.get(&root) {
                refused.push(RefusedSplit {
                    name: name.clone(),
                    reason: format!(
                        "service {root} is already split by TrafficSplit {}/{}",
                        first.namespace, first.name
                    ),
                    kept_previous: false,
                });
                continue;
            }
            by_root.insert(root, split);
        }

        let gamma = Gamma::compile(snap);
        let mut policies = self.resilience.compile(snap);
        let mut tables = Vec::new();
        let mut http = HttpSplits::new();
        // A dual-stack Service has a ClusterIP per family; each gets its own
        // tables, with the endpoints of its family (the EndpointSlices of
        // that address type), as kube-proxy does.
        for (key, svc) in &snap.services {
            for (vip, port) in svc
                .cluster_ips
                .iter()
                .flat_map(|vip| svc.ports.iter().map(move |p| (*vip, p)))
            {
                let family = if vip.is_ipv4() { "" } else { "/ipv6" };
                let (protocol, name) = if port.protocol.eq_ignore_ascii_case("TCP") {
                    (mesh_common::PROTO_TCP, format!("{key}:{}{family}", port.port))
                } else if port.protocol.eq_ignore_ascii_case("UDP") {
                    (mesh_common::PROTO_UDP, format!("{key}:{}/udp{family}", port.port))
                } else {
                    continue; // SCTP: not meshed
                };
                let mut table = ServiceTable {
                    name: name.clone(),
                    vip,
                    port: port.port,
                    protocol,
                    slots: endpoints(svc, port, vip),
                    split: None,
                    via_agent: false,
                    relays: BTreeMap::new(),
                };
                let tcp = protocol == mesh_common::PROTO_TCP;
                let at = (key.clone(), port.port);
                let client_policy = policies.client.get(&at).filter(|_| tcp).cloned();
                let limit = policies.limits.get(&at).filter(|_| tcp).cloned();
                let l4_route = if tcp {
                    gamma.tcp.get(&(key.clone(), port.port))
                } else {
                    gamma.udp.get(&(key.clone(), port.port))
                };
                if let Some((route_names, rules)) = gamma.http.get(&(key.clone(), port.port)).filter(|_| tcp) {
                    let source = route_names.join(", ");
                    table.via_agent = true;
                    table.split = Some(source.clone());
                    http.insert(
                        SocketAddr::new(vip, port.port),
                        Arc::new(HttpRoutes {
                            source,
                            service: name,
                            rules: rules
                                .iter()
                                .map(|r| Rule {
                                    name: r.name.clone(),
                                    matches: vec![RequestMatch::Gateway(r.matched.clone())],
                                    pool: Pool::new(backend_slots(&r.backends, vip, snap)),
                                    filters: r.filters.clone(),
                                    mirror: r.mirror.as_ref().map(|(b, percent)| Mirror {
                                        service: format!("{}:{}", b.service, b.port),
                                        pool: Pool::new(backend_slots(std::slice::from_ref(b), vip, snap)),
                                        percent: *percent,
                                    }),
                                })
                                .collect(),
                            otherwise: None,
                            resilience: client_policy.clone(),
                        }),
                    );
                } else if let Some((route, backends)) = l4_route {
                    if let Some(name) = client_policy
                        .as_ref()
                        .map(|c| &c.name)
                        .or(limit.as_ref().map(|l| &l.name))
                    {
                        policies.refused.push(crate::resilience::Refused {
                            name: name.clone(),
                            reason: format!("{name} is not applied to {}: {route} carries it at L4 (TCP), and a TrafficPolicy needs HTTP", table.name),
                            kept_previous: false,
                        });
                    }
                    // At L4 nothing can answer 500: unresolved backends get no share.
                    table.slots = backend_slots(backends, vip, snap)
                        .into_iter()
                        .filter_map(|s| match s {
                            Slot::Endpoint(e) => Some((e.ip(), e.port())),
                            _ => None,
                        })
                        .collect();
                    table.split = Some(route.clone());
                } else if let Some(split) = by_root.get(key) {
                    let split_name = format!("{}/{}", split.namespace, split.name);
                    let backends = split_slots(split, port.port, vip, snap);
                    // validate() compiled these already; an error here cannot happen.
                    match route_matches(split, snap) {
                        Ok(None) => table.slots = backends,
                        // Requests are HTTP: a UDP port of the root is split by weight only.
                        Ok(Some(_)) if protocol == mesh_common::PROTO_UDP => table.slots = backends,
                        Ok(Some(matches)) => {
                            table.via_agent = true;
                            let endpoint = |(ip, port): &(IpAddr, u16)| Slot::Endpoint(SocketAddr::new(*ip, *port));
                            http.insert(
                                SocketAddr::new(vip, port.port),
                                Arc::new(HttpRoutes {
                                    source: split_name.clone(),
                                    service: name,
                                    rules: vec![Rule {
                                        name: format!("TrafficSplit {split_name}"),
                                        matches: matches.into_iter().map(RequestMatch::Smi).collect(),
                                        pool: Pool::new(backends.iter().map(endpoint).collect()),
                                        filters: Default::default(),
                                        mirror: None,
                                    }],
                                    otherwise: Some(Pool::new(table.slots.iter().map(endpoint).collect())),
                                    resilience: client_policy.clone(),
                                }),
                            );
                        }
                        Err(_) => continue,
                    }
                    table.split = Some(split_name);
                }
                // A TrafficPolicy needs the agent to read requests: a port
                // it covers goes via the agent, to its own slots.
                if let Some(name) = client_policy
                    .as_ref()
                    .map(|c| &c.name)
                    .or(limit.as_ref().map(|l| &l.name))
                    && !table.via_agent
                    && l4_route.is_none()
                {
                    table.via_agent = true;
                    table.split.get_or_insert_with(|| name.clone());
                    let slots = table
                        .slots
                        .iter()
                        .map(|(ip, port)| Slot::Endpoint(SocketAddr::new(*ip, *port)))
                        .collect();
                    http.insert(
                        SocketAddr::new(vip, port.port),
                        Arc::new(HttpRoutes {
                            source: name.clone(),
                            service: table.name.clone(),
                            rules: Vec::new(),
                            otherwise: Some(Pool::new(slots)),
                            resilience: client_policy.clone(),
                        }),
                    );
                }
                // The destination side finds a port's rate limit by endpoint.
                if let Some(limit) = limit.filter(|_| l4_route.is_none()) {
                    for (ip, target) in endpoints(svc, port, vip) {
                        let at = policies.by_endpoint.entry(SocketAddr::new(ip, target)).or_default();
                        if !at.iter().any(|l| Arc::ptr_eq(l, &limit)) {
                            at.push(limit.clone());
                        }
                    }
                }
                tables.push(table);
            }
        }
        Compiled {
            tables,
            refused,
            http,
            routes_accepted: gamma.accepted,
            routes_refused: gamma.refused,
            traffic_policies: policies,
        }
    }
}

/// `name`, `name.namespace` or `name.namespace.svc.cluster.local`: the name.
fn service_name(reference: &str) -> &str {
    reference.split('.').next().unwrap_or(reference)
}

fn validate(split: &Named<TrafficSplitSpec>, snap: &Snapshot) -> Result<(), String> {
    let ns = &split.namespace;
    let root_name = service_name(&split.spec.service);
    let root = snap
        .services
        .get(&format!("{ns}/{root_name}"))
        .ok_or_else(|| format!("root service {ns}/{root_name} does not exist"))?;
    if root.cluster_ips.is_empty() {
        return Err(format!("root service {ns}/{root_name} has no ClusterIP (headless)"));
    }
    route_matches(split, snap)?;
    if split.spec.backends.is_empty() {
        return Err("no backends".into());
    }
    // As the SMI spec says: a backend Service that does not exist yet (the
    // canary workflow creates the split first, v2 at weight 0), or has no
    // endpoints, or lacks one of the root's ports, only has nothing to
    // send to (for that port); it never refuses the split (`split_slots`).
    let mut total: i64 = 0;
    for b in &split.spec.backends {
        if b.weight < 0 {
            return Err(format!("backend {} has a negative weight ({})", b.service, b.weight));
        }
        if service_name(&b.service) == root_name {
            return Err(format!(
                "backend {} is the root service itself (the SMI spec forbids a split naming its own service)",
                b.service
            ));
        }
        total = total.saturating_add(b.weight);
    }
    if total == 0 {
        return Err("the backends' weights sum to 0".into());
    }
    Ok(())
}

/// The HTTP matches of a split's `matches` (HTTPRouteGroups of its
/// namespace, all of each group's matches); `None` for a plain split.
fn route_matches(split: &Named<TrafficSplitSpec>, snap: &Snapshot) -> Result<Option<Vec<HttpMatch>>, String> {
    let Some(refs) = split.spec.matches.as_ref().filter(|m| !m.is_empty()) else {
        return Ok(None);
    };
    let mut out = Vec::new();
    for r in refs {
        if r.kind != "HTTPRouteGroup" {
            return Err(format!(
                "matches: kind {:?} is not supported (only HTTPRouteGroup)",
                r.kind
            ));
        }
        let group = snap
            .smi
            .http_route_groups
            .iter()
            .find(|g| g.namespace == split.namespace && g.name == r.name)
            .ok_or_else(|| format!("matches: HTTPRouteGroup {}/{} does not exist", split.namespace, r.name))?;
        let matches = crate::policy::http_matches(group)
            .map_err(|e| format!("matches: HTTPRouteGroup {}/{}: {e}", split.namespace, r.name))?;
        if matches.is_empty() {
            return Err(format!(
                "matches: HTTPRouteGroup {}/{} has no matches",
                split.namespace, r.name
            ));
        }
        out.extend(matches);
    }
    Ok(Some(out))
}

/// The ready endpoints of `svc` for one of its ports, as (IP, target
/// port), of the family of `vip` (the ClusterIP they serve).
fn endpoints(svc: &Service, port: &ServicePort, vip: IpAddr) -> Vec<(IpAddr, u16)> {
    let mut out: Vec<(IpAddr, u16)> = svc
        .endpoints
        .iter()
        .filter(|e| e.ready && e.ip.is_ipv4() == vip.is_ipv4())
        .filter_map(|e| {
            let target = e
                .ports
                .iter()
                .find(|(name, _)| *name == port.name)
                .or_else(|| (e.ports.len() == 1).then(|| &e.ports[0]))
                .map(|(_, p)| *p)
                // A slice without ports: the service port itself.
                .or_else(|| e.ports.is_empty().then_some(port.port))?;
            Some((e.ip, target))
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// SPLIT_SLOTS slots shared by weight, then evenly among each backend's
/// ready endpoints. A backend without ready endpoints gets no share (its
/// weight goes to the others) rather than failing its part of connects.
fn split_slots(split: &Named<TrafficSplitSpec>, port: u16, vip: IpAddr, snap: &Snapshot) -> Vec<(IpAddr, u16)> {
    let mut shares: Vec<((IpAddr, u16), u64)> = Vec::new(); // (endpoint, weight numerator)
    let mut groups = Vec::new();
    for b in &split.spec.backends {
        let key = format!("{}/{}", split.namespace, service_name(&b.service));
        let Some(svc) = snap.services.get(&key) else { continue };
        let Some(p) = svc.ports.iter().find(|p| p.port == port) else {
            continue;
        };
        let eps = endpoints(svc, p, vip);
        if b.weight > 0 && !eps.is_empty() {
            groups.push((b.weight as u64, eps));
        }
    }
    // Endpoint e of backend b gets weight_b / |E_b| of the total: scale by
    // the product-free common denominator, the lcm of the group sizes.
    let lcm = groups.iter().fold(1u64, |l, (_, e)| lcm(l, e.len() as u64));
    for (w, eps) in &groups {
        for e in eps {
            shares.push((*e, w * (lcm / eps.len() as u64)));
        }
    }
    largest_remainder(&shares, SPLIT_SLOTS)
}

/// A Gateway API rule's backends as [`SPLIT_SLOTS`] slots: shared by
/// weight, then evenly among each backend's ready endpoints (of the family
/// of `vip`). A backend that does not resolve keeps its share as
/// [`Slot::Invalid`] (500), one without a ready endpoint as
/// [`Slot::NoEndpoint`] (503); zero weights or no backends leave no slot.
pub fn backend_slots(backends: &[Backend], vip: IpAddr, snap: &Snapshot) -> Vec<Slot> {
    let mut groups: Vec<(u64, Vec<Slot>)> = Vec::new();
    for b in backends.iter().filter(|b| b.weight > 0) {
        let svc = snap.services.get(&b.service);
        let port = svc.and_then(|s| s.ports.iter().find(|p| p.port == b.port));
        let slots = match (svc, port, &b.invalid) {
            (Some(svc), Some(port), None) => {
                let eps: Vec<Slot> = endpoints(svc, port, vip)
                    .into_iter()
                    .map(|(ip, p)| Slot::Endpoint(SocketAddr::new(ip, p)))
                    .collect();
                if eps.is_empty() { vec![Slot::NoEndpoint] } else { eps }
            }
            _ => vec![Slot::Invalid],
        };
        groups.push((b.weight, slots));
    }
    let lcm = groups.iter().fold(1u64, |l, (_, e)| lcm(l, e.len() as u64));
    let shares: Vec<(Slot, u64)> = groups
        .iter()
        .flat_map(|(w, slots)| slots.iter().map(move |s| (*s, w * (lcm / slots.len() as u64))))
        .collect();
    largest_remainder(&shares, SPLIT_SLOTS)
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

fn lcm(a: u64, b: u64) -> u64 {
    a / gcd(a, b) * b
}

/// `total` slots in proportion to the weights, rounded so they add up,
/// laid out interleaved ([`interleave`]).
fn largest_remainder<T: Copy>(weights: &[(T, u64)], total: u64) -> Vec<T> {
    let sum: u128 = weights.iter().map(|(_, w)| u128::from(*w)).sum();
    if sum == 0 {
        return Vec::new();
    }
    let mut counts: Vec<(usize, u64, u128)> = weights
        .iter()
        .enumerate()
        .map(|(i, (_, w))| {
            let exact = u128::from(*w) * u128::from(total);
            (i, (exact / sum) as u64, exact % sum)
        })
        .collect();
    let given: u64 = counts.iter().map(|c| c.1).sum();
    let mut by_remainder: Vec<usize> = (0..counts.len()).collect();
    by_remainder.sort_by(|a, b| counts[*b].2.cmp(&counts[*a].2).then(a.cmp(b)));
    for i in by_remainder.into_iter().take((total - given) as usize) {
        counts[i].1 += 1;
    }
    let counts: Vec<(T, u64)> = counts.into_iter().map(|(i, n, _)| (weights[i].0, n)).collect();
    interleave(&counts)
}

/// A table where each item's `n` slots are spread evenly: its k-th slot
/// sits at (2k+1)/2n of the way through (stride scheduling), ties go to the
/// earlier item. The kernel and the agent take turns through a table
/// (`connect4::pick_backend`, [`HttpSplit::route`]), so any run of
/// consecutive picks holds each item's share to within about one slot;
/// a table of runs (all of v1, then all of v2) would send a whole run of
/// new connections to one endpoint.
pub fn interleave<T: Copy>(counts: &[(T, u64)]) -> Vec<T> {
    // (numerator 2k+1, denominator 2n, item), compared exactly.
    let mut slots: Vec<(u64, u64, usize)> = counts
        .iter()
        .enumerate()
        .flat_map(|(i, (_, n))| (0..*n).map(move |k| (2 * k + 1, 2 * n, i)))
        .collect();
    slots.sort_by(|a, b| {
        (u128::from(a.0) * u128::from(b.1))
            .cmp(&(u128::from(b.0) * u128::from(a.1)))
            .then(a.2.cmp(&b.2))
    });
    slots.into_iter().map(|(_, _, i)| counts[i].0).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::ServiceEndpoint;
    use crate::{authz::HttpRequest, routes::Way, smi::TrafficSplitBackend};

    fn svc(name: &str, vip: &str, port: u16, eps: &[&str]) -> (String, Service) {
        (
            format!("t/{name}"),
            Service {
                namespace: "t".into(),
                name: name.into(),
                cluster_ips: vec![vip.parse().unwrap()],
                ports: vec![ServicePort {
                    name: None,
                    port,
                    protocol: "TCP".into(),
                }],
                endpoints: eps
                    .iter()
                    .map(|ip| ServiceEndpoint {
                        ip: ip.parse().unwrap(),
                        ready: true,
                        node: None,
                        ports: vec![(None, 8080)],
                    })
                    .collect(),
            },
        )
    }

    fn split(name: &str, backends: &[(&str, i64)]) -> Named<TrafficSplitSpec> {
        Named {
            namespace: "t".into(),
            name: name.into(),
            spec: TrafficSplitSpec {
                service: "web".into(),
                backends: backends
                    .iter()
                    .map(|(s, w)| TrafficSplitBackend {
                        service: s.to_string(),
                        weight: *w,
                    })
                    .collect(),
                matches: None,
            },
        }
    }

    fn snap(splits: Vec<Named<TrafficSplitSpec>>) -> Snapshot {
        let mut s = Snapshot::default();
        s.services.extend([
            svc("web", "10.96.0.10", 80, &["198.18.1.10", "198.18.2.10", "198.18.1.11"]),
            svc("web-v1", "10.96.0.11", 80, &["198.18.1.10", "198.18.2.10"]),
            svc("web-v2", "10.96.0.12", 80, &["198.18.1.11"]),
        ]);
        s.smi.traffic_splits = splits;
        s
    }

    fn share(t: &ServiceTable, ip: &str) -> usize {
        t.slots.iter().filter(|(a, _)| a.to_string() == ip).count()
    }

    #[test]
    fn a_traffic_policy_takes_its_port_via_the_agent_and_a_bad_edit_keeps_the_last_good_one() {
        let policy = |yaml: &str| Named {
            namespace: "t".into(),
            name: "p".into(),
            spec: serde_yaml::from_str::<crate::traffic_policy::TrafficPolicySpec>(yaml).unwrap(),
        };
        let mut splits = Splits::default();
        let mut s = snap(vec![]);
        s.gateway.traffic_policies = vec![policy(
            "targetRef: {kind: Service, name: web-v1}\nrateLimit: {identity: {requestsPerSecond: 5}}\n\
             outlierDetection: {consecutiveFailures: 2}\n",
        )];
        let c = splits.compile(&s);
        let t = c.tables.iter().find(|t| t.name == "t/web-v1:80").unwrap();
        assert!(t.via_agent, "its port goes via the agent");
        let routes = &c.http[&"10.96.0.11:80".parse().unwrap()];
        assert!(routes.rules.is_empty() && routes.otherwise.as_ref().unwrap().slots.len() == 2);
        assert!(routes.resilience.is_some());
        let limited: Vec<String> = c.traffic_policies.by_endpoint.keys().map(|a| a.to_string()).collect();
        assert_eq!(
            limited,
            ["198.18.1.10:8080", "198.18.2.10:8080"],
            "rate limits by endpoint"
        );
        assert!(!c.tables.iter().find(|t| t.name == "t/web:80").unwrap().via_agent);
        let limiter = c.traffic_policies.limits[&("t/web-v1".to_string(), 80)].clone();

        // A bad edit that also moves the target: the last good version
        // stays on its own target, with its state.
        s.gateway.traffic_policies = vec![policy(
            "targetRef: {kind: Service, name: web-v2}\nfaultInjection: {abort: {percent: 101, httpStatus: 503}}\n",
        )];
        let c = splits.compile(&s);
        assert_eq!(c.traffic_policies.refused.len(), 1);
        assert!(
            c.traffic_policies.refused[0].kept_previous,
            "{:?}",
            c.traffic_policies.refused
        );
        let kept = &c.traffic_policies.limits[&("t/web-v1".to_string(), 80)];
        assert!(Arc::ptr_eq(kept, &limiter), "the same buckets");
        assert!(!c.tables.iter().find(|t| t.name == "t/web-v2:80").unwrap().via_agent);

        s.gateway.traffic_policies.clear();
        let c = splits.compile(&s);
        assert!(
            c.traffic_policies.limits.is_empty() && c.http.is_empty(),
            "deleted: gone"
        );
    }

    #[test]
    fn a_plain_service_has_one_slot_per_ready_endpoint_with_the_target_port() {
        let c = Splits::default().compile(&snap(vec![]));
        let web = c.tables.iter().find(|t| t.name == "t/web:80").unwrap();
        assert_eq!(web.slots.len(), 3);
        assert!(web.slots.iter().all(|(_, p)| *p == 8080));
    }

    #[test]
    fn weights_become_exact_slot_shares_split_evenly_inside_a_backend() {
        let c = Splits::default().compile(&snap(vec![split("canary", &[("web-v1", 90), ("web-v2", 10)])]));
        let web = c.tables.iter().find(|t| t.name == "t/web:80").unwrap();
        assert_eq!(web.slots.len(), 1000);
        assert_eq!(share(web, "198.18.1.11"), 100);
        assert_eq!(share(web, "198.18.1.10"), 450);
        assert_eq!(share(web, "198.18.2.10"), 450);
        assert_eq!(web.split.as_deref(), Some("t/canary"));
        let c = Splits::default().compile(&snap(vec![split("canary", &[("web-v1", 0), ("web-v2", 100)])]));
        let web = c.tables.iter().find(|t| t.name == "t/web:80").unwrap();
        assert_eq!(share(web, "198.18.1.11"), 1000);
    }

    #[test]
    fn bad_splits_are_refused_and_the_last_good_version_stays() {
        let mut splits = Splits::default();
        splits.compile(&snap(vec![split("canary", &[("web-v1", 90), ("web-v2", 10)])]));
        for (bad, why) in [
            (vec![("web-v1", 0), ("web-v2", 0)], "sum to 0"),
            (vec![("web-v1", -5), ("web-v2", 10)], "negative weight"),
            (vec![("web-v1", 50), ("web", 50)], "the root service itself"),
        ] {
            let c = splits.compile(&snap(vec![split("canary", &bad)]));
            assert_eq!(c.refused.len(), 1, "{c:?}");
            assert!(c.refused[0].reason.contains(why), "{:?}", c.refused);
            assert!(c.refused[0].kept_previous);
            let web = c.tables.iter().find(|t| t.name == "t/web:80").unwrap();
            assert_eq!(share(web, "198.18.1.11"), 100, "the 90/10 split stays in force");
        }
        // A backend without the root's port is left out for that port only.
        let mut s = snap(vec![split("canary", &[("web-v1", 50), ("web-v2", 50)])]);
        s.services.get_mut("t/web-v2").unwrap().ports[0].port = 81;
        let c = splits.compile(&s);
        assert!(c.refused.is_empty(), "{:?}", c.refused);
        let web = c.tables.iter().find(|t| t.name == "t/web:80").unwrap();
        assert_eq!(
            (share(web, "198.18.1.11"), web.slots.len()),
            (0, 1000),
            "v1 takes port 80 whole"
        );
        // Deleted: the service is plain again, and nothing is remembered.
        let c = splits.compile(&snap(vec![]));
        assert!(c.refused.is_empty());
        assert_eq!(c.tables.iter().find(|t| t.name == "t/web:80").unwrap().slots.len(), 3);
        let c = splits.compile(&snap(vec![split("canary", &[("web-v1", 0), ("web-v2", 0)])]));
        assert!(!c.refused[0].kept_previous);
    }

    /// The SMI spec's canary workflow: the split comes first, naming a v2
    /// Service that does not exist yet at weight 0; nothing goes to v2 pods
    /// (even those the root's selector already matches) until v2 gets a weight.
    #[test]
    fn the_canary_workflow_sends_nothing_to_v2_until_its_weight_changes() {
        let mut s = snap(vec![split("canary", &[("web-v1", 100), ("web-v2", 0)])]);
        s.services.remove("t/web-v2");
        let mut splits = Splits::default();
        let c = splits.compile(&s);
        assert!(c.refused.is_empty(), "{:?}", c.refused);
        let web = c.tables.iter().find(|t| t.name == "t/web:80").unwrap();
        assert_eq!(share(web, "198.18.1.11"), 0, "the root's own v2 endpoint gets nothing");
        assert_eq!(web.slots.len(), 1000);
        // v2 exists now, still at 0; then its weight changes.
        let c = splits.compile(&snap(vec![split("canary", &[("web-v1", 100), ("web-v2", 0)])]));
        let web = c.tables.iter().find(|t| t.name == "t/web:80").unwrap();
        assert_eq!(share(web, "198.18.1.11"), 0);
        let c = splits.compile(&snap(vec![split("canary", &[("web-v1", 80), ("web-v2", 20)])]));
        let web = c.tables.iter().find(|t| t.name == "t/web:80").unwrap();
        assert_eq!(share(web, "198.18.1.11"), 200);
    }

    #[test]
    fn an_http_matched_split_goes_via_the_agent_and_routes_each_request() {
        let mut s = snap(vec![split("ab", &[("web-v1", 0), ("web-v2", 100)])]);
        s.smi.traffic_splits[0].spec.matches = Some(vec![crate::smi::TypedLocalObjectReference {
            kind: "HTTPRouteGroup".into(),
            name: "canary".into(),
        }]);
        let c = Splits::default().compile(&s);
        assert!(
            c.refused[0].reason.contains("HTTPRouteGroup t/canary does not exist"),
            "{c:?}"
        );
        s.smi.http_route_groups.push(Named {
            namespace: "t".into(),
            name: "canary".into(),
            spec: serde_yaml::from_str("matches: [{name: beta, pathRegex: /beta}]").unwrap(),
        });
        let c = Splits::default().compile(&s);
        assert!(c.refused.is_empty(), "{:?}", c.refused);
        let web = c.tables.iter().find(|t| t.name == "t/web:80").unwrap();
        assert!(web.via_agent);
        assert_eq!(web.slots.len(), 3, "the root's own endpoints, for when no agent serves");
        let http = &c.http[&"10.96.0.10:80".parse().unwrap()];
        let req = |path| HttpRequest {
            method: "GET",
            path,
            query: "",
            headers: &[],
        };
        for _ in 0..50 {
            let Way::Rule(_, Some(Slot::Endpoint(e))) = http.route(&req("/beta/x")) else {
                panic!("a matching request goes to the backends")
            };
            assert_eq!(e, "198.18.1.11:8080".parse().unwrap());
            let Way::Otherwise(Some(Slot::Endpoint(_))) = http.route(&req("/other/beta")) else {
                panic!("the path regex is anchored at ^: the root serves it")
            };
        }
    }

    #[test]
    fn interleaved_tables_hold_each_share_in_every_run_of_turns() {
        let table = largest_remainder(&[('a', 1), ('b', 1)], 1000);
        assert_eq!(&table[..4], &['a', 'b', 'a', 'b']);
        let table = largest_remainder(&[('a', 9), ('b', 1)], 1000);
        for start in [0, 3, 500, 997] {
            let run: Vec<char> = (0..100).map(|i| table[(start + i) % 1000]).collect();
            let b = run.iter().filter(|c| **c == 'b').count();
            assert!((9..=11).contains(&b), "100 turns from {start}: {b} of b");
        }
        let table = largest_remainder(&[('a', 45), ('b', 45), ('c', 10)], 1000);
        let first: Vec<char> = table[..20].to_vec();
        assert_eq!(first.iter().filter(|c| **c == 'c').count(), 2, "{first:?}");
    }

    #[test]
    fn largest_remainder_adds_up() {
        let v = largest_remainder(&[('a', 1), ('b', 1), ('c', 1)], 1000);
        assert_eq!(v.len(), 1000);
        assert_eq!(v.iter().filter(|c| **c == 'a').count(), 334);
    }
}
