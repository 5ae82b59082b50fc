//! TrafficPolicy (`mesh.dev/v1alpha1`) in the lab, with Python's
//! http.client as the client and Python's http.server echoing each
//! request: outlier detection ejecting a failing endpoint and probing it
//! back, a per-identity rate limit on the destination's node, fault
//! injection shares, and a pending-request limit; and the L7 path's
//! request spans, received by a Python OTLP/gRPC collector built on the
//! opentelemetry-proto definitions (PyPI).
use std::{path::PathBuf, time::Duration};

use mesh_tests::{KillOnDrop, TestLab, log_records, programs::HTTP_ECHO, programs::PYTHON, wait_for};
use serde_json::Value;

const LABTOOL: &str = env!("CARGO_BIN_EXE_labtool");
const NS: &str = "shop";

/// Two clients with their own identities and one web endpoint on node-a;
/// two web endpoints on node-b.
const TOPOLOGY: &str = "
nodes: [{name: node-a}, {name: node-b}]
pods:
  - {name: client, namespace: shop, serviceAccount: client, node: node-a}
  - {name: other, namespace: shop, serviceAccount: other, node: node-a}
  - {name: web-1, namespace: shop, serviceAccount: web, node: node-b}
  - {name: web-2, namespace: shop, serviceAccount: web, node: node-b}
  - {name: web-3, namespace: shop, serviceAccount: web, node: node-a}
";
const WEBS: [&str; 3] = ["web-1", "web-2", "web-3"];
/// `web`: all three; `limited`: web-1 alone (across the tunnel); `slow`: web-3.
const WEB_VIP: &str = "198.19.0.30";
const LIMITED_VIP: &str = "198.19.0.31";
const SLOW_VIP: &str = "198.19.0.32";

struct Shop {
    t: TestLab,
    _servers: Vec<KillOnDrop>,
}

impl Shop {
    fn up() -> Shop {
        Shop::up_with(&[])
    }

    fn up_with(agent_args: &[&str]) -> Shop {
        assert!(
            std::path::Path::new(PYTHON).exists(),
            "{PYTHON} is missing: run `./run.sh setup`"
        );
        let t = TestLab::up_with(TOPOLOGY, agent_args, LABTOOL);
        let servers = WEBS
            .iter()
            .map(|pod| {
                KillOnDrop(
                    t.lab
                        .exec(pod, PYTHON)
                        .unwrap()
                        .args(["-c", HTTP_ECHO, pod, "8080"])
                        .spawn()
                        .unwrap(),
                )
            })
            .collect();
        for pod in WEBS {
            xtask::probe::wait_listening(&t.lab.pod(pod).unwrap().netns, 8080).unwrap();
        }
        let s = Shop { t, _servers: servers };
        let svc = |name: &str, vip: &str, pods: &[&str]| {
            let addrs: Vec<String> = pods.iter().map(|p| s.ip(p)).collect();
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {NS}}}\n\
                 spec:\n  clusterIP: {vip}\n  ports:\n  - {{name: http, port: 80, targetPort: 8080}}\n---\n\
                 apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv4\n\
                 metadata: {{name: {name}-1, namespace: {NS}, labels: {{kubernetes.io/service-name: {name}}}}}\n\
                 ports: [{{name: http, port: 8080}}]\nendpoints: [{{addresses: [{}]}}]\n---\n",
                addrs.join(", ")
            )
        };
        let services =
            svc("web", WEB_VIP, &WEBS) + &svc("limited", LIMITED_VIP, &["web-1"]) + &svc("slow", SLOW_VIP, &["web-3"]);
        std::fs::write(s.source_dir().join("services.yaml"), services).unwrap();
        s
    }

    fn source_dir(&self) -> PathBuf {
        self.t.lab.source_dir.clone()
    }

    fn ip(&self, pod: &str) -> String {
        self.t.lab.pod(pod).unwrap().ip.to_string()
    }

    /// Writes a TrafficPolicy and waits until `nodes` say it is in force.
    fn apply(&self, name: &str, spec: &str, nodes: &[&str]) {
        let count = |node: &str| {
            log_records(&self.t.lab.agent_log(node))
                .iter()
                .filter(|r| {
                    r["message"] == "TrafficPolicy in force"
                        && r["traffic_policy"] == format!("TrafficPolicy {NS}/{name}")
                })
                .count()
        };
        std::fs::write(
            self.source_dir().join(format!("policy-{name}.yaml")),
            format!("apiVersion: mesh.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: {name}, namespace: {NS}}}\nspec:\n{spec}"),
        )
        .unwrap();
        for node in nodes {
            wait_for(
                &format!("TrafficPolicy {name} in force on {node}"),
                Duration::from_secs(5),
                || count(node) > 0,
            );
        }
        // The service tables follow the log line within the same sync.
        std::thread::sleep(Duration::from_millis(200));
    }

    fn python(&self, pod: &str, script: &str, args: &[&str]) -> Value {
        mesh_tests::python_json(&self.t.lab, pod, script, args)
    }

    /// POSTs to a web pod's control or stats path, directly (not meshed routing).
    fn echo(&self, pod: &str, path: &str, headers: &[(&str, &str)]) -> Value {
        let script = r#"
import http.client, json, sys
c = http.client.HTTPConnection(sys.argv[1], 8080, timeout=5)
c.request("POST", sys.argv[2], headers=dict(h.split(": ", 1) for h in sys.argv[3:]))
print(c.getresponse().read().decode())
"#;
        let hs: Vec<String> = headers.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        let mut args = vec![self.ip(pod), path.to_string()];
        args.extend(hs);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.python("client", script, &args)
    }

    fn agent(&self, node: &str, args: &[&str]) -> String {
        let out = self
            .t
            .lab
            .node_exec(node, &self.t.lab.agent_bin.to_string_lossy())
            .unwrap()
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    }
}

