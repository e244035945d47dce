//! Regression tests for bugs found in review of the storage engine, each of which
//! failed before its fix.

mod support;

use std::fs::{self, OpenOptions};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use lanes_broker::storage::{FsyncPolicy, LaneLog, LogConfig, StorageError};
use lanes_protocol::Offset;
use lanes_protocol::record_batch::ProducerStamp;
use support::*;

/// (sequence, clean_offset, segment_base, position, clean_shutdown) of the newest slot.
fn checkpoint(dir: &Path) -> (u64, u64, u64, u32, bool) {
    let bytes = fs::read(dir.join("checkpoint")).unwrap();
    bytes
        .chunks_exact(64)
        .map(|s| {
            (
                u64::from_be_bytes(s[0..8].try_into().unwrap()),
                u64::from_be_bytes(s[8..16].try_into().unwrap()),
                u64::from_be_bytes(s[16..24].try_into().unwrap()),
                u32::from_be_bytes(s[24..28].try_into().unwrap()),
                s[28] == 1,
            )
        })
        .max_by_key(|s| s.0)
        .unwrap()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// close() used to flush, then record the clean point: appends in between were
/// counted as durable without being fsynced. Closing while appending must record only
/// durable data, and a power loss after it must not look like corruption.
#[test]
fn close_records_only_durable_data_while_appends_race_it() {
    for _ in 0..50 {
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig {
            segment_bytes_max: 1 << 22,
            ..small_config()
        };
        let log = Arc::new(LaneLog::open(dir.path(), config.clone()).unwrap());
        log.append(&mut batch(&values(0, 1, 10), 0, ProducerStamp::NONE))
            .unwrap();
        let appender = {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                let mut tag = 1;
                loop {
                    match log.append(&mut batch(&values(tag, 1, 10), 0, ProducerStamp::NONE)) {
                        Ok(_) => tag += 1,
                        Err(StorageError::Closed { .. }) => break,
                        Err(e) => panic!("{e}"),
                    }
                }
            })
        };
        std::thread::sleep(Duration::from_millis(2));
        log.close().unwrap();
        appender.join().unwrap();
        let durable = log.durable_offset().0;
        let (_, clean_offset, _, _, clean_shutdown) = checkpoint(dir.path());
        assert!(clean_shutdown);
        assert_eq!(
            clean_offset, durable,
            "the clean point is exactly the durable point"
        );
        assert_eq!(
            log.next_offset().0,
            durable,
            "everything appended before close is durable"
        );
        // A power loss cannot take anything: reopening finds a clean, whole log.
        let (file, position) = position_of(dir.path(), durable);
        drop(log);
        OpenOptions::new()
            .write(true)
            .open(&file)
            .unwrap()
            .set_len(position)
            .unwrap();
        let log = LaneLog::open(dir.path(), config).unwrap();
        assert_eq!(log.recovery_report().corruption, None);
        assert_eq!(log.next_offset().0, durable);
    }
}

/// `retention_ms` above i64::MAX used to wrap to a negative age: keep-forever deleted all.
#[test]
fn huge_retention_ms_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        retention_ms: Some(u64::MAX),
        ..small_config()
    };
    let log = LaneLog::open(dir.path(), config).unwrap();
    for tag in 0..60 {
        log.append(&mut batch(&values(tag, 3, 100), now_ms(), ProducerStamp::NONE))
            .unwrap();
    }
    assert_eq!(log.enforce_retention_now().unwrap().segments_deleted, 0);
}

/// Retention must never delete the segment a checkpoint names (recovery would lose its
/// clean point); with rare fsyncs it moves the clean point first.
#[test]
fn retention_keeps_the_checkpoint_on_an_existing_segment() {
    for fsync in [
        FsyncPolicy::Interval(Duration::from_secs(3600)),
        FsyncPolicy::Never,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig {
            fsync,
            retention_bytes: Some(8000),
            ..small_config()
        };
        let log = LaneLog::open(dir.path(), config).unwrap();
        let mut deleted_total = 0;
        for round in 0..5 {
            for tag in 0..30 {
                log.append(&mut batch(
                    &values(round * 100 + tag, 2, 100),
                    0,
                    ProducerStamp::NONE,
                ))
                .unwrap();
            }
            deleted_total += log.enforce_retention(0).unwrap().segments_deleted;
            let (_, clean_offset, segment_base, _, _) = checkpoint(dir.path());
            let named = dir.path().join(format!("{segment_base:020}.log"));
            assert!(
                named.exists(),
                "the checkpoint names deleted segment {segment_base}"
            );
            assert!(clean_offset >= log.start_offset().0);
        }
        assert!(deleted_total > 0, "retention still deletes with fsync {fsync:?}");
    }
}

