//! Sparse, memory-mapped segment indexes: `.index` maps a batch's offset to its file
//! position, `.timeindex` maps the largest timestamp seen so far to an offset.
//!
//! One entry of each is added for a batch that starts at least `index_interval_bytes`
//! after the previous entry's batch (never for the batch at position 0, whose place is
//! known), so an index rebuilt from the log is identical to the one built on append.
//!
//! `.index` entry, 8 bytes, big-endian:
//!
//! | offset | size | field             | meaning                                         |
//! |-------:|-----:|-------------------|-------------------------------------------------|
//! |      0 |    4 | `relative_offset` | batch base offset minus the segment base offset |
//! |      4 |    4 | `position`        | byte position of that batch in the `.log` file  |
//!
//! `.timeindex` entry, 12 bytes, big-endian:
//!
//! | offset | size | field             | meaning                                                   |
//! |-------:|-----:|-------------------|-----------------------------------------------------------|
//! |      0 |    8 | `timestamp_ms`    | largest record timestamp in the segment up to this batch  |
//! |      8 |    4 | `relative_offset` | base offset of the batch minus the segment base offset    |
//!
//! The active segment's files are preallocated to `index_bytes_max` (sparse) and mapped
//! writable; sealing flushes them, trims them to their entries and maps them read-only.
//! Entries are only trusted after [`OffsetIndex::is_sane`] / [`TimeIndex::is_sane`], and
//! every offset lookup is confirmed against the log by the caller.

#![allow(unsafe_code)] // memmap2 mapping is unsafe; see the SAFETY comments.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use memmap2::{Advice, Mmap, MmapMut, MmapOptions};

use super::error::{IoContext, StorageError};
use super::faults;

pub(crate) const OFFSET_ENTRY_BYTES: usize = 8;
pub(crate) const TIME_ENTRY_BYTES: usize = 12;

#[derive(Debug)]
enum Mapping {
    None,
    ReadOnly(Mmap),
    Writable(MmapMut),
}

/// A file of fixed-size entries, mapped into memory.
#[derive(Debug)]
struct IndexFile {
    path: PathBuf,
    entry_bytes: usize,
    mapping: Mapping,
    entries: usize,
    /// For a writable index, how many of the file's first bytes are known to have disk
    /// blocks. The file is sparse, and a store through the mapping into a hole on a
    /// full disk would kill the process with SIGBUS; so `push` gives the next chunk
    /// blocks with an ordinary write first, which fails cleanly instead. (The file is
    /// opened for that write only, about once per 32 MiB of log: keeping it open would
    /// cost two descriptors per lane log.)
    backed_bytes: Option<usize>,
}

/// How much of a writable index `push` backs with blocks at a time: 8,192 offset
/// entries, enough for 32 MiB of log at the default index interval.
const BACKING_CHUNK_BYTES: usize = 64 * 1024;
static ZEROS: [u8; BACKING_CHUNK_BYTES] = [0; BACKING_CHUNK_BYTES];

fn map_read_only(file: &File, len: usize) -> std::io::Result<Mapping> {
    if len == 0 {
        return Ok(Mapping::None);
    }
    // SAFETY: files in a lane log directory are written only by this process, through
    // the lane log that owns them; an index is only truncated after its mapping is
    // dropped. Changing data files from outside while the broker runs is unsupported
    // (docs/OPERATIONS.md), as for every broker that maps its files.
    let map = unsafe { MmapOptions::new().len(len).map(file)? };
    Ok(Mapping::ReadOnly(map))
}

