//! One segment of a lane log: a `.log` file of whole batches, mapped read-only, plus
//! its `.index` and `.timeindex`.
//!
//! Appends go through the file (`pwrite` or `pwritev` at the end) and become visible through the
//! shared mapping; readers only look below `size`, which is published after the bytes
//! are written. Sealed segments hold no file descriptor, only mappings.

#![allow(unsafe_code)] // memmap2 mapping is unsafe; see the SAFETY comment.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};

use bytes::Bytes;
use lanes_protocol::record_batch::{HEADER_BYTES, MAGIC};
use lanes_protocol::{BatchHeader, BatchLimits, Offset, RecordBatch, validate_batch};
use memmap2::{Mmap, MmapOptions};

use super::config::LogConfig;
use super::direct_read::{self, AheadRead, DirectReads};
use super::error::{IoContext, StorageError};
use super::faults;
use super::files::{INDEX_SUFFIX, LOG_SUFFIX, TIME_INDEX_SUFFIX, offset_file_name};
use super::index::{OffsetIndex, TimeIndex};

/// Limits for checking batches already in the log. They must not depend on the current
/// produce limits: lowering `batch_bytes_max` must never make stored data invalid.
pub(crate) const STORED_BATCH_LIMITS: BatchLimits = BatchLimits {
    batch_bytes_max: u32::MAX,
    batch_records_max: u32::MAX,
};

/// Bytes a direct read takes beyond the `bytes_max` asked for, at least: the batches
/// wanted start up to an index interval and a batch after the index entry the read
/// starts at (see `LaneLog::read`).
pub(crate) const DIRECT_SLACK_BYTES: usize = 16 << 10;

/// Pages [`Segment::mostly_cached`] looks at, at most (128 KiB of 4 KiB pages): for each
/// page, `mincore` looks up the page cache, and a read of cached bytes should not pay
/// for more. The kernel reads around a fault in windows of its read-ahead size, and
/// `cached_tail_bytes` drops in 2 MiB steps, so the first pages tell for the rest.
const RESIDENCY_PAGES_MAX: usize = 32;

/// Headers [`Segment::locate_sparingly`] reads one by one before it gives up: about 64
/// index intervals of the smallest batches.
const SPARING_HEADERS_MAX: u32 = 4096;

/// The size of a memory page.
pub(crate) fn page_bytes() -> usize {
    // SAFETY: sysconf has no preconditions.
    let bytes = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(bytes).ok().filter(|&b| b > 0).unwrap_or(4096)
}

/// How many of the pages `mapped` spans are in the page cache (`mincore`); `None` if
/// `mapped` is empty, does not start at a page boundary or is not mapped.
#[cfg(test)]
pub(crate) fn resident_pages(mapped: &[u8]) -> Option<usize> {
    let page_bytes = page_bytes();
    if mapped.is_empty() || !(mapped.as_ptr() as usize).is_multiple_of(page_bytes) {
        return None;
    }
    let mut resident = vec![0u8; mapped.len().div_ceil(page_bytes)];
    // SAFETY: `mapped` is mapped memory starting at a page boundary, and `resident` has a
    // byte for each page it spans, as mincore(2) requires.
    let result = unsafe {
        libc::mincore(
            mapped.as_ptr() as *mut libc::c_void,
            mapped.len(),
            resident.as_mut_ptr(),
        )
    };
    (result == 0).then(|| resident.iter().filter(|&&page| page & 1 == 1).count())
}

/// Where and why a scan of the log stopped before its end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ScanStop {
    pub(crate) position: u32,
    pub(crate) offset: Offset,
    pub(crate) reason: String,
}

/// Bytes of a segment from position `start` on: its whole mapping, or a buffer of a
/// direct read.
#[derive(Clone, Copy)]
struct View<'a> {
    bytes: &'a [u8],
    start: u32,
}

impl View<'_> {
    /// Positions `from..to` of the segment, which the view must hold.
    fn range(&self, from: u32, to: u32) -> &[u8] {
        &self.bytes[(from - self.start) as usize..(to - self.start) as usize]
    }

    /// Where the bytes the view holds end.
    fn end(&self) -> u32 {
        self.start
            .saturating_add(u32::try_from(self.bytes.len()).unwrap_or(u32::MAX))
    }
}

/// Checks the batch described by `header` at `position` of `view` fully (checksum and
/// records), as on append.
fn validate_in(view: View<'_>, position: u32, header: &BatchHeader) -> Result<(), ScanStop> {
    validate_batch(
        view.range(position, position + header.batch_length),
        STORED_BATCH_LIMITS,
    )
    .map(|_| ())
    .map_err(|error| ScanStop {
        position,
        offset: header.base_offset,
        reason: error.to_string(),
    })
}

