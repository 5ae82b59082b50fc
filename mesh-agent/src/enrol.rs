//! Which cgroup is which pod: the rows of `mesh_workloads` (this node's
//! pods, by the id of their pod-level cgroup) and `mesh_endpoints` (every
//! pod, by address), from a snapshot and the node's cgroup tree.
//!
//! The kubelet, not the mesh, lays pod cgroups out (cgroup v2), under the
//! root the agent attaches to (`--pod-cgroup-root`):
//! - systemd driver: `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid, - as _>.slice`,
//!   Guaranteed pods directly at `kubepods.slice/kubepods-pod<uid>.slice`;
//! - cgroupfs driver: `kubepods/<qos>/pod<uid>`, Guaranteed at `kubepods/pod<uid>`.
//!
//! Containers (`cri-containerd-<id>.scope`, `crio-<id>.scope`,
//! `docker-<id>.scope`, or a bare id) sit below the pod's cgroup; the kernel
//! programs attribute a process to its pod-level ancestor, so neither they
//! nor any cgroup a process makes below them needs a row. A pod is matched
//! by `metadata.uid`; hostNetwork pods share the node's network namespace
//! and are never meshed.
use std::{
    collections::BTreeMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use crate::{
    state::{PolicyMode, Store},
    tables::{EndpointRow, WorkloadRow},
};

/// How the kubelet names pod cgroups.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CgroupDriver {
    /// Decide from the root: `*.slice` is systemd, anything else cgroupfs.
    Auto,
    Systemd,
    Cgroupfs,
}

impl CgroupDriver {
    /// The driver in force for `root` (never `Auto`).
    pub fn resolve(self, root: &Path) -> CgroupDriver {
        match self {
            CgroupDriver::Auto => {
                let name = root
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                if name.ends_with(".slice") {
                    CgroupDriver::Systemd
                } else {
                    CgroupDriver::Cgroupfs
                }
            }
            other => other,
        }
    }
}

/// A pod-level cgroup found on the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodCgroup {
    pub uid: String,
    /// `Guaranteed`, `Burstable` or `BestEffort`, from where it sits.
    pub qos: &'static str,
    pub path: PathBuf,
    /// The directory's inode: on cgroup2, the id the kernel's cgroup helpers return.
    pub cgroup_id: u64,
}

const QOS_TIERS: [(&str, &str); 2] = [("burstable", "Burstable"), ("besteffort", "BestEffort")];

/// Every pod-level cgroup under the kubelet's root.
pub fn scan(root: &Path, driver: CgroupDriver) -> Vec<PodCgroup> {
    let driver = driver.resolve(root);
    let mut out = Vec::new();
    let mut tier = |dir: &Path, qos: &'static str, prefix: &str| {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let uid = match driver {
                CgroupDriver::Systemd => name
                    .strip_prefix(prefix)
                    .and_then(|n| n.strip_suffix(".slice"))
                    .map(|u| u.replace('_', "-")),
                _ => name.strip_prefix("pod").map(str::to_string),
            };
            let Some(uid) = uid.filter(|u| !u.is_empty()) else {
                continue;
            };
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                out.push(PodCgroup {
                    uid,
                    qos,
                    path: entry.path(),
                    cgroup_id: meta.ino(),
                });
            }
        }
    };
    match driver {
        CgroupDriver::Systemd => {
            tier(root, "Guaranteed", "kubepods-pod");
            for (dir, qos) in QOS_TIERS {
                tier(
                    &root.join(format!("kubepods-{dir}.slice")),
                    qos,
                    &format!("kubepods-{dir}-pod"),
                );
            }
        }
        _ => {
            tier(root, "Guaranteed", "pod");
            for (dir, qos) in QOS_TIERS {
                tier(&root.join(dir), qos, "pod");
            }
        }
    }
    out
}

