//! Inbound admission in the lab (issue 18): a meshed pod in strict mode is
//! reached only by flows the mesh vouches for (a same-node meshed pod's
//! permitted connect, the local agent's tunneled flow, the kubelet's
//! probe cgroup); host processes of either node and processes outside the
//! pod cgroups (an unenrolled pod, or a pod of a node without an agent:
//! nothing captures them) are dropped before the handshake, TCP and UDP,
//! both address families, each refusal audited once. Permissive admits
//! the same flows and audits each as unattested.
use std::{net::SocketAddr, process::Command, time::Duration};

use mesh_tests::{KillOnDrop, TestLab, log_records, wait_for};
use serde_json::Value;

const LABTOOL: &str = env!("CARGO_BIN_EXE_labtool");
const TCP_PORT: u16 = 8080;
const UDP_PORT: u16 = 5353;

/// sa-a may reach sa-b and sa-c (TCP 8080, UDP 5353).
const POLICY: &str = "
kind: TCPRoute
metadata: {name: tcp, namespace: t}
spec: {matches: {ports: [8080]}}
---
kind: UDPRoute
metadata: {name: udp, namespace: t}
spec: {matches: {ports: [5353]}}
---
kind: TrafficTarget
metadata: {name: a-to-b, namespace: t}
spec:
  destination: {kind: ServiceAccount, name: sa-b}
  rules: [{kind: TCPRoute, name: tcp}, {kind: UDPRoute, name: udp}]
  sources: [{kind: ServiceAccount, name: sa-a}]
---
kind: TrafficTarget
metadata: {name: a-to-c, namespace: t}
spec:
  destination: {kind: ServiceAccount, name: sa-c}
  rules: [{kind: TCPRoute, name: tcp}, {kind: UDPRoute, name: udp}]
  sources: [{kind: ServiceAccount, name: sa-a}]
";

