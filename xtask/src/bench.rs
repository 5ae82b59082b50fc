//! `cargo xtask bench`: the mesh against no mesh, side by side, in one run.
//!
//! One lab (release build), one client pod on node A and a server pod on
//! each node. Every path is measured in every round, interleaved, so slow
//! drift of this shared machine hits all paths alike:
//! - no-mesh same node / cross node: twin pods on the same bridges that the
//!   mesh does not know (`plain-load`, `plain-near`, `plain-far`);
//! - mesh same: meshed, same node, with the default settings (policy at
//!   connect(), then plain TCP, delivered veth to veth by the fast path);
//! - quic, tcp: meshed, cross node, through each tunnel transport;
//! - and, per round, the L7 path against the L4 path: HTTP/1.1 GETs at
//!   1,000/s to nginx on the far node through the default transport, once
//!   by a Service with an HTTPRoute (the agent reads each request on both
//!   nodes) and once by one without (bytes through the tunnel).
//!
//! Node A (agent, client, near server) is pinned to CPU 0 and node B (agent,
//! far server) to CPU 1, so the ratios are stable on two cores (README, "Benchmark").
mod measure;
mod profile;
mod report;
mod session;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, ensure};
use serde_json::{Value, json};

use crate::lab::{self, Lab, Topology, UpOptions};

use measure::*;
use report::*;
use session::*;

#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Rounds; every figure is min/median/max over them.
    pub rounds: usize,
    /// Seconds of each iperf3 throughput run.
    pub throughput_secs: u64,
    /// Seconds of each latency and connection-rate run.
    pub short_secs: f64,
    /// Idle captured connections held for the memory figure.
    pub hold: usize,
    /// Build and run debug binaries (for the smoke test; figures meaningless).
    pub debug: bool,
    /// Flame graphs of both agents during round 1's cross-node throughput
    /// and connection-rate runs (`perf record`; see bench/profile.rs).
    pub profile: bool,
    pub out_dir: PathBuf,
}

/// The no-mesh baseline runs between the `plain-` twins: pods on the same
/// bridges that the mesh does not know, so no mesh program touches them
/// (the same-node fast path acts on enrolled pods' veths).
const TOPOLOGY: &str = "
nodes: [{name: node-a}, {name: node-b}]
pods:
  - {name: load, namespace: bench, serviceAccount: load, node: node-a}
  - {name: near, namespace: bench, serviceAccount: near, node: node-a}
  - {name: far,  namespace: bench, serviceAccount: far,  node: node-b}
  - {name: plain-load, namespace: bench, node: node-a, meshed: false}
  - {name: plain-near, namespace: bench, node: node-a, meshed: false}
  - {name: plain-far,  namespace: bench, node: node-b, meshed: false}
";
/// Meshed servers listen on these ports, unmeshed ones on port + 1.
const IPERF_PORT: u16 = 5201;
const ECHO_PORT: u16 = 7000;
/// Requests per second of the latency runs (the fixed rate).
const RR_RATE: u32 = 1000;
const RR_SIZE: usize = 1024;
/// nginx in the far pod, for the L7 against L4 figures.
const HTTP_PORT: u16 = 8080;
const L4_VIP: &str = "198.19.0.40";
const L7_VIP: &str = "198.19.0.41";

