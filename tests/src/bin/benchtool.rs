//! The benchmark's traffic tool, run inside lab pods by `cargo xtask bench`:
//! an echo server, a fixed-rate request/response client, a connection-rate
//! client and a holder of idle connections. Every client prints one JSON
//! line. Single-threaded on purpose: the bench pins each node to one core.
use std::{
    net::SocketAddr,
    rc::Rc,
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Echo every byte back, on every connection, until killed.
    EchoServe {
        #[arg(long)]
        port: u16,
        /// Print each accepted connection's peer, a line each (a server-side
        /// count of who got through).
        #[arg(long)]
        print_accepts: bool,
    },
    /// Requests of `size` bytes, each echoed back, started at a fixed `rate`
    /// for `secs` (open loop: a slow answer never delays the next request,
    /// which takes another connection). Latency runs from the request's
    /// start (connect included with --new-conn) to its full echo; not from
    /// its scheduled slot, as tokio's 1 ms timer would add up to 1 ms. Prints
    /// {"requests", "errors", "p50_us", "p90_us", "p99_us", "max_us"}.
    Rr {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        rate: u32,
        #[arg(long, default_value_t = 3.0)]
        secs: f64,
        #[arg(long, default_value_t = 1024)]
        size: usize,
        /// A new connection per request (else a few persistent ones).
        #[arg(long)]
        new_conn: bool,
        /// HTTP/1.1 instead: each request a `GET /` with this Host, its
        /// answer read whole (by Content-Length); `size` is not used.
        #[arg(long)]
        http_host: Option<String>,
    },
    /// `concurrency` loops of connect, 1-byte round trip, close, for `secs`.
    /// Prints {"connections", "per_sec", "errors"}.
    ConnRate {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 3.0)]
        secs: f64,
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
    },
    /// New connections at `rate` per second until stdin closes: each
    /// connects, does one 16-byte round trip and closes. Prints {"ok",
    /// "refused" (connect failed), "ended" (a clean EOF before the echo),
    /// "broken" (reset, error or timeout after connecting), "errors"}.
    Churn {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 100)]
        rate: u32,
    },
    /// `count` long-lived connections, each doing a round trip every 200 ms
    /// until stdin closes. Prints {"survived" (still answering at the end),
    /// "ended_at_unix_ms" (a clean EOF, when), "broken" (reset or error),
    /// "errors"}.
    Long {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 10)]
        count: usize,
    },
    /// Connect to `to` every millisecond until connect() gives the wanted
    /// verdict (denied = EPERM from the mesh, allowed = connected), then
    /// print {"reached", "at_unix_us", "attempts"}.
    WaitVerdict {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, value_parser = ["denied", "allowed"])]
        want: String,
        #[arg(long, default_value_t = 10.0)]
        timeout_secs: f64,
    },
    /// Open `count` connections, one round trip on each (so every one is
    /// established end to end), print {"open", "errors"}, then hold them
    /// until stdin closes.
    Hold {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        count: usize,
    },
    /// `count` full tunnel handshakes per key exchange, both ends in this
    /// process on one thread, alternating X25519 and X25519MLKEM768: the
    /// CPU a new tunnel connection costs both agents. Prints {"x25519":
    /// {"p50_us", "p90_us", "group"}, "x25519mlkem768": {...}}.
    Handshakes {
        #[arg(long, default_value_t = 400)]
        count: usize,
    },
}

fn main() -> anyhow::Result<()> {
    raise_nofile();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        match Cli::parse().cmd {
            Cmd::EchoServe { port, print_accepts } => echo_serve(port, print_accepts).await,
            Cmd::Rr {
                to,
                rate,
                secs,
                size,
                new_conn,
                http_host,
            } => rr(to, rate, secs, size, new_conn, http_host).await,
            Cmd::ConnRate { to, secs, concurrency } => conn_rate(to, secs, concurrency).await,
            Cmd::Hold { to, count } => hold(to, count).await,
            Cmd::Churn { to, rate } => churn(to, rate).await,
            Cmd::Long { to, count } => long(to, count).await,
            Cmd::WaitVerdict { to, want, timeout_secs } => wait_verdict(to, want == "denied", timeout_secs),
            Cmd::Handshakes { count } => handshakes(count).await,
        }
    })
}

