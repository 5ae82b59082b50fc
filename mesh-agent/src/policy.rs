//! SMI access policy: compiles TrafficTargets and their routes into one
//! immutable [`Policy`], evaluated by the destination agent (authoritative),
//! turned into kernel allow rules for `connect()`, and explained by
//! `mesh-agent policy check` — one code path for all three.
//!
//! Semantics (the SMI spec): TrafficTargets are additive allow rules; in
//! enforcing mode every meshed flow no target allows is denied. A target
//! allows its sources to reach pods with its destination ServiceAccount on
//! the ports of its TCPRoute/UDPRoute rules (all ports when a route lists
//! none, or when the target has only HTTPRouteGroup rules).
pub mod check;

use std::{collections::BTreeSet, sync::Arc};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use regex::Regex;

use crate::state::{Named, PolicyMode, SmiSet, identity_id};

/// A workload identity as policy sees it: namespace + ServiceAccount.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ident {
    pub namespace: String,
    pub service_account: String,
}

impl std::fmt::Display for Ident {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.service_account)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

/// Ports a rule covers; `None` is every port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortRule {
    pub route: String,
    pub ports: Option<BTreeSet<u16>>,
}

#[derive(Clone, Debug)]
pub struct HttpMatch {
    pub group: String,
    pub name: String,
    pub methods: Option<BTreeSet<String>>,
    pub path: Option<Regex>,
    pub headers: Vec<(String, Regex)>,
}

impl HttpMatch {
    /// Method, path (anchored at `^`) and every listed header: all must match.
    pub fn matches(&self, req: &HttpRequest<'_>) -> bool {
        let method_ok = self
            .methods
            .as_ref()
            .is_none_or(|ms| ms.contains(&req.method.to_ascii_uppercase()));
        let path_ok = self.path.as_ref().is_none_or(|re| re.is_match(req.path));
        let headers_ok = self.headers.iter().all(|(name, re)| {
            req.headers
                .iter()
                .any(|(h, v)| h.eq_ignore_ascii_case(name) && re.is_match(v))
        });
        method_ok && path_ok && headers_ok
    }
}

#[derive(Clone, Debug)]
pub struct Target {
    /// `namespace/name` of the TrafficTarget.
    pub name: String,
    pub destination: Ident,
    pub sources: Vec<Ident>,
    pub tcp: Vec<PortRule>,
    pub udp: Vec<PortRule>,
    pub http: Vec<HttpMatch>,
}

/// What the policy looks at in an HTTP request.
#[derive(Clone, Copy, Debug)]
pub struct HttpRequest<'a> {
    pub method: &'a str,
    /// The URI path, matched by `pathRegex` anchored at `^`.
    pub path: &'a str,
    pub headers: &'a [(String, String)],
}

/// One kernel allow rule (see `mesh_common::PolicyKey`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct KernelRule {
    pub src: u32,
    pub dst: u32,
    pub port: u16,
    pub proto: u8,
    pub rule: u32,
    pub flags: u32,
}

/// A resource the compiler refused, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    pub kind: &'static str,
    pub name: String,
    pub reason: String,
}

#[derive(Clone, Debug, Default)]
pub struct Policy {
    pub generation: u64,
    pub targets: Vec<Target>,
    pub rejected: Vec<Rejected>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The TrafficTarget that allowed it (`namespace/name`), if one did.
    pub target: Option<String>,
    /// The rule within it (`TCPRoute/name`, ...), or the mode.
    pub rule: String,
    pub reason: String,
}

