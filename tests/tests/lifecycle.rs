//! The policy lifecycle in the lab (issue 18): the mesh is never weaker than
//! its policy while agents restart, and a policy too large for the kernel
//! is refused whole while the one in force keeps enforcing.
use std::{process::Command, time::Duration};

use mesh_tests::{KillOnDrop, TestLab, log_records, wait_for};
use serde_json::Value;

const LABTOOL: &str = env!("CARGO_BIN_EXE_labtool");
const BENCHTOOL: &str = env!("CARGO_BIN_EXE_benchtool");
const ECHO_PORT: u16 = 9100;

/// sa-a may reach sa-c; nobody may reach sa-b.
const POLICY: &str = "
kind: TCPRoute
metadata: {name: echo, namespace: t}
spec: {matches: {ports: [9100]}}
---
kind: TrafficTarget
metadata: {name: a-to-c, namespace: t}
spec:
  destination: {kind: ServiceAccount, name: sa-c}
  rules: [{kind: TCPRoute, name: echo}]
  sources: [{kind: ServiceAccount, name: sa-a}]
";

struct Churn {
    what: &'static str,
    child: std::process::Child,
}

impl Churn {
    fn start(t: &TestLab, what: &'static str, from: &str, to: &str, rate: u32) -> Churn {
        let to = format!("{}:{ECHO_PORT}", t.addr(to).ip());
        let child = t
            .lab
            .exec(from, BENCHTOOL)
            .unwrap()
            .args(["churn", "--to", &to, "--rate", &rate.to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        Churn { what, child }
    }

    fn finish(mut self) -> Value {
        drop(self.child.stdin.take());
        let out = self.child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{}: no JSON ({e}): {text}", self.what))
    }
}

fn policy_in_force(t: &TestLab, node: &str, times: usize) {
    wait_for("policy in force", Duration::from_secs(20), || {
        log_records(&t.lab.agent_log(node))
            .iter()
            .filter(|r| r["message"] == "policy in force" && r["targets"] == 1)
            .count()
            >= times
    });
}

/// Must-show 2: denied pairs (same node and cross node) hammered with new
/// connections through a rolling restart of each node's agent, a kill -9
/// and start, and a stop and start over the stale pins: not one connects.
#[test]
fn denied_pairs_stay_denied_through_restarts_kills_and_stale_pins() {
    let t = TestLab::up(&["--policy-mode=enforcing", "--drain-grace=2s"], LABTOOL);
    let lab = &t.lab;
    std::fs::write(lab.source_dir.join("policy.yaml"), POLICY).unwrap();
    // pod-b's server writes down every connection it accepts: the count
    // from the server side (only denied pairs ever try it).
    let accepted_at_b = std::env::temp_dir().join(format!("mesh-lifecycle-accepts-{}", std::process::id()));
    let _servers: Vec<KillOnDrop> = ["pod-b", "pod-c"]
        .iter()
        .map(|p| {
            let mut cmd = lab.exec(p, BENCHTOOL).unwrap();
            cmd.args(["echo-serve", "--port", &ECHO_PORT.to_string(), "--print-accepts"]);
            if *p == "pod-b" {
                cmd.stdout(std::fs::File::create(&accepted_at_b).unwrap());
            } else {
                cmd.stdout(std::process::Stdio::null());
            }
            KillOnDrop(cmd.spawn().unwrap())
        })
        .collect();
    for p in ["pod-b", "pod-c"] {
        xtask::probe::wait_listening(&lab.pod(p).unwrap().netns, ECHO_PORT).unwrap();
    }
    for node in ["node-a", "node-b"] {
        policy_in_force(&t, node, 1);
    }
    let denied = [
        Churn::start(&t, "denied, same node (a->b)", "pod-a", "pod-b", 1000),
        Churn::start(&t, "denied, cross node (c->b)", "pod-c", "pod-b", 500),
    ];
    let allowed = Churn::start(&t, "allowed, cross node (a->c)", "pod-a", "pod-c", 100);
    std::thread::sleep(Duration::from_millis(500));

    // Rolling restarts: the new agent starts beside the old one.
    for node in ["node-a", "node-b"] {
        lab.roll_agent(node, Duration::from_secs(15)).unwrap();
    }
    // kill -9, then a fresh start over the pins it left.
    for node in ["node-a", "node-b"] {
        let pid = lab.agent_pid(node).unwrap();
        Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        lab.start_agent(node).unwrap();
    }
    // A stop, a pause with no agent at all, then a start over stale pins.
    for node in ["node-a", "node-b"] {
        lab.stop_agent(node).unwrap();
        std::thread::sleep(Duration::from_secs(1));
        lab.start_agent(node).unwrap();
    }
    for node in ["node-a", "node-b"] {
        policy_in_force(&t, node, 1);
    }
    std::thread::sleep(Duration::from_millis(500));

    for churn in denied {
        let what = churn.what;
        let v = churn.finish();
        println!("{what}: {v}");
        assert_eq!(v["ok"], 0, "{what}: denied connections got through: {v}");
        assert!(v["refused"].as_u64().unwrap() > 1000, "{what}: too few attempts: {v}");
    }
    let at_b = std::fs::read_to_string(&accepted_at_b).unwrap_or_default();
    let _ = std::fs::remove_file(&accepted_at_b);
    assert_eq!(
        at_b.lines().count(),
        0,
        "pod-b accepted connections it must never see:\n{at_b}"
    );
    let v = allowed.finish();
    println!("allowed, cross node (a->c): {v}");
    assert!(v["ok"].as_u64().unwrap() > 0, "the allowed pair never connected: {v}");
}

/// `mesh-agent status`'s line about what node-a's kernel enforces.
fn kernel_line(lab: &xtask::lab::Lab) -> String {
    let out = lab
        .node_exec("node-a", &lab.agent_bin.to_string_lossy())
        .unwrap()
        .arg("status")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.lines()
        .find(|l| l.starts_with("kernel enforces"))
        .unwrap_or_else(|| panic!("no kernel line in status: {text}"))
        .to_string()
}

/// 10,000 TrafficTargets x 7 ports: more rules than `mesh_policy` holds.
fn oversized_policy() -> String {
    let mut text = String::from(
        "kind: TCPRoute\nmetadata: {name: seven, namespace: t}\nspec: {matches: {ports: [9100, 9101, 9102, 9103, 9104, 9105, 9106]}}\n",
    );
    for i in 0..10_000 {
        text.push_str(&format!(
            "---\nkind: TrafficTarget\nmetadata: {{name: t{i}, namespace: t}}\nspec:\n  destination: {{kind: ServiceAccount, name: sa-b}}\n  rules: [{{kind: TCPRoute, name: seven}}]\n  sources: [{{kind: ServiceAccount, name: s{i}}}]\n"
        ));
    }
    text
}

/// Must-show 3: a policy too large for the kernel is refused whole, with
/// the numbers; the policy in force keeps enforcing, the next valid edit
/// applies, and a restart then keeps enforcing.
#[test]
fn a_policy_too_large_for_the_kernel_is_refused_whole_and_the_one_in_force_stays() {
    let t = TestLab::up(&["--policy-mode=enforcing"], LABTOOL);
    let lab = &t.lab;
    std::fs::write(lab.source_dir.join("policy.yaml"), POLICY).unwrap();
    let _servers: Vec<KillOnDrop> = ["pod-b", "pod-c"]
        .iter()
        .map(|p| KillOnDrop(t.traffic().serve(p, ECHO_PORT).unwrap()))
        .collect();
    // Both nodes: pod-c's agent decides the cross-node flow.
    policy_in_force(&t, "node-a", 1);
    policy_in_force(&t, "node-b", 1);
    let reach = |to: &str| {
        let r = t
            .traffic()
            .send("pod-a", std::net::SocketAddr::new(t.addr(to).ip(), ECHO_PORT), 64)
            .unwrap();
        r["ok"] == true
    };
    assert!(reach("pod-c") && !reach("pod-b"), "the small policy is in force");
    let before = kernel_line(lab);
    assert!(
        before.starts_with("kernel enforces: enforcing, policy generation "),
        "{before}"
    );

    std::fs::write(lab.source_dir.join("policy.yaml"), oversized_policy()).unwrap();
    wait_for("the refusal", Duration::from_secs(20), || {
        log_records(&lab.agent_log("node-a")).iter().any(|r| {
            let e = r["error"].as_str().unwrap_or("");
            e.contains("kernel rules") && e.contains("65536") && e.contains("refused whole")
        })
    });
    // The policy in force still holds, and nothing of the refused one is in the map.
    assert!(reach("pod-c") && !reach("pod-b"), "the previous policy stays in force");
    let entries = xtask::probe::dump_map(lab, "node-a", "mesh_policy").unwrap();
    let n = entries.as_array().map_or(0, Vec::len);
    assert!(
        n < 10,
        "mesh_policy holds {n} entries: a refused generation was left behind"
    );

    // status says what the kernel enforces: the generation in force before the refusal.
    assert_eq!(kernel_line(lab), before, "the kernel's generation changed");
    // The next valid edit applies: now sa-a may reach sa-b, not sa-c.
    std::fs::write(lab.source_dir.join("policy.yaml"), POLICY.replace("sa-c", "sa-b")).unwrap();
    wait_for("the edit in force", Duration::from_secs(5), || reach("pod-b"));
    assert!(!reach("pod-c"));
    // A restart keeps enforcing, from its first moment.
    lab.stop_agent("node-a").unwrap();
    assert!(
        reach("pod-b") && !reach("pod-c"),
        "with no agent the pinned policy holds"
    );
    lab.start_agent("node-a").unwrap();
    policy_in_force(&t, "node-a", 1);
    assert!(reach("pod-b") && !reach("pod-c"), "after the restart");
}

/// Must-show 4: a typo, an unknown field, a FIFO, a symlink loop and a
/// duplicate Pod IP dropped into the source directory are each refused with
/// their path and open nothing, while a valid edit beside them applies
/// within a second.
#[test]
fn bad_entries_are_refused_by_path_and_a_valid_edit_beside_them_applies() {
    let t = TestLab::up(&["--policy-mode=enforcing"], LABTOOL);
    let lab = &t.lab;
    let dir = &lab.source_dir;
    std::fs::write(dir.join("policy.yaml"), POLICY).unwrap();
    let _servers: Vec<KillOnDrop> = ["pod-b", "pod-c"]
        .iter()
        .map(|p| KillOnDrop(t.traffic().serve(p, ECHO_PORT).unwrap()))
        .collect();
    policy_in_force(&t, "node-a", 1);
    let reach = |from: &str, to: &str| {
        let r = t
            .traffic()
            .send(from, std::net::SocketAddr::new(t.addr(to).ip(), ECHO_PORT), 64)
            .unwrap();
        r["ok"] == true
    };
    assert!(!reach("pod-c", "pod-b") && !reach("pod-a", "pod-b"));

    // Read as written, each would open c -> b on every port.
    let typo = "kind: TCPRoute\nmetadata: {name: typo, namespace: t}\nspec: {matches: {port: [7070]}}\n---\n\
                kind: TrafficTarget\nmetadata: {name: c-to-b, namespace: t}\nspec:\n  destination: {kind: ServiceAccount, name: sa-b}\n  \
                rules: [{kind: TCPRoute, name: typo}]\n  sources: [{kind: ServiceAccount, name: sa-c}]\n";
    let unknown = "kind: TrafficTarget\nmetadata: {name: c-to-b-2, namespace: t}\nspec:\n  destination: {kind: ServiceAccount, name: sa-b}\n  \
                   rules: [{kind: TCPRoute, name: echo}]\n  sources: [{kind: ServiceAccount, name: sa-c}]\n  sourceSelector: {}\n";
    let pod_b = lab.pod("pod-b").unwrap();
    let dup = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: impostor, namespace: t}}\nspec: {{nodeName: node-a, serviceAccountName: sa-c}}\nstatus: {{podIP: {}}}\n",
        pod_b.ip
    );
    std::fs::write(dir.join("typo.yaml"), typo).unwrap();
    std::fs::write(dir.join("unknown.yaml"), unknown).unwrap();
    std::fs::write(dir.join("zz-dup.yaml"), dup).unwrap();
    assert!(
        Command::new("mkfifo")
            .arg(dir.join("fifo.yaml"))
            .status()
            .unwrap()
            .success()
    );
    std::os::unix::fs::symlink("loop-b.yaml", dir.join("loop-a.yaml")).unwrap();
    std::os::unix::fs::symlink("loop-a.yaml", dir.join("loop-b.yaml")).unwrap();
    // The valid edit: a may now reach b.
    let edited = std::time::Instant::now();
    std::fs::write(
        dir.join("policy.yaml"),
        POLICY.replace("name: sa-c}\n  rules", "name: sa-b}\n  rules"),
    )
    .unwrap();
    wait_for("the valid edit in force", Duration::from_secs(5), || {
        reach("pod-a", "pod-b")
    });
    let took = edited.elapsed();
    println!("valid edit in force after {} ms", took.as_millis());
    assert!(took < Duration::from_millis(1500), "the valid edit took {took:?}");
    assert!(!reach("pod-c", "pod-b"), "a refused file opened c -> b");
    let errors: Vec<String> = log_records(&lab.agent_log("node-a"))
        .iter()
        .filter(|r| r["message"] == "source: file rejected; its last good content stays in force")
        .map(|r| r["error"].as_str().unwrap_or("").to_string())
        .collect();
    for (file, what) in [
        ("typo.yaml", "unknown field spec.matches.port"),
        ("unknown.yaml", "unknown field spec.sourceSelector"),
        ("fifo.yaml", "a FIFO"),
        ("loop-a.yaml", "symbolic links"),
        ("zz-dup.yaml", "t/impostor is refused"),
    ] {
        assert!(
            errors
                .iter()
                .any(|e| e.contains(&dir.join(file).display().to_string()) && e.contains(what)),
            "{file}: no refusal saying {what:?} in {errors:#?}"
        );
    }
}
