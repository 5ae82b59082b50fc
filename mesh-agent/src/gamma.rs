//! Gateway API for mesh (GAMMA): HTTPRoutes and GRPCRoutes, TCPRoutes and
//! UDPRoutes whose `parentRefs` name a Service, validated one by one and
//! turned into what `services` builds tables from: per service port, the
//! L7 rules in Gateway API's precedence order, or the L4 weighted backends.
//!
//! Semantics, from the Gateway API spec and its mesh pages:
//! - a route binds to a Service (`group: ""`/`core`, `kind: Service`) of its
//!   own namespace (a producer route), on `port` or every port;
//! - once any HTTPRoute or GRPCRoute binds to a port, requests no rule
//!   matches are rejected (404; a gRPC call gets UNIMPLEMENTED);
//! - precedence across all bound rules: an Exact path, then the longest
//!   PathPrefix, then a method match, then the most header matches, then
//!   the most query matches; ties go to the route first by
//!   `namespace/name` (the file source has no creation times), then to the
//!   first rule and match in list order. RegularExpression paths rank below
//!   prefixes (the spec leaves them to the implementation). GRPCRoute
//!   matches rank by the length of the matched service, then method;
//! - `backendRefs` weights (default 1) share the rule's traffic; a backend
//!   that does not resolve (no such Service or port, another namespace
//!   without a ReferenceGrant, which this mesh does not read) keeps its
//!   share and those requests get a 500, as the spec requires; a rule
//!   without backends answers 500 too;
//! - a route that does not validate (a bad regex, a filter this mesh does
//!   not implement) is refused whole, with its reason; it never narrows or
//!   widens another route.
use std::{collections::BTreeMap, time::Duration};

use regex::Regex;

use crate::{
    gateway::{self, BackendRef, HttpFilter, ParentRef},
    routes::{Filters, GatewayMatch, HeaderEdits, PathEdit, PathMatch, Redirect, Retry, Timeouts, ValueMatch},
    state::{Named, Snapshot},
};

/// A backend of a rule, resolved as far as the snapshot allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    /// `namespace/name` of the Service.
    pub service: String,
    pub port: u16,
    pub weight: u64,
    /// Why it does not resolve (its share of requests gets a 500).
    pub invalid: Option<String>,
}

/// One bound match of one rule: what `services` makes a `routes::Rule` of.
#[derive(Clone, Debug)]
pub struct BoundRule {
    /// `HTTPRoute t/name rule 0 match 1`.
    pub name: String,
    pub matched: GatewayMatch,
    pub filters: Filters,
    pub backends: Vec<Backend>,
    /// RequestMirror's backend and percent.
    pub mirror: Option<(Backend, u8)>,
    /// Precedence: larger first.
    rank: (u8, usize, bool, usize, usize),
    /// Ties: route `namespace/name`, rule index, match index; smaller first.
    order: (String, usize, usize),
}

pub use crate::state::{RefusedRoute, RouteName};

#[derive(Debug, Default)]
pub struct Gamma {
    /// (Service `namespace/name`, port) -> its L7 rules in precedence order,
    /// and the routes they come from.
    pub http: BTreeMap<(String, u16), (Vec<RouteName>, Vec<BoundRule>)>,
    /// (Service, port) -> the TCPRoute bound there and its backends.
    pub tcp: BTreeMap<(String, u16), (RouteName, Vec<Backend>)>,
    pub udp: BTreeMap<(String, u16), (RouteName, Vec<Backend>)>,
    /// Routes in force, each with the backends that did not resolve
    /// (its ResolvedRefs condition).
    pub accepted: BTreeMap<RouteName, Vec<String>>,
    pub refused: Vec<RefusedRoute>,
}

