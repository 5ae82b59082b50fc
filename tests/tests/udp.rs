//! Pod-to-pod UDP in the lab, over both families: allowed datagrams are
//! answered (as from the pod they were sent to), denied ones fail with
//! EPERM and are audited, and cross-node ones cross the fabric only inside
//! the tunnel.
use std::{net::SocketAddr, time::Duration};

use mesh_tests::{Capture, KillOnDrop, TestLab, contains, log_records, wait_for};
use serde_json::Value;

const LABTOOL: &str = env!("CARGO_BIN_EXE_labtool");
const MARKER: &str = "MESH-UDP-PLAINTEXT-MARKER";
const PORT: u16 = 5353;

const TOPOLOGY: &str = "
nodes: [{name: node-a}, {name: node-b}]
pods:
  - {name: client, namespace: t, serviceAccount: alpha, node: node-a}
  - {name: near,   namespace: t, serviceAccount: beta,  node: node-a}
  - {name: far,    namespace: t, serviceAccount: beta,  node: node-b}
  - {name: shut,   namespace: t, serviceAccount: gamma, node: node-a}
  - {name: away,   namespace: t, serviceAccount: gamma, node: node-b}
";

/// alpha may send to beta on 5353/udp; nothing may reach gamma.
const POLICY: &str = "
kind: UDPRoute
metadata: {name: dns, namespace: t}
spec: {matches: {ports: [5353]}}
---
kind: TrafficTarget
metadata: {name: alpha-to-beta, namespace: t}
spec:
  destination: {kind: ServiceAccount, name: beta}
  rules: [{kind: UDPRoute, name: dns}]
  sources: [{kind: ServiceAccount, name: alpha}]
";

struct UdpLab {
    t: TestLab,
    _servers: Vec<KillOnDrop>,
}

#[derive(Clone, Copy, Debug)]
enum Family {
    V4,
    V6,
}

impl UdpLab {
    fn up() -> UdpLab {
        let t = TestLab::up_with(TOPOLOGY, &["--policy-mode=enforcing"], LABTOOL);
        std::fs::write(t.lab.source_dir.join("policy.yaml"), POLICY).unwrap();
        let servers = ["near", "far", "shut", "away"]
            .iter()
            .map(|pod| {
                KillOnDrop(
                    t.lab
                        .exec(pod, LABTOOL)
                        .unwrap()
                        .args(["udp-serve", "--port", &PORT.to_string()])
                        .spawn()
                        .unwrap(),
                )
            })
            .collect();
        let lab = &t.lab;
        wait_for("policy in force", Duration::from_secs(5), || {
            ["node-a", "node-b"].iter().all(|n| {
                log_records(&lab.agent_log(n))
                    .iter()
                    .any(|r| r["message"] == "policy in force" && r["targets"] == 1)
            })
        });
        std::thread::sleep(Duration::from_millis(300)); // the servers bind
        UdpLab { t, _servers: servers }
    }

    fn addr(&self, pod: &str, family: Family) -> SocketAddr {
        let p = self.t.lab.pod(pod).unwrap();
        match family {
            Family::V4 => SocketAddr::from((p.ip, PORT)),
            Family::V6 => SocketAddr::from((p.ip6, PORT)),
        }
    }

    /// `labtool udp-ask` from the client pod.
    fn ask(&self, to: SocketAddr, count: usize, connected: bool) -> Value {
        let mut cmd = self.t.lab.exec("client", LABTOOL).unwrap();
        cmd.args(["udp-ask", "--to", &to.to_string(), "--count", &count.to_string()])
            .args(["--marker", MARKER]);
        if connected {
            cmd.arg("--connected");
        }
        let out = cmd.output().unwrap();
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|_| panic!("udp-ask: {}", String::from_utf8_lossy(&out.stderr)))
    }
}

fn answered_all(v: &Value, n: usize, server: SocketAddr) {
    assert_eq!(
        (v["ok"].as_u64(), v["wrong"].as_u64(), v["lost"].as_u64()),
        (Some(n as u64), Some(0), Some(0)),
        "{v}"
    );
    // The server's own address: the pod itself answered, and the reply
    // came back as from the address the client sent to (udp-ask checks).
    assert_eq!(v["servers"][server.to_string()].as_u64(), Some(n as u64), "{v}");
}

