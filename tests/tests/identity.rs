//! End-to-end tests of workload identity in the lab: the mesh CA in its own
//! namespace, node agents authenticating with per-node bootstrap
//! credentials. (Rotation under a live TLS connection, and verification
//! against the root, are tested in process in mesh-agent's identity module.)
use std::{process::Command, time::Duration};

use mesh_tests::{TestLab, log_records, wait_for};
use serde_json::Value;
use xtask::lab::{CA_IP, CA_PORT, Lab};

const LABTOOL: &str = env!("CARGO_BIN_EXE_labtool");
const TD: &str = "cluster.local";

fn spiffe(sa: &str) -> String {
    format!("spiffe://{TD}/ns/t/sa/{sa}")
}

/// Identities a node's agent has logged "certificate issued" for.
fn issued(lab: &Lab, node: &str) -> Vec<String> {
    log_records(&lab.agent_log(node))
        .into_iter()
        .filter(|r| r["message"] == "certificate issued")
        .filter_map(|r| r["identity"].as_str().map(String::from))
        .collect()
}

/// `mesh-agent ca request` from a node, as that node or with another token file.
fn request(lab: &Lab, node: &str, token_file: &std::path::Path, identity: &str) -> (bool, String) {
    let out = lab
        .node_exec(node, &lab.agent_bin.to_string_lossy())
        .unwrap()
        .args(["ca", "request", "--ca-addr", &format!("{CA_IP}:{CA_PORT}")])
        .arg("--ca-root")
        .arg(lab.ca_dir().join("ca.crt"))
        .arg("--node-token-file")
        .arg(token_file)
        .args(["--identity", identity])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn metric(text: &str, name: &str, identity: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l.contains(&format!("identity=\"{identity}\"")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn agents_obtain_certificates_for_their_own_workloads_and_nothing_else() {
    let t = TestLab::up(&[], LABTOOL);
    let lab = &t.lab;
    wait_for("node-a certificates", Duration::from_secs(10), || {
        issued(lab, "node-a").len() >= 2
    });
    wait_for("node-b certificates", Duration::from_secs(10), || {
        !issued(lab, "node-b").is_empty()
    });
    let mut a = issued(lab, "node-a");
    a.sort();
    assert_eq!(a, [spiffe("sa-a"), spiffe("sa-b")]);
    assert_eq!(issued(lab, "node-b"), [spiffe("sa-c")]);
    // Each issuance is in the node's audit trail.
    let mut audited: Vec<String> = mesh_tests::log_records(&lab.audit_log("node-a"))
        .into_iter()
        .filter(|r| r["kind"] == "certificate" && r["verdict"] == "allow" && r["enforced_at"] == "ca")
        .map(|r| r["source_identity"].as_str().unwrap_or("").to_string())
        .collect();
    audited.sort();
    assert_eq!(audited, [spiffe("sa-a"), spiffe("sa-b")]);
    // The expiry gauge is refreshed every second.
    wait_for("expiry gauge", Duration::from_secs(5), || {
        metric(
            &mesh_tests::metrics_text(lab, "node-a"),
            "mesh_certificate_expiry_seconds",
            &spiffe("sa-a"),
        )
        .is_some()
    });
    let m = mesh_tests::metrics_text(lab, "node-a");
    let left = metric(&m, "mesh_certificate_expiry_seconds", &spiffe("sa-a")).unwrap();
    assert!(left > 23.0 * 3600.0, "default TTL is 24 h: {left}");

    // node-a asking for pod-c's identity (on node-b) is refused, by name.
    let (ok, text) = request(lab, "node-a", &lab.node_token_file("node-a"), &spiffe("sa-c"));
    assert!(!ok, "{text}");
    assert!(
        text.contains("PermissionDenied") && text.contains("node-a") && text.contains("node-b"),
        "{text}"
    );
    // Its own identity is fine.
    let (ok, text) = request(lab, "node-a", &lab.node_token_file("node-a"), &spiffe("sa-a"));
    assert!(ok, "{text}");
    let issued_json: Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(issued_json["identity"], spiffe("sa-a"));

    // Unknown and expired node credentials: Unauthenticated.
    let bogus = std::env::temp_dir().join(format!("mesh-bogus-token-{}", std::process::id()));
    std::fs::write(&bogus, "not-a-real-token").unwrap();
    let (ok, text) = request(lab, "node-a", &bogus, &spiffe("sa-a"));
    assert!(
        !ok && text.contains("Unauthenticated") && text.contains("unknown node credential"),
        "{text}"
    );
    let creds = std::fs::read_to_string(lab.node_credentials_file()).unwrap();
    let hash = xtask_sha256("expired-token");
    std::fs::write(
        lab.node_credentials_file(),
        format!("{creds}  - node: node-a\n    tokenSha256: {hash}\n    expiresUnix: 1000\n"),
    )
    .unwrap();
    std::fs::write(&bogus, "expired-token").unwrap();
    let (ok, text) = request(lab, "node-a", &bogus, &spiffe("sa-a"));
    let _ = std::fs::remove_file(&bogus);
    assert!(
        !ok && text.contains("Unauthenticated") && text.contains("expired"),
        "{text}"
    );

    // Garbage on the CA port (sent from node-a: lab traffic stays inside
    // lab namespaces) is dropped without hurting anyone else.
    let out = lab
        .node_exec("node-a", "sh")
        .unwrap()
        .args([
            "-c",
            &format!("printf 'GARBAGE\\r\\n\\r\\n' | timeout 3 socat - TCP:{CA_IP}:{CA_PORT}; true"),
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let (ok, text) = request(lab, "node-b", &lab.node_token_file("node-b"), &spiffe("sa-c"));
    assert!(ok, "the CA stopped serving after garbage: {text}");

    // Every decision is audited by the CA.
    let audit: Vec<Value> = log_records(&lab.ca_log())
        .into_iter()
        .filter(|r| r["target"] == "audit")
        .collect();
    assert!(
        audit
            .iter()
            .any(|r| r["verdict"] == "deny" && r["node"] == "node-a" && r["identity"] == spiffe("sa-c"))
    );
    assert!(
        audit
            .iter()
            .any(|r| r["verdict"] == "allow" && r["node"] == "node-b" && r["identity"] == spiffe("sa-c"))
    );
}

fn xtask_sha256(s: &str) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn with_the_ca_down_agents_keep_their_certificates_count_failures_and_recover() {
    let t = TestLab::up(&["--cert-ttl=60s"], LABTOOL);
    let lab = &t.lab;
    let id = spiffe("sa-c");
    wait_for("first certificate", Duration::from_secs(10), || {
        issued(lab, "node-b").len() == 1
    });
    lab.stop_ca().unwrap();
    // Refresh is due at about 27-30 s; it fails while the CA is away.
    wait_for("a failed refresh", Duration::from_secs(40), || {
        log_records(&lab.agent_log("node-b"))
            .iter()
            .any(|r| r["message"] == "certificate refresh failed")
    });
    let m = mesh_tests::metrics_text(lab, "node-b");
    let failures = metric(&m, "mesh_certificate_issue_failures_total", &id).unwrap_or(0.0);
    assert!(failures >= 1.0, "failures not counted:\n{m}");
    let left = metric(&m, "mesh_certificate_expiry_seconds", &id).unwrap();
    assert!(
        left > 0.0,
        "the existing certificate must still be valid and served: {left}"
    );
    let refusal = log_records(&lab.agent_log("node-b"))
        .into_iter()
        .find(|r| r["message"] == "certificate refresh failed")
        .unwrap();
    assert_eq!(refusal["serving_existing"], true, "{refusal}");
    assert!(refusal["error"].as_str().unwrap().contains("unreachable"), "{refusal}");

    lab.start_ca().unwrap();
    wait_for("recovery", Duration::from_secs(15), || issued(lab, "node-b").len() >= 2);
}

#[test]
fn no_private_key_ever_touches_the_disk_on_the_agent_side() {
    let t = TestLab::up(&[], LABTOOL);
    let lab = &t.lab;
    lab.stop_agent("node-a").unwrap();
    // Restart node-a's agent under strace, recording every call that could
    // create or write a file.
    let trace = std::env::temp_dir().join(format!("mesh-agent-{}.strace", std::process::id()));
    let trace_s = trace.to_string_lossy().to_string();
    let calls = "trace=open,openat,openat2,creat,rename,renameat,renameat2,link,linkat,symlink,symlinkat,mknod,mknodat,truncate";
    lab.start_agent_wrapped("node-a", &["strace", "-f", "-qq", "-e", calls, "-o", &trace_s])
        .unwrap();
    wait_for("certificates under strace", Duration::from_secs(15), || {
        issued(lab, "node-a").len() >= 4
    });
    let text = std::fs::read_to_string(&trace).unwrap();
    let _ = std::fs::remove_file(&trace);
    let opens = text.lines().filter(|l| l.contains("open")).count();
    assert!(opens > 5, "strace saw nothing; is it tracing the agent?\n{text}");
    let writes: Vec<&str> = text
        .lines()
        .filter(|l| {
            let write_open = l.contains("open")
                && ["O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC"]
                    .iter()
                    .any(|f| l.contains(f));
            let other = ["rename", "link(", "linkat", "symlink", "mknod", "truncate"]
                .iter()
                .any(|c| l.contains(c));
            // The audit trail is the one file the agent appends to (no keys in it).
            let audit = l.contains(&*lab.audit_log("node-a").to_string_lossy());
            (write_open || other) && !audit
        })
        .collect();
    assert!(
        writes.is_empty(),
        "the agent wrote to the filesystem:\n{}",
        writes.join("\n")
    );
    // And the only key material on disk is the CA's own.
    let out = Command::new("grep")
        .args(["-rl", "PRIVATE KEY", "/run/mesh-lab"])
        .output()
        .unwrap();
    let found = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(
        found,
        lab.ca_dir().join("ca.key").to_string_lossy(),
        "private keys found: {found}"
    );
}
