//! The Lanes consumer: reads records from lane logs of a broker, either lane logs it is
//! given ([`Consumer::assign`]) or, as a member of a consumer group
//! ([`Consumer::subscribe`]), the partitions the group gives it. The [`Worker`] runs a
//! handler over a group's records with bounded concurrency, keeping each key's order.
//!
//! ```no_run
//! # async fn demo() -> Result<(), lanes_consumer::ConsumeError> {
//! use lanes_consumer::{Consumer, ConsumerConfig, StartFrom};
//! let mut consumer = Consumer::connect(ConsumerConfig::new("127.0.0.1:7070")).await?;
//! consumer.assign("orders", None, None, StartFrom::Earliest).await?;
//! loop {
//!     for record in consumer.poll().await? {
//!         println!("{} {}:{} @{} {:?}", record.topic, record.partition, record.lane, record.offset, record.value);
//!     }
//! }
//! # }
//! ```
//!
//! In a group (at-least-once):
//!
//! ```no_run
//! # async fn demo() -> Result<(), lanes_consumer::ConsumeError> {
//! use lanes_consumer::{Consumer, ConsumerConfig, GroupConfig};
//! let mut consumer = Consumer::connect(ConsumerConfig::new("127.0.0.1:7070")).await?;
//! consumer.subscribe(GroupConfig::new("fulfilment", &["orders"]))?;
//! loop {
//!     for record in consumer.poll().await? {
//!         // Handle it. The next poll commits it (auto-commit), or call `commit`.
//!     }
//! }
//! # }
//! ```
//!
//! A background fetcher long-polls every assigned lane log in one Fetch request and
//! keeps at most `lane_prefetch_bytes_max` bytes of fetched batches per lane; every
//! batch's checksum is checked before its records are handed out. `poll` hands out at
//! most `poll_records_max` records, most urgent lane first, so priority holds on the
//! client too. Records come as slices of the fetched
//! bytes: no copy. Offsets are tracked per lane log; [`Consumer::seek`] moves them. A
//! lost connection is made again and fetching goes on from the same offsets; a group
//! member that the broker dropped meanwhile (a restart, a session timeout) joins again
//! and restarts from the group's committed offsets.

mod budget;
mod fetcher;
mod group;
mod link;
mod worker;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use lanes_protocol::client::{ClientConfig, ClientError};
use lanes_protocol::messages::{
    CommitLane, LeaveGroupRequest, ListOffsetsLane, ListOffsetsRequest, MetadataRequest, OffsetCommitRequest,
    OffsetFetchRequest, OffsetSpec, PartitionItems, TopicItems,
};
use lanes_protocol::{ErrorCode, Header, LANES_MAX, Lane, Offset, PartitionId};
use tokio::sync::mpsc;

use budget::LaneBudgets;
use fetcher::{Fetched, FetcherCommand};
pub use group::{GroupConfig, TopicPartition};
use group::{GroupHandle, to_assignment};
use link::Link;
pub use worker::{Worker, WorkerConfig, WorkerStats};

/// Settings of a consumer.
#[derive(Clone, Debug)]
pub struct ConsumerConfig {
    /// `host:port` of the broker.
    pub broker: String,
    pub client_id: String,
    /// How long one fetch waits for data (long poll).
    pub fetch_wait: Duration,
    /// Bytes a fetch waits for before answering.
    pub fetch_bytes_min: u32,
    /// Bytes one fetch response may carry (soft: at least one batch).
    pub fetch_bytes_max: u32,
    /// Bytes one lane log may contribute to one fetch (soft: at least one batch).
    pub lane_bytes_max: u32,
    /// Per lane: fetched bytes held before the application takes them. A lane whose
    /// budget is full is not fetched, while the others go on, so a backlog of bulk
    /// records on the client never holds express ones back.
    pub lane_prefetch_bytes_max: usize,
    /// Most records one poll hands out, most urgent lane first: how long an express
    /// record can wait behind records already handed to the application.
    pub poll_records_max: usize,
    /// Where to go when a lane log no longer holds the consumer's offset.
    pub reset: ResetPolicy,
}

impl ConsumerConfig {
    pub fn new(broker: impl Into<String>) -> ConsumerConfig {
        ConsumerConfig {
            broker: broker.into(),
            client_id: "lanes-consumer".into(),
            fetch_wait: Duration::from_millis(500),
            fetch_bytes_min: 1,
            fetch_bytes_max: 8 << 20,
            lane_bytes_max: 1 << 20,
            lane_prefetch_bytes_max: 16 << 20,
            poll_records_max: 1000,
            reset: ResetPolicy::Earliest,
        }
    }
}

/// What to do when the offset to fetch is out of the lane log's range (deleted by
/// retention, or past the end).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetPolicy {
    Earliest,
    Latest,
    /// Report [`ConsumeError::OffsetOutOfRange`].
    Fail,
}

