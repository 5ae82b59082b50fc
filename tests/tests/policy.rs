//! End-to-end tests of SMI access policy in the lab: a matrix of identities
//! x ports x same-node/cross-node behaves as the policy says (denied cells
//! fail at connect() with EPERM), the destination refuses a source that
//! skips the kernel check, `policy check` agrees cell by cell, edits apply
//! in under a second, and a broken file changes nothing else.
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use mesh_tests::{KillOnDrop, TestLab, log_records, wait_for};
use serde_json::Value;
use xtask::lab::Lab;

const LABTOOL: &str = env!("CARGO_BIN_EXE_labtool");
const ROGUE: &str = env!("CARGO_BIN_EXE_rogue");

const TOPOLOGY: &str = "
nodes: [{name: node-a}, {name: node-b}]
pods:
  - {name: a1, namespace: t, serviceAccount: alpha, node: node-a}
  - {name: b1, namespace: t, serviceAccount: beta,  node: node-a}
  - {name: c1, namespace: t, serviceAccount: gamma, node: node-a}
  - {name: a2, namespace: t, serviceAccount: alpha, node: node-b}
  - {name: b2, namespace: t, serviceAccount: beta,  node: node-b}
  - {name: c2, namespace: t, serviceAccount: gamma, node: node-b}
";

const POLICY: &str = "
kind: TCPRoute
metadata: {name: p8080, namespace: t}
spec: {matches: {ports: [8080]}}
---
kind: TCPRoute
metadata: {name: all-ports, namespace: t}
spec: {matches: {ports: []}}
---
kind: TrafficTarget
metadata: {name: alpha-to-beta, namespace: t}
spec:
  destination: {kind: ServiceAccount, name: beta}
  rules: [{kind: TCPRoute, name: p8080}]
  sources: [{kind: ServiceAccount, name: alpha}]
---
kind: TrafficTarget
metadata: {name: beta-to-gamma, namespace: t}
spec:
  destination: {kind: ServiceAccount, name: gamma}
  rules: [{kind: TCPRoute, name: all-ports}]
  sources: [{kind: ServiceAccount, name: beta}]
---
kind: TrafficTarget
metadata: {name: gamma-to-alpha, namespace: t}
spec:
  destination: {kind: ServiceAccount, name: alpha}
  rules: [{kind: TCPRoute, name: p8080}]
  sources: [{kind: ServiceAccount, name: gamma}]
";

const PORTS: [u16; 2] = [8080, 9090];

struct PolicyLab {
    t: TestLab,
    _servers: Vec<KillOnDrop>,
}

impl PolicyLab {
    fn up() -> PolicyLab {
        let t = TestLab::up_with(TOPOLOGY, &["--policy-mode=enforcing"], LABTOOL);
        std::fs::write(t.lab.source_dir.join("policy.yaml"), POLICY).unwrap();
        let mut servers = Vec::new();
        for pod in ["a1", "b1", "c1", "a2", "b2", "c2"] {
            for port in PORTS {
                servers.push(KillOnDrop(t.traffic().serve(pod, port).unwrap()));
            }
        }
        // The policy file is picked up within a poll; wait until it is in force.
        let lab = &t.lab;
        wait_for("policy in force", Duration::from_secs(5), || {
            ["node-a", "node-b"].iter().all(|n| {
                log_records(&lab.agent_log(n))
                    .iter()
                    .any(|r| r["message"] == "policy in force" && r["targets"] == 3)
            })
        });
        PolicyLab { t, _servers: servers }
    }

    fn addr(&self, pod: &str, port: u16) -> SocketAddr {
        SocketAddr::from((self.t.lab.pod(pod).unwrap().ip, port))
    }

    /// The pod's IPv6 address (lab pods are dual-stack).
    fn addr6(&self, pod: &str, port: u16) -> SocketAddr {
        SocketAddr::from((self.t.lab.pod(pod).unwrap().ip6, port))
    }

