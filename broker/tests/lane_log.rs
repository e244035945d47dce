//! The lane log through its public API, on real files: appends and reads, rolls,
//! durability, recovery from torn tails, garbage, bit rot and lost indexes, retention
//! and idempotent producers.

mod support;

use std::fs::{self, OpenOptions};
use std::path::Path;
use std::time::Duration;

use bytes::BytesMut;
use lanes_broker::storage::{AppendOutcome, FsyncPolicy, LaneLog, LogConfig, Reaper, StorageError};
use lanes_protocol::record_batch::ProducerStamp;
use lanes_protocol::{BatchError, Offset};
use support::*;

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// Appends `count` batches of `per_batch` records of `len` bytes; returns all values.
fn fill(log: &LaneLog, first_tag: u64, count: u64, per_batch: usize, len: usize) -> Vec<Vec<u8>> {
    let mut all = Vec::new();
    for tag in first_tag..first_tag + count {
        let values = values(tag, per_batch, len);
        let mut bytes = batch(&values, 1_000 + tag as i64 * 10, ProducerStamp::NONE);
        log.append(&mut bytes).unwrap();
        all.extend(values);
    }
    all
}

fn expect_values(log: &LaneLog, expected: &[Vec<u8>]) {
    let read = read_all(log, log.start_offset(), log.next_offset());
    assert_eq!(read.len(), expected.len(), "record count");
    for (i, ((offset, value), want)) in read.iter().zip(expected).enumerate() {
        assert_eq!(*offset, Offset(i as u64), "offsets are dense from 0");
        assert_eq!(value, want, "value at offset {i}");
    }
}

#[test]
fn appends_read_back_across_segments_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let log = LaneLog::open(dir.path(), small_config()).unwrap();
    let written = fill(&log, 0, 60, 3, 100);
    assert_eq!(log.next_offset(), Offset(180));
    assert!(segment_files(dir.path()).len() > 3, "small segments roll");
    expect_values(&log, &written);

    // Reading from the middle of a batch starts with the batch holding the offset.
    let slice = log.read(Offset(31), 1, log.next_offset()).unwrap();
    assert_eq!(
        slice.next_offset,
        Offset(33),
        "one whole batch even past bytes_max"
    );

    log.close().unwrap();
    drop(log);
    let log = LaneLog::open(dir.path(), small_config()).unwrap();
    let report = log.recovery_report();
    assert!(report.clean_shutdown);
    assert_eq!(report.checked_bytes, 0, "a clean close needs no checking");
    assert_eq!(report.rebuilt_indexes, 0);
    expect_values(&log, &written);
    let more = fill(&log, 100, 5, 2, 50);
    assert_eq!(log.next_offset(), Offset(190));
    expect_values(&log, &[written, more].concat());
}

#[test]
fn reads_respect_the_limit_and_range() {
    let dir = tempfile::tempdir().unwrap();
    let log = LaneLog::open(dir.path(), small_config()).unwrap();
    fill(&log, 0, 4, 5, 10);
    let slice = log.read(Offset(0), 1 << 20, Offset(12)).unwrap();
    assert_eq!(
        slice.next_offset,
        Offset(10),
        "a batch reaching past the limit is not served"
    );
    let empty = log.read(Offset(20), 1 << 20, log.next_offset()).unwrap();
    assert!(empty.bytes.is_empty());
    assert!(matches!(
        log.read(Offset(21), 100, log.next_offset()),
        Err(StorageError::OffsetOutOfRange { .. })
    ));
}

#[test]
fn durable_offset_follows_flush() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        fsync: FsyncPolicy::Interval(Duration::from_secs(3600)),
        ..small_config()
    };
    let log = LaneLog::open(dir.path(), config).unwrap();
    fill(&log, 0, 3, 2, 10);
    assert_eq!(log.durable_offset(), Offset(0));
    assert!(
        !log.fsync_due(std::time::Instant::now()),
        "the interval has not passed"
    );
    assert_eq!(log.flush().unwrap(), Offset(6));
    assert_eq!(log.durable_offset(), Offset(6));
    assert_eq!(log.stats().sync_rounds, 1);
    assert_eq!(log.flush().unwrap(), Offset(6));
    assert_eq!(log.stats().sync_rounds, 1, "nothing new, no fsync");
}

