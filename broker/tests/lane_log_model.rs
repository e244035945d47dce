//! Random sequences of append / retry / flush / read / reopen / crash against an
//! in-memory model. A crash drops the log without closing it and then damages what
//! lies after the durable point on disk: cuts a file at a random byte, zero-fills or
//! garbles the rest of it, and may empty the segments after it.
//!
//! Invariants: every durable record reads back, in order, exactly once; the log after a
//! crash is a prefix of what was appended; no read returns a batch whose checksum
//! fails; a retried idempotent batch gets its original offsets.

mod support;

use std::fs::{self, OpenOptions};
use std::path::Path;

use bytes::BytesMut;
use lanes_broker::storage::LaneLog;
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
    Reopen,
    Crash {
        at: u16,
        damage: Damage,
        empty_later: bool,
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
        1 => Just(Op::Reopen),
        2 => (any::<u16>(), prop_oneof![Just(Damage::Cut), Just(Damage::Zeros), Just(Damage::Garbage)], any::<bool>())
            .prop_map(|(at, damage, empty_later)| Op::Crash { at, damage, empty_later }),
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
    batches: Vec<ModelBatch>,
    durable: u64,
    next_sequence: i32,
    tag: u64,
}

impl Model {
    fn next(&self) -> u64 {
        self.batches.last().map_or(0, ModelBatch::next)
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

    /// Keeps the batches below `next` (a batch boundary) after a crash.
    fn truncate(&mut self, next: u64) {
        assert!(
            next == 0 || self.batches.iter().any(|b| b.next() == next),
            "recovered end {next} is not a batch boundary"
        );
        self.batches.retain(|b| b.next() <= next);
        if let Some(last) = self.batches.iter().rev().find(|b| b.sequence.is_some()) {
            self.next_sequence = last.sequence.unwrap() + last.values.len() as i32;
        }
    }
}

fn check_everything(log: &LaneLog, model: &Model) {
    assert_eq!(log.next_offset(), Offset(model.next()));
    assert_eq!(read_all(log, Offset(0), log.next_offset()), model.records());
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

fn run(ops: Vec<Op>) {
    let dir = tempfile::tempdir().unwrap();
    let mut log = LaneLog::open(dir.path(), small_config()).unwrap();
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
                assert_eq!(outcome.base_offset, Offset(model.next()));
                assert!(!outcome.duplicate);
                if idempotent {
                    model.next_sequence += records as i32;
                }
                model.batches.push(ModelBatch {
                    base: outcome.base_offset.0,
                    values,
                    sequence,
                    sent,
                });
            }
            Op::Retry => {
                let Some(last) = model.batches.iter().rev().find(|b| b.sequence.is_some()) else {
                    continue;
                };
                let outcome = log.append(&mut last.sent.clone()).unwrap();
                assert!(outcome.duplicate, "a retry is recognized");
                assert_eq!(outcome.base_offset, Offset(last.base));
                assert_eq!(outcome.last_offset, Offset(last.next() - 1));
            }
            Op::Flush => {
                assert_eq!(log.flush().unwrap(), Offset(model.next()));
                model.durable = model.next();
            }
            Op::Read { from, bytes_max } => {
                let next = model.next();
                let from = next * u64::from(from) / u64::from(u16::MAX);
                let slice = log.read(Offset(from), bytes_max as usize, Offset(next)).unwrap();
                let expected: Vec<(Offset, Vec<u8>)> = model
                    .records()
                    .into_iter()
                    .filter(|(o, _)| o.0 >= from && o.0 < slice.next_offset.0)
                    .collect();
                let got: Vec<(Offset, Vec<u8>)> = read_all(&log, Offset(from), slice.next_offset);
                assert_eq!(got, expected);
                if from < next {
                    assert!(
                        slice.next_offset > Offset(from),
                        "a read below the end returns a batch"
                    );
                }
            }
            Op::Reopen => {
                log.close().unwrap();
                drop(log);
                log = LaneLog::open(dir.path(), small_config()).unwrap();
                assert!(log.recovery_report().clean_shutdown);
                model.durable = model.next();
                check_everything(&log, &model);
            }
            Op::Crash {
                at,
                damage: kind,
                empty_later,
            } => {
                drop(log);
                damage(dir.path(), model.durable, at, kind, empty_later);
                log = LaneLog::open(dir.path(), small_config()).unwrap();
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
                assert!(next <= model.next());
                model.truncate(next);
                model.durable = next;
                check_everything(&log, &model);
            }
        }
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
    fn lane_log_matches_its_model(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops);
    }
}