impl IndexFile {
    /// Maps an existing index read-only. A missing file is an empty index. The second
    /// value says whether the file held whole entries only.
    fn open_read_only(path: &Path, entry_bytes: usize) -> Result<(IndexFile, bool), StorageError> {
        let file = match File::open(path) {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Ok((IndexFile::unmapped(path, entry_bytes), false));
            }
            Err(error) => return Err(StorageError::io(path, error)),
        };
        let len = file.metadata().at(path)?.len() as usize;
        let mapping = map_read_only(&file, len).at(path)?;
        let index = IndexFile {
            path: path.to_owned(),
            entry_bytes,
            mapping,
            entries: len / entry_bytes,
            backed_bytes: None,
        };
        Ok((index, len.is_multiple_of(entry_bytes)))
    }

    fn unmapped(path: &Path, entry_bytes: usize) -> IndexFile {
        IndexFile {
            path: path.to_owned(),
            entry_bytes,
            mapping: Mapping::None,
            entries: 0,
            backed_bytes: None,
        }
    }

    /// Opens (creating if needed) for appending, grown to `bytes_max`. With `reset`,
    /// existing entries are discarded; otherwise the file's length says how many there
    /// are (a trimmed file from a clean close).
    fn open_writable(
        path: &Path,
        entry_bytes: usize,
        bytes_max: u32,
        reset: bool,
    ) -> Result<IndexFile, StorageError> {
        if !path.exists() {
            faults::created(path);
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(reset)
            .open(path)
            .at(path)?;
        let len = file.metadata().at(path)?.len() as usize;
        let map_len = len.max(bytes_max as usize) / entry_bytes * entry_bytes;
        if (len as u64) < map_len as u64 {
            // Sparse: costs no disk until entries are written.
            file.set_len(map_len as u64).at(path)?;
        }
        faults::sized(path, len.max(map_len) as u64);
        // SAFETY: as in `map_read_only`; additionally this mapping is the only writer.
        let map = unsafe { MmapOptions::new().len(map_len).map_mut(&file).at(path)? };
        // Entries are written one page at a time into a sparse file; readahead on each
        // page fault would zero-fill a whole window of pages not needed yet (measured:
        // 2% of append time with 64 KiB batches).
        map.advise(Advice::Random).at(path)?;
        // Only the entries' bytes are sure to have blocks (past them: a hole, or garbage
        // after a crash that the next pushes overwrite).
        let backed_bytes = len / entry_bytes * entry_bytes;
        Ok(IndexFile {
            path: path.to_owned(),
            entry_bytes,
            mapping: Mapping::Writable(map),
            entries: len / entry_bytes,
            backed_bytes: Some(backed_bytes),
        })
    }

    fn bytes(&self) -> &[u8] {
        let all: &[u8] = match &self.mapping {
            Mapping::None => &[],
            Mapping::ReadOnly(map) => map,
            Mapping::Writable(map) => map,
        };
        &all[..self.entries * self.entry_bytes]
    }

    fn entry(&self, index: usize) -> &[u8] {
        &self.bytes()[index * self.entry_bytes..(index + 1) * self.entry_bytes]
    }

    fn capacity(&self) -> usize {
        match &self.mapping {
            Mapping::Writable(map) => map.len() / self.entry_bytes,
            _ => self.entries,
        }
    }

    fn is_full(&self) -> bool {
        self.entries >= self.capacity()
    }

    /// Appends an entry; false if the index is sealed or full (the caller then simply
    /// indexes less, which costs lookups a longer scan but never correctness).
    fn push(&mut self, entry: &[u8]) -> bool {
        debug_assert_eq!(entry.len(), self.entry_bytes);
        let at = self.entries * self.entry_bytes;
        if !self.back(at + entry.len()) {
            return false;
        }
        match &mut self.mapping {
            Mapping::Writable(map) if at + entry.len() <= map.len() => {
                map[at..at + entry.len()].copy_from_slice(entry);
                faults::wrote(&self.path, at as u64, entry.len() as u64);
                self.entries += 1;
                true
            }
            _ => false,
        }
    }

    /// Makes sure the first `end` bytes have disk blocks (see `backing`); false if the
    /// disk is full or the write fails: the index then takes no more entries for now.
    fn back(&mut self, end: usize) -> bool {
        let capacity = self.capacity() * self.entry_bytes;
        let Some(backed_bytes) = &mut self.backed_bytes else {
            return true;
        };
        if end <= *backed_bytes {
            return true;
        }
        let chunk = BACKING_CHUNK_BYTES.min(capacity.saturating_sub(*backed_bytes));
        if *backed_bytes + chunk < end {
            return false;
        }
        use std::os::unix::fs::FileExt;
        let written = OpenOptions::new()
            .write(true)
            .open(&self.path)
            .and_then(|file| file.write_all_at(&ZEROS[..chunk], *backed_bytes as u64));
        match written {
            Ok(()) => {
                *backed_bytes += chunk;
                true
            }
            Err(error) => {
                tracing::debug!(path = %self.path.display(), %error, "index not extended");
                false
            }
        }
    }

    fn truncate(&mut self, entries: usize) {
        self.entries = self.entries.min(entries);
    }

    /// Writes dirty pages back to the file.
    fn flush(&self) -> Result<(), StorageError> {
        match &self.mapping {
            Mapping::Writable(map) => faults::synced(&self.path, || map.flush()).at(&self.path),
            _ => Ok(()),
        }
    }

    /// Flushes, trims the file to its entries and maps it read-only. If that fails
    /// half-way the index is left empty, which is slower to use but still correct.
    fn seal(&mut self) -> Result<(), StorageError> {
        if !matches!(self.mapping, Mapping::Writable(_)) {
            return Ok(());
        }
        self.flush()?;
        let len = self.entries * self.entry_bytes;
        // Drop the mapping before shrinking the file under it.
        self.mapping = Mapping::None;
        self.backed_bytes = None;
        let remapped = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .and_then(|file| {
                file.set_len(len as u64)?;
                faults::sized(&self.path, len as u64);
                map_read_only(&file, len)
            });
        match remapped {
            Ok(mapping) => {
                self.mapping = mapping;
                Ok(())
            }
            Err(error) => {
                self.entries = 0;
                Err(StorageError::io(&self.path, error))
            }
        }
    }
}

