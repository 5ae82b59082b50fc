//! mesh-agent: the node agent of a sidecarless, eBPF-accelerated service mesh.
#![forbid(unsafe_code)]

use mesh_agent::{app, config};

use clap::Parser as _;

fn main() -> std::process::ExitCode {
    let cli = config::Cli::parse();
    match cli.command {
        config::Command::Run(args) => {
            let settings = match config::Settings::from_args(args) {
                Ok(s) => s,
                Err(err) => {
                    eprintln!("mesh-agent: {err}");
                    return std::process::ExitCode::from(2);
                }
            };
            init_tracing(&settings.log, settings.kernel_debug);
            let threads = settings.worker_threads;
            run_to_exit("mesh-agent", threads, app::run(settings))
        }
        config::Command::Ca { command } => {
            if let config::CaCommand::Serve { log_format, .. } = &command {
                init_tracing(
                    &config::LogSettings {
                        level: "info".into(),
                        format: *log_format,
                    },
                    false,
                );
            }
            run_to_exit("mesh-agent ca", 2, app::run_ca(command))
        }
        config::Command::Crds { dir } => {
            let _ = std::fs::create_dir_all(&dir);
            for (file, yaml) in mesh_agent::smi::crds() {
                if let Err(e) = std::fs::write(dir.join(file), yaml) {
                    eprintln!("mesh-agent crds: writing {}: {e}", dir.join(file).display());
                    return std::process::ExitCode::FAILURE;
                }
            }
            std::process::ExitCode::SUCCESS
        }
        config::Command::Policy { command } => match mesh_agent::policy::check::run(command) {
            Ok(verdict_allows) => {
                if verdict_allows {
                    std::process::ExitCode::SUCCESS
                } else {
                    std::process::ExitCode::from(1)
                }
            }
            Err(err) => {
                eprintln!("mesh-agent policy: {err:#}");
                std::process::ExitCode::from(2)
            }
        },
        config::Command::Audit {
            follow,
            verdict,
            workload,
            admin_addr,
        } => run_to_exit(
            "mesh-agent audit",
            1,
            app::run_audit(follow, verdict, workload, admin_addr),
        ),
        config::Command::Status { admin_addr } => run_to_exit("mesh-agent status", 1, app::run_status(admin_addr)),
        config::Command::Uninstall { bpffs_dir, force } => {
            // An agent that just stopped leaves a heartbeat a few seconds
            // fresh: give it that long to go stale before refusing.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while !force && mesh_agent::redirect::agent_alive(&bpffs_dir) && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            if mesh_agent::redirect::agent_alive(&bpffs_dir) && !force {
                eprintln!(
                    "mesh-agent uninstall: an agent is running on this node (its heartbeat in {} is current): stop it first (delete the DaemonSet, or stop the service), or pass --force",
                    bpffs_dir.display()
                );
                return std::process::ExitCode::FAILURE;
            }
            match mesh_agent::redirect::remove_pins(&bpffs_dir) {
                Ok(removed) if removed.is_empty() => {
                    println!(
                        "nothing pinned in {}: the mesh is not installed here",
                        bpffs_dir.display()
                    );
                    std::process::ExitCode::SUCCESS
                }
                Ok(removed) => {
                    println!(
                        "removed {} pins from {} ({}): programs detached, maps freed; pods' traffic now flows unmeshed",
                        removed.len(),
                        bpffs_dir.display(),
                        removed.join(", ")
                    );
                    std::process::ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!(
                        "mesh-agent uninstall: removing pins in {}: {e} (run as root; is bpffs mounted?)",
                        bpffs_dir.display()
                    );
                    std::process::ExitCode::FAILURE
                }
            }
        }
        config::Command::Version => {
            println!(
                "mesh-agent {} (map layout v{})",
                env!("CARGO_PKG_VERSION"),
                mesh_common::MAP_LAYOUT_VERSION
            );
            std::process::ExitCode::SUCCESS
        }
    }
}

/// Runs `job` on a tokio runtime; a failure is one line an operator can act
/// on (the error chain says what to check), logged and printed.
fn run_to_exit(
    what: &str,
    threads: usize,
    job: impl std::future::Future<Output = anyhow::Result<()>>,
) -> std::process::ExitCode {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(job) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %format!("{err:#}"), "{what} stopped");
            eprintln!("{what}: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_tracing(log: &config::LogSettings, kernel_debug: bool) {
    use tracing_subscriber::{
        EnvFilter, Layer as _, fmt, layer::SubscriberExt as _, reload, util::SubscriberInitExt as _,
    };
    // Kernel lines arrive through aya-log under the `mesh` target at debug
    // level; asking for them should be enough to see them.
    let directives = if kernel_debug {
        format!("{},mesh=debug", log.level)
    } else {
        log.level.clone()
    };
    let filter = EnvFilter::try_new(&directives).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let output = match log.format {
        config::LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_writer(std::io::stderr)
            .boxed(),
        config::LogFormat::Text => fmt::layer().with_writer(std::io::stderr).boxed(),
    };
    tracing_subscriber::registry().with(filter).with(output).init();
    mesh_agent::logging::install(Box::new(move |f: &str| {
        let next = EnvFilter::try_new(f).map_err(|e| format!("log filter {f:?} does not parse: {e}"))?;
        handle.reload(next).map_err(|e| e.to_string())
    }));
}
