//! Where workloads and policy come from: a directory of YAML files
//! (`file`: the lab, the demo, single-node installs) or the Kubernetes API
//! (`kube`, with `gateway_kube` for the Gateway API kinds). Both keep the
//! same contract: produce validated [`Snapshot`]s, and on bad input keep
//! the last good one in force.
pub mod file;
pub mod gateway_kube;
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
    /// How route status is judged (the agent's Gateway API compiler);
    /// `None` (the CA) writes no status.
    pub judge_routes: Option<crate::state::JudgeRoutes>,
}

#[tonic::async_trait]
impl Source for KubeSource {
    async fn run(self: Box<Self>, tx: SnapshotTx) {
        kube::watch(self.client, self.judge_routes, tx).await
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

/// A resource's `spec`, with every field this mesh does not know refused,
/// never ignored: a typo (`port:` for `ports:`) read as "absent" could open
/// every port, and a filter the mesh does not implement would silently not
/// apply. The error names the resource and the field.
pub(crate) fn strict_spec<'de, T, D>(spec: D, kind: &str, name: &str) -> Result<T, String>
where
    T: serde::Deserialize<'de>,
    D: serde::Deserializer<'de>,
    D::Error: std::fmt::Display,
{
    let mut unknown = Vec::new();
    let spec: T = serde_ignored::deserialize(spec, |path| unknown.push(format!("spec.{path}")))
        .map_err(|e| format!("{kind} {name}: spec: {e}"))?;
    if !unknown.is_empty() {
        return Err(format!(
            "{kind} {name}: unknown field {} (check the spelling against the API's spec; a field this mesh does not implement is refused rather than ignored)",
            unknown.join(", ")
        ));
    }
    Ok(spec)
}
