//! Per-request routing of one service port, as the agent's L7 path serves
//! it (`tunnel::split`): compiled from an HTTP-matched SMI TrafficSplit
//! (`services`) or from Gateway API HTTPRoutes and GRPCRoutes attached to
//! the Service (`gamma`).
//!
//! A table is a list of rules in precedence order; the first rule with a
//! match the request meets takes it, to one slot of its weighted pool,
//! after its filters. A request no rule takes goes to `otherwise`: the
//! root service's own endpoints for an SMI split (as the SMI spec says),
//! nothing for Gateway API routes (GAMMA: "requests that do not match at
//! least one of the Routes will be rejected", a 404).
use std::{
    net::SocketAddr,
    sync::atomic::{AtomicUsize, Ordering},
};

use regex::Regex;

use crate::{authz::HttpRequest, policy::HttpMatch};

/// One slot of a rule's pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Slot {
    Endpoint(SocketAddr),
    /// A backend that cannot be resolved (no such Service or port, a
    /// reference to another namespace): its share of requests gets a 500,
    /// as Gateway API requires.
    Invalid,
    /// A backend Service without a ready endpoint: its share gets a 503.
    NoEndpoint,
    /// Every endpoint of the pool is ejected by outlier detection (a 503).
    AllEjected,
}

/// Weighted slots (laid out interleaved) and the turns taken through them.
#[derive(Debug, Default)]
pub struct Pool {
    pub slots: Vec<Slot>,
    turn: AtomicUsize,
}

impl Pool {
    pub fn new(slots: Vec<Slot>) -> Pool {
        Pool {
            slots,
            turn: AtomicUsize::new(0),
        }
    }

    /// The next slot in turn; `None` when the pool is empty.
    pub fn next(&self) -> Option<Slot> {
        (!self.slots.is_empty()).then(|| self.slots[self.turn.fetch_add(1, Ordering::Relaxed) % self.slots.len()])
    }

    /// The next slot in turn whose endpoint `usable` takes (outlier
    /// detection); [`Slot::AllEjected`] when it takes none.
    pub fn next_usable(&self, usable: impl Fn(SocketAddr) -> bool) -> Option<Slot> {
        for _ in 0..self.slots.len() {
            match self.next()? {
                Slot::Endpoint(e) if !usable(e) => continue,
                slot => return Some(slot),
            }
        }
        self.next().map(|_| Slot::AllEjected)
    }
}

/// A string match of a Gateway API value.
#[derive(Clone, Debug)]
pub enum ValueMatch {
    Exact(String),
    /// Anchored at both ends.
    Regex(Regex),
}

impl ValueMatch {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            ValueMatch::Exact(v) => v == value,
            ValueMatch::Regex(re) => re.is_match(value),
        }
    }
}

#[derive(Clone, Debug)]
pub enum PathMatch {
    Exact(String),
    /// Element-wise: `/v2` takes `/v2` and `/v2/x`, not `/v2x`.
    Prefix(String),
    Regex(Regex),
}

impl PathMatch {
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(p) => p == path,
            PathMatch::Prefix(p) => {
                let p = p.trim_end_matches('/');
                p.is_empty() || path == p || path.strip_prefix(p).is_some_and(|rest| rest.starts_with('/'))
            }
            PathMatch::Regex(re) => re.is_match(path),
        }
    }
}

/// A Gateway API request match (HTTPRoute's, and GRPCRoute's lowered onto
/// the request path `/service/method`): every part must hold.
#[derive(Clone, Debug, Default)]
pub struct GatewayMatch {
    pub path: Option<PathMatch>,
    pub method: Option<String>,
    /// Lowercase names.
    pub headers: Vec<(String, ValueMatch)>,
    pub query: Vec<(String, ValueMatch)>,
}

impl GatewayMatch {
    pub fn matches(&self, req: &HttpRequest<'_>) -> bool {
        self.path.as_ref().is_none_or(|p| p.matches(req.path))
            && self.method.as_ref().is_none_or(|m| m.eq_ignore_ascii_case(req.method))
            && self.headers.iter().all(|(name, m)| {
                req.headers
                    .iter()
                    .find(|(h, _)| h.eq_ignore_ascii_case(name))
                    .is_some_and(|(_, v)| m.matches(v))
            })
            && self.query.iter().all(|(name, m)| {
                query_pairs(req.query)
                    .find(|(k, _)| k == name)
                    .is_some_and(|(_, v)| m.matches(&v))
            })
    }
}

