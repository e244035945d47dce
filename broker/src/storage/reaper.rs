//! The reaper: frees the data files of deleted segments a chunk at a time.
//!
//! Unlinking a large file frees its blocks and its page-cache pages all at once. Where
//! the file system discards freed blocks (mounted with `discard`) and the machine is a
//! virtual one that hands freed memory back to its host, that burst stalls the machine:
//! on this project's test machine, deleting a 3 GB topic took the p99 of a durable
//! produce run from about 6 ms to about 75 ms (docs/BENCHMARKS.md, "Deleting data").
//! So retention and topic deletes hand each segment's `.log` file to the reaper before
//! unlinking it. The reaper keeps the file open and shrinks it by [`CHUNK_BYTES`] at a
//! time, at `delete_bytes_per_s` (up to four times faster while more than
//! [`BACKLOG_DRAIN`] of that rate waits), then closes it. It holds at most
//! [`FILES_MAX`] files; more are freed at once. The `.index` and `.timeindex` files are
//! small and go at once.
//!
//! Two rules keep this safe:
//! - A file is shrunk only once its segment's mapping is gone. Readers (fetch responses
//!   being sent) may still hold slices of it, and a mapped page past the end of a shrunk
//!   file is a SIGBUS.
//! - Shrinking starts only once the caller has made the unlink durable (it calls
//!   [`Reaper::reap`] after fsyncing the directory), so a name that comes back after a
//!   crash never finds a shortened file.
//!
//! On stop, what is left is closed: the kernel frees it at once, as a plain unlink would.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use memmap2::Mmap;

use super::segment::Segment;

/// Bytes freed per step.
const CHUNK_BYTES: u64 = 8 << 20;
/// While more than this much of `delete_bytes_per_s` waits, the reaper frees faster, up
/// to [`DRAIN_SPEEDUP_MAX`] times, so that deletes do not fall far behind.
const BACKLOG_DRAIN: Duration = Duration::from_secs(10);
const DRAIN_SPEEDUP_MAX: u64 = 4;
/// Files the reaper holds open at most (each up to a segment, 1 GiB by default); beyond
/// that a file is freed at once. Small, as the descriptors count against the broker's.
const FILES_MAX: usize = 64;
/// How often an idle reaper sets its gauge again.
const IDLE_REPUBLISH: Duration = Duration::from_secs(5);
/// How often files still mapped by readers are looked at again.
const MAPPED_RECHECK: Duration = Duration::from_millis(50);

/// Frees deleted segment files gradually on its own thread.
#[derive(Debug)]
pub struct Reaper {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    bytes_per_s: u64,
    files_max: usize,
    /// Every [`Doomed`] alive, queued or not yet handed over: the files held open.
    open_files: Arc<AtomicUsize>,
}

#[derive(Debug, Default)]
struct State {
    doomed: VecDeque<Doomed>,
    stopping: bool,
    stats: ReaperStats,
}

/// What the reaper holds and has done.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReaperStats {
    /// Files waiting to be freed (or still being freed).
    pub files: usize,
    /// Their bytes not yet freed.
    pub pending_bytes: u64,
    /// Bytes freed since start.
    pub freed_bytes: u64,
    /// Times the reaper looked at its queue: each frees one chunk or finds every file
    /// still mapped.
    pub rounds: u64,
}

/// A segment's `.log` file, held open while its name goes; freed once handed to
/// [`Reaper::reap`].
#[derive(Debug)]
pub struct Doomed {
    file: File,
    len: u64,
    mapping: Weak<Mmap>,
    open_files: Arc<AtomicUsize>,
}