/// The rows for one snapshot, and what could not be enrolled yet.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Enrolment {
    pub workloads: Vec<WorkloadRow>,
    pub endpoints: Vec<EndpointRow>,
    /// Pods of this node whose cgroup was not found (yet), as `namespace/name`.
    pub missing_cgroup: Vec<String>,
    /// Pods found in a QoS tier other than their `status.qosClass` (enrolled all the same: the UID decides).
    pub qos_mismatch: Vec<String>,
    /// The enrolled pods' addresses: the fast path finds their veths by them.
    pub pod_nets: Vec<PodNet>,
}

/// An enrolled pod, as the fast path looks for its veth (`pod_net`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodNet {
    /// `namespace/name`, for logs.
    pub pod: String,
    pub ips: Vec<std::net::IpAddr>,
}

/// Every meshed pod is an endpoint; this node's pods whose cgroup exists
/// are enrolled, each with its inbound admission (`default_policy`: the
/// policy mode when no MeshConfig sets one).
pub fn enrolment(store: &Store, node: &str, cgroups: &[PodCgroup], default_policy: PolicyMode) -> Enrolment {
    let policy = store.mode.unwrap_or(default_policy);
    let by_uid: BTreeMap<&str, &PodCgroup> = cgroups.iter().map(|c| (c.uid.as_str(), c)).collect();
    let mut out = Enrolment::default();
    for (key, pod) in &store.pods {
        if pod.host_network {
            continue;
        }
        let workload_id = store.workload_ids()[key];
        let identity_id = pod.identity().kernel_id();
        let same_node = pod.node == node;
        out.endpoints.extend(pod.ips.iter().map(|&ip| EndpointRow {
            ip,
            workload_id,
            identity_id,
            same_node,
        }));
        if !same_node {
            continue;
        }
        match by_uid.get(pod.uid.as_str()) {
            Some(cg) => {
                if pod.qos_class.as_deref().is_some_and(|q| q != cg.qos) {
                    out.qos_mismatch.push(key.clone());
                }
                out.pod_nets.push(PodNet {
                    pod: key.clone(),
                    ips: pod.ips.clone(),
                });
                out.workloads.push(WorkloadRow {
                    cgroup_id: cg.cgroup_id,
                    workload_id,
                    ipv4: pod.ipv4(),
                    ipv6: pod.ipv6(),
                    identity_id,
                    admission: store.admission_of(pod, policy).0.kernel_value(),
                });
            }
            None => out.missing_cgroup.push(key.clone()),
        }
    }
    out
}

/// How many levels below the cgroup2 root `dir` sits: the kernel's
/// ancestor helpers count levels from there (the root is level 0).
pub fn cgroup_level(dir: &Path) -> std::io::Result<u32> {
    use nix::sys::statfs::{CGROUP2_SUPER_MAGIC, statfs};
    let dir = dir.canonicalize()?;
    let mut level = 0;
    let mut cur = dir.as_path();
    while let Some(parent) = cur.parent() {
        let on_cgroup2 = statfs(parent).is_ok_and(|s| s.filesystem_type() == CGROUP2_SUPER_MAGIC);
        // The mount point's own parent is not cgroup2: `cur` is then the root.
        if !on_cgroup2 || parent.metadata()?.dev() != cur.metadata()?.dev() {
            break;
        }
        level += 1;
        cur = parent;
    }
    Ok(level)
}

/// The cgroup2 mount `dir` is on (its level-0 directory).
fn cgroup2_root(dir: &Path) -> std::io::Result<PathBuf> {
    let mut root = dir.canonicalize()?;
    for _ in 0..cgroup_level(&root)? {
        root.pop();
    }
    Ok(root)
}

