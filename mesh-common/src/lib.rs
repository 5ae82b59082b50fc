//! Types shared by the kernel programs (`mesh-ebpf`) and the node agent.
//!
//! Every struct here is a key or value of a pinned map, so its layout is ABI:
//! `#[repr(C)]`, explicit padding, and a compile-time size check. Changing a
//! layout means bumping [`MAP_LAYOUT_VERSION`], so an agent never misreads maps
//! pinned by an older one.
#![no_std]
#![deny(unsafe_code)]

/// Bumped whenever a map's key or value layout changes. Pinned state lives in
/// a directory named after it, so an incompatible older pin set is replaced
/// deliberately instead of being reused.
pub const MAP_LAYOUT_VERSION: u32 = 9;

/// Map names (the kernel keeps 15 characters).
pub mod maps {
    /// cgroup id -> [`crate::Workload`]: the enrolled pods of this node.
    pub const WORKLOADS: &str = "mesh_workloads";
    /// Pod address ([`crate::Addr`], either family) -> [`crate::Endpoint`]: where each meshed pod runs.
    pub const ENDPOINTS: &str = "mesh_endpoints";
    /// One [`crate::Config`]: the node's capture settings.
    pub const CONFIG: &str = "mesh_config";
    /// socket cookie -> [`crate::OrigDst`], written at `connect()`.
    pub const COOKIES: &str = "mesh_cookies";
    /// [`crate::SockKey`] -> [`crate::OrigDst`], re-keyed on establish so the agent
    /// can find it from the accepted socket's addresses.
    pub const FLOWS: &str = "mesh_flows";
    /// Per-CPU [`crate::FastPathStats`]: what `mesh_fast_path` delivered.
    pub const FAST_STATS: &str = "mesh_fast_stats";
    /// Pod address ([`crate::Addr`]) -> [`crate::PodDev`]: the host-side veth
    /// of each enrolled pod of this node, and the pod's own MAC.
    pub const POD_DEVS: &str = "mesh_pod_devs";
    /// Per-CPU [`crate::CaptureStats`].
    pub const CAPTURE: &str = "mesh_capture";
    /// [`crate::PolicyKey`] -> [`crate::PolicyValue`]: the L4 allow rules.
    pub const POLICY: &str = "mesh_policy";
    /// Ring buffer of [`crate::PolicyEvent`]s: every decision at connect().
    pub const EVENTS: &str = "mesh_events";
    /// [`crate::SockKey`] -> [`crate::PodFlow`]: which pods a same-node
    /// pod-to-pod socket joins, and which end it is.
    pub const POD_FLOWS: &str = "mesh_pod_flows";
    /// Per-CPU [`crate::TrafficKey`] -> [`crate::TrafficStats`]: same-node
    /// pod-to-pod traffic by client and server workload.
    pub const TRAFFIC: &str = "mesh_traffic";
    /// [`crate::ServiceKey`] -> [`crate::ServiceValue`]: service VIPs.
    pub const SERVICES: &str = "mesh_services";
    /// [`crate::BackendKey`] -> [`crate::Backend`]: each service's weighted
    /// slot table of endpoints.
    pub const BACKENDS: &str = "mesh_backends";
    /// service id -> the next turn in its slot table (per CPU; kernel-written).
    pub const LB_CURSOR: &str = "mesh_lb_cursor";
    /// [`crate::UdpPeerKey`] -> [`crate::UdpService`]: which VIP a UDP
    /// socket's rewritten peer stands for, so replies show the VIP.
    pub const UDP_PEERS: &str = "mesh_udp_peers";
    /// Relay slot -> the remote pod address its agent port stands for
    /// (pod-to-pod UDP across nodes; assigned by the kernel, retired by the agent).
    pub const UDP_SLOTS: &str = "mesh_udp_slots";
    /// (sending workload, slot) -> the destination it was sent: the agent's
    /// kernel-attested proof of who sent a relayed datagram.
    pub const UDP_SENDERS: &str = "mesh_udp_sender";
    /// Same-node UDP a pod sent and policy allowed: the receiving pod may
    /// answer it (UDP has no connection to say so).
    pub const UDP_ANSWERS: &str = "mesh_udp_answer";
    /// [`crate::AdmitKey`] -> [`crate::Admit`]: flows the mesh vouches for,
    /// as the receiving pod sees them (inbound admission).
    pub const ADMIT: &str = "mesh_admit";
    /// [`crate::AdmitKey`] -> when its refusal was last audited: one audit
    /// record per refused flow, not per retransmitted SYN.
    pub const REFUSED: &str = "mesh_refused";
}

