//! Source ports for the agent's connects to pods of its node.
//!
//! Such a socket is bound before connect(), because the vouch names its
//! port (see `deliver`). bind() to port 0 picks a port that is free toward
//! every destination, and a TIME-WAIT socket keeps its port taken: the
//! agent closes first toward the pod whenever the client does, so after
//! ~28,000 deliveries in a minute the node's whole ephemeral range sat in
//! TIME-WAIT, for all of its pods at once (the bench's mTLS/TCP path, run
//! after QUIC's, fell to 490 conn/s with stalls of 0.6 s). A chosen port
//! bound with SO_REUSEADDR leaves the judgement to connect(), by the whole
//! 4-tuple: it refuses a port (EADDRNOTAVAIL) only while that very 4-tuple
//! is connected, or in TIME-WAIT without TCP timestamps (with them, PAWS
//! makes reusing it safe and the kernel does so for a bound port); the
//! caller then tries the next one.
use std::{
    collections::HashSet,
    fs,
    net::{IpAddr, SocketAddr},
    ops::RangeInclusive,
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

/// How many ports one connect tries before it reports exhaustion.
pub const ATTEMPTS: usize = 128;

/// How long the node's port settings are trusted before they are read again.
const REFRESH: Duration = Duration::from_secs(10);

/// The kernel's defaults, when /proc cannot be read.
const DEFAULT_RANGE: RangeInclusive<u16> = 32768..=60999;

/// The node's ephemeral range and reserved ports, as the kernel uses them
/// for its own choice (net.ipv4.ip_local_port_range, ip_local_reserved_ports;
/// both also apply to IPv6).
#[derive(Clone, Debug, PartialEq)]
pub struct PortSettings {
    pub range: RangeInclusive<u16>,
    pub reserved: Vec<RangeInclusive<u16>>,
}

impl PortSettings {
    pub fn read() -> PortSettings {
        let range = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|s| parse_range(&s))
            .unwrap_or(DEFAULT_RANGE);
        let reserved = fs::read_to_string("/proc/sys/net/ipv4/ip_local_reserved_ports")
            .map(|s| parse_reserved(&s))
            .unwrap_or_default();
        PortSettings { range, reserved }
    }

    fn usable(&self, port: u16) -> bool {
        self.range.contains(&port) && !self.reserved.iter().any(|r| r.contains(&port))
    }
}

/// "32768\t60999\n"
fn parse_range(s: &str) -> Option<RangeInclusive<u16>> {
    let mut it = s.split_whitespace().map(|n| n.parse::<u16>());
    match (it.next(), it.next()) {
        (Some(Ok(lo)), Some(Ok(hi))) if 0 < lo && lo <= hi => Some(lo..=hi),
        _ => None,
    }
}

/// "8080,9000-9010\n" (empty when none are reserved).
fn parse_reserved(s: &str) -> Vec<RangeInclusive<u16>> {
    s.trim()
        .split(',')
        .filter_map(|item| {
            let (lo, hi) = item.split_once('-').unwrap_or((item, item));
            Some(lo.trim().parse().ok()?..=hi.trim().parse().ok()?)
        })
        .collect()
}

/// A 4-tuple one of this agent's connects is bound to and still vouching
/// for: two connects on the same one would share the vouch record, and
/// the loser's cleanup would remove the winner's before its SYN is in.
type Tuple = (IpAddr, u16, SocketAddr);

/// Hands out source ports in turn over the ephemeral range.
pub struct SourcePorts {
    next: AtomicU32,
    settings: Mutex<(PortSettings, Instant)>,
    claimed: Mutex<HashSet<Tuple>>,
}

/// A claimed 4-tuple; free again when this is dropped.
pub struct Claim<'a> {
    ports: &'a SourcePorts,
    tuple: Tuple,
}

impl Claim<'_> {
    pub fn port(&self) -> u16 {
        self.tuple.1
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.ports.claimed.lock().expect("claimed lock").remove(&self.tuple);
    }
}

impl SourcePorts {
    pub fn new(settings: PortSettings) -> SourcePorts {
        SourcePorts {
            // Start anywhere, as the kernel does, so a restarted agent does
            // not walk into its predecessor's TIME-WAIT ports first.
            next: AtomicU32::new(rand::random()),
            settings: Mutex::new((settings, Instant::now())),
            claimed: Mutex::new(HashSet::new()),
        }
    }

    /// The process-wide instance, reading the node's settings.
    pub fn global() -> &'static SourcePorts {
        static PORTS: std::sync::LazyLock<SourcePorts> =
            std::sync::LazyLock::new(|| SourcePorts::new(PortSettings::read()));
        &PORTS
    }

    fn settings(&self) -> PortSettings {
        let mut held = self.settings.lock().expect("settings lock");
        if held.1.elapsed() > REFRESH {
            *held = (PortSettings::read(), Instant::now());
        }
        held.0.clone()
    }

    /// The next usable port from `source` toward `dst` that no other
    /// connect of this agent holds; None when the range has none.
    pub fn claim(&self, source: IpAddr, dst: SocketAddr) -> Option<Claim<'_>> {
        let settings = self.settings();
        let (lo, hi) = (*settings.range.start() as u32, *settings.range.end() as u32);
        let span = hi - lo + 1;
        for _ in 0..span {
            let port = (lo + self.next.fetch_add(1, Ordering::Relaxed) % span) as u16;
            if !settings.usable(port) {
                continue;
            }
            let tuple = (source, port, dst);
            if self.claimed.lock().expect("claimed lock").insert(tuple) {
                return Some(Claim { ports: self, tuple });
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nodes_port_settings_are_parsed_as_the_kernel_writes_them() {
        assert_eq!(parse_range("32768\t60999\n"), Some(32768..=60999));
        assert_eq!(parse_range("1024 65535"), Some(1024..=65535));
        assert_eq!(parse_range("60999 32768"), None);
        assert_eq!(parse_range("garbage"), None);
        assert_eq!(parse_reserved("\n"), vec![]);
        assert_eq!(parse_reserved("8080,9000-9010\n"), vec![8080..=8080, 9000..=9010]);
    }

    #[test]
    fn ports_come_in_turn_skip_reserved_ones_and_are_never_handed_out_twice_at_once() {
        let ports = SourcePorts::new(PortSettings {
            range: 40000..=40003,
            reserved: vec![40001..=40001, 40005..=40009],
        });
        let (src, dst): (IpAddr, SocketAddr) = ("198.18.0.12".parse().unwrap(), "198.18.2.10:5201".parse().unwrap());
        let a = ports.claim(src, dst).unwrap();
        let b = ports.claim(src, dst).unwrap();
        let c = ports.claim(src, dst).unwrap();
        let mut held = vec![a.port(), b.port(), c.port()];
        held.sort();
        assert_eq!(held, vec![40000, 40002, 40003]);
        // All three are held toward dst; another destination shares them.
        assert!(ports.claim(src, dst).is_none());
        let other: SocketAddr = "198.18.2.11:5201".parse().unwrap();
        assert!(ports.claim(src, other).is_some());
        // Released, a port is handed out again.
        let freed = b.port();
        drop(b);
        assert_eq!(ports.claim(src, dst).unwrap().port(), freed);
    }
}