impl Gamma {
    pub fn compile(snap: &Snapshot) -> Gamma {
        let mut g = Gamma::default();
        let mut http: BTreeMap<(String, u16), (Vec<RouteName>, Vec<BoundRule>)> = BTreeMap::new();
        for route in &snap.gateway.http_routes {
            let name = format!("HTTPRoute {}/{}", route.namespace, route.name);
            match http_rules(route, snap) {
                Ok(None) => {} // bound to a Gateway, not to a Service: not the mesh's
                Ok(Some((ports, rules))) => {
                    g.note_accepted(&name, &rules);
                    for port in ports {
                        let e = http.entry(port).or_default();
                        e.0.push(name.clone());
                        e.1.extend(rules.iter().cloned());
                    }
                }
                Err(reason) => g.refused.push(RefusedRoute { name, reason }),
            }
        }
        for route in &snap.gateway.grpc_routes {
            let name = format!("GRPCRoute {}/{}", route.namespace, route.name);
            match grpc_rules(route, snap) {
                Ok(None) => {}
                Ok(Some((ports, rules))) => {
                    g.note_accepted(&name, &rules);
                    for port in ports {
                        let e = http.entry(port).or_default();
                        e.0.push(name.clone());
                        e.1.extend(rules.iter().cloned());
                    }
                }
                Err(reason) => g.refused.push(RefusedRoute { name, reason }),
            }
        }
        for (_, rules) in http.values_mut() {
            rules.sort_by(|a, b| b.rank.cmp(&a.rank).then_with(|| a.order.cmp(&b.order)));
        }
        g.http = http;
        for (kind, list, protocol) in [
            ("TCPRoute", &snap.gateway.tcp_routes, "TCP"),
            ("UDPRoute", &snap.gateway.udp_routes, "UDP"),
        ] {
            let mut sorted: Vec<_> = list.iter().collect();
            sorted.sort_by_key(|r| (r.namespace.clone(), r.name.clone()));
            for route in sorted {
                let name = format!("{kind} {}/{}", route.namespace, route.name);
                match l4_backends(route, snap, protocol) {
                    Ok(None) => {}
                    Ok(Some((ports, backends))) => {
                        let table = if protocol == "TCP" { &mut g.tcp } else { &mut g.udp };
                        let taken: Vec<_> = ports
                            .iter()
                            .filter_map(|p| table.get(p).map(|(n, _)| n.clone()))
                            .collect();
                        if let Some(first) = taken.first() {
                            g.refused.push(RefusedRoute {
                                name,
                                reason: format!("its Service port is already bound by {first} (one {kind} per port)"),
                            });
                            continue;
                        }
                        for p in ports {
                            table.insert(p, (name.clone(), backends.clone()));
                        }
                        let unresolved = backends.iter().filter_map(|b| b.invalid.clone()).collect();
                        g.accepted.insert(name, unresolved);
                    }
                    Err(reason) => g.refused.push(RefusedRoute { name, reason }),
                }
            }
        }
        g
    }

    fn note_accepted(&mut self, name: &str, rules: &[BoundRule]) {
        let mut unresolved: Vec<String> = rules
            .iter()
            .flat_map(|r| r.backends.iter().filter_map(|b| b.invalid.clone()))
            .collect();
        unresolved.sort();
        unresolved.dedup();
        self.accepted.insert(name.to_string(), unresolved);
    }
}

/// The Service ports a route's parentRefs bind: `None` when no parentRef
/// names a Service (the route is for a Gateway).
fn bound_ports(
    ns: &str,
    parents: &[ParentRef],
    snap: &Snapshot,
    protocol: &str,
) -> Result<Option<Vec<(String, u16)>>, String> {
    let mut out = Vec::new();
    let mut any_service = false;
    for p in parents {
        let group = p.group.as_deref().unwrap_or("gateway.networking.k8s.io");
        let kind = p.kind.as_deref().unwrap_or("Gateway");
        if kind != "Service" || !(group.is_empty() || group == "core") {
            continue;
        }
        any_service = true;
        let svc_ns = p.namespace.as_deref().unwrap_or(ns);
        if svc_ns != ns {
            return Err(format!(
                "parentRef Service {svc_ns}/{}: consumer routes (a route in another namespace than its Service) \
                 are not supported yet",
                p.name
            ));
        }
        let key = format!("{svc_ns}/{}", p.name);
        let svc = snap
            .services
            .get(&key)
            .ok_or_else(|| format!("parentRef Service {key} does not exist"))?;
        let ports: Vec<u16> = svc
            .ports
            .iter()
            .filter(|sp| sp.protocol.eq_ignore_ascii_case(protocol))
            .filter(|sp| p.port.is_none_or(|want| sp.port == want))
            .filter(|sp| p.section_name.as_ref().is_none_or(|s| sp.name.as_ref() == Some(s)))
            .map(|sp| sp.port)
            .collect();
        if ports.is_empty() {
            return Err(format!(
                "parentRef Service {key} has no {protocol} port{}",
                p.port.map(|n| format!(" {n}")).unwrap_or_default()
            ));
        }
        out.extend(ports.into_iter().map(|port| (key.clone(), port)));
    }
    out.sort();
    out.dedup();
    Ok(any_service.then_some(out))
}

fn backends(ns: &str, refs: &[BackendRef], snap: &Snapshot) -> Result<Vec<Backend>, String> {
    let mut out = Vec::new();
    for b in refs {
        if !b.filters.is_empty() {
            return Err(format!(
                "backendRef {}: per-backend filters are not supported yet",
                b.name
            ));
        }
        let weight = b.weight.unwrap_or(1);
        if weight < 0 {
            return Err(format!("backendRef {}: negative weight {weight}", b.name));
        }
        let b_ns = b.namespace.as_deref().unwrap_or(ns);
        let service = format!("{b_ns}/{}", b.name);
        let group = b.group.as_deref().unwrap_or("");
        let kind = b.kind.as_deref().unwrap_or("Service");
        let invalid = if kind != "Service" || !(group.is_empty() || group == "core") {
            Some(format!("backendRef {service}: kind {group}/{kind} is not a Service"))
        } else if b_ns != ns {
            Some(format!(
                "backendRef {service}: another namespace needs a ReferenceGrant, which this mesh does not read"
            ))
        } else if let Some(port) = b.port {
            match snap.services.get(&service) {
                None => Some(format!("backendRef {service}: no such Service")),
                Some(svc) if !svc.ports.iter().any(|p| p.port == port) => {
                    Some(format!("backendRef {service}: the Service has no port {port}"))
                }
                Some(_) => None,
            }
        } else {
            Some(format!("backendRef {service}: port is required for a Service"))
        };
        out.push(Backend {
            service,
            port: b.port.unwrap_or(0),
            weight: weight as u64,
            invalid,
        });
    }
    Ok(out)
}

