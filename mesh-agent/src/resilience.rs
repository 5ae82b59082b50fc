//! TrafficPolicies (`traffic_policy`) attached to Service ports, as the
//! datapath uses them: on the client's node a [`ClientPolicy`] per Service
//! port (outlier detection, connection and pending-request limits, fault
//! injection), consulted by the L7 path (`tunnel::split`); on the
//! destination's node a [`RateLimiter`] per Service port, found by
//! endpoint address (`tunnel::inbound`).
//!
//! Their state (ejections, buckets, counters) outlives a recompile: the
//! [`Registry`] hands back the same object while a policy's settings and
//! Service port stay the same. A policy that does not validate is refused
//! with its reason, and its last good version stays in force.
pub mod outlier;
pub mod rate_limit;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

pub use rate_limit::{Limited, RateLimiter};
use tokio::sync::Semaphore;

use crate::{
    state::Snapshot,
    traffic_policy::{Settings, TrafficPolicySpec},
};

/// A policy's client-side settings for one Service port, with their state.
pub struct ClientPolicy {
    /// `TrafficPolicy ns/name`.
    pub name: String,
    pub settings: Settings,
    pub ejections: Option<outlier::Ejections>,
    /// Requests in flight (maxPendingRequests).
    pub pending: Option<Arc<Semaphore>>,
    /// The agent's connections to the endpoints (maxConnections).
    pub connections: Option<Arc<Semaphore>>,
    delays: AtomicU64,
    aborts: AtomicU64,
}

/// Steps of two low-discrepancy (Weyl) sequences: the share of requests a
/// fault takes is exact to a request or two over any run, with no period
/// a client's own request pattern could line up with, and the two faults
/// are independent (1, phi and sqrt 2 are rationally independent).
const DELAY_STEP: f64 = 0.618_033_988_749_894_9; // phi - 1
const ABORT_STEP: f64 = 0.414_213_562_373_095_1; // sqrt 2 - 1

fn nth_falls_within(n: u64, step: f64, percent: u32) -> bool {
    ((n as f64 * step).fract() * 100.0) < percent as f64
}

impl ClientPolicy {
    fn new(name: String, settings: &Settings) -> ClientPolicy {
        let permits = |n: Option<u32>| n.map(|n| Arc::new(Semaphore::new(n as usize)));
        ClientPolicy {
            name,
            settings: settings.clone(),
            ejections: settings.outlier.map(outlier::Ejections::new),
            pending: permits(settings.max_pending_requests),
            connections: permits(settings.max_connections),
            delays: AtomicU64::new(0),
            aborts: AtomicU64::new(0),
        }
    }

    /// The fault injection delay for the next request, if it gets one.
    pub fn delay(&self) -> Option<Duration> {
        let (percent, delay) = self.settings.delay?;
        let n = self.delays.fetch_add(1, Ordering::Relaxed) + 1;
        nth_falls_within(n, DELAY_STEP, percent).then_some(delay)
    }

    /// The fault injection status the next request is answered with, if any.
    pub fn abort(&self) -> Option<u16> {
        let (percent, status) = self.settings.abort?;
        let n = self.aborts.fetch_add(1, Ordering::Relaxed) + 1;
        nth_falls_within(n, ABORT_STEP, percent).then_some(status)
    }

    /// Whether routing may pick `endpoint` (not ejected, or its probe).
    pub fn usable(&self, endpoint: SocketAddr) -> bool {
        self.ejections.as_ref().is_none_or(|e| e.usable(endpoint))
    }
}

impl std::fmt::Debug for ClientPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientPolicy")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    /// `TrafficPolicy ns/name`.
    pub name: String,
    pub reason: String,
    pub kept_previous: bool,
}

/// The policies in force, by Service port (`ns/name`, port).
#[derive(Debug, Default)]
pub struct InForce {
    pub client: BTreeMap<(String, u16), Arc<ClientPolicy>>,
    pub limits: BTreeMap<(String, u16), Arc<RateLimiter>>,
    /// The destination side's index: endpoint address -> the limits of
    /// the Service ports it serves.
    pub by_endpoint: BTreeMap<SocketAddr, Vec<Arc<RateLimiter>>>,
    pub refused: Vec<Refused>,
}

/// Keeps each policy's state across recompiles, and its last good version.
#[derive(Debug, Default)]
pub struct Registry {
    client: BTreeMap<(String, String, u16), Arc<ClientPolicy>>,
    limits: BTreeMap<(String, String, u16), Arc<RateLimiter>>,
    /// The last version that validated, whole (its target with it).
    accepted: BTreeMap<String, (TrafficPolicySpec, Settings)>,
}

