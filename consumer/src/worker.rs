//! The fulfilment worker: runs a handler over a group's records, many at once, while
//! each key's records (an order's events) are handled one after another in offset
//! order within their lane log.
//!
//! ```no_run
//! # async fn demo() -> Result<(), lanes_consumer::ConsumeError> {
//! use lanes_consumer::{ConsumerRecord, Worker, WorkerConfig};
//! let worker = Worker::connect(WorkerConfig::new("127.0.0.1:7070", "fulfilment", &["orders"])).await?;
//! worker
//!     .run(|record: ConsumerRecord| async move {
//!         // Fulfil the order; an Err is retried with backoff, then dead-lettered.
//!         Ok::<(), String>(())
//!     }, 64)
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! - Records wait in per-key queues; a key's next record becomes ready when the one
//!   before it is done. Up to `concurrency` run at once; when a slot frees up, the next
//!   ready record comes from the lanes that have one, by the topic's lane policy: the
//!   most urgent under `strict`, in proportion to the lane weights under `weighted` (so
//!   an express record waits for at most a few bulk ones, and a saturated express lane
//!   still leaves bulk its share).
//! - A few slots are kept for the first lane (lane 0, the most urgent):
//!   `urgent_slots_reserved`, from its first record on. The other lanes' records never
//!   hold them, so while a bulk backlog fills every other slot with slow handlers, an
//!   express record still starts at once instead of waiting for one of them to finish
//!   (as long as fewer express records run than slots are kept).
//! - A failing handler is retried `retries_max` times with doubling backoff; then the
//!   record goes to `<topic>.dlq` (same key, value and headers, plus `lanes.dlq.*`
//!   headers with the error and the original coordinates) and counts as done.
//! - Per lane log the worker commits the offset below which every record is done, every
//!   `commit_interval`, when partitions move away and when it stops. After a crash, only
//!   records at or above that offset are handled again.
//! - Memory is bounded, per lane: a lane with `lane_buffered_records_max` records
//!   waiting or running is paused in the consumer (its fetching stops once its prefetch
//!   budget is full) while the other lanes go on. So a bulk backlog held by the worker
//!   never keeps an express record from being fetched, and when a concurrency slot
//!   frees up the most urgent ready record takes it.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt::Display;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use lanes_producer::{LaneSelector, Producer, ProducerConfig, ProducerRecord};
use lanes_protocol::messages::CreateTopicRequest;
use lanes_protocol::{ErrorCode, LANES_MAX, Lane, Offset};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::link::Link;
use crate::{ConsumeError, Consumer, ConsumerConfig, ConsumerRecord, GroupConfig, LogKey, TopicPartition};

/// Settings of a [`Worker`].
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub consumer: ConsumerConfig,
    /// The worker commits itself: auto-commit is turned off and releases are manual.
    pub group: GroupConfig,
    /// Attempts after the first failure before a record is dead-lettered.
    pub retries_max: u32,
    /// Pause before the first retry; it doubles for each further one.
    pub retry_backoff: Duration,
    pub retry_backoff_max: Duration,
    /// How often completed offsets are committed.
    pub commit_interval: Duration,
    /// Per lane: records received and not yet done; that lane pauses beyond it.
    pub lane_buffered_records_max: usize,
    /// Handler slots that only records of the first lane (lane 0, the most urgent) may
    /// take, out of the `concurrency` given to [`Worker::run`]. `None`: a sixteenth of
    /// it (4 of 64; none below 16). At most `concurrency - 1`. Kept from the first lane's
    /// first record on (a worker whose topics never use lane 0 keeps none): from then
    /// on, while the first lane has nothing to run, the other lanes' throughput is that
    /// much lower where the handlers are the bottleneck.
    pub urgent_slots_reserved: Option<usize>,
}

