//! Idempotent producers: per producer id, the epoch and the last batches' sequence
//! numbers and offsets, so a retried batch is answered with its original offsets
//! instead of being appended twice, and a gap in sequences is refused.
//!
//! The table is rebuilt on open from the newest snapshot plus the batch headers after
//! it. A snapshot `{offset:020}.snapshot` holds the table as of `offset` (written when
//! a segment rolls, named after the new segment) and is replaced atomically.
//!
//! Snapshot layout, big-endian:
//!
//! | size | field                 | meaning                                    |
//! |-----:|-----------------------|--------------------------------------------|
//! |    4 | `magic`               | `LPS1`                                     |
//! |    8 | `offset`              | the table is the state before this offset  |
//! |    4 | `producer_count`      |                                            |
//! |    … | producers             | `producer_count` times the entry below     |
//! |    4 | `crc`                 | CRC-32 of everything before it             |
//!
//! Producer entry: `producer_id` i64, `epoch` i16, `batch_count` u8, then `batch_count`
//! times (`base_sequence` i32, `last_sequence` i32, `base_offset` u64, `last_offset` u64,
//! `crc` u32).

use std::collections::{HashMap, VecDeque};

use lanes_protocol::record_batch::sequence_plus;
use lanes_protocol::{BatchHeader, Offset};

use super::StorageError;

/// How many of a producer's most recent batches are remembered: a producer keeps at
/// most this many batches in flight per lane log, so any retry is among them.
pub const SEQUENCES_REMEMBERED: usize = lanes_protocol::messages::IN_FLIGHT_PER_LOG_MAX;

const MAGIC: &[u8; 4] = b"LPS1";
const BATCH_META_BYTES: usize = 28;

/// What the log remembers of one appended batch of an idempotent producer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BatchMeta {
    pub(crate) base_sequence: i32,
    pub(crate) last_sequence: i32,
    pub(crate) base_offset: Offset,
    pub(crate) last_offset: Offset,
    /// The batch's checksum: a retry is the same bytes, so the same checksum. A
    /// different batch reusing the sequences is a client bug, not a retry.
    pub(crate) crc: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct ProducerEntry {
    epoch: i16,
    /// Oldest first; at most [`SEQUENCES_REMEMBERED`].
    batches: VecDeque<BatchMeta>,
}

/// What to do with a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SequenceCheck {
    Append,
    /// A retry of a batch already in the log, at these offsets.
    Duplicate(BatchMeta),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ProducerStateTable {
    producers: HashMap<i64, ProducerEntry>,
    producer_ids_max: usize,
}

