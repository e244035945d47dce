//! `lanes-bench`: runs a scenario against an embedded broker (the default) or a running
//! one, prints a table (or one JSON object with `--json`).

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use lanes_bench::lanes::{self, LanesConfig};
use lanes_bench::report::{Common, Report};
use lanes_bench::target::Target;
use lanes_bench::{consume, produce};

#[derive(Debug, Parser)]
#[command(name = "lanes-bench", version, about = "Throughput and latency harness for Lanes")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Producers send records as fast as they can (or at --rate): throughput and
    /// send-to-acknowledgement latency.
    Produce {
        #[command(flatten)]
        common: Common,
    },
    /// Consumers drain a filled topic: throughput.
    Consume {
        #[command(flatten)]
        common: Common,
        /// Consume as one consumer group instead of splitting the partitions.
        #[arg(long)]
        group: bool,
    },
    /// Priority under backlog: express latency idle, behind a bulk backlog, and on a
    /// one-lane topic (FIFO); bulk's share while express is saturated.
    Lanes {
        #[command(flatten)]
        common: Common,
        /// Bulk records waiting when express starts.
        #[arg(long, default_value_t = 1_000_000)]
        backlog: u64,
        /// Express records per second.
        #[arg(long, default_value_t = 200)]
        express_rate: u32,
        /// Seconds of express traffic per phase.
        #[arg(long, default_value_t = 10)]
        window_s: u64,
        /// What handling one record costs (µs, a sleep).
        #[arg(long, default_value_t = 1000)]
        handler_us: u64,
        /// Records the worker handles at once.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("lanes-bench: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("lanes-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn print(report: &Report, json: bool) {
    if json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.table());
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.scenario {
        Scenario::Produce { common } => {
            let target = Target::start(common.broker.clone()).await?;
            let report = produce::run(&target, &common).await;
            target.stop().await?;
            print(&report?, common.json);
        }
        Scenario::Consume { common, group } => {
            let target = Target::start(common.broker.clone()).await?;
            let report = consume::run(&target, &common, group).await;
            target.stop().await?;
            print(&report?, common.json);
        }
        Scenario::Lanes {
            common,
            backlog,
            express_rate,
            window_s,
            handler_us,
            concurrency,
        } => {
            let config = LanesConfig {
                backlog,
                record_bytes: common.record_bytes,
                partitions: common.partitions,
                express_rate,
                window: Duration::from_secs(window_s),
                handler: Duration::from_micros(handler_us),
                concurrency,
            };
            let target = Target::start(common.broker.clone()).await?;
            let progress = |line: &str| eprintln!("lanes-bench: {line}");
            let report = lanes::run(&target, &config, &progress).await;
            target.stop().await?;
            let report = report?;
            if common.json {
                println!("{}", report.to_json());
            } else {
                print!("{}", report.table());
            }
        }
    }
    Ok(())
}
