//! End-to-end tests of the node-to-node tunnels in the lab: both
//! transports carry large transfers intact and encrypted, rogue peers are
//! refused, many concurrent flows do not leave memory behind, and a dead
//! peer is noticed quickly.
use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use mesh_tests::{Capture, TestLab, assert_intact, contains, log_records, wait_for};
use serde_json::Value;
use xtask::lab::Lab;

const LABTOOL: &str = env!("CARGO_BIN_EXE_labtool");
const ROGUE: &str = env!("CARGO_BIN_EXE_rogue");
const MARKER: &str = "MESH-PLAINTEXT-MARKER-";

fn spiffe(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/t/sa/{sa}")
}

/// Which of pod-c's addresses the client dials (lab pods are dual-stack).
#[derive(Clone, Copy, PartialEq)]
enum Dial {
    Ipv4,
    Ipv6,
}

/// Both transports agree on X25519MLKEM768 by default, as the fabric
/// shows (tshark dissects each ServerHello, QUIC's from its decrypted
/// Initial packets), and on X25519 with `--post-quantum=false`.
#[test]
fn tunnels_use_post_quantum_key_exchange_by_default_on_both_transports() {
    for (transport, pq, want) in [
        ("quic", true, "4588"),
        ("tcp", true, "4588"),
        ("quic", false, "29"),
        ("tcp", false, "29"),
    ] {
        let t = TestLab::up(
            &[
                &format!("--tunnel-transport={transport}"),
                &format!("--post-quantum={pq}"),
            ],
            LABTOOL,
        );
        // QUIC sends its handshake as one UDP GSO burst, which the capture
        // would see as one oversized frame tshark cannot split: the nodes'
        // fabric interfaces take one segment per packet (lab namespaces only).
        for node in ["node-a", "node-b"] {
            let netns = &t.lab.node(node).unwrap().netns;
            let ok = xtask::lab::in_netns(netns, "ip")
                .args(["link", "set", "dev", "eth0", "gso_max_segs", "1"])
                .status()
                .unwrap()
                .success();
            assert!(ok, "ip link set gso_max_segs in {netns}");
        }
        let mut cap = Capture::start_snaplen(&format!("kx-{transport}-{pq}"), 2000);
        let r = t.traffic().connect("pod-a", t.addr("pod-c"), 3000).unwrap();
        assert_eq!(r["ok"], true, "{transport}: {r}");
        cap.stop();
        let groups = cap.server_key_shares(15008);
        println!("{transport}, --post-quantum={pq}: ServerHello key share groups {groups:?}");
        assert!(
            !groups.is_empty() && groups.iter().all(|g| g == want),
            "{transport}, --post-quantum={pq}: want group {want} in every ServerHello, got {groups:?}"
        );
    }
}

fn transfer_through(transport: &str, dial: Dial, size: u64) {
    let t = TestLab::up(&[&format!("--tunnel-transport={transport}")], LABTOOL);
    let pod_c = t.lab.pod("pod-c").unwrap();
    let to = match dial {
        Dial::Ipv4 => t.addr("pod-c"),
        Dial::Ipv6 => std::net::SocketAddr::from((pod_c.ip6, t.addr("pod-c").port())),
    };
    let cap = Capture::start(transport);
    let out = t
        .lab
        .exec("pod-a", LABTOOL)
        .unwrap()
        .args([
            "send",
            "--to",
            &to.to_string(),
            "--bytes",
            &size.to_string(),
            "--marker",
            MARKER,
        ])
        .output()
        .unwrap();
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut cap = cap;
    let bytes = cap.stop();
    let proto = if transport == "quic" { "udp" } else { "tcp" };
    assert_intact(&r);
    assert_eq!(r["bytes"], size);
    // The app's bytes crossed the fabric only inside the tunnel.
    // At least 200 captured bytes per 64 KiB segment (the largest GSO makes).
    assert!(
        bytes.len() as u64 > size / 256,
        "capture too small ({} bytes): did tcpdump run?",
        bytes.len()
    );
    assert!(
        !contains(&bytes, MARKER.as_bytes()),
        "{transport}: the marker crossed the fabric in clear text"
    );
    let tunnel_packets = cap.count(&format!("{proto} port 15008"));
    assert!(
        tunnel_packets as u64 > size >> 18,
        "{transport}: only {tunnel_packets} packets on {proto} 15008"
    );
    // Nothing addressed to the pod itself crossed, in either family: the
    // tunnel runs between the nodes' IPv4 addresses, whatever the destination's.
    for pod_ip in [pod_c.ip.to_string(), pod_c.ip6.to_string()] {
        assert_eq!(
            cap.count(&format!("host {pod_ip}")),
            0,
            "{transport}: packets to {pod_ip} on the fabric"
        );
    }
    let flows = log_records(&t.lab.agent_log("node-b"));
    assert!(
        flows
            .iter()
            .any(|r| r["message"] == "inbound flow closed" && r["transport"] == transport && r["bytes_in"] == size),
        "node-b did not log the {transport} flow"
    );
}

