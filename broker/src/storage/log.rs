//! [`LaneLog`]: one append-only log of record batches, with its own dense offsets.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use lanes_protocol::record_batch::stamp_base_offset;
use lanes_protocol::{BatchHeader, Offset, validate_batch};
use memmap2::Mmap;

use super::checkpoint::{CheckpointFile, CleanPoint};
use super::config::{FsyncPolicy, LogConfig};
use super::direct_read::{AheadRead, DIRECT_BUFFER_BYTES, DirectReads, ReadAhead, ReadAheadDone};
use super::error::StorageError;
use super::faults;
use super::files::{
    INDEX_SUFFIX, LOG_SUFFIX, SNAPSHOT_SUFFIX, TIME_INDEX_SUFFIX, create_dir_all_durable, fsync_dir,
    offset_file_name, remove_if_exists, write_file_unsynced,
};
use super::producer_state::{ProducerStateTable, SequenceCheck};
use super::reaper::Doomed;
use super::recovery::{self, Corruption, RecoveryReport};
use super::segment::{DIRECT_SLACK_BYTES, DirectSource, DirectlyRead, ScanStop, Segment, page_bytes};

const CHECKPOINT_FILE: &str = "checkpoint";
/// How far ahead of the active segment's end [`LaneLog::start_writeback`] allocates its
/// blocks, in `writeback_bytes`. Kept ahead, an append never allocates: see there.
const ALLOCATE_AHEAD_WRITEBACKS: u32 = 4;
/// The file the next segment will be, made ahead by [`LaneLog::start_writeback`]. Its
/// name ends in `.tmp`, so recovery removes one that a crash left.
const NEXT_SEGMENT_FILE: &str = "next-segment.tmp";
/// A lane log makes its next segment's file ahead only if its active segment, at its pace
/// so far, will be full within this long: a slow log reserves nothing.
const PREPARE_NEXT_WITHIN: Duration = Duration::from_secs(60);
/// Corruption offset meaning "none".
const NOT_CORRUPT: u64 = u64::MAX;
/// `LaneLog::group_floor` meaning "no consumer group has committed here".
const NO_GROUP_FLOOR: u64 = u64::MAX;

/// Where an appended batch landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppendOutcome {
    pub base_offset: Offset,
    pub last_offset: Offset,
    /// The batch was a producer's retry of one already in the log; nothing was written
    /// and the offsets are the original ones.
    pub duplicate: bool,
    /// `writeback_bytes` have been appended since writeback last started: call
    /// [`LaneLog::start_writeback`] (off the request's thread).
    pub writeback_due: bool,
    /// An fsync round is due now: the policy fsyncs every append, or more than
    /// `unsynced_segments_max` rolled segments wait for one (whatever the policy). Call
    /// [`LaneLog::flush`] (off the request's thread).
    pub fsync_due: bool,
}

/// Whole batches read from one segment, as a slice of its mapping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadSlice {
    /// Concatenated batches, exactly as appended; empty if nothing is readable yet.
    pub bytes: Bytes,
    /// Offset after the last batch returned: where the next read starts.
    pub next_offset: Offset,
}

/// What a lane log looks like right now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogStats {
    pub start_offset: Offset,
    pub next_offset: Offset,
    pub durable_offset: Offset,
    pub segments: usize,
    pub size_bytes: u64,
    /// fsync rounds (each covering every append before it) since open.
    pub sync_rounds: u64,
    /// Writebacks started by [`LaneLog::start_writeback`] since open.
    pub writeback_starts: u64,
    pub corruption: Option<Corruption>,
}

/// What waits between two offsets of a lane log (a consumer's position and the end).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backlog {
    pub records: u64,
    /// Bytes of the whole batches from the one holding the first waiting record.
    pub bytes: u64,
    /// First timestamp of the batch holding the first waiting record; `None` when
    /// nothing waits.
    pub oldest_timestamp_ms: Option<i64>,
}

/// What one retention pass removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetentionOutcome {
    pub segments_deleted: usize,
    pub bytes_deleted: u64,
}

/// A segment rolled before its data was fsynced, kept open until a flush covers it.
#[derive(Debug)]
struct Unsynced {
    segment: Arc<Segment>,
    file: Arc<File>,
    /// The file holds blocks or a recycled file's old bytes past the segment's end,
    /// which the fsync round cuts off before its fsync (see `roll`).
    cut_past_end: bool,
}

/// A rolled segment some of whose pages this log has not yet dropped from the page cache
/// (see [`LaneLog::drop_cached_behind`]).
#[derive(Debug)]
struct CachedSegment {
    segment: Arc<Segment>,
    file: Arc<File>,
    /// Where the pages not yet dropped begin.
    dropped_to: u32,
}

/// Rolled segments [`LaneLog::drop_cached_behind`] keeps track of; what older ones
/// still have cached is left to the kernel. Segments rolled by size need two.
const CACHED_SEGMENTS_MAX: usize = 4;

/// Cached pages are dropped in steps of this many bytes, at multiples of it: the kernel
/// drops only whole folios in a range, and a range ending inside a large folio (up to
/// 2 MiB on x86-64) would leave it cached for good.
const CACHE_DROP_STEP_BYTES: u32 = 2 << 20;

/// Pages of one segment to drop from the page cache: `from..to`, or to its end.
struct CacheDrop {
    segment: Arc<Segment>,
    file: Arc<File>,
    from: u32,
    to: Option<u32>,
}

/// State only the appender touches, under one lock.
#[derive(Debug)]
struct Writer {
    active: Arc<Segment>,
    file: Arc<File>,
    last_batch_base: Offset,
    active_since: Instant,
    unsynced: VecDeque<Unsynced>,
    /// When the oldest append not yet covered by an fsync happened.
    dirty_since: Option<Instant>,
    producers: ProducerStateTable,
    closed: bool,
    /// Where in the active segment the bytes not yet handed to writeback begin.
    writeback_from: u32,
    /// Where in the active segment the pages this log has not dropped from the page
    /// cache begin (see [`LaneLog::drop_cached_behind`]).
    cache_dropped_to: u32,
    /// Rolled segments with pages not yet dropped, oldest first, at most
    /// [`CACHED_SEGMENTS_MAX`].
    cached_segments: VecDeque<CachedSegment>,
    /// The newest producer snapshot, written at a roll without waiting for the disk (a
    /// roll holds up every append to the log, and a small fsync waits behind all the
    /// writeback queued on the disk: up to 0.8 s was seen). The next fsync round makes it
    /// durable; until then a crash may damage it, and recovery, finding its checksum
    /// wrong, starts from an older snapshot or the log's start instead.
    unsynced_snapshot: Option<(PathBuf, File)>,
    /// How much of the active segment has its blocks allocated (as far as this log
    /// asked for; 0 for a new or reopened one).
    allocated_to: u32,
    /// How far the active segment's file holds a recycled file's old bytes, or zeros
    /// appends padded their last page with (0 if it is not one): after the roll, the
    /// fsync round cuts what is left of them off.
    recycled_len: u32,
    next_segment: NextSegment,
    /// While there is a next segment: the log's next offset when a retention pass last
    /// saw it move, and when (see [`LaneLog::give_back_unused_next_segment`]).
    appended_up_to: Option<(Offset, Instant)>,
    /// Rolls that left the fsync of the directory, which makes the new segment's name
    /// durable, to the fsync threads (see `roll`); compared with `dir_synced_rolls`.
    rolls_deferred: u64,
}

/// The next segment's file, made ahead of the roll (see [`LaneLog::start_writeback`])
/// or kept from a segment retention deleted (see [`LaneLog::enforce_retention`]).
#[derive(Debug, Default)]
enum NextSegment {
    #[default]
    None,
    /// An fsync thread is making it, or retention is renaming a deleted segment's file
    /// to it.
    Preparing,
    /// A deleted segment's file, renamed to `NEXT_SEGMENT_FILE` and still holding its
    /// old bytes: the roll takes it once nothing maps the old segment any more (readers
    /// may still be sending slices of it).
    Recycled {
        file: File,
        len: u32,
        mapping: Weak<Mmap>,
    },
    /// Created, all its blocks allocated, fsynced: the roll renames it into place.
    Ready(File),
    /// Making it failed (a file system that cannot allocate, a disk nearly full): not
    /// tried again before the next roll.
    Unavailable,
}

/// One lane log: segments of checksummed batches in a directory, appended by one
/// writer at a time and read concurrently without copying.
///
/// Offsets below [`LaneLog::durable_offset`] are on stable storage; offsets below
/// [`LaneLog::next_offset`] are written (in the page cache). Callers choose which
/// limit a reader sees. Dropping a `LaneLog` without [`LaneLog::close`] is a crash as far
/// as the files are concerned; the next open recovers.
#[derive(Debug)]
pub struct LaneLog {
    dir: PathBuf,
    config: LogConfig,
    segments: RwLock<Vec<Arc<Segment>>>,
    writer: Mutex<Writer>,
    start_offset: AtomicU64,
    next_offset: AtomicU64,
    durable_offset: AtomicU64,
    /// Whether an fsync round is running; followers wait on `sync_done`.
    syncing: Mutex<bool>,
    sync_done: Condvar,
    /// Signalled when an fsync thread has finished making the next segment's file.
    next_segment_made: Condvar,
    checkpoint: Mutex<CheckpointFile>,
    /// Base of the segment the newest written checkpoint names, and of the one a
    /// checkpoint captured but not yet written will name (`u64::MAX` if none).
    /// Retention never deletes these: recovery needs the segment its clean point is in.
    checkpoint_segment: AtomicU64,
    pending_checkpoint_segment: AtomicU64,
    sync_rounds: AtomicU64,
    writeback_starts: AtomicU64,
    /// The lowest offset a consumer group has committed on this log (`NO_GROUP_FLOOR`
    /// if none has): [`LaneLog::drop_cached_behind`] keeps the pages from there on.
    group_floor: AtomicU64,
    /// The buffers of direct reads (see [`super::direct_read`]).
    read_ahead: Mutex<ReadAheads>,
    /// More than `unsynced_segments_max` rolled segments wait for an fsync: one is due.
    unsynced_over_bound: AtomicBool,
    /// How many of `Writer::rolls_deferred` a finished fsync of the directory covers.
    dir_synced_rolls: AtomicU64,
    /// Set after a failed write or fsync: the log refuses writes from then on.
    failed: AtomicBool,
    failure: Mutex<Option<String>>,
    corrupt_at: AtomicU64,
    corruption: Mutex<Option<Corruption>>,
    recovery: RecoveryReport,
}

/// A read that does not wait for the disk would have to (see [`LaneLog::try_read`]).
#[derive(Debug)]
struct WouldWait;

/// A lane log's direct read buffers: the one its last direct read took its batches from
/// (the next read may start inside it: a fetch can send fewer batches than it read), and
/// the one after it, read ahead.
#[derive(Debug, Default)]
struct ReadAheads {
    current: Option<Arc<ReadAhead>>,
    next: Option<Arc<ReadAhead>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().expect("lane log lock poisoned")
}

