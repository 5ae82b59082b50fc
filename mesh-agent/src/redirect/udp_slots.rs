//! `mesh_udp_slots` and `mesh_udp_sender`: the kernel claims a relay slot
//! for each remote pod address a pod sends UDP to, and records which
//! workload sent through it; the relay reads both per datagram and
//! retires slots that went idle.
use std::net::{IpAddr, SocketAddr};

use mesh_common::{UDP_SLOT_RETIRING, UdpSenderKey, UdpSlot};

use super::Redirect;

/// What one slot stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotTarget {
    pub destination: SocketAddr,
    pub retiring: bool,
}

fn target(s: &UdpSlot) -> SocketAddr {
    SocketAddr::new(IpAddr::from(s.addr), s.port)
}

impl Redirect {
    /// The remote pod address `slot` stands for, if the kernel claimed it.
    pub fn udp_slot(&self, slot: u32) -> Option<SlotTarget> {
        let map = self.udp_slots.lock().expect("udp slots lock");
        let s = map.get(&slot, 0).ok()?;
        Some(SlotTarget {
            destination: target(&s),
            retiring: s.state == UDP_SLOT_RETIRING,
        })
    }

    /// Where `workload_id` last sent through `slot`, as the kernel saw it
    /// (from the sending socket's cgroup).
    pub fn udp_sender(&self, workload_id: u32, slot: u32) -> Option<SocketAddr> {
        let map = self.udp_senders.lock().expect("udp senders lock");
        map.get(&UdpSenderKey { workload_id, slot }, 0).ok().map(|s| target(&s))
    }

    /// Marks an idle slot retiring: the kernel stops using and claiming
    /// it, while datagrams still queued for it keep their meaning.
    pub fn retire_udp_slot(&self, slot: u32) {
        let mut map = self.udp_slots.lock().expect("udp slots lock");
        if let Ok(mut s) = map.get(&slot, 0) {
            s.state = UDP_SLOT_RETIRING;
            let _ = map.insert(&slot, &s, 0);
        }
    }

    /// Frees a retired slot for the next destination.
    pub fn free_udp_slot(&self, slot: u32) {
        let mut map = self.udp_slots.lock().expect("udp slots lock");
        if map.get(&slot, 0).is_ok_and(|s| s.state == UDP_SLOT_RETIRING) {
            let _ = map.remove(&slot);
        }
    }
}
