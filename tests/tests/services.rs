//! Services and TrafficSplit in the lab: connects to a service VIP are
//! given an endpoint in the kernel at connect(), spread by TrafficSplit
//! weight; weight and endpoint changes apply to new connections within a
//! second and leave established ones alone. VIPs are lab addresses
//! (198.19.0.0/24, inside 198.18.0.0/15); the kernel never lets a packet
//! leave for them.
use std::{
    collections::BTreeMap,
    process::Stdio,
    time::{Duration, Instant},
};

use mesh_tests::{KillOnDrop, TestLab, log_records, wait_for};
use serde_json::Value;

const LABTOOL: &str = env!("CARGO_BIN_EXE_labtool");

/// client and v1a on node-a, v1b and v2 on node-b: every split mixes the
/// same-node path (the fast path) with the tunnel.
const TOPOLOGY: &str = "
nodes: [{name: node-a}, {name: node-b}]
pods:
  - {name: client, namespace: t, serviceAccount: client, node: node-a}
  - {name: v1a, namespace: t, serviceAccount: web, node: node-a}
  - {name: v1b, namespace: t, serviceAccount: web, node: node-b}
  - {name: v2, namespace: t, serviceAccount: web, node: node-b}
";

const ROOT_VIP: &str = "198.19.0.10:80";

