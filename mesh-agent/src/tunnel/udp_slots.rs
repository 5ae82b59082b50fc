//! Pod-to-pod UDP across nodes, source side: the agent's relay slots.
//!
//! `mesh_sendmsg4/6` sends a datagram for a pod on another node to
//! `udp_relay_base + slot` on the agent, a slot the kernel claimed for that
//! pod address in `mesh_udp_slots`, and records the sending workload (from
//! its socket's cgroup) in `mesh_udp_sender`. Each slot port has one socket
//! per family here; a datagram is relayed only when the kernel's record
//! says the workload at its source address sent it to this slot's
//! destination, then goes over QUIC like a UDP service's ([`super::udp`]);
//! replies leave through the same slot socket, which `mesh_recvmsg4/6`
//! shows to the pod as the pod it sent to.
//!
//! Slots idle for [`SLOT_IDLE`] are retired (the kernel stops using and
//! claiming them) and freed [`RETIRE_GRACE`] later, so a datagram queued
//! for the old destination can never reach a new one.
use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use socket2::{Domain, Socket, Type};
use tokio::net::UdpSocket;

use super::udp::{MAX_UDP, Relays, TRANSPORT, send_now};

/// A slot with no datagram for this long is retired.
pub const SLOT_IDLE: Duration = Duration::from_secs(120);
/// Between retiring a slot and freeing it.
pub const RETIRE_GRACE: Duration = Duration::from_secs(5);

/// The relay slot sockets: `sockets[slot]` holds the IPv4 one and, with
/// --capture-ip6, the IPv6 one.
pub struct Slots {
    pub base: u16,
    sockets: Vec<(Arc<UdpSocket>, Option<Arc<UdpSocket>>)>,
    /// Milliseconds since `epoch` of each slot's last datagram (0: none yet).
    seen: Vec<AtomicU64>,
    epoch: Instant,
}

impl Slots {
    /// Binds every slot port on the capture addresses. SO_REUSEPORT: during
    /// a handoff the predecessor still holds them and relays its share
    /// until it exits (both read the same kernel records).
    pub fn bind(base: u16, count: u16, ip: Ipv4Addr, ip6: Option<Ipv6Addr>) -> std::io::Result<Slots> {
        let mut sockets = Vec::with_capacity(usize::from(count));
        for slot in 0..count {
            let port = base + slot;
            let v4 = bind_reuseport(SocketAddr::from((ip, port)))?;
            let v6 = ip6
                .map(|ip6| bind_reuseport(SocketAddr::from((ip6, port))))
                .transpose()?;
            sockets.push((v4, v6));
        }
        Ok(Slots {
            base,
            seen: (0..count).map(|_| AtomicU64::new(0)).collect(),
            sockets,
            epoch: Instant::now(),
        })
    }

    pub fn count(&self) -> u16 {
        self.sockets.len() as u16
    }

    /// The slot of a relay port, if it is one of these.
    pub fn slot_of(&self, port: u16) -> Option<u32> {
        let slot = port.checked_sub(self.base)?;
        (usize::from(slot) < self.sockets.len()).then_some(u32::from(slot))
    }

    /// The socket of `slot` a reply to `client` leaves through (its family).
    pub fn socket_for(&self, slot: u32, client: SocketAddr) -> Option<&Arc<UdpSocket>> {
        let (v4, v6) = self.sockets.get(slot as usize)?;
        if client.is_ipv4() { Some(v4) } else { v6.as_ref() }
    }

    fn touch(&self, slot: u32) {
        let now = self.epoch.elapsed().as_millis() as u64;
        self.seen[slot as usize].store(now.max(1), Ordering::Relaxed);
    }

    fn idle_for(&self, slot: u32) -> Option<Duration> {
        let seen = self.seen[slot as usize].load(Ordering::Relaxed);
        (seen != 0).then(|| self.epoch.elapsed().saturating_sub(Duration::from_millis(seen)))
    }
}