#[test]
fn quic_carries_256_mib_intact_and_encrypted() {
    transfer_through("quic", Dial::Ipv4, 256 << 20);
}

/// An IPv6 destination is carried like an IPv4 one (connect6, the agent's
/// IPv6 listener, a destination of either family in the tunnel header).
#[test]
fn ipv6_destinations_cross_the_fabric_only_inside_the_tunnel_on_both_transports() {
    transfer_through("quic", Dial::Ipv6, 32 << 20);
    transfer_through("tcp", Dial::Ipv6, 32 << 20);
}

#[test]
fn mtls_tcp_carries_256_mib_intact_and_encrypted() {
    transfer_through("tcp", Dial::Ipv4, 256 << 20);
}

fn rogue(lab: &Lab, node: &str, args: &[&str]) -> std::process::Output {
    lab.node_exec(node, ROGUE).unwrap().args(args).output().unwrap()
}

#[test]
fn rogue_peers_are_refused_and_no_byte_reaches_the_pod() {
    let mut t = TestLab::up(&[], LABTOOL);
    let lab = &t.lab;
    let foreign = std::env::temp_dir().join(format!("mesh-foreign-ca-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&foreign);
    let init = Command::new(&lab.agent_bin)
        .args(["ca", "init", "--dir"])
        .arg(&foreign)
        .output()
        .unwrap();
    assert!(init.status.success());
    let node_b = format!("{}:15008", lab.node("node-b").unwrap().fabric_ip);
    let pod_c = t.addr("pod-c").to_string();

    // 1. A client whose certificate comes from another root, on both transports.
    for transport in ["quic", "tcp"] {
        let out = rogue(
            lab,
            "node-a",
            &[
                "--ca-dir",
                foreign.to_str().unwrap(),
                "--trust-root-dir",
                lab.ca_dir().to_str().unwrap(),
                "--identity",
                &spiffe("sa-a"),
                "--transport",
                transport,
                "client",
                "--peer",
                &node_b,
                "--peer-identity",
                &spiffe("sa-c"),
                "--dst",
                &pod_c,
            ],
        );
        let r: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        assert_eq!(r["ok"], false, "{transport}: foreign-root client got through: {r}");
    }
    let refused = log_records(&lab.agent_log("node-b"))
        .into_iter()
        .filter(|r| {
            r["message"]
                .as_str()
                .is_some_and(|m| m.contains("handshake from a peer failed"))
        })
        .count();
    assert!(refused >= 2, "node-b logged {refused} refused handshakes");
    assert!(
        !log_records(&lab.agent_log("node-b"))
            .iter()
            .any(|r| r["message"] == "inbound flow closed"),
        "a rogue flow reached pod-c"
    );

    // 2. A server at node-b's address holding a valid certificate, but for
    //    sa-b, not for sa-c whom node-a must reach: node-a dials it with
    //    each transport in turn.
    lab.stop_agent("node-b").unwrap();
    let args = t.lab.agent_args.clone();
    for transport in ["tcp", "quic"] {
        t.lab.agent_args = args
            .iter()
            .cloned()
            .chain([format!("--tunnel-transport={transport}")])
            .collect();
        t.lab.stop_agent("node-a").unwrap();
        t.lab.start_agent("node-a").unwrap();
        let lab = &t.lab;
        let mut server = lab
            .node_exec("node-b", ROGUE)
            .unwrap()
            .args([
                "--ca-dir",
                lab.ca_dir().to_str().unwrap(),
                "--identity",
                &spiffe("sa-b"),
                "--transport",
                transport,
            ])
            .args(["server", "--listen", "0.0.0.0:15008", "--seconds", "20"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(800));
        let r = t.traffic().send("pod-a", t.addr("pod-c"), 4096).unwrap();
        assert_eq!(r["ok"], false, "{transport}: traffic went to an impostor: {r}");
        let _ = server.kill();
        let out = server.wait_with_output().unwrap();
        let rogue_log = String::from_utf8_lossy(&out.stderr);
        assert!(
            !rogue_log.contains("flow refused") && !rogue_log.contains("inbound flow"),
            "{transport}: the impostor got a stream:\n{rogue_log}"
        );
        let why = log_records(&lab.agent_log("node-a"))
            .into_iter()
            .rev()
            .find(|r| r["message"] == "tunnel failed; resetting the client")
            .expect("node-a logged the refusal");
        let err = why["error"].as_str().unwrap();
        assert!(
            why["span"]["transport"] == transport
                && err.contains("sa/sa-b")
                && err.contains("sa/sa-c")
                && err.contains("198.18.0.12"),
            "{transport}: {why}"
        );
    }
    let _ = std::fs::remove_dir_all(&foreign);
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[test]
fn a_thousand_concurrent_flows_complete_and_memory_returns() {
    let t = TestLab::up(&[], LABTOOL);
    let lab = &t.lab;
    let pid = lab.agent_pid("node-a").unwrap();
    let to = t.addr("pod-c").to_string();
    // Round 1 sizes what is sized by peak concurrency and then kept for
    // reuse (the runtime's I/O slab, the span slab, the pooled tunnel
    // connection); round 2 must then give back everything it takes. Both
    // rounds are printed.
    let start = rss_kib(pid);
    let first = run_burst(lab, &to, 1000);
    assert_eq!(
        first["ok"],
        1000,
        "{first}\nnode-a: {:#?}\nnode-b: {:#?}",
        agent_warnings(lab, "node-a"),
        agent_warnings(lab, "node-b")
    );
    std::thread::sleep(Duration::from_secs(3));
    let before = rss_kib(pid);
    let r = run_burst(lab, &to, 1000);
    assert_eq!(
        r["ok"],
        1000,
        "{r}\nnode-a: {:#?}\nnode-b: {:#?}",
        agent_warnings(lab, "node-a"),
        agent_warnings(lab, "node-b")
    );
    let peak = rss_kib(pid);
    std::thread::sleep(Duration::from_secs(3));
    let after = rss_kib(pid);
    println!(
        "agent RSS: fresh {start} KiB; after round 1 {before} KiB; right after round 2 {peak} KiB; settled {after} KiB"
    );
    assert!(
        (after as f64) <= before as f64 * 1.10,
        "RSS did not return within 10%: before {before} KiB, after {after} KiB"
    );
}

/// The agent's warnings, to explain a failed flow.
fn agent_warnings(lab: &Lab, node: &str) -> Vec<String> {
    log_records(&lab.agent_log(node))
        .into_iter()
        .filter(|r| r["level"] == "WARN" || r["level"] == "ERROR")
        .map(|r| r.to_string())
        .take(10)
        .collect()
}

fn run_burst(lab: &Lab, to: &str, flows: usize) -> Value {
    let out = lab
        .exec("pod-a", LABTOOL)
        .unwrap()
        .args(["burst", "--to", to, "--flows", &flows.to_string(), "--bytes", "16384"])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("burst: {}", String::from_utf8_lossy(&out.stderr)))
}

const THREE_NODES: &str = "
nodes: [{name: node-a}, {name: node-b}, {name: node-c}]
pods:
  - {name: pod-a, namespace: t, serviceAccount: sa-a, node: node-a}
  - {name: pod-c, namespace: t, serviceAccount: sa-c, node: node-b}
  - {name: pod-d, namespace: t, serviceAccount: sa-d, node: node-c}
";

#[test]
fn a_killed_peer_agent_fails_its_flows_fast_and_spares_the_others() {
    let t = TestLab::up_with(THREE_NODES, &[], LABTOOL);
    let lab = &t.lab;
    let long = |to: String| {
        lab.exec("pod-a", LABTOOL)
            .unwrap()
            .args(["send", "--to", &to, "--bytes", &(64u64 << 30).to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let victim = long(t.addr("pod-c").to_string());
    let survivor = t.traffic();
    std::thread::sleep(Duration::from_millis(1500));
    let pid = lab.agent_pid("node-b").unwrap();
    Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
    let killed_at = Instant::now();
    let out = victim.wait_with_output().unwrap();
    let took = killed_at.elapsed();
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["ok"], false, "{r}");
    println!("client saw {} {:.1} s after the kill", r["error"], took.as_secs_f64());
    assert!(took < Duration::from_secs(5), "the client hung for {took:?}");
    // Flows to node-c are unaffected.
    let r = survivor.send("pod-a", t.addr("pod-d"), 8 << 20).unwrap();
    assert_intact(&r);
    wait_for("node-b agent gone", Duration::from_secs(1), || {
        lab.agent_pid("node-b").is_none()
    });
}

const TWO_SERVERS_ON_B: &str = "
nodes: [{name: node-a}, {name: node-b}]
pods:
  - {name: pod-a, namespace: t, serviceAccount: sa-a, node: node-a}
  - {name: pod-c, namespace: t, serviceAccount: sa-c, node: node-b}
  - {name: pod-d, namespace: t, serviceAccount: sa-d, node: node-b}
";

/// The destination agent closes first toward the pod whenever the client
/// does, so its side of each delivered flow goes to TIME-WAIT. Its source
/// ports must be judged per 4-tuple, as any client's are. With node-b's
/// ephemeral range cut to 50 ports: 50 flows to pod-c, then 50 more at
/// once (each reuses a 4-tuple in TIME-WAIT, which the kernel allows for
/// a bound port under PAWS), and pod-d is reached while all 50 toward
/// pod-c are open; a 51st concurrent flow to pod-c fails as a reset, and
/// the agent says what to check. (While the agent bound port 0, the first
/// 50 flows' TIME-WAIT took the ports toward every pod for a minute.)
#[test]
fn the_agents_source_ports_toward_pods_are_judged_per_4_tuple() {
    for transport in ["quic", "tcp"] {
        let t = TestLab::up_with(TWO_SERVERS_ON_B, &[&format!("--tunnel-transport={transport}")], LABTOOL);
        let lab = &t.lab;
        let netns = &lab.node("node-b").unwrap().netns;
        let ok = xtask::lab::in_netns(netns, "sysctl")
            .args(["-q", "-w", "net.ipv4.ip_local_port_range=40000 40049"])
            .status()
            .unwrap()
            .success();
        assert!(ok, "sysctl in {netns}");
        let (to_c, to_d) = (t.addr("pod-c").to_string(), t.addr("pod-d").to_string());
        let pod_c_ip = t.addr("pod-c").ip().to_string();
        let r = run_burst(lab, &to_c, 50);
        assert_eq!(r["ok"], 50, "{transport}: 50 flows to pod-c: {r}");
        let r = run_burst(lab, &to_d, 20);
        assert_eq!(r["ok"], 20, "{transport}: pod-d after 50 flows to pod-c: {r}");
        // 50 held open to pod-c, over 4-tuples in TIME-WAIT.
        let held: Vec<_> = (0..50)
            .map(|_| {
                lab.exec("pod-a", LABTOOL)
                    .unwrap()
                    .args(["send", "--to", &to_c, "--bytes", "1024", "--hold-ms", "4000"])
                    .stdout(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        wait_for("50 flows open to pod-c", Duration::from_secs(5), || {
            let o = xtask::lab::in_netns(netns, "ss")
                .args(["-Htan", "state", "established", "dst", &pod_c_ip])
                .output()
                .unwrap();
            String::from_utf8_lossy(&o.stdout).lines().count() >= 50
        });
        let r = run_burst(lab, &to_d, 5);
        assert_eq!(
            r["ok"],
            5,
            "{transport}: pod-d must be reached while 50 flows to pod-c hold every port toward it: {r}\nnode-b: {:#?}",
            agent_warnings(lab, "node-b")
        );
        let r = run_burst(lab, &to_c, 1);
        assert_eq!(r["failed"], 1, "{transport}: a 51st flow to pod-c has no port: {r}");
        wait_for("the agent's word on it", Duration::from_secs(5), || {
            agent_warnings(lab, "node-b")
                .iter()
                .any(|w| w.contains("no source port free toward") && w.contains("ip_local_port_range"))
        });
        for c in held {
            let r: Value = serde_json::from_slice(&c.wait_with_output().unwrap().stdout).unwrap_or(Value::Null);
            assert_eq!(r["ok"], true, "{transport}: a held flow to pod-c: {r}");
        }
    }
}

/// A killed peer agent is a failure, and looks like one: every client
/// waiting on a flow through it reads a reset, never a clean end of
/// stream, over either transport.
#[test]
fn a_killed_peer_agent_resets_every_waiting_client_on_both_transports() {
    for transport in ["quic", "tcp"] {
        let t = TestLab::up(&[&format!("--tunnel-transport={transport}")], LABTOOL);
        let lab = &t.lab;
        const N: usize = 20;
        // Each client connects, then waits 6 s before it sends and reads
        // the reply: its flow is open through node-b's agent when it dies.
        let clients: Vec<_> = (0..N)
            .map(|_| {
                lab.exec("pod-a", LABTOOL)
                    .unwrap()
                    .args(["send", "--to", &t.addr("pod-c").to_string(), "--bytes", "1024"])
                    .args(["--hold-ms", "6000"])
                    .stdout(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        wait_for("every flow open through node-b", Duration::from_secs(5), || {
            mesh_tests::metric(
                &mesh_tests::metrics_text(lab, "node-a"),
                "mesh_connections_opened_total",
                &[("path", "tunnel")],
            ) >= N as f64
        });
        let pid = lab.agent_pid("node-b").unwrap();
        Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
        let results: Vec<Value> = clients
            .into_iter()
            .map(|c| serde_json::from_slice(&c.wait_with_output().unwrap().stdout).unwrap_or(Value::Null))
            .collect();
        let resets = results
            .iter()
            .filter(|r| r["ok"] == false && r["error"].as_str().unwrap_or("").contains("reset"))
            .count();
        assert_eq!(
            resets, N,
            "{transport}: every waiting client must see a reset: {results:?}"
        );
    }
}

#[test]
fn garbage_bad_headers_and_stalled_handshakes_are_refused_and_the_agent_keeps_serving() {
    let t = TestLab::up(&[], LABTOOL);
    let lab = &t.lab;
    let node_b = lab.node("node-b").unwrap().fabric_ip;
    let sh = |script: &str| {
        let out = lab
            .node_exec("node-a", "sh")
            .unwrap()
            .args(["-c", script])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // Garbage datagrams and a garbage TCP stream on 15008; a TCP peer that
    // connects and then says nothing (stalls mid-handshake) for 6 s.
    sh(&format!(
        "head -c 3000 /dev/urandom | socat -u - UDP:{node_b}:15008; true"
    ));
    sh(&format!(
        "printf 'GET / HTTP/1.1\\r\\n\\r\\n' | timeout 3 socat - TCP:{node_b}:15008; true"
    ));
    let stall = lab
        .node_exec("node-a", "sh")
        .unwrap()
        .args(["-c", &format!("sleep 7 | socat - TCP:{node_b}:15008; true")])
        .spawn()
        .unwrap();
    // Broken flow headers from a peer with a valid certificate.
    for kind in ["truncated", "oversized"] {
        let out = rogue(
            lab,
            "node-a",
            &[
                "--ca-dir",
                lab.ca_dir().to_str().unwrap(),
                "--identity",
                &spiffe("sa-a"),
                "client",
                "--peer",
                &format!("{node_b}:15008"),
                "--peer-identity",
                &spiffe("sa-c"),
                "--dst",
                &t.addr("pod-c").to_string(),
                "--bad-header",
                kind,
            ],
        );
        let r: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        assert_eq!(r["ok"], false, "{kind} header was accepted: {r}");
    }
    // Meanwhile real flows are fine.
    assert_intact(&t.traffic().send("pod-a", t.addr("pod-c"), 4 << 20).unwrap());
    let mut stall = stall;
    let _ = stall.wait();
    let log = log_records(&lab.agent_log("node-b"));
    let said = |m: &str| {
        log.iter()
            .filter(|r| r["message"].as_str().is_some_and(|x| x.contains(m)))
            .count()
    };
    assert!(said("bad flow header") >= 2, "bad headers were not logged");
    assert!(said("handshake from a peer failed") >= 1, "TCP garbage was not logged");
    assert!(said("stalled mid-handshake") >= 1, "the stalled peer was not logged");
    let n = lab.node("node-b").unwrap();
    let out = lab
        .node_exec("node-b", "curl")
        .unwrap()
        .args(["-sf", &format!("http://{}:15020/metrics", n.fabric_ip)])
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&out.stdout);
    for reason in ["bad_header", "handshake", "handshake_timeout"] {
        assert!(
            metrics.contains(&format!("reason=\"{reason}\"")),
            "no mesh_tunnel_rejected for {reason}:\n{metrics}"
        );
    }
}
