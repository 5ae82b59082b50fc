//! `mesh_services` and `mesh_backends`: the services' slot tables, each
//! switched to a new generation in one write.
use std::collections::{BTreeMap, HashSet};

use aya::maps::{HashMap, MapData};
use mesh_common::{Addr, Backend, BackendKey, ServiceKey, ServiceValue, maps};

use super::{Redirect, RedirectError};
use crate::tables::ServiceTable;

pub(super) struct ServiceState {
    pub(super) services: HashMap<MapData, ServiceKey, ServiceValue>,
    pub(super) backends: HashMap<MapData, BackendKey, Backend>,
    /// What this agent wrote, so an unchanged table is not rewritten.
    pub(super) written: BTreeMap<ServiceKey, (ServiceValue, Vec<Slot>)>,
    pub(super) swept: bool,
}

/// A written slot: endpoint IP, target port, UDP relay port (0: none).
type Slot = (std::net::IpAddr, u16, u16);

fn delete_slots(backends: &mut HashMap<MapData, BackendKey, Backend>, old: &ServiceValue, n: usize) {
    for slot in 0..n as u32 {
        let _ = backends.remove(&BackendKey {
            service_id: old.service_id,
            generation: old.generation,
            slot,
            _pad: 0,
        });
    }
}

impl Redirect {
    /// Puts the services' slot tables in force. A changed table is written
    /// under a new generation, switched to in one write of its
    /// `mesh_services` entry, then the old slots are deleted: a connect sees
    /// the old table or the new one, never a mix. Services that are gone
    /// are removed (their VIPs are no longer translated).
    pub fn sync_services(&self, tables: &[ServiceTable]) -> Result<usize, RedirectError> {
        let mut st = self.services.lock().expect("services lock");
        let mut want = BTreeMap::new();
        for t in tables {
            let key = ServiceKey {
                vip: Addr::from(t.vip),
                port: t.port,
                protocol: t.protocol,
                _pad: 0,
            };
            want.insert(key, t);
        }
        let mut changed = 0;
        for (key, t) in &want {
            let slots: Vec<Slot> = t
                .slots
                .iter()
                .map(|(ip, port)| {
                    let relay = t.relays.get(&std::net::SocketAddr::new(*ip, *port));
                    (*ip, *port, relay.copied().unwrap_or(0))
                })
                .collect();
            let previous = st.written.get(key).cloned();
            let flags = if t.via_agent { mesh_common::SERVICE_VIA_AGENT } else { 0 };
            if previous
                .as_ref()
                .is_some_and(|(v, written)| *written == slots && v.flags == flags)
            {
                continue;
            }
            // After a restart the pinned entry tells which generation is live.
            let live = previous
                .as_ref()
                .map(|(v, _)| v.generation)
                .or_else(|| st.services.get(key, 0).ok().map(|v| v.generation));
            let generation = live.map_or(1, |g| g.wrapping_add(1).max(1));
            let value = ServiceValue {
                service_id: t.id(),
                generation,
                slots: slots.len() as u32,
                flags,
            };
            for (i, (ip, port, relay_port)) in slots.iter().enumerate() {
                let slot = BackendKey {
                    service_id: value.service_id,
                    generation,
                    slot: i as u32,
                    _pad: 0,
                };
                let backend = Backend {
                    addr: Addr::from(*ip),
                    port: *port,
                    relay_port: *relay_port,
                };
                st.backends
                    .insert(&slot, &backend, 0)
                    .map_err(|err| RedirectError::Map {
                        name: maps::BACKENDS,
                        err,
                    })?;
            }
            st.services.insert(key, &value, 0).map_err(|err| RedirectError::Map {
                name: maps::SERVICES,
                err,
            })?;
            if let Some((old, slots)) = &previous {
                delete_slots(&mut st.backends, old, slots.len());
            }
            st.written.insert(*key, (value, slots));
            changed += 1;
        }
        if !st.swept {
            // First sync after a restart: drop what an earlier agent pinned
            // that is not in force now (old generations, removed services).
            let stale: Vec<ServiceKey> = st
                .services
                .keys()
                .filter_map(Result::ok)
                .filter(|k| !want.contains_key(k))
                .collect();
            for k in stale {
                let _ = st.services.remove(&k);
            }
            let live: HashSet<(u32, u32)> = st.written.values().map(|(v, _)| (v.service_id, v.generation)).collect();
            let orphans: Vec<BackendKey> = st
                .backends
                .keys()
                .filter_map(Result::ok)
                .filter(|k| !live.contains(&(k.service_id, k.generation)))
                .collect();
            for k in orphans {
                let _ = st.backends.remove(&k);
            }
            st.swept = true;
        }
        let gone: Vec<ServiceKey> = st.written.keys().filter(|k| !want.contains_key(k)).copied().collect();
        for key in gone {
            let _ = st.services.remove(&key);
            if let Some((old, slots)) = st.written.remove(&key) {
                delete_slots(&mut st.backends, &old, slots.len());
            }
            changed += 1;
        }
        Ok(changed)
    }
}