/// `a=1&b=2`, percent-decoded.
fn query_pairs(query: &str) -> impl Iterator<Item = (String, String)> + '_ {
    query.split('&').filter(|p| !p.is_empty()).map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k), percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = s.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
                continue;
            }
            (b'+', _) => out.push(b' '),
            (b, _) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[derive(Clone, Debug)]
pub enum RequestMatch {
    /// An SMI HTTPRouteGroup match (method, `^`-anchored path regex, header regexes).
    Smi(HttpMatch),
    Gateway(GatewayMatch),
}

impl RequestMatch {
    pub fn matches(&self, req: &HttpRequest<'_>) -> bool {
        match self {
            RequestMatch::Smi(m) => m.matches(req),
            RequestMatch::Gateway(m) => m.matches(req),
        }
    }

    /// How `policy check` names it.
    pub fn describe(&self) -> String {
        match self {
            RequestMatch::Smi(m) => format!("HTTPRouteGroup match {}/{}", m.group, m.name),
            RequestMatch::Gateway(m) => {
                let mut parts = Vec::new();
                match &m.path {
                    Some(PathMatch::Exact(p)) => parts.push(format!("path = {p}")),
                    Some(PathMatch::Prefix(p)) => parts.push(format!("path prefix {p}")),
                    Some(PathMatch::Regex(re)) => parts.push(format!("path ~ {re}")),
                    None => {}
                }
                if let Some(method) = &m.method {
                    parts.push(format!("method {method}"));
                }
                for (h, _) in &m.headers {
                    parts.push(format!("header {h}"));
                }
                for (q, _) in &m.query {
                    parts.push(format!("query {q}"));
                }
                if parts.is_empty() {
                    "every request".into()
                } else {
                    parts.join(", ")
                }
            }
        }
    }
}

/// Header edits of RequestHeaderModifier / ResponseHeaderModifier, in the
/// API's order: set (replace), add (append), remove.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderEdits {
    pub set: Vec<(String, String)>,
    pub add: Vec<(String, String)>,
    pub remove: Vec<String>,
}

impl HeaderEdits {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }

    pub fn apply(&self, headers: &mut http::HeaderMap) {
        use http::header::{HeaderName, HeaderValue};
        for (name, value) in &self.set {
            if let (Ok(n), Ok(v)) = (
                HeaderName::try_from(name.as_str()),
                HeaderValue::try_from(value.as_str()),
            ) {
                headers.insert(n, v);
            }
        }
        for (name, value) in &self.add {
            if let (Ok(n), Ok(v)) = (
                HeaderName::try_from(name.as_str()),
                HeaderValue::try_from(value.as_str()),
            ) {
                headers.append(n, v);
            }
        }
        for name in &self.remove {
            headers.remove(name.as_str());
        }
    }
}

/// How a path is rewritten or redirected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathEdit {
    Full(String),
    /// The matched prefix (the rule's `PathPrefix`) replaced by this.
    Prefix {
        matched: String,
        with: String,
    },
}

