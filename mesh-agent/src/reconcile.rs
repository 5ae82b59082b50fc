//! The reconcile loops: whenever the snapshot changes (and every second,
//! for pods whose cgroup appears after their Pod object), make the kernel
//! and the agent's runtime views match it. Each loop is the only writer of
//! what it reconciles; all of them stop when `stop` fires (a successor
//! agent took over the kernel maps) or the agent exits.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use tokio::{sync::watch, task::JoinSet};
use tokio_util::sync::CancellationToken;

use crate::{
    enrol,
    identity::SpiffeId,
    metrics::KernelMetrics,
    policy::{InForce, KindLabels, Policy, PolicyMetrics},
    redirect::Redirect,
    services::{Compiled, HttpSplits, Splits},
    state::{PolicyMode, SnapshotRx},
    tunnel::udp::Relays,
};

/// Runs `job` until it ends or `stop` fires.
async fn until_stopped(stop: CancellationToken, job: impl std::future::Future<Output = ()>) {
    tokio::select! {
        () = job => {}
        () = stop.cancelled() => {}
    }
}

/// How often the pod cgroup tree is read: a new pod is enrolled within
/// this long of its cgroup appearing.
const ENROL_TICK: Duration = Duration::from_millis(200);

/// What the reconcile loops need to know about this node.
pub struct Reconciler {
    pub redirect: Arc<Redirect>,
    pub snapshots: SnapshotRx,
    pub node: String,
    pub pod_cgroup_root: PathBuf,
    pub cgroup_driver: enrol::CgroupDriver,
    /// The policy mode when no MeshConfig sets one.
    pub default_mode: PolicyMode,
    /// SPIFFE trust domain: AuthorizationPolicy SPIFFE sources must be in it.
    pub trust_domain: String,
    /// Whether this agent runs tunnels (UDP service tables then wait for
    /// their relays, so a remote endpoint is never sent to untunneled).
    pub tunnels_expected: bool,
    pub policy_metrics: PolicyMetrics,
    pub kernel_metrics: KernelMetrics,
}

/// The runtime views the loops publish.
pub struct Views {
    /// The policy in force (the inbound authorizer, the admin API, the audit trail).
    pub policy: watch::Receiver<Arc<InForce>>,
    /// HTTP-matched TrafficSplits (the outbound listener).
    pub http_splits: watch::Receiver<Arc<HttpSplits>>,
    /// TrafficPolicies in force (the L7 path's routes hold the client
    /// side; the inbound authorizer and the admin API read this).
    pub traffic_policies: watch::Receiver<Arc<crate::resilience::InForce>>,
    /// Where the tunnel hands in its UDP relays once it runs.
    pub udp_relays: watch::Sender<Option<Arc<Relays>>>,
}

impl Reconciler {
    /// Starts the policy, map and heartbeat loops in `tasks`.
    pub fn spawn(self, tasks: &mut JoinSet<()>, stop: CancellationToken) -> Views {
        let this = Arc::new(self);
        let (policy_tx, policy) = watch::channel(Arc::new(InForce {
            policy: Arc::default(),
            mode: this.default_mode,
        }));
        let (http_splits_tx, http_splits) = watch::channel(Arc::default());
        let (traffic_policies_tx, traffic_policies) = watch::channel(Arc::default());
        let (udp_relays, relays_rx) = watch::channel(None);
        tasks.spawn(until_stopped(stop.clone(), this.clone().policy_loop(policy_tx)));
        tasks.spawn(until_stopped(
            stop.clone(),
            this.clone().sync_loop(http_splits_tx, traffic_policies_tx, relays_rx),
        ));
        tasks.spawn(until_stopped(stop, this.heartbeat()));
        Views {
            policy,
            http_splits,
            traffic_policies,
            udp_relays,
        }
    }

