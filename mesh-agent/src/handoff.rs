//! Listener handoff between a running agent and its successor on the same
//! node (a rolling restart or an upgrade). The running agent serves a unix
//! SEQPACKET socket; a new agent connects, says it is ready, and receives
//! the listening sockets as descriptors (SCM_RIGHTS). They are the very same
//! kernel sockets, so their accept queues carry over: no connection is
//! refused during the switch, unlike two SO_REUSEPORT listeners, where
//! closing the old one resets what waits in its queue. The UDP tunnel
//! socket follows once the old agent has drained (its QUIC connections live
//! in that process until then).
// Unsafe: descriptors that arrive in SCM_RIGHTS or from accept(2) are raw
// integers the kernel just gave this process; wrapping them in OwnedFd is
// the only way to own them.
#![allow(unsafe_code)]

use std::{
    io::{IoSlice, IoSliceMut},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::{Path, PathBuf},
};

use nix::{
    errno::Errno,
    sys::socket::{
        self, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
        sockopt,
    },
};
use serde::{Deserialize, Serialize};
use tokio::io::{Interest, unix::AsyncFd};

#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("handoff socket {path}: {what}: {err} (check that its directory exists and only root can write it)")]
    Socket {
        path: PathBuf,
        what: &'static str,
        err: std::io::Error,
    },
    #[error("the other agent answered the handoff with {0}")]
    Protocol(String),
    #[error("reading from the other agent: {0}")]
    Read(Errno),
}

/// The listening sockets an agent serves on, in the order they are sent.
#[derive(Debug)]
pub struct Listeners {
    pub outbound: std::net::TcpListener,
    /// The outbound listener on the node's IPv6 address (--capture-ip6).
    pub outbound6: Option<std::net::TcpListener>,
    pub admin: std::net::TcpListener,
    pub health: std::net::TcpListener,
    pub metrics: std::net::TcpListener,
    /// The tunnel ports; absent when the agent has no identities.
    pub tunnel_tcp: Option<std::net::TcpListener>,
    /// Absent after a handoff until the predecessor sends it.
    pub tunnel_udp: Option<std::net::UdpSocket>,
}

#[derive(Serialize, Deserialize)]
struct Message {
    /// The successor's request for the listeners.
    #[serde(default)]
    take: bool,
    /// What the descriptors sent with this message are, in order.
    sockets: Vec<String>,
    version: String,
}

fn message(take: bool, sockets: &[&str]) -> Vec<u8> {
    serde_json::to_vec(&Message {
        take,
        sockets: sockets.iter().map(|s| s.to_string()).collect(),
        version: env!("CARGO_PKG_VERSION").into(),
    })
    .expect("plain struct")
}

fn send(sock: &OwnedFd, names: &[&str], fds: &[RawFd]) -> nix::Result<()> {
    send_message(sock, &message(false, names), fds)
}

fn send_message(sock: &OwnedFd, body: &[u8], fds: &[RawFd]) -> nix::Result<()> {
    let iov = [IoSlice::new(body)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    socket::sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None)?;
    Ok(())
}

/// One message and its descriptors; None when the other side hung up.
fn receive(sock: &OwnedFd) -> Result<Option<(Message, Vec<OwnedFd>)>, HandoffError> {
    let mut buf = [0u8; 4096];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([RawFd; 8]);
    let msg = loop {
        match socket::recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC) {
            Err(Errno::EINTR) => continue,
            r => break r,
        }
    }
    .map_err(HandoffError::Read)?;
    let mut fds = Vec::new();
    for c in msg.cmsgs().map_err(|e| HandoffError::Protocol(e.to_string()))? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            // SAFETY: the kernel installed these descriptors in this
            // process for this message; nothing else owns them.
            fds.extend(raw.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
        }
    }
    let len = msg.bytes;
    if len == 0 {
        return Ok(None);
    }
    let m: Message = serde_json::from_slice(&buf[..len]).map_err(|e| HandoffError::Protocol(e.to_string()))?;
    if m.sockets.len() != fds.len() {
        return Err(HandoffError::Protocol(format!(
            "{} socket names but {} descriptors",
            m.sockets.len(),
            fds.len()
        )));
    }
    Ok(Some((m, fds)))
}

/// Names the socket and the step that failed.
fn socket_error<'a>(path: &'a Path, what: &'static str) -> impl Fn(std::io::Error) -> HandoffError + 'a {
    move |err| HandoffError::Socket {
        path: path.to_owned(),
        what,
        err,
    }
}

fn seqpacket(path: &Path) -> Result<(OwnedFd, UnixAddr), HandoffError> {
    let fd = socket::socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| socket_error(path, "socket")(e.into()))?;
    let addr = UnixAddr::new(path).map_err(|e| socket_error(path, "address")(e.into()))?;
    Ok((fd, addr))
}

/// A running agent found at the handoff socket.
pub struct Predecessor {
    conn: OwnedFd,
}

