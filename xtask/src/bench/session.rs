//! One benchmark session: the lab, CPU pinning, servers, transports, agent CPU and memory.
use super::*;

pub(super) struct Bench {
    pub(super) lab: Lab,
    pub(super) benchtool: PathBuf,
    pub(super) opts: BenchOptions,
    pub(super) servers: Vec<Child>,
    pub(super) step: usize,
    pub(super) steps: usize,
    pub(super) started: Instant,
    pub(super) transport: &'static str,
    /// Highest VmHWM seen per node, kept across agent restarts.
    pub(super) peak_rss_kib: BTreeMap<String, u64>,
}

impl Drop for Bench {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
    }
}

pub(super) const NODES: [(&str, u8); 2] = [("node-a", 0), ("node-b", 1)];

pub(super) fn cpu_of_pod(pod: &str) -> u8 {
    if pod.ends_with("far") { 1 } else { 0 }
}

/// The pod a path's process runs in: a no-mesh path uses the pod's
/// unmeshed twin.
fn pod_for(pod: &str, meshed: bool) -> String {
    if meshed || pod.starts_with("plain-") {
        pod.to_string()
    } else {
        format!("plain-{pod}")
    }
}

impl Bench {
    pub(super) fn progress(&mut self, what: &str) {
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
    pub(super) fn in_pod(&self, pod: &str, meshed: bool, program: &str) -> anyhow::Result<Command> {
        let pod = pod_for(pod, meshed);
        let mut c = if meshed {
            self.lab.exec(&pod, "taskset")?
        } else {
            self.lab.exec_unmeshed(&pod, "taskset")?
        };
        c.args(["-c", &cpu_of_pod(&pod).to_string(), program]);
        Ok(c)
    }

    /// Starts both agents on their node's CPU (`taskset` before exec), as
    /// a CPU limit of one would confine them: each then sizes its runtime
    /// to that one CPU (one worker), as it would in such a pod.
    pub(super) fn start_pinned_agents(&self) -> anyhow::Result<()> {
        for (node, cpu) in NODES {
            self.lab
                .start_agent_wrapped(node, &["taskset", "-c", &cpu.to_string()])
                .with_context(|| format!("starting the agent of {node} on CPU {cpu}"))?;
        }
        Ok(())
    }

    /// A round opens ~15,000 connections per path from the load pod, and a
    /// meshed path's connects all go to the same agent address (15001), so
    /// the next path's client found the ephemeral ports still in TIME-WAIT
    /// (60 s) and its connection rate collapsed (508 to 1,404 conn/s, 0.20x,
    /// whichever transport ran second). In the load pod's own network
    /// namespace only, as a busy client host would be tuned: the whole
    /// ephemeral range, and TIME-WAIT reuse for outgoing connects (safe with
    /// TCP timestamps, on by default). `assert_ports_left` checks it held.
    pub(super) fn widen_client_ports(&self) -> anyhow::Result<()> {
        for client in ["load", "plain-load"] {
            let netns = self.lab.pod(client)?.netns.clone();
            for setting in ["net.ipv4.ip_local_port_range=1024 65535", "net.ipv4.tcp_tw_reuse=1"] {
                let status = crate::lab::in_netns(&netns, "sysctl")
                    .args(["-q", "-w", setting])
                    .status()?;
                ensure!(status.success(), "sysctl -w {setting} in {netns} failed");
            }
        }
        Ok(())
    }

    /// Fails when a connection-rate figure could be the port search's, not
    /// the path's: a TIME-WAIT socket can be reused for a new connect to the
    /// same destination once it is a second old (tcp_tw_reuse), so what can
    /// exhaust the ephemeral range is sockets younger than that, toward one
    /// destination. None may hold over half of the range.
    pub(super) fn assert_ports_left(&self, tag: &str) -> anyhow::Result<()> {
        for client in ["load", "plain-load"] {
            self.assert_ports_left_in(client, tag)?;
        }
        Ok(())
    }

    fn assert_ports_left_in(&self, client: &str, tag: &str) -> anyhow::Result<()> {
        let netns = self.lab.pod(client)?.netns.clone();
        let out = crate::lab::in_netns(&netns, "ss")
            .args(["-Htano", "state", "time-wait"])
            .output()?;
        let mut young: BTreeMap<String, usize> = BTreeMap::new();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // Recv-Q Send-Q Local Peer timer:(timewait,59sec,0): 59 s left of 60.
            let (Some(peer), Some(timer)) = (fields.get(3), fields.iter().find(|f| f.starts_with("timer:"))) else {
                continue;
            };
            let left_s: f64 = timer
                .trim_start_matches("timer:(timewait,")
                .split(',')
                .next()
                .and_then(|t| t.strip_suffix("sec").or_else(|| t.strip_suffix("ms").map(|_| "0")))
                .and_then(|t| t.parse().ok())
                .unwrap_or(0.0);
            if left_s >= 59.0 {
                *young.entry(peer.to_string()).or_default() += 1;
            }
        }
        const RANGE: usize = 65535 - 1024;
        if let Some((peer, n)) = young.iter().max_by_key(|(_, n)| **n) {
            ensure!(
                *n < RANGE / 2,
                "{tag}: {n} client sockets toward {peer} in TIME-WAIT for under a second, over half of the {RANGE} ephemeral ports: the connection-rate figures would measure port exhaustion"
            );
        }
        Ok(())
    }

