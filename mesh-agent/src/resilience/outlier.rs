//! Outlier detection on the client's node: an endpoint that fails
//! `consecutive_failures` requests in a row (a failed connect or a 5xx) is
//! ejected: the routing skips it for the ejection time, which doubles each
//! time it is ejected again (up to the maximum). When the time is up, one
//! request is let through as a probe; its success returns the endpoint to
//! service, its failure ejects it again for longer.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::traffic_policy::Outlier;

/// A probe that never reported (its request was dropped before it was
/// sent) frees its endpoint for another probe after this.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
struct Health {
    consecutive: u32,
    /// Times ejected since it last succeeded.
    ejections: u32,
    ejected_until: Option<Instant>,
    /// When the current probe was let through.
    probing_since: Option<Instant>,
}

#[derive(Debug)]
pub struct Ejections {
    pub settings: Outlier,
    endpoints: Mutex<HashMap<SocketAddr, Health>>,
}

/// What one outcome changed.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    None,
    /// Ejected for this long.
    Ejected(Duration),
    /// Its probe succeeded: back in service.
    Restored,
}

/// An ejected endpoint, for status.
pub struct Ejected {
    pub endpoint: SocketAddr,
    /// Until its next probe is due.
    pub left: Duration,
    pub times: u32,
}

impl Ejections {
    pub fn new(settings: Outlier) -> Ejections {
        Ejections {
            settings,
            endpoints: Mutex::default(),
        }
    }

    /// Whether a request may go to `endpoint` now; a due probe is claimed.
    pub fn usable(&self, endpoint: SocketAddr) -> bool {
        let mut all = self.endpoints.lock().expect("ejections lock");
        let Some(h) = all.get_mut(&endpoint) else {
            return true;
        };
        let now = Instant::now();
        match h.ejected_until {
            None => true,
            Some(until) if now < until => false,
            Some(_) if h.probing_since.is_some_and(|s| now - s < PROBE_TIMEOUT) => false,
            Some(_) => {
                h.probing_since = Some(now);
                true
            }
        }
    }

    /// Counts the outcome of one request to `endpoint`.
    pub fn record(&self, endpoint: SocketAddr, failed: bool) -> Change {
        let mut all = self.endpoints.lock().expect("ejections lock");
        let h = all.entry(endpoint).or_default();
        let probe = h.probing_since.is_some();
        if h.ejected_until.is_some() && !probe {
            // A request sent before the ejection: the probe decides.
            return Change::None;
        }
        if !failed {
            let restored = probe;
            all.remove(&endpoint);
            return if restored { Change::Restored } else { Change::None };
        }
        h.consecutive += 1;
        if !probe && h.consecutive < self.settings.consecutive_failures {
            return Change::None;
        }
        h.ejections += 1;
        let doubled = self
            .settings
            .base_ejection
            .saturating_mul(1 << (h.ejections - 1).min(20));
        let time = doubled.min(self.settings.max_ejection);
        h.ejected_until = Some(Instant::now() + time);
        h.probing_since = None;
        Change::Ejected(time)
    }

    pub fn ejected(&self) -> Vec<Ejected> {
        let now = Instant::now();
        let all = self.endpoints.lock().expect("ejections lock");
        let mut out: Vec<Ejected> = all
            .iter()
            .filter_map(|(e, h)| {
                h.ejected_until.map(|until| Ejected {
                    endpoint: *e,
                    left: until.saturating_duration_since(now),
                    times: h.ejections,
                })
            })
            .collect();
        out.sort_by_key(|e| e.endpoint);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_is_ejected_after_its_failures_then_probed_back_with_growing_times() {
        let e = Ejections::new(Outlier {
            consecutive_failures: 3,
            base_ejection: Duration::from_millis(30),
            max_ejection: Duration::from_millis(50),
        });
        let a: SocketAddr = "198.18.1.2:80".parse().unwrap();
        assert_eq!(e.record(a, true), Change::None);
        assert_eq!(e.record(a, false), Change::None, "a success resets the count");
        assert_eq!(e.record(a, true), Change::None);
        assert_eq!(e.record(a, true), Change::None);
        assert_eq!(e.record(a, true), Change::Ejected(Duration::from_millis(30)));
        assert!(!e.usable(a));
        assert_eq!(e.record(a, true), Change::None, "in-flight outcomes do not extend it");
        std::thread::sleep(Duration::from_millis(35));
        assert!(e.usable(a), "the probe is let through");
        assert!(!e.usable(a), "one probe at a time");
        assert_eq!(
            e.record(a, true),
            Change::Ejected(Duration::from_millis(50)),
            "doubled, capped"
        );
        std::thread::sleep(Duration::from_millis(55));
        assert!(e.usable(a));
        assert_eq!(e.record(a, false), Change::Restored);
        assert!(e.usable(a) && e.ejected().is_empty());
    }
}
