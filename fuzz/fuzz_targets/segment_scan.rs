//! Any bytes as the only segment of a lane log, which is then opened: recovery scans
//! it. The first input byte chooses extras: bit 0 also writes the rest as the segment's
//! offset index, bit 1 as its time index, bit 2 as the checkpoint file.
//!
//! Checks: opening never panics and either fails with an error or gives a log whose
//! every readable byte, from its start offset to its end, is whole valid batches with
//! contiguous offsets; an append to it (if the log takes writes) lands at its end.
#![no_main]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use lanes_broker::storage::{LaneLog, LogConfig};
use lanes_protocol::record_batch::ProducerStamp;
use lanes_protocol::{BatchLimits, Batches, Offset, RecordBatchBuilder};
use libfuzzer_sys::fuzz_target;

/// A fresh directory per input, on tmpfs where there is one.
fn scratch_dir() -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    base.join(format!(
        "lanes-fuzz-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, segment)) = data.split_first() else {
        return;
    };
    let dir = scratch_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let base = "00000000000000000000";
    std::fs::write(dir.join(format!("{base}.log")), segment).unwrap();
    if flags & 1 != 0 {
        std::fs::write(dir.join(format!("{base}.index")), segment).unwrap();
    }
    if flags & 2 != 0 {
        std::fs::write(dir.join(format!("{base}.timeindex")), segment).unwrap();
    }
    if flags & 4 != 0 {
        std::fs::write(dir.join("checkpoint"), &segment[..segment.len().min(64)]).unwrap();
    }
    let config = LogConfig {
        segment_bytes_max: 1 << 20,
        index_bytes_max: 64 * 1024,
        index_interval_bytes: 256,
        ..LogConfig::default()
    };
    if let Ok(log) = LaneLog::open(&dir, config) {
        check(&log);
    }
    std::fs::remove_dir_all(&dir).unwrap();
});

fn check(log: &LaneLog) {
    let end = log.next_offset();
    let mut offset = log.start_offset();
    while offset < end {
        let Ok(slice) = log.read(offset, 64 * 1024, end) else {
            // Corruption found by the read itself is reported, never served.
            assert!(log.corruption().is_some(), "a read failed without a reason");
            return;
        };
        assert!(slice.next_offset > offset, "a read made no progress at {offset}");
        let mut expected = offset;
        for batch in Batches::new(Bytes::clone(&slice.bytes), BatchLimits::default()) {
            let batch = batch.expect("a served batch is valid");
            assert!(batch.header().base_offset <= expected, "a gap before {expected}");
            expected = batch.header().next_offset();
        }
        assert_eq!(expected, slice.next_offset, "the slice ends where it says");
        offset = slice.next_offset;
    }
    let mut builder = RecordBatchBuilder::new(BatchLimits::default());
    builder.push(0, Some(b"key"), b"value", &[]).unwrap();
    let mut batch = builder.finish(ProducerStamp::NONE).to_vec();
    if let Ok(outcome) = log.append(&mut batch) {
        assert_eq!(outcome.base_offset, end, "an append lands at the end");
        assert_eq!(log.next_offset(), Offset(end.0 + 1));
    }
}