fn unix_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl LaneLog {
    /// Opens the lane log in `dir` (creating it if missing) and recovers it.
    pub fn open(dir: impl Into<PathBuf>, config: LogConfig) -> Result<LaneLog, StorageError> {
        config.validate()?;
        let dir = dir.into();
        create_dir_all_durable(&dir)?;
        let checkpoint_path = dir.join(CHECKPOINT_FILE);
        let created = !checkpoint_path.exists();
        let (mut checkpoint, clean_point) = CheckpointFile::open(&checkpoint_path)?;
        if created {
            fsync_dir(&dir)?;
        }
        let mut recovered = recovery::recover(&dir, &config, clean_point)?;
        recovery::merge_marker(&dir, &mut recovered.report)?;
        let active = Arc::clone(
            recovered
                .segments
                .last()
                .expect("recovery leaves an active segment"),
        );
        let next_offset = active.next_offset();
        let start_offset = recovered.segments[0].base_offset();
        let corruption = recovered.report.corruption.clone();
        // The active segment's name may not be durable: a crash can come between a roll
        // and the fsync round that makes its directory entry durable (see `roll`). Its
        // records count as durable from here on, so the name must be first.
        fsync_dir(&dir)?;
        let checkpoint_segment = match &corruption {
            None => {
                // Everything kept is fsynced: it is all clean now.
                checkpoint.write(clean_point_of(&active, false), true)?;
                active.base_offset()
            }
            Some(corruption) => {
                recovery::write_marker(&dir, corruption)?;
                clean_point.map_or(Offset::ZERO, |p| p.segment_base)
            }
        };
        // Only used for the final time-index entry when the segment rolls, which a
        // corrupt log never does: do not fail the open over it.
        let last_batch_base = active.last_batch_base().unwrap_or(active.base_offset());
        // A segment allocated whole before a restart keeps blocks past its end; `allocated_to`
        // starts at 0, so they are given back now rather than forgotten. Truncating the
        // file to its own length frees them and cuts nothing (a corrupt log keeps every
        // byte).
        let active_len = recovered.active_file.metadata().map(|m| m.len());
        if let Err(error) = active_len.and_then(|len| recovered.active_file.set_len(len)) {
            tracing::warn!(segment = %active.log_path().display(), %error, "could not free the blocks allocated past the active segment's end");
        }
        let writer = Writer {
            active,
            file: Arc::new(recovered.active_file),
            last_batch_base,
            active_since: Instant::now(),
            unsynced: VecDeque::new(),
            dirty_since: None,
            producers: recovered.producers,
            closed: false,
            writeback_from: 0,
            cache_dropped_to: 0,
            cached_segments: VecDeque::new(),
            unsynced_snapshot: None,
            allocated_to: 0,
            recycled_len: 0,
            next_segment: NextSegment::None,
            appended_up_to: None,
            rolls_deferred: 0,
        };
        tracing::debug!(dir = %dir.display(), %start_offset, %next_offset, report = ?recovered.report, "lane log opened");
        Ok(LaneLog {
            corrupt_at: AtomicU64::new(corruption.as_ref().map_or(NOT_CORRUPT, |c| c.offset.0)),
            corruption: Mutex::new(corruption),
            dir,
            config,
            segments: RwLock::new(recovered.segments),
            writer: Mutex::new(writer),
            start_offset: AtomicU64::new(start_offset.0),
            next_offset: AtomicU64::new(next_offset.0),
            durable_offset: AtomicU64::new(next_offset.0),
            syncing: Mutex::new(false),
            sync_done: Condvar::new(),
            next_segment_made: Condvar::new(),
            checkpoint: Mutex::new(checkpoint),
            checkpoint_segment: AtomicU64::new(checkpoint_segment.0),
            pending_checkpoint_segment: AtomicU64::new(u64::MAX),
            sync_rounds: AtomicU64::new(0),
            writeback_starts: AtomicU64::new(0),
            group_floor: AtomicU64::new(NO_GROUP_FLOOR),
            read_ahead: Mutex::new(ReadAheads::default()),
            unsynced_over_bound: AtomicBool::new(false),
            dir_synced_rolls: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
            recovery: recovered.report,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config(&self) -> &LogConfig {
        &self.config
    }

    /// What opening the log found and did.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.recovery
    }

    /// The oldest offset still in the log.
    pub fn start_offset(&self) -> Offset {
        Offset(self.start_offset.load(Ordering::Acquire))
    }

    /// The offset the next appended record gets; everything below is written.
    pub fn next_offset(&self) -> Offset {
        Offset(self.next_offset.load(Ordering::Acquire))
    }

    /// Everything below this offset is on stable storage.
    pub fn durable_offset(&self) -> Offset {
        Offset(self.durable_offset.load(Ordering::Acquire))
    }

    /// Where the log is corrupt, if it is: nothing at or past it is served.
    pub fn corruption(&self) -> Option<Corruption> {
        lock(&self.corruption).clone()
    }

    /// Checks, stamps and appends one batch (exactly one, in `batch`), or recognizes it
    /// as a retry. The bytes are in the page cache when this returns; see
    /// [`LaneLog::flush`] for durability.
    pub fn append(&self, batch: &mut [u8]) -> Result<AppendOutcome, StorageError> {
        let header = validate_batch(batch, self.config.batch)?;
        self.check_writable()?;
        let mut writer = lock(&self.writer);
        if writer.closed {
            return Err(StorageError::Closed {
                path: self.dir.clone(),
            });
        }
        if let SequenceCheck::Duplicate(meta) = writer.producers.check(&header)? {
            return Ok(AppendOutcome {
                base_offset: meta.base_offset,
                last_offset: meta.last_offset,
                duplicate: true,
                writeback_due: false,
                fsync_due: false,
            });
        }
        if self.should_roll(&writer, &header) {
            self.roll(&mut writer)?;
        }
        let base_offset = self.next_offset();
        stamp_base_offset(batch, base_offset);
        let header = BatchHeader {
            base_offset,
            ..header
        };
        let position = writer.active.size();
        let padding = padding_over_old_bytes(position, batch.len(), writer.recycled_len);
        if let Err(error) = write_all_padded_at(&writer.file, batch, padding, u64::from(position)) {
            return Err(self.write_failed(&writer, position, error));
        }
        faults::wrote(
            writer.active.log_path(),
            u64::from(position),
            (batch.len() + padding) as u64,
        );
        if padding > 0 {
            // Zeros past the last old byte (in its page) are cut off with the old bytes.
            let padded_to = u32::try_from(position as usize + batch.len() + padding).unwrap_or(u32::MAX);
            writer.recycled_len = writer.recycled_len.max(padded_to);
        }
        writer
            .active
            .publish_append(position, &header, self.config.index_interval_bytes);
        writer.last_batch_base = base_offset;
        writer.producers.record(&header);
        writer.dirty_since.get_or_insert_with(Instant::now);
        self.next_offset.store(header.next_offset().0, Ordering::Release);
        // Also what keeps blocks allocated ahead (see `start_writeback`): from the first
        // `writeback_bytes` of a segment on, so a lane log written little reserves nothing.
        let writeback_due = self.config.writeback_bytes > 0
            && self.config.fsync != FsyncPolicy::Always
            && writer.active.size().saturating_sub(writer.writeback_from) >= self.config.writeback_bytes;
        Ok(AppendOutcome {
            base_offset,
            last_offset: header.last_offset(),
            duplicate: false,
            writeback_due,
            fsync_due: self.config.fsync == FsyncPolicy::Always
                || self.unsynced_over_bound.load(Ordering::Acquire),
        })
    }

    /// Allocates the active segment's blocks up to `ALLOCATE_AHEAD_WRITEBACKS` ×
    /// `writeback_bytes` past its end, then asks the kernel to start writing back what
    /// was appended since the last call, and returns without waiting for the writeback.
    /// Not a durability step: it only keeps dirty pages from piling up.
    ///
    /// The allocation is what keeps writeback from stalling appends. ext4 allocates a
    /// delayed-allocation file's blocks at writeback, holding the file's `i_data_sem`,
    /// and may read block bitmaps from a busy disk meanwhile (tens of ms); an append
    /// into unallocated blocks takes that lock too, so it waited. An append into
    /// allocated blocks does not take it. Called every `writeback_bytes`, this keeps at
    /// least three of them allocated ahead.
    ///
    /// Allocating in the active segment still holds up appends now and then: `fallocate`
    /// takes the file's `i_rwsem`, as every buffered write does, and waited up to 18 ms
    /// on a block bitmap. So for a segment that fills fast (`PREPARE_NEXT_WITHIN`), this
    /// also makes the next segment's file: created, allocated whole, fsynced, for the
    /// roll to rename into place. Nobody writes that file meanwhile, so its allocation
    /// holds up nobody, and the segment it becomes needs no allocation at all. A segment
    /// allocated whole gets its successor made once half full; any other (the first of a
    /// busy log, or one reopened) gets it at once and rolls as soon as it is ready.
    ///
    /// All of this can wait on the disk, so the syncer calls it, never a request's
    /// thread.
    pub fn start_writeback(&self) -> Result<(), StorageError> {
        let (file, segment, writeback, allocate, prepare, rolls_deferred) = {
            let mut writer = lock(&self.writer);
            if writer.closed {
                return Ok(());
            }
            let size = writer.active.size();
            let writeback = (size > writer.writeback_from).then(|| {
                let from = std::mem::replace(&mut writer.writeback_from, size);
                (from, size)
            });
            let ahead = self
                .config
                .writeback_bytes
                .saturating_mul(ALLOCATE_AHEAD_WRITEBACKS);
            let allocate_to = size.saturating_add(ahead).min(self.config.segment_bytes_max);
            let allocate_from = writer.allocated_to.max(size);
            let allocate = (allocate_to > allocate_from).then_some((allocate_from, allocate_to));
            if allocate.is_some() {
                // Even if it fails: it is asked for again only once the appends get there.
                writer.allocated_to = allocate_to;
            }
            let prepare = matches!(writer.next_segment, NextSegment::None) && self.fills_soon(&writer);
            if prepare {
                writer.next_segment = NextSegment::Preparing;
            }
            (
                Arc::clone(&writer.file),
                Arc::clone(&writer.active),
                writeback,
                allocate,
                prepare,
                writer.rolls_deferred,
            )
        };
        // Every step runs, so that a `Preparing` state always ends (`close` waits for it).
        let dir_synced = self.sync_dir_for(rolls_deferred);
        if let Some((from, to)) = allocate {
            // Only saves work at writeback: without it (a file system that cannot, a
            // full disk) appends allocate as before.
            if let Err(error) = allocate_keeping_size(&file, u64::from(from), u64::from(to - from)) {
                tracing::debug!(segment = %segment.log_path().display(), %error, "could not allocate ahead");
            }
            let rolled_meanwhile = !Arc::ptr_eq(&lock(&self.writer).active, &segment);
            if rolled_meanwhile {
                give_back_allocation(&file, &segment);
            }
        }
        let started = match writeback {
            Some((from, to)) => start_writeback(&file, u64::from(from), u64::from(to - from))
                .map(|()| {
                    self.writeback_starts.fetch_add(1, Ordering::Relaxed);
                })
                .map_err(|error| StorageError::io(segment.log_path(), error)),
            None => Ok(()),
        };
        if prepare {
            self.prepare_next_segment();
        }
        dir_synced.and(started)
    }

    /// Whether the next segment's file should be made now: the active segment fills fast
    /// (at its pace so far, full within `PREPARE_NEXT_WITHIN`) and is either half full
    /// or not allocated whole (see [`LaneLog::start_writeback`]).
    fn fills_soon(&self, writer: &Writer) -> bool {
        let half_full = 2 * u64::from(writer.active.size()) >= u64::from(self.config.segment_bytes_max);
        self.fills_fast(writer) && (half_full || writer.allocated_to < self.config.segment_bytes_max)
    }

    /// Whether the active segment, at its pace so far, will be full within
    /// `PREPARE_NEXT_WITHIN`.
    fn fills_fast(&self, writer: &Writer) -> bool {
        let size = u64::from(writer.active.size());
        let max = u64::from(self.config.segment_bytes_max);
        let elapsed_ms = u64::try_from(writer.active_since.elapsed().as_millis()).unwrap_or(u64::MAX);
        let within_ms = PREPARE_NEXT_WITHIN.as_millis() as u64;
        // elapsed / size × remaining ≤ within, without dividing.
        elapsed_ms.saturating_mul(max.saturating_sub(size)) <= within_ms.saturating_mul(size)
    }

    /// Makes the next segment's file (see [`LaneLog::start_writeback`]). A failure costs
    /// nothing but the allocation: the roll then creates the file as it would without.
    fn prepare_next_segment(&self) {
        let path = self.dir.join(NEXT_SEGMENT_FILE);
        let prepared = prepare_file(&path, u64::from(self.config.segment_bytes_max));
        let mut writer = lock(&self.writer);
        let keep = match prepared {
            Ok(file) if !writer.closed => {
                writer.next_segment = NextSegment::Ready(file);
                true
            }
            Ok(_) => {
                writer.next_segment = NextSegment::None;
                false
            }
            Err(error) => {
                tracing::debug!(dir = %self.dir.display(), %error, "could not make the next segment's file ahead");
                writer.next_segment = NextSegment::Unavailable;
                false
            }
        };
        if !keep {
            // Under the lock: a close waiting for this (`wait_for_next_segment`) must not
            // find the file still there.
            let _ = remove_if_exists(&path);
        }
        drop(writer);
        self.next_segment_made.notify_all();
    }

    /// Waits until no fsync thread is making the next segment's file, so that a close or
    /// a removal does not race with its creation.
    fn wait_for_next_segment<'a>(&self, writer: MutexGuard<'a, Writer>) -> MutexGuard<'a, Writer> {
        self.next_segment_made
            .wait_while(writer, |writer| {
                matches!(writer.next_segment, NextSegment::Preparing)
            })
            .expect("lane log lock poisoned")
    }

    /// Renames the file made ahead for the next segment to `log_path`, if there is one
    /// that nothing else maps, and returns it open, with how many old bytes it holds (a
    /// recycled file's; 0 for one made empty).
    fn install_next_segment(&self, writer: &mut Writer, log_path: &Path) -> Option<(File, u32)> {
        let (file, old_len) = match std::mem::take(&mut writer.next_segment) {
            NextSegment::Ready(file) => (file, 0),
            NextSegment::Recycled { file, len, mapping } => {
                if mapping.strong_count() > 0 {
                    // A reader still maps the old segment: its bytes must stay as they are.
                    writer.next_segment = NextSegment::Recycled { file, len, mapping };
                    return None;
                }
                (file, len)
            }
            NextSegment::Preparing => {
                // For the roll after this one.
                writer.next_segment = NextSegment::Preparing;
                return None;
            }
            NextSegment::None | NextSegment::Unavailable => return None,
        };
        let next = self.dir.join(NEXT_SEGMENT_FILE);
        faults::created(log_path);
        match std::fs::rename(&next, log_path) {
            Ok(()) => {
                if old_len > 0 {
                    faults::recycled(log_path, u64::from(old_len));
                    metrics::counter!(crate::metrics::SEGMENTS_RECYCLED).increment(1);
                }
                Some((file, old_len))
            }
            Err(error) => {
                tracing::debug!(dir = %self.dir.display(), %error, "could not rename the next segment's file into place");
                let _ = remove_if_exists(&next);
                writer.next_segment = NextSegment::Unavailable;
                None
            }
        }
    }

    /// Removes the next segment's file made ahead or recycled, if any: its disk is
    /// reserved. It can hold a whole segment of blocks, so the reaper frees it, as it
    /// does a deleted segment's (its name coming back after a crash does no harm:
    /// recovery removes `.tmp` files).
    fn give_back_next_segment(&self, writer: &mut Writer) {
        let (file, mapping) = match std::mem::take(&mut writer.next_segment) {
            NextSegment::Ready(file) => (file, Weak::new()),
            NextSegment::Recycled { file, mapping, .. } => (file, mapping),
            _ => return,
        };
        let path = self.dir.join(NEXT_SEGMENT_FILE);
        let reaper = self.config.reaper.as_ref();
        // The reaper frees a file from its end down; blocks allocated past the end
        // (`KEEP_SIZE`) would go all at once with the first cut. Growing the size over
        // them (no write) lets them go a chunk at a time too.
        if reaper.is_some() {
            use std::os::unix::fs::MetadataExt;
            if let Ok(metadata) = file.metadata()
                && metadata.blocks() * 512 > metadata.len()
            {
                let _ = file.set_len(metadata.blocks() * 512);
            }
        }
        let doomed = reaper.and_then(|reaper| reaper.doom_file(&path, mapping));
        drop(file);
        let _ = remove_if_exists(&path);
        if let (Some(reaper), Some(doomed)) = (reaper, doomed) {
            reaper.reap(vec![doomed]);
        }
    }

    fn check_writable(&self) -> Result<(), StorageError> {
        if self.failed.load(Ordering::Acquire) {
            let reason = lock(&self.failure).clone().unwrap_or_default();
            return Err(StorageError::Failed {
                path: self.dir.clone(),
                reason,
            });
        }
        if let Some(corruption) = self.corruption() {
            return Err(StorageError::Corrupt {
                path: self.dir.clone(),
                offset: corruption.offset,
                reason: corruption.reason,
            });
        }
        Ok(())
    }

    /// Undoes a partial write. A full disk leaves the log usable (the write can be
    /// retried when space is freed); any other write error stops it.
    fn write_failed(&self, writer: &Writer, position: u32, error: std::io::Error) -> StorageError {
        let error = StorageError::io(writer.active.log_path(), error);
        let undone = writer.file.set_len(u64::from(position));
        if !matches!(error, StorageError::StorageFull { .. }) || undone.is_err() {
            self.fail(format!("write failed: {error}"));
        }
        error
    }

    fn fail(&self, reason: String) {
        tracing::error!(dir = %self.dir.display(), %reason, "lane log stops accepting writes");
        lock(&self.failure).get_or_insert(reason);
        self.failed.store(true, Ordering::Release);
    }

    fn should_roll(&self, writer: &Writer, header: &BatchHeader) -> bool {
        let active = &writer.active;
        if active.is_empty() {
            return false;
        }
        let offsets_after = self.next_offset().0 + u64::from(header.record_count) - active.base_offset().0;
        u64::from(active.size()) + u64::from(header.batch_length) > u64::from(self.config.segment_bytes_max)
            || active.size() as usize + header.batch_length as usize > active.mapped_len()
            || writer.active_since.elapsed() >= Duration::from_millis(self.config.segment_ms_max)
            || active.indexes_full()
            || offsets_after > u64::from(u32::MAX)
            // A busy log leaves a segment that allocates as it goes for one allocated
            // whole as soon as it can (see `start_writeback`).
            || (writer.allocated_to < self.config.segment_bytes_max
                && matches!(writer.next_segment, NextSegment::Ready(_)))
    }

    /// Seals the active segment and starts a new one at the next offset. Every fallible
    /// step before the switch leaves the old segment active, so a roll that fails (a full
    /// disk) can simply be tried again by the next append.
    fn roll(&self, writer: &mut Writer) -> Result<(), StorageError> {
        let base_offset = self.next_offset();
        let snapshot = offset_file_name(&self.dir, base_offset, SNAPSHOT_SUFFIX);
        let snapshot_file = write_file_unsynced(&snapshot, &writer.producers.encode_snapshot(base_offset))?;
        writer.active.seal(Some(writer.last_batch_base))?;
        // A segment rolled by size has less than a batch allocated past its end; one
        // rolled early (by age, a full index) can have a few `writeback_bytes`, which it
        // gives back. A recycled file's old bytes past the end are cut off, so that the
        // file ends where its batches do (recovery copes if a crash keeps them). Either
        // frees blocks, which can wait for a discard on the disk (up to 8 ms seen), so
        // the fsync round does it, off the append path.
        let allocated_past_end = writer.allocated_to.saturating_sub(writer.active.size());
        let cut_past_end =
            allocated_past_end > self.config.writeback_bytes || writer.recycled_len > writer.active.size();
        let installed =
            self.install_next_segment(writer, &offset_file_name(&self.dir, base_offset, LOG_SUFFIX));
        // A recycled file comes allocated whole (`keep_recycled`).
        let (allocated_to, recycled_len) = match &installed {
            Some((_, old_len)) => (self.config.segment_bytes_max, *old_len),
            None => (0, 0),
        };
        let installed = installed.map(|(file, _)| file);
        let (segment, file) = match Segment::create(&self.dir, base_offset, &self.config, installed) {
            Ok(created) => created,
            Err(error) => {
                for suffix in [LOG_SUFFIX, INDEX_SUFFIX, TIME_INDEX_SUFFIX] {
                    let _ = remove_if_exists(&offset_file_name(&self.dir, base_offset, suffix));
                }
                return Err(error);
            }
        };
        // The new files' names must be durable before any record in them counts as
        // durable. Fsyncing the directory here would hold up every append to the log
        // behind the disk (up to 28 ms seen under writeback), so it is left to the fsync
        // threads: the fsync round that publishes these records fsyncs the directory
        // first, and so does the next writeback job. Only the newest segment's name may
        // wait: if an older roll's is not yet durable, this roll fsyncs here, so a crash
        // can lose at most the active segment's name, a lost tail to recovery. Without an
        // fsync thread coming (`never` with no writeback) it fsyncs here too.
        let older_roll_unsynced = writer.rolls_deferred > self.dir_synced_rolls.load(Ordering::Acquire);
        let fsync_threads_come = self.config.fsync != FsyncPolicy::Never || self.config.writeback_bytes > 0;
        if older_roll_unsynced || !fsync_threads_come {
            if let Err(error) = fsync_dir(&self.dir) {
                self.fail(format!("fsync of the directory failed: {error}"));
                return Err(error);
            }
            self.dir_synced_rolls
                .fetch_max(writer.rolls_deferred, Ordering::AcqRel);
        } else {
            writer.rolls_deferred += 1;
        }
        tracing::info!(dir = %self.dir.display(), %base_offset, sealed_bytes = writer.active.size(), "segment rolled");
        let segment = Arc::new(segment);
        let old_segment = std::mem::replace(&mut writer.active, Arc::clone(&segment));
        let old_file = std::mem::replace(&mut writer.file, Arc::new(file));
        // The sealed segment's newest pages stay cached a while longer. No system call
        // here, on the append path: past the bound, what the oldest tracked segment
        // still has cached is left to the kernel.
        if self.config.cached_tail_bytes > 0 {
            if writer.cached_segments.len() == CACHED_SEGMENTS_MAX {
                writer.cached_segments.pop_front();
            }
            let dropped_to = std::mem::take(&mut writer.cache_dropped_to);
            writer.cached_segments.push_back(CachedSegment {
                segment: Arc::clone(&old_segment),
                file: Arc::clone(&old_file),
                dropped_to,
            });
        }
        // A sealed segment with nothing to fsync still waits for the round if it has
        // something to cut (that round's fsync of it is cheap).
        if self.durable_offset() < base_offset || cut_past_end {
            writer.unsynced.push_back(Unsynced {
                segment: old_segment,
                file: old_file,
                cut_past_end,
            });
        }
        // Bound the open files. Past the bound, an fsync round is due (the appends say so
        // in `AppendOutcome::fsync_due`), which the fsync threads run. Only if they fall
        // far behind does the roll fsync the oldest itself, which holds up every append to
        // the log: a small fsync waits behind all the writeback queued on the disk.
        if writer.unsynced.len() > self.config.unsynced_segments_max {
            self.unsynced_over_bound.store(true, Ordering::Release);
        }
        if writer.unsynced.len() > 2 * self.config.unsynced_segments_max {
            let oldest = writer.unsynced.pop_front().expect("over the bound");
            if oldest.cut_past_end {
                give_back_allocation(&oldest.file, &oldest.segment);
            }
            if let Err(error) = faults::synced(oldest.segment.log_path(), || oldest.file.sync_data()) {
                self.fail(format!("fsync failed: {error}"));
                return Err(StorageError::io(oldest.segment.log_path(), error));
            }
        }
        writer.active_since = Instant::now();
        writer.last_batch_base = base_offset;
        // The sealed segment's unstarted tail is left to the kernel.
        writer.writeback_from = 0;
        writer.allocated_to = allocated_to;
        writer.recycled_len = recycled_len;
        writer.unsynced_snapshot = Some((snapshot, snapshot_file));
        self.segments
            .write()
            .expect("segments lock poisoned")
            .push(segment);
        self.delete_old_snapshots(base_offset);
        tracing::debug!(dir = %self.dir.display(), %base_offset, "rolled segment");
        Ok(())
    }

    /// Keeps the two newest producer snapshots; older ones are never needed.
    fn delete_old_snapshots(&self, newest: Offset) {
        let segments = self.segments.read().expect("segments lock poisoned");
        let rolled: Vec<Offset> = segments
            .iter()
            .map(|s| s.base_offset())
            .filter(|&b| b <= newest)
            .collect();
        for base in rolled.iter().rev().skip(2) {
            let _ = remove_if_exists(&offset_file_name(&self.dir, *base, SNAPSHOT_SUFFIX));
        }
    }

    /// Makes every append made before this call durable, then returns the durable
    /// offset. Group commit: while one caller runs an fsync, others wait and are all
    /// covered by the next single fsync. After a failed fsync the log stops taking
    /// writes and this always fails: a failed fsync is never retried, because the
    /// kernel may have dropped the dirty pages it could not write.
    pub fn flush(&self) -> Result<Offset, StorageError> {
        let target = self.next_offset();
        loop {
            if self.failed.load(Ordering::Acquire) {
                self.check_writable()?;
            }
            let durable = self.durable_offset();
            if durable >= target {
                return Ok(durable);
            }
            let mut syncing = lock(&self.syncing);
            if *syncing {
                drop(self.sync_done.wait(syncing).expect("sync lock poisoned"));
                continue;
            }
            *syncing = true;
            drop(syncing);
            let result = self.sync_round();
            *lock(&self.syncing) = false;
            self.sync_done.notify_all();
            result?;
        }
    }

    /// One fsync round: takes the files with unsynced data, fsyncs them outside the
    /// writer lock (appends go on), then publishes the durable offset.
    fn sync_round(&self) -> Result<(), StorageError> {
        let (files, target, snapshot, point, rolls_deferred) = {
            let mut writer = lock(&self.writer);
            let target = self.next_offset();
            if target <= self.durable_offset() {
                return Ok(());
            }
            let mut files: Vec<Unsynced> = writer.unsynced.drain(..).collect();
            self.unsynced_over_bound.store(false, Ordering::Release);
            files.push(Unsynced {
                segment: Arc::clone(&writer.active),
                file: Arc::clone(&writer.file),
                cut_past_end: false,
            });
            writer.dirty_since = None;
            let snapshot = writer.unsynced_snapshot.take();
            let point = clean_point_of(&writer.active, false);
            self.pending_checkpoint_segment
                .store(point.segment_base.0, Ordering::Release);
            (files, target, snapshot, point, writer.rolls_deferred)
        };
        let started = Instant::now();
        let injected = self
            .config
            .fsync_fault
            .as_ref()
            .is_some_and(|fault| fault.load(Ordering::Acquire));
        for unsynced in &files {
            if unsynced.cut_past_end {
                give_back_allocation(&unsynced.file, &unsynced.segment);
            }
            let synced = if injected {
                Err(std::io::Error::other("injected fsync failure"))
            } else {
                faults::synced(unsynced.segment.log_path(), || unsynced.file.sync_data())
            };
            if let Err(error) = synced {
                let error = StorageError::io(unsynced.segment.log_path(), error);
                self.fail(format!("fsync failed: {error}"));
                return Err(error);
            }
        }
        // The names of the segments these records are in (see `roll`).
        self.sync_dir_for(rolls_deferred)?;
        metrics::counter!(crate::metrics::FSYNCS).increment(1);
        metrics::histogram!(crate::metrics::FSYNC_DURATION_SECONDS).record(started.elapsed().as_secs_f64());
        self.durable_offset.fetch_max(target.0, Ordering::AcqRel);
        self.sync_rounds.fetch_add(1, Ordering::Relaxed);
        // Only hints for recovery: if one is lost, recovery does more work.
        if let Some((path, file)) = snapshot
            && let Err(error) = faults::synced(&path, || file.sync_data())
        {
            tracing::warn!(snapshot = %path.display(), %error, "could not fsync the producer snapshot");
        }
        if self.corruption().is_none() {
            match lock(&self.checkpoint).write(point, false) {
                Ok(()) => self
                    .checkpoint_segment
                    .store(point.segment_base.0, Ordering::Release),
                Err(error) => {
                    tracing::warn!(dir = %self.dir.display(), %error, "could not write the checkpoint")
                }
            }
        }
        self.pending_checkpoint_segment.store(u64::MAX, Ordering::Release);
        Ok(())
    }

    /// Drops from the page cache the pages of this log more than `cached_tail_bytes`
    /// behind its end, so that the next appends reuse their memory. The fsync threads
    /// call it after each fsync round, and after each writeback start, whose pages that
    /// far back are written by then unless the disk lags far behind (pages still being
    /// written stay cached, the kernel's to reclaim).
    ///
    /// Why: on a virtual machine whose host takes free memory back (free page
    /// reporting, ballooning), every page the page cache takes fresh is faulted in by
    /// the host on its first write, and an append into fresh pages cost 4 to 10 times
    /// one into reused pages (docs/BENCHMARKS.md, "Reused page-cache memory"). The price
    /// is that a consumer further behind than `cached_tail_bytes` reads from the disk;
    /// except for consumer groups: the pages from the lowest offset a group has
    /// committed ([`LaneLog::set_group_floor`]) on stay, so a group catching up on a
    /// backlog reads it from memory.
    pub fn drop_cached_behind(&self) {
        let keep = self.config.cached_tail_bytes;
        // After a failed fsync the kernel may have marked pages it could not write
        // clean: dropped, readers would get the disk's older bytes instead.
        if keep == 0 || self.failed.load(Ordering::Acquire) {
            return;
        }
        // The start of the step `behind` bytes into a segment is in (`behind` < its
        // size, a u32).
        let step_start =
            |behind: u64| (behind / u64::from(CACHE_DROP_STEP_BYTES)) as u32 * CACHE_DROP_STEP_BYTES;
        // How far into `segment` pages may go, if the group floor stops them: nowhere in
        // a segment after the floor's; within the floor's, up to the step its batch
        // begins in at the latest (from the index: reading the batch would bring pages
        // back); anywhere in one before it.
        let floor = Offset(self.group_floor.load(Ordering::Acquire));
        let floor_stop = |segment: &Segment| -> Option<u32> {
            if floor.0 == NO_GROUP_FLOOR || floor >= segment.next_offset() {
                None
            } else {
                Some(step_start(u64::from(segment.indexed_position_at_most(floor))))
            }
        };
        let mut drops = Vec::new();
        {
            let mut writer = lock(&self.writer);
            if writer.closed {
                return;
            }
            let size = writer.active.size();
            // Bytes of the window left for the segments before the one looked at.
            let mut keep_before = match u64::from(size).checked_sub(keep) {
                Some(behind) => {
                    let to = step_start(behind).min(floor_stop(&writer.active).unwrap_or(u32::MAX));
                    if to > writer.cache_dropped_to {
                        drops.push(CacheDrop {
                            segment: Arc::clone(&writer.active),
                            file: Arc::clone(&writer.file),
                            from: std::mem::replace(&mut writer.cache_dropped_to, to),
                            to: Some(to),
                        });
                    }
                    0
                }
                None => keep - u64::from(size),
            };
            for cached in writer.cached_segments.iter_mut().rev() {
                let size = cached.segment.size();
                let to = if keep_before > 0 && keep_before >= u64::from(size) {
                    keep_before -= u64::from(size);
                    continue;
                } else if keep_before > 0 {
                    Some(step_start(u64::from(size) - std::mem::take(&mut keep_before)))
                } else {
                    None
                };
                let to = match (to, floor_stop(&cached.segment)) {
                    (to, None) => to,
                    (None, Some(stop)) => Some(stop),
                    (Some(to), Some(stop)) => Some(to.min(stop)),
                };
                if to.is_none_or(|to| to > cached.dropped_to) {
                    drops.push(CacheDrop {
                        segment: Arc::clone(&cached.segment),
                        file: Arc::clone(&cached.file),
                        from: cached.dropped_to,
                        to,
                    });
                    cached.dropped_to = to.unwrap_or(size);
                }
            }
            // Those dropped to their end are the oldest: the window and the floor both
            // stop in a newer one.
            let done = writer
                .cached_segments
                .iter()
                .take_while(|cached| cached.dropped_to >= cached.segment.size())
                .count();
            writer.cached_segments.drain(..done);
        }
        for drop in drops {
            drop.segment.drop_cached(&drop.file, drop.from, drop.to);
        }
    }

    /// Tells the log the lowest offset any consumer group has committed on it (`None`:
    /// no group has), below which [`LaneLog::drop_cached_behind`] may drop pages.
    pub fn set_group_floor(&self, floor: Option<Offset>) {
        self.group_floor
            .store(floor.map_or(NO_GROUP_FLOOR, |offset| offset.0), Ordering::Release);
    }

    /// Fsyncs the directory if any of the first `rolls_deferred` rolls (read under the
    /// writer lock) left it for later. A failure stops the log, as a failed fsync does.
    fn sync_dir_for(&self, rolls_deferred: u64) -> Result<(), StorageError> {
        if rolls_deferred <= self.dir_synced_rolls.load(Ordering::Acquire) {
            return Ok(());
        }
        if let Err(error) = fsync_dir(&self.dir) {
            self.fail(format!("fsync of the directory failed: {error}"));
            return Err(error);
        }
        self.dir_synced_rolls.fetch_max(rolls_deferred, Ordering::AcqRel);
        Ok(())
    }

    /// Whether the fsync policy asks for an fsync now.
    pub fn fsync_due(&self, now: Instant) -> bool {
        if self.next_offset() <= self.durable_offset() || self.failed.load(Ordering::Acquire) {
            return false;
        }
        if self.unsynced_over_bound.load(Ordering::Acquire) {
            return true;
        }
        match self.config.fsync {
            // `Always` logs are queued by each append, not by the clock.
            FsyncPolicy::Never | FsyncPolicy::Always => false,
            FsyncPolicy::Interval(interval) => lock(&self.writer)
                .dirty_since
                .is_some_and(|since| now.saturating_duration_since(since) >= interval),
        }
    }

    /// Reads whole batches starting with the one that holds `offset`, up to `bytes_max`
    /// (but always at least one batch), from one segment, without copying. Only batches
    /// entirely below `limit` are returned: pass [`LaneLog::durable_offset`] or
    /// [`LaneLog::next_offset`] for what readers may see. May wait for the disk (see
    /// [`LaneLog::try_read`]).
    pub fn read(&self, offset: Offset, bytes_max: usize, limit: Offset) -> Result<ReadSlice, StorageError> {
        let slice = self.read_waiting(offset, bytes_max, limit, true)?;
        Ok(slice.expect("a read that may wait for the disk always ends"))
    }

    /// [`LaneLog::read`], or `None` where it would wait for the disk: a direct read of
    /// bytes the page cache no longer holds, or a read-ahead still queued or running. Then call
    /// `read` on a thread that may block. Reads from the page cache (a consumer near the
    /// tail) never wait; a page fault can still (a page the kernel just dropped).
    pub fn try_read(
        &self,
        offset: Offset,
        bytes_max: usize,
        limit: Offset,
    ) -> Result<Option<ReadSlice>, StorageError> {
        self.read_waiting(offset, bytes_max, limit, false)
    }

    /// The read-ahead of the bytes from `offset` on, if a read-ahead thread is reading it:
    /// a fetch awaits it before reading, so that [`LaneLog::try_read`] finds the bytes
    /// read instead of leaving the read to a thread that may wait. (One still queued is
    /// not waited for: the read gives it up and reads itself, rather than wait behind
    /// other lane logs' jobs.)
    pub(crate) fn read_ahead_done(&self, offset: Offset) -> Option<ReadAheadDone> {
        let slots = lock(&self.read_ahead);
        let next = slots
            .next
            .as_ref()
            .filter(|next| next.offset == offset && next.is_running())?;
        Some(ReadAheadDone(Arc::clone(next)))
    }

    /// [`LaneLog::read`]; `None` only where it would wait for the disk and `may_wait` is
    /// false.
    fn read_waiting(
        &self,
        offset: Offset,
        bytes_max: usize,
        limit: Offset,
        may_wait: bool,
    ) -> Result<Option<ReadSlice>, StorageError> {
        let (start, end) = (self.start_offset(), self.next_offset());
        if offset < start || offset > end {
            return Err(StorageError::OffsetOutOfRange {
                requested: offset,
                start,
                end,
            });
        }
        let corrupt_at = Offset(self.corrupt_at.load(Ordering::Acquire));
        if offset >= corrupt_at {
            return Err(self.corrupt_error_at(corrupt_at));
        }
        let limit = limit.min(end).min(corrupt_at);
        let empty = Some(ReadSlice {
            bytes: Bytes::new(),
            next_offset: offset,
        });
        if offset >= limit {
            return Ok(empty);
        }
        let Some(segment) = self.segment_for(offset) else {
            // Retention deleted the segment since the range check above.
            return Err(StorageError::OffsetOutOfRange {
                requested: offset,
                start: self.start_offset(),
                end,
            });
        };
        if let Some(pool) = &self.config.direct_reads
            // After a failed fsync the disk may hold older bytes than the page cache.
            && !self.failed.load(Ordering::Acquire)
        {
            // An index entry comes after at most an index interval and a batch (which is
            // smaller than an interval, or it would have its own entry).
            let slack_bytes = (2 * self.config.index_interval_bytes as usize).max(DIRECT_SLACK_BYTES);
            let Ok(ahead) = self.take_read_ahead(pool, &segment, offset, may_wait) else {
                return Ok(None);
            };
            let read_direct = |from| segment.read_direct(pool, offset, bytes_max, limit, from);
            let mut read = ahead.and_then(|ahead| read_direct(DirectSource::Ahead(ahead)));
            // None read ahead, or the buffer ends before the batch wanted does: read it
            // from the disk, unless the page cache mostly holds it.
            if read.is_none()
                && let Some(span) = segment.direct_span(offset, bytes_max, slack_bytes)
            {
                if !may_wait {
                    return Ok(None);
                }
                read = read_direct(DirectSource::Disk(span));
            }
            if let Some(read) = read {
                self.read_ahead_after(pool, &segment, &read, bytes_max);
                return Ok(Some(ReadSlice {
                    bytes: read.bytes,
                    next_offset: read.next_offset,
                }));
            }
        }
        let located = segment.locate(offset).map_err(|stop| self.corrupted(stop))?;
        let Some((position, header)) = located else {
            return Ok(empty);
        };
        if header.next_offset() > limit {
            return Ok(empty);
        }
        let (end_position, next_offset) = segment
            .extent(position, &header, bytes_max, limit)
            .map_err(|stop| self.corrupted(stop))?;
        match segment.verify(position, end_position, header.base_offset) {
            Ok(()) => Ok(Some(ReadSlice {
                bytes: segment.slice(position, end_position),
                next_offset,
            })),
            Err(stop) if stop.position > position => {
                let (good_end, good_next) = (stop.position, stop.offset);
                self.corrupted(stop);
                Ok(Some(ReadSlice {
                    bytes: segment.slice(position, good_end),
                    next_offset: good_next,
                }))
            }
            Err(stop) => Err(self.corrupted(stop)),
        }
    }

    /// A buffer holding the batch of `offset` in `segment`, or where it may be: the one
    /// read ahead from it (waited for, if the read is running), or the one the last
    /// direct read took its batches from, if it starts at or before it. `Ok(None)` if
    /// neither; `Err`, leaving it in place, if the read ahead has not finished and
    /// `may_wait` is false.
    fn take_read_ahead(
        &self,
        pool: &DirectReads,
        segment: &Segment,
        offset: Offset,
        may_wait: bool,
    ) -> Result<Option<AheadRead>, WouldWait> {
        let base = segment.base_offset();
        let mut slots = lock(&self.read_ahead);
        let wanted = |next: &ReadAhead| next.segment_base == base && next.offset == offset;
        if !may_wait
            && slots
                .next
                .as_deref()
                .is_some_and(|next| wanted(next) && next.is_pending())
        {
            return Err(WouldWait);
        }
        if let Some(next) = slots.next.take_if(|next| wanted(next)) {
            drop(slots);
            return Ok(next.take(pool));
        }
        let holds = |current: &ReadAhead| {
            current.segment_base == base
                && current.offset <= offset
                && current.end.is_some_and(|end| offset < end)
        };
        // One that cannot serve this read goes first: its buffer may be the one it needs.
        let current = match slots.current.take_if(|current| !holds(current)) {
            Some(_) => None,
            None => slots.current.as_ref().and_then(|current| current.peek()),
        };
        // Another reader's read-ahead that is stale, or one this reader skipped past,
        // goes, so that its buffer goes back; not the one that continues the buffer
        // this read is served from.
        let serving_end = current
            .as_ref()
            .and(slots.current.as_ref())
            .and_then(|current| current.end);
        let continues = |next: &ReadAhead| serving_end == Some(next.offset);
        if let Some(stale) = slots.next.take_if(|next| next.is_stale() && !continues(next)) {
            stale.give_up();
        }
        Ok(current)
    }

    /// After a direct read: keeps its buffer for the next read (a fetch may send fewer
    /// batches than it read), and has the bytes after it read ahead, unless they are
    /// already, another reader's read-ahead is still fresh (two readers far apart on
    /// one lane log do not take turns throwing each other's away), or the segment has
    /// nothing after them yet. Where the buffer holds at least half a read more whole
    /// batches (a reader asking for less than a buffer), the next reads take those
    /// too, and the read-ahead starts after them; otherwise right after this read.
    fn read_ahead_after(
        &self,
        pool: &Arc<DirectReads>,
        segment: &Arc<Segment>,
        read: &DirectlyRead,
        bytes_max: usize,
    ) {
        if read.bytes.is_empty() {
            return;
        }
        let (ahead_position, ahead_offset) = if (read.whole_end - read.end_position) as usize >= bytes_max / 2
        {
            (read.whole_end, read.whole_next)
        } else {
            (read.end_position, read.next_offset)
        };
        let base = segment.base_offset();
        let mut slots = lock(&self.read_ahead);
        slots.current = Some(ReadAhead::read(pool, base, read.buffer.clone(), ahead_offset));
        let wanted = |next: &ReadAhead| next.segment_base == base && next.offset == ahead_offset;
        if ahead_position >= segment.size()
            || slots
                .next
                .as_ref()
                .is_some_and(|next| wanted(next) || !next.is_stale())
        {
            return;
        }
        let next = pool.read_ahead(segment, ahead_position, ahead_offset, DIRECT_BUFFER_BYTES);
        if let Some(replaced) = std::mem::replace(&mut slots.next, next) {
            replaced.give_up();
        }
    }

    /// What waits from `from` (clamped to the start) up to `limit` (clamped to the end):
    /// records, bytes and the age of the oldest. Cheap: two index lookups.
    pub fn backlog(&self, from: Offset, limit: Offset) -> Result<Backlog, StorageError> {
        // Segments first: retention may delete some meanwhile, and `from` must be in one.
        let segments = self.segments.read().expect("segments lock poisoned").clone();
        let limit = limit
            .min(self.next_offset())
            .min(Offset(self.corrupt_at.load(Ordering::Acquire)));
        let from = from.max(segments[0].base_offset());
        if from >= limit {
            return Ok(Backlog::default());
        }
        // (segment index, byte position) of the batch holding `offset`, or the end.
        // Without reading the batches: a backlog far behind must not bring its pages
        // back into the page cache (the lag gauges ask every few seconds).
        let place = |offset: Offset| -> Result<(usize, u64, Option<i64>), StorageError> {
            let index = segments
                .partition_point(|s| s.base_offset() <= offset)
                .saturating_sub(1);
            let segment = &segments[index];
            match segment
                .locate_sparingly(offset)
                .map_err(|stop| self.corrupted(stop))?
            {
                Some((position, header)) => Ok((index, u64::from(position), Some(header.first_timestamp_ms))),
                None => Ok((index, u64::from(segment.size()), None)),
            }
        };
        let (first_segment, first_position, oldest_timestamp_ms) = place(from)?;
        let (last_segment, last_position, _) = place(limit)?;
        let before_first: u64 = segments[..first_segment]
            .iter()
            .map(|s| u64::from(s.size()))
            .sum();
        let before_last: u64 = segments[..last_segment].iter().map(|s| u64::from(s.size())).sum();
        Ok(Backlog {
            records: limit.0 - from.0,
            bytes: (before_last + last_position).saturating_sub(before_first + first_position),
            oldest_timestamp_ms,
        })
    }

    /// The segment whose offsets include `offset`.
    fn segment_for(&self, offset: Offset) -> Option<Arc<Segment>> {
        let segments = self.segments.read().expect("segments lock poisoned");
        let index = segments.partition_point(|s| s.base_offset() <= offset);
        index.checked_sub(1).map(|i| Arc::clone(&segments[i]))
    }

    /// Records damage found by a read: nothing at or past it is served from now on.
    fn corrupted(&self, stop: ScanStop) -> StorageError {
        let offset = stop.offset;
        let mut corruption = lock(&self.corruption);
        if corruption.as_ref().is_none_or(|c| offset < c.offset) {
            tracing::error!(dir = %self.dir.display(), %offset, position = stop.position, reason = %stop.reason,
                "corrupt batch found; the lane log no longer serves this offset or any after it");
            let found: Corruption = stop.into();
            // Remembered across restarts, until an operator removes the marker.
            if let Err(error) = recovery::write_marker(&self.dir, &found) {
                tracing::error!(dir = %self.dir.display(), %error, "could not record the corruption marker");
            }
            *corruption = Some(found);
            self.corrupt_at.fetch_min(offset.0, Ordering::AcqRel);
        }
        drop(corruption);
        self.corrupt_error_at(offset)
    }

    fn corrupt_error_at(&self, offset: Offset) -> StorageError {
        let reason = self.corruption().map_or_else(String::new, |c| c.reason);
        StorageError::Corrupt {
            path: self.dir.clone(),
            offset,
            reason,
        }
    }

    /// The offset of the first record whose timestamp is at or after `timestamp_ms`,
    /// among records below `limit`; `None` if there is none.
    pub fn offset_for_timestamp(
        &self,
        timestamp_ms: i64,
        limit: Offset,
    ) -> Result<Option<Offset>, StorageError> {
        let segments = self.segments.read().expect("segments lock poisoned").clone();
        let limit = limit.min(Offset(self.corrupt_at.load(Ordering::Acquire)));
        for segment in segments {
            if segment.base_offset() >= limit {
                break;
            }
            if let Some(offset) = segment
                .offset_for_timestamp(timestamp_ms, limit)
                .map_err(|stop| self.corrupted(stop))?
            {
                return Ok(Some(offset));
            }
        }
        Ok(None)
    }

    /// Deletes sealed segments that retention no longer keeps: those whose newest record
    /// is older than `retention_ms` before `now_ms`, and the oldest ones while the log
    /// would still hold at least `retention_bytes` without them. The active segment is
    /// never deleted, nor is anything in a log that has failed or found corruption.
    ///
    /// Recovery needs the segment its clean point names, so before deleting it the clean
    /// point is moved past it (an fsync round) and its checkpoint fsynced; the deletions
    /// themselves are made durable with an fsync of the directory.
    ///
    /// Also gives back a next segment's file the log has stopped needing (see
    /// `give_back_unused_next_segment`).
    pub fn enforce_retention(&self, now_ms: i64) -> Result<RetentionOutcome, StorageError> {
        self.give_back_unused_next_segment(Instant::now());
        self.delete_old_segments(now_ms, Offset::ZERO)
    }

    /// Gives back the next segment's file, made ahead or recycled, once the log has not
    /// appended for `PREPARE_NEXT_WITHIN`, as seen by retention passes (`now` is one): it
    /// holds a whole segment of disk, and a log that idle is not about to roll. Without
    /// this, a lane log busy once would hold it until a restart. If the log gets busy
    /// again, the fsync threads make it a new one (`start_writeback`).
    pub(crate) fn give_back_unused_next_segment(&self, now: Instant) {
        let mut writer = lock(&self.writer);
        if !matches!(
            writer.next_segment,
            NextSegment::Ready(_) | NextSegment::Recycled { .. }
        ) {
            writer.appended_up_to = None;
            return;
        }
        let next_offset = self.next_offset();
        match writer.appended_up_to {
            Some((seen, since)) if seen == next_offset => {
                if now.saturating_duration_since(since) >= PREPARE_NEXT_WITHIN {
                    tracing::debug!(dir = %self.dir.display(), "giving back the next segment's file of an idle log");
                    self.give_back_next_segment(&mut writer);
                    writer.appended_up_to = None;
                }
            }
            _ => writer.appended_up_to = Some((next_offset, now)),
        }
    }

    /// Deletes the sealed segments that hold only records below `offset` (as well as
    /// those retention would delete), like [`LaneLog::enforce_retention`]. A log that
    /// rewrites its live records at its end (the group offsets) drops its past this way.
    pub fn delete_segments_below(&self, offset: Offset) -> Result<RetentionOutcome, StorageError> {
        self.delete_old_segments(unix_now_ms(), offset)
    }

    fn delete_old_segments(&self, now_ms: i64, below: Offset) -> Result<RetentionOutcome, StorageError> {
        if self.failed.load(Ordering::Acquire) || self.corruption().is_some() {
            return Ok(RetentionOutcome::default());
        }
        let planned = self.retention_plan(now_ms, below, Offset(u64::MAX));
        let Some(newest_planned) = planned.last() else {
            return Ok(RetentionOutcome::default());
        };
        if newest_planned.base_offset().0 >= self.checkpoint_segment.load(Ordering::Acquire) {
            self.flush()?;
            self.sync_checkpoint()?;
        }
        let mut writer = lock(&self.writer);
        if writer.closed {
            // Closed for good, or for removal, whose files are the caller's to free.
            return Ok(RetentionOutcome::default());
        }
        let floor = self
            .checkpoint_segment
            .load(Ordering::Acquire)
            .min(self.pending_checkpoint_segment.load(Ordering::Acquire));
        let deleted = {
            let mut segments = self.segments.write().expect("segments lock poisoned");
            let count = self
                .retention_plan_of(&segments, now_ms, below, Offset(floor))
                .len();
            let deleted: Vec<Arc<Segment>> = segments.drain(..count).collect();
            self.start_offset
                .store(segments[0].base_offset().0, Ordering::Release);
            deleted
        };
        // Holding on to them would keep deleted files open, and could keep the oldest
        // from being recycled.
        writer.cached_segments.retain(|cached| {
            !deleted
                .iter()
                .any(|segment| Arc::ptr_eq(segment, &cached.segment))
        });
        let recycled = deleted
            .first()
            .filter(|oldest| Arc::ptr_eq(oldest, &planned[0]) && self.recycles(&writer, oldest))
            .cloned();
        if recycled.is_some() {
            // A close waits while this is so (`wait_for_next_segment`).
            writer.next_segment = NextSegment::Preparing;
        }
        drop(writer);
        let mut outcome = RetentionOutcome::default();
        let mut recycled_file = None;
        let deleting = self.delete_files(&deleted, recycled.as_deref(), &mut recycled_file, &mut outcome);
        if let Some(segment) = &recycled {
            self.keep_recycled(segment, recycled_file.filter(|_| deleting.is_ok()));
        }
        deleting?;
        Ok(outcome)
    }

    /// Removes the names of `deleted`, except that `recycled`'s `.log` file is renamed to
    /// the next segment's and returned open in `recycled_file`, then makes the removals
    /// durable and hands the files to the reaper.
    fn delete_files(
        &self,
        deleted: &[Arc<Segment>],
        recycled: Option<&Segment>,
        recycled_file: &mut Option<File>,
        outcome: &mut RetentionOutcome,
    ) -> Result<(), StorageError> {
        let mut doomed = Vec::new();
        for segment in deleted {
            let recycling = recycled.is_some_and(|r| std::ptr::eq(r, &**segment));
            if recycling {
                let next = self.dir.join(NEXT_SEGMENT_FILE);
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(segment.log_path())
                    .and_then(|file| std::fs::rename(segment.log_path(), &next).map(|()| file));
                match file {
                    Ok(file) => *recycled_file = Some(file),
                    Err(error) => {
                        tracing::debug!(segment = %segment.log_path().display(), %error, "could not recycle a deleted segment's file");
                    }
                }
            } else {
                doomed.extend(
                    self.config
                        .reaper
                        .as_ref()
                        .and_then(|reaper| reaper.doom(segment)),
                );
            }
            // Readers holding the segment keep its mapping; the names can go now.
            for path in segment.paths() {
                remove_if_exists(path)?;
            }
            remove_if_exists(&offset_file_name(
                &self.dir,
                segment.base_offset(),
                SNAPSHOT_SUFFIX,
            ))?;
            outcome.segments_deleted += 1;
            outcome.bytes_deleted += u64::from(segment.size());
            tracing::info!(segment = %segment.log_path().display(), recycling, "deleted by retention");
        }
        if !deleted.is_empty() {
            fsync_dir(&self.dir)?;
        }
        if let Some(reaper) = &self.config.reaper {
            reaper.reap(doomed);
        }
        Ok(())
    }

    /// Whether retention should keep the file of `oldest`, which it deletes, for the
    /// next segment rather than free it. Overwriting it costs less than writing a new
    /// file: its blocks are allocated and written already, so the fsyncs of a durable
    /// log write no metadata (fio on this project's test machine: fdatasync after each
    /// 256 KiB twice as fast, docs/BENCHMARKS.md), and those of its pages still cached
    /// are overwritten where they are. Appends pad their writes over its old bytes, so
    /// pages no longer cached cost no read (`padding_over_old_bytes`). Only where that
    /// pays: the log fills segments fast, has no next segment yet, the file is at least
    /// half a segment, and at least two segments of disk are free, as for a file made
    /// ahead: a nearly full disk gets the file back.
    fn recycles(&self, writer: &Writer, oldest: &Segment) -> bool {
        let segment_bytes_max = u64::from(self.config.segment_bytes_max);
        matches!(writer.next_segment, NextSegment::None)
            && self.fills_fast(writer)
            && 2 * u64::from(oldest.size()) >= segment_bytes_max
            && available_bytes(&writer.file).is_ok_and(|free| free >= 2 * segment_bytes_max)
    }

    /// Makes `file`, the deleted `segment`'s renamed and now durably so, the next
    /// segment's; or, without it (renaming failed) or if the log closed meanwhile,
    /// leaves none. First, off the writer lock: allocates the rest of a whole segment
    /// (`KEEP_SIZE`), so that no append into it allocates.
    fn keep_recycled(&self, segment: &Segment, file: Option<File>) {
        let file = file.and_then(|file| {
            // Its length, not the segment's size: a file can hold old bytes past that.
            let len = file.metadata().ok()?.len();
            let max = u64::from(self.config.segment_bytes_max);
            if len < max
                && let Err(error) = allocate_keeping_size(&file, len, max - len)
            {
                tracing::debug!(segment = %segment.log_path().display(), %error, "could not allocate the rest of a recycled file");
            }
            Some((file, u32::try_from(len).unwrap_or(u32::MAX)))
        });
        let mut writer = lock(&self.writer);
        match file {
            Some((file, len)) if !writer.closed => {
                writer.next_segment = NextSegment::Recycled {
                    file,
                    len,
                    mapping: segment.mapping(),
                };
            }
            _ => {
                writer.next_segment = NextSegment::None;
                // Under the lock, as in `prepare_next_segment`. Nothing else makes the
                // file while this was `Preparing`.
                let _ = remove_if_exists(&self.dir.join(NEXT_SEGMENT_FILE));
            }
        }
        drop(writer);
        self.next_segment_made.notify_all();
    }

    /// The oldest segments retention would delete, or that hold only records below
    /// `below`; all of them below `floor`.
    fn retention_plan(&self, now_ms: i64, below: Offset, floor: Offset) -> Vec<Arc<Segment>> {
        let segments = self.segments.read().expect("segments lock poisoned");
        self.retention_plan_of(&segments, now_ms, below, floor)
    }

    fn retention_plan_of(
        &self,
        segments: &[Arc<Segment>],
        now_ms: i64,
        below: Offset,
        floor: Offset,
    ) -> Vec<Arc<Segment>> {
        let mut total: u64 = segments.iter().map(|s| u64::from(s.size())).sum();
        let oldest_kept_ms = self
            .config
            .retention_ms
            .map(|ms| now_ms.saturating_sub(i64::try_from(ms).unwrap_or(i64::MAX)));
        let mut planned = Vec::new();
        for (segment, next) in segments.iter().zip(&segments[1..]) {
            let size = u64::from(segment.size());
            let superseded = next.base_offset() <= below;
            let expired = oldest_kept_ms.is_some_and(|oldest| segment.max_timestamp_ms() < oldest);
            let oversized = self
                .config
                .retention_bytes
                .is_some_and(|bytes| total - size >= bytes);
            if !(expired || oversized || superseded) || segment.base_offset() >= floor {
                break;
            }
            total -= size;
            planned.push(Arc::clone(segment));
        }
        planned
    }

    /// Fsyncs the newest checkpoint, with no fsync round running meanwhile.
    fn sync_checkpoint(&self) -> Result<(), StorageError> {
        let mut syncing = lock(&self.syncing);
        while *syncing {
            syncing = self.sync_done.wait(syncing).expect("sync lock poisoned");
        }
        lock(&self.checkpoint).sync()
    }

    /// Runs [`LaneLog::enforce_retention`] with the wall clock.
    pub fn enforce_retention_now(&self) -> Result<RetentionOutcome, StorageError> {
        self.enforce_retention(unix_now_ms())
    }

    pub fn stats(&self) -> LogStats {
        let segments = self.segments.read().expect("segments lock poisoned");
        LogStats {
            start_offset: self.start_offset(),
            next_offset: self.next_offset(),
            durable_offset: self.durable_offset(),
            segments: segments.len(),
            size_bytes: segments.iter().map(|s| u64::from(s.size())).sum(),
            sync_rounds: self.sync_rounds.load(Ordering::Relaxed),
            writeback_starts: self.writeback_starts.load(Ordering::Relaxed),
            corruption: self.corruption(),
        }
    }

    /// Stops appends for a log whose files are about to be removed, without the fsyncs
    /// and checkpoint of [`LaneLog::close`]: making bytes durable just before unlinking
    /// them only costs time. Waits for a running fsync round to end. Returns the
    /// segments' `.log` files, open, for the reaper to free once they are unlinked
    /// (none without a reaper).
    pub fn close_for_removal(&self) -> Vec<Doomed> {
        {
            let mut writer = lock(&self.writer);
            writer.closed = true;
            // The directory is removed next: nothing may be created in it meanwhile.
            let mut writer = self.wait_for_next_segment(writer);
            self.give_back_next_segment(&mut writer);
        }
        let mut syncing = lock(&self.syncing);
        while *syncing {
            syncing = self.sync_done.wait(syncing).expect("sync lock poisoned");
        }
        drop(syncing);
        let Some(reaper) = &self.config.reaper else {
            return Vec::new();
        };
        let segments = self.segments.read().expect("segments lock poisoned");
        segments
            .iter()
            .filter_map(|segment| reaper.doom(segment))
            .collect()
    }

    /// Closes cleanly: fsyncs everything, flushes and trims the indexes and records a
    /// clean shutdown, so the next open checks nothing it does not have to. Appends fail
    /// afterwards; reads still work.
    pub fn close(&self) -> Result<(), StorageError> {
        {
            let mut writer = lock(&self.writer);
            if writer.closed {
                return Ok(());
            }
            // First stop appends, so the flush below covers every record there will be.
            writer.closed = true;
            let mut writer = self.wait_for_next_segment(writer);
            self.give_back_next_segment(&mut writer);
        }
        if self.failed.load(Ordering::Acquire) {
            // Leave the old checkpoint: the next open must look at everything again.
            return Ok(());
        }
        self.flush()?;
        // A roll with no append after it (the write failed) left its names to a round
        // that did not come.
        let rolls_deferred = lock(&self.writer).rolls_deferred;
        self.sync_dir_for(rolls_deferred)?;
        // Hold the sync token: no fsync round may write a checkpoint after ours.
        let mut syncing = lock(&self.syncing);
        while *syncing {
            syncing = self.sync_done.wait(syncing).expect("sync lock poisoned");
        }
        if self.corruption().is_some() {
            return Ok(());
        }
        let writer = lock(&self.writer);
        assert_eq!(
            writer.active.next_offset(),
            self.durable_offset(),
            "a clean shutdown covers only durable records"
        );
        writer.active.seal(None)?;
        if writer.recycled_len > writer.active.size() {
            // Otherwise the next open would take the old bytes for a torn tail. Fsynced
            // before the checkpoint that says the close was clean.
            give_back_allocation(&writer.file, &writer.active);
            if let Err(error) = faults::synced(writer.active.log_path(), || writer.file.sync_data()) {
                tracing::warn!(segment = %writer.active.log_path().display(), %error, "could not fsync the active segment's cut");
            }
        }
        let point = clean_point_of(&writer.active, true);
        lock(&self.checkpoint).write(point, true)?;
        self.checkpoint_segment
            .store(point.segment_base.0, Ordering::Release);
        drop(syncing);
        tracing::debug!(dir = %self.dir.display(), "lane log closed cleanly");
        Ok(())
    }
}

