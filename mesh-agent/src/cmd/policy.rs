//! `mesh-agent policy check`: explains one decision from the same compiled
//! policy the datapath uses.
use std::net::SocketAddr;

use anyhow::{Context as _, bail};

use crate::{
    authz::{HttpRequest, Proto},
    config::PolicyCommand,
    policy::Policy,
    state::{Identity, PolicyMode, Store},
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
        trust_domain: _,
    } = command;
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
                headers: &[],
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
    Ok(d.allowed)
}
