//! Command line and settings. Every flag has an environment fallback so the
//! DaemonSet can configure the agent from its pod spec.
use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    time::Duration,
};

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "mesh-agent",
    version,
    // A later flag overrides an earlier one (the lab adds defaults, tests override them).
    args_override_self = true,
    about = "Node agent of the sidecarless mesh: captures pod traffic in the kernel with eBPF, \
             delivers same-node pod traffic veth to veth, and proxies cross-node connections.",
    long_about = None
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once at start-up
pub enum Command {
    /// Run the node agent: load and attach the eBPF programs, enroll this
    /// node's pods, and serve the outbound capture listener.
    Run(RunArgs),
    /// The mesh CA: `ca init` creates a root, `ca serve` runs the gRPC
    /// certificate-signing API, `ca request` asks it for a certificate as a node.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Write the SMI CustomResourceDefinitions this mesh uses into DIR
    /// (generated from the types; deploy/crds holds the committed copy).
    Crds {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Explain a policy decision: which TrafficTarget and rule allow a flow,
    /// or why it is denied, from the same compiled policy the datapath uses.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Print a node's audit trail: its recent policy decisions, and with
    /// --follow every new one as it happens (JSON lines).
    Audit {
        #[arg(long)]
        follow: bool,
        /// Only `allow`, `deny` or `refused`.
        #[arg(long)]
        verdict: Option<String>,
        /// Only decisions about this workload (`namespace/name`), as source or destination.
        #[arg(long)]
        workload: Option<String>,
        /// The agent's admin address (run this on the node).
        #[arg(long, env = "MESH_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
        admin_addr: std::net::SocketAddr,
    },
    /// A short human summary of this node's agent (from its admin API).
    Status {
        #[arg(long, env = "MESH_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
        admin_addr: std::net::SocketAddr,
    },
    /// Remove everything the mesh put in this node's kernel: every pinned
    /// program link and map under --bpffs-dir. Pods' traffic then flows
    /// unmeshed. Refuses while an agent is running here, unless --force.
    Uninstall {
        #[arg(long, env = "MESH_BPFFS_DIR", default_value = "/sys/fs/bpf/mesh")]
        bpffs_dir: PathBuf,
        /// Remove the pins even though an agent's heartbeat is current.
        #[arg(long, default_value_t = false)]
        force: bool,
    },
    /// Print the agent version and its kernel map layout version.
    Version,
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Prints the verdict for one flow and the TrafficTarget and rule that decided it.
    Check {
        /// Directory of YAML files (Pods, SMI resources), as the agent reads.
        #[arg(long, env = "MESH_SOURCE_DIR")]
        source_dir: PathBuf,
        /// Source: `namespace/serviceaccount`, or a pod as `pod:namespace/name`.
        #[arg(long)]
        from: String,
        /// Destination: `namespace/serviceaccount`, `pod:namespace/name`, or `ip:port`.
        #[arg(long)]
        to: String,
        /// Destination port (taken from `ip:port` when given there).
        #[arg(long)]
        port: Option<u16>,
        #[arg(long, default_value = "tcp", value_parser = ["tcp", "udp"])]
        protocol: String,
        /// With --path: check an HTTP request too.
        #[arg(long)]
        method: Option<String>,
        #[arg(long)]
        path: Option<String>,
        /// With --method and --path: a request header, `name: value`
        /// (repeatable), for HTTPRouteGroup header matches.
        #[arg(long = "header", value_name = "NAME: VALUE")]
        headers: Vec<String>,
        #[arg(long, env = "MESH_TRUST_DOMAIN", default_value = "cluster.local")]
        trust_domain: String,
        /// The agent's `--policy-mode`, for when the source sets none (a
        /// MeshConfig document's spec.policyMode wins, as in the agent).
        #[arg(long, env = "MESH_POLICY_MODE", value_enum, default_value_t = crate::state::PolicyMode::Enforcing)]
        policy_mode: crate::state::PolicyMode,
    },
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a new self-signed root CA (ca.crt, ca.key with mode 0600) in DIR.
    Init {
        #[arg(long, env = "MESH_CA_DIR")]
        dir: PathBuf,
        #[arg(long, env = "MESH_TRUST_DOMAIN", default_value = "cluster.local")]
        trust_domain: String,
    },
    /// Serve the certificate-signing API (gRPC over TLS 1.3).
    Serve {
        /// Directory with ca.crt and ca.key (and root.crt when ca.crt is an
        /// intermediate): files, or a mounted Kubernetes Secret.
        #[arg(long, env = "MESH_CA_DIR")]
        dir: PathBuf,
        #[arg(long, env = "MESH_CA_LISTEN", default_value = "0.0.0.0:15012")]
        listen: std::net::SocketAddr,
        /// Authenticate nodes with this YAML list of credentials:
        /// `credentials: [{node, tokenSha256, expiresUnix}]` (the lab's way).
        #[arg(long, env = "MESH_NODE_CREDENTIALS", required_unless_present = "token_review_user")]
        node_credentials: Option<PathBuf>,
        /// Authenticate nodes with Kubernetes TokenReview instead: tokens of
        /// these users (repeatable, e.g. system:serviceaccount:mesh-system:mesh-agent),
        /// pod-bound, whose node the API server names.
        #[arg(long, env = "MESH_TOKEN_REVIEW_USER", conflicts_with = "node_credentials")]
        token_review_user: Vec<String>,
        /// Audience the agents' projected tokens are minted for.
        #[arg(long, env = "MESH_TOKEN_AUDIENCE", default_value = "mesh-ca")]
        token_audience: String,
        /// Where the CA learns which workloads run on which node (file source).
        #[arg(long, env = "MESH_SOURCE_DIR", required_unless_present = "kubernetes")]
        source_dir: Option<PathBuf>,
        /// Learn it from the Kubernetes API instead (pods, cluster-wide).
        #[arg(
            long,
            env = "MESH_KUBERNETES",
            conflicts_with = "source_dir",
            default_value_t = false
        )]
        kubernetes: bool,
        #[arg(long, env = "MESH_TRUST_DOMAIN", default_value = "cluster.local")]
        trust_domain: String,
        #[arg(long, env = "MESH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
        log_format: LogFormat,
    },
    /// Request a certificate as a node (operators and tests): prints the
    /// serial and expiry, or the CA's refusal.
    Request {
        #[arg(long, env = "MESH_CA_ADDR")]
        ca_addr: String,
        #[arg(long, env = "MESH_CA_ROOT")]
        ca_root: PathBuf,
        #[arg(long, env = "MESH_NODE_TOKEN_FILE")]
        node_token_file: PathBuf,
        /// spiffe://<trust-domain>/ns/<ns>/sa/<sa>
        #[arg(long)]
        identity: String,
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Name of the node this agent runs on (as in Pod spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,

    /// Directory of YAML files (Pods, Nodes, SMI policy) to read workloads
    /// and policy from; re-read when a file changes.
    #[arg(long, env = "MESH_SOURCE_DIR", required_unless_present = "kubernetes")]
    pub source_dir: Option<PathBuf>,

    /// Read workloads and SMI policy from the Kubernetes API instead
    /// (in-cluster config, or the kubeconfig).
    #[arg(
        long,
        env = "MESH_KUBERNETES",
        conflicts_with = "source_dir",
        default_value_t = false
    )]
    pub kubernetes: bool,

    /// The kubelet's pod cgroup root on the host's cgroup2 mount
    /// (`/sys/fs/cgroup/kubepods.slice` with the systemd cgroup driver,
    /// `/sys/fs/cgroup/kubepods` with cgroupfs). The capture programs attach
    /// here only; pods are found below it by their UID.
    #[arg(long, env = "MESH_POD_CGROUP_ROOT")]
    pub pod_cgroup_root: PathBuf,

    /// How the kubelet names pod cgroups; `auto` decides from the root's
    /// name (`*.slice`: systemd).
    #[arg(long, env = "MESH_CGROUP_DRIVER", value_enum, default_value_t = crate::enrol::CgroupDriver::Auto)]
    pub cgroup_driver: crate::enrol::CgroupDriver,

    /// Address of this node that pods can reach; captured connections are
    /// redirected to it.
    #[arg(long, env = "MESH_CAPTURE_IP")]
    pub capture_ip: Ipv4Addr,

    /// IPv6 address of this node that pods can reach: connects to IPv6
    /// destinations are redirected to it. Without it they go to
    /// --capture-ip, IPv4-mapped (an IPv6-only pod or a V6ONLY socket then
    /// cannot reach a meshed destination on another node).
    #[arg(long, env = "MESH_CAPTURE_IP6")]
    pub capture_ip6: Option<Ipv6Addr>,

    /// Port of the outbound capture listener.
    #[arg(long, env = "MESH_OUTBOUND_PORT", default_value_t = mesh_common::OUTBOUND_PORT)]
    pub outbound_port: u16,

    /// First of the UDP ports pod-to-pod datagrams for other nodes are
    /// relayed through (one per remote pod address in use; on the capture
    /// addresses).
    #[arg(long, env = "MESH_UDP_RELAY_PORT", default_value_t = 15100)]
    pub udp_relay_port: u16,

    /// How many relay ports (remote pod UDP addresses in use at once on
    /// this node, 0-4096). Past that, such datagrams are refused (EPERM)
    /// rather than sent in the clear; 0 refuses them all.
    #[arg(long, env = "MESH_UDP_RELAY_SLOTS", default_value_t = 256)]
    pub udp_relay_slots: u16,

    /// bpffs directory where maps and links are pinned (kept across restarts).
    #[arg(long, env = "MESH_BPFFS_DIR", default_value = "/sys/fs/bpf/mesh")]
    pub bpffs_dir: PathBuf,

    /// When the agent is down, let captured connections go straight to their
    /// destination (unmeshed) instead of refusing them. Off: fail closed.
    #[arg(long, env = "MESH_FAIL_OPEN", default_value_t = false)]
    pub fail_open: bool,

    /// Deliver same-node pod-to-pod packets straight from the sender's veth
    /// to the receiver's (tc/TCX `bpf_redirect_peer`), below TCP: the sockets
    /// stay plain TCP/UDP, only the bridge hop is skipped. `false`: every
    /// packet takes the node's bridge.
    #[arg(long, env = "MESH_FAST_PATH", default_value_t = true, action = clap::ArgAction::Set)]
    pub fast_path: bool,

    /// The host cgroup whose connects to pods strict inbound admission lets
    /// through: the kubelet's, for liveness and readiness probes. Unset:
    /// found from the running kubelet process; `none`: no probe source
    /// (every host process is refused by strict pods).
    #[arg(long, env = "MESH_PROBE_CGROUP")]
    pub probe_cgroup: Option<PathBuf>,

    /// SPIFFE trust domain of this mesh.
    #[arg(long, env = "MESH_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,

    /// Mesh CA address (host:port). With it, the agent obtains a certificate
    /// for every workload identity on this node.
    #[arg(long, env = "MESH_CA_ADDR", requires_all = ["ca_root", "node_token_file"])]
    pub ca_addr: Option<String>,

    /// PEM root the mesh CA's certificates chain to.
    #[arg(long, env = "MESH_CA_ROOT")]
    pub ca_root: Option<PathBuf>,

    /// File holding this node's credential for the CA (in Kubernetes the
    /// projected ServiceAccount token).
    #[arg(long, env = "MESH_NODE_TOKEN_FILE")]
    pub node_token_file: Option<PathBuf>,

    /// Sign workload certificates in-process from this CA directory instead of
    /// asking a CA service (single node, no CA Deployment).
    #[arg(long, env = "MESH_LOCAL_CA_DIR", conflicts_with = "ca_addr")]
    pub local_ca_dir: Option<PathBuf>,

    /// Workload certificate lifetime (1m to 7d); renewed at half-life.
    #[arg(long, env = "MESH_CERT_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    pub cert_ttl: Duration,

    /// Policy mode when the source sets none (a MeshConfig document with
    /// spec.policyMode switches it at run time): enforcing denies meshed
    /// traffic no TrafficTarget allows; permissive allows everything.
    #[arg(long, env = "MESH_POLICY_MODE", value_enum, default_value_t = crate::state::PolicyMode::Enforcing)]
    pub policy_mode: crate::state::PolicyMode,

    /// Transport for outbound TCP flows: mTLS over TCP (HTTP/2 CONNECT, the
    /// default: ahead of QUIC on throughput, request latency and CPU in
    /// `cargo xtask bench`) or QUIC (ahead on new connections). Both are
    /// always served inbound; UDP flows always take QUIC datagrams.
    #[arg(long, env = "MESH_TUNNEL_TRANSPORT", value_enum, default_value_t = crate::tunnel::Transport::Tcp)]
    pub tunnel_transport: crate::tunnel::Transport,

    /// Post-quantum hybrid key exchange (X25519MLKEM768, preferred over
    /// X25519) on both tunnel transports. `false`: X25519 only; a peer
    /// with it on still agrees on X25519 with this one.
    #[arg(long, env = "MESH_POST_QUANTUM", default_value_t = true, action = clap::ArgAction::Set)]
    pub post_quantum: bool,

    /// Address the tunnel listeners (UDP and TCP) bind to.
    #[arg(long, env = "MESH_TUNNEL_ADDR", default_value = "0.0.0.0")]
    pub tunnel_addr: Ipv4Addr,

    /// Tunnel port, on this node and on every peer.
    #[arg(long, env = "MESH_TUNNEL_PORT", default_value_t = 15008)]
    pub tunnel_port: u16,

    /// Append every policy decision to this file as JSON lines (rotated to
    /// FILE.1 at --audit-log-max-bytes). Without it, records stay in memory.
    #[arg(long, env = "MESH_AUDIT_LOG")]
    pub audit_log: Option<PathBuf>,

    #[arg(long, env = "MESH_AUDIT_LOG_MAX_BYTES", default_value_t = 10 << 20)]
    pub audit_log_max_bytes: u64,

    /// Local admin endpoint (gRPC): the audit trail stream for
    /// `mesh-agent audit`. Keep it on loopback.
    #[arg(long, env = "MESH_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: std::net::SocketAddr,

    /// `/healthz` and `/readyz` for the kubelet's probes.
    #[arg(long, env = "MESH_HEALTH_ADDR", default_value = "0.0.0.0:15021")]
    pub health_addr: std::net::SocketAddr,

    /// Prometheus /metrics listener.
    #[arg(long, env = "MESH_METRICS_ADDR", default_value = "0.0.0.0:15020")]
    pub metrics_addr: std::net::SocketAddr,

    /// An OTLP/gRPC collector (`http://host:4317`) to export a span per
    /// request on the L7 path to (W3C traceparent propagated); none when unset.
    #[arg(long, env = "MESH_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// Forward the kernel programs' aya-log debug lines to the agent log.
    #[arg(long, env = "MESH_KERNEL_DEBUG", default_value_t = false)]
    pub kernel_debug: bool,

    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `mesh_agent=debug`.
    #[arg(long, env = "MESH_LOG", default_value = "info")]
    pub log_level: String,

    /// Log line format.
    #[arg(long, env = "MESH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,

    /// Tokio worker threads [default: 2, or 1 when the agent may use only
    /// one CPU (its affinity or cgroup CPU quota, e.g. a limit of 1 CPU):
    /// a second worker on one CPU only adds wakeups and context switches].
    #[arg(long, env = "MESH_WORKER_THREADS")]
    pub worker_threads: Option<usize>,

    /// Unix socket where a running agent hands its listening sockets to its
    /// successor (a restart or upgrade on this node refuses no connection).
    /// Keep it in a directory only root can write.
    #[arg(long, env = "MESH_HANDOFF_SOCKET", default_value = "/run/mesh/handoff.sock")]
    pub handoff_socket: PathBuf,

    /// After handing over or on SIGTERM: how long flows this agent carries
    /// may still run; those left are then ended cleanly (FIN, no reset).
    /// 0s to 10m.
    #[arg(long, env = "MESH_DRAIN_GRACE", default_value = "20s", value_parser = humantime::parse_duration)]
    pub drain_grace: Duration,
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
    /// None: the Kubernetes API.
    pub source_dir: Option<PathBuf>,
    pub pod_cgroup_root: PathBuf,
    pub cgroup_driver: crate::enrol::CgroupDriver,
    pub capture_ip: Ipv4Addr,
    pub capture_ip6: Option<Ipv6Addr>,
    pub outbound_port: u16,
    /// (first port, count) of the pod-to-pod UDP relay ports; None: disabled.
    pub udp_relay: Option<(u16, u16)>,
    pub bpffs_dir: PathBuf,
    pub fail_open: bool,
    pub kernel_debug: bool,
    pub fast_path: bool,
    /// None: find the kubelet's; Some(None): none.
    pub probe_cgroup: Option<Option<PathBuf>>,
    pub identity: IdentitySettings,
    pub tunnel: TunnelSettings,
    pub policy_mode: crate::state::PolicyMode,
    pub audit_log: Option<PathBuf>,
    pub audit_log_max_bytes: u64,
    pub admin_addr: std::net::SocketAddr,
    pub health_addr: std::net::SocketAddr,
    pub metrics_addr: std::net::SocketAddr,
    pub otlp_endpoint: Option<String>,
    pub worker_threads: usize,
    pub log: LogSettings,
    pub handoff_socket: PathBuf,
    pub drain_grace: Duration,
}

