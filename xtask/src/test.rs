//! `cargo xtask test`: unit tests, then the end-to-end tests in the lab.
use std::process::Command;

use anyhow::ensure;

pub fn run() -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = crate::workspace_root();
    eprintln!("\n=== [1/3] unit tests (mesh-common, mesh-agent, xtask)");
    let status = Command::new(&cargo)
        .current_dir(&root)
        .args(["test", "-p", "mesh-common", "-p", "mesh-agent", "-p", "xtask"])
        .status()?;
    ensure!(status.success(), "unit tests failed");

    eprintln!("\n=== [2/3] building the agent and labtool");
    let agent = crate::build_agent(false)?;
    crate::demo::build_labtool()?;

    eprintln!("\n=== [3/3] end-to-end tests in the lab (root, one at a time)");
    // SAFETY: geteuid has no preconditions.
    ensure!(unsafe { libc::geteuid() } == 0, "the end-to-end tests need root: they build a lab of network namespaces and load eBPF");
    let status = Command::new(&cargo)
        .current_dir(&root)
        .env("MESH_AGENT_BIN", &agent)
        .args(["test", "-p", "mesh-tests", "--", "--test-threads=1"])
        .status()?;
    let _ = crate::lab::down();
    ensure!(status.success(), "end-to-end tests failed");
    Ok(())
}
