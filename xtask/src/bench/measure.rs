//! The measurements of one path in one round, and the helpers that read them.
use super::*;

impl Bench {
    pub(super) fn measure(&mut self, path: Route, round: usize, s: &mut Samples) -> anyhow::Result<()> {
        let tag = format!("round {}/{} {}", round + 1, self.opts.rounds, path.name());
        let tool = self.benchtool.to_string_lossy().to_string();

        self.progress(&format!("{tag}: iperf3 {} s", self.opts.throughput_secs));
        let (server_ip, port) = (self.lab.pod(path.server())?.ip, path.port(IPERF_PORT));
        let cpu0 = self.agents_cpu()?;
        let recording = self.start_profile(round, path, "throughput")?;
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
        self.flame_graph(recording)?;
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
        let recording = self.start_profile(round, path, "conn-rate")?;
        let cr = self.json_of(
            self.in_pod("load", path.meshed(), &tool)?
                .args(["conn-rate", "--to", &to, "--secs", &short]),
            "benchtool conn-rate",
        )?;
        self.flame_graph(recording)?;
        ensure!(
            num(&cr, "errors")? == 0.0,
            "{tag}: connection-rate run had errors: {cr}"
        );
        self.assert_ports_left(&tag)?;
        push(s, "conn_per_sec", num(&cr, "per_sec")?);
        Ok(())
    }

    fn flame_graph(&self, recording: Option<profile::Recording>) -> anyhow::Result<()> {
        if let Some(r) = recording {
            let svg = r.finish()?;
            eprintln!("bench: flame graph {}", svg.display());
        }
        Ok(())
    }

    /// The L7 path against the L4 path in one round: HTTP GETs at
    /// RR_RATE to nginx on the far node, by the Service without a route
    /// and by the one with an HTTPRoute (default transport).
    pub(super) fn measure_l7(&mut self, round: usize, s: &mut BTreeMap<&'static str, Samples>) -> anyhow::Result<()> {
        self.use_transport(DEFAULT)?;
        for (key, vip) in [("l4", L4_VIP), ("l7", L7_VIP)] {
            self.progress(&format!(
                "round {}/{} HTTP GETs by the {} path",
                round + 1,
                self.opts.rounds,
                key.to_uppercase()
            ));
            let (rate, secs) = (RR_RATE.to_string(), self.opts.short_secs.to_string());
            let mut cmd = self.in_pod("load", true, &self.benchtool.to_string_lossy())?;
            cmd.args(["rr", "--to", &format!("{vip}:80"), "--rate", &rate, "--secs", &secs])
                .args(["--http-host", vip]);
            let served_before = self.l7_requests_served()?;
            let rr = self.json_of(&mut cmd, "benchtool rr --http-host")?;
            ensure!(num(&rr, "errors")? == 0.0, "{key} HTTP run had errors: {rr}");
            // The L7 run really took the L7 path, and the L4 run did not.
            let served = self.l7_requests_served()? - served_before;
            let want = if key == "l7" { num(&rr, "requests")? } else { 0.0 };
            ensure!(
                served == want,
                "{key} HTTP run: node-a's L7 path served {served} requests, not {want}"
            );
            let samples = s.entry(key).or_default();
            for k in ["rr_p50_us", "rr_p90_us", "rr_p99_us"] {
                push(samples, k, num(&rr, &k[3..])?);
            }
        }
        Ok(())
    }

    /// The CPU of one tunnel handshake with and without the post-quantum
    /// key exchange (`benchtool handshakes`: the agents' TLS settings, both
    /// ends in one process on CPU 0); checks each agreed the group asked for.
    pub(super) fn measure_handshakes(&mut self, round: usize, s: &mut Samples) -> anyhow::Result<()> {
        self.progress(&format!(
            "round {}/{} tunnel handshakes, X25519 and X25519MLKEM768",
            round + 1,
            self.opts.rounds
        ));
        let mut cmd = Command::new("taskset");
        cmd.args(["-c", "0"])
            .arg(&self.benchtool)
            .args(["handshakes", "--count", "300"]);
        let hs = self.json_of(&mut cmd, "benchtool handshakes")?;
        for (key, group) in [("x25519", "X25519"), ("x25519mlkem768", "X25519MLKEM768")] {
            ensure!(
                hs[key]["group"] == group,
                "the {key} handshakes agreed on {} instead of {group}",
                hs[key]["group"]
            );
            push(s, key, num(&hs[key], "p50_us")?);
        }
        Ok(())
    }

    /// Requests node-a's agent served on its L7 path for web-l7
    /// (`mesh_http_requests_total`).
    fn l7_requests_served(&self) -> anyhow::Result<f64> {
        let addr = format!("http://{}:15020/metrics", self.lab.node("node-a")?.fabric_ip);
        let out = self
            .lab
            .node_exec("node-a", "curl")?
            .args(["-sf", "--max-time", "5", &addr])
            .output()?;
        ensure!(out.status.success(), "cannot read node-a's metrics at {addr}");
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("mesh_http_requests_total{") && l.contains("service=\"bench/web-l7:80\""))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum())
    }

    /// One `benchtool rr` run from the load pod: 1 KiB at RR_RATE for
    /// short_secs, persistent or a new connection per request; no errors.
    pub(super) fn request_response(&self, path: Route, to: &str, new_conn: bool, tag: &str) -> anyhow::Result<Value> {
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
    pub(super) fn hold_connections(&mut self) -> anyhow::Result<BTreeMap<String, u64>> {
        let n = self.opts.hold;
        self.progress(&format!("holding {n} idle captured connections ({})", DEFAULT.short()));
        let to = self.target(DEFAULT, ECHO_PORT)?;
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
    pub(super) fn policy_latency(&mut self) -> anyhow::Result<BTreeMap<&'static str, Vec<f64>>> {
        let file = self.lab.source_dir.join("bench.yaml");
        let to = self.target(DEFAULT, ECHO_PORT)?;
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

pub(super) fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    fs::File::create(&tmp)?.write_all(text.as_bytes())?;
    fs::rename(&tmp, path)?;
    Ok(())
}

pub(super) fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_micros() as u64
}

pub(super) fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
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

pub(super) fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

pub(super) fn push(s: &mut Samples, key: &'static str, v: f64) {
    s.entry(key).or_default().push(v);
}

pub(super) fn num(v: &Value, key: &str) -> anyhow::Result<f64> {
    v[key].as_f64().with_context(|| format!("no number {key:?} in {v}"))
}

/// min, median, max.
pub(super) fn spread(v: &[f64]) -> (f64, f64, f64) {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let med = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    (v[0], med, v[v.len() - 1])
}
