//! `mesh-agent policy check`: explains one decision from the same compiled
//! policy the datapath uses.
use std::{fmt::Write as _, net::SocketAddr};

use anyhow::{Context as _, bail};

use crate::{
    authz::{HttpRequest, Proto},
    config::PolicyCommand,
    policy::Policy,
    state::{AdmissionMode, Identity, PolicyMode, Store},
};

/// `namespace/sa`, `pod:namespace/name`, or (for the destination) `ip:port`.
fn resolve(snap: &Store, spec: &str) -> anyhow::Result<(Identity, Option<u16>)> {
    if let Some(pod) = spec.strip_prefix("pod:") {
        let p = snap
            .pods
            .get(pod)
            .with_context(|| format!("no pod {pod} in the source (give it as namespace/name)"))?;
        return Ok((p.identity(), None));
    }
    if let Ok(addr) = spec.parse::<SocketAddr>() {
        let p = snap
            .pod_by_ip(addr.ip())
            .with_context(|| format!("{} is not a meshed pod", addr.ip()))?;
        return Ok((p.identity(), Some(addr.port())));
    }
    let (ns, sa) = spec
        .split_once('/')
        .with_context(|| format!("{spec:?}: want namespace/serviceaccount, pod:namespace/name or ip:port"))?;
    Ok((Identity::new(ns, sa), None))
}

/// The pod a destination spec names, when it names one.
fn dst_pod<'a>(snap: &'a Store, spec: &str) -> Option<&'a crate::state::Pod> {
    if let Some(pod) = spec.strip_prefix("pod:") {
        return snap.pods.get(pod);
    }
    snap.pod_by_ip(spec.parse::<SocketAddr>().ok()?.ip())
}

/// Prints the decision; returns whether it allows.
pub fn run(command: PolicyCommand) -> anyhow::Result<bool> {
    let PolicyCommand::Check {
        source_dir,
        from,
        to,
        port,
        protocol,
        method,
        path,
        headers,
        trust_domain,
        policy_mode,
    } = command;
    // As the datapath sees them (hyper): names lowercase, values trimmed.
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|h| {
            h.split_once(':')
                .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
                .with_context(|| format!("--header {h:?}: want `name: value`"))
        })
        .collect::<anyhow::Result<_>>()?;
    if !headers.is_empty() && path.is_none() {
        bail!("--header needs --method and --path (an HTTP check)");
    }
    let snap = Store::new(crate::source::file::load(&source_dir)?);
    for e in &snap.errors {
        eprintln!("warning: {e}");
    }
    let policy = Policy::compile_all(&snap, &trust_domain, 0);
    for r in &policy.rejected {
        eprintln!("warning: {} {} refused: {}", r.kind, r.name, r.reason);
    }
    let mode = snap.mode.unwrap_or(policy_mode);
    let (src, _) = resolve(&snap, &from)?;
    let request = match (&method, &path) {
        // `--path /x?a=1`: the query is matched apart, as the datapath does.
        (Some(m), Some(p)) => {
            let (path, query) = p.split_once('?').unwrap_or((p.as_str(), ""));
            Some((m.as_str(), path, query))
        }
        (None, None) => None,
        _ => bail!("give both --method and --path for an HTTP check"),
    };
    if let Ok(vip) = to.parse::<SocketAddr>()
        && snap.pod_by_ip(vip.ip()).is_none()
    {
        let request = request.map(|(method, path, query)| HttpRequest {
            method,
            path,
            query,
            headers: &headers,
        });
        let (allowed, out) = explain_service(&snap, &policy, mode, &src, vip, &protocol, request.as_ref())?;
        print!("{out}");
        return Ok(allowed);
    }
    let (dst, addr_port) = resolve(&snap, &to)?;
    let port = port
        .or(addr_port)
        .context("give the destination port with --port or as ip:port")?;
    let proto = if protocol == "udp" { Proto::Udp } else { Proto::Tcp };
    let d = match request {
        Some((method, path, query)) => policy.evaluate_http(
            mode,
            &src,
            &dst,
            port,
            &HttpRequest {
                method,
                path,
                query,
                headers: &headers,
            },
        ),
        None => policy.evaluate(mode, &src, &dst, port, proto),
    };
    println!(
        "{} {src} -> {dst} port {port}/{protocol}{}",
        if d.allowed { "ALLOW" } else { "DENY" },
        match (&method, &path) {
            (Some(m), Some(p)) => format!(" {m} {p}"),
            _ => String::new(),
        }
    );
    match &d.target {
        Some(t) => println!("  by TrafficTarget {t}, rule {}", d.rule),
        None => println!(
            "  by {} ({} mode)",
            d.rule,
            if mode == PolicyMode::Enforcing {
                "enforcing"
            } else {
                "permissive"
            }
        ),
    }
    println!("  {}", d.reason);
    if let Some(pod) = dst_pod(&snap, &to) {
        let (admission, set_by) = snap.admission_of(pod, mode);
        println!(
            "  admission at {}: {} ({set_by}): {}",
            pod.workload_name(),
            admission.as_str(),
            match admission {
                AdmissionMode::Strict => {
                    "only the mesh's own flows get in (meshed pods' permitted connects, the agent's tunnels, the \
                     probe cgroup); every other source is dropped"
                }
                AdmissionMode::Permissive => "every source gets in; unattested ones are audited",
                AdmissionMode::Off => "every source gets in, unaudited",
            }
        );
    }
    Ok(d.allowed)
}