    /// Two Services on the far pod's nginx: one plain (L4, through the
    /// tunnel as bytes), one with an HTTPRoute (the L7 path).
    pub(super) fn write_http_services(&self) -> anyhow::Result<()> {
        let far = self.lab.pod("far")?.ip;
        let svc = |name: &str, vip: &str| {
            format!(
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: bench}}\n\
                 spec:\n  clusterIP: {vip}\n  ports: [{{name: http, port: 80, targetPort: {HTTP_PORT}}}]\n---\n\
                 apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv4\n\
                 metadata: {{name: {name}-1, namespace: bench, labels: {{kubernetes.io/service-name: {name}}}}}\n\
                 ports: [{{name: http, port: {HTTP_PORT}}}]\nendpoints: [{{addresses: [{far}]}}]\n"
            )
        };
        let route = "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: web-l7, namespace: bench}\n\
                     spec:\n  parentRefs: [{group: \"\", kind: Service, name: web-l7, port: 80}]\n  \
                     rules: [{backendRefs: [{name: web-l7, port: 80}]}]\n";
        let text = format!(
            "# Written by cargo xtask bench.\n{}{}{route}",
            svc("web-l4", L4_VIP),
            svc("web-l7", L7_VIP)
        );
        fs::write(self.lab.source_dir.join("http-services.yaml"), text)?;
        Ok(())
    }

    pub(super) fn start_servers(&mut self) -> anyhow::Result<()> {
        // nginx answering 1 KiB on every keep-alive request, for the L7 figures.
        let conf = self.opts.out_dir.join("nginx.conf");
        fs::write(
            &conf,
            format!(
                "daemon off; worker_processes 1; pid {0}/nginx.pid; error_log stderr;\n\
                 events {{ worker_connections 1024; }}\n\
                 http {{ access_log off; client_body_temp_path {0}; keepalive_requests 10000000; keepalive_timeout 600s;\n\
                   server {{ listen {HTTP_PORT}; location / {{ return 200 \"{1}\"; }} }} }}\n",
                self.opts.out_dir.canonicalize()?.display(),
                "x".repeat(1024)
            ),
        )?;
        let nginx = self
            .in_pod("far", true, "nginx")?
            .args(["-e", "stderr", "-c"])
            .arg(conf.canonicalize()?)
            .stdin(Stdio::null())
            .spawn()?;
        self.servers.push(nginx);
        crate::probe::wait_listening(&self.lab.pod("far")?.netns, HTTP_PORT)?;
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
                let netns = self.lab.pod(&pod_for(pod, meshed))?.netns.clone();
                for p in [port(IPERF_PORT), port(ECHO_PORT)] {
                    crate::probe::wait_listening(&netns, p)?;
                }
            }
        }
        Ok(())
    }

    /// Restarts both agents with the path's transport when it differs.
    pub(super) fn use_transport(&mut self, path: Route) -> anyhow::Result<()> {
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
        }
        self.start_pinned_agents()?;
        self.transport = want;
        // Measure once a round trip crosses the restarted pair, so a path
        // never starts while its agents are still enrolling pods and
        // fetching certificates (they fail closed meanwhile).
        let to = self.target(path, ECHO_PORT)?;
        let tool = self.benchtool.to_string_lossy().to_string();
        let started = Instant::now();
        for attempt in 1.. {
            let rr = self.json_of(
                self.in_pod("load", true, &tool)?.args([
                    "rr",
                    "--to",
                    &to,
                    "--rate",
                    "20",
                    "--secs",
                    "0.1",
                    "--new-conn",
                ]),
                "benchtool rr (warm-up)",
            )?;
            if num(&rr, "errors")? == 0.0 && num(&rr, "requests")? > 0.0 {
                if attempt > 1 {
                    eprintln!(
                        "bench: {} carried its first round trips {:.1} s after the agents restarted",
                        path.name(),
                        started.elapsed().as_secs_f64()
                    );
                }
                break;
            }
            ensure!(
                started.elapsed() < Duration::from_secs(15),
                "{}: no round trip through the restarted agents within 15 s: {rr}",
                path.name()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    pub(super) fn agent_pids(&self) -> anyhow::Result<Vec<(String, u32)>> {
        NODES
            .iter()
            .map(|(n, _)| {
                let pid = self.lab.agent_pid(n).with_context(|| format!("agent on {n} died"))?;
                Ok((n.to_string(), pid))
            })
            .collect()
    }

    /// Sum of both agents' user+system CPU seconds.
    pub(super) fn agents_cpu(&self) -> anyhow::Result<f64> {
        let mut total = 0.0;
        for (_, pid) in self.agent_pids()? {
            total += cpu_seconds(pid)?;
        }
        Ok(total)
    }

    /// A /proc/PID/status figure (VmRSS, VmHWM) per node, in KiB.
    pub(super) fn agents_rss_kib(&self, field: &str) -> anyhow::Result<BTreeMap<String, u64>> {
        self.agent_pids()?
            .into_iter()
            .map(|(n, pid)| Ok((n, status_kib(pid, field)?)))
            .collect()
    }

    pub(super) fn record_peak_rss(&mut self) -> anyhow::Result<()> {
        for (node, kib) in self.agents_rss_kib("VmHWM")? {
            let peak = self.peak_rss_kib.entry(node).or_default();
            *peak = (*peak).max(kib);
        }
        Ok(())
    }

    pub(super) fn json_of(&self, cmd: &mut Command, what: &str) -> anyhow::Result<Value> {
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

    pub(super) fn target(&self, path: Route, base: u16) -> anyhow::Result<String> {
        Ok(format!("{}:{}", self.lab.pod(path.server())?.ip, path.port(base)))
    }
}