/// Where a direct read starts (a batch, from the index), how much it reads, and the
/// segment's size when it was looked at (bytes past it may not be written yet).
#[derive(Debug, Clone, Copy)]
pub(crate) struct DirectSpan {
    position: u32,
    offset: Offset,
    len: usize,
    size: u32,
}

/// Where [`Segment::read_direct`] takes its bytes from.
pub(crate) enum DirectSource {
    /// A buffer read ahead (or kept from the last direct read).
    Ahead(AheadRead),
    /// The disk.
    Disk(DirectSpan),
}

/// What [`Segment::read_direct`] read.
pub(crate) struct DirectlyRead {
    /// Whole batches, as appended (none if the first reaches past `limit`).
    pub(crate) bytes: Bytes,
    /// The offset after them.
    pub(crate) next_offset: Offset,
    /// Where they end.
    pub(crate) end_position: u32,
    /// The buffer they are slices of, from the first of them on, for the next reads.
    pub(crate) buffer: AheadRead,
    /// Where the whole batches in the buffer end, and the offset there.
    pub(crate) whole_end: u32,
    pub(crate) whole_next: Offset,
}

/// A mapping that [`Segment::mapping`] can watch: it goes when the last `Bytes` does.
struct SharedMap(Arc<Mmap>);

impl AsRef<[u8]> for SharedMap {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

#[derive(Debug)]
pub(crate) struct Segment {
    base_offset: Offset,
    log_path: PathBuf,
    index_path: PathBuf,
    time_index_path: PathBuf,
    /// The whole mapping of the `.log` file; only `..size` holds batches.
    data: Bytes,
    /// Gone once `data` and every slice of it are dropped: until then the file must
    /// not shrink (see the reaper).
    mapping: Weak<Mmap>,
    /// Device and inode of the `.log` file, which a direct read checks it opened.
    file_id: (u64, u64),
    size: AtomicU32,
    next_offset: AtomicU64,
    max_timestamp_ms: AtomicI64,
    /// Bytes `unverified_from..unverified_end` are trusted from an earlier run and
    /// have not had their checksums checked by this process; reads check them.
    unverified_from: AtomicU32,
    unverified_end: u32,
    index: RwLock<OffsetIndex>,
    time_index: RwLock<TimeIndex>,
}

impl Segment {
    /// Creates a new, empty active segment and returns it with its file for appending.
    /// `installed`: a file the caller has already put at the segment's path (made ahead
    /// of the roll, or recycled with old bytes that appends overwrite), used instead of
    /// creating one.
    pub(crate) fn create(
        dir: &Path,
        base_offset: Offset,
        config: &LogConfig,
        installed: Option<File>,
    ) -> Result<(Segment, File), StorageError> {
        let log_path = offset_file_name(dir, base_offset, LOG_SUFFIX);
        let file = match installed {
            Some(file) => file,
            None => {
                faults::created(&log_path);
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&log_path)
                    .at(&log_path)?
            }
        };
        let index = OffsetIndex::open_writable(
            &offset_file_name(dir, base_offset, INDEX_SUFFIX),
            config.index_bytes_max,
            true,
        )?;
        let time_index = TimeIndex::open_writable(
            &offset_file_name(dir, base_offset, TIME_INDEX_SUFFIX),
            config.index_bytes_max,
            true,
        )?;
        let segment = Segment::new(
            dir,
            base_offset,
            &file,
            config.segment_bytes_max as usize,
            index,
            time_index,
        )?;
        Ok((segment, file))
    }

    /// Opens an existing segment. An active one gets writable indexes (kept, not reset)
    /// and a mapping as large as a full segment; a sealed one is mapped as it is.
    /// Its size and offsets are unknown until recovery sets them.
    pub(crate) fn open(
        dir: &Path,
        base_offset: Offset,
        active: bool,
        config: &LogConfig,
    ) -> Result<(Segment, Option<File>, IndexHealth), StorageError> {
        let log_path = offset_file_name(dir, base_offset, LOG_SUFFIX);
        let file = OpenOptions::new()
            .read(true)
            .write(active)
            .open(&log_path)
            .at(&log_path)?;
        let file_len = file.metadata().at(&log_path)?.len() as usize;
        if active {
            faults::sized(&log_path, file_len as u64);
        }
        let index_path = offset_file_name(dir, base_offset, INDEX_SUFFIX);
        let time_index_path = offset_file_name(dir, base_offset, TIME_INDEX_SUFFIX);
        let (index, time_index, health) = if active {
            let health = IndexHealth {
                whole_entries: true,
                present: index_path.exists() && time_index_path.exists(),
            };
            (
                OffsetIndex::open_writable(&index_path, config.index_bytes_max, false)?,
                TimeIndex::open_writable(&time_index_path, config.index_bytes_max, false)?,
                health,
            )
        } else {
            let (index, index_whole) = OffsetIndex::open_read_only(&index_path)?;
            let (time_index, time_whole) = TimeIndex::open_read_only(&time_index_path)?;
            let health = IndexHealth {
                whole_entries: index_whole && time_whole,
                present: index_path.exists() && time_index_path.exists(),
            };
            (index, time_index, health)
        };
        let map_len = if active {
            file_len.max(config.segment_bytes_max as usize)
        } else {
            file_len
        };
        let segment = Segment::new(dir, base_offset, &file, map_len, index, time_index)?;
        Ok((segment, active.then_some(file), health))
    }