impl Drop for Doomed {
    fn drop(&mut self) {
        self.open_files.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Reaper {
    /// Starts the reaper's thread. With `bytes_per_s` 0 it takes no files: deleted
    /// files are freed at once.
    pub fn start(bytes_per_s: u64) -> Arc<Reaper> {
        Reaper::start_with(bytes_per_s, FILES_MAX)
    }

    fn start_with(bytes_per_s: u64, files_max: usize) -> Arc<Reaper> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            bytes_per_s,
            files_max,
            open_files: Arc::new(AtomicUsize::new(0)),
        });
        let thread = (bytes_per_s > 0).then(|| {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("lanes-reaper".into())
                .spawn(move || reap_loop(&shared))
                .expect("spawn the reaper thread")
        });
        Arc::new(Reaper {
            shared,
            thread: Mutex::new(thread),
        })
    }

    /// Opens `segment`'s `.log` file to free it later; call before unlinking it. `None`
    /// when the reaper takes no more files (the unlink then frees it at once).
    pub(crate) fn doom(&self, segment: &Segment) -> Option<Doomed> {
        self.doom_file(segment.log_path(), segment.mapping())
    }

    /// Takes the file at `path`, whose name is about to go, once nothing maps it
    /// (`mapping`); `None` if the reaper takes no more files (the caller's unlink then
    /// frees it at once).
    pub(crate) fn doom_file(&self, path: &Path, mapping: Weak<Mmap>) -> Option<Doomed> {
        if self.shared.bytes_per_s == 0 {
            return None;
        }
        let open_files = &self.shared.open_files;
        if open_files.fetch_add(1, Ordering::AcqRel) >= self.shared.files_max {
            open_files.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let opened = OpenOptions::new().write(true).open(path);
        let Ok(file) = opened.inspect_err(|error| {
            tracing::warn!(path = %path.display(), %error, "could not open a deleted file to free it gradually");
        }) else {
            open_files.fetch_sub(1, Ordering::AcqRel);
            return None;
        };
        let Ok(metadata) = file.metadata() else {
            open_files.fetch_sub(1, Ordering::AcqRel);
            return None;
        };
        let len = metadata.len();
        Some(Doomed {
            file,
            len,
            mapping,
            open_files: Arc::clone(open_files),
        })
    }

    /// Starts freeing `doomed`, whose names are gone for good.
    pub fn reap(&self, doomed: Vec<Doomed>) {
        if doomed.is_empty() {
            return;
        }
        let mut state = self.shared.lock();
        if state.stopping {
            // Nothing will free them gradually now; closing them (unlocked) frees them.
            drop(state);
            drop(doomed);
            return;
        }
        for doomed in doomed {
            state.stats.pending_bytes += doomed.len;
            state.doomed.push_back(doomed);
        }
        state.publish();
        drop(state);
        self.shared.wake.notify_all();
    }

    pub fn stats(&self) -> ReaperStats {
        self.shared.lock().stats
    }

    /// Stops the thread and closes the files left, which the kernel then frees at once.
    pub fn stop(&self) {
        self.shared.lock().stopping = true;
        self.shared.wake.notify_all();
        if let Some(thread) = self.thread.lock().expect("reaper thread lock poisoned").take() {
            let _ = thread.join();
        }
        let left = {
            let mut state = self.shared.lock();
            state.stats.pending_bytes = 0;
            let left = std::mem::take(&mut state.doomed);
            state.publish();
            left
        };
        // Closed outside the lock: the kernel frees what is left of them now.
        drop(left);
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("reaper lock poisoned")
    }
}

impl State {
    /// Updates the file count and the pending-bytes gauge.
    fn publish(&mut self) {
        self.stats.files = self.doomed.len();
        metrics::gauge!(crate::metrics::DELETE_PENDING_BYTES).set(self.stats.pending_bytes as f64);
    }
}

fn reap_loop(shared: &Shared) {
    let mut state = shared.lock();
    while !state.stopping {
        // Set again now and then: the exporter drops a gauge left alone for a minute.
        state.publish();
        if state.doomed.is_empty() {
            state = shared
                .wake
                .wait_timeout(state, IDLE_REPUBLISH)
                .expect("reaper lock poisoned")
                .0;
            continue;
        }
        state.stats.rounds += 1;
        let Some(index) = state.doomed.iter().position(|d| d.mapping.strong_count() == 0) else {
            // Every file is still read through its mapping; look again later.
            state = shared
                .wake
                .wait_timeout(state, MAPPED_RECHECK)
                .expect("reaper lock poisoned")
                .0;
            continue;
        };
        let mut doomed = state.doomed.remove(index).expect("found above");
        let drain_bytes_per_s = state.stats.pending_bytes / BACKLOG_DRAIN.as_secs();
        let bytes_per_s = drain_bytes_per_s.clamp(
            shared.bytes_per_s,
            shared.bytes_per_s.saturating_mul(DRAIN_SPEEDUP_MAX),
        );
        drop(state);

        // The kernel frees the blocks and cached pages past the new end now.
        let chunk = doomed.len.min(CHUNK_BYTES);
        let shrunk = doomed.file.set_len(doomed.len - chunk);
        let (freed, unfinished) = match shrunk {
            Ok(()) => {
                doomed.len -= chunk;
                (chunk, doomed.len > 0)
            }
            Err(error) => {
                tracing::warn!(%error, "could not shrink a deleted file; freeing the rest at once");
                (doomed.len, false)
            }
        };
        // Closing a file frees what is left of it, so that happens here, unlocked.
        let unfinished = if unfinished {
            Some(doomed)
        } else {
            drop(doomed);
            None
        };

        state = shared.lock();
        state.stats.pending_bytes -= freed;
        state.stats.freed_bytes += freed;
        if let Some(doomed) = unfinished {
            state.doomed.push_front(doomed);
        }
        state.publish();
        let pause = Duration::from_secs_f64(chunk as f64 / bytes_per_s as f64);
        state = shared
            .wake
            .wait_timeout_while(state, pause, |state| !state.stopping)
            .expect("reaper lock poisoned")
            .0;
    }
}

