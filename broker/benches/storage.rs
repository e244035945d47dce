//! Storage engine throughput: appends of 64 KiB batches of 1 KiB records under each
//! fsync policy, beside a plain file written with the same bytes and fsync pattern; and
//! reads from a warm log, beside one memcpy of the same bytes.
//!
//! Run: `cargo bench -p lanes-broker --bench storage` (see docs/BENCHMARKS.md).
//! Every sample appends into a fresh temp directory that is deleted afterwards, so the
//! page cache is not flushed to disk in the middle of a run.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use lanes_broker::storage::{FsyncPolicy, LaneLog, LogConfig};
use lanes_protocol::record_batch::ProducerStamp;
use lanes_protocol::{BatchLimits, Offset, RecordBatchBuilder};

const RECORD_BYTES: usize = 1024;
const BATCH_BYTES: usize = 64 * 1024;
const FSYNC_INTERVAL: Duration = Duration::from_millis(10);

/// One batch of 1 KiB records filling (almost) 64 KiB.
fn batch() -> BytesMut {
    let limits = BatchLimits {
        batch_bytes_max: BATCH_BYTES as u32,
        batch_records_max: 1 << 16,
    };
    let mut builder = RecordBatchBuilder::new(limits);
    let value = vec![b'x'; RECORD_BYTES];
    let mut key = 0u64;
    while builder
        .push(1_700_000_000_000, Some(&key.to_be_bytes()), &value, &[])
        .is_ok()
    {
        key += 1;
    }
    BytesMut::from(&builder.finish(ProducerStamp::NONE)[..])
}

fn config(fsync: FsyncPolicy) -> LogConfig {
    LogConfig {
        fsync,
        retention_ms: None,
        ..LogConfig::default()
    }
}

#[derive(Clone, Copy, Debug)]
enum Policy {
    Never,
    Interval,
    Always,
}

impl Policy {
    fn name(self) -> &'static str {
        match self {
            Policy::Never => "never",
            Policy::Interval => "interval_10ms",
            Policy::Always => "always",
        }
    }

    fn storage(self) -> FsyncPolicy {
        match self {
            Policy::Never => FsyncPolicy::Never,
            Policy::Interval => FsyncPolicy::Interval(FSYNC_INTERVAL),
            Policy::Always => FsyncPolicy::Always,
        }
    }
}

fn append_lane_log(dir: &Path, policy: Policy, batch: &mut BytesMut, count: u64) -> Duration {
    let log = LaneLog::open(dir.join("lane"), config(policy.storage())).unwrap();
    let started = Instant::now();
    for _ in 0..count {
        log.append(batch).unwrap();
        match policy {
            Policy::Never => {}
            Policy::Interval => {
                if log.fsync_due(Instant::now()) {
                    log.flush().unwrap();
                }
            }
            Policy::Always => {
                log.flush().unwrap();
            }
        }
    }
    started.elapsed()
}

fn append_plain_file(dir: &Path, policy: Policy, batch: &[u8], count: u64) -> Duration {
    let mut file = File::create(dir.join("plain.log")).unwrap();
    let started = Instant::now();
    let mut last_sync = started;
    for _ in 0..count {
        file.write_all(batch).unwrap();
        match policy {
            Policy::Never => {}
            Policy::Interval => {
                if last_sync.elapsed() >= FSYNC_INTERVAL {
                    file.sync_data().unwrap();
                    last_sync = Instant::now();
                }
            }
            Policy::Always => file.sync_data().unwrap(),
        }
    }
    started.elapsed()
}

fn appends(c: &mut Criterion) {
    let mut group = c.benchmark_group("append_64KiB_batches_of_1KiB_records");
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let mut batch = batch();
    group.throughput(Throughput::Bytes(batch.len() as u64));
    for policy in [Policy::Never, Policy::Interval, Policy::Always] {
        group.bench_function(BenchmarkId::new("lane_log", policy.name()), |b| {
            b.iter_custom(|count| {
                let dir = tempfile::tempdir_in(bench_dir()).unwrap();
                append_lane_log(dir.path(), policy, &mut batch, count)
            })
        });
        let bytes = batch.clone();
        group.bench_function(BenchmarkId::new("plain_file", policy.name()), |b| {
            b.iter_custom(|count| {
                let dir = tempfile::tempdir_in(bench_dir()).unwrap();
                append_plain_file(dir.path(), policy, &bytes, count)
            })
        });
    }
    group.finish();
}

fn reads(c: &mut Criterion) {
    const LOG_BYTES: usize = 256 << 20;
    const READ_BYTES_MAX: usize = 1 << 20;
    let dir = tempfile::tempdir_in(bench_dir()).unwrap();
    let log = LaneLog::open(dir.path().join("lane"), config(FsyncPolicy::Never)).unwrap();
    let mut batch = batch();
    while (log.next_offset().0 as usize) * RECORD_BYTES < LOG_BYTES {
        log.append(&mut batch).unwrap();
    }
    let end = log.next_offset();
    let total: usize = read_whole_log(&log, end, READ_BYTES_MAX, |_| {});

    let mut group = c.benchmark_group("read_warm_log_1MiB_per_read");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Bytes(total as u64));
    group.bench_function("lane_log_read", |b| {
        b.iter(|| read_whole_log(&log, end, READ_BYTES_MAX, |_| {}))
    });
    let mut target = vec![0u8; READ_BYTES_MAX + BATCH_BYTES];
    group.bench_function("lane_log_read_then_memcpy", |b| {
        b.iter(|| {
            read_whole_log(&log, end, READ_BYTES_MAX, |bytes| {
                target[..bytes.len()].copy_from_slice(bytes);
                std::hint::black_box(&target);
            })
        })
    });
    group.finish();
}

/// Reads the whole log in `bytes_max` reads, handing each slice to `visit`; returns
/// the bytes read.
fn read_whole_log(log: &LaneLog, end: Offset, bytes_max: usize, mut visit: impl FnMut(&[u8])) -> usize {
    let (mut offset, mut total) = (Offset(0), 0);
    while offset < end {
        let slice = log.read(offset, bytes_max, end).unwrap();
        visit(&slice.bytes);
        total += slice.bytes.len();
        offset = slice.next_offset;
    }
    total
}

/// Where benchmark files go: `LANES_BENCH_DIR`, or the target directory, so that they
/// land on the same disk as a broker's data would (not a tmpfs).
fn bench_dir() -> std::path::PathBuf {
    let dir = std::env::var_os("LANES_BENCH_DIR")
        .map(Into::into)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-data"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

criterion_group!(benches, appends, reads);
criterion_main!(benches);
