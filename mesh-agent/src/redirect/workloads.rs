//! `mesh_workloads` (this node's pods by cgroup id), `mesh_endpoints`
//! (every pod by address) and the pruning of `mesh_traffic`.
use std::collections::{BTreeMap, BTreeSet};

use mesh_common::{Addr, Endpoint, TrafficKey, Workload, maps};

use super::{Redirect, RedirectError, replace_all};
use crate::tables::{EndpointRow, WorkloadRow};

impl Redirect {
    /// Makes `mesh_workloads` and `mesh_endpoints` hold exactly these rows,
    /// and forgets traffic counters of workloads no longer present.
    pub fn sync_workloads(&self, workloads: &[WorkloadRow], endpoints: &[EndpointRow]) -> Result<(), RedirectError> {
        let want_workloads: BTreeMap<u64, Workload> = workloads
            .iter()
            .map(|w| {
                (
                    w.cgroup_id,
                    Workload {
                        workload_id: w.workload_id,
                        ipv4: w.ipv4.map_or(0, |ip| u32::from_ne_bytes(ip.octets())),
                        identity_id: w.identity_id,
                        admission: w.admission,
                        _pad: [0; 3],
                        ipv6: w
                            .ipv6
                            .map_or(Addr::UNSPECIFIED, |ip| Addr::from(std::net::IpAddr::V6(ip))),
                    },
                )
            })
            .collect();
        let want_endpoints: BTreeMap<Addr, Endpoint> = endpoints
            .iter()
            .map(|e| {
                (
                    Addr::from(e.ip),
                    Endpoint {
                        workload_id: e.workload_id,
                        node_id: 0,
                        same_node: u32::from(e.same_node),
                        identity_id: e.identity_id,
                    },
                )
            })
            .collect();
        replace_all(
            &mut self.workloads.lock().expect("lock"),
            &want_workloads,
            maps::WORKLOADS,
        )?;
        replace_all(
            &mut self.endpoints.lock().expect("lock"),
            &want_endpoints,
            maps::ENDPOINTS,
        )?;
        self.prune_traffic(&endpoints.iter().map(|e| e.workload_id).collect());
        Ok(())
    }

    /// Forgets the pairs of workloads that no longer exist, so a node's
    /// pod churn cannot fill `mesh_traffic` (16,384 pairs).
    fn prune_traffic(&self, live: &BTreeSet<u32>) {
        let mut map = self.traffic.lock().expect("traffic lock");
        let gone: Vec<TrafficKey> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !live.contains(&k.client_workload) || !live.contains(&k.server_workload))
            .collect();
        for k in gone {
            let _ = map.remove(&k);
        }
    }
}