#[test]
fn invalid_batches_are_refused_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let log = LaneLog::open(dir.path(), small_config()).unwrap();
    let mut good = batch(&values(1, 2, 10), 0, ProducerStamp::NONE);
    let mut corrupt = good.clone();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 1;
    assert!(matches!(
        log.append(&mut corrupt),
        Err(StorageError::InvalidBatch(BatchError::ChecksumMismatch { .. }))
    ));
    let mut huge = batch(&values(2, 1, 5000), 0, ProducerStamp::NONE);
    assert!(matches!(
        log.append(&mut huge),
        Err(StorageError::InvalidBatch(BatchError::LengthOutOfRange { .. }))
    ));
    let mut two = good.clone();
    two.extend_from_slice(&good);
    assert!(matches!(
        log.append(&mut two),
        Err(StorageError::InvalidBatch(BatchError::LengthMismatch { .. }))
    ));
    assert_eq!(log.next_offset(), Offset(0));
    log.append(&mut good).unwrap();
    assert_eq!(log.next_offset(), Offset(2));
}

/// A log with `durable` batches flushed and `loose` more written but not flushed, then
/// dropped as in a crash. Returns the values and the durable record count.
fn crashed_log(dir: &Path, durable: u64, loose: u64) -> (Vec<Vec<u8>>, u64) {
    let log = LaneLog::open(dir, small_config()).unwrap();
    let mut written = fill(&log, 0, durable, 2, 40);
    log.flush().unwrap();
    let durable_records = log.durable_offset().0;
    written.extend(fill(&log, durable, loose, 2, 40));
    drop(log);
    (written, durable_records)
}

#[test]
fn a_torn_tail_is_cut_at_every_byte() {
    let template = tempfile::tempdir().unwrap();
    let (written, durable) = crashed_log(template.path(), 5, 3);
    let (last_file, durable_position) = position_of(template.path(), durable);
    let file_len = fs::metadata(&last_file).unwrap().len();
    let boundaries = batch_boundaries(&last_file);
    for cut in durable_position..=file_len {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(template.path(), dir.path());
        let target = dir.path().join(last_file.file_name().unwrap());
        OpenOptions::new()
            .write(true)
            .open(&target)
            .unwrap()
            .set_len(cut)
            .unwrap();

        let log = LaneLog::open(dir.path(), small_config()).unwrap();
        let complete = boundaries
            .iter()
            .filter(|b| b.end <= cut)
            .map(|b| b.next)
            .max()
            .unwrap_or(0);
        let expected_next = complete.max(durable);
        assert_eq!(log.next_offset(), Offset(expected_next), "cut at byte {cut}");
        assert!(log.recovery_report().corruption.is_none());
        expect_values(&log, &written[..expected_next as usize]);
        // New appends continue right after the last complete batch.
        let outcome = log
            .append(&mut batch(&values(99, 1, 8), 0, ProducerStamp::NONE))
            .unwrap();
        assert_eq!(outcome.base_offset, Offset(expected_next));
        log.flush().unwrap();
        assert_eq!(read_all(&log, Offset(expected_next), log.next_offset()).len(), 1);
    }
}

#[test]
fn garbage_after_the_tail_is_cut() {
    for garbage in [
        vec![0u8; 300],
        (0..300u32).map(|i| (i * 7 + 3) as u8).collect::<Vec<_>>(),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (written, _) = crashed_log(dir.path(), 3, 2);
        let last = segment_files(dir.path()).pop().unwrap();
        let mut bytes = fs::read(&last).unwrap();
        let before = bytes.len();
        bytes.extend_from_slice(&garbage);
        fs::write(&last, &bytes).unwrap();

        let log = LaneLog::open(dir.path(), small_config()).unwrap();
        assert_eq!(log.next_offset(), Offset(written.len() as u64));
        assert_eq!(log.recovery_report().truncated_bytes, garbage.len() as u64);
        assert_eq!(fs::metadata(&last).unwrap().len(), before as u64);
        expect_values(&log, &written);
    }
}

