//! `lanes-consume`: prints records of a topic, alone or as a member of a group.

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine;
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use lanes_consumer::{Consumer, ConsumerConfig, ConsumerRecord, GroupConfig, LogKey, ResetPolicy, StartFrom};
use lanes_protocol::{Lane, Offset, PartitionId};
use serde_json::{Value, json};

/// Prints the records of a topic, one per line. With --group, joins a consumer group,
/// prints the records of the partitions the group gives it, and commits after printing.
#[derive(Debug, Parser)]
#[command(name = "lanes-consume", version)]
struct Cli {
    /// Join this consumer group: share the topic's partitions with the group's other
    /// members and start from the group's committed offsets (--from earliest|latest
    /// applies where there are none).
    #[arg(long)]
    group: Option<String>,
    /// With --group: the group gives this member's partitions to others when it has not
    /// heard from it for this long (ms).
    #[arg(long, default_value_t = 10_000)]
    session_timeout_ms: u64,
    /// The broker, host:port.
    #[arg(long, env = "LANES_BROKER", default_value = "127.0.0.1:7070")]
    broker: String,
    #[arg(long)]
    topic: String,
    /// A partition to read (repeatable; default: all).
    #[arg(long = "partition")]
    partitions: Vec<u32>,
    /// A lane to read, by name or number (repeatable; default: all).
    #[arg(long = "lane")]
    lanes: Vec<String>,
    /// Where to start: earliest, latest, an offset, or @TIMESTAMP_MS.
    #[arg(long, default_value = "earliest")]
    from: String,
    /// Exit after this many records.
    #[arg(long)]
    count: Option<u64>,
    /// Exit after this many milliseconds without a new record.
    #[arg(long)]
    idle_exit_ms: Option<u64>,
    #[arg(long, value_enum, default_value_t = Format::Value)]
    format: Format,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Format {
    /// The value, as text.
    Value,
    /// One JSON object per record.
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build();
    match runtime
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(run(cli)))
    {
        Ok(()) => ExitCode::SUCCESS,
        // `| head`: the reader has what it wanted.
        Err(error)
            if error
                .downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("lanes-consume: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn start_from(text: &str) -> anyhow::Result<StartFrom> {
    Ok(match text {
        "earliest" => StartFrom::Earliest,
        "latest" => StartFrom::Latest,
        _ => match text.strip_prefix('@') {
            Some(ms) => StartFrom::Timestamp(ms.parse().context("--from @TIMESTAMP_MS")?),
            None => StartFrom::Offset(Offset(
                text.parse()
                    .context("--from is earliest, latest, an offset or @TIMESTAMP_MS")?,
            )),
        },
    })
}

/// Text as a JSON string if it is UTF-8, base64 otherwise, and which it is.
fn text_or_base64(bytes: &Bytes) -> (Value, bool) {
    match std::str::from_utf8(bytes) {
        Ok(text) => (json!(text), false),
        Err(_) => (
            json!(base64::engine::general_purpose::STANDARD.encode(bytes)),
            true,
        ),
    }
}

fn to_json(record: &ConsumerRecord, lane_names: &[String]) -> Value {
    let (key, key_base64) = match &record.key {
        Some(key) => text_or_base64(key),
        None => (Value::Null, false),
    };
    let (value, value_base64) = text_or_base64(&record.value);
    let headers: Vec<Value> = record
        .headers
        .iter()
        .map(|header| {
            let (key, key_base64) = text_or_base64(&header.key);
            let (value, value_base64) = match &header.value {
                Some(value) => text_or_base64(value),
                None => (Value::Null, false),
            };
            json!({"key": key, "key_base64": key_base64, "value": value, "value_base64": value_base64})
        })
        .collect();
    json!({
        "partition": record.partition.0,
        "lane": record.lane.0,
        "lane_name": lane_names.get(record.lane.0 as usize),
        "offset": record.offset.0,
        "timestamp_ms": record.timestamp_ms,
        "key": key,
        "key_base64": key_base64,
        "value": value,
        "value_base64": value_base64,
        "headers": headers,
    })
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let from = start_from(&cli.from)?;
    let mut config = ConsumerConfig::new(cli.broker.clone());
    config.client_id = "lanes-consume".into();
    if let Some(idle) = cli.idle_exit_ms {
        config.fetch_wait = Duration::from_millis(idle.clamp(1, 500));
    }
    if cli.group.is_some() {
        config.reset = match from {
            StartFrom::Earliest => ResetPolicy::Earliest,
            StartFrom::Latest => ResetPolicy::Latest,
            _ => {
                bail!("with --group, --from is earliest or latest (where the group has no committed offset)")
            }
        };
        if !cli.partitions.is_empty() || !cli.lanes.is_empty() {
            bail!("with --group, the group decides the partitions, and every lane of each is read");
        }
    }
    let mut consumer = Consumer::connect(config)
        .await
        .context("connecting to the broker")?;
    if let Some(group) = &cli.group {
        let mut group_config = GroupConfig::new(group.clone(), &[cli.topic.as_str()]);
        group_config.session_timeout = Duration::from_millis(cli.session_timeout_ms);
        // Committed explicitly, right after printing.
        group_config.auto_commit_interval = None;
        consumer.subscribe(group_config)?;
        let stop = stop_signal();
        let result = tokio::select! {
            result = print_records(&cli, &mut consumer) => result,
            () = stop => Ok(()),
        };
        // Leave, so the group moves this member's partitions at once.
        let left = consumer.close().await;
        result?;
        return left.context("leaving the group");
    }
    let topic = consumer.topic(&cli.topic).await?;
    let mut lanes = Vec::new();
    for lane in &cli.lanes {
        let index = match lane.parse::<u8>() {
            Ok(index) => index,
            Err(_) => match topic.lanes.iter().position(|l| l == lane) {
                Some(index) => index as u8,
                None => bail!(
                    "topic {} has no lane {lane}; its lanes: {}",
                    cli.topic,
                    topic.lanes.join(",")
                ),
            },
        };
        lanes.push(Lane(index));
    }
    let partitions: Vec<PartitionId> = cli.partitions.iter().copied().map(PartitionId).collect();
    consumer
        .assign(
            &cli.topic,
            (!partitions.is_empty()).then_some(&partitions[..]),
            (!lanes.is_empty()).then_some(&lanes[..]),
            from,
        )
        .await?;
    print_records(&cli, &mut consumer).await
}

/// Resolves on SIGINT or SIGTERM.
async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
        (Ok(mut interrupt), Ok(mut terminate)) => {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}

/// Prints records until --count or --idle-exit-ms says to stop; in a group, commits
/// what was printed after each batch.
async fn print_records(cli: &Cli, consumer: &mut Consumer) -> anyhow::Result<()> {
    // A group member may start before the topic exists (joining creates it).
    let mut lane_names: Vec<String> = Vec::new();
    let in_group = cli.group.is_some();
    let mut printed_up_to: Vec<(LogKey, Offset)> = Vec::new();
    let mut printed = 0u64;
    let mut last_record = Instant::now();
    let stdout = std::io::stdout();
    loop {
        if cli.count.is_some_and(|count| printed >= count) {
            return Ok(());
        }
        let records = consumer.poll().await?;
        if records.is_empty() {
            if cli
                .idle_exit_ms
                .is_some_and(|idle| last_record.elapsed() >= Duration::from_millis(idle))
            {
                return Ok(());
            }
            continue;
        }
        last_record = Instant::now();
        if lane_names.is_empty() {
            lane_names = consumer.topic(&cli.topic).await?.lanes;
        }
        let mut out = stdout.lock();
        printed_up_to.clear();
        for record in records {
            if cli.count.is_some_and(|count| printed >= count) {
                break;
            }
            match cli.format {
                Format::Value => {
                    out.write_all(&record.value)?;
                    out.write_all(b"\n")?;
                }
                Format::Json => writeln!(out, "{}", to_json(&record, &lane_names))?,
            }
            printed += 1;
            if in_group {
                let key = LogKey {
                    topic: record.topic.clone(),
                    partition: record.partition,
                    lane: record.lane,
                };
                let next = record.offset.plus(1);
                match printed_up_to.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, offset)) => *offset = next,
                    None => printed_up_to.push((key, next)),
                }
            }
        }
        out.flush()?;
        drop(out);
        if in_group && let Err(error) = consumer.commit_offsets(&printed_up_to).await {
            eprintln!("lanes-consume: commit failed (the records will be read again): {error}");
        }
    }
}
