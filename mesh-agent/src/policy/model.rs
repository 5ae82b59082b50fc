//! What a compiled policy is: targets with their port and HTTP rules, and
//! the decisions evaluated from them.
use std::{collections::BTreeSet, sync::Arc};

use regex::Regex;

use crate::{
    authz::HttpRequest,
    state::{Identity, PolicyMode},
};

/// Ports a rule covers; `None` is every port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortRule {
    pub route: String,
    pub ports: Option<BTreeSet<u16>>,
}

#[derive(Clone, Debug)]
pub struct HttpMatch {
    pub group: String,
    pub name: String,
    pub methods: Option<BTreeSet<String>>,
    pub path: Option<Regex>,
    pub headers: Vec<(String, Regex)>,
}

impl HttpMatch {
    /// Method, path (anchored at `^`) and every listed header: all must match.
    pub fn matches(&self, req: &HttpRequest<'_>) -> bool {
        let method_ok = self
            .methods
            .as_ref()
            .is_none_or(|ms| ms.contains(&req.method.to_ascii_uppercase()));
        let path_ok = self.path.as_ref().is_none_or(|re| re.is_match(req.path));
        let headers_ok = self.headers.iter().all(|(name, re)| {
            req.headers
                .iter()
                .any(|(h, v)| h.eq_ignore_ascii_case(name) && re.is_match(v))
        });
        method_ok && path_ok && headers_ok
    }
}

#[derive(Clone, Debug)]
pub struct Target {
    /// `namespace/name` of the TrafficTarget.
    pub name: String,
    pub destination: Identity,
    pub sources: Vec<Identity>,
    pub tcp: Vec<PortRule>,
    pub udp: Vec<PortRule>,
    pub http: Vec<HttpMatch>,
}

/// A resource the compiler refused, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    pub kind: &'static str,
    pub name: String,
    pub reason: String,
}

#[derive(Clone, Debug, Default)]
pub struct Policy {
    pub generation: u64,
    pub targets: Vec<Target>,
    pub rejected: Vec<Rejected>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The TrafficTarget that allowed it (`namespace/name`), if one did.
    pub target: Option<String>,
    /// The rule within it (`TCPRoute/name`, ...), or the mode.
    pub rule: String,
    pub reason: String,
}

/// The policy in force and its mode, as the datapath sees it.
#[derive(Clone, Debug)]
pub struct InForce {
    pub policy: Arc<Policy>,
    pub mode: PolicyMode,
}
