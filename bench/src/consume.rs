//! `consume`: fills a fresh topic, then C consumers drain it; throughput from the first
//! poll to the last record. The consumers ([`Readers`]) split the partitions between
//! them, or form one consumer group, new to the topic or there before it filled.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use lanes_consumer::{Consumer, ConsumerConfig, GroupConfig, StartFrom, TopicInfo};
use lanes_protocol::{LANES_MAX, Lane, PartitionId};

use crate::latency::Latencies;
use crate::machine::MachineWatch;
use crate::produce;
use crate::report::{Common, Report, progress};
use crate::target::Target;

/// How long consumers wait for anything new before counting the rest as lost.
const IDLE: Duration = Duration::from_secs(10);

/// How long a group that joins first may take to settle (`join_first`).
const JOIN_WAIT: Duration = Duration::from_secs(30);

const TOPIC: &str = "bench-consume";
const GROUP: &str = "lanes-bench-consume";

/// Who drains the topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readers {
    /// Each consumer reads its share of the partitions from the earliest offset.
    Split,
    /// One group, which joins once the topic is full: a new reader of history, whose
    /// backlog the broker has left to the disk (`cached_tail_bytes`).
    NewGroup,
    /// One group, which joins, commits where it starts and pauses before the topic
    /// fills: a running group that falls behind a burst. The broker keeps the pages a
    /// subscribed group has not committed cached, so it drains from memory.
    GroupBehind,
}

pub async fn run(target: &Target, common: &Common, readers: Readers) -> anyhow::Result<Report> {
    target.fresh_topic(TOPIC, common.partitions, &[]).await?;
    let Some(count) = common.count_or_default() else {
        bail!("consume drains a filled topic: give --count, not --duration-s");
    };
    let consumers = common.consumers.max(1) as u32;
    // From the broker: `--partitions 0` takes its default.
    let topic = Consumer::connect(consumer_config(target, 0))
        .await?
        .topic(TOPIC)
        .await?;
    let mut joined = match readers {
        Readers::GroupBehind => join_first(target, consumers, &topic).await?,
        Readers::Split | Readers::NewGroup => Vec::new(),
    }
    .into_iter();
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
    let started = Instant::now();
    let machine = MachineWatch::start();
    let mut tasks = Vec::new();
    for index in 0..consumers {
        // A member that joined first, or what a new consumer needs.
        let joined_or_config = joined.next().ok_or_else(|| consumer_config(target, index));
        let (read, bar, polls) = (Arc::clone(&read), bar.clone(), Arc::clone(&polls));
        let next_offsets = Arc::clone(&next_offsets);
        let partitions: Vec<PartitionId> = (0..topic.partitions)
            .filter(|p| p % consumers == index)
            .map(PartitionId)
            .collect();
        tasks.push(crate::spawn_scoped(async move {
            let mut consumer = match joined_or_config {
                Ok(mut consumer) => {
                    consumer.resume_lanes(&all_lanes());
                    consumer
                }
                Err(config) => Consumer::connect(config).await?,
            };
            match readers {
                Readers::GroupBehind => {}
                Readers::NewGroup => consumer.subscribe(group_config())?,
                Readers::Split if partitions.is_empty() => return Ok(()),
                Readers::Split => {
                    consumer
                        .assign(TOPIC, Some(&partitions), None, StartFrom::Earliest)
                        .await?
                }
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
            if readers != Readers::Split {
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
        machine_cpu: machine.finish(),
        ..Report::default()
    })
}

/// Every lane a topic can have: what a paused member pauses.
fn all_lanes() -> Vec<Lane> {
    (0..LANES_MAX as u8).map(Lane).collect()
}

fn consumer_config(target: &Target, index: u32) -> ConsumerConfig {
    let mut config = ConsumerConfig::new(&target.address);
    config.client_id = format!("lanes-bench-consume-{index}");
    config
}

fn group_config() -> GroupConfig {
    let mut group = GroupConfig::new(GROUP, &[TOPIC]);
    group.auto_commit_interval = Some(Duration::from_secs(1));
    group
}

/// Joins `consumers` members to the group on the empty topic and waits until the group
/// has settled: every member joined, the partitions spread evenly (the broker's assignor
/// keeps holdings within one of each other) with none being moved, and a position for
/// every lane of every partition held. Then each member commits where it starts (the
/// floor the broker keeps cached from) and pauses every lane: while the topic fills, its
/// fetcher takes at most its lane budgets (`lane_prefetch_bytes_max`).
async fn join_first(target: &Target, consumers: u32, topic: &TopicInfo) -> anyhow::Result<Vec<Consumer>> {
    let mut members = Vec::new();
    for index in 0..consumers {
        let mut consumer = Consumer::connect(consumer_config(target, index)).await?;
        consumer.subscribe(group_config())?;
        members.push(consumer);
    }
    let (partitions, lanes) = (topic.partitions as usize, topic.lanes.len());
    let deadline = Instant::now() + JOIN_WAIT;
    loop {
        for member in &mut members {
            // The topic is empty: this follows the group and nothing else.
            member.poll_timeout(Duration::from_millis(50)).await?;
        }
        let held: Vec<usize> = members.iter().map(|m| m.assignment().len()).collect();
        let (fewest, most) = (held.iter().min(), held.iter().max());
        let settled = held.iter().sum::<usize>() == partitions
            && most.zip(fewest).is_some_and(|(most, fewest)| most - fewest <= 1)
            && members.iter().all(|m| {
                m.member_id().is_some()
                    && m.revoking().is_empty()
                    && m.positions().len() == m.assignment().len() * lanes
            });
        if settled {
            break;
        }
        if Instant::now() >= deadline {
            bail!(
                "the group had not settled after {JOIN_WAIT:?}: members hold {held:?} of {partitions} partitions"
            );
        }
    }
    for member in &mut members {
        member.commit().await?;
        member.pause_lanes(&all_lanes());
    }
    Ok(members)
}
