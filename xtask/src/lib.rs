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
    let status = cmd.status().context("running cargo build")?;
    ensure!(status.success(), "building mesh-agent failed");
    Ok(target_dir()
        .join(if release { "release" } else { "debug" })
        .join("mesh-agent"))
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}
