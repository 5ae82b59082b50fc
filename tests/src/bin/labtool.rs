//! A tiny traffic tool run inside lab pods: a server that hashes what it
//! receives, a client that sends deterministic bytes and checks the hash,
//! and a connect probe that times how a connect ends.
use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use sha2::{Digest as _, Sha256};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Accept connections forever; for each, read to EOF and answer one JSON
    /// line: {"sha256", "bytes", "peer"}.
    Serve {
        #[arg(long)]
        port: u16,
    },
    /// Send `bytes` pseudo-random bytes (from `seed`), half-close, read the
    /// server's answer; print JSON and exit 1 if the hash differs.
    Send {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        bytes: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Keep the connection open this long before sending.
        #[arg(long, default_value_t = 0)]
        hold_ms: u64,
        /// Send this string over and over instead of random bytes, so a
        /// packet capture can look for it.
        #[arg(long)]
        marker: Option<String>,
    },
    /// A minimal HTTP/1.1 server: answers every request with 200, the body
    /// "<METHOD> <PATH>" and an `x-served-by: <its ip:port>` header.
    HttpServe {
        #[arg(long)]
        port: u16,
    },
    /// Send `count` GETs, every other one with the header `with`
    /// ("name: value"), on one keep-alive connection; print who answered:
    /// {"matched": {"ip:port": N}, "unmatched": {..}, "failed", "connections"}.
    HttpTally {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        with: String,
    },
    /// Open `flows` connections at once, then send `bytes` on each and check
    /// each reply; print {"ok": N, "failed": N, "errors": [...]}.
    Burst {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        flows: usize,
        #[arg(long, default_value_t = 16384)]
        bytes: u64,
    },
    /// Bring up the test lab, then wait forever (a test kills this process to
    /// check that `lab down` cleans up after a crashed run).
    LabUpAndHang {
        #[arg(long)]
        agent_bin: std::path::PathBuf,
    },
    /// Call connect() `count` times, one socket each, closing at once; print
    /// {"attempts", "refused" (EPERM: denied by policy), "connected", "other"}.
    Flood {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        count: u64,
    },
    /// Open `count` connections one after another (on `threads` threads),
    /// each sending a few bytes and reading the reply; print which server
    /// answered how often: {"servers": {"ip:port": N}, "failed": N, "errors": [..]}.
    Tally {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 4)]
        threads: usize,
    },
    /// A DNS-style UDP server: answers each datagram "<it>|<its ip:port>".
    UdpServe {
        #[arg(long)]
        port: u16,
    },
    /// `count` UDP requests, one at a time, each waiting up to 1 s for its
    /// answer (one retry); checks the answer matches the request and comes
    /// from `to`. Print {"ok", "wrong", "lost", "retried", "servers", "errors"}.
    UdpAsk {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        count: usize,
        /// connect() the socket to `to` first, then send()/recv().
        #[arg(long)]
        connected: bool,
        /// Use an AF_INET6 socket and `to`'s IPv4-mapped address, as Java's
        /// DatagramSocket does by default.
        #[arg(long)]
        ipv6_socket: bool,
        /// Put this text in every request (to look for it on the wire).
        #[arg(long, default_value = "")]
        marker: String,
    },
    /// Try to connect; print JSON {"ok", "error", "elapsed_ms"}.
    Connect {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
}

fn main() {
    match Cli::parse().cmd {
        Cmd::Serve { port } => serve(port),
        Cmd::Send {
            to,
            bytes,
            seed,
            hold_ms,
            marker,
        } => std::process::exit(send(to, bytes, seed, hold_ms, marker.as_deref())),
        Cmd::Burst { to, flows, bytes } => burst(to, flows, bytes),
        Cmd::HttpServe { port } => http_serve(port),
        Cmd::HttpTally { to, count, with } => http_tally(to, count, &with),
        Cmd::LabUpAndHang { agent_bin } => {
            let topo: xtask::lab::Topology = serde_json::from_value(serde_json::json!({
                "nodes": [{"name": "node-a"}, {"name": "node-b"}],
                "pods": [
                    {"name": "pod-a", "namespace": "t", "node": "node-a"},
                    {"name": "pod-c", "namespace": "t", "node": "node-b"},
                ],
            }))
            .expect("topology");
            let opts = xtask::lab::UpOptions {
                agent_bin,
                policy_dir: None,
                start_agents: true,
                agent_args: vec![],
            };
            xtask::lab::Lab::up(&topo, &opts).expect("lab up");
            println!("up");
            loop {
                std::thread::sleep(Duration::from_secs(60));
            }
        }
        Cmd::Flood { to, count } => flood(to, count),
        Cmd::UdpServe { port } => udp_serve(port),
        Cmd::UdpAsk {
            to,
            count,
            connected,
            ipv6_socket,
            marker,
        } => udp_ask(to, count, connected, ipv6_socket, &marker),
        Cmd::Tally { to, count, threads } => tally(to, count, threads),
        Cmd::Connect { to, timeout_ms } => {
            let start = Instant::now();
            let r = TcpStream::connect_timeout(&to, Duration::from_millis(timeout_ms));
            let elapsed_ms = start.elapsed().as_secs_f64() * 1000.0;
            let out = serde_json::json!({
                "ok": r.is_ok(),
                "error": r.as_ref().err().map(|e| e.to_string()),
                "elapsed_ms": elapsed_ms,
            });
            println!("{out}");
        }
    }
}

