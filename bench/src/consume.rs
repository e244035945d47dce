//! `consume`: fills a fresh topic, then C consumers (each its own connection, the
//! partitions split between them, or one consumer group with `--group`) drain it;
//! throughput from the first poll to the last record.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use lanes_consumer::{Consumer, ConsumerConfig, GroupConfig, StartFrom};
use lanes_protocol::PartitionId;

use crate::latency::Latencies;
use crate::produce::{self, Load, Sent};
use crate::report::{AcksArg, Common, Report, progress};
use crate::target::Target;

const TOPIC: &str = "bench-consume";

pub async fn run(target: &Target, common: &Common, group: bool) -> anyhow::Result<Report> {
    target.fresh_topic(TOPIC, common.partitions, &[]).await?;
    let Some(count) = common.count_or_default() else {
        bail!("consume drains a filled topic: give --count, not --duration-s");
    };
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
    produce::send(target, &filling, TOPIC, load, &filled, &bar).await?;
    bar.finish_and_clear();
    let total = filled.records.load(Ordering::Relaxed);

    let read = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    // Latency here is how long each poll that returned records took.
    let polls = Arc::new(Latencies::default());
    let bar = progress(Some(total), "consume");
    let consumers = common.consumers.max(1) as u32;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for index in 0..consumers {
        let mut config = ConsumerConfig::new(&target.address);
        config.client_id = format!("lanes-bench-consume-{index}");
        let (read, bar, polls) = (Arc::clone(&read), bar.clone(), Arc::clone(&polls));
        let partitions: Vec<PartitionId> = (0..common.partitions)
            .filter(|p| p % consumers == index)
            .map(PartitionId)
            .collect();
        tasks.push(tokio::spawn(async move {
            let mut consumer = Consumer::connect(config).await?;
            if group {
                let mut group = GroupConfig::new("lanes-bench-consume", &[TOPIC]);
                group.auto_commit_interval = Some(Duration::from_secs(1));
                consumer.subscribe(group)?;
            } else if partitions.is_empty() {
                return Ok(());
            } else {
                consumer
                    .assign(TOPIC, Some(&partitions), None, StartFrom::Earliest)
                    .await?;
            }
            while read.0.load(Ordering::Relaxed) < total {
                let asked = Instant::now();
                let records = consumer.poll_timeout(Duration::from_millis(100)).await?;
                if !records.is_empty() {
                    polls.record(asked.elapsed());
                }
                let bytes: usize = records.iter().map(|r| r.value.len()).sum();
                read.0.fetch_add(records.len() as u64, Ordering::Relaxed);
                read.1.fetch_add(bytes as u64, Ordering::Relaxed);
                bar.inc(records.len() as u64);
            }
            if group {
                consumer.close().await?;
            }
            Ok::<(), anyhow::Error>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let seconds = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let records = read.0.load(Ordering::Relaxed);
    Ok(Report {
        scenario: "consume",
        records,
        bytes: read.1.load(Ordering::Relaxed),
        seconds,
        latency: Some(polls.summary()),
        lost: Some(total.saturating_sub(records)),
        ..Report::default()
    })
}