impl PathEdit {
    pub fn apply(&self, path: &str) -> String {
        match self {
            PathEdit::Full(p) => p.clone(),
            PathEdit::Prefix { matched, with } => {
                let rest = path.strip_prefix(matched.trim_end_matches('/')).unwrap_or("");
                let with = with.trim_end_matches('/');
                match (with.is_empty(), rest.is_empty()) {
                    (true, true) => "/".into(),
                    (true, false) => rest.to_string(),
                    (false, _) => format!("{with}{rest}"),
                }
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<PathEdit>,
    pub port: Option<u16>,
    pub status: u16,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filters {
    pub request_headers: HeaderEdits,
    pub response_headers: HeaderEdits,
    /// Answered by the agent; the request goes nowhere.
    pub redirect: Option<Redirect>,
    pub rewrite_host: Option<String>,
    pub rewrite_path: Option<PathEdit>,
    /// Not filters in Gateway API, but applied with them.
    pub timeouts: Timeouts,
    pub retry: Option<Retry>,
}

/// The largest request body kept for retries (a larger one, or one of
/// unknown length, is sent once).
pub const RETRY_BODY_LIMIT: u64 = 64 * 1024;

/// An HTTPRoute rule's `retry` (GEP-1731).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Retry {
    /// Responses retried (a connect failure always is).
    pub codes: Vec<u16>,
    /// Retries after the first attempt.
    pub attempts: u32,
    /// The wait before each retry.
    pub backoff: std::time::Duration,
}

/// An HTTPRoute rule's `timeouts`; None: no limit. With one attempt per
/// request, the shorter of the two bounds it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timeouts {
    pub request: Option<std::time::Duration>,
    pub backend_request: Option<std::time::Duration>,
}

impl Timeouts {
    /// The limit on one request's single attempt, and which setting it is.
    pub fn limit(&self) -> Option<(std::time::Duration, &'static str)> {
        match (self.request, self.backend_request) {
            (Some(r), Some(b)) if b < r => Some((b, "backendRequest")),
            (Some(r), _) => Some((r, "request")),
            (None, Some(b)) => Some((b, "backendRequest")),
            (None, None) => None,
        }
    }
}

#[derive(Debug)]
pub struct Rule {
    /// `HTTPRoute t/name rule 0`, `TrafficSplit t/name`: audit and `policy check`.
    pub name: String,
    /// Any one takes the request (empty: none does).
    pub matches: Vec<RequestMatch>,
    pub pool: Pool,
    pub filters: Filters,
    /// RequestMirror: a copy of each request (of `percent` of them) goes
    /// to this pool, and its answer is dropped.
    pub mirror: Option<Mirror>,
}

#[derive(Debug)]
pub struct Mirror {
    /// `namespace/name:port` of the mirror's Service.
    pub service: String,
    pub pool: Pool,
    /// 0-100.
    pub percent: u8,
}

/// One service port's routing.
#[derive(Debug)]
pub struct HttpRoutes {
    /// The resources it comes from (`t/ab-test`, `HTTPRoute t/x`): the
    /// `traffic_split` label of `mesh_split_requests_total`.
    pub source: String,
    /// The root service port, `namespace/name:port`.
    pub service: String,
    /// In precedence order.
    pub rules: Vec<Rule>,
    /// For requests no rule takes: `None` rejects them (404).
    pub otherwise: Option<Pool>,
    /// The Service port's TrafficPolicy settings for this node's clients.
    pub resilience: Option<std::sync::Arc<crate::resilience::ClientPolicy>>,
}

/// Where one request goes.
#[derive(Debug)]
pub enum Way<'a> {
    /// A rule took it: its slot (`None`: the rule has no backends) and filters.
    Rule(&'a Rule, Option<Slot>),
    /// No rule did: the root's own endpoints (SMI).
    Otherwise(Option<Slot>),
    /// No rule did, and nothing else serves it (Gateway API).
    NoRoute,
}

impl HttpRoutes {
    /// Where `req` goes; an endpoint ejected by outlier detection is
    /// passed over (a due probe is claimed by this request).
    pub fn route(&self, req: &HttpRequest<'_>) -> Way<'_> {
        let pick = |pool: &Pool| match &self.resilience {
            Some(r) => pool.next_usable(|e| r.usable(e)),
            None => pool.next(),
        };
        match self.rules.iter().find(|r| r.matches.iter().any(|m| m.matches(req))) {
            Some(rule) => {
                let slot = if rule.filters.redirect.is_some() {
                    None
                } else {
                    pick(&rule.pool)
                };
                Way::Rule(rule, slot)
            }
            None => match &self.otherwise {
                Some(pool) => Way::Otherwise(pick(pool)),
                None => Way::NoRoute,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_match_whole_path_elements_and_query_values_decode() {
        let p = PathMatch::Prefix("/v2".into());
        assert!(p.matches("/v2") && p.matches("/v2/x") && !p.matches("/v2x") && !p.matches("/"));
        assert!(PathMatch::Prefix("/".into()).matches("/anything"));
        assert!(PathMatch::Prefix("/v2/".into()).matches("/v2"));
        let m = GatewayMatch {
            query: vec![("animal".into(), ValueMatch::Exact("whale fish".into()))],
            ..Default::default()
        };
        let req = |query| HttpRequest {
            method: "GET",
            path: "/",
            query,
            headers: &[],
        };
        assert!(m.matches(&req("a=1&animal=whale%20fish")));
        assert!(m.matches(&req("animal=whale+fish")));
        assert!(!m.matches(&req("animal=dolphin")));
        assert_eq!(percent_decode("100%"), "100%");
    }

    #[test]
    fn prefix_rewrites_replace_only_the_matched_prefix() {
        let e = PathEdit::Prefix {
            matched: "/prefix/one".into(),
            with: "/one".into(),
        };
        assert_eq!(e.apply("/prefix/one/two"), "/one/two");
        assert_eq!(e.apply("/prefix/one"), "/one");
        let e = PathEdit::Prefix {
            matched: "/strip-prefix".into(),
            with: "/".into(),
        };
        assert_eq!(e.apply("/strip-prefix/three"), "/three");
        assert_eq!(e.apply("/strip-prefix"), "/");
    }
}