/// Program names, as the kernel and `bpftool prog` show them.
pub mod programs {
    pub const CONNECT4: &str = "mesh_connect4";
    pub const SENDMSG4: &str = "mesh_sendmsg4";
    pub const RECVMSG4: &str = "mesh_recvmsg4";
    /// AF_INET6 sockets: native IPv6, and IPv4-mapped addresses handled as their IPv4 twins.
    pub const CONNECT6: &str = "mesh_connect6";
    pub const SENDMSG6: &str = "mesh_sendmsg6";
    pub const RECVMSG6: &str = "mesh_recvmsg6";
    pub const SOCKOPS: &str = "mesh_sockops";
    /// tc (TCX) ingress on each enrolled pod's host-side veth: same-node
    /// pod-to-pod packets go straight to the destination pod's veth.
    pub const FAST_PATH: &str = "mesh_fast_path";
    /// cgroup_skb/ingress on the pod cgroup root: inbound admission.
    pub const INBOUND: &str = "mesh_inbound";
    /// sockops on the probe (kubelet) cgroup: attests its connects to pods.
    pub const PROBE: &str = "mesh_probe";
}

/// Port the agent's outbound capture listener uses unless configured otherwise.
pub const OUTBOUND_PORT: u16 = 15001;

/// `::ffff:0:0/96`: the third word of an IPv4-mapped IPv6 address, as
/// network byte order puts it in memory.
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// An IP address as every map keys it: 16 bytes in network order, IPv6 as
/// is and IPv4 in its IPv4-mapped form (`::ffff:a.b.c.d`), so an AF_INET
/// socket and an AF_INET6 one addressing the same IPv4 peer find the same
/// entry, and one map serves both families.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Addr {
    pub words: [u32; 4],
}

impl Addr {
    /// The all-zero address: "none".
    pub const UNSPECIFIED: Addr = Addr { words: [0; 4] };

    /// An IPv4 address given in network byte order (as `user_ip4` holds it).
    #[inline(always)]
    pub const fn from_ipv4_be(ipv4: u32) -> Addr {
        Addr {
            words: [0, 0, V4_MAPPED_WORD, ipv4],
        }
    }

    #[inline(always)]
    pub const fn is_ipv4(&self) -> bool {
        self.words[0] == 0 && self.words[1] == 0 && self.words[2] == V4_MAPPED_WORD
    }

    /// The IPv4 address in network byte order; meaningful when [`Self::is_ipv4`].
    #[inline(always)]
    pub const fn ipv4_be(&self) -> u32 {
        self.words[3]
    }

    #[inline(always)]
    pub const fn is_unspecified(&self) -> bool {
        self.words[0] == 0 && self.words[1] == 0 && self.words[2] == 0 && self.words[3] == 0
    }

    /// 127.0.0.0/8 or ::1: never keyed (two network namespaces can hold the
    /// same loopback 4-tuple).
    #[inline(always)]
    pub const fn is_loopback(&self) -> bool {
        if self.is_ipv4() {
            // Network order in memory: the first octet is the lowest byte.
            return self.words[3] & 0xff == 127;
        }
        self.words[0] == 0
            && self.words[1] == 0
            && self.words[2] == 0
            && self.words[3] == u32::from_ne_bytes([0, 0, 0, 1])
    }
}

impl From<core::net::IpAddr> for Addr {
    fn from(ip: core::net::IpAddr) -> Addr {
        match ip {
            core::net::IpAddr::V4(v4) => Addr::from_ipv4_be(u32::from_ne_bytes(v4.octets())),
            core::net::IpAddr::V6(v6) => {
                let o = v6.octets();
                let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
                Addr {
                    words: [word(0), word(4), word(8), word(12)],
                }
            }
        }
    }
}

impl From<Addr> for core::net::IpAddr {
    /// IPv4-mapped addresses come back as IPv4.
    fn from(a: Addr) -> core::net::IpAddr {
        if a.is_ipv4() {
            return core::net::IpAddr::V4(core::net::Ipv4Addr::from(a.words[3].to_ne_bytes()));
        }
        let mut o = [0u8; 16];
        for (i, w) in a.words.iter().enumerate() {
            o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        core::net::IpAddr::V6(core::net::Ipv6Addr::from(o))
    }
}

/// An enrolled pod on this node, found by the cgroup id of the connecting
/// process (kernel-attested: a pod cannot forge it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Workload {
    /// Agent-assigned id, stable for the pod's lifetime; names it in logs.
    pub workload_id: u32,
    /// The pod's IPv4 address, network byte order.
    pub ipv4: u32,
    /// Its identity (namespace + ServiceAccount), agent-assigned.
    pub identity_id: u32,
    /// Inbound admission for this pod: [`ADMISSION_OFF`],
    /// [`ADMISSION_STRICT`] or [`ADMISSION_PERMISSIVE`] (the agent resolves
    /// the mesh, namespace and pod settings into this one value).
    pub admission: u8,
    pub _pad: [u8; 3],
    /// Its IPv6 address (unspecified if it has none): with `ipv4`, the
    /// source an unbound socket of the pod sends from.
    pub ipv6: Addr,
}