/// Where to start reading a lane log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartFrom {
    Earliest,
    Latest,
    Offset(Offset),
    /// The first record at or after this time (ms since the Unix epoch).
    Timestamp(i64),
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum ConsumeError {
    #[error("{0}")]
    Connection(String),
    #[error("topic {0} does not exist")]
    UnknownTopic(String),
    #[error("topic {topic} has no {what}")]
    Unknown { topic: String, what: String },
    #[error("{topic} partition {partition} lane {lane}: offset {offset} is out of range")]
    OffsetOutOfRange {
        topic: String,
        partition: PartitionId,
        lane: Lane,
        offset: Offset,
    },
    #[error("{topic} partition {partition} lane {lane}: {code}: {message}")]
    Fetch {
        topic: String,
        partition: PartitionId,
        lane: Lane,
        code: ErrorCode,
        message: String,
    },
    #[error("a fetched batch failed its checks: {0}")]
    InvalidBatch(String),
    #[error("group {group}: {code}: {message}")]
    Group {
        group: String,
        code: ErrorCode,
        message: String,
    },
    #[error("committing {topic} partition {partition} lane {lane}: {code}: {message}")]
    Commit {
        topic: String,
        partition: PartitionId,
        lane: Lane,
        code: ErrorCode,
        message: String,
    },
    #[error("{0}")]
    Usage(&'static str),
    #[error("dead-letter topic {topic}: {message}")]
    DeadLetter { topic: String, message: String },
    #[error("the consumer is closed")]
    Closed,
}

impl From<ClientError> for ConsumeError {
    fn from(error: ClientError) -> ConsumeError {
        ConsumeError::Connection(error.to_string())
    }
}

/// A lane log, as the consumer addresses it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LogKey {
    pub topic: Arc<str>,
    pub partition: PartitionId,
    pub lane: Lane,
}

/// One record, with where it came from. Key, value and headers share the memory of the
/// fetched batch.
#[derive(Clone, Debug)]
pub struct ConsumerRecord {
    pub topic: Arc<str>,
    pub partition: PartitionId,
    pub lane: Lane,
    pub offset: Offset,
    pub timestamp_ms: i64,
    pub key: Option<Bytes>,
    pub value: Bytes,
    pub headers: Vec<Header>,
}

/// A topic's shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicInfo {
    pub partitions: u32,
    pub lanes: Vec<String>,
    /// How the broker shares fetches between the lanes: `weighted` or `strict`.
    pub lane_policy: String,
    /// Per lane, most urgent first.
    pub lane_weights: Vec<u32>,
}

/// How `poll` shares its records between lanes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HandOut {
    /// No topic read yet.
    Unknown,
    Strict,
    Weighted([u32; LANES_MAX]),
}

/// A consumer of explicitly assigned lane logs, or of what its group gives it.
#[derive(Debug)]
pub struct Consumer {
    /// Set by [`Consumer::subscribe`].
    group: Option<GroupHandle>,
    /// What the group has committed for each lane log, as far as this member knows.
    committed: HashMap<LogKey, Offset>,
    /// Group partitions this consumer reads (has positions for).
    taken: BTreeSet<TopicPartition>,
    /// Partitions dropped because the membership was lost, not yet reported to the
    /// [`Worker`].
    lost: Vec<TopicPartition>,
    client: Arc<Link>,
    config: ConsumerConfig,
    topics: HashMap<String, TopicInfo>,
    /// The offset of the next record to hand out, per assigned lane log.
    positions: HashMap<LogKey, Offset>,
    /// Bumped by every change of positions other than consumption; fetched data from
    /// an older epoch is dropped.
    epoch: u64,
    /// Per lane: records fetched and not yet handed out, each with the budget bytes it
    /// gives back when it is (a batch's bytes ride on its last record).
    ready: [VecDeque<(ConsumerRecord, usize)>; LANES_MAX],
    /// Lanes whose records `poll` keeps back.
    paused: [bool; LANES_MAX],
    /// How `poll` shares its records between lanes: the lane policy of the first topic
    /// read.
    hand_out_policy: HandOut,
    /// Smooth weighted round robin: each lane's current credit.
    lane_credit: [i64; LANES_MAX],
    commands: mpsc::UnboundedSender<FetcherCommand>,
    fetched: mpsc::Receiver<Fetched>,
    budgets: Arc<LaneBudgets>,
    fetcher: tokio::task::JoinHandle<()>,
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.fetcher.abort();
    }
}

