//! Direct reads: batches no longer in the page cache are read from the disk with
//! `O_DIRECT` into buffers of our own, instead of faulting them in through the mapping.
//!
//! A consumer far behind the producers reads what the kernel has dropped from the page
//! cache (memory pressure, proactive reclaim, or `cached_tail_bytes`). Through the
//! mapping, each fault reads the file into page-cache pages the kernel must find first;
//! on a virtual machine whose host takes free memory back, those pages are the slow
//! part: this project's test machine read an uncached file at 0.9–1.0 GB/s buffered,
//! and at 2.2–3.0 GB/s with `O_DIRECT` (docs/BENCHMARKS.md, "Direct reads"). A direct
//! read also leaves the page cache to the newest data, which live consumers read.
//!
//! The buffers come from a pool with a fixed bound ([`DirectReads::new`]); each is lent
//! to the `Bytes` of one read and comes back when the last slice of it is dropped (the
//! response is sent). With none free, the read goes through the mapping as before.
//!
//! A read waits for the disk, and a reader that does nothing else meanwhile keeps the
//! disk idle while it sends what it read. So after each direct read the lane log asks
//! for the bytes after it to be read ahead ([`DirectReads::read_ahead`]), on one of
//! [`READ_AHEAD_THREADS`] threads, into a buffer the next read of the lane log takes
//! ([`ReadAhead`]). It also keeps the buffer it read from, for a next read that starts
//! inside it (a fetch may send fewer batches than it read). Read-ahead takes a buffer
//! only while more than half the pool is free. Read-ahead and kept buffers are given
//! back once a second old, looked at whenever a lane log keeps or reads ahead a buffer,
//! and once 100 ms old when a read finds no buffer free: readers that never come back
//! cannot starve others.
//!
//! A fetch runs on a runtime thread, which must not wait for the disk: it awaits a
//! running read-ahead ([`ReadAheadDone`]) and then reads with
//! [`crate::storage::LaneLog::try_read`], which returns `None` rather than wait; the
//! read that still needs the disk then runs on a blocking thread (and gives up a
//! read-ahead still queued, as before).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use lanes_protocol::Offset;

use super::segment::Segment;

/// Alignment of a direct read's file position, length and buffer address: 4 KiB, a
/// multiple of the logical block size of the disks Linux supports (512 or 4096). Where
/// it is not, the read fails and goes through the mapping.
pub(crate) const DIRECT_ALIGN_BYTES: usize = 4096;

/// Bytes of one buffer: a consumer's default share of a fetch per lane log (1 MiB),
/// plus the page before its first batch and the one after its last. (Buffers of two
/// reads' worth, the second read taking its batches from the same buffer, consumed
/// more slowly here: docs/BENCHMARKS.md, "Direct reads".)
pub(crate) const DIRECT_BUFFER_BYTES: usize = (1 << 20) + 2 * DIRECT_ALIGN_BYTES;

/// Threads that read ahead.
pub(crate) const READ_AHEAD_THREADS: usize = 2;

/// How long a read waits for a running read-ahead it takes (one disk read of 1 MiB: this
/// is only a bound); past it, it reads itself.
pub(crate) const READ_AHEAD_WAIT: Duration = Duration::from_millis(200);

/// Tasks one read-ahead keeps to wake ([`ReadAheadDone`]).
const READ_AHEAD_WAKERS_MAX: usize = 64;

/// A read-ahead no reader has taken for this long gives its buffer back.
const READ_AHEAD_UNTAKEN_MAX: Duration = Duration::from_secs(1);

/// A read-ahead not taken for this long may be replaced by another reader's.
pub(crate) const READ_AHEAD_KEPT: Duration = Duration::from_millis(100);