impl Policy {
    /// Compiles SMI resources, refusing invalid ones one by one: a refused
    /// route makes the targets that use it refused too, never widened.
    pub fn compile(smi: &SmiSet, generation: u64) -> Policy {
        let mut rejected = Vec::new();
        let mut tcp = Vec::new();
        for r in &smi.tcp_routes {
            match port_rule(&r.spec.matches.ports) {
                Ok(ports) => tcp.push((r.namespace.clone(), r.name.clone(), ports)),
                Err(reason) => rejected.push(Rejected {
                    kind: "TCPRoute",
                    name: full(r),
                    reason,
                }),
            }
        }
        let mut udp = Vec::new();
        for r in &smi.udp_routes {
            match port_rule(&r.spec.matches.ports) {
                Ok(ports) => udp.push((r.namespace.clone(), r.name.clone(), ports)),
                Err(reason) => rejected.push(Rejected {
                    kind: "UDPRoute",
                    name: full(r),
                    reason,
                }),
            }
        }
        let mut groups: Vec<(String, String, Vec<HttpMatch>)> = Vec::new();
        for g in &smi.http_route_groups {
            match http_matches(g) {
                Ok(m) => groups.push((g.namespace.clone(), g.name.clone(), m)),
                Err(reason) => rejected.push(Rejected {
                    kind: "HTTPRouteGroup",
                    name: full(g),
                    reason,
                }),
            }
        }
        let mut targets = Vec::new();
        for t in &smi.traffic_targets {
            match compile_target(t, &tcp, &udp, &groups, &rejected) {
                Ok(target) => targets.push(target),
                Err(reason) => rejected.push(Rejected {
                    kind: "TrafficTarget",
                    name: full(t),
                    reason,
                }),
            }
        }
        Policy {
            generation,
            targets,
            rejected,
        }
    }

    /// The L4 decision for a flow, with the target and rule that decided it.
    pub fn evaluate(&self, mode: PolicyMode, src: &Ident, dst: &Ident, port: u16, proto: Proto) -> Decision {
        for t in &self.targets {
            if &t.destination != dst || !t.sources.contains(src) {
                continue;
            }
            let rules = match proto {
                Proto::Tcp => &t.tcp,
                Proto::Udp => &t.udp,
            };
            for r in rules {
                if r.ports.as_ref().is_none_or(|p| p.contains(&port)) {
                    let kind = if proto == Proto::Tcp { "TCPRoute" } else { "UDPRoute" };
                    return allow(
                        t,
                        format!("{kind}/{}", r.route),
                        format!("{} allows {src} -> {dst} on {port}", t.name),
                    );
                }
            }
            // HTTP-only targets allow TCP on any port; the requests are checked at L7.
            if proto == Proto::Tcp && t.tcp.is_empty() && t.udp.is_empty() && !t.http.is_empty() {
                let group = &t.http[0].group;
                return allow(
                    t,
                    format!("HTTPRouteGroup/{group}"),
                    format!("{} allows {src} -> {dst} (HTTP rules apply)", t.name),
                );
            }
        }
        let reason = format!(
            "no TrafficTarget allows {src} -> {dst} on port {port}/{}",
            if proto == Proto::Tcp { "tcp" } else { "udp" }
        );
        match mode {
            PolicyMode::Enforcing => Decision {
                allowed: false,
                target: None,
                rule: "default-deny".into(),
                reason,
            },
            PolicyMode::Permissive => Decision {
                allowed: true,
                target: None,
                rule: "permissive".into(),
                reason: format!("permissive mode ({reason})"),
            },
        }
    }

    /// The HTTP decision for one request on a flow L4 allowed: when every
    /// target that allows the flow restricts HTTP, the request must match
    /// one of their routes (method, `^`-anchored path, all headers).
    pub fn evaluate_http(
        &self,
        mode: PolicyMode,
        src: &Ident,
        dst: &Ident,
        port: u16,
        req: &HttpRequest<'_>,
    ) -> Decision {
        let HttpRequest { method, path, .. } = *req;
        let l4 = self.evaluate(mode, src, dst, port, Proto::Tcp);
        if !l4.allowed || l4.target.is_none() {
            return l4;
        }
        let allowing: Vec<&Target> = self
            .targets
            .iter()
            .filter(|t| &t.destination == dst && t.sources.contains(src))
            .filter(|t| {
                t.tcp.iter().any(|r| r.ports.as_ref().is_none_or(|p| p.contains(&port)))
                    || (t.tcp.is_empty() && !t.http.is_empty())
            })
            .collect();
        if let Some(t) = allowing.iter().find(|t| t.http.is_empty()) {
            return allow(
                t,
                l4.rule.clone(),
                format!("{} allows {src} -> {dst} on {port} without HTTP rules", t.name),
            );
        }
        for t in &allowing {
            for m in &t.http {
                if m.matches(req) {
                    return allow(
                        t,
                        format!("HTTPRouteGroup/{}#{}", m.group, m.name),
                        format!("{} allows {method} {path}", t.name),
                    );
                }
            }
        }
        let reason = format!("no HTTPRouteGroup match allows {method} {path} from {src} to {dst}");
        match mode {
            PolicyMode::Enforcing => Decision {
                allowed: false,
                target: None,
                rule: "default-deny".into(),
                reason,
            },
            PolicyMode::Permissive => Decision {
                allowed: true,
                target: None,
                rule: "permissive".into(),
                reason: format!("permissive mode ({reason})"),
            },
        }
    }