    /// Compiles the policy on every snapshot change and puts it in force: the
    /// kernel's connect() rules (generation flip) and the inbound authorizer.
    async fn policy_loop(self: Arc<Self>, tx: watch::Sender<Arc<InForce>>) {
        let (redirect, metrics, node) = (&self.redirect, &self.policy_metrics, &self.node);
        let mut snapshots = self.snapshots.clone();
        loop {
            let snap = snapshots.borrow_and_update().clone();
            if snap.generation > 0 {
                let policy = Policy::compile_all(&snap, &self.trust_domain, snap.generation);
                for r in &policy.rejected {
                    metrics.rejected.get_or_create(&KindLabels { kind: r.kind }).inc();
                    tracing::error!(kind = r.kind, resource = %r.name, reason = %r.reason, "policy: resource refused; it grants nothing");
                    tracing::warn!(target: "audit", kind = "policy_resource", node = %node, verdict = "refused", resource_kind = r.kind,
                        resource = %r.name, reason = %r.reason, generation = snap.generation, "policy resource refused");
                }
                let mode = snap.mode.unwrap_or(self.default_mode);
                let rules = policy.kernel_rules();
                match redirect.sync_policy(&rules, mode == PolicyMode::Enforcing) {
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
        self: Arc<Self>,
        http_splits: watch::Sender<Arc<HttpSplits>>,
        traffic_policies: watch::Sender<Arc<crate::resilience::InForce>>,
        udp_relays: watch::Receiver<Option<Arc<Relays>>>,
    ) {
        let redirect = &self.redirect;
        let mut rx = self.snapshots.clone();
        let mut splits = Splits::default();
        let mut last_refused = Vec::new();
        let mut last_routes = (BTreeMap::new(), Vec::new());
        let (mut last_policies, mut last_policies_refused) = (BTreeMap::new(), Vec::new());
        let mut written: Option<(u64, enrol::Enrolment)> = None;
        let mut tables_at: Option<(u64, tokio::time::Instant)> = None;
        let mut pod_links = Some(crate::pod_net::PodLinks::default());
        loop {
            let snap = rx.borrow_and_update().clone();
            // Service tables wait for the tunnel's UDP relays (moments, at
            // start), so a UDP endpoint on another node is never sent to
            // untunneled; a predecessor's pinned tables stay in force meanwhile.
            let relays = udp_relays.borrow().clone();
            let tables_ready = relays.is_some() || !self.tunnels_expected;
            // Tables: on every new snapshot, else once a second (a failed
            // write is retried then).
            let tables_due =
                tables_at.is_none_or(|(g, at)| g != snap.generation || at.elapsed() >= Duration::from_secs(1));
            if snap.generation > 0 && tables_ready && tables_due {
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
                // Gateway API route conditions (Accepted, ResolvedRefs), on change.
                if (&compiled.routes_accepted, &compiled.routes_refused) != (&last_routes.0, &last_routes.1) {
                    for (route, unresolved) in &compiled.routes_accepted {
                        if unresolved.is_empty() {
                            tracing::info!(route = %route, accepted = true, resolved_refs = true, "Gateway API route in force");
                        } else {
                            tracing::warn!(route = %route, accepted = true, resolved_refs = false, unresolved = ?unresolved,
                                "Gateway API route in force; requests for its unresolved backends get a 500");
                        }
                    }
                    for r in &compiled.routes_refused {
                        tracing::warn!(route = %r.name, accepted = false, reason = %r.reason, "Gateway API route refused");
                    }
                    last_routes = (compiled.routes_accepted.clone(), compiled.routes_refused.clone());
                }
                let policies = std::mem::take(&mut compiled.traffic_policies);
                if policies.refused != last_policies_refused {
                    for r in &policies.refused {
                        tracing::warn!(traffic_policy = %r.name, reason = %r.reason, previous_version_in_force = r.kept_previous, "TrafficPolicy refused");
                    }
                    last_policies_refused = policies.refused.clone();
                }
                let attached: BTreeMap<String, String> = policies
                    .client
                    .iter()
                    .map(|((svc, port), c)| (format!("{svc}:{port}"), c.name.clone()))
                    .chain(
                        policies
                            .limits
                            .iter()
                            .map(|((svc, port), l)| (format!("{svc}:{port}"), l.policy.clone())),
                    )
                    .collect();
                if attached != last_policies {
                    for (port, name) in &attached {
                        tracing::info!(traffic_policy = %name, service = %port, "TrafficPolicy in force");
                    }
                    last_policies = attached;
                }
                traffic_policies.send_replace(Arc::new(policies));
                sync_tables(redirect, compiled, &http_splits);
                tables_at = Some((snap.generation, tokio::time::Instant::now()));
            }
            // Pods: the cgroup tree is read every tick, so a pod whose cgroup
            // appears after its Pod object is enrolled within a tick; the
            // maps are written only when the rows change.
            if snap.generation > 0 {
                let cgroups = enrol::scan(&self.pod_cgroup_root, self.cgroup_driver);
                let rows = enrol::enrolment(&snap, &self.node, &cgroups, self.default_mode);
                if written
                    .as_ref()
                    .is_none_or(|(g, w)| *g != snap.generation || *w != rows)
                {
                    match redirect.sync_workloads(&rows.workloads, &rows.endpoints) {
                        Ok(()) => {
                            tracing::info!(
                                generation = snap.generation,
                                enrolled = rows.workloads.len(),
                                endpoints = rows.endpoints.len(),
                                missing_cgroups = ?rows.missing_cgroup,
                                qos_class_mismatch = ?rows.qos_mismatch,
                                "kernel maps in sync"
                            );
                            written = Some((snap.generation, rows));
                        }
                        Err(err) => tracing::error!(error = %err, "writing kernel maps failed; will retry"),
                    }
                }
            }
            // The fast path follows the enrolled pods and this node's veths,
            // each tick (netlink blocks: off the runtime's threads).
            if let Some((_, rows)) = written.as_ref()
                && let Some(mut links) = pod_links.take()
            {
                let nets = rows.pod_nets.clone();
                let (links, rows) = tokio::task::spawn_blocking(move || {
                    let rows = links.refresh(&nets);
                    (links, rows)
                })
                .await
                .expect("fast path refresh panicked");
                pod_links = Some(links);
                match rows.map(|rows| redirect.sync_fast_path(&rows)) {
                    Ok(Ok(())) => {}
                    Ok(Err(err)) => tracing::warn!(error = %err, "updating the fast path failed; will retry"),
                    Err(err) => {
                        tracing::warn!(error = %err, "cannot read this node's veths; the fast path stays as it is")
                    }
                }
            }
            let wait = if tables_ready {
                ENROL_TICK
            } else {
                Duration::from_millis(20)
            };
            let _ = tokio::time::timeout(wait, rx.changed()).await;
        }
    }

    /// Keeps the agent's heartbeat in `mesh_config` current (fail-open reads
    /// it) and the kernel's counters in the metrics.
    async fn heartbeat(self: Arc<Self>) {
        let (redirect, kernel, snapshots) = (&self.redirect, &self.kernel_metrics, &self.snapshots);
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
            kernel.update(redirect.fast_path_stats(), redirect.capture_stats());
            kernel.update_traffic(&redirect.traffic_stats(), &snapshots.borrow().clone());
            // The kernel's own counters, also logged when they move.
            if n % 10 == 1 {
                let (fast_path, capture) = (redirect.fast_path_stats(), redirect.capture_stats());
                let now = (fast_path, capture);
                if last != Some(now) {
                    tracing::info!(
                        fast_path_packets = fast_path.packets,
                        fast_path_bytes = fast_path.bytes,
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
}

/// Writes the service tables. The outbound listener learns a new HTTP
/// split before the kernel sends it connects, and forgets an old one only
/// once the kernel has stopped.
fn sync_tables(redirect: &Redirect, compiled: Compiled, http_splits: &watch::Sender<Arc<HttpSplits>>) {
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

/// The identities this node needs: the ServiceAccounts of its pods.
pub async fn wanted_identities(
    mut snapshots: SnapshotRx,
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
            .filter_map(|p| match SpiffeId::of(&trust_domain, &p.identity()) {
                Ok(id) => Some(id),
                Err(e) => {
                    tracing::warn!(pod = %p.workload_name(), error = %e, "pod has no valid identity");
                    None
                }
            })
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