/// A Service VIP as destination: where its table sends connections (or,
/// for an HTTP-matched split and a request, that request) and why, then
/// the policy decision for each endpoint it may reach (policy applies to
/// the endpoint pod, as in the datapath). Allows when every one does.
fn explain_service(
    snap: &Store,
    policy: &Policy,
    mode: PolicyMode,
    src: &Identity,
    vip: SocketAddr,
    protocol: &str,
    request: Option<&HttpRequest<'_>>,
) -> anyhow::Result<(bool, String)> {
    let mut out = String::new();
    let out = &mut out;
    let compiled = crate::services::Splits::default().compile(snap);
    for r in &compiled.refused {
        eprintln!("warning: TrafficSplit {} refused: {}", r.name, r.reason);
    }
    let proto_id = if protocol == "udp" {
        mesh_common::PROTO_UDP
    } else {
        mesh_common::PROTO_TCP
    };
    let table = compiled
        .tables
        .iter()
        .find(|t| t.vip == vip.ip() && t.port == vip.port() && t.protocol == proto_id)
        .with_context(|| format!("{vip}/{protocol} is neither a meshed pod nor a Service port in the source"))?;
    let _ = writeln!(out, "SERVICE {} ({vip}/{protocol})", table.name);
    for r in &compiled.traffic_policies.refused {
        eprintln!("warning: {} refused: {}", r.name, r.reason);
    }
    // The TrafficPolicy of the port, client side and destination side.
    let svc_port = table.name.split('/').take(2).collect::<Vec<_>>().join("/");
    let at = svc_port
        .rsplit_once(':')
        .and_then(|(svc, port)| Some((svc.to_string(), port.parse::<u16>().ok()?)));
    if let Some(at) = at {
        let client = compiled.traffic_policies.client.get(&at);
        let limits = compiled.traffic_policies.limits.get(&at);
        if let Some(name) = client.map(|c| &c.name).or(limits.map(|l| &l.name)) {
            let settings = client.map(|c| &c.settings).or(limits.map(|l| &l.settings));
            let _ = writeln!(out, "  {name} applies:");
            for line in settings.map(|s| s.describe()).unwrap_or_default() {
                let _ = writeln!(out, "    {line}");
            }
        }
    }
    // The pool the datapath picks from, and how it got there.
    use crate::routes::{Slot, Way};
    let endpoints = |slots: &[(std::net::IpAddr, u16)]| -> Vec<Slot> {
        slots
            .iter()
            .map(|(ip, port)| Slot::Endpoint(SocketAddr::new(*ip, *port)))
            .collect()
    };
    let pool: Vec<Slot> = match (compiled.http.get(&vip), request) {
        (Some(routes), Some(req)) if proto_id == mesh_common::PROTO_TCP => match routes.route(req) {
            Way::Rule(rule, _) => {
                let how = rule
                    .matches
                    .iter()
                    .find(|m| m.matches(req))
                    .map(|m| m.describe())
                    .unwrap_or_default();
                let _ = writeln!(
                    out,
                    "  {} {}: matches {} ({how}): sent to its backends by weight",
                    req.method, req.path, rule.name
                );
                if let Some(split) = rule.name.strip_prefix("TrafficSplit ") {
                    print_split_weights(snap, split, out);
                }
                if let Some(r) = &rule.filters.retry {
                    let _ = writeln!(
                        out,
                        "  retried up to {} time(s), {:?} apart, on a failed connect or status {:?} (bodies up to {} bytes are kept for it)",
                        r.attempts,
                        r.backoff,
                        r.codes,
                        crate::routes::RETRY_BODY_LIMIT
                    );
                }
                if let Some(m) = &rule.mirror {
                    let _ = writeln!(
                        out,
                        "  {}% of requests also copied to {} (RequestMirror; its answers are dropped)",
                        m.percent, m.service
                    );
                }
                if let Some((limit, which)) = rule.filters.timeouts.limit() {
                    let _ = writeln!(
                        out,
                        "  no response within {limit:?} (the rule's {which} timeout): answered 504 by the agent"
                    );
                }
                if let Some(r) = &rule.filters.redirect {
                    let _ = writeln!(
                        out,
                        "  answered with a {} redirect by the agent; no endpoint is reached",
                        r.status
                    );
                    return Ok((true, std::mem::take(out)));
                }
                rule.pool.slots.clone()
            }
            Way::Otherwise(_) if routes.rules.is_empty() => {
                let _ = writeln!(
                    out,
                    "  {} {}: the Service's own endpoints serve it (the agent reads each request for {})",
                    req.method, req.path, routes.source
                );
                routes.otherwise.as_ref().map(|p| p.slots.clone()).unwrap_or_default()
            }
            Way::Otherwise(_) => {
                let _ = writeln!(
                    out,
                    "  {} {}: matches none of TrafficSplit {}'s routes: the root service's own endpoints serve it",
                    req.method, req.path, routes.source
                );
                routes.otherwise.as_ref().map(|p| p.slots.clone()).unwrap_or_default()
            }
            Way::NoRoute => {
                let _ = writeln!(
                    out,
                    "DENY {} {}: matches no rule of {}; rejected with 404 (Gateway API: requests no route matches are rejected)",
                    req.method, req.path, routes.source
                );
                return Ok((false, std::mem::take(out)));
            }
        },
        (Some(routes), None) if proto_id == mesh_common::PROTO_TCP => {
            let _ = writeln!(
                out,
                "  {} routes each HTTP request ({} rules; give --method, --path and --header to see one request's way):",
                routes.source,
                routes.rules.len()
            );
            for r in &routes.rules {
                let how: Vec<String> = r.matches.iter().map(|m| m.describe()).collect();
                let _ = writeln!(out, "    {}: {}", r.name, how.join(" or "));
            }
            match &routes.otherwise {
                Some(p) => p.slots.clone(),
                None => {
                    let _ = writeln!(out, "    any other request: 404");
                    return Ok((false, std::mem::take(out)));
                }
            }
        }
        _ => {
            match &table.split {
                Some(name) if name.contains(' ') => {
                    let _ = writeln!(out, "  {name}: connections spread by weight over its backends");
                }
                Some(name) => {
                    let _ = writeln!(out, "  TrafficSplit {name}: connections spread by weight");
                    print_split_weights(snap, name, out);
                }
                None => {
                    let _ = writeln!(
                        out,
                        "  no TrafficSplit or route: connections spread evenly over the ready endpoints"
                    );
                }
            }
            endpoints(&table.slots)
        }
    };
    if pool.is_empty() {
        let _ = writeln!(out, "DENY: no ready endpoint or valid backend; refused at once");
        return Ok((false, std::mem::take(out)));
    }
    let mut shares: std::collections::BTreeMap<Slot, usize> = Default::default();
    for e in &pool {
        *shares.entry(*e).or_default() += 1;
    }
    let (mut all_allowed, mut any_allowed) = (true, false);
    for (slot, n) in &shares {
        let share = *n as f64 * 100.0 / pool.len() as f64;
        let (ip, port) = match slot {
            Slot::Endpoint(e) => (&e.ip(), &e.port()),
            Slot::Invalid => {
                all_allowed = false;
                let _ = writeln!(out, "  {share:.1}%: a backend that does not resolve: answered 500");
                continue;
            }
            Slot::NoEndpoint | Slot::AllEjected => {
                all_allowed = false;
                let _ = writeln!(out, "  {share:.1}%: a backend without a ready endpoint: answered 503");
                continue;
            }
        };
        let Some(pod) = snap.pod_by_ip(*ip) else {
            let _ = writeln!(
                out,
                "  {ip}:{port} ({share:.1}%): not a meshed pod; carried without the mesh's policy"
            );
            continue;
        };
        let dst = pod.identity();
        let proto = if proto_id == mesh_common::PROTO_UDP {
            Proto::Udp
        } else {
            Proto::Tcp
        };
        let d = match request {
            Some(req) => policy.evaluate_http(mode, src, &dst, *port, req),
            None => policy.evaluate(mode, src, &dst, *port, proto),
        };
        all_allowed &= d.allowed;
        any_allowed |= d.allowed;
        let _ = writeln!(
            out,
            "  {ip}:{port} ({share:.1}%) pod {}: {} {src} -> {dst} port {port}: {}{}",
            pod.workload_name(),
            if d.allowed { "ALLOW" } else { "DENY" },
            d.target
                .map(|t| format!("TrafficTarget {t}, rule {}: ", d.rule))
                .unwrap_or_else(|| format!("{}: ", d.rule)),
            d.reason
        );
    }
    let _ = writeln!(
        out,
        "{}",
        match (all_allowed, any_allowed) {
            (true, _) => "ALLOW",
            (false, true) => "DENY for the endpoints marked DENY (a connection or request that picks one is refused)",
            (false, false) => "DENY",
        }
    );
    Ok((all_allowed, std::mem::take(out)))
}

