//! The composition root: builds each part of the agent and starts it, in
//! the order that keeps the node's traffic safe (listen, or know who hands
//! over, before capture starts; take over only once ready). No logic of its
//! own lives here (ARCHITECTURE.md, "Lifecycle").
use std::{collections::BTreeSet, net::SocketAddr, sync::Arc};

use anyhow::Context as _;
use prometheus_client::registry::Registry;
use rustls_pki_types::CertificateDer;
use tokio::{signal::unix::SignalKind, sync::watch, task::JoinSet};
use tokio_util::sync::CancellationToken;

use crate::{
    admin::{self, AdminState},
    audit::Audit,
    config::{CertSource, Settings},
    drain::Drain,
    enrol, handoff,
    identity::{
        authority::Authority,
        manager::{IdentityManager, Timing},
        provider::{CertificateProvider, LocalCa, MeshCaClient},
    },
    kernel_events, listeners,
    metrics::{self, ConnectionMetrics, KernelMetrics},
    policy::{PolicyAuthorizer, PolicyMetrics},
    preflight,
    reconcile::{self, Reconciler},
    redirect::{Redirect, RedirectOptions},
    source, state,
    tunnel::{
        TunnelMetrics,
        outbound::{self, Outbound},
        start::{QuicStart, TunnelSettings},
        udp::{RelaySetup, Relays},
        udp_slots::Slots,
    },
};

/// Runs the agent until SIGTERM/SIGINT (or until a successor took over and
/// the signal came).
pub async fn run(s: Settings) -> anyhow::Result<()> {
    start(s).await?.wait_termination().await
}

/// A started agent.
pub struct Bound {
    /// Where it listens (outbound capture, admin, health, metrics).
    pub outbound: SocketAddr,
    pub admin: SocketAddr,
    pub health: SocketAddr,
    pub metrics: SocketAddr,
    offer: handoff::Offer,
    drain: Drain,
    drain_grace: std::time::Duration,
    quic: Option<Arc<QuicStart>>,
    /// Stops what writes the kernel's maps and reads its events: a
    /// successor owns them once it took over.
    kernel_owner: CancellationToken,
    tasks: JoinSet<()>,
}

