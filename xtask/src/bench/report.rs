//! The report: table on stdout, JSON with every sample, a gnuplot chart.
use super::*;

pub(super) struct Report {
    pub(super) samples: BTreeMap<&'static str, Samples>,
    /// `l4` and `l7`: HTTP GETs through a Service without and with an HTTPRoute.
    pub(super) l7: BTreeMap<&'static str, Samples>,
    /// `x25519` and `x25519mlkem768`: one tunnel handshake's CPU (p50 per round).
    pub(super) handshakes: Samples,
    pub(super) rss_idle: BTreeMap<String, u64>,
    pub(super) rss_held: BTreeMap<String, u64>,
    pub(super) rss_peak: BTreeMap<String, u64>,
    pub(super) policy_ms: BTreeMap<&'static str, Vec<f64>>,
    pub(super) opts: BenchOptions,
    pub(super) took: Duration,
}

impl Report {
    pub(super) fn figure(&self, path: Route, key: &str) -> Option<(f64, f64, f64)> {
        let v = self.samples.get(path.key())?.get(key)?;
        (!v.is_empty()).then(|| spread(v))
    }

    /// The path's median over its baseline's median.
    pub(super) fn ratio(&self, path: Route, key: &str) -> Option<f64> {
        if !FIGURES.iter().any(|f| f.key == key && f.ratio) {
            return None;
        }
        let (_, m, _) = self.figure(path, key)?;
        let (_, b, _) = self.figure(path.baseline()?, key)?;
        (b != 0.0).then_some(m / b)
    }

    /// L7 against L4 for one percentile: (L4 median, L7 median, added).
    pub(super) fn l7_added(&self, key: &str) -> Option<(f64, f64, f64)> {
        let (_, l4, _) = spread(self.l7.get("l4")?.get(key)?);
        let (_, l7, _) = spread(self.l7.get("l7")?.get(key)?);
        Some((l4, l7, l7 - l4))
    }

    pub(super) fn json(&self) -> Value {
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
        let l7_vs_l4: serde_json::Map<_, _> = ["rr_p50_us", "rr_p90_us", "rr_p99_us"]
            .iter()
            .filter_map(|k| {
                let (l4, l7, added) = self.l7_added(k)?;
                Some((
                    k.to_string(),
                    json!({"l4_median_us": l4, "l7_median_us": l7, "added_us": added,
                        "l4_samples": self.l7["l4"][k], "l7_samples": self.l7["l7"][k]}),
                ))
            })
            .collect();
        let handshakes: serde_json::Map<_, _> = self
            .handshakes
            .iter()
            .map(|(k, v)| {
                let (min, median, max) = spread(v);
                (
                    k.to_string(),
                    json!({"min_us": min, "median_us": median, "max_us": max, "samples": v}),
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
            "l7_vs_l4": l7_vs_l4,
            "tunnel_handshake_cpu_us": handshakes,
        })
    }

    pub(super) fn table(&self) -> String {
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
        let _ = writeln!(
            t,
            "\nL7 path against L4 path: HTTP/1.1 GET, 1 KiB answers from nginx, {RR_RATE}/s persistent, cross node ({}) (us)",
            DEFAULT.short()
        );
        for (key, label) in [("rr_p50_us", "p50"), ("rr_p90_us", "p90"), ("rr_p99_us", "p99")] {
            if let Some((l4, l7, added)) = self.l7_added(key) {
                let _ = writeln!(t, "  {label}: L4 {} L7 {} added {}", fmt(l4), fmt(l7), fmt(added));
            }
        }
        if let (Some(classic), Some(pq)) = (self.handshakes.get("x25519"), self.handshakes.get("x25519mlkem768")) {
            let ((_, c, _), (_, q, _)) = (spread(classic), spread(pq));
            let _ = writeln!(
                t,
                "\ntunnel handshake (mutual TLS 1.3, the agents' config, both ends on one core; once per tunnel connection, not per pod connection) (us)\n  \
                 X25519 {} X25519MLKEM768 {} added {} ({:.2}x)",
                fmt(c),
                fmt(q),
                fmt(q - c),
                q / c
            );
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
    pub(super) fn chart(&self, dir: &Path) -> anyhow::Result<PathBuf> {
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

pub(super) fn fmt(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.4}")
    }
}

pub(super) fn machine() -> Value {
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