fn value_match(kind: Option<&str>, value: &str, what: &str) -> Result<ValueMatch, String> {
    match kind.unwrap_or("Exact") {
        "Exact" => Ok(ValueMatch::Exact(value.to_string())),
        "RegularExpression" => Regex::new(&format!("^(?:{value})$"))
            .map(ValueMatch::Regex)
            .map_err(|e| format!("{what} regex {value:?}: {e}")),
        other => Err(format!("{what}: match type {other:?} (Exact or RegularExpression)")),
    }
}

/// Header matches: names case-insensitive; of two with one name only the
/// first counts, as the spec says.
fn header_matches(list: &[gateway::ValueMatch]) -> Result<Vec<(String, ValueMatch)>, String> {
    let mut out: Vec<(String, ValueMatch)> = Vec::new();
    for h in list {
        let name = h.name.to_ascii_lowercase();
        if out.iter().any(|(n, _)| *n == name) {
            continue;
        }
        out.push((
            name,
            value_match(h.kind.as_deref(), &h.value, &format!("header {}", h.name))?,
        ));
    }
    Ok(out)
}

fn header_edits(m: &gateway::HeaderModifier) -> HeaderEdits {
    HeaderEdits {
        set: m
            .set
            .iter()
            .map(|h| (h.name.to_ascii_lowercase(), h.value.clone()))
            .collect(),
        add: m
            .add
            .iter()
            .map(|h| (h.name.to_ascii_lowercase(), h.value.clone()))
            .collect(),
        remove: m.remove.iter().map(|h| h.to_ascii_lowercase()).collect(),
    }
}

fn path_edit(p: &gateway::PathModifier, prefix: Option<&str>) -> Result<PathEdit, String> {
    match p.kind.as_str() {
        "ReplaceFullPath" => Ok(PathEdit::Full(
            p.replace_full_path
                .clone()
                .ok_or("ReplaceFullPath needs replaceFullPath")?,
        )),
        "ReplacePrefixMatch" => Ok(PathEdit::Prefix {
            matched: prefix
                .ok_or("ReplacePrefixMatch needs the rule's matches to be PathPrefix matches")?
                .to_string(),
            with: p
                .replace_prefix_match
                .clone()
                .ok_or("ReplacePrefixMatch needs replacePrefixMatch")?,
        }),
        other => Err(format!(
            "path modifier type {other:?} (ReplaceFullPath or ReplacePrefixMatch)"
        )),
    }
}

/// A rule's filters; `prefix` is the match's PathPrefix (for ReplacePrefixMatch).
fn filters(list: &[HttpFilter], prefix: Option<&str>, grpc: bool) -> Result<Filters, String> {
    let mut f = Filters::default();
    for filter in list {
        match filter.kind.as_str() {
            "RequestHeaderModifier" => {
                f.request_headers = header_edits(
                    filter
                        .request_header_modifier
                        .as_ref()
                        .ok_or("RequestHeaderModifier needs requestHeaderModifier")?,
                );
            }
            "ResponseHeaderModifier" => {
                f.response_headers = header_edits(
                    filter
                        .response_header_modifier
                        .as_ref()
                        .ok_or("ResponseHeaderModifier needs responseHeaderModifier")?,
                );
            }
            "RequestRedirect" if !grpc => {
                let r = filter
                    .request_redirect
                    .as_ref()
                    .ok_or("RequestRedirect needs requestRedirect")?;
                let status = r.status_code.unwrap_or(302);
                if ![301, 302, 303, 307, 308].contains(&status) {
                    return Err(format!(
                        "RequestRedirect statusCode {status} (301, 302, 303, 307 or 308)"
                    ));
                }
                f.redirect = Some(Redirect {
                    scheme: r.scheme.clone(),
                    hostname: r.hostname.clone(),
                    path: r.path.as_ref().map(|p| path_edit(p, prefix)).transpose()?,
                    port: r.port,
                    status,
                });
            }
            "URLRewrite" if !grpc => {
                let r = filter.url_rewrite.as_ref().ok_or("URLRewrite needs urlRewrite")?;
                f.rewrite_host = r.hostname.clone();
                f.rewrite_path = r.path.as_ref().map(|p| path_edit(p, prefix)).transpose()?;
            }
            // Resolved with the backends (`mirror`).
            "RequestMirror" => {}
            other => return Err(format!("filter {other} is not supported by this mesh yet")),
        }
    }
    if f.redirect.is_some() && (f.rewrite_host.is_some() || f.rewrite_path.is_some()) {
        return Err("RequestRedirect and URLRewrite cannot be used together".into());
    }
    Ok(f)
}

