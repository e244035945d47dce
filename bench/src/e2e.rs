//! `e2e`: producers and a consumer group at once; latency from the moment a producer
//! sends a record to the moment a consumer receives it, and a check that every record
//! arrived once. With `--catch-up-mb`, another consumer reads a filled topic from the
//! start meanwhile, over and over: live latency beside a consumer catching up from the
//! disk.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::bail;
use bytes::{BufMut, BytesMut};
use lanes_consumer::{Consumer, ConsumerConfig, GroupConfig, StartFrom};
use lanes_producer::{Producer, ProducerRecord};

use serde_json::json;

use crate::latency::Latencies;
use crate::machine::MachineWatch;
use crate::pace::Ticks;
use crate::produce;
use crate::report::{Common, Report, progress};
use crate::target::Target;

const TOPIC: &str = "bench-e2e";
const GROUP: &str = "lanes-bench-e2e";
/// The topic the catching-up consumer reads.
const CATCH_UP_TOPIC: &str = "bench-catch-up";
/// Value layout: producer u32, sequence u64, send time (ns since the epoch) u64, padding.
const HEADER_BYTES: usize = 20;

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Which (producer, sequence) pairs arrived, and how often.
#[derive(Debug, Default)]
struct Seen {
    /// Per producer, a bit per sequence number.
    bits: Vec<Vec<u64>>,
    distinct: u64,
    duplicates: u64,
}

impl Seen {
    fn mark(&mut self, producer: usize, sequence: u64) {
        if self.bits.len() <= producer {
            self.bits.resize(producer + 1, Vec::new());
        }
        let words = &mut self.bits[producer];
        let (word, bit) = ((sequence / 64) as usize, sequence % 64);
        if words.len() <= word {
            words.resize(word + 1, 0);
        }
        if words[word] & (1 << bit) == 0 {
            words[word] |= 1 << bit;
            self.distinct += 1;
        } else {
            self.duplicates += 1;
        }
    }
}

