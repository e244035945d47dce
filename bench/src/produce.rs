//! `produce`: P producers (each its own connection) send records to a fresh topic, as
//! fast as they can or at `--rate`; throughput, and each record's latency from the call
//! to `send` to its acknowledgement.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use indicatif::ProgressBar;
use lanes_producer::{Delivery, LaneSelector, Producer, ProducerConfig, ProducerRecord};
use lanes_protocol::Lane;
use tokio::sync::mpsc;

use crate::latency::{Latencies, LocalLatencies};
use crate::machine::MachineWatch;
use crate::pace::Ticks;
use crate::report::{AcksArg, Common, Report, progress};
use crate::target::Target;

const TOPIC: &str = "bench-produce";

/// Deliveries handed to the task that awaits them at once, and chunks queued at most:
/// 65,536 records waiting for their acknowledgements per producer.
const DELIVERY_CHUNK_RECORDS: usize = 256;
const DELIVERY_CHUNKS_MAX: usize = 256;

/// What the producers did.
#[derive(Debug, Default)]
pub struct Sent {
    pub records: AtomicU64,
    pub bytes: AtomicU64,
    pub errors: AtomicU64,
    pub latencies: Latencies,
    /// With `--rate`: how late every 64th record went to `send` after its place in the
    /// schedule, the load generator's own delay (OpenMessaging Benchmark's "publish
    /// delay"). It is part of `latencies`, which start at that place too.
    pub send_delays: Latencies,
}

/// How long, or how much, to send.
#[derive(Clone, Copy, Debug)]
pub struct Load {
    /// Records over all producers; `None`: until `duration` passes.
    pub count: Option<u64>,
    pub duration: Option<Duration>,
    /// Records per second over all producers; `None`: as fast as possible.
    pub rate: Option<u64>,
    /// Spread records round robin over this many lanes; `None`: the topic's default lane.
    pub lanes: Option<u8>,
}

/// Lane names for a topic of `count` lanes: the broker's three by default.
pub fn lane_names(count: u8) -> Vec<String> {
    match count {
        3 => vec!["express".into(), "standard".into(), "bulk".into()],
        _ => (0..count).map(|lane| format!("lane{lane}")).collect(),
    }
}

pub async fn run(target: &Target, common: &Common, lanes: u8) -> anyhow::Result<Report> {
    let names = lane_names(lanes);
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    target.fresh_topic(TOPIC, common.partitions, &names).await?;
    if common.warmup_s > 0 {
        let warmup = Load {
            count: None,
            duration: Some(Duration::from_secs(common.warmup_s)),
            rate: common.rate,
            lanes: Some(lanes),
        };
        send(
            target,
            common,
            TOPIC,
            warmup,
            &Arc::new(Sent::default()),
            &ProgressBar::hidden(),
        )
        .await?;
    }
    let load = Load {
        count: common.count_or_default(),
        duration: common.duration_s.map(Duration::from_secs),
        rate: common.rate,
        lanes: Some(lanes),
    };
    let sent = Arc::new(Sent::default());
    let bar = progress(load.count, "produce");
    let started = Instant::now();
    let machine = MachineWatch::start();
    send(target, common, TOPIC, load, &sent, &bar).await?;
    let seconds = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let mut report = Report {
        scenario: "produce",
        records: sent.records.load(Ordering::Relaxed),
        bytes: sent.bytes.load(Ordering::Relaxed),
        seconds,
        latency: Some(sent.latencies.summary()),
        errors: sent.errors.load(Ordering::Relaxed),
        machine_cpu: machine.finish(),
        ..Report::default()
    };
    if common.rate.is_some() {
        let delays = sent.send_delays.summary().to_json();
        report.extra.insert("send_delay_ms".into(), delays);
    }
    Ok(report)
}

/// Fills `topic` with `count` records as fast as it can (acks written, at least two
/// producers), with a progress bar; returns the records acknowledged.
pub async fn fill(target: &Target, common: &Common, topic: &str, count: u64) -> anyhow::Result<u64> {
    let filling = Common {
        acks: AcksArg::Written,
        producers: common.producers.max(2),
        rate: None,
        ..common.clone()
    };
    let load = Load {
        count: Some(count),
        duration: None,
        rate: None,
        lanes: None,
    };
    let bar = progress(Some(count), "filling");
    let filled = Arc::new(Sent::default());
    send(target, &filling, topic, load, &filled, &bar).await?;
    bar.finish_and_clear();
    Ok(filled.records.load(Ordering::Relaxed))
}

