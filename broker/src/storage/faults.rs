//! Test-only storage faults, compiled only with the `faults` feature (never in a build
//! of the broker for use), for reliability suites 2 (`broker/tests/power_loss.rs`) and 8
//! (`broker/tests/fsync_failure.rs`). Two of them, each switched on by an environment
//! variable so that they reach a real broker process:
//!
//! - `LANES_FSYNC_FAULT_FILE`: while the named file exists, every fsync of a lane log's
//!   files fails without syncing, as a failing disk's would.
//! - `LANES_POWER_LOSS_JOURNAL` (or `journal_to`, for a test that runs the storage
//!   engine in its own process): the storage engine notes in the named journal every
//!   write to a lane log's files (segments, indexes, checkpoint, producer snapshots),
//!   every fsync of them, every file it creates and every fsync of a directory. After the process is
//!   SIGKILLed (which keeps the page cache, so only tests what the process had written),
//!   `simulate` rewrites the data directory to what a power loss at that moment could
//!   have left:
//!   - a file created after its directory's last fsync disappears;
//!   - every byte written after the file's last fsync began is dropped (cut off the
//!     end, or zeroed where it overwrote older bytes, which is harsher than the old
//!     contents);
//!   - except in a recycled segment file (a deleted segment's, overwritten as a new
//!     one): it keeps its old length, and what it loses there comes back as old batches
//!     with good checksums: an older segment's of its lane log, from that segment's
//!     start (its own old bytes are gone by then; an older segment's are of the same
//!     kind, and begin with a whole batch where the lost bytes began), and it loses its
//!     last write whole one time in two, so that old batches begin at a batch boundary;
//!   - except for a random prefix of the file's last write: that write is torn.
//!
//! Renames and removals count as done when they return: suite 6 (`fsync_discipline`)
//! checks that each is followed by its directory's fsync. Files outside lane logs
//! (topic specs, producer ids) are written with `files::write_file_atomic`
//! and so are either old or new.
//!
//! Without the feature every hook is an empty inline function.

#[cfg(feature = "faults")]
pub use journal::{PowerLossReport, journal_to, simulate};
#[cfg(feature = "faults")]
pub(crate) use journal::{created, dir_synced, recycled, sized, synced, wrote};

/// The hooks do nothing without the feature.
#[cfg(not(feature = "faults"))]
mod hooks {
    use std::path::Path;

    #[inline(always)]
    pub(crate) fn wrote(_path: &Path, _offset: u64, _len: u64) {}

    #[inline(always)]
    pub(crate) fn sized(_path: &Path, _len: u64) {}

    #[inline(always)]
    pub(crate) fn created(_path: &Path) {}

    #[inline(always)]
    pub(crate) fn recycled(_path: &Path, _old_len: u64) {}

    #[inline(always)]
    pub(crate) fn synced<T>(_path: &Path, sync: impl FnOnce() -> std::io::Result<T>) -> std::io::Result<T> {
        sync()
    }

    #[inline(always)]
    pub(crate) fn dir_synced<T>(
        _dir: &Path,
        sync: impl FnOnce() -> std::io::Result<T>,
    ) -> std::io::Result<T> {
        sync()
    }
}
#[cfg(not(feature = "faults"))]
pub(crate) use hooks::{created, dir_synced, recycled, sized, synced, wrote};

/// The environment variable naming the power-loss journal.
pub const JOURNAL_ENV: &str = "LANES_POWER_LOSS_JOURNAL";

/// The environment variable naming the file whose existence makes fsyncs fail.
pub const FSYNC_FAULT_ENV: &str = "LANES_FSYNC_FAULT_FILE";

#[cfg(feature = "faults")]
mod journal {
    //! The journal is text, one event per line, each written with one `write` so that a
    //! SIGKILL never splits one. Line numbers order events:
    //!
    //! - `O <len> <path>`: the file is opened or cut at `len` bytes (its baseline);
    //! - `C <path>`: the file is about to be created;
    //! - `R <len> <path>`: the file just created is a recycled segment file holding
    //!   `len` old bytes (durable: the segment they were was fsynced);
    //! - `W <offset> <len> <path>`: bytes were written (after the write returned);
    //! - `S <line> <path>`: an fsync that began when the journal had `<line>` lines
    //!   returned: it covers every write noted before that line;
    //! - `D <line> <path>`: the same for a directory, covering the creations before it.

