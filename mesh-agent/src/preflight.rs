//! Checks that run before anything is attached, so a node that cannot run
//! the mesh is told in one line what to fix, and nothing is half-attached.
use std::path::{Path, PathBuf};

use nix::sys::statfs::{BPF_FS_MAGIC, CGROUP2_SUPER_MAGIC, statfs};

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error(
        "mesh-agent must run as root (it needs CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN to load and attach eBPF programs)"
    )]
    NotRoot,
    #[error(
        "the kernel has no BTF (/sys/kernel/btf/vmlinux is missing): use a kernel built with CONFIG_DEBUG_INFO_BTF=y (>= 6.6)"
    )]
    NoBtf,
    #[error("{0} is not on a bpffs and mounting one failed ({1}): mount it with `mount -t bpf bpf /sys/fs/bpf`")]
    NoBpffs(PathBuf, nix::Error),
    #[error(
        "pod cgroup root {0} does not exist: check --pod-cgroup-root (a cgroup2 directory with one sub-directory per pod)"
    )]
    NoPodCgroup(PathBuf),
    #[error(
        "pod cgroup root {0} is not on cgroup2: mount cgroup2 (e.g. at /sys/fs/cgroup or /sys/fs/cgroup/unified) and point --pod-cgroup-root into it"
    )]
    NotCgroup2(PathBuf),
}

pub fn check(bpffs_dir: &Path, pod_cgroup_root: &Path) -> Result<(), PreflightError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(PreflightError::NotRoot);
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err(PreflightError::NoBtf);
    }
    ensure_bpffs(bpffs_dir)?;
    match statfs(pod_cgroup_root) {
        Err(_) => return Err(PreflightError::NoPodCgroup(pod_cgroup_root.into())),
        Ok(fs) if fs.filesystem_type() != CGROUP2_SUPER_MAGIC => {
            return Err(PreflightError::NotCgroup2(pod_cgroup_root.into()));
        }
        Ok(_) => {}
    }
    Ok(())
}

/// Mount bpffs at /sys/fs/bpf when it is not mounted (ARCHITECTURE.md, "Kernel maps").
fn ensure_bpffs(bpffs_dir: &Path) -> Result<(), PreflightError> {
    let mount_point = Path::new("/sys/fs/bpf");
    let is_bpffs = |p: &Path| {
        statfs(p)
            .map(|fs| fs.filesystem_type() == BPF_FS_MAGIC)
            .unwrap_or(false)
    };
    if !is_bpffs(mount_point) {
        nix::mount::mount(
            Some("bpf"),
            mount_point,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| PreflightError::NoBpffs(mount_point.into(), e))?;
        tracing::info!("mounted bpffs at /sys/fs/bpf");
    }
    std::fs::create_dir_all(bpffs_dir).ok();
    if !is_bpffs(bpffs_dir) {
        return Err(PreflightError::NoBpffs(bpffs_dir.into(), nix::Error::EINVAL));
    }
    Ok(())
}

/// The process limits a node agent needs (open files for its flows; memlock
/// for BPF maps on kernels that still charge it).
pub fn raise_limits() {
    raise_memlock_limit();
    raise_open_files_limit();
}

/// Every carried flow holds sockets; the default soft limit of 1,024 open
/// files is reached with a few hundred flows (each accepted downstream and
/// each upstream to a pod is a descriptor). Raise the soft limit to the hard one.
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(error = %e, soft, hard, "could not raise the open-files limit; expect EMFILE under load");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not read the open-files limit"),
    }
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