impl Consumer {
    pub async fn connect(config: ConsumerConfig) -> Result<Consumer, ConsumeError> {
        let client_config = ClientConfig {
            client_id: config.client_id.clone(),
            request_timeout: config.fetch_wait + Duration::from_secs(30),
            ..ClientConfig::default()
        };
        let client = Arc::new(Link::connect(&config.broker, client_config).await?);
        let budgets = Arc::new(LaneBudgets::new(config.lane_prefetch_bytes_max.max(1)));
        let (commands, command_receiver) = mpsc::unbounded_channel();
        let (fetched_sender, fetched) = mpsc::channel(1024);
        let fetcher = tokio::spawn(fetcher::run(
            Arc::clone(&client),
            config.clone(),
            Arc::clone(&budgets),
            command_receiver,
            fetched_sender,
        ));
        Ok(Consumer {
            group: None,
            committed: HashMap::new(),
            taken: BTreeSet::new(),
            lost: Vec::new(),
            client,
            config,
            topics: HashMap::new(),
            positions: HashMap::new(),
            epoch: 0,
            ready: Default::default(),
            paused: [false; LANES_MAX],
            hand_out_policy: HandOut::Unknown,
            lane_credit: [0; LANES_MAX],
            commands,
            fetched,
            budgets,
            fetcher,
        })
    }

    /// The topic's partitions and lanes (cached).
    pub async fn topic(&mut self, name: &str) -> Result<TopicInfo, ConsumeError> {
        if let Some(info) = self.topics.get(name) {
            return Ok(info.clone());
        }
        let response = self
            .client
            .request(&MetadataRequest {
                topics: vec![name.to_owned()],
            })
            .await?;
        let topic = response
            .topics
            .into_iter()
            .next()
            .filter(|t| t.error_code == ErrorCode::None)
            .ok_or_else(|| ConsumeError::UnknownTopic(name.to_owned()))?;
        let config = |key: &str| {
            topic
                .configs
                .iter()
                .find(|c| c.key == key)
                .map(|c| c.value.clone())
        };
        let lane_weights: Vec<u32> = config("lane_weights")
            .map(|w| w.split(',').filter_map(|w| w.trim().parse().ok()).collect())
            .filter(|w: &Vec<u32>| w.len() == topic.lanes.len())
            .unwrap_or_else(|| vec![1; topic.lanes.len()]);
        let info = TopicInfo {
            partitions: topic.partitions.len() as u32,
            lane_policy: config("lane_policy").unwrap_or_else(|| "weighted".into()),
            lane_weights,
            lanes: topic.lanes,
        };
        self.topics.insert(name.to_owned(), info.clone());
        Ok(info)
    }

    /// Adds lane logs of `topic` (all partitions and lanes by default) and where to
    /// start reading them.
    pub async fn assign(
        &mut self,
        topic: &str,
        partitions: Option<&[PartitionId]>,
        lanes: Option<&[Lane]>,
        from: StartFrom,
    ) -> Result<(), ConsumeError> {
        if self.group.is_some() {
            return Err(ConsumeError::Usage("a group member reads what its group assigns"));
        }
        let info = self.topic(topic).await?;
        self.learn_lane_policy(&info);
        let unknown = |what: String| ConsumeError::Unknown {
            topic: topic.to_owned(),
            what,
        };
        let partitions: Vec<PartitionId> = match partitions {
            Some(list) => list.to_vec(),
            None => (0..info.partitions).map(PartitionId).collect(),
        };
        let lanes: Vec<Lane> = match lanes {
            Some(list) => list.to_vec(),
            None => (0..info.lanes.len() as u8).map(Lane).collect(),
        };
        if let Some(p) = partitions.iter().find(|p| p.0 >= info.partitions) {
            return Err(unknown(format!("partition {p}")));
        }
        if let Some(l) = lanes.iter().find(|l| l.0 as usize >= info.lanes.len()) {
            return Err(unknown(format!("lane {l}")));
        }
        let topic: Arc<str> = Arc::from(topic);
        let keys: Vec<LogKey> = partitions
            .iter()
            .flat_map(|&partition| {
                let topic = Arc::clone(&topic);
                lanes.iter().map(move |&lane| LogKey {
                    topic: Arc::clone(&topic),
                    partition,
                    lane,
                })
            })
            .collect();
        let offsets = self.resolve(&keys, from).await?;
        for (key, offset) in keys.into_iter().zip(offsets) {
            self.positions.insert(key, offset);
        }
        self.restart_fetching();
        Ok(())
    }

    /// Stops reading the given lane logs.
    pub fn unassign(&mut self, keys: &[LogKey]) {
        for key in keys {
            self.positions.remove(key);
        }
        self.drop_ready(|r| {
            keys.iter()
                .any(|k| *k.topic == *r.topic && k.partition == r.partition && k.lane == r.lane)
        });
        self.restart_fetching();
    }