/// 10,000 held connections need more than the default 1,024 descriptors.
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    #[allow(unsafe_code)]
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

async fn echo_serve(port: u16, print_accepts: bool) -> anyhow::Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", port)).await?;
    loop {
        let (mut s, peer) = listener.accept().await?;
        if print_accepts {
            use std::io::Write as _;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{peer}");
            let _ = out.flush();
        }
        s.set_nodelay(true)?;
        tokio::task::spawn_local(async move {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
}

async fn round_trip(s: &mut TcpStream, req: &[u8], reply: &mut [u8]) -> std::io::Result<()> {
    s.write_all(req).await?;
    s.read_exact(reply).await?;
    if reply != req {
        return Err(std::io::Error::other("echo differs from request"));
    }
    Ok(())
}

async fn connect(to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect(to).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// One HTTP/1.1 request and its whole answer (a 200 with Content-Length).
async fn http_round_trip(s: &mut TcpStream, req: &[u8]) -> std::io::Result<()> {
    s.write_all(req).await?;
    let mut buf = Vec::with_capacity(2048);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed before the answer",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    if !head.starts_with("http/1.1 200") {
        return Err(std::io::Error::other(format!(
            "answer: {}",
            head.lines().next().unwrap_or("")
        )));
    }
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| std::io::Error::other("answer without content-length"))?;
    let mut have = buf.len() - head_end;
    while have < length {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed mid-body",
            ));
        }
        have += n;
    }
    Ok(())
}

async fn rr(
    to: SocketAddr,
    rate: u32,
    secs: f64,
    size: usize,
    new_conn: bool,
    http_host: Option<String>,
) -> anyhow::Result<()> {
    let req: Rc<Vec<u8>> = Rc::new(match &http_host {
        Some(host) => format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").into_bytes(),
        None => (0..size).map(|i| (i % 251) as u8).collect(),
    });
    let http = http_host.is_some();
    // Persistent connections, reused by whichever request comes next; more
    // are opened only when a request finds them all busy.
    let idle: Rc<std::cell::RefCell<Vec<TcpStream>>> = Rc::default();
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let total = (secs * rate as f64) as usize;
    let start = tokio::time::Instant::now() + Duration::from_millis(10);
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        let scheduled = start + period * i as u32;
        tokio::time::sleep_until(scheduled).await;
        let (req, idle) = (req.clone(), idle.clone());
        tasks.push(tokio::task::spawn_local(async move {
            let began = Instant::now();
            let mut reply = vec![0u8; req.len()];
            let pooled = if new_conn { None } else { idle.borrow_mut().pop() };
            let mut s = match pooled {
                Some(s) => s,
                None => connect(to).await?,
            };
            if http {
                http_round_trip(&mut s, &req).await?;
            } else {
                round_trip(&mut s, &req, &mut reply).await?;
            }
            let took = began.elapsed();
            if !new_conn {
                idle.borrow_mut().push(s);
            }
            Ok::<Duration, std::io::Error>(took)
        }));
    }
    let mut lat = Vec::with_capacity(total);
    let mut errors = Vec::new();
    for t in tasks {
        match t.await? {
            Ok(d) => lat.push(d.as_secs_f64() * 1e6),
            Err(e) => errors.push(e.to_string()),
        }
    }
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
    };
    errors.truncate(5);
    println!(
        "{}",
        json!({
            "requests": lat.len(), "errors": total - lat.len(), "first_errors": errors,
            "p50_us": pct(0.50), "p90_us": pct(0.90), "p99_us": pct(0.99), "max_us": lat.last(),
        })
    );
    Ok(())
}

