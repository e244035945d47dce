//! Random sequences of append / retry / flush / read / retention / reopen / crash
//! against an in-memory model, under a random fsync policy. A crash drops the log
//! without closing it and then damages what lies after the durable point on disk: cuts
//! a file at a random byte, zero-fills or garbles the rest of it, may empty the
//! segments after it, and may lose the checkpoint file.
//!
//! Invariants: every durable record reads back, in order, exactly once; the log after a
//! crash is a prefix of what was appended; no read returns a batch whose checksum
//! fails; a retried idempotent batch gets its original offsets.

mod support;

use std::fs::{self, OpenOptions};
use std::path::Path;

use bytes::BytesMut;
use std::time::Duration;

use lanes_broker::storage::{FsyncPolicy, LaneLog, LogConfig};
use lanes_protocol::Offset;
use lanes_protocol::record_batch::ProducerStamp;
use proptest::prelude::*;
use support::*;

const PRODUCER_ID: i64 = 7;

#[derive(Clone, Debug)]
enum Op {
    Append {
        records: usize,
        len: usize,
        idempotent: bool,
    },
    Retry,
    Flush,
    Read {
        from: u16,
        bytes_max: u16,
    },
    Retention,
    Reopen,
    Crash {
        at: u16,
        damage: Damage,
        empty_later: bool,
        lose_checkpoint: bool,
    },
}

#[derive(Clone, Copy, Debug)]
enum Damage {
    Cut,
    Zeros,
    Garbage,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (1usize..5, 0usize..400, any::<bool>())
            .prop_map(|(records, len, idempotent)| Op::Append { records, len, idempotent }),
        1 => Just(Op::Retry),
        2 => Just(Op::Flush),
        2 => (any::<u16>(), 1u16..5000).prop_map(|(from, bytes_max)| Op::Read { from, bytes_max }),
        1 => Just(Op::Retention),
        1 => Just(Op::Reopen),
        2 => (
            any::<u16>(),
            prop_oneof![Just(Damage::Cut), Just(Damage::Zeros), Just(Damage::Garbage)],
            any::<bool>(),
            proptest::bool::weighted(0.2),
        )
            .prop_map(|(at, damage, empty_later, lose_checkpoint)| Op::Crash {
                at,
                damage,
                empty_later,
                lose_checkpoint,
            }),
    ]
}

#[derive(Clone, Debug)]
struct ModelBatch {
    base: u64,
    values: Vec<Vec<u8>>,
    /// Base sequence, for batches of the idempotent producer.
    sequence: Option<i32>,
    /// The bytes as the producer sent them, for retries.
    sent: BytesMut,
}

impl ModelBatch {
    fn next(&self) -> u64 {
        self.base + self.values.len() as u64
    }
}

#[derive(Debug, Default)]
struct Model {
    /// The batches in the log, from its start offset.
    batches: Vec<ModelBatch>,
    durable: u64,
    /// Every idempotent batch the log has taken, as (base offset, next sequence):
    /// retention deletes batches but the log still knows the producer.
    sequences: Vec<(u64, i32)>,
    next_sequence: i32,
    next: u64,
    tag: u64,
}

impl Model {
    fn start(&self) -> u64 {
        self.batches.first().map_or(self.next, |b| b.base)
    }

    fn records(&self) -> Vec<(Offset, Vec<u8>)> {
        self.batches
            .iter()
            .flat_map(|b| {
                b.values
                    .iter()
                    .enumerate()
                    .map(|(i, v)| (Offset(b.base + i as u64), v.clone()))
            })
            .collect()
    }

    /// Keeps what lies below `next` (a batch boundary) after a crash.
    fn truncate(&mut self, next: u64) {
        assert!(
            next == self.start() || self.batches.iter().any(|b| b.next() == next),
            "recovered end {next} is not a batch boundary"
        );
        self.batches.retain(|b| b.next() <= next);
        self.sequences.retain(|(base, _)| *base < next);
        self.next_sequence = self.sequences.last().map_or(0, |(_, next)| *next);
        self.next = next;
    }
}

