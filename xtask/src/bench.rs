//! `cargo xtask bench`: the mesh against no mesh, side by side, in one run.
//!
//! One lab (release build), one client pod on node A and a server pod on
//! each node. Every path is measured in every round, interleaved, so slow
//! drift of this shared machine hits all paths alike:
//! - no-mesh same node / cross node: the same pods' network namespaces,
//!   processes in a cgroup outside the agents' pod cgroups (plain veth);
//! - spliced: meshed, same node (sockmap splice in the kernel);
//! - quic, tcp: meshed, cross node, through each tunnel transport.
//!
//! Node A (agent, client, near server) is pinned to CPU 0 and node B (agent,
//! far server) to CPU 1, as DESIGN.md section 8 prescribes for stable ratios.
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
    pub out_dir: PathBuf,
}

const TOPOLOGY: &str = "
nodes: [{name: node-a}, {name: node-b}]
pods:
  - {name: load, namespace: bench, serviceAccount: load, node: node-a}
  - {name: near, namespace: bench, serviceAccount: near, node: node-a}
  - {name: far,  namespace: bench, serviceAccount: far,  node: node-b}
";
/// Meshed servers listen on these ports, unmeshed ones on port + 1.
const IPERF_PORT: u16 = 5201;
const ECHO_PORT: u16 = 7000;
/// Requests per second of the latency runs (the fixed rate).
const RR_RATE: u32 = 1000;
const RR_SIZE: usize = 1024;

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
         spec: {{matches: {{ports: [{IPERF_PORT}, {ECHO_PORT}]}}}}\n"
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
    Spliced,
    NoMeshCross,
    Quic,
    Tcp,
}

use Route::*;
const PATHS: [Route; 5] = [NoMeshSame, Spliced, NoMeshCross, Quic, Tcp];

impl Route {
    fn name(self) -> &'static str {
        match self {
            NoMeshSame => "no-mesh same node",
            Spliced => "mesh same node (spliced)",
            NoMeshCross => "no-mesh cross node",
            Quic => "mesh cross node (QUIC)",
            Tcp => "mesh cross node (mTLS/TCP)",
        }
    }
    /// For the chart's axis.
    fn short(self) -> &'static str {
        match self {
            NoMeshSame => "no-mesh same",
            Spliced => "spliced",
            NoMeshCross => "no-mesh cross",
            Quic => "QUIC",
            Tcp => "mTLS/TCP",
        }
    }
    fn key(self) -> &'static str {
        match self {
            NoMeshSame => "nomesh_same",
            Spliced => "spliced",
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
            NoMeshSame | Spliced => "near",
            _ => "far",
        }
    }
    fn baseline(self) -> Option<Route> {
        match self {
            Spliced => Some(NoMeshSame),
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
            start_agents: true,
            agent_args: vec![],
        },
    )?;
    // Whatever happens next, leave no lab behind.
    let _down = LabDown;
    let mut bench = Bench {
        lab,
        benchtool,
        opts: opts.clone(),
        servers: Vec::new(),
        step: 0,
        // 4 per path per round; idle RSS, holding, and two policy changes per round.
        steps: opts.rounds * PATHS.len() * 4 + 2 + 2 * opts.rounds,
        started,
        transport: "quic",
        peak_rss_kib: BTreeMap::new(),
    };
    bench.pin_agents()?;
    bench.start_servers()?;
    // Idle: agents up, every workload enrolled, no traffic yet.
    std::thread::sleep(Duration::from_secs(1));
    let rss_idle = bench.agents_rss_kib("VmRSS")?;
    bench.progress("idle agent RSS measured");

    let mut samples: BTreeMap<&'static str, Samples> = BTreeMap::new();
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
    }
    bench.use_transport(Quic)?;
    let rss_held = bench.hold_connections()?;
    let policy_ms = bench.policy_latency()?;
    bench.record_peak_rss()?;

    let report = Report {
        samples,
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

struct LabDown;

impl Drop for LabDown {
    fn drop(&mut self) {
        if let Err(e) = lab::down() {
            eprintln!("bench: lab down failed: {e:#}");
        }
    }
}

fn build(debug: bool) -> anyhow::Result<(PathBuf, PathBuf)> {
    let agent = crate::build_agent(!debug)?;
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(crate::workspace_root())
        .args(["build", "--package", "mesh-tests", "--bin", "benchtool"]);
    if !debug {
        cmd.arg("--release");
    }
    ensure!(cmd.status()?.success(), "building benchtool failed");
    let dir = crate::target_dir().join(if debug { "debug" } else { "release" });
    Ok((agent, dir.join("benchtool")))
}

struct Bench {
    lab: Lab,
    benchtool: PathBuf,
    opts: BenchOptions,
    servers: Vec<Child>,
    step: usize,
    steps: usize,
    started: Instant,
    transport: &'static str,
    /// Highest VmHWM seen per node, kept across agent restarts.
    peak_rss_kib: BTreeMap<String, u64>,
}

impl Drop for Bench {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
    }
}

