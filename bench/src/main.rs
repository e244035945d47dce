//! `lanes-bench`: runs a scenario against an embedded broker (the default) or a running
//! one, prints a table (or one JSON object with `--json`).

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use lanes_bench::lanes::{self, LanesConfig};
use lanes_bench::orders::{self, OrdersConfig};
use lanes_bench::report::{Common, Report};
use lanes_bench::target::Target;
use lanes_bench::{consume, e2e, produce};

#[derive(Debug, Parser)]
#[command(
    name = "lanes-bench",
    version,
    about = "Throughput and latency harness for Lanes"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
    /// Leave out the thread that counts late wakeups (`late_wakeups`), to see what it
    /// costs.
    #[arg(long, global = true)]
    no_wakeup_probe: bool,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Producers send records as fast as they can (or at --rate): throughput and
    /// send-to-acknowledgement latency.
    Produce {
        #[command(flatten)]
        common: Common,
        /// Lanes of the topic; records are spread over them round robin.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=8))]
        lanes: u8,
    },
    /// Consumers drain a filled topic: throughput.
    Consume {
        #[command(flatten)]
        common: Common,
        /// Consume as one consumer group instead of splitting the partitions.
        #[arg(long)]
        group: bool,
        /// With --group: the group joins, commits where it starts and pauses before the
        /// topic fills, as a running group that falls behind a burst (the broker keeps
        /// such a backlog in the page cache), rather than after it, as a new group that
        /// reads history (from the disk).
        #[arg(long, requires = "group")]
        join_first: bool,
    },
    /// Producers and a consumer group at once: end-to-end latency, nothing lost or
    /// duplicated.
    E2e {
        #[command(flatten)]
        common: Common,
        /// Fill another topic with this many MB first; during the run one more consumer
        /// reads it from the start, over and over, as fast as it can (a consumer
        /// catching up from the disk beside the live traffic).
        #[arg(long, default_value_t = 0)]
        catch_up_mb: u64,
    },
    /// The order-fulfilment demo: order events in three service-class lanes, handled by
    /// a group of workers; checks order, loss and double effects; latency per lane.
    Orders {
        #[command(flatten)]
        common: Common,
        /// Orders to place.
        #[arg(long, default_value_t = 20_000)]
        orders: u64,
        /// Workers in the fulfilment group.
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Events each worker handles at once.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// What a simulated payment or warehouse call costs (ms).
        #[arg(long, default_value_t = 2)]
        call_ms: u64,
        /// One order in this many is cancelled (0: none).
        #[arg(long, default_value_t = 20)]
        cancel_one_in: u64,
        /// Stop one worker without a goodbye after this many seconds.
        #[arg(long)]
        kill_worker_after_s: Option<f64>,
        /// Of each worker's slots, those only express events may take (default: a
        /// sixteenth of --concurrency; none below 16).
        #[arg(long)]
        urgent_slots_reserved: Option<usize>,
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
        /// Of the worker's slots, those only express records may take (default: a
        /// sixteenth of --concurrency; none below 16).
        #[arg(long)]
        urgent_slots_reserved: Option<usize>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    lanes_bench::report::MEMORY.start();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    if cli.no_wakeup_probe {
        lanes_bench::machine::leave_out_wakeup_probe();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("lanes-bench: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if error.is::<Interrupted>() => {
            eprintln!("lanes-bench: interrupted; the embedded broker's data is removed");
            ExitCode::from(130)
        }
        Err(error) => {
            eprintln!("lanes-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Ctrl-C or SIGTERM ended the run.
#[derive(Debug)]
struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

/// Runs `scenario` until it ends or the process is asked to stop. On a signal the
/// scenario is dropped and the caller stops the target, which removes an embedded
/// broker's data directory (gigabytes after a produce run); a second signal exits at
/// once.
async fn until_interrupted<T>(scenario: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::select! {
        outcome = scenario => outcome,
        () = stop_signal() => {
            tokio::spawn(async {
                stop_signal().await;
                std::process::exit(130);
            });
            Err(Interrupted.into())
        }
    }
}

async fn stop_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}

/// Prints `report`, with the settings an embedded broker took from the environment, if
/// any.
fn print(mut report: Report, common: &Common) {
    let environment = common
        .broker
        .is_none()
        .then(Target::broker_environment)
        .unwrap_or_default();
    if !environment.is_empty() {
        report.extra.insert(
            "broker_environment".into(),
            serde_json::Value::Object(environment),
        );
    }
    if common.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.table());
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.scenario {
        Scenario::Produce { common, lanes } => {
            let target = Target::start(common.broker.clone(), common.fsync).await?;
            let report = until_interrupted(produce::run(&target, &common, lanes)).await;
            target.stop().await?;
            print(report?, &common);
        }
        Scenario::Consume {
            common,
            group,
            join_first,
        } => {
            let target = Target::start(common.broker.clone(), common.fsync).await?;
            let readers = match (group, join_first) {
                (false, _) => consume::Readers::Split,
                (true, false) => consume::Readers::NewGroup,
                (true, true) => consume::Readers::GroupBehind,
            };
            let report = until_interrupted(consume::run(&target, &common, readers)).await;
            target.stop().await?;
            print(report?, &common);
        }
        Scenario::E2e { common, catch_up_mb } => {
            let target = Target::start(common.broker.clone(), common.fsync).await?;
            let report = until_interrupted(e2e::run(&target, &common, catch_up_mb)).await;
            target.stop().await?;
            print(report?, &common);
        }
        Scenario::Orders {
            common,
            orders,
            workers,
            concurrency,
            call_ms,
            cancel_one_in,
            kill_worker_after_s,
            urgent_slots_reserved,
        } => {
            let config = OrdersConfig {
                orders,
                workers,
                concurrency,
                urgent_slots_reserved,
                call: Duration::from_millis(call_ms),
                cancel_one_in,
                kill_worker_after: kill_worker_after_s.map(Duration::from_secs_f64),
            };
            let target = Target::start(common.broker.clone(), common.fsync).await?;
            let report = until_interrupted(orders::run(&target, &common, &config)).await;
            target.stop().await?;
            print(report?, &common);
        }
        Scenario::Lanes {
            common,
            backlog,
            express_rate,
            window_s,
            handler_us,
            concurrency,
            urgent_slots_reserved,
        } => {
            let config = LanesConfig {
                urgent_slots_reserved,
                backlog,
                record_bytes: common.record_bytes,
                partitions: common.partitions,
                express_rate,
                window: Duration::from_secs(window_s),
                handler: Duration::from_micros(handler_us),
                concurrency,
            };
            let target = Target::start(common.broker.clone(), common.fsync).await?;
            let progress = |line: &str| eprintln!("lanes-bench: {line}");
            let report = until_interrupted(lanes::run(&target, &config, &progress)).await;
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