impl Predecessor {
    /// Connects to the agent serving `path`; None when there is none (no
    /// socket file, or a stale one from an agent that is gone).
    pub fn find(path: &Path) -> Result<Option<Predecessor>, HandoffError> {
        let (fd, addr) = seqpacket(path)?;
        match socket::connect(fd.as_raw_fd(), &addr) {
            Ok(()) => Ok(Some(Predecessor { conn: fd })),
            Err(Errno::ENOENT | Errno::ECONNREFUSED) => Ok(None),
            Err(e) => Err(socket_error(path, "connect")(e.into())),
        }
    }

    /// Asks for the TCP listeners; from here on the predecessor drains.
    pub fn take(&self) -> Result<Listeners, HandoffError> {
        send_message(&self.conn, &message(true, &[]), &[])
            .map_err(|e| HandoffError::Protocol(format!("a failed write: {e}")))?;
        let Some((m, fds)) = receive(&self.conn)? else {
            return Err(HandoffError::Protocol("a hang-up before any socket".into()));
        };
        let mut tcp: std::collections::HashMap<String, std::net::TcpListener> = m
            .sockets
            .into_iter()
            .zip(fds)
            .map(|(name, fd)| (name, std::net::TcpListener::from(fd)))
            .collect();
        let tunnel_tcp = tcp.remove("tunnel_tcp");
        let outbound6 = tcp.remove("outbound6");
        let mut need = |name: &str| {
            tcp.remove(name)
                .ok_or_else(|| HandoffError::Protocol(format!("no {name} listener")))
        };
        Ok(Listeners {
            outbound: need("outbound")?,
            outbound6,
            admin: need("admin")?,
            health: need("health")?,
            metrics: need("metrics")?,
            tunnel_tcp,
            tunnel_udp: None,
        })
    }

    /// Waits (blocking) for the UDP tunnel socket, sent when the
    /// predecessor has drained; None if it hung up without one (it died,
    /// or never had one): then the caller binds the port itself.
    pub fn wait_udp(self) -> Option<std::net::UdpSocket> {
        match receive(&self.conn) {
            Ok(Some((m, mut fds))) if m.sockets == ["tunnel_udp"] => fds.pop().map(std::net::UdpSocket::from),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(error = %e, "handoff: no UDP tunnel socket from the previous agent");
                None
            }
        }
    }
}

/// The running agent's side: waits for one successor.
pub struct Offer {
    listener: OwnedFd,
    path: PathBuf,
    tcp: Vec<(&'static str, OwnedFd)>,
}

/// A successor that took the TCP listeners and waits for the UDP socket.
pub struct Successor {
    conn: OwnedFd,
}

impl Offer {
    /// Listens at `path` (replacing a predecessor's or a stale socket file)
    /// offering copies of `listeners`' TCP descriptors (the UDP one goes
    /// later, with `Successor::send_udp`).
    pub fn listen(path: &Path, listeners: &Listeners) -> Result<Offer, HandoffError> {
        let err = |what| socket_error(path, what);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err("create its directory"))?;
        }
        let _ = std::fs::remove_file(path);
        let (fd, addr) = seqpacket(path)?;
        socket::bind(fd.as_raw_fd(), &addr).map_err(|e| err("bind")(e.into()))?;
        // Whoever connects gets our listening sockets: root only.
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err("chmod"))?;
        socket::listen(&fd, Backlog::new(4).expect("small backlog")).map_err(|e| err("listen")(e.into()))?;
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK))
            .map_err(|e| err("fcntl")(e.into()))?;
        let dup = |fd: &dyn std::os::fd::AsFd| fd.as_fd().try_clone_to_owned().map_err(err("dup"));
        let mut tcp = vec![
            ("outbound", dup(&listeners.outbound)?),
            ("admin", dup(&listeners.admin)?),
            ("health", dup(&listeners.health)?),
            ("metrics", dup(&listeners.metrics)?),
        ];
        if let Some(t) = &listeners.tunnel_tcp {
            tcp.push(("tunnel_tcp", dup(t)?));
        }
        if let Some(o) = &listeners.outbound6 {
            tcp.push(("outbound6", dup(o)?));
        }
        Ok(Offer {
            listener: fd,
            path: path.to_owned(),
            tcp,
        })
    }

    /// Waits until a successor asks, then sends it the TCP listeners.
    /// Connections from another user, or that do not ask properly, are
    /// logged and dropped. Dropping the future closes the offer (and its
    /// copies of the listeners: a stopping agent's ports must close).
    pub async fn wait_successor(self) -> Successor {
        let my_uid = nix::unistd::geteuid().as_raw();
        // SAFETY (register): the AsyncFd owns the OwnedFd, so the
        // descriptor stays open and the same until it is dropped.
        let listener = match unsafe { AsyncFd::register(self.listener) } {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, "handoff: cannot poll the socket; no successor can take over");
                return std::future::pending().await;
            }
        };
        loop {
            let accepted = listener
                .async_io(Interest::READABLE, |l| {
                    socket::accept4(l.as_raw_fd(), SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK)
                        .map_err(std::io::Error::from)
                })
                .await;
            let conn = match accepted {
                // SAFETY: accept4 just created this descriptor for us.
                Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd) },
                Err(e) => {
                    tracing::error!(path = %self.path.display(), error = %e, "handoff: accept failed");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    continue;
                }
            };
            match socket::getsockopt(&conn, sockopt::PeerCredentials) {
                Ok(c) if c.uid() == my_uid => {}
                other => {
                    tracing::warn!(credentials = ?other.map(|c| (c.pid(), c.uid())), "handoff: refused a connection from another user");
                    continue;
                }
            }
            // SAFETY: as above, the AsyncFd owns the descriptor.
            let Ok(conn) = (unsafe { AsyncFd::register(conn) }) else {
                continue;
            };
            // The successor asks only once it is ready (seconds later).
            let asked = conn
                .async_io(Interest::READABLE, |c| {
                    receive(c).map_err(|e| match e {
                        // Not yet: AsyncFd waits for the next readiness.
                        HandoffError::Read(errno) => std::io::Error::from(errno),
                        other => std::io::Error::other(other.to_string()),
                    })
                })
                .await;
            match asked {
                Ok(Some((m, _))) if m.take => {
                    tracing::info!(successor_version = %m.version, "handoff: a successor asked for the listeners");
                }
                other => {
                    tracing::warn!(outcome = ?other.map(|o| o.map(|(m, _)| m.sockets)), "handoff: a connection that did not ask for the listeners");
                    continue;
                }
            }
            let conn = conn.into_inner();
            let names: Vec<&str> = self.tcp.iter().map(|(n, _)| *n).collect();
            let fds: Vec<RawFd> = self.tcp.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
            match send(&conn, &names, &fds) {
                Ok(()) => return Successor { conn },
                Err(e) => {
                    tracing::warn!(error = %e, "handoff: sending the listeners failed; waiting for another successor")
                }
            }
        }
    }
}