#[derive(Debug)]
pub struct TunnelSettings {
    pub transport: crate::tunnel::Transport,
    pub post_quantum: bool,
    pub addr: Ipv4Addr,
    pub port: u16,
}

/// Where workload certificates come from.
#[derive(Debug)]
pub struct IdentitySettings {
    pub trust_domain: String,
    pub source: Option<CertSource>,
    pub ttl: Duration,
}

#[derive(Debug)]
pub enum CertSource {
    MeshCa {
        addr: String,
        root: PathBuf,
        token_file: PathBuf,
    },
    LocalCa {
        dir: PathBuf,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--cert-ttl must be between 1m and 7d, got {0:?}")]
    CertTtl(Duration),
    #[error("--trust-domain {0:?} is not a valid trust domain")]
    TrustDomain(String),
    #[error("--node-name must not be empty: set it to this node's Kubernetes name (NODE_NAME)")]
    EmptyNodeName,
    #[error("--outbound-port and --tunnel-port must be 1-65535")]
    ZeroPort,
    #[error(
        "--udp-relay-port {base} with --udp-relay-slots {slots}: the ports must fit below 65536, number at most 4096, \
         and not include --outbound-port or --tunnel-port"
    )]
    UdpRelayPorts { base: u16, slots: u16 },
    #[error("--capture-ip {0} is not a unicast address pods can reach")]
    BadCaptureIp(Ipv4Addr),
    #[error("--capture-ip6 {0} is not a unicast IPv6 address pods can reach")]
    BadCaptureIp6(Ipv6Addr),
    #[error("--worker-threads must be 1-64, got {0}")]
    WorkerThreads(usize),
    #[error("--bpffs-dir {0} must be an absolute path under a bpffs mount")]
    RelativeBpffs(PathBuf),
    #[error("--drain-grace must be between 0s and 10m, got {0:?}")]
    DrainGrace(Duration),
    #[error("--handoff-socket {0} must be an absolute path")]
    RelativeHandoff(PathBuf),
}

