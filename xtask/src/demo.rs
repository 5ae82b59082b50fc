//! `cargo xtask demo`: the sample lab, with each data path exercised and
//! explained from what the kernel and the agents report.
use std::{net::SocketAddr, process::Command};

use anyhow::ensure;

use crate::{
    lab::{self, Lab, Topology, UpOptions},
    probe::{self, Traffic},
};

struct Teardown(bool);
impl Drop for Teardown {
    fn drop(&mut self) {
        if !self.0 {
            eprintln!("demo: removing the lab (use --keep to leave it up)");
            if let Err(e) = lab::down() {
                eprintln!("demo: lab down: {e:#}");
            }
        }
    }
}

pub fn build_labtool() -> anyhow::Result<std::path::PathBuf> {
    crate::run_cargo(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(crate::workspace_root())
            .args(["build", "--package", "mesh-tests", "--bin", "labtool"]),
        "building labtool",
    )?;
    Ok(probe::built_binary("labtool"))
}

fn step(n: usize, total: usize, what: &str) {
    eprintln!("\n=== [{n}/{total}] {what}");
}

pub fn run(keep: bool) -> anyhow::Result<()> {
    let agent_bin = crate::build_agent(false)?;
    let labtool = build_labtool()?;
    let root = crate::workspace_root();
    let topo = Topology::from_file(&root.join("deploy/lab/topology.yaml"))?;
    // A fresh lab: leftovers of an earlier `--keep` would hold the ports.
    lab::down()?;
    let _teardown = Teardown(keep);
    let lab = Lab::up(
        &topo,
        &UpOptions {
            agent_bin,
            policy_dir: Some(root.join("deploy/lab/policy")),
            start_agents: true,
            agent_args: vec![],
        },
    )?;
    print!("{}", lab.status());
    let t = Traffic { lab: &lab, labtool };
    let web = lab.pod("web")?;
    let db = lab.pod("db")?;
    let web_addr = SocketAddr::from((web.ip, 8080));
    let db_addr = SocketAddr::from((db.ip, 8080));
    let _servers = [t.serve("web", 8080)?, t.serve("db", 8080)?];
    const TOTAL: usize = 6;
    const SIZE: u64 = 16 << 20;

    step(
        1,
        TOTAL,
        "same node: client -> web (node-a), checked at connect(), then plain TCP pod to pod, delivered veth to veth by the fast path",
    );
    // The agent finds each pod's veth within a second of its start.
    let started = std::time::Instant::now();
    while probe::dump_map(&lab, "node-a", "mesh_pod_devs")?
        .as_array()
        .map_or(0, Vec::len)
        < 4
        && started.elapsed() < std::time::Duration::from_secs(5)
    {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let (packets_before, bytes_before) = probe::fast_path_counters(&lab, "node-a")?;
    let same_node = || -> anyhow::Result<u64> {
        Ok(probe::per_cpu_sum(
            &probe::dump_map(&lab, "node-a", "mesh_capture")?,
            "same_node",
        ))
    };
    let before = same_node()?;
    let r = t.send("client", web_addr, SIZE)?;
    report(&r)?;
    let (packets, bytes) = probe::fast_path_counters(&lab, "node-a")?;
    eprintln!(
        "    kernel mesh_capture on node-a: +{} same-node connect (left on TCP: applications see TCP exactly)",
        same_node()? - before
    );
    eprintln!(
        "    kernel mesh_fast_stats on node-a: +{} packets, +{} bytes handed veth to veth (bpf_redirect_peer, no bridge hop)",
        packets - packets_before,
        bytes - bytes_before
    );

    step(
        2,
        TOTAL,
        "cross node, allowed (TrafficTarget web-to-db): web (node-a) -> db (node-b), captured at connect(), carried in a mutual-TLS tunnel (HTTP/2 CONNECT over TCP, the default transport)",
    );
    let r = t.send("web", db_addr, SIZE)?;
    report(&r)?;
    std::thread::sleep(std::time::Duration::from_millis(200));
    if let Some(rec) = probe::proxied_connections(&lab, "node-a").last() {
        eprintln!(
            "    node-a agent: source_workload={} (from its cgroup) original_dst={} bytes_sent={} bytes_received={}",
            rec["source_workload"], rec["original_dst"], rec["bytes_sent"], rec["bytes_received"]
        );
    }
    if let Some(rec) = probe::agent_records(&lab, "node-b")
        .iter()
        .rev()
        .find(|r| r["message"] == "inbound flow closed")
    {
        eprintln!(
            "    node-b agent: {} stream from peer identity {} (its client certificate) to {}, {} bytes in",
            rec["transport"], rec["peer"], rec["destination"], rec["bytes_in"]
        );
    }

    step(
        3,
        TOTAL,
        "denied (no TrafficTarget): client -> db fails at connect() with EPERM, in the kernel, before any packet",
    );
    let r = t.connect("client", db_addr, 3000)?;
    eprintln!(
        "    connect ok={} error={} after {:.2} ms",
        r["ok"],
        r["error"],
        r["elapsed_ms"].as_f64().unwrap_or(0.0)
    );
    let capture = probe::dump_map(&lab, "node-a", "mesh_capture")?;
    eprintln!(
        "    kernel mesh_capture on node-a: denied={}",
        probe::per_cpu_sum(&capture, "denied")
    );
    let explain = std::process::Command::new(&lab.agent_bin)
        .args([
            "policy",
            "check",
            "--from",
            "pod:demo/client",
            "--to",
            &db_addr.to_string(),
        ])
        .arg("--source-dir")
        .arg(&lab.source_dir)
        .output()?;
    for line in String::from_utf8_lossy(&explain.stdout).lines() {
        eprintln!("    policy check: {line}");
    }
    eprintln!(
        "    (the policy: {}/traffic-targets.yaml)",
        root.join("deploy/lab/policy").display()
    );

    step(
        4,
        TOTAL,
        "strict admission: host processes -> db are dropped in db's kernel; node-b's kubelet (a probe) gets through",
    );
    for (node, kubelet, who) in [
        ("node-a", false, "a node-a host process"),
        ("node-b", false, "a node-b host process"),
        ("node-b", true, "node-b's kubelet cgroup"),
    ] {
        let r = t.connect_from_node(node, db_addr, 1500, kubelet)?;
        eprintln!(
            "    {who}: connect ok={} error={} after {:.1} ms",
            r["ok"],
            r["error"],
            r["elapsed_ms"].as_f64().unwrap_or(0.0)
        );
        ensure!(
            (r["ok"] == true) == kubelet,
            "admission did not decide as expected for {who}: {r}"
        );
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    let audit = std::fs::read_to_string(lab.audit_log("node-b")).unwrap_or_default();
    for line in audit.lines().filter(|l| l.contains(r#""kind":"admission""#)) {
        let v: serde_json::Value = serde_json::from_str(line)?;
        eprintln!(
            "    audit node-b: {} {} -> {}: {}",
            v["verdict"], v["source_address"], v["destination_address"], v["reason"]
        );
    }

    step(
        5,
        TOTAL,
        "fail closed: node-a's agent stopped, web -> db is refused at once; restarted, it flows again",
    );
    lab.stop_agent("node-a")?;
    let r = t.connect("web", db_addr, 3000)?;
    eprintln!(
        "    agent down: connect ok={} error={} after {:.1} ms",
        r["ok"],
        r["error"],
        r["elapsed_ms"].as_f64().unwrap_or(0.0)
    );
    lab.start_agent("node-a")?;
    let r = t.send("web", db_addr, 1 << 20)?;
    report(&r)?;

    step(
        6,
        TOTAL,
        "identities: each agent holds SPIFFE certificates for its own pods only (in memory)",
    );
    for n in &lab.nodes {
        // The latest per identity (node-a's agent restarted in step 5 and made new keys).
        let mut latest = std::collections::BTreeMap::new();
        for r in probe::agent_records(&lab, &n.name)
            .into_iter()
            .filter(|r| r["message"] == "certificate issued")
        {
            latest.insert(r["identity"].to_string(), r);
        }
        for (id, r) in latest {
            eprintln!(
                "    {}: {id} serial {} (expires in {} s)",
                n.name, r["serial"], r["expires_in_s"]
            );
        }
    }
    let out = lab
        .node_exec("node-a", &lab.agent_bin.to_string_lossy())?
        .args([
            "ca",
            "request",
            "--ca-addr",
            &format!("{}:{}", lab::CA_IP, lab::CA_PORT),
        ])
        .arg("--ca-root")
        .arg(lab.ca_dir().join("ca.crt"))
        .arg("--node-token-file")
        .arg(lab.node_token_file("node-a"))
        .args(["--identity", "spiffe://cluster.local/ns/demo/sa/db"])
        .output()?;
    eprintln!(
        "    node-a asks the CA for db's identity: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );

    eprintln!("\nInspect the datapath yourself (with --keep):");
    eprintln!(
        "    bpftool map dump pinned {}",
        lab.pin_dir("node-a").join("mesh_traffic").display()
    );
    eprintln!("    cargo xtask lab exec client -- ip addr   |   cargo xtask lab status   |   cargo xtask lab down");
    Ok(())
}

fn report(r: &serde_json::Value) -> anyhow::Result<()> {
    eprintln!(
        "    sent {} bytes, sha256 {}..., server hashed {}... -> {}",
        r["bytes"],
        &r["sent_sha256"].as_str().unwrap_or("")[..12.min(r["sent_sha256"].as_str().unwrap_or("").len())],
        &r["reply"]["sha256"].as_str().unwrap_or("")[..12.min(r["reply"]["sha256"].as_str().unwrap_or("").len())],
        if r["ok"] == true { "intact" } else { "MISMATCH" }
    );
    ensure!(r["ok"] == true, "transfer failed: {r}");
    Ok(())
}