/// The kubelet's own cgroup on this node (where its liveness and
/// readiness probes connect from), found from a process named `kubelet`:
/// `/proc/<pid>/cgroup` names it below the cgroup2 mount the pod root is on.
pub fn kubelet_cgroup(pod_root: &Path) -> Option<PathBuf> {
    let root = cgroup2_root(pod_root).ok()?;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let dir = entry.path();
        let is_kubelet = std::fs::read_to_string(dir.join("comm")).is_ok_and(|c| c.trim_end() == "kubelet");
        if !is_kubelet {
            continue;
        }
        let cgroups = std::fs::read_to_string(dir.join("cgroup")).ok()?;
        let path = cgroups.lines().find_map(|l| l.strip_prefix("0::"))?;
        return Some(root.join(path.trim_start_matches('/')));
    }
    None
}

/// A probe cgroup vouches for every connect its processes make to pods:
/// it must be a host cgroup of its own, neither the pod root, nor one of
/// its ancestors (that would vouch for every host process, the cgroup2
/// root included), nor a pod's cgroup.
pub fn check_probe_cgroup(probe: &Path, pod_root: &Path) -> Result<PathBuf, String> {
    let probe = probe
        .canonicalize()
        .map_err(|e| format!("probe cgroup {}: {e} (check --probe-cgroup)", probe.display()))?;
    let pods = pod_root
        .canonicalize()
        .map_err(|e| format!("{}: {e}", pod_root.display()))?;
    if pods.starts_with(&probe) {
        return Err(format!(
            "probe cgroup {} contains the pod cgroup root {}: every process below it would be admitted to strict pods;              point --probe-cgroup at the kubelet's own cgroup (e.g. /sys/fs/cgroup/system.slice/kubelet.service)",
            probe.display(),
            pods.display()
        ));
    }
    if probe.starts_with(&pods) {
        return Err(format!(
            "probe cgroup {} is inside the pod cgroup root {}: a pod cannot be the probe source",
            probe.display(),
            pods.display()
        ));
    }
    Ok(probe)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mkdirs(root: &Path, dirs: &[&str]) {
        for d in dirs {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
    }

    #[test]
    fn both_drivers_and_every_qos_tier_are_found_by_uid() {
        let tmp = std::env::temp_dir().join(format!("mesh-enrol-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let systemd = tmp.join("kubepods.slice");
        mkdirs(
            &systemd,
            &[
                "kubepods-pod1111_aa.slice/cri-containerd-c1.scope",
                "kubepods-burstable.slice/kubepods-burstable-pod2222_bb.slice/crio-c2.scope",
                "kubepods-besteffort.slice/kubepods-besteffort-pod3333_cc.slice/docker-c3.scope",
                "kubepods-burstable.slice/not-a-pod.slice",
            ],
        );
        let found = scan(&systemd, CgroupDriver::Auto);
        let mut got: Vec<(String, &str)> = found.iter().map(|c| (c.uid.clone(), c.qos)).collect();
        got.sort();
        assert_eq!(
            got,
            [
                ("1111-aa".to_string(), "Guaranteed"),
                ("2222-bb".to_string(), "Burstable"),
                ("3333-cc".to_string(), "BestEffort")
            ]
        );
        let cgroupfs = tmp.join("kubepods");
        mkdirs(
            &cgroupfs,
            &["pod1111-aa/c1", "burstable/pod2222-bb/c2", "besteffort/pod3333-cc/c3"],
        );
        let mut got: Vec<(String, &str)> = scan(&cgroupfs, CgroupDriver::Auto)
            .iter()
            .map(|c| (c.uid.clone(), c.qos))
            .collect();
        got.sort();
        assert_eq!(got.len(), 3);
        assert_eq!(got[0], ("1111-aa".to_string(), "Guaranteed"));
        assert_eq!(got[2], ("3333-cc".to_string(), "BestEffort"));
        // Ids are the directories' inodes.
        let meta = std::fs::metadata(cgroupfs.join("burstable/pod2222-bb")).unwrap();
        assert!(
            scan(&cgroupfs, CgroupDriver::Cgroupfs)
                .iter()
                .any(|c| c.cgroup_id == meta.ino())
        );
        let _ = std::fs::remove_dir_all(&tmp);
    }
}
