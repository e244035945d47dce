//! What a scenario reports: one JSON object (`--json`) or a table, and the settings every
//! scenario shares.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Map, Value, json};

use crate::latency::{Summary, round};
use crate::machine::CpuShares;

/// How records are acknowledged, as the bench names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AcksArg {
    None,
    Written,
    Durable,
}

impl From<AcksArg> for lanes_protocol::messages::Acks {
    fn from(acks: AcksArg) -> Self {
        match acks {
            AcksArg::None => lanes_protocol::messages::Acks::None,
            AcksArg::Written => lanes_protocol::messages::Acks::Written,
            AcksArg::Durable => lanes_protocol::messages::Acks::Durable,
        }
    }
}

/// Settings every scenario takes.
#[derive(Clone, Debug, clap::Args)]
pub struct Common {
    /// Run against this broker (host:port) instead of an embedded one.
    #[arg(long, conflicts_with = "embedded")]
    pub broker: Option<String>,
    /// Run a broker in this process on a temp dir, removed afterwards, also after Ctrl-C
    /// (the default).
    #[arg(long)]
    pub embedded: bool,
    /// The embedded broker's fsync policy: always (group commit), interval or never.
    #[arg(long, default_value = "always")]
    pub fsync: lanes_broker::config::FsyncMode,
    /// Producers (each its own connection).
    #[arg(long, default_value_t = 1)]
    pub producers: usize,
    /// Consumers (each its own connection).
    #[arg(long, default_value_t = 1)]
    pub consumers: usize,
    /// Bytes per record value.
    #[arg(long, default_value_t = 1024)]
    pub record_bytes: usize,
    /// Largest batch a producer builds (bytes).
    #[arg(long, default_value_t = 256 * 1024)]
    pub batch_bytes: u32,
    #[arg(long, default_value_t = 4)]
    pub partitions: u32,
    #[arg(long, value_enum, default_value_t = AcksArg::Durable)]
    pub acks: AcksArg,
    /// How long a producer's batch waits for more records (lane 0 never waits).
    #[arg(long, default_value_t = 0)]
    pub linger_ms: u64,
    /// Records to send (default 1,000,000 unless --duration-s is given).
    #[arg(long)]
    pub count: Option<u64>,
    /// Send for this long instead of a count.
    #[arg(long, visible_alias = "duration")]
    pub duration_s: Option<u64>,
    /// Records per second over all producers (open loop); default: as fast as possible.
    #[arg(long)]
    pub rate: Option<u64>,
    /// Seconds of unmeasured traffic first.
    #[arg(long, default_value_t = 1)]
    pub warmup_s: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl Common {
    /// A producer configured by these settings.
    pub fn producer_config(&self, address: &str, client_id: String) -> lanes_producer::ProducerConfig {
        let mut config = lanes_producer::ProducerConfig::new(address);
        config.client_id = client_id;
        config.acks = self.acks.into();
        config.batch_bytes_max = self.batch_bytes;
        config.linger = Duration::from_millis(self.linger_ms);
        config
    }

    /// The count to send when bounded by count (and the default).
    pub fn count_or_default(&self) -> Option<u64> {
        match (self.count, self.duration_s) {
            (Some(count), _) => Some(count),
            (None, Some(_)) => None,
            (None, None) => Some(1_000_000),
        }
    }
}

/// One lane's figures, where lanes matter.
#[derive(Clone, Debug)]
pub struct LaneReport {
    pub lane: String,
    pub records: u64,
    pub latency: Option<Summary>,
}

/// What a scenario measured.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub scenario: &'static str,
    pub records: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub latency: Option<Summary>,
    pub errors: u64,
    pub lost: Option<u64>,
    pub duplicates: Option<u64>,
    pub lanes: Vec<LaneReport>,
    /// What the machine's CPUs did over the measured time (Linux only).
    pub machine_cpu: Option<CpuShares>,
    /// Scenario-specific figures, shown as they are.
    pub extra: Map<String, Value>,
}

impl Report {
    pub fn msgs_per_s(&self) -> f64 {
        self.records as f64 / self.seconds.max(f64::MIN_POSITIVE)
    }

