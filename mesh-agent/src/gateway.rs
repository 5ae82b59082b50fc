//! Gateway API resource types for a mesh (GAMMA): HTTPRoute and GRPCRoute
//! (`gateway.networking.k8s.io/v1`), TCPRoute and UDPRoute (`v1alpha2`, and
//! `v1` as the Standard channel names them since v1.6) attached to a
//! Service, and the AuthorizationPolicy of GEP-3779
//! (`gateway.networking.x-k8s.io/v1alpha1`).
//!
//! Written here, with kube's `CustomResource` derive like the SMI types,
//! rather than taken from the `gateway-api` crate: its current release is
//! built on kube 4 and k8s-openapi 0.28, where this agent uses kube 5 and
//! k8s-openapi 0.29, and two copies of both would not share a client. Only
//! the fields this mesh implements are declared, so the sources refuse a
//! resource using any other (a timeout or CORS filter the mesh would
//! silently not apply) with the field's path, instead of ignoring it.
use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// `parentRefs[]`: for a mesh, a Service (`group: ""` or `core`,
/// `kind: Service`); a Gateway parent is not this mesh's to serve.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ParentRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
    /// The Service port the route applies to; every port when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// `backendRefs[]`: a Service and one of its ports, with a weight.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BackendRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Default 1, as the API says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<i32>,
    /// Per-backend filters (HTTPRoute only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<HttpFilter>,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub struct HeaderValue {
    pub name: String,
    pub value: String,
}

/// RequestHeaderModifier and ResponseHeaderModifier.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub struct HeaderModifier {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<HeaderValue>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<HeaderValue>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

/// `ReplaceFullPath` or `ReplacePrefixMatch`, for RequestRedirect and URLRewrite.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PathModifier {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_full_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_prefix_match: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RequestRedirect {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// 301 (the default), 302, 303, 307 or 308.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_code: Option<u16>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub struct UrlRewrite {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RequestMirror {
    pub backend_ref: BackendRef,
    /// 0-100; every request when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u8>,
}

/// A route filter: `type` names which of the others is set.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HttpFilter {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_header_modifier: Option<HeaderModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_header_modifier: Option<HeaderModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_redirect: Option<RequestRedirect>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_rewrite: Option<UrlRewrite>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_mirror: Option<RequestMirror>,
}

/// `Exact` (the default) or `RegularExpression` match of a header or query value.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub struct ValueMatch {
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub name: String,
    pub value: String,
}

/// `PathPrefix` (the default, value `/`), `Exact` or `RegularExpression`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub struct PathMatch {
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<ValueMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<ValueMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Absent or empty: one match, path prefix `/` (every request).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<HttpRouteMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<HttpFilter>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backend_refs: Vec<BackendRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<HttpRouteTimeouts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<HttpRouteRetry>,
}

/// `retry` of an HTTPRoute rule (GEP-1731, Experimental channel).
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub struct HttpRouteRetry {
    /// Status codes to retry (400-599).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub codes: Vec<u16>,
    /// Retries after the first attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// A Gateway API duration to wait before each retry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<String>,
}

/// `timeouts` of an HTTPRoute rule (GEP-1742), as Gateway API durations.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteTimeouts {
    /// The whole request, from when the agent has it to the response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    /// One attempt at a backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_request: Option<String>,
}

/// A Gateway API duration (GEP-2257): one to four of a number (up to 5
/// digits) and a unit, `h`, `m`, `s` or `ms`, e.g. `10s`, `1h30m`, `500ms`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("{s:?} is not a Gateway API duration (e.g. 10s, 1h30m, 500ms)");
    let (mut total, mut parts, mut rest) = (std::time::Duration::ZERO, 0, s);
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 5 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (std::time::Duration::from_millis(1), 2)
        } else {
            match rest.bytes().next() {
                Some(b'h') => (std::time::Duration::from_secs(3600), 1),
                Some(b'm') => (std::time::Duration::from_secs(60), 1),
                Some(b's') => (std::time::Duration::from_secs(1), 1),
                _ => return Err(bad()),
            }
        };
        rest = &rest[len..];
        total += unit * n as u32;
        parts += 1;
    }
    if parts == 0 || parts > 4 {
        return Err(bad());
    }
    Ok(total)
}

#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[kube(group = "gateway.networking.k8s.io", version = "v1", kind = "HTTPRoute", namespaced)]
#[serde(rename_all = "camelCase")]
pub struct HTTPRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    /// Not used for mesh routing (GAMMA routes bind to the Service).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<HttpRouteRule>,
}

/// `method`: service and method, `Exact` (default) or `RegularExpression`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub struct GrpcMethodMatch {
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub struct GrpcRouteMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<GrpcMethodMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<ValueMatch>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct GrpcRouteRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<GrpcRouteMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<HttpFilter>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backend_refs: Vec<BackendRef>,
}