/// A bounded pool of aligned buffers for direct reads, shared by every lane log.
#[derive(Debug)]
pub struct DirectReads {
    buffers_max: usize,
    /// Buffers allocated so far (never more than `buffers_max`).
    allocated: AtomicUsize,
    free: Mutex<Vec<Vec<u8>>>,
    reads: AtomicU64,
    bytes: AtomicU64,
    /// Reads that went through the mapping because every buffer was lent out.
    exhausted: AtomicU64,
    /// Reads that found their bytes read ahead.
    read_ahead_taken: AtomicU64,
    /// Jobs for the read-ahead threads, started with the first.
    read_ahead_jobs: OnceLock<SyncSender<ReadAheadJob>>,
    /// Read-aheads sent, oldest first, until taken or reclaimed.
    read_ahead_pending: Mutex<VecDeque<Weak<ReadAhead>>>,
}

/// What direct reads have done since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectReadStats {
    pub reads: u64,
    pub bytes: u64,
    pub buffers_exhausted: u64,
    /// Reads that found their bytes read ahead.
    pub read_ahead_taken: u64,
}

impl DirectReads {
    /// A pool of at most `bytes_max` bytes of buffers (1 MiB and three pages each,
    /// allocated on first use); `None` if that is not even one buffer.
    pub fn new(bytes_max: u64) -> Option<Arc<DirectReads>> {
        let allocation_bytes = (DIRECT_BUFFER_BYTES + DIRECT_ALIGN_BYTES) as u64;
        let buffers_max = usize::try_from(bytes_max / allocation_bytes).unwrap_or(usize::MAX);
        (buffers_max > 0).then(|| {
            Arc::new(DirectReads {
                buffers_max,
                allocated: AtomicUsize::new(0),
                free: Mutex::new(Vec::new()),
                reads: AtomicU64::new(0),
                bytes: AtomicU64::new(0),
                exhausted: AtomicU64::new(0),
                read_ahead_taken: AtomicU64::new(0),
                read_ahead_jobs: OnceLock::new(),
                read_ahead_pending: Mutex::new(VecDeque::new()),
            })
        })
    }

    pub fn stats(&self) -> DirectReadStats {
        DirectReadStats {
            reads: self.reads.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            buffers_exhausted: self.exhausted.load(Ordering::Relaxed),
            read_ahead_taken: self.read_ahead_taken.load(Ordering::Relaxed),
        }
    }

    /// A free buffer, or a new one while under the bound; `None` when all are lent.
    fn take(self: &Arc<Self>) -> Option<DirectBuffer> {
        self.take_leaving(0)
    }

    /// [`DirectReads::take`], but only while more than `kept` buffers would stay free
    /// (or unallocated) after it.
    fn take_leaving(self: &Arc<Self>, kept: usize) -> Option<DirectBuffer> {
        let taken = self.try_take_leaving(kept).or_else(|| {
            // For a read (not a read-ahead, which would take others' turns): buffers
            // kept for lane logs whose readers went quiet may be what is missing.
            (kept == 0).then(|| self.reclaim_older_than(READ_AHEAD_KEPT))?;
            self.try_take_leaving(kept)
        });
        if taken.is_none() && kept == 0 {
            self.exhausted.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(crate::metrics::DIRECT_READ_BUFFERS_EXHAUSTED).increment(1);
        }
        taken
    }

    fn try_take_leaving(self: &Arc<Self>, kept: usize) -> Option<DirectBuffer> {
        let mut free = self.free.lock().expect("direct read pool lock poisoned");
        let unallocated = self.buffers_max - self.allocated.load(Ordering::Acquire);
        if free.len() + unallocated <= kept {
            return None;
        }
        let reused = free.pop();
        drop(free);
        let vec = match reused {
            Some(vec) => vec,
            None => {
                let grown = self
                    .allocated
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                        (n < self.buffers_max).then_some(n + 1)
                    });
                if grown.is_err() {
                    // Another thread took the last one since the count above.
                    return None;
                }
                // One page more than needed, so that an aligned region fits wherever the
                // allocation lands.
                vec![0; DIRECT_BUFFER_BYTES + DIRECT_ALIGN_BYTES]
            }
        };
        let start = vec.as_ptr().align_offset(DIRECT_ALIGN_BYTES);
        Some(DirectBuffer {
            vec,
            start,
            len: 0,
            pool: Arc::clone(self),
        })
    }
}

