//! Gateway API AuthorizationPolicy (GEP-3779) to [`Target`]s: ALLOW rules
//! of sources (ServiceAccounts, `*` for all of a namespace, or SPIFFE IDs
//! of this trust domain) on ports, for the pods a `kind: Pod` selector (or
//! a `kind: ServiceAccount` reference) targets.
//!
//! This mesh decides by identity (the kernel's `connect()` rules and the
//! destination agent both see ServiceAccounts), so a policy whose selector
//! takes some but not all pods of a ServiceAccount is refused with that
//! reason rather than applied to all of them: it would allow more than it
//! says. A refused policy grants nothing. Both APIs are additive allows
//! over the mesh's policy mode (a GEP-3779 mesh allows a workload no policy
//! targets; this one does so only in permissive mode).
use std::collections::BTreeSet;

use super::model::{PortRule, Rejected, Target};
use crate::{
    gateway::{AuthorizationPolicySpec, LabelSelector},
    state::{Identity, Named, Snapshot},
};

pub(super) fn targets(snap: &Snapshot, trust_domain: &str) -> (Vec<Target>, Vec<Rejected>) {
    let (mut out, mut rejected) = (Vec::new(), Vec::new());
    for p in &snap.gateway.authorization_policies {
        match compile(p, snap, trust_domain) {
            Ok(t) => out.extend(t),
            Err(reason) => rejected.push(Rejected {
                kind: "AuthorizationPolicy",
                name: format!("{}/{}", p.namespace, p.name),
                reason,
            }),
        }
    }
    (out, rejected)
}