/// Sends `payload`, half-closes, and reads the server's JSON answer to EOF.
fn exchange(stream: &mut TcpStream, payload: &[u8]) -> Result<serde_json::Value, String> {
    stream.write_all(payload).map_err(|e| format!("write: {e}"))?;
    stream.shutdown(Shutdown::Write).map_err(|e| format!("shutdown: {e}"))?;
    let mut reply = Vec::new();
    let mut chunk = [0u8; 512];
    loop {
        match read_retrying(stream, &mut chunk) {
            Ok(0) => break,
            Ok(n) => reply.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    serde_json::from_slice(&reply).map_err(|_| "bad reply".to_string())
}

fn tally(to: SocketAddr, count: usize, threads: usize) {
    let one = move || -> Result<String, String> {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5)).map_err(|e| format!("connect: {e}"))?;
        let v = exchange(&mut s, b"tally")?;
        v["server"]
            .as_str()
            .map(String::from)
            .ok_or_else(|| "no server in reply".into())
    };
    let handles: Vec<_> = (0..threads.max(1))
        .map(|t| {
            let n = count / threads.max(1) + usize::from(t < count % threads.max(1));
            std::thread::spawn(move || (0..n).map(|_| one()).collect::<Vec<_>>())
        })
        .collect();
    let mut servers = std::collections::BTreeMap::<String, u64>::new();
    let (mut failed, mut errors) = (0u64, Vec::new());
    for h in handles {
        for r in h.join().expect("tally thread") {
            match r {
                Ok(server) => *servers.entry(server).or_default() += 1,
                Err(e) => {
                    failed += 1;
                    if errors.len() < 5 {
                        errors.push(e);
                    }
                }
            }
        }
    }
    println!(
        "{}",
        serde_json::json!({"servers": servers, "failed": failed, "errors": errors})
    );
}

fn flood(to: SocketAddr, count: u64) {
    let (mut refused, mut connected, mut other) = (0u64, 0u64, 0u64);
    let start = Instant::now();
    for _ in 0..count {
        match TcpStream::connect_timeout(&to, Duration::from_secs(1)) {
            Ok(_) => connected += 1,
            Err(e) if e.raw_os_error() == Some(1) => refused += 1,
            Err(_) => other += 1,
        }
    }
    let out = serde_json::json!({
        "attempts": count, "refused": refused, "connected": connected, "other": other,
        "elapsed_ms": start.elapsed().as_secs_f64() * 1000.0,
    });
    println!("{out}");
}

/// Listeners with a deep accept queue (the tests open 1,000 connections
/// at once, and std's default backlog of 128 would drop SYNs and stall
/// them), one per family: lab pods are dual-stack. Two sockets rather than
/// one dual-stack one, so an IPv4 peer is shown as IPv4, not IPv4-mapped.
fn listen(port: u16) -> [TcpListener; 2] {
    use socket2::{Domain, Socket, Type};
    let bind = |domain: Domain, addr: SocketAddr| {
        let socket = Socket::new(domain, Type::STREAM, None).expect("socket");
        socket.set_reuse_address(true).expect("SO_REUSEADDR");
        if domain == Domain::IPV6 {
            socket.set_only_v6(true).expect("IPV6_V6ONLY");
        }
        socket.bind(&addr.into()).expect("bind");
        socket.listen(4096).expect("listen");
        TcpListener::from(socket)
    };
    [
        bind(Domain::IPV4, SocketAddr::from(([0, 0, 0, 0], port))),
        bind(Domain::IPV6, SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port))),
    ]
}

