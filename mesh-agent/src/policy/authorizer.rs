//! The destination side's policy check (authoritative), behind the
//! [`Authorizer`] seam the tunnel calls: one audit line and one metric per
//! decision, for flows and, where HTTP rules apply, for each request.
use std::net::SocketAddr;

use std::sync::Arc;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use super::model::{Decision, InForce};
use crate::{
    audit::{Audit, AuditRecord},
    authz::{Admission, Authorizer, Denial, HttpCheck, HttpRequest, Proto},
    identity::SpiffeId,
    state::{Identity, Pod, PolicyMode},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub verdict: &'static str,
    pub enforced_at: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Default)]
pub struct PolicyMetrics {
    pub generation: Gauge,
    pub decisions: Family<DecisionLabels, Counter>,
    pub rejected: Family<KindLabels, Counter>,
}

impl PolicyMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "mesh_policy_generation",
            "Generation of the policy in force",
            self.generation.clone(),
        );
        r.register(
            "mesh_policy_decisions",
            "Policy decisions by verdict and where they were made",
            self.decisions.clone(),
        );
        r.register(
            "mesh_policy_rejected_resources",
            "SMI resources refused by the policy compiler",
            self.rejected.clone(),
        );
    }
}

/// The policy in force, as the inbound path asks it.
pub struct PolicyAuthorizer {
    in_force: tokio::sync::watch::Receiver<Arc<InForce>>,
    recorder: Arc<Recorder>,
}

/// Where decisions are counted and audited; shared by every flow's
/// [`HttpRequests`] instead of being rebuilt per flow.
struct Recorder {
    metrics: PolicyMetrics,
    node: String,
    audit: Arc<Audit>,
}

/// What a destination-side decision was about.
enum Seen<'a> {
    /// A TCP flow or a UDP session.
    Flow(Proto),
    /// An HTTP request (method, path).
    Request(&'a str, &'a str),
}

impl PolicyAuthorizer {
    pub fn new(
        in_force: tokio::sync::watch::Receiver<Arc<InForce>>,
        metrics: PolicyMetrics,
        node: String,
        audit: Arc<Audit>,
    ) -> Self {
        PolicyAuthorizer {
            in_force,
            recorder: Arc::new(Recorder { metrics, node, audit }),
        }
    }
}

impl Recorder {
    fn record(
        &self,
        d: &Decision,
        source: &SpiffeId,
        destination: &Pod,
        address: SocketAddr,
        seen: Seen<'_>,
        generation: u64,
    ) {
        let port = address.port();
        let (protocol, request) = match seen {
            Seen::Flow(proto) => (proto.as_str(), None),
            Seen::Request(method, path) => ("http", Some((method, path))),
        };
        let verdict = if d.allowed { "allow" } else { "deny" };
        self.metrics
            .decisions
            .get_or_create(&DecisionLabels {
                verdict,
                enforced_at: "destination",
            })
            .inc();
        let (method, path) = request.unwrap_or(("", ""));
        let destination_identity = destination.identity().to_string();
        self.audit.record(AuditRecord {
            kind: "policy".into(),
            enforced_at: "destination".into(),
            verdict: verdict.into(),
            source_workload: String::new(),
            source_identity: source.to_string(),
            destination_workload: destination.workload_name(),
            destination_identity: destination_identity.clone(),
            destination_address: address.to_string(),
            port,
            protocol: protocol.into(),
            rule: d.rule.clone(),
            traffic_target: d.target.clone().unwrap_or_default(),
            generation,
            reason: d.reason.clone(),
            method: method.into(),
            path: path.into(),
            ..Default::default()
        });
        tracing::info!(
            target: "audit", kind = "policy", node = %self.node, verdict, enforced_at = "destination",
            source_identity = %source, destination_workload = %destination.workload_name(),
            destination_identity = %destination_identity,
            port, protocol, method, path, rule = %d.rule,
            traffic_target = d.target.as_deref().unwrap_or(""), generation, reason = %d.reason, "policy decision"
        );
    }
}

fn denial(d: Decision) -> Denial {
    Denial {
        rule: d.rule,
        reason: d.reason,
        retry_after: None,
    }
}

impl Authorizer for PolicyAuthorizer {
    fn authorize(
        &self,
        source: &SpiffeId,
        destination: &Pod,
        address: SocketAddr,
        proto: Proto,
    ) -> Result<Admission, Denial> {
        let port = address.port();
        let now = self.in_force.borrow().clone();
        let src = source.identity();
        let dst = destination.identity();
        let d = now.policy.evaluate(now.mode, &src, &dst, port, proto);
        self.recorder.record(
            &d,
            source,
            destination,
            address,
            Seen::Flow(proto),
            now.policy.generation,
        );
        if !d.allowed {
            return Err(denial(d));
        }
        if proto == Proto::Tcp && now.mode == PolicyMode::Enforcing && now.policy.http_restricted(&src, &dst, port) {
            return Ok(Admission::Http(Arc::new(HttpRequests {
                recorder: self.recorder.clone(),
                in_force: now,
                source: source.clone(),
                destination: destination.clone(),
                src,
                dst,
                address,
            })));
        }
        Ok(Admission::Open)
    }
}

/// Checks each HTTP request of one flow against the policy that admitted it.
struct HttpRequests {
    recorder: Arc<Recorder>,
    in_force: Arc<InForce>,
    source: SpiffeId,
    destination: Pod,
    src: Identity,
    dst: Identity,
    address: SocketAddr,
}

impl HttpCheck for HttpRequests {
    fn check(&self, req: &HttpRequest<'_>) -> Result<(), Denial> {
        let p = &self.in_force.policy;
        let d = p.evaluate_http(self.in_force.mode, &self.src, &self.dst, self.address.port(), req);
        self.recorder.record(
            &d,
            &self.source,
            &self.destination,
            self.address,
            Seen::Request(req.method, req.path),
            p.generation,
        );
        if d.allowed { Ok(()) } else { Err(denial(d)) }
    }
}
