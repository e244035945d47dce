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
use crate::machine::CpuTimes;

/// How long consumers wait for anything new before counting the rest as lost.
const IDLE: Duration = Duration::from_secs(10);
use crate::produce;
use crate::report::{Common, Report, progress};
use crate::target::Target;

const TOPIC: &str = "bench-consume";

pub async fn run(target: &Target, common: &Common, group: bool) -> anyhow::Result<Report> {
    target.fresh_topic(TOPIC, common.partitions, &[]).await?;
    let Some(count) = common.count_or_default() else {
        bail!("consume drains a filled topic: give --count, not --duration-s");
    };
    let total = produce::fill(target, common, TOPIC, count).await?;

    let read = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    // Latency here is how long each poll that returned records took.
    let polls = Arc::new(Latencies::default());
    // Per lane log, the offset after the highest one read (shared: a group moves
    // partitions between its consumers).
    let next_offsets = Arc::new(std::sync::Mutex::new(
        std::collections::HashMap::<(u32, u8), u64>::new(),
    ));
    let bar = progress(Some(total), "consume");
    let consumers = common.consumers.max(1) as u32;
    let started = Instant::now();
    let cpu = CpuTimes::read();
    let mut tasks = Vec::new();
    for index in 0..consumers {
        let mut config = ConsumerConfig::new(&target.address);
        config.client_id = format!("lanes-bench-consume-{index}");
        let (read, bar, polls) = (Arc::clone(&read), bar.clone(), Arc::clone(&polls));
        let next_offsets = Arc::clone(&next_offsets);
        let partitions: Vec<PartitionId> = (0..common.partitions)
            .filter(|p| p % consumers == index)
            .map(PartitionId)
            .collect();
        tasks.push(crate::spawn_scoped(async move {
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
            // Records count once: a lane log is read in offset order, so what is new is
            // what lies past the highest offset seen (a group may redeliver after a
            // move). Gives up after `IDLE` without anything new: the rest is lost.
            let mut last_new = Instant::now();
            while read.0.load(Ordering::Relaxed) < total && last_new.elapsed() < IDLE {
                let asked = Instant::now();
                let records = consumer.poll_timeout(Duration::from_millis(100)).await?;
                if !records.is_empty() {
                    polls.record(asked.elapsed());
                }
                let (mut fresh, mut bytes) = (0u64, 0u64);
                {
                    // Looked up once per run of one lane log's records, not per record.
                    let mut next_of = next_offsets.lock().expect("offsets lock poisoned");
                    let mut run: Option<((u32, u8), u64)> = None;
                    for record in &records {
                        let key = (record.partition.0, record.lane.0);
                        let (_, next) = match &mut run {
                            Some(run) if run.0 == key => run,
                            run => {
                                if let Some((key, next)) = run.take() {
                                    next_of.insert(key, next);
                                }
                                run.insert((key, next_of.get(&key).copied().unwrap_or(0)))
                            }
                        };
                        if record.offset.0 >= *next {
                            *next = record.offset.0 + 1;
                            fresh += 1;
                            bytes += record.value.len() as u64;
                        }
                    }
                    if let Some((key, next)) = run {
                        next_of.insert(key, next);
                    }
                }
                if fresh > 0 {
                    last_new = Instant::now();
                }
                read.0.fetch_add(fresh, Ordering::Relaxed);
                read.1.fetch_add(bytes, Ordering::Relaxed);
                bar.inc(fresh);
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
        machine_cpu: cpu.and_then(|cpu| cpu.shares_until_now()),
        ..Report::default()
    })
}