impl DirectReads {
    /// Reads `len` bytes of `segment` from `position` (where the batch carrying `offset`
    /// starts) on a read-ahead thread, unless they are mostly cached by then. `None` if
    /// no buffer is spare or the threads are busy with as many jobs as they queue.
    pub(crate) fn read_ahead(
        self: &Arc<Self>,
        segment: &Arc<Segment>,
        position: u32,
        offset: Offset,
        len: usize,
    ) -> Option<Arc<ReadAhead>> {
        self.reclaim_untaken();
        let buffer = self.take_leaving(self.buffers_max.div_ceil(2))?;
        let ahead = Arc::new(ReadAhead {
            segment_base: segment.base_offset(),
            offset,
            position,
            end: None,
            started: Instant::now(),
            state: Mutex::new(AheadState::Queued),
            done: Condvar::new(),
            wakers: Mutex::new(Vec::new()),
        });
        let job = ReadAheadJob {
            segment: Arc::clone(segment),
            len: len.min(DIRECT_BUFFER_BYTES),
            buffer,
            ahead: Arc::clone(&ahead),
        };
        let jobs = self
            .read_ahead_jobs
            .get_or_init(|| self.start_read_ahead_threads());
        match jobs.try_send(job) {
            Ok(()) => {
                self.register(&ahead);
                Some(ahead)
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => None,
        }
    }

    /// Puts `ahead` on the list [`DirectReads::reclaim_untaken`] looks at, and looks.
    fn register(&self, ahead: &Arc<ReadAhead>) {
        self.read_ahead_pending
            .lock()
            .expect("read-ahead list lock poisoned")
            .push_back(Arc::downgrade(ahead));
        self.reclaim_untaken();
    }

    /// Gives back the buffers of read-aheads, and of buffers kept for a lane log's next
    /// read, older than [`READ_AHEAD_UNTAKEN_MAX`] (their consumer went away, or reads
    /// elsewhere), so they do not keep the pool forever. Entries of those already
    /// dropped leave the list too: it holds those of about the last second.
    fn reclaim_untaken(&self) {
        self.reclaim_older_than(READ_AHEAD_UNTAKEN_MAX);
    }

    /// Gives back the buffers of read-aheads and kept buffers older than `age`.
    fn reclaim_older_than(&self, age: Duration) {
        let mut pending = self
            .read_ahead_pending
            .lock()
            .expect("read-ahead list lock poisoned");
        while let Some(front) = pending.front() {
            match front.upgrade() {
                // Taken (or its lane log gone): nothing to give back.
                None => {}
                Some(ahead) if ahead.started.elapsed() >= age => ahead.give_up(),
                // The list is in start order: the rest are younger.
                Some(_) => return,
            }
            pending.pop_front();
        }
    }

    fn start_read_ahead_threads(&self) -> SyncSender<ReadAheadJob> {
        // At most half the buffers are ever in jobs.
        let (sender, receiver) = std::sync::mpsc::sync_channel(self.buffers_max.div_ceil(2));
        let receiver = Arc::new(Mutex::new(receiver));
        for i in 0..READ_AHEAD_THREADS {
            let receiver = Arc::clone(&receiver);
            // If no thread starts, the receiver is gone and every read-ahead is refused.
            let spawned = std::thread::Builder::new()
                .name(format!("lanes-read-ahead-{i}"))
                .spawn(move || read_ahead_loop(&receiver));
            if let Err(error) = spawned {
                tracing::warn!(%error, "could not start a read-ahead thread");
            }
        }
        sender
    }
}

/// Runs read-ahead jobs until the pool (and with it the sender) is gone.
fn read_ahead_loop(jobs: &Mutex<Receiver<ReadAheadJob>>) {
    loop {
        let job = jobs.lock().expect("read-ahead queue lock poisoned").recv();
        let Ok(job) = job else {
            return;
        };
        let ReadAheadJob {
            segment,
            len,
            buffer,
            ahead,
        } = job;
        if !ahead.start() {
            continue;
        }
        // Bytes up to the size seen before the read are what the read returns; the
        // rest may still be written.
        let size_before = segment.size();
        let position = ahead.position;
        let read = if segment.mostly_cached(position, position.saturating_add(len as u32)) {
            None
        } else {
            // The job's `segment` keeps the segment's mapping, so its file is neither
            // recycled nor shrunk meanwhile; once renamed away, the open fails.
            let (path, id) = segment.direct_file();
            read_into(buffer, path, id, u64::from(position), len)
        };
        ahead.finish(read.map(|read| AheadRead {
            read,
            size_before,
            position,
            offset: ahead.offset,
        }));
    }
}

struct ReadAheadJob {
    segment: Arc<Segment>,
    len: usize,
    buffer: DirectBuffer,
    ahead: Arc<ReadAhead>,
}

/// A buffer of a segment's bytes read with `O_DIRECT`, and where its batches start.
#[derive(Clone, Debug)]
pub(crate) struct AheadRead {
    pub(crate) read: DirectRead,
    /// The segment's size before the read: the bytes past it may not be written yet.
    pub(crate) size_before: u32,
    /// Where a batch in it starts (the one the read was for)...
    pub(crate) position: u32,
    /// ...and that batch's offset: batches from there on can be found in it.
    pub(crate) offset: Offset,
}

#[derive(Debug)]
enum AheadState {
    Queued,
    Running,
    /// What it read, if anything, until taken.
    Done(Option<AheadRead>),
    /// Taken, given up by its reader, or reclaimed: whatever it reads is dropped.
    Over,
}

impl AheadState {
    fn is_pending(&self) -> bool {
        matches!(self, AheadState::Queued | AheadState::Running)
    }
}

/// A buffer of a lane log's bytes: read ahead, for the read that starts where they do,
/// or kept from the last direct read, for a read that starts inside it.
#[derive(Debug)]
pub(crate) struct ReadAhead {
    /// The segment read (its base offset).
    pub(crate) segment_base: Offset,
    /// The offset the batch at `position` starts with: the next read's.
    pub(crate) offset: Offset,
    pub(crate) position: u32,
    /// For a kept buffer: the offset up to which it serves reads (where the read-ahead
    /// after it starts).
    pub(crate) end: Option<Offset>,
    started: Instant,
    state: Mutex<AheadState>,
    done: Condvar,
    /// Tasks waiting for the read to finish ([`ReadAheadDone`]); registered under
    /// `state`'s lock while it is queued or running, woken once it is over.
    wakers: Mutex<Vec<Waker>>,
}

/// A future: a read-ahead that was queued or running has finished (or was given up). A
/// fetch awaits it instead of holding a thread while the disk reads (see
/// [`crate::storage::LaneLog::read_ahead_done`]).
#[derive(Debug)]
pub(crate) struct ReadAheadDone(pub(crate) Arc<ReadAhead>);

impl Future for ReadAheadDone {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let state = self.0.lock();
        if !state.is_pending() {
            return Poll::Ready(());
        }
        let mut wakers = self.0.wakers.lock().expect("read-ahead wakers lock poisoned");
        if !wakers.iter().any(|waker| waker.will_wake(cx.waker())) {
            // Wakers of fetches that gave up waiting stay until the read is over; past
            // the bound they are woken early (a waker may wake its task spuriously), and
            // the fetches still waiting register again.
            if wakers.len() >= READ_AHEAD_WAKERS_MAX {
                wakers.drain(..).for_each(Waker::wake);
            }
            wakers.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

impl ReadAhead {
    fn lock(&self) -> std::sync::MutexGuard<'_, AheadState> {
        self.state.lock().expect("read-ahead lock poisoned")
    }

    /// For the read-ahead thread: whether to run the read (nobody gave it up).
    fn start(&self) -> bool {
        let mut state = self.lock();
        let queued = matches!(*state, AheadState::Queued);
        if queued {
            *state = AheadState::Running;
        }
        queued
    }

    fn finish(&self, read: Option<AheadRead>) {
        let mut state = self.lock();
        if matches!(*state, AheadState::Running) {
            *state = AheadState::Done(read);
        }
        drop(state);
        self.wake_all();
    }

    /// Drops what it read, or will read.
    pub(crate) fn give_up(&self) {
        *self.lock() = AheadState::Over;
        // A reader waiting for it reads itself.
        self.wake_all();
    }

    /// Wakes the readers waiting for it; called once it is no longer queued or running
    /// (a waker is registered only while it is, under the state's lock).
    fn wake_all(&self) {
        self.done.notify_all();
        let wakers = std::mem::take(&mut *self.wakers.lock().expect("read-ahead wakers lock poisoned"));
        wakers.into_iter().for_each(Waker::wake);
    }

    /// Whether its read is queued or running.
    pub(crate) fn is_pending(&self) -> bool {
        self.lock().is_pending()
    }

    /// Whether a read-ahead thread is reading it.
    pub(crate) fn is_running(&self) -> bool {
        matches!(*self.lock(), AheadState::Running)
    }

    /// What was read ahead. A read still queued is given up (the caller reads itself,
    /// rather than wait behind other jobs); one running is waited for, up to
    /// [`READ_AHEAD_WAIT`]. (A fetch awaits a running one first, without a thread:
    /// [`ReadAheadDone`].)
    pub(crate) fn take(&self, pool: &DirectReads) -> Option<AheadRead> {
        let state = self.lock();
        let (mut state, _) = self
            .done
            .wait_timeout_while(state, READ_AHEAD_WAIT, |state| {
                matches!(state, AheadState::Running)
            })
            .expect("read-ahead lock poisoned");
        let taken = std::mem::replace(&mut *state, AheadState::Over);
        drop(state);
        let read = match taken {
            AheadState::Done(read) => read,
            // Given up: a read-ahead thread skips it, or drops what it reads; nobody
            // else waits for it.
            pending => {
                if pending.is_pending() {
                    self.wake_all();
                }
                None
            }
        };
        if read.is_some() {
            pool.read_ahead_taken.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(crate::metrics::DIRECT_READS_READ_AHEAD).increment(1);
        }
        read
    }

    /// A buffer already read, kept for the next read of its lane log, which may start
    /// inside the batches just returned (a fetch may send fewer batches than it read).
    pub(crate) fn read(
        pool: &DirectReads,
        segment_base: Offset,
        read: AheadRead,
        end: Offset,
    ) -> Arc<ReadAhead> {
        let ahead = Arc::new(ReadAhead {
            segment_base,
            offset: read.offset,
            position: read.position,
            end: Some(end),
            started: Instant::now(),
            state: Mutex::new(AheadState::Done(Some(read))),
            done: Condvar::new(),
            wakers: Mutex::new(Vec::new()),
        });
        pool.register(&ahead);
        ahead
    }

    /// A copy of what it holds, if it is read (and not given up); it keeps it.
    pub(crate) fn peek(&self) -> Option<AheadRead> {
        match &*self.lock() {
            AheadState::Done(read) => read.clone(),
            _ => None,
        }
    }

    /// Whether another reader's read-ahead may replace this one.
    pub(crate) fn is_stale(&self) -> bool {
        self.started.elapsed() >= READ_AHEAD_KEPT
    }
}

/// One buffer lent out: its aligned region `vec[start..start + DIRECT_BUFFER_BYTES]`,
/// of which `len` bytes hold what was read.
struct DirectBuffer {
    vec: Vec<u8>,
    start: usize,
    len: usize,
    pool: Arc<DirectReads>,
}

impl AsRef<[u8]> for DirectBuffer {
    fn as_ref(&self) -> &[u8] {
        &self.vec[self.start..self.start + self.len]
    }
}

impl Drop for DirectBuffer {
    fn drop(&mut self) {
        let vec = std::mem::take(&mut self.vec);
        self.pool
            .free
            .lock()
            .expect("direct read pool lock poisoned")
            .push(vec);
    }
}

/// Bytes read from a file at an aligned position.
#[derive(Clone, Debug)]
pub(crate) struct DirectRead {
    /// Where in the file `bytes` begin (a multiple of [`DIRECT_ALIGN_BYTES`]).
    pub(crate) position: u64,
    /// Owns the pool's buffer; slices of it keep it lent.
    pub(crate) bytes: Bytes,
}

/// Reads up to `len` bytes (at most [`DIRECT_BUFFER_BYTES`]) of the file at `path` from
/// `position` rounded down to [`DIRECT_ALIGN_BYTES`], with `O_DIRECT`. The file opened
/// must be `expected` (device and inode): a reader may hold a segment whose file was
/// renamed away since, and whatever now has its name is not its data. `None` (read
/// through the mapping instead) if no buffer is free, the file system refuses
/// `O_DIRECT`, or anything else fails.
pub(crate) fn read(
    pool: &Arc<DirectReads>,
    path: &Path,
    expected: (u64, u64),
    position: u64,
    len: usize,
) -> Option<DirectRead> {
    read_into(pool.take()?, path, expected, position, len)
}

/// [`read`] into `buffer`.
fn read_into(
    mut buffer: DirectBuffer,
    path: &Path,
    expected: (u64, u64),
    position: u64,
    len: usize,
) -> Option<DirectRead> {
    let aligned = position - position % DIRECT_ALIGN_BYTES as u64;
    let wanted = (position - aligned) as usize + len.min(DIRECT_BUFFER_BYTES);
    let read_len = wanted.div_ceil(DIRECT_ALIGN_BYTES) * DIRECT_ALIGN_BYTES;
    let read_len = read_len.min(DIRECT_BUFFER_BYTES);
    let file = open_checked(path, expected, libc::O_DIRECT)?;
    let pool = Arc::clone(&buffer.pool);
    let start = buffer.start;
    let region = &mut buffer.vec[start..start + read_len];
    let read = loop {
        match file.read_at(region, aligned) {
            Ok(read) => break read,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(error) => {
                tracing::debug!(path = %path.display(), %error, "direct read failed; reading through the mapping");
                return None;
            }
        }
    };
    buffer.len = read;
    pool.reads.fetch_add(1, Ordering::Relaxed);
    pool.bytes.fetch_add(read as u64, Ordering::Relaxed);
    metrics::counter!(crate::metrics::DIRECT_READS).increment(1);
    metrics::counter!(crate::metrics::DIRECT_READ_BYTES).increment(read as u64);
    Some(DirectRead {
        position: aligned,
        bytes: Bytes::from_owner(buffer),
    })
}

/// Opens `path` for reading with `flags`, if it is still the file of `expected`
/// (device, inode): retention renames a file before recycling it, so a reader holding
/// the old segment must not read whatever file has its name now.
pub(crate) fn open_checked(path: &Path, expected: (u64, u64), flags: i32) -> Option<File> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)
        .ok()?;
    let metadata = file.metadata().ok()?;
    ((metadata.dev(), metadata.ino()) == expected).then_some(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_lent_up_to_the_bound_and_come_back_when_the_bytes_go() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("file");
        let data: Vec<u8> = (0..3 * DIRECT_ALIGN_BYTES as u32)
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::write(&path, &data).unwrap();
        let metadata = std::fs::metadata(&path).unwrap();
        let id = (metadata.dev(), metadata.ino());
        let pool = DirectReads::new(2 * (DIRECT_BUFFER_BYTES + DIRECT_ALIGN_BYTES) as u64).unwrap();
        let Some(first) = read(&pool, &path, id, 5000, 100) else {
            eprintln!("skipped: this file system refuses O_DIRECT");
            return;
        };
        assert_eq!(first.position, DIRECT_ALIGN_BYTES as u64);
        let slice = first.bytes.slice(5000 - 4096..5100 - 4096);
        assert_eq!(&slice[..], &data[5000..5100]);
        drop(first);
        // Past the end of the file: what there is.
        let second = read(&pool, &path, id, 0, 1 << 20).unwrap();
        assert_eq!(&second.bytes[..], &data[..]);
        assert!(read(&pool, &path, id, 0, 10).is_none(), "both buffers are lent");
        assert_eq!(pool.stats().buffers_exhausted, 1);
        drop(slice);
        assert!(read(&pool, &path, id, 0, 10).is_some(), "the first came back");
        drop(second);
        // Not the file expected: never read.
        assert!(read(&pool, &path, (id.0, id.1 + 1), 0, 10).is_none());
        assert!(DirectReads::new(DIRECT_BUFFER_BYTES as u64).is_none());
    }

