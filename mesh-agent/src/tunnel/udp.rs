//! UDP services across nodes, carried as QUIC datagrams.
//!
//! Source side ([`Relays`]): for every endpoint of a UDP service that runs
//! on another node, the agent binds a relay socket and writes its port into
//! the service's kernel slots; `mesh_sendmsg4` addresses datagrams for that
//! endpoint to it. A relay socket therefore knows the destination without
//! any per-datagram record, and the sender's address names the client pod.
//! Each datagram goes, as one [`UdpDatagram`], over the QUIC connection of
//! (client identity, endpoint identity, node); replies come back the same
//! way and leave through the same relay socket, which `mesh_recvmsg4` shows
//! to the client as the VIP.
//!
//! Destination side ([`serve_datagrams`]): per QUIC connection, one session
//! per (client, endpoint): policy is checked when it starts (UDP, the
//! endpoint's port), a socket connected to the pod carries the datagrams,
//! and its replies go back on the same connection. Sessions idle for
//! [`SESSION_IDLE`] are closed.
use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use prost::Message as _;
use quinn::Connection;
use tokio::{net::UdpSocket, task::AbortHandle};

use super::udp_slots::Slots;
use super::{PeerKey, TunnelMetrics, header::UdpDatagram, inbound::Inbound, quic::Quic};
use crate::{identity::SpiffeId, redirect::Redirect, state::SnapshotRx, tables::ServiceTable};

pub(super) const TRANSPORT: &str = "quic";
/// A (client, endpoint) pair with no datagram for this long is forgotten.
pub const SESSION_IDLE: Duration = Duration::from_secs(30);
pub(super) const MAX_UDP: usize = 65_535;

/// One relay socket, bound to the agent's address, for one remote endpoint.
struct Relay {
    socket: Arc<UdpSocket>,
    port: u16,
    task: AbortHandle,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The source side: relay sockets by remote endpoint.
pub struct Relays {
    ip: Ipv4Addr,
    ip6: Option<Ipv6Addr>,
    pub(super) node: String,
    trust_domain: String,
    tunnel_port: u16,
    pub(super) snapshots: SnapshotRx,
    /// Pod-to-pod relay slots (`super::udp_slots`), when configured.
    pub(super) slots: Option<Slots>,
    pub(super) redirect: Arc<Redirect>,
    quic: Arc<Quic>,
    pub(super) metrics: TunnelMetrics,
    relays: Mutex<HashMap<SocketAddr, Relay>>,
}

/// Where the source side's relays listen and what they read.
pub struct RelaySetup {
    /// The agent addresses the kernel rewrites to (`--capture-ip`, `--capture-ip6`).
    pub capture: (Ipv4Addr, Option<Ipv6Addr>),
    pub node: String,
    pub trust_domain: String,
    pub tunnel_port: u16,
    /// The pod-to-pod relay slots, bound (`Slots::bind`).
    pub slots: Option<Slots>,
    pub redirect: Arc<Redirect>,
}

impl Relays {
    pub fn new(setup: RelaySetup, snapshots: SnapshotRx, quic: Arc<Quic>, metrics: TunnelMetrics) -> Arc<Self> {
        let (ip, ip6) = setup.capture;
        let relays = Arc::new(Relays {
            ip,
            ip6,
            node: setup.node,
            trust_domain: setup.trust_domain,
            tunnel_port: setup.tunnel_port,
            snapshots,
            slots: setup.slots,
            redirect: setup.redirect,
            quic: quic.clone(),
            metrics,
            relays: Mutex::default(),
        });
        let sink = Arc::downgrade(&relays);
        quic.on_datagram(Arc::new(move |datagram| {
            if let Some(relays) = sink.upgrade() {
                relays.deliver(datagram);
            }
        }));
        relays
    }