impl Settings {
    pub fn from_args(a: RunArgs) -> Result<Self, ConfigError> {
        if a.node_name.trim().is_empty() {
            return Err(ConfigError::EmptyNodeName);
        }
        if a.outbound_port == 0 || a.tunnel_port == 0 {
            return Err(ConfigError::ZeroPort);
        }
        let relay_ports = u32::from(a.udp_relay_port)..u32::from(a.udp_relay_port) + u32::from(a.udp_relay_slots);
        if a.udp_relay_slots > 0
            && (a.udp_relay_port == 0
                || a.udp_relay_slots > 4096
                || relay_ports.end > 65536
                || relay_ports.contains(&u32::from(a.outbound_port))
                || relay_ports.contains(&u32::from(a.tunnel_port)))
        {
            return Err(ConfigError::UdpRelayPorts {
                base: a.udp_relay_port,
                slots: a.udp_relay_slots,
            });
        }
        let ip = a.capture_ip;
        if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() || ip.is_loopback() {
            return Err(ConfigError::BadCaptureIp(ip));
        }
        if let Some(ip6) = a.capture_ip6
            && (ip6.is_unspecified()
                || ip6.is_multicast()
                || ip6.is_loopback()
                || ip6.to_ipv4_mapped().is_some()
                || ip6.is_unicast_link_local())
        {
            return Err(ConfigError::BadCaptureIp6(ip6));
        }
        let worker_threads = a.worker_threads.unwrap_or_else(default_worker_threads);
        if !(1..=64).contains(&worker_threads) {
            return Err(ConfigError::WorkerThreads(worker_threads));
        }
        if !(Duration::from_secs(60)..=Duration::from_secs(7 * 24 * 3600)).contains(&a.cert_ttl) {
            return Err(ConfigError::CertTtl(a.cert_ttl));
        }
        if crate::identity::SpiffeId::new(&a.trust_domain, "x", "x").is_err() {
            return Err(ConfigError::TrustDomain(a.trust_domain));
        }
        if !a.bpffs_dir.is_absolute() {
            return Err(ConfigError::RelativeBpffs(a.bpffs_dir));
        }
        if a.drain_grace > Duration::from_secs(600) {
            return Err(ConfigError::DrainGrace(a.drain_grace));
        }
        if !a.handoff_socket.is_absolute() {
            return Err(ConfigError::RelativeHandoff(a.handoff_socket));
        }
        Ok(Settings {
            node_name: a.node_name,
            source_dir: a.source_dir,
            pod_cgroup_root: a.pod_cgroup_root,
            cgroup_driver: a.cgroup_driver,
            capture_ip: a.capture_ip,
            capture_ip6: a.capture_ip6,
            outbound_port: a.outbound_port,
            udp_relay: (a.udp_relay_slots > 0).then_some((a.udp_relay_port, a.udp_relay_slots)),
            bpffs_dir: a.bpffs_dir,
            fail_open: a.fail_open,
            kernel_debug: a.kernel_debug,
            fast_path: a.fast_path,
            probe_cgroup: a.probe_cgroup.map(|p| (p.as_os_str() != "none").then_some(p)),
            identity: IdentitySettings {
                trust_domain: a.trust_domain,
                source: match (a.ca_addr, a.ca_root, a.node_token_file, a.local_ca_dir) {
                    (Some(addr), Some(root), Some(token_file), _) => {
                        Some(CertSource::MeshCa { addr, root, token_file })
                    }
                    (_, _, _, Some(dir)) => Some(CertSource::LocalCa { dir }),
                    _ => None,
                },
                ttl: a.cert_ttl,
            },
            tunnel: TunnelSettings {
                transport: a.tunnel_transport,
                post_quantum: a.post_quantum,
                addr: a.tunnel_addr,
                port: a.tunnel_port,
            },
            policy_mode: a.policy_mode,
            audit_log: a.audit_log,
            audit_log_max_bytes: a.audit_log_max_bytes,
            admin_addr: a.admin_addr,
            health_addr: a.health_addr,
            metrics_addr: a.metrics_addr,
            otlp_endpoint: a.otlp_endpoint,
            worker_threads,
            log: LogSettings {
                level: a.log_level,
                format: a.log_format,
            },
            handoff_socket: a.handoff_socket,
            drain_grace: a.drain_grace,
        })
    }
}