#[test]
fn an_unsynced_batch_with_lost_contents_is_cut_by_its_checksum() {
    // After a power loss a file can keep its length while blocks that never reached
    // the disk read back as zeros: the header looks fine, only the checksum tells.
    let dir = tempfile::tempdir().unwrap();
    let (written, durable) = crashed_log(dir.path(), 4, 3);
    let (file, position) = position_of(dir.path(), durable);
    let victim = batch_boundaries(&file)
        .into_iter()
        .find(|b| b.position == position)
        .unwrap();
    let mut bytes = fs::read(&file).unwrap();
    bytes[victim.position as usize + 56..victim.end as usize].fill(0);
    fs::write(&file, &bytes).unwrap();

    let log = LaneLog::open(dir.path(), small_config()).unwrap();
    assert_eq!(
        log.next_offset(),
        Offset(durable),
        "the log ends before the damaged batch"
    );
    assert!(
        log.recovery_report().corruption.is_none(),
        "unsynced data is not corruption"
    );
    expect_values(&log, &written[..durable as usize]);
}

#[test]
fn damage_before_the_clean_point_is_corruption_not_truncation() {
    let dir = tempfile::tempdir().unwrap();
    let (_, durable) = crashed_log(dir.path(), 6, 0);
    // Cut into the durable data of the last segment.
    let last = segment_files(dir.path()).pop().unwrap();
    let boundaries = batch_boundaries(&last);
    let victim = boundaries[boundaries.len() - 2];
    OpenOptions::new()
        .write(true)
        .open(&last)
        .unwrap()
        .set_len(victim.position + 10)
        .unwrap();

    let log = LaneLog::open(dir.path(), small_config()).unwrap();
    let corruption = log.recovery_report().corruption.clone().expect("reported");
    assert_eq!(corruption.offset, Offset(victim.base));
    assert!(victim.base < durable);
    assert_eq!(
        fs::metadata(&last).unwrap().len(),
        victim.position + 10,
        "nothing is cut"
    );
    assert!(matches!(
        log.read(Offset(victim.base), 100, Offset(u64::MAX)),
        Err(StorageError::Corrupt { .. })
    ));
    assert!(
        !read_all(&log, Offset(0), Offset(victim.base)).is_empty(),
        "earlier records stay readable"
    );
    let refused = log.append(&mut batch(&values(1, 1, 1), 0, ProducerStamp::NONE));
    assert!(matches!(refused, Err(StorageError::Corrupt { .. })));
    log.close().unwrap();
    drop(log);
    // Still reported on the next open: a corrupt log never writes a new clean point.
    let log = LaneLog::open(dir.path(), small_config()).unwrap();
    assert_eq!(
        log.recovery_report().corruption.as_ref().map(|c| c.offset),
        Some(Offset(victim.base))
    );
}

