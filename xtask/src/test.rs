//! `cargo xtask test`: formatting and lints, unit tests, then the
//! end-to-end tests in the lab. A lint or format failure fails the run,
//! after the tests have run (so one push shows everything that is wrong).
use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
};

use anyhow::{Context as _, ensure};

/// Passed and failed counts, summed over cargo's `test result:` lines.
#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
}

impl Tally {
    fn add_line(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(label), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let n: u64 = n.parse().unwrap_or(0);
            match label {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                _ => {}
            }
        }
    }
}

/// Runs cargo test, streaming its output and counting results.
fn cargo_test(cmd: &mut Command, tally: &mut Tally) -> anyhow::Result<bool> {
    let mut child = cmd.stdout(Stdio::piped()).spawn().context("running cargo test")?;
    let stdout = child.stdout.take().expect("piped");
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        tally.add_line(line.trim());
    }
    Ok(child.wait()?.success())
}

pub fn run() -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = crate::workspace_root();
    let mut tally = Tally::default();
    eprintln!("\n=== [1/4] rustfmt --check and clippy -D warnings (agent, common, xtask, tests)");
    let fmt_ok = Command::new(&cargo)
        .current_dir(&root)
        .args(["fmt", "--all", "--check"])
        .status()
        .context("running cargo fmt (rustup component add rustfmt)")?
        .success();
    // mesh-ebpf builds only for the BPF target (inside the agent's build.rs),
    // so clippy covers the default members, with every target.
    let clippy_ok = Command::new(&cargo)
        .current_dir(&root)
        .args(["clippy", "--all-targets", "--", "-D", "warnings"])
        .status()
        .context("running cargo clippy (rustup component add clippy)")?
        .success();
    eprintln!("\n=== [2/4] unit tests (mesh-common, mesh-agent, xtask)");
    let unit_ok = cargo_test(
        Command::new(&cargo)
            .current_dir(&root)
            .args(["test", "-p", "mesh-common", "-p", "mesh-agent", "-p", "xtask"]),
        &mut tally,
    )?;

    eprintln!("\n=== [3/4] building the agent and labtool");
    let agent = crate::build_agent(false)?;
    crate::demo::build_labtool()?;

    eprintln!("\n=== [4/4] end-to-end tests in the lab (root, one at a time)");
    // SAFETY: geteuid has no preconditions.
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "the end-to-end tests need root: they build a lab of network namespaces and load eBPF"
    );
    let e2e_ok = cargo_test(
        Command::new(&cargo)
            .current_dir(&root)
            .env("MESH_AGENT_BIN", &agent)
            .args(["test", "-p", "mesh-tests", "--", "--test-threads=1"]),
        &mut tally,
    )?;
    let _ = crate::lab::down();
    println!("\nsummary: {} passed, {} failed", tally.passed, tally.failed);
    ensure!(
        fmt_ok,
        "cargo fmt --check: the code is not formatted (run `cargo fmt --all`)"
    );
    ensure!(clippy_ok, "cargo clippy: lints failed (see above)");
    ensure!(unit_ok && e2e_ok, "tests failed");
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_cargo_result_lines() {
        let mut t = super::Tally::default();
        t.add_line("test result: ok. 8 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 11.06s");
        t.add_line("test result: FAILED. 7 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 8.46s");
        t.add_line("running 3 tests");
        assert_eq!((t.passed, t.failed), (15, 1));
    }
}
