//! Shared pieces of the end-to-end tests: the per-test lab and its traffic.
use std::{
    net::SocketAddr,
    path::PathBuf,
    process::Child,
    time::{Duration, Instant},
};

use serde_json::Value;
use xtask::{
    lab::{self, Lab, Topology, UpOptions},
    probe::{self, Traffic},
};

pub const TOPOLOGY: &str = "
nodes: [{name: node-a}, {name: node-b}]
pods:
  - {name: pod-a, namespace: t, serviceAccount: sa-a, node: node-a}
  - {name: pod-b, namespace: t, serviceAccount: sa-b, node: node-a}
  - {name: pod-c, namespace: t, serviceAccount: sa-c, node: node-b}
";
pub const PORT: u16 = 8080;

pub fn agent_bin() -> PathBuf {
    std::env::var_os("MESH_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| probe::built_binary("mesh-agent"))
}

/// The lab for one test; removed on drop, also when the test panics.
pub struct TestLab {
    pub lab: Lab,
    servers: Vec<Child>,
    labtool: PathBuf,
}

impl Drop for TestLab {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        if std::thread::panicking() {
            keep_logs();
        }
        lab::down().expect("lab down");
    }
}

/// A failing test's agent and CA logs and audit trails, copied out of the
/// lab's state directory (which `down` removes) to `target/lab-logs/<pid>/`.
fn keep_logs() {
    let dir = xtask::target_dir()
        .join("lab-logs")
        .join(std::process::id().to_string());
    let _ = std::fs::create_dir_all(&dir);
    for entry in std::fs::read_dir(lab::STATE_DIR).into_iter().flatten().flatten() {
        let path = entry.path();
        if matches!(path.extension().and_then(|e| e.to_str()), Some("log" | "jsonl")) {
            let _ = std::fs::copy(&path, dir.join(entry.file_name()));
        }
    }
    eprintln!("lab logs kept in {}", dir.display());
}

impl TestLab {
    pub fn up(agent_args: &[&str], labtool: &str) -> TestLab {
        Self::up_with(TOPOLOGY, agent_args, labtool)
    }

    /// A lab from `topology` (YAML); servers on :PORT in pod-b, pod-c (and
    /// pod-d when the topology has it).
    pub fn up_with(topology: &str, agent_args: &[&str], labtool: &str) -> TestLab {
        assert!(
            std::fs::metadata(agent_bin()).is_ok(),
            "agent binary {} missing: run through `cargo xtask test`",
            agent_bin().display()
        );
        lab::down().expect("clean slate");
        let topo: Topology = serde_yaml_from(topology);
        let lab = Lab::up(
            &topo,
            &UpOptions {
                agent_bin: agent_bin(),
                policy_dir: None,
                start_agents: true,
                // No SMI policy in these labs: permissive, unless a test says otherwise.
                agent_args: std::iter::once("--policy-mode=permissive")
                    .chain(agent_args.iter().copied())
                    .map(String::from)
                    .collect(),
            },
        )
        .expect("lab up");
        let mut t = TestLab {
            lab,
            servers: vec![],
            labtool: PathBuf::from(labtool),
        };
        for pod in ["pod-b", "pod-c", "pod-d"]
            .into_iter()
            .filter(|p| topo.pods.iter().any(|q| q.name == *p))
        {
            let child = t.traffic().serve(pod, PORT).expect("server");
            t.servers.push(child);
        }
        t.wait_ready(Duration::from_secs(10));
        t
    }

