//! The lab's processes: agents (started, rolled, stopped) and signals.
use super::*;

impl Lab {
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
            .arg(self.kubelet_root(&n.name))
            .arg("--probe-cgroup")
            .arg(self.kubelet_cgroup(&n.name)?)
            .args(["--capture-ip", &n.gateway_ip.to_string()])
            .args(["--capture-ip6", &n.gateway_ip6.to_string()])
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
    pub(super) fn spawn_logged(
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
}

/// SIGTERM, up to `limit` to exit, then SIGKILL; true if it exited by itself.
pub(super) fn stop_pid(pid: u32, limit: Duration) -> bool {
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

pub(super) fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) with a pid we started; no memory is involved.
    unsafe { libc::kill(pid as i32, sig) };
}

pub(super) fn reap(pid: u32) {
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
