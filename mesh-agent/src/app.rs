//! Wires the agent together: preflight, kernel programs, the workload source,
//! map sync, and the outbound listener.
use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::signal::unix::SignalKind;

use std::collections::BTreeSet;

use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::{
    config::{CaCommand, CertSource, Settings},
    drain::{Drain, Phase},
    handoff,
    identity::{
        SpiffeId,
        authority::Authority,
        manager::{IdentityManager, Timing},
        node_auth::{CredentialsFile, NodeAuthenticator, TokenReviewer},
        provider::{CertificateProvider, LocalCa, MeshCaClient},
        server::{CaService, serve as serve_ca},
    },
    metrics, preflight,
    redirect::{Redirect, RedirectOptions},
    source, state,
    tunnel::{
        TunnelMetrics,
        hbone::Hbone,
        inbound::Inbound,
        outbound::{self, Outbound, Tunnels},
        quic::{Quic, QuicServer},
        tls::TunnelTls,
    },
};
use rustls_pki_types::CertificateDer;

use crate::{
    audit::{Audit, AuditRecord},
    identity::verify::TrustBundle,
    policy::{InForce, KindLabels, Policy, PolicyAuthorizer, PolicyMetrics},
};

pub async fn run(s: Settings) -> anyhow::Result<()> {
    preflight::check(&s.bpffs_dir, &s.pod_cgroup_root)?;
    raise_memlock_limit();
    raise_open_files_limit();

    // An agent already serving this node hands its listeners over once we
    // are ready. Without one, listen before capture starts, so no captured
    // connect finds the port closed.
    let predecessor = handoff::Predecessor::find(&s.handoff_socket)?;
    let fresh = match &predecessor {
        None => Some(bind_listeners(&s).await?),
        Some(_) => {
            tracing::info!(handoff_socket = %s.handoff_socket.display(), "an agent serves this node: taking over its listeners once ready");
            None
        }
    };

    let mut redirect = Redirect::load(&RedirectOptions {
        bpffs_dir: &s.bpffs_dir,
        pod_cgroup_root: &s.pod_cgroup_root,
        capture_ip: s.capture_ip,
        outbound_port: s.outbound_port,
        fail_open: s.fail_open,
        kernel_debug: s.kernel_debug,
        splice: s.splice,
    })?;
    if let Some(logger) = redirect.kernel_logger.take() {
        forward_kernel_logs(logger);
    }
    let mut redirect_events = redirect.kernel_events.take();
    let redirect = Arc::new(redirect);

    // Until the source publishes its first snapshot, the kernel keeps what
    // is pinned (on a restart: the previous agent's maps).
    let (tx, rx) = state::channel();
    let source: Box<dyn source::Source> = match &s.source_dir {
        Some(dir) => Box::new(source::FileSource { dir: dir.clone() }),
        None => Box::new(source::KubeSource {
            client: kube::Client::try_default().await.context(
                "connecting to the Kubernetes API (--kubernetes): in-cluster config or a kubeconfig is needed",
            )?,
        }),
    };
    tracing::info!(source = %source.describe(), "reading workloads and policy");
    tokio::spawn(source.run(tx));
    // What writes the kernel's maps; stopped when a successor takes over.
    let (http_splits_tx, http_splits) = watch::channel(Arc::default());
    // UDP relays need the tunnel, which starts later; tables wait for them.
    let udp_relays: Arc<std::sync::OnceLock<Arc<crate::tunnel::udp::Relays>>> = Arc::default();
    let mut kernel_writers = vec![tokio::spawn(sync_loop(
        redirect.clone(),
        rx.clone(),
        http_splits_tx,
        udp_relays.clone(),
        s.identity.source.is_some(),
        s.node_name.clone(),
        s.pod_cgroup_root.clone(),
    ))];
    let mut registry = Registry::default();
    let connections = crate::metrics::ConnectionMetrics::default();
    connections.register(&mut registry);
    let kernel_metrics = crate::metrics::KernelMetrics::new(connections.clone());
    kernel_metrics.register(&mut registry);
    kernel_writers.push(tokio::spawn(heartbeat(
        redirect.clone(),
        kernel_metrics.clone(),
        rx.clone(),
    )));
    let policy_metrics = PolicyMetrics::default();
    policy_metrics.register(&mut registry);
    let (policy_tx, policy_rx) = watch::channel(Arc::new(InForce {
        policy: Arc::default(),
        mode: s.policy_mode,
    }));
    kernel_writers.push(tokio::spawn(policy_loop(
        redirect.clone(),
        rx.clone(),
        s.policy_mode,
        policy_tx,
        policy_metrics.clone(),
        s.node_name.clone(),
    )));
    let audit = Arc::new(Audit::new(
        s.node_name.clone(),
        s.audit_log.clone(),
        s.audit_log_max_bytes,
        4096,
    ));
    audit.register(&mut registry);
    let events_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if let Some(events) = redirect_events.take() {
        drain_kernel_events(
            events,
            audit.clone(),
            rx.clone(),
            policy_rx.clone(),
            events_stop.clone(),
        );
    }
    let authorizer = Arc::new(PolicyAuthorizer {
        in_force: policy_rx.clone(),
        metrics: policy_metrics,
        node: s.node_name.clone(),
        audit: audit.clone(),
    });
    let drain = Drain::default();
    let identities = start_identities(&s, rx.clone(), audit.clone(), &mut registry)?;
    let tunnels = match &identities {
        Some((manager, roots)) => Some(start_tunnels(
            &s,
            manager.clone(),
            roots,
            rx.clone(),
            authorizer,
            connections,
            drain.clone(),
            &mut registry,
        )?),
        None => None,
    };
    if let Some((t, _)) = &tunnels {
        let _ = udp_relays.set(crate::tunnel::udp::Relays::new(
            s.capture_ip,
            s.node_name.clone(),
            s.identity.trust_domain.clone(),
            s.tunnel.port,
            rx.clone(),
            t.quic.clone(),
            t.metrics.clone(),
        ));
    }
    let admin_state = crate::admin::AdminState {
        node: s.node_name.clone(),
        snapshots: rx.clone(),
        policy: policy_rx.clone(),
        identities: identities.as_ref().map(|(m, _)| m.clone()),
        trust_domain: s.identity.trust_domain.clone(),
        redirect: redirect.clone(),
    };

    let (listeners, predecessor) = match (fresh, predecessor) {
        (Some(l), _) => (l, None),
        (None, Some(p)) => match take_over(&p, &admin_state).await {
            Ok(l) => (l, Some(p)),
            // It stopped before handing over: the ports are free, or will
            // be once it exits (then binding says so).
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "the running agent did not hand over; binding the ports afresh"
                );
                (bind_listeners(&s).await?, None)
            }
        },
        (None, None) => unreachable!("either bound or found"),
    };
    let offer = handoff::Offer::listen(&s.handoff_socket, &listeners)?;
    let handoff::Listeners {
        outbound: outbound_listener,
        admin,
        health,
        metrics: metrics_listener,
        tunnel_tcp,
        tunnel_udp,
    } = listeners;
    let quic_server = Arc::new(std::sync::OnceLock::new());
    if let Some((tunnels, tls)) = &tunnels {
        if let Some(tcp) = tunnel_tcp {
            tokio::spawn(
                tunnels
                    .hbone
                    .clone()
                    .serve(tokio_listener(tcp)?, tunnels.inbound.clone(), drain.clone()),
            );
        }
        let start = StartQuic {
            tls: tls.clone(),
            metrics: tunnels.metrics.clone(),
            inbound: tunnels.inbound.clone(),
            drain: drain.clone(),
            addr: std::net::SocketAddr::from((s.tunnel.addr, s.tunnel.port)),
            server: quic_server.clone(),
        };
        match (tunnel_udp, predecessor) {
            (Some(udp), _) => start.serve(udp)?,
            (None, Some(p)) => {
                tokio::spawn(start.after_predecessor(p));
            }
            (None, None) => unreachable!("a fresh agent binds UDP"),
        }
    }
    tokio::spawn(crate::admin::serve(
        tokio_listener(admin)?,
        admin_state.clone(),
        audit.clone(),
        drain.clone(),
    ));
    tokio::spawn(crate::admin::serve_health(
        tokio_listener(health)?,
        admin_state,
        drain.clone(),
    ));
    tokio::spawn(metrics::serve(
        tokio_listener(metrics_listener)?,
        Arc::new(registry),
        drain.clone(),
    ));

    tracing::info!(
        node = %s.node_name,
        outbound = %format!("{}:{}", s.capture_ip, s.outbound_port),
        pod_cgroup_root = %s.pod_cgroup_root.display(),
        bpffs = %s.bpffs_dir.display(),
        fail_open = s.fail_open,
        splice = s.splice,
        policy_mode = ?s.policy_mode,
        identities = identities.is_some(),
        metrics = %s.metrics_addr,
        "agent ready"
    );

    tokio::spawn(outbound::serve(
        tokio_listener(outbound_listener)?,
        Arc::new(Outbound {
            redirect: redirect.clone(),
            snapshots: rx,
            http_splits,
            tunnels: tunnels.map(|t| t.0),
            drain: drain.clone(),
        }),
    ));
    let mut term = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut stopping = false;
    let successor = tokio::select! {
        // First: the lab (or the DaemonSet controller) sends SIGTERM right
        // after the successor took over; the handover must still win.
        biased;
        successor = offer.wait_successor() => Some(successor),
        _ = tokio::signal::ctrl_c() => { stopping = true; None }
        _ = term.recv() => { stopping = true; None }
    };
    if successor.is_some() {
        // The successor owns the kernel maps and the audit events now.
        for task in &kernel_writers {
            task.abort();
        }
        events_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    run_drain(&drain, s.drain_grace, successor.is_some()).await;
    if let Some(successor) = successor {
        let server = quic_server.get().cloned();
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
    tracing::info!("stopped; pins stay in place");
    Ok(())
}

/// Stops taking new work and waits for open flows, at most `grace`; then
/// ends what is left cleanly.
async fn run_drain(drain: &Drain, grace: Duration, handed_over: bool) {
    drain.advance(Phase::Draining);
    tracing::info!(
        open_flows = drain.open_flows(),
        grace_ms = grace.as_millis() as u64,
        handed_over,
        "draining: no new connections here; open flows may finish"
    );
    if drain.flows_done_within(grace).await {
        tracing::info!("drained: every flow finished");
        return;
    }
    tracing::info!(
        open_flows = drain.open_flows(),
        "grace period over: ending the remaining flows cleanly"
    );
    drain.advance(Phase::Ending);
    if !drain.flows_done_within(Duration::from_secs(3)).await {
        tracing::warn!(
            open_flows = drain.open_flows(),
            "flows still open 3 s after they were ended; they close with the process"
        );
    }
}

/// Waits until this agent is ready (or 15 s), then takes the predecessor's listeners.
async fn take_over(
    predecessor: &handoff::Predecessor,
    admin: &crate::admin::AdminState,
) -> anyhow::Result<handoff::Listeners> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let why = admin.not_ready();
        if why.is_empty() {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            tracing::warn!(not_ready = ?why, "not ready after 15 s; taking over anyway (the predecessor cannot serve forever)");
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let listeners = predecessor
        .take()
        .context("taking the listeners from the running agent (see its log)")?;
    tracing::info!("took over the listeners; the previous agent drains");
    Ok(listeners)
}

/// Binds every listening socket of a fresh start.
async fn bind_listeners(s: &Settings) -> anyhow::Result<handoff::Listeners> {
    let std_tcp = |l: tokio::net::TcpListener| l.into_std();
    let outbound = std_tcp(outbound::bind(s.capture_ip, s.outbound_port).await?)?;
    let admin = std_tcp(
        tokio::net::TcpListener::bind(s.admin_addr)
            .await
            .with_context(|| format!("binding the admin API on {} (--admin-addr)", s.admin_addr))?,
    )?;
    let health = std_tcp(
        tokio::net::TcpListener::bind(s.health_addr)
            .await
            .with_context(|| format!("binding the health endpoint on {} (--health-addr)", s.health_addr))?,
    )?;
    let metrics = std_tcp(metrics::bind(s.metrics_addr).await?)?;
    let (mut tunnel_tcp, mut tunnel_udp) = (None, None);
    if s.identity.source.is_some() {
        let addr = std::net::SocketAddr::from((s.tunnel.addr, s.tunnel.port));
        tunnel_udp = Some(
            std::net::UdpSocket::bind(addr)
                .with_context(|| format!("binding the QUIC tunnel on UDP {addr} (is another agent running?)"))?,
        );
        tunnel_tcp = Some(std_tcp(tokio::net::TcpListener::bind(addr).await.with_context(
            || format!("binding the mTLS tunnel on TCP {addr} (is another agent running?)"),
        )?)?);
    }
    Ok(handoff::Listeners {
        outbound,
        admin,
        health,
        metrics,
        tunnel_tcp,
        tunnel_udp,
    })
}

fn tokio_listener(l: std::net::TcpListener) -> std::io::Result<tokio::net::TcpListener> {
    l.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(l)
}

/// Everything the QUIC server needs, for whenever its socket is there.
struct StartQuic {
    tls: TunnelTls,
    metrics: TunnelMetrics,
    inbound: Arc<Inbound>,
    drain: Drain,
    addr: std::net::SocketAddr,
    server: Arc<std::sync::OnceLock<Arc<QuicServer>>>,
}

impl StartQuic {
    fn serve(self, socket: std::net::UdpSocket) -> anyhow::Result<()> {
        let server = QuicServer::new(socket, &self.tls, self.metrics)
            .with_context(|| format!("serving the QUIC tunnel on UDP {}", self.addr))?;
        let _ = self.server.set(server.clone());
        tokio::spawn(server.serve(self.inbound, self.drain));
        tracing::info!(listen = %self.addr, "QUIC tunnel serving");
        Ok(())
    }

    /// Until the predecessor has drained, it serves UDP; peers take the TCP
    /// transport for new flows. Then its socket comes here (or, if it died,
    /// the port is bound afresh).
    async fn after_predecessor(self, predecessor: handoff::Predecessor) {
        // A plain thread, not spawn_blocking: the runtime waits for those
        // at exit, and the predecessor may drain for a long time.
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || tx.send(predecessor.wait_udp()));
        let socket = rx.await.ok().flatten();
        let socket = match socket {
            Some(s) => {
                tracing::info!("received the QUIC tunnel socket from the previous agent");
                s
            }
            None => loop {
                match std::net::UdpSocket::bind(self.addr) {
                    Ok(s) => break s,
                    Err(e) => {
                        tracing::warn!(addr = %self.addr, error = %e, "binding the QUIC tunnel port; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            },
        };
        if let Err(e) = self.serve(socket) {
            tracing::error!(error = %e, "QUIC tunnel not served; peers use the TCP transport");
        }
    }
}

/// Builds both transports' client sides and the inbound flow handler; the
/// servers start once their sockets are there (bound, or handed over).
#[allow(clippy::too_many_arguments)]
fn start_tunnels(
    s: &Settings,
    manager: Arc<IdentityManager>,
    roots: &[CertificateDer<'static>],
    snapshots: state::SnapshotRx,
    authorizer: Arc<PolicyAuthorizer>,
    connections: crate::metrics::ConnectionMetrics,
    drain: Drain,
    registry: &mut Registry,
) -> anyhow::Result<(Arc<Tunnels>, TunnelTls)> {
    let bundle = Arc::new(
        TrustBundle::new(roots, &s.identity.trust_domain).context("the CA root is not a usable trust anchor")?,
    );
    let tls = TunnelTls { manager, bundle };
    let metrics = TunnelMetrics {
        connections,
        ..Default::default()
    };
    metrics.register(registry);
    let inbound = Arc::new(Inbound {
        node: s.node_name.clone(),
        trust_domain: s.identity.trust_domain.clone(),
        snapshots,
        authorizer,
        metrics: metrics.clone(),
        drain,
    });
    let client_addr = std::net::SocketAddr::from((s.tunnel.addr, 0));
    let quic = Quic::client(client_addr, tls.clone(), metrics.clone())
        .with_context(|| format!("binding the QUIC dialler on UDP {client_addr}"))?;
    let hbone = Hbone::new(tls.clone(), metrics.clone());
    tracing::info!(outbound_transport = ?s.tunnel.transport, "tunnel clients ready");
    Ok((
        Arc::new(Tunnels {
            transport: s.tunnel.transport,
            quic,
            hbone,
            trust_domain: s.identity.trust_domain.clone(),
            port: s.tunnel.port,
            metrics,
            inbound,
        }),
        tls,
    ))
}

/// PEM certificates from a file (the CA root bundle).
fn pem_certificates(path: &std::path::Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let text = std::fs::read(path).with_context(|| format!("reading the CA root {} (--ca-root)", path.display()))?;
    let certs: Vec<_> = pem::parse_many(&text)
        .with_context(|| format!("{} is not PEM", path.display()))?
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(|b| CertificateDer::from(b.into_contents()))
        .collect();
    anyhow::ensure!(!certs.is_empty(), "{} holds no CERTIFICATE", path.display());
    Ok(certs)
}

type Identities = (Arc<IdentityManager>, Vec<CertificateDer<'static>>);

/// Starts the identity manager when a certificate source is configured;
/// returns it with the roots peers are verified against.
fn start_identities(
    s: &Settings,
    snapshots: state::SnapshotRx,
    audit: Arc<Audit>,
    registry: &mut Registry,
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
                pem_certificates(root)?,
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
    tokio::spawn(manager.clone().run(rx));
    tokio::spawn(wanted_identities(
        snapshots,
        s.node_name.clone(),
        s.identity.trust_domain.clone(),
        tx,
    ));
    Ok(Some((manager, roots)))
}

/// The identities this node needs: the ServiceAccounts of its pods.
async fn wanted_identities(
    mut snapshots: state::SnapshotRx,
    node: String,
    trust_domain: String,
    tx: watch::Sender<BTreeSet<SpiffeId>>,
) {
    loop {
        let snap = snapshots.borrow_and_update().clone();
        let want: BTreeSet<SpiffeId> = snap
            .pods
            .values()
            .filter(|p| p.node == node)
            .filter_map(
                |p| match SpiffeId::new(&trust_domain, &p.namespace, &p.service_account) {
                    Ok(id) => Some(id),
                    Err(e) => {
                        tracing::warn!(pod = %p.workload_name(), error = %e, "pod has no valid identity");
                        None
                    }
                },
            )
            .collect();
        tx.send_if_modified(|cur| {
            let changed = *cur != want;
            *cur = want;
            changed
        });
        if snapshots.changed().await.is_err() {
            return;
        }
    }
}

/// `mesh-agent status`: a short human summary from the admin API.
pub async fn run_status(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    use http_body_util::{BodyExt as _, Empty};
    let tcp = tokio::net::TcpStream::connect(addr).await.with_context(|| {
        format!("connecting to the agent's admin API at {addr} (is the agent running on this node? see --admin-addr)")
    })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::get("/config_dump")
        .header("host", addr.to_string())
        .body(Empty::<bytes::Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    anyhow::ensure!(resp.status().is_success(), "admin API answered {}", resp.status());
    let body = resp.into_body().collect().await?.to_bytes();
    let d: serde_json::Value = serde_json::from_slice(&body)?;
    print!("{}", status_text(&d));
    Ok(())
}

/// The status summary, from a config dump.
pub fn status_text(d: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let not_ready: Vec<&str> = d["not_ready"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str())
        .collect();
    let _ = writeln!(
        out,
        "node {}: {}",
        d["node"].as_str().unwrap_or("?"),
        if not_ready.is_empty() {
            "ready".to_string()
        } else {
            format!("NOT READY ({})", not_ready.join("; "))
        }
    );
    let p = &d["policy"];
    let _ = writeln!(
        out,
        "policy: {}, generation {}, {} TrafficTargets, {} refused",
        p["mode"].as_str().unwrap_or("?"),
        p["generation"],
        p["traffic_targets"].as_array().map_or(0, |a| a.len()),
        p["refused"].as_array().map_or(0, |a| a.len())
    );
    for r in p["refused"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  refused {} {}: {}",
            r["kind"].as_str().unwrap_or(""),
            r["name"].as_str().unwrap_or(""),
            r["reason"].as_str().unwrap_or("")
        );
    }
    let workloads: Vec<&serde_json::Value> = d["workloads"].as_array().into_iter().flatten().collect();
    let local: Vec<&&serde_json::Value> = workloads.iter().filter(|w| w["local"] == true).collect();
    let _ = writeln!(
        out,
        "workloads: {} on this node, {} in the mesh",
        local.len(),
        workloads.len()
    );
    for w in local {
        let _ = writeln!(
            out,
            "  {} {} sa={}",
            w["name"].as_str().unwrap_or(""),
            w["ip"].as_str().unwrap_or(""),
            w["service_account"].as_str().unwrap_or("")
        );
    }
    for c in d["certificates"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "certificate {} serial {} expires in {} s",
            c["identity"].as_str().unwrap_or(""),
            c["serial"].as_str().unwrap_or(""),
            c["expires_in_s"]
        );
    }
    let k = &d["kernel"];
    let _ = writeln!(
        out,
        "kernel: {} redirected, {} same-node, {} denied, {} passthrough, {} audit events dropped; spliced {} bytes in {} messages",
        k["redirected"],
        k["same_node"],
        k["denied"],
        k["passthrough"],
        k["events_dropped"],
        k["spliced_bytes"],
        k["spliced_messages"]
    );
    out
}

/// `mesh-agent audit`: prints the node's audit records as JSON lines.
pub async fn run_audit(
    follow: bool,
    verdict: Option<String>,
    workload: Option<String>,
    addr: std::net::SocketAddr,
) -> anyhow::Result<()> {
    use crate::audit::proto::{StreamRequest, audit_trail_client::AuditTrailClient};
    let mut client = AuditTrailClient::connect(format!("http://{addr}"))
        .await
        .with_context(|| {
            format!(
                "connecting to the agent's admin API at {addr} (is the agent running on this node? see --admin-addr)"
            )
        })?;
    let req = StreamRequest {
        follow,
        verdict: verdict.unwrap_or_default(),
        workload: workload.unwrap_or_default(),
    };
    let mut stream = client
        .stream(req)
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    while let Some(rec) = stream.message().await? {
        writeln!(out, "{}", rec.json)?;
        out.flush()?;
    }
    Ok(())
}

/// `mesh-agent ca ...`.
pub async fn run_ca(command: CaCommand) -> anyhow::Result<()> {
    match command {
        CaCommand::Init { dir, trust_domain } => {
            let cert = Authority::init(&dir, &trust_domain)?;
            println!(
                "created a root CA for trust domain {trust_domain}:\n  certificate {}\n  private key {} (mode 0600; keep it secret)\nserve it with: mesh-agent ca serve --dir {} --node-credentials FILE --source-dir DIR",
                cert.display(),
                dir.join(crate::identity::authority::CA_KEY).display(),
                dir.display()
            );
            Ok(())
        }
        CaCommand::Serve {
            dir,
            listen,
            node_credentials,
            token_review_user,
            token_audience,
            source_dir,
            trust_domain,
            ..
        } => {
            let nodes: Arc<dyn NodeAuthenticator> = match node_credentials {
                Some(path) => Arc::new(CredentialsFile { path }),
                None => Arc::new(TokenReviewer {
                    client: kube::Client::try_default()
                        .await
                        .context("connecting to the Kubernetes API for TokenReview (in-cluster or kubeconfig)")?,
                    agent_users: token_review_user,
                    audiences: vec![token_audience],
                }),
            };
            let authority = Arc::new(Authority::load(&dir)?);
            let (tx, rx) = state::channel();
            match source_dir {
                Some(source_dir) => {
                    match source::file::load(&source_dir) {
                        Ok(mut snap) => {
                            snap.generation = 1;
                            let _ = tx.send(Arc::new(snap));
                        }
                        Err(err) => {
                            tracing::error!(error = %err, "source: initial read failed; refusing every request until it reads")
                        }
                    }
                    tokio::spawn(source::file::watch(source_dir, tx));
                }
                None => {
                    let client = kube::Client::try_default().await.context(
                        "connecting to the Kubernetes API (--kubernetes): in-cluster config or a kubeconfig is needed",
                    )?;
                    let source: Box<dyn source::Source> = Box::new(source::KubeSource { client });
                    tokio::spawn(source.run(tx));
                }
            }
            let service = CaService::new(authority, nodes, rx, trust_domain);
            let mut term = tokio::signal::unix::signal(SignalKind::terminate())?;
            tokio::select! {
                r = serve_ca(service, listen) => r?,
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            Ok(())
        }
        CaCommand::Request {
            ca_addr,
            ca_root,
            node_token_file,
            identity,
            ttl,
        } => {
            let pem = std::fs::read(&ca_root).with_context(|| format!("reading {}", ca_root.display()))?;
            let client = MeshCaClient::new(&ca_addr, &pem, node_token_file)?;
            let id: SpiffeId = identity.parse()?;
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            let csr = crate::identity::authority::csr_for(&id, &key)?;
            let issued = client.issue(&id, csr, ttl).await?;
            let not_after = issued
                .not_after
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            println!(
                "{}",
                serde_json::json!({"identity": id.uri(), "serial": issued.serial, "not_after_unix": not_after})
            );
            Ok(())
        }
    }
}

/// Compiles the policy on every snapshot change and puts it in force: the
/// kernel's connect() rules (generation flip) and the inbound authorizer.
async fn policy_loop(
    redirect: Arc<Redirect>,
    mut snapshots: state::SnapshotRx,
    default_mode: state::PolicyMode,
    tx: watch::Sender<Arc<InForce>>,
    metrics: PolicyMetrics,
    node: String,
) {
    loop {
        let snap = snapshots.borrow_and_update().clone();
        if snap.generation > 0 {
            let policy = Policy::compile(&snap.smi, snap.generation);
            for r in &policy.rejected {
                metrics.rejected.get_or_create(&KindLabels { kind: r.kind }).inc();
                tracing::error!(kind = r.kind, resource = %r.name, reason = %r.reason, "policy: resource refused; it grants nothing");
                tracing::warn!(target: "audit", kind = "policy_resource", node = %node, verdict = "refused", resource_kind = r.kind,
                    resource = %r.name, reason = %r.reason, generation = snap.generation, "policy resource refused");
            }
            let mode = snap.mode.unwrap_or(default_mode);
            let rules = policy.kernel_rules();
            match redirect.sync_policy(&rules, mode == state::PolicyMode::Enforcing) {
                Ok(()) => {
                    metrics.generation.set(snap.generation as i64);
                    tracing::info!(generation = snap.generation, mode = ?mode, targets = policy.targets.len(),
                        kernel_rules = rules.len(), refused = policy.rejected.len(), "policy in force");
                    tx.send_replace(Arc::new(InForce {
                        policy: Arc::new(policy),
                        mode,
                    }));
                }
                // The previous generation stays in force in the kernel.
                Err(e) => {
                    tracing::error!(error = %e, "policy: writing kernel rules failed; the previous policy stays in force")
                }
            }
        }
        if snapshots.changed().await.is_err() {
            return;
        }
    }
}

/// Re-applies the latest snapshot when it changes, and every second so pods
/// whose cgroup appears after their Pod object get enrolled.
async fn sync_loop(
    redirect: Arc<Redirect>,
    mut rx: state::SnapshotRx,
    http_splits: watch::Sender<Arc<crate::services::HttpSplits>>,
    udp_relays: Arc<std::sync::OnceLock<Arc<crate::tunnel::udp::Relays>>>,
    tunnels_expected: bool,
    node: String,
    root: std::path::PathBuf,
) {
    let mut last: Option<(u64, usize, usize)> = None;
    let mut splits = crate::services::Splits::default();
    let mut last_refused = Vec::new();
    loop {
        let snap = rx.borrow_and_update().clone();
        // Service tables wait for the tunnel's UDP relays (moments, at
        // start), so a UDP endpoint on another node is never sent to
        // untunneled; a predecessor's pinned tables stay in force meanwhile.
        let relays = udp_relays.get();
        let tables_ready = relays.is_some() || !tunnels_expected;
        if snap.generation > 0 {
            if tables_ready {
                let mut compiled = splits.compile(&snap);
                if let Some(relays) = relays {
                    relays.assign(&mut compiled.tables);
                }
                if compiled.refused != last_refused {
                    for r in &compiled.refused {
                        tracing::warn!(traffic_split = %r.name, reason = %r.reason, previous_version_in_force = r.kept_previous, "TrafficSplit refused");
                    }
                    last_refused = compiled.refused.clone();
                }
                sync_tables(&redirect, compiled, &http_splits);
            }
            match redirect.sync(&snap, &node, &root) {
                Ok(report) => {
                    let now = (snap.generation, report.enrolled, report.endpoints);
                    if last != Some(now) {
                        tracing::info!(
                            generation = snap.generation,
                            enrolled = report.enrolled,
                            endpoints = report.endpoints,
                            missing_cgroups = ?report.missing_cgroup,
                            "kernel maps in sync"
                        );
                        last = Some(now);
                    }
                }
                Err(err) => tracing::error!(error = %err, "writing kernel maps failed; will retry"),
            }
        }
        let wait = if tables_ready { 1000 } else { 20 };
        let _ = tokio::time::timeout(Duration::from_millis(wait), rx.changed()).await;
    }
}

/// Writes the service tables. The outbound listener learns a new HTTP
/// split before the kernel sends it connects, and forgets an old one only
/// once the kernel has stopped.
fn sync_tables(
    redirect: &Redirect,
    compiled: crate::services::Compiled,
    http_splits: &watch::Sender<Arc<crate::services::HttpSplits>>,
) {
    let mut both = (*http_splits.borrow()).as_ref().clone();
    both.extend(compiled.http.clone());
    http_splits.send_replace(Arc::new(both));
    let written = redirect.sync_services(&compiled.tables);
    http_splits.send_replace(Arc::new(compiled.http));
    match written {
        Ok(0) => {}
        Ok(changed) => tracing::info!(
            changed,
            services = compiled.tables.len(),
            splits = compiled.tables.iter().filter(|t| t.split.is_some()).count(),
            "service tables in force"
        ),
        Err(err) => tracing::error!(error = %err, "writing service tables failed; will retry"),
    }
}

async fn heartbeat(redirect: Arc<Redirect>, kernel: crate::metrics::KernelMetrics, snapshots: state::SnapshotRx) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last = None;
    let mut n = 0u64;
    let mut trimmed_at = 0u64;
    loop {
        tick.tick().await;
        n += 1;
        if n.is_multiple_of(2) {
            crate::memory::trim_if_flows_ended(&mut trimmed_at);
        }
        if let Err(err) = redirect.heartbeat() {
            tracing::warn!(error = %err, "heartbeat to the kernel failed");
        }
        kernel.update(redirect.splice_stats(), redirect.capture_stats());
        kernel.update_traffic(&redirect.traffic_stats(), &snapshots.borrow().clone());
        // The kernel's own counters, also logged when they move.
        if n % 10 == 1 {
            let (splice, capture) = (redirect.splice_stats(), redirect.capture_stats());
            let now = (splice, capture);
            if last != Some(now) {
                tracing::info!(
                    spliced_messages = splice.messages,
                    spliced_bytes = splice.bytes,
                    redirected = capture.redirected,
                    same_node = capture.same_node,
                    passthrough = capture.passthrough,
                    failed_open = capture.failed_open,
                    "kernel counters"
                );
                last = Some(now);
            }
        }
    }
}

/// Drains `mesh_events` (decisions at connect()) into the audit trail, on
/// its own thread: the kernel never waits for us; if we fall behind, the
/// kernel counts what it could not queue (events_dropped).
fn drain_kernel_events(
    mut ring: aya::maps::RingBuf<aya::maps::MapData>,
    audit: Arc<Audit>,
    snapshots: state::SnapshotRx,
    policy: watch::Receiver<Arc<InForce>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd as _;
    std::thread::spawn(move || {
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let ready = {
                let mut fds = [PollFd::new(ring.as_fd(), PollFlags::POLLIN)];
                poll(&mut fds, PollTimeout::from(500u16))
            };
            match ready {
                Err(nix::Error::EINTR) => continue,
                Err(e) => {
                    tracing::error!(error = %e, "audit: cannot poll mesh_events; kernel decisions are no longer audited");
                    return;
                }
                Ok(_) => {}
            }
            while let Some(item) = ring.next() {
                tracing::debug!(len = item.len(), "audit: kernel event");
                if item.len() < std::mem::size_of::<mesh_common::PolicyEvent>() {
                    continue;
                }
                // SAFETY-free copy: the bytes are a PolicyEvent written by connect4.
                let ev = read_policy_event(&item);
                audit.record(kernel_record(&ev, &snapshots.borrow(), &policy.borrow()));
            }
        }
    });
}

fn read_policy_event(bytes: &[u8]) -> mesh_common::PolicyEvent {
    let u32_at = |o: usize| u32::from_ne_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
    mesh_common::PolicyEvent {
        time_ns: u64::from_ne_bytes(bytes[0..8].try_into().expect("8 bytes")),
        workload_id: u32_at(8),
        src_identity: u32_at(12),
        dst_ipv4: u32_at(16),
        dst_identity: u32_at(20),
        dst_port: u16::from_ne_bytes(bytes[24..26].try_into().expect("2 bytes")),
        protocol: bytes[26],
        verdict: bytes[27],
        generation: u32_at(28),
    }
}

/// A kernel decision as an audit record, named from the snapshot and the
/// policy in force.
fn kernel_record(ev: &mesh_common::PolicyEvent, snap: &state::Snapshot, policy: &InForce) -> AuditRecord {
    let src = snap.pod_by_workload_id(ev.workload_id);
    let dst_ip = std::net::Ipv4Addr::from(ev.dst_ipv4.to_ne_bytes());
    let dst = snap.pod_by_ip(dst_ip);
    let ident = |p: Option<&state::Pod>| {
        p.map(|p| format!("{}/{}", p.namespace, p.service_account))
            .unwrap_or_default()
    };
    let allowed = ev.verdict == mesh_common::VERDICT_ALLOW;
    let (rule, target, reason) = match (src, dst) {
        (Some(s), Some(d)) => {
            let si = crate::policy::Ident {
                namespace: s.namespace.clone(),
                service_account: s.service_account.clone(),
            };
            let di = crate::policy::Ident {
                namespace: d.namespace.clone(),
                service_account: d.service_account.clone(),
            };
            let dec = policy
                .policy
                .evaluate(policy.mode, &si, &di, ev.dst_port, crate::policy::Proto::Tcp);
            (dec.rule, dec.target.unwrap_or_default(), dec.reason)
        }
        _ => (String::new(), String::new(), String::new()),
    };
    let (rule, reason) = if allowed {
        (rule, reason)
    } else {
        ("default-deny".into(), format!("connect() refused with EPERM: {reason}"))
    };
    AuditRecord {
        time: wall_time_of(ev.time_ns),
        kind: "policy".into(),
        enforced_at: "source".into(),
        verdict: if allowed { "allow" } else { "deny" }.into(),
        source_workload: src.map(|p| p.workload_name()).unwrap_or_default(),
        source_identity: ident(src),
        destination_workload: dst.map(|p| p.workload_name()).unwrap_or_default(),
        destination_identity: ident(dst),
        destination_address: format!("{dst_ip}:{}", ev.dst_port),
        port: ev.dst_port,
        protocol: "tcp".into(),
        rule,
        traffic_target: if allowed { target } else { String::new() },
        generation: policy.policy.generation,
        reason,
        ..Default::default()
    }
}

/// A CLOCK_MONOTONIC instant as wall-clock RFC 3339.
fn wall_time_of(mono_ns: u64) -> String {
    let now_mono = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(mono_ns);
    let age = std::time::Duration::from_nanos(now_mono.saturating_sub(mono_ns));
    let at = time::OffsetDateTime::now_utc() - age;
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Drains the kernel programs' aya-log ring buffer on its own thread, so a
/// burst of kernel debug lines never stalls the async runtime.
fn forward_kernel_logs(mut logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd as _;
    std::thread::spawn(move || {
        loop {
            let ready = {
                let mut fds = [PollFd::new(logger.as_fd(), PollFlags::POLLIN)];
                poll(&mut fds, PollTimeout::from(1000u16))
            };
            if ready.is_err() {
                return;
            }
            logger.flush();
        }
    });
}

/// Every carried flow holds sockets; the default soft limit of 1,024 open
/// files is reached with a few hundred flows (each accepted downstream and
/// each upstream to a pod is a descriptor). Raise the soft limit to the hard one.
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(error = %e, soft, hard, "could not raise the open-files limit; expect EMFILE under load");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not read the open-files limit"),
    }
}

/// Older kernels charge BPF memory to RLIMIT_MEMLOCK; this one uses memcg, and
/// root here may lack CAP_SYS_RESOURCE, so failure is only worth a debug line.
fn raise_memlock_limit() {
    use nix::sys::resource::{Resource, setrlimit};
    if let Err(e) = setrlimit(
        Resource::RLIMIT_MEMLOCK,
        nix::libc::RLIM_INFINITY,
        nix::libc::RLIM_INFINITY,
    ) {
        tracing::debug!(error = %e, "could not raise RLIMIT_MEMLOCK (harmless with memcg accounting)");
    }
}
