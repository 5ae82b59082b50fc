//! Tearing down whatever any lab made, also after a crash.
use super::*;

/// Removes everything any lab made: processes, network namespaces (and the
/// veths inside them), cgroups, pins, state. Safe to run any number of times.
pub fn down() -> anyhow::Result<()> {
    let mut problems = Vec::new();
    // 1. Processes: every process in the lab cgroup tree (agents, pod
    //    workloads), then anything still inside a lab netns.
    if let Ok(cg) = lab_cgroup()
        && cg.exists()
    {
        let _ = fs::write(cg.join("cgroup.kill"), "1");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cgroup_pids(&cg).is_empty() && Instant::now() < deadline {
            for pid in cgroup_pids(&cg) {
                signal(pid, libc::SIGKILL);
                reap(pid);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let namespaces = lab_netns();
    for ns in &namespaces {
        if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
            for pid in String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
            {
                signal(pid, libc::SIGKILL);
                reap(pid);
            }
        }
    }
    // 2. Namespaces; their veths and bridges go with them.
    for ns in &namespaces {
        if let Err(e) = ip(&["netns", "del", ns]) {
            problems.push(e.to_string());
        }
    }
    // 3. cgroups, deepest first (rmdir only removes empty ones).
    if let Ok(cg) = lab_cgroup()
        && cg.exists()
    {
        let mut dirs = Vec::new();
        collect_dirs(&cg, &mut dirs);
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for d in dirs {
            let mut tries = 0;
            while let Err(e) = fs::remove_dir(&d) {
                tries += 1;
                if tries > 100 {
                    problems.push(format!("rmdir {}: {e}", d.display()));
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    // 4. Pins (removing a link's last pin detaches it), then state.
    if Path::new(BPFFS_DIR).exists()
        && let Err(e) = fs::remove_dir_all(BPFFS_DIR)
    {
        problems.push(format!("removing {BPFFS_DIR}: {e}"));
    }
    let _ = fs::remove_dir_all(STATE_DIR);
    ensure!(
        problems.is_empty(),
        "lab down left something behind:\n{}",
        problems.join("\n")
    );
    Ok(())
}

pub fn lab_netns() -> Vec<String> {
    fs::read_dir("/run/netns")
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with(PREFIX))
                .collect()
        })
        .unwrap_or_default()
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                collect_dirs(&e.path(), out);
            }
        }
    }
}

fn cgroup_pids(dir: &Path) -> Vec<u32> {
    let mut dirs = Vec::new();
    collect_dirs(dir, &mut dirs);
    dirs.iter()
        .filter_map(|d| fs::read_to_string(d.join("cgroup.procs")).ok())
        .flat_map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect::<Vec<u32>>())
        .collect()
}
