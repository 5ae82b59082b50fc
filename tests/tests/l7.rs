//! HTTP/2 and gRPC on the agent's L7 paths, with real clients and servers:
//! curl (`--http2-prior-knowledge`) and h2load against nginx serving h2c,
//! and Python's grpcio (the gRPC project's own implementation) for unary
//! and bidirectional streaming calls. Through an HTTP-matched TrafficSplit
//! each request or call is routed on its own; under HTTP route rules a
//! denied request gets a 403, a denied gRPC call PERMISSION_DENIED, same
//! node and across nodes.
use std::{path::PathBuf, time::Duration};

use mesh_tests::{
    KillOnDrop, TestLab, log_records,
    programs::{GRPC_CLIENT, GRPC_SERVER, PYTHON},
    wait_for,
};
use serde_json::Value;

const LABTOOL: &str = env!("CARGO_BIN_EXE_labtool");

/// client on node-a; the root service `web` is v1a (node-a) and v1b
/// (node-b); `web-v2` is v2 (node-b).
const TOPOLOGY: &str = "
nodes: [{name: node-a}, {name: node-b}]
pods:
  - {name: client, namespace: t, serviceAccount: client, node: node-a}
  - {name: other, namespace: t, serviceAccount: other, node: node-a}
  - {name: v1a, namespace: t, serviceAccount: web, node: node-a}
  - {name: v1b, namespace: t, serviceAccount: web, node: node-b}
  - {name: v2, namespace: t, serviceAccount: web, node: node-b}
";
const SERVERS: [&str; 3] = ["v1a", "v1b", "v2"];

/// nginx speaks h2c (prior knowledge) on 8080 and names its pod.
const NGINX_PORT: u16 = 8080;
const GRPC_PORT: u16 = 50051;

struct L7Lab {
    t: TestLab,
    dir: PathBuf,
    _servers: Vec<KillOnDrop>,
}