    /// Fills each UDP table's relay ports: a relay socket for every
    /// endpoint on another node (bound on first need), none for the rest.
    /// Sockets no table needs any more are closed.
    pub fn assign(self: &Arc<Self>, tables: &mut [ServiceTable]) {
        let snap = self.snapshots.borrow().clone();
        let mut relays = self.relays.lock().expect("relays lock");
        let mut used = BTreeSet::new();
        for table in tables.iter_mut().filter(|t| t.protocol == mesh_common::PROTO_UDP) {
            let mut unrelayed = BTreeSet::new();
            for (ip, port) in &table.slots {
                let endpoint = SocketAddr::new(*ip, *port);
                let remote = snap.pod_by_ip(*ip).is_some_and(|p| p.node != self.node);
                if !remote {
                    continue;
                }
                let relay = match relays.get(&endpoint) {
                    Some(r) => r.port,
                    None => match self.bind(endpoint) {
                        Ok(relay) => {
                            let port = relay.port;
                            relays.insert(endpoint, relay);
                            port
                        }
                        Err(e) => {
                            tracing::error!(%endpoint, error = %e, "udp: cannot bind a relay socket on the capture address; this endpoint gets no datagrams until it can");
                            unrelayed.insert((*ip, *port));
                            continue;
                        }
                    },
                };
                table.relays.insert(endpoint, relay);
                used.insert(endpoint);
            }
            // Never untunneled: without its relay an endpoint leaves the table.
            table.slots.retain(|s| !unrelayed.contains(s));
        }
        relays.retain(|e, _| used.contains(e));
    }

    fn bind(self: &Arc<Self>, endpoint: SocketAddr) -> std::io::Result<Relay> {
        // Where the kernel sends this endpoint's datagrams (connect4.rs,
        // agent_address): the IPv6 capture address for an IPv6 endpoint,
        // if the node has one, else the IPv4 one.
        let on: IpAddr = match (endpoint, self.ip6) {
            (SocketAddr::V6(_), Some(ip6)) => ip6.into(),
            _ => self.ip.into(),
        };
        let std = std::net::UdpSocket::bind((on, 0))?;
        std.set_nonblocking(true)?;
        let port = std.local_addr()?.port();
        let socket = Arc::new(UdpSocket::from_std(std)?);
        let task = tokio::spawn(self.clone().relay(endpoint, socket.clone())).abort_handle();
        tracing::info!(%endpoint, relay_port = port, "udp: relay socket for a remote endpoint");
        Ok(Relay { socket, port, task })
    }

    /// Pod -> tunnel, for one endpoint.
    async fn relay(self: Arc<Self>, endpoint: SocketAddr, socket: Arc<UdpSocket>) {
        let port = socket.local_addr().map_or(0, |a| a.port());
        let mut buf = vec![0u8; MAX_UDP];
        loop {
            let (n, from) = match socket.recv_from(&mut buf).await {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(%endpoint, error = %e, "udp: relay receive failed");
                    continue;
                }
            };
            let client = SocketAddr::new(from.ip().to_canonical(), from.port());
            self.tunnel(client, endpoint, port, &buf[..n]);
        }
    }

    /// One datagram of a client pod of this node to a remote endpoint,
    /// which came in on the agent's `relay_port`: over QUIC.
    pub(super) fn tunnel(&self, client: SocketAddr, endpoint: SocketAddr, relay_port: u16, payload: &[u8]) {
        let Some(key) = self.key(client, endpoint) else {
            self.metrics.reject(TRANSPORT, "udp_unknown_client");
            tracing::warn!(%client, %endpoint, "udp: datagram from an address that is no meshed pod of this node; dropped");
            return;
        };
        let datagram = UdpDatagram {
            endpoint: endpoint.to_string(),
            client: client.to_string(),
            payload: payload.to_vec(),
            relay_port: u32::from(relay_port),
        };
        let quic = self.quic.clone();
        let metrics = self.metrics.clone();
        // Not inline: a first datagram waits for a handshake, and the
        // others (to this endpoint, from other clients) must not.
        tokio::spawn(async move {
            match quic.send_datagram(&key, Bytes::from(datagram.encode_to_vec())).await {
                Ok(()) => metrics.flow(TRANSPORT, "udp_out", "ok"),
                Err(e) => {
                    metrics.flow(TRANSPORT, "udp_out", "error");
                    tracing::warn!(%client, %endpoint, error = %e, "udp: datagram not tunneled; dropped");
                }
            }
        });
    }

