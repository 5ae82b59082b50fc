//! The lab: a small cluster made of network namespaces, veth pairs, bridges
//! and cgroup2 directories on this one machine (DESIGN.md section 8).
//!
//! ```text
//!  fabric netns (br0) ── veth ── node netns (eth0 198.18.0.1N, cni0 198.18.N.1/24) ── veth ── pod netns (eth0 198.18.N.1K)
//! ```
//!
//! Every object the lab makes carries the `mesh-lab` prefix (netns names,
//! cgroup directory, pin directory, state directory), and every veth lives
//! inside a lab namespace, so `down` can find and remove all of it, also after
//! a crash, and nothing on the host's own interfaces or routes is touched.
use std::{
    collections::BTreeMap,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

pub const PREFIX: &str = "mesh-lab";
pub const STATE_DIR: &str = "/run/mesh-lab";
pub const BPFFS_DIR: &str = "/sys/fs/bpf/mesh-lab";
pub const FABRIC_NETNS: &str = "mesh-lab-fabric";
/// The mesh CA runs in its own namespace on the fabric, as a Deployment would.
pub const CA_NETNS: &str = "mesh-lab-ca";
pub const CA_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const CA_PORT: u16 = 15012;

/// The topology file: nodes, and pods placed on them.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    pub nodes: Vec<NodeSpec>,
    #[serde(default)]
    pub pods: Vec<PodSpec>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    pub name: String,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PodSpec {
    pub name: String,
    #[serde(default = "default_ns")]
    pub namespace: String,
    #[serde(default = "default_ns")]
    pub service_account: String,
    pub node: String,
}

fn default_ns() -> String {
    "default".into()
}

impl Topology {
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = fs::read_to_string(path).with_context(|| format!("reading topology {}", path.display()))?;
        let topo: Topology =
            serde_yaml::from_str(&text).with_context(|| format!("parsing topology {}", path.display()))?;
        topo.validate()?;
        Ok(topo)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!(!self.nodes.is_empty(), "topology has no nodes");
        ensure!(self.nodes.len() <= 200, "at most 200 nodes (198.18.N.0/24 per node)");
        let mut seen = std::collections::HashSet::new();
        for n in &self.nodes {
            ensure!(
                valid_name(&n.name),
                "node name {:?}: use lowercase letters, digits and '-', up to 20 chars",
                n.name
            );
            ensure!(seen.insert(n.name.clone()), "node {} listed twice", n.name);
        }
        let mut pods = std::collections::HashSet::new();
        for p in &self.pods {
            ensure!(
                valid_name(&p.name) && valid_name(&p.namespace),
                "pod {}/{}: use lowercase letters, digits and '-'",
                p.namespace,
                p.name
            );
            ensure!(
                self.nodes.iter().any(|n| n.name == p.node),
                "pod {}/{} is on unknown node {}",
                p.namespace,
                p.name,
                p.node
            );
            ensure!(
                pods.insert((p.namespace.clone(), p.name.clone())),
                "pod {}/{} listed twice",
                p.namespace,
                p.name
            );
        }
        ensure!(self.pods.len() <= 200, "at most 200 pods");
        Ok(())
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 20
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// The lab as built: every address and name, saved in the state directory.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Lab {
    pub nodes: Vec<LabNode>,
    pub pods: Vec<LabPod>,
    pub agent_bin: PathBuf,
    pub source_dir: PathBuf,
    pub cgroup_root: PathBuf,
    #[serde(default)]
    pub agent_args: Vec<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct LabNode {
    pub name: String,
    pub index: u8,
    pub netns: String,
    pub fabric_ip: Ipv4Addr,
    /// The node's address on its pod bridge: pods' gateway and capture IP.
    pub gateway_ip: Ipv4Addr,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct LabPod {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub node: String,
    pub netns: String,
    pub ip: Ipv4Addr,
}

/// Options for `up`.
#[derive(Clone, Debug)]
pub struct UpOptions {
    pub agent_bin: PathBuf,
    /// Directory whose YAML files (SMI policy) are copied into the agents' source.
    pub policy_dir: Option<PathBuf>,
    /// Start an agent on every node.
    pub start_agents: bool,
    /// Extra `mesh-agent run` flags.
    pub agent_args: Vec<String>,
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    run(Command::new("ip").args(args))
}

/// `ip` inside a lab namespace.
fn ip_in(netns: &str, args: &[&str]) -> anyhow::Result<()> {
    run(Command::new("ip").arg("-n").arg(netns).args(args))
}

/// A command inside `netns`, network namespace only: unlike `ip netns exec`
/// this keeps the host's /sys, where bpffs and cgroup2 are mounted.
pub fn in_netns(netns: &str, program: &str) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{netns}")).arg("--").arg(program);
    c
}

/// The cgroup2 mount point (e.g. /sys/fs/cgroup/unified on a hybrid host).
pub fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts")?;
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
        })
        .next()
        .context("no cgroup2 mount found: mount one (mount -t cgroup2 none /sys/fs/cgroup/unified)")
}