const NODES: [(&str, u8); 2] = [("node-a", 0), ("node-b", 1)];

fn cpu_of_pod(pod: &str) -> u8 {
    if pod == "far" { 1 } else { 0 }
}

impl Bench {
    fn progress(&mut self, what: &str) {
        self.step += 1;
        let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
        let load = load.split_whitespace().next().unwrap_or("?");
        eprintln!(
            "[bench {:>3}/{} {:>5.0}s load {load}] {what}",
            self.step,
            self.steps,
            self.started.elapsed().as_secs_f64()
        );
    }

    /// A command in `pod`, meshed or not, pinned to its node's CPU.
    fn in_pod(&self, pod: &str, meshed: bool, program: &str) -> anyhow::Result<Command> {
        let mut c = if meshed {
            self.lab.exec(pod, "taskset")?
        } else {
            self.lab.exec_unmeshed(pod, "taskset")?
        };
        c.args(["-c", &cpu_of_pod(pod).to_string(), program]);
        Ok(c)
    }

    fn pin_agents(&self) -> anyhow::Result<()> {
        for (node, cpu) in NODES {
            let pid = self
                .lab
                .agent_pid(node)
                .with_context(|| format!("no agent on {node}"))?;
            let ok = Command::new("taskset")
                .args(["-a", "-p", "-c", &cpu.to_string(), &pid.to_string()])
                .stdout(Stdio::null())
                .status()?
                .success();
            ensure!(ok, "taskset on the agent of {node} failed");
        }
        Ok(())
    }

    fn start_servers(&mut self) -> anyhow::Result<()> {
        for pod in ["near", "far"] {
            for meshed in [true, false] {
                let port = |base: u16| if meshed { base } else { base + 1 };
                let iperf = self
                    .in_pod(pod, meshed, "iperf3")?
                    .args(["-s", "-p", &port(IPERF_PORT).to_string()])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .spawn()?;
                self.servers.push(iperf);
                let echo = self
                    .in_pod(pod, meshed, &self.benchtool.to_string_lossy())?
                    .args(["echo-serve", "--port", &port(ECHO_PORT).to_string()])
                    .stdin(Stdio::null())
                    .spawn()?;
                self.servers.push(echo);
                let netns = self.lab.pod(pod)?.netns.clone();
                for p in [port(IPERF_PORT), port(ECHO_PORT)] {
                    crate::probe::wait_listening(&netns, p)?;
                }
            }
        }
        Ok(())
    }

    /// Restarts both agents with the path's transport when it differs.
    fn use_transport(&mut self, path: Route) -> anyhow::Result<()> {
        let want = match path {
            Quic => "quic",
            Tcp => "tcp",
            _ => return Ok(()),
        };
        if self.transport == want {
            return Ok(());
        }
        self.record_peak_rss()?;
        self.lab.agent_args = vec![format!("--tunnel-transport={want}")];
        for (node, _) in NODES {
            self.lab.stop_agent(node)?;
            self.lab.start_agent(node)?;
        }
        self.pin_agents()?;
        self.transport = want;
        // Let the agents enrol the pods before measuring.
        std::thread::sleep(Duration::from_millis(500));
        Ok(())
    }