/// Two workers (as ztunnel), or fewer when the agent may run on fewer
/// CPUs: std reads the affinity mask and the cgroup's CPU quota.
fn default_worker_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).min(2)
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

    /// An agent confined to one CPU runs one worker; told, it runs what
    /// it is told.
    #[test]
    fn worker_threads_follow_the_cpus_the_agent_may_use() {
        let on_one_cpu = std::thread::spawn(|| {
            let mut one = nix::sched::CpuSet::new();
            one.set(0).unwrap();
            nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &one).unwrap();
            (
                args(&[]).unwrap().worker_threads,
                args(&["--worker-threads", "3"]).unwrap().worker_threads,
            )
        })
        .join()
        .unwrap();
        assert_eq!(on_one_cpu, (1, 3));
        let cpus = std::thread::available_parallelism().unwrap().get();
        assert_eq!(args(&[]).unwrap().worker_threads, cpus.min(2));
        assert!(args(&["--worker-threads", "0"]).unwrap_err().contains("1-64"));
    }

    #[test]
    fn defaults_fail_closed_on_the_documented_port() {
        let s = args(&[]).unwrap();
        assert_eq!(s.outbound_port, 15001);
        assert!(!s.fail_open);
        assert!(s.fast_path, "the same-node fast path is on by default");
        assert!(s.tunnel.post_quantum, "post-quantum key exchange is on by default");
        assert!(!args(&["--post-quantum=false"]).unwrap().tunnel.post_quantum);
        assert!(!args(&["--fast-path=false"]).unwrap().fast_path);
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
        assert!(args(&["--cert-ttl", "30s"]).unwrap_err().contains("--cert-ttl"));
        assert!(args(&["--drain-grace", "11m"]).unwrap_err().contains("--drain-grace"));
        assert!(
            args(&["--handoff-socket", "x.sock"])
                .unwrap_err()
                .contains("--handoff-socket")
        );
        assert!(
            args(&["--trust-domain", "Bad_Domain"])
                .unwrap_err()
                .contains("--trust-domain")
        );
        assert!(
            args(&["--ca-addr", "1.2.3.4:15012"]).is_err(),
            "a CA address needs the root and a credential"
        );
        assert_eq!(
            args(&["--cert-ttl", "1m"]).unwrap().identity.ttl,
            Duration::from_secs(60)
        );
    }
}