/// A meshed pod somewhere in the cluster, found by destination address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    pub workload_id: u32,
    /// Index of the node the pod runs on (agent-assigned).
    pub node_id: u32,
    /// 1 when the pod runs on this node: no rewrite, the kernel connects directly.
    pub same_node: u32,
    /// Its identity (namespace + ServiceAccount), agent-assigned.
    pub identity_id: u32,
}

/// Capture settings of this node; array index 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// [`MAP_LAYOUT_VERSION`] of the agent that wrote it; first field in every
    /// layout so a newer agent can recognise pins it must not reuse.
    pub layout_version: u32,
    /// IPv4 address of the agent's outbound listener, network byte order.
    pub agent_ipv4: u32,
    /// Port of the agent's outbound listener, host byte order.
    pub agent_port: u16,
    /// 1: when the agent is not alive, let captured connections go direct.
    pub fail_open: u8,
    /// 1: emit aya-log debug lines from the kernel programs.
    pub debug: u8,
    /// 1: `mesh_fast_path` delivers same-node pod-to-pod packets veth to
    /// veth; 0: they take the node's bridge (plain TCP/IP either way).
    pub fast_path: u8,
    /// [`POLICY_OFF`] (allow all: no policy loaded, or permissive) or
    /// [`POLICY_ENFORCING`].
    pub policy_mode: u8,
    /// Level of the kubelet's pod cgroup root below the cgroup2 root: pods'
    /// cgroups are the next [`POD_CGROUP_DEPTH`] levels, and the programs
    /// find a process's pod by walking its ancestors there.
    pub pod_cgroup_level: u8,
    pub _pad: u8,
    /// Which entries of `mesh_policy` are in force. The agent writes a new
    /// generation's entries, flips this, then deletes the old ones, so no
    /// half-written policy is ever in force.
    pub policy_generation: u32,
    /// Pod-to-pod UDP to another node goes to the agent's port
    /// `udp_relay_base + slot`, slot < `udp_relay_slots` (0: no relay, such
    /// datagrams are refused rather than sent in the clear).
    pub udp_relay_base: u16,
    pub udp_relay_slots: u16,
    /// CLOCK_MONOTONIC nanoseconds until which the agent counts as alive;
    /// it pushes this forward on a timer. Only read when `fail_open` is 1.
    pub alive_until_ns: u64,
    /// IPv6 address of the agent's outbound listener, for connects to IPv6
    /// destinations; unspecified when the node has none (they then go to
    /// the IPv4 listener, IPv4-mapped).
    pub agent_ipv6: Addr,
    /// The agent that owns the maps (the newest to load; kernel programs
    /// ignore it): a predecessor still serving stops writing policy and
    /// heartbeats once a live successor claimed them, so it can never
    /// switch the kernel back to a generation the successor deleted.
    pub owner_pid: u32,
    pub _pad3: u32,
}

/// Pods' cgroups sit 1 (Guaranteed) or 2 (Burstable, BestEffort) levels
/// below the kubelet's root; the ancestor walk looks this many levels deep.
pub const POD_CGROUP_DEPTH: u8 = 3;

/// No inbound admission: anything that routes to the pod reaches it.
pub const ADMISSION_OFF: u8 = 0;
/// Only attested flows reach the pod; the rest is dropped and audited.
pub const ADMISSION_STRICT: u8 = 1;
/// Everything reaches the pod; each unattested flow is audited (migration).
pub const ADMISSION_PERMISSIVE: u8 = 2;

/// A flow as the receiving pod sees it: `peer:peer_port` to
/// `local:local_port` (host byte order), by protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AdmitKey {
    pub peer: Addr,
    pub local: Addr,
    pub peer_port: u16,
    pub local_port: u16,
    pub protocol: u8,
    pub _pad: [u8; 3],
}