    fn agent_pids(&self) -> anyhow::Result<Vec<(String, u32)>> {
        NODES
            .iter()
            .map(|(n, _)| {
                let pid = self.lab.agent_pid(n).with_context(|| format!("agent on {n} died"))?;
                Ok((n.to_string(), pid))
            })
            .collect()
    }

    /// Sum of both agents' user+system CPU seconds.
    fn agents_cpu(&self) -> anyhow::Result<f64> {
        let mut total = 0.0;
        for (_, pid) in self.agent_pids()? {
            total += cpu_seconds(pid)?;
        }
        Ok(total)
    }

    /// A /proc/PID/status figure (VmRSS, VmHWM) per node, in KiB.
    fn agents_rss_kib(&self, field: &str) -> anyhow::Result<BTreeMap<String, u64>> {
        self.agent_pids()?
            .into_iter()
            .map(|(n, pid)| Ok((n, status_kib(pid, field)?)))
            .collect()
    }

    fn record_peak_rss(&mut self) -> anyhow::Result<()> {
        for (node, kib) in self.agents_rss_kib("VmHWM")? {
            let peak = self.peak_rss_kib.entry(node).or_default();
            *peak = (*peak).max(kib);
        }
        Ok(())
    }

    fn json_of(&self, cmd: &mut Command, what: &str) -> anyhow::Result<Value> {
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {what}"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success(),
            "{what} failed: {}{}",
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        serde_json::from_str(text.trim()).with_context(|| format!("{what} printed {text:?}"))
    }

    fn target(&self, path: Route, base: u16) -> anyhow::Result<String> {
        Ok(format!("{}:{}", self.lab.pod(path.server())?.ip, path.port(base)))
    }

    fn measure(&mut self, path: Route, round: usize, s: &mut Samples) -> anyhow::Result<()> {
        let tag = format!("round {}/{} {}", round + 1, self.opts.rounds, path.name());
        let tool = self.benchtool.to_string_lossy().to_string();

        self.progress(&format!("{tag}: iperf3 {} s", self.opts.throughput_secs));
        let (server_ip, port) = (self.lab.pod(path.server())?.ip, path.port(IPERF_PORT));
        let cpu0 = self.agents_cpu()?;
        let iperf = self.json_of(
            self.in_pod("load", path.meshed(), "iperf3")?.args([
                "-c",
                &server_ip.to_string(),
                "-p",
                &port.to_string(),
                "-t",
                &self.opts.throughput_secs.to_string(),
                "-J",
            ]),
            "iperf3",
        )?;
        let cpu = self.agents_cpu()? - cpu0;
        let bytes = iperf["end"]["sum_received"]["bytes"]
            .as_f64()
            .with_context(|| format!("{tag}: iperf3 gave no result; its error: {}", iperf["error"]))?;
        let secs = iperf["end"]["sum_received"]["seconds"].as_f64().unwrap_or(1.0);
        push(s, "throughput_gbps", bytes * 8.0 / secs / 1e9);
        push(s, "agent_cpu_s_per_gib", cpu / (bytes / (1u64 << 30) as f64));

        self.progress(&format!("{tag}: persistent req/resp"));
        let to = self.target(path, ECHO_PORT)?;
        let short = format!("{}", self.opts.short_secs);
        let cpu0 = self.agents_cpu()?;
        let rr = self.request_response(path, &to, false, &tag)?;
        let cpu = self.agents_cpu()? - cpu0;
        for (key, p) in [
            ("rr_p50_us", "p50_us"),
            ("rr_p90_us", "p90_us"),
            ("rr_p99_us", "p99_us"),
        ] {
            push(s, key, num(&rr, p)?);
        }
        push(s, "agent_cpu_s_per_1k_req", cpu / (num(&rr, "requests")? / 1000.0));

        self.progress(&format!("{tag}: new connection per request"));
        let rr = self.request_response(path, &to, true, &tag)?;
        for (key, p) in [
            ("rr_new_p50_us", "p50_us"),
            ("rr_new_p90_us", "p90_us"),
            ("rr_new_p99_us", "p99_us"),
        ] {
            push(s, key, num(&rr, p)?);
        }

        self.progress(&format!("{tag}: connection rate"));
        let cr = self.json_of(
            self.in_pod("load", path.meshed(), &tool)?
                .args(["conn-rate", "--to", &to, "--secs", &short]),
            "benchtool conn-rate",
        )?;
        ensure!(
            num(&cr, "errors")? == 0.0,
            "{tag}: connection-rate run had errors: {cr}"
        );
        push(s, "conn_per_sec", num(&cr, "per_sec")?);
        Ok(())
    }

