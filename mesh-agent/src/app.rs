//! Wires the agent together: preflight, kernel programs, the workload source,
//! map sync, and the outbound listener.
use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::signal::unix::SignalKind;

use crate::{
    config::Settings,
    preflight,
    redirect::{Redirect, RedirectOptions},
    source, state,
    tunnel::outbound,
};

pub async fn run(s: Settings) -> anyhow::Result<()> {
    preflight::check(&s.bpffs_dir, &s.pod_cgroup_root)?;
    raise_memlock_limit();
    let agent_cgroup = preflight::own_cgroup().context("finding the agent's own cgroup (is cgroup2 mounted?)")?;

    // Listen before capture starts, so no captured connect finds it closed.
    let listener = outbound::bind(s.capture_ip, s.outbound_port).await?;

    let mut redirect = Redirect::load(&RedirectOptions {
        bpffs_dir: &s.bpffs_dir,
        pod_cgroup_root: &s.pod_cgroup_root,
        agent_cgroup: &agent_cgroup,
        capture_ip: s.capture_ip,
        outbound_port: s.outbound_port,
        fail_open: s.fail_open,
        kernel_debug: s.kernel_debug,
        splice: s.splice,
    })?;
    if let Some(logger) = redirect.kernel_logger.take() {
        forward_kernel_logs(logger);
    }
    let redirect = Arc::new(redirect);

    let (tx, rx) = state::channel();
    match source::file::load(&s.source_dir) {
        Ok(mut snap) => {
            snap.generation = 1;
            let _ = tx.send(Arc::new(snap));
        }
        // The pinned maps from the previous agent stay in force until the
        // source reads cleanly.
        Err(err) => tracing::error!(error = %err, "source: initial read failed; keeping the kernel's current state"),
    }
    tokio::spawn(source::file::watch(s.source_dir.clone(), tx));
    tokio::spawn(sync_loop(
        redirect.clone(),
        rx.clone(),
        s.node_name.clone(),
        s.pod_cgroup_root.clone(),
    ));
    tokio::spawn(heartbeat(redirect.clone()));

    tracing::info!(
        node = %s.node_name,
        outbound = %format!("{}:{}", s.capture_ip, s.outbound_port),
        pod_cgroup_root = %s.pod_cgroup_root.display(),
        agent_cgroup = %agent_cgroup.display(),
        bpffs = %s.bpffs_dir.display(),
        fail_open = s.fail_open,
        splice = s.splice,
        "agent ready"
    );

    let mut term = tokio::signal::unix::signal(SignalKind::terminate())?;
    tokio::select! {
        () = outbound::serve(listener, redirect.clone(), rx) => {}
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; pins stay in place"),
        _ = term.recv() => tracing::info!("terminated; pins stay in place"),
    }
    Ok(())
}

/// Re-applies the latest snapshot when it changes, and every second so pods
/// whose cgroup appears after their Pod object get enrolled.
async fn sync_loop(redirect: Arc<Redirect>, mut rx: state::SnapshotRx, node: String, root: std::path::PathBuf) {
    let mut last: Option<(u64, usize, usize)> = None;
    loop {
        let snap = rx.borrow_and_update().clone();
        if snap.generation > 0 {
            match redirect.sync(&snap, &node, &root) {
                Ok(report) => {
                    let now = (snap.generation, report.enrolled, report.endpoints);
                    if last != Some(now) {
                        tracing::info!(
                            generation = snap.generation,
                            enrolled = report.enrolled,
                            endpoints = report.endpoints,
                            missing_cgroups = ?report.missing_cgroup,
                            "kernel maps in sync"
                        );
                        last = Some(now);
                    }
                }
                Err(err) => tracing::error!(error = %err, "writing kernel maps failed; will retry"),
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), rx.changed()).await;
    }
}

async fn heartbeat(redirect: Arc<Redirect>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last = None;
    let mut n = 0u64;
    loop {
        tick.tick().await;
        n += 1;
        if let Err(err) = redirect.heartbeat() {
            tracing::warn!(error = %err, "heartbeat to the kernel failed");
        }
        // The kernel's own counters, logged when they move (metrics later).
        if n % 10 == 1 {
            let (splice, capture) = (redirect.splice_stats(), redirect.capture_stats());
            let now = (splice, capture);
            if last != Some(now) {
                tracing::info!(
                    spliced_messages = splice.messages,
                    spliced_bytes = splice.bytes,
                    redirected = capture.redirected,
                    same_node = capture.same_node,
                    passthrough = capture.passthrough,
                    failed_open = capture.failed_open,
                    "kernel counters"
                );
                last = Some(now);
            }
        }
    }
}

/// Drains the kernel programs' aya-log ring buffer on its own thread, so a
/// burst of kernel debug lines never stalls the async runtime.
fn forward_kernel_logs(mut logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd as _;
    std::thread::spawn(move || {
        loop {
            let ready = {
                let mut fds = [PollFd::new(logger.as_fd(), PollFlags::POLLIN)];
                poll(&mut fds, PollTimeout::from(1000u16))
            };
            if ready.is_err() {
                return;
            }
            logger.flush();
        }
    });
}

/// Older kernels charge BPF memory to RLIMIT_MEMLOCK; this one uses memcg, and
/// root here may lack CAP_SYS_RESOURCE, so failure is only worth a debug line.
fn raise_memlock_limit() {
    use nix::sys::resource::{Resource, setrlimit};
    if let Err(e) = setrlimit(
        Resource::RLIMIT_MEMLOCK,
        nix::libc::RLIM_INFINITY,
        nix::libc::RLIM_INFINITY,
    ) {
        tracing::debug!(error = %e, "could not raise RLIMIT_MEMLOCK (harmless with memcg accounting)");
    }
}