/// GEP-1742: a zero duration turns that timeout off; backendRequest may
/// not exceed request.
fn timeouts(t: Option<&gateway::HttpRouteTimeouts>) -> Result<Timeouts, String> {
    let Some(t) = t else { return Ok(Timeouts::default()) };
    let parse = |v: &Option<String>, what: &str| -> Result<Option<Duration>, String> {
        match v {
            None => Ok(None),
            Some(v) => {
                let d = gateway::parse_duration(v).map_err(|e| format!("{what}: {e}"))?;
                Ok((!d.is_zero()).then_some(d))
            }
        }
    };
    let out = Timeouts {
        request: parse(&t.request, "request")?,
        backend_request: parse(&t.backend_request, "backendRequest")?,
    };
    if let (Some(r), Some(b)) = (out.request, out.backend_request)
        && b > r
    {
        return Err(format!("backendRequest ({b:?}) is longer than request ({r:?})"));
    }
    Ok(out)
}

/// GEP-1731 leaves the defaults to the implementation: one retry, 25 ms
/// apart (Envoy's), and no status retried unless named.
fn retry(r: &gateway::HttpRouteRetry) -> Result<Retry, String> {
    if let Some(bad) = r.codes.iter().find(|c| !(400..=599).contains(*c)) {
        return Err(format!("code {bad} is not a 4xx or 5xx status"));
    }
    let backoff = match &r.backoff {
        Some(b) => gateway::parse_duration(b).map_err(|e| format!("backoff: {e}"))?,
        None => Duration::from_millis(25),
    };
    let attempts = r.attempts.unwrap_or(1);
    if attempts > 10 {
        return Err(format!("attempts {attempts}: at most 10 retries are allowed"));
    }
    Ok(Retry {
        codes: r.codes.clone(),
        attempts,
        backoff,
    })
}

/// A rule's RequestMirror (at most one): its backend, resolved as
/// backendRefs are, and the percent of requests copied to it.
fn mirror(list: &[HttpFilter], ns: &str, snap: &Snapshot) -> Result<Option<(Backend, u8)>, String> {
    let mirrors: Vec<&gateway::RequestMirror> = list
        .iter()
        .filter(|f| f.kind == "RequestMirror")
        .map(|f| f.request_mirror.as_ref().ok_or("RequestMirror needs requestMirror"))
        .collect::<Result<_, _>>()?;
    let Some(m) = mirrors.first() else { return Ok(None) };
    if mirrors.len() > 1 {
        return Err("more than one RequestMirror in a rule is not supported by this mesh yet".into());
    }
    let percent = m.percent.unwrap_or(100);
    if percent > 100 {
        return Err(format!("RequestMirror percent {percent} is over 100"));
    }
    let mut backend = backends(ns, std::slice::from_ref(&m.backend_ref), snap)?.remove(0);
    if let Some(why) = backend.invalid.take() {
        return Err(format!("RequestMirror {why}"));
    }
    // A mirror's own weight means nothing; every copy goes to it.
    backend.weight = 1;
    Ok(Some((backend, percent)))
}

type Bound = Option<(Vec<(String, u16)>, Vec<BoundRule>)>;