    /// Waits, at most `limit`, until every node's agent answers `/readyz`
    /// (its policy applied and its pods' certificates held): "agent ready"
    /// in the log only means it listens. Not an assertion: tests that
    /// start agents which cannot become ready check what they expect.
    pub fn wait_ready(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut pending: Vec<&str> = self.lab.nodes.iter().map(|n| n.name.as_str()).collect();
        while !pending.is_empty() && Instant::now() < deadline {
            pending.retain(|node| {
                let n = self.lab.node(node).unwrap();
                !self
                    .lab
                    .node_exec(node, "curl")
                    .unwrap()
                    .args(["-sf", "-m", "1", &format!("http://{}:15021/readyz", n.fabric_ip)])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            });
            if !pending.is_empty() {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    pub fn traffic(&self) -> Traffic<'_> {
        Traffic {
            lab: &self.lab,
            labtool: self.labtool.clone(),
        }
    }

    pub fn addr(&self, pod: &str) -> SocketAddr {
        SocketAddr::from((self.lab.pod(pod).unwrap().ip, PORT))
    }

    pub fn proxied(&self, node: &str) -> Vec<Value> {
        probe::proxied_connections(&self.lab, node)
    }

    /// Waits (briefly) for the agent's "connection closed" records to reach `n`.
    pub fn wait_proxied(&self, node: &str, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let recs = self.proxied(node);
            if recs.len() >= n || Instant::now() > deadline {
                return recs;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn serde_yaml_from(text: &str) -> Topology {
    // The lab's own parser (via a file) keeps one code path for topologies.
    let path = std::env::temp_dir().join(format!("mesh-topology-{}.yaml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    let topo = Topology::from_file(&path).unwrap();
    let _ = std::fs::remove_file(path);
    topo
}

pub fn assert_intact(r: &Value) {
    assert_eq!(r["ok"], true, "transfer not intact: {r}");
    assert_eq!(r["sent_sha256"], r["reply"]["sha256"], "{r}");
}

/// Waits until `f` holds, polling; panics with `what` after `limit`.
pub fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// JSON log records of a file (agents and the CA log JSON lines).
pub fn log_records(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// An agent's /metrics text, fetched from inside its node.
pub fn metrics_text(lab: &xtask::lab::Lab, node: &str) -> String {
    let n = lab.node(node).expect("node");
    let out = lab
        .node_exec(node, "curl")
        .expect("curl")
        .args([
            "-sf",
            "--max-time",
            "5",
            &format!("http://{}:15020/metrics", n.fabric_ip),
        ])
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The sum of the samples of `name` whose labels include every one of
/// `labels`; 0 when none match.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            (n == name && labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// Runs a Python script in `pod` and reads the JSON it prints.
pub fn python_json(lab: &xtask::lab::Lab, pod: &str, script: &str, args: &[&str]) -> Value {
    let out = lab
        .exec(pod, programs::PYTHON)
        .expect("python")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("python");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "python printed {:?}: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// A process the test started, killed and reaped however the test ends.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Captures the fabric bridge (all node-to-node traffic) into a pcap,
/// headers plus the first bytes of each payload.
pub struct Capture {
    child: std::process::Child,
    file: std::path::PathBuf,
}

impl Capture {
    pub fn start(tag: &str) -> Capture {
        Self::start_snaplen(tag, 200)
    }

    /// With `snaplen` bytes of each packet (whole handshakes need ~1,500).
    pub fn start_snaplen(tag: &str, snaplen: u32) -> Capture {
        let file = std::env::temp_dir().join(format!("mesh-fabric-{tag}-{}.pcap", std::process::id()));
        let child = lab::in_netns(lab::FABRIC_NETNS, "tcpdump")
            .args(["-i", "br0", "-s", &snaplen.to_string(), "-U", "-n", "-w"])
            .arg(&file)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("tcpdump");
        std::thread::sleep(Duration::from_millis(700));
        Capture { child, file }
    }

    /// Stops the capture and returns the pcap bytes.
    pub fn stop(&mut self) -> Vec<u8> {
        std::thread::sleep(Duration::from_millis(300));
        // SIGINT lets tcpdump flush.
        let _ = std::process::Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        std::fs::read(&self.file).unwrap_or_default()
    }

    /// The key exchange group of every TLS 1.3 ServerHello on the tunnel
    /// port, as tshark dissects it (QUIC Initial packets decrypted by
    /// tshark itself): IANA numbers, 4588 = X25519MLKEM768, 29 = X25519.
    pub fn server_key_shares(&self, tunnel_port: u16) -> Vec<String> {
        let out = std::process::Command::new("tshark")
            .args(["-n", "-r"])
            .arg(&self.file)
            .args(["-d", &format!("udp.port=={tunnel_port},quic")])
            .args(["-d", &format!("tcp.port=={tunnel_port},tls")])
            .args(["-Y", "tls.handshake.type == 2", "-T", "fields"])
            .args(["-e", "tls.handshake.extensions_key_share_group"])
            .output()
            .expect("tshark (run ./run.sh setup)");
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .flat_map(|l| l.split(','))
            .map(str::to_string)
            .collect()
    }

    pub fn count(&self, filter: &str) -> usize {
        let out = std::process::Command::new("tcpdump")
            .args(["-n", "-r"])
            .arg(&self.file)
            .arg(filter)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).lines().count()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.file);
    }
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Real programs the L7 tests run in pods: Python's grpcio (from the tools
/// venv `run.sh setup` makes) and Python's own HTTP server.
pub mod programs {
    /// The Python with grpcio.
    pub const PYTHON: &str = "/opt/mesh-tools/venv/bin/python";

    /// `name port`: a gRPC server (service `mesh.Echo`: unary `Who` and
    /// `Secret`, bidirectional `Chat`) that names itself in every answer.
    pub const GRPC_SERVER: &str = r#"
import sys
from concurrent import futures
import grpc
name, port = sys.argv[1], int(sys.argv[2])
def who(request, context):
    return name.encode() + b" " + request
def secret(request, context):
    return b"secret of " + name.encode()
def chat(requests, context):
    for m in requests:
        yield name.encode() + b":" + m
handlers = {
    "Who": grpc.unary_unary_rpc_method_handler(who),
    "Secret": grpc.unary_unary_rpc_method_handler(secret),
    "Chat": grpc.stream_stream_rpc_method_handler(chat),
}
server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("mesh.Echo", handlers),))
server.add_insecure_port(f"0.0.0.0:{port}")
server.start()
server.wait_for_termination()
"#;

    /// `target method runs [header: value ...]`: one channel (one HTTP/2
    /// connection), `runs` calls; which pod answered, and the errors by code.
    /// Method `Chat` is one bidirectional stream of `runs` messages.
    pub const GRPC_CLIENT: &str = r#"
import collections, json, sys
import grpc
target, method, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
metadata = [tuple(h.split(": ", 1)) for h in sys.argv[4:]]
channel = grpc.insecure_channel(target)
answered, errors, details = collections.Counter(), collections.Counter(), set()
if method == "Chat":
    call = channel.stream_stream("/mesh.Echo/Chat")
    try:
        for reply in call((b"m%d" % i for i in range(runs)), metadata=metadata, timeout=20):
            answered[reply.decode().split(":")[0]] += 1
    except grpc.RpcError as e:
        errors[e.code().name] += 1
        details.add(e.details())
else:
    call = channel.unary_unary(f"/mesh.Echo/{method}")
    for i in range(runs):
        try:
            answered[call(b"hi", metadata=metadata, timeout=5).decode().split()[0]] += 1
        except grpc.RpcError as e:
            errors[e.code().name] += 1
            details.add(e.details())
print(json.dumps({"answered": answered, "errors": errors, "details": sorted(details)[:5]}))
"#;

    /// `name port`: Python's HTTP/1.1 server answering every request with
    /// JSON: the pod's name, method, path (with query), request headers
    /// (lowercase names, repeated ones joined with `,`) and the body's
    /// length; after `x-echo-delay-ms` milliseconds when the request
    /// carries it; with a 503 for N of every 10 requests it has counted
    /// (the first N of each ten) when it carries `x-echo-fail-per-10: N`.
    /// `GET /echo-stats` answers how many requests it got per path;
    /// `POST /echo-control` with `x-echo-fail-all: 1` (or `0`) makes it
    /// answer every other request with a 503 (or stop).
    pub const HTTP_ECHO: &str = r#"
import json, sys, threading, time
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
name, port = sys.argv[1], int(sys.argv[2])
lock, seen, paths, fail_all = threading.Lock(), [0], {}, [False]
class Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body are two writes: without this, Nagle holds the body
    # for the client's delayed ACK (40 ms per keep-alive request).
    disable_nagle_algorithm = True
    def answer(self):
        if self.path in ("/echo-stats", "/echo-control"):
            with lock:
                if self.path == "/echo-control":
                    fail_all[0] = self.headers.get("x-echo-fail-all") == "1"
                stats = json.dumps(paths).encode()
            self.send_response(200)
            self.send_header("content-length", str(len(stats)))
            self.end_headers()
            self.wfile.write(stats)
            return
        with lock:
            p = self.path.split("?")[0]
            paths[p] = paths.get(p, 0) + 1
            failing = fail_all[0]
        if failing:
            length = int(self.headers.get("content-length", 0) or 0)
            if length:
                self.rfile.read(length)
            self.send_response(503)
            self.send_header("content-length", "0")
            self.end_headers()
            return
        body = b""
        length = int(self.headers.get("content-length", 0) or 0)
        if length:
            body = self.rfile.read(length)
        elif self.headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().strip(), 16)
                chunk = self.rfile.read(size + 2)[:size]
                if size == 0:
                    break
                body += chunk
        delay = int(self.headers.get("x-echo-delay-ms", 0) or 0)
        if delay:
            time.sleep(delay / 1000)
        fail = int(self.headers.get("x-echo-fail-per-10", 0) or 0)
        if fail:
            with lock:
                n = seen[0]
                seen[0] += 1
            if n % 10 < fail:
                self.send_response(503)
                self.send_header("content-length", "0")
                self.end_headers()
                return
        headers = {}
        for k in set(k.lower() for k in self.headers.keys()):
            headers[k] = ",".join(self.headers.get_all(k))
        body = json.dumps({"pod": name, "method": self.command, "path": self.path, "headers": headers, "body_bytes": len(body)}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_GET = do_POST = do_PUT = do_DELETE = answer
    def log_message(self, *args):
        pass
class Server(ThreadingHTTPServer):
    # A client (or a timeout) that hangs up on a delayed answer is expected.
    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)
Server(("0.0.0.0", port), Echo).serve_forever()
"#;
}
