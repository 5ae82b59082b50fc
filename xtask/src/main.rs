//! `cargo xtask`: the lab, the demo, the tests.
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use xtask::lab::{self, Lab, Topology, UpOptions};

#[derive(Parser)]
#[command(name = "xtask", about = "Developer and CI tasks for the mesh")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Manage the lab cluster (network namespaces + cgroups on this machine).
    Lab {
        #[command(subcommand)]
        cmd: LabCmd,
    },
    /// Bring up the sample lab and show captured, same-node and proxied traffic.
    Demo {
        /// Leave the lab up afterwards (remove it with `cargo xtask lab down`).
        #[arg(long)]
        keep: bool,
    },
    /// Unit tests, then the end-to-end tests in the lab.
    Test,
    /// Benchmark the mesh against no mesh in one lab run (release build):
    /// a table, target/bench/bench.json and target/bench/bench.png.
    Bench {
        /// Rounds; each figure is min/median/max over them.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Seconds of each single-stream throughput run.
        #[arg(long, default_value_t = 10)]
        throughput_secs: u64,
        /// Seconds of each latency and connection-rate run.
        #[arg(long, default_value_t = 2.0)]
        short_secs: f64,
        /// Idle captured connections held to measure agent memory.
        #[arg(long, default_value_t = 10_000)]
        hold: usize,
        /// Debug build (quick smoke run; the figures mean nothing).
        #[arg(long)]
        debug: bool,
        /// Flame graphs (SVG, in --out) of both agents during round 1's
        /// cross-node throughput and connection-rate runs; needs perf.
        #[arg(long)]
        profile: bool,
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
    },
    /// Regenerate deploy/crds/ from the SMI and AuthorizationPolicy types (mesh-agent/src/smi.rs, gateway.rs).
    GenCrds,
}

#[derive(Subcommand)]
enum LabCmd {
    /// Create the lab from a topology file and start an agent per node.
    Up {
        #[arg(long, default_value = "deploy/lab/topology.yaml")]
        topology: PathBuf,
        /// Directory of SMI policy YAML given to every agent.
        #[arg(long, default_value = "deploy/lab/policy")]
        policy: PathBuf,
        /// Agent binary (default: build it).
        #[arg(long)]
        agent_bin: Option<PathBuf>,
        /// Build the agent in release mode.
        #[arg(long)]
        release: bool,
        /// Create the network without starting agents.
        #[arg(long)]
        no_agents: bool,
        /// Extra flag for every agent, repeatable: --agent-arg=--kernel-debug
        #[arg(long = "agent-arg", allow_hyphen_values = true)]
        agent_args: Vec<String>,
    },
    /// Remove every namespace, veth, cgroup, pin and process the lab made.
    Down,
    /// Show nodes, pods and agents.
    Status,
    /// Run a command inside a pod (its netns and cgroup): lab exec POD -- CMD...
    Exec {
        pod: String,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Run a command on a node, outside every pod: lab node-exec NODE -- CMD...
    NodeExec {
        node: String,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Stop or start one node's agent (pins stay). `restart` is a rolling
    /// one: a new agent takes over the running one's listeners, then the
    /// old one drains and exits (no connection refused).
    Agent {
        node: String,
        #[arg(value_parser = ["stop", "start", "restart"])]
        action: String,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    std::env::set_current_dir(xtask::workspace_root())?;
    match cli.cmd {
        Cmd::Lab { cmd } => lab_cmd(cmd),
        Cmd::Demo { keep } => xtask_demo(keep),
        Cmd::Test => xtask_test(),
        Cmd::Bench {
            rounds,
            throughput_secs,
            short_secs,
            hold,
            debug,
            profile,
            out,
        } => xtask::bench::run(&xtask::bench::BenchOptions {
            rounds,
            throughput_secs,
            short_secs,
            hold,
            debug,
            profile,
            out_dir: out,
        })
        .context("bench failed"),
        Cmd::GenCrds => {
            let agent = xtask::build_agent(false)?;
            let status = std::process::Command::new(agent)
                .args(["crds", "--dir", "deploy/crds"])
                .status()?;
            anyhow::ensure!(status.success(), "mesh-agent crds failed");
            eprintln!("wrote deploy/crds/");
            Ok(())
        }
    }
}

fn lab_cmd(cmd: LabCmd) -> anyhow::Result<()> {
    match cmd {
        LabCmd::Up {
            topology,
            policy,
            agent_bin,
            release,
            no_agents,
            agent_args,
        } => {
            let agent_bin = match agent_bin {
                Some(p) => p,
                None => xtask::build_agent(release)?,
            };
            let topo = Topology::from_file(&topology)?;
            let lab = Lab::up(
                &topo,
                &UpOptions {
                    agent_bin,
                    policy_dir: policy.exists().then_some(policy),
                    start_agents: !no_agents,
                    agent_args,
                },
            )?;
            print!("{}", lab.status());
        }
        LabCmd::Down => {
            lab::down()?;
            eprintln!("lab: down");
        }
        LabCmd::Status => print!("{}", Lab::load()?.status()),
        LabCmd::Exec { pod, cmd } => exit_with(Lab::load()?.exec(&pod, &cmd[0])?.args(&cmd[1..]).status()?),
        LabCmd::NodeExec { node, cmd } => exit_with(Lab::load()?.node_exec(&node, &cmd[0])?.args(&cmd[1..]).status()?),
        LabCmd::Agent { node, action } => {
            let lab = Lab::load()?;
            match action.as_str() {
                "stop" => lab.stop_agent(&node)?,
                "start" => lab.start_agent(&node)?,
                _ => lab.roll_agent(&node, std::time::Duration::from_secs(60))?,
            }
        }
    }
    Ok(())
}

fn exit_with(status: std::process::ExitStatus) -> ! {
    std::process::exit(status.code().unwrap_or(1))
}

fn xtask_demo(keep: bool) -> anyhow::Result<()> {
    xtask::demo::run(keep).context("demo failed")
}

fn xtask_test() -> anyhow::Result<()> {
    xtask::test::run()
}