fn be_u32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes(bytes.try_into().expect("4 bytes"))
}

/// Relative offset → file position, one entry per `index_interval_bytes`.
#[derive(Debug)]
pub(crate) struct OffsetIndex {
    file: IndexFile,
}

impl OffsetIndex {
    pub(crate) fn open_read_only(path: &Path) -> Result<(OffsetIndex, bool), StorageError> {
        let (file, whole) = IndexFile::open_read_only(path, OFFSET_ENTRY_BYTES)?;
        Ok((OffsetIndex { file }, whole))
    }

    pub(crate) fn open_writable(
        path: &Path,
        bytes_max: u32,
        reset: bool,
    ) -> Result<OffsetIndex, StorageError> {
        let file = IndexFile::open_writable(path, OFFSET_ENTRY_BYTES, bytes_max, reset)?;
        Ok(OffsetIndex { file })
    }

    pub(crate) fn len(&self) -> usize {
        self.file.entries
    }

    /// Entry `index` as (relative offset, position).
    pub(crate) fn entry(&self, index: usize) -> (u32, u32) {
        let bytes = self.file.entry(index);
        (be_u32(&bytes[..4]), be_u32(&bytes[4..]))
    }

    pub(crate) fn last(&self) -> Option<(u32, u32)> {
        self.len().checked_sub(1).map(|i| self.entry(i))
    }

    /// The entry with the largest relative offset at or below `relative_offset`.
    pub(crate) fn lookup(&self, relative_offset: u32) -> Option<(u32, u32)> {
        let (mut low, mut high) = (0, self.len());
        while low < high {
            let mid = low + (high - low) / 2;
            if self.entry(mid).0 <= relative_offset {
                low = mid + 1;
            } else {
                high = mid;
            }
        }
        low.checked_sub(1).map(|i| self.entry(i))
    }

    pub(crate) fn is_full(&self) -> bool {
        self.file.is_full()
    }

    pub(crate) fn push(&mut self, relative_offset: u32, position: u32) -> bool {
        let mut entry = [0; OFFSET_ENTRY_BYTES];
        entry[..4].copy_from_slice(&relative_offset.to_be_bytes());
        entry[4..].copy_from_slice(&position.to_be_bytes());
        self.file.push(&entry)
    }

