//! `mesh_policy` and the policy half of `mesh_config`: a new generation is
//! written, switched to in one write, then the old one deleted.
use aya::maps::{HashMap, MapData};
use mesh_common::{POLICY_CAPACITY, PolicyKey, PolicyValue, maps};

use super::{Redirect, RedirectError};
use crate::tables::PolicyRow;

pub(super) struct PolicyState {
    pub(super) map: HashMap<MapData, PolicyKey, PolicyValue>,
    pub(super) generation: u32,
    pub(super) last: Option<(Vec<PolicyRow>, bool)>,
}

impl Redirect {
    /// Puts a compiled policy in force in the kernel: the new generation's
    /// entries are written first, then `mesh_config` switches to them in
    /// one write, then the old generation's entries are deleted.
    pub fn sync_policy(&self, rules: &[PolicyRow], enforcing: bool) -> Result<(), RedirectError> {
        let mut st = self.policy.lock().expect("policy lock");
        if st.last.as_ref().is_some_and(|(r, e)| r == rules && *e == enforcing) {
            return Ok(());
        }
        if !self.owns_kernel() {
            // The successor's generation is in force; ours must not delete it.
            tracing::info!("a newer agent owns the kernel maps: this policy is left to it");
            return Ok(());
        }
        // Refused whole, before anything is written: the new generation goes
        // beside the one in force, and a half-written one would be useless.
        let in_force = match &st.last {
            Some((r, _)) => r.len(),
            None => st
                .map
                .keys()
                .filter_map(Result::ok)
                .filter(|k| k.generation == st.generation)
                .count(),
        };
        let capacity = POLICY_CAPACITY as usize;
        if rules.len() + in_force > capacity {
            return Err(RedirectError::PolicyTooLarge {
                rules: rules.len(),
                in_force,
                capacity,
            });
        }
        let generation = st.generation.wrapping_add(1).max(1);
        if let Err(e) = Self::write_generation(&mut st.map, generation, rules) {
            // Nothing of a failed generation stays behind to crowd out the next.
            let partial: Vec<PolicyKey> = st
                .map
                .keys()
                .filter_map(Result::ok)
                .filter(|k| k.generation == generation)
                .collect();
            for k in partial {
                let _ = st.map.remove(&k);
            }
            return Err(e);
        }
        {
            let mut cfg = self.config_value.lock().expect("config lock");
            cfg.policy_generation = generation;
            cfg.policy_mode = if enforcing {
                mesh_common::POLICY_ENFORCING
            } else {
                mesh_common::POLICY_OFF
            };
        }
        self.write_config()?;
        let stale: Vec<PolicyKey> = st
            .map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.generation != generation)
            .collect();
        for k in stale {
            let _ = st.map.remove(&k);
        }
        st.generation = generation;
        st.last = Some((rules.to_vec(), enforcing));
        Ok(())
    }

    fn write_generation(
        map: &mut HashMap<MapData, PolicyKey, PolicyValue>,
        generation: u32,
        rules: &[PolicyRow],
    ) -> Result<(), RedirectError> {
        for r in rules {
            let key = PolicyKey {
                generation,
                src_identity: r.src,
                dst_identity: r.dst,
                port: r.port,
                protocol: r.proto,
                _pad: 0,
            };
            map.insert(
                &key,
                &PolicyValue {
                    rule: r.rule,
                    flags: r.flags,
                },
                0,
            )
            .map_err(|err| RedirectError::Map {
                name: maps::POLICY,
                err,
            })?;
        }
        Ok(())
    }
}
