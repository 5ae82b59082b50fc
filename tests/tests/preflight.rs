//! The agent refuses to start on a node that cannot run it, with one line
//! saying what to fix, and attaches nothing. No lab needed.
use std::{path::PathBuf, process::Command};

fn agent_bin() -> PathBuf {
    std::env::var_os("MESH_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| xtask::probe::built_binary("mesh-agent"))
}

/// Runs `mesh-agent run` (optionally through a wrapper such as setpriv) with
/// settings that pass validation, plus `extra`.
fn run_agent_via(wrapper: &[&str], agent: &std::path::Path, extra: &[&str]) -> (bool, String) {
    let mut cmd = Command::new(wrapper.first().map_or(agent.as_os_str(), |w| w.as_ref()));
    if !wrapper.is_empty() {
        cmd.args(&wrapper[1..]).arg(agent);
    }
    let out = cmd
        .args(["run", "--node-name", "n1", "--source-dir", "/nonexistent"])
        .args(["--capture-ip", "198.18.99.1", "--log-format", "text"])
        .args(["--bpffs-dir", "/sys/fs/bpf/mesh-preflight-test"])
        .args(extra)
        .output()
        .expect("run agent");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).to_string())
}

fn run_agent(extra: &[&str]) -> (bool, String) {
    run_agent_via(&[], &agent_bin(), extra)
}

#[test]
fn without_root_the_agent_says_so_and_stops() {
    // A copy nobody can execute wherever the checkout lives.
    let dir = std::env::temp_dir().join(format!("mesh-preflight-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join("mesh-agent");
    std::fs::copy(agent_bin(), &copy).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    let nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"];
    let (ok, err) = run_agent_via(&nobody, &copy, &["--pod-cgroup-root", "/sys/fs/cgroup"]);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!ok);
    assert!(err.contains("must run as root"), "{err}");
}

#[test]
fn a_missing_pod_cgroup_is_named_with_the_flag_to_fix() {
    let (ok, err) = run_agent(&["--pod-cgroup-root", "/sys/fs/cgroup/unified/no-such-pods"]);
    assert!(!ok);
    assert!(
        err.contains("no-such-pods") && err.contains("--pod-cgroup-root"),
        "{err}"
    );
    let _ = std::fs::remove_dir("/sys/fs/bpf/mesh-preflight-test");
}

#[test]
fn a_cgroup_v1_directory_is_refused() {
    let (ok, err) = run_agent(&["--pod-cgroup-root", "/tmp"]);
    assert!(!ok);
    assert!(err.contains("not on cgroup2"), "{err}");
    let _ = std::fs::remove_dir("/sys/fs/bpf/mesh-preflight-test");
}

#[test]
fn bad_flags_are_refused_before_anything_happens() {
    let (ok, err) = run_agent(&["--pod-cgroup-root", "/sys/fs/cgroup", "--outbound-port", "0"]);
    assert!(!ok);
    assert!(err.contains("--outbound-port"), "{err}");
}