    /// Moves one assigned lane log.
    pub async fn seek(&mut self, key: &LogKey, from: StartFrom) -> Result<(), ConsumeError> {
        let offset = self.resolve(std::slice::from_ref(key), from).await?[0];
        self.positions.insert(key.clone(), offset);
        self.drop_ready(|r| *r.topic == *key.topic && r.partition == key.partition && r.lane == key.lane);
        self.restart_fetching();
        Ok(())
    }

    /// The assigned lane logs and the offset of the next record of each.
    pub fn positions(&self) -> &HashMap<LogKey, Offset> {
        &self.positions
    }

    /// Turns a start position into offsets, one per lane log.
    async fn resolve(&self, keys: &[LogKey], from: StartFrom) -> Result<Vec<Offset>, ConsumeError> {
        let spec = match from {
            StartFrom::Offset(offset) => return Ok(vec![offset; keys.len()]),
            StartFrom::Earliest => OffsetSpec::Earliest,
            StartFrom::Latest => OffsetSpec::Latest,
            StartFrom::Timestamp(ms) => OffsetSpec::Timestamp(ms),
        };
        list_offsets(&self.client, keys, spec).await
    }

    /// Tells the fetcher the current positions; data fetched before is dropped.
    fn restart_fetching(&mut self) {
        self.epoch += 1;
        let _ = self.commands.send(FetcherCommand::Assign {
            epoch: self.epoch,
            positions: self.positions.clone(),
        });
    }

    /// The records that are ready, waiting up to `fetch_wait` for some.
    pub async fn poll(&mut self) -> Result<Vec<ConsumerRecord>, ConsumeError> {
        self.poll_timeout(self.config.fetch_wait).await
    }

    /// The records that are ready, waiting up to `wait` for some. In a group, first
    /// follows the group: starts reading partitions it was given, gives up those moving
    /// to other members (committing first, with auto-commit), and auto-commits.
    pub async fn poll_timeout(&mut self, wait: Duration) -> Result<Vec<ConsumerRecord>, ConsumeError> {
        self.sync_group().await?;
        if !self.has_ready() {
            let deadline = tokio::time::Instant::now() + wait;
            while !self.has_ready() {
                tokio::select! {
                    fetched = self.fetched.recv() => self.take(fetched.ok_or(ConsumeError::Closed)?)?,
                    () = group_changed(&mut self.group) => self.sync_group().await?,
                    () = tokio::time::sleep_until(deadline) => break,
                }
            }
        }
        // Whatever else has already arrived, without waiting.
        while let Ok(fetched) = self.fetched.try_recv() {
            self.take(fetched)?;
        }
        Ok(self.hand_out())
    }

    /// Up to `poll_records_max` ready records, shared between the lanes as the broker
    /// shares fetches: in proportion to the lane weights (smooth weighted round robin),
    /// or most urgent first for a strict topic. So an application slower than its express
    /// traffic still gets bulk records at bulk's share, and an express record waits
    /// behind a few bulk ones at most.
    fn hand_out(&mut self) -> Vec<ConsumerRecord> {
        let max = self.config.poll_records_max.max(1);
        let mut records = Vec::new();
        while records.len() < max {
            let ready = |lane: usize| !self.paused[lane] && !self.ready[lane].is_empty();
            let lane = match &self.hand_out_policy {
                HandOut::Unknown | HandOut::Strict => match (0..LANES_MAX).find(|&lane| ready(lane)) {
                    Some(lane) => lane,
                    None => break,
                },
                HandOut::Weighted(weights) => {
                    let mut total = 0;
                    let mut pick: Option<usize> = None;
                    for lane in (0..LANES_MAX).filter(|&lane| ready(lane)) {
                        self.lane_credit[lane] += i64::from(weights[lane]);
                        total += i64::from(weights[lane]);
                        if pick.is_none_or(|p| self.lane_credit[lane] > self.lane_credit[p]) {
                            pick = Some(lane);
                        }
                    }
                    let Some(pick) = pick else {
                        break;
                    };
                    self.lane_credit[pick] -= total;
                    pick
                }
            };
            let (record, bytes) = self.ready[lane].pop_front().expect("a ready lane");
            self.budgets.release(lane, bytes);
            records.push(record);
        }
        records
    }

    /// Takes the lane policy of the first topic read.
    fn learn_lane_policy(&mut self, info: &TopicInfo) {
        if self.hand_out_policy != HandOut::Unknown {
            return;
        }
        self.hand_out_policy = if info.lane_policy == "strict" {
            HandOut::Strict
        } else {
            let mut weights = [1u32; LANES_MAX];
            for (lane, weight) in info.lane_weights.iter().enumerate().take(LANES_MAX) {
                weights[lane] = (*weight).max(1);
            }
            HandOut::Weighted(weights)
        };
    }

    /// Whether records of lanes that are not paused are ready.
    fn has_ready(&self) -> bool {
        (0..LANES_MAX).any(|lane| !self.paused[lane] && !self.ready[lane].is_empty())
    }