fn check_everything(log: &LaneLog, model: &Model) {
    assert_eq!(log.next_offset(), Offset(model.next));
    assert_eq!(log.start_offset(), Offset(model.start()));
    assert_eq!(
        read_all(log, log.start_offset(), log.next_offset()),
        model.records()
    );
}

fn config(policy: u8) -> LogConfig {
    LogConfig {
        fsync: match policy {
            0 => FsyncPolicy::Always,
            1 => FsyncPolicy::Interval(Duration::from_secs(3600)),
            _ => FsyncPolicy::Never,
        },
        // For `always` logs (which make no next segment ahead), small enough that
        // deleted files are recycled as later segments (35 in 1,000 cases); for
        // the others, large enough to keep logs of many segments.
        retention_bytes: Some(if policy == 0 { 2 * 1024 } else { 24 * 1024 }),
        // Writeback, with its allocation and next segment made ahead, every few batches.
        writeback_bytes: 1024,
        ..small_config()
    }
}

/// Damages the bytes after the durable point, as a power loss could.
fn damage(dir: &Path, durable: u64, at: u16, damage: Damage, empty_later: bool) {
    let (durable_file, durable_position) = position_of(dir, durable);
    let files = segment_files(dir);
    let first = files.iter().position(|f| *f == durable_file).unwrap();
    let mut spans = Vec::new();
    for (i, file) in files[first..].iter().enumerate() {
        let start = if i == 0 { durable_position } else { 0 };
        let len = fs::metadata(file).unwrap().len();
        spans.push((file.clone(), start, len));
    }
    let total: u64 = spans.iter().map(|(_, start, len)| len - start).sum();
    let mut point = total * u64::from(at) / u64::from(u16::MAX);
    let mut chosen = spans.len() - 1;
    for (i, (_, start, len)) in spans.iter().enumerate() {
        if point <= len - start {
            chosen = i;
            break;
        }
        point -= len - start;
    }
    let (file, start, len) = spans[chosen].clone();
    let position = (start + point).min(len);
    let mut bytes = fs::read(&file).unwrap();
    match damage {
        Damage::Cut => bytes.truncate(position as usize),
        Damage::Zeros => bytes[position as usize..].fill(0),
        Damage::Garbage => {
            let mut seed = position as u32 | 1;
            for byte in &mut bytes[position as usize..] {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                *byte = seed as u8;
            }
        }
    }
    fs::write(&file, &bytes).unwrap();
    if empty_later {
        for (later, _, _) in &spans[chosen + 1..] {
            OpenOptions::new()
                .write(true)
                .open(later)
                .unwrap()
                .set_len(0)
                .unwrap();
        }
    }
}

