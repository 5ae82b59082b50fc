//! The compiler, evaluator and lowering, tested through the file source's
//! reader on SMI YAML.
use super::*;
use crate::{
    authz::{HttpRequest, Proto},
    state::{Identity, PolicyMode, SmiSet},
};

fn smi(yaml: &str) -> SmiSet {
    let dir = std::env::temp_dir().join(format!(
        "mesh-policy-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("p.yaml"), yaml).unwrap();
    let s = crate::source::file::load(&dir).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    s.smi
}

fn id(sa: &str) -> Identity {
    Identity {
        namespace: "shop".into(),
        service_account: sa.into(),
    }
}

const POLICY: &str = "
kind: TCPRoute
metadata: {name: web-port, namespace: shop}
spec: {matches: {ports: [8080]}}
---
kind: TCPRoute
metadata: {name: all-ports, namespace: shop}
spec: {matches: {ports: []}}
---
kind: TrafficTarget
metadata: {name: front-to-web, namespace: shop}
spec:
  destination: {kind: ServiceAccount, name: web}
  rules: [{kind: TCPRoute, name: web-port}]
  sources: [{kind: ServiceAccount, name: front}]
---
kind: TrafficTarget
metadata: {name: web-to-db, namespace: shop}
spec:
  destination: {kind: ServiceAccount, name: db, namespace: shop}
  rules: [{kind: TCPRoute, name: all-ports}]
  sources: [{kind: ServiceAccount, name: web, namespace: shop}]
";

#[test]
fn targets_are_additive_allows_and_everything_else_is_denied() {
    let p = Policy::compile(&smi(POLICY), 1);
    assert!(p.rejected.is_empty(), "{:?}", p.rejected);
    let d = p.evaluate(PolicyMode::Enforcing, &id("front"), &id("web"), 8080, Proto::Tcp);
    assert!(d.allowed);
    assert_eq!(
        (d.target.as_deref(), d.rule.as_str()),
        (Some("shop/front-to-web"), "TCPRoute/web-port")
    );
    assert!(
        !p.evaluate(PolicyMode::Enforcing, &id("front"), &id("web"), 9090, Proto::Tcp)
            .allowed
    );
    assert!(
        !p.evaluate(PolicyMode::Enforcing, &id("front"), &id("db"), 5432, Proto::Tcp)
            .allowed
    );
    assert!(
        p.evaluate(PolicyMode::Enforcing, &id("web"), &id("db"), 5432, Proto::Tcp)
            .allowed
    );
    assert!(
        !p.evaluate(PolicyMode::Enforcing, &id("web"), &id("db"), 5432, Proto::Udp)
            .allowed
    );
    let d = p.evaluate(PolicyMode::Permissive, &id("front"), &id("db"), 5432, Proto::Tcp);
    assert!(d.allowed && d.rule == "permissive");
    // Kernel rules: an exact port, and ANY_PORT for the all-ports route.
    let rules = p.kernel_rules();
    assert!(
        rules
            .iter()
            .any(|r| r.port == 8080 && r.proto == mesh_common::PROTO_TCP && r.flags == 0)
    );
    assert!(rules.iter().any(|r| r.port == mesh_common::ANY_PORT));
    assert_eq!(rules.len(), 2);
}

#[test]
fn http_rules_match_method_anchored_path_and_headers() {
    let yaml = "
kind: HTTPRouteGroup
metadata: {name: api, namespace: shop}
spec:
  matches:
  - {name: read-api, pathRegex: \"/api/.*\", methods: [GET]}
  - {name: debug, pathRegex: \"/debug\", methods: [\"*\"], headers: {x-debug: \"^1$\"}}
---
kind: TrafficTarget
metadata: {name: front-api, namespace: shop}
spec:
  destination: {kind: ServiceAccount, name: web}
  rules: [{kind: HTTPRouteGroup, name: api}]
  sources: [{kind: ServiceAccount, name: front}]
";
    let p = Policy::compile(&smi(yaml), 1);
    let e = |m: &str, path: &str, h: &[(&str, &str)]| {
        let h: Vec<(String, String)> = h.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        p.evaluate_http(
            PolicyMode::Enforcing,
            &id("front"),
            &id("web"),
            80,
            &HttpRequest {
                method: m,
                path,
                query: "",
                headers: &h,
            },
        )
    };
    let d = e("GET", "/api/x", &[]);
    assert!(d.allowed && d.rule == "HTTPRouteGroup/api#read-api", "{d:?}");
    assert!(!e("POST", "/api/x", &[]).allowed);
    assert!(!e("GET", "/admin", &[]).allowed);
    assert!(!e("GET", "/v1/api/x", &[]).allowed, "anchored at ^");
    assert!(e("POST", "/debug", &[("X-Debug", "1")]).allowed);
    assert!(!e("POST", "/debug", &[("X-Debug", "2")]).allowed);
    // L4: an HTTP-only target opens TCP to the destination (requests are checked at L7).
    assert!(
        p.evaluate(PolicyMode::Enforcing, &id("front"), &id("web"), 80, Proto::Tcp)
            .allowed
    );
}

#[test]
fn invalid_resources_are_refused_by_name_and_never_widen_access() {
    let bad = format!(
        "{POLICY}---
kind: HTTPRouteGroup
metadata: {{name: broken, namespace: shop}}
spec: {{matches: [{{name: m, pathRegex: \"([\"}}]}}
---
kind: TrafficTarget
metadata: {{name: uses-broken, namespace: shop}}
spec:
  destination: {{kind: ServiceAccount, name: db}}
  rules: [{{kind: HTTPRouteGroup, name: broken}}]
  sources: [{{kind: ServiceAccount, name: front}}]
---
kind: TrafficTarget
metadata: {{name: odd-kind, namespace: shop}}
spec:
  destination: {{kind: ServiceAccount, name: db}}
  rules: [{{kind: GRPCRoute, name: x}}]
  sources: [{{kind: ServiceAccount, name: front}}]
---
kind: TrafficTarget
metadata: {{name: missing-route, namespace: shop}}
spec:
  destination: {{kind: ServiceAccount, name: db}}
  rules: [{{kind: TCPRoute, name: nope}}]
  sources: [{{kind: ServiceAccount, name: front}}]
"
    );
    let p = Policy::compile(&smi(&bad), 2);
    let names: Vec<(&str, &str)> = p.rejected.iter().map(|r| (r.kind, r.name.as_str())).collect();
    assert_eq!(
        names,
        [
            ("HTTPRouteGroup", "shop/broken"),
            ("TrafficTarget", "shop/uses-broken"),
            ("TrafficTarget", "shop/odd-kind"),
            ("TrafficTarget", "shop/missing-route")
        ]
    );
    assert!(p.rejected[0].reason.contains("pathRegex"));
    assert!(p.rejected[1].reason.contains("refused"));
    assert!(p.rejected[2].reason.contains("unknown rule kind"));
    assert!(p.rejected[3].reason.contains("does not exist"));
    // The good ones still apply; the broken ones opened nothing.
    assert!(
        p.evaluate(PolicyMode::Enforcing, &id("front"), &id("web"), 8080, Proto::Tcp)
            .allowed
    );
    assert!(
        !p.evaluate(PolicyMode::Enforcing, &id("front"), &id("db"), 5432, Proto::Tcp)
            .allowed
    );
}
