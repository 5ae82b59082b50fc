//! The agent's listening sockets: bound afresh on a first start, or taken
//! from the agent already serving this node (`handoff`) once this one is
//! ready, so no connect ever finds a port closed.
use std::{net::SocketAddr, time::Duration};

use anyhow::Context as _;

use crate::{config::Settings, handoff, metrics, tunnel::outbound};

/// Binds every listening socket of a fresh start.
pub async fn bind(s: &Settings) -> anyhow::Result<handoff::Listeners> {
    let std_tcp = |l: tokio::net::TcpListener| l.into_std();
    let tcp = |addr: SocketAddr, what: &'static str| async move {
        tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the {what} on {addr}"))
    };
    let outbound = std_tcp(outbound::bind(s.capture_ip.into(), s.outbound_port).await?)?;
    let outbound6 = bind_outbound6(s).await?;
    let admin = std_tcp(tcp(s.admin_addr, "admin API (--admin-addr)").await?)?;
    let health = std_tcp(tcp(s.health_addr, "health endpoint (--health-addr)").await?)?;
    let metrics = std_tcp(metrics::bind(s.metrics_addr).await?)?;
    let (mut tunnel_tcp, mut tunnel_udp) = (None, None);
    if s.identity.source.is_some() {
        let addr = SocketAddr::from((s.tunnel.addr, s.tunnel.port));
        tunnel_udp = Some(
            std::net::UdpSocket::bind(addr)
                .with_context(|| format!("binding the QUIC tunnel on UDP {addr} (is another agent running?)"))?,
        );
        tunnel_tcp = Some(std_tcp(
            tcp(addr, "mTLS tunnel, TCP (is another agent running?)").await?,
        )?);
    }
    Ok(handoff::Listeners {
        outbound,
        outbound6,
        admin,
        health,
        metrics,
        tunnel_tcp,
        tunnel_udp,
    })
}

/// The IPv6 outbound listener, when the node has an IPv6 capture address.
pub async fn bind_outbound6(s: &Settings) -> anyhow::Result<Option<std::net::TcpListener>> {
    match s.capture_ip6 {
        Some(ip6) => Ok(Some(outbound::bind(ip6.into(), s.outbound_port).await?.into_std()?)),
        None => Ok(None),
    }
}

/// Waits until `not_ready` says nothing (or 15 s), then takes the
/// predecessor's listeners.
pub async fn take_over(
    predecessor: &handoff::Predecessor,
    not_ready: impl Fn() -> Vec<String>,
) -> anyhow::Result<handoff::Listeners> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let why = not_ready();
        if why.is_empty() {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            tracing::warn!(not_ready = ?why, "not ready after 15 s; taking over anyway (the predecessor cannot serve forever)");
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let listeners = predecessor
        .take()
        .context("taking the listeners from the running agent (see its log)")?;
    tracing::info!("took over the listeners; the previous agent drains");
    Ok(listeners)
}

pub fn tokio_listener(l: std::net::TcpListener) -> std::io::Result<tokio::net::TcpListener> {
    l.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(l)
}
