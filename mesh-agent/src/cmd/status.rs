//! `mesh-agent status`: a short human summary from the admin API.
use anyhow::Context as _;

pub async fn run(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    use http_body_util::{BodyExt as _, Empty};
    let tcp = tokio::net::TcpStream::connect(addr).await.with_context(|| {
        format!("connecting to the agent's admin API at {addr} (is the agent running on this node? see --admin-addr)")
    })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::get("/config_dump")
        .header("host", addr.to_string())
        .body(Empty::<bytes::Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    anyhow::ensure!(resp.status().is_success(), "admin API answered {}", resp.status());
    let body = resp.into_body().collect().await?.to_bytes();
    let d: serde_json::Value = serde_json::from_slice(&body)?;
    print!("{}", status_text(&d));
    Ok(())
}

/// The status summary, from a config dump.
pub fn status_text(d: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let not_ready: Vec<&str> = d["not_ready"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str())
        .collect();
    let _ = writeln!(
        out,
        "node {}: {}",
        d["node"].as_str().unwrap_or("?"),
        if not_ready.is_empty() {
            "ready".to_string()
        } else {
            format!("NOT READY ({})", not_ready.join("; "))
        }
    );
    let p = &d["policy"];
    let _ = writeln!(
        out,
        "policy: {}, generation {}, {} TrafficTargets, {} refused",
        p["mode"].as_str().unwrap_or("?"),
        p["generation"],
        p["traffic_targets"].as_array().map_or(0, |a| a.len()),
        p["refused"].as_array().map_or(0, |a| a.len())
    );
    // What the kernel enforces may be a predecessor's generation (until this
    // agent's first policy is written) or the last one written before a refusal.
    let k = &d["kernel"];
    let _ = writeln!(
        out,
        "kernel enforces: {}, policy generation {}",
        k["policy_mode"].as_str().unwrap_or("?"),
        k["policy_generation"]
    );
    for r in p["refused"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  refused {} {}: {}",
            r["kind"].as_str().unwrap_or(""),
            r["name"].as_str().unwrap_or(""),
            r["reason"].as_str().unwrap_or("")
        );
    }
    let tp = &d["traffic_policies"];
    for c in tp["client"].as_array().into_iter().flatten() {
        let ejected: Vec<String> = c["ejected"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                format!(
                    "{} (next probe in {} ms, ejected {} times in a row)",
                    e["endpoint"].as_str().unwrap_or(""),
                    e["next_probe_in_ms"],
                    e["times"]
                )
            })
            .collect();
        let _ = writeln!(
            out,
            "{} on {}: {} endpoints ejected{}{}",
            c["policy"].as_str().unwrap_or(""),
            c["service"].as_str().unwrap_or(""),
            ejected.len(),
            if ejected.is_empty() { "" } else { ": " },
            ejected.join(", ")
        );
    }
    for l in tp["rate_limits"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "{}: {} requests refused by its rate limits on this node",
            l["policy"].as_str().unwrap_or(""),
            l["rejected"]
        );
    }
    for r in tp["refused"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  refused {}: {}",
            r["name"].as_str().unwrap_or(""),
            r["reason"].as_str().unwrap_or("")
        );
    }
    let workloads: Vec<&serde_json::Value> = d["workloads"].as_array().into_iter().flatten().collect();
    let local: Vec<&&serde_json::Value> = workloads.iter().filter(|w| w["local"] == true).collect();
    let _ = writeln!(
        out,
        "workloads: {} on this node, {} in the mesh",
        local.len(),
        workloads.len()
    );
    for w in local {
        let _ = writeln!(
            out,
            "  {} {} sa={}",
            w["name"].as_str().unwrap_or(""),
            w["ip"].as_str().unwrap_or(""),
            w["service_account"].as_str().unwrap_or("")
        );
    }
    for c in d["certificates"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "certificate {} serial {} expires in {} s",
            c["identity"].as_str().unwrap_or(""),
            c["serial"].as_str().unwrap_or(""),
            c["expires_in_s"]
        );
    }
    let k = &d["kernel"];
    let _ = writeln!(
        out,
        "kernel: {} redirected, {} same-node, {} denied, {} passthrough, {} audit events dropped; fast path: {} packets ({} bytes) on {} pod veths",
        k["redirected"],
        k["same_node"],
        k["denied"],
        k["passthrough"],
        k["events_dropped"],
        k["fast_path_packets"],
        k["fast_path_bytes"],
        k["fast_path_links"]
    );
    out
}
