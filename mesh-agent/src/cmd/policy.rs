//! `mesh-agent policy check`: explains one decision from the same compiled
//! policy the datapath uses.
use std::net::SocketAddr;

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
        trust_domain: _,
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
    let policy = Policy::compile(&snap.smi, 0);
    for r in &policy.rejected {
        eprintln!("warning: {} {} refused: {}", r.kind, r.name, r.reason);
    }
    let mode = snap.mode.unwrap_or(PolicyMode::Enforcing);
    let (src, _) = resolve(&snap, &from)?;
    let (dst, addr_port) = resolve(&snap, &to)?;
    let port = port
        .or(addr_port)
        .context("give the destination port with --port or as ip:port")?;
    let proto = if protocol == "udp" { Proto::Udp } else { Proto::Tcp };
    let d = match (&method, &path) {
        (Some(m), Some(p)) => policy.evaluate_http(
            mode,
            &src,
            &dst,
            port,
            &HttpRequest {
                method: m,
                path: p,
                headers: &headers,
            },
        ),
        (None, None) => policy.evaluate(mode, &src, &dst, port, proto),
        _ => bail!("give both --method and --path for an HTTP check"),
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
            })
            .unwrap()
        };
        assert!(check(&["X-Canary: yes"]), "the header-matched request is allowed");
        assert!(!check(&[]), "without the header it is denied");
        assert!(!check(&["x-canary: no"]), "with another value it is denied");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