#[test]
fn bit_rot_in_a_sealed_segment_is_reported_and_never_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let log = LaneLog::open(dir.path(), small_config()).unwrap();
    let written = fill(&log, 0, 40, 2, 100);
    log.close().unwrap();
    drop(log);
    let sealed = segment_files(dir.path())[1].clone();
    let boundaries = batch_boundaries(&sealed);
    let victim = boundaries[2];
    let mut bytes = fs::read(&sealed).unwrap();
    let flip_at = (victim.end - 5) as usize; // inside a record value
    bytes[flip_at] ^= 0x10;
    fs::write(&sealed, &bytes).unwrap();
    let sizes_before: Vec<u64> = segment_files(dir.path())
        .iter()
        .map(|f| fs::metadata(f).unwrap().len())
        .collect();

    let log = LaneLog::open(dir.path(), small_config()).unwrap();
    assert!(
        log.recovery_report().corruption.is_none(),
        "sealed data is checked when read"
    );
    // Records before the damaged batch are served, the batch itself is not.
    let before = read_all(&log, Offset(0), Offset(victim.base));
    assert_eq!(before.len() as u64, victim.base);
    assert_eq!(before.last().unwrap().1, written[victim.base as usize - 1]);
    let error = log
        .read(Offset(victim.base), 1 << 20, log.next_offset())
        .unwrap_err();
    assert!(matches!(error, StorageError::Corrupt { offset, .. } if offset == Offset(victim.base)));
    assert_eq!(log.corruption().unwrap().offset, Offset(victim.base));
    // Nothing past it either, and no writes.
    assert!(log.read(Offset(victim.next + 4), 100, log.next_offset()).is_err());
    assert!(
        log.append(&mut batch(&values(1, 1, 1), 0, ProducerStamp::NONE))
            .is_err()
    );
    log.close().unwrap();
    drop(log);
    let sizes_after: Vec<u64> = segment_files(dir.path())
        .iter()
        .map(|f| fs::metadata(f).unwrap().len())
        .collect();
    assert_eq!(sizes_before, sizes_after, "no file was cut");
}

#[test]
fn a_read_that_reaches_damage_returns_what_precedes_it() {
    let dir = tempfile::tempdir().unwrap();
    let log = LaneLog::open(dir.path(), small_config()).unwrap();
    fill(&log, 0, 30, 2, 100);
    log.close().unwrap();
    drop(log);
    let sealed = segment_files(dir.path())[0].clone();
    let victim = batch_boundaries(&sealed)[3];
    let mut bytes = fs::read(&sealed).unwrap();
    bytes[victim.position as usize + 30] ^= 1; // inside the header, under the checksum
    fs::write(&sealed, &bytes).unwrap();

    let log = LaneLog::open(dir.path(), small_config()).unwrap();
    let slice = log.read(Offset(0), 1 << 20, log.next_offset()).unwrap();
    assert_eq!(
        slice.next_offset,
        Offset(victim.base),
        "stops before the damaged batch"
    );
    assert_eq!(log.corruption().unwrap().offset, Offset(victim.base));
}

fn lookups_are_correct(log: &LaneLog, written: &[Vec<u8>]) {
    let next = log.next_offset().0;
    for offset in 0..next {
        let slice = log.read(Offset(offset), 1, Offset(next)).unwrap();
        let records = read_all_from_slice(slice.bytes);
        assert!(
            records
                .iter()
                .any(|(o, v)| *o == Offset(offset) && *v == written[offset as usize])
        );
    }
    // Record i of batch `tag` has timestamp 1000 + tag * 10 + i; batches hold 3 records.
    for tag in 0..(next / 3) {
        let timestamp = 1_000 + tag as i64 * 10;
        assert_eq!(
            log.offset_for_timestamp(timestamp, Offset(next)).unwrap(),
            Some(Offset(tag * 3))
        );
        assert_eq!(
            log.offset_for_timestamp(timestamp + 1, Offset(next)).unwrap(),
            Some(Offset(tag * 3 + 1))
        );
        assert_eq!(
            log.offset_for_timestamp(timestamp + 3, Offset(next)).unwrap(),
            Some(Offset(tag * 3 + 3)).filter(|o| o.0 < next)
        );
    }
    assert_eq!(log.offset_for_timestamp(i64::MAX, Offset(next)).unwrap(), None);
    assert_eq!(
        log.offset_for_timestamp(i64::MIN, Offset(next)).unwrap(),
        Some(Offset(0))
    );
}