    /// Counts its wakes.
    struct Wakes(AtomicUsize);

    impl std::task::Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn queued() -> Arc<ReadAhead> {
        Arc::new(ReadAhead {
            segment_base: Offset(0),
            offset: Offset(0),
            position: 0,
            end: None,
            started: Instant::now(),
            state: Mutex::new(AheadState::Queued),
            done: Condvar::new(),
            wakers: Mutex::new(Vec::new()),
        })
    }

    /// Polls a `ReadAheadDone` of `ahead` once with `wakes`' waker.
    fn poll_with(ahead: &Arc<ReadAhead>, wakes: &Arc<Wakes>) -> Poll<()> {
        let waker = Waker::from(Arc::clone(wakes));
        let mut done = ReadAheadDone(Arc::clone(ahead));
        Pin::new(&mut done).poll(&mut Context::from_waker(&waker))
    }

    /// Polls a `ReadAheadDone` of `ahead` once, as a new task; its wakes are counted in
    /// what it returns.
    fn poll_once(ahead: &Arc<ReadAhead>) -> (Poll<()>, Arc<Wakes>) {
        let wakes = Arc::new(Wakes(AtomicUsize::new(0)));
        (poll_with(ahead, &wakes), wakes)
    }

    #[test]
    fn a_task_awaiting_a_read_ahead_is_woken_however_it_ends() {
        let pool = DirectReads::new((DIRECT_BUFFER_BYTES + DIRECT_ALIGN_BYTES) as u64).unwrap();
        type End = fn(&ReadAhead, &DirectReads);
        let ends: [(&str, End); 4] = [
            ("read", |ahead, _| {
                assert!(ahead.start());
                ahead.finish(None);
            }),
            ("given up", |ahead, _| ahead.give_up()),
            ("taken while queued", |ahead, pool| {
                assert!(ahead.take(pool).is_none())
            }),
            ("skipped by its thread after being taken", |ahead, pool| {
                assert!(ahead.take(pool).is_none());
                assert!(!ahead.start());
            }),
        ];
        for (how, end) in ends {
            let ahead = queued();
            let (polled, wakes) = poll_once(&ahead);
            assert!(polled.is_pending(), "{how}");
            // Polled again by the same task: its waker is kept once.
            assert!(poll_with(&ahead, &wakes).is_pending());
            assert_eq!(ahead.wakers.lock().unwrap().len(), 1, "{how}");
            // Another task waits too.
            let (_, other) = poll_once(&ahead);
            end(&ahead, &pool);
            assert_eq!(wakes.0.load(Ordering::SeqCst), 1, "{how}");
            assert_eq!(other.0.load(Ordering::SeqCst), 1, "{how}");
            assert!(poll_once(&ahead).0.is_ready(), "{how}");
            assert!(ahead.wakers.lock().unwrap().is_empty(), "{how}");
        }
        // Running, then done.
        let ahead = queued();
        assert!(ahead.start());
        let (polled, wakes) = poll_once(&ahead);
        assert!(polled.is_pending());
        ahead.finish(None);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        // Past the bound, the wakers kept are woken early: they poll again if they
        // still wait.
        let ahead = queued();
        let kept: Vec<Arc<Wakes>> = (0..=READ_AHEAD_WAKERS_MAX).map(|_| poll_once(&ahead).1).collect();
        assert_eq!(ahead.wakers.lock().unwrap().len(), 1);
        assert!(
            kept[..READ_AHEAD_WAKERS_MAX]
                .iter()
                .all(|w| w.0.load(Ordering::SeqCst) == 1)
        );
    }
}
