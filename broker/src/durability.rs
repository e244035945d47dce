//! The syncer: the threads that fsync lane logs and publish how far they are durable.
//!
//! Appends never fsync on the thread that handles the request. With `fsync = always`, an
//! append queues its lane log (once: a queued log is not queued again); a sync thread
//! takes it, runs [`LaneLog::flush`](crate::storage::LaneLog::flush) and tells waiters.
//! Appends that arrive while that fsync runs queue the log again and are covered by the
//! next round: group commit across every producer of the lane log. With
//! `fsync = interval`, a ticker queues the logs whose oldest unsynced append is due. Any
//! log with too many rolled segments unsynced is queued by its appends, whatever the
//! policy: that bounds its open files. Fsyncs of different lane logs run in parallel on
//! `fsync_threads` threads. The same threads start the writeback of logs that do not
//! fsync each append, every `writeback_bytes`, allocate their blocks ahead of the appends
//! and make their next segment's file ahead (see
//! [`LaneLog::start_writeback`](crate::storage::LaneLog::start_writeback)).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::topic::LogHandle;

#[derive(Debug)]
enum Job {
    Fsync(Arc<LogHandle>),
    Writeback(Arc<LogHandle>),
}

#[derive(Debug, Default)]
struct Queue {
    jobs: VecDeque<Job>,
    stopping: bool,
}

#[derive(Debug)]
struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
    /// The lane logs with `fsync = interval`, for the ticker.
    logs: Mutex<Vec<Weak<LogHandle>>>,
    /// Signalled when a lane log joins `logs`, and on stop: the ticker sleeps on it
    /// while `logs` is empty, so a broker without `interval` logs has no clock waking
    /// it hundreds of times a second.
    logs_changed: Condvar,
    /// Ticks the ticker has made.
    ticks: AtomicU64,
}

#[derive(Debug)]
pub struct Syncer {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    stopped: AtomicBool,
}