/// Who vouches for an admitted flow, and until when.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Admit {
    /// CLOCK_MONOTONIC ns after which it no longer admits; `u64::MAX`:
    /// until removed (the agent's UDP sessions).
    pub until_ns: u64,
    /// One of the `ADMIT_BY_*` values.
    pub by: u32,
    pub _pad: u32,
}

/// A meshed pod's connect (or datagram) that passed policy (sockops, sendmsg).
pub const ADMIT_BY_POD: u32 = 1;
/// The local agent delivering a tunneled flow it authorized.
pub const ADMIT_BY_AGENT: u32 = 2;
/// A process of the probe cgroup (the kubelet's): liveness/readiness probes.
pub const ADMIT_BY_PROBE: u32 = 3;
/// A reply to a datagram the pod sent from that port.
pub const ADMIT_BY_ANSWER: u32 = 4;

pub const POLICY_OFF: u8 = 0;
pub const POLICY_ENFORCING: u8 = 1;
/// `PolicyKey::port` that matches every port.
pub const ANY_PORT: u16 = 0;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// An L4 allow rule: source identity may reach destination identity on
/// this port (or [`ANY_PORT`]) and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    pub generation: u32,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub port: u16,
    pub protocol: u8,
    pub _pad: u8,
}

/// Which compiled rule allowed it (for audit and `policy check`), and how.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyValue {
    pub rule: u32,
    /// [`POLICY_FLAG_HTTP`]: HTTP rules apply, so even a same-node flow goes
    /// through the agent (the kernel cannot read requests).
    pub flags: u32,
}

pub const POLICY_FLAG_HTTP: u32 = 1;

/// `mesh_policy`'s size. A new generation is written beside the one in
/// force, so both must fit.
pub const POLICY_CAPACITY: u32 = 65536;

/// The original destination of a captured connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    pub addr: Addr,
    /// Host byte order.
    pub port: u16,
    pub _pad: u16,
    /// The connecting pod, from its cgroup.
    pub workload_id: u32,
}

/// A TCP socket as seen from its own side, either family; ports in host
/// byte order. Loopback sockets are never keyed (two network namespaces can
/// hold the same loopback 4-tuple).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub local: Addr,
    pub remote: Addr,
    pub local_port: u16,
    pub remote_port: u16,
}

impl SockKey {
    /// The key of the socket at the other end of the same connection.
    #[inline(always)]
    pub const fn peer(&self) -> SockKey {
        SockKey {
            local: self.remote,
            remote: self.local,
            local_port: self.remote_port,
            remote_port: self.local_port,
        }
    }
}

/// Packets `mesh_fast_path` handed straight to a same-node pod's veth.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FastPathStats {
    pub packets: u64,
    pub bytes: u64,
}

/// Where `mesh_fast_path` delivers a packet for an enrolled pod of this
/// node: the host-side end of the pod's veth (`bpf_redirect_peer` hands the
/// packet to its pod-side peer) and the MAC of the pod's interface. A frame
/// is redirected only when its destination MAC is that one, so a pod that
/// replaced another at the same address (new veth, new MAC) is never sent
/// the old pod's entry: its frames take the bridge until the agent updates.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodDev {
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}

/// What `mesh_connect4` did with the connects it saw from enrolled pods.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaptureStats {
    /// Rewritten to the agent's outbound listener.
    pub redirected: u64,
    /// Same-node destination, left alone (the kernel connects it directly).
    pub same_node: u64,
    /// Destination outside the mesh, left alone.
    pub passthrough: u64,
    /// Agent not alive and fail-open set: left alone.
    pub failed_open: u64,
    /// Refused at connect() by policy (EPERM).
    pub denied: u64,
    /// Decisions whose audit event did not fit in `mesh_events` (the agent
    /// was not draining fast enough): counted, never silent.
    pub events_dropped: u64,
    /// Connects (TCP) and datagrams (UDP) to a service VIP given one of its endpoints.
    pub load_balanced: u64,
    /// Connects (and UDP sends) to a service VIP with no ready endpoint: refused.
    pub no_endpoint: u64,
    /// Pod-to-pod UDP to another node refused because every relay slot it
    /// could take was in use (see `Config::udp_relay_slots`).
    pub no_relay: u64,
    /// Inbound flows to a strict pod with no attestation: dropped (one per
    /// flow; its retransmissions are in `inbound_redropped`).
    pub inbound_refused: u64,
    /// Inbound flows to a permissive pod with no attestation: admitted, audited.
    pub inbound_unattested: u64,
    /// Retransmitted SYNs and later datagrams of flows already refused.
    pub inbound_redropped: u64,
}

