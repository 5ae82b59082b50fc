//! Building the tunnel side of an agent: both transports' client sides and
//! the inbound flow handler now, the servers once their sockets are there
//! (bound afresh, or handed over by the predecessor).
use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::sync::watch;

use super::{
    Transport, TunnelMetrics,
    hbone::Hbone,
    inbound::Inbound,
    outbound::Tunnels,
    quic::{Quic, QuicServer},
    tls::TunnelTls,
};
use crate::{
    authz::Authorizer, drain::Drain, handoff, identity::manager::IdentityManager, identity::verify::TrustBundle,
    state::SnapshotRx,
};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("the CA root is not a usable trust anchor: {0} (check --ca-root)")]
    TrustAnchor(#[source] webpki::Error),
    #[error("binding the QUIC dialler on UDP {addr}: {err}")]
    Dialler {
        addr: SocketAddr,
        #[source]
        err: std::io::Error,
    },
    #[error("serving the QUIC tunnel on UDP {addr}: {err}")]
    Server {
        addr: SocketAddr,
        #[source]
        err: std::io::Error,
    },
}

/// What the tunnels need from the agent's settings.
pub struct TunnelSettings {
    pub node: String,
    pub trust_domain: String,
    pub transport: Transport,
    /// X25519MLKEM768 preferred (see [`TunnelTls`]).
    pub post_quantum: bool,
    /// The address both transports listen on (and dial from).
    pub addr: std::net::Ipv4Addr,
    pub port: u16,
    /// Where request spans of the L7 path go, if anywhere.
    pub traces: crate::traces::TracesHandle,
}

/// The built tunnels, and what starts their QUIC server later.
pub struct Started {
    pub tunnels: Arc<Tunnels>,
    pub quic_server: QuicStart,
}

#[allow(clippy::too_many_arguments)]
pub fn start(
    settings: &TunnelSettings,
    manager: Arc<IdentityManager>,
    roots: &[rustls_pki_types::CertificateDer<'static>],
    snapshots: SnapshotRx,
    authorizer: Arc<dyn Authorizer>,
    metrics: TunnelMetrics,
    drain: Drain,
    redirect: Arc<crate::redirect::Redirect>,
) -> Result<Started, StartError> {
    let bundle = Arc::new(TrustBundle::new(roots, &settings.trust_domain).map_err(StartError::TrustAnchor)?);
    let tls = TunnelTls {
        manager,
        bundle,
        post_quantum: settings.post_quantum,
    };
    let inbound = Arc::new(Inbound {
        node: settings.node.clone(),
        trust_domain: settings.trust_domain.clone(),
        snapshots,
        authorizer,
        metrics: metrics.clone(),
        drain: drain.clone(),
        voucher: redirect,
        traces: settings.traces.clone(),
    });
    let client_addr = SocketAddr::from((settings.addr, 0));
    let quic = Quic::client(client_addr, tls.clone(), metrics.clone())
        .map_err(|err| StartError::Dialler { addr: client_addr, err })?;
    let hbone = Hbone::new(tls.clone(), metrics.clone());
    tracing::info!(outbound_transport = ?settings.transport, "tunnel clients ready");
    let tunnels = Arc::new(Tunnels {
        transport: settings.transport,
        quic,
        hbone,
        trust_domain: settings.trust_domain.clone(),
        port: settings.port,
        metrics: metrics.clone(),
        inbound: inbound.clone(),
        traces: settings.traces.clone(),
    });
    let (server, _) = watch::channel(None);
    Ok(Started {
        tunnels,
        quic_server: QuicStart {
            tls,
            metrics,
            inbound,
            drain,
            addr: SocketAddr::from((settings.addr, settings.port)),
            server,
        },
    })
}

/// Everything the QUIC server needs, for whenever its socket is there.
pub struct QuicStart {
    tls: TunnelTls,
    metrics: TunnelMetrics,
    inbound: Arc<Inbound>,
    drain: Drain,
    addr: SocketAddr,
    /// The server once it runs (handed to a successor at the end).
    server: watch::Sender<Option<Arc<QuicServer>>>,
}

impl QuicStart {
    /// The running server, if it started.
    pub fn running(&self) -> watch::Receiver<Option<Arc<QuicServer>>> {
        self.server.subscribe()
    }

    /// Serves the mTLS-over-TCP transport on `listener`.
    pub fn serve_tcp(&self, tunnels: &Tunnels, listener: tokio::net::TcpListener) {
        tokio::spawn(
            tunnels
                .hbone
                .clone()
                .serve(listener, self.inbound.clone(), self.drain.clone()),
        );
    }

    pub fn serve(&self, socket: std::net::UdpSocket) -> Result<(), StartError> {
        let server = QuicServer::new(socket, &self.tls, self.metrics.clone())
            .map_err(|err| StartError::Server { addr: self.addr, err })?;
        self.server.send_replace(Some(server.clone()));
        tokio::spawn(server.serve(self.inbound.clone(), self.drain.clone()));
        tracing::info!(listen = %self.addr, "QUIC tunnel serving");
        Ok(())
    }

    /// Until the predecessor has drained, it serves UDP; peers take the TCP
    /// transport for new flows. Then its socket comes here (or, if it died,
    /// the port is bound afresh).
    pub async fn after_predecessor(self: Arc<Self>, predecessor: handoff::Predecessor) {
        // A plain thread, not spawn_blocking: the runtime waits for those
        // at exit, and the predecessor may drain for a long time.
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || tx.send(predecessor.wait_udp()));
        let socket = rx.await.ok().flatten();
        let socket = match socket {
            Some(s) => {
                tracing::info!("received the QUIC tunnel socket from the previous agent");
                s
            }
            None => loop {
                match std::net::UdpSocket::bind(self.addr) {
                    Ok(s) => break s,
                    Err(e) => {
                        tracing::warn!(addr = %self.addr, error = %e, "binding the QUIC tunnel port; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            },
        };
        if let Err(e) = self.serve(socket) {
            tracing::error!(error = %e, "QUIC tunnel not served; peers use the TCP transport");
        }
    }
}
