//! Helpers shared by the storage integration tests: batch building, reading a whole
//! log back, and finding batch boundaries in segment files on disk.
#![allow(dead_code, unreachable_pub)]

use std::fs;
use std::path::{Path, PathBuf};

use bytes::BytesMut;
use lanes_broker::storage::{FsyncPolicy, LaneLog, LogConfig};
use lanes_protocol::record_batch::{ProducerStamp, peek_prefix};
use lanes_protocol::{BatchLimits, Batches, Offset, RecordBatchBuilder};

/// Small segments and a dense index so that tests cross many segment boundaries.
pub fn small_config() -> LogConfig {
    LogConfig {
        segment_bytes_max: 4096,
        index_interval_bytes: 256,
        index_bytes_max: 4096,
        batch: BatchLimits {
            batch_bytes_max: 4096,
            batch_records_max: 1000,
        },
        fsync: FsyncPolicy::Always,
        retention_ms: None,
        retention_bytes: None,
        ..LogConfig::default()
    }
}

/// A batch of `values`, record `i` stamped `timestamp_ms + i`.
pub fn batch(values: &[Vec<u8>], timestamp_ms: i64, producer: ProducerStamp) -> BytesMut {
    let mut builder = RecordBatchBuilder::new(BatchLimits {
        batch_bytes_max: u32::MAX,
        batch_records_max: u32::MAX,
    });
    for (i, value) in values.iter().enumerate() {
        let key = format!("key-{i}");
        builder
            .push(timestamp_ms + i as i64, Some(key.as_bytes()), value, &[])
            .expect("fits");
    }
    BytesMut::from(&builder.finish(producer)[..])
}

/// `count` distinct values of `len` bytes, tagged with `tag`.
pub fn values(tag: u64, count: usize, len: usize) -> Vec<Vec<u8>> {
    (0..count)
        .map(|i| {
            let mut value = format!("{tag}:{i}:").into_bytes();
            value.resize(len.max(value.len()), b'a' + (tag % 26) as u8);
            value
        })
        .collect()
}

/// Every record from `from` up to `limit`, as (offset, value), checking every batch's
/// checksum on the way, as a consumer would.
pub fn read_all(log: &LaneLog, from: Offset, limit: Offset) -> Vec<(Offset, Vec<u8>)> {
    let mut out = Vec::new();
    let mut offset = from;
    while offset < limit {
        let slice = log.read(offset, 1 << 16, limit).expect("read");
        if slice.bytes.is_empty() {
            break;
        }
        assert!(slice.next_offset > offset, "reads make progress");
        for batch in Batches::new(
            slice.bytes,
            BatchLimits {
                batch_bytes_max: u32::MAX,
                batch_records_max: u32::MAX,
            },
        ) {
            let batch = batch.expect("every batch served passes its checksum");
            for record in batch.records() {
                if record.offset >= offset {
                    out.push((record.offset, record.value.to_vec()));
                }
            }
        }
        offset = slice.next_offset;
    }
    out
}

/// The `.log` files of a lane log directory, in offset order.
pub fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    files.sort();
    files
}

/// Files of a lane log directory with the given extension, in offset order.
pub fn files_with_extension(dir: &Path, extension: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == extension))
        .collect();
    files.sort();
    files
}

/// One batch found on disk.
#[derive(Clone, Copy, Debug)]
pub struct OnDisk {
    pub position: u64,
    pub end: u64,
    pub base: u64,
    pub next: u64,
}

/// The batches of a segment file, following length prefixes only.
pub fn batch_boundaries(path: &Path) -> Vec<OnDisk> {
    let bytes = fs::read(path).unwrap();
    let mut out = Vec::new();
    let mut position = 0usize;
    while let Some((base, length)) = peek_prefix(&bytes[position..]) {
        let length = length as usize;
        if length < 56 || position + length > bytes.len() {
            break;
        }
        let count = u32::from_be_bytes(bytes[position + 20..position + 24].try_into().unwrap());
        out.push(OnDisk {
            position: position as u64,
            end: (position + length) as u64,
            base: base.0,
            next: base.0 + u64::from(count),
        });
        position += length;
    }
    out
}

/// The segment file and byte position where `offset` begins on disk: the start of the
/// batch based at it, or the end of the batch that ends just before it.
pub fn position_of(dir: &Path, offset: u64) -> (PathBuf, u64) {
    for file in segment_files(dir).into_iter().rev() {
        let boundaries = batch_boundaries(&file);
        if let Some(found) = boundaries.iter().find(|b| b.base == offset) {
            return (file, found.position);
        }
        if let Some(found) = boundaries.iter().find(|b| b.next == offset) {
            return (file, found.end);
        }
    }
    let files = segment_files(dir);
    if let Some(first) = files.first()
        && batch_boundaries(first).is_empty()
    {
        return (first.clone(), 0);
    }
    panic!("offset {offset} is not a batch boundary on disk");
}
