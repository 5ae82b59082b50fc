//! Prometheus metrics and the audit trail under load, in the lab: byte
//! counters equal what the test sent on each path, promtool accepts the
//! output, and a flood of denied connects is recorded or counted, every one.
use std::{
    process::Command,
    time::{Duration, Instant},
};

use mesh_tests::{TestLab, log_records, metric, metrics_text, wait_for};
use serde_json::Value;

const LABTOOL: &str = env!("CARGO_BIN_EXE_labtool");

/// (path, destination pod, bytes per flow): same node (counted by the
/// kernel from TCP), tunneled cross node.
const FLOWS: [(&str, &str, [u64; 3]); 2] = [
    ("same_node", "pod-b", [100_000, 1, 3_000_000]),
    ("tunnel", "pod-c", [250_000, 7, 1_500_000]),
];

fn pair<'a>(dst: &'a str, path: &'a str) -> [(&'a str, &'a str); 6] {
    [
        ("source_workload", "t/pod-a"),
        ("source_namespace", "t"),
        ("source_identity", "t/sa-a"),
        ("destination_workload", dst),
        ("destination_namespace", "t"),
        ("path", path),
    ]
}

#[test]
fn byte_counters_equal_the_bytes_sent_on_each_path_and_promtool_accepts_the_output() {
    let t = TestLab::up(&[], LABTOOL);
    for (path, dst, sizes) in FLOWS {
        let (mut sent, mut replied) = (0u64, 0u64);
        for bytes in sizes {
            let r = t.traffic().send("pod-a", t.addr(dst), bytes).unwrap();
            mesh_tests::assert_intact(&r);
            sent += bytes;
            replied += r["reply_bytes"].as_u64().unwrap();
        }
        let labels = pair(if dst == "pod-b" { "t/pod-b" } else { "t/pod-c" }, path);
        // Same-node counts are read from the kernel every second; agent paths
        // are counted when the flow closes.
        let start = Instant::now();
        let last = loop {
            let last = metrics_text(&t.lab, "node-a");
            let got = |name: &str| metric(&last, name, &labels) as u64;
            let now = (
                got("mesh_connections_opened_total"),
                got("mesh_connections_closed_total"),
                got("mesh_connection_sent_bytes_total"),
                got("mesh_connection_received_bytes_total"),
            );
            println!("{path}: opened/closed/sent/received {now:?}, sent {sent}, replies {replied}");
            if now == (3, 3, sent, replied) {
                break last;
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "{path}: metrics {now:?} never matched (3, 3, {sent}, {replied}):\n{last}"
            );
            std::thread::sleep(Duration::from_millis(250));
        };
        // Nothing of this flow is attributed to another path.
        let other = if path == "same_node" { "tunnel" } else { "same_node" };
        let wrong = pair(labels[3].1, other);
        assert_eq!(metric(&last, "mesh_connection_sent_bytes_total", &wrong), 0.0, "{last}");
    }

    for node in ["node-a", "node-b"] {
        let text = metrics_text(&t.lab, node);
        if node == "node-a" {
            // The connecting side times its handshakes.
            assert!(text.contains("mesh_tunnel_handshake_seconds_bucket"), "{text}");
        }
        let file = std::env::temp_dir().join(format!("mesh-metrics-{node}.txt"));
        std::fs::write(&file, &text).unwrap();
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("promtool check metrics < {}", file.display()))
            .output()
            .expect("promtool (installed by run.sh)");
        let _ = std::fs::remove_file(&file);
        assert!(
            out.status.success(),
            "promtool check metrics on {node}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

const FLOOD_TOPOLOGY: &str = "
nodes: [{name: node-a}, {name: node-b}]
pods:
  - {name: pod-a, namespace: t, serviceAccount: sa-a, node: node-a}
  - {name: pod-b, namespace: t, serviceAccount: sa-b, node: node-a}
  - {name: pod-c, namespace: t, serviceAccount: sa-c, node: node-b}
";

const FLOOD_POLICY: &str = "
kind: TCPRoute
metadata: {name: any, namespace: t}
spec: {matches: {ports: []}}
---
kind: TrafficTarget
metadata: {name: a-to-b, namespace: t}
spec:
  destination: {kind: ServiceAccount, name: sa-b}
  rules: [{kind: TCPRoute, name: any}]
  sources: [{kind: ServiceAccount, name: sa-a}]
";

#[test]
fn a_flood_of_denied_connects_is_recorded_or_counted_and_the_agent_stays_responsive() {
    const ATTEMPTS: u64 = 100_000;
    let t = TestLab::up_with(FLOOD_TOPOLOGY, &["--policy-mode=enforcing"], LABTOOL);
    let lab = &t.lab;
    std::fs::write(lab.source_dir.join("policy.yaml"), FLOOD_POLICY).unwrap();
    wait_for("policy in force", Duration::from_secs(5), || {
        log_records(&lab.agent_log("node-a"))
            .iter()
            .any(|r| r["message"] == "policy in force" && r["targets"] == 1)
    });
    let counted = || {
        let text = metrics_text(lab, "node-a");
        // Every kernel decision: the flood's denials and the probes' allows.
        let records = metric(&text, "mesh_audit_records_total", &[("enforced_at", "source")]) as u64;
        let dropped = metric(&text, "mesh_kernel_audit_events_dropped_total", &[]) as u64;
        (records, dropped)
    };
    // Decisions made while the policy loaded may still be draining: start
    // from counts that have settled.
    let mut before = counted();
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let again = counted();
        if again == before {
            break;
        }
        before = again;
    }

    // pod-b may not open connections to pod-a: every connect() is refused.
    let flood = lab
        .exec("pod-b", LABTOOL)
        .unwrap()
        .args(["flood", "--to", &t.addr("pod-a").to_string(), "--count"])
        .arg(ATTEMPTS.to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Meanwhile the agent answers its health endpoint and allowed traffic flows.
    let fabric = lab.node("node-a").unwrap().fabric_ip;
    let mut slowest = Duration::ZERO;
    let mut probes = 0u64;
    let mut flood = Some(flood);
    let mut result = None;
    while let Some(mut child) = flood.take() {
        let start = Instant::now();
        let out = lab
            .node_exec("node-a", "curl")
            .unwrap()
            .args(["-sf", "--max-time", "2", &format!("http://{fabric}:15021/readyz")])
            .output()
            .unwrap();
        slowest = slowest.max(start.elapsed());
        assert!(out.status.success(), "readiness failed during the flood");
        let r = t.traffic().send("pod-a", t.addr("pod-b"), 10_000).unwrap();
        mesh_tests::assert_intact(&r);
        probes += 1;
        match child.try_wait().unwrap() {
            Some(_) => result = Some(child.wait_with_output().unwrap()),
            None => {
                flood = Some(child);
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    let out = result.unwrap();
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    println!("flood: {r}; {probes} probes during it, slowest readiness answer {slowest:?}");
    assert_eq!(r["refused"], ATTEMPTS, "every connect() refused by policy: {r}");
    assert!(slowest < Duration::from_secs(1), "readiness took {slowest:?}");

    // records + dropped = attempts, once the agent has drained the ring;
    // each probe's allowed connect was a decision too.
    let decisions = ATTEMPTS + probes;
    let mut now = counted();
    let start = Instant::now();
    while (now.0 - before.0) + (now.1 - before.1) < decisions && start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(250));
        now = counted();
    }
    let (records, dropped) = (now.0 - before.0, now.1 - before.1);
    println!(
        "flood: {records} audit records + {dropped} dropped events = {} = {ATTEMPTS} attempts + {probes} probes",
        records + dropped
    );
    assert_eq!(records + dropped, decisions, "records {records} + dropped {dropped}");
}
