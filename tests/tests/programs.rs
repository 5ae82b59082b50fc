//! Real programs, through the mesh as deployed (default settings), same
//! node and cross node, hundreds of runs each, zero failures: a blocking
//! Python client (send, shut down the write side, read to EOF), urllib
//! against `python3 -m http.server`, curl and wget against nginx (static
//! files, which nginx sends with sendfile), redis-benchmark against redis,
//! pgbench against PostgreSQL, socat and iperf3. And a fast sender to a slow
//! same-node reader is paced by the reader, as on TCP.
use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use mesh_tests::{KillOnDrop, TestLab};
use serde_json::Value;
use xtask::lab::Lab;

const LABTOOL: &str = env!("CARGO_BIN_EXE_labtool");
/// Runs per program and path.
const RUNS: usize = 200;
/// The server pods: same node as the client (pod-a), and across nodes.
const PATHS: [(&str, &str); 2] = [("pod-b", "same node"), ("pod-c", "cross node")];

fn ip(lab: &Lab, pod: &str) -> String {
    lab.pod(pod).unwrap().ip.to_string()
}

/// Runs `script` with python3 in `pod`; its last stdout line is JSON.
fn python(lab: &Lab, pod: &str, script: &str, args: &[&str]) -> Value {
    let out = lab
        .exec(pod, "python3")
        .unwrap()
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or(""))
        .unwrap_or_else(|_| panic!("python in {pod}: {text} {}", String::from_utf8_lossy(&out.stderr)))
}

