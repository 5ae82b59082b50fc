//! Every socket of every pod, on a node laid out as the kubelet lays it out:
//! processes run in a container cgroup below the pod's, a process that makes
//! its own child cgroup is still its pod, both cgroup drivers and all three
//! QoS classes are found by pod UID, a pod whose cgroup appears late is
//! enrolled within a second, a deleted pod leaves the maps, and a Java
//! client (an AF_INET6 socket to an IPv4-mapped address, the JVM's default)
//! is captured and denied like any other.
use std::{
    net::SocketAddr,
    os::unix::fs::MetadataExt as _,
    path::Path,
    time::{Duration, Instant},
};

use mesh_tests::{TestLab, log_records, wait_for};
use serde_json::Value;
use xtask::lab::Lab;

const LABTOOL: &str = env!("CARGO_BIN_EXE_labtool");

/// The cgroup ids `mesh_workloads` holds on a node.
fn enrolled(lab: &Lab, node: &str) -> Vec<u64> {
    let dump = xtask::probe::dump_map(lab, node, "mesh_workloads").unwrap();
    dump.as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["formatted"]["key"].as_u64())
        .collect()
}

fn inode(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().ino()
}

/// Runs labtool from a pod after moving itself into `<container>/<child>`.
fn from_child_cgroup(lab: &Lab, pod: &str, child: &str, args: &[&str]) -> Value {
    let p = lab.pod(pod).unwrap();
    let container = lab.container_cgroup(p);
    let out = lab
        .exec(pod, "sh")
        .unwrap()
        .arg("-c")
        .arg(r#"cg="$1/$2"; shift 2; mkdir -p "$cg" && echo $$ > "$cg/cgroup.procs" && exec "$@""#)
        .arg("escape")
        .arg(&container)
        .arg(child)
        .arg(LABTOOL)
        .args(args)
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("labtool: {}", String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn a_process_in_a_cgroup_it_made_below_its_container_is_still_its_pod() {
    // Enforcing, and no TrafficTarget: every meshed flow is denied.
    let t = TestLab::up(&["--policy-mode=enforcing"], LABTOOL);
    let lab = &t.lab;
    for (dst, where_) in [("pod-b", "same node"), ("pod-c", "cross node")] {
        let to = t.addr(dst).to_string();
        let r = from_child_cgroup(lab, "pod-a", "made-by-the-app/deeper", &["connect", "--to", &to]);
        assert_eq!(r["ok"], false, "{where_}: a child cgroup escaped the mesh: {r}");
        assert!(
            r["error"].as_str().unwrap_or("").contains("Operation not permitted"),
            "{where_}: denied, but not at connect() with EPERM: {r}"
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    let denials: Vec<Value> = log_records(&lab.audit_log("node-a"))
        .into_iter()
        .filter(|r| r["enforced_at"] == "source" && r["verdict"] == "deny")
        .collect();
    for dst in ["pod-b", "pod-c"] {
        let n = denials
            .iter()
            .filter(|r| r["source_workload"] == "t/pod-a" && r["destination_address"] == t.addr(dst).to_string())
            .count();
        assert_eq!(n, 1, "one audit record for pod-a -> {dst}: {denials:?}");
    }
}

#[test]
fn a_process_in_a_child_cgroup_is_carried_as_its_pod() {
    let t = TestLab::up(&[], LABTOOL);
    let to = t.addr("pod-c").to_string();
    let r = from_child_cgroup(&t.lab, "pod-a", "worker", &["send", "--to", &to, "--bytes", "65536"]);
    mesh_tests::assert_intact(&r);
    let recs = t.wait_proxied("node-a", 1);
    assert!(
        recs.iter().any(|r| r["source_workload"] == "t/pod-a"),
        "the agent did not carry the child cgroup's flow as t/pod-a: {recs:?}"
    );
}

fn kubelet_topology(driver: &str) -> String {
    format!(
        "cgroupDriver: {driver}
nodes: [{{name: node-a}}, {{name: node-b}}]
pods:
  - {{name: guaranteed, namespace: t, serviceAccount: g, node: node-a, qos: Guaranteed}}
  - {{name: burstable, namespace: t, serviceAccount: b, node: node-a, qos: Burstable}}
  - {{name: besteffort, namespace: t, serviceAccount: e, node: node-a, qos: BestEffort}}
  - {{name: pod-c, namespace: t, serviceAccount: sa-c, node: node-b}}
"
    )
}

fn found_as_the_kubelet_lays_them_out(driver: &str, layout: &[&str]) {
    let t = TestLab::up_with(&kubelet_topology(driver), &[], LABTOOL);
    let lab = &t.lab;
    let pods = ["guaranteed", "burstable", "besteffort"];
    for (pod, want) in pods.iter().zip(layout) {
        let dir = lab.pod_cgroup(lab.pod(pod).unwrap());
        let rel = dir
            .strip_prefix(lab.kubelet_root("node-a"))
            .unwrap()
            .to_string_lossy()
            .to_string();
        let uid = &lab.pod(pod).unwrap().uid;
        let want = want.replace("UID_", &uid.replace('-', "_")).replace("UID", uid);
        assert_eq!(rel, want, "{driver}: {pod}'s cgroup");
    }
    wait_for("all three pods enrolled", Duration::from_secs(5), || {
        enrolled(lab, "node-a").len() == 3
    });
    let ids = enrolled(lab, "node-a");
    for pod in pods {
        let id = inode(&lab.pod_cgroup(lab.pod(pod).unwrap()));
        assert!(
            ids.contains(&id),
            "{driver}: {pod}'s pod-level cgroup {id} not in mesh_workloads {ids:?}"
        );
        let r = t.traffic().send(pod, t.addr("pod-c"), 4096).unwrap();
        mesh_tests::assert_intact(&r);
    }
    let recs = t.wait_proxied("node-a", 3);
    for pod in pods {
        assert!(
            recs.iter().any(|r| r["source_workload"] == format!("t/{pod}")),
            "{driver}: {pod}'s flow not carried as t/{pod}: {recs:?}"
        );
    }

    // A pod whose cgroup appears after its Pod object (the kubelet starts
    // it late): enrolled within a second of the directory appearing.
    let late = lab.pod("besteffort").unwrap();
    let (pod_dir, container) = (lab.pod_cgroup(late), lab.container_cgroup(late));
    let old = inode(&pod_dir);
    std::fs::remove_dir(&container).unwrap();
    std::fs::remove_dir(&pod_dir).unwrap();
    wait_for(
        "the removed cgroup to leave mesh_workloads",
        Duration::from_secs(5),
        || !enrolled(lab, "node-a").contains(&old),
    );
    std::fs::create_dir_all(&container).unwrap();
    let appeared = Instant::now();
    let new = inode(&pod_dir);
    while !enrolled(lab, "node-a").contains(&new) {
        assert!(
            appeared.elapsed() < Duration::from_secs(1),
            "{driver}: a pod whose cgroup appeared late was not enrolled within 1 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("{driver}: enrolled {:?} after its cgroup appeared", appeared.elapsed());
    let r = t.traffic().send("besteffort", t.addr("pod-c"), 4096).unwrap();
    mesh_tests::assert_intact(&r);

    // A deleted pod: its ids leave mesh_workloads and mesh_endpoints.
    let pods_yaml = lab.source_dir.join("pods.yaml");
    let text = std::fs::read_to_string(&pods_yaml).unwrap();
    let kept: Vec<&str> = text
        .split("---\n")
        .filter(|d| !d.contains("name: guaranteed\n"))
        .collect();
    std::fs::write(&pods_yaml, kept.join("---\n")).unwrap();
    let gone = inode(&lab.pod_cgroup(lab.pod("guaranteed").unwrap()));
    let ip = lab.pod("guaranteed").unwrap().ip;
    let key = u32::from_ne_bytes(ip.octets()) as u64;
    wait_for("the deleted pod to leave the maps", Duration::from_secs(5), || {
        let endpoints = xtask::probe::dump_map(lab, "node-a", "mesh_endpoints").unwrap();
        let in_endpoints = endpoints
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["formatted"]["key"].as_u64() == Some(key));
        !enrolled(lab, "node-a").contains(&gone) && !in_endpoints
    });
}

#[test]
fn the_systemd_driver_and_every_qos_class() {
    found_as_the_kubelet_lays_them_out(
        "systemd",
        &[
            "kubepods-podUID_.slice",
            "kubepods-burstable.slice/kubepods-burstable-podUID_.slice",
            "kubepods-besteffort.slice/kubepods-besteffort-podUID_.slice",
        ],
    );
}

#[test]
fn the_cgroupfs_driver_and_every_qos_class() {
    found_as_the_kubelet_lays_them_out("cgroupfs", &["podUID", "burstable/podUID", "besteffort/podUID"]);
}

/// A Java client, with the JVM's default flags: `new Socket(host, port)`
/// opens an AF_INET6 socket and connects to `::ffff:a.b.c.d`.
const JAVA_CLIENT: &str = r#"
import java.io.*;
import java.net.*;

public class MeshClient {
    public static void main(String[] args) throws Exception {
        try (Socket s = new Socket(args[0], Integer.parseInt(args[1]))) {
            s.getOutputStream().write("hello from java".getBytes());
            s.shutdownOutput();
            String reply = new String(s.getInputStream().readAllBytes());
            System.out.println("{\"ok\":true,\"local\":\"" + s.getLocalAddress() + "\",\"reply\":" + reply + "}");
        } catch (IOException e) {
            System.out.println("{\"ok\":false,\"error\":\"" + e.getMessage() + "\"}");
        }
    }
}
"#;

fn java(lab: &Lab, pod: &str, to: SocketAddr) -> Value {
    let dir = std::env::temp_dir().join(format!("mesh-java-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("MeshClient.java");
    std::fs::write(&src, JAVA_CLIENT).unwrap();
    let out = lab
        .exec(pod, "java")
        .unwrap()
        .arg(&src)
        .args([to.ip().to_string(), to.port().to_string()])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "java: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn a_java_client_with_default_flags_is_captured_and_denied_like_any_other() {
    if std::process::Command::new("java").arg("-version").output().is_err() {
        panic!("java is missing: run.sh installs default-jdk-headless");
    }
    // Permissive: the Java flow to another node goes through the tunnel.
    let t = TestLab::up(&[], LABTOOL);
    let r = java(&t.lab, "pod-a", t.addr("pod-c"));
    assert_eq!(r["ok"], true, "java -> pod-c: {r}");
    assert!(
        r["local"]
            .as_str()
            .unwrap_or("")
            .contains(&t.lab.pod("pod-a").unwrap().ip.to_string()),
        "{r}"
    );
    let recs = t.wait_proxied("node-a", 1);
    assert!(
        recs.iter()
            .any(|r| r["source_workload"] == "t/pod-a" && r["original_dst"] == t.addr("pod-c").to_string()),
        "the Java flow was not captured: {recs:?}"
    );
    drop(t);
    // Enforcing with nothing allowed: refused at connect(), audited once.
    let t = TestLab::up(&["--policy-mode=enforcing"], LABTOOL);
    for dst in ["pod-b", "pod-c"] {
        let r = java(&t.lab, "pod-a", t.addr(dst));
        assert_eq!(r["ok"], false, "java -> {dst} got through: {r}");
        assert!(
            r["error"].as_str().unwrap_or("").contains("Operation not permitted"),
            "java -> {dst}: {r}"
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    let denials = log_records(&t.lab.audit_log("node-a"))
        .into_iter()
        .filter(|r| r["enforced_at"] == "source" && r["verdict"] == "deny" && r["source_workload"] == "t/pod-a")
        .count();
    assert_eq!(denials, 2, "one audit record per denied Java connect");
}