async fn conn_rate(to: SocketAddr, secs: f64, concurrency: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    let loops: Vec<_> = (0..concurrency)
        .map(|_| {
            tokio::task::spawn_local(async move {
                let (mut ok, mut failed) = (0u64, 0u64);
                let mut reply = [0u8; 1];
                while Instant::now() < deadline {
                    let r = async {
                        let mut s = connect(to).await?;
                        round_trip(&mut s, b"x", &mut reply).await
                    };
                    match r.await {
                        Ok(()) => ok += 1,
                        Err(_) => failed += 1,
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    let (mut ok, mut failed) = (0, 0);
    for l in loops {
        let (o, f) = l.await?;
        ok += o;
        failed += f;
    }
    let took = started.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({"connections": ok, "per_sec": ok as f64 / took, "errors": failed})
    );
    Ok(())
}

async fn hold(to: SocketAddr, count: usize) -> anyhow::Result<()> {
    let mut held = Vec::with_capacity(count);
    let mut errors = 0;
    // In batches, so the agents see a burst they can absorb, not 10,000 SYNs at once.
    for batch in (0..count).collect::<Vec<_>>().chunks(250) {
        let opened: Vec<_> = batch
            .iter()
            .map(|_| {
                tokio::task::spawn_local(async move {
                    let mut s = connect(to).await?;
                    let mut reply = [0u8; 1];
                    round_trip(&mut s, b"h", &mut reply).await?;
                    Ok::<_, std::io::Error>(s)
                })
            })
            .collect();
        for o in opened {
            match o.await? {
                Ok(s) => held.push(s),
                Err(_) => errors += 1,
            }
        }
    }
    println!("{}", json!({"open": held.len(), "errors": errors}));
    // Hold until the bench closes our stdin; idle sockets need no runtime,
    // so blocking here is fine.
    let mut sink = [0u8; 64];
    while std::io::Read::read(&mut std::io::stdin(), &mut sink).unwrap_or(0) > 0 {}
    drop(held);
    Ok(())
}

/// Resolves when stdin closes (the test's way to say "stop").
fn stdin_closed() -> tokio::sync::oneshot::Receiver<()> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut sink = [0u8; 64];
        while std::io::Read::read(&mut std::io::stdin(), &mut sink).unwrap_or(0) > 0 {}
        let _ = tx.send(());
    });
    rx
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// How a connection's life went, for churn and long.
#[derive(Clone, Copy, PartialEq)]
enum Outcome {
    Ok,
    Refused,
    Ended,
    Broken,
}

fn classify_io(e: &std::io::Error) -> Outcome {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        Outcome::Ended
    } else {
        Outcome::Broken
    }
}

async fn churn(to: SocketAddr, rate: u32) -> anyhow::Result<()> {
    let outcomes: Rc<std::cell::RefCell<Vec<(Outcome, String)>>> = Rc::default();
    let mut stop = stdin_closed();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    let mut running = Vec::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {}
        }
        let outcomes = outcomes.clone();
        running.push(tokio::task::spawn_local(async move {
            let limit = Duration::from_secs(10);
            let result = match tokio::time::timeout(limit, connect(to)).await {
                Err(_) => (Outcome::Refused, "connect timed out".to_string()),
                Ok(Err(e)) => (Outcome::Refused, format!("connect: {e}")),
                Ok(Ok(mut s)) => {
                    let mut reply = [0u8; 16];
                    match tokio::time::timeout(limit, round_trip(&mut s, b"0123456789abcdef", &mut reply)).await {
                        Err(_) => (Outcome::Broken, "no echo within 10 s".to_string()),
                        Ok(Err(e)) => (classify_io(&e), e.to_string()),
                        Ok(Ok(())) => (Outcome::Ok, String::new()),
                    }
                }
            };
            outcomes.borrow_mut().push(result);
        }));
        running.retain(|t| !t.is_finished());
    }
    for t in running {
        let _ = t.await;
    }
    let o = outcomes.borrow();
    let count = |want| o.iter().filter(|(k, _)| *k == want).count();
    let errors: Vec<&str> = o
        .iter()
        .filter(|(k, _)| *k != Outcome::Ok)
        .map(|(_, e)| e.as_str())
        .take(5)
        .collect();
    println!(
        "{}",
        json!({"ok": count(Outcome::Ok), "refused": count(Outcome::Refused), "ended": count(Outcome::Ended),
               "broken": count(Outcome::Broken), "errors": errors})
    );
    Ok(())
}

