//! `orders`: the order-fulfilment demo.
//!
//! Producers emit the events of many orders (placed, paid, packed, shipped; some orders
//! are cancelled after they are placed), keyed by order id, each order in its service
//! class's lane (express / standard / bulk: 10 / 70 / 20 %). A fulfilment group of
//! workers (the consumer library's `Worker`) handles them with simulated payment and
//! warehouse calls. Fulfilment is idempotent the way a real service makes it: each
//! order remembers the last event it applied, so a redelivered event changes nothing.
//!
//! At the end it checks that every order's events were applied in order, that no order
//! was lost (each reached shipped or cancelled), and that no event took effect twice;
//! and reports latency (send to handled) and throughput per lane. `--kill-worker-after-s`
//! stops one worker without a goodbye mid-run: its partitions move to the others, which
//! redo only what it had not committed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::bail;
use bytes::Bytes;
use lanes_consumer::{ConsumerRecord, Worker, WorkerConfig};
use lanes_producer::{LaneSelector, Producer, ProducerRecord};
use serde_json::json;

use crate::latency::Latencies;
use crate::machine::MachineWatch;
use crate::report::{Common, LaneReport, Report, progress};
use crate::target::Target;

const TOPIC: &str = "orders";
const GROUP: &str = "fulfilment";
const CLASSES: [&str; 3] = ["express", "standard", "bulk"];
const EVENTS: [&str; 4] = ["placed", "paid", "packed", "shipped"];
const CANCELLED: &str = "cancelled";

/// Settings of the demo.
#[derive(Clone, Debug)]
pub struct OrdersConfig {
    pub orders: u64,
    pub workers: usize,
    /// Events each worker handles at once.
    pub concurrency: usize,
    /// Of those, the slots only express events may take (`None`: the worker's default).
    pub urgent_slots_reserved: Option<usize>,
    /// What a payment or warehouse call costs (a sleep).
    pub call: Duration,
    /// One order in this many is cancelled after it is placed.
    pub cancel_one_in: u64,
    /// Stop one worker abruptly after this long.
    pub kill_worker_after: Option<Duration>,
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// An order's class: 10 % express, 70 % standard, 20 % bulk (fixed by its id).
fn class_of(order: u64) -> usize {
    match order.wrapping_mul(2_654_435_761) % 10 {
        0 => 0,
        1..=7 => 1,
        _ => 2,
    }
}

/// The events of an order, in order.
fn events_of(order: u64, cancel_one_in: u64) -> &'static [&'static str] {
    if cancel_one_in > 0 && order % cancel_one_in == cancel_one_in - 1 {
        &["placed", CANCELLED]
    } else {
        &EVENTS
    }
}

/// The fulfilment service's state: per order, the events applied so far.
#[derive(Debug, Default)]
struct Fulfilment {
    applied: HashMap<u64, u32>,
    /// Events handled again after they took effect (redeliveries), ignored.
    redelivered: u64,
    /// Events that arrived before an earlier event of their order: must stay 0.
    out_of_order: u64,
    /// The outside world's ledger: per (order, event number), how many times its call
    /// (charge, pick, ship, refund) was made. More than once is an order fulfilled twice.
    effects: HashMap<(u64, u32), u32>,
}

#[derive(Debug, Default)]
struct LaneStats {
    latencies: Latencies,
    events: AtomicU64,
    bytes: AtomicU64,
}