/// Each backend of a TrafficSplit with its weight and share.
fn print_split_weights(snap: &Store, split: &str, out: &mut String) {
    let Some(s) = snap
        .smi
        .traffic_splits
        .iter()
        .find(|s| format!("{}/{}", s.namespace, s.name) == split)
    else {
        return;
    };
    let total: i64 = s.spec.backends.iter().map(|b| b.weight.max(0)).sum();
    for b in &s.spec.backends {
        let key = format!("{}/{}", s.namespace, b.service.split('.').next().unwrap_or(&b.service));
        let state = match snap.services.get(&key) {
            None => " (no such Service yet: nothing to send to, its weight goes to the others)".to_string(),
            Some(svc) if !svc.endpoints.iter().any(|e| e.ready) => {
                " (no ready endpoint: its weight goes to the others)".to_string()
            }
            Some(_) => String::new(),
        };
        let share = if total > 0 {
            b.weight.max(0) as f64 * 100.0 / total as f64
        } else {
            0.0
        };
        let _ = writeln!(
            out,
            "    backend {key} weight {} ({share:.1}% by weight){state}",
            b.weight
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--header` reaches the evaluator as the datapath's headers do: a
    /// header-matched route allows only requests that carry the header.
    #[test]
    fn policy_check_takes_request_headers() {
        let dir = std::env::temp_dir().join(format!("mesh-policy-check-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("policy.yaml"),
            "kind: HTTPRouteGroup\nmetadata: {name: canary, namespace: t}\n\
             spec: {matches: [{name: tagged, methods: [GET], pathRegex: /api, headers: {x-canary: ^yes$}}]}\n---\n\
             kind: TrafficTarget\nmetadata: {name: a-to-b, namespace: t}\n\
             spec: {destination: {kind: ServiceAccount, name: b}, rules: [{kind: HTTPRouteGroup, name: canary}], \
             sources: [{kind: ServiceAccount, name: a}]}\n",
        )
        .unwrap();
        let check = |headers: &[&str]| {
            run(PolicyCommand::Check {
                source_dir: dir.clone(),
                from: "t/a".into(),
                to: "t/b".into(),
                port: Some(80),
                protocol: "tcp".into(),
                method: Some("GET".into()),
                path: Some("/api/x".into()),
                headers: headers.iter().map(|h| h.to_string()).collect(),
                trust_domain: "cluster.local".into(),
                policy_mode: crate::state::PolicyMode::Enforcing,
            })
            .unwrap()
        };
        assert!(check(&["X-Canary: yes"]), "the header-matched request is allowed");
        assert!(!check(&[]), "without the header it is denied");
        assert!(!check(&["x-canary: no"]), "with another value it is denied");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A Service VIP as destination: the split's backends and weights, the
    /// way one request goes (matched by header or not), and the decision for
    /// each endpoint it may reach.
    #[test]
    fn policy_check_explains_splits_and_the_way_of_a_request() {
        let dir = std::env::temp_dir().join(format!("mesh-policy-split-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pod = |name: &str, sa: &str, ip: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: t}}\n\
                 spec: {{nodeName: n1, serviceAccountName: {sa}}}\nstatus: {{podIP: {ip}}}\n---\n"
            )
        };
        let svc = |name: &str, vip: &str, ips: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: t}}\n\
                 spec: {{clusterIP: {vip}, ports: [{{port: 80}}]}}\n---\n\
                 apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv4\n\
                 metadata: {{name: {name}-1, namespace: t, labels: {{kubernetes.io/service-name: {name}}}}}\n\
                 ports: [{{port: 8080}}]\nendpoints: [{{addresses: [{ips}]}}]\n---\n"
            )
        };
        let text = pod("client", "client", "198.18.1.5")
            + &pod("v1", "web", "198.18.1.10")
            + &pod("v2", "web-v2", "198.18.1.11")
            + &svc("web", "198.19.0.10", "198.18.1.10, 198.18.1.11")
            + &svc("web-v1", "198.19.0.11", "198.18.1.10")
            + &svc("web-v2", "198.19.0.12", "198.18.1.11")
            + "kind: HTTPRouteGroup\nmetadata: {name: canary, namespace: t}\n\
               spec: {matches: [{name: tagged, headers: {x-canary: ^yes$}}]}\n---\n\
               kind: TrafficSplit\nmetadata: {name: ab, namespace: t}\n\
               spec: {service: web, matches: [{kind: HTTPRouteGroup, name: canary}], \
               backends: [{service: web-v1, weight: 0}, {service: web-v2, weight: 100}]}\n---\n\
               kind: TCPRoute\nmetadata: {name: any, namespace: t}\nspec: {matches: {ports: []}}\n---\n\
               kind: TrafficTarget\nmetadata: {name: to-v1, namespace: t}\n\
               spec: {destination: {kind: ServiceAccount, name: web}, rules: [{kind: TCPRoute, name: any}], \
               sources: [{kind: ServiceAccount, name: client}]}\n";
        std::fs::write(dir.join("all.yaml"), text).unwrap();
        let snap = Store::new(crate::source::file::load(&dir).unwrap());
        assert!(snap.errors.is_empty(), "{:?}", snap.errors);
        let policy = Policy::compile(&snap.smi, 0);
        let explain = |headers: &[(String, String)]| {
            let req = HttpRequest {
                method: "GET",
                path: "/x",
                query: "",
                headers,
            };
            explain_service(
                &snap,
                &policy,
                PolicyMode::Enforcing,
                &Identity::new("t", "client"),
                "198.19.0.10:80".parse().unwrap(),
                "tcp",
                Some(&req),
            )
            .unwrap()
        };
        let (allowed, out) = explain(&[("x-canary".into(), "yes".into())]);
        assert!(!allowed, "{out}");
        assert!(
            out.contains("matches TrafficSplit t/ab (HTTPRouteGroup match canary/tagged)"),
            "{out}"
        );
        assert!(out.contains("backend t/web-v2 weight 100 (100.0% by weight)"), "{out}");
        assert!(
            out.contains("198.18.1.11:8080 (100.0%) pod t/v2: DENY"),
            "v2 runs as web-v2, which no target allows: {out}"
        );
        let (allowed, out) = explain(&[]);
        assert!(!allowed, "the root's endpoints include v2: {out}");
        assert!(out.contains("matches none of TrafficSplit t/ab's routes"), "{out}");
        assert!(out.contains("198.18.1.10:8080 (50.0%) pod t/v1: ALLOW"), "{out}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
