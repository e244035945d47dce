//! Committed offsets of every group, kept in one lane log (`DATA_DIR/meta/offsets/`)
//! and in memory.
//!
//! The log is the storage engine's own, so commits get its checksums, torn-write
//! recovery and group commit: a commit is one append, and the coordinator answers it
//! after one (shared) fsync. Each record is one change:
//!
//! | kind | value after the kind byte                                        |
//! |------|------------------------------------------------------------------|
//! | 1    | commit: `group string, topic string, partition u32, lane u8, offset u64` |
//! | 2    | forget a group: `group string`                                   |
//! | 3    | forget a topic in every group: `topic string`                    |
//!
//! (strings as on the wire: `u16` length, UTF-8.) Opening replays the log in order.
//! The log would grow forever, so once more than [`OffsetStore`]'s rewrite threshold has
//! been appended since the last rewrite, every live offset is appended again and,
//! once that is durable, the segments wholly before it are deleted.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};
use lanes_protocol::record_batch::{BuildError, ProducerStamp, RecordBatchBuilder};
use lanes_protocol::wire::{Reader, Writer};
use lanes_protocol::{BatchLimits, Batches, Lane, Offset, PartitionId};

use crate::storage::{FsyncPolicy, LaneLog, LogConfig, StorageError};

const COMMIT: u8 = 1;
const FORGET_GROUP: u8 = 2;
const FORGET_TOPIC: u8 = 3;
const NAME_BYTES_MAX: usize = 255;
/// The log's own limits, whatever producers may send: its records are at most ~530 bytes.
const BATCH_LIMITS: BatchLimits = BatchLimits {
    batch_bytes_max: 256 << 10,
    batch_records_max: 16_384,
};

/// One lane log of one topic.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LaneKey {
    pub topic: String,
    pub partition: PartitionId,
    pub lane: Lane,
}

/// A group's committed offsets.
pub type GroupOffsets = BTreeMap<LaneKey, Offset>;

#[derive(Debug, thiserror::Error)]
pub enum OffsetsError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("the group offsets log {dir} has an unreadable record at offset {offset}: {reason}")]
    Malformed {
        dir: PathBuf,
        offset: Offset,
        reason: String,
    },
}

#[derive(Debug)]
struct State {
    groups: BTreeMap<String, GroupOffsets>,
    /// Bytes appended since the last rewrite began (the rewrite included).
    appended_bytes: u64,
    /// Bytes of the last rewrite: the live set's size.
    live_bytes: u64,
    /// A rewrite that ends at `.1`: once that is durable, segments below `.0` can go.
    superseded_below: Option<(Offset, Offset)>,
}

/// The durable store of committed offsets.
#[derive(Debug)]
pub struct OffsetStore {
    log: LaneLog,
    limits: BatchLimits,
    /// Rewrite once this many bytes were appended since the last rewrite (or twice the
    /// live set, if that is larger).
    rewrite_bytes_min: u64,
    state: Mutex<State>,
}