pub async fn run(target: &Target, common: &Common, config: &OrdersConfig) -> anyhow::Result<Report> {
    target.fresh_topic(TOPIC, common.partitions, &CLASSES).await?;
    let fulfilment = Arc::new(Mutex::new(Fulfilment::default()));
    let lanes: Arc<[LaneStats; 3]> = Arc::new(Default::default());
    let total_events: u64 = (0..config.orders)
        .map(|o| events_of(o, config.cancel_one_in).len() as u64)
        .sum();
    let bar = progress(Some(total_events), "orders");

    let handler = {
        let (fulfilment, lanes, call, bar) = (
            Arc::clone(&fulfilment),
            Arc::clone(&lanes),
            config.call,
            bar.clone(),
        );
        move |record: ConsumerRecord| {
            let (fulfilment, lanes, bar) = (Arc::clone(&fulfilment), Arc::clone(&lanes), bar.clone());
            async move {
                let text = std::str::from_utf8(&record.value).map_err(|e| e.to_string())?;
                // order,sequence,event,sent_ns
                let mut fields = text.split(',');
                let mut field = || fields.next().ok_or_else(|| format!("malformed event {text:?}"));
                let order: u64 = field()?.parse().map_err(|_| "bad order id".to_owned())?;
                let sequence: u32 = field()?.parse().map_err(|_| "bad sequence".to_owned())?;
                let event = field()?.to_owned();
                let sent_ns: u64 = field()?.parse().map_err(|_| "bad time".to_owned())?;
                // Idempotence, as a real service does it: an event already applied is
                // not applied again.
                {
                    let mut fulfilment = fulfilment.lock().expect("fulfilment lock poisoned");
                    let applied = *fulfilment.applied.entry(order).or_insert(0);
                    if sequence < applied {
                        fulfilment.redelivered += 1;
                        return Ok(());
                    }
                    if sequence > applied {
                        fulfilment.out_of_order += 1;
                        return Err(format!("order {order}: event {sequence} before {applied}"));
                    }
                }
                // The outside world: charge the card, ask the warehouse, refund.
                match event.as_str() {
                    "paid" | "packed" | "shipped" | CANCELLED => tokio::time::sleep(call).await,
                    _ => {}
                }
                {
                    let mut fulfilment = fulfilment.lock().expect("fulfilment lock poisoned");
                    *fulfilment.effects.entry((order, sequence)).or_insert(0) += 1;
                    let applied = fulfilment.applied.entry(order).or_insert(0);
                    *applied = (*applied).max(sequence + 1);
                }
                let lane = &lanes[record.lane.0 as usize % 3];
                lane.latencies
                    .record(Duration::from_nanos(now_ns().saturating_sub(sent_ns)));
                lane.events.fetch_add(1, Ordering::Relaxed);
                lane.bytes.fetch_add(record.value.len() as u64, Ordering::Relaxed);
                bar.inc(1);
                Ok::<(), String>(())
            }
        }
    };

    // The fulfilment group.
    let mut workers = Vec::new();
    for index in 0..config.workers.max(1) {
        let mut worker_config = WorkerConfig::new(&target.address, GROUP, &[TOPIC]);
        worker_config.consumer.client_id = format!("fulfilment-{index}");
        worker_config.group.session_timeout = Duration::from_secs(3);
        worker_config.retries_max = 0; // an out-of-order event is a bug: show it
        worker_config.urgent_slots_reserved = config.urgent_slots_reserved;
        let worker = Worker::connect(worker_config).await?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = crate::spawn_scoped(worker.run_until(handler.clone(), config.concurrency, async move {
            let _ = stopped.await;
        }));
        workers.push((stop, task));
    }
    // The demo shows the group at work, not the rebalance that spreads it.
    target
        .settled_group(GROUP, workers.len(), common.partitions)
        .await?;

    // The shop: each producer places its share of the orders, events in order.
    let started = Instant::now();
    let machine = MachineWatch::start();
    let producers = common.producers.max(1) as u64;
    let mut shops = Vec::new();
    for index in 0..producers {
        let producer_config = common.producer_config(&target.address, format!("shop-{index}"));
        let (orders, cancel_one_in, rate) = (config.orders, config.cancel_one_in, common.rate);
        shops.push(crate::spawn_scoped(async move {
            let producer = Producer::connect(producer_config).await?;
            let mine: Vec<u64> = (index..orders).step_by(producers as usize).collect();
            let shop_started = Instant::now();
            let mut sent = 0u64;
            // Orders progress side by side: round after round, each open order gets its
            // next event.
            let mut next = vec![0usize; mine.len()];
            loop {
                let mut any = false;
                for (i, &order) in mine.iter().enumerate() {
                    let events = events_of(order, cancel_one_in);
                    let Some(event) = events.get(next[i]) else {
                        continue;
                    };
                    if let Some(rate) = rate {
                        while sent as f64
                            >= shop_started.elapsed().as_secs_f64() * rate as f64 / producers as f64
                        {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                    let value = format!("{order},{},{event},{}", next[i], now_ns());
                    let record = ProducerRecord::new(TOPIC, Bytes::from(value))
                        .key(format!("order-{order}"))
                        .lane(LaneSelector::Name(CLASSES[class_of(order)].into()));
                    producer.send(record).await?;
                    next[i] += 1;
                    sent += 1;
                    any = true;
                }
                if !any {
                    break;
                }
            }
            producer.close().await?;
            Ok::<u64, anyhow::Error>(sent)
        }));
    }

    // Optionally, a worker dies mid-run.
    if let Some(after) = config.kill_worker_after
        && workers.len() > 1
    {
        tokio::time::sleep(after).await;
        let (stop, task) = workers.remove(0);
        task.abort();
        drop(stop);
        eprintln!("lanes-bench: orders: killed a worker after {after:?}; its partitions move to the others");
    }
    let mut sent = 0;
    for shop in shops {
        sent += shop.await??;
    }
    // Every event is applied (or the wait gives up and they count as lost).
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let applied: u64 = lanes.iter().map(|l| l.events.load(Ordering::Relaxed)).sum();
        let out_of_order = fulfilment.lock().expect("fulfilment lock poisoned").out_of_order;
        if applied >= sent || Instant::now() > deadline || out_of_order > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let machine_cpu = machine.finish();
    for (stop, task) in workers {
        let _ = stop.send(());
        if let Err(error) = task.await? {
            tracing::warn!(%error, "a worker ended with an error");
        }
    }
    bar.finish_and_clear();

    let fulfilment = fulfilment.lock().expect("fulfilment lock poisoned");
    let complete = (0..config.orders)
        .filter(|order| {
            fulfilment.applied.get(order).copied().unwrap_or(0) as usize
                == events_of(*order, config.cancel_one_in).len()
        })
        .count() as u64;
    let applied: u64 = lanes.iter().map(|l| l.events.load(Ordering::Relaxed)).sum();
    if fulfilment.out_of_order > 0 {
        bail!("{} events were applied out of order", fulfilment.out_of_order);
    }
    let mut report = Report {
        scenario: "orders",
        records: applied,
        bytes: lanes.iter().map(|l| l.bytes.load(Ordering::Relaxed)).sum(),
        seconds,
        latency: None,
        errors: 0,
        lost: Some(config.orders - complete),
        duplicates: Some(fulfilment.effects.values().filter(|count| **count > 1).count() as u64),
        lanes: CLASSES
            .iter()
            .zip(lanes.iter())
            .map(|(name, lane)| LaneReport {
                lane: (*name).to_owned(),
                records: lane.events.load(Ordering::Relaxed),
                latency: Some(lane.latencies.summary()),
            })
            .collect(),
        machine_cpu,
        extra: serde_json::Map::new(),
    };
    report.extra.insert("orders".into(), json!(config.orders));
    report.extra.insert("orders_complete".into(), json!(complete));
    report.extra.insert("events_sent".into(), json!(sent));
    report
        .extra
        .insert("events_in_order".into(), json!(fulfilment.out_of_order == 0));
    report
        .extra
        .insert("redelivered_and_ignored".into(), json!(fulfilment.redelivered));
    report.extra.insert("workers".into(), json!(config.workers));
    if complete != config.orders || applied != sent {
        bail!(
            "{} of {} orders complete, {applied} of {sent} events applied",
            complete,
            config.orders
        );
    }
    Ok(report)
}