impl WorkerConfig {
    pub fn new(broker: impl Into<String>, group: impl Into<String>, topics: &[&str]) -> WorkerConfig {
        let mut consumer = ConsumerConfig::new(broker);
        consumer.client_id = "lanes-worker".into();
        WorkerConfig {
            consumer,
            group: GroupConfig::new(group, topics),
            retries_max: 3,
            retry_backoff: Duration::from_millis(100),
            retry_backoff_max: Duration::from_secs(5),
            commit_interval: Duration::from_secs(1),
            lane_buffered_records_max: 4096,
            urgent_slots_reserved: None,
        }
    }

    /// The slots kept for the first lane when [`Worker::run`] is given `concurrency`.
    pub fn urgent_slots(&self, concurrency: usize) -> usize {
        let concurrency = concurrency.max(1);
        self.urgent_slots_reserved
            .unwrap_or(concurrency / 16)
            .min(concurrency - 1)
    }
}

/// What a worker did, returned when it stops.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerStats {
    /// Records whose handler succeeded (possibly after retries).
    pub handled: u64,
    /// Failed attempts that were retried.
    pub retries: u64,
    /// Records sent to a dead-letter topic.
    pub dead_lettered: u64,
}

/// A group member that runs a handler over its records; see the module docs.
#[derive(Debug)]
pub struct Worker {
    consumer: Consumer,
    dead_letters: Arc<DeadLetters>,
    config: WorkerConfig,
}

impl Worker {
    /// Connects; the worker joins its group when it runs.
    pub async fn connect(mut config: WorkerConfig) -> Result<Worker, ConsumeError> {
        config.group.auto_commit_interval = None;
        config.group.manual_release = true;
        let mut consumer = Consumer::connect(config.consumer.clone()).await?;
        consumer.subscribe(config.group.clone())?;
        let mut producer_config = ProducerConfig::new(config.consumer.broker.clone());
        producer_config.client_id = format!("{}-dlq", config.consumer.client_id);
        producer_config.create_topics = None;
        let producer = Producer::connect(producer_config)
            .await
            .map_err(|error| ConsumeError::Connection(error.to_string()))?;
        let dead_letters = Arc::new(DeadLetters {
            producer,
            link: Link::new(
                &config.consumer.broker,
                lanes_protocol::client::ClientConfig {
                    client_id: config.consumer.client_id.clone(),
                    ..Default::default()
                },
            ),
            lanes: Mutex::new(HashMap::new()),
        });
        Ok(Worker {
            consumer,
            dead_letters,
            config,
        })
    }

    /// Runs `handler` over the group's records, at most `concurrency` at once, until
    /// an error stops it.
    pub async fn run<H, F, E>(self, handler: H, concurrency: usize) -> Result<WorkerStats, ConsumeError>
    where
        H: Fn(ConsumerRecord) -> F + Send + Sync + 'static,
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: Display + Send + 'static,
    {
        self.run_until(handler, concurrency, std::future::pending()).await
    }