fn http_rules(route: &Named<gateway::HTTPRouteSpec>, snap: &Snapshot) -> Result<Bound, String> {
    let Some(ports) = bound_ports(&route.namespace, &route.spec.parent_refs, snap, "TCP")? else {
        return Ok(None);
    };
    let full = format!("{}/{}", route.namespace, route.name);
    let mut out = Vec::new();
    for (ri, rule) in route.spec.rules.iter().enumerate() {
        let what = |mi: usize| format!("HTTPRoute {full} rule {ri} match {mi}");
        let backends = backends(&route.namespace, &rule.backend_refs, snap).map_err(|e| format!("rule {ri}: {e}"))?;
        let timeouts = timeouts(rule.timeouts.as_ref()).map_err(|e| format!("rule {ri}: timeouts: {e}"))?;
        let mirror = mirror(&rule.filters, &route.namespace, snap).map_err(|e| format!("rule {ri}: {e}"))?;
        let retry = rule
            .retry
            .as_ref()
            .map(retry)
            .transpose()
            .map_err(|e| format!("rule {ri}: retry: {e}"))?;
        let default = [gateway::HttpRouteMatch::default()];
        let matches = if rule.matches.is_empty() {
            &default[..]
        } else {
            &rule.matches[..]
        };
        for (mi, m) in matches.iter().enumerate() {
            let path = m.path.clone().unwrap_or_default();
            let value = path.value.clone().unwrap_or_else(|| "/".into());
            if !value.starts_with('/') && path.kind.as_deref() != Some("RegularExpression") {
                return Err(format!("rule {ri} match {mi}: path {value:?} must start with /"));
            }
            let (path_match, kind_rank, prefix_len) = match path.kind.as_deref().unwrap_or("PathPrefix") {
                "Exact" => (PathMatch::Exact(value.clone()), 3, value.len()),
                "PathPrefix" => (PathMatch::Prefix(value.clone()), 2, value.trim_end_matches('/').len()),
                "RegularExpression" => (
                    PathMatch::Regex(
                        Regex::new(&format!("^(?:{value})$"))
                            .map_err(|e| format!("rule {ri} match {mi}: path regex {value:?}: {e}"))?,
                    ),
                    1,
                    value.len(),
                ),
                other => return Err(format!("rule {ri} match {mi}: path type {other:?}")),
            };
            let prefix = matches!(path_match, PathMatch::Prefix(_)).then_some(value.as_str());
            let headers = header_matches(&m.headers).map_err(|e| format!("rule {ri} match {mi}: {e}"))?;
            let mut query = Vec::new();
            for q in &m.query_params {
                if query.iter().any(|(n, _)| n == &q.name) {
                    continue;
                }
                query.push((
                    q.name.clone(),
                    value_match(q.kind.as_deref(), &q.value, &format!("query {}", q.name))
                        .map_err(|e| format!("rule {ri} match {mi}: {e}"))?,
                ));
            }
            let mut filters = filters(&rule.filters, prefix, false).map_err(|e| format!("rule {ri}: {e}"))?;
            filters.timeouts = timeouts;
            filters.retry = retry.clone();
            out.push(BoundRule {
                name: what(mi),
                rank: (kind_rank, prefix_len, m.method.is_some(), headers.len(), query.len()),
                order: (full.clone(), ri, mi),
                matched: GatewayMatch {
                    path: Some(path_match),
                    method: m.method.clone(),
                    headers,
                    query,
                },
                filters,
                backends: backends.clone(),
                mirror: mirror.clone(),
            });
        }
    }
    Ok(Some((ports, out)))
}

fn grpc_rules(route: &Named<gateway::GRPCRouteSpec>, snap: &Snapshot) -> Result<Bound, String> {
    let Some(ports) = bound_ports(&route.namespace, &route.spec.parent_refs, snap, "TCP")? else {
        return Ok(None);
    };
    let full = format!("{}/{}", route.namespace, route.name);
    let mut out = Vec::new();
    for (ri, rule) in route.spec.rules.iter().enumerate() {
        let backends = backends(&route.namespace, &rule.backend_refs, snap).map_err(|e| format!("rule {ri}: {e}"))?;
        let filters = filters(&rule.filters, None, true).map_err(|e| format!("rule {ri}: {e}"))?;
        let mirror = mirror(&rule.filters, &route.namespace, snap).map_err(|e| format!("rule {ri}: {e}"))?;
        let default = [gateway::GrpcRouteMatch::default()];
        let matches = if rule.matches.is_empty() {
            &default[..]
        } else {
            &rule.matches[..]
        };
        for (mi, m) in matches.iter().enumerate() {
            let method = m.method.clone().unwrap_or_default();
            // gRPC calls are POSTs to /<service>/<method>.
            let (path, service_len, method_len) = match method.kind.as_deref().unwrap_or("Exact") {
                "Exact" => {
                    let path = match (&method.service, &method.method) {
                        (Some(s), Some(m)) => Some(PathMatch::Exact(format!("/{s}/{m}"))),
                        (Some(s), None) => Some(PathMatch::Prefix(format!("/{s}"))),
                        (None, Some(m)) => Some(PathMatch::Regex(
                            Regex::new(&format!("^/[^/]+/{}$", regex::escape(m))).expect("escaped"),
                        )),
                        (None, None) => None,
                    };
                    (
                        path,
                        method.service.as_ref().map_or(0, String::len),
                        method.method.as_ref().map_or(0, String::len),
                    )
                }
                "RegularExpression" => {
                    let s = method.service.as_deref().unwrap_or("[^/]+");
                    let m2 = method.method.as_deref().unwrap_or("[^/]+");
                    let re = Regex::new(&format!("^/(?:{s})/(?:{m2})$"))
                        .map_err(|e| format!("rule {ri} match {mi}: method regex: {e}"))?;
                    (Some(PathMatch::Regex(re)), 0, 0)
                }
                other => return Err(format!("rule {ri} match {mi}: method match type {other:?}")),
            };
            let headers = header_matches(&m.headers).map_err(|e| format!("rule {ri} match {mi}: {e}"))?;
            out.push(BoundRule {
                name: format!("GRPCRoute {full} rule {ri} match {mi}"),
                rank: (2, service_len, method_len > 0, headers.len(), 0),
                order: (full.clone(), ri, mi),
                matched: GatewayMatch {
                    path,
                    method: None,
                    headers,
                    query: Vec::new(),
                },
                filters: filters.clone(),
                backends: backends.clone(),
                mirror: mirror.clone(),
            });
        }
    }
    Ok(Some((ports, out)))
}

type L4Bound = Option<(Vec<(String, u16)>, Vec<Backend>)>;