    /// Drops ready records (not to be handed out), giving their budget back.
    fn drop_ready(&mut self, mut drop: impl FnMut(&ConsumerRecord) -> bool) {
        for (lane, queue) in self.ready.iter_mut().enumerate() {
            let budgets = &self.budgets;
            queue.retain(|(record, bytes)| {
                let dropped = drop(record);
                if dropped {
                    budgets.release(lane, *bytes);
                }
                !dropped
            });
        }
    }

    /// Keeps the records of these lanes back from `poll` (their lane's budget fills and
    /// its fetching stops), until [`Consumer::resume_lanes`]: so an application can
    /// take more urgent records while it is busy with the others.
    pub fn pause_lanes(&mut self, lanes: &[Lane]) {
        for lane in lanes {
            self.paused[lane.0 as usize % LANES_MAX] = true;
        }
    }

    pub fn resume_lanes(&mut self, lanes: &[Lane]) {
        for lane in lanes {
            self.paused[lane.0 as usize % LANES_MAX] = false;
        }
    }

    /// Waits until [`Consumer::poll`] has something to do: records arrived, or the group
    /// changed. Cancel-safe, so it can race other work (as the [`Worker`] does) before a
    /// `poll_timeout(Duration::ZERO)`.
    pub async fn wait(&mut self) -> Result<(), ConsumeError> {
        if self.has_ready() {
            return Ok(());
        }
        tokio::select! {
            fetched = self.fetched.recv() => self.take(fetched.ok_or(ConsumeError::Closed)?)?,
            () = group_changed(&mut self.group) => {}
        }
        Ok(())
    }

    /// Joins a consumer group: from the next [`Consumer::poll`] on, the consumer reads
    /// the partitions (every lane of each) the group gives it, from the group's committed
    /// offsets (or per [`ConsumerConfig::reset`] where there are none). Membership is
    /// kept by a background heartbeat.
    pub fn subscribe(&mut self, config: GroupConfig) -> Result<(), ConsumeError> {
        if self.group.is_some() || !self.positions.is_empty() {
            return Err(ConsumeError::Usage(
                "subscribe once, on a consumer without assigned lane logs",
            ));
        }
        self.group = Some(GroupHandle::start(
            config,
            &self.config.broker,
            &self.config.client_id,
        ));
        Ok(())
    }

    /// The member id the group gave this consumer, once it joined.
    pub fn member_id(&self) -> Option<String> {
        self.group.as_ref().and_then(|g| g.membership().member_id.clone())
    }