    /// Kernel allow rules: (source identity id, destination identity id,
    /// port or ANY_PORT, protocol, allowing target index, flags). Flags say
    /// HTTP rules apply: conservatively, whenever any allowing target of the
    /// identity pair has HTTP rules, so the agent sees those flows.
    pub fn kernel_rules(&self) -> Vec<KernelRule> {
        let mut out: Vec<KernelRule> = Vec::new();
        for (i, t) in self.targets.iter().enumerate() {
            let dst = identity_id(&t.destination.namespace, &t.destination.service_account);
            let flags = if t.http.is_empty() {
                0
            } else {
                mesh_common::POLICY_FLAG_HTTP
            };
            for s in &t.sources {
                let src = identity_id(&s.namespace, &s.service_account);
                let mut push = |rules: &[PortRule], proto: u8| {
                    for r in rules {
                        match &r.ports {
                            None => out.push(KernelRule {
                                src,
                                dst,
                                port: mesh_common::ANY_PORT,
                                proto,
                                rule: i as u32,
                                flags,
                            }),
                            Some(ports) => out.extend(ports.iter().map(|p| KernelRule {
                                src,
                                dst,
                                port: *p,
                                proto,
                                rule: i as u32,
                                flags,
                            })),
                        }
                    }
                };
                push(&t.tcp, mesh_common::PROTO_TCP);
                push(&t.udp, mesh_common::PROTO_UDP);
                if t.tcp.is_empty() && t.udp.is_empty() && !t.http.is_empty() {
                    out.push(KernelRule {
                        src,
                        dst,
                        port: mesh_common::ANY_PORT,
                        proto: mesh_common::PROTO_TCP,
                        rule: i as u32,
                        flags,
                    });
                }
            }
        }
        let http_pairs: BTreeSet<(u32, u32, u8)> = out
            .iter()
            .filter(|r| r.flags != 0)
            .map(|r| (r.src, r.dst, r.proto))
            .collect();
        for r in &mut out {
            if http_pairs.contains(&(r.src, r.dst, r.proto)) {
                r.flags = mesh_common::POLICY_FLAG_HTTP;
            }
        }
        out.sort();
        out.dedup_by(|a, b| (a.src, a.dst, a.port, a.proto) == (b.src, b.dst, b.port, b.proto));
        out
    }

    /// Whether HTTP requests of this flow must be checked (some allowing
    /// target restricts HTTP and none allows it without HTTP rules).
    pub fn http_restricted(&self, src: &Ident, dst: &Ident, port: u16) -> bool {
        let allowing: Vec<&Target> = self
            .targets
            .iter()
            .filter(|t| &t.destination == dst && t.sources.contains(src))
            .filter(|t| {
                t.tcp.iter().any(|r| r.ports.as_ref().is_none_or(|p| p.contains(&port)))
                    || (t.tcp.is_empty() && !t.http.is_empty())
            })
            .collect();
        !allowing.is_empty() && allowing.iter().all(|t| !t.http.is_empty())
    }
}

/// The policy in force and its mode, as the datapath sees it.
#[derive(Clone, Debug)]
pub struct InForce {
    pub policy: Arc<Policy>,
    pub mode: PolicyMode,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub verdict: &'static str,
    pub enforced_at: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Default)]
pub struct PolicyMetrics {
    pub generation: Gauge,
    pub decisions: Family<DecisionLabels, Counter>,
    pub rejected: Family<KindLabels, Counter>,
}

impl PolicyMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "mesh_policy_generation",
            "Generation of the policy in force",
            self.generation.clone(),
        );
        r.register(
            "mesh_policy_decisions",
            "Policy decisions by verdict and where they were made",
            self.decisions.clone(),
        );
        r.register(
            "mesh_policy_rejected_resources",
            "SMI resources refused by the policy compiler",
            self.rejected.clone(),
        );
    }
}