    /// The tunnel key for a client pod of this node and a remote endpoint.
    /// The client is named by its address: pods cannot reach the relay
    /// from any other address than their own (see README, UDP services).
    fn key(&self, client: SocketAddr, endpoint: SocketAddr) -> Option<PeerKey> {
        let snap = self.snapshots.borrow().clone();
        let src = snap.pod_by_ip(client.ip()).filter(|p| p.node == self.node)?;
        let dst = snap.pod_by_ip(endpoint.ip())?;
        Some(PeerKey {
            source: SpiffeId::of(&self.trust_domain, &src.identity()).ok()?,
            destination: SpiffeId::of(&self.trust_domain, &dst.identity()).ok()?,
            node_addr: SocketAddr::from((*snap.nodes.get(&dst.node)?, self.tunnel_port)),
        })
    }

    /// Tunnel -> pod: a reply, out through the port the client sent to
    /// (a relay slot's socket, or the endpoint's relay socket).
    fn deliver(&self, datagram: Bytes) {
        let Some((msg, endpoint, client)) = decode(&datagram) else {
            self.metrics.reject(TRANSPORT, "bad_datagram");
            return;
        };
        let slot = u16::try_from(msg.relay_port)
            .ok()
            .and_then(|p| self.slots.as_ref()?.slot_of(p));
        let sent = match slot {
            Some(slot) => self.deliver_to_slot(slot, client, &msg.payload),
            None => {
                let socket = self
                    .relays
                    .lock()
                    .expect("relays lock")
                    .get(&endpoint)
                    .map(|r| r.socket.clone());
                socket.is_some_and(|s| send_now(&s, &msg.payload, Some(client)).is_ok())
            }
        };
        self.metrics
            .flow(TRANSPORT, "udp_in", if sent { "ok" } else { "dropped" });
    }
}

/// Sends without waiting: straight to the socket, not through tokio's
/// readiness (a socket tokio has not yet seen writable, as a fresh one,
/// would make `try_send` fail and lose the datagram). A full socket buffer
/// drops it, as UDP does.
pub(super) fn send_now(socket: &UdpSocket, payload: &[u8], to: Option<SocketAddr>) -> std::io::Result<usize> {
    let socket = socket2::SockRef::from(socket);
    match to {
        Some(to) => socket.send_to(payload, &to.into()),
        None => socket.send(payload),
    }
}

/// A well-formed datagram and its two addresses.
fn decode(datagram: &[u8]) -> Option<(UdpDatagram, SocketAddr, SocketAddr)> {
    let msg = UdpDatagram::decode(datagram).ok()?;
    let endpoint = msg.endpoint.parse().ok()?;
    let client = msg.client.parse().ok()?;
    Some((msg, endpoint, client))
}

/// One (client, endpoint) pair on the destination side. `socket` is None
/// when policy denied it: further datagrams are dropped without asking
/// (and auditing) again until the session expires.
struct Session {
    socket: Option<Arc<UdpSocket>>,
    last: Instant,
    replies: Option<AbortHandle>,
    /// The source agent port of the latest datagram; replies echo it.
    relay_port: Arc<AtomicU32>,
    /// The pod admits the session socket's datagrams while this lives.
    _vouched: Option<super::deliver::Vouched>,
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(t) = &self.replies {
            t.abort();
        }
    }
}