    /// Like [`Worker::run`], until `shutdown` resolves: then it starts nothing new,
    /// lets running handlers finish (without further retries), commits and leaves the
    /// group.
    pub async fn run_until<H, F, E>(
        mut self,
        handler: H,
        concurrency: usize,
        shutdown: impl Future<Output = ()>,
    ) -> Result<WorkerStats, ConsumeError>
    where
        H: Fn(ConsumerRecord) -> F + Send + Sync + 'static,
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: Display + Send + 'static,
    {
        let concurrency = concurrency.max(1);
        let reserved = self.config.urgent_slots(concurrency);
        let handler = Arc::new(handler);
        let (stop, stopped) = watch::channel(false);
        let mut shutdown = std::pin::pin!(shutdown);
        let mut scheduler = Scheduler::new(self.lane_weights().await, concurrency - reserved);
        let mut tasks: JoinSet<Done> = JoinSet::new();
        let mut stats = WorkerStats::default();
        let mut failure: Option<ConsumeError> = None;
        let mut stopping = false;
        // Partitions being given up. Once started, a release is finished even if the
        // group changes its mind: the records dropped meanwhile are then read again
        // from the committed offset, never skipped.
        let mut releasing: BTreeSet<TopicPartition> = BTreeSet::new();
        let mut next_commit = Instant::now() + self.config.commit_interval;
        loop {
            forget_lost(&mut self.consumer, &mut scheduler, &mut releasing);
            // Partitions moving to other members: drop their queued records, and once
            // none of theirs is running, commit what is done and give them up.
            releasing.extend(self.consumer.revoking());
            scheduler.drop_queued(&releasing);
            let releasable: Vec<TopicPartition> = releasing
                .iter()
                .filter(|p| scheduler.running(p) == 0)
                .cloned()
                .collect();
            if !releasable.is_empty() {
                let offsets = scheduler.done_offsets(&self.consumer, Some(&releasable));
                self.consumer.release(&releasable, &offsets).await;
                scheduler.forget(&releasable);
                for partition in &releasable {
                    releasing.remove(partition);
                }
            }

            while !stopping && tasks.len() < concurrency {
                let Some((record, incarnation)) = scheduler.next_ready() else {
                    break;
                };
                tasks.spawn(attempt(
                    record,
                    incarnation,
                    Arc::clone(&handler),
                    Arc::clone(&self.dead_letters),
                    self.config.clone(),
                    stopped.clone(),
                ));
            }

            if Instant::now() >= next_commit {
                self.commit(&scheduler).await;
                next_commit = Instant::now() + self.config.commit_interval;
            }
            if stopping && tasks.is_empty() {
                break;
            }
            for lane in 0..LANES_MAX {
                let full = scheduler.buffered[lane] >= self.config.lane_buffered_records_max;
                if full {
                    self.consumer.pause_lanes(&[Lane(lane as u8)]);
                } else {
                    self.consumer.resume_lanes(&[Lane(lane as u8)]);
                }
            }
            let fetching = !stopping;
            tokio::select! {
                biased;
                done = tasks.join_next(), if !tasks.is_empty() => {
                    let done = done.expect("tasks is not empty").expect("attempt tasks do not panic");
                    match &done.outcome {
                        Outcome::Handled { retries } => {
                            stats.handled += 1;
                            stats.retries += u64::from(*retries);
                        }
                        Outcome::DeadLettered { retries } => {
                            stats.dead_lettered += 1;
                            stats.retries += u64::from(*retries);
                        }
                        Outcome::Abandoned => {}
                        Outcome::Failed(error) => {
                            tracing::error!(%error, "dead-lettering failed; the worker stops");
                            failure.get_or_insert_with(|| error.clone());
                            stopping = true;
                            let _ = stop.send(true);
                        }
                    }
                    scheduler.complete(done);
                }
                () = &mut shutdown, if !stopping => {
                    stopping = true;
                    let _ = stop.send(true);
                }
                woke = self.consumer.wait(), if fetching => {
                    let polled = match woke {
                        Ok(()) => self.consumer.poll_timeout(Duration::ZERO).await,
                        Err(error) => Err(error),
                    };
                    match polled {
                        Ok(records) => {
                            forget_lost(&mut self.consumer, &mut scheduler, &mut releasing);
                            for record in records {
                                scheduler.add(record, &releasing);
                            }
                        }
                        Err(error) => {
                            tracing::error!(%error, "the consumer failed; the worker stops");
                            failure.get_or_insert(error);
                            stopping = true;
                            let _ = stop.send(true);
                        }
                    }
                }
                () = tokio::time::sleep_until(next_commit) => {}
            }
        }
        self.commit(&scheduler).await;
        let left = self.consumer.close().await;
        if let Err(error) = self.dead_letters.producer.close().await {
            tracing::warn!(%error, "closing the dead-letter producer failed");
        }
        match failure {
            Some(error) => Err(error),
            None => left.map(|()| stats),
        }
    }

    /// The lane weights of the (first) subscribed topic, or `None` if it is strict. A
    /// topic not created yet gets the default weights.
    async fn lane_weights(&mut self) -> Option<[u32; LANES_MAX]> {
        let mut weights = [1u32; LANES_MAX];
        let default = [16, 4, 1];
        weights[..3].copy_from_slice(&default);
        let Some(topic) = self.config.group.topics.first().cloned() else {
            return Some(weights);
        };
        match self.consumer.topic(&topic).await {
            Ok(info) if info.lane_policy == "strict" => None,
            Ok(info) => {
                for (lane, weight) in info.lane_weights.iter().enumerate().take(LANES_MAX) {
                    weights[lane] = (*weight).max(1);
                }
                Some(weights)
            }
            Err(_) => Some(weights),
        }
    }