    /// `dst:port` as an AF_INET6 socket addresses it: `[::ffff:a.b.c.d]:port`.
    fn mapped_addr(&self, pod: &str, port: u16) -> SocketAddr {
        SocketAddr::from((self.t.lab.pod(pod).unwrap().ip.to_ipv6_mapped(), port))
    }

    /// Whether `src` can send to `dst:port`, and the error when it cannot.
    fn try_send(&self, src: &str, dst: &str, port: u16) -> (bool, String) {
        self.try_send_to(src, self.addr(dst, port))
    }

    fn try_send_to(&self, src: &str, to: SocketAddr) -> (bool, String) {
        let r = self.t.traffic().send(src, to, 2048).unwrap();
        (r["ok"] == true, r["error"].as_str().unwrap_or("").to_string())
    }
}

fn sa_of(pod: &str) -> &'static str {
    match &pod[..1] {
        "a" => "alpha",
        "b" => "beta",
        _ => "gamma",
    }
}

fn expected(src: &str, dst: &str, port: u16) -> bool {
    matches!(
        (sa_of(src), sa_of(dst), port),
        ("alpha", "beta", 8080) | ("beta", "gamma", _) | ("gamma", "alpha", 8080)
    )
}

fn policy_check(lab: &Lab, src: &str, dst: SocketAddr) -> (bool, String) {
    let out = std::process::Command::new(&lab.agent_bin)
        .args([
            "policy",
            "check",
            "--from",
            &format!("pod:t/{src}"),
            "--to",
            &dst.to_string(),
        ])
        .arg("--source-dir")
        .arg(&lab.source_dir)
        .output()
        .unwrap();
    (
        out.status.code() == Some(0),
        String::from_utf8_lossy(&out.stdout).to_string(),
    )
}

#[test]
fn the_matrix_behaves_as_the_policy_says_and_policy_check_agrees() {
    matrix(&PolicyLab::up(), Family::V4);
}

/// Java and other dual-stack programs connect AF_INET6 sockets to
/// `::ffff:a.b.c.d` for IPv4: the same matrix, the same single audit
/// record per cell, through connect6.
#[test]
fn the_matrix_holds_from_ipv6_sockets_to_ipv4_mapped_addresses() {
    matrix(&PolicyLab::up(), Family::V4Mapped);
}

/// Native IPv6 between dual-stack pods: the same matrix, through connect6
/// and the agent's IPv6 listener, audited with the IPv6 addresses.
#[test]
fn the_matrix_holds_over_ipv6() {
    matrix(&PolicyLab::up(), Family::V6);
}

#[derive(Clone, Copy, PartialEq)]
enum Family {
    V4,
    V4Mapped,
    V6,
}