pub fn lab_cgroup() -> anyhow::Result<PathBuf> {
    Ok(cgroup2_mount()?.join(PREFIX))
}

impl Lab {
    pub fn state_file() -> PathBuf {
        Path::new(STATE_DIR).join("lab.json")
    }

    /// The running lab, from the state directory.
    pub fn load() -> anyhow::Result<Lab> {
        let text = fs::read_to_string(Self::state_file()).context("no lab is up (run `cargo xtask lab up`)")?;
        Ok(serde_json::from_str(&text)?)
    }

    fn save(&self) -> anyhow::Result<()> {
        fs::write(Self::state_file(), serde_json::to_string_pretty(self)?)?;
        Ok(())
    }

    /// Builds the lab. Running it on a lab that is already up with the same
    /// topology is not an error: it makes sure the agents run and returns.
    pub fn up(topo: &Topology, opts: &UpOptions) -> anyhow::Result<Lab> {
        topo.validate()?;
        preflight()?;
        if let Ok(existing) = Lab::load() {
            if existing.matches(topo) {
                eprintln!("lab: already up");
                if opts.start_agents {
                    if existing.ca_pid().is_none() {
                        existing.start_ca()?;
                    }
                    for n in &existing.nodes {
                        if existing.agent_pid(&n.name).is_none() {
                            existing.start_agent(&n.name)?;
                        }
                    }
                }
                return Ok(existing);
            }
            eprintln!("lab: a different lab is up; tearing it down first");
            down()?;
        } else {
            // Leftovers of a crashed run.
            down()?;
        }
        let cgroup_root = lab_cgroup()?;
        let lab = Lab::plan(topo, opts, cgroup_root)?;
        fs::create_dir_all(&lab.source_dir)?;
        lab.save()?;
        let result = lab.build(opts);
        if let Err(e) = result {
            let _ = down();
            return Err(e.context("lab up failed; partial lab removed"));
        }
        Ok(lab)
    }

    fn matches(&self, topo: &Topology) -> bool {
        self.nodes.len() == topo.nodes.len()
            && self.nodes.iter().zip(&topo.nodes).all(|(a, b)| a.name == b.name)
            && self.pods.len() == topo.pods.len()
            && self.pods.iter().zip(&topo.pods).all(|(a, b)| {
                a.name == b.name
                    && a.namespace == b.namespace
                    && a.node == b.node
                    && a.service_account == b.service_account
            })
    }

