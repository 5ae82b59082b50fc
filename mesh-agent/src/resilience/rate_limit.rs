//! Local rate limits of a TrafficPolicy, on the destination's node: GCRA
//! token buckets (the governor crate), one for all clients together and
//! one per client identity, checked for each request to an endpoint pod
//! after policy allowed it. A refused request gets a 429 with
//! `Retry-After` and never reaches the pod.
use std::{
    num::NonZeroU32,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, clock::Clock as _};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
};

use crate::{
    authz::{Admission, Authorizer, Denial, HttpCheck, HttpRequest, Proto},
    identity::SpiffeId,
    state::Pod,
    traffic_policy::{Rate, Settings},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitedLabels {
    /// `TrafficPolicy ns/name on ns/svc:port`.
    pub policy: String,
    /// The client's SPIFFE ID.
    pub source: String,
}

/// Requests refused by rate limits (`mesh_rate_limited_requests_total`).
pub type LimitedMetric = Family<LimitedLabels, Counter>;

/// The policy's authorizer with the rate limits of the endpoint added:
/// a flow to a rate-limited endpoint is served request by request.
pub struct LimitingAuthorizer {
    pub inner: Arc<dyn Authorizer>,
    pub in_force: tokio::sync::watch::Receiver<Arc<super::InForce>>,
    pub metric: LimitedMetric,
}

impl Authorizer for LimitingAuthorizer {
    fn authorize(
        &self,
        source: &SpiffeId,
        destination: &Pod,
        address: std::net::SocketAddr,
        proto: Proto,
    ) -> Result<Admission, Denial> {
        let admission = self.inner.authorize(source, destination, address, proto)?;
        let limits = match proto {
            Proto::Tcp => self.in_force.borrow().by_endpoint.get(&address).cloned(),
            Proto::Udp => None,
        };
        let Some(limits) = limits else {
            return Ok(admission);
        };
        Ok(Admission::Http(Arc::new(Limited {
            policy: match admission {
                Admission::Open => None,
                Admission::Http(check) => Some(check),
            },
            limits,
            source: source.to_string(),
            metric: Some(self.metric.clone()),
        })))
    }
}

pub struct RateLimiter {
    /// `TrafficPolicy ns/name`.
    pub policy: String,
    /// `TrafficPolicy ns/name on ns/svc:port`.
    pub name: String,
    pub settings: Settings,
    total: Option<DefaultDirectRateLimiter>,
    identity: Option<DefaultKeyedRateLimiter<String>>,
    /// Requests refused, for status.
    pub rejected: AtomicU64,
    checks: AtomicU64,
}

fn quota(r: &Rate) -> Quota {
    let n = |v: u32| NonZeroU32::new(v.max(1)).expect("at least 1");
    Quota::per_second(n(r.per_second)).allow_burst(n(r.burst))
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl RateLimiter {
    pub fn new(policy: String, name: String, settings: &Settings) -> RateLimiter {
        RateLimiter {
            policy,
            name,
            settings: settings.clone(),
            total: settings
                .rate_total
                .as_ref()
                .map(|r| DefaultDirectRateLimiter::direct(quota(r))),
            identity: settings
                .rate_identity
                .as_ref()
                .map(|r| DefaultKeyedRateLimiter::keyed(quota(r))),
            rejected: AtomicU64::new(0),
            checks: AtomicU64::new(0),
        }
    }

    /// Takes a token for one request of `source`, or says how long until
    /// one is there.
    pub fn admit(&self, source: &str) -> Result<(), (Duration, &'static str)> {
        // Identities that went quiet are forgotten now and then.
        if self.checks.fetch_add(1, Ordering::Relaxed) % 4096 == 4095
            && let Some(l) = &self.identity
        {
            l.retain_recent();
        }
        if let Some(l) = &self.identity
            && let Err(not_until) = l.check_key(&source.to_string())
        {
            self.rejected.fetch_add(1, Ordering::Relaxed);
            return Err((not_until.wait_time_from(l.clock().now()), "identity"));
        }
        if let Some(l) = &self.total
            && let Err(not_until) = l.check()
        {
            self.rejected.fetch_add(1, Ordering::Relaxed);
            return Err((not_until.wait_time_from(l.clock().now()), "total"));
        }
        Ok(())
    }
}

/// The destination side's check of one flow's requests: the policy's (if
/// HTTP rules apply), then each rate limit of the endpoint.
pub struct Limited {
    pub policy: Option<Arc<dyn HttpCheck>>,
    pub limits: Vec<Arc<RateLimiter>>,
    /// The client's SPIFFE ID.
    pub source: String,
    pub metric: Option<LimitedMetric>,
}

impl HttpCheck for Limited {
    fn check(&self, request: &HttpRequest<'_>) -> Result<(), Denial> {
        if let Some(p) = &self.policy {
            p.check(request)?;
        }
        for l in &self.limits {
            if let Err((wait, which)) = l.admit(&self.source) {
                let rate = match which {
                    "identity" => l.settings.rate_identity,
                    _ => l.settings.rate_total,
                }
                .map_or(0, |r| r.per_second);
                if let Some(m) = &self.metric {
                    m.get_or_create(&LimitedLabels {
                        policy: l.name.clone(),
                        source: self.source.clone(),
                    })
                    .inc();
                }
                tracing::debug!(policy = %l.name, source = %self.source, bucket = which, retry_after = ?wait, "request refused by a rate limit");
                let whose = if which == "identity" {
                    format!("for {}", self.source)
                } else {
                    "for all clients".into()
                };
                return Err(Denial {
                    rule: l.name.clone(),
                    reason: format!("rate limit of {rate} requests/s {whose} exceeded ({})", l.name),
                    retry_after: Some(wait),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_identity_has_its_own_bucket_and_the_refusal_says_when_to_retry() {
        let settings = Settings {
            rate_identity: Some(Rate {
                per_second: 10,
                burst: 2,
            }),
            ..Default::default()
        };
        let l = RateLimiter::new(
            "TrafficPolicy t/x".into(),
            "TrafficPolicy t/x on t/web:80".into(),
            &settings,
        );
        assert!(l.admit("a").is_ok() && l.admit("a").is_ok());
        let (wait, which) = l.admit("a").unwrap_err();
        assert_eq!(which, "identity");
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(100), "{wait:?}");
        assert!(l.admit("b").is_ok(), "another identity is unaffected");
        assert_eq!(l.rejected.load(Ordering::Relaxed), 1);
    }
}