/// `n` GETs on one keep-alive connection: each answer's pod (or status)
/// in order, and how long each took.
const SEQUENCE: &str = r#"
import http.client, json, sys, time
host, n = sys.argv[1], int(sys.argv[2])
c = http.client.HTTPConnection(host, 80, timeout=5)
out, took, faults = [], [], 0
for i in range(n):
    t = time.monotonic()
    c.request("GET", "/item")
    r = c.getresponse()
    body = r.read()
    took.append(time.monotonic() - t)
    faults += r.getheader("x-mesh-fault") == "abort"
    out.append(json.loads(body)["pod"] if r.status == 200 else r.status)
print(json.dumps({"answers": out, "took": took, "faults": faults}))
"#;

/// Must-show 3: one of three endpoints failing every request is ejected
/// within 10 requests and gets no traffic but its probes until one succeeds.
#[test]
fn outlier_detection_ejects_a_failing_endpoint_and_probes_it_back() {
    let s = Shop::up();
    s.apply(
        "web",
        "  targetRef: {group: \"\", kind: Service, name: web}\n  \
         outlierDetection: {consecutiveFailures: 3, baseEjectionTime: 2s, maxEjectionTime: 10s}\n",
        &["node-a"],
    );
    s.echo("web-2", "/echo-control", &[("x-echo-fail-all", "1")]);
    let got = |n: usize| -> Vec<Value> {
        s.python("client", SEQUENCE, &[WEB_VIP, &n.to_string()])["answers"]
            .as_array()
            .unwrap()
            .clone()
    };
    let failures = |answers: &[Value]| answers.iter().filter(|a| **a == 503).count();
    let web2 = || s.echo("web-2", "/echo-stats", &[])["/item"].as_u64().unwrap_or(0);

    // Round robin over three: web-2's third failure is at most the 9th request.
    let first = got(150);
    let at: Vec<usize> = first
        .iter()
        .enumerate()
        .filter(|(_, a)| **a == 503)
        .map(|(i, _)| i)
        .collect();
    println!("503s at {at:?}");
    assert_eq!(at.len(), 3, "exactly the failures that eject it: {first:?}");
    assert!(at[2] < 10, "ejected within 10 requests: {at:?}");
    assert_eq!(web2(), 3, "web-2 got nothing after its ejection");
    let served: std::collections::BTreeSet<&str> = first.iter().filter_map(|a| a.as_str()).collect();
    assert_eq!(served, ["web-1", "web-3"].into(), "the others serve everything");

    let status = s.agent("node-a", &["status"]);
    let web2_addr = format!("{}:8080", s.ip("web-2"));
    assert!(
        status.contains(&format!(
            "TrafficPolicy {NS}/web on {NS}/web:80: 1 endpoints ejected: {web2_addr}"
        )),
        "{status}"
    );
    let check = s.agent(
        "node-a",
        &[
            "policy",
            "check",
            "--policy-mode",
            "permissive",
            "--from",
            &format!("pod:{NS}/client"),
            "--to",
            &format!("{WEB_VIP}:80"),
            "--method",
            "GET",
            "--path",
            "/item",
            "--source-dir",
            &s.source_dir().to_string_lossy(),
        ],
    );
    assert!(
        check.contains("an endpoint with 3 failures in a row (connect failure or 5xx) is ejected for 2s"),
        "{check}"
    );

    // The ejection ends: one probe goes, fails, and ejects it for 4 s.
    std::thread::sleep(Duration::from_millis(2200));
    let second = got(30);
    assert_eq!(failures(&second), 1, "one probe: {second:?}");
    assert_eq!(web2(), 4);

    // Healed, it gets traffic again once its next probe succeeds.
    s.echo("web-2", "/echo-control", &[("x-echo-fail-all", "0")]);
    let third = got(30);
    assert_eq!(failures(&third), 0, "still ejected: no traffic, no failure: {third:?}");
    assert_eq!(web2(), 4, "no traffic before the probe is due");
    std::thread::sleep(Duration::from_millis(4200));
    let fourth = got(30);
    let back = fourth.iter().filter(|a| **a == "web-2").count();
    assert!(
        failures(&fourth) == 0 && (9..=11).contains(&back),
        "back in turn: {fourth:?}"
    );
    let metrics = mesh_tests::metrics_text(&s.t.lab, "node-a");
    let ejections = mesh_tests::metric(
        &metrics,
        "mesh_endpoint_ejections_total",
        &[("service", &format!("{NS}/web:80")), ("endpoint", &web2_addr)],
    );
    assert_eq!(ejections, 2.0, "ejected, then re-ejected by its failed probe");
}