/// Starts every part of the agent; returns once it serves.
pub async fn start(s: Settings) -> anyhow::Result<Bound> {
    preflight::check(&s.bpffs_dir, &s.pod_cgroup_root)?;
    preflight::raise_limits();

    // An agent already serving this node hands its listeners over once we
    // are ready. Without one, listen before capture starts, so no captured
    // connect finds the port closed.
    let predecessor = handoff::Predecessor::find(&s.handoff_socket)?;
    let fresh = match &predecessor {
        None => Some(listeners::bind(&s).await?),
        Some(_) => {
            tracing::info!(handoff_socket = %s.handoff_socket.display(), "an agent serves this node: taking over its listeners once ready");
            None
        }
    };

    let pod_cgroup_level = enrol::cgroup_level(&s.pod_cgroup_root)
        .ok()
        .and_then(|l| u8::try_from(l).ok())
        .with_context(|| {
            format!(
                "{} is not a cgroup2 directory (--pod-cgroup-root)",
                s.pod_cgroup_root.display()
            )
        })?;
    // The relay slot ports are bound before the kernel is told of them, so
    // no datagram is ever sent to a port nobody holds. Without identities
    // there is no tunnel to carry them: such datagrams are refused.
    let slots = match s.udp_relay.filter(|_| s.identity.source.is_some()) {
        Some((base, count)) => match Slots::bind(base, count, s.capture_ip, s.capture_ip6) {
            Ok(slots) => Some(slots),
            Err(e) => {
                tracing::error!(first_port = base, slots = count, error = %e,
                    "cannot bind the UDP relay ports (check --udp-relay-port and --udp-relay-slots against other \
                     programs on this node); pod-to-pod UDP to other nodes is refused until the agent restarts");
                None
            }
        },
        None => None,
    };
    let probe_cgroup = probe_cgroup(&s)?;
    let mut redirect = Redirect::load(&RedirectOptions {
        bpffs_dir: &s.bpffs_dir,
        pod_cgroup_root: &s.pod_cgroup_root,
        pod_cgroup_level,
        capture_ip: s.capture_ip,
        capture_ip6: s.capture_ip6,
        outbound_port: s.outbound_port,
        udp_relay: slots.as_ref().map(|sl| (sl.base, sl.count())),
        fail_open: s.fail_open,
        kernel_debug: s.kernel_debug,
        fast_path: s.fast_path,
        probe_cgroup: probe_cgroup.as_deref(),
    })?;
    if let Some(logger) = redirect.kernel_logger.take() {
        kernel_events::forward_kernel_logs(logger);
    }
    let events = redirect.kernel_events.take();
    let redirect = Arc::new(redirect);

    // Until the source publishes its first snapshot, the kernel keeps what
    // is pinned (on a restart: the previous agent's maps).
    let (tx, snapshots) = state::channel();
    let source: Box<dyn source::Source> = match &s.source_dir {
        Some(dir) => Box::new(source::FileSource { dir: dir.clone() }),
        None => Box::new(source::KubeSource {
            client: kube::Client::try_default().await.context(
                "connecting to the Kubernetes API (--kubernetes): in-cluster config or a kubeconfig is needed",
            )?,
            judge_routes: Some(std::sync::Arc::new(|snap| {
                crate::gamma::Gamma::compile(snap).verdicts()
            })),
        }),
    };
    tracing::info!(source = %source.describe(), "reading workloads and policy");
    let mut tasks = JoinSet::new();
    tasks.spawn(source.run(tx));

    let mut registry = Registry::default();
    let connections = ConnectionMetrics::default();
    connections.register(&mut registry);
    let kernel_metrics = KernelMetrics::new(connections.clone());
    kernel_metrics.register(&mut registry);
    let policy_metrics = PolicyMetrics::default();
    policy_metrics.register(&mut registry);

    let kernel_owner = CancellationToken::new();
    let views = Reconciler {
        redirect: redirect.clone(),
        snapshots: snapshots.clone(),
        node: s.node_name.clone(),
        pod_cgroup_root: s.pod_cgroup_root.clone(),
        cgroup_driver: s.cgroup_driver,
        default_mode: s.policy_mode,
        trust_domain: s.identity.trust_domain.clone(),
        tunnels_expected: s.identity.source.is_some(),
        policy_metrics: policy_metrics.clone(),
        kernel_metrics,
    }
    .spawn(&mut tasks, kernel_owner.clone());

    let audit = Arc::new(Audit::new(
        s.node_name.clone(),
        s.audit_log.clone(),
        s.audit_log_max_bytes,
        4096,
    ));
    audit.register(&mut registry);
    if let Some(events) = events {
        kernel_events::drain_kernel_events(
            events,
            audit.clone(),
            snapshots.clone(),
            views.policy.clone(),
            kernel_owner.clone(),
        );
    }
    let rate_limited = crate::resilience::rate_limit::LimitedMetric::default();
    registry.register(
        "mesh_rate_limited_requests",
        "Requests refused with 429 by a TrafficPolicy rate limit on this node, by policy and client identity",
        rate_limited.clone(),
    );
    let authorizer = Arc::new(crate::resilience::rate_limit::LimitingAuthorizer {
        inner: Arc::new(PolicyAuthorizer::new(
            views.policy.clone(),
            policy_metrics,
            s.node_name.clone(),
            audit.clone(),
        )),
        in_force: views.traffic_policies.clone(),
        metric: rate_limited,
    });
    let drain = Drain::default();
    let traces = match &s.otlp_endpoint {
        None => None,
        Some(endpoint) => {
            let t = crate::traces::Traces::start(endpoint, &s.node_name).map_err(anyhow::Error::msg)?;
            tracing::info!(otlp_endpoint = %endpoint, "exporting request spans of the L7 path");
            Some(Arc::new(t))
        }
    };
    let identities = start_identities(&s, snapshots.clone(), audit.clone(), &mut registry, &mut tasks)?;
    let tunnels = match &identities {
        Some((manager, roots)) => {
            let metrics = TunnelMetrics {
                connections,
                ..Default::default()
            };
            metrics.register(&mut registry);
            let settings = TunnelSettings {
                node: s.node_name.clone(),
                trust_domain: s.identity.trust_domain.clone(),
                transport: s.tunnel.transport,
                post_quantum: s.tunnel.post_quantum,
                addr: s.tunnel.addr,
                port: s.tunnel.port,
                traces: traces.clone(),
            };
            let started = crate::tunnel::start::start(
                &settings,
                manager.clone(),
                roots,
                snapshots.clone(),
                authorizer,
                metrics,
                drain.clone(),
                redirect.clone(),
            )?;
            let relays = Relays::new(
                RelaySetup {
                    capture: (s.capture_ip, s.capture_ip6),
                    node: s.node_name.clone(),
                    trust_domain: s.identity.trust_domain.clone(),
                    tunnel_port: s.tunnel.port,
                    slots,
                    redirect: redirect.clone(),
                },
                snapshots.clone(),
                started.tunnels.quic.clone(),
                started.tunnels.metrics.clone(),
            );
            relays.serve_slots();
            views.udp_relays.send_replace(Some(relays));
            Some((started.tunnels, Arc::new(started.quic_server)))
        }
        None => None,
    };
    let admin_state = AdminState {
        node: s.node_name.clone(),
        snapshots: snapshots.clone(),
        policy: views.policy.clone(),
        traffic_policies: views.traffic_policies.clone(),
        identities: identities.as_ref().map(|(m, _)| m.clone()),
        trust_domain: s.identity.trust_domain.clone(),
        redirect: redirect.clone(),
    };

    let (mut listeners, predecessor) = match (fresh, predecessor) {
        (Some(l), _) => (l, None),
        (None, Some(p)) => match listeners::take_over(&p, || admin_state.not_ready()).await {
            Ok(l) => (l, Some(p)),
            // It stopped before handing over: the ports are free, or will
            // be once it exits (then binding says so).
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "the running agent did not hand over; binding the ports afresh"
                );
                (listeners::bind(&s).await?, None)
            }
        },
        (None, None) => unreachable!("either bound or found"),
    };
    if listeners.outbound6.is_none() {
        // A predecessor without --capture-ip6 had none to hand over.
        listeners.outbound6 = listeners::bind_outbound6(&s).await?;
    }
    let offer = handoff::Offer::listen(&s.handoff_socket, &listeners)?;
    let handoff::Listeners {
        outbound: outbound_listener,
        outbound6: outbound6_listener,
        admin,
        health,
        metrics: metrics_listener,
        tunnel_tcp,
        tunnel_udp,
    } = listeners;
    let addrs = [&outbound_listener, &admin, &health, &metrics_listener].map(|l| l.local_addr());
    if let Some((tunnels, quic)) = &tunnels {
        if let Some(tcp) = tunnel_tcp {
            quic.serve_tcp(tunnels, listeners::tokio_listener(tcp)?);
        }
        match (tunnel_udp, predecessor) {
            (Some(udp), _) => quic.serve(udp)?,
            (None, Some(p)) => {
                tokio::spawn(quic.clone().after_predecessor(p));
            }
            (None, None) => unreachable!("a fresh agent binds UDP"),
        }
    }
    tasks.spawn(admin::serve(
        listeners::tokio_listener(admin)?,
        admin_state.clone(),
        audit,
        drain.clone(),
    ));
    tasks.spawn(admin::serve_health(
        listeners::tokio_listener(health)?,
        admin_state,
        drain.clone(),
    ));
    tasks.spawn(metrics::serve(
        listeners::tokio_listener(metrics_listener)?,
        Arc::new(registry),
        drain.clone(),
    ));

    tracing::info!(
        node = %s.node_name,
        outbound = %format!("{}:{}", s.capture_ip, s.outbound_port),
        outbound6 = ?s.capture_ip6.map(|ip| std::net::SocketAddr::from((ip, s.outbound_port))),
        pod_cgroup_root = %s.pod_cgroup_root.display(),
        cgroup_driver = ?s.cgroup_driver.resolve(&s.pod_cgroup_root),
        pod_cgroup_level,
        bpffs = %s.bpffs_dir.display(),
        fail_open = s.fail_open,
        fast_path = s.fast_path,
        policy_mode = ?s.policy_mode,
        identities = identities.is_some(),
        metrics = %s.metrics_addr,
        "agent ready"
    );

    let quic = tunnels.as_ref().map(|(_, q)| q.clone());
    let outbound_handler = Arc::new(Outbound {
        redirect,
        snapshots,
        http_splits: views.http_splits,
        tunnels: tunnels.map(|t| t.0),
        drain: drain.clone(),
    });
    if let Some(l6) = outbound6_listener {
        tasks.spawn(outbound::serve(
            listeners::tokio_listener(l6)?,
            outbound_handler.clone(),
        ));
    }
    tasks.spawn(outbound::serve(
        listeners::tokio_listener(outbound_listener)?,
        outbound_handler,
    ));
    let [outbound, admin, health, metrics] = addrs;
    Ok(Bound {
        outbound: outbound?,
        admin: admin?,
        health: health?,
        metrics: metrics?,
        offer,
        drain,
        drain_grace: s.drain_grace,
        quic,
        kernel_owner,
        tasks,
    })
}

