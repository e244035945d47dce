//! `lanes`: does an express order wait behind a bulk backlog?
//!
//! One consumer group (one [`Worker`], a fixed handler cost per record) drains a topic
//! while express records arrive at a steady rate; their latency runs from the moment the
//! producer sends them to the end of their handling. Four phases, each on a fresh topic
//! and group:
//!
//! 1. `idle`: no backlog: the express latency floor.
//! 2. `backlog`: `backlog` bulk records wait in the bulk lane when express starts.
//! 3. `fifo`: the same on a topic with one lane (what a Kafka partition gives): express
//!    records queue behind the backlog.
//! 4. `saturated`: backlogs in both express and bulk: bulk's share of what is handled,
//!    beside the share its weight gives it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use bytes::{BufMut, Bytes, BytesMut};
use lanes_consumer::{ConsumerRecord, Worker, WorkerConfig};
use lanes_producer::{LaneSelector, Producer, ProducerConfig, ProducerRecord};
use lanes_protocol::Lane;
use serde_json::{Value, json};

use crate::latency::{Latencies, Summary, round};
use crate::machine::{CpuShares, MachineWatch};
use crate::target::Target;

/// Settings of the scenario.
#[derive(Clone, Debug)]
pub struct LanesConfig {
    /// Bulk records waiting when the `backlog` and `fifo` phases start.
    pub backlog: u64,
    pub record_bytes: usize,
    pub partitions: u32,
    /// Express records per second during a phase's window.
    pub express_rate: u32,
    /// How long express records are sent in each phase.
    pub window: Duration,
    /// What handling one record costs (a sleep).
    pub handler: Duration,
    /// Records the worker handles at once.
    pub concurrency: usize,
    /// Of those, the slots only express records may take (`None`: the worker's default).
    pub urgent_slots_reserved: Option<usize>,
}

/// What the scenario measured.
#[derive(Clone, Debug)]
pub struct LanesReport {
    pub config: LanesConfig,
    pub idle: Summary,
    pub backlog: Summary,
    pub fifo: Summary,
    /// Bulk records handled per second during the backlog phase's window.
    pub bulk_per_s_backlog: f64,
    /// Bulk's share of the records handled while express was saturated.
    pub bulk_share_pct: f64,
    /// The share the lane weights give bulk beside express.
    pub bulk_weighted_share_pct: f64,
    pub records: u64,
    pub seconds: f64,
    /// What the machine's CPUs did over the whole run (Linux only).
    pub machine_cpu: Option<CpuShares>,
}

const EXPRESS: u8 = b'E';
const PREFILLED_EXPRESS: u8 = b'P';
const BULK: u8 = b'B';
/// Value layout: a tag byte, the send time (ns since the Unix epoch), padding.
const HEADER_BYTES: usize = 9;

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn value(tag: u8, record_bytes: usize) -> Bytes {
    let mut value = BytesMut::with_capacity(record_bytes.max(HEADER_BYTES));
    value.put_u8(tag);
    value.put_u64(now_ns());
    value.resize(record_bytes.max(HEADER_BYTES), b'.');
    value.freeze()
}

/// Counters one phase's handler updates.
#[derive(Debug, Default)]
struct Handled {
    express: Latencies,
    express_count: AtomicU64,
    prefilled_express: AtomicU64,
    bulk: AtomicU64,
}

impl Handled {
    fn total(&self) -> u64 {
        self.express_count.load(Ordering::Relaxed)
            + self.prefilled_express.load(Ordering::Relaxed)
            + self.bulk.load(Ordering::Relaxed)
    }
}

/// One phase: what to put in the topic first, and what to measure.
struct Phase {
    name: &'static str,
    lanes: &'static [&'static str],
    express_lane: u8,
    bulk_lane: u8,
    prefill_express: u64,
    prefill_bulk: u64,
    /// Send express records at the configured rate for the window.
    send_express: bool,
}

/// What one phase measured.
struct PhaseResult {
    express: Summary,
    /// Per second of the window.
    bulk_per_s: f64,
    /// Handled during the window.
    window_express: u64,
    window_bulk: u64,
    records: u64,
}

