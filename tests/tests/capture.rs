//! End-to-end tests of kernel capture and the same-node fast path, in the
//! lab (root, real kernel, real namespaces). Run by `cargo xtask test`, one
//! at a time (`--test-threads=1`): they share the lab's names.
//!
//! Every test builds its own lab and removes it in a guard's Drop, so a
//! failing assertion still cleans up.
use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use xtask::{
    lab::{self, Lab, Topology, UpOptions},
    probe::{self, Traffic},
};

const TOPOLOGY: &str = "
nodes: [{name: node-a}, {name: node-b}]
pods:
  - {name: pod-a, namespace: t, serviceAccount: sa-a, node: node-a}
  - {name: pod-b, namespace: t, serviceAccount: sa-b, node: node-a}
  - {name: pod-c, namespace: t, serviceAccount: sa-c, node: node-b}
";
const PORT: u16 = 8080;

fn agent_bin() -> PathBuf {
    std::env::var_os("MESH_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| probe::built_binary("mesh-agent"))
}

/// The lab for one test; removed on drop, also when the test panics.
struct TestLab {
    lab: Lab,
    servers: Vec<Child>,
}

impl Drop for TestLab {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        lab::down().expect("lab down");
    }
}

impl TestLab {
    fn up(agent_args: &[&str]) -> TestLab {
        assert!(
            std::fs::metadata(agent_bin()).is_ok(),
            "agent binary {} missing: run through `cargo xtask test`",
            agent_bin().display()
        );
        lab::down().expect("clean slate");
        let topo: Topology = serde_yaml_from(TOPOLOGY);
        let lab = Lab::up(
            &topo,
            &UpOptions {
                agent_bin: agent_bin(),
                policy_dir: None,
                start_agents: true,
                agent_args: agent_args.iter().map(|s| s.to_string()).collect(),
            },
        )
        .expect("lab up");
        let mut t = TestLab { lab, servers: vec![] };
        for pod in ["pod-b", "pod-c"] {
            let child = t.traffic().serve(pod, PORT).expect("server");
            t.servers.push(child);
        }
        t
    }

    fn traffic(&self) -> Traffic<'_> {
        Traffic {
            lab: &self.lab,
            labtool: PathBuf::from(env!("CARGO_BIN_EXE_labtool")),
        }
    }

    fn addr(&self, pod: &str) -> SocketAddr {
        SocketAddr::from((self.lab.pod(pod).unwrap().ip, PORT))
    }

    fn proxied(&self, node: &str) -> Vec<Value> {
        probe::proxied_connections(&self.lab, node)
    }

    /// Waits (briefly) for the agent's "connection closed" records to reach `n`.
    fn wait_proxied(&self, node: &str, n: usize) -> Vec<Value> {
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

fn assert_intact(r: &Value) {
    assert_eq!(r["ok"], true, "transfer not intact: {r}");
    assert_eq!(r["sent_sha256"], r["reply"]["sha256"], "{r}");
}

#[test]
fn same_node_traffic_is_spliced_in_the_kernel_and_never_reaches_the_agent() {
    let t = TestLab::up(&[]);
    let size: u64 = 8 << 20;
    let before = probe::splice_counters(&t.lab, "node-a").unwrap();
    let r = t.traffic().send("pod-a", t.addr("pod-b"), size).unwrap();
    let after = probe::splice_counters(&t.lab, "node-a").unwrap();
    assert_intact(&r);
    let spliced = after.1 - before.1;
    // Payload one way plus the server's one-line reply the other way.
    assert!(spliced >= size, "spliced {spliced} bytes, payload {size}: {r}");
    assert!(
        spliced < size + 4096,
        "spliced {spliced} bytes: more than this flow sent"
    );
    assert!(after.0 > before.0);
    // The agent saw no connection at all.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        t.proxied("node-a").is_empty(),
        "agent proxied a same-node flow: {:?}",
        t.proxied("node-a")
    );
    // The server saw the pod's own address: nothing in between.
    assert_eq!(r["reply"]["peer"], r["local"]);
}