    async fn commit(&mut self, scheduler: &Scheduler) {
        let offsets = scheduler.done_offsets(&self.consumer, None);
        if let Err(error) = self.consumer.commit_offsets(&offsets).await {
            tracing::warn!(%error, "commit failed; retrying at the next interval");
        }
    }
}

/// Drops what the worker knows of partitions lost with the group membership: their
/// progress can no longer be committed, and they may come back under the new one.
fn forget_lost(consumer: &mut Consumer, scheduler: &mut Scheduler, releasing: &mut BTreeSet<TopicPartition>) {
    let lost = consumer.take_lost();
    if lost.is_empty() {
        return;
    }
    scheduler.drop_queued(&lost.iter().cloned().collect());
    scheduler.forget(&lost);
    for partition in &lost {
        releasing.remove(partition);
    }
}

/// How one record's handling ended.
#[derive(Debug)]
enum Outcome {
    Handled {
        retries: u32,
    },
    DeadLettered {
        retries: u32,
    },
    /// The worker is stopping: not retried, not done.
    Abandoned,
    /// It could not be dead-lettered: not done, and the worker stops.
    Failed(ConsumeError),
}

#[derive(Debug)]
struct Done {
    record: ConsumerRecord,
    incarnation: u64,
    outcome: Outcome,
}

/// Handles one record: attempts with backoff, then the dead-letter topic.
async fn attempt<H, F, E>(
    record: ConsumerRecord,
    incarnation: u64,
    handler: Arc<H>,
    dead_letters: Arc<DeadLetters>,
    config: WorkerConfig,
    mut stopped: watch::Receiver<bool>,
) -> Done
where
    H: Fn(ConsumerRecord) -> F + Send + Sync + 'static,
    F: Future<Output = Result<(), E>> + Send + 'static,
    E: Display + Send + 'static,
{
    let mut retries = 0;
    let mut backoff = config.retry_backoff;
    let done = |record, outcome| Done {
        record,
        incarnation,
        outcome,
    };
    let error = loop {
        // Its own task, so a panicking handler is one failed attempt.
        let error = match tokio::spawn(handler(record.clone())).await {
            Ok(Ok(())) => return done(record, Outcome::Handled { retries }),
            Ok(Err(error)) => error.to_string(),
            Err(error) => format!("the handler panicked: {error}"),
        };
        if retries >= config.retries_max {
            break error;
        }
        tracing::debug!(topic = %record.topic, partition = %record.partition, lane = %record.lane,
            offset = %record.offset, %error, retries, "handler failed; retrying");
        retries += 1;
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = stopped.wait_for(|stopped| *stopped) => return done(record, Outcome::Abandoned),
        }
        backoff = (backoff * 2).min(config.retry_backoff_max);
    };
    match dead_letters.send(&record, &error, retries + 1).await {
        Ok(()) => {
            tracing::warn!(topic = %record.topic, partition = %record.partition, lane = %record.lane,
                offset = %record.offset, %error, attempts = retries + 1, "record dead-lettered");
            done(record, Outcome::DeadLettered { retries })
        }
        Err(error) => done(record, Outcome::Failed(error)),
    }
}

/// The dead-letter topics and the producer that writes them.
#[derive(Debug)]
struct DeadLetters {
    producer: Producer,
    link: Link,
    /// Lanes of each dead-letter topic, once it is known to exist.
    lanes: Mutex<HashMap<String, usize>>,
}