    use std::collections::HashMap;
    use std::fs::{File, OpenOptions};
    use std::io::{self, Write};
    use std::os::unix::fs::FileExt;
    use std::path::{Path, PathBuf};
    use std::sync::{Mutex, OnceLock};

    use super::{FSYNC_FAULT_ENV, JOURNAL_ENV};

    /// Whether fsyncs fail now: the file `LANES_FSYNC_FAULT_FILE` names exists.
    fn fsync_fails() -> bool {
        static TRIGGER: OnceLock<Option<PathBuf>> = OnceLock::new();
        TRIGGER
            .get_or_init(|| std::env::var_os(FSYNC_FAULT_ENV).map(PathBuf::from))
            .as_ref()
            .is_some_and(|trigger| trigger.exists())
    }

    struct Journal {
        file: File,
        lines: u64,
    }

    static JOURNAL: OnceLock<Option<Mutex<Journal>>> = OnceLock::new();

    fn open_journal(path: &Path) -> Mutex<Journal> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap_or_else(|error| panic!("{JOURNAL_ENV}: cannot open the journal: {error}"));
        // A journal kept across a crash and restart goes on numbering its lines, so that
        // a power loss later covers both lives.
        let lines = std::fs::read(path).map_or(0, |text| text.iter().filter(|&&b| b == b'\n').count() as u64);
        Mutex::new(Journal { file, lines })
    }

    fn journal() -> Option<&'static Mutex<Journal>> {
        JOURNAL
            .get_or_init(|| std::env::var_os(JOURNAL_ENV).map(|path| open_journal(Path::new(&path))))
            .as_ref()
    }

    /// Journals this process's storage to `path`, as `LANES_POWER_LOSS_JOURNAL` does, for
    /// a test that runs the storage engine in its own process. Only before any journaled
    /// call; false if too late.
    pub fn journal_to(path: &Path) -> bool {
        JOURNAL.set(Some(open_journal(path))).is_ok()
    }

    /// Appends one line; `format_args!` formats nothing while no journal is set.
    fn note(line: std::fmt::Arguments<'_>) {
        let Some(journal) = journal() else { return };
        let text = format!("{line}\n");
        let mut journal = journal.lock().expect("journal lock poisoned");
        journal
            .file
            .write_all(text.as_bytes())
            .expect("the power-loss journal must be complete");
        journal.lines += 1;
    }

    fn lines() -> u64 {
        journal().map_or(0, |journal| journal.lock().expect("journal lock poisoned").lines)
    }

    pub(crate) fn wrote(path: &Path, offset: u64, len: u64) {
        note(format_args!("W {offset} {len} {}", path.display()));
    }

    pub(crate) fn sized(path: &Path, len: u64) {
        note(format_args!("O {len} {}", path.display()));
    }

    pub(crate) fn created(path: &Path) {
        note(format_args!("C {}", path.display()));
    }

    pub(crate) fn recycled(path: &Path, old_len: u64) {
        note(format_args!("R {old_len} {}", path.display()));
    }

    pub(crate) fn synced<T>(path: &Path, sync: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        if fsync_fails() {
            return Err(io::Error::other(format!(
                "injected fsync failure ({FSYNC_FAULT_ENV})"
            )));
        }
        let began = lines();
        let result = sync()?;
        note(format_args!("S {began} {}", path.display()));
        Ok(result)
    }

    pub(crate) fn dir_synced<T>(dir: &Path, sync: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        let began = lines();
        let result = sync()?;
        note(format_args!("D {began} {}", dir.display()));
        Ok(result)
    }

    /// What [`simulate`] did to the data directory.
    #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
    pub struct PowerLossReport {
        /// Files whose directory entry was never fsynced.
        pub files_removed: usize,
        /// Files that lost unsynced bytes.
        pub files_damaged: usize,
        /// Bytes cut off or zeroed.
        pub bytes_dropped: u64,
        /// Last writes kept in part.
        pub writes_torn: usize,
        /// Bytes of recycled segment files that lost their new contents and got old
        /// batches back.
        pub old_bytes_restored: u64,
    }

    #[derive(Default)]
    struct FileEvents {
        baseline_len: u64,
        created_at: Option<u64>,
        /// (line, offset, len)
        writes: Vec<(u64, u64, u64)>,
        /// The line its newest fsync began at: writes before it are durable.
        synced_before: u64,
        /// A recycled segment file's old length (0 for any other file).
        recycled_len: u64,
    }

    /// Rewrites the files named in `journal` to what a power loss at the journal's end
    /// could have left (see the module documentation). The random tear of each file's
    /// last write comes from `seed`.
    pub fn simulate(journal: &Path, seed: u64) -> io::Result<PowerLossReport> {
        let text = std::fs::read_to_string(journal)?;
        let mut files: HashMap<PathBuf, FileEvents> = HashMap::new();
        let mut dirs_synced_before: HashMap<PathBuf, u64> = HashMap::new();
        let malformed = |line: &str| io::Error::new(io::ErrorKind::InvalidData, format!("journal: {line:?}"));
        for (number, line) in text.lines().enumerate() {
            let number = number as u64;
            let (kind, rest) = line.split_once(' ').ok_or_else(|| malformed(line))?;
            let mut fields = rest.splitn(3, ' ');
            let mut number_field = || -> io::Result<u64> {
                fields
                    .next()
                    .and_then(|field| field.parse().ok())
                    .ok_or_else(|| malformed(line))
            };
            match kind {
                "O" | "R" => {
                    let len = number_field()?;
                    let path = PathBuf::from(rest.split_once(' ').ok_or_else(|| malformed(line))?.1);
                    let events = files.entry(path).or_default();
                    if kind == "O" {
                        events.baseline_len = len;
                        events.writes.clear();
                        // Cut (recovery): old bytes past `len` are gone too.
                        events.recycled_len = events.recycled_len.min(len);
                    } else {
                        events.recycled_len = len;
                    }
                }
                "C" => {
                    let events = files.entry(PathBuf::from(rest)).or_default();
                    *events = FileEvents {
                        created_at: Some(number),
                        ..FileEvents::default()
                    };
                }
                "W" => {
                    let offset = number_field()?;
                    let len = number_field()?;
                    let path = PathBuf::from(fields.next().ok_or_else(|| malformed(line))?);
                    files.entry(path).or_default().writes.push((number, offset, len));
                }
                "S" | "D" => {
                    let began = number_field()?;
                    let path = PathBuf::from(rest.split_once(' ').ok_or_else(|| malformed(line))?.1);
                    if kind == "S" {
                        let events = files.entry(path).or_default();
                        events.synced_before = events.synced_before.max(began);
                    } else {
                        let synced = dirs_synced_before.entry(path).or_default();
                        *synced = (*synced).max(began);
                    }
                }
                _ => return Err(malformed(line)),
            }
        }

        let mut random = seed | 1;
        let mut next_random = move |below: u64| {
            // xorshift64: enough to pick where a write tears.
            random ^= random << 13;
            random ^= random >> 7;
            random ^= random << 17;
            random % below
        };
        let mut report = PowerLossReport::default();
        let mut paths: Vec<&PathBuf> = files.keys().collect();
        paths.sort();
        for path in paths {
            let events = &files[path];
            if let Some(created_at) = events.created_at {
                let dir_synced_before = path
                    .parent()
                    .and_then(|dir| dirs_synced_before.get(dir))
                    .copied()
                    .unwrap_or(0);
                if dir_synced_before <= created_at {
                    match std::fs::remove_file(path) {
                        Ok(()) => report.files_removed += 1,
                        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                        Err(error) => return Err(error),
                    }
                    continue;
                }
            }
            let (synced, unsynced): (Vec<_>, Vec<_>) = events
                .writes
                .iter()
                .partition(|(line, _, _)| *line < events.synced_before);
            let Some(&&(_, torn_offset, torn_len)) = unsynced.last() else {
                continue;
            };
            let file = match OpenOptions::new().write(true).open(path) {
                Ok(file) => file,
                // Removed later (retention): nothing to lose.
                Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
                Err(error) => return Err(error),
            };
            let current_len = file.metadata()?.len();
            let durable_end = synced
                .iter()
                .map(|(_, offset, len)| offset + len)
                .fold(events.baseline_len.max(events.recycled_len), u64::max);
            // A recycled file loses its last write whole one time in two: then the old
            // batches begin where a new one should (see `old_bytes` below).
            let torn_kept = if events.recycled_len > 0 && next_random(2) == 0 {
                0
            } else {
                next_random(torn_len + 1)
            };
            let kept_end = if torn_kept > 0 { torn_offset + torn_kept } else { 0 };
            let new_len = durable_end.max(kept_end).min(current_len);
            let mut dropped = current_len - new_len;
            file.set_len(new_len)?;
            let mut lost = unsynced
                .iter()
                .take(unsynced.len() - 1)
                .map(|&&(_, offset, len)| (offset, offset + len))
                .collect::<Vec<_>>();
            lost.push((torn_offset + torn_kept, torn_offset + torn_len));
            let old_bytes = match events.recycled_len {
                0 => None,
                _ => older_segment(path)?,
            };
            let mut buffer = vec![0u8; 64 * 1024];
            for (start, end) in lost {
                let (start, end) = (start.min(new_len), end.min(new_len));
                let mut at = start;
                while at < end {
                    let chunk = &mut buffer[..(end - at).min(64 * 1024) as usize];
                    chunk.fill(0);
                    if let Some(old) = &old_bytes
                        && at < events.recycled_len
                    {
                        // From the older segment's start, so that whole batches begin
                        // where the lost bytes did: where recovery looks for the next
                        // batch. On a disk, old and new batches line up whenever their
                        // sizes do (fixed-size records filling whole batches).
                        let below_old_len = chunk.len().min((events.recycled_len - at) as usize);
                        let restored = read_up_to(old, &mut chunk[..below_old_len], at - start)?;
                        report.old_bytes_restored += restored as u64;
                    }
                    file.write_all_at(chunk, at)?;
                    at += chunk.len() as u64;
                }
                dropped += end - start;
            }
            if torn_kept > 0 && torn_kept < torn_len {
                report.writes_torn += 1;
            }
            if dropped > 0 {
                report.files_damaged += 1;
                report.bytes_dropped += dropped;
            }
            file.sync_all()?;
        }
        Ok(report)
    }

    /// The newest segment of the lane log that `segment` (a `<base>.log` path) is in
    /// whose base is below `segment`'s: its bytes stand in for a recycled file's old ones.
    /// Never a newer one: old bytes carry older offsets.
    fn older_segment(segment: &Path) -> io::Result<Option<File>> {
        use crate::storage::files::{LOG_SUFFIX, offset_file_name, parse_offset_file_name};
        let base = |path: &Path| match parse_offset_file_name(path.file_name()?.to_str()?) {
            Some((base, LOG_SUFFIX)) => Some(base),
            _ => None,
        };
        let (Some(dir), Some(own)) = (segment.parent(), base(segment)) else {
            return Ok(None);
        };
        let older = std::fs::read_dir(dir)?
            .filter_map(|entry| base(&entry.ok()?.path()))
            .filter(|&other| other < own)
            .max();
        older
            .map(|other| File::open(offset_file_name(dir, other, LOG_SUFFIX)))
            .transpose()
    }

    /// Fills `buffer` from `file` at `at` as far as the file goes; how many bytes.
    fn read_up_to(file: &File, buffer: &mut [u8], at: u64) -> io::Result<usize> {
        let mut filled = 0;
        while filled < buffer.len() {
            match file.read_at(&mut buffer[filled..], at + filled as u64)? {
                0 => break,
                read => filled += read,
            }
        }
        Ok(filled)
    }
}