    /// Drops the entries for batches at or after `position`.
    pub(crate) fn truncate_to_position(&mut self, position: u32) {
        let keep = (0..self.len())
            .take_while(|&i| self.entry(i).1 < position)
            .count();
        self.file.truncate(keep);
    }

    /// Whether the entries can be trusted for a segment of `size` bytes spanning
    /// `offset_span` offsets: strictly increasing, never at position 0, inside the log.
    pub(crate) fn is_sane(&self, size: u32, offset_span: u64) -> bool {
        let mut previous = (0u32, 0u32);
        (0..self.len()).all(|i| {
            let (relative, position) = self.entry(i);
            let ok = relative > previous.0
                && position > previous.1
                && position < size
                && u64::from(relative) < offset_span;
            previous = (relative, position);
            ok
        })
    }

    #[cfg(test)]
    fn flush(&self) -> Result<(), StorageError> {
        self.file.flush()
    }

    pub(crate) fn seal(&mut self) -> Result<(), StorageError> {
        self.file.seal()
    }
}

/// Largest timestamp so far → relative offset of the batch where it was recorded.
#[derive(Debug)]
pub(crate) struct TimeIndex {
    file: IndexFile,
}

impl TimeIndex {
    pub(crate) fn open_read_only(path: &Path) -> Result<(TimeIndex, bool), StorageError> {
        let (file, whole) = IndexFile::open_read_only(path, TIME_ENTRY_BYTES)?;
        Ok((TimeIndex { file }, whole))
    }

    pub(crate) fn open_writable(path: &Path, bytes_max: u32, reset: bool) -> Result<TimeIndex, StorageError> {
        let file = IndexFile::open_writable(path, TIME_ENTRY_BYTES, bytes_max, reset)?;
        Ok(TimeIndex { file })
    }

    pub(crate) fn len(&self) -> usize {
        self.file.entries
    }

    /// Entry `index` as (timestamp ms, relative offset).
    pub(crate) fn entry(&self, index: usize) -> (i64, u32) {
        let bytes = self.file.entry(index);
        (
            i64::from_be_bytes(bytes[..8].try_into().expect("8 bytes")),
            be_u32(&bytes[8..]),
        )
    }

    pub(crate) fn last(&self) -> Option<(i64, u32)> {
        self.len().checked_sub(1).map(|i| self.entry(i))
    }

    /// The last entry whose timestamp is below `timestamp_ms`: every batch up to and
    /// including the one it names has only older records.
    pub(crate) fn last_before(&self, timestamp_ms: i64) -> Option<(i64, u32)> {
        let (mut low, mut high) = (0, self.len());
        while low < high {
            let mid = low + (high - low) / 2;
            if self.entry(mid).0 < timestamp_ms {
                low = mid + 1;
            } else {
                high = mid;
            }
        }
        low.checked_sub(1).map(|i| self.entry(i))
    }

    /// Whether there is room for an entry while keeping one slot for the final entry
    /// written when the segment is sealed.
    pub(crate) fn has_room(&self) -> bool {
        self.file.entries + 1 < self.file.capacity()
    }

    pub(crate) fn push(&mut self, timestamp_ms: i64, relative_offset: u32) -> bool {
        let mut entry = [0; TIME_ENTRY_BYTES];
        entry[..8].copy_from_slice(&timestamp_ms.to_be_bytes());
        entry[8..].copy_from_slice(&relative_offset.to_be_bytes());
        self.file.push(&entry)
    }

    /// Adds an entry if `timestamp_ms` is newer than the last one.
    pub(crate) fn push_if_newer(&mut self, timestamp_ms: i64, relative_offset: u32) {
        if self.last().is_none_or(|(last, _)| timestamp_ms > last) {
            self.push(timestamp_ms, relative_offset);
        }
    }

