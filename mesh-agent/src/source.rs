//! Where workloads and policy come from. Today: a directory of YAML files
//! (`file`), used by the lab, the demo and single-node installs. The
//! Kubernetes watcher will implement the same contract: produce validated
//! [`Snapshot`]s, and on bad input keep the last good one in force.
pub mod file;
pub mod k8s;
pub mod kube;

use std::path::PathBuf;

use crate::state::SnapshotTx;

/// A source of snapshots: it publishes a first snapshot once it has a
/// complete view, then one per change; bad input is reported and never
/// replaces what is in force.
#[tonic::async_trait]
pub trait Source: Send + Sync {
    async fn run(self: Box<Self>, tx: SnapshotTx);
    fn describe(&self) -> String;
}

/// A directory of YAML files (the lab, the demo, single-node installs).
pub struct FileSource {
    pub dir: PathBuf,
}

#[tonic::async_trait]
impl Source for FileSource {
    async fn run(self: Box<Self>, tx: SnapshotTx) {
        file::watch(self.dir, tx).await
    }

    fn describe(&self) -> String {
        format!("files in {}", self.dir.display())
    }
}

/// The Kubernetes API (a DaemonSet's agent).
pub struct KubeSource {
    pub client: ::kube::Client,
}

#[tonic::async_trait]
impl Source for KubeSource {
    async fn run(self: Box<Self>, tx: SnapshotTx) {
        kube::watch(self.client, tx).await
    }

    fn describe(&self) -> String {
        "the Kubernetes API".into()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read source directory {dir}: {err} (check --source-dir)")]
    ReadDir { dir: PathBuf, err: std::io::Error },
    #[error("cannot read {file}: {err}")]
    ReadFile { file: PathBuf, err: std::io::Error },
    #[error("{file} is {what}, not a regular file: skipped (remove it from the policy directory)")]
    NotRegular { file: PathBuf, what: &'static str },
    #[error("{file}: document {doc}: {reason}")]
    Invalid { file: PathBuf, doc: usize, reason: String },
    #[error("pods {first} and {second} both claim IP {ip}: {second} is refused until one of them is fixed")]
    DuplicateIp {
        first: String,
        second: String,
        ip: std::net::IpAddr,
    },
}