fn run(policy: u8, ops: Vec<Op>) {
    let dir = tempfile::tempdir().unwrap();
    let mut log = LaneLog::open(dir.path(), config(policy)).unwrap();
    let mut model = Model::default();
    for op in ops {
        match op {
            Op::Append {
                records,
                len,
                idempotent,
            } => {
                model.tag += 1;
                let values = values(model.tag, records, len);
                let sequence = idempotent.then_some(model.next_sequence);
                let stamp = sequence.map_or(ProducerStamp::NONE, |base_sequence| ProducerStamp {
                    producer_id: PRODUCER_ID,
                    producer_epoch: 0,
                    base_sequence,
                });
                let sent = batch(&values, model.tag as i64 * 100, stamp);
                let outcome = log.append(&mut sent.clone()).unwrap();
                assert_eq!(outcome.base_offset, Offset(model.next));
                assert!(!outcome.duplicate);
                if outcome.writeback_due {
                    log.start_writeback().unwrap();
                }
                if let Some(sequence) = sequence {
                    model.next_sequence = sequence + records as i32;
                    model.sequences.push((model.next, model.next_sequence));
                }
                model.batches.push(ModelBatch {
                    base: outcome.base_offset.0,
                    values,
                    sequence,
                    sent,
                });
                model.next += records as u64;
            }
            Op::Retry => {
                let Some(last) = model.batches.iter().rev().find(|b| b.sequence.is_some()) else {
                    continue;
                };
                if model.sequences.last().map(|(base, _)| *base) != Some(last.base) {
                    continue; // a newer batch of the producer was deleted by retention
                }
                let outcome = log.append(&mut last.sent.clone()).unwrap();
                assert!(outcome.duplicate, "a retry is recognized");
                assert_eq!(outcome.base_offset, Offset(last.base));
                assert_eq!(outcome.last_offset, Offset(last.next() - 1));
            }
            Op::Flush => {
                assert_eq!(log.flush().unwrap(), Offset(model.next));
            }
            Op::Read { from, bytes_max } => {
                let (start, next) = (model.start(), model.next);
                let from = start + (next - start) * u64::from(from) / u64::from(u16::MAX);
                let slice = log.read(Offset(from), bytes_max as usize, Offset(next)).unwrap();
                let batches: Vec<_> = lanes_protocol::Batches::new(slice.bytes.clone(), Default::default())
                    .map(|b| b.expect("every batch served passes its checksum"))
                    .collect();
                if from == next {
                    assert!(batches.is_empty());
                    continue;
                }
                assert!(!batches.is_empty(), "a read below the end returns a batch");
                assert!(
                    batches.len() == 1 || slice.bytes.len() <= bytes_max as usize,
                    "bytes_max is kept beyond one batch"
                );
                assert!(batches[0].base_offset().0 <= from && batches[0].last_offset().0 >= from);
                assert_eq!(slice.next_offset, batches.last().unwrap().last_offset().plus(1));
                let got: Vec<(Offset, Vec<u8>)> = batches
                    .iter()
                    .flat_map(|b| {
                        b.records()
                            .map(|r| (r.offset, r.value.to_vec()))
                            .collect::<Vec<_>>()
                    })
                    .collect();
                let expected: Vec<(Offset, Vec<u8>)> = model
                    .records()
                    .into_iter()
                    .filter(|(o, _)| *o >= batches[0].base_offset() && *o < slice.next_offset)
                    .collect();
                assert_eq!(got, expected);
            }
            Op::Retention => {
                log.enforce_retention(0).unwrap();
                let start = log.start_offset().0;
                model.batches.retain(|b| b.base >= start);
                assert_eq!(model.start(), start, "retention deletes whole batches");
            }
            Op::Reopen => {
                log.close().unwrap();
                drop(log);
                log = LaneLog::open(dir.path(), config(policy)).unwrap();
                assert!(log.recovery_report().clean_shutdown);
                check_everything(&log, &model);
            }
            Op::Crash {
                at,
                damage: kind,
                empty_later,
                lose_checkpoint,
            } => {
                drop(log);
                damage(dir.path(), model.durable, at, kind, empty_later);
                if lose_checkpoint {
                    fs::remove_file(dir.path().join("checkpoint")).unwrap();
                }
                log = LaneLog::open(dir.path(), config(policy)).unwrap();
                let report = log.recovery_report().clone();
                assert_eq!(
                    report.corruption, None,
                    "damage after the durable point is not corruption"
                );
                let next = log.next_offset().0;
                assert!(
                    next >= model.durable,
                    "durable records survive: {next} < {}",
                    model.durable
                );
                assert!(next <= model.next);
                model.truncate(next);
                check_everything(&log, &model);
            }
        }
        // What the log says is durable is what a crash must keep.
        model.durable = log.durable_offset().0;
    }
    check_everything(&log, &model);
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(48),
        max_shrink_iters: 2000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn lane_log_matches_its_model(policy in 0u8..3, ops in proptest::collection::vec(op(), 1..60)) {
        run(policy, ops);
    }
}
