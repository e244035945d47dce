//! The Lanes consumer: reads records from lane logs of a broker.
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
//! A background fetcher long-polls every assigned lane log in one Fetch request and
//! keeps at most `prefetch_bytes_max` bytes of fetched batches; every batch's checksum
//! is checked before its records are handed out. Records come as slices of the fetched
//! bytes: no copy. Offsets are tracked per lane log; [`Consumer::seek`] moves them.

mod fetcher;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use lanes_protocol::client::{Client, ClientConfig, ClientError};
use lanes_protocol::messages::{
    ListOffsetsLane, ListOffsetsRequest, MetadataRequest, OffsetSpec, PartitionItems, TopicItems,
};
use lanes_protocol::{ErrorCode, Header, Lane, Offset, PartitionId};
use tokio::sync::{Semaphore, mpsc};

use fetcher::{Fetched, FetcherCommand};

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
    /// Fetched bytes held before the application takes them; fetching waits beyond it.
    pub prefetch_bytes_max: usize,
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
            prefetch_bytes_max: 32 << 20,
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
}

/// A consumer of explicitly assigned lane logs.
#[derive(Debug)]
pub struct Consumer {
    client: Arc<Client>,
    config: ConsumerConfig,
    topics: HashMap<String, TopicInfo>,
    /// The offset of the next record to hand out, per assigned lane log.
    positions: HashMap<LogKey, Offset>,
    /// Bumped by every change of positions other than consumption; fetched data from
    /// an older epoch is dropped.
    epoch: u64,
    ready: VecDeque<ConsumerRecord>,
    commands: mpsc::UnboundedSender<FetcherCommand>,
    fetched: mpsc::Receiver<Result<Fetched, ConsumeError>>,
    prefetch: Arc<Semaphore>,
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
        let client = Arc::new(Client::connect(&config.broker, client_config).await?);
        let prefetch = Arc::new(Semaphore::new(config.prefetch_bytes_max));
        let (commands, command_receiver) = mpsc::unbounded_channel();
        let (fetched_sender, fetched) = mpsc::channel(1024);
        let fetcher = tokio::spawn(fetcher::run(
            Arc::clone(&client),
            config.clone(),
            Arc::clone(&prefetch),
            command_receiver,
            fetched_sender,
        ));
        Ok(Consumer {
            client,
            config,
            topics: HashMap::new(),
            positions: HashMap::new(),
            epoch: 0,
            ready: VecDeque::new(),
            commands,
            fetched,
            prefetch,
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
        let info = TopicInfo {
            partitions: topic.partitions.len() as u32,
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
        let info = self.topic(topic).await?;
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
        self.ready.retain(|r| {
            !keys
                .iter()
                .any(|k| *k.topic == *r.topic && k.partition == r.partition && k.lane == r.lane)
        });
        self.restart_fetching();
    }

    /// Moves one assigned lane log.
    pub async fn seek(&mut self, key: &LogKey, from: StartFrom) -> Result<(), ConsumeError> {
        let offset = self.resolve(std::slice::from_ref(key), from).await?[0];
        self.positions.insert(key.clone(), offset);
        self.ready
            .retain(|r| !(*r.topic == *key.topic && r.partition == key.partition && r.lane == key.lane));
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
        if self.ready.is_empty() {
            let deadline = tokio::time::Instant::now() + self.config.fetch_wait;
            while self.ready.is_empty() {
                let fetched = tokio::select! {
                    fetched = self.fetched.recv() => fetched.ok_or(ConsumeError::Closed)?,
                    () = tokio::time::sleep_until(deadline) => break,
                };
                self.take(fetched?);
            }
        }
        // Whatever else has already arrived, without waiting.
        while let Ok(fetched) = self.fetched.try_recv() {
            self.take(fetched?);
        }
        Ok(self.ready.drain(..).collect())
    }

    /// Turns a fetched batch into ready records, skipping what was already handed out.
    fn take(&mut self, fetched: Fetched) {
        let (key, epoch, batch) = match fetched {
            Fetched::Reset { key, epoch, offset } => {
                if epoch == self.epoch
                    && let Some(position) = self.positions.get_mut(&key)
                {
                    *position = offset;
                }
                return;
            }
            Fetched::Batch {
                key,
                epoch,
                batch,
                permits,
            } => {
                self.prefetch.add_permits(permits);
                (key, epoch, batch)
            }
        };
        if epoch != self.epoch {
            return;
        }
        let Some(position) = self.positions.get_mut(&key) else {
            return;
        };
        if batch.last_offset() < *position {
            return;
        }
        for record in batch.records() {
            if record.offset < *position {
                continue;
            }
            self.ready.push_back(ConsumerRecord {
                topic: Arc::clone(&key.topic),
                partition: key.partition,
                lane: key.lane,
                offset: record.offset,
                timestamp_ms: record.timestamp_ms,
                key: record.key,
                value: record.value,
                headers: record.headers.collect(),
            });
        }
        *position = batch.last_offset().plus(1);
    }
}

/// Looks up offsets of lane logs.
pub(crate) async fn list_offsets(
    client: &Client,
    keys: &[LogKey],
    spec: OffsetSpec,
) -> Result<Vec<Offset>, ConsumeError> {
    let mut topics: Vec<TopicItems<ListOffsetsLane>> = Vec::new();
    for key in keys {
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
        partitions
            .last_mut()
            .expect("pushed")
            .lanes
            .push(ListOffsetsLane { lane: key.lane, spec });
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