/// `catch_up_mb`: megabytes a consumer catching up reads meanwhile, over and over (0:
/// none).
pub async fn run(target: &Target, common: &Common, catch_up_mb: u64) -> anyhow::Result<Report> {
    target.fresh_topic(TOPIC, common.partitions, &[]).await?;
    let count = common.count_or_default();
    let duration = common.duration_s.map(Duration::from_secs);
    if common.record_bytes < HEADER_BYTES {
        bail!("e2e records carry a {HEADER_BYTES}-byte header: use --record-bytes {HEADER_BYTES} or more");
    }

    // The group first, so nothing is missed.
    let latencies = Arc::new(Latencies::default());
    let seen = Arc::new(Mutex::new(Seen::default()));
    let received_bytes = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let bar = progress(count, "e2e");
    let mut consumers = Vec::new();
    for index in 0..common.consumers.max(1) {
        let mut config = ConsumerConfig::new(&target.address);
        config.client_id = format!("lanes-bench-e2e-{index}");
        let mut consumer = Consumer::connect(config).await?;
        consumer.subscribe(GroupConfig::new(GROUP, &[TOPIC]))?;
        let (latencies, seen, received_bytes, done, bar) = (
            Arc::clone(&latencies),
            Arc::clone(&seen),
            Arc::clone(&received_bytes),
            Arc::clone(&done),
            bar.clone(),
        );
        consumers.push(crate::spawn_scoped(async move {
            while !done.load(Ordering::Relaxed) {
                let records = consumer.poll_timeout(Duration::from_millis(50)).await?;
                let now = now_ns();
                let mut seen = seen.lock().expect("seen lock poisoned");
                for record in &records {
                    let value = &record.value;
                    let producer = u32::from_be_bytes(value[0..4].try_into().expect("4 bytes")) as usize;
                    let sequence = u64::from_be_bytes(value[4..12].try_into().expect("8 bytes"));
                    let sent_ns = u64::from_be_bytes(value[12..20].try_into().expect("8 bytes"));
                    latencies.record(Duration::from_nanos(now.saturating_sub(sent_ns)));
                    seen.mark(producer, sequence);
                    received_bytes.fetch_add(value.len() as u64, Ordering::Relaxed);
                }
                bar.inc(records.len() as u64);
            }
            consumer.close().await?;
            Ok::<(), anyhow::Error>(())
        }));
    }
    target
        .settled_group(GROUP, common.consumers.max(1), common.partitions)
        .await?;
    let catch_up = match catch_up_mb {
        0 => None,
        mb => Some(CatchUp::start(target, common, mb * 1_000_000, Arc::clone(&done)).await?),
    };

    let started = Instant::now();
    let machine = MachineWatch::start();
    let producers = common.producers.max(1) as u64;
    let deadline = duration.map(|d| Instant::now() + d);
    let ticks = common.rate.map(|_| Ticks::start()).transpose()?;
    let mut tasks = Vec::new();
    for index in 0..producers {
        let quota = count.map(|count| count / producers + u64::from(index < count % producers));
        let rate = common.rate.map(|rate| rate as f64 / producers as f64);
        let config = common.producer_config(&target.address, format!("lanes-bench-e2e-{index}"));
        let (sent, record_bytes) = (Arc::clone(&sent), common.record_bytes);
        let mut ticks = ticks.clone();
        tasks.push(crate::spawn_scoped(async move {
            let producer = Producer::connect(config).await?;
            let mut sequence = 0u64;
            let task_started = Instant::now();
            loop {
                if quota.is_some_and(|q| sequence >= q) || deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                if let (Some(rate), Some(ticks)) = (rate, &mut ticks)
                    && sequence >= (task_started.elapsed().as_secs_f64() * rate) as u64
                {
                    ticks.next().await;
                    continue;
                }
                let mut value = BytesMut::with_capacity(record_bytes);
                value.put_u32(index as u32);
                value.put_u64(sequence);
                value.put_u64(now_ns());
                value.resize(record_bytes, b'.');
                producer.send(ProducerRecord::new(TOPIC, value.freeze())).await?;
                sequence += 1;
            }
            producer.close().await?;
            sent.fetch_add(sequence, Ordering::Relaxed);
            Ok::<(), anyhow::Error>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let total = sent.load(Ordering::Relaxed);
    // Everything sent arrives, or the grace period runs out (then it is lost).
    let grace = Instant::now() + Duration::from_secs(60);
    while seen.lock().expect("seen lock poisoned").distinct < total && Instant::now() < grace {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let machine_cpu = machine.finish();
    done.store(true, Ordering::Relaxed);
    for consumer in consumers {
        consumer.await??;
    }
    bar.finish_and_clear();
    let mut extra = serde_json::Map::new();
    if let Some(catch_up) = catch_up {
        let (bytes, laps) = catch_up.finish().await?;
        extra.insert(
            "catch_up_mb_per_s".into(),
            json!((bytes as f64 / 1e6 / seconds).round()),
        );
        extra.insert("catch_up_laps".into(), json!(laps));
        extra.insert("catch_up_bytes".into(), json!(bytes));
    }
    let seen = seen.lock().expect("seen lock poisoned");
    Ok(Report {
        scenario: "e2e",
        records: seen.distinct,
        bytes: received_bytes.load(Ordering::Relaxed),
        seconds,
        latency: Some(latencies.summary()),
        lost: Some(total.saturating_sub(seen.distinct)),
        duplicates: Some(seen.duplicates),
        machine_cpu,
        extra,
        ..Report::default()
    })
}

/// A consumer reading a filled topic from the start, again each time it reaches the end,
/// as fast as it can, until the run is done.
struct CatchUp {
    task: tokio_util::task::AbortOnDropHandle<anyhow::Result<(u64, u64)>>,
}

impl CatchUp {
    /// Fills [`CATCH_UP_TOPIC`] with `bytes` of records (acks written), then starts the
    /// consumer. Pages behind the broker's cached tail are dropped as they are written
    /// back, so it reads from the disk.
    async fn start(
        target: &Target,
        common: &Common,
        bytes: u64,
        done: Arc<std::sync::atomic::AtomicBool>,
    ) -> anyhow::Result<CatchUp> {
        target.fresh_topic(CATCH_UP_TOPIC, common.partitions, &[]).await?;
        let count = bytes.div_ceil(common.record_bytes.max(1) as u64);
        let total = produce::fill(target, common, CATCH_UP_TOPIC, count).await?;
        let mut config = ConsumerConfig::new(&target.address);
        config.client_id = "lanes-bench-catch-up".into();
        let mut consumer = Consumer::connect(config).await?;
        let task = crate::spawn_scoped(async move {
            let (mut bytes, mut laps) = (0u64, 0u64);
            // Once the run is done, it stops, but not before it has read anything (a
            // short run may end before its first fetch): within a minute, or it fails.
            let mut stop_by = None;
            let mut stops = |bytes: u64| {
                if !done.load(Ordering::Relaxed) {
                    return Ok(false);
                }
                let by = *stop_by.get_or_insert_with(|| Instant::now() + Duration::from_secs(60));
                match (bytes > 0, Instant::now() < by) {
                    (true, _) => Ok(true),
                    (false, true) => Ok(false),
                    (false, false) => Err(anyhow::anyhow!("the catching-up consumer read nothing")),
                }
            };
            while !stops(bytes)? {
                consumer
                    .assign(CATCH_UP_TOPIC, None, None, StartFrom::Earliest)
                    .await?;
                let mut read = 0;
                while read < total && !stops(bytes)? {
                    let records = consumer.poll_timeout(Duration::from_millis(50)).await?;
                    read += records.len() as u64;
                    bytes += records.iter().map(|r| r.value.len() as u64).sum::<u64>();
                }
                laps += u64::from(read >= total);
            }
            Ok((bytes, laps))
        });
        Ok(CatchUp { task })
    }

    /// Bytes read and whole laps, once the run is done.
    async fn finish(self) -> anyhow::Result<(u64, u64)> {
        self.task.await?
    }
}