/// Runs the producers until the load is sent and acknowledged.
pub async fn send(
    target: &Target,
    common: &Common,
    topic: &str,
    load: Load,
    sent: &Arc<Sent>,
    bar: &ProgressBar,
) -> anyhow::Result<()> {
    let producers = common.producers.max(1) as u64;
    let deadline = load.duration.map(|d| Instant::now() + d);
    let ticks = load.rate.map(|_| Ticks::start()).transpose()?;
    let mut tasks = Vec::new();
    for index in 0..producers {
        let quota = load
            .count
            .map(|count| count / producers + u64::from(index < count % producers));
        let rate = load.rate.map(|rate| rate as f64 / producers as f64);
        let config = common.producer_config(&target.address, format!("lanes-bench-{index}"));
        tasks.push(crate::spawn_scoped(producer_task(
            config,
            topic.to_owned(),
            Bytes::from(vec![b'x'; common.record_bytes]),
            quota,
            deadline,
            rate.zip(ticks.clone()),
            load.lanes,
            Arc::clone(sent),
            bar.clone(),
        )));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn producer_task(
    config: ProducerConfig,
    topic: String,
    value: Bytes,
    quota: Option<u64>,
    deadline: Option<Instant>,
    mut rate: Option<(f64, Ticks)>,
    lanes: Option<u8>,
    sent: Arc<Sent>,
    bar: ProgressBar,
) -> anyhow::Result<()> {
    let producer = Producer::connect(config).await?;
    // Acknowledgements are awaited in order by another task, handed over in chunks: a
    // channel operation per record (atomics on lines both tasks' cores write) was 4% of
    // the machine at full speed. The bounded queue keeps the records waiting for theirs
    // bounded too.
    let (deliveries, mut acked) = mpsc::channel::<Vec<(Instant, usize, Delivery)>>(DELIVERY_CHUNKS_MAX);
    let acker = crate::spawn_scoped({
        let sent = Arc::clone(&sent);
        async move {
            // Latency ends when the producer learned of the acknowledgement, not when
            // this task got round to it. Counters are updated once per chunk.
            let mut latencies = LocalLatencies::default();
            while let Some(chunk) = acked.recv().await {
                let (mut records, mut bytes, mut errors) = (0u64, 0u64, 0u64);
                for (at, size, delivery) in chunk {
                    let outcome = match delivery.try_outcome() {
                        Some(outcome) => outcome,
                        None => delivery.wait().await,
                    };
                    match outcome {
                        Ok(metadata) => {
                            latencies.record(metadata.acknowledged_at.saturating_duration_since(at));
                            records += 1;
                            bytes += size as u64;
                        }
                        Err(_) => errors += 1,
                    }
                }
                sent.records.fetch_add(records, Ordering::Relaxed);
                sent.bytes.fetch_add(bytes, Ordering::Relaxed);
                sent.errors.fetch_add(errors, Ordering::Relaxed);
                bar.inc(records);
            }
            sent.latencies.add(&latencies);
        }
    });
    let topic: Arc<str> = Arc::from(topic);
    let started = Instant::now();
    let mut count = 0u64;
    // Records the schedule had due when the clock was last read: the clock is read
    // again only once they are sent.
    let mut due = 0u64;
    let mut send_delays = LocalLatencies::default();
    let mut chunk = Vec::with_capacity(DELIVERY_CHUNK_RECORDS);
    loop {
        // The clock is read every 64 records: reading it per record is a visible part
        // of the bench's own cost.
        let past_deadline = || deadline.is_some_and(|d| Instant::now() >= d);
        if quota.is_some_and(|quota| count >= quota) || (count.is_multiple_of(64) && past_deadline()) {
            break;
        }
        // Latency runs from when the record was due: with `--rate`, its place in the
        // schedule, so time spent behind schedule (or blocked by a full buffer) counts
        // (no coordinated omission); as fast as possible, now.
        let at = match &mut rate {
            Some((rate, ticks)) => {
                let rate = *rate;
                // Open loop: never ahead of the schedule; behind it, catch up at once.
                if count >= due {
                    due = (started.elapsed().as_secs_f64() * rate) as u64;
                }
                if count >= due {
                    if past_deadline() {
                        break;
                    }
                    ticks.next().await;
                    continue;
                }
                started + Duration::from_secs_f64(count as f64 / rate)
            }
            None => Instant::now(),
        };
        let mut record = ProducerRecord::new(Arc::clone(&topic), value.clone());
        if let Some(lanes) = lanes.filter(|lanes| *lanes > 1) {
            record = record.lane(LaneSelector::Index(Lane((count % u64::from(lanes)) as u8)));
        }
        let delivery = producer.send(record).await?;
        // Sampled: a clock read per record is a visible part of the bench's own cost.
        if rate.is_some() && count.is_multiple_of(64) {
            send_delays.record(at.elapsed());
        }
        chunk.push((at, value.len(), delivery));
        count += 1;
        if chunk.len() == DELIVERY_CHUNK_RECORDS {
            let full = std::mem::replace(&mut chunk, Vec::with_capacity(DELIVERY_CHUNK_RECORDS));
            if deliveries.send(full).await.is_err() {
                break;
            }
        }
    }
    if !chunk.is_empty() {
        deliveries.send(chunk).await.ok();
    }
    drop(deliveries);
    sent.send_delays.add(&send_delays);
    producer.flush().await.ok();
    acker.await?;
    producer.close().await.ok();
    Ok(())
}