impl Syncer {
    /// Starts `threads` sync threads, and a ticker that queues the registered lane logs
    /// (those with `fsync = interval`) whose fsync is due: twice per `interval`, so no
    /// append waits much more than it, and at least every 5 ms for topics whose own
    /// interval is shorter. Each lane log has its own policy (topics may override the
    /// broker's), so the ticker always exists; while there are no interval logs it
    /// sleeps until one is registered.
    pub fn start(threads: u32, interval: Duration) -> Arc<Syncer> {
        let tick = (interval / 2).clamp(Duration::from_millis(1), Duration::from_millis(5));
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
            logs: Mutex::new(Vec::new()),
            logs_changed: Condvar::new(),
            ticks: AtomicU64::new(0),
        });
        let mut handles: Vec<JoinHandle<()>> = (0..threads.max(1))
            .map(|i| {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("lanes-fsync-{i}"))
                    .spawn(move || sync_loop(&shared))
                    .expect("spawn a sync thread")
            })
            .collect();
        {
            let shared = Arc::clone(&shared);
            handles.push(
                std::thread::Builder::new()
                    .name("lanes-fsync-ticker".into())
                    .spawn(move || tick_loop(&shared, tick))
                    .expect("spawn the fsync ticker"),
            );
        }
        Arc::new(Syncer {
            shared,
            threads: Mutex::new(handles),
            stopped: AtomicBool::new(false),
        })
    }

    pub(crate) fn register(&self, handle: &Arc<LogHandle>) {
        let mut logs = self.shared.logs.lock().expect("logs lock poisoned");
        if logs.len() == logs.capacity() {
            logs.retain(|weak| weak.strong_count() > 0);
        }
        logs.push(Arc::downgrade(handle));
        self.shared.logs_changed.notify_all();
    }

    /// Ticks the ticker has made so far.
    #[cfg(test)]
    pub(crate) fn ticks(&self) -> u64 {
        self.shared.ticks.load(Ordering::Relaxed)
    }

    /// Queues `handle` for an fsync unless it is queued already.
    pub fn request(&self, handle: &Arc<LogHandle>) {
        self.shared.enqueue(handle);
    }

    /// Queues `handle` to start its writeback unless it is queued already.
    pub fn request_writeback(&self, handle: &Arc<LogHandle>) {
        if !handle.writeback_queued.swap(true, Ordering::AcqRel) {
            self.shared
                .push(Job::Writeback(Arc::clone(handle)), &handle.writeback_queued);
        }
    }

    /// Lets the queued fsyncs finish, then stops the threads.
    pub fn stop(&self) {
        if self.stopped.swap(true, Ordering::AcqRel) {
            return;
        }
        self.shared
            .queue
            .lock()
            .expect("sync queue lock poisoned")
            .stopping = true;
        self.shared.ready.notify_all();
        // Under the lock the ticker checks `stopping` under, so it cannot miss this.
        {
            let _logs = self.shared.logs.lock().expect("logs lock poisoned");
            self.shared.logs_changed.notify_all();
        }
        for thread in self.threads.lock().expect("threads lock poisoned").drain(..) {
            let _ = thread.join();
        }
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Shared {
    fn enqueue(&self, handle: &Arc<LogHandle>) {
        if !handle.sync_queued.swap(true, Ordering::AcqRel) {
            self.push(Job::Fsync(Arc::clone(handle)), &handle.sync_queued);
        }
    }

    /// Queues `job`, whose `queued` flag the caller has just set.
    fn push(&self, job: Job, queued: &AtomicBool) {
        let mut queue = self.queue.lock().expect("sync queue lock poisoned");
        if queue.stopping {
            queued.store(false, Ordering::Release);
            return;
        }
        queue.jobs.push_back(job);
        drop(queue);
        self.ready.notify_one();
    }
}

fn sync_loop(shared: &Shared) {
    loop {
        let job = {
            let mut queue = shared.queue.lock().expect("sync queue lock poisoned");
            loop {
                if let Some(job) = queue.jobs.pop_front() {
                    break job;
                }
                if queue.stopping {
                    return;
                }
                queue = shared.ready.wait(queue).expect("sync queue lock poisoned");
            }
        };
        match job {
            Job::Fsync(handle) => {
                // Cleared before the fsync: an append that arrives during it queues the
                // log again.
                handle.sync_queued.store(false, Ordering::Release);
                let result = handle.log.flush();
                handle.synced(result);
                // After the acknowledgements it let go.
                handle.log.drop_cached_behind();
            }
            Job::Writeback(handle) => {
                handle.writeback_queued.store(false, Ordering::Release);
                // Only a hint to the kernel: if it fails, writeback is left to the kernel
                // as without it, and the append or fsync that meets the same disk error
                // reports it.
                if let Err(error) = handle.log.start_writeback() {
                    tracing::debug!(dir = %handle.log.dir().display(), %error, "could not start writeback");
                }
                handle.log.drop_cached_behind();
            }
        }
    }
}

fn tick_loop(shared: &Arc<Shared>, tick: Duration) {
    let stopping = || shared.queue.lock().expect("sync queue lock poisoned").stopping;
    loop {
        {
            let mut logs = shared.logs.lock().expect("logs lock poisoned");
            loop {
                if stopping() {
                    return;
                }
                logs.retain(|weak| weak.strong_count() > 0);
                if !logs.is_empty() {
                    break;
                }
                logs = shared.logs_changed.wait(logs).expect("logs lock poisoned");
            }
        }
        std::thread::sleep(tick);
        if stopping() {
            return;
        }
        shared.ticks.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let due: Vec<Arc<LogHandle>> = shared
            .logs
            .lock()
            .expect("logs lock poisoned")
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|handle| handle.log.fsync_due(now))
            .collect();
        for handle in &due {
            shared.enqueue(handle);
        }
    }
}