impl DeadLetters {
    async fn send(&self, record: &ConsumerRecord, error: &str, attempts: u32) -> Result<(), ConsumeError> {
        let topic = format!("{}.dlq", record.topic);
        let fail = |message: String| ConsumeError::DeadLetter {
            topic: topic.clone(),
            message,
        };
        let lanes = self.ensure_topic(&record.topic, &topic).await.map_err(&fail)?;
        let lane = Lane(record.lane.0.min(lanes.saturating_sub(1) as u8));
        let mut dead =
            ProducerRecord::new(topic.clone(), record.value.clone()).lane(LaneSelector::Index(lane));
        if let Some(key) = &record.key {
            dead = dead.key(key.clone());
        }
        for header in &record.headers {
            dead = dead.header(header.key.clone(), header.value.clone());
        }
        let text = |value: String| Some(Bytes::from(value));
        dead = dead
            .header("lanes.dlq.error", text(error.to_owned()))
            .header("lanes.dlq.attempts", text(attempts.to_string()))
            .header("lanes.dlq.topic", text(record.topic.to_string()))
            .header("lanes.dlq.partition", text(record.partition.0.to_string()))
            .header("lanes.dlq.lane", text(record.lane.0.to_string()))
            .header("lanes.dlq.offset", text(record.offset.0.to_string()));
        let delivery = self.producer.send(dead).await.map_err(|e| fail(e.to_string()))?;
        delivery.wait().await.map_err(|e| fail(e.to_string()))?;
        Ok(())
    }

    /// Creates the dead-letter topic (one partition, the source topic's lanes) unless it
    /// exists, and returns its lane count.
    async fn ensure_topic(&self, source: &str, topic: &str) -> Result<usize, String> {
        if let Some(lanes) = self.lanes.lock().expect("lanes lock poisoned").get(topic) {
            return Ok(*lanes);
        }
        let metadata = |name: &str| lanes_protocol::messages::MetadataRequest {
            topics: vec![name.to_owned()],
        };
        let source_lanes = match self.link.request(&metadata(source)).await {
            Ok(response) => response
                .topics
                .into_iter()
                .next()
                .map(|t| t.lanes)
                .unwrap_or_default(),
            Err(error) => return Err(error.to_string()),
        };
        let create = CreateTopicRequest {
            name: topic.to_owned(),
            partitions: 1,
            lanes: source_lanes,
            configs: Vec::new(),
        };
        match self.link.request(&create).await {
            Ok(_) => {}
            Err(error) if error.code() == Some(ErrorCode::TopicAlreadyExists) => {}
            Err(error) => return Err(error.to_string()),
        }
        let response = self
            .link
            .request(&metadata(topic))
            .await
            .map_err(|e| e.to_string())?;
        let lanes = response
            .topics
            .into_iter()
            .next()
            .filter(|t| t.error_code == ErrorCode::None)
            .map(|t| t.lanes.len())
            .ok_or_else(|| "the dead-letter topic does not exist".to_owned())?;
        self.lanes
            .lock()
            .expect("lanes lock poisoned")
            .insert(topic.to_owned(), lanes);
        Ok(lanes)
    }
}

/// Progress of one lane log.
#[derive(Debug)]
struct LogProgress {
    /// Distinguishes this from an earlier holding of the same partition, whose late
    /// completions must not count.
    incarnation: u64,
    /// Received and not yet done.
    outstanding: BTreeSet<Offset>,
    /// After the last record received.
    next: Offset,
}

impl LogProgress {
    /// Every record below this is done.
    fn done_below(&self) -> Offset {
        self.outstanding.first().copied().unwrap_or(self.next)
    }
}

/// One key of one lane log: one record ready or running, the others waiting.
#[derive(Debug, Default)]
struct KeyQueue {
    /// The key's ready record has started.
    running: bool,
    waiting: VecDeque<ConsumerRecord>,
}

