//! A compiled policy lowered to `mesh_policy` rows, for `connect()`.
use std::collections::BTreeSet;

use super::model::{Policy, PortRule};
use crate::tables::PolicyRow;

impl Policy {
    /// Kernel allow rules: (source identity id, destination identity id,
    /// port or ANY_PORT, protocol, allowing target index, flags). Flags say
    /// HTTP rules apply: conservatively, whenever any allowing target of the
    /// identity pair has HTTP rules, so the agent sees those flows.
    pub fn kernel_rules(&self) -> Vec<PolicyRow> {
        let mut out: Vec<PolicyRow> = Vec::new();
        for (i, t) in self.targets.iter().enumerate() {
            let dst = t.destination.kernel_id();
            let flags = if t.http.is_empty() {
                0
            } else {
                mesh_common::POLICY_FLAG_HTTP
            };
            for s in &t.sources {
                let src = s.kernel_id();
                let mut push = |rules: &[PortRule], proto: u8| {
                    for r in rules {
                        match &r.ports {
                            None => out.push(PolicyRow {
                                src,
                                dst,
                                port: mesh_common::ANY_PORT,
                                proto,
                                rule: i as u32,
                                flags,
                            }),
                            Some(ports) => out.extend(ports.iter().map(|p| PolicyRow {
                                src,
                                dst,
                                port: *p,
                                proto,
                                rule: i as u32,
                                flags,
                            })),
                        }
                    }
                };
                push(&t.tcp, mesh_common::PROTO_TCP);
                push(&t.udp, mesh_common::PROTO_UDP);
                if t.tcp.is_empty() && t.udp.is_empty() && !t.http.is_empty() {
                    out.push(PolicyRow {
                        src,
                        dst,
                        port: mesh_common::ANY_PORT,
                        proto: mesh_common::PROTO_TCP,
                        rule: i as u32,
                        flags,
                    });
                }
            }
        }
        let http_pairs: BTreeSet<(u32, u32, u8)> = out
            .iter()
            .filter(|r| r.flags != 0)
            .map(|r| (r.src, r.dst, r.proto))
            .collect();
        for r in &mut out {
            if http_pairs.contains(&(r.src, r.dst, r.proto)) {
                r.flags = mesh_common::POLICY_FLAG_HTTP;
            }
        }
        out.sort();
        out.dedup_by(|a, b| (a.src, a.dst, a.port, a.proto) == (b.src, b.dst, b.port, b.proto));
        out
    }
}
