//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`: the only
//! identity shape the mesh issues or accepts (Istio's convention).
use std::{fmt, str::FromStr};

use crate::state::Identity;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpiffeError {
    #[error("{0:?} is not a SPIFFE ID: it must start with spiffe://")]
    Scheme(String),
    #[error("{0:?}: expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")]
    Shape(String),
    #[error("{id:?}: {part} {value:?} is not a valid name (lowercase letters, digits, '-', '.'; no wildcards)")]
    Name {
        id: String,
        part: &'static str,
        value: String,
    },
    #[error("{id}: trust domain {found:?} is not this mesh's ({expected:?})")]
    TrustDomain {
        id: String,
        found: String,
        expected: String,
    },
}

impl SpiffeId {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Result<Self, SpiffeError> {
        format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}").parse()
    }

    /// Parses and checks the trust domain in one step: how every peer and
    /// request identity is read.
    pub fn parse_in(s: &str, trust_domain: &str) -> Result<Self, SpiffeError> {
        let id: SpiffeId = s.parse()?;
        if id.trust_domain != trust_domain {
            return Err(SpiffeError::TrustDomain {
                id: s.into(),
                found: id.trust_domain,
                expected: trust_domain.into(),
            });
        }
        Ok(id)
    }

    /// The SPIFFE form of a workload identity in `trust_domain`.
    pub fn of(trust_domain: &str, identity: &Identity) -> Result<Self, SpiffeError> {
        Self::new(trust_domain, &identity.namespace, &identity.service_account)
    }

    /// The workload identity it names (trust domain aside).
    pub fn identity(&self) -> Identity {
        Identity::new(&self.namespace, &self.service_account)
    }

    pub fn uri(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// DNS-label-like: what Kubernetes allows in namespace and ServiceAccount
/// names (plus '.', which trust domains and ServiceAccounts may contain).
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !s.starts_with(['-', '.'])
        && !s.ends_with(['-', '.'])
}

impl FromStr for SpiffeId {
    type Err = SpiffeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| SpiffeError::Scheme(s.into()))?;
        let parts: Vec<&str> = rest.split('/').collect();
        let [td, "ns", ns, "sa", sa] = parts.as_slice() else {
            return Err(SpiffeError::Shape(s.into()));
        };
        for (part, value) in [("trust domain", td), ("namespace", ns), ("service account", sa)] {
            if !valid_name(value) {
                return Err(SpiffeError::Name {
                    id: s.into(),
                    part,
                    value: (*value).into(),
                });
            }
        }
        Ok(SpiffeId {
            trust_domain: (*td).into(),
            namespace: (*ns).into(),
            service_account: (*sa).into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let id: SpiffeId = "spiffe://cluster.local/ns/demo/sa/web".parse().unwrap();
        assert_eq!(
            (
                id.trust_domain.as_str(),
                id.namespace.as_str(),
                id.service_account.as_str()
            ),
            ("cluster.local", "demo", "web")
        );
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/demo/sa/web");
        assert_eq!(SpiffeId::new("cluster.local", "demo", "web").unwrap(), id);
    }

    #[test]
    fn rejects_everything_else() {
        for bad in [
            "https://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe://cluster.local/ns/*/sa/b",
            "spiffe://cluster.local/ns/a/sa/*",
            "spiffe://*.local/ns/a/sa/b",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe://cluster.local/NS/a/sa/b",
            "spiffe://Cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a/sa/b?x=1",
            "spiffe://user@cluster.local/ns/a/sa/b",
            "spiffe://cluster.local:8443/ns/a/sa/b",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn trust_domain_is_checked_where_it_matters() {
        let err = SpiffeId::parse_in("spiffe://other.org/ns/a/sa/b", "cluster.local").unwrap_err();
        assert!(err.to_string().contains("other.org") && err.to_string().contains("cluster.local"));
        assert!(SpiffeId::parse_in("spiffe://cluster.local/ns/a/sa/b", "cluster.local").is_ok());
    }
}