/// The destination side's policy check (authoritative), on the tunnel's
/// inbound path: one audit line per decision.
pub struct PolicyAuthorizer {
    pub in_force: tokio::sync::watch::Receiver<Arc<InForce>>,
    pub metrics: PolicyMetrics,
    pub node: String,
    pub audit: Arc<crate::audit::Audit>,
}

/// What a destination-side decision was about.
enum Seen<'a> {
    /// A TCP flow or a UDP session.
    Flow(Proto),
    /// An HTTP request (method, path).
    Request(&'a str, &'a str),
}

impl PolicyAuthorizer {
    fn audit(
        &self,
        d: &Decision,
        source: &crate::identity::SpiffeId,
        destination: &crate::state::Pod,
        port: u16,
        seen: Seen<'_>,
        generation: u64,
    ) {
        let (protocol, request) = match seen {
            Seen::Flow(Proto::Tcp) => ("tcp", None),
            Seen::Flow(Proto::Udp) => ("udp", None),
            Seen::Request(method, path) => ("http", Some((method, path))),
        };
        let verdict = if d.allowed { "allow" } else { "deny" };
        self.metrics
            .decisions
            .get_or_create(&DecisionLabels {
                verdict,
                enforced_at: "destination",
            })
            .inc();
        let (method, path) = request.unwrap_or(("", ""));
        self.audit.record(crate::audit::AuditRecord {
            kind: "policy".into(),
            enforced_at: "destination".into(),
            verdict: verdict.into(),
            source_workload: String::new(),
            source_identity: source.to_string(),
            destination_workload: destination.workload_name(),
            destination_identity: format!("{}/{}", destination.namespace, destination.service_account),
            destination_address: format!("{}:{port}", destination.ip),
            port,
            protocol: protocol.into(),
            rule: d.rule.clone(),
            traffic_target: d.target.clone().unwrap_or_default(),
            generation,
            reason: d.reason.clone(),
            method: method.into(),
            path: path.into(),
            ..Default::default()
        });
        tracing::info!(
            target: "audit", kind = "policy", node = %self.node, verdict, enforced_at = "destination",
            source_identity = %source, destination_workload = %destination.workload_name(),
            destination_identity = %format!("{}/{}", destination.namespace, destination.service_account),
            port, protocol, method, path, rule = %d.rule,
            traffic_target = d.target.as_deref().unwrap_or(""), generation, reason = %d.reason, "policy decision"
        );
    }
}

impl crate::tunnel::inbound::Authorizer for PolicyAuthorizer {
    fn authorize(
        &self,
        source: &crate::identity::SpiffeId,
        destination: &crate::state::Pod,
        port: u16,
        proto: Proto,
    ) -> Result<crate::tunnel::inbound::Admission, String> {
        let now = self.in_force.borrow().clone();
        let src = Ident {
            namespace: source.namespace.clone(),
            service_account: source.service_account.clone(),
        };
        let dst = Ident {
            namespace: destination.namespace.clone(),
            service_account: destination.service_account.clone(),
        };
        let d = now.policy.evaluate(now.mode, &src, &dst, port, proto);
        self.audit(&d, source, destination, port, Seen::Flow(proto), now.policy.generation);
        if !d.allowed {
            return Err(d.reason);
        }
        if proto == Proto::Tcp && now.mode == PolicyMode::Enforcing && now.policy.http_restricted(&src, &dst, port) {
            return Ok(crate::tunnel::inbound::Admission::Http(Arc::new(HttpRequests {
                authorizer: Arc::new(PolicyAuthorizer {
                    in_force: self.in_force.clone(),
                    metrics: self.metrics.clone(),
                    node: self.node.clone(),
                    audit: self.audit.clone(),
                }),
                in_force: now,
                source: source.clone(),
                destination: destination.clone(),
                src,
                dst,
                port,
            })));
        }
        Ok(crate::tunnel::inbound::Admission::Open)
    }
}

/// Checks each HTTP request of one flow against the policy that admitted it.
struct HttpRequests {
    authorizer: Arc<PolicyAuthorizer>,
    in_force: Arc<InForce>,
    source: crate::identity::SpiffeId,
    destination: crate::state::Pod,
    src: Ident,
    dst: Ident,
    port: u16,
}

