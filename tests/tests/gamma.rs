//! Gateway API for mesh (GAMMA) in the lab, with the shapes of Gateway
//! API's own mesh conformance manifests (`conformance/tests/mesh/*.yaml`:
//! the `gateway-conformance-mesh` namespace, Services `echo`, `echo-v1`,
//! `echo-v2` with ports 80 -> 8080, 8080, 9090 and 7070) and real clients:
//! curl (HTTP/1.1 and HTTP/2 with prior knowledge), Python's http.client,
//! grpcio; servers: Python's http.server echoing each request, nginx
//! serving h2c, a grpcio server, `labtool serve` for TCP.
use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use mesh_tests::{
    KillOnDrop, TestLab, log_records,
    programs::{GRPC_CLIENT, GRPC_SERVER, HTTP_ECHO, PYTHON},
    wait_for,
};
use serde_json::Value;

const LABTOOL: &str = env!("CARGO_BIN_EXE_labtool");
const NS: &str = "gateway-conformance-mesh";

/// The client on node-a with echo-v1; echo-v2 across the tunnel.
const TOPOLOGY: &str = "
nodes: [{name: node-a}, {name: node-b}]
pods:
  - {name: client, namespace: gateway-conformance-mesh, serviceAccount: client, node: node-a}
  - {name: stranger, namespace: gateway-conformance-mesh, serviceAccount: stranger, node: node-a}
  - {name: echo-v1, namespace: gateway-conformance-mesh, serviceAccount: echo, node: node-a, labels: {app: echo, version: v1}}
  - {name: echo-v2, namespace: gateway-conformance-mesh, serviceAccount: echo, node: node-b, labels: {app: echo, version: v2}}
";
const ECHOES: [&str; 2] = ["echo-v1", "echo-v2"];
const ECHO_VIP: &str = "198.19.0.20";

struct Gamma {
    t: TestLab,
    dir: PathBuf,
    _servers: Vec<KillOnDrop>,
}

