//! Which cgroup is which pod: the rows of `mesh_workloads` (this node's
//! pods, by the cgroup id their processes run in) and `mesh_endpoints`
//! (every pod, by address), from a snapshot.
//!
//! The lab lays a pod's cgroup out as `<pod cgroup root>/<namespace>_<name>`;
//! the kubelet's own layouts are the next step (ARCHITECTURE.md, "Pods and
//! cgroups"), and only this module changes for them.
use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use crate::{
    state::{Pod, Store},
    tables::{EndpointRow, WorkloadRow},
};

/// The rows for one snapshot, and what could not be enrolled yet.
#[derive(Debug, Default)]
pub struct Enrolment {
    pub workloads: Vec<WorkloadRow>,
    pub endpoints: Vec<EndpointRow>,
    /// Pods of this node whose cgroup does not exist (yet).
    pub missing_cgroup: Vec<PathBuf>,
}

/// The cgroup directory of a pod of this node.
pub fn pod_cgroup(root: &Path, pod: &Pod) -> PathBuf {
    root.join(format!("{}_{}", pod.namespace, pod.name))
}

/// Every pod is an endpoint; this node's pods whose cgroup exists are enrolled.
pub fn enrolment(store: &Store, node: &str, pod_cgroup_root: &Path) -> Enrolment {
    let mut out = Enrolment::default();
    for (key, pod) in &store.pods {
        let workload_id = store.workload_ids()[key];
        let identity_id = pod.identity().kernel_id();
        let same_node = pod.node == node;
        out.endpoints.push(EndpointRow {
            ip: pod.ip,
            workload_id,
            identity_id,
            same_node,
        });
        if !same_node {
            continue;
        }
        let dir = pod_cgroup(pod_cgroup_root, pod);
        match std::fs::metadata(&dir) {
            // On cgroup2 the directory's inode number is the cgroup id that
            // bpf_get_current_cgroup_id() returns.
            Ok(meta) => out.workloads.push(WorkloadRow {
                cgroup_id: meta.ino(),
                workload_id,
                ip: pod.ip,
                identity_id,
            }),
            Err(_) => out.missing_cgroup.push(dir),
        }
    }
    out
}
