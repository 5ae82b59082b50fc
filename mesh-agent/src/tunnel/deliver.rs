//! Connecting to a pod of this node on a flow's behalf. Strict inbound
//! admission refuses every host process's SYN or datagram to a pod, the
//! agent's included, unless the agent vouched for that exact flow first:
//! so the socket is bound before it connects (its address and port are
//! then known), the flow is written into `mesh_admit`, and only then
//! does the SYN (or the first datagram) leave. TCP source ports are
//! chosen by `source_port`.
use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use mesh_common::{AdmitKey, PROTO_TCP, PROTO_UDP};
use tokio::net::{TcpSocket, TcpStream};

use super::source_port::{self, SourcePorts};
use crate::redirect::{Redirect, admit_key};

/// Who records vouched flows: the kernel maps (`Redirect`), or nothing
/// for a tool that runs the tunnel code without kernel programs.
pub trait Voucher: Send + Sync {
    fn vouch(&self, key: &AdmitKey, ttl: Option<Duration>) -> io::Result<()>;
    fn unvouch(&self, key: &AdmitKey);
}

impl Voucher for Redirect {
    fn vouch(&self, key: &AdmitKey, ttl: Option<Duration>) -> io::Result<()> {
        Redirect::vouch(self, key, ttl).map_err(io::Error::other)
    }

    fn unvouch(&self, key: &AdmitKey) {
        Redirect::unvouch(self, key);
    }
}

/// Records nothing (no kernel programs, so no admission to pass).
pub struct NoVoucher;

impl Voucher for NoVoucher {
    fn vouch(&self, _: &AdmitKey, _: Option<Duration>) -> io::Result<()> {
        Ok(())
    }

    fn unvouch(&self, _: &AdmitKey) {}
}

/// A vouched flow; the record goes when this is dropped.
pub struct Vouched {
    redirect: Arc<dyn Voucher>,
    key: AdmitKey,
}

impl Drop for Vouched {
    fn drop(&mut self) {
        self.redirect.unvouch(&self.key);
    }
}

/// How long a TCP connect's record may admit its SYN (retransmissions
/// included); it is removed once connect() returns.
const CONNECT_VOUCH: Duration = Duration::from_secs(130);

/// Connects to `dst` (a pod of this node), vouched for, from a source
/// port chosen by `source_port` (why: see there).
pub async fn connect_tcp(redirect: &Arc<dyn Voucher>, dst: SocketAddr) -> io::Result<TcpStream> {
    let mut source = source_for(dst)?;
    let ports = SourcePorts::global();
    for _ in 0..source_port::ATTEMPTS {
        let Some(claim) = ports.claim(source, dst) else { break };
        let socket = if dst.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        match socket.bind(SocketAddr::new(source, claim.port())) {
            // A listener or a socket without SO_REUSEADDR has the port.
            Err(err) if err.kind() == io::ErrorKind::AddrInUse => continue,
            // The remembered source address has gone from the node.
            Err(err) if err.kind() == io::ErrorKind::AddrNotAvailable => {
                forget_source(dst);
                let fresh = source_for(dst)?;
                if fresh == source {
                    return Err(err);
                }
                source = fresh;
                continue;
            }
            other => other?,
        }
        let key = admit_key(socket.local_addr()?, dst, PROTO_TCP);
        redirect.vouch(&key, Some(CONNECT_VOUCH))?;
        let _vouched = Vouched {
            redirect: redirect.clone(),
            key,
        };
        match socket.connect(dst).await {
            // This 4-tuple is taken (connected, or in TIME-WAIT without timestamps).
            Err(err) if err.kind() == io::ErrorKind::AddrNotAvailable => continue,
            other => return other,
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrNotAvailable,
        format!(
            "no source port free toward {dst} from {source}: the node's ephemeral ports toward it are all taken \
             (open flows, or TIME-WAIT without TCP timestamps); check net.ipv4.ip_local_port_range and \
             net.ipv4.tcp_timestamps on the node"
        ),
    ))
}

/// A UDP socket connected to `dst` (a pod of this node), vouched for as
/// long as the returned guard lives.
pub fn udp_socket(redirect: &Arc<dyn Voucher>, dst: SocketAddr) -> io::Result<(std::net::UdpSocket, Vouched)> {
    let socket = std::net::UdpSocket::bind(SocketAddr::new(source_for(dst)?, 0))?;
    let key = admit_key(socket.local_addr()?, dst, PROTO_UDP);
    redirect.vouch(&key, None)?;
    let vouched = Vouched {
        redirect: redirect.clone(),
        key,
    };
    socket.connect(dst)?;
    Ok((socket, vouched))
}

/// The local address the kernel would send to `dst` from: a UDP socket's
/// connect() picks it by route, and sends nothing. Remembered per
/// destination for `SOURCE_TTL`: the lookup is five syscalls, and a
/// connection-per-request client pays them on every connect (the bench's
/// connection-rate run). A route change takes effect within the TTL, and
/// a source address that has gone (bind fails) is looked up again at once.
fn source_for(dst: SocketAddr) -> io::Result<IpAddr> {
    let now = Instant::now();
    let cache = SOURCES.get_or_init(Mutex::default);
    if let Some((src, at)) = cache.lock().expect("source cache").get(&dst.ip())
        && now.duration_since(*at) < SOURCE_TTL
    {
        return Ok(*src);
    }
    let src = route_source(dst)?;
    let mut c = cache.lock().expect("source cache");
    if c.len() >= SOURCE_CACHE_MAX {
        c.clear();
    }
    c.insert(dst.ip(), (src, now));
    Ok(src)
}

/// Forgets `dst`'s remembered source address (it could not be bound).
fn forget_source(dst: SocketAddr) {
    if let Some(c) = SOURCES.get() {
        c.lock().expect("source cache").remove(&dst.ip());
    }
}

const SOURCE_TTL: Duration = Duration::from_secs(2);
/// Pods of one node: far more than any node runs.
const SOURCE_CACHE_MAX: usize = 4096;
static SOURCES: OnceLock<Mutex<HashMap<IpAddr, (IpAddr, Instant)>>> = OnceLock::new();

fn route_source(dst: SocketAddr) -> io::Result<IpAddr> {
    let any: SocketAddr = if dst.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let probe = std::net::UdpSocket::bind(any)?;
    probe.connect(dst)?;
    Ok(probe.local_addr()?.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The route's source is looked up once, remembered, and forgotten on
    /// demand (loopback: no lab needed).
    #[test]
    fn the_source_toward_a_destination_is_remembered_and_can_be_forgotten() {
        let dst: SocketAddr = "127.0.0.53:9".parse().unwrap();
        let cached = || {
            SOURCES
                .get()
                .and_then(|c| c.lock().unwrap().get(&dst.ip()).map(|(s, _)| *s))
        };
        assert_eq!(source_for(dst).unwrap(), IpAddr::from([127, 0, 0, 1]));
        assert_eq!(cached(), Some(IpAddr::from([127, 0, 0, 1])));
        forget_source(dst);
        assert_eq!(cached(), None);
    }
}
