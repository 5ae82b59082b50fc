//! `mesh-agent uninstall`: removes every pin, which detaches the programs.
use std::{
    path::Path,
    process::ExitCode,
    time::{Duration, Instant},
};

use crate::redirect;

pub fn run(bpffs_dir: &Path, force: bool) -> ExitCode {
    // An agent that just stopped leaves a heartbeat a few seconds fresh:
    // give it that long to go stale before refusing.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !force && redirect::agent_alive(bpffs_dir) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    if redirect::agent_alive(bpffs_dir) && !force {
        eprintln!(
            "mesh-agent uninstall: an agent is running on this node (its heartbeat in {} is current): stop it first (delete the DaemonSet, or stop the service), or pass --force",
            bpffs_dir.display()
        );
        return ExitCode::FAILURE;
    }
    match redirect::remove_pins(bpffs_dir) {
        Ok(removed) if removed.is_empty() => {
            println!(
                "nothing pinned in {}: the mesh is not installed here",
                bpffs_dir.display()
            );
            ExitCode::SUCCESS
        }
        Ok(removed) => {
            println!(
                "removed {} pins from {} ({}): programs detached, maps freed; pods' traffic now flows unmeshed",
                removed.len(),
                bpffs_dir.display(),
                removed.join(", ")
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "mesh-agent uninstall: removing pins in {}: {e} (run as root; is bpffs mounted?)",
                bpffs_dir.display()
            );
            ExitCode::FAILURE
        }
    }
}