fn clean_point_of(active: &Segment, clean_shutdown: bool) -> CleanPoint {
    CleanPoint {
        clean_offset: active.next_offset(),
        segment_base: active.base_offset(),
        position: active.size(),
        clean_shutdown,
    }
}

/// `sync_file_range(SYNC_FILE_RANGE_WRITE)`: starts writeback of dirty pages in the
/// range that are not already under writeback, without waiting for it to finish.
#[allow(unsafe_code)]
fn start_writeback(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Ok(());
    };
    // SAFETY: a plain system call on a file descriptor that `file` keeps open; no memory
    // is passed.
    let result = unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE) };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `fallocate(FALLOC_FL_KEEP_SIZE)`: allocates the range's blocks (unwritten: they read
/// as zeros) without changing the file's size.
#[allow(unsafe_code)]
fn allocate_keeping_size(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Ok(());
    };
    // SAFETY: a plain system call on a file descriptor that `file` keeps open; no memory
    // is passed.
    let result = unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, offset, len) };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Creates `path` (or empties it), allocates `bytes` of blocks for it and fsyncs it, so
/// that the name it gets later never points at an inode that a crash could lose. Leaves
/// at least as much disk free as it takes.
fn prepare_file(path: &Path, bytes: u64) -> std::io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    if available_bytes(&file)? < bytes.saturating_mul(2) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::StorageFull,
            "less than two segments of disk free",
        ));
    }
    allocate_keeping_size(&file, 0, bytes)?;
    file.sync_all()?;
    Ok(file)
}