    /// One `benchtool rr` run from the load pod: 1 KiB at RR_RATE for
    /// short_secs, persistent or a new connection per request; no errors.
    fn request_response(&self, path: Route, to: &str, new_conn: bool, tag: &str) -> anyhow::Result<Value> {
        let (rate, secs, size) = (
            RR_RATE.to_string(),
            self.opts.short_secs.to_string(),
            RR_SIZE.to_string(),
        );
        let mut cmd = self.in_pod("load", path.meshed(), &self.benchtool.to_string_lossy())?;
        cmd.args(["rr", "--to", to, "--rate", &rate, "--secs", &secs, "--size", &size]);
        if new_conn {
            cmd.arg("--new-conn");
        }
        let rr = self.json_of(&mut cmd, "benchtool rr")?;
        ensure!(
            num(&rr, "errors")? == 0.0,
            "{tag}: request/response run had errors: {rr}"
        );
        Ok(rr)
    }

    /// Opens `hold` idle captured connections across nodes (default
    /// transport) and reads both agents' RSS while they are open.
    fn hold_connections(&mut self) -> anyhow::Result<BTreeMap<String, u64>> {
        let n = self.opts.hold;
        self.progress(&format!("holding {n} idle captured connections (QUIC)"));
        let to = self.target(Quic, ECHO_PORT)?;
        let mut child = self
            .in_pod("load", true, &self.benchtool.to_string_lossy())?
            .args(["hold", "--to", &to, "--count", &n.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.as_mut().expect("piped")),
            &mut line,
        )?;
        let result = (|| {
            let v: Value = serde_json::from_str(line.trim()).with_context(|| format!("hold printed {line:?}"))?;
            ensure!(num(&v, "open")? as usize == n, "only {v} of {n} connections opened");
            // Let the agents' allocators settle (trim runs on a timer).
            std::thread::sleep(Duration::from_secs(2));
            self.agents_rss_kib("VmRSS")
        })();
        drop(child.stdin.take());
        let _ = child.wait();
        self.record_peak_rss()?;
        result
    }

    /// Milliseconds from rewriting the policy file to the kernel enforcing
    /// it at connect(): deny load -> far, then allow it again, per round.
    fn policy_latency(&mut self) -> anyhow::Result<BTreeMap<&'static str, Vec<f64>>> {
        let file = self.lab.source_dir.join("bench.yaml");
        let to = self.target(Quic, ECHO_PORT)?;
        let mut out: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
        for round in 0..self.opts.rounds {
            for (allow, want, key) in [(false, "denied", "deny_ms"), (true, "allowed", "allow_ms")] {
                self.progress(&format!("policy change {}/{}: {want}", round + 1, self.opts.rounds));
                let watcher = self
                    .in_pod("load", true, &self.benchtool.to_string_lossy())?
                    .args(["wait-verdict", "--to", &to, "--want", want])
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .spawn()?;
                // Let it start probing, so it sees the old verdict first.
                std::thread::sleep(Duration::from_millis(300));
                let written = unix_us();
                write_atomically(&file, &policy(allow))?;
                let done = watcher.wait_with_output()?;
                let v: Value = serde_json::from_slice(&done.stdout)
                    .with_context(|| format!("wait-verdict printed {:?}", String::from_utf8_lossy(&done.stdout)))?;
                ensure!(v["reached"] == true, "policy change to {want} not enforced: {v}");
                out.entry(key)
                    .or_default()
                    .push((num(&v, "at_unix_us")? - written as f64) / 1000.0);
            }
        }
        Ok(out)
    }
}

fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    fs::File::create(&tmp)?.write_all(text.as_bytes())?;
    fs::rename(&tmp, path)?;
    Ok(())
}

fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_micros() as u64
}

fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces): utime is 14, stime 15.
    let rest = stat.rsplit_once(')').context("malformed /proc stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    // SAFETY: sysconf has no preconditions.
    #[allow(unsafe_code)]
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / hz)
}

fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

fn push(s: &mut Samples, key: &'static str, v: f64) {
    s.entry(key).or_default().push(v);
}

fn num(v: &Value, key: &str) -> anyhow::Result<f64> {
    v[key].as_f64().with_context(|| format!("no number {key:?} in {v}"))
}

/// min, median, max.
fn spread(v: &[f64]) -> (f64, f64, f64) {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let med = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    (v[0], med, v[v.len() - 1])
}

struct Report {
    samples: BTreeMap<&'static str, Samples>,
    rss_idle: BTreeMap<String, u64>,
    rss_held: BTreeMap<String, u64>,
    rss_peak: BTreeMap<String, u64>,
    policy_ms: BTreeMap<&'static str, Vec<f64>>,
    opts: BenchOptions,
    took: Duration,
}

impl Report {
    fn figure(&self, path: Route, key: &str) -> Option<(f64, f64, f64)> {
        let v = self.samples.get(path.key())?.get(key)?;
        (!v.is_empty()).then(|| spread(v))
    }

    /// The path's median over its baseline's median.
    fn ratio(&self, path: Route, key: &str) -> Option<f64> {
        if !FIGURES.iter().any(|f| f.key == key && f.ratio) {
            return None;
        }
        let (_, m, _) = self.figure(path, key)?;
        let (_, b, _) = self.figure(path.baseline()?, key)?;
        (b != 0.0).then_some(m / b)
    }

    fn json(&self) -> Value {
        let mut paths = serde_json::Map::new();
        for path in PATHS {
            let mut figs = serde_json::Map::new();
            for f in FIGURES {
                let Some((min, median, max)) = self.figure(path, f.key) else {
                    continue;
                };
                figs.insert(
                    f.key.into(),
                    json!({
                        "min": min, "median": median, "max": max, "unit": f.unit,
                        "samples": self.samples[path.key()][f.key],
                        "ratio_to_no_mesh": self.ratio(path, f.key),
                    }),
                );
            }
            paths.insert(path.key().into(), json!({"name": path.name(), "figures": figs}));
        }
        let mib = |m: &BTreeMap<String, u64>| {
            m.iter()
                .map(|(k, v)| (k.clone(), json!(*v as f64 / 1024.0)))
                .collect::<serde_json::Map<_, _>>()
        };
        let policy: serde_json::Map<_, _> = self
            .policy_ms
            .iter()
            .map(|(k, v)| {
                let (min, median, max) = spread(v);
                (
                    k.to_string(),
                    json!({"min": min, "median": median, "max": max, "samples": v}),
                )
            })
            .collect();
        json!({
            "machine": machine(),
            "settings": {
                "rounds": self.opts.rounds, "throughput_secs": self.opts.throughput_secs,
                "short_secs": self.opts.short_secs, "rr_rate_per_sec": RR_RATE, "rr_size_bytes": RR_SIZE,
                "held_connections": self.opts.hold, "release_build": !self.opts.debug,
                "cpu_pinning": "node-a (agent, client, near server) on CPU 0; node-b (agent, far server) on CPU 1",
            },
            "took_secs": self.took.as_secs_f64(),
            "paths": paths,
            "agent_rss_mib": {"idle": mib(&self.rss_idle), "peak": mib(&self.rss_peak), "holding_connections": mib(&self.rss_held)},
            "policy_change_to_enforcement_ms": policy,
        })
    }