/// A same-node pod-to-pod socket: the connection's two workloads and which
/// end this socket is, so its bytes are counted per workload pair at close.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodFlow {
    pub key: TrafficKey,
    /// 1 on the connecting (client) side.
    pub is_client: u32,
    pub _pad: u32,
}

/// A client and server workload pair (agent-assigned workload ids).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrafficKey {
    pub client_workload: u32,
    pub server_workload: u32,
}

/// Same-node connections and payload between two workloads.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficStats {
    pub opened: u64,
    pub closed: u64,
    /// Client to server.
    pub sent_bytes: u64,
    /// Server to client.
    pub received_bytes: u64,
}

/// A service address: ClusterIP (either family) and port (host order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub vip: Addr,
    pub port: u16,
    pub protocol: u8,
    pub _pad: u8,
}

/// Which slot table is in force for a service. `mesh_connect4` picks slot
/// `turn % slots` of `generation` (`mesh_lb_cursor`): the agent writes a new generation's
/// slots, switches this value in one write, then deletes the old slots, so
/// a weight change never leaves a half-written table in force.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    pub service_id: u32,
    pub generation: u32,
    /// Number of slots; 0 = no ready endpoint (connect() is refused).
    pub slots: u32,
    /// [`SERVICE_VIA_AGENT`]: requests are routed by the agent.
    pub flags: u32,
}

/// `ServiceValue::flags`: an HTTP-matched TrafficSplit applies, so connects
/// go to the agent with the VIP as their original destination (the kernel
/// cannot read requests); the slots serve only when no agent is configured.
pub const SERVICE_VIA_AGENT: u32 = 1;

/// One slot of a service's table. An endpoint fills as many slots as its
/// share of the traffic (TrafficSplit weight / endpoints of that backend).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    pub service_id: u32,
    pub generation: u32,
    pub slot: u32,
    pub _pad: u32,
}

/// An endpoint: pod address (the service's family) and target port (host order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr: Addr,
    pub port: u16,
    /// UDP services only: non-zero when the endpoint runs on another node.
    /// Datagrams for it go to this port on the agent's address instead,
    /// and the agent carries them through the QUIC tunnel.
    pub relay_port: u16,
}

/// A UDP socket's view of a peer it was given by a service rewrite: the
/// socket (cookie) and the address it really talks to. `mesh_recvmsg4`
/// shows datagrams from there as coming from the service VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UdpPeerKey {
    pub cookie: u64,
    pub addr: Addr,
    /// Host byte order.
    pub port: u16,
    pub _pad: u16,
    pub _pad2: u32,
}

/// The service address a UDP socket addressed (port in host order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UdpService {
    pub vip: Addr,
    pub port: u16,
    pub _pad: u16,
}

/// A remote pod's UDP address as one relay slot stands for it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UdpSlot {
    pub addr: Addr,
    /// Host byte order.
    pub port: u16,
    /// [`UDP_SLOT_ACTIVE`], or [`UDP_SLOT_RETIRING`]: idle, about to be
    /// freed by the agent; the kernel neither uses nor claims it, so no
    /// datagram still queued for it can reach another pod.
    pub state: u8,
    pub _pad: u8,
}

pub const UDP_SLOT_ACTIVE: u8 = 1;
pub const UDP_SLOT_RETIRING: u8 = 2;

/// Who sent through a relay slot: the workload (from the sending socket's
/// cgroup) and the slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UdpSenderKey {
    pub workload_id: u32,
    pub slot: u32,
}

/// A datagram exchange between two pods, from the side that may answer:
/// `server:server_port` may send back to `client:client_port` (port 0:
/// any port of the client, for a connected socket whose port was not yet
/// chosen when it connected).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UdpFlowKey {
    pub server: Addr,
    pub client: Addr,
    pub server_port: u16,
    pub client_port: u16,
}

pub const VERDICT_DENY: u8 = 0;
pub const VERDICT_ALLOW: u8 = 1;

/// One policy decision at connect(), for the audit trail.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyEvent {
    /// CLOCK_MONOTONIC nanoseconds.
    pub time_ns: u64,
    pub workload_id: u32,
    pub src_identity: u32,
    pub dst_identity: u32,
    /// Host byte order.
    pub dst_port: u16,
    pub protocol: u8,
    pub verdict: u8,
    pub generation: u32,
    /// [`EVENT_POLICY`] or [`EVENT_ADMISSION`].
    pub kind: u8,
    /// Admission: the pod's mode ([`ADMISSION_STRICT`]: dropped,
    /// [`ADMISSION_PERMISSIVE`]: admitted unattested).
    pub mode: u8,
    /// Admission: the peer's port (host byte order).
    pub src_port: u16,
    pub dst: Addr,
    /// Admission: the peer's address (policy events: unspecified).
    pub src: Addr,
}