impl Successor {
    /// Sends the UDP tunnel socket (the drain is over); the successor binds
    /// the port itself if there is none.
    pub fn send_udp(self, udp: Option<&std::net::UdpSocket>) {
        let result = match udp {
            Some(u) => send(&self.conn, &["tunnel_udp"], &[u.as_raw_fd()]),
            None => send(&self.conn, &[], &[]),
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "handoff: the successor did not take the UDP tunnel socket; it will bind the port itself");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listeners() -> Listeners {
        let tcp = || std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        Listeners {
            outbound: tcp(),
            outbound6: None,
            admin: tcp(),
            health: tcp(),
            metrics: tcp(),
            tunnel_tcp: Some(tcp()),
            tunnel_udp: Some(std::net::UdpSocket::bind("127.0.0.1:0").unwrap()),
        }
    }

    /// The successor gets the same kernel sockets: a connection queued on
    /// the old listener before the handoff is accepted by the new owner.
    fn socket_path(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mesh-handoff-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("handoff.sock")
    }

    #[tokio::test]
    async fn a_successor_receives_the_same_sockets_and_then_the_udp_one() {
        let path = socket_path("same");
        assert!(Predecessor::find(&path).unwrap().is_none(), "nobody serves yet");
        let old = listeners();
        let outbound_addr = old.outbound.local_addr().unwrap();
        let udp_addr = old.tunnel_udp.as_ref().unwrap().local_addr().unwrap();
        let offer = Offer::listen(&path, &old).unwrap();
        let server = tokio::spawn(offer.wait_successor());
        let queued = std::net::TcpStream::connect(outbound_addr).unwrap();

        let new_path = path.clone();
        let (pred, new) = tokio::task::spawn_blocking(move || {
            let pred = Predecessor::find(&new_path).unwrap().expect("a running agent");
            let new = pred.take().unwrap();
            (pred, new)
        })
        .await
        .unwrap();
        let old_udp = old.tunnel_udp.as_ref().unwrap().try_clone().unwrap();
        drop(old);
        assert_eq!(new.outbound.local_addr().unwrap(), outbound_addr);
        let (accepted, peer) = new.outbound.accept().unwrap();
        assert_eq!(peer, queued.local_addr().unwrap());
        drop(accepted);
        assert!(new.tunnel_tcp.is_some() && new.tunnel_udp.is_none());

        server.await.unwrap().send_udp(Some(&old_udp));
        let udp = pred.wait_udp().expect("the UDP socket");
        assert_eq!(udp.local_addr().unwrap(), udp_addr);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn a_stale_socket_file_means_no_predecessor() {
        let path = socket_path("stale");
        drop(Offer::listen(&path, &listeners()).unwrap());
        assert!(path.exists());
        assert!(Predecessor::find(&path).unwrap().is_none());
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }
}