/// Where a client process runs.
#[derive(Clone, Copy, Debug)]
enum Client {
    Pod(&'static str),
    /// In the pod's network namespace, outside every pod cgroup: what an
    /// unenrolled pod, or a pod on a node without an agent, is.
    Unenrolled(&'static str),
    Host(&'static str),
    Kubelet(&'static str),
}

fn command(t: &TestLab, from: Client) -> Command {
    let lab = &t.lab;
    match from {
        Client::Pod(p) => lab.exec(p, LABTOOL),
        Client::Unenrolled(p) => lab.exec_unmeshed(p, LABTOOL),
        Client::Host(n) => lab.node_exec(n, LABTOOL),
        Client::Kubelet(n) => lab.kubelet_exec(n, LABTOOL),
    }
    .unwrap()
}

fn json(mut cmd: Command) -> Value {
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("no JSON ({e}): {text}"))
}

fn tcp(t: &TestLab, from: Client, to: SocketAddr) -> bool {
    let mut cmd = command(t, from);
    // 1.5 s: the SYN is retransmitted once within it, and audited once.
    cmd.args(["connect", "--to", &to.to_string(), "--timeout-ms", "1500"]);
    json(cmd)["ok"] == true
}

/// Two UDP requests from one socket; how many were answered.
fn udp(t: &TestLab, from: Client, to: SocketAddr) -> u64 {
    let mut cmd = command(t, from);
    cmd.args(["udp-ask", "--to", &to.to_string(), "--count", "2"]);
    json(cmd)["ok"].as_u64().unwrap_or(0)
}

fn addrs(t: &TestLab, pod: &str, port: u16) -> [SocketAddr; 2] {
    let p = t.lab.pod(pod).unwrap();
    [SocketAddr::from((p.ip, port)), SocketAddr::from((p.ip6, port))]
}

fn admission_records(t: &TestLab, node: &str, to: SocketAddr, protocol: &str) -> Vec<Value> {
    log_records(&t.lab.audit_log(node))
        .into_iter()
        .filter(|r| r["kind"] == "admission" && r["destination_address"] == to.to_string() && r["protocol"] == protocol)
        .collect()
}

fn lab_with_servers(args: &[&str]) -> (TestLab, Vec<KillOnDrop>) {
    let t = TestLab::up(args, LABTOOL);
    std::fs::write(t.lab.source_dir.join("policy.yaml"), POLICY).unwrap();
    let udp_servers = ["pod-b", "pod-c"]
        .iter()
        .map(|p| {
            let mut cmd = t.lab.exec(p, LABTOOL).unwrap();
            cmd.args(["udp-serve", "--port", &UDP_PORT.to_string()]);
            KillOnDrop(cmd.stdout(std::process::Stdio::null()).spawn().unwrap())
        })
        .collect();
    // The policy is in force on both nodes once a.pod-a -> pod-b connects.
    let b = addrs(&t, "pod-b", TCP_PORT)[0];
    wait_for("policy in force", Duration::from_secs(20), || {
        log_records(&t.lab.agent_log("node-b"))
            .iter()
            .any(|r| r["message"] == "policy in force" && r["targets"] == 2)
            && tcp(&t, Client::Pod("pod-a"), b)
    });
    std::thread::sleep(Duration::from_millis(300));
    (t, udp_servers)
}

fn node_of(pod: &str) -> &'static str {
    if pod == "pod-c" { "node-b" } else { "node-a" }
}

#[test]
fn strict_pods_admit_only_what_the_mesh_vouches_for_and_audit_each_refusal_once() {
    let (t, _udp) = lab_with_servers(&["--policy-mode=enforcing"]);
    for dst in ["pod-b", "pod-c"] {
        let node = node_of(dst);
        for to in addrs(&t, dst, TCP_PORT) {
            // Vouched: a meshed pod's permitted connect (pod-b: same node,
            // sockops; pod-c: the agent's tunneled flow) and the kubelet.
            assert!(
                tcp(&t, Client::Pod("pod-a"), to),
                "pod-a -> {to} (allowed by policy) failed"
            );
            assert!(
                tcp(&t, Client::Kubelet(node), to),
                "{node}'s kubelet probe to {to} refused"
            );
            // (An unenrolled process in dst's own network namespace is the
            // pod talking to itself, which never leaves it.)
            let mut refused = vec![
                Client::Host("node-a"),
                Client::Host("node-b"),
                Client::Unenrolled("pod-a"),
            ];
            if dst != "pod-c" {
                refused.push(Client::Unenrolled("pod-c"));
            }
            for &from in &refused {
                assert!(!tcp(&t, from, to), "{from:?} reached {to} in strict mode");
            }
            std::thread::sleep(Duration::from_millis(300));
            let records = admission_records(&t, node, to, "tcp");
            assert_eq!(
                records.len(),
                refused.len(),
                "each refused connect to {to} is audited once (SYN retransmissions are not): {records:#?}"
            );
            assert!(
                records
                    .iter()
                    .all(|r| r["verdict"] == "deny" && r["source_address"] != "")
            );
        }
        for to in addrs(&t, dst, UDP_PORT) {
            assert_eq!(
                udp(&t, Client::Pod("pod-a"), to),
                2,
                "pod-a -> {to}/udp (allowed) not answered"
            );
            for from in [Client::Host("node-a"), Client::Host(node), Client::Unenrolled("pod-a")] {
                assert_eq!(
                    udp(&t, from, to),
                    0,
                    "{from:?} got answers from {to}/udp in strict mode"
                );
            }
            std::thread::sleep(Duration::from_millis(300));
            let records = admission_records(&t, node, to, "udp");
            // Three refused sockets (each udp-ask is one, retries included).
            assert_eq!(
                records.len(),
                3,
                "one audit record per refused UDP sender: {records:#?}"
            );
        }
    }
    // The kernel counts what it dropped.
    for node in ["node-a", "node-b"] {
        let dump = xtask::probe::dump_map(&t.lab, node, "mesh_capture").unwrap();
        let refused = xtask::probe::per_cpu_sum(&dump, "inbound_refused");
        assert!(refused >= 8, "{node}: mesh_capture inbound_refused={refused}");
    }
}

#[test]
fn permissive_admits_unattested_flows_and_audits_each() {
    let (t, _udp) = lab_with_servers(&["--policy-mode=enforcing"]);
    let to = addrs(&t, "pod-c", TCP_PORT)[0];
    assert!(
        !tcp(&t, Client::Host("node-b"), to),
        "strict by default in enforcing mode"
    );
    // The namespace's annotation makes its pods permissive.
    let ns = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: t\n  annotations: {mesh.dev/admission: permissive}\n";
    std::fs::write(t.lab.source_dir.join("namespace.yaml"), ns).unwrap();
    wait_for("permissive in force", Duration::from_secs(10), || {
        tcp(&t, Client::Host("node-b"), to)
    });
    let before = admission_records(&t, "node-b", to, "tcp").len();
    for from in [Client::Host("node-a"), Client::Unenrolled("pod-a")] {
        assert!(tcp(&t, from, to), "{from:?} refused in permissive mode");
    }
    let u = addrs(&t, "pod-c", UDP_PORT)[1];
    assert_eq!(udp(&t, Client::Host("node-b"), u), 2, "permissive UDP not answered");
    std::thread::sleep(Duration::from_millis(300));
    let records = admission_records(&t, "node-b", to, "tcp");
    assert_eq!(records.len(), before + 2, "each unattested flow audited: {records:#?}");
    assert!(
        records[before..]
            .iter()
            .all(|r| r["verdict"] == "allow" && r["reason"].as_str().unwrap().contains("unattested"))
    );
    assert_eq!(admission_records(&t, "node-b", u, "udp").len(), 1);
    // Vouched flows are not audited as unattested.
    assert!(tcp(&t, Client::Pod("pod-a"), to));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(admission_records(&t, "node-b", to, "tcp").len(), before + 2);
    // Removing the annotation puts strict back in force.
    std::fs::remove_file(t.lab.source_dir.join("namespace.yaml")).unwrap();
    wait_for("strict again", Duration::from_secs(10), || {
        !tcp(&t, Client::Host("node-b"), to)
    });
}