    fn new(
        dir: &Path,
        base_offset: Offset,
        file: &File,
        map_len: usize,
        index: OffsetIndex,
        time_index: TimeIndex,
    ) -> Result<Segment, StorageError> {
        let log_path = offset_file_name(dir, base_offset, LOG_SUFFIX);
        let metadata = file.metadata().at(&log_path)?;
        let file_id = (metadata.dev(), metadata.ino());
        let (data, mapping) = if map_len == 0 {
            (Bytes::new(), Weak::new())
        } else {
            // SAFETY: the log file is written only by this process, by appends beyond
            // `size`, which readers never cross, or as a recycled file once this mapping
            // is gone (`mapping` below); it is truncated only during recovery before any
            // reader exists, beyond `size` (after a failed write, or once sealed), or by
            // the reaper once deleted and this mapping is gone. Pages past the end of
            // the file are never touched. Changing data files from
            // outside while the broker runs is unsupported, as for any broker that maps
            // its files.
            let map = Arc::new(unsafe { MmapOptions::new().len(map_len).map(file).at(&log_path)? });
            let mapping = Arc::downgrade(&map);
            (Bytes::from_owner(SharedMap(map)), mapping)
        };
        Ok(Segment {
            base_offset,
            index_path: offset_file_name(dir, base_offset, INDEX_SUFFIX),
            time_index_path: offset_file_name(dir, base_offset, TIME_INDEX_SUFFIX),
            log_path,
            data,
            mapping,
            file_id,
            size: AtomicU32::new(0),
            next_offset: AtomicU64::new(base_offset.0),
            max_timestamp_ms: AtomicI64::new(i64::MIN),
            unverified_from: AtomicU32::new(0),
            unverified_end: 0,
            index: RwLock::new(index),
            time_index: RwLock::new(time_index),
        })
    }

    pub(crate) fn base_offset(&self) -> Offset {
        self.base_offset
    }

    pub(crate) fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The `.log` file's mapping, alive while anything can still read through it.
    pub(crate) fn mapping(&self) -> Weak<Mmap> {
        Weak::clone(&self.mapping)
    }

    pub(crate) fn paths(&self) -> [&Path; 3] {
        [&self.log_path, &self.index_path, &self.time_index_path]
    }

    pub(crate) fn size(&self) -> u32 {
        self.size.load(Ordering::Acquire)
    }

    pub(crate) fn next_offset(&self) -> Offset {
        Offset(self.next_offset.load(Ordering::Acquire))
    }

    pub(crate) fn max_timestamp_ms(&self) -> i64 {
        self.max_timestamp_ms.load(Ordering::Acquire)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.size() == 0
    }

    /// Drops bytes `from..to` (`None`: to the end of the file; `from` a page boundary)
    /// of the segment from the page cache where they are clean: unmaps them from this
    /// process, whose mapping would keep them cached, then asks the kernel to drop them
    /// (`POSIX_FADV_DONTNEED`; it starts the writeback of dirty pages instead). Later
    /// reads fault them back in from the disk. Only a hint: failures are ignored.
    pub(crate) fn drop_cached(&self, file: &File, from: u32, to: Option<u32>) {
        // An empty range: to posix_fadvise, a length of 0 is the whole rest of the file.
        if to.is_some_and(|to| to <= from) {
            return;
        }
        let mapped_to = to.map_or(self.data.len(), |to| (to as usize).min(self.data.len()));
        if (from as usize) < mapped_to && (from as usize).is_multiple_of(page_bytes()) {
            // SAFETY: the range lies in the segment's mapping, which `self.data` keeps
            // alive, and starts at a page boundary. The mapping is a shared, read-only
            // one of the file, so MADV_DONTNEED only removes this process's page table
            // entries for it: the bytes stay in the file (and the page cache, until
            // dropped), and readers still holding slices of them fault them back in.
            let _ = unsafe {
                libc::madvise(
                    self.data.as_ptr().add(from as usize) as *mut libc::c_void,
                    mapped_to - from as usize,
                    libc::MADV_DONTNEED,
                )
            };
        }
        // A length of 0 is to the end of the file.
        let len = to.map_or(0, |to| to.saturating_sub(from));
        // SAFETY: posix_fadvise only reads its arguments; `file` keeps the descriptor open.
        let _ = unsafe {
            libc::posix_fadvise(
                file.as_raw_fd(),
                libc::off_t::from(from),
                libc::off_t::from(len),
                libc::POSIX_FADV_DONTNEED,
            )
        };
    }

