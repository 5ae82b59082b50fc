//! Upgrades and removal, in the lab: an agent finding pins of an older map
//! layout replaces them and says so; `mesh-agent uninstall` removes every
//! pin, link and map, and pods keep talking, unmeshed.
use std::{process::Command, time::Duration};

use mesh_tests::{TestLab, log_records, wait_for};

const LABTOOL: &str = env!("CARGO_BIN_EXE_labtool");

fn bpftool_names(what: &str) -> Vec<String> {
    let out = Command::new("bpftool").args(["-j", what, "show"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["name"].as_str().map(String::from))
        .filter(|n| n.starts_with("mesh_"))
        .collect()
}

#[test]
fn pins_of_an_older_layout_are_replaced_and_the_agent_says_so() {
    let t = TestLab::up(&[], LABTOOL);
    let lab = &t.lab;
    lab.stop_agent("node-a").unwrap();
    // Make the pinned mesh_config claim an older layout (v1, all else zero).
    let config = lab.pin_dir("node-a").join("mesh_config");
    let mut args: Vec<String> = ["map", "update", "pinned"].map(String::from).to_vec();
    args.push(config.to_string_lossy().into());
    args.extend(["key", "hex", "00", "00", "00", "00", "value", "hex", "01"].map(String::from));
    args.extend(std::iter::repeat_n(
        "00".to_string(),
        std::mem::size_of::<mesh_common::Config>() - 1,
    ));
    let out = Command::new("bpftool").args(&args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    lab.start_agent("node-a").unwrap();
    let records = log_records(&lab.agent_log("node-a"));
    let said = records
        .iter()
        .find(|r| {
            r["message"]
                .as_str()
                .unwrap_or("")
                .contains("older layout: replacing them")
        })
        .unwrap_or_else(|| panic!("the agent did not say it replaced the pins"));
    println!("agent: {said}");
    assert_eq!(said["pinned_layout"], 1);
    // The new pins are in force and carry traffic on both paths.
    let dump = xtask::probe::dump_map(lab, "node-a", "mesh_config").unwrap();
    assert_eq!(
        dump[0]["formatted"]["value"]["layout_version"],
        mesh_common::MAP_LAYOUT_VERSION,
        "{dump}"
    );
    mesh_tests::wait_for(
        "the fast path on node-a's pods",
        std::time::Duration::from_secs(5),
        || {
            xtask::probe::dump_map(lab, "node-a", "mesh_pod_devs")
                .is_ok_and(|d| d.as_array().is_some_and(|a| a.len() >= 4))
        },
    );
    mesh_tests::assert_intact(&t.traffic().send("pod-a", t.addr("pod-b"), 100_000).unwrap());
    mesh_tests::assert_intact(&t.traffic().send("pod-a", t.addr("pod-c"), 100_000).unwrap());
    assert!(xtask::probe::fast_path_counters(lab, "node-a").unwrap().0 > 0);
}

#[test]
fn uninstall_removes_every_pin_program_and_map_and_pods_still_talk() {
    let t = TestLab::up(&[], LABTOOL);
    let lab = &t.lab;
    let agent = lab.agent_bin.to_string_lossy().to_string();
    assert!(!bpftool_names("prog").is_empty(), "no mesh programs before uninstall?");
    let uninstall = |node: &str, force: bool| {
        let pins = lab.pin_dir(node).to_string_lossy().to_string();
        let mut cmd = Command::new(&agent);
        cmd.args(["uninstall", "--bpffs-dir", &pins]);
        if force {
            cmd.arg("--force");
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    // While an agent runs, uninstall refuses and says what to do.
    let (ok, text) = uninstall("node-a", false);
    assert!(
        !ok && text.contains("an agent is running") && text.contains("--force"),
        "{text}"
    );

    for node in ["node-a", "node-b"] {
        lab.stop_agent(node).unwrap();
        let (ok, text) = uninstall(node, false);
        assert!(ok, "{text}");
        assert!(text.contains("mesh_config") && text.contains("link_connect4"), "{text}");
        assert!(!lab.pin_dir(node).exists());
    }
    // The kernel drops what nothing references any more.
    wait_for("mesh programs and maps gone", Duration::from_secs(5), || {
        bpftool_names("prog").is_empty() && bpftool_names("map").is_empty()
    });
    // Pods still talk, directly: same node and cross node.
    mesh_tests::assert_intact(&t.traffic().send("pod-a", t.addr("pod-b"), 100_000).unwrap());
    mesh_tests::assert_intact(&t.traffic().send("pod-a", t.addr("pod-c"), 100_000).unwrap());
    // Nothing left to remove: said so, not an error.
    let (ok, text) = uninstall("node-a", false);
    assert!(ok && text.contains("nothing pinned"), "{text}");
}

const BENCHTOOL: &str = env!("CARGO_BIN_EXE_benchtool");
const ECHO_PORT: u16 = 9100;
const GRACE_S: u64 = 2;

/// A benchtool client in a pod, stopped by closing its stdin.
struct Load {
    what: String,
    child: std::process::Child,
}

impl Load {
    fn start(t: &TestLab, what: &str, pod: &str, args: &[&str]) -> Load {
        let child = t
            .lab
            .exec(pod, BENCHTOOL)
            .unwrap()
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        Load {
            what: what.to_string(),
            child,
        }
    }

    fn finish(mut self) -> (String, serde_json::Value) {
        drop(self.child.stdin.take());
        let out = self.child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let v = serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{}: no JSON ({e}): {text}", self.what));
        (self.what, v)
    }
}

/// Issue 8, must-show 1: every node's agent is replaced in turn (the new
/// one takes the listeners, the old one drains for --drain-grace and
/// exits) while new connections keep coming, same node and across nodes
/// both ways, and long-lived connections ping every 200 ms. No new
/// connection may be refused or broken, no same-node connection may end,
/// and each tunneled one survives or ends cleanly (EOF, not reset); a
/// long-lived one that ends does so while its agent drains.
#[test]
fn a_rolling_restart_under_load_refuses_nothing_and_breaks_nothing() {
    let grace = format!("--drain-grace={GRACE_S}s");
    let t = TestLab::up(&["--policy-mode=permissive", &grace], LABTOOL);
    let lab = &t.lab;
    let _servers: Vec<mesh_tests::KillOnDrop> = ["pod-a", "pod-b", "pod-c"]
        .iter()
        .map(|p| {
            mesh_tests::KillOnDrop(
                lab.exec(p, BENCHTOOL)
                    .unwrap()
                    .args(["echo-serve", "--port", &ECHO_PORT.to_string()])
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    let to = |pod: &str| format!("{}:{ECHO_PORT}", t.addr(pod).ip());
    for pod in ["pod-a", "pod-b", "pod-c"] {
        xtask::probe::wait_listening(&lab.pod(pod).unwrap().netns, ECHO_PORT).unwrap();
    }
    // (what, from, mode, to, how many: per second, or held)
    let plan = [
        ("new, same node (a->b)", "pod-a", "churn", "pod-b", "100"),
        ("new, cross node (a->c)", "pod-a", "churn", "pod-c", "100"),
        ("new, cross node (c->a)", "pod-c", "churn", "pod-a", "100"),
        ("long, same node (a->b)", "pod-a", "long", "pod-b", "10"),
        ("long, cross node (a->c)", "pod-a", "long", "pod-c", "10"),
        ("long, cross node (c->b)", "pod-c", "long", "pod-b", "10"),
    ];
    let loads: Vec<Load> = plan
        .iter()
        .map(|(what, from, mode, dst, n)| {
            let amount = if *mode == "churn" { "--rate" } else { "--count" };
            Load::start(&t, what, from, &[mode, "--to", &to(dst), amount, n])
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    let mut rolls = Vec::new();
    for node in ["node-a", "node-b"] {
        let started = now_ms();
        lab.roll_agent(node, Duration::from_secs(GRACE_S + 10)).unwrap();
        rolls.push((node, started, now_ms()));
        std::thread::sleep(Duration::from_secs(1));
    }
    let results: Vec<(String, serde_json::Value)> = loads.into_iter().map(Load::finish).collect();

    let cell = |v: &serde_json::Value| v.as_u64().map_or("-".to_string(), |n| n.to_string());
    println!(
        "{:<26} {:>6} {:>8} {:>6} {:>7} {:>9} {:>13}",
        "load", "ok", "refused", "ended", "broken", "survived", "ended (drain)"
    );
    for (what, r) in &results {
        let ended_long = r["ended_at_unix_ms"].as_array().map(|a| a.len().to_string());
        println!(
            "{what:<26} {:>6} {:>8} {:>6} {:>7} {:>9} {:>13}   {}",
            cell(&r["ok"]),
            cell(&r["refused"]),
            cell(&r["ended"]),
            cell(&r["broken"]),
            cell(&r["survived"]),
            ended_long.unwrap_or_else(|| "-".into()),
            r["errors"]
        );
    }
    for (what, r) in &results {
        assert_eq!(r["broken"], 0, "{what}: broken connections: {r}");
        if what.starts_with("new") {
            assert_eq!(r["refused"], 0, "{what}: refused new connections: {r}");
            assert!(
                r["ok"].as_u64().unwrap() > 300,
                "{what}: too little load to mean anything: {r}"
            );
            // None may end before its echo. (Once 1 of ~575 tunneled ones
            // did, in 2 of ~20 runs: a stream opened in the instant before
            // the peer saw GOAWAY was lost when the drained agent closed.)
            assert_eq!(r["ended"], 0, "{what}: short connections ended before their echo: {r}");
        } else if what.contains("same node") {
            assert_eq!(r["survived"], 10, "{what}: same-node connections must all survive: {r}");
        } else {
            let ended = r["ended_at_unix_ms"].as_array().unwrap();
            assert_eq!(r["survived"].as_u64().unwrap() + ended.len() as u64, 10, "{what}: {r}");
            // A clean end happens while an agent drains: after its
            // successor took over, by the end of the grace period (plus
            // the 200 ms ping interval to notice).
            for at in ended.iter().map(|v| v.as_u64().unwrap()) {
                assert!(
                    rolls.iter().any(|(_, from, to)| (*from..=*to + 500).contains(&at)),
                    "{what}: ended at {at}, outside every roll {rolls:?}"
                );
            }
        }
    }
    // Each replacement was a handoff, not a restart from scratch.
    for node in ["node-a", "node-b"] {
        let records = log_records(&lab.agent_log(node));
        let said = |m: &str| records.iter().filter(|r| r["message"] == m).count();
        assert_eq!(said("took over the listeners; the previous agent drains"), 1, "{node}");
        assert_eq!(said("handed over; the successor serves this node"), 1, "{node}");
        assert_eq!(
            said("received the QUIC tunnel socket from the previous agent"),
            1,
            "{node}"
        );
    }
}