/// A decision at connect()/sendmsg(): `workload_id` is the source pod.
pub const EVENT_POLICY: u8 = 0;
/// An inbound flow without attestation: `workload_id` is the destination pod.
pub const EVENT_ADMISSION: u8 = 1;

impl PolicyEvent {
    /// Decodes one `mesh_events` record, as every reader must: field by
    /// field at the offsets asserted below, None for a record of another
    /// size (an agent and kernel programs out of sync).
    pub fn decode(bytes: &[u8]) -> Option<PolicyEvent> {
        if bytes.len() != core::mem::size_of::<PolicyEvent>() {
            return None;
        }
        let u64_at = |o: usize| {
            u64::from_ne_bytes([
                bytes[o],
                bytes[o + 1],
                bytes[o + 2],
                bytes[o + 3],
                bytes[o + 4],
                bytes[o + 5],
                bytes[o + 6],
                bytes[o + 7],
            ])
        };
        let u32_at = |o: usize| u32::from_ne_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
        let addr_at = |o: usize| Addr {
            words: [u32_at(o), u32_at(o + 4), u32_at(o + 8), u32_at(o + 12)],
        };
        Some(PolicyEvent {
            time_ns: u64_at(core::mem::offset_of!(PolicyEvent, time_ns)),
            workload_id: u32_at(core::mem::offset_of!(PolicyEvent, workload_id)),
            src_identity: u32_at(core::mem::offset_of!(PolicyEvent, src_identity)),
            dst_identity: u32_at(core::mem::offset_of!(PolicyEvent, dst_identity)),
            dst_port: {
                let o = core::mem::offset_of!(PolicyEvent, dst_port);
                u16::from_ne_bytes([bytes[o], bytes[o + 1]])
            },
            protocol: bytes[core::mem::offset_of!(PolicyEvent, protocol)],
            verdict: bytes[core::mem::offset_of!(PolicyEvent, verdict)],
            generation: u32_at(core::mem::offset_of!(PolicyEvent, generation)),
            kind: bytes[core::mem::offset_of!(PolicyEvent, kind)],
            mode: bytes[core::mem::offset_of!(PolicyEvent, mode)],
            src_port: {
                let o = core::mem::offset_of!(PolicyEvent, src_port);
                u16::from_ne_bytes([bytes[o], bytes[o + 1]])
            },
            dst: addr_at(core::mem::offset_of!(PolicyEvent, dst)),
            src: addr_at(core::mem::offset_of!(PolicyEvent, src)),
        })
    }
}

/// `offset_of!(T, field) == n`: where each field sits is as much ABI as the
/// size (the kernel programs, bpftool's BTF view and the agent must agree).
macro_rules! assert_offsets {
    ($t:ty { $($field:ident: $off:expr),* $(,)? }) => {
        $(assert!(core::mem::offset_of!($t, $field) == $off);)*
    };
}