fn policy(allow_far: bool) -> String {
    let target = |name: &str| {
        format!(
            "---\napiVersion: access.smi-spec.io/v1alpha3\nkind: TrafficTarget\nmetadata: {{name: load-to-{name}, namespace: bench}}\n\
             spec:\n  destination: {{kind: ServiceAccount, name: {name}, namespace: bench}}\n  rules: [{{kind: TCPRoute, name: bench-ports}}]\n  \
             sources: [{{kind: ServiceAccount, name: load, namespace: bench}}]\n"
        )
    };
    let mut p = format!(
        "# Written by cargo xtask bench.\napiVersion: specs.smi-spec.io/v1alpha4\nkind: TCPRoute\nmetadata: {{name: bench-ports, namespace: bench}}\n\
         spec: {{matches: {{ports: [{IPERF_PORT}, {ECHO_PORT}, {HTTP_PORT}]}}}}\n"
    );
    p.push_str(&target("near"));
    if allow_far {
        p.push_str(&target("far"));
    }
    p
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Route {
    NoMeshSame,
    SameNode,
    NoMeshCross,
    Quic,
    Tcp,
}

use Route::*;
/// The agent's default transport (`--tunnel-transport`): the L7 figures,
/// the held connections and the policy changes go through it.
const DEFAULT: Route = Tcp;
const PATHS: [Route; 5] = [NoMeshSame, SameNode, NoMeshCross, Quic, Tcp];

impl Route {
    fn name(self) -> &'static str {
        match self {
            NoMeshSame => "no-mesh same node",
            SameNode => "mesh same node (TCP)",
            NoMeshCross => "no-mesh cross node",
            Quic => "mesh cross node (QUIC)",
            Tcp => "mesh cross node (mTLS/TCP)",
        }
    }
    /// For the chart's axis.
    fn short(self) -> &'static str {
        match self {
            NoMeshSame => "no-mesh same",
            SameNode => "mesh same",
            NoMeshCross => "no-mesh cross",
            Quic => "QUIC",
            Tcp => "mTLS/TCP",
        }
    }
    fn key(self) -> &'static str {
        match self {
            NoMeshSame => "nomesh_same",
            SameNode => "mesh_same",
            NoMeshCross => "nomesh_cross",
            Quic => "quic",
            Tcp => "tcp",
        }
    }
    fn meshed(self) -> bool {
        !matches!(self, NoMeshSame | NoMeshCross)
    }
    fn server(self) -> &'static str {
        match self {
            NoMeshSame => "plain-near",
            SameNode => "near",
            NoMeshCross => "plain-far",
            _ => "far",
        }
    }
    fn baseline(self) -> Option<Route> {
        match self {
            SameNode => Some(NoMeshSame),
            Quic | Tcp => Some(NoMeshCross),
            _ => None,
        }
    }
    fn port(self, base: u16) -> u16 {
        if self.meshed() { base } else { base + 1 }
    }
}

/// A figure: its name in the JSON, its label, its unit, and whether more is better.
struct Figure {
    key: &'static str,
    label: &'static str,
    unit: &'static str,
    higher_is_better: bool,
    /// Whether a ratio to no mesh means anything (not for the agent's CPU,
    /// which is ~0 without a mesh).
    ratio: bool,
}

const FIGURES: &[Figure] = &[
    Figure {
        key: "throughput_gbps",
        label: "throughput, 1 stream",
        unit: "Gbit/s",
        higher_is_better: true,
        ratio: true,
    },
    Figure {
        key: "rr_p50_us",
        label: "1 KiB req/resp at 1000/s, persistent: p50",
        unit: "us",
        higher_is_better: false,
        ratio: true,
    },
    Figure {
        key: "rr_p90_us",
        label: "1 KiB req/resp at 1000/s, persistent: p90",
        unit: "us",
        higher_is_better: false,
        ratio: true,
    },
    Figure {
        key: "rr_p99_us",
        label: "1 KiB req/resp at 1000/s, persistent: p99",
        unit: "us",
        higher_is_better: false,
        ratio: true,
    },
    Figure {
        key: "rr_new_p50_us",
        label: "1 KiB req/resp at 1000/s, new conn each: p50",
        unit: "us",
        higher_is_better: false,
        ratio: true,
    },
    Figure {
        key: "rr_new_p90_us",
        label: "1 KiB req/resp at 1000/s, new conn each: p90",
        unit: "us",
        higher_is_better: false,
        ratio: true,
    },
    Figure {
        key: "rr_new_p99_us",
        label: "1 KiB req/resp at 1000/s, new conn each: p99",
        unit: "us",
        higher_is_better: false,
        ratio: true,
    },
    Figure {
        key: "conn_per_sec",
        label: "connections/s (connect, 1-byte echo, close; 4 loops)",
        unit: "conn/s",
        higher_is_better: true,
        ratio: true,
    },
    Figure {
        key: "agent_cpu_s_per_gib",
        label: "agent CPU per GiB moved (both agents)",
        unit: "s/GiB",
        higher_is_better: false,
        ratio: false,
    },
    Figure {
        key: "agent_cpu_s_per_1k_req",
        label: "agent CPU per 1,000 persistent requests",
        unit: "s",
        higher_is_better: false,
        ratio: false,
    },
];

type Samples = BTreeMap<&'static str, Vec<f64>>;

