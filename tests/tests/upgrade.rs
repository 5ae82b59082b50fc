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
    args.extend(std::iter::repeat_n("00".to_string(), 31));
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
    mesh_tests::assert_intact(&t.traffic().send("pod-a", t.addr("pod-b"), 100_000).unwrap());
    mesh_tests::assert_intact(&t.traffic().send("pod-a", t.addr("pod-c"), 100_000).unwrap());
    assert!(xtask::probe::splice_counters(lab, "node-a").unwrap().0 > 0);
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