/// The destination side of one QUIC connection's datagrams, until it closes.
pub async fn serve_datagrams(inbound: Arc<Inbound>, conn: Connection, peer: SpiffeId) {
    let mut sessions: HashMap<(SocketAddr, SocketAddr), Session> = HashMap::new();
    let mut swept = Instant::now();
    while let Ok(datagram) = conn.read_datagram().await {
        let Some((msg, endpoint, client)) = decode(&datagram) else {
            inbound.metrics.reject(TRANSPORT, "bad_datagram");
            tracing::warn!(peer = %conn.remote_address(), identity = %peer, "udp: datagram does not decode; dropped");
            continue;
        };
        if swept.elapsed() > Duration::from_secs(5) {
            sessions.retain(|_, s| s.last.elapsed() < SESSION_IDLE);
            swept = Instant::now();
        }
        let session = sessions
            .entry((client, endpoint))
            .or_insert_with(|| open_session(&inbound, &conn, &peer, client, endpoint));
        session.last = Instant::now();
        session.relay_port.store(msg.relay_port, Ordering::Relaxed);
        match &session.socket {
            Some(socket) => {
                let sent = send_now(socket, &msg.payload, None).is_ok();
                inbound
                    .metrics
                    .flow(TRANSPORT, "udp_in", if sent { "ok" } else { "dropped" });
            }
            None => inbound.metrics.flow(TRANSPORT, "udp_in", "denied"),
        }
    }
}

fn open_session(
    inbound: &Inbound,
    conn: &Connection,
    peer: &SpiffeId,
    client: SocketAddr,
    endpoint: SocketAddr,
) -> Session {
    let relay_port = Arc::new(AtomicU32::new(0));
    let denied = Session {
        socket: None,
        last: Instant::now(),
        replies: None,
        relay_port: relay_port.clone(),
        _vouched: None,
    };
    if let Err(refusal) = inbound.check_udp(peer, endpoint) {
        inbound.metrics.reject(TRANSPORT, "policy");
        tracing::warn!(identity = %peer, %client, %endpoint, error = %refusal, "udp: datagrams refused");
        return denied;
    }
    let opened = super::deliver::udp_socket(&inbound.voucher, endpoint).and_then(|(s, vouched)| {
        s.set_nonblocking(true)?;
        Ok((UdpSocket::from_std(s)?, vouched))
    });
    let (socket, vouched) = match opened {
        Ok((s, vouched)) => (Arc::new(s), vouched),
        Err(e) => {
            tracing::warn!(%endpoint, error = %e, "udp: cannot open a socket to the pod");
            return denied;
        }
    };
    let replies = tokio::spawn(replies(
        socket.clone(),
        conn.clone(),
        (client, endpoint, relay_port.clone()),
        inbound.metrics.clone(),
    ));
    tracing::debug!(identity = %peer, %client, %endpoint, "udp: session opened");
    Session {
        socket: Some(socket),
        last: Instant::now(),
        replies: Some(replies.abort_handle()),
        relay_port,
        _vouched: Some(vouched),
    }
}

/// Pod -> tunnel: the endpoint's replies for one client.
async fn replies(
    socket: Arc<UdpSocket>,
    conn: Connection,
    (client, endpoint, relay_port): (SocketAddr, SocketAddr, Arc<AtomicU32>),
    metrics: TunnelMetrics,
) {
    let mut buf = vec![0u8; MAX_UDP];
    loop {
        let n = match socket.recv(&mut buf).await {
            Ok(n) => n,
            // ICMP unreachable and the like: the pod may come back.
            Err(_) => continue,
        };
        let datagram = UdpDatagram {
            endpoint: endpoint.to_string(),
            client: client.to_string(),
            payload: buf[..n].to_vec(),
            relay_port: relay_port.load(Ordering::Relaxed),
        };
        match conn.send_datagram(Bytes::from(datagram.encode_to_vec())) {
            Ok(()) => metrics.flow(TRANSPORT, "udp_out", "ok"),
            Err(quinn::SendDatagramError::ConnectionLost(_)) => return,
            Err(e) => {
                metrics.flow(TRANSPORT, "udp_out", "error");
                tracing::warn!(%endpoint, %client, error = %e, "udp: reply not tunneled; dropped");
            }
        }
    }
}