/// Zeros that [`write_all_padded_at`] writes after a batch.
static PADDING_ZEROS: [u8; PADDING_BYTES_MAX] = [0; PADDING_BYTES_MAX];
/// The most padding an append writes: a page, on systems with pages up to this size.
const PADDING_BYTES_MAX: usize = 64 * 1024;

/// How many zeros to write after `len` bytes appended at `position` of a file that holds
/// a recycled file's old bytes up to `recycled_len`: up to the end of the page the write
/// ends in, if that page holds old bytes.
///
/// Why: a write that ends inside a page not in the page cache, over blocks the file
/// already has, makes the kernel read that page from the disk first, and the append
/// waits for the read. A recycled file's pages are often gone from the page cache (the
/// kernel's own reclaim, or `cached_tail_bytes`). Padded, the page a write ends in is
/// written whole, which the kernel takes without reading; the page it begins in is the
/// one the previous append ended in, cached since. The next append overwrites the zeros.
/// Past the page of the last old byte the blocks are allocated but unwritten, which
/// read as zeros without the disk, so nothing is padded there. (This assumes blocks no
/// larger than a page, as on ext4; with pages over `PADDING_BYTES_MAX`, nothing is
/// padded and such appends read.)
fn padding_over_old_bytes(position: u32, len: usize, recycled_len: u32) -> usize {
    // Most active segments are not recycled files: their appends skip `sysconf`.
    if recycled_len == 0 {
        return 0;
    }
    let page_bytes = page_bytes();
    let end = position as usize + len;
    if end >= (recycled_len as usize).next_multiple_of(page_bytes) || page_bytes > PADDING_BYTES_MAX {
        return 0;
    }
    end.next_multiple_of(page_bytes) - end
}

