//! The mesh's own TrafficPolicy (`mesh.dev/v1alpha1`): the resilience
//! settings Gateway API has no field for, attached to a Service
//! (`targetRef`, as Gateway API's policy attachment, GEP-713):
//!
//! - `outlierDetection`: an endpoint with `consecutiveFailures` failures in
//!   a row (a failed connect or a 5xx) is ejected for `baseEjectionTime`,
//!   doubled each time it is ejected again up to `maxEjectionTime`, then
//!   probed with one request (Linkerd's failure accrual, Envoy's outlier
//!   detection);
//! - `connectionLimits`: `maxPendingRequests` (requests in flight to the
//!   Service from this node) and `maxConnections` (connections the agent
//!   holds to its endpoints); past either, requests get a 503 at once;
//! - `rateLimit`: token buckets, `total` and per client `identity`,
//!   enforced on the destination's node (`429` with `Retry-After`);
//! - `faultInjection`: `delay` and `abort` of a percentage of requests.
//!
//! Outlier detection, limits and faults apply on the client's node, like
//! Gateway API's timeouts and retries. The types are written like the SMI
//! ones (kube's `CustomResource` derive; `mesh-agent crds` writes the CRD);
//! [`TrafficPolicySpec::settings`] validates one into [`Settings`].
use std::time::Duration;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::gateway::parse_duration;