/// Which record starts next: per-key queues and per-lane ready queues.
#[derive(Debug, Default)]
struct Scheduler {
    /// Records that may start, per lane (lane 0 most urgent).
    ready: [VecDeque<(ConsumerRecord, u64)>; LANES_MAX],
    /// Keys with a record ready or running, and that key's records waiting behind it.
    keys: HashMap<(LogKey, Bytes), KeyQueue>,
    logs: HashMap<LogKey, LogProgress>,
    running: HashMap<TopicPartition, usize>,
    /// Per lane: records received and not done (waiting, ready or running).
    buffered: [usize; LANES_MAX],
    /// Per lane: records whose handler runs.
    running_lanes: [usize; LANES_MAX],
    /// Slots the lanes after the first may hold at once: the rest are kept for it.
    later_lanes_slots_max: usize,
    /// The first lane has had a record: only then are slots kept for it, so a worker
    /// whose topic never uses it (unlabelled records go to `standard`) loses nothing.
    first_lane_used: bool,
    incarnations: u64,
    /// Lane weights (most urgent first; at least 1) for weighted dispatch; `None`: strict.
    weights: Option<[u32; LANES_MAX]>,
    /// Smooth weighted round robin: each lane's current credit.
    current: [i64; LANES_MAX],
}

fn partition_of(record: &ConsumerRecord) -> TopicPartition {
    TopicPartition {
        topic: Arc::clone(&record.topic),
        partition: record.partition,
    }
}

fn log_of(record: &ConsumerRecord) -> LogKey {
    LogKey {
        topic: Arc::clone(&record.topic),
        partition: record.partition,
        lane: record.lane,
    }
}

impl Scheduler {
    fn new(weights: Option<[u32; LANES_MAX]>, later_lanes_slots_max: usize) -> Scheduler {
        Scheduler {
            weights,
            later_lanes_slots_max,
            ..Scheduler::default()
        }
    }

    fn add(&mut self, record: ConsumerRecord, releasing: &BTreeSet<TopicPartition>) {
        self.first_lane_used |= record.lane == Lane(0);
        if releasing.contains(&partition_of(&record)) {
            return;
        }
        let log = log_of(&record);
        let progress = self.logs.entry(log.clone()).or_insert_with(|| {
            self.incarnations += 1;
            LogProgress {
                incarnation: self.incarnations,
                outstanding: BTreeSet::new(),
                next: record.offset,
            }
        });
        if record.offset < progress.next {
            return; // already received (a re-fetch after a seek)
        }
        progress.outstanding.insert(record.offset);
        progress.next = record.offset.plus(1);
        let incarnation = progress.incarnation;
        self.buffered[record.lane.0 as usize] += 1;
        match &record.key {
            Some(key) => match self.keys.get_mut(&(log.clone(), key.clone())) {
                Some(queue) => queue.waiting.push_back(record),
                None => {
                    self.keys.insert((log, key.clone()), KeyQueue::default());
                    self.ready[record.lane.0 as usize].push_back((record, incarnation));
                }
            },
            None => self.ready[record.lane.0 as usize].push_back((record, incarnation)),
        }
    }

    /// The next record to start: from the most urgent lane with ready records under
    /// `strict`; under `weighted`, from the lanes with ready records in proportion to
    /// their weights (smooth weighted round robin), so a saturated express lane leaves
    /// bulk its share, as the broker's fetches do. Lanes after the first only while they
    /// hold fewer than `later_lanes_slots_max` slots, once the first lane has had records.
    fn next_ready(&mut self) -> Option<(ConsumerRecord, u64)> {
        let later_lanes_full = self.first_lane_used
            && self.running_lanes[1..].iter().sum::<usize>() >= self.later_lanes_slots_max;
        let startable = |l: usize| !self.ready[l].is_empty() && (l == 0 || !later_lanes_full);
        let lane = match &self.weights {
            None => (0..LANES_MAX).find(|&l| startable(l))?,
            Some(weights) => {
                let ready: Vec<usize> = (0..LANES_MAX).filter(|&l| startable(l)).collect();
                let total: i64 = ready.iter().map(|&l| i64::from(weights[l])).sum();
                for &l in &ready {
                    self.current[l] += i64::from(weights[l]);
                }
                let pick = *ready
                    .iter()
                    .max_by_key(|&&l| (self.current[l], std::cmp::Reverse(l)))?;
                self.current[pick] -= total;
                pick
            }
        };
        let (record, incarnation) = self.ready[lane].pop_front()?;
        self.running_lanes[lane] += 1;
        *self.running.entry(partition_of(&record)).or_default() += 1;
        if let Some(key) = &record.key
            && let Some(queue) = self.keys.get_mut(&(log_of(&record), key.clone()))
        {
            queue.running = true;
        }
        Some((record, incarnation))
    }