    fn plan(topo: &Topology, opts: &UpOptions, cgroup_root: PathBuf) -> anyhow::Result<Lab> {
        let mut nodes = Vec::new();
        for (i, n) in topo.nodes.iter().enumerate() {
            let index = (i + 1) as u8;
            nodes.push(LabNode {
                name: n.name.clone(),
                index,
                netns: format!("{PREFIX}-{}", n.name),
                fabric_ip: Ipv4Addr::new(198, 18, 0, 10 + index),
                gateway_ip: Ipv4Addr::new(198, 18, index, 1),
            });
        }
        let mut per_node: BTreeMap<String, u8> = BTreeMap::new();
        let mut pods = Vec::new();
        for p in &topo.pods {
            let node = nodes.iter().find(|n| n.name == p.node).expect("validated");
            let k = per_node.entry(p.node.clone()).or_insert(9);
            *k += 1;
            ensure!(*k < 255, "too many pods on node {}", p.node);
            pods.push(LabPod {
                name: p.name.clone(),
                namespace: p.namespace.clone(),
                service_account: p.service_account.clone(),
                node: p.node.clone(),
                netns: format!("{PREFIX}-{}-{}", p.namespace, p.name),
                ip: Ipv4Addr::new(198, 18, node.index, *k),
            });
        }
        Ok(Lab {
            nodes,
            pods,
            agent_bin: opts.agent_bin.clone(),
            source_dir: Path::new(STATE_DIR).join("source"),
            cgroup_root,
            agent_args: opts.agent_args.clone(),
        })
    }

    fn build(&self, opts: &UpOptions) -> anyhow::Result<()> {
        let started = Instant::now();
        eprintln!("lab: fabric");
        ip(&["netns", "add", FABRIC_NETNS])?;
        ip_in(FABRIC_NETNS, &["link", "set", "lo", "up"])?;
        ip_in(FABRIC_NETNS, &["link", "add", "br0", "type", "bridge"])?;
        ip_in(FABRIC_NETNS, &["link", "set", "br0", "up"])?;
        eprintln!("lab: CA namespace ({CA_IP})");
        ip(&["netns", "add", CA_NETNS])?;
        ip_in(CA_NETNS, &["link", "set", "lo", "up"])?;
        ip_in(
            FABRIC_NETNS,
            &[
                "link", "add", "vca", "type", "veth", "peer", "name", "eth0", "netns", CA_NETNS,
            ],
        )?;
        ip_in(FABRIC_NETNS, &["link", "set", "vca", "master", "br0", "up"])?;
        ip_in(CA_NETNS, &["addr", "add", &format!("{CA_IP}/24"), "dev", "eth0"])?;
        ip_in(CA_NETNS, &["link", "set", "eth0", "up"])?;
        fs::create_dir_all(self.cgroup_root.join("ca"))?;
        self.write_ca_material()?;
        for n in &self.nodes {
            eprintln!("lab: node {} ({}, pods 198.18.{}.0/24)", n.name, n.fabric_ip, n.index);
            ip(&["netns", "add", &n.netns])?;
            ip_in(&n.netns, &["link", "set", "lo", "up"])?;
            // Create the pair inside the fabric, then move one end: no veth
            // ever appears in the host namespace.
            let fab_if = format!("vf{}", n.index);
            ip_in(
                FABRIC_NETNS,
                &[
                    "link", "add", &fab_if, "type", "veth", "peer", "name", "eth0", "netns", &n.netns,
                ],
            )?;
            ip_in(FABRIC_NETNS, &["link", "set", &fab_if, "master", "br0", "up"])?;
            ip_in(
                &n.netns,
                &["addr", "add", &format!("{}/24", n.fabric_ip), "dev", "eth0"],
            )?;
            ip_in(&n.netns, &["link", "set", "eth0", "up"])?;
            ip_in(&n.netns, &["link", "add", "cni0", "type", "bridge"])?;
            ip_in(
                &n.netns,
                &["addr", "add", &format!("{}/24", n.gateway_ip), "dev", "cni0"],
            )?;
            ip_in(&n.netns, &["link", "set", "cni0", "up"])?;
            for other in self.nodes.iter().filter(|o| o.name != n.name) {
                ip_in(
                    &n.netns,
                    &[
                        "route",
                        "add",
                        &format!("198.18.{}.0/24", other.index),
                        "via",
                        &other.fabric_ip.to_string(),
                    ],
                )?;
            }
            // Forwarding on inside the node namespace only; the host keeps its own setting.
            run(in_netns(&n.netns, "sysctl").args(["-q", "-w", "net.ipv4.ip_forward=1"]))?;
            let node_cg = self.cgroup_root.join(&n.name);
            for dir in [node_cg.join("agent"), node_cg.join("pods"), self.pin_dir(&n.name)] {
                fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            }
        }
        for (k, p) in self.pods.iter().enumerate() {
            let node = self.node(&p.node)?;
            eprintln!("lab: pod {}/{} on {} ({})", p.namespace, p.name, p.node, p.ip);
            ip(&["netns", "add", &p.netns])?;
            ip_in(&p.netns, &["link", "set", "lo", "up"])?;
            let host_if = format!("vp{k}");
            ip_in(
                &node.netns,
                &[
                    "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &p.netns,
                ],
            )?;
            ip_in(&node.netns, &["link", "set", &host_if, "master", "cni0", "up"])?;
            ip_in(&p.netns, &["addr", "add", &format!("{}/24", p.ip), "dev", "eth0"])?;
            ip_in(&p.netns, &["link", "set", "eth0", "up"])?;
            ip_in(
                &p.netns,
                &["route", "add", "default", "via", &node.gateway_ip.to_string()],
            )?;
            let cg = self.pod_cgroup(p);
            fs::create_dir_all(&cg).with_context(|| format!("creating {}", cg.display()))?;
        }
        self.write_source(opts.policy_dir.as_deref())?;
        if opts.start_agents {
            self.start_ca()?;
            for n in &self.nodes {
                self.start_agent(&n.name)?;
            }
        }
        eprintln!("lab: up in {:.1}s", started.elapsed().as_secs_f64());
        Ok(())
    }