async fn long(to: SocketAddr, count: usize) -> anyhow::Result<()> {
    let mut stop = stdin_closed();
    let (done_tx, _) = tokio::sync::watch::channel(false);
    let mut conns = Vec::new();
    for i in 0..count {
        let mut s = connect(to).await?;
        let mut reply = [0u8; 8];
        round_trip(&mut s, b"pingpong", &mut reply).await?;
        let mut done = done_tx.subscribe();
        conns.push(tokio::task::spawn_local(async move {
            // Spread the pings so the connections do not move in lockstep.
            tokio::time::sleep(Duration::from_millis(20 * i as u64 % 200)).await;
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tokio::select! {
                    _ = done.changed() => return (Outcome::Ok, 0, String::new()),
                    _ = tick.tick() => {}
                }
                let mut reply = [0u8; 8];
                match tokio::time::timeout(Duration::from_secs(10), round_trip(&mut s, b"pingpong", &mut reply)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return (classify_io(&e), unix_ms(), e.to_string()),
                    Err(_) => return (Outcome::Broken, unix_ms(), "no echo within 10 s".to_string()),
                }
            }
        }));
    }
    let _ = (&mut stop).await;
    let _ = done_tx.send(true);
    let (mut survived, mut ended, mut broken, mut errors) = (0, Vec::new(), 0, Vec::new());
    for c in conns {
        let (outcome, at, error) = c.await?;
        match outcome {
            Outcome::Ok => survived += 1,
            Outcome::Ended => ended.push(at),
            _ => {
                broken += 1;
                errors.push(error);
            }
        }
    }
    println!(
        "{}",
        json!({"survived": survived, "ended_at_unix_ms": ended, "broken": broken, "errors": errors})
    );
    Ok(())
}