fn pod_to_pod(family: Family) {
    let u = UdpLab::up();
    let lab = &u.t.lab;
    const N: usize = 200;

    // Same node: straight to the pod (a short round first: a broken path
    // fails in seconds, not after N timeouts).
    let near = u.addr("near", family);
    answered_all(&u.ask(near, 3, false), 3, near);
    answered_all(&u.ask(near, N, false), N, near);

    // Cross node: through a relay slot and the tunnel, never in the clear.
    let far = u.addr("far", family);
    let mut cap = Capture::start(&format!("udp-{family:?}"));
    answered_all(&u.ask(far, 3, false), 3, far);
    answered_all(&u.ask(far, N, false), N, far);
    answered_all(&u.ask(far, 50, true), 50, far);
    let bytes = cap.stop();
    assert!(bytes.len() > 10_000, "capture too small ({} bytes)", bytes.len());
    assert!(
        !contains(&bytes, MARKER.as_bytes()),
        "{family:?}: the marker crossed the fabric in clear text"
    );
    let far_pod = lab.pod("far").unwrap();
    for ip in [far_pod.ip.to_string(), far_pod.ip6.to_string()] {
        assert_eq!(
            cap.count(&format!("host {ip}")),
            0,
            "{family:?}: packets to {ip} on the fabric"
        );
    }
    // At least one QUIC packet per request (answers and ACKs may share
    // packets): the traffic crossed as tunnel datagrams.
    let tunnel_packets = cap.count("udp port 15008");
    println!(
        "{family:?}: {tunnel_packets} packets on udp 15008 for {} requests",
        N + 53
    );
    assert!(
        tunnel_packets >= N + 53,
        "{family:?}: only {tunnel_packets} packets on udp 15008 for {} requests",
        N + 53
    );

    // Denied, same node and cross node: EPERM at send, audited once each.
    for pod in ["shut", "away"] {
        let to = u.addr(pod, family);
        let v = u.ask(to, 1, false);
        assert_eq!(v["ok"].as_u64(), Some(0), "{pod}: {v}");
        let errors = v["errors"].to_string();
        assert!(errors.contains("Operation not permitted"), "{pod}: want EPERM, got {v}");
        wait_for("the denial audited", Duration::from_secs(3), || {
            log_records(&lab.audit_log("node-a")).iter().any(|r| {
                r["verdict"] == "deny"
                    && r["protocol"] == "udp"
                    && r["enforced_at"] == "source"
                    && r["destination_address"] == to.to_string()
                    && r["source_workload"] == "t/client"
            })
        });
    }
    // Nothing of the denied pods' reached node-b's agent.
    let denied_far = log_records(&lab.audit_log("node-b"))
        .iter()
        .filter(|r| r["destination_workload"] == "t/away")
        .count();
    assert_eq!(denied_far, 0, "a denied datagram reached node-b");
}

/// The UDPRoute's ports bound what an allowed source may send to a pod's
/// own address: alpha may send to beta on 5353/udp, not on another UDP port
/// a beta pod serves, and the UDPRoute opens no TCP port; same node and
/// cross node, both families; `policy check --protocol udp` agrees.
#[test]
fn a_udproute_opens_only_its_ports_and_only_for_udp() {
    let u = UdpLab::up();
    let lab = &u.t.lab;
    const OTHER: u16 = 6000;
    let _others: Vec<KillOnDrop> = ["near", "far"]
        .iter()
        .map(|pod| {
            KillOnDrop(
                lab.exec(pod, LABTOOL)
                    .unwrap()
                    .args(["udp-serve", "--port", &OTHER.to_string()])
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    let _tcp: Vec<KillOnDrop> = ["near", "far"]
        .iter()
        .map(|pod| KillOnDrop(u.t.traffic().serve(pod, PORT).unwrap()))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let check = |to: SocketAddr, protocol: &str| -> bool {
        let out = std::process::Command::new(&lab.agent_bin)
            .args(["policy", "check", "--from", "pod:t/client", "--to", &to.to_string()])
            .args(["--protocol", protocol, "--policy-mode", "enforcing"])
            .arg("--source-dir")
            .arg(&lab.source_dir)
            .output()
            .unwrap();
        out.status.code() == Some(0)
    };
    for pod in ["near", "far"] {
        for family in [Family::V4, Family::V6] {
            let allowed = u.addr(pod, family);
            answered_all(&u.ask(allowed, 3, false), 3, allowed);
            assert!(check(allowed, "udp"), "policy check: {allowed}/udp is allowed");
            let mut other = allowed;
            other.set_port(OTHER);
            let v = u.ask(other, 1, false);
            assert_eq!(v["ok"].as_u64(), Some(0), "{pod} {family:?} port {OTHER}: {v}");
            assert!(
                v["errors"].to_string().contains("Operation not permitted"),
                "{pod} {family:?} port {OTHER}: want EPERM, got {v}"
            );
            assert!(!check(other, "udp"), "policy check: {other}/udp is denied");
            let tcp = u.t.traffic().connect("client", allowed, 1000).unwrap();
            assert_eq!(tcp["ok"], false, "{pod} {family:?}: TCP to {allowed}: {tcp}");
            assert!(!check(allowed, "tcp"), "policy check: {allowed}/tcp is denied");
        }
    }
}

#[test]
fn pod_to_pod_udp_over_ipv4() {
    pod_to_pod(Family::V4);
}

#[test]
fn pod_to_pod_udp_over_ipv6() {
    pod_to_pod(Family::V6);
}