impl Registry {
    /// The Service ports each TrafficPolicy of `snap` applies to. Endpoint
    /// indexes are filled by the caller, which knows the ports' endpoints.
    pub fn compile(&mut self, snap: &Snapshot) -> InForce {
        let mut out = InForce::default();
        let mut client = BTreeMap::new();
        let mut limits = BTreeMap::new();
        let present: BTreeSet<String> = snap
            .gateway
            .traffic_policies
            .iter()
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect();
        self.accepted.retain(|k, _| present.contains(k));
        for p in &snap.gateway.traffic_policies {
            let key = format!("{}/{}", p.namespace, p.name);
            let name = format!("TrafficPolicy {key}");
            let settings = match p
                .spec
                .settings()
                .and_then(|s| ports(&p.spec, &p.namespace, snap).map(|ports| (s, ports)))
            {
                Ok((s, ports)) => {
                    self.accepted.insert(key.clone(), (p.spec.clone(), s.clone()));
                    (p.spec.clone(), s, ports)
                }
                Err(reason) => {
                    // The last good version, on its own target and ports.
                    let kept = self.accepted.get(&key).cloned().and_then(|(spec, s)| {
                        let ports = ports(&spec, &p.namespace, snap).ok()?;
                        Some((spec, s, ports))
                    });
                    out.refused.push(Refused {
                        name: name.clone(),
                        reason,
                        kept_previous: kept.is_some(),
                    });
                    match kept {
                        Some(kept) => kept,
                        None => continue,
                    }
                }
            };
            let (spec, settings, ports) = settings;
            let service = format!("{}/{}", p.namespace, spec.target_ref.name);
            for port in ports {
                let at = (service.clone(), port);
                if out.client.contains_key(&at) || out.limits.contains_key(&at) {
                    out.refused.push(Refused {
                        name: name.clone(),
                        reason: format!("{service}:{port} already has a TrafficPolicy (the first by name applies)"),
                        kept_previous: false,
                    });
                    continue;
                }
                let id = (key.clone(), service.clone(), port);
                if settings.client_side() {
                    let c = self
                        .client
                        .get(&id)
                        .filter(|c| c.settings == settings)
                        .cloned()
                        .unwrap_or_else(|| Arc::new(ClientPolicy::new(name.clone(), &settings)));
                    client.insert(id.clone(), c.clone());
                    out.client.insert(at.clone(), c);
                }
                if settings.rate_limited() {
                    let l = self
                        .limits
                        .get(&id)
                        .filter(|l| l.settings == settings)
                        .cloned()
                        .unwrap_or_else(|| {
                            Arc::new(RateLimiter::new(
                                name.clone(),
                                format!("{name} on {service}:{port}"),
                                &settings,
                            ))
                        });
                    limits.insert(id, l.clone());
                    out.limits.insert(at, l);
                }
            }
        }
        self.client = client;
        self.limits = limits;
        out
    }
}

/// The TCP ports of the target Service the policy covers.
fn ports(spec: &TrafficPolicySpec, namespace: &str, snap: &Snapshot) -> Result<Vec<u16>, String> {
    let service = format!("{namespace}/{}", spec.target_ref.name);
    let svc = snap
        .services
        .get(&service)
        .ok_or_else(|| format!("targetRef: there is no Service {service}"))?;
    let tcp: Vec<u16> = svc
        .ports
        .iter()
        .filter(|p| p.protocol.eq_ignore_ascii_case("TCP"))
        .map(|p| p.port)
        .collect();
    match &spec.ports {
        None => Ok(tcp),
        Some(listed) => {
            if let Some(missing) = listed.iter().find(|p| !tcp.contains(p)) {
                return Err(format!("ports: Service {service} has no TCP port {missing}"));
            }
            Ok(listed.clone())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_shares_are_exact_over_any_run_and_independent() {
        let p = ClientPolicy::new(
            "TrafficPolicy t/x".into(),
            &Settings {
                delay: Some((20, Duration::from_millis(1))),
                abort: Some((10, 503)),
                ..Default::default()
            },
        );
        let (mut delayed, mut aborted, mut both) = (0, 0, 0);
        for i in 1..=2000 {
            let (d, a) = (p.delay().is_some(), p.abort().is_some());
            delayed += d as u32;
            aborted += a as u32;
            both += (d && a) as u32;
            if i == 100 {
                assert!(
                    (19..=21).contains(&delayed) && (9..=11).contains(&aborted),
                    "{delayed} {aborted}"
                );
            }
        }
        assert!((398..=402).contains(&delayed), "{delayed}");
        assert!((198..=202).contains(&aborted), "{aborted}");
        // Independent: about 2% of requests get both.
        assert!((30..=50).contains(&both), "{both}");
    }
}
