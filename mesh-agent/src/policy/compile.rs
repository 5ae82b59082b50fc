//! SMI resources to a [`Policy`]: each resource validated on its own, a
//! refused one never widening what the others allow.
use std::collections::BTreeSet;

use regex::Regex;

use super::model::{HttpMatch, Policy, PortRule, Rejected, Target};
use crate::state::{Identity, Named, SmiSet};

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
                Err(e) => rejected.push(Rejected {
                    kind: "HTTPRouteGroup",
                    name: full(g),
                    reason: e.to_string(),
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
}

impl Policy {
    /// SMI access policy and Gateway API AuthorizationPolicies, both
    /// additive allows, in one policy (`authorization`).
    pub fn compile_all(snap: &crate::state::Snapshot, trust_domain: &str, generation: u64) -> Policy {
        let mut p = Policy::compile(&snap.smi, generation);
        let (targets, rejected) = super::authorization::targets(snap, trust_domain);
        p.targets.extend(targets);
        p.rejected.extend(rejected);
        p
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

/// An HTTPRouteGroup match that does not compile; the group is refused.
#[derive(Debug, thiserror::Error)]
pub enum MatchError {
    #[error("match {name}: pathRegex {pattern:?}: {source}")]
    PathRegex {
        name: String,
        pattern: String,
        #[source]
        source: regex::Error,
    },
    #[error("match {name}: header {header} regex {pattern:?}: {source}")]
    HeaderRegex {
        name: String,
        header: String,
        pattern: String,
        #[source]
        source: regex::Error,
    },
}

pub fn http_matches(g: &Named<crate::smi::HTTPRouteGroupSpec>) -> Result<Vec<HttpMatch>, MatchError> {
    let mut out = Vec::new();
    for m in &g.spec.matches {
        // Anchored at ^, as the spec says.
        let path = match &m.path_regex {
            Some(p) => Some(
                Regex::new(&format!("^(?:{p})")).map_err(|source| MatchError::PathRegex {
                    name: m.name.clone(),
                    pattern: p.clone(),
                    source,
                })?,
            ),
            None => None,
        };
        let mut headers = Vec::new();
        for (h, re) in m.headers.iter().flatten() {
            headers.push((
                h.to_ascii_lowercase(),
                Regex::new(re).map_err(|source| MatchError::HeaderRegex {
                    name: m.name.clone(),
                    header: h.clone(),
                    pattern: re.clone(),
                    source,
                })?,
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

fn subject(s: &crate::smi::IdentityBindingSubject, default_ns: &str, what: &str) -> Result<Identity, String> {
    if s.kind != "ServiceAccount" {
        return Err(format!(
            "{what} kind {:?} is not supported (only ServiceAccount)",
            s.kind
        ));
    }
    Ok(Identity {
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