    fn complete(&mut self, done: Done) {
        let record = done.record;
        let partition = partition_of(&record);
        if let Some(running) = self.running.get_mut(&partition) {
            *running -= 1;
            if *running == 0 {
                self.running.remove(&partition);
            }
        }
        self.buffered[record.lane.0 as usize] -= 1;
        self.running_lanes[record.lane.0 as usize] -= 1;
        let log = log_of(&record);
        if let Some(progress) = self.logs.get_mut(&log)
            && progress.incarnation == done.incarnation
            && !matches!(done.outcome, Outcome::Abandoned | Outcome::Failed(_))
        {
            progress.outstanding.remove(&record.offset);
        }
        if let Some(key) = &record.key {
            let entry = (log, key.clone());
            let next = self.keys.get_mut(&entry).and_then(|queue| {
                queue.running = false;
                queue.waiting.pop_front()
            });
            match next {
                Some(next) => {
                    let incarnation = self.logs.get(&entry.0).map_or(0, |p| p.incarnation);
                    self.ready[next.lane.0 as usize].push_back((next, incarnation));
                }
                None => {
                    self.keys.remove(&entry);
                }
            }
        }
    }

    fn running(&self, partition: &TopicPartition) -> usize {
        self.running.get(partition).copied().unwrap_or(0)
    }

    /// Drops the records of these partitions that have not started. They stay
    /// outstanding, so nothing at or after them is committed.
    fn drop_queued(&mut self, partitions: &BTreeSet<TopicPartition>) {
        if partitions.is_empty() {
            return;
        }
        let mut dropped = [0usize; LANES_MAX];
        for queue in &mut self.ready {
            queue.retain(|(record, _)| {
                let keep = !partitions.contains(&partition_of(record));
                if !keep {
                    dropped[record.lane.0 as usize] += 1;
                }
                keep
            });
        }
        self.keys.retain(|(log, _), queue| {
            let partition = TopicPartition {
                topic: Arc::clone(&log.topic),
                partition: log.partition,
            };
            if !partitions.contains(&partition) {
                return true;
            }
            dropped[log.lane.0 as usize] += queue.waiting.len();
            queue.waiting.clear();
            // Kept only while its record runs; the completion removes it.
            queue.running
        });
        for (buffered, dropped) in self.buffered.iter_mut().zip(dropped) {
            *buffered -= dropped;
        }
    }

    /// Forgets partitions that are no longer held (nothing of theirs is queued).
    fn forget(&mut self, partitions: &[TopicPartition]) {
        self.logs.retain(|log, _| {
            !partitions
                .iter()
                .any(|p| p.topic == log.topic && p.partition == log.partition)
        });
    }