impl Bound {
    /// Serves until a successor takes over or a stop signal comes, drains,
    /// hands over what the successor still needs, and returns.
    pub async fn wait_termination(mut self) -> anyhow::Result<()> {
        let mut term = tokio::signal::unix::signal(SignalKind::terminate())?;
        let mut stopping = false;
        let successor = tokio::select! {
            // First: the lab (or the DaemonSet controller) sends SIGTERM right
            // after the successor took over; the handover must still win.
            biased;
            successor = self.offer.wait_successor() => Some(successor),
            _ = tokio::signal::ctrl_c() => { stopping = true; None }
            _ = term.recv() => { stopping = true; None }
        };
        if successor.is_some() {
            // The successor owns the kernel maps and the audit events now.
            self.kernel_owner.cancel();
        }
        self.drain.wind_down(self.drain_grace, successor.is_some()).await;
        if let Some(successor) = successor {
            let server = self.quic.as_ref().and_then(|q| q.running().borrow().clone());
            if let Some(server) = &server {
                server.release().await;
            }
            successor.send_udp(server.as_ref().map(|s| s.handoff_copy()));
            tracing::info!("handed over; the successor serves this node");
            if !stopping {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
        }
        self.tasks.abort_all();
        tracing::info!("stopped; pins stay in place");
        Ok(())
    }
}

type Identities = (Arc<IdentityManager>, Vec<CertificateDer<'static>>);

/// Starts the identity manager when a certificate source is configured;
/// returns it with the roots peers are verified against.
fn start_identities(
    s: &Settings,
    snapshots: state::SnapshotRx,
    audit: Arc<Audit>,
    registry: &mut Registry,
    tasks: &mut JoinSet<()>,
) -> anyhow::Result<Option<Identities>> {
    let Some(source) = &s.identity.source else {
        tracing::info!("no --ca-addr or --local-ca-dir: running without workload certificates");
        return Ok(None);
    };
    let (provider, roots): (Arc<dyn CertificateProvider>, _) = match source {
        CertSource::MeshCa { addr, root, token_file } => {
            let pem =
                std::fs::read(root).with_context(|| format!("reading the CA root {} (--ca-root)", root.display()))?;
            (
                Arc::new(MeshCaClient::new(addr, &pem, token_file.clone())?),
                pem_certificates(&pem, root)?,
            )
        }
        CertSource::LocalCa { dir } => {
            let authority = Arc::new(Authority::load(dir)?);
            let roots = vec![authority.root().clone()];
            (Arc::new(LocalCa::new(authority)), roots)
        }
    };
    let manager = IdentityManager::new(provider, Timing::for_ttl(s.identity.ttl));
    manager.metrics.register(registry);
    manager.set_audit(audit);
    let (tx, rx) = watch::channel(BTreeSet::new());
    tasks.spawn(manager.clone().run(rx));
    tasks.spawn(reconcile::wanted_identities(
        snapshots,
        s.node_name.clone(),
        s.identity.trust_domain.clone(),
        tx,
    ));
    Ok(Some((manager, roots)))
}

/// PEM certificates (the CA root bundle) read from `path`.
fn pem_certificates(text: &[u8], path: &std::path::Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = pem::parse_many(text)
        .with_context(|| format!("{} is not PEM", path.display()))?
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(|b| CertificateDer::from(b.into_contents()))
        .collect();
    anyhow::ensure!(!certs.is_empty(), "{} holds no CERTIFICATE", path.display());
    Ok(certs)
}

/// The probe cgroup to vouch for: the configured one, else the running
/// kubelet's; refused when it would vouch for more than the kubelet.
fn probe_cgroup(s: &Settings) -> anyhow::Result<Option<std::path::PathBuf>> {
    let wanted = match &s.probe_cgroup {
        Some(None) => {
            tracing::info!("no probe cgroup (--probe-cgroup none): strict pods refuse every host process");
            return Ok(None);
        }
        Some(Some(p)) => p.clone(),
        None => match crate::enrol::kubelet_cgroup(&s.pod_cgroup_root) {
            Some(p) => {
                tracing::info!(cgroup = %p.display(), "probe cgroup: the kubelet's");
                p
            }
            None => {
                tracing::warn!(
                    "no kubelet process found and no --probe-cgroup: liveness and readiness probes to strict pods \
                     will be refused (set --probe-cgroup to the kubelet's cgroup)"
                );
                return Ok(None);
            }
        },
    };
    crate::enrol::check_probe_cgroup(&wanted, &s.pod_cgroup_root)
        .map(Some)
        .map_err(anyhow::Error::msg)
}