#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[kube(group = "mesh.dev", version = "v1alpha1", kind = "TrafficPolicy", namespaced)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicySpec {
    /// The Service (`group: ""`, `kind: Service`) in the policy's namespace.
    pub target_ref: TargetRef,
    /// The Service ports it covers; every TCP port when absent. The agent
    /// serves HTTP on them, so list only ports that speak HTTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<u16>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetectionSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_limits: Option<ConnectionLimitsSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault_injection: Option<FaultInjectionSpec>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TargetRef {
    #[serde(default)]
    pub group: String,
    pub kind: String,
    pub name: String,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetectionSpec {
    /// Default 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_failures: Option<u32>,
    /// A Gateway API duration; default 10s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection_time: Option<String>,
    /// Default 300s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_time: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionLimitsSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitSpec {
    /// One bucket for every client together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<RateSpec>,
    /// One bucket per client identity (SPIFFE ID).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<RateSpec>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RateSpec {
    pub requests_per_second: u32,
    /// Requests let through at once after a quiet spell; default a tenth
    /// of a second's worth (at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct FaultInjectionSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<DelaySpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<AbortSpec>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DelaySpec {
    /// 0-100.
    pub percent: u32,
    /// A Gateway API duration.
    pub fixed_delay: String,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AbortSpec {
    /// 0-100.
    pub percent: u32,
    /// 400-599.
    pub http_status: u16,
}

/// A validated TrafficPolicy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    pub outlier: Option<Outlier>,
    pub max_pending_requests: Option<u32>,
    pub max_connections: Option<u32>,
    pub rate_total: Option<Rate>,
    pub rate_identity: Option<Rate>,
    /// Percent, delay.
    pub delay: Option<(u32, Duration)>,
    /// Percent, status.
    pub abort: Option<(u32, u16)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outlier {
    pub consecutive_failures: u32,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub per_second: u32,
    pub burst: u32,
}

impl Settings {
    /// Whether anything applies on the client's node.
    pub fn client_side(&self) -> bool {
        self.outlier.is_some()
            || self.max_pending_requests.is_some()
            || self.max_connections.is_some()
            || self.delay.is_some()
            || self.abort.is_some()
    }

    pub fn rate_limited(&self) -> bool {
        self.rate_total.is_some() || self.rate_identity.is_some()
    }

    /// One line per setting, for `policy check` and the config dump.
    pub fn describe(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(o) = &self.outlier {
            out.push(format!(
                "outlier detection: an endpoint with {} failures in a row (connect failure or 5xx) is ejected for {:?}, doubling up to {:?}, then probed with one request",
                o.consecutive_failures, o.base_ejection, o.max_ejection
            ));
        }
        if let Some(n) = self.max_pending_requests {
            out.push(format!("at most {n} requests in flight from this node; more get a 503"));
        }
        if let Some(n) = self.max_connections {
            out.push(format!(
                "at most {n} connections from this node's agent to the endpoints; a request needing more gets a 503"
            ));
        }
        let rate = |r: &Rate| format!("{} requests/s (burst {})", r.per_second, r.burst);
        if let Some(r) = &self.rate_total {
            out.push(format!(
                "rate limit {} for all clients together, on each endpoint's node (429 with Retry-After)",
                rate(r)
            ));
        }
        if let Some(r) = &self.rate_identity {
            out.push(format!(
                "rate limit {} per client identity, on each endpoint's node (429 with Retry-After)",
                rate(r)
            ));
        }
        if let Some((p, d)) = self.delay {
            out.push(format!("fault injection: {p}% of requests delayed by {d:?}"));
        }
        if let Some((p, s)) = self.abort {
            out.push(format!("fault injection: {p}% of requests answered {s} by the agent"));
        }
        out
    }
}

impl TrafficPolicySpec {
    /// The settings, or why the policy is refused.
    pub fn settings(&self) -> Result<Settings, String> {
        let t = &self.target_ref;
        if !(t.group.is_empty() || t.group == "core") || t.kind != "Service" {
            return Err(format!(
                "targetRef must be a Service (group \"\", kind Service), not {}/{}",
                t.group, t.kind
            ));
        }
        let duration = |field: &str, v: &Option<String>, default: Duration| -> Result<Duration, String> {
            match v {
                None => Ok(default),
                Some(s) => {
                    let d = parse_duration(s).map_err(|e| format!("{field}: {e}"))?;
                    if d.is_zero() {
                        return Err(format!("{field} must be longer than 0s"));
                    }
                    Ok(d)
                }
            }
        };
        let outlier = match &self.outlier_detection {
            None => None,
            Some(o) => {
                let consecutive_failures = o.consecutive_failures.unwrap_or(5);
                if consecutive_failures == 0 {
                    return Err("outlierDetection.consecutiveFailures must be at least 1".into());
                }
                let base = duration(
                    "outlierDetection.baseEjectionTime",
                    &o.base_ejection_time,
                    Duration::from_secs(10),
                )?;
                let max = duration(
                    "outlierDetection.maxEjectionTime",
                    &o.max_ejection_time,
                    Duration::from_secs(300).max(base),
                )?;
                if max < base {
                    return Err(format!(
                        "outlierDetection.maxEjectionTime ({max:?}) is shorter than baseEjectionTime ({base:?})"
                    ));
                }
                Some(Outlier {
                    consecutive_failures,
                    base_ejection: base,
                    max_ejection: max,
                })
            }
        };
        let limits = self.connection_limits.clone().unwrap_or_default();
        for (field, v) in [
            ("maxPendingRequests", limits.max_pending_requests),
            ("maxConnections", limits.max_connections),
        ] {
            if v == Some(0) {
                return Err(format!("connectionLimits.{field} must be at least 1"));
            }
        }
        let rate = |field: &str, r: &Option<RateSpec>| -> Result<Option<Rate>, String> {
            let Some(r) = r else { return Ok(None) };
            if r.requests_per_second == 0 {
                return Err(format!("rateLimit.{field}.requestsPerSecond must be at least 1"));
            }
            let burst = r.burst.unwrap_or((r.requests_per_second / 10).max(1));
            if burst == 0 {
                return Err(format!("rateLimit.{field}.burst must be at least 1"));
            }
            Ok(Some(Rate {
                per_second: r.requests_per_second,
                burst,
            }))
        };
        let rl = self.rate_limit.clone().unwrap_or_default();
        let faults = self.fault_injection.clone().unwrap_or_default();
        let percent = |field: &str, p: u32| -> Result<u32, String> {
            if p > 100 {
                return Err(format!("faultInjection.{field}.percent must be 0-100, not {p}"));
            }
            Ok(p)
        };
        let delay = match &faults.delay {
            None => None,
            Some(d) => Some((
                percent("delay", d.percent)?,
                parse_duration(&d.fixed_delay).map_err(|e| format!("faultInjection.delay.fixedDelay: {e}"))?,
            )),
        };
        let abort = match &faults.abort {
            None => None,
            Some(a) => {
                if !(400..=599).contains(&a.http_status) {
                    return Err(format!(
                        "faultInjection.abort.httpStatus must be 400-599, not {}",
                        a.http_status
                    ));
                }
                Some((percent("abort", a.percent)?, a.http_status))
            }
        };
        let settings = Settings {
            outlier,
            max_pending_requests: limits.max_pending_requests,
            max_connections: limits.max_connections,
            rate_total: rate("total", &rl.total)?,
            rate_identity: rate("identity", &rl.identity)?,
            delay,
            abort,
        };
        if !settings.client_side() && !settings.rate_limited() {
            return Err("sets nothing: give outlierDetection, connectionLimits, rateLimit or faultInjection".into());
        }
        Ok(settings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<Settings, String> {
        let spec: TrafficPolicySpec =
            crate::source::strict_spec(serde_yaml::Deserializer::from_str(yaml), "TrafficPolicy", "t/x")?;
        spec.settings()
    }

    #[test]
    fn a_traffic_policy_validates_into_settings_with_defaults() {
        let s = parse(
            "targetRef: {group: \"\", kind: Service, name: web}\noutlierDetection: {consecutiveFailures: 3, baseEjectionTime: 1s}\n\
             rateLimit: {identity: {requestsPerSecond: 100}}\nfaultInjection:\n  delay: {percent: 20, fixedDelay: 100ms}\n  abort: {percent: 10, httpStatus: 503}\n",
        )
        .unwrap();
        let o = s.outlier.unwrap();
        assert_eq!(
            (o.consecutive_failures, o.base_ejection, o.max_ejection),
            (3, Duration::from_secs(1), Duration::from_secs(300))
        );
        assert_eq!(
            s.rate_identity,
            Some(Rate {
                per_second: 100,
                burst: 10
            })
        );
        assert_eq!(s.delay, Some((20, Duration::from_millis(100))));
        assert_eq!(s.abort, Some((10, 503)));
        for (bad, why) in [
            (
                "targetRef: {kind: Pod, name: web}\nrateLimit: {total: {requestsPerSecond: 1}}\n",
                "must be a Service",
            ),
            ("targetRef: {kind: Service, name: web}\n", "sets nothing"),
            (
                "targetRef: {kind: Service, name: web}\nfaultInjection: {abort: {percent: 101, httpStatus: 503}}\n",
                "0-100",
            ),
            (
                "targetRef: {kind: Service, name: web}\nfaultInjection: {abort: {percent: 1, httpStatus: 200}}\n",
                "400-599",
            ),
            (
                "targetRef: {kind: Service, name: web}\noutlierDetection: {baseEjectionTime: 1.5s}\n",
                "not a Gateway API duration",
            ),
            (
                "targetRef: {kind: Service, name: web}\noutlierDetection: {baseEjectionTime: 10s, maxEjectionTime: 1s}\n",
                "shorter",
            ),
            (
                "targetRef: {kind: Service, name: web}\nrateLimit: {identity: {requestsPerSecond: 0}}\n",
                "at least 1",
            ),
            (
                "targetRef: {kind: Service, name: web}\nretries: 3\n",
                "unknown field spec.retries",
            ),
        ] {
            let err = parse(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }
}