fn read_all_from_slice(bytes: bytes::Bytes) -> Vec<(Offset, Vec<u8>)> {
    lanes_protocol::Batches::new(bytes, Default::default())
        .flat_map(|batch| {
            batch
                .unwrap()
                .records()
                .map(|r| (r.offset, r.value.to_vec()))
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn lost_indexes_are_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let log = LaneLog::open(dir.path(), small_config()).unwrap();
    let written = fill(&log, 0, 50, 3, 60);
    log.close().unwrap();
    drop(log);
    let original: Vec<Vec<u8>> = files_with_extension(dir.path(), "index")
        .iter()
        .map(|f| fs::read(f).unwrap())
        .collect();
    for file in files_with_extension(dir.path(), "index")
        .iter()
        .chain(&files_with_extension(dir.path(), "timeindex"))
    {
        fs::remove_file(file).unwrap();
    }
    let log = LaneLog::open(dir.path(), small_config()).unwrap();
    assert_eq!(
        log.recovery_report().rebuilt_indexes,
        segment_files(dir.path()).len()
    );
    lookups_are_correct(&log, &written);
    log.close().unwrap();
    drop(log);
    let rebuilt: Vec<Vec<u8>> = files_with_extension(dir.path(), "index")
        .iter()
        .map(|f| fs::read(f).unwrap())
        .collect();
    assert_eq!(
        original, rebuilt,
        "an index rebuilt from the log equals the one built on append"
    );
}

#[test]
fn scrambled_indexes_are_rebuilt_or_bypassed() {
    let dir = tempfile::tempdir().unwrap();
    let log = LaneLog::open(dir.path(), small_config()).unwrap();
    let written = fill(&log, 0, 50, 3, 60);
    log.close().unwrap();
    drop(log);
    let mut seed = 0x9e37_79b9u32;
    for file in files_with_extension(dir.path(), "index")
        .iter()
        .chain(&files_with_extension(dir.path(), "timeindex"))
    {
        let mut bytes = fs::read(file).unwrap();
        for byte in bytes.iter_mut() {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            *byte = (seed >> 24) as u8;
        }
        fs::write(file, &bytes).unwrap();
    }
    let log = LaneLog::open(dir.path(), small_config()).unwrap();
    assert!(log.recovery_report().rebuilt_indexes > 0);
    lookups_are_correct(&log, &written);

    // Plausible but wrong entries (sane shape, wrong positions) are caught at lookup.
    log.close().unwrap();
    drop(log);
    let index = files_with_extension(dir.path(), "index")[0].clone();
    let mut bytes = fs::read(&index).unwrap();
    if bytes.len() >= 8 {
        let position = u32::from_be_bytes(bytes[4..8].try_into().unwrap());
        bytes[4..8].copy_from_slice(&(position - 1).to_be_bytes());
        fs::write(&index, &bytes).unwrap();
    }
    let log = LaneLog::open(dir.path(), small_config()).unwrap();
    lookups_are_correct(&log, &written);
}

/// The reaper frees deleted segments gradually, and never shrinks one that a reader
/// still holds a slice of (reading it would then be a SIGBUS, killing this test).
#[test]
fn retention_hands_segments_to_the_reaper_which_waits_for_their_readers() {
    let dir = tempfile::tempdir().unwrap();
    let reaper = Reaper::start(1 << 30);
    let config = LogConfig {
        retention_bytes: Some(8192),
        reaper: Some(std::sync::Arc::clone(&reaper)),
        ..small_config()
    };
    let log = LaneLog::open(dir.path(), config).unwrap();
    let written = fill(&log, 0, 80, 2, 100);
    // The oldest segment's file is kept as the next segment's (its pages are cached, the
    // log is busy), not freed: read from the second.
    let second: u64 = segment_files(dir.path())[1]
        .file_stem()
        .and_then(|stem| stem.to_str())
        .and_then(|stem| stem.parse().ok())
        .unwrap();
    let held = log.read(Offset(second), 1, log.next_offset()).unwrap();
    let held_copy = held.bytes.to_vec();
    let before = log.stats();

    let outcome = log.enforce_retention(0).unwrap();
    assert!(outcome.segments_deleted > 2);
    let recycled = std::fs::metadata(dir.path().join("next-segment.tmp"))
        .unwrap()
        .len();
    assert_eq!(
        segment_files(dir.path()).len(),
        log.stats().segments,
        "the names go at once"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let wait = |what: &str, done: &dyn Fn() -> bool| {
        while !done() {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    // Every segment but the one read from is freed; that one waits for its reader.
    wait("the unread segments to be freed", &|| reaper.stats().files <= 1);
    let rounds = reaper.stats().rounds;
    wait("the reaper to look again", &|| {
        reaper.stats().rounds >= rounds + 2 || reaper.stats().files == 0
    });
    assert_eq!(reaper.stats().files, 1, "the segment read from is still held");
    assert_eq!(&held.bytes[..], &held_copy[..], "the held slice reads as it was");
    drop(held);
    wait("the last segment to be freed", &|| reaper.stats().files == 0);
    let freed = before.size_bytes - log.stats().size_bytes - recycled;
    assert_eq!(
        (reaper.stats().freed_bytes, reaper.stats().pending_bytes),
        (freed, 0)
    );
    let kept = read_all(&log, log.start_offset(), log.next_offset());
    assert_eq!(kept.len() as u64, 160 - log.start_offset().0);
    assert_eq!(kept.last().unwrap().1, *written.last().unwrap());
}

#[test]
fn retention_deletes_old_segments_but_never_the_active_one() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        retention_bytes: Some(8192),
        ..small_config()
    };
    let log = LaneLog::open(dir.path(), config).unwrap();
    fill(&log, 0, 80, 2, 100);
    let before = log.stats();
    let outcome = log.enforce_retention(0).unwrap();
    let after = log.stats();
    assert!(outcome.segments_deleted > 0);
    assert!(after.size_bytes >= 8192 && after.size_bytes < before.size_bytes);
    assert!(after.start_offset > Offset(0));
    assert_eq!(segment_files(dir.path()).len(), after.segments);
    assert!(matches!(
        log.read(Offset(0), 10, log.next_offset()),
        Err(StorageError::OffsetOutOfRange { .. })
    ));
    assert_eq!(
        read_all(&log, after.start_offset, log.next_offset()).len() as u64,
        160 - after.start_offset.0
    );

    // By age: every sealed segment's records are old; the active one always stays.
    let by_age = LogConfig {
        retention_ms: Some(1),
        ..small_config()
    };
    drop(log);
    let log = LaneLog::open(dir.path(), by_age).unwrap();
    log.enforce_retention_now().unwrap();
    assert_eq!(log.stats().segments, 1);
    assert_eq!(segment_files(dir.path()).len(), 1);
    log.append(&mut batch(&values(1, 1, 1), 5, ProducerStamp::NONE))
        .unwrap();
    log.close().unwrap();
    drop(log);
    let log = LaneLog::open(dir.path(), small_config()).unwrap();
    assert_eq!(
        log.stats().segments,
        1,
        "deleted segments stay deleted after a reopen"
    );
    let only = segment_files(dir.path()).pop().unwrap();
    let base: u64 = only.file_stem().unwrap().to_str().unwrap().parse().unwrap();
    assert_eq!(
        log.start_offset(),
        Offset(base),
        "the log starts at its only segment"
    );
    assert_eq!(log.next_offset(), Offset(161));
}

#[test]
fn segments_roll_on_age() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        segment_ms_max: 1,
        segment_bytes_max: 1 << 20,
        ..small_config()
    };
    let log = LaneLog::open(dir.path(), config).unwrap();
    fill(&log, 0, 1, 1, 1);
    std::thread::sleep(Duration::from_millis(5));
    fill(&log, 1, 1, 1, 1);
    assert_eq!(log.stats().segments, 2);
}

fn idempotent(base_sequence: i32) -> ProducerStamp {
    ProducerStamp {
        producer_id: 42,
        producer_epoch: 1,
        base_sequence,
    }
}

/// Appends 20 idempotent batches from `sequence` on (enough to roll segments of
/// `small_config`), then a last one. Returns the last batch's base sequence, its bytes
/// (for a retry) and where it landed.
fn append_past_rolls(log: &LaneLog, mut sequence: i32) -> (i32, BytesMut, AppendOutcome) {
    for tag in 0..20 {
        log.append(&mut batch(&values(tag, 2, 500), 0, idempotent(sequence)))
            .unwrap();
        sequence += 2;
    }
    let last = batch(&values(99, 2, 10), 0, idempotent(sequence));
    let outcome = log.append(&mut last.clone()).unwrap();
    (sequence, last, outcome)
}

#[test]
fn retried_batches_get_their_original_offsets_also_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let log = LaneLog::open(dir.path(), small_config()).unwrap();
    fill(&log, 0, 2, 1, 10);
    let mut first = batch(&values(7, 3, 500), 0, idempotent(0));
    let original = log.append(&mut first.clone()).unwrap();
    assert_eq!(
        (original.base_offset, original.last_offset, original.duplicate),
        (Offset(2), Offset(4), false)
    );
    let retry = log.append(&mut first).unwrap();
    assert_eq!(
        (retry.base_offset, retry.last_offset, retry.duplicate),
        (Offset(2), Offset(4), true)
    );
    // Enough further batches to roll segments, so the state comes from a snapshot.
    let (sequence, mut last, last_outcome) = append_past_rolls(&log, 3);
    assert!(matches!(
        log.append(&mut batch(&values(1, 1, 1), 0, idempotent(sequence + 5))),
        Err(StorageError::OutOfOrderSequence { expected, received, .. }) if expected == sequence + 2 && received == sequence + 5
    ));
    let next = log.next_offset();
    drop(log); // a crash: the producer table must come back from snapshot + log tail

    let log = LaneLog::open(dir.path(), small_config()).unwrap();
    assert!(
        files_with_extension(dir.path(), "snapshot").len() <= 2,
        "old snapshots are deleted"
    );
    let retried = log.append(&mut last).unwrap();
    assert!(retried.duplicate);
    assert_eq!(retried.base_offset, last_outcome.base_offset);
    assert_eq!(log.next_offset(), next);
    let fenced = log.append(&mut batch(
        &values(1, 1, 1),
        0,
        ProducerStamp {
            producer_epoch: 0,
            ..idempotent(0)
        },
    ));
    assert!(matches!(
        fenced,
        Err(StorageError::ProducerFenced { current_epoch: 1, .. })
    ));
}