#[cfg(test)]
#[allow(unsafe_code)] // the tests map files as segments do
mod tests {
    use std::io::Write;
    use std::path::PathBuf;
    use std::time::Instant;

    use memmap2::MmapOptions;

    use super::*;

    /// A sparse `.log` file of `len` bytes in a temp dir (kept while the dir lives).
    fn sparse_log(len: u64) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("00000000000000000000.log");
        File::create(&path).unwrap().set_len(len).unwrap();
        (dir, path)
    }

    /// Maps `path` as a segment maps its `.log` file.
    fn map(path: &Path) -> Arc<Mmap> {
        let file = File::open(path).unwrap();
        // SAFETY: the test's own file; nothing else changes it while mapped, which is
        // what these tests check of the reaper.
        Arc::new(unsafe { MmapOptions::new().map(&file).unwrap() })
    }

    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_doomed_file_is_freed_a_chunk_at_a_time_then_closed() {
        let len = 2 * CHUNK_BYTES + 100;
        let (_dir, path) = sparse_log(len);
        let reaper = Reaper::start(1 << 30);
        let doomed = reaper.doom_file(&path, Weak::new()).expect("taken");
        assert_eq!(reaper.stats().files, 0, "nothing is freed before reap");
        reaper.reap(vec![doomed]);
        wait_for("the file to be freed", || reaper.stats().files == 0);
        let stats = reaper.stats();
        assert_eq!((stats.freed_bytes, stats.pending_bytes), (len, 0));
        assert!(stats.rounds >= 3, "three chunks, one per round: {stats:?}");
        // The test kept the name so it can see the result.
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    }

    #[test]
    fn a_mapped_file_is_left_whole_until_its_mapping_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("00000000000000000000.log");
        let bytes: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
        File::create(&path).unwrap().write_all(&bytes).unwrap();
        let map = map(&path);
        let reaper = Reaper::start(1 << 30);
        reaper.reap(vec![reaper.doom_file(&path, Arc::downgrade(&map)).unwrap()]);
        wait_for("the reaper to look at the file a few times", || {
            let stats = reaper.stats();
            stats.rounds >= 3 || stats.files == 0
        });
        assert_eq!(reaper.stats().files, 1, "still held");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), bytes.len() as u64);
        assert_eq!(&map[..], &bytes[..], "every mapped byte is still readable");
        drop(map);
        wait_for("the file to be freed", || reaper.stats().files == 0);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        assert_eq!(reaper.stats().freed_bytes, bytes.len() as u64);
    }

    #[test]
    fn a_reaper_with_no_rate_takes_no_files() {
        let (_dir, path) = sparse_log(100);
        assert!(Reaper::start(0).doom_file(&path, Weak::new()).is_none());
    }

    #[test]
    fn a_reaper_holds_at_most_files_max_files_open() {
        let (_dir, path) = sparse_log(100);
        // The mapping keeps the queued files from being freed.
        let map = map(&path);
        let reaper = Reaper::start_with(1 << 30, 2);
        let first = reaper.doom_file(&path, Arc::downgrade(&map)).unwrap();
        let second = reaper.doom_file(&path, Arc::downgrade(&map)).unwrap();
        assert!(reaper.doom_file(&path, Weak::new()).is_none(), "two are held");
        drop(first);
        let third = reaper
            .doom_file(&path, Arc::downgrade(&map))
            .expect("one was let go");
        reaper.reap(vec![second, third]);
        assert!(
            reaper.doom_file(&path, Weak::new()).is_none(),
            "queued files count"
        );
        drop(map);
        wait_for("both to be freed", || reaper.stats().files == 0);
        assert!(reaper.doom_file(&path, Weak::new()).is_some());
    }

    #[test]
    fn stop_closes_the_files_left_without_shrinking_them() {
        let (_dir, path) = sparse_log(1000);
        let map = map(&path);
        let reaper = Reaper::start(1 << 30);
        reaper.reap(vec![reaper.doom_file(&path, Arc::downgrade(&map)).unwrap()]);
        reaper.stop();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1000);
        assert_eq!(map.len(), 1000);
    }
}