    /// The agents' file source: the pods as Kubernetes Pod objects, plus the
    /// policy directory's YAML files.
    fn write_source(&self, policy_dir: Option<&Path>) -> anyhow::Result<()> {
        let mut docs = String::new();
        for n in &self.nodes {
            docs.push_str(&format!(
                "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: {}\nstatus:\n  addresses:\n    - {{type: InternalIP, address: {}}}\n",
                n.name, n.fabric_ip
            ));
        }
        for p in &self.pods {
            docs.push_str(&format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: {}\nspec:\n  nodeName: {}\n  serviceAccountName: {}\nstatus:\n  podIP: {}\n",
                p.name, p.namespace, p.node, p.service_account, p.ip
            ));
        }
        fs::write(self.source_dir.join("pods.yaml"), docs)?;
        if let Some(dir) = policy_dir {
            for entry in fs::read_dir(dir).with_context(|| format!("reading policy dir {}", dir.display()))? {
                let path = entry?.path();
                if matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
                    fs::copy(&path, self.source_dir.join(path.file_name().expect("file")))?;
                }
            }
        }
        Ok(())
    }

    pub fn node(&self, name: &str) -> anyhow::Result<&LabNode> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .with_context(|| format!("no node {name} in the lab"))
    }

    /// A pod by `name` or `namespace/name`.
    pub fn pod(&self, name: &str) -> anyhow::Result<&LabPod> {
        let (ns, n) = name.split_once('/').unwrap_or(("", name));
        self.pods
            .iter()
            .find(|p| p.name == n && (ns.is_empty() || p.namespace == ns))
            .with_context(|| format!("no pod {name} in the lab"))
    }

    pub fn pod_cgroup(&self, p: &LabPod) -> PathBuf {
        self.cgroup_root
            .join(&p.node)
            .join("pods")
            .join(format!("{}_{}", p.namespace, p.name))
    }

    pub fn pin_dir(&self, node: &str) -> PathBuf {
        Path::new(BPFFS_DIR).join(node)
    }

    pub fn agent_log(&self, node: &str) -> PathBuf {
        Path::new(STATE_DIR).join(format!("agent-{node}.log"))
    }

    /// Where a node's agent hands its listeners to a successor.
    pub fn handoff_socket(&self, node: &str) -> PathBuf {
        Path::new(STATE_DIR).join(format!("agent-{node}.handoff.sock"))
    }

    fn agent_pid_file(&self, node: &str) -> PathBuf {
        Path::new(STATE_DIR).join(format!("agent-{node}.pid"))
    }

    /// A command run inside a pod: its network namespace and its cgroup, as
    /// a container's process would be.
    pub fn exec(&self, pod: &str, program: &str) -> anyhow::Result<Command> {
        let p = self.pod(pod)?;
        Ok(self.wrapped(&p.netns, &self.pod_cgroup(p), program))
    }

    /// A command in a pod's network namespace but outside the mesh: its
    /// cgroup sits beside the node's pod cgroups, where no mesh program is
    /// attached (the benchmark's no-mesh baseline, on the same veths).
    pub fn exec_unmeshed(&self, pod: &str, program: &str) -> anyhow::Result<Command> {
        let p = self.pod(pod)?;
        let cg = self.cgroup_root.join(&p.node).join("unmeshed");
        fs::create_dir_all(&cg).with_context(|| format!("creating {}", cg.display()))?;
        Ok(self.wrapped(&p.netns, &cg, program))
    }

    /// A command run on a node, outside every pod cgroup (like a host process).
    pub fn node_exec(&self, node: &str, program: &str) -> anyhow::Result<Command> {
        let n = self.node(node)?;
        Ok(self.wrapped(&n.netns, &self.cgroup_root.join(&n.name), program))
    }

    fn wrapped(&self, netns: &str, cgroup: &Path, program: &str) -> Command {
        // Join the cgroup first (the shell's own pid), then the netns; exec
        // keeps both for the program.
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(r#"cg="$1"; ns="$2"; shift 2; echo $$ > "$cg/cgroup.procs" && exec nsenter --net="/run/netns/$ns" -- "$@""#)
            .arg("mesh-lab-exec")
            .arg(cgroup)
            .arg(netns)
            .arg(program);
        c
    }

    pub fn start_agent(&self, node: &str) -> anyhow::Result<()> {
        self.start_agent_wrapped(node, &[])
    }

    /// Starts a node's agent, optionally under a wrapper command (e.g.
    /// strace) placed between the netns switch and the agent.
    pub fn start_agent_wrapped(&self, node: &str, wrapper: &[&str]) -> anyhow::Result<()> {
        let n = self.node(node)?;
        let agent = self.agent_bin.to_string_lossy().to_string();
        let program = wrapper.first().map(|s| s.to_string()).unwrap_or_else(|| agent.clone());
        let mut cmd = self.wrapped(&n.netns, &self.cgroup_root.join(&n.name).join("agent"), &program);
        if !wrapper.is_empty() {
            cmd.args(&wrapper[1..]).arg(&agent);
        }
        cmd.args(["run", "--node-name", &n.name])
            .arg("--source-dir")
            .arg(&self.source_dir)
            .arg("--pod-cgroup-root")
            .arg(self.cgroup_root.join(&n.name).join("pods"))
            .args(["--capture-ip", &n.gateway_ip.to_string()])
            .arg("--bpffs-dir")
            .arg(self.pin_dir(node))
            .args(["--ca-addr", &format!("{CA_IP}:{CA_PORT}")])
            .arg("--ca-root")
            .arg(self.ca_dir().join("ca.crt"))
            .arg("--node-token-file")
            .arg(self.node_token_file(node))
            .arg("--audit-log")
            .arg(self.audit_log(node))
            .arg("--handoff-socket")
            .arg(self.handoff_socket(node))
            // Short, so stopping an agent with open flows stays quick; a
            // test or the user may override it with --agent-arg.
            .args(["--drain-grace", "3s"])
            .args(&self.agent_args);
        let ready = format!("\"node\":\"{node}\"");
        self.spawn_logged(
            cmd,
            &self.agent_log(node),
            &self.agent_pid_file(node),
            &ready,
            &format!("agent on {node}"),
        )
    }

    /// Spawns a lab daemon with its output appended to `log`, and waits
    /// until a line written by this start contains "ready"/`marker`.
    fn spawn_logged(
        &self,
        mut cmd: Command,
        log_path: &Path,
        pid_file: &Path,
        marker: &str,
        what: &str,
    ) -> anyhow::Result<()> {
        let log = fs::OpenOptions::new().create(true).append(true).open(log_path)?;
        // Only lines written by this start count for readiness.
        let log_start = log.metadata()?.len() as usize;
        cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        // Own process group: Ctrl-C on the lab command does not hit the daemons.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {what} ({})", self.agent_bin.display()))?;
        let pid = child.id();
        fs::write(pid_file, pid.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = fs::read_to_string(log_path).unwrap_or_default();
            let text = text.get(log_start..).unwrap_or("");
            let ready = text
                .lines()
                .any(|l| (l.contains("agent ready") || l.contains("mesh CA serving")) && l.contains(marker));
            if ready && pid_alive(pid) {
                eprintln!("lab: {what} ready (pid {pid})");
                return Ok(());
            }
            if !pid_alive(pid) {
                let tail: Vec<&str> = text.lines().rev().take(5).collect();
                bail!(
                    "{what} exited; last log lines:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            if Instant::now() > deadline {
                bail!("{what} not ready after 20s; see {}", log_path.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The node's audit trail (JSON lines).
    pub fn audit_log(&self, node: &str) -> PathBuf {
        Path::new(STATE_DIR).join(format!("audit-{node}.jsonl"))
    }

    pub fn ca_dir(&self) -> PathBuf {
        Path::new(STATE_DIR).join("ca")
    }

    pub fn ca_log(&self) -> PathBuf {
        Path::new(STATE_DIR).join("ca.log")
    }

    pub fn node_token_file(&self, node: &str) -> PathBuf {
        Path::new(STATE_DIR).join(format!("node-{node}.token"))
    }

    pub fn node_credentials_file(&self) -> PathBuf {
        self.ca_dir().join("node-credentials.yaml")
    }

    /// A root CA (made by `mesh-agent ca init`) and one bootstrap credential
    /// per node: the token for the node's agent, its hash for the CA.
    fn write_ca_material(&self) -> anyhow::Result<()> {
        run(Command::new(&self.agent_bin)
            .arg("ca")
            .arg("init")
            .arg("--dir")
            .arg(self.ca_dir()))?;
        let mut creds = String::from("# node bootstrap credentials (hashes only), made by `lab up`\ncredentials:\n");
        for n in &self.nodes {
            let token = random_hex(32)?;
            write_secret(&self.node_token_file(&n.name), token.as_bytes())?;
            let hash: String = sha2::Sha256::digest(token.as_bytes())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            creds.push_str(&format!("  - node: {}\n    tokenSha256: {hash}\n", n.name));
        }
        fs::write(self.node_credentials_file(), creds)?;
        Ok(())
    }

    /// Starts the mesh CA in its namespace and cgroup.
    pub fn start_ca(&self) -> anyhow::Result<()> {
        let mut cmd = self.wrapped(
            CA_NETNS,
            &self.cgroup_root.join("ca"),
            &self.agent_bin.to_string_lossy(),
        );
        cmd.args(["ca", "serve", "--listen", &format!("{CA_IP}:{CA_PORT}")])
            .arg("--dir")
            .arg(self.ca_dir())
            .arg("--node-credentials")
            .arg(self.node_credentials_file())
            .arg("--source-dir")
            .arg(&self.source_dir);
        self.spawn_logged(
            cmd,
            &self.ca_log(),
            &Path::new(STATE_DIR).join("ca.pid"),
            "mesh CA serving",
            "CA",
        )
    }

    pub fn ca_pid(&self) -> Option<u32> {
        let pid: u32 = fs::read_to_string(Path::new(STATE_DIR).join("ca.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        pid_alive(pid).then_some(pid)
    }

    pub fn stop_ca(&self) -> anyhow::Result<()> {
        if let Some(pid) = self.ca_pid() {
            stop_pid(pid, Duration::from_secs(5));
        }
        Ok(())
    }

    pub fn agent_pid(&self, node: &str) -> Option<u32> {
        let pid: u32 = fs::read_to_string(self.agent_pid_file(node))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        pid_alive(pid).then_some(pid)
    }

    /// Replaces a node's agent as a DaemonSet rolling update with surge
    /// does: the new agent starts beside the old one and takes its
    /// listeners when ready; then the old one gets SIGTERM and drains
    /// (within its grace period, up to `drain_limit`).
    pub fn roll_agent(&self, node: &str, drain_limit: Duration) -> anyhow::Result<()> {
        let old = self.agent_pid(node);
        self.start_agent(node)?;
        if let Some(pid) = old {
            let started = Instant::now();
            if !stop_pid(pid, drain_limit) {
                bail!("the old agent on {node} (pid {pid}) did not finish draining within {drain_limit:?}; killed");
            }
            eprintln!(
                "lab: old agent on {node} (pid {pid}) drained and exited in {} ms",
                started.elapsed().as_millis()
            );
        }
        Ok(())
    }

    /// Stops a node's agent (SIGTERM, then SIGKILL), leaving its pins.
    pub fn stop_agent(&self, node: &str) -> anyhow::Result<()> {
        if let Some(pid) = self.agent_pid(node) {
            stop_pid(pid, Duration::from_secs(5));
        }
        let _ = fs::remove_file(self.agent_pid_file(node));
        Ok(())
    }

    pub fn status(&self) -> String {
        let mut s = String::new();
        let ca = match self.ca_pid() {
            Some(pid) => format!("pid {pid}"),
            None => "DOWN".into(),
        };
        s.push_str(&format!("mesh CA {CA_IP}:{CA_PORT}  {ca}\n"));
        for n in &self.nodes {
            let agent = match self.agent_pid(&n.name) {
                Some(pid) => format!("agent pid {pid}"),
                None => "agent DOWN".into(),
            };
            s.push_str(&format!(
                "node {:<10} {:<14} pods 198.18.{}.0/24  {agent}\n",
                n.name, n.fabric_ip, n.index
            ));
            for p in self.pods.iter().filter(|p| p.node == n.name) {
                s.push_str(&format!(
                    "  pod {:<24} {:<14} sa={}\n",
                    format!("{}/{}", p.namespace, p.name),
                    p.ip,
                    p.service_account
                ));
            }
        }
        s
    }
}

/// SIGTERM, up to `limit` to exit, then SIGKILL; true if it exited by itself.
fn stop_pid(pid: u32, limit: Duration) -> bool {
    signal(pid, libc::SIGTERM);
    let deadline = Instant::now() + limit;
    while pid_alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let exited = !pid_alive(pid);
    if !exited {
        signal(pid, libc::SIGKILL);
    }
    reap(pid);
    exited
}

fn random_hex(bytes: usize) -> anyhow::Result<String> {
    use std::io::Read as _;
    let mut buf = vec![0u8; bytes];
    fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

fn write_secret(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    Ok(())
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) with a pid we started; no memory is involved.
    unsafe { libc::kill(pid as i32, sig) };
}

fn reap(pid: u32) {
    let mut status = 0;
    // SAFETY: waitpid on a possible child; WNOHANG never blocks.
    unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG) };
}

pub fn pid_alive(pid: u32) -> bool {
    reap(pid);
    // A zombie still "exists" for kill(0); /proc state tells them apart.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'),
        Err(_) => false,
    }
}

fn preflight() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "the lab needs root (network namespaces, cgroups, eBPF)"
    );
    for tool in ["ip", "nsenter", "sysctl", "ss"] {
        ensure!(
            which(tool),
            "{tool} not found: run ./run.sh setup (installs iproute2, util-linux, procps)"
        );
    }
    // The agents pin under /sys/fs/bpf; mount bpffs there if nothing is.
    let is_bpffs = fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.split_whitespace().nth(2) == Some("bpf"));
    if !is_bpffs {
        run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
            .context("bpffs is not mounted at /sys/fs/bpf and mounting it failed")?;
        eprintln!("lab: mounted bpffs at /sys/fs/bpf");
    }
    Ok(())
}

fn which(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).exists()))
        .unwrap_or(false)
}

