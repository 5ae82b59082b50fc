//! mesh-agent: the node agent of a sidecarless, eBPF-accelerated service mesh.
#![forbid(unsafe_code)]

mod app;
mod config;
mod identity;
mod metrics;
mod preflight;
mod redirect;
mod source;
mod state;
mod tunnel;

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
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(settings.worker_threads)
                .enable_all()
                .build()
                .expect("tokio runtime");
            match runtime.block_on(app::run(settings)) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(err) => {
                    // One line an operator can act on; the chain says what to check.
                    tracing::error!(error = %format!("{err:#}"), "mesh-agent stopped");
                    eprintln!("mesh-agent: {err:#}");
                    std::process::ExitCode::FAILURE
                }
            }
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
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("tokio runtime");
            match runtime.block_on(app::run_ca(command)) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("mesh-agent ca: {err:#}");
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

fn init_tracing(log: &config::LogSettings, kernel_debug: bool) {
    use tracing_subscriber::{EnvFilter, fmt};
    // Kernel lines arrive through aya-log under the `mesh` target at debug
    // level; asking for them should be enough to see them.
    let directives = if kernel_debug {
        format!("{},mesh=debug", log.level)
    } else {
        log.level.clone()
    };
    let filter = EnvFilter::try_new(&directives).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match log.format {
        config::LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).init(),
        config::LogFormat::Text => builder.init(),
    }
}