fn selects(sel: &LabelSelector, labels: &std::collections::BTreeMap<String, String>) -> Result<bool, String> {
    if !sel.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v)) {
        return Ok(false);
    }
    for e in &sel.match_expressions {
        let value = labels.get(&e.key);
        let ok = match e.operator.as_str() {
            "In" => value.is_some_and(|v| e.values.contains(v)),
            "NotIn" => value.is_none_or(|v| !e.values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            other => return Err(format!("selector operator {other:?} (In, NotIn, Exists, DoesNotExist)")),
        };
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

fn compile(p: &Named<AuthorizationPolicySpec>, snap: &Snapshot, trust_domain: &str) -> Result<Vec<Target>, String> {
    let ns = &p.namespace;
    if p.spec.action != "ALLOW" {
        return Err(format!("action {:?}: only ALLOW is defined", p.spec.action));
    }
    if p.spec.enforcement_level != "Network" {
        return Err(format!(
            "enforcementLevel {:?}: only Network is defined",
            p.spec.enforcement_level
        ));
    }
    // The identities targeted, each wholly.
    let mut destinations = BTreeSet::new();
    for t in &p.spec.target_refs {
        match t.kind.as_str() {
            "Pod" => {
                if t.name.is_some() {
                    return Err("targetRefs kind Pod takes a selector, not a name".into());
                }
                let sel = t
                    .selector
                    .as_ref()
                    .ok_or("targetRefs kind Pod needs a selector ({} for all pods)")?;
                let pods: Vec<_> = snap.pods.values().filter(|pod| &pod.namespace == ns).collect();
                let mut picked = BTreeSet::new();
                for pod in &pods {
                    if selects(sel, &pod.labels)? {
                        picked.insert(pod.identity());
                    }
                }
                for id in &picked {
                    if let Some(left) = pods
                        .iter()
                        .find(|pod| &pod.identity() == id && !selects(sel, &pod.labels).unwrap_or(false))
                    {
                        return Err(format!(
                            "its selector takes some pods of ServiceAccount {id} but not {}: this mesh authorizes by identity, \
                             so it would allow more than the policy says; select whole ServiceAccounts",
                            left.workload_name()
                        ));
                    }
                }
                destinations.extend(picked);
            }
            "ServiceAccount" => {
                let name = t.name.as_ref().ok_or("targetRefs kind ServiceAccount needs a name")?;
                destinations.insert(Identity::new(ns, name));
            }
            other => {
                return Err(format!(
                    "targetRefs kind {other:?} (Pod with a selector, or ServiceAccount)"
                ));
            }
        }
    }
    let known: BTreeSet<Identity> = snap
        .pods
        .values()
        .map(|p| p.identity())
        .chain(snap.service_accounts.iter().filter_map(|s| {
            let (n, a) = s.split_once('/')?;
            Some(Identity::new(n, a))
        }))
        .collect();
    let mut out = Vec::new();
    for (i, rule) in p.spec.rules.iter().enumerate() {
        let sources: Vec<Identity> = match &rule.sources {
            // Absent: any source.
            None => known.iter().cloned().collect(),
            Some(list) => {
                let mut ids = BTreeSet::new();
                for s in list {
                    match (s.kind.as_str(), &s.service_account, &s.spiffe) {
                        ("ServiceAccount", Some(sa), _) => {
                            let sns = sa.namespace.clone().unwrap_or_else(|| ns.clone());
                            if sa.name == "*" {
                                ids.extend(known.iter().filter(|id| id.namespace == sns).cloned());
                            } else {
                                ids.insert(Identity::new(&sns, &sa.name));
                            }
                        }
                        ("SPIFFE", _, Some(uri)) => {
                            ids.insert(spiffe_identity(uri, trust_domain)?);
                        }
                        (kind, _, _) => {
                            return Err(format!(
                                "rule {i}: source type {kind:?} needs its field (serviceAccount or spiffe)"
                            ));
                        }
                    }
                }
                ids.into_iter().collect()
            }
        };
        let ports = match rule.network_attributes.as_ref().and_then(|n| n.ports.as_ref()) {
            Some(ports) if ports.contains(&0) => return Err(format!("rule {i}: port 0")),
            Some(ports) => Some(ports.iter().copied().collect()),
            None => None,
        };
        for dst in &destinations {
            out.push(Target {
                name: format!("AuthorizationPolicy {ns}/{} rule {i}", p.name),
                destination: dst.clone(),
                sources: sources.clone(),
                // Network level: TCP and UDP alike (GEP-3779 names ports only).
                tcp: vec![PortRule {
                    route: format!("AuthorizationPolicy/{}#{i}", p.name),
                    ports: ports.clone(),
                }],
                udp: vec![PortRule {
                    route: format!("AuthorizationPolicy/{}#{i}", p.name),
                    ports: ports.clone(),
                }],
                http: Vec::new(),
            });
        }
    }
    Ok(out)
}

/// `spiffe://<trust domain>/ns/<namespace>/sa/<serviceaccount>`, the form
/// this mesh issues; another trust domain can never be a peer here.
fn spiffe_identity(uri: &str, trust_domain: &str) -> Result<Identity, String> {
    let rest = uri
        .strip_prefix("spiffe://")
        .ok_or_else(|| format!("SPIFFE source {uri:?} does not start with spiffe://"))?;
    let (td, path) = rest.split_once('/').unwrap_or((rest, ""));
    if td != trust_domain {
        return Err(format!(
            "SPIFFE source {uri:?}: trust domain {td:?} is not this mesh's ({trust_domain:?}); no peer can hold it"
        ));
    }
    match path.split('/').collect::<Vec<_>>().as_slice() {
        ["ns", ns, "sa", sa] if !ns.is_empty() && !sa.is_empty() => Ok(Identity::new(ns, sa)),
        _ => Err(format!(
            "SPIFFE source {uri:?}: this mesh's workload IDs are spiffe://{trust_domain}/ns/<namespace>/sa/<serviceaccount>"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        authz::Proto,
        policy::Policy,
        state::{Pod, PolicyMode},
    };

    fn pod(name: &str, sa: &str, labels: &[(&str, &str)]) -> (String, Pod) {
        (
            format!("t/{name}"),
            Pod {
                namespace: "t".into(),
                name: name.into(),
                uid: String::new(),
                service_account: sa.into(),
                node: "n1".into(),
                ips: vec![],
                qos_class: None,
                host_network: false,
                admission: None,
                labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            },
        )
    }

    fn policy(yaml: &str) -> Policy {
        let mut s = Snapshot::default();
        s.pods.extend([
            pod("web-0", "web", &[("app", "web")]),
            pod("web-1", "web", &[("app", "web")]),
            pod("db-0", "db", &[("app", "db"), ("tier", "data")]),
            pod("client", "client", &[]),
            pod("other", "other", &[]),
        ]);
        s.gateway.authorization_policies.push(Named {
            namespace: "t".into(),
            name: "p".into(),
            spec: serde_yaml::from_str(yaml).unwrap(),
        });
        Policy::compile_all(&s, "cluster.local", 1)
    }

    fn allowed(p: &Policy, from: &str, to: &str, port: u16) -> bool {
        p.evaluate(
            PolicyMode::Enforcing,
            &Identity::new("t", from),
            &Identity::new("t", to),
            port,
            Proto::Tcp,
        )
        .allowed
    }

    #[test]
    fn allow_rules_by_service_account_spiffe_and_port() {
        let p = policy(
            "targetRefs: [{kind: Pod, selector: {matchLabels: {app: web}}}]\naction: ALLOW\nenforcementLevel: Network\n\
             rules:\n- sources: [{type: ServiceAccount, serviceAccount: {name: client}}]\n  networkAttributes: {ports: [8080]}\n\
             - sources: [{type: SPIFFE, spiffe: \"spiffe://cluster.local/ns/t/sa/other\"}]\n",
        );
        assert!(p.rejected.is_empty(), "{:?}", p.rejected);
        assert!(allowed(&p, "client", "web", 8080));
        assert!(!allowed(&p, "client", "web", 9090), "ports narrow the rule");
        assert!(allowed(&p, "other", "web", 9090), "no networkAttributes: every port");
        assert!(!allowed(&p, "client", "db", 8080), "db is not targeted");
        let d = p.evaluate(
            PolicyMode::Enforcing,
            &Identity::new("t", "client"),
            &Identity::new("t", "web"),
            8080,
            Proto::Tcp,
        );
        assert_eq!(d.target.as_deref(), Some("AuthorizationPolicy t/p rule 0"));
    }

    #[test]
    fn wildcards_empty_selectors_and_empty_sources() {
        let p = policy(
            "targetRefs: [{kind: Pod, selector: {}}]\naction: ALLOW\nenforcementLevel: Network\n\
             rules:\n- sources: [{type: ServiceAccount, serviceAccount: {name: \"*\"}}]\n",
        );
        assert!(allowed(&p, "client", "db", 1) && allowed(&p, "web", "client", 2));
        let p = policy(
            "targetRefs: [{kind: Pod, selector: {matchExpressions: [{key: tier, operator: In, values: [data]}]}}]\n\
             action: ALLOW\nenforcementLevel: Network\nrules:\n- sources: []\n",
        );
        assert!(p.rejected.is_empty(), "{:?}", p.rejected);
        assert!(!allowed(&p, "client", "db", 1), "an empty source list allows nothing");
    }

    #[test]
    fn what_the_mesh_cannot_enforce_exactly_is_refused() {
        for (yaml, why) in [
            (
                "targetRefs: [{kind: Pod, selector: {matchLabels: {app: web}}}]\naction: DENY\nenforcementLevel: Network\n",
                "only ALLOW",
            ),
            (
                "targetRefs: [{kind: Pod, selector: {}}]\naction: ALLOW\nenforcementLevel: Application\n",
                "only Network",
            ),
            (
                "targetRefs: [{kind: Pod, selector: {}}]\naction: ALLOW\nenforcementLevel: Network\n\
                 rules: [{sources: [{type: SPIFFE, spiffe: \"spiffe://other.example/ns/t/sa/client\"}]}]\n",
                "trust domain",
            ),
        ] {
            let p = policy(yaml);
            assert!(
                p.rejected.iter().any(|r| r.reason.contains(why)),
                "{why}: {:?}",
                p.rejected
            );
            assert!(p.targets.is_empty());
        }
        // web-0 alone: web-1 has the same identity.
        let mut s = Snapshot::default();
        s.pods.extend([
            pod("web-0", "web", &[("app", "web"), ("n", "0")]),
            pod("web-1", "web", &[("app", "web")]),
        ]);
        s.gateway.authorization_policies.push(Named {
            namespace: "t".into(),
            name: "p".into(),
            spec: serde_yaml::from_str("targetRefs: [{kind: Pod, selector: {matchLabels: {n: \"0\"}}}]\naction: ALLOW\nenforcementLevel: Network\n").unwrap(),
        });
        let p = Policy::compile_all(&s, "cluster.local", 1);
        assert!(
            p.rejected[0]
                .reason
                .contains("some pods of ServiceAccount t/web but not t/web-1"),
            "{:?}",
            p.rejected
        );
    }
}