impl crate::tunnel::inbound::HttpCheck for HttpRequests {
    fn check(&self, method: &str, path: &str, headers: &[(String, String)]) -> Result<(), String> {
        let p = &self.in_force.policy;
        let req = HttpRequest { method, path, headers };
        let d = p.evaluate_http(self.in_force.mode, &self.src, &self.dst, self.port, &req);
        self.authorizer.audit(
            &d,
            &self.source,
            &self.destination,
            self.port,
            Seen::Request(method, path),
            p.generation,
        );
        if d.allowed { Ok(()) } else { Err(d.reason) }
    }
}

fn allow(t: &Target, rule: String, reason: String) -> Decision {
    Decision {
        allowed: true,
        target: Some(t.name.clone()),
        rule,
        reason,
    }
}

fn full<T>(n: &Named<T>) -> String {
    format!("{}/{}", n.namespace, n.name)
}

fn port_rule(ports: &[u16]) -> Result<Option<BTreeSet<u16>>, String> {
    if ports.contains(&0) {
        return Err("port 0 is not a port (ports are 1-65535)".into());
    }
    Ok((!ports.is_empty()).then(|| ports.iter().copied().collect()))
}

pub fn http_matches(g: &Named<crate::smi::HTTPRouteGroupSpec>) -> Result<Vec<HttpMatch>, String> {
    let mut out = Vec::new();
    for m in &g.spec.matches {
        // Anchored at ^, as the spec says.
        let path = match &m.path_regex {
            Some(p) => {
                Some(Regex::new(&format!("^(?:{p})")).map_err(|e| format!("match {}: pathRegex {p:?}: {e}", m.name))?)
            }
            None => None,
        };
        let mut headers = Vec::new();
        for (h, re) in m.headers.iter().flatten() {
            headers.push((
                h.to_ascii_lowercase(),
                Regex::new(re).map_err(|e| format!("match {}: header {h} regex {re:?}: {e}", m.name))?,
            ));
        }
        let methods = match &m.methods {
            Some(ms) if ms.iter().any(|x| x == "*") => None,
            Some(ms) => Some(ms.iter().map(|x| x.to_ascii_uppercase()).collect()),
            None => None,
        };
        out.push(HttpMatch {
            group: g.name.clone(),
            name: m.name.clone(),
            methods,
            path,
            headers,
        });
    }
    Ok(out)
}

fn subject(s: &crate::smi::IdentityBindingSubject, default_ns: &str, what: &str) -> Result<Ident, String> {
    if s.kind != "ServiceAccount" {
        return Err(format!(
            "{what} kind {:?} is not supported (only ServiceAccount)",
            s.kind
        ));
    }
    Ok(Ident {
        namespace: s.namespace.clone().unwrap_or_else(|| default_ns.to_string()),
        service_account: s.name.clone(),
    })
}

type Routes = [(String, String, Option<BTreeSet<u16>>)];