pub async fn run(
    target: &Target,
    config: &LanesConfig,
    progress: &(dyn Fn(&str) + Sync),
) -> anyhow::Result<LanesReport> {
    let started = Instant::now();
    let machine = MachineWatch::start();
    let three = &["express", "standard", "bulk"][..];
    let phases = [
        Phase {
            name: "idle",
            lanes: three,
            express_lane: 0,
            bulk_lane: 2,
            prefill_express: 0,
            prefill_bulk: 0,
            send_express: true,
        },
        Phase {
            name: "backlog",
            lanes: three,
            express_lane: 0,
            bulk_lane: 2,
            prefill_express: 0,
            prefill_bulk: config.backlog,
            send_express: true,
        },
        Phase {
            name: "fifo",
            lanes: &["fifo"],
            express_lane: 0,
            bulk_lane: 0,
            prefill_express: 0,
            prefill_bulk: config.backlog,
            send_express: true,
        },
        Phase {
            name: "saturated",
            lanes: three,
            express_lane: 0,
            bulk_lane: 2,
            prefill_express: (config.backlog / 4).max(5000),
            prefill_bulk: (config.backlog / 4).max(5000),
            send_express: false,
        },
    ];
    let mut results = Vec::new();
    for phase in &phases {
        results.push(run_phase(target, config, phase, progress).await?);
    }
    let [idle, backlog, fifo, saturated] =
        <[PhaseResult; 4]>::try_from(results).map_err(|_| anyhow::anyhow!("four phases"))?;
    let saturated_total = saturated.window_express + saturated.window_bulk;
    let weights = lanes_broker::scheduler::default_weights(3);
    let (express_weight, bulk_weight) = (f64::from(weights[0]), f64::from(weights[2]));
    Ok(LanesReport {
        config: config.clone(),
        idle: idle.express,
        backlog: backlog.express,
        fifo: fifo.express,
        bulk_per_s_backlog: backlog.bulk_per_s,
        bulk_share_pct: if saturated_total == 0 {
            0.0
        } else {
            100.0 * saturated.window_bulk as f64 / saturated_total as f64
        },
        bulk_weighted_share_pct: 100.0 * bulk_weight / (express_weight + bulk_weight),
        records: idle.records + backlog.records + fifo.records + saturated.records,
        seconds: started.elapsed().as_secs_f64(),
        machine_cpu: machine.finish(),
    })
}

