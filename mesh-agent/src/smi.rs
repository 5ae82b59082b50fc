//! SMI resource types, with kube's `CustomResource` derive: the CRDs in
//! `deploy/crds/` are generated from these (`cargo xtask gen-crds`), and a
//! test fails when they drift. Field names and shapes follow the SMI spec:
//! access.smi-spec.io/v1alpha3, specs.smi-spec.io/v1alpha4,
//! split.smi-spec.io/v1alpha4.
use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A subject of a TrafficTarget: today always a ServiceAccount.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub struct IdentityBindingSubject {
    pub kind: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// A reference to a traffic spec (TCPRoute, UDPRoute, HTTPRouteGroup).
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub struct TrafficTargetRule {
    pub kind: String,
    pub name: String,
    /// HTTPRouteGroup match names; all of the group's matches when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matches: Option<Vec<String>>,
}

#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[kube(
    group = "access.smi-spec.io",
    version = "v1alpha3",
    kind = "TrafficTarget",
    namespaced
)]
pub struct TrafficTargetSpec {
    pub destination: IdentityBindingSubject,
    #[serde(default)]
    pub rules: Vec<TrafficTargetRule>,
    #[serde(default)]
    pub sources: Vec<IdentityBindingSubject>,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HttpMatch {
    pub name: String,
    /// Anchored at `^` when matched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_regex: Option<String>,
    /// Methods, or `*` for all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub methods: Option<Vec<String>>,
    /// Header name -> regex; all must match (AND).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<BTreeMap<String, String>>,
}

#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[kube(
    group = "specs.smi-spec.io",
    version = "v1alpha4",
    kind = "HTTPRouteGroup",
    namespaced
)]
pub struct HTTPRouteGroupSpec {
    #[serde(default)]
    pub matches: Vec<HttpMatch>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub struct PortMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Empty or absent: every port.
    #[serde(default)]
    pub ports: Vec<u16>,
}

#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[kube(group = "specs.smi-spec.io", version = "v1alpha4", kind = "TCPRoute", namespaced)]
pub struct TCPRouteSpec {
    #[serde(default)]
    pub matches: PortMatch,
}

#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[kube(group = "specs.smi-spec.io", version = "v1alpha4", kind = "UDPRoute", namespaced)]
pub struct UDPRouteSpec {
    #[serde(default)]
    pub matches: PortMatch,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub struct TrafficSplitBackend {
    pub service: String,
    pub weight: i64,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub struct TypedLocalObjectReference {
    pub kind: String,
    pub name: String,
}

#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[kube(group = "split.smi-spec.io", version = "v1alpha4", kind = "TrafficSplit", namespaced)]
pub struct TrafficSplitSpec {
    pub service: String,
    #[serde(default)]
    pub backends: Vec<TrafficSplitBackend>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matches: Option<Vec<TypedLocalObjectReference>>,
}

/// Every CRD this mesh ships, as YAML documents, in a stable order: the SMI
/// kinds, the mesh's own TrafficPolicy, and GEP-3779's AuthorizationPolicy, which Gateway API does not
/// publish a CRD for yet (the route kinds come with Gateway API's own
/// install).
pub fn crds() -> Vec<(&'static str, String)> {
    use kube::CustomResourceExt as _;
    let yaml = |crd: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition| {
        serde_yaml::to_string(&crd).expect("CRDs serialize")
    };
    vec![
        ("traffictargets.access.smi-spec.io.yaml", yaml(TrafficTarget::crd())),
        ("httproutegroups.specs.smi-spec.io.yaml", yaml(HTTPRouteGroup::crd())),
        ("tcproutes.specs.smi-spec.io.yaml", yaml(TCPRoute::crd())),
        ("udproutes.specs.smi-spec.io.yaml", yaml(UDPRoute::crd())),
        ("trafficsplits.split.smi-spec.io.yaml", yaml(TrafficSplit::crd())),
        (
            "authorizationpolicies.gateway.networking.x-k8s.io.yaml",
            yaml(crate::gateway::AuthorizationPolicy::crd()),
        ),
        (
            "trafficpolicies.mesh.dev.yaml",
            yaml(crate::traffic_policy::TrafficPolicy::crd()),
        ),
    ]
}

/// The API group and version of an SMI kind: the SMI spec's own examples
/// omit `apiVersion`, and they must parse as written.
pub fn default_api_version(kind: &str) -> Option<&'static str> {
    Some(match kind {
        "TrafficTarget" => "access.smi-spec.io/v1alpha3",
        "HTTPRouteGroup" | "TCPRoute" | "UDPRoute" => "specs.smi-spec.io/v1alpha4",
        "TrafficSplit" => "split.smi-spec.io/v1alpha4",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fails when deploy/crds/ and these types drift apart; regenerate
    /// with `cargo xtask gen-crds`.
    #[test]
    fn deploy_crds_match_the_types() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds");
        for (file, want) in crds() {
            let have = std::fs::read_to_string(dir.join(file))
                .unwrap_or_else(|e| panic!("deploy/crds/{file}: {e}; run `cargo xtask gen-crds`"));
            assert_eq!(
                have, want,
                "deploy/crds/{file} drifted from mesh-agent/src/smi.rs; run `cargo xtask gen-crds`"
            );
        }
    }

    #[test]
    fn spec_examples_parse_as_written() {
        // From the SMI spec (traffic-access v1alpha3, traffic-specs v1alpha4).
        let tt: TrafficTargetSpec = serde_yaml::from_str(
            "destination: {kind: ServiceAccount, name: service-a, namespace: default}\nrules:\n- kind: TCPRoute\n  name: the-routes\n- kind: HTTPRouteGroup\n  name: the-routes\n  matches:\n  - metrics\nsources:\n- kind: ServiceAccount\n  name: prometheus\n  namespace: default\n",
        )
        .unwrap();
        assert_eq!(tt.rules[1].matches.as_deref(), Some(&["metrics".to_string()][..]));
        let g: HTTPRouteGroupSpec = serde_yaml::from_str(
            "matches:\n- name: iphone-users\n  pathRegex: \"/api/.*\"\n  methods:\n  - GET\n  - HEAD\n  headers:\n    user-agent: \".*iPhone.*\"\n",
        )
        .unwrap();
        assert_eq!(g.matches[0].headers.as_ref().unwrap()["user-agent"], ".*iPhone.*");
        let t: TCPRouteSpec = serde_yaml::from_str("matches:\n  ports:\n  - 3306\n  - 6446\n").unwrap();
        assert_eq!(t.matches.ports, [3306, 6446]);
        let t: TCPRouteSpec = serde_yaml::from_str("matches:\n  ports: []\n").unwrap();
        assert!(t.matches.ports.is_empty());
        let u: UDPRouteSpec = serde_yaml::from_str("matches:\n  ports:\n  - 989\n  - 990\n").unwrap();
        assert_eq!(u.matches.ports, [989, 990]);
        let s: TrafficSplitSpec = serde_yaml::from_str(
            "service: website\nmatches:\n- kind: HTTPRouteGroup\n  name: ab-test\nbackends:\n- service: website-v1\n  weight: 0\n- service: website-v2\n  weight: 100\n",
        )
        .unwrap();
        assert_eq!(s.backends[1].weight, 100);
        assert!(
            serde_yaml::from_str::<TCPRouteSpec>("matches:\n  ports: [70000]\n").is_err(),
            "port out of range"
        );
    }
}