const _: () = {
    assert_offsets!(Workload {
        workload_id: 0,
        ipv4: 4,
        identity_id: 8,
        admission: 12,
        _pad: 13,
        ipv6: 16
    });
    assert_offsets!(UdpFlowKey {
        server: 0,
        client: 16,
        server_port: 32,
        client_port: 34
    });
    assert_offsets!(Endpoint {
        workload_id: 0,
        node_id: 4,
        same_node: 8,
        identity_id: 12
    });
    assert_offsets!(Config {
        layout_version: 0,
        agent_ipv4: 4,
        agent_port: 8,
        fail_open: 10,
        debug: 11,
        fast_path: 12,
        policy_mode: 13,
        pod_cgroup_level: 14,
        _pad: 15,
        policy_generation: 16,
        udp_relay_base: 20,
        udp_relay_slots: 22,
        alive_until_ns: 24,
        agent_ipv6: 32,
        owner_pid: 48,
        _pad3: 52,
    });
    assert_offsets!(PolicyKey {
        generation: 0,
        src_identity: 4,
        dst_identity: 8,
        port: 12,
        protocol: 14,
        _pad: 15
    });
    assert_offsets!(PolicyValue { rule: 0, flags: 4 });
    assert_offsets!(Addr { words: 0 });
    assert_offsets!(OrigDst {
        addr: 0,
        port: 16,
        _pad: 18,
        workload_id: 20
    });
    assert_offsets!(SockKey {
        local: 0,
        remote: 16,
        local_port: 32,
        remote_port: 34
    });
    assert_offsets!(FastPathStats { packets: 0, bytes: 8 });
    assert_offsets!(PodDev {
        ifindex: 0,
        mac: 4,
        _pad: 10
    });
    assert_offsets!(CaptureStats {
        redirected: 0,
        same_node: 8,
        passthrough: 16,
        failed_open: 24,
        denied: 32,
        events_dropped: 40,
        load_balanced: 48,
        no_endpoint: 56,
        no_relay: 64,
        inbound_refused: 72,
        inbound_unattested: 80,
        inbound_redropped: 88,
    });
    assert_offsets!(AdmitKey {
        peer: 0,
        local: 16,
        peer_port: 32,
        local_port: 34,
        protocol: 36,
        _pad: 37
    });
    assert_offsets!(Admit {
        until_ns: 0,
        by: 8,
        _pad: 12
    });
    assert_offsets!(UdpSlot {
        addr: 0,
        port: 16,
        state: 18,
        _pad: 19
    });
    assert_offsets!(UdpSenderKey {
        workload_id: 0,
        slot: 4
    });
    assert_offsets!(PolicyEvent {
        time_ns: 0,
        workload_id: 8,
        src_identity: 12,
        dst_identity: 16,
        dst_port: 20,
        protocol: 22,
        verdict: 23,
        generation: 24,
        kind: 28,
        mode: 29,
        src_port: 30,
        dst: 32,
        src: 48,
    });
    assert_offsets!(PodFlow {
        key: 0,
        is_client: 8,
        _pad: 12
    });
    assert_offsets!(TrafficKey {
        client_workload: 0,
        server_workload: 4
    });
    assert_offsets!(TrafficStats {
        opened: 0,
        closed: 8,
        sent_bytes: 16,
        received_bytes: 24
    });
    assert_offsets!(ServiceKey {
        vip: 0,
        port: 16,
        protocol: 18,
        _pad: 19
    });
    assert_offsets!(ServiceValue {
        service_id: 0,
        generation: 4,
        slots: 8,
        flags: 12
    });
    assert_offsets!(BackendKey {
        service_id: 0,
        generation: 4,
        slot: 8,
        _pad: 12
    });
    assert_offsets!(Backend {
        addr: 0,
        port: 16,
        relay_port: 18
    });
    assert_offsets!(UdpPeerKey {
        cookie: 0,
        addr: 8,
        port: 24,
        _pad: 26,
        _pad2: 28
    });
    assert_offsets!(UdpService {
        vip: 0,
        port: 16,
        _pad: 18
    });
};

const _: () = {
    assert!(core::mem::size_of::<Addr>() == 16);
    assert!(core::mem::size_of::<Workload>() == 32);
    assert!(core::mem::size_of::<UdpFlowKey>() == 36);
    assert!(core::mem::size_of::<Endpoint>() == 16);
    assert!(core::mem::size_of::<Config>() == 56);
    assert!(core::mem::size_of::<PolicyKey>() == 16);
    assert!(core::mem::size_of::<PolicyValue>() == 8);
    assert!(core::mem::size_of::<OrigDst>() == 24);
    assert!(core::mem::size_of::<SockKey>() == 36);
    assert!(core::mem::size_of::<FastPathStats>() == 16);
    assert!(core::mem::size_of::<PodDev>() == 12);
    assert!(core::mem::size_of::<CaptureStats>() == 96);
    assert!(core::mem::size_of::<UdpSlot>() == 20);
    assert!(core::mem::size_of::<UdpSenderKey>() == 8);
    assert!(core::mem::size_of::<PolicyEvent>() == 64);
    assert!(core::mem::size_of::<AdmitKey>() == 40);
    assert!(core::mem::size_of::<Admit>() == 16);
    assert!(core::mem::size_of::<PodFlow>() == 16);
    assert!(core::mem::size_of::<TrafficKey>() == 8);
    assert!(core::mem::size_of::<TrafficStats>() == 32);
    assert!(core::mem::size_of::<ServiceKey>() == 20);
    assert!(core::mem::size_of::<ServiceValue>() == 16);
    assert!(core::mem::size_of::<BackendKey>() == 16);
    assert!(core::mem::size_of::<Backend>() == 20);
    assert!(core::mem::size_of::<UdpPeerKey>() == 32);
    assert!(core::mem::size_of::<UdpService>() == 20);
};

