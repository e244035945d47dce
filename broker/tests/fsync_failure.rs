//! Reliability suite 8, fsync failure (at the storage level, through a fail-point in
//! `LogConfig`): once an fsync fails, the lane log stops acknowledging. It takes no
//! more writes, never retries the failed fsync (the kernel may have dropped the pages
//! it could not write), and its durable watermark stays where it was. Everything
//! acknowledged before survives a restart.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use lanes_broker::storage::{LaneLog, LogConfig, StorageError};
use lanes_protocol::Offset;
use lanes_protocol::record_batch::ProducerStamp;
use support::{batch, read_all, small_config, values};

#[test]
fn a_failed_fsync_stops_the_log_and_keeps_what_was_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let fault = Arc::new(AtomicBool::new(false));
    let config = LogConfig {
        fsync_fault: Some(Arc::clone(&fault)),
        ..small_config()
    };
    let log = LaneLog::open(dir.path(), config).unwrap();
    // Acknowledged: appended and fsynced across several segments.
    let acknowledged: Vec<Vec<u8>> = (0..20).flat_map(|tag| values(tag, 3, 300)).collect();
    for chunk in acknowledged.chunks(3) {
        log.append(&mut batch(chunk, 1_000, ProducerStamp::NONE)).unwrap();
    }
    let durable = log.flush().unwrap();
    assert_eq!(durable, Offset(60));

    // The disk fails: the append is written, its fsync fails.
    fault.store(true, Ordering::Release);
    log.append(&mut batch(&values(99, 3, 300), 2_000, ProducerStamp::NONE))
        .unwrap();
    assert!(log.flush().is_err(), "the failed fsync is reported");
    assert_eq!(
        log.durable_offset(),
        durable,
        "nothing past the failure is durable"
    );

    // Fail-stop: even with the disk healthy again, no retry and no new writes.
    fault.store(false, Ordering::Release);
    assert!(log.flush().is_err(), "a failed fsync is never retried");
    let refused = log.append(&mut batch(&values(100, 1, 10), 3_000, ProducerStamp::NONE));
    assert!(matches!(refused, Err(StorageError::Failed { .. })), "{refused:?}");
    assert_eq!(log.durable_offset(), durable);
    // Reads of what was acknowledged go on.
    let read = read_all(&log, Offset(0), durable);
    assert_eq!(read.len(), acknowledged.len());
    drop(log);

    // After a restart, every acknowledged record is there, unchanged.
    let log = LaneLog::open(dir.path(), small_config()).unwrap();
    let read: Vec<Vec<u8>> = read_all(&log, Offset(0), durable)
        .into_iter()
        .map(|(_, value)| value)
        .collect();
    assert_eq!(read, acknowledged);
    // And the log takes writes again, after what it holds.
    let next = log.next_offset();
    assert!(next >= durable);
    let appended = log
        .append(&mut batch(&values(101, 1, 10), 4_000, ProducerStamp::NONE))
        .unwrap();
    assert_eq!(appended.base_offset, next);
}