impl ProducerStateTable {
    pub(crate) fn new(producer_ids_max: usize) -> ProducerStateTable {
        ProducerStateTable {
            producers: HashMap::new(),
            producer_ids_max,
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.producers.len()
    }

    /// Decides whether `header`'s batch is new, a retry, or refused.
    pub(crate) fn check(&self, header: &BatchHeader) -> Result<SequenceCheck, StorageError> {
        if !header.has_producer_id() {
            return Ok(SequenceCheck::Append);
        }
        let out_of_order = |expected| StorageError::OutOfOrderSequence {
            producer_id: header.producer_id,
            expected,
            received: header.base_sequence,
        };
        let Some(entry) = self.producers.get(&header.producer_id) else {
            // A producer this log does not know must start at 0. Accepting any sequence
            // would let a later batch in when the first one failed, and the first could
            // then never be appended: order would be broken without anyone knowing.
            return if header.base_sequence == 0 {
                Ok(SequenceCheck::Append)
            } else {
                Err(out_of_order(0))
            };
        };
        if header.producer_epoch < entry.epoch {
            return Err(StorageError::ProducerFenced {
                producer_id: header.producer_id,
                epoch: header.producer_epoch,
                current_epoch: entry.epoch,
            });
        }
        if header.producer_epoch > entry.epoch {
            return if header.base_sequence == 0 {
                Ok(SequenceCheck::Append)
            } else {
                Err(out_of_order(0))
            };
        }
        let last_sequence = header.last_sequence();
        if let Some(batch) = entry
            .batches
            .iter()
            .find(|b| b.base_sequence == header.base_sequence && b.last_sequence == last_sequence)
        {
            return if batch.crc == header.crc {
                Ok(SequenceCheck::Duplicate(*batch))
            } else {
                Err(StorageError::SequenceReused {
                    producer_id: header.producer_id,
                    base_sequence: header.base_sequence,
                })
            };
        }
        let expected = entry
            .batches
            .back()
            .map_or(0, |last| sequence_plus(last.last_sequence, 1));
        if header.base_sequence == expected {
            Ok(SequenceCheck::Append)
        } else if is_behind(header.base_sequence, expected) {
            // Appended long ago: a retry older than the batches remembered.
            Err(StorageError::DuplicateSequence {
                producer_id: header.producer_id,
                expected,
                received: header.base_sequence,
            })
        } else {
            Err(out_of_order(expected))
        }
    }

    /// Records an appended batch (its header carries the assigned base offset).
    pub(crate) fn record(&mut self, header: &BatchHeader) {
        if !header.has_producer_id() {
            return;
        }
        if !self.producers.contains_key(&header.producer_id) && self.producers.len() >= self.producer_ids_max
        {
            self.evict_least_recent();
        }
        let entry = self
            .producers
            .entry(header.producer_id)
            .or_insert_with(|| ProducerEntry {
                epoch: header.producer_epoch,
                batches: VecDeque::with_capacity(SEQUENCES_REMEMBERED),
            });
        if header.producer_epoch != entry.epoch {
            entry.epoch = header.producer_epoch;
            entry.batches.clear();
        }
        if entry.batches.len() == SEQUENCES_REMEMBERED {
            entry.batches.pop_front();
        }
        entry.batches.push_back(BatchMeta {
            base_sequence: header.base_sequence,
            last_sequence: header.last_sequence(),
            base_offset: header.base_offset,
            last_offset: header.last_offset(),
            crc: header.crc,
        });
    }

    fn evict_least_recent(&mut self) {
        let oldest = self
            .producers
            .iter()
            .min_by_key(|(_, entry)| entry.batches.back().map_or(Offset::ZERO, |b| b.last_offset))
            .map(|(id, _)| *id);
        if let Some(id) = oldest {
            self.producers.remove(&id);
        }
    }

    /// Encodes the table as the state before `offset`.
    pub(crate) fn encode_snapshot(&self, offset: Offset) -> Vec<u8> {
        let mut ids: Vec<&i64> = self.producers.keys().collect();
        ids.sort_unstable();
        let mut out = Vec::with_capacity(20 + ids.len() * (11 + SEQUENCES_REMEMBERED * BATCH_META_BYTES));
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&offset.0.to_be_bytes());
        out.extend_from_slice(&(ids.len() as u32).to_be_bytes());
        for id in ids {
            let entry = &self.producers[id];
            out.extend_from_slice(&id.to_be_bytes());
            out.extend_from_slice(&entry.epoch.to_be_bytes());
            out.push(entry.batches.len() as u8);
            for batch in &entry.batches {
                out.extend_from_slice(&batch.base_sequence.to_be_bytes());
                out.extend_from_slice(&batch.last_sequence.to_be_bytes());
                out.extend_from_slice(&batch.base_offset.0.to_be_bytes());
                out.extend_from_slice(&batch.last_offset.0.to_be_bytes());
                out.extend_from_slice(&batch.crc.to_be_bytes());
            }
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        out
    }

    /// Decodes a snapshot; `None` if it is damaged in any way.
    pub(crate) fn decode_snapshot(
        bytes: &[u8],
        producer_ids_max: usize,
    ) -> Option<(Offset, ProducerStateTable)> {
        let (body, crc) = bytes.split_at_checked(bytes.len().checked_sub(4)?)?;
        if u32::from_be_bytes(crc.try_into().ok()?) != crc32fast::hash(body) {
            return None;
        }
        let mut reader = Reader(body);
        if reader.take(4)? != MAGIC {
            return None;
        }
        let offset = Offset(reader.u64()?);
        let count = reader.u32()?;
        let mut table = ProducerStateTable::new(producer_ids_max);
        for _ in 0..count {
            let id = reader.u64()? as i64;
            let epoch = i16::from_be_bytes(reader.take(2)?.try_into().ok()?);
            let batch_count = reader.take(1)?[0] as usize;
            if batch_count > SEQUENCES_REMEMBERED {
                return None;
            }
            let mut batches = VecDeque::with_capacity(SEQUENCES_REMEMBERED);
            for _ in 0..batch_count {
                batches.push_back(BatchMeta {
                    base_sequence: reader.u32()? as i32,
                    last_sequence: reader.u32()? as i32,
                    base_offset: Offset(reader.u64()?),
                    last_offset: Offset(reader.u64()?),
                    crc: reader.u32()?,
                });
            }
            table.producers.insert(id, ProducerEntry { epoch, batches });
        }
        if !reader.0.is_empty() {
            return None;
        }
        while table.producers.len() > producer_ids_max {
            table.evict_least_recent();
        }
        Some((offset, table))
    }
}

/// Whether `sequence` comes before `expected` (within half the sequence space behind it,
/// as sequences wrap from `i32::MAX` to 0).
fn is_behind(sequence: i32, expected: i32) -> bool {
    let modulus = i64::from(i32::MAX) + 1;
    let distance = (i64::from(expected) - i64::from(sequence)).rem_euclid(modulus);
    distance > 0 && distance < modulus / 2
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = self.0.split_at_checked(n)?;
        self.0 = tail;
        Some(head)
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(producer_id: i64, epoch: i16, base_sequence: i32, count: u32, base_offset: u64) -> BatchHeader {
        BatchHeader {
            base_offset: Offset(base_offset),
            crc: base_sequence as u32 ^ count,
            batch_length: 0,
            magic: 1,
            attributes: 0,
            producer_epoch: epoch,
            record_count: count,
            last_offset_delta: count - 1,
            first_timestamp_ms: 0,
            max_timestamp_ms: 0,
            producer_id,
            base_sequence,
        }
    }

    #[test]
    fn accepts_in_order_and_detects_retries_and_gaps() {
        let mut table = ProducerStateTable::new(10);
        let first = header(1, 0, 0, 3, 100);
        assert_eq!(table.check(&first).unwrap(), SequenceCheck::Append);
        table.record(&first);
        let next = header(1, 0, 3, 2, 103);
        assert_eq!(table.check(&next).unwrap(), SequenceCheck::Append);
        table.record(&next);

        let retry = header(1, 0, 0, 3, 0);
        match table.check(&retry).unwrap() {
            SequenceCheck::Duplicate(meta) => {
                assert_eq!((meta.base_offset, meta.last_offset), (Offset(100), Offset(102)));
            }
            other => panic!("expected a duplicate, got {other:?}"),
        }
        let gap = header(1, 0, 9, 1, 0);
        assert!(matches!(
            table.check(&gap),
            Err(StorageError::OutOfOrderSequence {
                expected: 5,
                received: 9,
                ..
            })
        ));
        let reused = BatchHeader {
            crc: 12345,
            ..header(1, 0, 0, 3, 0)
        };
        assert!(matches!(
            table.check(&reused),
            Err(StorageError::SequenceReused { base_sequence: 0, .. })
        ));
    }

    #[test]
    fn a_retry_older_than_the_remembered_batches_is_a_duplicate_not_a_gap() {
        let mut table = ProducerStateTable::new(10);
        for i in 0..8 {
            table.record(&header(1, 0, i, 1, i as u64));
        }
        assert!(matches!(
            table.check(&header(1, 0, 1, 1, 0)),
            Err(StorageError::DuplicateSequence {
                expected: 8,
                received: 1,
                ..
            })
        ));
        assert!(is_behind(i32::MAX, 2), "sequences wrap");
        assert!(!is_behind(5, 2));
    }

    #[test]
    fn an_unknown_producer_starts_at_zero() {
        let table = ProducerStateTable::new(10);
        assert!(matches!(
            table.check(&header(5, 0, 3, 1, 0)),
            Err(StorageError::OutOfOrderSequence {
                expected: 0,
                received: 3,
                ..
            })
        ));
        assert_eq!(
            table.check(&header(5, 0, 0, 1, 0)).unwrap(),
            SequenceCheck::Append
        );
        assert_eq!(
            table.check(&header(-1, -1, -1, 1, 0)).unwrap(),
            SequenceCheck::Append
        );
    }

    #[test]
    fn epochs_fence_and_reset() {
        let mut table = ProducerStateTable::new(10);
        table.record(&header(1, 3, 0, 1, 0));
        assert!(matches!(
            table.check(&header(1, 2, 1, 1, 0)),
            Err(StorageError::ProducerFenced { current_epoch: 3, .. })
        ));
        assert!(table.check(&header(1, 4, 5, 1, 0)).is_err());
        assert_eq!(
            table.check(&header(1, 4, 0, 1, 0)).unwrap(),
            SequenceCheck::Append
        );
    }

    #[test]
    fn remembers_only_the_last_batches() {
        let mut table = ProducerStateTable::new(10);
        for i in 0..8 {
            table.record(&header(1, 0, i, 1, i as u64));
        }
        assert!(matches!(
            table.check(&header(1, 0, 2, 1, 0)),
            Err(StorageError::DuplicateSequence { .. })
        ));
        assert!(matches!(
            table.check(&header(1, 0, 3, 1, 0)),
            Ok(SequenceCheck::Duplicate(_))
        ));
    }

    #[test]
    fn evicts_the_least_recent_producer_at_the_bound() {
        let mut table = ProducerStateTable::new(2);
        table.record(&header(1, 0, 0, 1, 10));
        table.record(&header(2, 0, 0, 1, 5));
        table.record(&header(3, 0, 0, 1, 20));
        assert_eq!(table.len(), 2);
        assert!(table.producers.contains_key(&1) && table.producers.contains_key(&3));
    }

    #[test]
    fn snapshot_roundtrip_and_damage() {
        let mut table = ProducerStateTable::new(10);
        for i in 0..7 {
            table.record(&header(1, 2, i, 1, i as u64));
        }
        table.record(&header(9, 0, 0, 4, 50));
        let bytes = table.encode_snapshot(Offset(77));
        let (offset, decoded) = ProducerStateTable::decode_snapshot(&bytes, 10).unwrap();
        assert_eq!(offset, Offset(77));
        assert_eq!(decoded, table);
        for cut in 0..bytes.len() {
            assert!(ProducerStateTable::decode_snapshot(&bytes[..cut], 10).is_none());
        }
        let mut flipped = bytes.clone();
        flipped[20] ^= 1;
        assert!(ProducerStateTable::decode_snapshot(&flipped, 10).is_none());
    }
}