    pub(crate) fn truncate_to_relative_offset(&mut self, relative_offset: u32) {
        let keep = (0..self.len())
            .take_while(|&i| self.entry(i).1 < relative_offset)
            .count();
        self.file.truncate(keep);
    }

    /// Whether the entries can be trusted: timestamps strictly increasing, offsets
    /// non-decreasing and inside the segment.
    pub(crate) fn is_sane(&self, offset_span: u64) -> bool {
        let mut previous: Option<(i64, u32)> = None;
        (0..self.len()).all(|i| {
            let (timestamp, relative) = self.entry(i);
            let ok = u64::from(relative) < offset_span
                && previous.is_none_or(|(t, r)| timestamp > t && relative >= r);
            previous = Some((timestamp, relative));
            ok
        })
    }

    pub(crate) fn seal(&mut self) -> Result<(), StorageError> {
        self.file.seal()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_index_lookup_and_seal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.index");
        let mut index = OffsetIndex::open_writable(&path, 64, true).unwrap();
        assert_eq!(index.lookup(5), None);
        for (relative, position) in [(10, 100), (20, 200), (30, 300)] {
            index.push(relative, position);
        }
        assert_eq!(index.lookup(9), None);
        assert_eq!(index.lookup(10), Some((10, 100)));
        assert_eq!(index.lookup(29), Some((20, 200)));
        assert_eq!(index.lookup(1000), Some((30, 300)));
        assert!(index.is_sane(301, 31));
        assert!(
            !index.is_sane(300, 31),
            "a position at the end of the log is outside it"
        );
        index.seal().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 24);
        assert!(
            index.is_full() && !index.push(40, 400),
            "a sealed index refuses entries"
        );

        let (reopened, whole) = OffsetIndex::open_read_only(&path).unwrap();
        assert!(whole);
        assert_eq!(reopened.len(), 3);
        assert_eq!(reopened.last(), Some((30, 300)));
    }

    #[test]
    fn offset_index_fills_and_truncates() {
        let dir = tempfile::tempdir().unwrap();
        let mut index = OffsetIndex::open_writable(&dir.path().join("i"), 24, true).unwrap();
        for i in 1..=3 {
            assert!(!index.is_full());
            assert!(index.push(i, i * 10));
        }
        assert!(index.is_full());
        assert!(!index.push(4, 40), "a full index refuses entries");
        index.truncate_to_position(20);
        assert_eq!(index.len(), 1);
    }

    #[test]
    fn preallocated_zeros_are_not_sane() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i");
        let mut index = OffsetIndex::open_writable(&path, 80, true).unwrap();
        index.push(3, 30);
        index.flush().unwrap();
        drop(index);
        // As after a crash: the file still has its preallocated length.
        let (crashed, whole) = OffsetIndex::open_read_only(&path).unwrap();
        assert!(whole);
        assert_eq!(crashed.len(), 10);
        assert!(!crashed.is_sane(1000, 1000));
    }

    #[test]
    fn time_index_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let mut index = TimeIndex::open_writable(&dir.path().join("t"), 120, true).unwrap();
        index.push_if_newer(100, 0);
        index.push_if_newer(100, 5);
        index.push_if_newer(200, 7);
        assert_eq!(index.len(), 2);
        assert_eq!(index.last_before(100), None);
        assert_eq!(index.last_before(101), Some((100, 0)));
        assert_eq!(index.last_before(1_000), Some((200, 7)));
        assert!(index.is_sane(8));
        assert!(!index.is_sane(7));
    }

    #[test]
    fn missing_index_is_empty_and_partial_entries_are_flagged() {
        let dir = tempfile::tempdir().unwrap();
        let (missing, _) = OffsetIndex::open_read_only(&dir.path().join("none")).unwrap();
        assert_eq!(missing.len(), 0);
        let path = dir.path().join("odd");
        std::fs::write(&path, [0u8; 13]).unwrap();
        let (_, whole) = TimeIndex::open_read_only(&path).unwrap();
        assert!(!whole);
    }
}