impl Drop for Gamma {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Gamma {
    fn up(agent_args: &[&str]) -> Gamma {
        assert!(
            std::path::Path::new(PYTHON).exists(),
            "{PYTHON} is missing: run `./run.sh setup`"
        );
        let t = TestLab::up_with(TOPOLOGY, agent_args, LABTOOL);
        let dir = std::env::temp_dir().join(format!("mesh-gamma-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut servers = Vec::new();
        for pod in ECHOES {
            let conf = dir.join(format!("nginx-{pod}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "daemon off; worker_processes 1; pid {0}/nginx-{pod}.pid; error_log stderr;\n\
                     events {{ worker_connections 512; }}\n\
                     http {{ access_log off; client_body_temp_path {0};\n\
                       server {{ listen 8081 http2; location / {{ return 200 \"{pod} $uri $server_protocol\\n\"; }} }} }}\n",
                    dir.display()
                ),
            )
            .unwrap();
            let lab = &t.lab;
            servers.push(KillOnDrop(
                lab.exec(pod, PYTHON)
                    .unwrap()
                    .args(["-c", HTTP_ECHO, pod, "8080"])
                    .spawn()
                    .unwrap(),
            ));
            servers.push(KillOnDrop(
                lab.exec(pod, PYTHON)
                    .unwrap()
                    .args(["-c", GRPC_SERVER, pod, "7070"])
                    .spawn()
                    .unwrap(),
            ));
            servers.push(KillOnDrop(
                lab.exec(pod, "nginx")
                    .unwrap()
                    .args(["-e", "stderr", "-c"])
                    .arg(&conf)
                    .spawn()
                    .unwrap(),
            ));
            servers.push(KillOnDrop(t.traffic().serve(pod, 9090).unwrap()));
        }
        for pod in ECHOES {
            for port in [8080, 8081, 7070, 9090] {
                xtask::probe::wait_listening(&t.lab.pod(pod).unwrap().netns, port).unwrap();
            }
        }
        let g = Gamma {
            t,
            dir,
            _servers: servers,
        };
        g.write("services.yaml", &g.services());
        g
    }

    fn ip(&self, pod: &str) -> String {
        self.t.lab.pod(pod).unwrap().ip.to_string()
    }

    fn write(&self, file: &str, text: &str) {
        std::fs::write(self.t.lab.source_dir.join(file), text).unwrap();
    }

    /// The conformance manifests' Services (their selectors written out
    /// as EndpointSlices: the lab has no controller to do it).
    fn services(&self) -> String {
        let svc = |name: &str, vip: &str, pods: &[&str]| {
            let addrs: Vec<String> = pods.iter().map(|p| self.ip(p)).collect();
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {NS}}}\n\
                 spec:\n  clusterIP: {vip}\n  ports:\n  - {{name: http, port: 80, targetPort: 8080}}\n  \
                 - {{name: http-alt, port: 8080}}\n  - {{name: h2c, port: 8081}}\n  - {{name: tcp, port: 9090}}\n  \
                 - {{name: grpc, port: 7070}}\n---\n\
                 apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv4\n\
                 metadata: {{name: {name}-1, namespace: {NS}, labels: {{kubernetes.io/service-name: {name}}}}}\n\
                 ports: [{{name: http, port: 8080}}, {{name: http-alt, port: 8080}}, {{name: h2c, port: 8081}}, \
                 {{name: tcp, port: 9090}}, {{name: grpc, port: 7070}}]\n\
                 endpoints: [{{addresses: [{}]}}]\n---\n",
                addrs.join(", ")
            )
        };
        svc("echo", ECHO_VIP, &ECHOES)
            + &svc("echo-v1", "198.19.0.21", &["echo-v1"])
            + &svc("echo-v2", "198.19.0.22", &["echo-v2"])
    }

    /// Puts one route file in force (alone) and waits until node-a says so.
    fn apply(&self, route: &str, yaml: &str) {
        for f in std::fs::read_dir(&self.t.lab.source_dir).unwrap() {
            let p = f.unwrap().path();
            if p.file_name().unwrap().to_string_lossy().starts_with("route-") {
                std::fs::remove_file(p).unwrap();
            }
        }
        let before = self.in_force(route);
        self.write(&format!("route-{}.yaml", route.replace([' ', '/'], "-")), yaml);
        wait_for(&format!("{route} in force"), Duration::from_secs(5), || {
            self.in_force(route) > before
        });
        // The tables follow the log line within the same sync.
        std::thread::sleep(Duration::from_millis(100));
    }

    fn in_force(&self, route: &str) -> usize {
        log_records(&self.t.lab.agent_log("node-a"))
            .iter()
            .filter(|r| {
                r["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("Gateway API route in force"))
                    && r["route"] == route
            })
            .count()
    }

    /// `curl -i`-like: (status, Location, echo JSON or body text).
    fn curl(&self, args: &[&str]) -> (u16, String, String) {
        let out = self
            .t
            .lab
            .exec("client", "curl")
            .unwrap()
            .args([
                "-s",
                "-m",
                "5",
                "-o",
                "/dev/stdout",
                "-w",
                "\n%{http_code} %{redirect_url}",
            ])
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, tail) = text.rsplit_once('\n').unwrap_or(("", &text));
        let (code, location) = tail.split_once(' ').unwrap_or((tail, ""));
        (code.parse().unwrap_or(0), location.to_string(), body.to_string())
    }

    /// Runs a Python script in `client` and reads the JSON it prints.
    fn python_json(&self, script: &str, args: &[&str]) -> Value {
        mesh_tests::python_json(&self.t.lab, "client", script, args)
    }

    /// GET a URL from `client`: (status, JSON or body text).
    fn get_from(&self, url: &str) -> (u16, Value) {
        let (code, _, body) = self.curl(&[url]);
        (code, serde_json::from_str(&body).unwrap_or(Value::String(body)))
    }

    fn get(&self, path: &str, headers: &[&str]) -> (u16, Value) {
        let mut args: Vec<String> = headers.iter().flat_map(|h| ["-H".to_string(), h.to_string()]).collect();
        args.push(format!("http://{ECHO_VIP}{path}"));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, _, body) = self.curl(&args);
        (code, serde_json::from_str(&body).unwrap_or(Value::String(body)))
    }

    /// `mesh-agent policy check` from `client` for one request to the echo
    /// VIP: whether it allows, and each backend pod it names with its share.
    fn policy_check(&self, port: u16, method: &str, path: &str, headers: &[&str]) -> (bool, Vec<String>, String) {
        let lab = &self.t.lab;
        let mut check = std::process::Command::new(&lab.agent_bin);
        // The lab's agents run permissive unless a test says otherwise.
        check.args([
            "policy",
            "check",
            "--policy-mode",
            "permissive",
            "--from",
            &format!("pod:{NS}/client"),
        ]);
        check.args([
            "--to",
            &format!("{ECHO_VIP}:{port}"),
            "--method",
            method,
            "--path",
            path,
        ]);
        for h in headers {
            check.args(["--header", h]);
        }
        let out = check.arg("--source-dir").arg(&lab.source_dir).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        // `  198.18.1.12:8080 (70.0%) pod gateway-conformance-mesh/echo-v1: ALLOW ...`
        let pods = text
            .lines()
            .filter_map(|l| {
                let share = l.split_once(" (")?.1.split_once(')')?.0;
                let pod = l.split_once(&format!(" pod {NS}/"))?.1.split_once(':')?.0;
                Some(format!("{pod} {share}"))
            })
            .collect();
        (out.status.code() == Some(0), pods, text)
    }

    /// `n` requests on one keep-alive connection (http.client): pod -> count.
    fn tally(&self, port: u16, path: &str, n: usize) -> BTreeMap<String, u64> {
        let script = r#"
import http.client, json, sys, collections
host, port, path, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
c = http.client.HTTPConnection(host, port, timeout=5)
seen = collections.Counter()
for i in range(n):
    c.request("GET", path)
    r = c.getresponse()
    body = r.read()
    seen[json.loads(body)["pod"] if r.status == 200 else f"status {r.status}"] += 1
print(json.dumps(seen))
"#;
        let out = self
            .t
            .lab
            .exec("client", PYTHON)
            .unwrap()
            .args(["-c", script, ECHO_VIP, &port.to_string(), path, &n.to_string()])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
            panic!(
                "tally: {} {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }
}

fn route(kind: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: {kind}\nmetadata:\n  name: {name}\n  namespace: {NS}\nspec:\n{spec}"
    )
}

const PARENT_ALL: &str = "  parentRefs:\n  - group: \"\"\n    kind: Service\n    name: echo\n";
const PARENT_80: &str = "  parentRefs:\n  - group: \"\"\n    kind: Service\n    name: echo\n    port: 80\n";

#[test]
fn http_routes_split_match_modify_redirect_and_rewrite_as_the_conformance_suite_says() {
    let g = Gamma::up(&[]);

    // mesh-split: Exact /v1 and /v2; any other request is rejected.
    g.apply(
        "HTTPRoute gateway-conformance-mesh/mesh-split",
        &route(
            "HTTPRoute",
            "mesh-split",
            &format!(
                "{PARENT_ALL}  rules:\n  - matches:\n    - path:\n        type: Exact\n        value: /v1\n    backendRefs:\n    - name: echo-v1\n      port: 80\n  \
                 - matches:\n    - path:\n        type: Exact\n        value: /v2\n    backendRefs:\n    - name: echo-v2\n      port: 80\n"
            ),
        ),
    );
    assert_eq!(g.get("/v1", &[]).1["pod"], "echo-v1");
    assert_eq!(g.get("/v2", &[]).1["pod"], "echo-v2", "across the tunnel");
    assert_eq!(g.get("/", &[]).0, 404);
    assert_eq!(g.get("/v1/x", &[]).0, 404);

    // mesh-weighted-backends: 70/30 on port 80, over 1,000 requests on one connection.
    g.apply(
        "HTTPRoute gateway-conformance-mesh/mesh-weighted-backends",
        &route(
            "HTTPRoute",
            "mesh-weighted-backends",
            &format!(
                "{PARENT_80}  rules:\n  - backendRefs:\n    - name: echo-v1\n      port: 8080\n      weight: 70\n    \
                 - name: echo-v2\n      port: 8080\n      weight: 30\n"
            ),
        ),
    );
    let t = g.tally(80, "/", 1000);
    println!("70/30 over 1,000 requests: {t:?}");
    let v2 = *t.get("echo-v2").unwrap_or(&0) as f64 / 10.0;
    assert!((v2 - 30.0).abs() <= 2.0 && t.values().sum::<u64>() == 1000, "{t:?}");
    assert_eq!(
        g.policy_check(80, "GET", "/", &[]).1,
        ["echo-v1 70.0%", "echo-v2 30.0%"],
        "policy check shows the weights in force"
    );
    // Port 8080 has no route: plain service load balancing, no 404.
    let plain = g.tally(8080, "/x", 20);
    assert_eq!(plain.values().sum::<u64>(), 20, "{plain:?}");
    assert!(!plain.keys().any(|k| k.starts_with("status")), "{plain:?}");

    // mesh-matching: precedence of prefix length and header matches.
    g.apply(
        "HTTPRoute gateway-conformance-mesh/mesh-matching",
        &route(
            "HTTPRoute",
            "mesh-matching",
            &format!(
                "{PARENT_80}  rules:\n  - matches:\n    - path:\n        type: PathPrefix\n        value: /\n    - headers:\n      - name: version\n        value: one\n    \
                 backendRefs:\n    - name: echo-v1\n      port: 8080\n  \
                 - matches:\n    - path:\n        type: PathPrefix\n        value: /v2\n    - headers:\n      - name: version\n        value: two\n    \
                 backendRefs:\n    - name: echo-v2\n      port: 8080\n"
            ),
        ),
    );
    for (path, headers, want) in [
        ("/", &[][..], "echo-v1"),
        ("/example", &[][..], "echo-v1"),
        ("/", &["version: one"][..], "echo-v1"),
        ("/v2", &[][..], "echo-v2"),
        ("/v2/example", &[][..], "echo-v2"),
        ("/", &["version: two"][..], "echo-v2"),
    ] {
        assert_eq!(g.get(path, headers).1["pod"], want, "{path} {headers:?}");
        // `policy check` names the same backend, alone (must-show 3).
        let (allowed, pods, text) = g.policy_check(80, "GET", path, headers);
        assert!(allowed, "{path} {headers:?}: {text}");
        assert_eq!(
            pods,
            [format!("{want} 100.0%")],
            "policy check for {path} {headers:?}: {text}"
        );
    }

    // mesh-request-header-modifier: set, add, remove.
    g.apply(
        "HTTPRoute gateway-conformance-mesh/mesh-request-header-modifier",
        &route(
            "HTTPRoute",
            "mesh-request-header-modifier",
            &format!(
                "{PARENT_80}  rules:\n  - matches:\n    - path:\n        type: PathPrefix\n        value: /set\n    filters:\n    - type: RequestHeaderModifier\n      \
                 requestHeaderModifier:\n        set:\n        - name: X-Header-Set\n          value: set-overwrites-values\n    backendRefs:\n    - name: echo-v1\n      port: 8080\n  \
                 - matches:\n    - path:\n        type: PathPrefix\n        value: /add\n    filters:\n    - type: RequestHeaderModifier\n      \
                 requestHeaderModifier:\n        add:\n        - name: X-Header-Add\n          value: add-appends-values\n    backendRefs:\n    - name: echo-v1\n      port: 8080\n  \
                 - matches:\n    - path:\n        type: PathPrefix\n        value: /remove\n    filters:\n    - type: RequestHeaderModifier\n      \
                 requestHeaderModifier:\n        remove:\n        - X-Header-Remove\n    backendRefs:\n    - name: echo-v1\n      port: 8080\n  \
                 - matches:\n    - path:\n        type: PathPrefix\n        value: /response\n    filters:\n    - type: ResponseHeaderModifier\n      \
                 responseHeaderModifier:\n        set:\n        - name: X-Served-Through\n          value: mesh\n    backendRefs:\n    - name: echo-v2\n      port: 8080\n"
            ),
        ),
    );
    let h = |path: &str, headers: &[&str]| g.get(path, headers).1["headers"].clone();
    assert_eq!(
        h("/set", &["X-Header-Set: some-other-value"])["x-header-set"],
        "set-overwrites-values"
    );
    assert_eq!(
        h("/add", &["X-Header-Add: some-other-value"])["x-header-add"],
        "some-other-value,add-appends-values"
    );
    let removed = h("/remove", &["X-Header-Remove: val", "X-Keep: yes"]);
    assert!(
        removed.get("x-header-remove").is_none() && removed["x-keep"] == "yes",
        "{removed}"
    );
    let (_, _, head) = g.curl(&[
        "-D",
        "/dev/stdout",
        "-o",
        "/dev/null",
        &format!("http://{ECHO_VIP}/response"),
    ]);
    assert!(head.to_ascii_lowercase().contains("x-served-through: mesh"), "{head}");

    // mesh-redirect-path and mesh-rewrite-path.
    g.apply(
        "HTTPRoute gateway-conformance-mesh/mesh-redirect-rewrite",
        &route(
            "HTTPRoute",
            "mesh-redirect-rewrite",
            &format!(
                "{PARENT_80}  rules:\n  - matches:\n    - path:\n        type: PathPrefix\n        value: /original-prefix\n    filters:\n    - type: RequestRedirect\n      \
                 requestRedirect:\n        path:\n          type: ReplacePrefixMatch\n          replacePrefixMatch: /replacement-prefix\n  \
                 - matches:\n    - path:\n        type: PathPrefix\n        value: /path-and-status\n    filters:\n    - type: RequestRedirect\n      \
                 requestRedirect:\n        hostname: example.org\n        path:\n          type: ReplaceFullPath\n          replaceFullPath: /full\n        statusCode: 301\n  \
                 - matches:\n    - path:\n        type: PathPrefix\n        value: /prefix/one\n    filters:\n    - type: URLRewrite\n      \
                 urlRewrite:\n        path:\n          type: ReplacePrefixMatch\n          replacePrefixMatch: /one\n    backendRefs:\n    - name: echo-v1\n      port: 80\n  \
                 - matches:\n    - path:\n        type: PathPrefix\n        value: /strip-prefix\n    filters:\n    - type: URLRewrite\n      \
                 urlRewrite:\n        hostname: rewritten.example\n        path:\n          type: ReplacePrefixMatch\n          replacePrefixMatch: /\n    backendRefs:\n    - name: echo-v2\n      port: 80\n"
            ),
        ),
    );
    let (code, location, _) = g.curl(&[&format!("http://{ECHO_VIP}/original-prefix/lemon?x=1")]);
    assert_eq!(
        (code, location.as_str()),
        (302, format!("http://{ECHO_VIP}/replacement-prefix/lemon?x=1").as_str())
    );
    let (code, location, _) = g.curl(&[&format!("http://{ECHO_VIP}/path-and-status/x")]);
    assert_eq!((code, location.as_str()), (301, "http://example.org/full"));
    let (_, echo) = g.get("/prefix/one/two?q=1", &[]);
    assert_eq!(
        (echo["pod"].as_str(), echo["path"].as_str()),
        (Some("echo-v1"), Some("/one/two?q=1"))
    );
    let (_, echo) = g.get("/strip-prefix/three", &[]);
    assert_eq!(echo["path"], "/three");
    assert_eq!(echo["headers"]["host"], "rewritten.example");

    // HTTP/2 with prior knowledge (curl) through a weighted route on the h2c port.
    g.apply(
        "HTTPRoute gateway-conformance-mesh/h2c-weighted",
        &route(
            "HTTPRoute",
            "h2c-weighted",
            "  parentRefs:\n  - {group: \"\", kind: Service, name: echo, port: 8081}\n  rules:\n  \
             - backendRefs:\n    - {name: echo-v1, port: 8081, weight: 1}\n    - {name: echo-v2, port: 8081, weight: 1}\n",
        ),
    );
    let mut seen = BTreeMap::new();
    for _ in 0..40 {
        let (code, _, body) = g.curl(&["--http2-prior-knowledge", &format!("http://{ECHO_VIP}:8081/h2")]);
        assert_eq!(code, 200, "{body}");
        assert!(body.trim_end().ends_with("/h2 HTTP/2.0"), "{body}");
        *seen
            .entry(body.split(' ').next().unwrap_or("").to_string())
            .or_insert(0) += 1;
    }
    // 1:1 takes turns per request; a table rebuilt mid-run (the file
    // source's next scan) starts its turns again, so allow one step off.
    for pod in ECHOES {
        let n = seen.get(pod).copied().unwrap_or(0);
        assert!((18..=22).contains(&n), "{pod}: {n} of 40 HTTP/2 requests: {seen:?}");
    }
}

/// HTTPRoute timeouts (GEP-1742) on the client's node: a stalled backend
/// ends at the rule's timeout with a 504, same node and across the tunnel;
/// the keep-alive connection serves the next request; `0s` turns it off;
/// `policy check` names it.
#[test]
fn an_http_route_timeout_answers_504_at_its_deadline() {
    let g = Gamma::up(&[]);
    let rule = |path: &str, backend: &str, timeouts: &str| {
        format!(
            "  - matches: [{{path: {{type: PathPrefix, value: {path}}}}}]\n    timeouts: {timeouts}\n    backendRefs: [{{name: {backend}, port: 8080}}]\n"
        )
    };
    g.apply(
        "HTTPRoute gateway-conformance-mesh/timeouts",
        &route(
            "HTTPRoute",
            "timeouts",
            &format!(
                "{PARENT_80}  rules:\n{}{}{}",
                rule("/v1", "echo-v1", "{request: 500ms}"),
                rule("/v2", "echo-v2", "{request: 10s, backendRequest: 300ms}"),
                rule("/off", "echo-v1", "{request: 0s}"),
            ),
        ),
    );
    // (status, seconds) of one curl request.
    let timed = |path: &str, delay_ms: u64| -> (u16, f64) {
        let out =
            g.t.lab
                .exec("client", "curl")
                .unwrap()
                .args(["-s", "-m", "5", "-o", "/dev/null", "-w", "%{http_code} %{time_total}"])
                .args(["-H", &format!("x-echo-delay-ms: {delay_ms}")])
                .arg(format!("http://{ECHO_VIP}{path}"))
                .output()
                .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (code, secs) = text.split_once(' ').unwrap_or(("0", "0"));
        (code.parse().unwrap_or(0), secs.parse().unwrap_or(0.0))
    };
    for (path, limit) in [("/v1", 0.5), ("/v2", 0.3)] {
        for _ in 0..5 {
            let (code, secs) = timed(path, 2000);
            assert_eq!(code, 504, "{path}: a stalled backend gets 504");
            assert!(
                (secs - limit).abs() <= 0.05,
                "{path}: ended after {secs:.3} s, want {limit} s +- 50 ms"
            );
        }
        let (code, secs) = timed(path, 100);
        assert!(
            code == 200 && secs < limit,
            "{path}: a prompt answer passes ({code}, {secs:.3} s)"
        );
    }
    let (code, secs) = timed("/off", 1000);
    assert!(
        code == 200 && secs >= 1.0,
        "0s turns the timeout off ({code}, {secs:.3} s)"
    );
    // One keep-alive connection: timed out, then served.
    let script = r#"
import http.client, json, sys
c = http.client.HTTPConnection(sys.argv[1], 80, timeout=5)
out = []
for delay in (2000, 0, 2000, 0):
    c.request("GET", "/v1", headers={"x-echo-delay-ms": str(delay)})
    r = c.getresponse()
    r.read()
    out.append(r.status)
print(json.dumps(out))
"#;
    let statuses = g.python_json(script, &[ECHO_VIP]);
    assert_eq!(
        statuses,
        serde_json::json!([504, 200, 504, 200]),
        "keep-alive after a timeout"
    );
    let (_, _, text) = g.policy_check(80, "GET", "/v2/x", &[]);
    assert!(
        text.contains("no response within 300ms (the rule's backendRequest timeout): answered 504"),
        "{text}"
    );
}

/// HTTPRoute retry (GEP-1731) on the client's node, across the tunnel: a
/// backend failing 3 of every 10 requests with 503 serves every one of
/// 2,000 with 3 retries, 70% without; a POST's kept body is sent again
/// whole; a body of unknown length is not kept, so not retried; a retry
/// the request timeout would cut short is not made.
#[test]
fn an_http_route_retry_turns_a_flaky_backend_into_successes() {
    let g = Gamma::up(&[]);
    g.apply(
        "HTTPRoute gateway-conformance-mesh/retries",
        &route(
            "HTTPRoute",
            "retries",
            &format!(
                "{PARENT_80}  rules:\n  - matches: [{{path: {{type: PathPrefix, value: /retry}}}}]\n    \
                 retry: {{codes: [503], attempts: 3, backoff: 1ms}}\n    backendRefs: [{{name: echo-v2, port: 8080}}]\n  \
                 - matches: [{{path: {{type: PathPrefix, value: /once}}}}]\n    backendRefs: [{{name: echo-v2, port: 8080}}]\n  \
                 - matches: [{{path: {{type: PathPrefix, value: /short}}}}]\n    timeouts: {{request: 500ms}}\n    \
                 retry: {{codes: [503], attempts: 3, backoff: 1s}}\n    backendRefs: [{{name: echo-v2, port: 8080}}]\n"
            ),
        ),
    );
    let script = r#"
import http.client, json, sys
path, n, mode = sys.argv[2], int(sys.argv[3]), sys.argv[4]
c = http.client.HTTPConnection(sys.argv[1], 80, timeout=5)
statuses, bodies = {}, []
for i in range(n):
    h = {"x-echo-fail-per-10": "3"}
    if mode == "post":
        c.request("POST", path, body=b"hello", headers=h)
    elif mode == "chunked":
        c.request("POST", path, body=iter([b"hel", b"lo"]), headers=h, encode_chunked=True)
    else:
        c.request("GET", path, headers=h)
    r = c.getresponse()
    data = r.read()
    statuses[r.status] = statuses.get(r.status, 0) + 1
    if r.status == 200:
        bodies.append(json.loads(data)["body_bytes"])
print(json.dumps({"statuses": statuses, "bodies": sorted(set(bodies))}))
"#;
    let run = |path: &str, n: usize, mode: &str| g.python_json(script, &[ECHO_VIP, path, &n.to_string(), mode]);
    let retried = run("/retry", 2000, "get");
    let ok = retried["statuses"]["200"].as_u64().unwrap_or(0);
    println!("with 3 retries: {retried}");
    assert!(ok >= 1980, "with 3 retries at least 99% of 2,000 succeed: {retried}");
    let once = run("/once", 2000, "get");
    let ok = once["statuses"]["200"].as_u64().unwrap_or(0);
    println!("without retries: {once}");
    assert!((1300..=1500).contains(&ok), "without retries about 70% succeed: {once}");
    let post = run("/retry", 20, "post");
    assert_eq!(post["statuses"]["200"], 20, "POSTs with a kept body: {post}");
    assert_eq!(
        post["bodies"],
        serde_json::json!([5]),
        "every retry carried the whole body: {post}"
    );
    let chunked = run("/retry", 10, "chunked");
    assert_eq!(
        chunked["statuses"]["503"], 3,
        "a body of unknown length is not kept, so not retried: {chunked}"
    );
    // A retry the request timeout would cut short is not made: the
    // client gets the backend's own 503, not a 504.
    let short = run("/short", 10, "get");
    assert_eq!(short["statuses"]["503"], 3, "{short}");
    assert!(short["statuses"].get("504").is_none(), "{short}");
    let (_, _, text) = g.policy_check(80, "GET", "/retry", &[]);
    assert!(
        text.contains("retried up to 3 time(s), 1ms apart, on a failed connect or status [503]"),
        "{text}"
    );
    // Request telemetry on the client's node: one count per client request
    // (not per attempt), by route, Service, client identity, status class.
    let metrics = mesh_tests::metrics_text(&g.t.lab, "node-a");
    let count = |rule: usize, class: &str| {
        mesh_tests::metric(
            &metrics,
            "mesh_http_requests_total",
            &[
                ("route", &format!("HTTPRoute {NS}/retries rule {rule} match 0")),
                ("service", &format!("{NS}/echo:80")),
                ("source", &format!("{NS}/client")),
                ("status_class", class),
            ],
        )
    };
    assert_eq!(count(0, "2xx"), (2000 + 20 + 7) as f64, "retried rule, 2xx");
    assert_eq!(count(0, "5xx"), 3.0, "retried rule, 5xx (the chunked ones)");
    assert_eq!(count(1, "2xx"), ok as f64, "once rule, 2xx");
    assert_eq!(count(1, "5xx"), (2000 - ok) as f64, "once rule, 5xx");
    let timed = mesh_tests::metric(
        &metrics,
        "mesh_http_request_duration_seconds_count",
        &[("route", &format!("HTTPRoute {NS}/retries rule 1 match 0"))],
    );
    assert_eq!(timed, 2000.0, "every request of the once rule is timed");
}

/// RequestMirror: every request to echo-v1 is also sent to echo-v2 across
/// the tunnel, POSTs with their bodies included; the client sees only
/// echo-v1's answers; percent 0 copies nothing.
#[test]
fn a_request_mirror_gets_every_request_and_the_client_only_the_primarys_answers() {
    let g = Gamma::up(&[]);
    let mirrored = |path: &str, to: &str, percent: &str| {
        format!(
            "  - matches: [{{path: {{type: PathPrefix, value: {path}}}}}]\n    filters:\n    - type: RequestMirror\n      \
             requestMirror: {{backendRef: {{name: {to}, port: 8080}}{percent}}}\n    backendRefs: [{{name: echo-v1, port: 8080}}]\n"
        )
    };
    g.apply(
        "HTTPRoute gateway-conformance-mesh/mirror",
        &route(
            "HTTPRoute",
            "mirror",
            &format!(
                "{PARENT_80}  rules:\n{}{}",
                mirrored("/copied", "echo-v2", ""),
                mirrored("/never", "echo-v2", ", percent: 0"),
            ),
        ),
    );
    let script = r#"
import http.client, json, sys
c = http.client.HTTPConnection(sys.argv[1], 80, timeout=5)
pods = {}
for i in range(200):
    path = "/copied/%d" % (i % 2) if i < 100 else "/never/%d" % (i % 2)
    if i % 2:
        c.request("POST", path, body=b"x" * 1000, headers={"x-echo-fail-per-10": "0"})
    else:
        c.request("GET", path)
    r = c.getresponse()
    got = json.loads(r.read())
    pods[got["pod"]] = pods.get(got["pod"], 0) + 1
print(json.dumps(pods))
"#;
    let pods = g.python_json(script, &[ECHO_VIP]);
    assert_eq!(
        pods,
        serde_json::json!({"echo-v1": 200}),
        "the client sees only the primary"
    );
    let stats = |pod: &str| -> Value {
        let (_, body) = g.get_from(&format!("http://{}:8080/echo-stats", g.ip(pod)));
        body
    };
    wait_for("echo-v2 got every copy", Duration::from_secs(5), || {
        let s = stats("echo-v2");
        s["/copied/0"] == 50 && s["/copied/1"] == 50
    });
    let (v1, v2) = (stats("echo-v1"), stats("echo-v2"));
    assert_eq!(v1["/copied/0"], 50, "{v1}");
    assert!(
        v2.get("/never/0").is_none() && v2.get("/never/1").is_none(),
        "percent 0 copies nothing: {v2}"
    );
    let (_, _, text) = g.policy_check(80, "GET", "/copied/0", &[]);
    assert!(
        text.contains("100% of requests also copied to gateway-conformance-mesh/echo-v2:8080 (RequestMirror"),
        "{text}"
    );
}

#[test]
fn grpc_and_tcp_routes_split_by_weight_and_route_grpc_methods() {
    let g = Gamma::up(&[]);
    let grpc = |method: &str, n: usize| -> Value {
        let out =
            g.t.lab
                .exec("client", PYTHON)
                .unwrap()
                .args(["-c", GRPC_CLIENT, &format!("{ECHO_VIP}:7070"), method, &n.to_string()])
                .output()
                .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("grpc: {}", String::from_utf8_lossy(&out.stderr)))
    };
    // mesh-grpc-weighted-backends: 70/30/0 (echo-v3 does not exist: weight 0 sends it nothing).
    g.apply(
        "GRPCRoute gateway-conformance-mesh/mesh-grpc-weighted-backends",
        &route(
            "GRPCRoute",
            "mesh-grpc-weighted-backends",
            "  parentRefs:\n  - group: \"\"\n    kind: Service\n    name: echo\n    port: 7070\n  rules:\n  - backendRefs:\n    \
             - name: echo-v1\n      port: 7070\n      weight: 70\n    - name: echo-v2\n      port: 7070\n      weight: 30\n    \
             - name: echo-v3\n      port: 7070\n      weight: 0\n",
        ),
    );
    let v = grpc("Who", 200);
    assert_eq!(
        (&v["answered"]["echo-v1"], &v["answered"]["echo-v2"]),
        (&140.into(), &60.into()),
        "{v}"
    );
    // By method: Who to v1, Secret to v2; any other method is UNIMPLEMENTED.
    g.apply(
        "GRPCRoute gateway-conformance-mesh/by-method",
        &route(
            "GRPCRoute",
            "by-method",
            "  parentRefs:\n  - {group: \"\", kind: Service, name: echo, port: 7070}\n  rules:\n  \
             - matches:\n    - method: {service: mesh.Echo, method: Who}\n    backendRefs:\n    - {name: echo-v1, port: 7070}\n  \
             - matches:\n    - method: {service: mesh.Echo, method: Secret}\n    backendRefs:\n    - {name: echo-v2, port: 7070}\n",
        ),
    );
    assert_eq!(grpc("Who", 20)["answered"]["echo-v1"], 20);
    assert_eq!(
        grpc("Secret", 20)["answered"]["secret"],
        20,
        "every Secret call answered by echo-v2"
    );
    let chat = grpc("Chat", 3);
    assert_eq!(chat["errors"]["UNIMPLEMENTED"], 1, "{chat}");

    // A TCPRoute on port 9090: 70/30 at connect(), in the kernel.
    g.apply(
        "TCPRoute gateway-conformance-mesh/tcp-weighted",
        "apiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TCPRoute\nmetadata: {name: tcp-weighted, namespace: gateway-conformance-mesh}\n\
         spec:\n  parentRefs:\n  - {group: \"\", kind: Service, name: echo, port: 9090}\n  rules:\n  \
         - backendRefs:\n    - {name: echo-v1, port: 9090, weight: 70}\n    - {name: echo-v2, port: 9090, weight: 30}\n",
    );
    let out =
        g.t.lab
            .exec("client", LABTOOL)
            .unwrap()
            .args(["tally", "--to", &format!("{ECHO_VIP}:9090"), "--count", "1000"])
            .output()
            .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["failed"], 0, "{v}");
    let at = |pod: &str| v["servers"][format!("{}:9090", g.ip(pod))].as_u64().unwrap_or(0);
    println!("TCPRoute 70/30 over 1,000 connections: {v}");
    assert!(
        (at("echo-v2") as f64 / 10.0 - 30.0).abs() <= 2.0 && at("echo-v1") + at("echo-v2") == 1000,
        "{v}"
    );
}

/// GEP-3779: `client` may reach the `app: echo` pods on 9090 only; nobody
/// else may reach them at all (enforcing mode).
#[test]
fn an_authorization_policy_allows_its_sources_on_its_ports_and_nothing_else() {
    let g = Gamma::up(&["--policy-mode=enforcing"]);
    g.write(
        "authz.yaml",
        "apiVersion: gateway.networking.x-k8s.io/v1alpha1\nkind: AuthorizationPolicy\n\
         metadata: {name: echo-clients, namespace: gateway-conformance-mesh}\n\
         spec:\n  targetRefs:\n  - kind: Pod\n    selector: {matchLabels: {app: echo}}\n  action: ALLOW\n  enforcementLevel: Network\n  \
         rules:\n  - sources:\n    - type: ServiceAccount\n      serviceAccount: {name: client}\n    networkAttributes: {ports: [9090]}\n",
    );
    wait_for("policy in force", Duration::from_secs(5), || {
        ["node-a", "node-b"].iter().all(|n| {
            log_records(&g.t.lab.agent_log(n))
                .iter()
                .any(|r| r["message"] == "policy in force" && r["targets"] == 1)
        })
    });
    let can = |from: &str, pod: &str, port: u16| {
        let to = format!("{}:{port}", g.ip(pod)).parse().unwrap();
        g.t.traffic().connect(from, to, 1000).unwrap()["ok"] == true
    };
    for pod in ECHOES {
        assert!(can("client", pod, 9090), "client -> {pod}:9090 is allowed");
        assert!(
            !can("client", pod, 8080),
            "client -> {pod}:8080: not a port of the rule"
        );
        assert!(!can("stranger", pod, 9090), "stranger -> {pod}:9090: not a source");
    }
}