impl Drop for L7Lab {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl L7Lab {
    fn up(agent_args: &[&str]) -> L7Lab {
        assert!(
            std::path::Path::new(PYTHON).exists(),
            "{PYTHON} is missing: run `./run.sh setup` (it installs grpcio there)"
        );
        let t = TestLab::up_with(TOPOLOGY, agent_args, LABTOOL);
        let dir = std::env::temp_dir().join(format!("mesh-l7-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut servers = Vec::new();
        for pod in SERVERS {
            let conf = dir.join(format!("nginx-{pod}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "daemon off; worker_processes 1; pid {0}/nginx-{pod}.pid; error_log stderr;\n\
                     events {{ worker_connections 512; }}\n\
                     http {{ access_log off; client_body_temp_path {0};\n\
                       server {{ listen {NGINX_PORT} http2; location / {{ return 200 \"{pod} $request_method $uri $server_protocol\\n\"; }} }} }}\n",
                    dir.display()
                ),
            )
            .unwrap();
            let nginx = t
                .lab
                .exec(pod, "nginx")
                .unwrap()
                .args(["-e", "stderr", "-c"])
                .arg(&conf)
                .spawn();
            servers.push(KillOnDrop(nginx.unwrap()));
            let grpc = t
                .lab
                .exec(pod, PYTHON)
                .unwrap()
                .args(["-c", GRPC_SERVER, pod, &GRPC_PORT.to_string()])
                .spawn();
            servers.push(KillOnDrop(grpc.unwrap()));
        }
        for pod in SERVERS {
            for port in [NGINX_PORT, GRPC_PORT] {
                xtask::probe::wait_listening(&t.lab.pod(pod).unwrap().netns, port).unwrap();
            }
        }
        L7Lab {
            t,
            dir,
            _servers: servers,
        }
    }

    fn ip(&self, pod: &str) -> String {
        self.t.lab.pod(pod).unwrap().ip.to_string()
    }

    fn write(&self, file: &str, text: &str) {
        std::fs::write(self.t.lab.source_dir.join(file), text).unwrap();
    }

    fn grpc(&self, from: &str, target: &str, method: &str, runs: usize, headers: &[&str]) -> Value {
        let out = self
            .t
            .lab
            .exec(from, PYTHON)
            .unwrap()
            .args(["-c", GRPC_CLIENT, target, method, &runs.to_string()])
            .args(headers)
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
            panic!(
                "grpc client: {} {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// `curl --http2-prior-knowledge`: "<status> <body>".
    fn curl_h2(&self, from: &str, args: &[&str]) -> String {
        let out = self
            .t
            .lab
            .exec(from, "curl")
            .unwrap()
            .args([
                "-s",
                "-m",
                "5",
                "--http2-prior-knowledge",
                "-w",
                " %{http_code} %{http_version}",
            ])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

/// Answered-by counts of a gRPC client's result.
fn answered(v: &Value, pod: &str) -> u64 {
    v["answered"][pod].as_u64().unwrap_or(0)
}

fn services(l: &L7Lab) -> String {
    let svc = |name: &str, vip: &str, pods: &[&str]| {
        let addrs: Vec<String> = pods.iter().map(|p| l.ip(p)).collect();
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: t}}\n\
             spec: {{clusterIP: {vip}, ports: [{{name: http, port: 80}}, {{name: grpc, port: {GRPC_PORT}}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv4\n\
             metadata: {{name: {name}-1, namespace: t, labels: {{kubernetes.io/service-name: {name}}}}}\n\
             ports: [{{name: http, port: {NGINX_PORT}}}, {{name: grpc, port: {GRPC_PORT}}}]\n\
             endpoints: [{{addresses: [{}]}}]\n---\n",
            addrs.join(", ")
        )
    };
    svc("web", "198.19.0.10", &["v1a", "v1b"]) + &svc("web-v2", "198.19.0.12", &["v2"])
}

/// The SMI spec's A/B shape: requests with `x-canary: yes` go to web-v2,
/// all others to the root service.
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
  backends: [{service: web-v2, weight: 100}]
";

#[test]
fn an_http_matched_split_routes_http2_requests_and_grpc_calls_one_by_one() {
    let l = L7Lab::up(&[]);
    l.write("services.yaml", &services(&l));
    l.write("split.yaml", HTTP_SPLIT);
    wait_for("split in force", Duration::from_secs(5), || {
        log_records(&l.t.lab.agent_log("node-a"))
            .iter()
            .any(|r| r["message"] == "service tables in force" && r["splits"] == 2) // both ports
    });

    // curl, HTTP/2 with prior knowledge, to the split VIP.
    for _ in 0..20 {
        let canary = l.curl_h2("client", &["-H", "x-canary: yes", "http://198.19.0.10/a"]);
        assert!(
            canary.starts_with("v2 GET /a HTTP/2.0") && canary.ends_with(" 200 2"),
            "{canary}"
        );
        let plain = l.curl_h2("client", &["http://198.19.0.10/a"]);
        assert!(
            (plain.starts_with("v1a ") || plain.starts_with("v1b ")) && plain.ends_with(" 200 2"),
            "{plain}"
        );
    }

    // h2load: 2,000 requests on 4 connections, 16 concurrent streams each.
    let out =
        l.t.lab
            .exec("client", "h2load")
            .unwrap()
            .args([
                "-n",
                "2000",
                "-c",
                "4",
                "-m",
                "16",
                "-H",
                "x-canary: yes",
                "http://198.19.0.10/",
            ])
            .output()
            .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert!(
        text.contains("requests: 2000 total, 2000 started, 2000 done, 2000 succeeded, 0 failed, 0 errored"),
        "h2load through the split: {text}"
    );
    assert!(text.contains("status codes: 2000 2xx"), "{text}");

    // gRPC through the split: each unary call routed on its own, on one channel.
    let canary = l.grpc("client", "198.19.0.10:50051", "Who", 200, &["x-canary: yes"]);
    assert_eq!(
        (answered(&canary, "v2"), &canary["errors"]),
        (200, &serde_json::json!({})),
        "{canary}"
    );
    let plain = l.grpc("client", "198.19.0.10:50051", "Who", 200, &[]);
    assert_eq!(answered(&plain, "v2"), 0, "{plain}");
    assert!(
        answered(&plain, "v1a") > 20 && answered(&plain, "v1b") > 20,
        "the root's endpoints on this node and across the tunnel: {plain}"
    );
    // A bidirectional stream is one request: all its messages reach one backend.
    let chat = l.grpc("client", "198.19.0.10:50051", "Chat", 300, &["x-canary: yes"]);
    assert_eq!(
        (answered(&chat, "v2"), &chat["errors"]),
        (300, &serde_json::json!({})),
        "{chat}"
    );

    let metrics = mesh_tests::metrics_text(&l.t.lab, "node-a");
    let routed = |route| {
        mesh_tests::metric(
            &metrics,
            "mesh_split_requests_total",
            &[("traffic_split", "t/ab-test"), ("route", route)],
        )
    };
    assert!(routed("backend") >= 2220.0 && routed("root") >= 220.0, "{metrics}");
}

/// Only `client` may call `mesh.Echo/Who` and GET `/open/...`; `other`
/// nothing.
const HTTP_POLICY: &str = "
kind: HTTPRouteGroup
metadata: {name: api, namespace: t}
spec:
  matches:
  - {name: who, pathRegex: \"/mesh\\\\.Echo/Who\", methods: [POST]}
  - {name: open, pathRegex: \"/open/.*\", methods: [GET]}
---
kind: TrafficTarget
metadata: {name: client-calls-web, namespace: t}
spec:
  destination: {kind: ServiceAccount, name: web}
  rules: [{kind: HTTPRouteGroup, name: api}]
  sources: [{kind: ServiceAccount, name: client}]
";

#[test]
fn http_route_rules_answer_denied_http2_requests_with_403_and_denied_grpc_calls_with_permission_denied() {
    let l = L7Lab::up(&["--policy-mode=enforcing"]);
    l.write("policy.yaml", HTTP_POLICY);
    wait_for("policy in force", Duration::from_secs(5), || {
        ["node-a", "node-b"].iter().all(|n| {
            log_records(&l.t.lab.agent_log(n))
                .iter()
                .any(|r| r["message"] == "policy in force" && r["targets"] == 1)
        })
    });
    for (pod, path) in [("v1a", "same node"), ("v1b", "cross node")] {
        let ip = l.ip(pod);
        let grpc = format!("{ip}:{GRPC_PORT}");
        let who = l.grpc("client", &grpc, "Who", 50, &[]);
        assert_eq!(
            (answered(&who, pod), &who["errors"]),
            (50, &serde_json::json!({})),
            "{path}: {who}"
        );
        let secret = l.grpc("client", &grpc, "Secret", 20, &[]);
        assert_eq!(secret["errors"]["PERMISSION_DENIED"], 20, "{path}: {secret}");
        assert!(
            secret["details"][0]
                .as_str()
                .unwrap_or("")
                .contains("denied by mesh policy"),
            "{path}: {secret}"
        );
        let chat = l.grpc("client", &grpc, "Chat", 5, &[]);
        assert_eq!(
            chat["errors"]["PERMISSION_DENIED"], 1,
            "{path}: a denied stream: {chat}"
        );

        let url = |p: &str| format!("http://{ip}:{NGINX_PORT}{p}");
        let open = l.curl_h2("client", &[&url("/open/x")]);
        assert!(
            open.starts_with(&format!("{pod} GET /open/x HTTP/2.0")) && open.ends_with(" 200 2"),
            "{path}: {open}"
        );
        let closed = l.curl_h2("client", &[&url("/closed")]);
        assert!(
            closed.contains("denied by mesh policy") && closed.ends_with(" 403 2"),
            "{path}: {closed}"
        );
        // Many streams on one connection, allowed and denied side by side.
        let out =
            l.t.lab
                .exec("client", "h2load")
                .unwrap()
                .args(["-n", "1000", "-c", "1", "-m", "32", &url("/open/load")])
                .output()
                .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("status codes: 1000 2xx"), "{path}: {text}");
    }
    // `other` has no target at all: refused at connect() (same node) or
    // by the far agent (cross node) before any request.
    let denied = l.grpc("other", &format!("{}:{GRPC_PORT}", l.ip("v1b")), "Who", 3, &[]);
    assert_eq!(denied["errors"]["UNAVAILABLE"], 3, "{denied}");
}
