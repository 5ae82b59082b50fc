//! The lab: a small cluster made of network namespaces, veth pairs, bridges
//! and cgroup2 directories on this one machine (README, "The lab").
//!
//! ```text
//!  fabric netns (br0) ── veth ── node netns (eth0 198.18.0.1N, cni0 198.18.N.1/24) ── veth ── pod netns (eth0 198.18.N.1K)
//! ```
//!
//! Every object the lab makes carries the `mesh-lab` prefix (netns names,
//! cgroup directory, pin directory, state directory), and every veth lives
//! inside a lab namespace, so `down` can find and remove all of it, also after
//! a crash, and nothing on the host's own interfaces or routes is touched.
mod ca;
mod down;
mod net;
mod processes;
mod topology;

use std::{
    collections::BTreeMap,
    fs,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

pub use down::{down, lab_netns};
pub use net::{cgroup2_mount, in_netns, lab_cgroup};
use net::{ip, run};
pub use processes::pid_alive;
use processes::{reap, signal, stop_pid};
pub use topology::{CgroupDriver, NodeSpec, PodSpec, Qos, Topology};

pub const PREFIX: &str = "mesh-lab";
pub const STATE_DIR: &str = "/run/mesh-lab";
pub const BPFFS_DIR: &str = "/sys/fs/bpf/mesh-lab";
pub const FABRIC_NETNS: &str = "mesh-lab-fabric";
/// The mesh CA runs in its own namespace on the fabric, as a Deployment would.
pub const CA_NETNS: &str = "mesh-lab-ca";
/// Node `node`'s pod subnet 2001:2:0:<node>::/64, host `host` in it.
pub fn lab_ip6(node: u8, host: u8) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 2, 0, u16::from(node), 0, 0, 0, u16::from(host))
}

pub const CA_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const CA_PORT: u16 = 15012;

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
    /// How the node's "kubelet" lays out pod cgroups.
    #[serde(default)]
    pub cgroup_driver: CgroupDriver,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct LabNode {
    pub name: String,
    pub index: u8,
    pub netns: String,
    pub fabric_ip: Ipv4Addr,
    /// The node's address on its pod bridge: pods' gateway and capture IP.
    pub gateway_ip: Ipv4Addr,
    /// The same two in IPv6 (the lab is dual-stack, in 2001:2::/48, the
    /// IPv6 benchmarking range as 198.18.0.0/15 is IPv4's).
    #[serde(default = "no_ipv6")]
    pub fabric_ip6: Ipv6Addr,
    #[serde(default = "no_ipv6")]
    pub gateway_ip6: Ipv6Addr,
}