    fn table(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "\nbench: medians over {} rounds [min .. max]; ratio = median / the no-mesh median on the same nodes",
            self.opts.rounds
        );
        for f in FIGURES {
            let _ = writeln!(
                t,
                "\n{} ({}){}",
                f.label,
                f.unit,
                if f.higher_is_better { ", higher is better" } else { "" }
            );
            for path in PATHS {
                let Some((min, med, max)) = self.figure(path, f.key) else {
                    continue;
                };
                let ratio = self
                    .ratio(path, f.key)
                    .map(|r| format!("{r:>6.2}x"))
                    .unwrap_or_default();
                let _ = writeln!(
                    t,
                    "  {:<28} {:>10} [{} .. {}] {ratio}",
                    path.name(),
                    fmt(med),
                    fmt(min),
                    fmt(max)
                );
            }
        }
        let _ = writeln!(t, "\nagent RSS (MiB)");
        for (node, _) in NODES {
            let get = |m: &BTreeMap<String, u64>| {
                m.get(node)
                    .map(|k| format!("{:.1}", *k as f64 / 1024.0))
                    .unwrap_or("-".into())
            };
            let _ = writeln!(
                t,
                "  {node}: idle {}, peak {}, holding {} idle connections {}",
                get(&self.rss_idle),
                get(&self.rss_peak),
                self.opts.hold,
                get(&self.rss_held)
            );
        }
        let _ = writeln!(t, "\npolicy file change to enforcement at connect() (ms)");
        for (k, v) in &self.policy_ms {
            let (min, med, max) = spread(v);
            let _ = writeln!(t, "  {k:<10} {med:>8.0} [{min:.0} .. {max:.0}]");
        }
        t
    }

    /// A PNG of the main figures (gnuplot), bars at the median with min/max
    /// error bars.
    fn chart(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        let shown = [
            "throughput_gbps",
            "rr_p50_us",
            "rr_p99_us",
            "rr_new_p99_us",
            "conn_per_sec",
            "agent_cpu_s_per_gib",
        ];
        let mut script = String::from(
            "set terminal pngcairo size 1500,900 font 'sans,10'\nset output 'bench.png'\n\
             set multiplot layout 2,3 title 'mesh vs no mesh (cargo xtask bench): median, min..max bars' font 'sans,13'\n\
             set style fill solid 0.6 border -1\nset boxwidth 0.6\nset yrange [0:*]\nset grid ytics\nunset key\n\
             set xtics font 'sans,9'\n",
        );
        for key in shown {
            let f = FIGURES.iter().find(|f| f.key == key).expect("known figure");
            let mut data = String::new();
            for path in PATHS {
                if let Some((min, med, max)) = self.figure(path, key) {
                    let _ = writeln!(data, "\"{}\" {med} {min} {max}", path.short());
                }
            }
            let file = format!("{key}.dat");
            fs::write(dir.join(&file), data)?;
            let _ = writeln!(
                script,
                "set title \"{} ({})\"\nplot '{file}' using 0:2:3:4:(0.6):xtic(1) with boxerrorbars lc rgb '#4a7ebb', \
                 '' using 0:2:(sprintf('%.3g',$2)) with labels offset 0,1",
                f.label, f.unit
            );
        }
        script.push_str("unset multiplot\n");
        fs::write(dir.join("bench.gp"), &script)?;
        let out = Command::new("gnuplot")
            .arg("bench.gp")
            .current_dir(dir)
            .output()
            .context("running gnuplot (apt-get install gnuplot-nox; ./run.sh bench installs it)")?;
        ensure!(
            out.status.success(),
            "gnuplot failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(dir.join("bench.png"))
    }
}

fn fmt(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.4}")
    }
}

fn machine() -> Value {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default();
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    json!({
        "cpu": cpu,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kernel": kernel.trim(),
        "load_at_end": fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
    })
}
