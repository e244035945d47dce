//! `produce`: P producers (each its own connection) send records to a fresh topic, as
//! fast as they can or at `--rate`; throughput, and each record's latency from the call
//! to `send` to its acknowledgement.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use indicatif::ProgressBar;
use lanes_producer::{Delivery, Producer, ProducerConfig, ProducerRecord};
use tokio::sync::mpsc;

use crate::latency::Latencies;
use crate::report::{Common, Report, progress};
use crate::target::Target;

const TOPIC: &str = "bench-produce";

/// What the producers did.
#[derive(Debug, Default)]
pub struct Sent {
    pub records: AtomicU64,
    pub bytes: AtomicU64,
    pub errors: AtomicU64,
    pub latencies: Latencies,
}

/// How long, or how much, to send.
#[derive(Clone, Copy, Debug)]
pub struct Load {
    /// Records over all producers; `None`: until `duration` passes.
    pub count: Option<u64>,
    pub duration: Option<Duration>,
    /// Records per second over all producers; `None`: as fast as possible.
    pub rate: Option<u64>,
}

pub async fn run(target: &Target, common: &Common) -> anyhow::Result<Report> {
    target.fresh_topic(TOPIC, common.partitions, &[]).await?;
    if common.warmup_s > 0 {
        let warmup = Load {
            count: None,
            duration: Some(Duration::from_secs(common.warmup_s)),
            rate: common.rate,
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
    };
    let sent = Arc::new(Sent::default());
    let bar = progress(load.count, "produce");
    let started = Instant::now();
    send(target, common, TOPIC, load, &sent, &bar).await?;
    let seconds = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    Ok(Report {
        scenario: "produce",
        records: sent.records.load(Ordering::Relaxed),
        bytes: sent.bytes.load(Ordering::Relaxed),
        seconds,
        latency: Some(sent.latencies.summary()),
        errors: sent.errors.load(Ordering::Relaxed),
        ..Report::default()
    })
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
    let mut tasks = Vec::new();
    for index in 0..producers {
        let quota = load
            .count
            .map(|count| count / producers + u64::from(index < count % producers));
        let rate = load.rate.map(|rate| rate as f64 / producers as f64);
        let mut config = ProducerConfig::new(&target.address);
        config.client_id = format!("lanes-bench-{index}");
        config.acks = common.acks.into();
        config.batch_bytes_max = common.batch_bytes;
        tasks.push(tokio::spawn(producer_task(
            config,
            topic.to_owned(),
            Bytes::from(vec![b'x'; common.record_bytes]),
            quota,
            deadline,
            rate,
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
    rate: Option<f64>,
    sent: Arc<Sent>,
    bar: ProgressBar,
) -> anyhow::Result<()> {
    let producer = Producer::connect(config).await?;
    // Acknowledgements are awaited in order by another task; the bounded queue keeps
    // the records waiting for theirs bounded too.
    let (deliveries, mut acked) = mpsc::channel::<(Instant, usize, Delivery)>(1 << 16);
    let acker = tokio::spawn({
        let sent = Arc::clone(&sent);
        async move {
            while let Some((at, bytes, delivery)) = acked.recv().await {
                match delivery.wait().await {
                    Ok(_) => {
                        sent.latencies.record(at.elapsed());
                        sent.records.fetch_add(1, Ordering::Relaxed);
                        sent.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
                        bar.inc(1);
                    }
                    Err(_) => {
                        sent.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    });
    let started = Instant::now();
    let mut count = 0u64;
    loop {
        if quota.is_some_and(|quota| count >= quota) || deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        if let Some(rate) = rate {
            // Open loop: never ahead of the schedule; behind it, catch up at once.
            let due = (started.elapsed().as_secs_f64() * rate) as u64;
            if count >= due {
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
        }
        let at = Instant::now();
        let delivery = producer
            .send(ProducerRecord::new(topic.clone(), value.clone()))
            .await?;
        if deliveries.send((at, value.len(), delivery)).await.is_err() {
            break;
        }
        count += 1;
    }
    drop(deliveries);
    producer.flush().await.ok();
    acker.await?;
    producer.close().await.ok();
    Ok(())
}