#[test]
fn cross_node_traffic_goes_through_the_agent_which_names_the_source_workload() {
    let t = TestLab::up(&[]);
    let size: u64 = 8 << 20;
    let r = t.traffic().send("pod-a", t.addr("pod-c"), size).unwrap();
    assert_intact(&r);
    let recs = t.wait_proxied("node-a", 1);
    assert_eq!(recs.len(), 1, "{recs:?}");
    let rec = &recs[0];
    // Named from the cgroup the connect came from, not from the source IP.
    assert_eq!(rec["source_workload"], "t/pod-a", "{rec}");
    assert_eq!(rec["original_dst"], t.addr("pod-c").to_string(), "{rec}");
    assert_eq!(rec["destination_workload"], "t/pod-c", "{rec}");
    assert_eq!(rec["bytes_sent"], size, "{rec}");
    assert_eq!(rec["client"], r["local"], "{rec}");
    // pod-c saw node-a's agent, which dialled it from node-a's fabric address.
    let peer = r["reply"]["peer"].as_str().unwrap();
    assert!(
        peer.starts_with(&format!("{}:", t.lab.node("node-a").unwrap().fabric_ip)),
        "{peer}"
    );
    // The pod-to-agent hop was spliced too.
    let (_, spliced) = probe::splice_counters(&t.lab, "node-a").unwrap();
    assert!(spliced >= size, "pod-to-agent hop spliced only {spliced} bytes");
}