fn service(name: &str, vip: &str, endpoints: &[&str]) -> String {
    let addrs = endpoints.join(", ");
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: t}}\n\
         spec: {{clusterIP: {vip}, ports: [{{port: 80}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv4\n\
         metadata: {{name: {name}-1, namespace: t, labels: {{kubernetes.io/service-name: {name}}}}}\n\
         ports: [{{port: 8080}}]\nendpoints: [{{addresses: [{addrs}]}}]\n---\n"
    )
}

fn split(v1: i64, v2: i64) -> String {
    format!(
        "kind: TrafficSplit\nmetadata: {{name: canary, namespace: t}}\n\
         spec: {{service: web, backends: [{{service: web-v1, weight: {v1}}}, {{service: web-v2, weight: {v2}}}]}}\n"
    )
}

/// `labtool <args>` started in every endpoint pod, killed when dropped.
fn serve_in_endpoints(t: &TestLab, args: &[&str]) -> Vec<KillOnDrop> {
    ["v1a", "v1b", "v2"]
        .iter()
        .map(|p| KillOnDrop(t.lab.exec(p, LABTOOL).unwrap().args(args).spawn().unwrap()))
        .collect()
}

struct ServiceLab {
    t: TestLab,
    _servers: Vec<KillOnDrop>,
}

impl ServiceLab {
    /// Echo servers (`labtool serve`) on 8080 in every endpoint pod.
    fn up() -> ServiceLab {
        let t = TestLab::up_with(TOPOLOGY, &[], LABTOOL);
        let servers = ["v1a", "v1b", "v2"]
            .iter()
            .map(|p| KillOnDrop(t.traffic().serve(p, 8080).unwrap()))
            .collect();
        ServiceLab { t, _servers: servers }
    }

    /// HTTP servers that name themselves (`labtool http-serve`) instead.
    fn up_http() -> ServiceLab {
        let t = TestLab::up_with(TOPOLOGY, &[], LABTOOL);
        let servers = serve_in_endpoints(&t, &["http-serve", "--port", "8080"]);
        let s = ServiceLab { t, _servers: servers };
        for p in ["v1a", "v1b", "v2"] {
            xtask::probe::wait_listening(&s.t.lab.pod(p).unwrap().netns, 8080).unwrap();
        }
        s
    }

    fn ip(&self, pod: &str) -> String {
        self.t.lab.pod(pod).unwrap().ip.to_string()
    }

    fn write_services(&self, root: &[&str]) {
        let (v1a, v1b, v2) = (self.ip("v1a"), self.ip("v1b"), self.ip("v2"));
        let root: Vec<String> = root.iter().map(|p| self.ip(p)).collect();
        let root: Vec<&str> = root.iter().map(String::as_str).collect();
        let text = service("web", "198.19.0.10", &root)
            + &service("web-v1", "198.19.0.11", &[&v1a, &v1b])
            + &service("web-v2", "198.19.0.12", &[&v2]);
        std::fs::write(self.t.lab.source_dir.join("services.yaml"), text).unwrap();
    }

    fn write_split(&self, text: &str) {
        std::fs::write(self.t.lab.source_dir.join("split.yaml"), text).unwrap();
    }

    /// Waits until node-a's agent has put `splits` split tables in force.
    fn wait_in_force(&self, splits: u64) {
        wait_for("service tables in force", Duration::from_secs(5), || {
            log_records(&self.t.lab.agent_log("node-a"))
                .iter()
                .any(|r| r["message"] == "service tables in force" && r["services"] == 3 && r["splits"] == splits)
        });
    }

    /// `count` new connections from the client to the root VIP: server pod -> count.
    fn tally(&self, count: usize) -> BTreeMap<String, u64> {
        let out = self
            .t
            .lab
            .exec("client", LABTOOL)
            .unwrap()
            .args(["tally", "--to", ROOT_VIP, "--count", &count.to_string()])
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|_| panic!("tally: {}", String::from_utf8_lossy(&out.stderr)));
        assert_eq!(v["failed"], 0, "connections to the VIP failed: {v}");
        let mut by_pod = BTreeMap::new();
        for (server, n) in v["servers"].as_object().unwrap() {
            let ip = server.split(':').next().unwrap();
            let pod = ["v1a", "v1b", "v2"]
                .into_iter()
                .find(|p| self.ip(p) == ip)
                .unwrap_or_else(|| panic!("answered by {server}, not an endpoint"));
            by_pod.insert(pod.to_string(), n.as_u64().unwrap());
        }
        by_pod
    }

    fn wait_tables(&self, what: &str, f: impl Fn(&BTreeMap<String, u64>) -> bool) -> Duration {
        let start = Instant::now();
        loop {
            let t = self.tally(20);
            if f(&t) {
                return start.elapsed();
            }
            assert!(start.elapsed() < Duration::from_secs(5), "{what}: still {t:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn a_90_10_split_sends_10_percent_to_v2_and_a_weight_change_applies_within_a_second() {
    let s = ServiceLab::up();
    s.write_services(&["v1a", "v1b", "v2"]);
    s.write_split(&split(90, 10));
    s.wait_in_force(1);

    const N: u64 = 5_000;
    let t = s.tally(N as usize);
    let v2 = t.get("v2").copied().unwrap_or(0);
    let share = v2 as f64 * 100.0 / N as f64;
    println!("90/10 over {N} connections: {t:?}, v2 share {share:.2}%");
    assert_eq!(t.values().sum::<u64>(), N);
    assert!((share - 10.0).abs() <= 2.0, "v2 got {share:.2}%, want 10 +/- 2");
    // v1's share is spread over both its endpoints, same node and cross node.
    assert!(
        t.get("v1a").copied().unwrap_or(0) > N / 4 && t.get("v1b").copied().unwrap_or(0) > N / 4,
        "{t:?}"
    );

    // A long-lived connection opened under 90/10, written to after the change.
    let held =
        s.t.lab
            .exec("client", LABTOOL)
            .unwrap()
            .args(["send", "--to", ROOT_VIP, "--bytes", "200000", "--hold-ms", "2500"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    s.write_split(&split(0, 100));
    let took = s.wait_tables("0/100 in force", |t| t.get("v2") == Some(&20));
    println!("0/100: new connections all reach v2 {took:?} after the edit");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    let t = s.tally(200);
    assert_eq!(t.get("v2"), Some(&200), "{t:?}");
    let out = held.wait_with_output().unwrap();
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    mesh_tests::assert_intact(&r);
    println!("the held connection (to {}) kept working", r["reply"]["server"]);
}

#[test]
fn bad_splits_are_refused_with_a_reason_and_the_previous_split_stays() {
    let s = ServiceLab::up();
    s.write_services(&["v1a", "v1b", "v2"]);
    s.write_split(&split(0, 100));
    s.wait_in_force(1);
    s.wait_tables("0/100 in force", |t| t.get("v2") == Some(&20));
    let bad = [
        (split(0, 0), "sum to 0"),
        (split(-1, 100), "negative weight"),
        (split(50, 50).replace("web-v2", "web"), "the root service itself"),
    ];
    for (text, why) in bad {
        s.write_split(&text);
        wait_for(&format!("refusal: {why}"), Duration::from_secs(5), || {
            log_records(&s.t.lab.agent_log("node-a")).iter().any(|r| {
                r["message"] == "TrafficSplit refused"
                    && r["reason"].as_str().unwrap_or("").contains(why)
                    && r["previous_version_in_force"] == true
            })
        });
        let t = s.tally(100);
        assert_eq!(
            t.get("v2"),
            Some(&100),
            "after '{why}' the previous split must stay: {t:?}"
        );
    }
}

/// Waits until node-a's agent has `services` service tables, `splits` of them split.
fn wait_tables_in_force(s: &ServiceLab, services: u64, splits: u64) {
    wait_for("service tables in force", Duration::from_secs(5), || {
        log_records(&s.t.lab.agent_log("node-a"))
            .iter()
            .any(|r| r["message"] == "service tables in force" && r["services"] == services && r["splits"] == splits)
    });
}

/// How many times node-a's agent has put service tables in force.
fn tables_applied(s: &ServiceLab) -> usize {
    log_records(&s.t.lab.agent_log("node-a"))
        .iter()
        .filter(|r| r["message"] == "service tables in force")
        .count()
}

/// v2's share of `n` new connections to the root VIP, in percent.
fn v2_share(s: &ServiceLab, n: u64) -> f64 {
    let t = s.tally(n as usize);
    assert_eq!(t.values().sum::<u64>(), n, "{t:?}");
    let share = t.get("v2").copied().unwrap_or(0) as f64 * 100.0 / n as f64;
    println!("{n} connections: {t:?}, v2 {share:.2}%");
    share
}

/// The SMI spec's canary workflow (traffic-split v1alpha4), step by step:
/// the root service's selector matches v1 and v2 pods alike; the split is
/// created first, naming a v2 Service that does not exist yet at weight 0;
/// v2 gets nothing until its weight changes, then its share follows the
/// weights.
#[test]
fn the_smi_canary_workflow_sends_nothing_to_v2_until_its_weight_changes() {
    const N: u64 = 2_000;
    let s = ServiceLab::up();
    let (v1a, v1b, v2) = (s.ip("v1a"), s.ip("v1b"), s.ip("v2"));
    let root = service("web", "198.19.0.10", &[&v1a, &v1b, &v2]);
    let v1 = service("web-v1", "198.19.0.11", &[&v1a, &v1b]);
    let dir = s.t.lab.source_dir.clone();
    std::fs::write(dir.join("services.yaml"), root.clone() + &v1).unwrap();
    s.write_split(&split(100, 0));
    wait_tables_in_force(&s, 2, 1);
    assert_eq!(
        v2_share(&s, N),
        0.0,
        "the split names web-v2 before it exists: v2 pods get nothing"
    );

    // v2's Service appears, its weight still 0.
    s.write_services(&["v1a", "v1b", "v2"]);
    wait_tables_in_force(&s, 3, 1);
    assert_eq!(v2_share(&s, N), 0.0, "web-v2 exists at weight 0");

    for (w1, w2) in [(90, 10), (50, 50)] {
        let before = tables_applied(&s);
        s.write_split(&split(w1, w2));
        wait_for(&format!("{w1}/{w2} in force"), Duration::from_secs(5), || {
            tables_applied(&s) > before
        });
        let share = v2_share(&s, N);
        assert!(
            (share - w2 as f64).abs() <= 2.0,
            "{w1}/{w2}: v2 got {share:.2}%, want {w2} +/- 2"
        );
    }
    s.write_split(&split(0, 100));
    s.wait_tables("0/100", |t| t.get("v2") == Some(&20));
    assert_eq!(v2_share(&s, N), 100.0);

    // A backend lacking the root's port is left out for that port only:
    // the split is not refused, v1 carries port 80 whole.
    let v2_on_81 = service("web-v2", "198.19.0.12", &[&v2]).replace("ports: [{port: 80}]", "ports: [{port: 81}]");
    std::fs::write(dir.join("services.yaml"), root + &v1 + &v2_on_81).unwrap();
    s.write_split(&split(50, 50));
    s.wait_tables("v2 without port 80", |t| !t.contains_key("v2"));
    assert_eq!(v2_share(&s, N), 0.0);
    assert!(
        !log_records(&s.t.lab.agent_log("node-a"))
            .iter()
            .any(|r| r["message"] == "TrafficSplit refused"),
        "a split whose backend lacks a port must not be refused"
    );
}

/// One bad document (the spec's A/B example's HTTPRouteGroup, which has
/// `matches` without `spec`) is refused alone: the TrafficSplit in the same
/// file applies.
#[test]
fn a_bad_document_is_refused_alone_and_the_rest_of_its_file_applies() {
    let s = ServiceLab::up();
    s.write_services(&["v1a", "v1b", "v2"]);
    s.write_split(&format!(
        "kind: HTTPRouteGroup\nmetadata: {{name: ab-test, namespace: t}}\n\
         matches:\n- name: firefox-users\n  headers:\n    user-agent: \".*Firefox.*\"\n---\n{}",
        split(0, 100)
    ));
    wait_for("the bad document reported", Duration::from_secs(5), || {
        log_records(&s.t.lab.agent_log("node-a")).iter().any(|r| {
            let e = r["error"].as_str().unwrap_or("");
            r["level"] == "ERROR" && e.contains("split.yaml") && e.contains("document 1")
        })
    });
    s.wait_tables("the split of the same file", |t| t.get("v2") == Some(&20));
    assert_eq!(v2_share(&s, 500), 100.0);
}

#[test]
fn a_removed_endpoint_receives_no_new_connections() {
    let s = ServiceLab::up();
    s.write_services(&["v1a", "v1b", "v2"]);
    s.wait_in_force(0);
    s.wait_tables("service in force", |t| t.len() == 3);
    s.write_services(&["v1a", "v2"]);
    let took = s.wait_tables("v1b removed", |t| !t.contains_key("v1b"));
    println!("endpoint removal in force {took:?} after the edit");
    let t = s.tally(1_000);
    println!("1,000 connections after removing v1b: {t:?}");
    assert!(!t.contains_key("v1b"), "{t:?}");
    assert_eq!(t.values().sum::<u64>(), 1_000);
    // Both remaining endpoints serve (same node and cross node).
    assert!(
        t.get("v1a").copied().unwrap_or(0) > 300 && t.get("v2").copied().unwrap_or(0) > 300,
        "{t:?}"
    );
}

/// The SMI spec's A/B example: requests with `x-canary: yes` go to web-v2,
/// every other request to the root service `web` (v1a and v1b), decided
/// per request on one client connection.
const HTTP_SPLIT: &str = "
kind: HTTPRouteGroup
metadata: {name: canary-users, namespace: t}
spec:
  matches:
  - {name: canary-header, headers: {x-canary: \"^yes$\"}}
---
kind: TrafficSplit
metadata: {name: ab-test, namespace: t}
spec:
  service: web
  matches: [{kind: HTTPRouteGroup, name: canary-users}]
  backends: [{service: web-v1, weight: 0}, {service: web-v2, weight: 100}]
";

#[test]
fn an_http_matched_split_sends_matching_requests_to_v2_and_the_rest_to_the_root_service() {
    let s = ServiceLab::up_http();
    s.write_services(&["v1a", "v1b"]);
    s.write_split(HTTP_SPLIT);
    s.wait_in_force(1);
    const N: usize = 400;
    let out =
        s.t.lab
            .exec("client", LABTOOL)
            .unwrap()
            .args([
                "http-tally",
                "--to",
                ROOT_VIP,
                "--count",
                &N.to_string(),
                "--with",
                "x-canary: yes",
            ])
            .output()
            .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("http-tally: {}", String::from_utf8_lossy(&out.stderr)));
    println!("{N} requests through the HTTP-matched split: {v}");
    assert_eq!(v["failed"], 0, "{v}");
    // Routed per request: one client connection carried all of them.
    assert_eq!(v["connections"], 1, "{v}");
    let at = |p: &str| format!("{}:8080", s.ip(p));
    let matched = v["matched"].as_object().unwrap();
    assert_eq!(matched.len(), 1, "matching requests went elsewhere than v2: {v}");
    assert_eq!(matched[&at("v2")], N as u64 / 2, "{v}");
    let unmatched = v["unmatched"].as_object().unwrap();
    assert!(
        !unmatched.contains_key(&at("v2")),
        "an unmatched request reached v2: {v}"
    );
    // The root's endpoints on both paths: v1a on this node, v1b through the tunnel.
    for p in ["v1a", "v1b"] {
        assert!(
            unmatched.get(&at(p)).and_then(Value::as_u64).unwrap_or(0) > N as u64 / 10,
            "{p}: {v}"
        );
    }
    let metrics = mesh_tests::metrics_text(&s.t.lab, "node-a");
    let routed = |route| {
        mesh_tests::metric(
            &metrics,
            "mesh_split_requests_total",
            &[("traffic_split", "t/ab-test"), ("route", route)],
        )
    };
    assert_eq!(
        (routed("backend"), routed("root")),
        ((N / 2) as f64, (N / 2) as f64),
        "{metrics}"
    );

    // A bad route group reference is refused; the split in force stays.
    s.write_split(&HTTP_SPLIT.replace("name: canary-users}]", "name: no-such-group}]"));
    wait_for("refusal", Duration::from_secs(5), || {
        log_records(&s.t.lab.agent_log("node-a")).iter().any(|r| {
            r["message"] == "TrafficSplit refused"
                && r["reason"]
                    .as_str()
                    .unwrap_or("")
                    .contains("HTTPRouteGroup t/no-such-group does not exist")
                && r["previous_version_in_force"] == true
        })
    });
}

/// A UDP service on port 53 whose endpoints answer on 5353.
fn udp_service(name: &str, vip: &str, endpoints: &[&str]) -> String {
    let addrs = endpoints.join(", ");
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: t}}\n\
         spec: {{clusterIP: {vip}, ports: [{{port: 53, protocol: UDP}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv4\n\
         metadata: {{name: {name}-1, namespace: t, labels: {{kubernetes.io/service-name: {name}}}}}\n\
         ports: [{{port: 5353, protocol: UDP}}]\nendpoints: [{{addresses: [{addrs}]}}]\n---\n"
    )
}

const DNS_VIP: &str = "198.19.0.53:53";

/// `labtool udp-ask` from the client pod to the DNS VIP.
fn udp_ask(t: &TestLab, count: usize, connected: bool) -> Value {
    udp_ask_with(t, count, connected, false)
}

fn udp_ask_with(t: &TestLab, count: usize, connected: bool, ipv6_socket: bool) -> Value {
    let mut cmd = t.lab.exec("client", LABTOOL).unwrap();
    cmd.args(["udp-ask", "--to", DNS_VIP, "--count", &count.to_string()]);
    if connected {
        cmd.arg("--connected");
    }
    if ipv6_socket {
        cmd.arg("--ipv6-socket");
    }
    let out = cmd.output().unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("udp-ask: {}", String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn udp_requests_to_a_service_vip_are_answered_across_nodes_through_the_tunnel() {
    let t = TestLab::up_with(TOPOLOGY, &[], LABTOOL);
    let _servers = serve_in_endpoints(&t, &["udp-serve", "--port", "5353"]);
    let ip = |p: &str| t.lab.pod(p).unwrap().ip.to_string();
    // Both endpoints on node-b: every request crosses nodes.
    std::fs::write(
        t.lab.source_dir.join("services.yaml"),
        udp_service("dns", "198.19.0.53", &[&ip("v1b"), &ip("v2")]),
    )
    .unwrap();
    wait_for("the UDP service in force", Duration::from_secs(5), || {
        log_records(&t.lab.agent_log("node-a"))
            .iter()
            .any(|r| r["message"] == "service tables in force" && r["services"] == 1)
    });
    let before = mesh_tests::metrics_text(&t.lab, "node-b");
    let tunneled_in = |m: &str| {
        mesh_tests::metric(
            m,
            "mesh_tunnel_flows_total",
            &[("transport", "quic"), ("direction", "udp_in"), ("result", "ok")],
        )
    };
    const N: usize = 1_000;
    let v = udp_ask(&t, N, false);
    println!("{N} UDP requests to {DNS_VIP} (endpoints on the other node): {v}");
    let warnings: Vec<String> = ["node-a", "node-b"]
        .iter()
        .flat_map(|n| log_records(&t.lab.agent_log(n)))
        .filter(|r| r["level"] == "WARN" || r["message"].as_str().unwrap_or("").starts_with("udp"))
        .map(|r| r.to_string())
        .collect();
    assert_eq!(
        (v["ok"].as_u64(), v["wrong"].as_u64(), v["lost"].as_u64()),
        (Some(N as u64), Some(0), Some(0)),
        "{v}\nagent warnings and udp records: {warnings:#?}"
    );
    let servers = v["servers"].as_object().unwrap();
    for p in ["v1b", "v2"] {
        let n = servers
            .get(&format!("{}:5353", ip(p)))
            .and_then(Value::as_u64)
            .unwrap_or(0);
        assert!(n > N as u64 / 4, "{p} answered {n}: {v}");
    }
    // Every request reached node-b as a QUIC datagram (not straight to the pod).
    let after = mesh_tests::metrics_text(&t.lab, "node-b");
    let carried = tunneled_in(&after) - tunneled_in(&before);
    assert!(
        carried >= N as f64,
        "node-b's agent forwarded {carried} tunneled datagrams, want >= {N}"
    );

    // A connected UDP socket (connect() once, then send/recv) works too.
    let v = udp_ask(&t, 200, true);
    assert_eq!(
        (v["ok"].as_u64(), v["wrong"].as_u64()),
        (Some(200), Some(0)),
        "connected: {v}"
    );

    // AF_INET6 sockets to the VIP's IPv4-mapped address (Java's default),
    // unconnected (sendmsg6/recvmsg6) and connected (connect6): the same
    // tunnel, replies shown as from the VIP.
    for connected in [false, true] {
        let v = udp_ask_with(&t, 200, connected, true);
        assert_eq!(
            (v["ok"].as_u64(), v["wrong"].as_u64()),
            (Some(200), Some(0)),
            "IPv6 socket to ::ffff:{DNS_VIP} (connected: {connected}): {v}"
        );
    }

    // Same node: the endpoint set changes to v1a; new datagrams go there, directly.
    std::fs::write(
        t.lab.source_dir.join("services.yaml"),
        udp_service("dns", "198.19.0.53", &[&ip("v1a")]),
    )
    .unwrap();
    let at_v1a = format!("{}:5353", ip("v1a"));
    wait_for("v1a serving the VIP", Duration::from_secs(5), || {
        udp_ask(&t, 5, false)["servers"].get(&at_v1a) == Some(&Value::from(5))
    });
    let v = udp_ask(&t, 200, false);
    assert_eq!(
        (v["ok"].as_u64(), v["servers"][&at_v1a].as_u64()),
        (Some(200), Some(200)),
        "same node: {v}"
    );
}

/// A dual-stack Service: a ClusterIP per family, an EndpointSlice per
/// family (the pods' addresses of that family).
fn dual_stack_service(name: &str, vips: [&str; 2], protocol: &str, target: u16, pods: &[(String, String)]) -> String {
    let slice = |family: &str, addrs: Vec<&str>| {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: {family}\n\
             metadata: {{name: {name}-{family}, namespace: t, labels: {{kubernetes.io/service-name: {name}}}}}\n\
             ports: [{{port: {target}, protocol: {protocol}}}]\nendpoints: [{{addresses: [{}]}}]\n---\n",
            addrs.iter().map(|a| format!("'{a}'")).collect::<Vec<_>>().join(", ")
        )
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: t}}\n\
         spec: {{clusterIP: {v4}, clusterIPs: [{v4}, '{v6}'], ipFamilies: [IPv4, IPv6], ports: [{{port: {port}, protocol: {protocol}}}]}}\n---\n",
        v4 = vips[0],
        v6 = vips[1],
        port = if protocol == "UDP" { 53 } else { 80 },
    ) + &slice("IPv4", pods.iter().map(|p| p.0.as_str()).collect())
        + &slice("IPv6", pods.iter().map(|p| p.1.as_str()).collect())
}

/// A dual-stack Service answers on both ClusterIPs, each with the
/// endpoints of its own family, TCP and UDP, same node and across nodes.
#[test]
fn a_dual_stack_service_balances_each_family_over_its_own_endpoints() {
    let t = TestLab::up_with(TOPOLOGY, &[], LABTOOL);
    let mut servers: Vec<KillOnDrop> = ["v1a", "v1b", "v2"]
        .iter()
        .map(|p| KillOnDrop(t.traffic().serve(p, 8080).unwrap()))
        .collect();
    servers.extend(serve_in_endpoints(&t, &["udp-serve", "--port", "5353"]));
    let both = |p: &str| {
        let pod = t.lab.pod(p).unwrap();
        (pod.ip.to_string(), pod.ip6.to_string())
    };
    let text = dual_stack_service(
        "web",
        ["198.19.0.20", "2001:2:ff::20"],
        "TCP",
        8080,
        &[both("v1a"), both("v1b")],
    ) + &dual_stack_service(
        "dns",
        ["198.19.0.53", "2001:2:ff::53"],
        "UDP",
        5353,
        &[both("v1b"), both("v2")],
    );
    std::fs::write(t.lab.source_dir.join("services.yaml"), text).unwrap();
    wait_for("four service tables in force", Duration::from_secs(5), || {
        log_records(&t.lab.agent_log("node-a"))
            .iter()
            .any(|r| r["message"] == "service tables in force" && r["services"] == 4)
    });
    // TCP: every connection to either ClusterIP lands on an endpoint of its family.
    for (vip, family) in [("198.19.0.20:80", "IPv4"), ("[2001:2:ff::20]:80", "IPv6")] {
        let out = t
            .lab
            .exec("client", LABTOOL)
            .unwrap()
            .args(["tally", "--to", vip, "--count", "100"])
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["failed"], 0, "{vip}: {v}");
        let by_ip: BTreeMap<std::net::IpAddr, u64> = v["servers"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(s, n)| (s.parse::<std::net::SocketAddr>().unwrap().ip(), n.as_u64().unwrap()))
            .collect();
        let want: Vec<std::net::IpAddr> = ["v1a", "v1b"]
            .iter()
            .map(|p| {
                let (v4, v6) = both(p);
                if family == "IPv4" { v4 } else { v6 }.parse().unwrap()
            })
            .collect();
        assert!(
            by_ip.keys().all(|ip| want.contains(ip)) && by_ip.len() == 2,
            "{vip}: answered by {by_ip:?}, want both of {want:?}"
        );
    }
    // UDP: both endpoints on node-b, so every request crosses nodes.
    for vip in ["198.19.0.53:53", "[2001:2:ff::53]:53"] {
        let out = t
            .lab
            .exec("client", LABTOOL)
            .unwrap()
            .args(["udp-ask", "--to", vip, "--count", "100"])
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            (v["ok"].as_u64(), v["lost"].as_u64()),
            (Some(100), Some(0)),
            "{vip}: {v}"
        );
        let v6 = vip.starts_with('[');
        for server in v["servers"].as_object().unwrap().keys() {
            let ip: std::net::SocketAddr = server.parse().unwrap();
            assert_eq!(ip.is_ipv6(), v6, "{vip} answered by {server}");
        }
    }
}