impl OffsetStore {
    /// Opens (or creates) the store in `dir` and replays it.
    pub fn open(dir: PathBuf, segment_bytes_max: u32) -> Result<OffsetStore, OffsetsError> {
        let limits = BATCH_LIMITS;
        let config = LogConfig {
            segment_bytes_max: segment_bytes_max.max(limits.batch_bytes_max),
            index_bytes_max: 1 << 20,
            batch: limits,
            // Commits flush explicitly; nothing else needs an fsync.
            fsync: FsyncPolicy::Never,
            retention_ms: None,
            retention_bytes: None,
            ..LogConfig::default()
        };
        let log = LaneLog::open(&dir, config)?;
        if let Some(corruption) = log.corruption() {
            return Err(OffsetsError::Malformed {
                dir,
                offset: corruption.offset,
                reason: format!(
                    "{corruption:?}; move the directory aside to start without committed offsets"
                ),
            });
        }
        let mut state = State {
            groups: BTreeMap::new(),
            appended_bytes: 0,
            live_bytes: 0,
            superseded_below: None,
        };
        let mut offset = log.start_offset();
        let end = log.next_offset();
        while offset < end {
            let slice = log.read(offset, 1 << 20, end)?;
            state.appended_bytes += slice.bytes.len() as u64;
            for batch in Batches::new(slice.bytes, limits) {
                let batch = batch.map_err(|error| malformed(&dir, offset, error.to_string()))?;
                for record in batch.records() {
                    apply(&mut state.groups, record.value)
                        .map_err(|reason| malformed(&dir, record.offset, reason))?;
                }
            }
            offset = slice.next_offset;
        }
        state.live_bytes = state.appended_bytes;
        Ok(OffsetStore {
            log,
            limits,
            rewrite_bytes_min: u64::from(segment_bytes_max),
            state: Mutex::new(state),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("offsets lock poisoned")
    }

    /// The groups that have committed offsets.
    pub fn groups(&self) -> Vec<String> {
        self.state().groups.keys().cloned().collect()
    }

    /// A group's committed offsets.
    pub fn group(&self, group: &str) -> GroupOffsets {
        self.state().groups.get(group).cloned().unwrap_or_default()
    }

    /// The lowest offset any group has committed, per lane log.
    /// Only the offsets for which `counts(group, topic)` holds count.
    pub fn lowest_committed(&self, counts: impl Fn(&str, &str) -> bool) -> BTreeMap<LaneKey, Offset> {
        let state = self.state();
        let mut lowest: BTreeMap<LaneKey, Offset> = BTreeMap::new();
        for (group, offsets) in &state.groups {
            for (key, &offset) in offsets {
                if !counts(group, &key.topic) {
                    continue;
                }
                match lowest.get_mut(key) {
                    Some(low) => *low = (*low).min(offset),
                    None => {
                        lowest.insert(key.clone(), offset);
                    }
                }
            }
        }
        lowest
    }

    /// The lowest offset any group has committed on one lane log, of the groups for
    /// which `counts(group)` holds.
    pub fn lowest_committed_on(&self, key: &LaneKey, counts: impl Fn(&str) -> bool) -> Option<Offset> {
        let state = self.state();
        state
            .groups
            .iter()
            .filter(|(group, _)| counts(group))
            .filter_map(|(_, offsets)| offsets.get(key))
            .min()
            .copied()
    }

    /// Records commits in the log and in memory; they are durable after the next
    /// [`OffsetStore::flush`]. Commits are applied in the order of calls.
    pub fn commit(&self, group: &str, commits: &[(LaneKey, Offset)]) -> Result<(), StorageError> {
        let records = commits
            .iter()
            .map(|(key, offset)| commit_record(group, key, *offset));
        let mut state = self.state();
        self.append(&mut state, records)?;
        let offsets = state.groups.entry(group.to_owned()).or_default();
        for (key, offset) in commits {
            offsets.insert(key.clone(), *offset);
        }
        // The commit is in the log; a failed rewrite only leaves the log longer.
        if let Err(error) = self.maybe_rewrite(&mut state) {
            tracing::warn!(dir = %self.log.dir().display(), %error, "rewriting the group offsets log failed");
        }
        Ok(())
    }

    /// Drops a group's offsets (an expired group).
    pub fn forget_group(&self, group: &str) -> Result<(), StorageError> {
        let mut writer = Writer::new();
        writer.u8(FORGET_GROUP);
        writer.string(group);
        let mut state = self.state();
        self.append(&mut state, std::iter::once(writer.into_bytes()))?;
        state.groups.remove(group);
        Ok(())
    }

    /// Drops every group's offsets of a topic (a deleted topic: a new one of the same
    /// name starts at offset 0 again).
    pub fn forget_topic(&self, topic: &str) -> Result<(), StorageError> {
        let mut writer = Writer::new();
        writer.u8(FORGET_TOPIC);
        writer.string(topic);
        let mut state = self.state();
        self.append(&mut state, std::iter::once(writer.into_bytes()))?;
        forget_topic(&mut state.groups, topic);
        Ok(())
    }

    /// Makes every change recorded before this call durable.
    pub fn flush(&self) -> Result<(), StorageError> {
        let durable = self.log.flush()?;
        let superseded = self.state().superseded_below;
        if let Some((below, rewrite_end)) = superseded
            && durable >= rewrite_end
        {
            // Everything asked for is durable; a failed trim only leaves the log longer.
            if let Err(error) = self.log.delete_segments_below(below) {
                tracing::warn!(dir = %self.log.dir().display(), %error, "trimming the group offsets log failed");
                return Ok(());
            }
            let mut state = self.state();
            if state.superseded_below == superseded {
                state.superseded_below = None;
            }
        }
        Ok(())
    }

    /// Fsyncs and closes the log.
    pub fn close(&self) -> Result<(), StorageError> {
        self.log.close()
    }

    /// Appends records as batches, each as large as the batch limits allow.
    fn append(&self, state: &mut State, records: impl Iterator<Item = BytesMut>) -> Result<(), StorageError> {
        let now_ms = unix_now_ms();
        let mut builder = RecordBatchBuilder::new(self.limits);
        for record in records {
            match builder.push(now_ms, None, &record, &[]) {
                Ok(()) => {}
                Err(BuildError::BatchFull) => {
                    self.append_batch(state, builder)?;
                    builder = RecordBatchBuilder::new(self.limits);
                    builder
                        .push(now_ms, None, &record, &[])
                        .expect("a record of at most ~520 bytes fits an empty batch");
                }
                Err(error) => unreachable!("offset records are small: {error}"),
            }
        }
        if !builder.is_empty() {
            self.append_batch(state, builder)?;
        }
        Ok(())
    }

    fn append_batch(&self, state: &mut State, builder: RecordBatchBuilder) -> Result<(), StorageError> {
        let mut batch = BytesMut::from(builder.finish(ProducerStamp::NONE));
        self.log.append(&mut batch)?;
        state.appended_bytes += batch.len() as u64;
        Ok(())
    }

    /// Appends every live offset again once enough was appended since the last time.
    fn maybe_rewrite(&self, state: &mut State) -> Result<(), StorageError> {
        if state.appended_bytes < self.rewrite_bytes_min.max(2 * state.live_bytes) {
            return Ok(());
        }
        let start = self.log.next_offset();
        state.appended_bytes = 0;
        let groups = std::mem::take(&mut state.groups);
        let records = groups.iter().flat_map(|(group, offsets)| {
            offsets
                .iter()
                .map(move |(key, offset)| commit_record(group, key, *offset))
        });
        let result = self.append(state, records);
        state.groups = groups;
        result?;
        state.live_bytes = state.appended_bytes;
        state.superseded_below = Some((start, self.log.next_offset()));
        tracing::debug!(dir = %self.log.dir().display(), live_bytes = state.live_bytes, "group offsets rewritten");
        Ok(())
    }
}

fn commit_record(group: &str, key: &LaneKey, offset: Offset) -> BytesMut {
    let mut writer = Writer::new();
    writer.u8(COMMIT);
    writer.string(group);
    writer.string(&key.topic);
    writer.u32(key.partition.0);
    writer.u8(key.lane.0);
    writer.u64(offset.0);
    writer.into_bytes()
}

fn forget_topic(groups: &mut BTreeMap<String, GroupOffsets>, topic: &str) {
    for offsets in groups.values_mut() {
        offsets.retain(|key, _| key.topic != topic);
    }
    groups.retain(|_, offsets| !offsets.is_empty());
}

/// Applies one record of the log.
fn apply(groups: &mut BTreeMap<String, GroupOffsets>, value: Bytes) -> Result<(), String> {
    let mut reader = Reader::new(BytesMut::from(value));
    let error = |e: lanes_protocol::wire::DecodeError| e.to_string();
    match reader.u8("kind").map_err(error)? {
        COMMIT => {
            let group = reader.string("group", NAME_BYTES_MAX).map_err(error)?;
            let key = LaneKey {
                topic: reader.string("topic", NAME_BYTES_MAX).map_err(error)?,
                partition: PartitionId(reader.u32("partition").map_err(error)?),
                lane: Lane(reader.u8("lane").map_err(error)?),
            };
            let offset = Offset(reader.u64("offset").map_err(error)?);
            groups.entry(group).or_default().insert(key, offset);
        }
        FORGET_GROUP => {
            groups.remove(&reader.string("group", NAME_BYTES_MAX).map_err(error)?);
        }
        FORGET_TOPIC => forget_topic(groups, &reader.string("topic", NAME_BYTES_MAX).map_err(error)?),
        kind => return Err(format!("unknown record kind {kind}")),
    }
    reader.finish().map_err(error)
}

fn malformed(dir: &std::path::Path, offset: Offset, reason: String) -> OffsetsError {
    OffsetsError::Malformed {
        dir: dir.to_owned(),
        offset,
        reason,
    }
}

fn unix_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(topic: &str, partition: u32, lane: u8) -> LaneKey {
        LaneKey {
            topic: topic.into(),
            partition: PartitionId(partition),
            lane: Lane(lane),
        }
    }

    fn open(dir: &std::path::Path) -> OffsetStore {
        OffsetStore::open(dir.join("offsets"), 64 * 1024).unwrap()
    }

    #[test]
    fn commits_and_forgets_replay_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path());
            store
                .commit(
                    "g",
                    &[(key("orders", 0, 0), Offset(5)), (key("orders", 1, 2), Offset(9))],
                )
                .unwrap();
            store.commit("g", &[(key("orders", 0, 0), Offset(7))]).unwrap();
            store.commit("h", &[(key("returns", 0, 0), Offset(1))]).unwrap();
            store.commit("h", &[(key("orders", 0, 0), Offset(3))]).unwrap();
            store.forget_topic("returns").unwrap();
            store.commit("gone", &[(key("orders", 0, 0), Offset(1))]).unwrap();
            store.forget_group("gone").unwrap();
            store.flush().unwrap();
            // No close: reopening must not depend on a clean shutdown.
        }
        let store = open(dir.path());
        assert_eq!(store.groups(), vec!["g", "h"]);
        let g = store.group("g");
        assert_eq!(g[&key("orders", 0, 0)], Offset(7));
        assert_eq!(g[&key("orders", 1, 2)], Offset(9));
        assert_eq!(
            store.group("h").into_iter().collect::<Vec<_>>(),
            vec![(key("orders", 0, 0), Offset(3))]
        );
        // Per lane log, the lowest of the groups still there.
        assert_eq!(
            store
                .lowest_committed(|_, _| true)
                .into_iter()
                .collect::<Vec<_>>(),
            vec![(key("orders", 0, 0), Offset(3)), (key("orders", 1, 2), Offset(9))]
        );
        assert_eq!(
            store
                .lowest_committed(|group, _| group == "g")
                .into_iter()
                .collect::<Vec<_>>(),
            vec![(key("orders", 0, 0), Offset(7)), (key("orders", 1, 2), Offset(9))]
        );
        assert_eq!(
            store.lowest_committed_on(&key("orders", 0, 0), |_| true),
            Some(Offset(3))
        );
        assert_eq!(
            store.lowest_committed_on(&key("orders", 0, 0), |group| group == "g"),
            Some(Offset(7))
        );
        assert_eq!(store.lowest_committed_on(&key("returns", 0, 0), |_| true), None);
    }

    #[test]
    fn rewrites_keep_the_log_bounded_and_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        for round in 0..20_000u64 {
            let partition = (round % 50) as u32;
            store
                .commit("g", &[(key("orders", partition, 0), Offset(round))])
                .unwrap();
            if round % 100 == 0 {
                store.flush().unwrap();
            }
        }
        store.flush().unwrap();
        let size: u64 = std::fs::read_dir(dir.path().join("offsets"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|path| path.extension().is_some_and(|e| e == "log"))
            .map(|path| std::fs::metadata(path).unwrap().len())
            .sum();
        // 20 000 commits of ~40 bytes would be ~1.3 MB; rewrites keep a few segments.
        assert!(size < 1 << 20, "offsets log is {size} bytes");
        drop(store);
        let store = open(dir.path());
        let g = store.group("g");
        assert_eq!(g.len(), 50);
        for partition in 0..50u64 {
            let last = (0..20_000u64).filter(|r| r % 50 == partition).max().unwrap();
            assert_eq!(g[&key("orders", partition as u32, 0)], Offset(last));
        }
    }
}