    pub fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.seconds.max(f64::MIN_POSITIVE)
    }

    pub fn to_json(&self) -> Value {
        let mut object = json!({
            "scenario": self.scenario,
            "records": self.records,
            "bytes": self.bytes,
            "seconds": round(self.seconds),
            "msgs_per_s": self.msgs_per_s().round(),
            "mb_per_s": round(self.mb_per_s()),
            "latency_ms": self.latency.map_or(Value::Null, Summary::to_json),
            "errors": self.errors,
            "peak_rss_mib": peak_rss_mib(),
            "peak_anon_mib": MEMORY.peak_anon_mib(),
        });
        let map = object.as_object_mut().expect("an object");
        if let Some(lost) = self.lost {
            map.insert("lost".into(), json!(lost));
        }
        if let Some(duplicates) = self.duplicates {
            map.insert("duplicates".into(), json!(duplicates));
        }
        if !self.lanes.is_empty() {
            let lanes: Map<String, Value> = self
                .lanes
                .iter()
                .map(|lane| {
                    (
                        lane.lane.clone(),
                        json!({
                            "records": lane.records,
                            "latency_ms": lane.latency.map_or(Value::Null, Summary::to_json),
                        }),
                    )
                })
                .collect();
            map.insert("lanes".into(), Value::Object(lanes));
        }
        if let Some(cpu) = &self.machine_cpu {
            cpu.insert_into(map);
        }
        for (key, value) in &self.extra {
            map.insert(key.clone(), value.clone());
        }
        object
    }

    pub fn table(&self) -> String {
        let mut out = format!(
            "{}: {} records, {:.1} MB in {:.2} s: {:.0} records/s, {:.1} MB/s, {} errors\n",
            self.scenario,
            self.records,
            self.bytes as f64 / 1e6,
            self.seconds,
            self.msgs_per_s(),
            self.mb_per_s(),
            self.errors
        );
        let header = format!(
            "{:<12} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}\n",
            "latency ms", "p50", "p90", "p99", "p99.9", "max", "records"
        );
        let row = |name: &str, s: &Summary| {
            format!(
                "{name:<12} {:>10.3} {:>10.3} {:>10.3} {:>10.3} {:>10.3} {:>10}\n",
                s.p50_ms, s.p90_ms, s.p99_ms, s.p999_ms, s.max_ms, s.count
            )
        };
        if self.latency.is_some() || self.lanes.iter().any(|l| l.latency.is_some()) {
            out += &header;
        }
        if let Some(latency) = &self.latency {
            out += &row("all", latency);
        }
        for lane in &self.lanes {
            if let Some(latency) = &lane.latency {
                out += &row(&lane.lane, latency);
            }
        }
        if let Some(rss) = peak_rss_mib() {
            out += &format!(
                "peak memory of this process (with an embedded broker): {:.0} MiB anonymous, {rss:.0} MiB resident with mapped log pages\n",
                MEMORY.peak_anon_mib().unwrap_or(0.0)
            );
        }
        if let Some(cpu) = &self.machine_cpu {
            out += &cpu.lines();
            out.push('\n');
        }
        if let Some(lost) = self.lost {
            out += &format!("lost: {lost}\n");
        }
        if let Some(duplicates) = self.duplicates {
            out += &format!("duplicates: {duplicates}\n");
        }
        for (key, value) in &self.extra {
            out += &format!("{key}: {value}\n");
        }
        out
    }
}

/// This process's peak resident memory (VmHWM), which includes an embedded broker. It
/// counts the pages of mapped segments that reads touched (page cache the kernel can
/// drop), so [`MEMORY`]'s anonymous peak is the figure for memory the process holds.
pub fn peak_rss_mib() -> Option<f64> {
    status_mib("VmHWM:")
}

fn status_mib(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with(field))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some((kib / 1024.0 * 10.0).round() / 10.0)
}

/// The kernel keeps no peak of anonymous memory (heap, stacks, buffers), so a thread
/// samples it every 50 ms from the first use on.
pub static MEMORY: MemorySampler = MemorySampler {
    peak_anon_kib: std::sync::atomic::AtomicU64::new(0),
    started: std::sync::Once::new(),
};

#[derive(Debug)]
pub struct MemorySampler {
    peak_anon_kib: std::sync::atomic::AtomicU64,
    started: std::sync::Once,
}

impl MemorySampler {
    /// Starts sampling (once per process).
    pub fn start(&'static self) {
        self.started.call_once(|| {
            let spawned = std::thread::Builder::new()
                .name("memory-sampler".into())
                .spawn(move || {
                    loop {
                        self.sample();
                        std::thread::sleep(Duration::from_millis(50));
                    }
                });
            if let Err(error) = spawned {
                tracing::warn!(%error, "cannot sample memory");
            }
        });
    }

    fn sample(&self) {
        if let Some(mib) = status_mib("RssAnon:") {
            let kib = (mib * 1024.0) as u64;
            self.peak_anon_kib
                .fetch_max(kib, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The highest anonymous resident memory seen, including now.
    pub fn peak_anon_mib(&self) -> Option<f64> {
        self.sample();
        let kib = self.peak_anon_kib.load(std::sync::atomic::Ordering::Relaxed);
        (kib > 0).then(|| (kib as f64 / 1024.0 * 10.0).round() / 10.0)
    }
}

/// A progress bar on stderr when stdout is a terminal (so `--json | jq` stays clean).
pub fn progress(total: Option<u64>, message: &str) -> ProgressBar {
    if !std::io::stdout().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = match total {
        Some(total) => ProgressBar::new(total).with_style(
            ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} {per_sec} eta {eta}")
                .expect("a valid template")
                .progress_chars("=> "),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{msg} {spinner} {pos} {per_sec}").expect("a valid template"),
        ),
    };
    bar.set_message(message.to_owned());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}