/// A batch header chain spanning more than 2^32 offsets used to panic the open.
#[test]
fn a_crafted_sealed_segment_is_corruption_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let span: u64 = u64::from(u32::MAX);
    let next_base = 3 * span;
    fs::write(dir.path().join(format!("{next_base:020}.log")), b"").unwrap();
    let log = LaneLog::open(dir.path(), small_config()).unwrap();
    log.close().unwrap();
    drop(log);
    let mut crafted = Vec::new();
    for i in 0..3u64 {
        let mut h = [0u8; 56];
        h[0..8].copy_from_slice(&(i * span).to_be_bytes());
        h[12..16].copy_from_slice(&56u32.to_be_bytes());
        h[16] = 1;
        h[20..24].copy_from_slice(&u32::MAX.to_be_bytes());
        h[24..28].copy_from_slice(&(u32::MAX - 1).to_be_bytes());
        crafted.extend_from_slice(&h);
    }
    fs::write(dir.path().join(format!("{:020}.log", 0)), &crafted).unwrap();
    let log = LaneLog::open(dir.path(), small_config()).unwrap();
    assert!(log.recovery_report().corruption.is_some());
}

/// Damage found by a read used to be forgotten by a restart: the log took writes again.
#[test]
fn corruption_found_by_a_read_is_remembered_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let log = LaneLog::open(dir.path(), small_config()).unwrap();
    for tag in 0..40 {
        log.append(&mut batch(&values(tag, 2, 100), 0, ProducerStamp::NONE))
            .unwrap();
    }
    log.close().unwrap();
    drop(log);
    let sealed = segment_files(dir.path())[1].clone();
    let victim = batch_boundaries(&sealed)[2];
    let mut bytes = fs::read(&sealed).unwrap();
    bytes[(victim.end - 5) as usize] ^= 0x10;
    fs::write(&sealed, &bytes).unwrap();

    let log = LaneLog::open(dir.path(), small_config()).unwrap();
    assert!(log.read(Offset(victim.base), 1 << 20, log.next_offset()).is_err());
    log.close().unwrap();
    drop(log);
    let log = LaneLog::open(dir.path(), small_config()).unwrap();
    assert_eq!(log.corruption().map(|c| c.offset), Some(Offset(victim.base)));
    assert!(
        log.append(&mut batch(&values(1, 1, 1), 0, ProducerStamp::NONE))
            .is_err()
    );
    assert!(log.read(Offset(victim.base), 1 << 20, log.next_offset()).is_err());
    assert!(!read_all(&log, Offset(0), Offset(victim.base)).is_empty());
    drop(log);
    // The operator repairs (here: restores the bit) and removes the marker.
    bytes[(victim.end - 5) as usize] ^= 0x10;
    fs::write(&sealed, &bytes).unwrap();
    fs::remove_file(dir.path().join("corrupt")).unwrap();
    let log = LaneLog::open(dir.path(), small_config()).unwrap();
    assert!(log.corruption().is_none());
    assert_eq!(read_all(&log, Offset(0), log.next_offset()).len(), 80);
}

/// Two opens of one lane log used to be allowed; the second recovered files under the
/// first one's mappings.
#[test]
fn a_lane_log_cannot_be_opened_twice() {
    let dir = tempfile::tempdir().unwrap();
    let first = LaneLog::open(dir.path(), small_config()).unwrap();
    assert!(matches!(
        LaneLog::open(dir.path(), small_config()),
        Err(StorageError::Locked { .. })
    ));
    drop(first);
    LaneLog::open(dir.path(), small_config()).unwrap();
}
