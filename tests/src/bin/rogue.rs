//! A rogue mesh peer for the tunnel tests, built from the agent's own
//! tunnel code with certificates from a CA directory of our choosing:
//!
//! - `rogue client`: dials a node's tunnel as IDENTITY (say, with a
//!   certificate from a foreign root) and tries to send bytes to a pod;
//! - `rogue server`: listens where a node's agent should, presenting a valid
//!   certificate for the wrong identity, and reports any stream it receives.
//!
//! Prints one JSON line with what happened.
use std::{collections::BTreeSet, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use clap::{Parser, Subcommand};
use mesh_agent::{
    drain::Drain,
    identity::{
        SpiffeId,
        authority::Authority,
        manager::{IdentityManager, Timing},
        provider::LocalCa,
        verify::TrustBundle,
    },
    state,
    tunnel::{
        PeerKey, TunnelMetrics,
        hbone::Hbone,
        header::{FlowHeader, Protocol},
        inbound::{AllowAll, Inbound},
        quic::{Quic, QuicServer},
        tls::{ALPN_H2, ALPN_QUIC, TunnelTls},
    },
};
use tokio::io::AsyncWriteExt as _;

#[derive(Parser)]
struct Cli {
    /// CA directory the rogue's certificates come from.
    #[arg(long)]
    ca_dir: PathBuf,
    /// Root the rogue trusts for its peers (default: the CA's own).
    #[arg(long)]
    trust_root_dir: Option<PathBuf>,
    #[arg(long)]
    identity: SpiffeId,
    #[arg(long, default_value = "quic")]
    transport: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Client {
        /// The peer node's tunnel address.
        #[arg(long)]
        peer: SocketAddr,
        /// The identity the peer must present.
        #[arg(long)]
        peer_identity: SpiffeId,
        #[arg(long)]
        dst: SocketAddr,
        /// Send a broken flow header instead of a real one (QUIC only).
        #[arg(long, value_parser = ["truncated", "oversized"])]
        bad_header: Option<String>,
    },
    Server {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, default_value_t = 15)]
        seconds: u64,
    },
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt().with_writer(std::io::stderr).json().init();
    let cli = Cli::parse();
    let authority = Arc::new(Authority::load(&cli.ca_dir).expect("CA dir"));
    let roots = match &cli.trust_root_dir {
        Some(d) => vec![Authority::load(d).expect("trust root dir").root().clone()],
        None => vec![authority.root().clone()],
    };
    let manager = IdentityManager::new(
        Arc::new(LocalCa::new(authority)),
        Timing::for_ttl(Duration::from_secs(600)),
    );
    let (_tx, rx) = tokio::sync::watch::channel(BTreeSet::from([cli.identity.clone()]));
    tokio::spawn(manager.clone().run(rx));
    while manager.current(&cli.identity).is_none() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let td = cli.identity.trust_domain.clone();
    let tls = TunnelTls {
        manager,
        bundle: Arc::new(TrustBundle::new(&roots, &td).unwrap()),
        post_quantum: true,
    };
    let metrics = TunnelMetrics::default();
    match cli.cmd {
        Cmd::Client {
            peer,
            peer_identity,
            dst,
            bad_header: Some(kind),
        } => {
            // A well-authenticated peer that speaks garbage on its stream.
            let quic = Quic::client("0.0.0.0:0".parse().unwrap(), tls, metrics).expect("bind");
            let key = PeerKey {
                source: cli.identity.clone(),
                destination: peer_identity,
                node_addr: peer,
            };
            let _ = dst;
            let result: Result<usize, String> = async {
                let (mut send, mut recv, _g) = quic.open_raw(&key).await.map_err(|e| e.to_string())?;
                match kind.as_str() {
                    // A length far over the limit.
                    "oversized" => send
                        .write_all(&[0xff, 0xff, 1, 2, 3])
                        .await
                        .map_err(|e| e.to_string())?,
                    // Announces 64 bytes, sends 2, ends.
                    _ => send.write_all(&[0x00, 0x40, 1, 2]).await.map_err(|e| e.to_string())?,
                }
                send.finish().map_err(|e| e.to_string())?;
                let mut buf = Vec::new();
                tokio::io::AsyncReadExt::read_to_end(&mut recv, &mut buf)
                    .await
                    .map_err(|e| e.to_string())
            }
            .await;
            println!("{}", serde_json::json!({"ok": result.is_ok(), "error": result.err()}));
        }
        Cmd::Client {
            peer,
            peer_identity,
            dst,
            bad_header: None,
        } => {
            let key = PeerKey {
                source: cli.identity.clone(),
                destination: peer_identity,
                node_addr: peer,
            };
            let attempt = async {
                if cli.transport == "quic" {
                    let quic = Quic::client("0.0.0.0:0".parse().unwrap(), tls, metrics).map_err(|e| e.to_string())?;
                    let header = FlowHeader {
                        destination: dst.to_string(),
                        protocol: Protocol::Tcp as i32,
                        flow_id: 1,
                        http: false,
                    };
                    let (mut send, mut recv, _g) = quic.open(&key, &header).await.map_err(|e| e.to_string())?;
                    send.write_all(b"ROGUE BYTES").await.map_err(|e| e.to_string())?;
                    send.finish().map_err(|e| e.to_string())?;
                    let mut buf = Vec::new();
                    tokio::io::AsyncReadExt::read_to_end(&mut recv, &mut buf)
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok(())
                } else {
                    let hbone = Hbone::new(tls, metrics);
                    let (io, _g) = hbone.open(&key, dst, 1, false).await.map_err(|e| e.to_string())?;
                    let (mut r, mut w) = tokio::io::split(io);
                    w.write_all(b"ROGUE BYTES").await.map_err(|e| e.to_string())?;
                    w.shutdown().await.map_err(|e| e.to_string())?;
                    let mut buf = Vec::new();
                    tokio::io::AsyncReadExt::read_to_end(&mut r, &mut buf)
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok(())
                }
            };
            // A rogue left waiting has not got through either; say so
            // rather than hold the test.
            let result: Result<(), String> = tokio::time::timeout(std::time::Duration::from_secs(30), attempt)
                .await
                .unwrap_or_else(|_| Err("no answer within 30 s".into()));
            println!("{}", serde_json::json!({"ok": result.is_ok(), "error": result.err()}));
        }
        Cmd::Server { listen, seconds } => {
            // No pods on the rogue's "node": any stream that arrives is logged
            // (as refused) by the inbound side, which is what the test looks for.
            let (_stx, srx) = state::channel();
            let inbound = Arc::new(Inbound {
                node: "rogue".into(),
                trust_domain: td,
                snapshots: srx,
                authorizer: Arc::new(AllowAll),
                metrics: metrics.clone(),
                drain: Drain::default(),
                voucher: Arc::new(mesh_agent::tunnel::deliver::NoVoucher),
                traces: None,
            });
            // An impostor presents its (valid) certificate whatever
            // identity the client asks for.
            let cert = tls
                .manager
                .current(&cli.identity)
                .expect("certificate")
                .certified_key
                .clone();
            let server = |alpn: &[u8]| {
                let mut cfg =
                    rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                        .with_protocol_versions(&[&rustls::version::TLS13])
                        .unwrap()
                        .with_no_client_auth()
                        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(cert.clone())));
                cfg.alpn_protocols = vec![alpn.to_vec()];
                cfg
            };
            if cli.transport == "quic" {
                let socket = std::net::UdpSocket::bind(listen).expect("bind");
                let quic = QuicServer::with_tls(socket, server(ALPN_QUIC), metrics.clone()).expect("serve");
                tokio::spawn(quic.serve(inbound, Drain::default()));
            } else {
                let hbone = Hbone::new(tls, metrics.clone());
                let l = tokio::net::TcpListener::bind(listen).await.expect("bind");
                tokio::spawn(hbone.serve_with(l, server(ALPN_H2), inbound, Drain::default()));
            }
            println!("{}", serde_json::json!({"listening": listen.to_string()}));
            tokio::time::sleep(Duration::from_secs(seconds)).await;
        }
    }
}