/// A roll writes the producer snapshot without an fsync (the next fsync round makes it
/// durable), so a power loss can leave snapshots empty or torn. Recovery must then
/// rebuild the table from the log itself: retries are still recognized.
#[test]
fn damaged_producer_snapshots_cost_only_a_longer_replay() {
    let dir = tempfile::tempdir().unwrap();
    let log = LaneLog::open(dir.path(), small_config()).unwrap();
    let (sequence, mut last, last_outcome) = append_past_rolls(&log, 0);
    let next = log.next_offset();
    drop(log); // a crash

    let snapshots = files_with_extension(dir.path(), "snapshot");
    assert!(!snapshots.is_empty(), "the appends rolled segments");
    for (index, path) in snapshots.iter().enumerate() {
        let bytes = std::fs::read(path).unwrap();
        let kept = if index == 0 { 0 } else { bytes.len() / 2 };
        std::fs::write(path, &bytes[..kept]).unwrap();
    }

    let log = LaneLog::open(dir.path(), small_config()).unwrap();
    let retried = log.append(&mut last).unwrap();
    assert!(retried.duplicate, "the retry is recognized without a snapshot");
    assert_eq!(retried.base_offset, last_outcome.base_offset);
    assert_eq!(log.next_offset(), next);
    assert!(matches!(
        log.append(&mut batch(&values(1, 1, 1), 0, idempotent(sequence + 5))),
        Err(StorageError::OutOfOrderSequence { expected, .. }) if expected == sequence + 2
    ));
}