fn l4_backends(route: &Named<gateway::L4RouteSpec>, snap: &Snapshot, protocol: &str) -> Result<L4Bound, String> {
    let Some(ports) = bound_ports(&route.namespace, &route.spec.parent_refs, snap, protocol)? else {
        return Ok(None);
    };
    match route.spec.rules.as_slice() {
        [rule] => Ok(Some((ports, backends(&route.namespace, &rule.backend_refs, snap)?))),
        [] => Err("no rules".into()),
        _ => Err("more than one rule: without matches only one can apply".into()),
    }
}

impl Gamma {
    /// What route status reports (`Accepted`, `ResolvedRefs`).
    pub fn verdicts(&self) -> crate::state::RouteVerdicts {
        crate::state::RouteVerdicts {
            accepted: self.accepted.clone(),
            refused: self.refused.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        authz::HttpRequest,
        routes::{Slot, Way},
        services::Splits,
        state::{Service, ServiceEndpoint, ServicePort},
    };

    fn svc(name: &str, vip: &str, ports: &[(u16, u16)], eps: &[&str]) -> (String, Service) {
        (
            format!("m/{name}"),
            Service {
                namespace: "m".into(),
                name: name.into(),
                cluster_ips: vec![vip.parse().unwrap()],
                ports: ports
                    .iter()
                    .map(|(p, _)| ServicePort {
                        name: Some(format!("p{p}")),
                        port: *p,
                        protocol: "TCP".into(),
                    })
                    .collect(),
                endpoints: eps
                    .iter()
                    .map(|ip| ServiceEndpoint {
                        ip: ip.parse().unwrap(),
                        ready: true,
                        node: None,
                        ports: ports.iter().map(|(p, t)| (Some(format!("p{p}")), *t)).collect(),
                    })
                    .collect(),
            },
        )
    }

    fn snap(routes: &[&str]) -> Snapshot {
        let mut s = Snapshot::default();
        s.services.extend([
            svc(
                "echo",
                "10.96.0.10",
                &[(80, 8080), (8080, 8080), (7070, 7070)],
                &["198.18.1.10", "198.18.1.11"],
            ),
            svc(
                "echo-v1",
                "10.96.0.11",
                &[(80, 8080), (8080, 8080), (7070, 7070)],
                &["198.18.1.10"],
            ),
            svc(
                "echo-v2",
                "10.96.0.12",
                &[(80, 8080), (8080, 8080), (7070, 7070)],
                &["198.18.1.11"],
            ),
        ]);
        for (i, r) in routes.iter().enumerate() {
            s.gateway.http_routes.push(Named {
                namespace: "m".into(),
                name: format!("r{i}"),
                spec: serde_yaml::from_str(r).unwrap(),
            });
        }
        s
    }

    fn way(s: &Snapshot, path: &str, headers: &[(&str, &str)]) -> (String, Option<Slot>) {
        let c = Splits::default().compile(s);
        let routes = &c.http[&"10.96.0.10:80".parse().unwrap()];
        let headers: Vec<(String, String)> = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let (path, query) = path.split_once('?').unwrap_or((path, ""));
        let req = HttpRequest {
            method: "GET",
            path,
            query,
            headers: &headers,
        };
        match routes.route(&req) {
            Way::Rule(r, slot) => (r.name.clone(), slot),
            Way::Otherwise(slot) => ("otherwise".into(), slot),
            Way::NoRoute => ("404".into(), None),
        }
    }

    fn to(ip: &str) -> Option<Slot> {
        Some(Slot::Endpoint(format!("{ip}:8080").parse().unwrap()))
    }

    /// conformance/tests/mesh/mesh-split.yaml: Exact /v1 and /v2; nothing else.
    #[test]
    fn exact_paths_route_and_the_rest_is_rejected() {
        let s = snap(&[
            "parentRefs: [{group: \"\", kind: Service, name: echo}]\nrules:\n- matches: [{path: {type: Exact, value: /v1}}]\n  backendRefs: [{name: echo-v1, port: 80}]\n- matches: [{path: {type: Exact, value: /v2}}]\n  backendRefs: [{name: echo-v2, port: 80}]\n",
        ]);
        assert_eq!(way(&s, "/v1", &[]).1, to("198.18.1.10"));
        assert_eq!(way(&s, "/v2", &[]).1, to("198.18.1.11"));
        assert_eq!(way(&s, "/v1/x", &[]).0, "404");
        assert_eq!(way(&s, "/", &[]).0, "404");
    }

    /// conformance/tests/mesh/httproute-matching.yaml: precedence across rules.
    #[test]
    fn precedence_prefers_longer_prefixes_then_more_headers() {
        let s = snap(&[
            "parentRefs: [{group: \"\", kind: Service, name: echo, port: 80}]\nrules:\n- matches:\n  - path: {type: PathPrefix, value: /}\n  - headers: [{name: version, value: one}]\n  backendRefs: [{name: echo-v1, port: 8080}]\n- matches:\n  - path: {type: PathPrefix, value: /v2}\n  - headers: [{name: version, value: two}]\n  backendRefs: [{name: echo-v2, port: 8080}]\n",
        ]);
        assert_eq!(way(&s, "/", &[]).1, to("198.18.1.10"));
        assert_eq!(way(&s, "/example", &[]).1, to("198.18.1.10"));
        assert_eq!(way(&s, "/", &[("version", "one")]).1, to("198.18.1.10"));
        assert_eq!(way(&s, "/v2", &[]).1, to("198.18.1.11"));
        assert_eq!(way(&s, "/v2/example", &[]).1, to("198.18.1.11"));
        assert_eq!(way(&s, "/", &[("version", "two")]).1, to("198.18.1.11"));
        assert_eq!(
            way(&s, "/v2x", &[]).1,
            to("198.18.1.10"),
            "prefixes match whole elements"
        );
    }

    /// conformance/tests/mesh/httproute-weight.yaml: 70/30 exactly.
    #[test]
    fn weights_share_requests_exactly() {
        let s = snap(&[
            "parentRefs: [{group: \"\", kind: Service, name: echo, port: 80}]\nrules:\n- backendRefs:\n  - {name: echo-v1, port: 8080, weight: 70}\n  - {name: echo-v2, port: 8080, weight: 30}\n",
        ]);
        let c = Splits::default().compile(&s);
        let routes = &c.http[&"10.96.0.10:80".parse().unwrap()];
        let req = HttpRequest {
            method: "GET",
            path: "/",
            query: "",
            headers: &[],
        };
        let mut v2 = 0;
        for _ in 0..100 {
            if let Way::Rule(_, slot) = routes.route(&req)
                && slot == to("198.18.1.11")
            {
                v2 += 1;
            }
        }
        assert_eq!(v2, 30);
        assert!(c.tables.iter().any(|t| t.name == "m/echo:80" && t.via_agent));
        assert!(
            !c.tables.iter().any(|t| t.name == "m/echo:8080" && t.via_agent),
            "port 80 only"
        );
    }

    #[test]
    fn unresolved_backends_keep_their_share_as_500s_and_bad_routes_are_refused_whole() {
        let s = snap(&[
            "parentRefs: [{group: \"\", kind: Service, name: echo, port: 80}]\nrules:\n- backendRefs:\n  - {name: echo-v1, port: 8080}\n  - {name: missing, port: 8080}\n",
            "parentRefs: [{group: \"\", kind: Service, name: echo, port: 8080}]\nrules:\n- matches: [{path: {type: RegularExpression, value: \"/(\"}}]\n  backendRefs: [{name: echo-v1, port: 8080}]\n",
            "parentRefs: [{group: \"\", kind: Service, name: echo, port: 7070}]\nrules:\n- filters: [{type: CORS}]\n  backendRefs: [{name: echo-v1, port: 7070}]\n",
            "parentRefs: [{name: some-gateway}]\nrules:\n- backendRefs: [{name: echo-v1, port: 8080}]\n",
        ]);
        let c = Splits::default().compile(&s);
        let routes = &c.http[&"10.96.0.10:80".parse().unwrap()];
        assert_eq!(
            routes.rules[0]
                .pool
                .slots
                .iter()
                .filter(|s| **s == Slot::Invalid)
                .count(),
            500
        );
        assert_eq!(
            c.routes_accepted["HTTPRoute m/r0"],
            ["backendRef m/missing: no such Service"]
        );
        let refused: Vec<&str> = c.routes_refused.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(refused, ["HTTPRoute m/r1", "HTTPRoute m/r2"], "{:?}", c.routes_refused);
        assert!(c.routes_refused[1].reason.contains("CORS is not supported"));
        assert!(
            !c.routes_accepted.contains_key("HTTPRoute m/r3"),
            "a Gateway's route is not the mesh's"
        );
    }

    #[test]
    fn a_gateway_route_takes_precedence_over_an_smi_split_on_its_port() {
        let mut s = snap(&[
            "parentRefs: [{group: \"\", kind: Service, name: echo, port: 80}]\nrules:\n- backendRefs: [{name: echo-v2, port: 8080}]\n",
        ]);
        s.smi.traffic_splits.push(Named {
            namespace: "m".into(),
            name: "split".into(),
            spec: serde_yaml::from_str("service: echo\nbackends: [{service: echo-v1, weight: 100}]").unwrap(),
        });
        let c = Splits::default().compile(&s);
        let t80 = c.tables.iter().find(|t| t.name == "m/echo:80").unwrap();
        assert_eq!(t80.split.as_deref(), Some("HTTPRoute m/r0"));
        let t8080 = c.tables.iter().find(|t| t.name == "m/echo:8080").unwrap();
        assert_eq!(
            t8080.split.as_deref(),
            Some("m/split"),
            "the split keeps the other ports"
        );
    }

    #[test]
    fn route_timeouts_are_read_as_gep_1742_says() {
        let rule = |t: &str| {
            format!(
                "parentRefs: [{{group: \"\", kind: Service, name: echo, port: 80}}]\nrules:\n- timeouts: {t}\n  backendRefs: [{{name: echo-v1, port: 8080}}]\n"
            )
        };
        let c = Splits::default().compile(&snap(&[
            &rule("{request: 1s}"),
            &rule("{request: 1s, backendRequest: 2s}"),
            &rule("{request: 1.5s}"),
        ]));
        let refused: Vec<(&str, &str)> = c
            .routes_refused
            .iter()
            .map(|r| (r.name.as_str(), r.reason.as_str()))
            .collect();
        assert_eq!(refused.len(), 2, "{refused:?}");
        assert!(
            refused[0].0 == "HTTPRoute m/r1" && refused[0].1.contains("longer than request"),
            "{refused:?}"
        );
        assert!(
            refused[1].0 == "HTTPRoute m/r2" && refused[1].1.contains("not a Gateway API duration"),
            "{refused:?}"
        );
        for (spec, want) in [
            ("{request: 1500ms}", Some((Duration::from_millis(1500), "request"))),
            (
                "{request: 10s, backendRequest: 1s}",
                Some((Duration::from_secs(1), "backendRequest")),
            ),
            ("{request: 0s}", None),
            (
                "{backendRequest: 250ms}",
                Some((Duration::from_millis(250), "backendRequest")),
            ),
        ] {
            let c = Splits::default().compile(&snap(&[&rule(spec)]));
            let routes = c.http.values().next().unwrap();
            assert_eq!(routes.rules[0].filters.timeouts.limit(), want, "{spec}");
        }
    }

    #[test]
    fn gateway_durations_follow_gep_2257() {
        use crate::gateway::parse_duration;
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1h1m1s1ms"), Ok(Duration::from_millis(3_661_001)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        for bad in ["", "10", "1.5s", "-1s", "123456s", "1h1m1s1ms1h", "1d", "1 s", "s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn route_retries_are_read_as_gep_1731_says() {
        let rule = |r: &str| {
            format!(
                "parentRefs: [{{group: \"\", kind: Service, name: echo, port: 80}}]\nrules:\n- retry: {r}\n  backendRefs: [{{name: echo-v1, port: 8080}}]\n"
            )
        };
        for (spec, want) in [
            (
                "{codes: [503, 502], attempts: 3, backoff: 100ms}",
                Retry {
                    codes: vec![503, 502],
                    attempts: 3,
                    backoff: Duration::from_millis(100),
                },
            ),
            (
                "{}",
                Retry {
                    codes: vec![],
                    attempts: 1,
                    backoff: Duration::from_millis(25),
                },
            ),
        ] {
            let c = Splits::default().compile(&snap(&[&rule(spec)]));
            let routes = c.http.values().next().unwrap();
            assert_eq!(routes.rules[0].filters.retry.as_ref(), Some(&want), "{spec}");
        }
        for (spec, why) in [
            ("{codes: [200]}", "not a 4xx or 5xx"),
            ("{attempts: 11}", "at most 10"),
            ("{backoff: soon}", "not a Gateway API duration"),
        ] {
            let c = Splits::default().compile(&snap(&[&rule(spec)]));
            assert!(
                c.routes_refused.len() == 1 && c.routes_refused[0].reason.contains(why),
                "{spec}: {:?}",
                c.routes_refused
            );
        }
    }

    #[test]
    fn a_request_mirror_is_resolved_like_a_backend_and_refused_when_it_cannot_be() {
        let rule = |mirrors: &str| {
            format!(
                "parentRefs: [{{group: \"\", kind: Service, name: echo, port: 80}}]\nrules:\n- filters: [{mirrors}]\n  backendRefs: [{{name: echo-v1, port: 8080}}]\n"
            )
        };
        let m = |to: &str, extra: &str| {
            format!("{{type: RequestMirror, requestMirror: {{backendRef: {{name: {to}, port: 8080}}{extra}}}}}")
        };
        let c = Splits::default().compile(&snap(&[&rule(&m("echo-v2", ", percent: 30"))]));
        let routes = c.http.values().next().unwrap();
        let mirror = routes.rules[0].mirror.as_ref().unwrap();
        assert_eq!((mirror.service.as_str(), mirror.percent), ("m/echo-v2:8080", 30));
        assert!(mirror.pool.slots.iter().all(|s| matches!(s, Slot::Endpoint(_))) && !mirror.pool.slots.is_empty());
        for (filters, why) in [
            (
                format!("{}, {}", m("echo-v2", ""), m("echo-v1", "")),
                "more than one RequestMirror",
            ),
            (m("echo-v2", ", percent: 101"), "over 100"),
            (m("missing", ""), "RequestMirror backendRef m/missing: no such Service"),
        ] {
            let c = Splits::default().compile(&snap(&[&rule(&filters)]));
            assert!(
                c.routes_refused.len() == 1 && c.routes_refused[0].reason.contains(why),
                "{filters}: {:?}",
                c.routes_refused
            );
        }
    }
}