/// Removes everything any lab made: processes, network namespaces (and the
/// veths inside them), cgroups, pins, state. Safe to run any number of times.
pub fn down() -> anyhow::Result<()> {
    let mut problems = Vec::new();
    // 1. Processes: every process in the lab cgroup tree (agents, pod
    //    workloads), then anything still inside a lab netns.
    if let Ok(cg) = lab_cgroup()
        && cg.exists()
    {
        let _ = fs::write(cg.join("cgroup.kill"), "1");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cgroup_pids(&cg).is_empty() && Instant::now() < deadline {
            for pid in cgroup_pids(&cg) {
                signal(pid, libc::SIGKILL);
                reap(pid);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let namespaces = lab_netns();
    for ns in &namespaces {
        if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
            for pid in String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
            {
                signal(pid, libc::SIGKILL);
                reap(pid);
            }
        }
    }
    // 2. Namespaces; their veths and bridges go with them.
    for ns in &namespaces {
        if let Err(e) = ip(&["netns", "del", ns]) {
            problems.push(e.to_string());
        }
    }
    // 3. cgroups, deepest first (rmdir only removes empty ones).
    if let Ok(cg) = lab_cgroup()
        && cg.exists()
    {
        let mut dirs = Vec::new();
        collect_dirs(&cg, &mut dirs);
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for d in dirs {
            let mut tries = 0;
            while let Err(e) = fs::remove_dir(&d) {
                tries += 1;
                if tries > 100 {
                    problems.push(format!("rmdir {}: {e}", d.display()));
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    // 4. Pins (removing a link's last pin detaches it), then state.
    if Path::new(BPFFS_DIR).exists()
        && let Err(e) = fs::remove_dir_all(BPFFS_DIR)
    {
        problems.push(format!("removing {BPFFS_DIR}: {e}"));
    }
    let _ = fs::remove_dir_all(STATE_DIR);
    ensure!(
        problems.is_empty(),
        "lab down left something behind:\n{}",
        problems.join("\n")
    );
    Ok(())
}

pub fn lab_netns() -> Vec<String> {
    fs::read_dir("/run/netns")
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with(PREFIX))
                .collect()
        })
        .unwrap_or_default()
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                collect_dirs(&e.path(), out);
            }
        }
    }
}

