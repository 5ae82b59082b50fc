//! Developer and CI tasks, as a library so the end-to-end tests drive the
//! same lab code as `cargo xtask lab`.
pub mod bench;
pub mod demo;
pub mod lab;
pub mod probe;
pub mod test;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, ensure};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Builds the agent (which builds the eBPF object) and returns its path.
pub fn build_agent(release: bool) -> anyhow::Result<PathBuf> {
    let root = workspace_root();
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(&root).args(["build", "--package", "mesh-agent"]);
    if release {
        cmd.arg("--release");
    }
    eprintln!("xtask: building mesh-agent{}", if release { " (release)" } else { "" });
    run_cargo(&mut cmd, "building mesh-agent")?;
    Ok(target_dir()
        .join(if release { "release" } else { "debug" })
        .join("mesh-agent"))
}

/// Runs a cargo build, streaming its stderr; on failure the error carries
/// the compiler's last lines, so a test that builds (and captures only its
/// own output) still shows why the build failed.
pub fn run_cargo(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    use std::io::{BufRead as _, BufReader};
    const KEEP: usize = 40;
    let mut child = cmd
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("{what}: running cargo"))?;
    let stderr = child.stderr.take().expect("piped");
    let mut tail = std::collections::VecDeque::with_capacity(KEEP);
    for line in BufReader::new(stderr).lines() {
        let line = line.unwrap_or_default();
        eprintln!("{line}");
        if tail.len() == KEEP {
            tail.pop_front();
        }
        tail.push_back(line);
    }
    let status = child.wait().with_context(|| format!("{what}: waiting for cargo"))?;
    ensure!(
        status.success(),
        "{what} failed ({status}); cargo's last lines:\n{}",
        Vec::from(tail).join("\n")
    );
    Ok(())
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}