    /// How many pages of bytes `from..to` (`from` a page boundary) are in the page cache.
    #[cfg(test)]
    pub(crate) fn resident_pages(&self, from: u32, to: u32) -> Option<usize> {
        if from >= to {
            return Some(0);
        }
        resident_pages(&self.data[from as usize..(to as usize).min(self.data.len())])
    }

    /// Capacity of the mapping: how large the segment can grow without remapping.
    pub(crate) fn mapped_len(&self) -> usize {
        self.data.len()
    }

    pub(crate) fn index(&self) -> RwLockReadGuard<'_, OffsetIndex> {
        self.index.read().expect("index lock poisoned")
    }

    pub(crate) fn index_mut(&self) -> RwLockWriteGuard<'_, OffsetIndex> {
        self.index.write().expect("index lock poisoned")
    }

    pub(crate) fn time_index(&self) -> RwLockReadGuard<'_, TimeIndex> {
        self.time_index.read().expect("time index lock poisoned")
    }

    pub(crate) fn time_index_mut(&self) -> RwLockWriteGuard<'_, TimeIndex> {
        self.time_index.write().expect("time index lock poisoned")
    }

    /// Sets what recovery found: the segment ends at `size` bytes and `next_offset`,
    /// and bytes `..trusted_bytes` come from an earlier run unchecked.
    pub(crate) fn set_recovered(
        &mut self,
        size: u32,
        next_offset: Offset,
        max_timestamp_ms: i64,
        trusted_bytes: u32,
    ) {
        assert!(
            size as usize <= self.data.len(),
            "segment size beyond its mapping"
        );
        *self.size.get_mut() = size;
        *self.next_offset.get_mut() = next_offset.0;
        *self.max_timestamp_ms.get_mut() = max_timestamp_ms;
        self.set_trusted(trusted_bytes);
    }

    /// Publishes a batch just written at `position` to readers, then indexes it.
    ///
    /// `size` is stored before `next_offset`, and readers load them the other way round
    /// (see [`Segment::locate`]): a reader that sees an offset also sees the bytes
    /// holding it. Index entries come last, so they never point past what a reader sees.
    pub(crate) fn publish_append(&self, position: u32, header: &BatchHeader, index_interval_bytes: u32) {
        debug_assert_eq!(position, self.size());
        self.max_timestamp_ms
            .fetch_max(header.max_timestamp_ms, Ordering::AcqRel);
        self.size.store(position + header.batch_length, Ordering::Release);
        self.next_offset.store(header.next_offset().0, Ordering::Release);
        self.maybe_index(position, header, index_interval_bytes);
    }

    /// Adds index entries for the batch at `position` if it is due one. The rule is the
    /// same on append and on rebuild, so both give the same index.
    pub(crate) fn maybe_index(&self, position: u32, header: &BatchHeader, index_interval_bytes: u32) {
        let mut index = self.index_mut();
        let last_position = index.last().map_or(0, |(_, p)| p);
        if position == 0 || position - last_position < index_interval_bytes || index.is_full() {
            return;
        }
        let mut time_index = self.time_index_mut();
        if !time_index.has_room() {
            return;
        }
        let relative = self.relative(header.base_offset);
        index.push(relative, position);
        time_index.push_if_newer(self.max_timestamp_ms(), relative);
    }

    /// Whether either index has no room left for another entry.
    pub(crate) fn indexes_full(&self) -> bool {
        self.index().is_full() || !self.time_index().has_room()
    }

    fn relative(&self, offset: Offset) -> u32 {
        u32::try_from(offset.0 - self.base_offset.0).expect("segments span fewer than 2^32 offsets")
    }

    /// Makes the indexes read-only: flushes them and trims their files. With
    /// `final_batch` (the base offset of the segment's last batch), first records the
    /// segment's largest timestamp in a final time-index entry, as when a segment is
    /// sealed by a roll; a clean close of the active segment passes `None`.
    pub(crate) fn seal(&self, final_batch: Option<Offset>) -> Result<(), StorageError> {
        if let Some(last_batch_base) = final_batch
            && self.max_timestamp_ms() != i64::MIN
        {
            let relative = self.relative(last_batch_base);
            self.time_index_mut()
                .push_if_newer(self.max_timestamp_ms(), relative);
        }
        self.index_mut().seal()?;
        self.time_index_mut().seal()
    }

    /// Replaces both indexes with empty writable ones, to be rebuilt by a scan.
    pub(crate) fn reset_indexes(&self, index_bytes_max: u32) -> Result<(), StorageError> {
        *self.index_mut() = OffsetIndex::open_writable(&self.index_path, index_bytes_max, true)?;
        *self.time_index_mut() = TimeIndex::open_writable(&self.time_index_path, index_bytes_max, true)?;
        Ok(())
    }

    /// Marks bytes `..trusted_bytes` as coming from an earlier run, unchecked.
    pub(crate) fn set_trusted(&mut self, trusted_bytes: u32) {
        *self.unverified_from.get_mut() = 0;
        self.unverified_end = trusted_bytes.min(self.size());
    }

    /// Base offset of the last batch, or the segment base if it is empty.
    pub(crate) fn last_batch_base(&self) -> Result<Offset, ScanStop> {
        let next = self.next_offset();
        if next == self.base_offset {
            return Ok(next);
        }
        Ok(self
            .locate(Offset(next.0 - 1))?
            .map_or(self.base_offset, |(_, header)| header.base_offset))
    }

    /// Follows batch headers from `position` (holding `expected`) up to offset `target`,
    /// within `end`. Returns where the batch holding `target - 1` ends and the largest
    /// timestamp among the batches passed.
    pub(crate) fn follow_headers(
        &self,
        mut position: u32,
        mut expected: Offset,
        end: u32,
        target: Offset,
    ) -> Result<(u32, i64), ScanStop> {
        let mut max_timestamp_ms = i64::MIN;
        while expected < target {
            let header = self.header_at(position, end, expected)?;
            position += header.batch_length;
            expected = header.next_offset();
            max_timestamp_ms = max_timestamp_ms.max(header.max_timestamp_ms);
        }
        if expected != target {
            return Err(ScanStop {
                position,
                offset: expected,
                reason: format!("batches run past offset {target}"),
            });
        }
        Ok((position, max_timestamp_ms))
    }

    /// The batch header at `position`, checked for sanity against the segment end and
    /// the offset it should carry.
    pub(crate) fn header_at(
        &self,
        position: u32,
        end: u32,
        expected: Offset,
    ) -> Result<BatchHeader, ScanStop> {
        self.header_in(self.view(), position, end, expected)
    }

    /// [`Segment::header_at`] over `view`, which must hold `position..end`.
    fn header_in(
        &self,
        view: View<'_>,
        position: u32,
        end: u32,
        expected: Offset,
    ) -> Result<BatchHeader, ScanStop> {
        let stop = |reason: &str| ScanStop {
            position,
            offset: expected,
            reason: reason.to_owned(),
        };
        let start = position as usize;
        let end = end as usize;
        if start + HEADER_BYTES > end {
            return Err(stop("truncated batch header"));
        }
        // The header alone: a view of a header read on its own holds no more.
        let header = BatchHeader::parse(view.range(position, position + HEADER_BYTES as u32))
            .map_err(|e| stop(&e.to_string()))?;
        if (header.batch_length as usize) < HEADER_BYTES || start + header.batch_length as usize > end {
            return Err(stop("batch length runs past the end of the segment"));
        }
        if header.magic != MAGIC {
            return Err(stop("unknown batch format version"));
        }
        if header.base_offset != expected {
            return Err(stop(&format!(
                "batch carries offset {} where {expected} was expected",
                header.base_offset
            )));
        }
        if header.record_count == 0 || header.last_offset_delta != header.record_count - 1 {
            return Err(stop("batch record count and last offset delta disagree"));
        }
        // Offsets in a segment are u32 apart from its base; nothing may overflow u64 (nor
        // go below the base: the check above already refuses any other offset, this one
        // must not panic without it).
        let next = header.base_offset.0.checked_add(u64::from(header.record_count));
        let span = next.and_then(|next| next.checked_sub(self.base_offset.0));
        if span.is_none_or(|span| span > u64::from(u32::MAX)) {
            return Err(stop("batch runs past the offsets a segment can hold"));
        }
        Ok(header)
    }

    /// The whole mapping as a view.
    fn view(&self) -> View<'_> {
        View {
            bytes: &self.data,
            start: 0,
        }
    }

    /// The bytes of the batch described by `header` at `position`.
    pub(crate) fn batch_bytes(&self, position: u32, header: &BatchHeader) -> Bytes {
        self.data
            .slice(position as usize..(position + header.batch_length) as usize)
    }

    /// Checks a batch fully (checksum and records), as on append.
    pub(crate) fn validate_at(&self, position: u32, header: &BatchHeader) -> Result<(), ScanStop> {
        validate_in(self.view(), position, header)
    }

    /// Finds the batch containing `offset`: its position and header. `None` if the
    /// offset is at or past the end of the segment.
    pub(crate) fn locate(&self, offset: Offset) -> Result<Option<(u32, BatchHeader)>, ScanStop> {
        self.locate_with(offset, &mut |position, end, expected| {
            self.header_at(position, end, expected)
        })
    }

    /// [`Segment::locate`], reading the headers with `pread` (no read-ahead) instead of
    /// through the mapping: a fault on the mapping reads around it, up to the disk's
    /// read-ahead (8 MiB here), which would bring back the pages `cached_tail_bytes`
    /// dropped; a `pread` brings back the page it reads, or nothing if it is cached. For
    /// lookups that do not read the batches themselves, such as a group's backlog.
    /// Through the mapping after all if the file cannot be read so (it was renamed for
    /// recycling, or an I/O error), or if the scan runs past
    /// [`SPARING_HEADERS_MAX`] headers (a damaged index sends it from the segment
    /// start, where the mapping's read-ahead is the faster way).
    pub(crate) fn locate_sparingly(&self, offset: Offset) -> Result<Option<(u32, BatchHeader)>, ScanStop> {
        let Some(file) = direct_read::open_checked(&self.log_path, self.file_id, 0) else {
            return self.locate(offset);
        };
        // SAFETY: a plain system call on a descriptor `file` owns; no memory is passed.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
        let mut headers_read = 0;
        let mut given_up = false;
        let located = self.locate_with(offset, &mut |position, end, expected| {
            let give_up = |reason: String| ScanStop {
                position,
                offset: expected,
                reason,
            };
            headers_read += 1;
            if given_up || headers_read > SPARING_HEADERS_MAX {
                given_up = true;
                return Err(give_up("too many headers to read one by one".into()));
            }
            let mut header = [0u8; HEADER_BYTES];
            // Past `end`, `header_in` refuses it without reading the view.
            if position as usize + HEADER_BYTES <= end as usize
                && let Err(error) = file.read_exact_at(&mut header, u64::from(position))
            {
                tracing::debug!(path = %self.log_path.display(), %error, "could not read a batch header");
                given_up = true;
                return Err(give_up(error.to_string()));
            }
            let view = View {
                bytes: &header,
                start: position,
            };
            self.header_in(view, position, end, expected)
        });
        if given_up { self.locate(offset) } else { located }
    }

    /// [`Segment::locate`] with `header_at(position, end, expected)` reading each header
    /// (as [`Segment::header_at`] does).
    fn locate_with(
        &self,
        offset: Offset,
        header_at: &mut dyn FnMut(u32, u32, Offset) -> Result<BatchHeader, ScanStop>,
    ) -> Result<Option<(u32, BatchHeader)>, ScanStop> {
        // Offset first, then size: the bytes of every offset seen are within the size seen.
        let next = self.next_offset();
        let size = self.size();
        if offset >= next || offset < self.base_offset {
            return Ok(None);
        }
        let (mut position, mut expected) = self.index_hint(self.relative(offset), size, header_at);
        loop {
            let header = header_at(position, size, expected)?;
            if header.last_offset() >= offset {
                return Ok(Some((position, header)));
            }
            position += header.batch_length;
            expected = header.next_offset();
        }
    }

    /// Where the batch holding `offset` begins at the latest, from the offset index
    /// alone: the position of the entry at or below it, or 0. Unlike
    /// [`Segment::locate`] it reads none of the segment's bytes, so it brings no page
    /// of them back into the page cache.
    pub(crate) fn indexed_position_at_most(&self, offset: Offset) -> u32 {
        let Some(relative) = offset.0.checked_sub(self.base_offset.0) else {
            return 0;
        };
        let relative = u32::try_from(relative).unwrap_or(u32::MAX);
        self.index()
            .lookup(relative)
            .map_or(0, |(_, position)| position.min(self.size()))
    }

    /// Where to start scanning for `relative_offset`: the index entry at or below it,
    /// confirmed against the log. An entry that does not point at the batch it names
    /// is ignored (the index is damaged), and the scan starts at the segment start.
    fn index_hint(
        &self,
        relative_offset: u32,
        size: u32,
        header_at: &mut dyn FnMut(u32, u32, Offset) -> Result<BatchHeader, ScanStop>,
    ) -> (u32, Offset) {
        let start = (0, self.base_offset);
        let Some((relative, position)) = self.index().lookup(relative_offset) else {
            return start;
        };
        let expected = self.base_offset.plus(u64::from(relative));
        match header_at(position, size, expected) {
            Ok(_) => (position, expected),
            Err(stop) => {
                tracing::warn!(
                    segment = %self.log_path.display(),
                    position,
                    reason = %stop.reason,
                    "offset index entry does not match the log; scanning from the segment start"
                );
                start
            }
        }
    }

    /// Whole batches from the one at `position` (carrying `first` as its header),
    /// stopping before `bytes_max` (but always including the first batch) and before
    /// any batch that reaches `limit`. Returns the end position and next offset.
    pub(crate) fn extent(
        &self,
        position: u32,
        first: &BatchHeader,
        bytes_max: usize,
        limit: Offset,
    ) -> Result<(u32, Offset), ScanStop> {
        let size = self.size();
        let mut end = position + first.batch_length;
        let mut next = first.next_offset();
        while end < size {
            let header = self.header_at(end, size, next)?;
            if header.next_offset() > limit || (end - position + header.batch_length) as usize > bytes_max {
                break;
            }
            end += header.batch_length;
            next = header.next_offset();
        }
        Ok((end, next))
    }

    /// What a direct read of the batch holding `offset` and `bytes_max` after it would
    /// read from the disk; `None` if those bytes are mostly in the page cache (read them
    /// through the mapping), or the segment does not hold `offset`.
    pub(crate) fn direct_span(
        &self,
        offset: Offset,
        bytes_max: usize,
        slack_bytes: usize,
    ) -> Option<DirectSpan> {
        // Offset first, then size, as in `locate`.
        let next = self.next_offset();
        let size = self.size();
        if offset >= next || offset < self.base_offset {
            return None;
        }
        // From the index alone: reading the log to confirm the entry would fault it in.
        let (position, offset) = self
            .index()
            .lookup(self.relative(offset))
            .map_or((0, self.base_offset), |(relative, position)| {
                (position, self.base_offset.plus(u64::from(relative)))
            });
        if position >= size {
            return None;
        }
        // What the batches wanted may span: from the index entry (entries are at most an
        // index interval and a batch apart), `bytes_max` of them.
        let len = bytes_max
            .saturating_add(slack_bytes)
            .min((size - position) as usize);
        if self.mostly_cached(position, position + len as u32) {
            return None;
        }
        Some(DirectSpan {
            position,
            offset,
            len,
            size,
        })
    }

    /// Reads what [`Segment::locate`], [`Segment::extent`], [`Segment::slice`] and
    /// [`Segment::verify`] would (the batch holding `offset` and the batches after it,
    /// up to `bytes_max` and below `limit`), but from a buffer of our own, for bytes mostly
    /// gone from the page cache: faulting them in through the mapping would read them
    /// into new page-cache pages, slowly (see [`direct_read`]). `from`: bytes read ahead
    /// from a batch at or before the one wanted, or where to read them from the disk
    /// with `O_DIRECT` ([`Segment::direct_span`]). `None` when the direct read cannot be
    /// done or finds anything amiss (read through the mapping then, which also reports
    /// damage), or the buffer read ahead does not hold the batch.
    pub(crate) fn read_direct(
        &self,
        pool: &Arc<DirectReads>,
        offset: Offset,
        bytes_max: usize,
        limit: Offset,
        from: DirectSource,
    ) -> Option<DirectlyRead> {
        let (read, valid_end, mut position, mut expected) = match from {
            DirectSource::Ahead(ahead) => {
                if offset >= self.next_offset() || offset < ahead.offset {
                    return None;
                }
                (ahead.read, ahead.size_before, ahead.position, ahead.offset)
            }
            DirectSource::Disk(span) => {
                let read = direct_read::read(
                    pool,
                    &self.log_path,
                    self.file_id,
                    u64::from(span.position),
                    span.len,
                )?;
                (read, span.size, span.position, span.offset)
            }
        };
        let view = View {
            bytes: &read.bytes,
            start: u32::try_from(read.position).ok()?,
        };
        let view_end = view.end().min(valid_end);
        let first = loop {
            let header = self.header_in(view, position, view_end, expected).ok()?;
            if header.last_offset() >= offset {
                break header;
            }
            position += header.batch_length;
            expected = header.next_offset();
        };
        let (mut end, mut next) = (position, offset);
        if first.next_offset() <= limit {
            (end, next) = (position + first.batch_length, first.next_offset());
            // A batch the buffer holds only part of, or a damaged one, ends the read
            // here; the next read starts with it.
            while let Ok(header) = self.header_in(view, end, view_end, next) {
                if header.next_offset() > limit || (end - position + header.batch_length) as usize > bytes_max
                {
                    break;
                }
                end += header.batch_length;
                next = header.next_offset();
            }
            self.verify_in(view, position, end, first.base_offset).ok()?;
        }
        // Where the whole batches the buffer holds end.
        let (mut whole_end, mut whole_next) = if end == position {
            (position, first.base_offset)
        } else {
            (end, next)
        };
        while let Ok(header) = self.header_in(view, whole_end, view_end, whole_next) {
            whole_end += header.batch_length;
            whole_next = header.next_offset();
        }
        let bytes = read
            .bytes
            .slice((position - view.start) as usize..(end - view.start) as usize);
        Some(DirectlyRead {
            bytes,
            next_offset: next,
            end_position: end,
            buffer: AheadRead {
                read,
                size_before: valid_end,
                position,
                offset: first.base_offset,
            },
            whole_end,
            whole_next,
        })
    }

    /// The `.log` file's path and its device and inode, for direct reads.
    pub(crate) fn direct_file(&self) -> (&Path, (u64, u64)) {
        (&self.log_path, self.file_id)
    }

    /// Whether at least half the pages of bytes `from..to` are in the page cache
    /// (`mincore`), looking at the first [`RESIDENCY_PAGES_MAX`] pages at most. If it
    /// cannot tell, it says yes.
    pub(crate) fn mostly_cached(&self, from: u32, to: u32) -> bool {
        let page_bytes = page_bytes();
        let start = from as usize / page_bytes * page_bytes;
        let end = (to as usize)
            .min(self.data.len())
            .min(start + RESIDENCY_PAGES_MAX * page_bytes);
        if end <= start {
            return true;
        }
        let pages = (end - start).div_ceil(page_bytes);
        let mut resident = [0u8; RESIDENCY_PAGES_MAX];
        // SAFETY: `start..end` lies in the segment's mapping (which `self.data` keeps
        // alive) and starts at a page boundary, and `resident` has a byte for each of
        // the `pages` pages it spans, as mincore(2) requires.
        let result = unsafe {
            libc::mincore(
                self.data.as_ptr().add(start) as *mut libc::c_void,
                end - start,
                resident.as_mut_ptr(),
            )
        };
        result != 0 || 2 * resident[..pages].iter().filter(|&&page| page & 1 == 1).count() >= pages
    }

    /// The bytes `start..end` as a slice of the mapping: no copy.
    pub(crate) fn slice(&self, start: u32, end: u32) -> Bytes {
        self.data.slice(start as usize..end as usize)
    }

    /// Checks the checksums of the batches in `start..end` (batch boundaries) that this
    /// process has not checked yet. On a bad batch, returns where it is.
    pub(crate) fn verify(&self, start: u32, end: u32, first_offset: Offset) -> Result<(), ScanStop> {
        self.verify_in(self.view(), start, end, first_offset)
    }

    /// [`Segment::verify`] over `view`, which must hold `start..end`.
    fn verify_in(&self, view: View<'_>, start: u32, end: u32, first_offset: Offset) -> Result<(), ScanStop> {
        let from = self.unverified_from.load(Ordering::Acquire);
        if end <= from || start >= self.unverified_end {
            return Ok(());
        }
        let check_end = end.min(self.unverified_end);
        let (mut position, mut expected) = (start, first_offset);
        while position < check_end {
            let header = self.header_in(view, position, end, expected)?;
            if position >= from {
                validate_in(view, position, &header)?;
            }
            position += header.batch_length;
            expected = header.next_offset();
        }
        if start <= from {
            self.unverified_from.fetch_max(check_end, Ordering::AcqRel);
        }
        Ok(())
    }

    /// The first record at or after `timestamp_ms` in this segment below `limit`.
    pub(crate) fn offset_for_timestamp(
        &self,
        timestamp_ms: i64,
        limit: Offset,
    ) -> Result<Option<Offset>, ScanStop> {
        if self.max_timestamp_ms() < timestamp_ms {
            return Ok(None);
        }
        let limit = limit.min(self.next_offset());
        let size = self.size();
        let start_relative = self.time_index().last_before(timestamp_ms).map(|(_, r)| r);
        let (mut position, mut expected) = match start_relative {
            Some(relative) => match self.locate(self.base_offset.plus(u64::from(relative)))? {
                Some((position, header)) => (position, header.base_offset),
                None => return Ok(None),
            },
            None => (0, self.base_offset),
        };
        while position < size {
            let header = self.header_at(position, size, expected)?;
            if header.next_offset() > limit {
                return Ok(None);
            }
            if header.max_timestamp_ms >= timestamp_ms {
                self.validate_at(position, &header)?;
                let batch = RecordBatch::new(self.batch_bytes(position, &header), STORED_BATCH_LIMITS)
                    .expect("validated just above");
                let found = batch.records().find(|r| r.timestamp_ms >= timestamp_ms);
                return Ok(found.map(|r| r.offset));
            }
            position += header.batch_length;
            expected = header.next_offset();
        }
        Ok(None)
    }
}

/// What opening a segment's indexes found, before any content check.
#[derive(Clone, Copy, Debug)]
pub(crate) struct IndexHealth {
    /// Both files exist.
    pub(crate) present: bool,
    /// Both files hold whole entries only.
    pub(crate) whole_entries: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_count_as_cached_once_written_and_not_while_never_touched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("file");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let len = 64 * page_bytes();
        // A hole: no page of it has ever been in the page cache.
        file.set_len(len as u64).unwrap();
        // SAFETY: the file is private to this test and not changed while mapped.
        let map = unsafe { MmapOptions::new().len(len).map(&file).unwrap() };
        assert_eq!(resident_pages(&map), Some(0));
        std::os::unix::fs::FileExt::write_all_at(&file, &vec![1; len], 0).unwrap();
        assert_eq!(resident_pages(&map), Some(64));
        assert_eq!(resident_pages(&map[1..]), None, "not at a page boundary");
    }
}
