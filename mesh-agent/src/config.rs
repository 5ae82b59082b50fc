//! Command line and settings. Every flag has an environment fallback so the
//! DaemonSet can configure the agent from its pod spec.
use std::{net::Ipv4Addr, path::PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "mesh-agent",
    version,
    about = "Node agent of the sidecarless mesh: captures pod traffic in the kernel with eBPF, \
             splices same-node sockets, and proxies cross-node connections.",
    long_about = None
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node agent: load and attach the eBPF programs, enroll this
    /// node's pods, and serve the outbound capture listener.
    Run(RunArgs),
    /// Print the agent version and its kernel map layout version.
    Version,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Name of the node this agent runs on (as in Pod spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,

    /// Directory of YAML files (Pods, SMI policy) to read workloads from;
    /// re-read when a file changes.
    #[arg(long, env = "MESH_SOURCE_DIR")]
    pub source_dir: PathBuf,

    /// cgroup2 directory holding one sub-directory per pod of this node,
    /// named `<namespace>_<pod>`. The capture programs attach here only.
    #[arg(long, env = "MESH_POD_CGROUP_ROOT")]
    pub pod_cgroup_root: PathBuf,

    /// Address of this node that pods can reach; captured connections are
    /// redirected to it.
    #[arg(long, env = "MESH_CAPTURE_IP")]
    pub capture_ip: Ipv4Addr,

    /// Port of the outbound capture listener.
    #[arg(long, env = "MESH_OUTBOUND_PORT", default_value_t = mesh_common::OUTBOUND_PORT)]
    pub outbound_port: u16,

    /// bpffs directory where maps and links are pinned (kept across restarts).
    #[arg(long, env = "MESH_BPFFS_DIR", default_value = "/sys/fs/bpf/mesh")]
    pub bpffs_dir: PathBuf,

    /// When the agent is down, let captured connections go straight to their
    /// destination (unmeshed) instead of refusing them. Off: fail closed.
    #[arg(long, env = "MESH_FAIL_OPEN", default_value_t = false)]
    pub fail_open: bool,

    /// Splice same-node sockets (pod to pod, pod to agent) in the kernel with
    /// sockops + sk_msg. `--splice=false` sends them through TCP/IP instead.
    #[arg(long, env = "MESH_SPLICE", default_value_t = true, action = clap::ArgAction::Set)]
    pub splice: bool,

    /// Forward the kernel programs' aya-log debug lines to the agent log.
    #[arg(long, env = "MESH_KERNEL_DEBUG", default_value_t = false)]
    pub kernel_debug: bool,

    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `mesh_agent=debug`.
    #[arg(long, env = "MESH_LOG", default_value = "info")]
    pub log_level: String,

    /// Log line format.
    #[arg(long, env = "MESH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,

    /// Tokio worker threads.
    #[arg(long, env = "MESH_WORKER_THREADS", default_value_t = 2)]
    pub worker_threads: usize,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug)]
pub struct LogSettings {
    pub level: String,
    pub format: LogFormat,
}

/// Validated settings of `mesh-agent run`.
#[derive(Debug)]
pub struct Settings {
    pub node_name: String,
    pub source_dir: PathBuf,
    pub pod_cgroup_root: PathBuf,
    pub capture_ip: Ipv4Addr,
    pub outbound_port: u16,
    pub bpffs_dir: PathBuf,
    pub fail_open: bool,
    pub kernel_debug: bool,
    pub splice: bool,
    pub worker_threads: usize,
    pub log: LogSettings,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--node-name must not be empty: set it to this node's Kubernetes name (NODE_NAME)")]
    EmptyNodeName,
    #[error("--outbound-port must be 1-65535")]
    ZeroPort,
    #[error("--capture-ip {0} is not a unicast address pods can reach")]
    BadCaptureIp(Ipv4Addr),
    #[error("--worker-threads must be 1-64, got {0}")]
    WorkerThreads(usize),
    #[error("--bpffs-dir {0} must be an absolute path under a bpffs mount")]
    RelativeBpffs(PathBuf),
}

impl Settings {
    pub fn from_args(a: RunArgs) -> Result<Self, ConfigError> {
        if a.node_name.trim().is_empty() {
            return Err(ConfigError::EmptyNodeName);
        }
        if a.outbound_port == 0 {
            return Err(ConfigError::ZeroPort);
        }
        let ip = a.capture_ip;
        if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() || ip.is_loopback() {
            return Err(ConfigError::BadCaptureIp(ip));
        }
        if !(1..=64).contains(&a.worker_threads) {
            return Err(ConfigError::WorkerThreads(a.worker_threads));
        }
        if !a.bpffs_dir.is_absolute() {
            return Err(ConfigError::RelativeBpffs(a.bpffs_dir));
        }
        Ok(Settings {
            node_name: a.node_name,
            source_dir: a.source_dir,
            pod_cgroup_root: a.pod_cgroup_root,
            capture_ip: a.capture_ip,
            outbound_port: a.outbound_port,
            bpffs_dir: a.bpffs_dir,
            fail_open: a.fail_open,
            kernel_debug: a.kernel_debug,
            splice: a.splice,
            worker_threads: a.worker_threads,
            log: LogSettings {
                level: a.log_level,
                format: a.log_format,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Result<Settings, String> {
        let mut argv = vec![
            "mesh-agent",
            "run",
            "--node-name",
            "n1",
            "--source-dir",
            "/tmp",
            "--pod-cgroup-root",
            "/sys/fs/cgroup/pods",
            "--capture-ip",
            "198.18.1.1",
        ];
        argv.extend_from_slice(extra);
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        let Command::Run(run) = cli.command else { unreachable!() };
        Settings::from_args(run).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_fail_closed_on_the_documented_port() {
        let s = args(&[]).unwrap();
        assert_eq!(s.outbound_port, 15001);
        assert!(!s.fail_open);
        assert!(s.splice);
        assert!(!args(&["--splice=false"]).unwrap().splice);
        assert_eq!(s.bpffs_dir, PathBuf::from("/sys/fs/bpf/mesh"));
    }

    #[test]
    fn out_of_range_values_are_refused_with_the_flag_named() {
        assert!(args(&["--outbound-port", "0"]).unwrap_err().contains("--outbound-port"));
        assert!(
            args(&["--capture-ip", "127.0.0.1"])
                .unwrap_err()
                .contains("--capture-ip")
        );
        assert!(
            args(&["--worker-threads", "0"])
                .unwrap_err()
                .contains("--worker-threads")
        );
        assert!(args(&["--bpffs-dir", "rel"]).unwrap_err().contains("--bpffs-dir"));
        assert!(args(&["--no-such-flag"]).is_err());
    }
}
