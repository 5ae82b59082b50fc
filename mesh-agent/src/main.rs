//! mesh-agent: the node agent of a sidecarless, eBPF-accelerated service mesh.
#![forbid(unsafe_code)]

use mesh_agent::{app, cmd, config};

use clap::Parser as _;

fn main() -> std::process::ExitCode {
    // rustls carries two providers (aws-lc-rs for tunnels, ring for what
    // kube and tonic build); a library asking for the process default
    // gets aws-lc-rs rather than a panic over the ambiguity.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
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
            run_to_exit("mesh-agent ca", 2, cmd::ca::run(command))
        }
        config::Command::Crds { dir } => match mesh_agent::cmd::write_crds(&dir) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mesh-agent crds: {e}");
                std::process::ExitCode::FAILURE
            }
        },
        config::Command::Policy { command } => match mesh_agent::cmd::policy::run(command) {
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
            cmd::audit::run(follow, verdict, workload, admin_addr),
        ),
        config::Command::Status { admin_addr } => run_to_exit("mesh-agent status", 1, cmd::status::run(admin_addr)),
        config::Command::Uninstall { bpffs_dir, force } => cmd::uninstall::run(&bpffs_dir, force),
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
        let next = EnvFilter::try_new(f)
            .map_err(|e| mesh_agent::logging::FilterError(format!("log filter {f:?} does not parse: {e}")))?;
        handle
            .reload(next)
            .map_err(|e| mesh_agent::logging::FilterError(e.to_string()))
    }));
}
