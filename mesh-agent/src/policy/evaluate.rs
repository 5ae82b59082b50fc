//! Decisions: the L4 verdict for a flow and the L7 verdict for a request,
//! each naming the target and rule that decided (the audit trail and
//! `policy check` print them).
use super::model::{Decision, Policy, Target};
use crate::{
    authz::{HttpRequest, Proto},
    state::{Identity, PolicyMode},
};

impl Policy {
    /// The L4 decision for a flow, with the target and rule that decided it.
    pub fn evaluate(&self, mode: PolicyMode, src: &Identity, dst: &Identity, port: u16, proto: Proto) -> Decision {
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
            "no TrafficTarget or AuthorizationPolicy allows {src} -> {dst} on port {port}/{}",
            proto.as_str()
        );
        nothing_allows(mode, reason)
    }

    /// The HTTP decision for one request on a flow L4 allowed: when every
    /// target that allows the flow restricts HTTP, the request must match
    /// one of their routes (method, `^`-anchored path, all headers).
    pub fn evaluate_http(
        &self,
        mode: PolicyMode,
        src: &Identity,
        dst: &Identity,
        port: u16,
        req: &HttpRequest<'_>,
    ) -> Decision {
        let HttpRequest { method, path, .. } = *req;
        let l4 = self.evaluate(mode, src, dst, port, Proto::Tcp);
        if !l4.allowed || l4.target.is_none() {
            return l4;
        }
        let allowing = self.allowing_tcp(src, dst, port);
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
        nothing_allows(mode, reason)
    }

    /// The targets that allow TCP from `src` to `dst` on `port` (by a port
    /// rule, or as HTTP-only targets whose requests are checked at L7).
    fn allowing_tcp(&self, src: &Identity, dst: &Identity, port: u16) -> Vec<&Target> {
        self.targets
            .iter()
            .filter(|t| &t.destination == dst && t.sources.contains(src))
            .filter(|t| {
                t.tcp.iter().any(|r| r.ports.as_ref().is_none_or(|p| p.contains(&port)))
                    || (t.tcp.is_empty() && !t.http.is_empty())
            })
            .collect()
    }

    /// Whether HTTP requests of this flow must be checked (some allowing
    /// target restricts HTTP and none allows it without HTTP rules).
    pub fn http_restricted(&self, src: &Identity, dst: &Identity, port: u16) -> bool {
        let allowing = self.allowing_tcp(src, dst, port);
        !allowing.is_empty() && allowing.iter().all(|t| !t.http.is_empty())
    }
}

/// What no rule allowing means: denied when enforcing, allowed (and said
/// so) in permissive mode.
fn nothing_allows(mode: PolicyMode, reason: String) -> Decision {
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

fn allow(t: &Target, rule: String, reason: String) -> Decision {
    Decision {
        allowed: true,
        target: Some(t.name.clone()),
        rule,
        reason,
    }
}