/// Serves every connection to `port`, either family, on its own thread.
fn each_connection(port: u16, handle: fn(TcpStream)) {
    let [v4, v6] = listen(port);
    std::thread::spawn(move || {
        for stream in v6.incoming().flatten() {
            std::thread::spawn(move || handle(stream));
        }
    });
    for stream in v4.incoming().flatten() {
        std::thread::spawn(move || handle(stream));
    }
}

fn serve(port: u16) {
    each_connection(port, |stream| {
        let peer = stream.peer_addr().map(|p| p.to_string()).unwrap_or_default();
        let server = stream.local_addr().map(|p| p.to_string()).unwrap_or_default();
        let mut stream = stream;
        let mut hasher = Sha256::new();
        let mut total = 0u64;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match read_retrying(&mut stream, &mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    hasher.update(&buf[..n]);
                    total += n as u64;
                }
                Err(_) => return,
            }
        }
        let line =
            serde_json::json!({"sha256": hex(&hasher.finalize()), "bytes": total, "peer": peer, "server": server});
        let _ = writeln!(stream, "{line}");
    });
}

/// xorshift64*: fast, deterministic, and no two seeds give the same stream.
fn fill(state: &mut u64, buf: &mut [u8]) {
    for chunk in buf.chunks_mut(8) {
        *state ^= *state >> 12;
        *state ^= *state << 25;
        *state ^= *state >> 27;
        let v = state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

fn send(to: SocketAddr, bytes: u64, seed: u64, hold_ms: u64, marker: Option<&str>) -> i32 {
    let start = Instant::now();
    let mut stream = match TcpStream::connect_timeout(&to, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => {
            println!("{}", serde_json::json!({"ok": false, "error": format!("connect: {e}")}));
            return 1;
        }
    };
    let local = stream.local_addr().map(|a| a.to_string()).unwrap_or_default();
    std::thread::sleep(Duration::from_millis(hold_ms));
    let mut state = seed.max(1);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        match marker {
            Some(m) => {
                for (i, b) in buf[..n].iter_mut().enumerate() {
                    *b = m.as_bytes()[(sent_so_far(bytes, left) as usize + i) % m.len()];
                }
            }
            None => fill(&mut state, &mut buf[..n]),
        }
        hasher.update(&buf[..n]);
        if let Err(e) = stream.write_all(&buf[..n]) {
            println!("{}", serde_json::json!({"ok": false, "error": format!("write: {e}")}));
            return 1;
        }
        left -= n as u64;
    }
    let _ = stream.shutdown(Shutdown::Write);
    let sent = hex(&hasher.finalize());
    let mut reply_bytes = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(30);
    let read = loop {
        match read_retrying(&mut stream, &mut chunk) {
            Ok(0) => break Ok(reply_bytes.len()),
            Ok(n) => {
                reply_bytes.extend_from_slice(&chunk[..n]);
                if reply_bytes.contains(&b'\n') {
                    break Ok(reply_bytes.len());
                }
            }
            Err(e) => break Err(e),
        }
        if Instant::now() > deadline {
            break Err(std::io::Error::from(std::io::ErrorKind::TimedOut));
        }
    };
    let line = String::from_utf8_lossy(&reply_bytes).to_string();
    let reply: serde_json::Value = serde_json::from_str(line.trim()).unwrap_or(serde_json::Value::Null);
    let ok = reply["sha256"] == sent.as_str() && reply["bytes"] == bytes;
    let out = serde_json::json!({
        "ok": ok, "sent_sha256": sent, "bytes": bytes, "local": local, "reply": reply, "reply_bytes": reply_bytes.len(),
        "read": match read { Ok(n) => format!("{n} bytes"), Err(e) => e.to_string() },
        "elapsed_ms": start.elapsed().as_secs_f64() * 1000.0,
    });
    println!("{out}");
    if ok { 0 } else { 1 }
}

fn http_serve(port: u16) {
    each_connection(port, |stream| {
        {
            let mut stream = stream;
            let me = stream.local_addr().map(|a| a.to_string()).unwrap_or_default();
            // Keep-alive: requests until the client closes.
            while let Some((head, _)) = read_http_message(&mut stream) {
                let mut words = head.split_whitespace();
                let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
                let reply = format!("{method} {path}\n");
                let sent = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nx-served-by: {me}\r\n\r\n{reply}",
                    reply.len()
                );
                if sent.is_err() {
                    return;
                }
            }
        }
    });
}