fn bind_reuseport(addr: SocketAddr) -> std::io::Result<Arc<UdpSocket>> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, None)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    socket.set_nonblocking(true)?;
    Ok(Arc::new(UdpSocket::from_std(socket.into())?))
}

impl Relays {
    /// Starts a reader per slot socket and the sweeper that retires idle slots.
    pub fn serve_slots(self: &Arc<Self>) {
        let Some(slots) = &self.slots else { return };
        for (slot, (v4, v6)) in slots.sockets.iter().enumerate() {
            for socket in std::iter::once(v4).chain(v6) {
                tokio::spawn(self.clone().slot_relay(slot as u32, socket.clone()));
            }
        }
        tokio::spawn(self.clone().sweep_slots());
    }

    /// Pod -> tunnel, for one slot socket.
    async fn slot_relay(self: Arc<Self>, slot: u32, socket: Arc<UdpSocket>) {
        let Some(slots) = &self.slots else { return };
        let port = slots.base + slot as u16;
        let mut buf = vec![0u8; MAX_UDP];
        loop {
            let (n, from) = match socket.recv_from(&mut buf).await {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(slot, error = %e, "udp: slot receive failed");
                    continue;
                }
            };
            slots.touch(slot);
            let client = SocketAddr::new(from.ip().to_canonical(), from.port());
            let Some(target) = self.redirect.udp_slot(slot) else {
                self.metrics.reject(TRANSPORT, "udp_free_slot");
                continue;
            };
            if let Err(why) = self.attested(client, slot, target.destination) {
                self.metrics.reject(TRANSPORT, "udp_unattested");
                tracing::warn!(%client, destination = %target.destination, slot, reason = why,
                    "udp: datagram the kernel did not see this pod send here; dropped");
                continue;
            }
            self.tunnel(client, target.destination, port, &buf[..n]);
        }
    }

    /// Whether the kernel recorded that the pod at `client` (a pod of this
    /// node) sent through `slot` to `destination`.
    fn attested(&self, client: SocketAddr, slot: u32, destination: SocketAddr) -> Result<(), &'static str> {
        let snap = self.snapshots.borrow().clone();
        let pod = snap
            .pod_by_ip(client.ip())
            .filter(|p| p.node == self.node)
            .ok_or("no pod of this node has the source address")?;
        let id = snap.workload_ids()[&pod.workload_name()];
        match self.redirect.udp_sender(id, slot) {
            Some(sent) if sent == destination => Ok(()),
            Some(_) => Err("the pod last sent through this slot to another destination"),
            None => Err("no record of the pod sending through this slot"),
        }
    }

    /// Retires slots idle for SLOT_IDLE and frees them RETIRE_GRACE later.
    async fn sweep_slots(self: Arc<Self>) {
        let Some(slots) = &self.slots else { return };
        let mut retiring: Vec<(u32, Instant)> = Vec::new();
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            retiring.retain(|&(slot, since)| {
                let done = since.elapsed() >= RETIRE_GRACE;
                if done {
                    self.redirect.free_udp_slot(slot);
                    tracing::debug!(slot, "udp: relay slot freed");
                }
                !done
            });
            for slot in 0..slots.sockets.len() as u32 {
                let Some(target) = self.redirect.udp_slot(slot) else {
                    continue;
                };
                if target.retiring {
                    continue;
                }
                match slots.idle_for(slot) {
                    // Claimed, never seen here: its idle time starts now.
                    None => slots.touch(slot),
                    Some(idle) if idle >= SLOT_IDLE => {
                        self.redirect.retire_udp_slot(slot);
                        retiring.push((slot, Instant::now()));
                        tracing::debug!(slot, destination = %target.destination, "udp: idle relay slot retired");
                    }
                    Some(_) => {}
                }
            }
        }
    }

    /// A reply for a slot: out through its socket to the client.
    pub(super) fn deliver_to_slot(&self, slot: u32, client: SocketAddr, payload: &[u8]) -> bool {
        let Some(slots) = &self.slots else { return false };
        slots
            .socket_for(slot, client)
            .is_some_and(|s| send_now(s, payload, Some(client)).is_ok())
    }
}
