//! End-to-end tests of kernel capture and the same-node fast path, in the
//! lab (root, real kernel, real namespaces). Run by `cargo xtask test`, one
//! at a time (`--test-threads=1`): they share the lab's names.
//!
//! Every test builds its own lab and removes it in a guard's Drop, so a
//! failing assertion still cleans up.
use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use mesh_tests::{KillOnDrop, TestLab, agent_bin, assert_intact};
use serde_json::Value;
use xtask::{
    lab::{self, Lab},
    probe,
};

const LABTOOL: &str = env!("CARGO_BIN_EXE_labtool");

fn up(agent_args: &[&str]) -> TestLab {
    TestLab::up(agent_args, LABTOOL)
}

#[test]
fn same_node_traffic_is_delivered_veth_to_veth_and_never_reaches_the_agent() {
    let t = up(&[]);
    let size: u64 = 8 << 20;
    // Both pods' veths found and carrying the link.
    mesh_tests::wait_for("the fast path on both pods' veths", Duration::from_secs(5), || {
        probe::dump_map(&t.lab, "node-a", "mesh_pod_devs")
            .map(|d| d.as_array().map_or(0, |a| a.len()) >= 4)
            .unwrap_or(false)
    });
    let before = probe::fast_path_counters(&t.lab, "node-a").unwrap();
    let r = t.traffic().send("pod-a", t.addr("pod-b"), size).unwrap();
    let after = probe::fast_path_counters(&t.lab, "node-a").unwrap();
    assert_intact(&r);
    // Every packet of the flow, both ways, with their headers: at least the
    // payload, and not twice it (nothing took the bridge and came back).
    let bytes = after.1 - before.1;
    assert!(bytes >= size, "fast path carried {bytes} bytes, payload {size}: {r}");
    assert!(
        bytes < size * 2,
        "fast path carried {bytes} bytes: more than this flow sent"
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
    let t = up(&[]);
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
    // pod-c saw its own node's agent (the tunnel's far end), not pod-a.
    let peer = r["reply"]["peer"].as_str().unwrap();
    assert!(
        peer.starts_with(&format!("{}:", t.lab.node("node-b").unwrap().gateway_ip)),
        "{peer}"
    );
    // The pod-to-agent hop is to the node, not to a pod: the bridge's.
    let (_, fast) = probe::fast_path_counters(&t.lab, "node-a").unwrap();
    assert!(
        fast < size / 2,
        "the pod-to-agent hop took the fast path ({fast} bytes)"
    );
}

#[test]
fn unenrolled_processes_and_the_agents_own_connections_are_not_captured() {
    let t = up(&[]);
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
    let t = up(&[]);
    let dst = t.addr("pod-c");
    assert_intact(&t.traffic().send("pod-a", dst, 1 << 16).unwrap());
    t.lab.stop_agent("node-a").unwrap();
    let r = t.traffic().connect("pod-a", dst, 5000).unwrap();
    assert_eq!(r["ok"], false, "connect succeeded with the agent down: {r}");
    assert!(r["error"].as_str().unwrap().contains("refused"), "{r}");
    let ms = r["elapsed_ms"].as_f64().unwrap();
    assert!(ms < 1000.0, "took {ms} ms to fail");
    // Same-node traffic keeps flowing (over the bridge) while the agent is down.
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
    let t = up(&["--fail-open"]);
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

/// Entries in node-a's `mesh_pod_devs`.
fn pod_devs(lab: &Lab) -> usize {
    probe::dump_map(lab, "node-a", "mesh_pod_devs").map_or(0, |d| d.as_array().map_or(0, Vec::len))
}

#[test]
fn a_pod_that_claims_a_neighbours_address_takes_the_fast_path_from_neither() {
    let t = up(&[]);
    mesh_tests::wait_for("both pods on the fast path", Duration::from_secs(5), || {
        pod_devs(&t.lab) == 4
    });
    // pod-b (root in its own namespace) adds pod-a's address to its eth0.
    let stolen = format!("{}/32", t.addr("pod-a").ip());
    let ip = |verb: &str| {
        let ok = t
            .lab
            .exec("pod-b", "ip")
            .unwrap()
            .args(["addr", verb, &stolen, "dev", "eth0"])
            .status()
            .unwrap();
        assert!(ok.success(), "ip addr {verb} {stolen} in pod-b");
    };
    ip("add");
    // pod-a's address is now held behind two veths: nobody's. pod-a loses
    // its entries (both families, its addresses are one row); pod-b keeps
    // its own, and frames for pod-a's address are never sent to pod-b.
    mesh_tests::wait_for("pod-a off the fast path", Duration::from_secs(5), || {
        pod_devs(&t.lab) == 2
    });
    let dump = probe::dump_map(&t.lab, "node-a", "mesh_pod_devs").unwrap();
    let theirs = t.lab.pod("pod-b").unwrap().ip.octets();
    assert!(
        dump.as_array().unwrap().iter().all(|e| {
            let words = &e["formatted"]["key"]["words"];
            words[3].as_u64().map(|w| (w as u32).to_ne_bytes()) == Some(theirs)
                || words[2].as_u64() != Some(u64::from(mesh_common::V4_MAPPED_WORD))
        }),
        "an IPv4 entry other than pod-b's: {dump}"
    );
    ip("del");
    mesh_tests::wait_for("pod-a back on the fast path", Duration::from_secs(5), || {
        pod_devs(&t.lab) == 4
    });
    assert_intact(&t.traffic().send("pod-a", t.addr("pod-b"), 1 << 20).unwrap());
}

#[test]
fn the_fast_path_can_be_turned_off() {
    let t = up(&["--fast-path=false"]);
    let r = t.traffic().send("pod-a", t.addr("pod-b"), 1 << 20).unwrap();
    assert_intact(&r);
    let r = t.traffic().send("pod-a", t.addr("pod-c"), 1 << 20).unwrap();
    assert_intact(&r);
    assert_eq!(probe::fast_path_counters(&t.lab, "node-a").unwrap(), (0, 0));
}

#[test]
fn bpftool_prints_every_map_as_typed_structs() {
    let t = up(&[]);
    // Hold a same-node connection open so mesh_pod_flows has an entry.
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
    let mut held = KillOnDrop(held);
    std::thread::sleep(Duration::from_millis(500));
    let expect = [
        ("mesh_workloads", "workload_id"),
        ("mesh_endpoints", "same_node"),
        ("mesh_config", "agent_port"),
        ("mesh_fast_stats", "packets"),
        ("mesh_pod_devs", "ifindex"),
        ("mesh_capture", "redirected"),
        // The held pod-to-pod connection: its sockets and workload pair.
        ("mesh_pod_flows", "is_client"),
        ("mesh_traffic", "sent_bytes"),
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
    // And `bpftool link` lists the fast path's TCX links, one per pod veth
    // of node-a (pod-a, pod-b), held by the agent.
    let ids: Vec<u64> = serde_json::from_slice::<serde_json::Value>(
        &Command::new("bpftool")
            .args(["-j", "prog", "show", "name", "mesh_fast_path"])
            .output()
            .unwrap()
            .stdout,
    )
    .map(|v| match v {
        serde_json::Value::Array(a) => a.iter().filter_map(|p| p["id"].as_u64()).collect(),
        p => p["id"].as_u64().into_iter().collect(),
    })
    .unwrap_or_default();
    let links: serde_json::Value = serde_json::from_slice(
        &Command::new("bpftool")
            .args(["-j", "link", "show"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let fast_links = links
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["prog_id"].as_u64().is_some_and(|id| ids.contains(&id)))
        .count();
    assert!(
        fast_links >= 2,
        "{fast_links} fast-path links (programs {ids:?}):\n{links}"
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