/// Writes `bytes` then `zeros` zeros at `at`, in one `pwritev`: in two writes, the first
/// would end inside a page, which is what the zeros are there to avoid.
#[allow(unsafe_code)]
fn write_all_padded_at(file: &File, bytes: &[u8], zeros: usize, at: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    if zeros == 0 {
        return file.write_all_at(bytes, at);
    }
    let iovecs = [
        libc::iovec {
            iov_base: bytes.as_ptr() as *mut libc::c_void,
            iov_len: bytes.len(),
        },
        libc::iovec {
            iov_base: PADDING_ZEROS.as_ptr() as *mut libc::c_void,
            iov_len: zeros,
        },
    ];
    let offset =
        libc::off_t::try_from(at).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let written = loop {
        // SAFETY: both iovecs point at live buffers of the lengths given, which pwritev
        // only reads; the descriptor is kept open by `file`.
        let written = unsafe { libc::pwritev(file.as_raw_fd(), iovecs.as_ptr(), 2, offset) };
        if written >= 0 {
            break written as usize;
        }
        let error = std::io::Error::last_os_error();
        if error.kind() != std::io::ErrorKind::Interrupted {
            return Err(error);
        }
    };
    // A short write (rare for a regular file) finishes with plain writes.
    if written < bytes.len() {
        file.write_all_at(&bytes[written..], at + written as u64)?;
        file.write_all_at(&PADDING_ZEROS[..zeros], at + bytes.len() as u64)
    } else {
        let done = written - bytes.len();
        file.write_all_at(&PADDING_ZEROS[done..zeros], at + written as u64)
    }
}

/// Bytes free for unprivileged use on `file`'s file system (`fstatvfs`).
#[allow(unsafe_code)]
fn available_bytes(file: &File) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd;
    let mut stats = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `stats` is a valid place for one `statvfs`, which the call fills in when
    // it returns 0; the descriptor is kept open by `file`.
    let result = unsafe { libc::fstatvfs(file.as_raw_fd(), stats.as_mut_ptr()) };
    if result != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: filled in by the successful call above.
    let stats = unsafe { stats.assume_init() };
    Ok(stats.f_bavail.saturating_mul(stats.f_frsize))
}