fn spawn(lab: &Lab, pod: &str, program: &str, args: &[&str]) -> KillOnDrop {
    KillOnDrop(
        lab.exec(pod, program)
            .unwrap()
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// Starts `program` as a server on `port` in each server pod of PATHS
/// (its arguments per pod from `args`) and waits until each listens.
fn serve_in_paths(lab: &Lab, program: &str, port: u16, args: impl Fn(&str) -> Vec<String>) -> Vec<KillOnDrop> {
    PATHS
        .iter()
        .map(|(pod, _)| {
            let args = args(pod);
            let s = spawn(lab, pod, program, &args.iter().map(String::as_str).collect::<Vec<_>>());
            wait_listening(lab, pod, port);
            s
        })
        .collect()
}

fn wait_listening(lab: &Lab, pod: &str, port: u16) {
    xtask::probe::wait_listening(&lab.pod(pod).unwrap().netns, port).unwrap();
}

/// A directory of its own for one test's files (removed with the test).
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("mesh-programs-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `body` (shell, with `$i` the run number) RUNS times in `pod`,
/// counting the runs where it fails: `{"failed": n}`.
fn shell_runs(lab: &Lab, pod: &str, body: &str) -> Value {
    let script = format!(
        "fails=0; for i in $(seq {RUNS}); do {body} || fails=$((fails+1)); done; echo \"{{\\\"failed\\\": $fails}}\""
    );
    let out = lab.exec(pod, "sh").unwrap().args(["-c", &script]).output().unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{body}: {}", String::from_utf8_lossy(&out.stderr)))
}

/// A file of `len` pseudo-random bytes and its SHA-256.
fn random_file(path: &std::path::Path, len: usize) -> String {
    use sha2::Digest as _;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let bytes: Vec<u8> = (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    std::fs::write(path, &bytes).unwrap();
    sha2::Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The loop every Python client below runs: `one(i)` per run, any
/// exception a failure; prints `{"runs", "failed", "failures"}`.
const PY_RUNS: &str = r#"
failures = []
for i in range(runs):
    try:
        one(i)
    except Exception as e:
        failures.append(f"run {i}: {type(e).__name__}: {e}")
print(json.dumps({"runs": runs, "failures": failures[:10], "failed": len(failures)}))
"#;

const BLOCKING_CLIENT: &str = r#"
import hashlib, json, os, socket, sys
host, port, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def one(i):
    payload = os.urandom(4096 + i)
    s = socket.create_connection((host, port), timeout=10)
    s.setblocking(True)
    s.sendall(payload)
    s.shutdown(socket.SHUT_WR)
    reply = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        reply += chunk
    s.close()
    answer = json.loads(reply)
    if answer.get("sha256") != hashlib.sha256(payload).hexdigest():
        raise ValueError(f"wrong digest {answer}")
"#;

#[test]
fn a_blocking_python_client_sends_shuts_down_and_reads_to_eof() {
    let t = TestLab::up(&[], LABTOOL);
    fast_path_ready(&t.lab);
    for (server, path) in PATHS {
        let before = xtask::probe::fast_path_counters(&t.lab, "node-a").unwrap().0;
        let r = python(
            &t.lab,
            "pod-a",
            &format!("{BLOCKING_CLIENT}{PY_RUNS}"),
            &[&ip(&t.lab, server), "8080", &RUNS.to_string()],
        );
        assert_eq!(r["failed"], 0, "{path}: {r}");
        assert_eq!(r["runs"], RUNS, "{path}: {r}");
        // Same node, every flow's packets went veth to veth (a handshake,
        // a request, a reply and two FINs each: well over 4 per run).
        let carried = xtask::probe::fast_path_counters(&t.lab, "node-a").unwrap().0 - before;
        if server == "pod-b" {
            assert!(
                carried >= 4 * RUNS as u64,
                "{path}: the fast path carried {carried} packets"
            );
        }
    }
}

/// Waits until node-a's agent put its pods' veths on the fast path, so the
/// same-node runs exercise it (it finds them within a tick of starting).
fn fast_path_ready(lab: &Lab) {
    mesh_tests::wait_for("the fast path on node-a's pods", Duration::from_secs(5), || {
        xtask::probe::dump_map(lab, "node-a", "mesh_pod_devs").is_ok_and(|d| d.as_array().is_some_and(|a| a.len() >= 4))
    });
}

const URLLIB_CLIENT: &str = r#"
import hashlib, json, sys, urllib.request
url, want, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
def one(i):
    with urllib.request.urlopen(url, timeout=10) as r:
        got = hashlib.sha256(r.read()).hexdigest()
    if got != want:
        raise ValueError(f"digest {got}")
"#;

#[test]
fn urllib_against_python_http_server() {
    let t = TestLab::up(&[], LABTOOL);
    let dir = Scratch::new("http");
    let sha = random_file(&dir.0.join("blob.bin"), 300_000);
    let dir_arg = dir.0.to_string_lossy().to_string();
    let _servers = serve_in_paths(&t.lab, "python3", 8000, |_| {
        ["-m", "http.server", "8000", "--directory", &dir_arg]
            .map(String::from)
            .to_vec()
    });
    for (server, path) in PATHS {
        let url = format!("http://{}:8000/blob.bin", ip(&t.lab, server));
        let r = python(
            &t.lab,
            "pod-a",
            &format!("{URLLIB_CLIENT}{PY_RUNS}"),
            &[&url, &sha, &RUNS.to_string()],
        );
        assert_eq!(r["failed"], 0, "{path}: {r}");
    }
}

#[test]
fn curl_and_wget_against_nginx_sendfile() {
    let t = TestLab::up(&[], LABTOOL);
    let dir = Scratch::new("nginx");
    let sha = random_file(&dir.0.join("blob.bin"), 1 << 20);
    let conf = dir.0.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off; worker_processes 1; pid {0}/nginx-$NODE.pid; error_log stderr;\n\
             events {{ worker_connections 512; }}\n\
             http {{ access_log off; sendfile on; tcp_nopush on; client_body_temp_path {0};\n\
               server {{ listen 8081; root {0}; }} }}\n",
            dir.0.display()
        ),
    )
    .unwrap();
    let _servers = serve_in_paths(&t.lab, "nginx", 8081, |pod| {
        let c = dir.0.join(format!("nginx-{pod}.conf"));
        std::fs::write(&c, std::fs::read_to_string(&conf).unwrap().replace("$NODE", pod)).unwrap();
        vec!["-c".into(), c.to_string_lossy().into(), "-e".into(), "stderr".into()]
    });
    for (server, path) in PATHS {
        let url = format!("http://{}:8081/blob.bin", ip(&t.lab, server));
        for client in [
            format!("curl -sf --max-time 10 {url}"),
            format!("wget -q -T 10 -O - {url}"),
        ] {
            let r = shell_runs(
                &t.lab,
                "pod-a",
                &format!("[ \"$({client} | sha256sum | cut -d' ' -f1)\" = {sha} ]"),
            );
            assert_eq!(r["failed"], 0, "{path}: {client} x {RUNS}: {r}");
        }
    }
}

#[test]
fn redis_benchmark_against_redis() {
    let t = TestLab::up(&[], LABTOOL);
    let dir = Scratch::new("redis");
    let dir_arg = dir.0.to_string_lossy().to_string();
    let _servers = serve_in_paths(&t.lab, "redis-server", 6379, |pod| {
        let ip = ip(&t.lab, pod);
        [
            "--port",
            "6379",
            "--bind",
            &ip,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &dir_arg,
            "--protected-mode",
            "no",
        ]
        .map(String::from)
        .to_vec()
    });
    for (server, path) in PATHS {
        let out = t
            .lab
            .exec("pod-a", "redis-benchmark")
            .unwrap()
            .args([
                "-h",
                &ip(&t.lab, server),
                "-p",
                "6379",
                "-n",
                "20000",
                "-c",
                "20",
                "-t",
                "set,get,lpush,lpop",
                "--csv",
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{path}: redis-benchmark: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rows = text
            .lines()
            .filter(|l| {
                l.starts_with("\"SET\"")
                    || l.starts_with("\"GET\"")
                    || l.starts_with("\"LPUSH\"")
                    || l.starts_with("\"LPOP\"")
            })
            .count();
        assert_eq!(rows, 4, "{path}: every test reported: {text}");
        // And a value written is read back intact, RUNS times.
        let body = format!(
            "{{ v=\"value-$i-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n')\"; \
             redis-cli -h {0} set k$i \"$v\" >/dev/null && [ \"$(redis-cli -h {0} get k$i)\" = \"$v\" ]; }}",
            ip(&t.lab, server)
        );
        let r = shell_runs(&t.lab, "pod-a", &body);
        assert_eq!(r["failed"], 0, "{path}: redis-cli set/get x {RUNS}: {r}");
    }
}

fn postgres_bin(name: &str) -> String {
    let base = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL (run.sh installs postgresql)")
        .flatten()
        .map(|e| e.path())
        .max()
        .unwrap();
    base.join("bin").join(name).to_string_lossy().to_string()
}

#[test]
fn pgbench_against_postgresql() {
    let t = TestLab::up(&[], LABTOOL);
    let dir = Scratch::new("pg");
    Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(&dir.0)
        .status()
        .unwrap();
    let mut servers = Vec::new();
    for (pod, _) in PATHS {
        let data = dir.0.join(pod);
        let status = Command::new("runuser")
            .args([
                "-u",
                "postgres",
                "--",
                &postgres_bin("initdb"),
                "-A",
                "trust",
                "-U",
                "postgres",
                "-D",
            ])
            .arg(&data)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "initdb");
        // The lab's addresses may connect (initdb trusts only loopback).
        let hba = data.join("pg_hba.conf");
        let text = std::fs::read_to_string(&hba).unwrap();
        std::fs::write(&hba, format!("{text}\nhost all all 198.18.0.0/15 trust\n")).unwrap();
        servers.push(KillOnDrop(
            t.lab
                .exec(pod, "runuser")
                .unwrap()
                .args(["-u", "postgres", "--", &postgres_bin("postgres"), "-D"])
                .arg(&data)
                // Its own socket directory: two servers on 5432 would share a lock file.
                .args(["-h", &ip(&t.lab, pod), "-p", "5432", "-k", &data.to_string_lossy()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        ));
        wait_listening(&t.lab, pod, 5432);
    }
    for (server, path) in PATHS {
        let host = ip(&t.lab, server);
        let pgbench = |args: &[&str]| {
            t.lab
                .exec("pod-a", &postgres_bin("pgbench"))
                .unwrap()
                .args(["-h", &host, "-p", "5432", "-U", "postgres"])
                .args(args)
                .arg("postgres")
                .output()
                .unwrap()
        };
        let init = pgbench(&["-i", "-q"]);
        assert!(
            init.status.success(),
            "{path}: pgbench -i: {}",
            String::from_utf8_lossy(&init.stderr)
        );
        let run = pgbench(&["-c", "4", "-t", &RUNS.to_string()]);
        let text = String::from_utf8_lossy(&run.stdout);
        assert!(
            run.status.success(),
            "{path}: pgbench: {text} {}",
            String::from_utf8_lossy(&run.stderr)
        );
        let want = format!("number of transactions actually processed: {}/{}", 4 * RUNS, 4 * RUNS);
        assert!(text.contains(&want), "{path}: {text}");
        assert!(text.contains("number of failed transactions: 0"), "{path}: {text}");
    }
    drop(servers);
}

#[test]
fn socat_echo_and_iperf3() {
    let t = TestLab::up(&[], LABTOOL);
    let dir = Scratch::new("socat");
    let sha = random_file(&dir.0.join("in.bin"), 200_000);
    let _echo = serve_in_paths(&t.lab, "socat", 7007, |_| {
        ["TCP-LISTEN:7007,fork,reuseaddr", "EXEC:cat"]
            .map(String::from)
            .to_vec()
    });
    let _iperf = serve_in_paths(&t.lab, "iperf3", 5201, |_| {
        ["-s", "-p", "5201"].map(String::from).to_vec()
    });
    for (server, path) in PATHS {
        let body = format!(
            "[ \"$(socat -t 5 - TCP:{}:7007 < {} | sha256sum | cut -d' ' -f1)\" = {sha} ]",
            ip(&t.lab, server),
            dir.0.join("in.bin").display()
        );
        let r = shell_runs(&t.lab, "pod-a", &body);
        assert_eq!(r["failed"], 0, "{path}: socat x {RUNS}: {r}");
        let out = t
            .lab
            .exec("pod-a", "iperf3")
            .unwrap()
            .args(["-c", &ip(&t.lab, server), "-p", "5201", "-t", "3", "-J"])
            .output()
            .unwrap();
        let r: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        assert!(r["error"].is_null(), "{path}: iperf3: {}", r["error"]);
        assert!(
            r["end"]["sum_received"]["bytes"].as_f64().unwrap_or(0.0) > 1e6,
            "{path}: iperf3 moved nothing"
        );
    }
}

const SLOW_READER: &str = r#"
import json, socket, sys, time
port, secs = int(sys.argv[1]), float(sys.argv[2])
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("0.0.0.0", port)); l.listen(1)
print("ready", flush=True)
c, _ = l.accept()
got, end = 0, time.time() + secs
while time.time() < end:
    data = c.recv(4096)
    if not data:
        break
    got += len(data)
    time.sleep(0.001)
rcvbuf = c.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
print(json.dumps({"read": got, "rcvbuf": rcvbuf}), flush=True)
# Drain what is left until the sender closes, so closing resets nothing.
while c.recv(65536):
    pass
"#;

const FAST_SENDER: &str = r#"
import json, socket, sys, time
host, port, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.create_connection((host, port))
chunk, sent, end = b"x" * 65536, 0, time.time() + secs
s.settimeout(0.2)
while time.time() < end:
    try:
        sent += s.send(chunk)
    except socket.timeout:
        pass
sndbuf = s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
s.close()
print(json.dumps({"sent": sent, "sndbuf": sndbuf}), flush=True)
"#;

#[test]
fn a_fast_sender_to_a_slow_same_node_reader_is_paced_by_the_reader() {
    let t = TestLab::up(&[], LABTOOL);
    fast_path_ready(&t.lab);
    let secs = "5";
    let mut reader = t
        .lab
        .exec("pod-b", "python3")
        .unwrap()
        .args(["-c", SLOW_READER, "9001", secs])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_listening(&t.lab, "pod-b", 9001);
    let sent = python(&t.lab, "pod-a", FAST_SENDER, &[&ip(&t.lab, "pod-b"), "9001", secs]);
    let out = {
        use std::io::Read as _;
        let mut text = String::new();
        let _ = reader.stdout.take().unwrap().read_to_string(&mut text);
        let _ = reader.wait();
        text
    };
    let read: Value = out
        .lines()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or(Value::Null);
    let (sent_b, read_b) = (sent["sent"].as_f64().unwrap(), read["read"].as_f64().unwrap());
    let in_flight = sent_b - read_b;
    // What TCP may hold between them: the two socket buffers (and the
    // reader's auto-tuned window), a few MiB, never the ~1 GB the sockmap
    // splice (removed) accepted (issue of 2026-12-01).
    let bound = 4.0 * (sent["sndbuf"].as_f64().unwrap() + read["rcvbuf"].as_f64().unwrap()) + (8 << 20) as f64;
    println!("slow reader: sent {sent_b} B, read {read_b} B, in flight {in_flight} B (bound {bound} B)");
    assert!(read_b > 1e6, "the reader read almost nothing: {read}");
    assert!(
        in_flight < bound,
        "the sender was not paced: {in_flight} B in flight, {sent} {read}"
    );
    std::thread::sleep(Duration::from_millis(100));
}