#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[kube(group = "gateway.networking.k8s.io", version = "v1", kind = "GRPCRoute", namespaced)]
#[serde(rename_all = "camelCase")]
pub struct GRPCRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<GrpcRouteRule>,
}

/// A TCPRoute or UDPRoute rule: backends only (no matches at L4).
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct L4RouteRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
}

/// TCPRoute and UDPRoute share a shape.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct L4RouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    #[serde(default)]
    pub rules: Vec<L4RouteRule>,
}

/// GEP-3779 `targetRefs[]`: `kind: Pod` with a label `selector` (empty:
/// every pod of the namespace), or a `kind: ServiceAccount` by name.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PolicyTargetRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
}

/// A Kubernetes label selector (`matchLabels` and `matchExpressions`).
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<LabelExpression>,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub struct LabelExpression {
    pub key: String,
    /// In, NotIn, Exists, DoesNotExist.
    pub operator: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub struct ServiceAccountSource {
    /// The policy's namespace when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// `*`: every ServiceAccount of the namespace.
    pub name: String,
}

/// A source: `type: ServiceAccount` with `serviceAccount`, or `type: SPIFFE`
/// with `spiffe` (a SPIFFE ID URI).
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationSource {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<ServiceAccountSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub struct NetworkAttributes {
    /// Every port when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<u16>>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationRule {
    /// Absent: any source; an empty list: no source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sources: Option<Vec<AuthorizationSource>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_attributes: Option<NetworkAttributes>,
}

#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[kube(
    group = "gateway.networking.x-k8s.io",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    namespaced
)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    pub target_refs: Vec<PolicyTargetRef>,
    /// Only `ALLOW` is defined.
    pub action: String,
    #[serde(default)]
    pub rules: Vec<AuthorizationRule>,
    /// Only `Network` (L4: identities and ports) is defined.
    pub enforcement_level: String,
}

/// The API groups and versions the sources read each Gateway API kind in.
pub fn accepts(api_version: &str, kind: &str) -> bool {
    match kind {
        "HTTPRoute" | "GRPCRoute" => api_version == "gateway.networking.k8s.io/v1",
        "TCPRoute" | "UDPRoute" => {
            matches!(
                api_version,
                "gateway.networking.k8s.io/v1alpha2" | "gateway.networking.k8s.io/v1"
            )
        }
        "AuthorizationPolicy" => api_version == "gateway.networking.x-k8s.io/v1alpha1",
        _ => false,
    }
}

/// Whether an apiVersion is one of Gateway API's groups.
pub fn is_gateway_api(api_version: &str) -> bool {
    api_version.starts_with("gateway.networking.k8s.io/") || api_version.starts_with("gateway.networking.x-k8s.io/")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Gateway API's own mesh conformance manifests parse as written.
    #[test]
    fn conformance_manifests_parse() {
        let r: HTTPRouteSpec = serde_yaml::from_str(
            "parentRefs:\n- group: \"\"\n  kind: Service\n  name: echo\n  port: 80\nrules:\n- backendRefs:\n  - name: echo-v1\n    port: 8080\n    weight: 70\n  - name: echo-v2\n    port: 8080\n    weight: 30\n",
        )
        .unwrap();
        assert_eq!(r.rules[0].backend_refs[1].weight, Some(30));
        let r: HTTPRouteSpec = serde_yaml::from_str(
            "parentRefs:\n- {group: \"\", kind: Service, name: echo, port: 80}\nrules:\n- matches:\n  - path: {type: PathPrefix, value: /}\n  - headers:\n    - {name: version, value: one}\n  backendRefs:\n  - {name: echo-v1, port: 8080}\n",
        )
        .unwrap();
        assert_eq!(r.rules[0].matches[1].headers[0].value, "one");
        let g: GRPCRouteSpec = serde_yaml::from_str(
            "parentRefs:\n- {group: \"\", kind: Service, name: echo, port: 7070}\nrules:\n- matches:\n  - method: {service: grpc.Echo, method: Echo}\n  backendRefs:\n  - {name: echo-v1, port: 7070}\n",
        )
        .unwrap();
        assert_eq!(
            g.rules[0].matches[0].method.as_ref().unwrap().method.as_deref(),
            Some("Echo")
        );
        let a: AuthorizationPolicySpec = serde_yaml::from_str(
            "targetRefs:\n- {kind: Pod, selector: {matchLabels: {app: web}}}\naction: ALLOW\nenforcementLevel: Network\nrules:\n- sources:\n  - type: ServiceAccount\n    serviceAccount: {name: client}\n  - {type: SPIFFE, spiffe: \"spiffe://cluster.local/ns/t/sa/other\"}\n  networkAttributes: {ports: [8080]}\n",
        )
        .unwrap();
        assert_eq!(a.rules[0].sources.as_ref().unwrap().len(), 2);
    }
}
