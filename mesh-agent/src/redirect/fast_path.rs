//! The same-node fast path: `mesh_pod_devs` and one TCX ingress link of
//! `mesh_fast_path` per enrolled pod's host-side veth.
//!
//! The links belong to this agent and are not pinned: when it exits they
//! go with it and same-node packets take the bridge again, slower and
//! never wrong. During a rolling restart both agents' links are attached
//! for a moment; whichever runs first delivers, to the same place.
use std::collections::BTreeMap;

use aya::{
    maps::{HashMap, MapData},
    programs::{LinkOrder, NetworkInterface, SchedClassifier, TcAttach, TcAttachType, tc::SchedClassifierLink},
};
use mesh_common::{Addr, PodDev, maps, programs};

use super::{Redirect, RedirectError, replace_all};

/// A pod's fast-path row: its addresses and where they are delivered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FastPathRow {
    pub ips: Vec<std::net::IpAddr>,
    pub host_ifindex: u32,
    pub pod_mac: [u8; 6],
}

pub(super) struct FastPathState {
    pub devs: HashMap<MapData, Addr, PodDev>,
    /// Host-side ifindex -> our link there.
    pub links: BTreeMap<u32, SchedClassifierLink>,
    pub enabled: bool,
}

impl Redirect {
    /// Makes the fast path serve exactly these pods: a link on each one's
    /// host-side veth, and their addresses in `mesh_pod_devs`. A device
    /// the program cannot attach to is left to the bridge (logged).
    pub fn sync_fast_path(&self, rows: &[FastPathRow]) -> Result<(), RedirectError> {
        let mut state = self.fast_path.lock().expect("fast path lock");
        if !state.enabled {
            return Ok(());
        }
        let mut want_links: Vec<u32> = rows.iter().map(|r| r.host_ifindex).collect();
        want_links.sort_unstable();
        want_links.dedup();
        // Links first for new pods, entries after; entries first for gone
        // pods, links after: either way a packet finds no half state that
        // misdelivers (a missing link or entry means the bridge).
        for &ifindex in &want_links {
            if state.links.contains_key(&ifindex) {
                continue;
            }
            match self.attach_fast_path(ifindex) {
                Ok(link) => {
                    tracing::debug!(ifindex, "fast path attached");
                    state.links.insert(ifindex, link);
                }
                Err(err) => {
                    tracing::warn!(ifindex, error = %err, "cannot attach the fast path to this pod's veth: its traffic takes the bridge")
                }
            }
        }
        let want: BTreeMap<Addr, PodDev> = rows
            .iter()
            .filter(|r| state.links.contains_key(&r.host_ifindex))
            .flat_map(|r| {
                r.ips.iter().map(|ip| {
                    (
                        Addr::from(*ip),
                        PodDev {
                            ifindex: r.host_ifindex,
                            mac: r.pod_mac,
                            _pad: [0; 2],
                        },
                    )
                })
            })
            .collect();
        replace_all(&mut state.devs, &want, maps::POD_DEVS)?;
        state.links.retain(|ifindex, _| want_links.contains(ifindex));
        Ok(())
    }

    /// How many pod veths carry our fast-path link.
    pub fn fast_path_links(&self) -> usize {
        self.fast_path.lock().expect("fast path lock").links.len()
    }

    fn attach_fast_path(&self, ifindex: u32) -> Result<SchedClassifierLink, RedirectError> {
        let name = programs::FAST_PATH;
        let mut ebpf = self.ebpf.lock().expect("ebpf lock");
        let prog: &mut SchedClassifier = super::loader::program(&mut ebpf, name)?;
        let id = prog
            .attach(
                NetworkInterface::Index(ifindex),
                TcAttach::Tcx {
                    attach_type: TcAttachType::Ingress,
                    order: LinkOrder::default(),
                },
            )
            .map_err(|err| RedirectError::Program { name, err })?;
        prog.take_link(id).map_err(|err| RedirectError::Program { name, err })
    }
}