pub fn run(opts: &BenchOptions) -> anyhow::Result<()> {
    let started = Instant::now();
    let (agent, benchtool) = build(opts.debug)?;
    fs::create_dir_all(&opts.out_dir)?;
    let policy_dir = opts.out_dir.join("policy");
    fs::create_dir_all(&policy_dir)?;
    fs::write(policy_dir.join("bench.yaml"), policy(true))?;

    let topo: Topology = serde_yaml::from_str(TOPOLOGY)?;
    lab::down()?;
    let lab = Lab::up(
        &topo,
        &UpOptions {
            agent_bin: agent,
            policy_dir: Some(policy_dir),
            start_agents: false,
            agent_args: vec![],
        },
    )?;
    // Whatever happens next, leave no lab behind.
    let mut down = LabDown {
        logs_to: Some(opts.out_dir.join("failed-run-logs")),
    };
    let mut bench = Bench {
        lab,
        benchtool,
        opts: opts.clone(),
        servers: Vec::new(),
        step: 0,
        // 4 per path per round, 2 for L7 against L4 and 1 for handshakes;
        // idle RSS, holding, and two policy changes per round.
        steps: opts.rounds * PATHS.len() * 4 + 2 + 5 * opts.rounds,
        started,
        transport: "quic",
        peak_rss_kib: BTreeMap::new(),
    };
    bench.write_http_services()?;
    bench.lab.start_ca()?;
    // Explicit, so the paths do not depend on the agent's default.
    bench.lab.agent_args = vec![format!("--tunnel-transport={}", bench.transport)];
    bench.start_pinned_agents()?;
    bench.widen_client_ports()?;
    bench.start_servers()?;
    // Idle: agents up, every workload enrolled, no traffic yet.
    std::thread::sleep(Duration::from_secs(1));
    let rss_idle = bench.agents_rss_kib("VmRSS")?;
    bench.progress("idle agent RSS measured");

    let mut samples: BTreeMap<&'static str, Samples> = BTreeMap::new();
    let mut l7: BTreeMap<&'static str, Samples> = BTreeMap::new();
    let mut handshakes = Samples::new();
    for round in 0..opts.rounds {
        // Alternate which transport goes first, so neither always follows a restart.
        let mut order = PATHS.to_vec();
        if round % 2 == 1 {
            order.swap(3, 4);
        }
        for path in order {
            bench.use_transport(path)?;
            let s = samples.entry(path.key()).or_default();
            bench.measure(path, round, s)?;
        }
        bench.measure_l7(round, &mut l7)?;
        bench.measure_handshakes(round, &mut handshakes)?;
    }
    bench.use_transport(DEFAULT)?;
    let rss_held = bench.hold_connections()?;
    let policy_ms = bench.policy_latency()?;
    bench.record_peak_rss()?;

    down.logs_to = None;
    let report = Report {
        samples,
        l7,
        handshakes,
        rss_idle,
        rss_held,
        rss_peak: bench.peak_rss_kib.clone(),
        policy_ms,
        opts: opts.clone(),
        took: started.elapsed(),
    };
    let json = report.json();
    let json_path = opts.out_dir.join("bench.json");
    fs::write(&json_path, serde_json::to_string_pretty(&json)? + "\n")?;
    print!("{}", report.table());
    let png = report.chart(&opts.out_dir)?;
    eprintln!(
        "bench: done in {:.0}s; wrote {} and {}",
        started.elapsed().as_secs_f64(),
        json_path.display(),
        png.display()
    );
    Ok(())
}

/// Removes the lab however the run ends; a run that failed first keeps the
/// agents' logs (in `logs_to`), which the lab's removal would delete.
struct LabDown {
    logs_to: Option<PathBuf>,
}

impl Drop for LabDown {
    fn drop(&mut self) {
        if let Some(dir) = &self.logs_to {
            let _ = fs::create_dir_all(dir);
            for (node, _) in NODES {
                let name = format!("agent-{node}.log");
                let _ = fs::copy(Path::new(lab::STATE_DIR).join(&name), dir.join(&name));
            }
            eprintln!("bench: the failed run's agent logs are in {}", dir.display());
        }
        if let Err(e) = lab::down() {
            eprintln!("bench: lab down failed: {e:#}");
        }
    }
}

fn build(debug: bool) -> anyhow::Result<(PathBuf, PathBuf)> {
    // A debug run inside the test suite uses the agent the suite built.
    let agent = match std::env::var_os("MESH_AGENT_BIN") {
        Some(bin) if debug => PathBuf::from(bin),
        _ => crate::build_agent(!debug)?,
    };
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(crate::workspace_root())
        .args(["build", "--package", "mesh-tests", "--bin", "benchtool"]);
    if !debug {
        cmd.arg("--release");
    }
    crate::run_cargo(&mut cmd, "building benchtool")?;
    let dir = crate::target_dir().join(if debug { "debug" } else { "release" });
    Ok((agent, dir.join("benchtool")))
}
