//! Traffic and inspection helpers shared by the demo and the end-to-end
//! tests: run `labtool` in pods, read kernel counters with bpftool, read the
//! agents' JSON logs.
use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::lab::{Lab, in_netns};

pub struct Traffic<'a> {
    pub lab: &'a Lab,
    pub labtool: PathBuf,
}

/// Waits (up to 5 s) until something listens on TCP `port` in `netns`.
pub fn wait_listening(netns: &str, port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = in_netns(netns, "ss")
            .args(["-Hltn", &format!("sport = :{port}")])
            .output()?;
        if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("no server listening on port {port} in {netns} after 5 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Traffic<'_> {
    /// Starts a hashing server in `pod` and waits until it listens.
    pub fn serve(&self, pod: &str, port: u16) -> anyhow::Result<Child> {
        let child = self
            .lab
            .exec(pod, &self.labtool.to_string_lossy())?
            .args(["serve", "--port", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("starting labtool serve")?;
        wait_listening(&self.lab.pod(pod)?.netns, port)?;
        Ok(child)
    }

    fn json(cmd: &mut Command) -> anyhow::Result<Value> {
        let out = cmd.stdin(Stdio::null()).output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(text.trim()).with_context(|| {
            format!(
                "labtool printed {text:?}, stderr {:?}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// Sends `bytes` from a pod; the result has `ok`, hashes, and `local`.
    pub fn send(&self, pod: &str, to: SocketAddr, bytes: u64) -> anyhow::Result<Value> {
        Self::json(self.lab.exec(pod, &self.labtool.to_string_lossy())?.args([
            "send",
            "--to",
            &to.to_string(),
            "--bytes",
            &bytes.to_string(),
        ]))
    }

    /// The same from a node, outside every pod cgroup.
    pub fn send_from_node(&self, node: &str, to: SocketAddr, bytes: u64) -> anyhow::Result<Value> {
        Self::json(self.lab.node_exec(node, &self.labtool.to_string_lossy())?.args([
            "send",
            "--to",
            &to.to_string(),
            "--bytes",
            &bytes.to_string(),
        ]))
    }

    /// `connect` from a node's host process: from the kubelet's cgroup
    /// (as a probe) or from another host cgroup.
    pub fn connect_from_node(
        &self,
        node: &str,
        to: SocketAddr,
        timeout_ms: u64,
        kubelet: bool,
    ) -> anyhow::Result<Value> {
        let labtool = self.labtool.to_string_lossy();
        let mut cmd = if kubelet {
            self.lab.kubelet_exec(node, &labtool)?
        } else {
            self.lab.node_exec(node, &labtool)?
        };
        Self::json(cmd.args([
            "connect",
            "--to",
            &to.to_string(),
            "--timeout-ms",
            &timeout_ms.to_string(),
        ]))
    }

    pub fn connect(&self, pod: &str, to: SocketAddr, timeout_ms: u64) -> anyhow::Result<Value> {
        Self::json(self.lab.exec(pod, &self.labtool.to_string_lossy())?.args([
            "connect",
            "--to",
            &to.to_string(),
            "--timeout-ms",
            &timeout_ms.to_string(),
        ]))
    }
}

/// `bpftool -j map dump pinned <pin>`.
pub fn dump_map(lab: &Lab, node: &str, map: &str) -> anyhow::Result<Value> {
    let path = lab.pin_dir(node).join(map);
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(&path)
        .output()
        .context("running bpftool")?;
    if !out.status.success() {
        bail!(
            "bpftool map dump {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Sums a per-CPU array's `formatted` values (BTF-typed) field by field.
pub fn per_cpu_sum(dump: &Value, field: &str) -> u64 {
    dump.as_array()
        .into_iter()
        .flatten()
        .flat_map(|entry| entry["formatted"]["values"].as_array().cloned().unwrap_or_default())
        .map(|v| v["value"][field].as_u64().unwrap_or(0))
        .sum()
}

/// Same-node packets and bytes delivered veth to veth on a node, from `mesh_fast_stats`.
pub fn fast_path_counters(lab: &Lab, node: &str) -> anyhow::Result<(u64, u64)> {
    let dump = dump_map(lab, node, "mesh_fast_stats")?;
    Ok((per_cpu_sum(&dump, "packets"), per_cpu_sum(&dump, "bytes")))
}

/// The agent's structured log records.
pub fn agent_records(lab: &Lab, node: &str) -> Vec<Value> {
    std::fs::read_to_string(lab.agent_log(node))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Records of proxied connections ("connection closed"), with their span
/// fields merged in.
pub fn proxied_connections(lab: &Lab, node: &str) -> Vec<Value> {
    agent_records(lab, node)
        .into_iter()
        .filter(|r| r["message"] == "connection closed")
        .map(|mut r| {
            if let Some(span) = r["span"].as_object().cloned() {
                for (k, v) in span {
                    r[k] = v;
                }
            }
            r
        })
        .collect()
}

/// Path to a binary of this workspace built in the debug profile.
pub fn built_binary(name: &str) -> PathBuf {
    crate::target_dir().join("debug").join(name)
}
