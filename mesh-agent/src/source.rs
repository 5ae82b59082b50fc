//! Where workloads and policy come from. Today: a directory of YAML files
//! (`file`), used by the lab, the demo and single-node installs. The
//! Kubernetes watcher will implement the same contract: produce validated
//! [`Snapshot`]s, and on bad input keep the last good one in force.
pub mod file;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read source directory {dir}: {err} (check --source-dir)")]
    ReadDir { dir: PathBuf, err: std::io::Error },
    #[error("cannot read {file}: {err}")]
    ReadFile { file: PathBuf, err: std::io::Error },
    #[error("{file}: document {doc}: {reason}")]
    Invalid { file: PathBuf, doc: usize, reason: String },
    #[error("pods {first} and {second} both claim IP {ip}; fix one of them")]
    DuplicateIp {
        first: String,
        second: String,
        ip: std::net::Ipv4Addr,
    },
}