fn wait_verdict(to: SocketAddr, want_denied: bool, timeout_secs: f64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs_f64(timeout_secs);
    let mut attempts = 0u64;
    let reached = loop {
        attempts += 1;
        let denied = match std::net::TcpStream::connect_timeout(&to, Duration::from_millis(500)) {
            Ok(_) => false,
            Err(e) => e.raw_os_error() == Some(libc::EPERM),
        };
        if denied == want_denied {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_micros() as u64;
    println!(
        "{}",
        json!({"reached": reached, "at_unix_us": at, "attempts": attempts})
    );
    Ok(())
}

/// The agents' own tunnel TLS (mesh-agent's `TunnelTls`: its crypto
/// provider, certificate resolvers and SPIFFE verifiers, TLS 1.3, no
/// resumption) with workload certificates from a throwaway CA; client and
/// server exchange their flights in memory, so each figure is CPU only.
async fn handshakes(count: usize) -> anyhow::Result<()> {
    use std::{collections::BTreeSet, sync::Arc};

    use anyhow::Context as _;
    use mesh_agent::{
        identity::{
            SpiffeId,
            authority::Authority,
            manager::{IdentityManager, Timing},
            provider::LocalCa,
            verify::TrustBundle,
        },
        tunnel::tls::{ALPN_H2, TunnelTls, sni_for},
    };

    let dir = std::env::temp_dir().join(format!("benchtool-handshakes-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    Authority::init(&dir, "bench.local")?;
    let authority = Arc::new(Authority::load(&dir)?);
    let _ = std::fs::remove_dir_all(&dir);
    let bundle = Arc::new(TrustBundle::new(&[authority.root().clone()], "bench.local")?);
    let (src, dst): (SpiffeId, SpiffeId) = (
        "spiffe://bench.local/ns/bench/sa/load".parse()?,
        "spiffe://bench.local/ns/bench/sa/far".parse()?,
    );
    let manager = IdentityManager::new(
        Arc::new(LocalCa::new(authority)),
        Timing::for_ttl(Duration::from_secs(600)),
    );
    let (_tx, rx) = tokio::sync::watch::channel(BTreeSet::from([src.clone(), dst.clone()]));
    tokio::spawn(manager.clone().run(rx));
    let deadline = Instant::now() + Duration::from_secs(10);
    while manager.current(&src).is_none() || manager.current(&dst).is_none() {
        anyhow::ensure!(Instant::now() < deadline, "no workload certificates from the local CA");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let configs = |post_quantum: bool| {
        let tls = TunnelTls {
            manager: manager.clone(),
            bundle: bundle.clone(),
            post_quantum,
        };
        (
            Arc::new(tls.client_config(&src, &dst, ALPN_H2)),
            Arc::new(tls.server_config(ALPN_H2)),
        )
    };
    let settings = [("x25519", configs(false)), ("x25519mlkem768", configs(true))];
    let name = rustls::pki_types::ServerName::try_from(sni_for(&dst))?;
    let mut times: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut groups = [String::new(), String::new()];
    // Warm-up, then alternate, so drift hits both alike.
    for i in 0..count * 2 + 20 {
        let k = i % 2;
        let (client, server) = &settings[k].1;
        let started = Instant::now();
        let group = handshake(client.clone(), server.clone(), name.clone())
            .with_context(|| format!("{} handshake", settings[k].0))?;
        let us = started.elapsed().as_secs_f64() * 1e6;
        if i >= 20 {
            times[k].push(us);
        }
        groups[k] = group;
    }
    let mut out = serde_json::Map::new();
    for (k, (key, _)) in settings.iter().enumerate() {
        let t = &mut times[k];
        t.sort_by(f64::total_cmp);
        let at = |q: f64| t[((t.len() as f64 * q) as usize).min(t.len() - 1)];
        out.insert(
            key.to_string(),
            json!({"p50_us": at(0.5), "p90_us": at(0.9), "group": groups[k], "count": t.len()}),
        );
    }
    println!("{}", serde_json::Value::Object(out));
    Ok(())
}

/// One client/server handshake to completion; the key exchange group agreed.
fn handshake(
    client: std::sync::Arc<rustls::ClientConfig>,
    server: std::sync::Arc<rustls::ServerConfig>,
    name: rustls::pki_types::ServerName<'static>,
) -> anyhow::Result<String> {
    let mut c = rustls::Connection::Client(rustls::ClientConnection::new(client, name)?);
    let mut s = rustls::Connection::Server(rustls::ServerConnection::new(server)?);
    let mut flight = Vec::new();
    for _ in 0..10 {
        if !c.is_handshaking() && !s.is_handshaking() {
            let group = c.negotiated_key_exchange_group().map(|g| format!("{:?}", g.name()));
            return Ok(group.unwrap_or_default());
        }
        deliver(&mut c, &mut s, &mut flight)?;
        deliver(&mut s, &mut c, &mut flight)?;
    }
    anyhow::bail!("the handshake did not finish in 10 exchanges")
}

/// Everything `from` has to send, read and processed by `to`.
fn deliver(from: &mut rustls::Connection, to: &mut rustls::Connection, flight: &mut Vec<u8>) -> anyhow::Result<()> {
    flight.clear();
    while from.wants_write() {
        from.write_tls(flight)?;
    }
    let mut rd = &flight[..];
    while !rd.is_empty() {
        to.read_tls(&mut rd)?;
        to.process_new_packets()?;
    }
    Ok(())
}