fn cgroup_pids(dir: &Path) -> Vec<u32> {
    let mut dirs = Vec::new();
    collect_dirs(dir, &mut dirs);
    dirs.iter()
        .filter_map(|d| fs::read_to_string(d.join("cgroup.procs")).ok())
        .flat_map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect::<Vec<u32>>())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_assigns_lab_addresses_only() {
        let topo: Topology = serde_yaml::from_str(
            "nodes: [{name: a}, {name: b}]\npods:\n- {name: p1, node: a}\n- {name: p2, node: a, serviceAccount: web}\n- {name: p3, namespace: shop, node: b}\n",
        )
        .unwrap();
        topo.validate().unwrap();
        let opts = UpOptions {
            agent_bin: "x".into(),
            policy_dir: None,
            start_agents: false,
            agent_args: vec![],
        };
        let lab = Lab::plan(&topo, &opts, "/cg".into()).unwrap();
        let bench = ipnet_contains;
        for n in &lab.nodes {
            assert!(bench(n.fabric_ip) && bench(n.gateway_ip));
        }
        let ips: Vec<String> = lab.pods.iter().map(|p| p.ip.to_string()).collect();
        assert_eq!(ips, ["198.18.1.10", "198.18.1.11", "198.18.2.10"]);
        assert_eq!(lab.pods[1].service_account, "web");
        assert_eq!(lab.pod("shop/p3").unwrap().netns, "mesh-lab-shop-p3");
    }

    fn ipnet_contains(ip: Ipv4Addr) -> bool {
        let o = ip.octets();
        o[0] == 198 && (o[1] == 18 || o[1] == 19)
    }

    #[test]
    fn bad_topologies_are_refused() {
        for (yaml, want) in [
            ("nodes: []", "no nodes"),
            ("nodes: [{name: a}, {name: a}]", "twice"),
            ("nodes: [{name: a}]\npods: [{name: p, node: zz}]", "unknown node"),
            ("nodes: [{name: A_B}]", "node name"),
        ] {
            let topo: Topology = serde_yaml::from_str(yaml).unwrap();
            let err = topo.validate().unwrap_err().to_string();
            assert!(err.contains(want), "{yaml}: {err}");
        }
        assert!(serde_yaml::from_str::<Topology>("nodes: [{name: a, extra: 1}]").is_err());
    }
}