fn matrix(p: &PolicyLab, family: Family) {
    let mut cells = Vec::new();
    for src in ["a1", "b1", "c1"] {
        for dst in ["a1", "b1", "c1", "a2", "b2", "c2"] {
            if src == dst {
                continue;
            }
            for port in PORTS {
                let want = expected(src, dst, port);
                let to = match family {
                    Family::V4 => p.addr(dst, port),
                    Family::V4Mapped => p.mapped_addr(dst, port),
                    Family::V6 => p.addr6(dst, port),
                };
                let (ok, err) = p.try_send_to(src, to);
                let where_ = if dst.ends_with('1') { "same node" } else { "cross node" };
                assert_eq!(
                    ok, want,
                    "{src} -> {dst}:{port} ({where_}): want {want}, got {ok} {err}"
                );
                if !want {
                    assert!(
                        err.contains("Operation not permitted"),
                        "{src} -> {dst}:{port}: denied but not with EPERM: {err}"
                    );
                }
                let (allows, text) = policy_check(&p.t.lab, src, to);
                assert_eq!(allows, ok, "policy check disagrees for {src} -> {dst}:{port}:\n{text}");
                if allows {
                    assert!(text.contains("by TrafficTarget t/"), "{text}");
                }
                // The kernel audits an IPv4-mapped destination as the IPv4 address it is.
                let audited = if family == Family::V4Mapped {
                    p.addr(dst, port)
                } else {
                    to
                };
                cells.push((src, dst, port, want, audited));
            }
        }
    }
    assert_eq!(cells.len(), 30);
    // Exactly one audit record per decision, in order: the kernel's at the
    // source for every cell, the destination's for each allowed cross-node one.
    std::thread::sleep(Duration::from_millis(800));
    let lab = &p.t.lab;
    let kernel: Vec<(String, String, String)> = log_records(&lab.audit_log("node-a"))
        .into_iter()
        .filter(|r| r["enforced_at"] == "source")
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap_or("").to_string();
            (s("source_workload"), s("destination_address"), s("verdict"))
        })
        .collect();
    let want: Vec<(String, String, String)> = cells
        .iter()
        .map(|(src, _, _, ok, audited)| {
            let verdict = if *ok { "allow" } else { "deny" };
            (format!("t/{src}"), audited.to_string(), verdict.to_string())
        })
        .collect();
    assert_eq!(kernel, want, "kernel audit records, one per cell");
    let dest = log_records(&lab.audit_log("node-b"))
        .into_iter()
        .filter(|r| r["enforced_at"] == "destination")
        .count();
    let allowed_cross = cells.iter().filter(|c| c.3 && c.1.ends_with('2')).count();
    assert_eq!(dest, allowed_cross, "destination records on node-b");
    // Kernel-side denials were counted.
    let capture = xtask::probe::dump_map(&p.t.lab, "node-a", "mesh_capture").unwrap();
    assert!(xtask::probe::per_cpu_sum(&capture, "denied") >= 20);
}

#[test]
fn a_source_that_skips_the_kernel_check_is_refused_at_the_destination() {
    let p = PolicyLab::up();
    let lab = &p.t.lab;
    let node_b = format!("{}:15008", lab.node("node-b").unwrap().fabric_ip);
    // A process holding a valid alpha certificate dials node-b's tunnel
    // directly: no connect() hook on its way. alpha -> beta:9090 is denied.
    for (port, want) in [(9090u16, false), (8080u16, true)] {
        let out = lab
            .node_exec("node-a", ROGUE)
            .unwrap()
            .args([
                "--ca-dir",
                lab.ca_dir().to_str().unwrap(),
                "--identity",
                "spiffe://cluster.local/ns/t/sa/alpha",
            ])
            .args([
                "client",
                "--peer",
                &node_b,
                "--peer-identity",
                "spiffe://cluster.local/ns/t/sa/beta",
            ])
            .args(["--dst", &p.addr("b2", port).to_string()])
            .output()
            .unwrap();
        let r: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        assert_eq!(r["ok"], want, "alpha -> b2:{port} through the tunnel: {r}");
    }
    let audit: Vec<Value> = log_records(&lab.agent_log("node-b"))
        .into_iter()
        .filter(|r| r["target"] == "audit")
        .collect();
    assert!(
        audit
            .iter()
            .any(|r| r["verdict"] == "deny" && r["port"] == 9090 && r["enforced_at"] == "destination"),
        "no destination deny audited"
    );
}

#[test]
fn a_policy_edit_is_enforced_for_new_connections_in_under_a_second() {
    let p = PolicyLab::up();
    assert!(!p.try_send("a1", "c2", 8080).0, "alpha -> gamma starts denied");
    let grant = "kind: TrafficTarget\nmetadata: {name: alpha-to-gamma, namespace: t}\nspec:\n  destination: {kind: ServiceAccount, name: gamma}\n  rules: [{kind: TCPRoute, name: p8080}]\n  sources: [{kind: ServiceAccount, name: alpha}]\n";
    let can_connect = || p.t.traffic().connect("a1", p.addr("c2", 8080), 1000).unwrap()["ok"] == true;
    let took = time_edit(
        "allowed",
        || std::fs::write(p.t.lab.source_dir.join("grant.yaml"), grant).unwrap(),
        &can_connect,
    );
    assert!(took < Duration::from_secs(1), "granting took {took:?}");
    let took = time_edit(
        "denied",
        || std::fs::remove_file(p.t.lab.source_dir.join("grant.yaml")).unwrap(),
        || !can_connect(),
    );
    assert!(took < Duration::from_secs(1), "revoking took {took:?}");
}

