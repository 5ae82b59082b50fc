//! `--profile`: both agents sampled by `perf record` during round 1's
//! cross-node throughput and connection-rate runs, written as flame graphs
//! (the inferno crate: perf's stacks collapsed, then drawn as SVG).
use super::*;

/// A `perf record` running on both agents; `finish` stops it and draws.
pub(super) struct Recording {
    child: Child,
    data: PathBuf,
    svg: PathBuf,
    title: String,
}

impl Bench {
    /// Starts sampling both agents when `--profile` is on (round 1 only).
    pub(super) fn start_profile(&self, round: usize, path: Route, phase: &str) -> anyhow::Result<Option<Recording>> {
        if !self.opts.profile || round != 0 || !matches!(path, Quic | Tcp) {
            return Ok(None);
        }
        let pids: Vec<String> = self.agent_pids()?.into_iter().map(|(_, p)| p.to_string()).collect();
        let name = format!("profile-{}-{phase}", path.key());
        let data = self.opts.out_dir.join(format!("{name}.perf.data"));
        let child = Command::new("perf")
            .args(["record", "--quiet", "-g", "-F", "999", "-p", &pids.join(","), "-o"])
            .arg(&data)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("running perf record for --profile (install Debian's linux-perf)")?;
        // perf attaches before the run starts.
        std::thread::sleep(Duration::from_millis(300));
        Ok(Some(Recording {
            child,
            data,
            svg: self.opts.out_dir.join(format!("{name}.svg")),
            title: format!("both agents, {}: {phase}", path.name()),
        }))
    }
}

impl Recording {
    /// Stops perf (SIGINT: it writes its file and exits) and writes the SVG.
    pub(super) fn finish(mut self) -> anyhow::Result<PathBuf> {
        // SAFETY: a signal to our own child.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGINT);
        }
        self.child.wait()?;
        let script = Command::new("perf")
            .args(["script", "-i"])
            .arg(&self.data)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .context("running perf script")?;
        ensure!(
            script.status.success() && !script.stdout.is_empty(),
            "perf script gave no samples for {}",
            self.data.display()
        );
        let mut folded = Vec::new();
        inferno::collapse::Collapse::collapse(
            &mut inferno::collapse::perf::Folder::default(),
            &script.stdout[..],
            &mut folded,
        )?;
        let mut opts = inferno::flamegraph::Options::default();
        opts.title = self.title.clone();
        let svg = fs::File::create(&self.svg)?;
        inferno::flamegraph::from_reader(&mut opts, &folded[..], svg)
            .with_context(|| format!("drawing {}", self.svg.display()))?;
        let _ = fs::remove_file(&self.data);
        Ok(self.svg)
    }
}
