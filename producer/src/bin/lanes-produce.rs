//! `lanes-produce`: sends the lines of standard input as records.

use std::io::BufRead;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use lanes_producer::{LaneSelector, Producer, ProducerConfig, ProducerRecord, TopicDefaults};
use lanes_protocol::Lane;
use lanes_protocol::messages::Acks;
use serde_json::{Value, json};

/// Sends each line of standard input as a record (the line is the value).
#[derive(Debug, Parser)]
#[command(name = "lanes-produce", version)]
struct Cli {
    /// The broker, host:port.
    #[arg(long, env = "LANES_BROKER", default_value = "127.0.0.1:7070")]
    broker: String,
    #[arg(long)]
    topic: String,
    /// Take the key from this field of each line, read as a JSON object.
    #[arg(long, conflicts_with = "key_separator")]
    key_field: Option<String>,
    /// Split each line into KEY SEPARATOR VALUE.
    #[arg(long)]
    key_separator: Option<String>,
    /// The lane for every record: a lane name or number.
    #[arg(long, conflicts_with = "lane_field")]
    lane: Option<String>,
    /// Take the lane (a name or a number) from this field of each line, read as a JSON object.
    #[arg(long)]
    lane_field: Option<String>,
    #[arg(long, value_enum, default_value_t = AcksArg::Durable)]
    acks: AcksArg,
    /// Create the topic with this many partitions if it is missing.
    #[arg(long)]
    partitions: Option<u32>,
    /// Create the topic with these lanes (comma-separated, most urgent first) if it is missing.
    #[arg(long, value_delimiter = ',')]
    lanes: Vec<String>,
    /// Write one JSON line per acknowledged record to stdout.
    #[arg(long)]
    print_acks: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum AcksArg {
    None,
    Written,
    Durable,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build();
    let result = runtime
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(run(cli)));
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("lanes-produce: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn lane_selector(text: &str) -> LaneSelector {
    match text.parse::<u8>() {
        Ok(index) => LaneSelector::Index(Lane(index)),
        Err(_) => LaneSelector::Name(text.to_owned()),
    }
}

/// Builds the record for one input line.
fn record(cli: &Cli, line: &str) -> anyhow::Result<ProducerRecord> {
    let json: Option<Value> = if cli.key_field.is_some() || cli.lane_field.is_some() {
        Some(serde_json::from_str(line).context("the line is not a JSON object")?)
    } else {
        None
    };
    let field = |name: &str| -> anyhow::Result<Option<String>> {
        match json.as_ref().and_then(|j| j.get(name)) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(Value::Number(n)) => Ok(Some(n.to_string())),
            Some(other) => bail!("field {name} is {other}, not a string or number"),
        }
    };
    let (key, value) = match (&cli.key_field, &cli.key_separator) {
        (Some(name), _) => (field(name)?, line),
        (None, Some(separator)) => match line.split_once(separator.as_str()) {
            Some((key, value)) => (Some(key.to_owned()), value),
            None => (None, line),
        },
        (None, None) => (None, line),
    };
    let mut record = ProducerRecord::new(cli.topic.clone(), Bytes::copy_from_slice(value.as_bytes()));
    if let Some(key) = key {
        record = record.key(key);
    }
    if let Some(lane) = &cli.lane {
        record = record.lane(lane_selector(lane));
    } else if let Some(name) = &cli.lane_field
        && let Some(lane) = field(name)?
    {
        record = record.lane(lane_selector(&lane));
    }
    Ok(record)
}

async fn run(cli: Cli) -> anyhow::Result<bool> {
    let mut config = ProducerConfig::new(cli.broker.clone());
    config.client_id = "lanes-produce".into();
    config.acks = match cli.acks {
        AcksArg::None => Acks::None,
        AcksArg::Written => Acks::Written,
        AcksArg::Durable => Acks::Durable,
    };
    config.create_topics = Some(TopicDefaults {
        partitions: cli.partitions.unwrap_or(0),
        lanes: cli.lanes.clone(),
    });
    let producer = Producer::connect(config)
        .await
        .context("connecting to the broker")?;
    let lane_names = producer.lanes(&cli.topic).await?;
    let started = Instant::now();
    let (acks_tx, mut acks_rx) = tokio::sync::mpsc::unbounded_channel();
    let printer = tokio::spawn({
        let mut print = cli.print_acks;
        let lanes = lane_names.clone();
        async move {
            let (mut acked, mut failed, mut bytes) = (0u64, 0u64, 0u64);
            let mut per_lane = vec![0u64; lanes.len()];
            while let Some((line, size, delivery)) = acks_rx.recv().await {
                let delivery: lanes_producer::Delivery = delivery;
                match delivery.wait().await {
                    Ok(metadata) => {
                        acked += 1;
                        bytes += size;
                        per_lane[metadata.lane.0 as usize] += 1;
                        if print {
                            let ack = json!({"line": line, "partition": metadata.partition.0,
                                             "lane": metadata.lane.0, "offset": metadata.offset.map(|o| o.0)});
                            use std::io::Write;
                            if writeln!(std::io::stdout().lock(), "{ack}").is_err() {
                                // A closed stdout stops the printing, not the producing.
                                print = false;
                            }
                        }
                    }
                    Err(error) => {
                        failed += 1;
                        eprintln!("lanes-produce: line {line} not acknowledged: {error}");
                    }
                }
            }
            (acked, failed, bytes, per_lane)
        }
    });
    let stdin = std::io::stdin();
    let mut errors = 0u64;
    for (number, line) in stdin.lock().lines().enumerate() {
        let line = line.context("reading standard input")?;
        let size = line.len() as u64;
        let sent = match record(&cli, &line) {
            Ok(record) => producer.send(record).await.map_err(anyhow::Error::from),
            Err(error) => Err(error),
        };
        match sent {
            Ok(delivery) => {
                let _ = acks_tx.send((number, size, delivery));
            }
            Err(error) => {
                errors += 1;
                eprintln!("lanes-produce: line {number}: {error:#}");
            }
        }
    }
    drop(acks_tx);
    let flushed = producer.close().await;
    let (acked, failed, bytes, per_lane) = printer.await?;
    let seconds = started.elapsed().as_secs_f64();
    let lanes: serde_json::Map<String, Value> = lane_names
        .iter()
        .zip(&per_lane)
        .map(|(name, count)| (name.clone(), json!(count)))
        .collect();
    eprintln!(
        "{}",
        json!({"records_acked": acked, "records_failed": failed + errors, "bytes": bytes,
               "seconds": (seconds * 1000.0).round() / 1000.0, "lanes": lanes})
    );
    if let Err(error) = flushed {
        eprintln!("lanes-produce: {error}");
    }
    Ok(failed + errors == 0)
}