    /// Per lane log, the offset below which everything is done, where it moved since
    /// the last commit.
    fn done_offsets(&self, consumer: &Consumer, only: Option<&[TopicPartition]>) -> Vec<(LogKey, Offset)> {
        self.logs
            .iter()
            .filter(|(log, _)| {
                only.is_none_or(|only| {
                    only.iter()
                        .any(|p| p.topic == log.topic && p.partition == log.partition)
                })
            })
            .map(|(log, progress)| (log.clone(), progress.done_below()))
            .filter(|(log, offset)| consumer.committed.get(log) != Some(offset))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use lanes_protocol::PartitionId;

    use super::*;

    fn record(lane: u8, offset: u64) -> ConsumerRecord {
        ConsumerRecord {
            topic: Arc::from("orders"),
            partition: PartitionId(0),
            lane: Lane(lane),
            offset: Offset(offset),
            timestamp_ms: 0,
            key: Some(Bytes::from(format!("order-{lane}-{offset}"))),
            value: Bytes::new(),
            headers: Vec::new(),
        }
    }

    fn handled((record, incarnation): (ConsumerRecord, u64)) -> Done {
        Done {
            record,
            incarnation,
            outcome: Outcome::Handled { retries: 0 },
        }
    }

    #[test]
    fn later_lanes_never_take_the_slots_kept_for_the_first() {
        let mut weighted = [1u32; LANES_MAX];
        weighted[..3].copy_from_slice(&[16, 4, 1]);
        for weights in [None, Some(weighted)] {
            let mut scheduler = Scheduler::new(weights, 3);
            let none = BTreeSet::new();
            for offset in 0..10 {
                scheduler.add(record(2, offset), &none);
                scheduler.add(record(1, offset), &none);
            }
            scheduler.add(record(0, 0), &none);
            // The later lanes take 3 slots between them, then none while those run; the
            // express record running beside them does not count against them.
            let mut started: Vec<_> = std::iter::from_fn(|| scheduler.next_ready()).collect();
            assert_eq!(started.len(), 4, "{weights:?}");
            let express = started.iter().position(|(record, _)| record.lane == Lane(0));
            scheduler.complete(handled(
                started.remove(express.expect("the express record started")),
            ));
            // The first lane still starts, as many as arrive.
            for offset in 1..3 {
                scheduler.add(record(0, offset), &none);
                let (express, _) = scheduler.next_ready().expect("an express record starts");
                assert_eq!(express.lane, Lane(0));
            }
            assert!(scheduler.next_ready().is_none());
            // One of them done frees its slot for the next.
            scheduler.complete(handled(started.remove(0)));
            let next = scheduler.next_ready().expect("a later lane's record starts");
            assert_ne!(next.0.lane, Lane(0));
            assert!(scheduler.next_ready().is_none());
            // An express record done frees nothing for them.
            scheduler.add(record(0, 3), &none);
            let express = scheduler.next_ready().expect("an express record starts");
            scheduler.complete(handled(express));
            assert!(scheduler.next_ready().is_none());
            assert_eq!(scheduler.running_lanes[0], 2);
        }
    }

    #[test]
    fn no_slot_is_kept_for_a_first_lane_that_has_had_no_record() {
        let mut scheduler = Scheduler::new(None, 3);
        let none = BTreeSet::new();
        for offset in 0..10 {
            scheduler.add(record(1, offset), &none);
        }
        assert_eq!(std::iter::from_fn(|| scheduler.next_ready()).count(), 10);
    }

    #[test]
    fn a_slot_is_freed_however_its_record_ends() {
        let mut scheduler = Scheduler::new(None, 1);
        let none = BTreeSet::new();
        scheduler.first_lane_used = true;
        let partition = TopicPartition {
            topic: Arc::from("orders"),
            partition: PartitionId(0),
        };
        for offset in 0..4 {
            scheduler.add(record(2, offset), &none);
        }
        // The worker stops: the running record is abandoned, and the slot is free.
        let first = scheduler.next_ready().expect("a bulk record starts");
        assert!(scheduler.next_ready().is_none());
        scheduler.complete(Done {
            record: first.0,
            incarnation: first.1,
            outcome: Outcome::Abandoned,
        });
        assert_eq!(scheduler.running_lanes, [0; LANES_MAX]);
        // The partition moves away while a record runs: the queued ones go, the running
        // one still ends, and frees its slot for what comes after.
        let second = scheduler.next_ready().expect("a bulk record starts");
        scheduler.drop_queued(&BTreeSet::from([partition.clone()]));
        scheduler.forget(std::slice::from_ref(&partition));
        scheduler.complete(Done {
            record: second.0,
            incarnation: second.1,
            outcome: Outcome::Failed(ConsumeError::Connection("gone".into())),
        });
        assert_eq!(scheduler.running_lanes, [0; LANES_MAX]);
        assert!(
            scheduler.next_ready().is_none(),
            "the dropped records do not start"
        );
        scheduler.add(record(2, 10), &none);
        assert!(scheduler.next_ready().is_some(), "the slot is free again");
    }
}