#[test]
fn bad_configuration_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        segment_bytes_max: 1024,
        ..small_config()
    };
    let error = LaneLog::open(dir.path(), config).unwrap_err();
    assert!(error.to_string().contains("batch_bytes_max"), "{error}");
}

#[test]
fn concurrent_readers_see_only_whole_batches_through_rolls_and_retention() {
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        retention_bytes: Some(16 * 1024),
        ..small_config()
    };
    let log = Arc::new(LaneLog::open(dir.path(), config).unwrap());
    const BATCHES: u64 = 1500;
    let writer = {
        let log = Arc::clone(&log);
        std::thread::spawn(move || {
            for tag in 0..BATCHES {
                log.append(&mut batch(&values(tag, 2, 120), 0, ProducerStamp::NONE))
                    .unwrap();
                if tag % 50 == 0 {
                    log.enforce_retention(0).unwrap();
                }
            }
        })
    };
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                let mut offset = Offset(0);
                let mut seen = 0u64;
                while offset < Offset(BATCHES * 2) {
                    match log.read(offset, 8192, log.next_offset()) {
                        Ok(slice) => {
                            let mut expected = offset;
                            for (i, batch) in
                                lanes_protocol::Batches::new(slice.bytes, Default::default()).enumerate()
                            {
                                let batch = batch.expect("only whole, valid batches are served");
                                if i == 0 {
                                    assert!(
                                        batch.base_offset() <= expected && batch.last_offset() >= expected
                                    );
                                } else {
                                    assert_eq!(batch.base_offset(), expected, "batches are contiguous");
                                }
                                expected = batch.last_offset().plus(1);
                                seen += u64::from(batch.record_count());
                            }
                            assert!(slice.next_offset == expected || slice.next_offset == offset);
                            offset = slice.next_offset;
                        }
                        // Retention deleted it first: skip ahead, as a consumer would.
                        Err(StorageError::OffsetOutOfRange { start, .. }) => offset = start.max(offset),
                        Err(other) => panic!("read failed: {other}"),
                    }
                }
                seen
            })
        })
        .collect();
    writer.join().unwrap();
    for reader in readers {
        assert!(reader.join().unwrap() > 0);
    }
    assert!(log.start_offset() > Offset(0), "retention ran");
}