async fn run_phase(
    target: &Target,
    config: &LanesConfig,
    phase: &Phase,
    progress: &(dyn Fn(&str) + Sync),
) -> anyhow::Result<PhaseResult> {
    let topic = format!("lanes-bench-{}", phase.name);
    let group = format!("lanes-bench-{}", phase.name);
    target.fresh_topic(&topic, config.partitions, phase.lanes).await?;
    if phase.prefill_express + phase.prefill_bulk > 0 {
        progress(&format!(
            "{}: filling {} express and {} bulk records",
            phase.name, phase.prefill_express, phase.prefill_bulk
        ));
        prefill(target, config, phase, &topic).await?;
    }

    // The worker: a fixed cost per record, then the bookkeeping.
    let handled = Arc::new(Handled::default());
    let handler = {
        let handled = Arc::clone(&handled);
        let cost = config.handler;
        move |record: ConsumerRecord| {
            let handled = Arc::clone(&handled);
            async move {
                tokio::time::sleep(cost).await;
                let (tag, sent_ns) = match record.value.get(..HEADER_BYTES) {
                    Some(header) => (
                        header[0],
                        u64::from_be_bytes(header[1..9].try_into().expect("8 bytes")),
                    ),
                    None => (0, 0),
                };
                match tag {
                    EXPRESS => {
                        handled
                            .express
                            .record(Duration::from_nanos(now_ns().saturating_sub(sent_ns)));
                        handled.express_count.fetch_add(1, Ordering::Relaxed);
                    }
                    PREFILLED_EXPRESS => {
                        handled.prefilled_express.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        handled.bulk.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok::<(), String>(())
            }
        }
    };
    let mut worker_config = WorkerConfig::new(&target.address, group.clone(), &[topic.as_str()]);
    worker_config.urgent_slots_reserved = config.urgent_slots_reserved;
    worker_config.consumer.client_id = format!("lanes-bench-{}", phase.name);
    let worker = Worker::connect(worker_config).await?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = crate::spawn_scoped(worker.run_until(handler, config.concurrency, async move {
        let _ = stopped.await;
    }));
    target.settled_group(&group, 1, config.partitions).await?;
    // Warm up: the pipeline is full (and, with both lanes filled, both flow) before
    // anything is measured.
    let prefilled = phase.prefill_express + phase.prefill_bulk;
    let warm = prefilled.min(1000);
    let bulk_warm = if phase.prefill_express > 0 {
        phase.prefill_bulk.min(10)
    } else {
        0
    };
    wait_until(Duration::from_secs(600), || {
        handled.total() >= warm && handled.bulk.load(Ordering::Relaxed) >= bulk_warm
    })
    .await
    .context("warming up")?;

    let window_start = Instant::now();
    let (bulk_before, express_before) = (
        handled.bulk.load(Ordering::Relaxed),
        handled.prefilled_express.load(Ordering::Relaxed),
    );
    let sent = if phase.send_express {
        progress(&format!(
            "{}: {} express records/s for {:.0} s",
            phase.name,
            config.express_rate,
            config.window.as_secs_f64()
        ));
        send_express(target, config, phase, &topic).await?
    } else {
        // Only while express is still backlogged: stop early once 90% of it is handled.
        progress(&format!(
            "{}: measuring for up to {:.0} s, while express is backlogged",
            phase.name,
            config.window.as_secs_f64()
        ));
        let nearly_drained = phase.prefill_express * 9 / 10;
        let _ = wait_until(config.window, || {
            handled.prefilled_express.load(Ordering::Relaxed) >= nearly_drained
        })
        .await;
        0
    };
    let window = window_start.elapsed().as_secs_f64();
    let window_bulk = handled.bulk.load(Ordering::Relaxed) - bulk_before;
    let window_express = handled.prefilled_express.load(Ordering::Relaxed) - express_before;
    if sent > 0 {
        progress(&format!("{}: waiting for the last express records", phase.name));
        // Behind a FIFO backlog that is the whole backlog: give it the time it needs.
        wait_until(Duration::from_secs(3600), || {
            handled.express_count.load(Ordering::Relaxed) >= sent
        })
        .await
        .context("waiting for the express records")?;
    }
    let _ = stop.send(());
    let stats = running.await?.context("the worker failed")?;
    if stats.dead_lettered > 0 {
        bail!("{} records were dead-lettered", stats.dead_lettered);
    }
    let express = handled.express.summary();
    progress(&format!(
        "{}: express p50 {:.2} ms, p99 {:.2} ms ({} records)",
        phase.name, express.p50_ms, express.p99_ms, express.count
    ));
    Ok(PhaseResult {
        express,
        bulk_per_s: window_bulk as f64 / window,
        window_express,
        window_bulk,
        records: handled.total(),
    })
}

/// Fills the phase's topic: express first (prefilled, not measured), then bulk.
async fn prefill(target: &Target, config: &LanesConfig, phase: &Phase, topic: &str) -> anyhow::Result<()> {
    let mut producer_config = ProducerConfig::new(&target.address);
    producer_config.client_id = "lanes-bench-fill".into();
    // Large batches: this is loading, not the measurement.
    producer_config.lane_linger = Vec::new();
    producer_config.batch_bytes_max = 256 * 1024;
    let producer = Producer::connect(producer_config).await?;
    for (count, lane, tag) in [
        (phase.prefill_express, phase.express_lane, PREFILLED_EXPRESS),
        (phase.prefill_bulk, phase.bulk_lane, BULK),
    ] {
        for i in 0..count {
            let record = ProducerRecord::new(topic, value(tag, config.record_bytes))
                .key(format!("order-{i}"))
                .lane(LaneSelector::Index(Lane(lane)));
            producer.send(record).await?;
        }
    }
    producer.close().await?;
    Ok(())
}

/// Sends express records at the configured rate for the window; returns how many.
async fn send_express(
    target: &Target,
    config: &LanesConfig,
    phase: &Phase,
    topic: &str,
) -> anyhow::Result<u64> {
    let mut producer_config = ProducerConfig::new(&target.address);
    producer_config.client_id = "lanes-bench-express".into();
    let producer = Producer::connect(producer_config).await?;
    let period = Duration::from_secs_f64(1.0 / f64::from(config.express_rate.max(1)));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let end = tokio::time::Instant::now() + config.window;
    let mut deliveries = Vec::new();
    let mut sent = 0u64;
    while tokio::time::Instant::now() < end {
        ticker.tick().await;
        let record = ProducerRecord::new(topic, value(EXPRESS, config.record_bytes))
            .key(format!("express-{sent}"))
            .lane(LaneSelector::Index(Lane(phase.express_lane)));
        deliveries.push(producer.send(record).await?);
        sent += 1;
    }
    for delivery in deliveries {
        delivery.wait().await?;
    }
    producer.close().await?;
    Ok(sent)
}

async fn wait_until(limit: Duration, condition: impl Fn() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while !condition() {
        if Instant::now() > deadline {
            bail!("gave up after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

impl LanesReport {
    /// The targets of the priority-lanes issue.
    pub fn backlog_within_5x_idle(&self) -> bool {
        self.backlog.p99_ms <= 5.0 * self.idle.p99_ms
    }

    pub fn fifo_over_100x_backlog(&self) -> bool {
        self.fifo.p99_ms >= 100.0 * self.backlog.p99_ms
    }

    /// At least its weighted share, within the 5% the scheduler is held to.
    pub fn bulk_gets_its_share(&self) -> bool {
        self.bulk_share_pct >= 0.95 * self.bulk_weighted_share_pct
    }

    pub fn to_json(&self) -> Value {
        let mut object = json!({
            "scenario": "lanes",
            "records": self.records,
            "seconds": round(self.seconds),
            "backlog_records": self.config.backlog,
            "record_bytes": self.config.record_bytes,
            "partitions": self.config.partitions,
            "express_rate": self.config.express_rate,
            "window_s": self.config.window.as_secs_f64(),
            "handler_us": self.config.handler.as_micros() as u64,
            "concurrency": self.config.concurrency,
            "urgent_slots_reserved": self.urgent_slots(),
            "express_p50_ms_idle": round(self.idle.p50_ms),
            "express_p99_ms_idle": round(self.idle.p99_ms),
            "express_p50_ms_backlog": round(self.backlog.p50_ms),
            "express_p99_ms_backlog": round(self.backlog.p99_ms),
            "express_p50_ms_fifo": round(self.fifo.p50_ms),
            "express_p99_ms_fifo": round(self.fifo.p99_ms),
            "bulk_share_pct": round(self.bulk_share_pct),
            "bulk_weighted_share_pct": round(self.bulk_weighted_share_pct),
            "bulk_records_per_s_backlog": self.bulk_per_s_backlog.round(),
            "latency_ms": {
                "idle": self.idle.to_json(),
                "backlog": self.backlog.to_json(),
                "fifo": self.fifo.to_json(),
            },
            "targets": {
                "backlog_p99_within_5x_idle": self.backlog_within_5x_idle(),
                "fifo_p99_over_100x_backlog": self.fifo_over_100x_backlog(),
                "bulk_share_at_least_weighted": self.bulk_gets_its_share(),
            },
            "errors": 0,
        });
        if let (Some(cpu), Some(map)) = (&self.machine_cpu, object.as_object_mut()) {
            cpu.insert_into(map);
        }
        object
    }

    /// The slots the worker kept for express records.
    pub fn urgent_slots(&self) -> usize {
        let mut config = WorkerConfig::new("", "", &[]);
        config.urgent_slots_reserved = self.config.urgent_slots_reserved;
        config.urgent_slots(self.config.concurrency)
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        let row = |name: &str, s: &Summary| {
            format!(
                "{name:<28} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>8}\n",
                s.p50_ms, s.p90_ms, s.p99_ms, s.max_ms, s.count
            )
        };
        let mut out = format!(
            "lanes: express latency (ms), {} bulk records of backlog, {} express/s, handler {} µs × {} ({} kept for express)\n\n",
            self.config.backlog,
            self.config.express_rate,
            self.config.handler.as_micros(),
            self.config.concurrency,
            self.urgent_slots()
        );
        out += &format!(
            "{:<28} {:>10} {:>10} {:>10} {:>10} {:>8}\n",
            "phase", "p50", "p90", "p99", "max", "records"
        );
        out += &row("idle (no backlog)", &self.idle);
        out += &row("backlog (3 lanes)", &self.backlog);
        out += &row("fifo (1 lane, same backlog)", &self.fifo);
        out += &format!(
            "\nbacklog p99 / idle p99: {:.1}× (target ≤ 5×)   fifo p99 / backlog p99: {:.0}× (target ≥ 100×)\n",
            self.backlog.p99_ms / self.idle.p99_ms.max(f64::MIN_POSITIVE),
            self.fifo.p99_ms / self.backlog.p99_ms.max(f64::MIN_POSITIVE)
        );
        out += &format!(
            "bulk while express is saturated: {:.1}% of records handled (its weight: {:.1}%); bulk during backlog: {:.0} records/s\n",
            self.bulk_share_pct, self.bulk_weighted_share_pct, self.bulk_per_s_backlog
        );
        if let Some(cpu) = &self.machine_cpu {
            out += &cpu.lines();
            out.push('\n');
        }
        out
    }
}
