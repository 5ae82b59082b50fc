//! The kernel's own counters, summed over CPUs.
use mesh_common::{CaptureStats, FastPathStats, TrafficKey, TrafficStats};

use super::Redirect;

impl Redirect {
    pub fn fast_path_stats(&self) -> FastPathStats {
        let mut total = FastPathStats::default();
        if let Ok(per_cpu) = self.fast_stats.get(&0, 0) {
            for s in per_cpu.iter() {
                total.packets += s.packets;
                total.bytes += s.bytes;
            }
        }
        total
    }

    /// Same-node traffic per workload pair (`mesh_traffic`), summed over CPUs.
    pub fn traffic_stats(&self) -> Vec<(TrafficKey, TrafficStats)> {
        let map = self.traffic.lock().expect("traffic lock");
        map.iter()
            .filter_map(Result::ok)
            .map(|(key, per_cpu)| {
                let total = per_cpu.iter().fold(TrafficStats::default(), |mut t, s| {
                    t.opened += s.opened;
                    t.closed += s.closed;
                    t.sent_bytes += s.sent_bytes;
                    t.received_bytes += s.received_bytes;
                    t
                });
                (key, total)
            })
            .collect()
    }

    pub fn capture_stats(&self) -> CaptureStats {
        let mut total = CaptureStats::default();
        if let Ok(per_cpu) = self.capture.get(&0, 0) {
            for s in per_cpu.iter() {
                total.redirected += s.redirected;
                total.same_node += s.same_node;
                total.passthrough += s.passthrough;
                total.failed_open += s.failed_open;
                total.denied += s.denied;
                total.events_dropped += s.events_dropped;
                total.load_balanced += s.load_balanced;
                total.no_endpoint += s.no_endpoint;
                total.no_relay += s.no_relay;
            }
        }
        total
    }
}
