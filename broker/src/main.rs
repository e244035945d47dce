//! `lanes-broker`: runs the broker (no subcommand) or manages a running one
//! (`lanes-broker topics …`, `lanes-broker groups …`).

mod admin;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use lanes_broker::Broker;
use lanes_broker::config::{Settings, SettingsArgs};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const AFTER_HELP: &str = "Every setting is also an environment variable (LANES_<SETTING>, e.g. \
LANES_SEGMENT_BYTES_MAX) and a key in the --config TOML file (segment_bytes_max = …). \
Precedence: flag, environment, file, default. Logs go to stderr; RUST_LOG filters them.";

#[derive(Debug, Parser)]
#[command(name = "lanes-broker", version, about = "The Lanes message broker", after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// A TOML file of settings.
    #[arg(long, env = "LANES_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print the effective settings as TOML and exit.
    #[arg(long)]
    print_config: bool,
    /// How log lines look.
    #[arg(long, env = "LANES_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(flatten)]
    settings: SettingsArgs,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create, list, describe and delete topics on a running broker.
    Topics {
        /// The broker to talk to.
        #[arg(long, env = "LANES_BROKER", default_value = "127.0.0.1:7070", global = true)]
        broker: String,
        #[command(subcommand)]
        command: admin::TopicsCommand,
    },
    /// List consumer groups and show their members, assignment, offsets and lag.
    Groups {
        /// The broker to talk to.
        #[arg(long, env = "LANES_BROKER", default_value = "127.0.0.1:7070", global = true)]
        broker: String,
        #[command(subcommand)]
        command: admin::GroupsCommand,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Topics { broker, command }) => admin::run(&broker, admin::Admin::Topics(command)),
        Some(Command::Groups { broker, command }) => admin::run(&broker, admin::Admin::Groups(command)),
        None => serve(cli.settings, cli.config, cli.print_config, cli.log_format),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("lanes-broker: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    // Colours only for a person at a terminal, not in log files.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        // When stderr is gone (a closed log pipe), tracing-subscriber would report the
        // failed write with `eprintln!`, which panics: the logging task would die. A
        // broker must keep running without its logs.
        .log_internal_errors(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn serve(
    args: SettingsArgs,
    file: Option<PathBuf>,
    print_config: bool,
    log_format: LogFormat,
) -> anyhow::Result<()> {
    let settings = Settings::load(&args, file.as_deref())?;
    if print_config {
        print!("{}", settings.to_toml());
        return Ok(());
    }
    init_logging(log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("lanes-worker")
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async move {
        if let Some(address) = settings.metrics_address()? {
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .with_http_listener(address)
                // Gauges of expired groups and deleted topics stop being updated: drop them.
                .idle_timeout(
                    metrics_util::MetricKindMask::GAUGE,
                    Some(std::time::Duration::from_millis(settings.metrics_backlog_interval_ms.saturating_mul(12))),
                )
                .install()
                .with_context(|| format!("serving metrics on {address} (metrics_listen)"))?;
            lanes_broker::metrics::describe();
            tracing::info!(%address, "serving Prometheus metrics on /metrics");
        }
        tracing::info!(data_dir = %settings.data_dir.display(), fsync = %settings.fsync, "opening the data directory");
        let broker = Broker::open(settings.clone()).context("opening the data directory")?;
        let listener = TcpListener::bind(settings.listen)
            .await
            .with_context(|| format!("listening on {}", settings.listen))?;
        let address = listener.local_addr()?;
        tracing::info!(%address, topics = broker.topics.list().len(), version = lanes_broker::server::VERSION, "listening");
        let shutdown = CancellationToken::new();
        tokio::spawn(stop_on_signal(shutdown.clone()));
        broker.serve(listener, shutdown).await;
        tracing::info!("stopped serving; syncing and closing lane logs");
        broker.close().context("closing lane logs")?;
        tracing::info!("shut down cleanly");
        Ok(())
    })
}

/// Cancels `shutdown` on SIGINT or SIGTERM.
async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut interrupt), Ok(mut terminate)) =
        (signal(SignalKind::interrupt()), signal(SignalKind::terminate()))
    else {
        tracing::error!("cannot install signal handlers; stop the broker with SIGKILL");
        return;
    };
    let name = tokio::select! {
        _ = interrupt.recv() => "SIGINT",
        _ = terminate.recv() => "SIGTERM",
    };
    // First act, then log: whatever logging does, the shutdown has begun.
    shutdown.cancel();
    tracing::info!(signal = name, "shutting down");
}