#[test]
fn unenrolled_processes_and_the_agents_own_connections_are_not_captured() {
    let t = TestLab::up(&[]);
    // A node process outside every pod cgroup reaches pod-c directly.
    let r = t.traffic().send_from_node("node-a", t.addr("pod-c"), 1 << 20).unwrap();
    assert_intact(&r);
    assert_eq!(r["reply"]["peer"], r["local"], "the connection was rewritten: {r}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(t.proxied("node-a").is_empty(), "agent proxied an unenrolled flow");
    // A captured flow: had the agent's upstream connect been captured too, it
    // would loop back into the agent and never reach pod-c.
    let r = t.traffic().send("pod-a", t.addr("pod-c"), 1 << 20).unwrap();
    assert_intact(&r);
    assert_eq!(t.wait_proxied("node-a", 1).len(), 1);
    let capture = probe::dump_map(&t.lab, "node-a", "mesh_capture").unwrap();
    assert_eq!(
        probe::per_cpu_sum(&capture, "redirected"),
        1,
        "exactly one connect was redirected: {capture}"
    );
}

#[test]
fn with_the_agent_down_captured_connects_fail_at_once_and_recover_on_restart() {
    let t = TestLab::up(&[]);
    let dst = t.addr("pod-c");
    assert_intact(&t.traffic().send("pod-a", dst, 1 << 16).unwrap());
    t.lab.stop_agent("node-a").unwrap();
    let r = t.traffic().connect("pod-a", dst, 5000).unwrap();
    assert_eq!(r["ok"], false, "connect succeeded with the agent down: {r}");
    assert!(r["error"].as_str().unwrap().contains("refused"), "{r}");
    let ms = r["elapsed_ms"].as_f64().unwrap();
    assert!(ms < 1000.0, "took {ms} ms to fail");
    // Same-node traffic keeps flowing (and spliced) while the agent is down.
    assert_intact(&t.traffic().send("pod-a", t.addr("pod-b"), 1 << 16).unwrap());

    t.lab.start_agent("node-a").unwrap();
    let log = std::fs::read_to_string(t.lab.agent_log("node-a")).unwrap();
    assert!(
        log.contains("adopting pinned connect4 link"),
        "restarted agent did not adopt the pins"
    );
    let r = t.traffic().send("pod-a", dst, 1 << 20).unwrap();
    assert_intact(&r);
}

#[test]
fn fail_open_lets_captured_connects_through_while_the_agent_is_down() {
    let t = TestLab::up(&["--fail-open"]);
    let dst = t.addr("pod-c");
    t.lab.stop_agent("node-a").unwrap();
    // The agent's liveness window (3 s) must lapse first.
    std::thread::sleep(Duration::from_millis(3500));
    let r = t.traffic().send("pod-a", dst, 1 << 16).unwrap();
    assert_intact(&r);
    assert_eq!(
        r["reply"]["peer"], r["local"],
        "fail-open traffic should go direct: {r}"
    );
}

#[test]
fn splicing_can_be_turned_off() {
    let t = TestLab::up(&["--splice=false"]);
    let r = t.traffic().send("pod-a", t.addr("pod-b"), 1 << 20).unwrap();
    assert_intact(&r);
    let r = t.traffic().send("pod-a", t.addr("pod-c"), 1 << 20).unwrap();
    assert_intact(&r);
    assert_eq!(probe::splice_counters(&t.lab, "node-a").unwrap(), (0, 0));
}

#[test]
fn bpftool_prints_every_map_as_typed_structs() {
    let t = TestLab::up(&[]);
    // Hold a same-node connection open so the sockhash has an entry.
    let held = t
        .lab
        .exec("pod-a", env!("CARGO_BIN_EXE_labtool"))
        .unwrap()
        .args([
            "send",
            "--to",
            &t.addr("pod-b").to_string(),
            "--bytes",
            "10",
            "--hold-ms",
            "3000",
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut held = Guard(held);
    std::thread::sleep(Duration::from_millis(500));
    let expect = [
        ("mesh_workloads", "workload_id"),
        ("mesh_endpoints", "same_node"),
        ("mesh_config", "agent_port"),
        ("mesh_splice", "messages"),
        ("mesh_capture", "redirected"),
    ];
    let dump = |map: &str| {
        let path = t.lab.pin_dir("node-a").join(map);
        let out = Command::new("bpftool")
            .args(["map", "dump", "pinned"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "bpftool on {map}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    for (map, field) in expect {
        let text = dump(map);
        assert!(text.contains(field), "{map}: no field {field} in\n{text}");
    }
    // The kernel gives sockhash maps no BTF: bpftool prints their keys as
    // bytes. pod-a's address (198.18.1.10 = c6 12 01 0a) must be among them.
    let text = dump("mesh_socks");
    assert!(
        text.contains("key:") && text.contains("c6 12 01 0a"),
        "mesh_socks holds no pod-a socket:\n{text}"
    );
    // Short-lived maps are usually empty; their BTF still names the types.
    for (map, ty) in [("mesh_cookies", "OrigDst"), ("mesh_flows", "SockKey")] {
        let path = t.lab.pin_dir("node-a").join(map);
        let out = Command::new("bpftool")
            .args(["-j", "map", "show", "pinned"])
            .arg(&path)
            .output()
            .unwrap();
        let info: Value = serde_json::from_slice(&out.stdout).unwrap();
        let btf_id = info["btf_id"]
            .as_u64()
            .unwrap_or_else(|| panic!("{map} has no BTF: {info}"));
        let out = Command::new("bpftool")
            .args(["btf", "dump", "id", &btf_id.to_string()])
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(ty),
            "{map}: BTF lacks {ty}"
        );
    }
    let _ = held.0.wait();
}

struct Guard(Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn lab_down_after_a_killed_run_leaves_nothing_behind() {
    lab::down().unwrap();
    // A separate process brings the lab up and is killed mid-flight, as a
    // crashed or interrupted test run would be.
    let mut victim = Command::new(env!("CARGO_BIN_EXE_labtool"))
        .args(["lab-up-and-hang", "--agent-bin"])
        .arg(agent_bin())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Lab::load().ok().and_then(|l| l.agent_pid("node-b")).is_none() {
        assert!(Instant::now() < deadline, "lab never came up");
        std::thread::sleep(Duration::from_millis(50));
    }
    victim.kill().unwrap();
    victim.wait().unwrap();
    let agent_pids: Vec<u32> = {
        let l = Lab::load().unwrap();
        l.nodes.iter().filter_map(|n| l.agent_pid(&n.name)).collect()
    };
    assert_eq!(agent_pids.len(), 2, "agents outlive the killed run (until lab down)");

    lab::down().unwrap();

    assert!(lab::lab_netns().is_empty(), "netns left: {:?}", lab::lab_netns());
    assert!(!lab::lab_cgroup().unwrap().exists(), "cgroup left");
    assert!(!std::path::Path::new(lab::BPFFS_DIR).exists(), "pins left");
    assert!(!std::path::Path::new(lab::STATE_DIR).exists(), "state left");
    for pid in agent_pids {
        assert!(!lab::pid_alive(pid), "agent {pid} still running");
    }
    // No mesh program is still attached anywhere, and no lab veth or bridge
    // appeared in the host namespace.
    // Programs are freed asynchronously once their last link is gone.
    let deadline = Instant::now() + Duration::from_secs(5);
    let ours = loop {
        let progs = Command::new("bpftool").args(["-j", "prog", "show"]).output().unwrap();
        let progs: Value = serde_json::from_slice(&progs.stdout).unwrap();
        let ours: Vec<Value> = progs
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["name"].as_str().is_some_and(|n| n.starts_with("mesh_")))
            .cloned()
            .collect();
        if ours.is_empty() || Instant::now() > deadline {
            break ours;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(ours.is_empty(), "programs still loaded: {ours:?}");
    let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
    let links = String::from_utf8_lossy(&links.stdout);
    for name in ["vf1", "vf2", "vp0", "br0", "cni0"] {
        assert!(!links.contains(&format!(": {name}")), "{name} in the host namespace");
    }
}