/// Must-show 4: 100 requests/s per identity holds within 5% for a client
/// sending far more, on the destination's node; another identity at 50/s
/// is unaffected. Refused requests get 429 with Retry-After and never
/// reach the pod.
#[test]
fn a_rate_limit_per_identity_holds_and_leaves_other_identities_alone() {
    let s = Shop::up();
    s.apply(
        "limited",
        "  targetRef: {kind: Service, name: limited}\n  rateLimit: {identity: {requestsPerSecond: 100, burst: 10}}\n",
        &["node-a", "node-b"],
    );
    let script = r#"
import http.client, json, sys, time
host, secs, rate = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
c = http.client.HTTPConnection(host, 80, timeout=5)
statuses, retry_after = {}, set()
start = time.monotonic()
i = 0
while time.monotonic() - start < secs:
    if rate:
        time.sleep(max(0, start + i / rate - time.monotonic()))
    c.request("GET", "/item")
    r = c.getresponse()
    r.read()
    statuses[r.status] = statuses.get(r.status, 0) + 1
    if r.status == 429:
        retry_after.add(r.getheader("retry-after"))
    i += 1
print(json.dumps({"statuses": statuses, "secs": time.monotonic() - start, "retry_after": sorted(retry_after)}))
"#;
    let lab = &s.t.lab;
    let spawn = |pod: &str, rate: &str| {
        lab.exec(pod, PYTHON)
            .unwrap()
            .args(["-c", script, LIMITED_VIP, "6", rate])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (fast, slow) = (spawn("client", "0"), spawn("other", "50"));
    let read = |c: std::process::Child| -> Value {
        let out = c.wait_with_output().unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stdout)))
    };
    let (fast, slow) = (read(fast), read(slow));
    println!("client: {fast}\nother: {slow}");
    let ok = fast["statuses"]["200"].as_f64().unwrap_or(0.0);
    let rate = ok / fast["secs"].as_f64().unwrap();
    assert!(
        fast["statuses"]["429"].as_u64().unwrap_or(0) > 500,
        "the client sent far more than the limit: {fast}"
    );
    assert!((95.0..=105.0).contains(&rate), "100/s within 5%: {rate:.1}/s ({fast})");
    assert_eq!(fast["retry_after"], serde_json::json!(["1"]), "{fast}");
    let other_ok = slow["statuses"]["200"].as_u64().unwrap_or(0);
    assert!(
        slow["statuses"].get("429").is_none() && other_ok >= 280,
        "the other identity is unaffected: {slow}"
    );
    let reached = s.echo("web-1", "/echo-stats", &[])["/item"].as_u64().unwrap_or(0);
    assert_eq!(reached, ok as u64 + other_ok, "refused requests never reach the pod");
    let metrics = mesh_tests::metrics_text(lab, "node-b");
    let limited = mesh_tests::metric(
        &metrics,
        "mesh_rate_limited_requests_total",
        &[("source", &format!("spiffe://cluster.local/ns/{NS}/sa/client"))],
    );
    assert_eq!(
        limited,
        fast["statuses"]["429"].as_f64().unwrap(),
        "counted on the destination's node"
    );
    let status = s.agent("node-b", &["status"]);
    assert!(
        status.contains(&format!(
            "TrafficPolicy {NS}/limited on {NS}/limited:80: {} requests refused by its rate limits on this node",
            limited as u64
        )),
        "{status}"
    );
}

