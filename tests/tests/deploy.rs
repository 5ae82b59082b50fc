//! The Kubernetes manifests in deploy/: valid against a current Kubernetes
//! schema (kubernetes-validate, from PyPI, installed by run.sh), in sync with
//! the code (flags, environment, ports, CRDs), and the DaemonSet's
//! capability set is enough: the lab runs an agent with exactly those
//! capabilities and traffic flows.
use std::{collections::BTreeSet, path::PathBuf, process::Command, time::Duration};

use mesh_tests::{TestLab, wait_for};
use serde_yaml::Value;

const LABTOOL: &str = env!("CARGO_BIN_EXE_labtool");

fn deploy() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn manifests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = ["kubernetes", "crds"]
        .iter()
        .flat_map(|d| std::fs::read_dir(deploy().join(d)).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

fn documents(path: &std::path::Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

fn find(kind: &str, name: &str) -> Value {
    manifests()
        .iter()
        .flat_map(|p| documents(p))
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in deploy/"))
}

fn help(args: &[&str]) -> String {
    let out = Command::new(mesh_tests::agent_bin())
        .args(args)
        .arg("--help")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The `[default: X]` of `--flag` in a help text.
fn default_of(help: &str, flag: &str) -> String {
    let at = help.find(&format!("{flag} <")).unwrap_or_else(|| panic!("no {flag}"));
    let rest = &help[at..];
    let d = rest.find("[default: ").unwrap() + "[default: ".len();
    rest[d..d + rest[d..].find(']').unwrap()].to_string()
}

#[test]
fn every_manifest_validates_against_a_current_kubernetes_schema() {
    let bin = std::env::var("MESH_KUBERNETES_VALIDATE")
        .unwrap_or_else(|_| "/opt/mesh-tools/venv/bin/kubernetes-validate".into());
    let files = manifests();
    assert!(files.len() >= 10, "{files:?}");
    let out = Command::new(&bin)
        .args(["--strict", "--quiet"])
        .args(&files)
        .output()
        .unwrap_or_else(|e| panic!("{bin}: {e} (installed by ./run.sh setup)"));
    assert!(
        out.status.success(),
        "kubernetes-validate:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn manifests_agree_with_the_code() {
    // The kustomization applies every manifest and every CRD.
    let k: Value =
        serde_yaml::from_str(&std::fs::read_to_string(deploy().join("kustomization.yaml")).unwrap()).unwrap();
    let listed: BTreeSet<PathBuf> = k["resources"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|r| deploy().join(r.as_str().unwrap()).canonicalize().unwrap())
        .collect();
    let present: BTreeSet<PathBuf> = manifests().iter().map(|p| p.canonicalize().unwrap()).collect();
    assert_eq!(listed, present, "kustomization.yaml resources vs deploy/ files");
    // The CRDs are the Rust types' (mesh-agent's unit test checks the
    // files against the types; here: one CRD per SMI kind the agent reads,
    // GEP-3779's AuthorizationPolicy, which Gateway API publishes none for,
    // and the mesh's own TrafficPolicy).
    let crds: BTreeSet<String> = manifests()
        .iter()
        .flat_map(|p| documents(p))
        .filter(|d| d["kind"] == "CustomResourceDefinition")
        .map(|d| d["spec"]["names"]["kind"].as_str().unwrap().to_string())
        .collect();
    let want: BTreeSet<String> = [
        "AuthorizationPolicy",
        "HTTPRouteGroup",
        "TCPRoute",
        "TrafficPolicy",
        "TrafficSplit",
        "TrafficTarget",
        "UDPRoute",
    ]
    .map(String::from)
    .into();
    assert_eq!(crds, want);

    // Every setting the DaemonSet passes is an environment variable of `run`.
    let run = help(&["run"]);
    let ds = find("DaemonSet", "mesh-agent");
    let cm = find("ConfigMap", "mesh-agent-config");
    let container = &ds["spec"]["template"]["spec"]["containers"][0];
    let mut env: Vec<String> = cm["data"]
        .as_mapping()
        .unwrap()
        .keys()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();
    env.extend(
        container["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap().to_string()),
    );
    for name in &env {
        assert!(
            run.contains(&format!("[env: {name}=")),
            "{name} is not an env of `mesh-agent run`"
        );
    }
    for required in [
        "NODE_NAME",
        "MESH_CAPTURE_IP",
        "MESH_POD_CGROUP_ROOT",
        "MESH_KUBERNETES",
    ] {
        assert!(env.iter().any(|e| e == required), "DaemonSet does not set {required}");
    }
    assert_eq!(container["args"][0], "run");

    // Ports: the ConfigMap's and the probes' agree with the agent. The
    // container declares none: with hostNetwork each would be a hostPort,
    // and the scheduler would keep the surge pod of a rolling update off
    // the node its predecessor still runs on.
    assert!(container["ports"].is_null(), "no container ports (see daemonset.yaml)");
    let cm_str = |k: &str| cm["data"][k].as_str().unwrap().to_string();
    let addr_port = |a: &str| a.rsplit(':').next().unwrap().parse::<u64>().unwrap();
    assert_eq!(cm_str("MESH_OUTBOUND_PORT"), default_of(&run, "--outbound-port"));
    assert_eq!(cm_str("MESH_TUNNEL_PORT"), default_of(&run, "--tunnel-port"));
    let metrics = addr_port(&cm_str("MESH_METRICS_ADDR"));
    let health = addr_port(&cm_str("MESH_HEALTH_ADDR"));
    assert_eq!(metrics, addr_port(&default_of(&run, "--metrics-addr")));
    assert_eq!(health, addr_port(&default_of(&run, "--health-addr")));
    assert_eq!(container["livenessProbe"]["httpGet"]["port"].as_u64(), Some(health));
    assert_eq!(container["readinessProbe"]["httpGet"]["port"].as_u64(), Some(health));
    let ds_anno = &ds["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"];
    assert_eq!(ds_anno.as_str().unwrap(), metrics.to_string());

    // Rolling updates hand over: the new agent starts beside the old one
    // (surge), reaches the old one's handoff socket on a shared host
    // directory, and the old one may drain for its grace period before
    // the kubelet kills it.
    let rolling = &ds["spec"]["updateStrategy"]["rollingUpdate"];
    assert_eq!(rolling["maxSurge"], 1);
    assert_eq!(rolling["maxUnavailable"], 0);
    let socket = std::path::PathBuf::from(cm_str("MESH_HANDOFF_SOCKET"));
    assert_eq!(socket.to_string_lossy(), default_of(&run, "--handoff-socket"));
    let mount = container["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"].as_str() == socket.parent().unwrap().to_str())
        .expect("the handoff socket's directory is mounted");
    let volume = ds["spec"]["template"]["spec"]["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    assert!(
        volume["hostPath"]["path"].is_string(),
        "the handoff directory is the host's"
    );
    let grace = humantime::parse_duration(&cm_str("MESH_DRAIN_GRACE")).unwrap();
    let kill_after = ds["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap();
    assert!(
        grace.as_secs() + 5 <= kill_after,
        "the drain must end before the kubelet kills the agent"
    );

    // The CA: flags exist, the Service and the agents' address agree with its port.
    let serve = help(&["ca", "serve"]);
    let ca = find("Deployment", "mesh-ca");
    let ca_container = &ca["spec"]["template"]["spec"]["containers"][0];
    for arg in ca_container["args"].as_sequence().unwrap().iter().skip(2) {
        let flag = arg.as_str().unwrap().split('=').next().unwrap();
        assert!(
            serve.contains(&format!("{flag} ")) || serve.contains(&format!("{flag}\n")),
            "{flag}"
        );
    }
    let ca_port = addr_port(&default_of(&serve, "--listen"));
    assert_eq!(ca_container["ports"][0]["containerPort"].as_u64(), Some(ca_port));
    let svc = find("Service", "mesh-ca");
    assert_eq!(svc["spec"]["ports"][0]["port"].as_u64(), Some(ca_port));
    assert_eq!(addr_port(&cm_str("MESH_CA_ADDR")), ca_port);
    assert!(cm_str("MESH_CA_ADDR").starts_with("mesh-ca.mesh-system.svc:"));
}

/// The capabilities the DaemonSet grants, as setpriv names them.
fn daemonset_capabilities() -> Vec<String> {
    let ds = find("DaemonSet", "mesh-agent");
    let caps = &ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"];
    assert_eq!(caps["drop"][0], "ALL");
    caps["add"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_lowercase())
        .collect()
}

#[test]
fn an_agent_with_only_the_daemonsets_capabilities_runs_and_carries_traffic() {
    let caps = daemonset_capabilities();
    assert!(
        !caps.iter().any(|c| c == "sys_admin"),
        "the DaemonSet asks for SYS_ADMIN"
    );
    // The fast path too: entering a pod's network namespace (setns) and
    // attaching TCX links need no more capabilities than these.
    let t = TestLab::up(&[], LABTOOL);
    let lab = &t.lab;
    let bounding = format!(
        "-all,{}",
        caps.iter().map(|c| format!("+{c}")).collect::<Vec<_>>().join(",")
    );
    for node in ["node-a", "node-b"] {
        lab.stop_agent(node).unwrap();
        // A first install, not an adoption: nothing pinned yet.
        std::fs::remove_dir_all(lab.pin_dir(node)).unwrap();
        lab.start_agent_wrapped(node, &["setpriv", "--bounding-set", &bounding, "--inh-caps", "-all"])
            .unwrap();
        // The agent really runs with that set (CapEff in /proc).
        let pid = lab.agent_pid(node).unwrap();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let eff = status.lines().find(|l| l.starts_with("CapEff:")).unwrap();
        let eff = u64::from_str_radix(eff.split_whitespace().nth(1).unwrap(), 16).unwrap();
        // CAP_NET_ADMIN 12, CAP_PERFMON 38, CAP_BPF 39.
        assert_eq!(eff, (1 << 12) | (1 << 38) | (1 << 39), "{node}: CapEff {eff:x}");
    }
    // Both agents: the destination's must hold its pods' certificates.
    wait_for("readiness", Duration::from_secs(10), || {
        ["node-a", "node-b"].iter().all(|node| {
            let n = lab.node(node).unwrap();
            lab.node_exec(node, "curl")
                .unwrap()
                .args(["-sf", &format!("http://{}:15021/readyz", n.fabric_ip)])
                .output()
                .is_ok_and(|o| o.status.success())
        })
    });
    wait_for("the fast path on node-a's pods", Duration::from_secs(5), || {
        xtask::probe::dump_map(lab, "node-a", "mesh_pod_devs").is_ok_and(|d| d.as_array().is_some_and(|a| a.len() >= 4))
    });
    let (before, _) = xtask::probe::fast_path_counters(lab, "node-a").unwrap();
    mesh_tests::assert_intact(&t.traffic().send("pod-a", t.addr("pod-b"), 300_000).unwrap());
    mesh_tests::assert_intact(&t.traffic().send("pod-a", t.addr("pod-c"), 300_000).unwrap());
    let (after, _) = xtask::probe::fast_path_counters(lab, "node-a").unwrap();
    assert!(after > before, "same-node traffic did not take the fast path");
}