#[cfg(feature = "user")]
mod user {
    // SAFETY (for all impls): plain #[repr(C)] integers with explicit padding,
    // valid for every bit pattern, as aya::Pod requires.
    #![allow(unsafe_code)]
    use super::*;
    unsafe impl aya::Pod for Addr {}
    unsafe impl aya::Pod for Workload {}
    unsafe impl aya::Pod for Endpoint {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for OrigDst {}
    unsafe impl aya::Pod for SockKey {}
    unsafe impl aya::Pod for FastPathStats {}
    unsafe impl aya::Pod for PodDev {}
    unsafe impl aya::Pod for CaptureStats {}
    unsafe impl aya::Pod for PolicyKey {}
    unsafe impl aya::Pod for PolicyValue {}
    unsafe impl aya::Pod for PolicyEvent {}
    unsafe impl aya::Pod for PodFlow {}
    unsafe impl aya::Pod for TrafficKey {}
    unsafe impl aya::Pod for TrafficStats {}
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for BackendKey {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for UdpPeerKey {}
    unsafe impl aya::Pod for UdpService {}
    unsafe impl aya::Pod for UdpSlot {}
    unsafe impl aya::Pod for UdpFlowKey {}
    unsafe impl aya::Pod for UdpSenderKey {}
    unsafe impl aya::Pod for AdmitKey {}
    unsafe impl aya::Pod for Admit {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes the kernel writes (the struct's own memory) decode to the
    /// same event; any other length is refused.
    #[test]
    fn policy_events_decode_from_their_kernel_bytes() {
        let ev = PolicyEvent {
            time_ns: 0x0102_0304_0506_0708,
            workload_id: 11,
            src_identity: 22,
            dst_identity: 33,
            dst_port: 8080,
            protocol: PROTO_UDP,
            verdict: VERDICT_ALLOW,
            generation: 44,
            kind: EVENT_ADMISSION,
            mode: ADMISSION_STRICT,
            src_port: 40000,
            dst: Addr::from(core::net::IpAddr::from([0x2001, 2, 0, 2, 0, 0, 0, 0x10])),
            src: Addr::from(core::net::IpAddr::from([198, 18, 0, 11])),
        };
        let mut bytes = [0u8; core::mem::size_of::<PolicyEvent>()];
        // What the ring buffer carries: the struct's bytes as laid out.
        bytes[0..8].copy_from_slice(&ev.time_ns.to_ne_bytes());
        bytes[8..12].copy_from_slice(&ev.workload_id.to_ne_bytes());
        bytes[12..16].copy_from_slice(&ev.src_identity.to_ne_bytes());
        bytes[16..20].copy_from_slice(&ev.dst_identity.to_ne_bytes());
        bytes[20..22].copy_from_slice(&ev.dst_port.to_ne_bytes());
        bytes[22] = ev.protocol;
        bytes[23] = ev.verdict;
        bytes[24..28].copy_from_slice(&ev.generation.to_ne_bytes());
        bytes[28] = ev.kind;
        bytes[29] = ev.mode;
        bytes[30..32].copy_from_slice(&ev.src_port.to_ne_bytes());
        for (i, w) in ev.dst.words.iter().enumerate() {
            bytes[32 + 4 * i..36 + 4 * i].copy_from_slice(&w.to_ne_bytes());
        }
        for (i, w) in ev.src.words.iter().enumerate() {
            bytes[48 + 4 * i..52 + 4 * i].copy_from_slice(&w.to_ne_bytes());
        }
        assert_eq!(PolicyEvent::decode(&bytes), Some(ev));
        assert_eq!(PolicyEvent::decode(&bytes[..63]), None);
    }

    /// IPv4 is keyed in its mapped form, and comes back as IPv4.
    #[test]
    fn addresses_key_both_families() {
        use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};
        let v4 = IpAddr::V4(Ipv4Addr::new(198, 18, 1, 10));
        let a = Addr::from(v4);
        assert!(a.is_ipv4());
        assert_eq!(a, Addr::from_ipv4_be(u32::from_ne_bytes([198, 18, 1, 10])));
        assert_eq!(
            a,
            Addr::from(IpAddr::V6(Ipv4Addr::new(198, 18, 1, 10).to_ipv6_mapped()))
        );
        assert_eq!(IpAddr::from(a), v4);
        let v6 = IpAddr::V6("2001:2:0:1::10".parse::<Ipv6Addr>().unwrap());
        assert!(!Addr::from(v6).is_ipv4());
        assert_eq!(IpAddr::from(Addr::from(v6)), v6);
        assert!(Addr::from(IpAddr::V6(Ipv6Addr::LOCALHOST)).is_loopback());
        assert!(Addr::from(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))).is_loopback());
        assert!(!a.is_loopback());
    }
}