/// One HTTP/1.1 message (head and content-length body); `None` at EOF.
fn read_http_message(stream: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match read_retrying(stream, &mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let len: usize = header(&head, "content-length").map_or(0, |v| v.parse().unwrap_or(0));
    let mut body = vec![0u8; len];
    let mut got = 0;
    while got < len {
        match read_retrying(stream, &mut body[got..]) {
            Ok(0) | Err(_) => return None,
            Ok(n) => got += n,
        }
    }
    Some((head, body))
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// `count` GET requests, every other one carrying `header`, on as few
/// connections as the server allows; prints who answered each kind.
fn http_tally(to: SocketAddr, count: usize, with: &str) {
    let mut by_kind: [std::collections::BTreeMap<String, u64>; 2] = Default::default();
    let (mut failed, mut connections, mut errors) = (0u64, 0u64, Vec::new());
    let mut stream: Option<TcpStream> = None;
    for i in 0..count {
        let matched = i % 2 == 0;
        let extra = if matched { format!("{with}\r\n") } else { String::new() };
        let request = format!("GET /item/{i} HTTP/1.1\r\nhost: {to}\r\n{extra}\r\n");
        let answer = (|| -> Result<String, String> {
            if stream.is_none() {
                stream = Some(TcpStream::connect(to).map_err(|e| format!("connect: {e}"))?);
                connections += 1;
            }
            let s = stream.as_mut().expect("connected");
            s.write_all(request.as_bytes()).map_err(|e| format!("write: {e}"))?;
            let (head, body) = read_http_message(s).ok_or("connection closed before an answer")?;
            if !head.starts_with("HTTP/1.1 200") {
                return Err(format!(
                    "{}: {}",
                    head.lines().next().unwrap_or(""),
                    String::from_utf8_lossy(&body).trim()
                ));
            }
            if String::from_utf8_lossy(&body) != format!("GET /item/{i}\n") {
                return Err(format!("wrong body {:?}", String::from_utf8_lossy(&body)));
            }
            header(&head, "x-served-by")
                .map(str::to_string)
                .ok_or("no x-served-by".into())
        })();
        match answer {
            Ok(server) => *by_kind[usize::from(matched)].entry(server).or_default() += 1,
            Err(e) => {
                failed += 1;
                stream = None;
                if errors.len() < 5 {
                    errors.push(e);
                }
            }
        }
    }
    let out = serde_json::json!({
        "matched": by_kind[1], "unmatched": by_kind[0],
        "failed": failed, "connections": connections, "errors": errors,
    });
    println!("{out}");
}

/// Answers datagrams on `port` of both families (one socket each, so an
/// IPv4 peer is answered from the IPv4 socket).
fn udp_serve(port: u16) {
    let bind = |addr: SocketAddr| {
        socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::DGRAM, None)
            .and_then(|s| {
                if addr.is_ipv6() {
                    s.set_only_v6(true)?;
                }
                s.bind(&addr.into()).map(|()| std::net::UdpSocket::from(s))
            })
            .unwrap_or_else(|e| {
                eprintln!("udp bind {addr}: {e}");
                std::process::exit(1)
            })
    };
    let v6 = bind(SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)));
    std::thread::spawn(move || answer(&v6, SocketAddr::new(local_ip(true), port)));
    answer(
        &bind(SocketAddr::from(([0, 0, 0, 0], port))),
        SocketAddr::new(local_ip(false), port),
    );
}

/// Echoes each datagram with `|<me>` appended: which server answered.
fn answer(socket: &std::net::UdpSocket, me: SocketAddr) {
    let me = me.to_string();
    let mut buf = [0u8; 2048];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let mut answer = buf[..n].to_vec();
        answer.extend_from_slice(format!("|{me}").as_bytes());
        let _ = socket.send_to(&answer, from);
    }
}

/// The pod's address of one family (its only non-loopback one), found the
/// way a UDP socket would pick its source.
fn local_ip(ipv6: bool) -> std::net::IpAddr {
    let (bind, toward) = if ipv6 {
        ("[::]:0", "[2001:2::1]:9")
    } else {
        ("0.0.0.0:0", "198.18.0.1:9")
    };
    let probe = std::net::UdpSocket::bind(bind).expect("udp socket");
    let _ = probe.connect(toward);
    probe.local_addr().map(|a| a.ip()).unwrap_or([0, 0, 0, 0].into())
}

