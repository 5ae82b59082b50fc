//! Network namespaces, veths, bridges, addresses and cgroups: the lab's plumbing.
use super::*;

pub(super) fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

pub(super) fn ip(args: &[&str]) -> anyhow::Result<()> {
    run(Command::new("ip").args(args))
}

/// `ip` inside a lab namespace.
pub(super) fn ip_in(netns: &str, args: &[&str]) -> anyhow::Result<()> {
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
    pub(super) fn build(&self, opts: &UpOptions) -> anyhow::Result<()> {
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
            eprintln!(
                "lab: node {} ({}, pods 198.18.{}.0/24 and {}/64)",
                n.name,
                n.fabric_ip,
                n.index,
                lab_ip6(n.index, 0)
            );
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
            // nodad: the lab's addresses are unique by construction, and an
            // address in DAD is unusable for its first second or two.
            ip_in(
                &n.netns,
                &["addr", "add", &format!("{}/64", n.fabric_ip6), "dev", "eth0", "nodad"],
            )?;
            ip_in(&n.netns, &["link", "set", "eth0", "up"])?;
            ip_in(&n.netns, &["link", "add", "cni0", "type", "bridge"])?;
            ip_in(
                &n.netns,
                &["addr", "add", &format!("{}/24", n.gateway_ip), "dev", "cni0"],
            )?;
            ip_in(
                &n.netns,
                &["addr", "add", &format!("{}/64", n.gateway_ip6), "dev", "cni0", "nodad"],
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
                ip_in(
                    &n.netns,
                    &[
                        "route",
                        "add",
                        &format!("{}/64", lab_ip6(other.index, 0)),
                        "via",
                        &other.fabric_ip6.to_string(),
                    ],
                )?;
            }
            // Forwarding on inside the node namespace only; the host keeps its own setting.
            run(in_netns(&n.netns, "sysctl").args([
                "-q",
                "-w",
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
            ]))?;
            let node_cg = self.cgroup_root.join(&n.name);
            for dir in [node_cg.join("agent"), self.kubelet_root(&n.name), self.pin_dir(&n.name)] {
                fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            }
        }
        for (k, p) in self.pods.iter().enumerate() {
            let node = self.node(&p.node)?;
            eprintln!(
                "lab: pod {}/{} on {} ({}, {})",
                p.namespace, p.name, p.node, p.ip, p.ip6
            );
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
            ip_in(
                &p.netns,
                &["addr", "add", &format!("{}/64", p.ip6), "dev", "eth0", "nodad"],
            )?;
            ip_in(&p.netns, &["link", "set", "eth0", "up"])?;
            ip_in(
                &p.netns,
                &["route", "add", "default", "via", &node.gateway_ip.to_string()],
            )?;
            ip_in(
                &p.netns,
                &["-6", "route", "add", "default", "via", &node.gateway_ip6.to_string()],
            )?;
            let cg = self.container_cgroup(p);
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
}
