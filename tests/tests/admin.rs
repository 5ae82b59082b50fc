//! The agent's admin API and health endpoints, in the lab.
use std::time::Duration;

use mesh_tests::{TestLab, wait_for};
use serde_json::Value;

const LABTOOL: &str = env!("CARGO_BIN_EXE_labtool");

#[test]
fn status_config_dump_readiness_and_log_level() {
    let t = TestLab::up(&[], LABTOOL);
    let lab = &t.lab;
    let agent = lab.agent_bin.to_string_lossy().to_string();
    let run = |args: &[&str]| {
        let out = lab
            .node_exec("node-a", args[0])
            .unwrap()
            .args(&args[1..])
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).to_string())
    };
    let fabric = lab.node("node-a").unwrap().fabric_ip;
    wait_for("readiness", Duration::from_secs(10), || {
        run(&[
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://{fabric}:15021/readyz"),
        ])
        .1 == "200"
    });
    assert_eq!(
        run(&["curl", "-s", &format!("http://{fabric}:15021/healthz")]).1,
        "ok\n"
    );

    let (code, text) = run(&[&agent, "status"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.starts_with("node node-a: ready"), "{text}");
    assert!(text.contains("t/pod-a 198.18.1.10 sa=sa-a"), "{text}");
    // Permissive: the kernel allows all (and says which generation it holds).
    assert!(
        text.contains("kernel enforces: allow-all, policy generation "),
        "{text}"
    );
    assert!(
        text.contains("certificate spiffe://cluster.local/ns/t/sa/sa-a"),
        "{text}"
    );

    let (_, dump) = run(&["curl", "-s", "http://127.0.0.1:15000/config_dump"]);
    let d: Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(d["node"], "node-a");
    assert_eq!(d["workloads"].as_array().unwrap().len(), 3);
    assert_eq!(d["policy"]["mode"], "permissive");
    assert_eq!(d["certificates"].as_array().unwrap().len(), 2);
    assert!(
        !dump.contains("PRIVATE KEY") && !dump.to_lowercase().contains("\"key\""),
        "keys in the dump: {dump}"
    );

    // The log filter changes at run time; a bad one is refused and changes nothing.
    let (_, ok) = run(&[
        "curl",
        "-s",
        "-X",
        "PUT",
        "http://127.0.0.1:15000/logging?level=mesh_agent=debug",
    ]);
    assert_eq!(ok, "log filter is now mesh_agent=debug\n");
    let (_, bad) = run(&[
        "curl",
        "-s",
        "-w",
        " %{http_code}",
        "-X",
        "PUT",
        "http://127.0.0.1:15000/logging?level=mesh_agent=loud",
    ]);
    assert!(bad.contains("does not parse") && bad.ends_with(" 400"), "{bad}");
    // Metrics: kernel counters and per-workload connection counters move
    // with a cross-node flow.
    mesh_tests::assert_intact(&t.traffic().send("pod-a", t.addr("pod-c"), 100_000).unwrap());
    std::thread::sleep(Duration::from_millis(1500));
    let (_, metrics) = run(&["curl", "-s", &format!("http://{fabric}:15020/metrics")]);
    let pair = [
        ("source_workload", "t/pod-a"),
        ("source_identity", "t/sa-a"),
        ("destination_workload", "t/pod-c"),
        ("destination_identity", "t/sa-c"),
        ("path", "tunnel"),
    ];
    for (name, labels, want) in [
        ("mesh_kernel_connects_total", &[("outcome", "redirected")][..], 1.0),
        ("mesh_connections_opened_total", &pair[..], 1.0),
        ("mesh_connections_closed_total", &pair[..], 1.0),
        ("mesh_connection_sent_bytes_total", &pair[..], 100_000.0),
    ] {
        assert_eq!(
            mesh_tests::metric(&metrics, name, labels),
            want,
            "{name} in:\n{metrics}"
        );
    }
    // The admin API answers on loopback only.
    let (_, remote) = run(&[
        "curl",
        "-s",
        "-m",
        "2",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("http://{fabric}:15000/config_dump"),
    ]);
    assert_eq!(remote, "000", "admin API reachable off loopback");
}
