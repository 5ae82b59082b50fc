//! `cargo xtask bench` end to end, shortened and in a debug build (so its
//! figures mean nothing): it runs from the checkout, measures every path,
//! and writes a consistent JSON and a PNG. The real numbers come from the
//! release run the README documents.
use serde_json::Value;
use xtask::bench::{BenchOptions, run};

#[test]
fn the_bench_measures_every_path_and_writes_json_and_png() {
    let out = std::env::temp_dir().join(format!("mesh-bench-smoke-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    run(&BenchOptions {
        rounds: 2,
        throughput_secs: 1,
        short_secs: 0.3,
        hold: 300,
        debug: true,
        profile: false,
        out_dir: out.clone(),
    })
    .expect("bench run");
    assert!(
        xtask::lab::lab_netns().is_empty(),
        "the bench left lab namespaces behind"
    );

    let json: Value = serde_json::from_str(&std::fs::read_to_string(out.join("bench.json")).unwrap()).unwrap();
    let paths = json["paths"].as_object().unwrap();
    assert_eq!(paths.len(), 5, "{paths:?}");
    // The L7 path against the L4 path: both measured each round.
    for key in ["rr_p50_us", "rr_p99_us"] {
        let f = &json["l7_vs_l4"][key];
        for side in ["l4_samples", "l7_samples"] {
            let v = f[side].as_array().unwrap_or_else(|| panic!("l7_vs_l4 {key}: {f}"));
            assert!(
                v.len() == 2 && v.iter().all(|x| x.as_f64().unwrap() > 0.0),
                "{key} {side}: {f}"
            );
        }
        assert!(f["added_us"].is_number(), "{f}");
    }
    // The tunnel handshake with and without post-quantum key exchange.
    for key in ["x25519", "x25519mlkem768"] {
        let h = &json["tunnel_handshake_cpu_us"][key];
        let v = h["samples"]
            .as_array()
            .unwrap_or_else(|| panic!("handshake {key}: {h}"));
        assert!(
            v.len() == 2 && v.iter().all(|x| x.as_f64().unwrap() > 0.0),
            "handshake {key}: {h}"
        );
    }
    for (path, p) in paths {
        let figures = p["figures"].as_object().unwrap();
        for key in [
            "throughput_gbps",
            "rr_p50_us",
            "rr_p99_us",
            "rr_new_p99_us",
            "conn_per_sec",
        ] {
            let f = &figures[key];
            let (min, med, max) = (
                f["min"].as_f64().unwrap(),
                f["median"].as_f64().unwrap(),
                f["max"].as_f64().unwrap(),
            );
            assert!(min > 0.0 && min <= med && med <= max, "{path} {key}: {f}");
            assert_eq!(
                f["samples"].as_array().unwrap().len(),
                2,
                "{path} {key}: one sample per round"
            );
            let has_ratio = !f["ratio_to_no_mesh"].is_null();
            assert_eq!(
                has_ratio,
                !path.starts_with("nomesh"),
                "{path} {key}: ratio only for meshed paths"
            );
        }
        // The agent carries bytes only on the tunnel paths.
        let cpu = figures["agent_cpu_s_per_gib"]["median"].as_f64().unwrap();
        if path == "quic" || path == "tcp" {
            assert!(cpu > 0.0, "{path}: agent CPU per GiB {cpu}");
        }
    }
    for node in ["node-a", "node-b"] {
        let idle = json["agent_rss_mib"]["idle"][node].as_f64().unwrap();
        let held = json["agent_rss_mib"]["holding_connections"][node].as_f64().unwrap();
        let peak = json["agent_rss_mib"]["peak"][node].as_f64().unwrap();
        assert!(
            idle > 1.0 && peak >= held,
            "{node}: idle {idle}, held {held}, peak {peak}"
        );
    }
    for key in ["deny_ms", "allow_ms"] {
        let median = json["policy_change_to_enforcement_ms"][key]["median"].as_f64().unwrap();
        // The file source polls every 200 ms; enforcement follows within a second.
        assert!(median > 0.0 && median < 1000.0, "{key}: {median} ms");
    }
    let png = std::fs::read(out.join("bench.png")).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "bench.png is not a chart"
    );
    let _ = std::fs::remove_dir_all(&out);
}