fn compile_target(
    t: &Named<crate::smi::TrafficTargetSpec>,
    tcp: &Routes,
    udp: &Routes,
    groups: &[(String, String, Vec<HttpMatch>)],
    rejected: &[Rejected],
) -> Result<Target, String> {
    let ns = &t.namespace;
    let destination = subject(&t.spec.destination, ns, "destination")?;
    let sources = t
        .spec
        .sources
        .iter()
        .map(|s| subject(s, ns, "source"))
        .collect::<Result<Vec<_>, _>>()?;
    if sources.is_empty() {
        return Err("a TrafficTarget needs at least one source".into());
    }
    if t.spec.rules.is_empty() {
        return Err("a TrafficTarget needs at least one rule".into());
    }
    let (mut tcp_rules, mut udp_rules, mut http) = (Vec::new(), Vec::new(), Vec::new());
    for rule in &t.spec.rules {
        // Route specs are namespaced with the TrafficTarget.
        let missing = |kind: &str| {
            let refused = rejected
                .iter()
                .any(|r| r.kind == kind && r.name == format!("{ns}/{}", rule.name));
            if refused {
                format!("rule {kind}/{} refers to a route that was refused", rule.name)
            } else {
                format!(
                    "rule {kind}/{} refers to a route that does not exist in namespace {ns}",
                    rule.name
                )
            }
        };
        match rule.kind.as_str() {
            "TCPRoute" | "UDPRoute" => {
                let routes = if rule.kind == "TCPRoute" { tcp } else { udp };
                let (_, _, ports) = routes
                    .iter()
                    .find(|(rns, name, _)| rns == ns && name == &rule.name)
                    .ok_or_else(|| missing(&rule.kind))?;
                let r = PortRule {
                    route: rule.name.clone(),
                    ports: ports.clone(),
                };
                if rule.kind == "TCPRoute" {
                    tcp_rules.push(r)
                } else {
                    udp_rules.push(r)
                }
            }
            "HTTPRouteGroup" => {
                let (_, _, matches) = groups
                    .iter()
                    .find(|(gns, name, _)| gns == ns && name == &rule.name)
                    .ok_or_else(|| missing("HTTPRouteGroup"))?;
                let wanted = rule.matches.as_ref();
                if let Some(bad) =
                    wanted.and_then(|names| names.iter().find(|n| !matches.iter().any(|m| &m.name == *n)))
                {
                    return Err(format!("rule HTTPRouteGroup/{} has no match named {bad:?}", rule.name));
                }
                http.extend(
                    matches
                        .iter()
                        .filter(|m| wanted.is_none_or(|w| w.contains(&m.name)))
                        .cloned(),
                );
            }
            other => {
                return Err(format!(
                    "unknown rule kind {other:?} (TCPRoute, UDPRoute or HTTPRouteGroup)"
                ));
            }
        }
    }
    Ok(Target {
        name: full(t),
        destination,
        sources,
        tcp: tcp_rules,
        udp: udp_rules,
        http,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::SmiSet;

    fn smi(yaml: &str) -> SmiSet {
        let dir = std::env::temp_dir().join(format!(
            "mesh-policy-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("p.yaml"), yaml).unwrap();
        let s = crate::source::file::load(&dir).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(s.errors.is_empty(), "{:?}", s.errors);
        s.smi
    }

    fn id(sa: &str) -> Ident {
        Ident {
            namespace: "shop".into(),
            service_account: sa.into(),
        }
    }

    const POLICY: &str = "
kind: TCPRoute
metadata: {name: web-port, namespace: shop}
spec: {matches: {ports: [8080]}}
---
kind: TCPRoute
metadata: {name: all-ports, namespace: shop}
spec: {matches: {ports: []}}
---
kind: TrafficTarget
metadata: {name: front-to-web, namespace: shop}
spec:
  destination: {kind: ServiceAccount, name: web}
  rules: [{kind: TCPRoute, name: web-port}]
  sources: [{kind: ServiceAccount, name: front}]
---
kind: TrafficTarget
metadata: {name: web-to-db, namespace: shop}
spec:
  destination: {kind: ServiceAccount, name: db, namespace: shop}
  rules: [{kind: TCPRoute, name: all-ports}]
  sources: [{kind: ServiceAccount, name: web, namespace: shop}]
";

    #[test]
    fn targets_are_additive_allows_and_everything_else_is_denied() {
        let p = Policy::compile(&smi(POLICY), 1);
        assert!(p.rejected.is_empty(), "{:?}", p.rejected);
        let d = p.evaluate(PolicyMode::Enforcing, &id("front"), &id("web"), 8080, Proto::Tcp);
        assert!(d.allowed);
        assert_eq!(
            (d.target.as_deref(), d.rule.as_str()),
            (Some("shop/front-to-web"), "TCPRoute/web-port")
        );
        assert!(
            !p.evaluate(PolicyMode::Enforcing, &id("front"), &id("web"), 9090, Proto::Tcp)
                .allowed
        );
        assert!(
            !p.evaluate(PolicyMode::Enforcing, &id("front"), &id("db"), 5432, Proto::Tcp)
                .allowed
        );
        assert!(
            p.evaluate(PolicyMode::Enforcing, &id("web"), &id("db"), 5432, Proto::Tcp)
                .allowed
        );
        assert!(
            !p.evaluate(PolicyMode::Enforcing, &id("web"), &id("db"), 5432, Proto::Udp)
                .allowed
        );
        let d = p.evaluate(PolicyMode::Permissive, &id("front"), &id("db"), 5432, Proto::Tcp);
        assert!(d.allowed && d.rule == "permissive");
        // Kernel rules: an exact port, and ANY_PORT for the all-ports route.
        let rules = p.kernel_rules();
        assert!(
            rules
                .iter()
                .any(|r| r.port == 8080 && r.proto == mesh_common::PROTO_TCP && r.flags == 0)
        );
        assert!(rules.iter().any(|r| r.port == mesh_common::ANY_PORT));
        assert_eq!(rules.len(), 2);
    }

    #[test]
    fn http_rules_match_method_anchored_path_and_headers() {
        let yaml = "
kind: HTTPRouteGroup
metadata: {name: api, namespace: shop}
spec:
  matches:
  - {name: read-api, pathRegex: \"/api/.*\", methods: [GET]}
  - {name: debug, pathRegex: \"/debug\", methods: [\"*\"], headers: {x-debug: \"^1$\"}}
---
kind: TrafficTarget
metadata: {name: front-api, namespace: shop}
spec:
  destination: {kind: ServiceAccount, name: web}
  rules: [{kind: HTTPRouteGroup, name: api}]
  sources: [{kind: ServiceAccount, name: front}]
";
        let p = Policy::compile(&smi(yaml), 1);
        let e = |m: &str, path: &str, h: &[(&str, &str)]| {
            let h: Vec<(String, String)> = h.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
            p.evaluate_http(
                PolicyMode::Enforcing,
                &id("front"),
                &id("web"),
                80,
                &HttpRequest {
                    method: m,
                    path,
                    headers: &h,
                },
            )
        };
        let d = e("GET", "/api/x", &[]);
        assert!(d.allowed && d.rule == "HTTPRouteGroup/api#read-api", "{d:?}");
        assert!(!e("POST", "/api/x", &[]).allowed);
        assert!(!e("GET", "/admin", &[]).allowed);
        assert!(!e("GET", "/v1/api/x", &[]).allowed, "anchored at ^");
        assert!(e("POST", "/debug", &[("X-Debug", "1")]).allowed);
        assert!(!e("POST", "/debug", &[("X-Debug", "2")]).allowed);
        // L4: an HTTP-only target opens TCP to the destination (requests are checked at L7).
        assert!(
            p.evaluate(PolicyMode::Enforcing, &id("front"), &id("web"), 80, Proto::Tcp)
                .allowed
        );
    }

    #[test]
    fn invalid_resources_are_refused_by_name_and_never_widen_access() {
        let bad = format!(
            "{POLICY}---
kind: HTTPRouteGroup
metadata: {{name: broken, namespace: shop}}
spec: {{matches: [{{name: m, pathRegex: \"([\"}}]}}
---
kind: TrafficTarget
metadata: {{name: uses-broken, namespace: shop}}
spec:
  destination: {{kind: ServiceAccount, name: db}}
  rules: [{{kind: HTTPRouteGroup, name: broken}}]
  sources: [{{kind: ServiceAccount, name: front}}]
---
kind: TrafficTarget
metadata: {{name: odd-kind, namespace: shop}}
spec:
  destination: {{kind: ServiceAccount, name: db}}
  rules: [{{kind: GRPCRoute, name: x}}]
  sources: [{{kind: ServiceAccount, name: front}}]
---
kind: TrafficTarget
metadata: {{name: missing-route, namespace: shop}}
spec:
  destination: {{kind: ServiceAccount, name: db}}
  rules: [{{kind: TCPRoute, name: nope}}]
  sources: [{{kind: ServiceAccount, name: front}}]
"
        );
        let p = Policy::compile(&smi(&bad), 2);
        let names: Vec<(&str, &str)> = p.rejected.iter().map(|r| (r.kind, r.name.as_str())).collect();
        assert_eq!(
            names,
            [
                ("HTTPRouteGroup", "shop/broken"),
                ("TrafficTarget", "shop/uses-broken"),
                ("TrafficTarget", "shop/odd-kind"),
                ("TrafficTarget", "shop/missing-route")
            ]
        );
        assert!(p.rejected[0].reason.contains("pathRegex"));
        assert!(p.rejected[1].reason.contains("refused"));
        assert!(p.rejected[2].reason.contains("unknown rule kind"));
        assert!(p.rejected[3].reason.contains("does not exist"));
        // The good ones still apply; the broken ones opened nothing.
        assert!(
            p.evaluate(PolicyMode::Enforcing, &id("front"), &id("web"), 8080, Proto::Tcp)
                .allowed
        );
        assert!(
            !p.evaluate(PolicyMode::Enforcing, &id("front"), &id("db"), 5432, Proto::Tcp)
                .allowed
        );
    }
}