/// Time from `edit` until `in_force` holds for a new connection; printed.
fn time_edit(what: &str, edit: impl FnOnce(), mut in_force: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    edit();
    while start.elapsed() < Duration::from_secs(3) {
        if in_force() {
            let took = start.elapsed();
            println!(
                "policy edit -> enforced ({what}): {:.0} ms",
                took.as_secs_f64() * 1000.0
            );
            return took;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("the edit ({what}) never took effect");
}

#[test]
fn a_broken_file_among_good_ones_is_reported_by_name_and_changes_nothing_else() {
    let p = PolicyLab::up();
    let lab = &p.t.lab;
    // A YAML syntax error, and a syntactically fine but invalid route group.
    std::fs::write(
        lab.source_dir.join("typo.yaml"),
        "kind: TrafficTarget\nmetadata: {name: oops\n",
    )
    .unwrap();
    std::fs::write(
        lab.source_dir.join("bad-regex.yaml"),
        "kind: HTTPRouteGroup\nmetadata: {name: bad-regex, namespace: t}\nspec: {matches: [{name: m, pathRegex: \"([\"}]}\n---\nkind: TrafficTarget\nmetadata: {name: uses-bad-regex, namespace: t}\nspec:\n  destination: {kind: ServiceAccount, name: alpha}\n  rules: [{kind: HTTPRouteGroup, name: bad-regex}]\n  sources: [{kind: ServiceAccount, name: beta}]\n",
    )
    .unwrap();
    wait_for("the refusals to be logged", Duration::from_secs(5), || {
        let log = log_records(&lab.agent_log("node-a"));
        log.iter().any(|r| {
            r["message"].as_str().is_some_and(|m| m.contains("file rejected"))
                && r["error"].as_str().is_some_and(|e| e.contains("typo.yaml"))
        }) && log.iter().any(|r| r["resource"] == "t/uses-bad-regex")
    });
    // Nothing else changed: the same sample of cells behaves as before, and
    // the refused target did not open beta -> alpha.
    for (src, dst, port) in [
        ("a1", "b2", 8080),
        ("b1", "c2", 9090),
        ("c1", "a1", 8080),
        ("a1", "b1", 9090),
        ("b1", "a2", 8080),
    ] {
        assert_eq!(
            p.try_send(src, dst, port).0,
            expected(src, dst, port),
            "{src} -> {dst}:{port}"
        );
    }
    let n = lab.node("node-a").unwrap();
    let out = lab
        .node_exec("node-a", "curl")
        .unwrap()
        .args(["-sf", &format!("http://{}:15020/metrics", n.fabric_ip)])
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&out.stdout);
    assert!(
        metrics.contains("mesh_policy_rejected_resources_total{kind=\"TrafficTarget\"}"),
        "{metrics}"
    );
    let audit = log_records(&lab.agent_log("node-a"));
    assert!(
        audit
            .iter()
            .any(|r| r["target"] == "audit" && r["verdict"] == "refused" && r["resource"] == "t/bad-regex")
    );
}

const HTTP_TOPOLOGY: &str = "
nodes: [{name: node-a}, {name: node-b}]
pods:
  - {name: front, namespace: t, serviceAccount: front, node: node-a}
  - {name: other, namespace: t, serviceAccount: other, node: node-a}
  - {name: web-a, namespace: t, serviceAccount: web, node: node-a}
  - {name: web-b, namespace: t, serviceAccount: web, node: node-b}
";

const HTTP_POLICY: &str = "
kind: HTTPRouteGroup
metadata: {name: api, namespace: t}
spec:
  matches:
  - {name: read-api, pathRegex: \"/api/.*\", methods: [GET]}
---
kind: TrafficTarget
metadata: {name: front-reads-api, namespace: t}
spec:
  destination: {kind: ServiceAccount, name: web}
  rules: [{kind: HTTPRouteGroup, name: api, matches: [read-api]}]
  sources: [{kind: ServiceAccount, name: front}]
";

#[test]
fn http_route_rules_pass_matching_requests_and_answer_403_to_the_rest() {
    let t = TestLab::up_with(HTTP_TOPOLOGY, &["--policy-mode=enforcing"], LABTOOL);
    let lab = &t.lab;
    std::fs::write(lab.source_dir.join("policy.yaml"), HTTP_POLICY).unwrap();
    let _servers: Vec<KillOnDrop> = ["web-a", "web-b"]
        .iter()
        .map(|pod| {
            KillOnDrop(
                lab.exec(pod, LABTOOL)
                    .unwrap()
                    .args(["http-serve", "--port", "80"])
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    wait_for("policy in force", Duration::from_secs(5), || {
        ["node-a", "node-b"].iter().all(|n| {
            log_records(&lab.agent_log(n))
                .iter()
                .any(|r| r["message"] == "policy in force" && r["targets"] == 1)
        })
    });
    std::thread::sleep(Duration::from_millis(300));
    let curl = |from: &str, method: &str, url: &str| -> String {
        let out = lab
            .exec(from, "curl")
            .unwrap()
            .args([
                "-s",
                "-m",
                "5",
                "-o",
                "/dev/stderr",
                "-w",
                "%{http_code}",
                "-X",
                method,
                url,
            ])
            .output()
            .unwrap();
        format!(
            "{} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr).trim()
        )
    };
    for web in ["web-a", "web-b"] {
        let ip = lab.pod(web).unwrap().ip;
        let where_ = if web == "web-a" { "same node" } else { "cross node" };
        let ok = curl("front", "GET", &format!("http://{ip}/api/x"));
        assert!(
            ok.starts_with("200") && ok.contains("GET /api/x"),
            "{where_}: GET /api/x -> {ok}"
        );
        let post = curl("front", "POST", &format!("http://{ip}/api/x"));
        assert!(
            post.starts_with("403") && post.contains("denied by mesh policy"),
            "{where_}: POST /api/x -> {post}"
        );
        let admin = curl("front", "GET", &format!("http://{ip}/admin"));
        assert!(admin.starts_with("403"), "{where_}: GET /admin -> {admin}");
        // A source with no TrafficTarget at all is refused at connect().
        let other = curl("other", "GET", &format!("http://{ip}/api/x"));
        assert!(other.starts_with("000"), "{where_}: other -> {other}");
    }
    let audit: Vec<Value> = log_records(&lab.agent_log("node-b"))
        .into_iter()
        .filter(|r| r["target"] == "audit")
        .collect();
    assert!(
        audit
            .iter()
            .any(|r| r["protocol"] == "http" && r["verdict"] == "deny" && r["method"] == "POST")
    );
    assert!(
        audit
            .iter()
            .any(|r| r["protocol"] == "http" && r["verdict"] == "allow" && r["path"] == "/api/x")
    );
}

/// The SMI spec's HTTPRouteGroup example shape: a path/method match and a
/// header-only match (`user-agent` and `cookie` regexes, both required).
const HEADER_POLICY: &str = "
kind: HTTPRouteGroup
metadata: {name: the-routes, namespace: t}
spec:
  matches:
  - {name: read-api, pathRegex: \"/api/.*\", methods: [GET]}
  - name: android-insecure
    headers:
      user-agent: \".*Android.*\"
      cookie: \"type=insecure\"
---
kind: TrafficTarget
metadata: {name: front-routes, namespace: t}
spec:
  destination: {kind: ServiceAccount, name: web}
  rules: [{kind: HTTPRouteGroup, name: the-routes, matches: [read-api, android-insecure]}]
  sources: [{kind: ServiceAccount, name: front}]
";

/// Issue 21 must-show 3: for each request (method, path, headers), source
/// and destination (same node, cross node), what curl gets through the
/// datapath and what `policy check --method --path --header` answers agree,
/// and both match the policy's intent.
#[test]
fn policy_check_agrees_with_the_datapath_request_by_request_headers_included() {
    let t = TestLab::up_with(HTTP_TOPOLOGY, &["--policy-mode=enforcing"], LABTOOL);
    let lab = &t.lab;
    std::fs::write(lab.source_dir.join("policy.yaml"), HEADER_POLICY).unwrap();
    let _servers: Vec<KillOnDrop> = ["web-a", "web-b"]
        .iter()
        .map(|pod| {
            KillOnDrop(
                lab.exec(pod, LABTOOL)
                    .unwrap()
                    .args(["http-serve", "--port", "80"])
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    wait_for("policy in force", Duration::from_secs(5), || {
        ["node-a", "node-b"].iter().all(|n| {
            log_records(&lab.agent_log(n))
                .iter()
                .any(|r| r["message"] == "policy in force" && r["targets"] == 1)
        })
    });
    std::thread::sleep(Duration::from_millis(300));
    const ANDROID: &str = "user-agent: Mozilla/5.0 (Linux; Android 14)";
    const INSECURE: &str = "cookie: type=insecure";
    // (method, path, headers, allowed for front)
    let requests: [(&str, &str, &[&str], bool); 9] = [
        ("GET", "/api/x", &[], true),
        ("POST", "/api/x", &[], false),
        ("GET", "/admin", &[], false),
        ("POST", "/admin", &[ANDROID, INSECURE], true),
        ("DELETE", "/anything/at/all", &[ANDROID, INSECURE], true),
        ("GET", "/admin", &[ANDROID], false),
        ("GET", "/admin", &[INSECURE], false),
        ("GET", "/admin", &["user-agent: Firefox/140", INSECURE], false),
        ("GET", "/admin", &[ANDROID, "cookie: type=secure"], false),
    ];
    let mut cells = 0;
    for src in ["front", "other"] {
        for web in ["web-a", "web-b"] {
            let ip = lab.pod(web).unwrap().ip;
            for (method, path, headers, front_allowed) in requests {
                let want = src == "front" && front_allowed;
                let mut curl = lab.exec(src, "curl").unwrap();
                curl.args(["-s", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}", "-X", method]);
                for h in headers {
                    curl.args(["-H", h]);
                }
                let code = String::from_utf8_lossy(&curl.arg(format!("http://{ip}{path}")).output().unwrap().stdout)
                    .to_string();
                let datapath = match code.as_str() {
                    "200" => true,
                    "403" | "000" => false,
                    other => panic!("{src} -> {web} {method} {path} {headers:?}: unexpected status {other}"),
                };
                let mut check = std::process::Command::new(&lab.agent_bin);
                check.args([
                    "policy",
                    "check",
                    "--from",
                    &format!("pod:t/{src}"),
                    "--to",
                    &format!("{ip}:80"),
                ]);
                check.args(["--method", method, "--path", path]);
                for h in headers {
                    check.args(["--header", h]);
                }
                let out = check.arg("--source-dir").arg(&lab.source_dir).output().unwrap();
                let checked = out.status.code() == Some(0);
                let cell = format!("{src} -> {web} {method} {path} {headers:?}");
                assert_eq!(datapath, want, "datapath for {cell}: status {code}");
                assert_eq!(
                    checked,
                    datapath,
                    "policy check disagrees with the datapath for {cell}:\n{}",
                    String::from_utf8_lossy(&out.stdout)
                );
                cells += 1;
            }
        }
    }
    assert_eq!(cells, 36);
}

#[test]
fn every_decision_leaves_exactly_one_audit_record() {
    let p = PolicyLab::up();
    let lab = &p.t.lab;
    // (source, destination, port): same-node allow, same-node deny,
    // cross-node allow, cross-node deny.
    let cells = [
        ("a1", "b1", 8080),
        ("a1", "c1", 8080),
        ("a1", "b2", 8080),
        ("a1", "b2", 9090),
    ];
    for (src, dst, port) in cells {
        assert_eq!(p.try_send(src, dst, port).0, expected(src, dst, port));
    }
    std::thread::sleep(Duration::from_millis(800));
    let kernel: Vec<Value> = log_records(&lab.audit_log("node-a"))
        .into_iter()
        .filter(|r| r["enforced_at"] == "source" && r["source_workload"] == "t/a1")
        .collect();
    assert_eq!(
        kernel.len(),
        cells.len(),
        "one kernel record per connect(): {kernel:#?}"
    );
    for ((src, dst, port), rec) in cells.iter().zip(&kernel) {
        let want = if expected(src, dst, *port) { "allow" } else { "deny" };
        assert_eq!(rec["verdict"], want, "{rec}");
        assert_eq!(rec["destination_workload"], format!("t/{dst}"), "{rec}");
        assert_eq!(rec["destination_address"], p.addr(dst, *port).to_string(), "{rec}");
        assert_eq!(rec["port"], *port, "{rec}");
        assert_eq!(rec["source_identity"], "t/alpha", "{rec}");
        assert_eq!(rec["node"], "node-a", "{rec}");
        assert!(rec["generation"].as_u64().unwrap() >= 1, "{rec}");
        if want == "allow" {
            assert_eq!(rec["traffic_target"], "t/alpha-to-beta", "{rec}");
            assert_eq!(rec["rule"], "TCPRoute/p8080", "{rec}");
        } else {
            assert_eq!(rec["rule"], "default-deny", "{rec}");
        }
        assert!(rec["time"].as_str().unwrap().ends_with('Z'), "{rec}");
    }
    // The destination decided the one cross-node flow that left node-a.
    let dest: Vec<Value> = log_records(&lab.audit_log("node-b"))
        .into_iter()
        .filter(|r| r["enforced_at"] == "destination" && r["source_identity"] == "spiffe://cluster.local/ns/t/sa/alpha")
        .collect();
    assert_eq!(dest.len(), 1, "{dest:#?}");
    assert_eq!(dest[0]["verdict"], "allow");
    assert_eq!(dest[0]["destination_workload"], "t/b2");
    assert_eq!(dest[0]["port"], 8080);
}

#[test]
fn audit_follow_streams_a_nodes_decisions_live_with_filters() {
    use std::io::{BufRead as _, BufReader};
    let p = PolicyLab::up();
    let lab = &p.t.lab;
    let agent = lab.agent_bin.to_string_lossy().to_string();
    let mut follower = lab
        .node_exec("node-a", &agent)
        .unwrap()
        .args(["audit", "--follow", "--verdict", "deny"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(p.try_send("a1", "b1", 8080).0, "allowed cell");
    assert!(!p.try_send("a1", "c2", 9090).0, "denied cell");
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = follower.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let line = rx.recv_timeout(Duration::from_secs(5)).expect("a live deny record");
    let rec: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        (rec["verdict"].as_str(), rec["destination_workload"].as_str()),
        (Some("deny"), Some("t/c2")),
        "{rec}"
    );
    assert!(
        rx.recv_timeout(Duration::from_millis(700)).is_err(),
        "the allowed decision was filtered out"
    );
    let _ = follower.kill();
    let _ = follower.wait();
    // Without --follow: the recent records, then the command ends.
    let out = lab
        .node_exec("node-a", &agent)
        .unwrap()
        .args(["audit", "--workload", "t/b1"])
        .output()
        .unwrap();
    let recent: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(recent.len(), 1, "{recent:?}");
    assert_eq!(recent[0]["verdict"], "allow");
    let bad = lab
        .node_exec("node-a", &agent)
        .unwrap()
        .args(["audit", "--verdict", "maybe"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("use allow, deny or refused"));
}