/// Must-show 5 (faults; the mirror is in gamma.rs): 10% aborted and 20%
/// delayed over 2,000 requests, each within 2 points; and a limit of 2
/// pending requests answers the third at once with a 503.
#[test]
fn fault_injection_lands_its_shares_and_a_pending_limit_overflows() {
    let s = Shop::up();
    s.apply(
        "web",
        "  targetRef: {kind: Service, name: web}\n  faultInjection:\n    delay: {percent: 20, fixedDelay: 30ms}\n    \
         abort: {percent: 10, httpStatus: 503}\n",
        &["node-a"],
    );
    let r = s.python("client", SEQUENCE, &[WEB_VIP, "2000"]);
    let answers = r["answers"].as_array().unwrap();
    let aborted = answers.iter().filter(|a| **a == 503).count();
    let delayed = r["took"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t.as_f64().unwrap() >= 0.030)
        .count();
    println!("aborted {aborted}, delayed {delayed} of 2000");
    assert_eq!(
        r["faults"].as_u64().unwrap() as usize,
        aborted,
        "every 503 is the agent's fault"
    );
    assert!((160..=240).contains(&aborted), "10% +- 2 points: {aborted}");
    assert!((360..=440).contains(&delayed), "20% +- 2 points: {delayed}");
    let reached: u64 = ["web-1", "web-2", "web-3"]
        .iter()
        .map(|p| s.echo(p, "/echo-stats", &[])["/item"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(reached as usize, 2000 - aborted, "aborted requests reach no pod");

    s.apply(
        "slow",
        "  targetRef: {kind: Service, name: slow}\n  connectionLimits: {maxPendingRequests: 2}\n",
        &["node-a"],
    );
    let script = r#"
import http.client, json, sys, threading
statuses, overflow, lock = [], [], threading.Lock()
def one():
    c = http.client.HTTPConnection(sys.argv[1], 80, timeout=5)
    c.request("GET", "/slow", headers={"x-echo-delay-ms": "700"})
    r = c.getresponse()
    r.read()
    with lock:
        statuses.append(r.status)
        overflow.append(r.getheader("x-mesh-overflow"))
ts = [threading.Thread(target=one) for _ in range(5)]
for t in ts: t.start()
for t in ts: t.join()
print(json.dumps({"statuses": sorted(statuses), "overflow": sorted(o or "" for o in overflow)}))
"#;
    let r = s.python("client", script, &[SLOW_VIP]);
    assert_eq!(r["statuses"], serde_json::json!([200, 200, 503, 503, 503]), "{r}");
    assert_eq!(
        r["overflow"],
        serde_json::json!(["", "", "true", "true", "true"]),
        "{r}"
    );
}

/// node-a's fabric address: where the tests' collector listens.
const COLLECTOR: &str = "198.18.0.11:4317";

/// An OTLP/gRPC trace receiver (opentelemetry-proto's generated service on
/// grpcio): for `secs` seconds it takes every export, then prints the spans
/// it got as JSON (ids in hex, the resource's node, the kind).
const OTLP_RECEIVER: &str = r#"
import json, sys, threading, time
from concurrent import futures
import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
addr, secs = sys.argv[1], float(sys.argv[2])
spans, lock = [], threading.Lock()
class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def Export(self, request, context):
        with lock:
            for rs in request.resource_spans:
                res = {a.key: a.value.string_value for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        spans.append({
                            "trace": s.trace_id.hex(), "span": s.span_id.hex(), "parent": s.parent_span_id.hex(),
                            "name": s.name, "kind": s.kind, "node": res.get("k8s.node.name"),
                            "service": res.get("service.name"),
                            "attributes": {a.key: a.value.string_value or a.value.int_value for a in s.attributes},
                        })
        return trace_service_pb2.ExportTraceServiceResponse()
server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Receiver(), server)
server.add_insecure_port(addr)
server.start()
time.sleep(secs)
server.stop(0)
with lock:
    print(json.dumps(spans))
"#;

/// Must-show 6: a cross-node request on the L7 path leaves a client span
/// (node-a) and a server span (node-b) in one trace, parent and child,
/// under the application's own traceparent; the pod gets the server
/// span's context.
#[test]
fn a_cross_node_request_leaves_client_and_server_spans_of_one_trace() {
    let s = Shop::up_with(&["--otlp-endpoint", &format!("http://{COLLECTOR}")]);
    let lab = &s.t.lab;
    let receiver = lab
        .node_exec("node-a", PYTHON)
        .unwrap()
        .args(["-c", OTLP_RECEIVER, COLLECTOR, "8"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut receiver = KillOnDrop(receiver);
    // The L7 path for `limited` (web-1, on node-b): an HTTPRoute to itself.
    std::fs::write(
        s.source_dir().join("route-limited.yaml"),
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: limited, namespace: {NS}}}\nspec:\n  \
             parentRefs: [{{group: \"\", kind: Service, name: limited, port: 80}}]\n  rules:\n  - backendRefs: [{{name: limited, port: 80}}]\n"
        ),
    )
    .unwrap();
    wait_for("the route in force", Duration::from_secs(5), || {
        log_records(&lab.agent_log("node-a"))
            .iter()
            .any(|r| r["message"] == "Gateway API route in force" && r["route"] == format!("HTTPRoute {NS}/limited"))
    });
    std::thread::sleep(Duration::from_millis(500));
    let script = r#"
import http.client, json, sys
c = http.client.HTTPConnection(sys.argv[1], 80, timeout=5)
c.request("GET", "/traced", headers={"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"})
r = c.getresponse()
got = json.loads(r.read())
c.request("GET", "/untraced")
r2 = c.getresponse()
r2.read()
print(json.dumps({"status": [r.status, r2.status], "traceparent": got["headers"].get("traceparent")}))
"#;
    let answer = s.python("client", script, &[LIMITED_VIP]);
    assert_eq!(answer["status"], serde_json::json!([200, 200]), "{answer}");
    let (mut stdout, mut stderr) = (String::new(), String::new());
    use std::io::Read as _;
    receiver.0.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    receiver.0.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    let spans: Vec<Value> =
        serde_json::from_str(&stdout).unwrap_or_else(|_| panic!("receiver printed {stdout:?}: {stderr}"));
    println!("{}", serde_json::to_string_pretty(&spans).unwrap());
    let find = |node: &str, path: &str| -> &Value {
        spans
            .iter()
            .find(|s| s["node"] == node && s["attributes"]["url.path"] == path)
            .unwrap_or_else(|| panic!("no span of {node} for {path}: {spans:?}"))
    };
    let (client, server) = (find("node-a", "/traced"), find("node-b", "/traced"));
    // SpanKind in OTLP: 2 server, 3 client.
    assert_eq!((client["kind"].as_i64(), server["kind"].as_i64()), (Some(3), Some(2)));
    assert_eq!(
        client["trace"], "4bf92f3577b34da6a3ce929d0e0e4736",
        "the application's trace"
    );
    assert_eq!(
        client["parent"], "00f067aa0ba902b7",
        "the application's span is the client span's parent"
    );
    assert_eq!(server["trace"], client["trace"]);
    assert_eq!(
        server["parent"], client["span"],
        "the server span is the client span's child"
    );
    assert_eq!(server["service"], "mesh-agent");
    assert_eq!(client["attributes"]["http.response.status_code"], 200);
    let to_pod = answer["traceparent"].as_str().unwrap();
    assert_eq!(
        to_pod,
        format!(
            "00-{}-{}-01",
            server["trace"].as_str().unwrap(),
            server["span"].as_str().unwrap()
        ),
        "the pod sees the server span as its parent"
    );
    let (client2, server2) = (find("node-a", "/untraced"), find("node-b", "/untraced"));
    assert_eq!(client2["parent"], "", "a request without traceparent starts a trace");
    assert_eq!(server2["parent"], client2["span"]);
    assert_ne!(client2["trace"], client["trace"]);
}