fn udp_ask(to: SocketAddr, count: usize, connected: bool, ipv6_socket: bool, marker: &str) {
    let (socket, to) = match (ipv6_socket, to) {
        (true, SocketAddr::V4(v4)) => (
            std::net::UdpSocket::bind("[::]:0").expect("udp6 socket"),
            SocketAddr::from((v4.ip().to_ipv6_mapped(), v4.port())),
        ),
        (_, SocketAddr::V6(_)) => (std::net::UdpSocket::bind("[::]:0").expect("udp6 socket"), to),
        (_, SocketAddr::V4(_)) => (std::net::UdpSocket::bind("0.0.0.0:0").expect("udp socket"), to),
    };
    socket.set_read_timeout(Some(Duration::from_secs(1))).expect("timeout");
    if connected {
        socket.connect(to).expect("udp connect");
    }
    let (mut ok, mut wrong, mut lost, mut retried) = (0u64, 0u64, 0u64, 0u64);
    let mut servers: std::collections::BTreeMap<String, u64> = Default::default();
    let mut errors = Vec::new();
    let mut buf = [0u8; 2048];
    let mut seed = std::process::id() as u64;
    for i in 0..count {
        let mut nonce = [0u8; 8];
        fill(&mut seed, &mut nonce);
        let request = format!("q{i}-{}{marker}", hex(&nonce));
        let mut answered = None;
        for attempt in 0..2 {
            if attempt > 0 {
                retried += 1;
                if errors.len() < 5 {
                    errors.push(format!("request {i} retried after 1 s without an answer"));
                }
            }
            let sent = if connected {
                socket.send(request.as_bytes())
            } else {
                socket.send_to(request.as_bytes(), to)
            };
            if let Err(e) = sent {
                errors.push(format!("send {i}: {e}"));
                continue;
            }
            // Skip late answers to earlier requests; anything else is the answer.
            while let Ok((n, from)) = socket.recv_from(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).to_string();
                let earlier = text
                    .strip_prefix('q')
                    .and_then(|t| t.split('-').next())
                    .and_then(|j| j.parse::<usize>().ok())
                    .is_some_and(|j| j < i);
                if !earlier {
                    answered = Some((text, from));
                    break;
                }
            }
            if answered.is_some() {
                break;
            }
        }
        match answered {
            None => lost += 1,
            Some((text, from)) => match text.strip_prefix(&format!("{request}|")) {
                Some(server) if from == to => {
                    ok += 1;
                    *servers.entry(server.to_string()).or_default() += 1;
                }
                _ => {
                    wrong += 1;
                    if errors.len() < 5 {
                        errors.push(format!("request {request:?}: answer {text:?} from {from}"));
                    }
                }
            },
        }
    }
    let out = serde_json::json!({
        "ok": ok, "wrong": wrong, "lost": lost, "retried": retried,
        "servers": servers, "errors": errors,
    });
    println!("{out}");
}

/// All connections are open before any sends (a barrier), so the agent
/// really holds `flows` concurrent flows.
fn burst(to: SocketAddr, flows: usize, bytes: u64) {
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(flows));
    let handles: Vec<_> = (0..flows)
        .map(|i| {
            let barrier = barrier.clone();
            std::thread::Builder::new()
                .stack_size(128 * 1024)
                .spawn(move || -> Result<(), String> {
                    let stream = TcpStream::connect_timeout(&to, Duration::from_secs(10));
                    barrier.wait();
                    let mut stream = stream.map_err(|e| format!("connect: {e}"))?;
                    let mut state = i as u64 + 1;
                    let mut buf = vec![0u8; bytes as usize];
                    fill(&mut state, &mut buf);
                    let v = exchange(&mut stream, &buf)?;
                    let want = hex(&Sha256::digest(&buf));
                    if v["sha256"] == want.as_str() {
                        Ok(())
                    } else {
                        Err(format!("hash mismatch: {v}"))
                    }
                })
                .expect("thread")
        })
        .collect();
    let results: Vec<Result<(), String>> = handles
        .into_iter()
        .map(|h| h.join().unwrap_or(Err("panic".into())))
        .collect();
    let errors: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).take(5).collect();
    let ok = results.iter().filter(|r| r.is_ok()).count();
    println!(
        "{}",
        serde_json::json!({"ok": ok, "failed": flows - ok, "errors": errors})
    );
}

fn sent_so_far(total: u64, left: u64) -> u64 {
    total - left
}

/// A read that retries only EINTR: a blocking socket never returns EAGAIN
/// (the same-node fast path is below TCP; the sockmap splice, which could,
/// is gone), so an EAGAIN here is an error the tests must see.
fn read_retrying(stream: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match stream.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
