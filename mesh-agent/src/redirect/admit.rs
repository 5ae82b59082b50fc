//! `mesh_admit` from userspace: the agent vouches for the flows it opens
//! to pods of this node (tunneled flows it authorized), so strict inbound
//! admission lets them in (mesh-ebpf `inbound.rs`).
use std::{net::SocketAddr, time::Duration};

use mesh_common::{ADMIT_BY_AGENT, Addr, Admit, AdmitKey, maps};

use super::{Redirect, RedirectError, monotonic_ns};

/// The flow from `from` (our socket) to `to` (the pod), as the pod sees it.
pub fn admit_key(from: SocketAddr, to: SocketAddr, protocol: u8) -> AdmitKey {
    AdmitKey {
        peer: Addr::from(from.ip()),
        local: Addr::from(to.ip()),
        peer_port: from.port(),
        local_port: to.port(),
        protocol,
        _pad: [0; 3],
    }
}

impl Redirect {
    /// Vouches for `key` for `ttl` (None: until [`Redirect::unvouch`]).
    pub fn vouch(&self, key: &AdmitKey, ttl: Option<Duration>) -> Result<(), RedirectError> {
        let until_ns = ttl.map_or(u64::MAX, |t| monotonic_ns() + t.as_nanos() as u64);
        let admit = Admit {
            until_ns,
            by: ADMIT_BY_AGENT,
            _pad: 0,
        };
        self.admit
            .lock()
            .expect("admit lock")
            .insert(key, &admit, 0)
            .map_err(|err| RedirectError::Map { name: maps::ADMIT, err })
    }

    pub fn unvouch(&self, key: &AdmitKey) {
        let _ = self.admit.lock().expect("admit lock").remove(key);
    }
}