    /// The partitions this consumer holds in its group.
    pub fn assignment(&self) -> Vec<TopicPartition> {
        self.group
            .as_ref()
            .map(|g| g.membership().held.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// With [`GroupConfig::manual_release`]: the partitions the group is moving to other
    /// members. Finish the work on them and give them up with [`Consumer::release`].
    pub fn revoking(&self) -> Vec<TopicPartition> {
        let Some(group) = &self.group else {
            return Vec::new();
        };
        let membership = group.membership();
        membership.held.difference(&membership.answer).cloned().collect()
    }

    /// Commits `offsets` (best effort: the partitions are going anyway) and gives up
    /// `partitions`: stops reading them and tells the group at once.
    pub async fn release(&mut self, partitions: &[TopicPartition], offsets: &[(LogKey, Offset)]) {
        if !offsets.is_empty()
            && let Err(error) = self.commit_offsets(offsets).await
        {
            tracing::warn!(%error, "commit before giving partitions up failed");
        }
        self.drop_partitions(partitions);
        if let Some(group) = &self.group {
            let mut membership = group.membership();
            for partition in partitions {
                membership.held.remove(partition);
            }
            drop(membership);
            group.wake.notify_one();
        }
    }

    /// Commits the offsets of every record handed out so far: call after handling them.
    pub async fn commit(&mut self) -> Result<(), ConsumeError> {
        let offsets = self.uncommitted(None);
        self.commit_offsets(&offsets).await
    }

    /// Commits the given offsets (each the offset of the next record to read) for this
    /// member's group. Durable when this returns `Ok`. A commit whose connection is lost
    /// with it goes out once more, on a new connection.
    pub async fn commit_offsets(&mut self, offsets: &[(LogKey, Offset)]) -> Result<(), ConsumeError> {
        let Some(group) = &mut self.group else {
            return Err(ConsumeError::Usage("commit needs a group: call subscribe first"));
        };
        // Only partitions held by the current membership: after the membership was
        // lost, offsets from before must never be sent under the new one.
        let (member_id, offsets) = {
            let membership = group.membership();
            let member_id = membership.member_id.clone().filter(|_| !membership.lost);
            let held: Vec<&(LogKey, Offset)> = offsets
                .iter()
                .filter(|(key, _)| {
                    membership.held.contains(&TopicPartition {
                        topic: Arc::clone(&key.topic),
                        partition: key.partition,
                    })
                })
                .collect();
            (member_id, held)
        };
        if offsets.is_empty() {
            return Ok(());
        }
        let Some(member_id) = member_id else {
            return Err(ConsumeError::Group {
                group: group.config.group.clone(),
                code: ErrorCode::UnknownMember,
                message: "not a member of the group now (joining, or the membership was lost)".into(),
            });
        };
        let mut sorted: Vec<&(LogKey, Offset)> = offsets;
        sorted.sort();
        let mut topics: Vec<TopicItems<CommitLane>> = Vec::new();
        for &(key, offset) in &sorted {
            push_lane(
                &mut topics,
                key,
                CommitLane {
                    lane: key.lane,
                    offset: *offset,
                },
            );
        }
        let request = OffsetCommitRequest {
            group: group.config.group.clone(),
            member_id,
            topics,
        };
        let response = group
            .link
            .request_idempotent(&request)
            .await
            .map_err(|error| group_error(&group.config, error))?;
        group.last_commit = Instant::now();
        let mut first_error = None;
        for topic in &response.topics {
            for (name, partition, result) in topic.lanes() {
                let key = LogKey {
                    topic: Arc::from(name),
                    partition,
                    lane: result.lane,
                };
                if result.error_code == ErrorCode::None {
                    if let Some((_, offset)) = sorted.iter().find(|(k, _)| *k == key) {
                        self.committed.insert(key, *offset);
                    }
                } else if first_error.is_none() {
                    first_error = Some(ConsumeError::Commit {
                        topic: name.to_owned(),
                        partition,
                        lane: result.lane,
                        code: result.error_code,
                        message: result.error_message.clone(),
                    });
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Leaves the group (after a last commit, with auto-commit), so its partitions move
    /// to other members at once instead of after the session timeout.
    pub async fn close(mut self) -> Result<(), ConsumeError> {
        let Some(group) = &self.group else {
            return Ok(());
        };
        group.task.abort();
        let mut result = Ok(());
        if group.config.auto_commit_interval.is_some() {
            result = self.commit().await;
        }
        let group = self.group.as_ref().expect("checked");
        let member_id = group.membership().member_id.clone();
        if let Some(member_id) = member_id {
            let request = LeaveGroupRequest {
                group: group.config.group.clone(),
                member_id,
            };
            match group.link.request_idempotent(&request).await {
                // Not a member (any more): nothing to leave. A leave sent again after
                // its connection was lost with it gets this when the first went through.
                Ok(_) => {}
                Err(error) if error.code() == Some(ErrorCode::UnknownMember) => {}
                Err(error) => result = result.and(Err(group_error(&group.config, error))),
            }
        }
        result
    }

    /// Per lane log (of `only` these partitions, or all), the offset after the last
    /// record handed out, where it differs from what was committed. Records fetched
    /// but not yet handed out (after [`Consumer::wait`]) are not counted.
    fn uncommitted(&self, only: Option<&[TopicPartition]>) -> Vec<(LogKey, Offset)> {
        let mut handed_out: HashMap<LogKey, Offset> = self.positions.clone();
        for (record, _) in self.ready.iter().flat_map(|queue| queue.iter().rev()) {
            let key = LogKey {
                topic: Arc::clone(&record.topic),
                partition: record.partition,
                lane: record.lane,
            };
            handed_out.insert(key, record.offset);
        }
        handed_out
            .into_iter()
            .filter(|(key, _)| {
                only.is_none_or(|only| {
                    only.iter()
                        .any(|p| *p.topic == *key.topic && p.partition == key.partition)
                })
            })
            .filter(|(key, offset)| self.committed.get(key) != Some(offset))
            .collect()
    }

    /// Partitions dropped since the last call because the group membership was lost:
    /// whatever was done on them can no longer be committed.
    pub(crate) fn take_lost(&mut self) -> Vec<TopicPartition> {
        std::mem::take(&mut self.lost)
    }

    /// Follows the group: see [`Consumer::poll_timeout`].
    async fn sync_group(&mut self) -> Result<(), ConsumeError> {
        let Some(group) = &self.group else {
            return Ok(());
        };
        let (lost, revoked, assigned) = {
            let mut membership = group.membership();
            if let Some(error) = &membership.error {
                // For good: every poll reports it.
                return Err(error.clone());
            }
            let lost: Vec<TopicPartition> = if std::mem::take(&mut membership.lost) {
                membership.held.clear();
                self.taken.iter().cloned().collect()
            } else {
                Vec::new()
            };
            let revoked: Vec<TopicPartition> =
                membership.held.difference(&membership.answer).cloned().collect();
            // Decided by what is read, not what is held: a take that was cut short (a
            // cancelled poll) is tried again.
            let assigned: Vec<TopicPartition> = membership
                .answer
                .iter()
                .filter(|p| !self.taken.contains(*p) || lost.contains(p))
                .cloned()
                .collect();
            // Held from now on: the next heartbeat reports them even while taking them
            // below is under way.
            membership.held.extend(assigned.iter().cloned());
            (lost, revoked, assigned)
        };
        let manual_release = group.config.manual_release;
        let auto_commit = group.config.auto_commit_interval;
        if !lost.is_empty() {
            tracing::warn!(
                partitions = lost.len(),
                "lost the group membership; dropping its partitions uncommitted"
            );
            self.drop_partitions(&lost);
            self.lost.extend(lost);
        }
        if !revoked.is_empty() && !manual_release {
            let offsets = if auto_commit.is_some() {
                self.uncommitted(Some(&revoked))
            } else {
                Vec::new()
            };
            self.release(&revoked, &offsets).await;
        }
        if !assigned.is_empty()
            && let Err(error) = self.take_partitions(&assigned).await
        {
            match error {
                ConsumeError::OffsetOutOfRange { .. } => return Err(error),
                // Still held, not taken: tried again at the next poll (or released, if
                // the group moves it meanwhile).
                error => {
                    tracing::warn!(%error, "could not start reading assigned partitions; retrying at the next poll")
                }
            }
        }
        if let Some(interval) = auto_commit
            && self
                .group
                .as_ref()
                .is_some_and(|g| g.last_commit.elapsed() >= interval)
        {
            let offsets = self.uncommitted(None);
            if let Some(group) = &mut self.group {
                group.last_commit = Instant::now();
            }
            if let Err(error) = self.commit_offsets(&offsets).await {
                tracing::warn!(%error, "auto-commit failed");
            }
        }
        Ok(())
    }

    /// Starts reading partitions the group gave this member, from the group's committed
    /// offsets.
    async fn take_partitions(&mut self, partitions: &[TopicPartition]) -> Result<(), ConsumeError> {
        let mut keys = Vec::new();
        for p in partitions {
            let info = self.topic(&p.topic).await?;
            self.learn_lane_policy(&info);
            keys.extend((0..info.lanes.len() as u8).map(|lane| LogKey {
                topic: Arc::clone(&p.topic),
                partition: p.partition,
                lane: Lane(lane),
            }));
        }
        let group = self.group.as_ref().expect("in a group");
        let request = OffsetFetchRequest {
            group: group.config.group.clone(),
            partitions: to_assignment(partitions),
        };
        let response = group
            .link
            .request_idempotent(&request)
            .await
            .map_err(|error| group_error(&group.config, error))?;
        let mut committed: HashMap<LogKey, Offset> = HashMap::new();
        for topic in &response.topics {
            for (name, partition, lane) in topic.lanes() {
                if let Some(offset) = lane.committed {
                    let key = LogKey {
                        topic: Arc::from(name),
                        partition,
                        lane: lane.lane,
                    };
                    committed.insert(key, offset);
                }
            }
        }
        let (known, unknown): (Vec<LogKey>, Vec<LogKey>) =
            keys.into_iter().partition(|k| committed.contains_key(k));
        let spec = match self.config.reset {
            ResetPolicy::Earliest => OffsetSpec::Earliest,
            ResetPolicy::Latest => OffsetSpec::Latest,
            ResetPolicy::Fail if unknown.is_empty() => OffsetSpec::Earliest,
            ResetPolicy::Fail => {
                let key = &unknown[0];
                return Err(ConsumeError::OffsetOutOfRange {
                    topic: key.topic.to_string(),
                    partition: key.partition,
                    lane: key.lane,
                    offset: Offset::ZERO,
                });
            }
        };
        let reset = if unknown.is_empty() {
            Vec::new()
        } else {
            list_offsets(&self.client, &unknown, spec).await?
        };
        for key in known {
            let offset = committed[&key];
            self.committed.insert(key.clone(), offset);
            self.positions.insert(key, offset);
        }
        for (key, offset) in unknown.into_iter().zip(reset) {
            self.positions.insert(key, offset);
        }
        self.taken.extend(partitions.iter().cloned());
        tracing::info!(
            partitions = partitions.len(),
            "started reading assigned partitions"
        );
        self.restart_fetching();
        Ok(())
    }

    /// Stops reading partitions, without committing.
    fn drop_partitions(&mut self, partitions: &[TopicPartition]) {
        let held = |topic: &str, partition: PartitionId| {
            partitions
                .iter()
                .any(|p| *p.topic == *topic && p.partition == partition)
        };
        self.positions.retain(|key, _| !held(&key.topic, key.partition));
        self.taken.retain(|p| !held(&p.topic, p.partition));
        self.committed.retain(|key, _| !held(&key.topic, key.partition));
        self.drop_ready(|r| held(&r.topic, r.partition));
        self.restart_fetching();
    }

    /// Turns a fetched batch into ready records, skipping what was already handed out.
    fn take(&mut self, fetched: Fetched) -> Result<(), ConsumeError> {
        let fetched = match fetched {
            Fetched::Reset { key, epoch, offset } => {
                if epoch == self.epoch
                    && let Some(position) = self.positions.get_mut(&key)
                {
                    *position = offset;
                }
                return Ok(());
            }
            // About lane logs read before the last change of positions: stale.
            Fetched::Failed { epoch, .. } if epoch != self.epoch => return Ok(()),
            Fetched::Failed { error, .. } => {
                let gone = matches!(&error, ConsumeError::Fetch { code, .. }
                    if matches!(code, ErrorCode::UnknownTopic | ErrorCode::UnknownPartition));
                if self.group.is_some() && gone {
                    // A deleted topic: the group takes its partitions away.
                    tracing::warn!(%error, "a group partition is gone");
                    return Ok(());
                }
                return Err(error);
            }
            Fetched::Batch {
                key,
                epoch,
                batch,
                bytes,
            } => (key, epoch, batch, bytes),
        };
        let (key, epoch, batch, bytes) = fetched;
        let lane = key.lane.0 as usize % LANES_MAX;
        let position = self.positions.get_mut(&key).filter(|_| epoch == self.epoch);
        let Some(position) = position.filter(|p| batch.last_offset() >= **p) else {
            // Stale or already handed out: its budget goes back at once.
            self.budgets.release(lane, bytes);
            return Ok(());
        };
        let queue = &mut self.ready[lane];
        let before = queue.len();
        for record in batch.records() {
            if record.offset < *position {
                continue;
            }
            queue.push_back((
                ConsumerRecord {
                    topic: Arc::clone(&key.topic),
                    partition: key.partition,
                    lane: key.lane,
                    offset: record.offset,
                    timestamp_ms: record.timestamp_ms,
                    key: record.key,
                    value: record.value,
                    headers: record.headers.collect(),
                },
                0,
            ));
        }
        let added = queue.len() > before;
        match queue.back_mut() {
            Some((_, last)) if added => *last = bytes,
            _ => self.budgets.release(lane, bytes),
        }
        *position = batch.last_offset().plus(1);
        Ok(())
    }
}

/// Resolves when the group membership changed; never without a group.
async fn group_changed(group: &mut Option<GroupHandle>) {
    match group {
        Some(group) => {
            if group.changed.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

fn group_error(config: &GroupConfig, error: ClientError) -> ConsumeError {
    match error {
        ClientError::Broker { code, message } => ConsumeError::Group {
            group: config.group.clone(),
            code,
            message,
        },
        error => ConsumeError::Connection(error.to_string()),
    }
}

/// Adds an item for `key` to the common topic/partition/lane nesting (keys in order).
pub(crate) fn push_lane<T>(topics: &mut Vec<TopicItems<T>>, key: &LogKey, item: T) {
    if topics.last().is_none_or(|t| *t.name != *key.topic) {
        topics.push(TopicItems {
            name: key.topic.to_string(),
            partitions: Vec::new(),
        });
    }
    let partitions = &mut topics.last_mut().expect("pushed").partitions;
    if partitions.last().is_none_or(|p| p.partition != key.partition) {
        partitions.push(PartitionItems {
            partition: key.partition,
            lanes: Vec::new(),
        });
    }
    partitions.last_mut().expect("pushed").lanes.push(item);
}

/// Looks up offsets of lane logs.
pub(crate) async fn list_offsets(
    client: &Link,
    keys: &[LogKey],
    spec: OffsetSpec,
) -> Result<Vec<Offset>, ConsumeError> {
    let mut topics: Vec<TopicItems<ListOffsetsLane>> = Vec::new();
    for key in keys {
        push_lane(&mut topics, key, ListOffsetsLane { lane: key.lane, spec });
    }
    let response = client.request(&ListOffsetsRequest { topics }).await?;
    let results: Vec<_> = response
        .topics
        .iter()
        .flat_map(|t| t.lanes().map(|(_, _, r)| r.clone()).collect::<Vec<_>>())
        .collect();
    if results.len() != keys.len() {
        return Err(ConsumeError::Connection(
            "ListOffsets answered for other lane logs".into(),
        ));
    }
    keys.iter()
        .zip(results)
        .map(|(key, result)| match result.error_code {
            ErrorCode::None => Ok(result.offset),
            code => Err(ConsumeError::Fetch {
                topic: key.topic.to_string(),
                partition: key.partition,
                lane: key.lane,
                code,
                message: result.error_message,
            }),
        })
        .collect()
}

/// The README's Rust examples, compiled as doctests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeExamples;