/// Frees blocks allocated past a sealed segment's end: truncating a file to its own size
/// drops them. Only disk space is at stake, so a failure is logged, not returned.
fn give_back_allocation(file: &File, segment: &Segment) {
    if let Err(error) = file.set_len(u64::from(segment.size())) {
        tracing::warn!(segment = %segment.log_path().display(), %error, "could not free the blocks allocated past a sealed segment's end");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::DirectReads;
    use crate::storage::segment::page_bytes;
    use lanes_protocol::record_batch::ProducerStamp;
    use lanes_protocol::{BatchLimits, RecordBatchBuilder};

    fn one_record_batch() -> Vec<u8> {
        let mut builder = RecordBatchBuilder::new(BatchLimits::default());
        builder.push(0, None, b"order", &[]).unwrap();
        builder.finish(ProducerStamp::NONE).to_vec()
    }

    /// A log that fsyncs only when asked, with one record appended.
    fn never_synced_log_with_one_record(dir: &Path) -> LaneLog {
        let config = LogConfig {
            fsync: FsyncPolicy::Never,
            ..LogConfig::default()
        };
        let log = LaneLog::open(dir, config).unwrap();
        log.append(&mut one_record_batch()).unwrap();
        log
    }

    #[test]
    fn writeback_is_due_every_writeback_bytes_unless_every_append_is_fsynced() {
        let batch_bytes = one_record_batch().len() as u32;
        let open = |dir: &Path, fsync, writeback_bytes| {
            let config = LogConfig {
                fsync,
                writeback_bytes,
                ..LogConfig::default()
            };
            LaneLog::open(dir, config).unwrap()
        };
        let append_due = |log: &LaneLog, count| -> Vec<bool> {
            (0..count)
                .map(|_| log.append(&mut one_record_batch()).unwrap().writeback_due)
                .collect()
        };
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), FsyncPolicy::Never, 3 * batch_bytes);
        // Due from the third batch on, until the writeback starts.
        assert_eq!(append_due(&log, 4), [false, false, true, true]);
        log.start_writeback().unwrap();
        assert_eq!(log.stats().writeback_starts, 1);
        log.start_writeback().unwrap();
        assert_eq!(
            log.stats().writeback_starts,
            1,
            "nothing new appended, nothing started"
        );
        assert_eq!(append_due(&log, 3), [false, false, true]);
        assert_eq!(log.stats().sync_rounds, 0, "writeback is not an fsync");

        let dir = tempfile::tempdir().unwrap();
        let always = open(dir.path(), FsyncPolicy::Always, batch_bytes);
        assert_eq!(append_due(&always, 2), [false, false], "its fsyncs write back");
        let dir = tempfile::tempdir().unwrap();
        let off = open(dir.path(), FsyncPolicy::Interval(Duration::from_secs(60)), 0);
        assert_eq!(
            append_due(&off, 2),
            [false, false],
            "0 leaves writeback to the kernel"
        );
    }

    /// Asks the kernel to drop `file`'s clean pages that nothing maps from the page cache.
    #[allow(unsafe_code)]
    fn drop_from_page_cache(file: &File) {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain system call on an open descriptor; no memory is passed.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }

    /// Whether the file system of `dir` drops a clean page from the page cache when
    /// asked (tmpfs, for one, cannot: its pages are the files).
    #[allow(unsafe_code)]
    fn drops_clean_pages(dir: &Path) -> bool {
        use std::io::Write;
        let path = dir.join("probe");
        let mut file = File::create(&path).unwrap();
        file.write_all(&vec![1; page_bytes()]).unwrap();
        file.sync_all().unwrap();
        let file = File::open(&path).unwrap();
        drop_from_page_cache(&file);
        // SAFETY: the file is this test's own, and nothing changes it while mapped.
        let map = unsafe { Mmap::map(&file) }.unwrap();
        let mut resident = [0u8; 1];
        // SAFETY: `map` is one page, mapped at a page boundary; `resident` has its byte.
        let result = unsafe {
            libc::mincore(
                map.as_ptr() as *mut libc::c_void,
                map.len(),
                resident.as_mut_ptr(),
            )
        };
        drop(map);
        std::fs::remove_file(&path).unwrap();
        result == 0 && resident[0] & 1 == 0
    }

    /// A log of `segment_bytes_max` segments that keeps `keep` bytes cached, appending
    /// batches of one 60 KiB record of 3s.
    struct CachedTail {
        log: LaneLog,
        _dir: tempfile::TempDir,
    }

    impl CachedTail {
        fn open(keep: u32, segment_bytes_max: u32) -> Option<CachedTail> {
            Self::open_reading(keep, segment_bytes_max, None)
        }

        /// The same, with `direct_reads`.
        fn open_reading(
            keep: u32,
            segment_bytes_max: u32,
            direct_reads: Option<Arc<DirectReads>>,
        ) -> Option<CachedTail> {
            let dir = tempfile::tempdir().unwrap();
            if !drops_clean_pages(dir.path()) {
                eprintln!("skipped: the temp dir's file system keeps pages it is asked to drop");
                return None;
            }
            let config = LogConfig {
                fsync: FsyncPolicy::Always,
                cached_tail_bytes: u64::from(keep),
                segment_bytes_max,
                direct_reads,
                ..LogConfig::default()
            };
            let log = LaneLog::open(dir.path(), config).unwrap();
            Some(CachedTail { log, _dir: dir })
        }

        fn batch() -> Vec<u8> {
            let mut builder = RecordBatchBuilder::new(BatchLimits::default());
            builder.push(0, None, &[3; 60 * 1024], &[]).unwrap();
            builder.finish(ProducerStamp::NONE).to_vec()
        }

        /// Appends up to `bytes` of log, then runs an fsync round and the drop after
        /// it, as the fsync threads do.
        fn append_until(&self, bytes: u32) {
            while self.log.stats().size_bytes < u64::from(bytes) {
                self.log.append(&mut Self::batch()).unwrap();
            }
            self.log.flush().unwrap();
            self.log.drop_cached_behind();
        }

        fn segments(&self) -> Vec<Arc<Segment>> {
            self.log.segments.read().unwrap().clone()
        }

        /// Reads the whole log, touching every page and checking every byte.
        fn read_all(&self, from: Offset) {
            let mut offset = from;
            while offset < self.log.next_offset() {
                let slice = self.log.read(offset, 1 << 20, self.log.next_offset()).unwrap();
                for batch in lanes_protocol::Batches::new(slice.bytes, BatchLimits::default()) {
                    assert!(
                        batch
                            .unwrap()
                            .records()
                            .all(|record| record.value.iter().all(|&b| b == 3))
                    );
                }
                offset = slice.next_offset;
            }
        }
    }

    const MIB: u32 = 1 << 20;

    fn pages(from: u32, to: u32) -> Option<usize> {
        Some((to - from).div_ceil(page_bytes() as u32) as usize)
    }

    /// Asserts that the pages of `segment` before `kept_from` are out of the page cache
    /// and the rest in.
    fn assert_cached_from(segment: &Segment, kept_from: u32, context: &str) {
        let size = segment.size();
        assert_eq!(
            segment.resident_pages(0, kept_from),
            Some(0),
            "dropped: {context}"
        );
        assert_eq!(
            segment.resident_pages(kept_from, size),
            pages(kept_from, size),
            "kept: {context}"
        );
    }

    fn steps_below(bytes: u32) -> u32 {
        bytes / CACHE_DROP_STEP_BYTES * CACHE_DROP_STEP_BYTES
    }

    #[test]
    fn pages_further_back_than_cached_tail_bytes_leave_the_page_cache() {
        let keep = 4 * MIB;
        let Some(tail) = CachedTail::open(keep, 16 * MIB) else {
            return;
        };
        tail.append_until(11 * MIB);
        let first = Arc::clone(&tail.segments()[0]);
        let size = first.size();
        let dropped_to = steps_below(size - keep);
        assert!(dropped_to >= 6 * MIB, "{dropped_to}");
        assert_cached_from(&first, dropped_to, "more than 4 MiB back");
        // A consumer at the tail reads the rest through the mapping, which keeps pages
        // cached until they are unmapped; it holds on to a slice meanwhile.
        let first_kept = Offset(u64::from(dropped_to).div_ceil(CachedTail::batch().len() as u64));
        tail.read_all(first_kept);
        let held = tail
            .log
            .read(first_kept, MIB as usize, tail.log.next_offset())
            .unwrap();

        // Into the next segment: the one before keeps its pages within 4 MiB of the
        // log's end (in steps), then none.
        tail.append_until(17 * MIB);
        assert_eq!(tail.segments().len(), 2);
        let (sealed, second) = (first.size(), tail.segments()[1].size());
        assert!(second < keep - CACHE_DROP_STEP_BYTES, "{second}");
        let dropped_to = steps_below(sealed - (keep - second));
        assert!(dropped_to >= 12 * MIB, "{dropped_to}");
        assert_cached_from(&first, dropped_to, "within 4 MiB of the end");
        tail.append_until(sealed + keep + MIB);
        assert_cached_from(&first, sealed, "none once 4 MiB are in the next");
        // Dropped pages read back from the disk as they were, through a slice held
        // across the drop too.
        let held_batches = lanes_protocol::Batches::new(held.bytes, BatchLimits::default());
        assert!(
            held_batches
                .map(Result::unwrap)
                .all(|batch| batch.records().all(|r| r.value.iter().all(|&b| b == 3)))
        );
        tail.read_all(Offset(0));
    }

    #[test]
    fn pages_a_consumer_group_has_not_committed_stay_cached_behind_the_window() {
        let keep = 2 * MIB;
        let Some(tail) = CachedTail::open(keep, 8 * MIB) else {
            return;
        };
        tail.append_until(MIB);
        // A group has committed up to about 3 MiB into the first segment.
        let floor = Offset(3 * u64::from(MIB) / CachedTail::batch().len() as u64);
        tail.log.set_group_floor(Some(floor));
        tail.append_until(20 * MIB);
        let segments = tail.segments();
        assert_eq!(segments.len(), 3);
        let floor_step = steps_below(segments[0].indexed_position_at_most(floor));
        assert!(floor_step >= 2 * MIB, "{floor_step}");
        assert_cached_from(&segments[0], floor_step, "from the group's committed offset on");
        assert_cached_from(&segments[1], 0, "all of it, after the committed offset");
        assert_cached_from(&segments[2], 0, "the active one too");

        // The group moves on into the active segment: only the window's pages stay.
        let active = Arc::clone(&segments[2]);
        let floor = active.next_offset();
        tail.log.set_group_floor(Some(floor));
        tail.append_until(22 * MIB);
        assert_cached_from(&segments[0], segments[0].size(), "none once committed");
        assert_cached_from(&segments[1], segments[1].size(), "none once committed");
        let floor_at = active.indexed_position_at_most(floor);
        let dropped_to = steps_below(active.size() - keep).min(steps_below(floor_at));
        assert!(dropped_to >= 2 * MIB, "{dropped_to}");
        assert_cached_from(&active, dropped_to, "the window, and the floor within it");

        // No group any more: the window alone.
        tail.log.set_group_floor(None);
        tail.append_until(23 * MIB);
        assert_cached_from(&active, steps_below(active.size() - keep), "the window alone");
        tail.read_all(Offset(0));
    }

    /// A log of 8 MiB segments keeping 2 MiB cached, reading with `buffers` direct read
    /// buffers, 12 MiB appended: the first segment is out of the page cache.
    fn behind_the_window(buffers: u64) -> Option<(CachedTail, Arc<DirectReads>)> {
        use super::super::direct_read::{DIRECT_ALIGN_BYTES, DIRECT_BUFFER_BYTES};
        let pool = DirectReads::new(buffers * (DIRECT_BUFFER_BYTES + DIRECT_ALIGN_BYTES) as u64).unwrap();
        Some((behind_the_window_of(&pool)?, pool))
    }

    /// The same, reading with `pool`.
    fn behind_the_window_of(pool: &Arc<DirectReads>) -> Option<CachedTail> {
        use super::super::direct_read::{DIRECT_ALIGN_BYTES, DIRECT_BUFFER_BYTES};
        let tail = CachedTail::open_reading(2 * MIB, 8 * MIB, Some(Arc::clone(pool)))?;
        tail.append_until(12 * MIB);
        let first = &tail.segments()[0];
        assert_cached_from(first, first.size(), "dropped: behind the window");
        let probe = DirectReads::new((DIRECT_BUFFER_BYTES + DIRECT_ALIGN_BYTES) as u64).unwrap();
        let (path, id) = first.direct_file();
        if super::super::direct_read::read(&probe, path, id, 0, DIRECT_ALIGN_BYTES).is_none() {
            eprintln!("skipped: the temp dir's file system refuses O_DIRECT");
            return None;
        }
        Some(tail)
    }

    /// Reads `offset..end` of the log, checking every batch. Before each read, waits
    /// for the read-ahead of the one before to finish.
    fn read_checked(log: &LaneLog, mut offset: Offset, end: Offset) {
        while offset < end {
            wait_for_read_ahead(log);
            let slice = log.read(offset, 1 << 20, end).unwrap();
            assert!(!slice.bytes.is_empty());
            for batch in lanes_protocol::Batches::new(slice.bytes.clone(), BatchLimits::default()) {
                let batch = batch.unwrap();
                assert_eq!(batch.base_offset(), offset, "batches follow each other");
                assert!(batch.records().all(|record| record.value.iter().all(|&b| b == 3)));
                offset = batch.header().next_offset();
            }
            assert_eq!(offset, slice.next_offset);
        }
    }

    #[test]
    fn reads_of_pages_gone_from_the_page_cache_come_from_the_disk_and_do_not_bring_them_back() {
        let Some((tail, pool)) = behind_the_window(4) else {
            return;
        };
        let first = Arc::clone(&tail.segments()[0]);
        read_checked(&tail.log, Offset(0), first.next_offset());
        let stats = pool.stats();
        assert!(stats.reads >= 7, "{stats:?}");
        assert!(stats.bytes >= u64::from(7 * MIB), "{stats:?}");
        assert_eq!(
            stats.read_ahead_taken,
            stats.reads - 1,
            "each read but the first was read ahead: {stats:?}"
        );
        assert_eq!(stats.buffers_exhausted, 0);
        assert_cached_from(&first, first.size(), "still dropped: read from the disk");

        // The window's pages are cached: read through the mapping (the last 10 batches,
        // 600 KiB, are well inside it).
        read_checked(
            &tail.log,
            Offset(tail.log.next_offset().0 - 10),
            tail.log.next_offset(),
        );
        assert_eq!(
            pool.stats().reads,
            stats.reads,
            "the window is read through the mapping"
        );
    }

    #[test]
    fn a_read_that_does_not_wait_for_the_disk_leaves_it_to_one_that_may() {
        let Some((tail, pool)) = behind_the_window(4) else {
            return;
        };
        let first_end = tail.segments()[0].next_offset();
        assert!(
            tail.log
                .try_read(Offset(0), 1 << 20, first_end)
                .unwrap()
                .is_none(),
            "dropped pages: a direct read"
        );
        assert_eq!(pool.stats().reads, 0, "nothing read meanwhile");
        let read = tail.log.read(Offset(0), 1 << 20, first_end).unwrap();
        assert_eq!(pool.stats().reads, 1);
        let next = read.next_offset;
        // The read-ahead of what follows runs on a thread of the pool: until it is done,
        // `try_read` leaves it in place, and while it runs `read_ahead_done` is a future
        // that ends with it; then `try_read` takes it.
        let slice = match tail.log.try_read(next, 1 << 20, first_end).unwrap() {
            Some(slice) => slice,
            None => {
                let waiting = lock(&tail.log.read_ahead).next.as_ref().map(|next| next.offset);
                assert_eq!(waiting, Some(next), "the read-ahead stays in place");
                match tail.log.read_ahead_done(next) {
                    Some(running) => {
                        let runtime = tokio::runtime::Builder::new_current_thread()
                            .enable_time()
                            .build()
                            .unwrap();
                        let waited = runtime
                            .block_on(async { tokio::time::timeout(Duration::from_secs(30), running).await });
                        waited.expect("the read-ahead ends");
                    }
                    // Still queued (not awaited), or done meanwhile.
                    None => wait_for_read_ahead(&tail.log),
                }
                assert!(tail.log.read_ahead_done(next).is_none());
                let slice = tail.log.try_read(next, 1 << 20, first_end).unwrap();
                slice.expect("read ahead: taken without waiting")
            }
        };
        let batch = lanes_protocol::Batches::new(slice.bytes, BatchLimits::default()).next();
        assert_eq!(batch.unwrap().unwrap().base_offset(), next);
        let stats = pool.stats();
        assert_eq!(stats.read_ahead_taken, 1, "{stats:?}");
        wait_for_read_ahead(&tail.log);
        let slice = tail.log.try_read(Offset(0), 1 << 20, first_end).unwrap();
        assert!(slice.is_none(), "behind the buffers kept: the disk again");

        // The window's pages are cached: `try_read` reads them.
        let end = tail.log.next_offset();
        let near_end = Offset(end.0 - 10);
        let slice = tail
            .log
            .try_read(near_end, 1 << 20, end)
            .unwrap()
            .expect("cached");
        assert_eq!(slice.next_offset, end);
        assert_eq!(slice.bytes, tail.log.read(near_end, 1 << 20, end).unwrap().bytes);
    }

    /// Waits for `log`'s read-ahead, if any, to finish.
    fn wait_for_read_ahead(log: &LaneLog) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while lock(&log.read_ahead)
            .next
            .as_ref()
            .is_some_and(|ahead| ahead.is_pending())
        {
            assert!(Instant::now() < deadline, "read-ahead never finished");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_read_that_starts_inside_the_last_direct_read_takes_its_batches_from_its_buffer() {
        // As when a fetch sends fewer batches than it read.
        let Some((tail, pool)) = behind_the_window(4) else {
            return;
        };
        let first_end = tail.segments()[0].next_offset();
        let whole = tail.log.read(Offset(0), 1 << 20, first_end).unwrap();
        wait_for_read_ahead(&tail.log);
        let reads = pool.stats().reads;
        let middle = Offset(whole.next_offset.0 / 2);
        let again = tail.log.read(middle, 1 << 20, first_end).unwrap();
        assert_eq!(pool.stats().reads, reads, "nothing read from the disk again");
        let offsets = |bytes: Bytes| -> Vec<Offset> {
            lanes_protocol::Batches::new(bytes, BatchLimits::default())
                .map(|batch| batch.unwrap().base_offset())
                .collect()
        };
        let expected: Vec<Offset> = offsets(whole.bytes.clone())
            .into_iter()
            .filter(|&offset| offset >= middle)
            .collect();
        assert_eq!(offsets(again.bytes.clone()), expected);
        assert_eq!(again.next_offset, whole.next_offset);
        let within = whole.bytes.as_ptr_range();
        assert!(
            within.contains(&again.bytes.as_ptr()) && again.bytes.as_ptr_range().end == within.end,
            "slices of the same buffer"
        );
        // From the end of the buffer on: the read-ahead.
        tail.log.read(again.next_offset, 1 << 20, first_end).unwrap();
        assert_eq!(pool.stats().read_ahead_taken, 1);
    }

    #[test]
    fn a_buffer_kept_for_a_lane_log_whose_reader_went_quiet_goes_to_another_that_needs_it() {
        // One buffer, kept by the first log after its read.
        let Some((quiet, pool)) = behind_the_window(1) else {
            return;
        };
        let Some(busy) = behind_the_window_of(&pool) else {
            return;
        };
        drop(
            quiet
                .log
                .read(Offset(0), 1 << 20, quiet.log.next_offset())
                .unwrap(),
        );
        assert!(lock(&quiet.log.read_ahead).current.is_some());
        assert_eq!(pool.stats().reads, 1);
        // Once it is older than READ_AHEAD_KEPT, a read that finds no buffer takes it.
        // (A read through the mapping would fault in the disk's read-around, and the
        // reads after it would find their pages cached.)
        std::thread::sleep(super::super::direct_read::READ_AHEAD_KEPT);
        let first_end = busy.segments()[0].next_offset();
        read_checked(&busy.log, Offset(0), first_end);
        let stats = pool.stats();
        assert!(stats.reads >= 8, "the busy log read from the disk: {stats:?}");
        assert_eq!(stats.buffers_exhausted, 0, "{stats:?}");
    }

    #[test]
    fn with_every_direct_read_buffer_lent_reads_go_through_the_mapping() {
        // One buffer: never read ahead (that would take the last), and lent while a
        // read's bytes are held.
        let Some((tail, pool)) = behind_the_window(1) else {
            return;
        };
        let first_end = tail.segments()[0].next_offset();
        read_checked(&tail.log, Offset(0), first_end);
        let stats = pool.stats();
        assert!(stats.reads >= 7, "{stats:?}");
        assert_eq!(
            (stats.read_ahead_taken, stats.buffers_exhausted),
            (0, 0),
            "{stats:?}"
        );
        let held = tail.log.read(Offset(0), 1 << 20, first_end).unwrap();
        assert_eq!(pool.stats().reads, stats.reads + 1);
        read_checked(&tail.log, Offset(0), first_end);
        let after = pool.stats();
        assert_eq!(
            after.reads,
            stats.reads + 1,
            "`held` has the only buffer: {after:?}"
        );
        // The reads inside the held read's batches come from the buffer it kept; the
        // first one past them finds no buffer and goes through the mapping, which
        // faults in what the disk reads around it, so the reads after it may find
        // their pages cached and not ask for a buffer.
        assert!(after.buffers_exhausted >= 1, "{after:?}");
        drop(held);
    }

    #[test]
    fn a_backlog_behind_the_cached_tail_is_measured_without_bringing_its_pages_back() {
        let keep = 2 * MIB;
        let Some(tail) = CachedTail::open(keep, 16 * MIB) else {
            return;
        };
        // Small batches, dozens per index interval, each carrying its offset as its
        // timestamp.
        let small = |offset: u64| {
            let mut builder = RecordBatchBuilder::new(BatchLimits::default());
            builder.push(offset as i64, None, &[5; 100], &[]).unwrap();
            builder.finish(ProducerStamp::NONE).to_vec()
        };
        let batch_bytes = small(0).len() as u64;
        while tail.log.stats().size_bytes < u64::from(6 * MIB) {
            tail.log.append(&mut small(tail.log.next_offset().0)).unwrap();
        }
        tail.log.flush().unwrap();
        tail.log.drop_cached_behind();
        let segment = Arc::clone(&tail.segments()[0]);
        let dropped_to = steps_below(segment.size() - keep);
        assert_cached_from(&segment, dropped_to, "before");
        // Lookups close together, so that some find the pages of their index entry read
        // by one before, and the header they look for on a page after it.
        let end = tail.log.next_offset();
        let froms: Vec<Offset> = (0..60).map(|i| Offset(1_000 + 7 * i)).collect();
        let backlogs: Vec<Backlog> = froms
            .iter()
            .map(|&from| tail.log.backlog(from, end).unwrap())
            .collect();
        // Read through the mapping, the headers' pages would bring the disk's read-ahead
        // with them (hundreds of pages here); read on their own, a page each: the 70 KiB
        // the lookups span, and the index entries' pages before them.
        let resident = segment.resident_pages(0, dropped_to).unwrap();
        assert!(resident <= 24, "{resident} pages back");
        for (from, backlog) in froms.into_iter().zip(backlogs) {
            assert_eq!(backlog.records, end.0 - from.0);
            assert_eq!(backlog.bytes, u64::from(segment.size()) - from.0 * batch_bytes);
            assert_eq!(backlog.oldest_timestamp_ms, Some(from.0 as i64));
        }
    }

    #[test]
    fn a_window_longer_than_a_segment_reaches_back_over_several() {
        // 6 MiB over segments of 4 MiB: the active one and up to two before it.
        let keep = 6 * MIB;
        let Some(tail) = CachedTail::open(keep, 4 * MIB) else {
            return;
        };
        // Six rolls, more than the segments tracked, with fsync rounds between.
        for mib in (2..=25).step_by(2) {
            tail.append_until(mib * MIB);
        }
        let segments = tail.segments();
        assert_eq!(segments.len(), 7);
        // From the newest back: what the window holds stays, in steps; the rest goes.
        let (mut keep_before, mut partly_kept, mut dropped) = (u64::from(keep), 0, 0);
        for segment in segments.iter().rev() {
            let size = segment.size();
            let kept_from = if keep_before == 0 {
                dropped += 1;
                size
            } else {
                let kept_from = u64::from(size)
                    .checked_sub(keep_before)
                    .map_or(0, |behind| steps_below(behind as u32));
                partly_kept += usize::from(kept_from > 0);
                kept_from
            };
            keep_before = keep_before.saturating_sub(u64::from(size));
            assert_cached_from(segment, kept_from, &format!("{kept_from} of {size}"));
        }
        assert_eq!(
            (partly_kept, dropped),
            (1, 4),
            "the window ends inside the third segment back"
        );
        tail.read_all(Offset(0));
    }

    /// A batch of one record of 8 KiB.
    fn big_batch() -> Vec<u8> {
        let mut builder = RecordBatchBuilder::new(BatchLimits::default());
        builder.push(0, None, &[7; 8 * 1024], &[]).unwrap();
        builder.finish(ProducerStamp::NONE).to_vec()
    }

    /// 64 KiB segments (batches up to 16 KiB) with `fsync`.
    fn small_segments(fsync: FsyncPolicy) -> LogConfig {
        LogConfig {
            fsync,
            segment_bytes_max: 64 * 1024,
            batch: BatchLimits {
                batch_bytes_max: 16 * 1024,
                ..BatchLimits::default()
            },
            ..LogConfig::default()
        }
    }

    /// Bytes of disk the file system holds for `path`, written or only allocated.
    fn allocated_bytes(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).unwrap().blocks() * 512
    }

    #[test]
    fn writeback_allocates_ahead_of_the_appends_and_an_early_roll_gives_it_back() {
        let writeback_bytes = 8 * 1024;
        let config = LogConfig {
            fsync: FsyncPolicy::Never,
            writeback_bytes,
            // Every append after the first rolls: the early roll.
            segment_ms_max: 0,
            ..LogConfig::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let log = LaneLog::open(dir.path(), config).unwrap();
        let first = offset_file_name(dir.path(), Offset(0), LOG_SUFFIX);
        let batch_bytes = big_batch().len() as u64;
        assert!(
            log.append(&mut big_batch()).unwrap().writeback_due,
            "a batch past writeback_bytes"
        );
        log.start_writeback().unwrap();
        assert_eq!(
            std::fs::metadata(&first).unwrap().len(),
            batch_bytes,
            "allocating ahead leaves the size alone"
        );
        let ahead = u64::from(writeback_bytes * ALLOCATE_AHEAD_WRITEBACKS);
        assert!(
            allocated_bytes(&first) >= batch_bytes + ahead - 4096,
            "{} bytes allocated for {batch_bytes} written and {ahead} ahead",
            allocated_bytes(&first)
        );

        log.append(&mut big_batch()).unwrap();
        assert_eq!(log.stats().segments, 2, "rolled");
        assert!(
            allocated_bytes(&first) >= batch_bytes + ahead - 4096,
            "given back by the fsync round, not by the roll"
        );
        log.flush().unwrap();
        assert!(
            allocated_bytes(&first) < batch_bytes + u64::from(writeback_bytes),
            "the sealed segment of {batch_bytes} bytes holds {}",
            allocated_bytes(&first)
        );
        assert_eq!(std::fs::metadata(&first).unwrap().len(), batch_bytes);
        let read = log.read(Offset(0), 1 << 20, log.next_offset()).unwrap();
        assert_eq!(
            read.bytes.len() as u64,
            batch_bytes,
            "the sealed batch reads back"
        );
    }

    #[test]
    fn a_segment_filling_fast_gets_its_successor_made_ahead_in_another_file() {
        let config = LogConfig {
            writeback_bytes: 8 * 1024,
            ..small_segments(FsyncPolicy::Never)
        };
        let segment_bytes_max = config.segment_bytes_max;
        let dir = tempfile::tempdir().unwrap();
        let next = dir.path().join(NEXT_SEGMENT_FILE);
        let log = LaneLog::open(dir.path(), config.clone()).unwrap();
        // Each batch is past `writeback_bytes`: run the writeback it makes due, as the
        // syncer would.
        let append = |log: &LaneLog| {
            let outcome = log.append(&mut big_batch()).unwrap();
            assert!(outcome.writeback_due);
            log.start_writeback().unwrap();
            outcome
        };
        let batch_bytes = big_batch().len() as u64;

        // The first segment allocates as it goes: its successor is made at once...
        append(&log);
        assert_eq!(std::fs::metadata(&next).unwrap().len(), 0, "made empty");
        assert!(
            allocated_bytes(&next) >= u64::from(segment_bytes_max),
            "with a whole segment allocated: {} bytes",
            allocated_bytes(&next)
        );
        // ...and the next append rolls into it.
        let second = append(&log).base_offset;
        assert_eq!(log.stats().segments, 2);
        assert!(!next.exists(), "renamed into place at the roll");
        let second = offset_file_name(dir.path(), second, LOG_SUFFIX);
        assert_eq!(std::fs::metadata(&second).unwrap().len(), batch_bytes);
        assert!(
            allocated_bytes(&second) >= u64::from(segment_bytes_max),
            "the new segment keeps the allocation: {} bytes",
            allocated_bytes(&second)
        );

        // A segment allocated whole gets its successor once half full.
        append(&log);
        append(&log);
        assert!(3 * batch_bytes < u64::from(segment_bytes_max / 2));
        assert!(!next.exists(), "not made before the segment is half full");
        append(&log);
        assert!(next.exists(), "made once half full");
        assert_eq!(log.stats().segments, 2, "and used at the roll by size");

        // A crash leaves it behind, and the next open removes it.
        let written = log.next_offset();
        drop(log);
        let log = LaneLog::open(dir.path(), config).unwrap();
        assert!(!next.exists(), "recovery removes it");
        assert!(
            allocated_bytes(&second) < u64::from(segment_bytes_max),
            "the reopened segment gives back what it holds past its end: {} bytes",
            allocated_bytes(&second)
        );
        assert_eq!(log.next_offset(), written);
        let mut offset = Offset(0);
        while offset < written {
            let read = log.read(offset, 1 << 20, written).unwrap();
            assert!(!read.bytes.is_empty(), "{offset} reads back");
            offset = read.next_offset;
        }

        // The reopened segment is not known to be allocated, so its successor is made at
        // once; a clean close gives it back.
        append(&log);
        assert!(next.exists());
        log.close().unwrap();
        assert!(!next.exists(), "a clean close gives it back");
    }

    #[test]
    fn a_log_that_stops_appending_gives_back_its_next_segment_after_a_minute() {
        let config = LogConfig {
            writeback_bytes: 8 * 1024,
            ..small_segments(FsyncPolicy::Never)
        };
        let dir = tempfile::tempdir().unwrap();
        let next = dir.path().join(NEXT_SEGMENT_FILE);
        let log = LaneLog::open(dir.path(), config).unwrap();
        let append = |log: &LaneLog| {
            log.append(&mut big_batch()).unwrap();
            log.start_writeback().unwrap();
        };
        // Into the second segment (allocated whole), until its successor is made.
        append(&log);
        append(&log);
        while !next.exists() {
            append(&log);
        }
        let segments = log.stats().segments;

        let t0 = Instant::now();
        let minute = PREPARE_NEXT_WITHIN;
        log.give_back_unused_next_segment(t0);
        append(&log);
        log.give_back_unused_next_segment(t0 + minute);
        assert!(next.exists(), "appended within the minute: kept");
        log.give_back_unused_next_segment(t0 + minute + minute - Duration::from_millis(1));
        assert!(next.exists(), "idle for less than a minute: kept");
        log.give_back_unused_next_segment(t0 + minute + minute);
        assert!(!next.exists(), "idle for a minute: given back");
        assert_eq!(log.stats().segments, segments, "no roll meanwhile");

        // Busy again: made again, and the log rolls into it.
        append(&log);
        assert!(next.exists(), "made again");
        while log.stats().segments == segments {
            append(&log);
        }
        assert!(!next.exists(), "renamed into place at the roll");
        assert_eq!(read_all(&log), log.next_offset().0, "every record reads back");
    }

    /// A batch of one record of `bytes`.
    fn batch_of(bytes: usize) -> Vec<u8> {
        let mut builder = RecordBatchBuilder::new(BatchLimits::default());
        builder.push(0, None, &vec![7; bytes], &[]).unwrap();
        builder.finish(ProducerStamp::NONE).to_vec()
    }

    fn inode(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).unwrap().ino()
    }

    fn active_log_path(log: &LaneLog) -> PathBuf {
        lock(&log.writer).active.log_path().to_owned()
    }

    /// Appends `batch_bytes` records until the log rolls; returns the new segment's path.
    fn append_until_roll(log: &LaneLog, record_bytes: usize) -> PathBuf {
        let segments = log.stats().segments;
        while log.stats().segments == segments {
            log.append(&mut batch_of(record_bytes)).unwrap();
        }
        active_log_path(log)
    }

    /// Reads every record from the log's start, checking that the offsets run on.
    fn read_all(log: &LaneLog) -> u64 {
        let (mut offset, end) = (log.start_offset(), log.next_offset());
        let mut batches = 0;
        while offset < end {
            let read = log.read(offset, 1 << 20, end).unwrap();
            let mut rest = &read.bytes[..];
            while !rest.is_empty() {
                let length = BatchHeader::parse(rest).unwrap().batch_length as usize;
                let header = validate_batch(&rest[..length], BatchLimits::default()).unwrap();
                assert_eq!(header.base_offset, offset);
                offset = header.next_offset();
                rest = &rest[length..];
                batches += 1;
            }
            assert_eq!(offset, read.next_offset);
        }
        batches
    }

    /// A durable log of 64 KiB segments whose retention keeps two of them: each pass
    /// deletes the oldest of three. No writeback and no fsync threads are needed.
    fn durable_log_keeping_two_segments() -> LogConfig {
        LogConfig {
            retention_bytes: Some(64 * 1024),
            retention_ms: None,
            ..small_segments(FsyncPolicy::Always)
        }
    }

    #[test]
    fn a_segment_deleted_by_retention_is_overwritten_as_a_later_one_once_nothing_reads_it() {
        let config = durable_log_keeping_two_segments();
        let dir = tempfile::tempdir().unwrap();
        let next = dir.path().join(NEXT_SEGMENT_FILE);
        let log = LaneLog::open(dir.path(), config.clone()).unwrap();
        // Small batches fill the first segments nearly whole; 8 KiB ones leave room, so
        // a recycled file has old bytes past the end of what overwrites it.
        let first = active_log_path(&log);
        append_until_roll(&log, 1000);
        append_until_roll(&log, 1000);
        log.append(&mut batch_of(1000)).unwrap();
        let (first_inode, first_len) = (inode(&first), std::fs::metadata(&first).unwrap().len());
        let reader = log.read(Offset(0), 1 << 20, log.next_offset()).unwrap();
        let read_before = reader.bytes.to_vec();

        assert_eq!(log.enforce_retention_now().unwrap().segments_deleted, 1);
        assert!(!first.exists());
        assert_eq!(inode(&next), first_inode, "the deleted file is kept for later");

        // A reader still holds a slice of it: the roll makes a new file instead.
        let second_new = append_until_roll(&log, 8 * 1024);
        assert_ne!(inode(&second_new), first_inode);
        assert!(next.exists());
        assert_eq!(reader.bytes, read_before, "the reader's bytes stay as they were");
        drop(reader);

        // Nothing maps it now: the next roll overwrites it.
        let recycled = append_until_roll(&log, 8 * 1024);
        assert_eq!(inode(&recycled), first_inode);
        assert!(!next.exists());
        assert_eq!(
            std::fs::metadata(&recycled).unwrap().len(),
            first_len,
            "old bytes past the new ones, until the roll"
        );
        // Every append made durable before the next, as a durable producer with one
        // batch in flight does: the roll still leaves the cut to the fsync round.
        let segments = log.stats().segments;
        while log.stats().segments == segments {
            log.flush().unwrap();
            log.append(&mut batch_of(8 * 1024)).unwrap();
        }
        let sealed_size = log.segments.read().unwrap().iter().rev().nth(1).unwrap().size();
        assert!(u64::from(sealed_size) < first_len);
        assert_eq!(std::fs::metadata(&recycled).unwrap().len(), first_len);
        log.flush().unwrap();
        assert_eq!(
            std::fs::metadata(&recycled).unwrap().len(),
            u64::from(sealed_size),
            "the fsync round after the roll cuts the old bytes off"
        );
        read_all(&log);

        // A power loss that loses the last appends to a recycled file can leave its old
        // batches there, whole and with good checksums. The file recycled now held
        // batches of the size appended next, so they line up exactly.
        assert!(log.enforce_retention_now().unwrap().segments_deleted > 0);
        let old_bytes = std::fs::read(&next).unwrap();
        let recycled = append_until_roll(&log, 1000);
        assert!(!next.exists(), "recycled: {}", recycled.display());
        log.append(&mut batch_of(1000)).unwrap();
        log.flush().unwrap();
        let (durable, batches) = (log.next_offset(), read_all(&log));
        let lost_from = u64::from(lock(&log.writer).active.size());
        log.append(&mut batch_of(1000)).unwrap();
        log.append(&mut batch_of(1000)).unwrap();
        let lost_to = u64::from(lock(&log.writer).active.size());
        drop(log);
        let (from, to) = (lost_from as usize, lost_to as usize);
        let old_length = BatchHeader::parse(&old_bytes[from..]).unwrap().batch_length as usize;
        let old_header = validate_batch(&old_bytes[from..from + old_length], BatchLimits::default());
        assert!(
            old_header.is_ok_and(|h| h.base_offset < durable),
            "an old batch begins where the lost ones did"
        );
        let file = OpenOptions::new().write(true).open(&recycled).unwrap();
        file.write_all_at(&old_bytes[from..to], lost_from).unwrap();
        drop(file);
        let log = LaneLog::open(dir.path(), config.clone()).unwrap();
        assert!(log.corruption().is_none());
        // Cut as a tail would be: where the writes stopped cannot be told.
        assert!(log.recovery_report().truncated_bytes > 0, "the old bytes are cut");
        assert_eq!(log.next_offset(), durable, "no old batch is taken for a record");
        assert_eq!(read_all(&log), batches);

        // A clean close cuts them instead, and the next open finds nothing to cut.
        append_until_roll(&log, 8 * 1024);
        log.append(&mut batch_of(8 * 1024)).unwrap();
        assert!(log.enforce_retention_now().unwrap().segments_deleted > 0);
        let recycled = append_until_roll(&log, 8 * 1024);
        assert!(!next.exists(), "recycled: {}", recycled.display());
        log.append(&mut batch_of(8 * 1024)).unwrap();
        let written = log.next_offset();
        log.close().unwrap();
        drop(log);
        let log = LaneLog::open(dir.path(), config).unwrap();
        let report = log.recovery_report();
        assert!(report.clean_shutdown);
        assert_eq!((report.truncated_bytes, report.recycled_bytes), (0, 0));
        assert_eq!(log.next_offset(), written);
        read_all(&log);
    }

    #[test]
    fn appends_over_old_bytes_are_padded_to_the_end_of_their_last_page() {
        let page = page_bytes() as u32;
        // Not a recycled file, or past the page of its last old byte: nothing.
        assert_eq!(padding_over_old_bytes(100, 1000, 0), 0);
        assert_eq!(padding_over_old_bytes(10 * page, 1000, 10 * page), 0);
        assert_eq!(padding_over_old_bytes(10 * page, 1000, 9 * page + 500), 0);
        // Inside them: to the page's end, also past the last old byte in its page.
        assert_eq!(padding_over_old_bytes(100, 1000, 8 * page), page as usize - 1100);
        assert_eq!(
            padding_over_old_bytes(page - 10, 20, 8 * page),
            page as usize - 10
        );
        assert_eq!(padding_over_old_bytes(100, 1000, 2000), page as usize - 1100);
        assert_eq!(
            padding_over_old_bytes(10 * page, 1000, 10 * page + 500),
            page as usize - 1000
        );
        // Ending on a page boundary: nothing.
        assert_eq!(padding_over_old_bytes(page, page as usize, 8 * page), 0);
    }

    /// Bytes the calling thread has had read from a disk (`/proc/thread-self/io`), or
    /// `None` where the kernel does not count them.
    fn disk_bytes_read_by_this_thread() -> Option<u64> {
        let io = std::fs::read_to_string("/proc/thread-self/io").ok()?;
        io.lines()
            .find_map(|line| line.strip_prefix("read_bytes: "))?
            .trim()
            .parse()
            .ok()
    }

    #[test]
    #[allow(unsafe_code)] // maps a file to look at its pages
    fn appends_over_a_recycled_file_gone_from_the_page_cache_read_nothing_from_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        if !drops_clean_pages(dir.path())
            || disk_bytes_read_by_this_thread().is_none()
            || page_bytes() != 4096
        {
            eprintln!(
                "skipped: the temp dir's file system keeps its pages, reads are not counted, or pages are not 4 KiB"
            );
            return;
        }
        let log = LaneLog::open(dir.path(), durable_log_keeping_two_segments()).unwrap();
        let first = active_log_path(&log);
        append_until_roll(&log, 1000);
        append_until_roll(&log, 1000);
        log.append(&mut batch_of(1000)).unwrap();
        let (old_inode, old_len) = (inode(&first), std::fs::metadata(&first).unwrap().len());
        assert_eq!(log.enforce_retention_now().unwrap().segments_deleted, 1);
        let next = dir.path().join(NEXT_SEGMENT_FILE);
        assert_eq!(inode(&next), old_inode, "the deleted file is kept for later");
        // Written and fsynced long ago, its pages were reclaimed: none is cached now.
        let file = File::open(&next).unwrap();
        drop_from_page_cache(&file);
        // SAFETY: nothing writes the file while this test maps it.
        let map = unsafe { Mmap::map(&file) }.unwrap();
        assert_eq!(crate::storage::segment::resident_pages(&map), Some(0));
        drop(map);

        // Batches of a size that is no multiple of a page: nearly every append ends
        // inside a page of the old bytes. Counted from the second: the roll creates
        // files, which can read the file system's own blocks.
        let recycled = append_until_roll(&log, 1500);
        assert_eq!(inode(&recycled), old_inode);
        log.append(&mut batch_of(1500)).unwrap();
        let read_before = disk_bytes_read_by_this_thread().unwrap();
        let mut appends = 0;
        // On into the page of the last old byte, and past that byte, without a roll
        // (which creates files): the segment ends where that page does.
        let batch_len = batch_of(1500).len() as u64;
        assert_eq!(old_len.next_multiple_of(4096), 64 * 1024);
        while u64::from(lock(&log.writer).active.size()) + batch_len <= 64 * 1024 {
            log.append(&mut batch_of(1500)).unwrap();
            appends += 1;
        }
        // The last, sized to end just short of the segment's end.
        let room = 64 * 1024 - u64::from(lock(&log.writer).active.size());
        let overhead = batch_len - 1500;
        log.append(&mut batch_of((room - overhead - 100) as usize))
            .unwrap();
        appends += 1;
        assert!(
            u64::from(lock(&log.writer).active.size()) > old_len,
            "past the last old byte"
        );
        let read = disk_bytes_read_by_this_thread().unwrap() - read_before;
        assert!(appends > 30, "{appends} appends");
        assert_eq!(
            read, 0,
            "{appends} appends over old bytes read {read} bytes from the disk"
        );
        read_all(&log);
    }

    #[test]
    fn old_bytes_a_crash_keeps_past_a_sealed_segment_are_not_the_end_of_the_log() {
        let config = durable_log_keeping_two_segments();
        let dir = tempfile::tempdir().unwrap();
        let log = LaneLog::open(dir.path(), config.clone()).unwrap();
        let first = active_log_path(&log);
        append_until_roll(&log, 1000);
        append_until_roll(&log, 1000);
        log.append(&mut batch_of(1000)).unwrap();
        let old_len = std::fs::metadata(&first).unwrap().len() as usize;
        // Moves the clean point to the third segment: recovery checks what follows.
        assert_eq!(log.enforce_retention_now().unwrap().segments_deleted, 1);
        let recycled = append_until_roll(&log, 8 * 1024);
        assert_eq!(std::fs::metadata(&recycled).unwrap().len() as usize, old_len);
        append_until_roll(&log, 8 * 1024);
        log.append(&mut batch_of(8 * 1024)).unwrap();
        let written = log.next_offset();
        // A crash before the fsync round that would cut them off the now sealed segment.
        let sealed_size = log.segments.read().unwrap().iter().rev().nth(1).unwrap().size() as usize;
        assert!(sealed_size < old_len);
        assert_eq!(std::fs::metadata(&recycled).unwrap().len() as usize, old_len);
        drop(log);

        let log = LaneLog::open(dir.path(), config).unwrap();
        assert!(log.corruption().is_none());
        assert_eq!(log.next_offset(), written, "nothing after the old bytes is lost");
        let report = log.recovery_report();
        assert_eq!((report.deleted_segments, report.truncated_bytes), (0, 0));
        assert_eq!(report.recycled_bytes as usize, old_len - sealed_size);
        assert_eq!(
            std::fs::metadata(&recycled).unwrap().len() as usize,
            sealed_size,
            "the old bytes are cut off"
        );
        read_all(&log);
    }

    #[test]
    fn a_next_segment_given_back_goes_to_the_reaper_blocks_and_all() {
        let reaper = crate::storage::Reaper::start(1 << 30);
        let config = LogConfig {
            writeback_bytes: 8 * 1024,
            reaper: Some(Arc::clone(&reaper)),
            ..small_segments(FsyncPolicy::Never)
        };
        let segment_bytes_max = config.segment_bytes_max;
        let dir = tempfile::tempdir().unwrap();
        let log = LaneLog::open(dir.path(), config).unwrap();
        log.append(&mut big_batch()).unwrap();
        log.start_writeback().unwrap();
        let next = dir.path().join(NEXT_SEGMENT_FILE);
        assert!(
            allocated_bytes(&next) >= u64::from(segment_bytes_max),
            "made ahead"
        );
        log.close().unwrap();
        assert!(!next.exists());
        let deadline = Instant::now() + Duration::from_secs(60);
        while reaper.stats().freed_bytes < u64::from(segment_bytes_max) {
            assert!(Instant::now() < deadline, "the reaper freed {:?}", reaper.stats());
            std::thread::sleep(Duration::from_millis(5));
        }
        reaper.stop();
    }

    #[test]
    fn a_roll_leaves_the_directory_fsync_to_the_fsync_threads_but_never_two_in_a_row() {
        // A log that has rolled once: two appends, and every append after the first rolls.
        let rolled_once = |fsync, writeback_bytes| {
            let dir = tempfile::tempdir().unwrap();
            let config = LogConfig {
                fsync,
                writeback_bytes,
                segment_ms_max: 0,
                ..LogConfig::default()
            };
            let log = LaneLog::open(dir.path(), config).unwrap();
            log.append(&mut one_record_batch()).unwrap();
            log.append(&mut one_record_batch()).unwrap();
            (dir, log)
        };
        // (rolls that left the directory fsync for later, how many of them are fsynced)
        let dir_state = |log: &LaneLog| {
            (
                lock(&log.writer).rolls_deferred,
                log.dir_synced_rolls.load(Ordering::Acquire),
            )
        };
        let (_dir, log) = rolled_once(FsyncPolicy::Interval(Duration::from_secs(3600)), 0);
        assert_eq!(dir_state(&log), (1, 0), "the first roll leaves it");
        log.append(&mut one_record_batch()).unwrap();
        assert_eq!(dir_state(&log), (1, 1), "the second fsyncs it, covering both");
        log.append(&mut one_record_batch()).unwrap();
        assert_eq!(dir_state(&log), (2, 1));
        assert_eq!(log.durable_offset(), Offset(0));
        log.flush().unwrap();
        assert_eq!(
            dir_state(&log),
            (2, 2),
            "the round that makes its records durable fsyncs it"
        );
        log.append(&mut one_record_batch()).unwrap();
        assert_eq!(dir_state(&log), (3, 2));
        log.close().unwrap();
        assert_eq!(dir_state(&log), (3, 3), "so does a clean close");

        let (_dir, log) = rolled_once(FsyncPolicy::Never, 1);
        assert_eq!(dir_state(&log), (1, 0));
        log.start_writeback().unwrap();
        assert_eq!(dir_state(&log), (1, 1), "and the next writeback job");

        let (_dir, log) = rolled_once(FsyncPolicy::Never, 0);
        assert_eq!(
            dir_state(&log),
            (0, 0),
            "with no fsync thread coming, the roll fsyncs it"
        );
    }

    #[test]
    fn too_many_unsynced_segments_make_an_fsync_due_even_when_the_policy_never_syncs() {
        let config = LogConfig {
            fsync: FsyncPolicy::Never,
            unsynced_segments_max: 1,
            // Every append after the first rolls.
            segment_ms_max: 0,
            ..LogConfig::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let log = LaneLog::open(dir.path(), config).unwrap();
        let append_then_due = |log: &LaneLog| {
            log.append(&mut one_record_batch()).unwrap();
            log.fsync_due(Instant::now())
        };
        assert!(!append_then_due(&log), "nothing rolled");
        assert!(
            !append_then_due(&log),
            "one rolled segment unsynced: at the bound"
        );
        assert!(append_then_due(&log), "two: past it");
        log.flush().unwrap();
        assert!(!log.fsync_due(Instant::now()));
        assert_eq!(log.durable_offset(), log.next_offset());
    }

    #[test]
    fn closing_for_removal_stops_appends_without_an_fsync() {
        let dir = tempfile::tempdir().unwrap();
        let log = never_synced_log_with_one_record(dir.path());
        log.close_for_removal();
        assert_eq!(log.stats().sync_rounds, 0);
        assert!(matches!(
            log.append(&mut one_record_batch()),
            Err(StorageError::Closed { .. })
        ));
    }

    #[test]
    fn appends_that_arrive_during_an_fsync_share_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(LaneLog::open(dir.path(), LogConfig::default()).unwrap());
        // Hold the "fsync running" flag as a leader in the middle of its fsync would.
        *lock(&log.syncing) = true;
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let log = Arc::clone(&log);
                std::thread::spawn(move || {
                    log.append(&mut one_record_batch()).unwrap();
                    log.flush().unwrap()
                })
            })
            .collect();
        while log.next_offset() < Offset(8) {
            std::thread::yield_now();
        }
        // The running fsync ends; one waiter leads a round that covers all eight.
        *lock(&log.syncing) = false;
        log.sync_done.notify_all();
        for thread in threads {
            assert_eq!(thread.join().unwrap(), Offset(8));
        }
        assert_eq!(log.stats().sync_rounds, 1, "one fsync round for eight appends");
        assert_eq!(log.durable_offset(), Offset(8));
    }

    #[test]
    fn interval_policy_asks_for_an_fsync_once_the_oldest_append_is_old_enough() {
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig {
            fsync: FsyncPolicy::Interval(Duration::from_millis(10)),
            ..LogConfig::default()
        };
        let log = LaneLog::open(dir.path(), config).unwrap();
        assert!(!log.fsync_due(Instant::now()), "nothing to sync");
        log.append(&mut one_record_batch()).unwrap();
        let appended = Instant::now();
        assert!(log.fsync_due(appended + Duration::from_millis(20)));
        log.flush().unwrap();
        assert!(!log.fsync_due(appended + Duration::from_millis(20)));
    }

    #[test]
    fn never_policy_syncs_only_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let log = never_synced_log_with_one_record(dir.path());
        assert!(!log.fsync_due(Instant::now() + Duration::from_secs(3600)));
        log.close().unwrap();
        assert_eq!(log.durable_offset(), Offset(1), "a clean close syncs");
    }
}