#[test]
fn backlog_counts_records_bytes_and_the_oldest_across_segments() {
    let dir = tempfile::tempdir().unwrap();
    let log = LaneLog::open(dir.path(), small_config()).unwrap();
    fill(&log, 0, 60, 3, 100);
    assert!(segment_files(dir.path()).len() > 3);
    let end = log.next_offset();
    let total_bytes: u64 = segment_files(dir.path())
        .iter()
        .map(|p| fs::metadata(p).unwrap().len())
        .sum();

    let everything = log.backlog(Offset::ZERO, end).unwrap();
    assert_eq!(everything.records, 180);
    assert_eq!(everything.bytes, total_bytes);
    assert_eq!(
        everything.oldest_timestamp_ms,
        Some(1_000),
        "the first batch's timestamp"
    );

    // From the middle of batch 10 (offsets 30..33): whole batches from it on.
    let from_middle = log.backlog(Offset(31), end).unwrap();
    assert_eq!(from_middle.records, 149);
    assert_eq!(from_middle.bytes, total_bytes * 50 / 60, "50 of 60 equal batches");
    assert_eq!(from_middle.oldest_timestamp_ms, Some(1_000 + 10 * 10));

    // Up to a limit below the end, and nothing waiting.
    assert_eq!(
        log.backlog(Offset::ZERO, Offset(30)).unwrap().bytes,
        total_bytes / 6
    );
    assert_eq!(log.backlog(end, end).unwrap(), Default::default());
    assert_eq!(log.backlog(Offset(500), end).unwrap(), Default::default());
}