/// A lab state written before the lab was dual-stack.
fn no_ipv6() -> Ipv6Addr {
    Ipv6Addr::UNSPECIFIED
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct LabPod {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub node: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    /// Its IPv6 address: every lab pod is dual-stack (IPv4 first, as podIP).
    #[serde(default = "no_ipv6")]
    pub ip6: Ipv6Addr,
    /// `metadata.uid`, as the kubelet names the pod's cgroup after it.
    #[serde(default)]
    pub uid: String,
    #[serde(default)]
    pub qos: Qos,
    /// The one container's id (its cgroup under the pod's).
    #[serde(default)]
    pub container_id: String,
    /// Whether the agents' source holds its Pod object (`PodSpec::meshed`).
    #[serde(default = "topology::yes")]
    pub meshed: bool,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
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
        self.cgroup_driver == topo.cgroup_driver
            && self.nodes.len() == topo.nodes.len()
            && self.nodes.iter().zip(&topo.nodes).all(|(a, b)| a.name == b.name)
            && self.pods.len() == topo.pods.len()
            && self.pods.iter().zip(&topo.pods).all(|(a, b)| {
                a.name == b.name
                    && a.namespace == b.namespace
                    && a.node == b.node
                    && a.service_account == b.service_account
                    && b.qos.is_none_or(|q| q == a.qos)
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
                fabric_ip6: Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 10 + u16::from(index)),
                gateway_ip6: lab_ip6(index, 1),
            });
        }
        let mut per_node: BTreeMap<String, u8> = BTreeMap::new();
        let mut pods = Vec::new();
        for p in &topo.pods {
            let node = nodes.iter().find(|n| n.name == p.node).expect("validated");
            let k = per_node.entry(p.node.clone()).or_insert(9);
            *k += 1;
            ensure!(*k < 255, "too many pods on node {}", p.node);
            let digest = sha2::Sha256::digest(format!("{}/{}", p.namespace, p.name).as_bytes());
            let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
            pods.push(LabPod {
                name: p.name.clone(),
                namespace: p.namespace.clone(),
                service_account: p.service_account.clone(),
                node: p.node.clone(),
                netns: format!("{PREFIX}-{}-{}", p.namespace, p.name),
                ip: Ipv4Addr::new(198, 18, node.index, *k),
                ip6: lab_ip6(node.index, *k),
                // A UUID's shape, stable per pod name, as the API server would give.
                uid: format!(
                    "{}-{}-{}-{}-{}",
                    &hex[0..8],
                    &hex[8..12],
                    &hex[12..16],
                    &hex[16..20],
                    &hex[20..32]
                ),
                // Every lab with three pods or more has all three QoS classes.
                qos: p.qos.unwrap_or(Qos::ALL[pods.len() % 3]),
                container_id: hex,
                meshed: p.meshed,
                labels: p.labels.clone(),
            });
        }
        Ok(Lab {
            nodes,
            pods,
            agent_bin: opts.agent_bin.clone(),
            source_dir: Path::new(STATE_DIR).join("source"),
            cgroup_root,
            agent_args: opts.agent_args.clone(),
            cgroup_driver: topo.cgroup_driver,
        })
    }

    /// The agents' file source: the pods as (dual-stack) Kubernetes Pod objects, plus the
    /// policy directory's YAML files.
    fn write_source(&self, policy_dir: Option<&Path>) -> anyhow::Result<()> {
        let mut docs = String::new();
        for n in &self.nodes {
            docs.push_str(&format!(
                "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: {}\nstatus:\n  addresses:\n    - {{type: InternalIP, address: {}}}\n",
                n.name, n.fabric_ip
            ));
        }
        for p in self.pods.iter().filter(|p| p.meshed) {
            docs.push_str(&format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: {}\n  uid: {}\n  labels: {}\nspec:\n  nodeName: {}\n  serviceAccountName: {}\nstatus:\n  podIP: {}\n  podIPs: [{{ip: {}}}, {{ip: \"{}\"}}]\n  qosClass: {}\n",
                p.name,
                p.namespace,
                p.uid,
                serde_json::to_string(&p.labels).expect("labels serialize"),
                p.node,
                p.service_account,
                p.ip,
                p.ip,
                p.ip6,
                p.qos.as_str()
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

    /// Where a node's "kubelet" keeps pod cgroups (`kubepods.slice` with the
    /// systemd driver, `kubepods` with cgroupfs): the agent attaches there.
    pub fn kubelet_root(&self, node: &str) -> PathBuf {
        let root = self.cgroup_root.join(node);
        match self.cgroup_driver {
            CgroupDriver::Systemd => root.join("kubepods.slice"),
            CgroupDriver::Cgroupfs => root.join("kubepods"),
        }
    }

    /// The pod-level cgroup, laid out as the kubelet does for its QoS class.
    pub fn pod_cgroup(&self, p: &LabPod) -> PathBuf {
        let root = self.kubelet_root(&p.node);
        match (self.cgroup_driver, p.qos) {
            (CgroupDriver::Systemd, Qos::Guaranteed) => {
                root.join(format!("kubepods-pod{}.slice", p.uid.replace('-', "_")))
            }
            (CgroupDriver::Systemd, qos) => {
                let q = qos.as_str().to_ascii_lowercase();
                root.join(format!("kubepods-{q}.slice"))
                    .join(format!("kubepods-{q}-pod{}.slice", p.uid.replace('-', "_")))
            }
            (CgroupDriver::Cgroupfs, Qos::Guaranteed) => root.join(format!("pod{}", p.uid)),
            (CgroupDriver::Cgroupfs, qos) => root
                .join(qos.as_str().to_ascii_lowercase())
                .join(format!("pod{}", p.uid)),
        }
    }

    /// The pod's container cgroup, where its processes run (containerd's
    /// scope name with the systemd driver, the bare id with cgroupfs).
    pub fn container_cgroup(&self, p: &LabPod) -> PathBuf {
        let pod = self.pod_cgroup(p);
        match self.cgroup_driver {
            CgroupDriver::Systemd => pod.join(format!("cri-containerd-{}.scope", p.container_id)),
            CgroupDriver::Cgroupfs => pod.join(&p.container_id),
        }
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

    /// A command run inside a pod: its network namespace and its
    /// container's cgroup, as a container's process would be.
    pub fn exec(&self, pod: &str, program: &str) -> anyhow::Result<Command> {
        let p = self.pod(pod)?;
        Ok(self.wrapped(&p.netns, &self.container_cgroup(p), program))
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

    /// The node's "kubelet" process cgroup (created on first use): probes
    /// run from here, and the agent vouches for them (`--probe-cgroup`).
    pub fn kubelet_cgroup(&self, node: &str) -> anyhow::Result<PathBuf> {
        let cg = self.cgroup_root.join(node).join("kubelet");
        fs::create_dir_all(&cg).with_context(|| format!("creating {}", cg.display()))?;
        Ok(cg)
    }

    /// A command run on a node from the kubelet's cgroup, as its probes are.
    pub fn kubelet_exec(&self, node: &str, program: &str) -> anyhow::Result<Command> {
        let n = self.node(node)?;
        Ok(self.wrapped(&n.netns, &self.kubelet_cgroup(node)?, program))
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

    /// The node's audit trail (JSON lines).
    pub fn audit_log(&self, node: &str) -> PathBuf {
        Path::new(STATE_DIR).join(format!("audit-{node}.jsonl"))
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
                "node {:<10} {:<14} pods 198.18.{}.0/24 {}/64  {agent}\n",
                n.name,
                n.fabric_ip,
                n.index,
                lab_ip6(n.index, 0)
            ));
            for p in self.pods.iter().filter(|p| p.node == n.name) {
                s.push_str(&format!(
                    "  pod {:<24} {:<14} {:<18} sa={}\n",
                    format!("{}/{}", p.namespace, p.name),
                    p.ip,
                    p.ip6,
                    p.service_account
                ));
            }
        }
        s
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
        let ip6s: Vec<String> = lab.pods.iter().map(|p| p.ip6.to_string()).collect();
        assert_eq!(ip6s, ["2001:2:0:1::a", "2001:2:0:1::b", "2001:2:0:2::a"]);
        for ip6 in lab
            .nodes
            .iter()
            .flat_map(|n| [n.fabric_ip6, n.gateway_ip6])
            .chain(lab.pods.iter().map(|p| p.ip6))
        {
            assert_eq!(ip6.segments()[..3], [0x2001, 2, 0], "{ip6} is outside 2001:2::/48");
        }
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
