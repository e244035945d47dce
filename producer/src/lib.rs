//! The Lanes producer: batches records per lane log and sends them to a broker.
//!
//! ```no_run
//! # async fn demo() -> Result<(), lanes_producer::ProduceError> {
//! use lanes_producer::{LaneSelector, Producer, ProducerConfig, ProducerRecord};
//! let producer = Producer::connect(ProducerConfig::new("127.0.0.1:7070")).await?;
//! let delivery = producer
//!     .send(ProducerRecord::new("orders", "placed").key("order-42").lane(LaneSelector::Name("express".into())))
//!     .await?;
//! let metadata = delivery.wait().await?;
//! println!("partition {} lane {} offset {:?}", metadata.partition, metadata.lane, metadata.offset);
//! producer.close().await?;
//! # Ok(()) }
//! ```
//!
//! Records are grouped per lane log (topic, partition, lane) into batches of up to
//! `batch_bytes_max`, sent when full, after `linger`, or on [`Producer::flush`]. The
//! partition comes from the record, else from the FNV-1a hash of its key, else it is
//! sticky: records without a key fill one partition for `batch_bytes_max` bytes, then
//! move to the next. Buffered records are bounded by `buffer_bytes_max`:
//! [`Producer::send`] waits for room (backpressure). With idempotence (the default), retries after a lost
//! connection or a transient broker error never append a batch twice: each lane log gets
//! sequence numbers and the broker answers a retry with the original offsets. At most
//! `in_flight_per_log_max` (5) batches per lane log are in flight, and a lane log's
//! batches are appended in the order they were sent.

mod record;
mod sender;

use bytes::BytesMut;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lanes_protocol::client::{Client, ClientConfig, ClientError};
use lanes_protocol::messages::{Acks, CreateTopicRequest, InitProducerIdRequest, MetadataRequest};
use lanes_protocol::partitioner::partition_for_key;
use lanes_protocol::{BatchLimits, BuildError, ErrorCode, Lane, PartitionId, RecordBatchBuilder};
use tokio::sync::{Notify, Semaphore, TryAcquireError, mpsc, oneshot};

use record::{Abandon, BatchResult};
pub use record::{Delivery, LaneSelector, ProducerRecord, RecordMetadata};
use sender::{Accumulator, Command, LogKey, OpenBatch};

/// Settings of a producer.
#[derive(Clone, Debug)]
pub struct ProducerConfig {
    /// `host:port` of the broker.
    pub broker: String,
    pub client_id: String,
    pub acks: Acks,
    /// Retries never duplicate records (needs `acks` other than `none`).
    pub idempotent: bool,
    /// How long a batch waits for more records before it is sent. Batches also grow
    /// while earlier ones of their lane log are in flight, so even with no linger (the
    /// default) a busy producer sends large batches.
    pub linger: Duration,
    /// Per lane number, lane 0 first: a linger of its own (lanes past the end use
    /// `linger`). Lane 0 (express) never waits by default.
    pub lane_linger: Vec<Duration>,
    /// Produce requests in flight on the connection; requests with lane 0 batches may
    /// go beyond it, so express never queues behind bulk.
    pub requests_in_flight_max: usize,
    /// Largest batch. The producer keeps to the broker's `batch_bytes_max` (which the
    /// broker tells in the handshake) where that is smaller, as of its latest connection:
    /// a broker restarted with a smaller limit gets smaller batches from then on.
    pub batch_bytes_max: u32,
    /// Bytes of records held (buffered or in flight); `send` waits beyond it.
    pub buffer_bytes_max: usize,
    /// Largest produce request.
    pub request_bytes_max: usize,
    /// Batches of one lane log in flight at once (at most 5 with idempotence).
    pub in_flight_per_log_max: usize,
    /// How long the broker may take to make a batch durable.
    pub durability_timeout: Duration,
    /// How long a record may take, retries included, before it fails.
    pub delivery_timeout: Duration,
    pub retry_backoff: Duration,
    /// Create a missing topic (with these partitions and lanes, or the broker's
    /// defaults when `None` inside).
    pub create_topics: Option<TopicDefaults>,
}

/// Partitions and lanes for topics the producer creates; 0 and empty mean the
/// broker's defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TopicDefaults {
    pub partitions: u32,
    pub lanes: Vec<String>,
}

impl ProducerConfig {
    pub fn new(broker: impl Into<String>) -> ProducerConfig {
        ProducerConfig {
            broker: broker.into(),
            client_id: "lanes-producer".into(),
            acks: Acks::Durable,
            idempotent: true,
            linger: Duration::ZERO,
            lane_linger: vec![Duration::ZERO],
            requests_in_flight_max: 8,
            batch_bytes_max: 256 * 1024,
            buffer_bytes_max: 64 << 20,
            request_bytes_max: 4 << 20,
            in_flight_per_log_max: 5,
            durability_timeout: Duration::from_secs(30),
            delivery_timeout: Duration::from_secs(120),
            retry_backoff: Duration::from_millis(100),
            create_topics: Some(TopicDefaults::default()),
        }
    }
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum ProduceError {
    #[error("{0}")]
    Connection(String),
    #[error("topic {0} does not exist")]
    UnknownTopic(String),
    #[error("topic {topic} has no partition {partition}")]
    UnknownPartition { topic: String, partition: u32 },
    #[error("topic {topic} has no lane {lane}")]
    UnknownLane { topic: String, lane: String },
    #[error("a record of up to {record_bytes} bytes does not fit a batch of {batch_bytes_max} bytes")]
    RecordTooLarge {
        record_bytes: usize,
        batch_bytes_max: u32,
    },
    #[error("the broker refused the batch: {code}: {message}")]
    Broker { code: ErrorCode, message: String },
    #[error("not acknowledged within the delivery timeout; last error: {0}")]
    TimedOut(String),
    #[error("the producer is closed")]
    Closed,
}

impl From<ClientError> for ProduceError {
    fn from(error: ClientError) -> ProduceError {
        match error {
            ClientError::Broker { code, message } => ProduceError::Broker { code, message },
            other => ProduceError::Connection(other.to_string()),
        }
    }
}

/// What the producer knows of a topic.
#[derive(Debug)]
pub(crate) struct TopicInfo {
    pub(crate) name: Arc<str>,
    pub(crate) partitions: u32,
    pub(crate) lanes: Vec<String>,
    /// Records without a key: the partition they started on, and the bytes sent since
    /// (changed only under the accumulator lock, which holds the producer's topics).
    keyless_first: u32,
    keyless_bytes: AtomicU64,
}

impl TopicInfo {
    fn lane(&self, selector: &LaneSelector) -> Result<Lane, ProduceError> {
        let unknown = |lane: String| ProduceError::UnknownLane {
            topic: self.name.to_string(),
            lane,
        };
        match selector {
            LaneSelector::Default => Ok(Lane(
                self.lanes.iter().position(|l| l == "standard").unwrap_or(0) as u8
            )),
            LaneSelector::Index(lane) if (lane.0 as usize) < self.lanes.len() => Ok(*lane),
            LaneSelector::Index(lane) => Err(unknown(lane.0.to_string())),
            LaneSelector::Name(name) => self
                .lanes
                .iter()
                .position(|l| l == name)
                .map(|i| Lane(i as u8))
                .ok_or_else(|| unknown(name.clone())),
        }
    }

    /// Fails as `send` would for a record's explicit partition or its lane.
    fn check(&self, record: &ProducerRecord) -> Result<(), ProduceError> {
        match record.partition {
            Some(partition) if partition.0 >= self.partitions => Err(ProduceError::UnknownPartition {
                topic: self.name.to_string(),
                partition: partition.0,
            }),
            _ => self.lane(&record.lane).map(|_| ()),
        }
    }

    /// `record_bytes` is the record's encoded size, counted towards `batch_bytes_max`
    /// when the record has no key.
    fn partition(
        &self,
        record: &ProducerRecord,
        record_bytes: usize,
        batch_bytes_max: u32,
    ) -> Result<PartitionId, ProduceError> {
        match (record.partition, &record.key) {
            (Some(partition), _) if partition.0 < self.partitions => Ok(partition),
            (Some(partition), _) => Err(ProduceError::UnknownPartition {
                topic: self.name.to_string(),
                partition: partition.0,
            }),
            (None, Some(key)) => Ok(partition_for_key(key, self.partitions)),
            // Sticky, as Kafka's default partitioner (KIP-794): records without a key go
            // to one partition until a batch's worth of bytes has gone there, then to
            // the next. Round robin per record would cut every burst of sends into one
            // small batch per partition: more requests and appends, smaller writes.
            (None, None) => {
                // A load and a store, not an atomic add: callers hold the accumulator
                // lock, and `send` runs this for every record.
                let sent_bytes = self.keyless_bytes.load(Ordering::Relaxed);
                self.keyless_bytes
                    .store(sent_bytes + record_bytes as u64, Ordering::Relaxed);
                let turn = sent_bytes / u64::from(batch_bytes_max.max(1));
                let partition = (u64::from(self.keyless_first) + turn) % u64::from(self.partitions.max(1));
                Ok(PartitionId(partition as u32))
            }
        }
    }
}

/// State shared by the producer handle and its sender task.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: ProducerConfig,
    /// The largest batch to build: `config.batch_bytes_max`, or the broker's limit as of
    /// the latest connection where that is smaller (see [`keep_to_broker_limit`]).
    pub(crate) batch_bytes_max: AtomicU32,
    pub(crate) accumulator: Mutex<Accumulator>,
    /// Bytes of records held; permits are returned when their batch completes.
    pub(crate) buffer: Semaphore,
    /// Wakes the sender: a batch filled up or a lane log got its first record.
    pub(crate) wake: Notify,
    pub(crate) closed: AtomicBool,
    pub(crate) abandon: Arc<Abandon>,
}

/// A producer: cheap to share behind an `Arc`; `send` may be called from many tasks.
#[derive(Debug)]
pub struct Producer {
    shared: Arc<Shared>,
    /// Held while a topic is looked up or created, so that happens once per topic.
    topic_lookup: tokio::sync::Mutex<()>,
    /// For metadata and topic creation; replaced when its connection is lost.
    admin: tokio::sync::Mutex<Arc<Client>>,
    commands: mpsc::Sender<Command>,
    sender: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Producer {
    /// Connects to the broker and, for an idempotent producer, gets a producer id.
    pub async fn connect(mut config: ProducerConfig) -> Result<Producer, ProduceError> {
        if config.acks == Acks::None {
            config.idempotent = false;
        }
        if config.idempotent {
            config.in_flight_per_log_max = config
                .in_flight_per_log_max
                .clamp(1, lanes_protocol::messages::IN_FLIGHT_PER_LOG_MAX);
        }
        let admin = Arc::new(Client::connect(&config.broker, client_config(&config)).await?);
        let batch_bytes_max = AtomicU32::new(config.batch_bytes_max);
        keep_to_broker_limit(&batch_bytes_max, &config, &admin);
        // The id before the first batch: every lane log is idempotent from its first batch.
        let producer = if config.idempotent {
            let id = admin.request(&InitProducerIdRequest).await?;
            Some((id.producer_id, id.producer_epoch))
        } else {
            None
        };
        let shared = Arc::new(Shared {
            batch_bytes_max,
            buffer: Semaphore::new(config.buffer_bytes_max),
            accumulator: Mutex::new(Accumulator::default()),
            wake: Notify::new(),
            closed: AtomicBool::new(false),
            abandon: Arc::new(Abandon::default()),
            config,
        });
        // Batches go on a connection of their own: answers come in request order on a
        // connection, so a topic lookup behind produce requests waiting for durability
        // would wait with them, up to `durability_timeout`.
        let sending = Client::connect(&shared.config.broker, client_config(&shared.config)).await?;
        keep_to_broker_limit(&shared.batch_bytes_max, &shared.config, &sending);
        let (commands, receiver) = mpsc::channel(16);
        let task = tokio::spawn(sender::run(
            Arc::clone(&shared),
            Arc::new(sending),
            producer,
            receiver,
        ));
        Ok(Producer {
            shared,
            topic_lookup: tokio::sync::Mutex::new(()),
            admin: tokio::sync::Mutex::new(admin),
            commands,
            sender: Mutex::new(Some(task)),
        })
    }

    /// Buffers a record for sending; waits while the buffer is full. The returned
    /// [`Delivery`] resolves when the broker has acknowledged it.
    pub async fn send(&self, mut record: ProducerRecord) -> Result<Delivery, ProduceError> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(ProduceError::Closed);
        }
        let reserve = record.encoded_len_max();
        let batch_bytes_max = self.shared.batch_bytes_max.load(Ordering::Relaxed);
        if reserve + lanes_protocol::record_batch::HEADER_BYTES > batch_bytes_max as usize {
            return Err(ProduceError::RecordTooLarge {
                record_bytes: reserve,
                batch_bytes_max,
            });
        }
        let permits = u32::try_from(reserve).expect("bounded by batch_bytes_max");
        // Every send counts against the task's cooperative budget, as awaiting the room
        // does: an application that sends in a loop and finds room every time would
        // otherwise never yield, and hold its runtime thread from the sender, the
        // consumers and every other task on it (express records of the orders demo
        // waited 130 ms instead of 15). Before any room is taken: a send dropped at
        // this await holds nothing.
        tokio::task::consume_budget().await;
        // The common case takes one lock and waits for nothing: room in the buffer now
        // and the topic known. Every send pays this path, so it is kept to a few atomics.
        let mut room = match self.shared.buffer.try_acquire_many(permits) {
            Ok(held) => {
                held.forget();
                true
            }
            Err(TryAcquireError::Closed) => return Err(ProduceError::Closed),
            Err(TryAcquireError::NoPermits) => false,
        };
        loop {
            if room {
                match self.append(record, reserve)? {
                    Ok(delivery) => return Ok(delivery),
                    Err(unknown_topic) => {
                        record = unknown_topic;
                        self.shared.buffer.add_permits(reserve);
                    }
                }
            }
            // The topic first, so a record for an unknown topic, partition or lane fails
            // without waiting for room.
            let topic = self.topic(&record.topic).await?;
            topic.check(&record)?;
            self.shared
                .buffer
                .acquire_many(permits)
                .await
                .map_err(|_| ProduceError::Closed)?
                .forget();
            room = true;
        }
    }

    /// Adds a record, whose `reserve` bytes of buffer room are held, to its lane log's
    /// open batch. Hands the record back when its topic is not known yet. On an error
    /// the room is given back.
    fn append(
        &self,
        record: ProducerRecord,
        reserve: usize,
    ) -> Result<Result<Delivery, ProducerRecord>, ProduceError> {
        let timestamp_ms = record.timestamp_ms.unwrap_or_else(now_ms);
        let headers: Vec<(&[u8], Option<&[u8]>)> = record
            .headers
            .iter()
            .map(|(k, v)| (&k[..], v.as_deref()))
            .collect();
        let mut accumulator = self.shared.accumulator.lock().expect("accumulator lock poisoned");
        let Accumulator {
            open: opens,
            closed,
            topics,
        } = &mut *accumulator;
        let Some(topic) = topics.get(&*record.topic) else {
            return Ok(Err(record));
        };
        // Read under the lock: a reconnection may have lowered it, and every record sees
        // the limits in the order the sender set them.
        let batch_bytes_max = self.shared.batch_bytes_max.load(Ordering::Relaxed);
        // Checked again here: a reconnection may have lowered the limit since `send`
        // checked, and a record that fits no batch must not open one (an empty batch
        // cannot be sealed).
        let placed = if reserve + lanes_protocol::record_batch::HEADER_BYTES > batch_bytes_max as usize {
            Err(ProduceError::RecordTooLarge {
                record_bytes: reserve,
                batch_bytes_max,
            })
        } else {
            topic
                .partition(&record, reserve, batch_bytes_max)
                .and_then(|partition| Ok((partition, topic.lane(&record.lane)?)))
        };
        let (partition, lane) = match placed {
            Ok(placed) => placed,
            Err(error) => {
                drop(accumulator);
                self.shared.buffer.add_permits(reserve);
                return Err(error);
            }
        };
        let limits = BatchLimits {
            batch_bytes_max,
            batch_records_max: u32::MAX,
        };
        let abandon = &self.shared.abandon;
        let mut wake = false;
        // The record's own topic name becomes the key: a hit clones nothing.
        let key = LogKey {
            topic: record.topic,
            partition,
            lane,
        };
        let open = match opens.get_mut(&key) {
            Some(open) => open,
            None => {
                wake = true;
                opens
                    .entry(key.clone())
                    .or_insert_with(|| OpenBatch::new(limits, abandon, BATCH_CAPACITY_FIRST))
            }
        };
        if open.builder.limits().batch_bytes_max > batch_bytes_max {
            // Opened before the broker told a smaller limit: sealed as it is, so that
            // this record starts a batch of the size the broker takes now.
            let next = OpenBatch::new(limits, abandon, BATCH_CAPACITY_FIRST);
            closed.push_back((key.clone(), std::mem::replace(open, next)));
            wake = true;
        }
        let mut pushed = open
            .builder
            .push(timestamp_ms, record.key.as_deref(), &record.value, &headers);
        if let Err(BuildError::BatchFull) = pushed {
            // Its lane log fills batches: the next one gets its full size at once
            // rather than growing (each growth copies the batch).
            let next = OpenBatch::new(limits, abandon, batch_bytes_max as usize);
            closed.push_back((key.clone(), std::mem::replace(open, next)));
            wake = true;
            pushed = open
                .builder
                .push(timestamp_ms, record.key.as_deref(), &record.value, &headers);
        }
        if let Err(error) = pushed {
            drop(accumulator);
            self.shared.buffer.add_permits(reserve);
            return Err(match error {
                BuildError::TimestampOutOfRange(_)
                | BuildError::RecordTooLarge { .. }
                | BuildError::BatchFull => ProduceError::RecordTooLarge {
                    record_bytes: reserve,
                    batch_bytes_max,
                },
            });
        }
        open.reserved += reserve;
        let delivery = Delivery {
            batch: Arc::clone(&open.result),
            index: open.builder.record_count() - 1,
            partition,
            lane,
        };
        drop(accumulator);
        if wake {
            self.shared.wake.notify_one();
        }
        Ok(Ok(delivery))
    }

    /// Sends every buffered record now and waits until all of them are acknowledged
    /// or failed.
    pub async fn flush(&self) -> Result<(), ProduceError> {
        let (done, finished) = oneshot::channel();
        self.commands
            .send(Command::Flush(done))
            .await
            .map_err(|_| ProduceError::Closed)?;
        let results = finished.await.map_err(|_| ProduceError::Closed)?;
        for result in results {
            result.wait().await?;
        }
        Ok(())
    }

    /// Flushes, then stops the producer.
    pub async fn close(&self) -> Result<(), ProduceError> {
        let flushed = self.flush().await;
        self.shared.closed.store(true, Ordering::Release);
        let _ = self.commands.send(Command::Stop).await;
        let task = self.sender.lock().expect("sender lock poisoned").take();
        if let Some(task) = task {
            let _ = task.await;
        }
        flushed
    }

    /// The topic's partitions and lanes, from the broker (cached); a missing topic is
    /// created when the config says so.
    async fn topic(&self, name: &str) -> Result<Arc<TopicInfo>, ProduceError> {
        let cached = |producer: &Producer| {
            let accumulator = producer
                .shared
                .accumulator
                .lock()
                .expect("accumulator lock poisoned");
            accumulator.topics.get(name).map(Arc::clone)
        };
        if let Some(info) = cached(self) {
            return Ok(info);
        }
        let _lookup = self.topic_lookup.lock().await;
        if let Some(info) = cached(self) {
            return Ok(info);
        }
        let info = Arc::new(self.fetch_topic(name).await?);
        self.shared
            .accumulator
            .lock()
            .expect("accumulator lock poisoned")
            .topics
            .insert(Arc::clone(&info.name), Arc::clone(&info));
        Ok(info)
    }

    async fn fetch_topic(&self, name: &str) -> Result<TopicInfo, ProduceError> {
        let request = MetadataRequest {
            topics: vec![name.to_owned()],
        };
        let mut metadata = self.admin_request(&request).await?;
        let mut topic = metadata
            .topics
            .pop()
            .ok_or_else(|| ProduceError::UnknownTopic(name.to_owned()))?;
        if topic.error_code == ErrorCode::UnknownTopic
            && let Some(defaults) = &self.shared.config.create_topics
        {
            let create = CreateTopicRequest {
                name: name.to_owned(),
                partitions: defaults.partitions,
                lanes: defaults.lanes.clone(),
                configs: Vec::new(),
            };
            match self.admin_request(&create).await {
                Ok(_) => {}
                Err(ClientError::Broker {
                    code: ErrorCode::TopicAlreadyExists,
                    ..
                }) => {}
                Err(error) => return Err(error.into()),
            }
            metadata = self.admin_request(&request).await?;
            topic = metadata
                .topics
                .pop()
                .ok_or_else(|| ProduceError::UnknownTopic(name.to_owned()))?;
        }
        if topic.error_code != ErrorCode::None {
            return Err(ProduceError::UnknownTopic(name.to_owned()));
        }
        let partitions = topic.partitions.len() as u32;
        Ok(TopicInfo {
            name: Arc::from(name),
            partitions,
            lanes: topic.lanes,
            // Producers that start together should not all fill the same partition.
            keyless_first: (RandomState::new().hash_one(name) % u64::from(partitions.max(1))) as u32,
            keyless_bytes: AtomicU64::new(0),
        })
    }

    /// Sends an admin request, reconnecting and retrying after a lost connection
    /// until the delivery timeout.
    async fn admin_request<R: lanes_protocol::RequestBody>(
        &self,
        request: &R,
    ) -> Result<R::Response, ClientError> {
        let config = &self.shared.config;
        let deadline = tokio::time::Instant::now() + config.delivery_timeout;
        loop {
            let client = {
                let mut admin = self.admin.lock().await;
                // Idle since the last lookup, it may have been closed by the broker
                // (`connection_idle_ms_max`): a new one at once, without the backoff.
                if admin.is_closed() {
                    match Client::connect(&config.broker, client_config(config)).await {
                        Ok(fresh) => *admin = Arc::new(fresh),
                        Err(error) if tokio::time::Instant::now() < deadline => {
                            drop(admin);
                            tracing::debug!(%error, "cannot reach the broker; retrying");
                            tokio::time::sleep(config.retry_backoff).await;
                            continue;
                        }
                        Err(error) => return Err(error),
                    }
                }
                Arc::clone(&*admin)
            };
            let error = match client.request(request).await {
                Ok(response) => return Ok(response),
                Err(error) if error.is_connection_lost() && tokio::time::Instant::now() < deadline => error,
                Err(error) => return Err(error),
            };
            tracing::debug!(%error, "admin connection lost; reconnecting");
            tokio::time::sleep(config.retry_backoff).await;
            let mut admin = self.admin.lock().await;
            if Arc::ptr_eq(&admin, &client)
                && let Ok(fresh) = Client::connect(&config.broker, client_config(config)).await
            {
                *admin = Arc::new(fresh);
            }
        }
    }

    /// Lane names of a topic, lane 0 first.
    pub async fn lanes(&self, topic: &str) -> Result<Vec<String>, ProduceError> {
        Ok(self.topic(topic).await?.lanes.clone())
    }
}

impl Drop for Producer {
    /// Without `close`, records not yet acknowledged are abandoned: their deliveries
    /// end with [`ProduceError::Closed`] instead of waiting forever.
    fn drop(&mut self) {
        if let Some(task) = self.sender.lock().expect("sender lock poisoned").take() {
            task.abort();
        }
        self.shared.abandon.raise();
    }
}

/// Sets `batch_bytes_max` to the configured limit, or to the limit `client`'s broker
/// said in the handshake where that is smaller: a batch larger than the broker takes is
/// refused whole, every time. (A broker that does not say is older, and its limit is the
/// producer's lookout.)
pub(crate) fn keep_to_broker_limit(batch_bytes_max: &AtomicU32, config: &ProducerConfig, client: &Client) {
    let broker_max = client.broker_versions().batch_bytes_max.unwrap_or(u32::MAX);
    batch_bytes_max.store(config.batch_bytes_max.min(broker_max), Ordering::Relaxed);
}

pub(crate) fn client_config(config: &ProducerConfig) -> ClientConfig {
    ClientConfig {
        client_id: config.client_id.clone(),
        request_timeout: config.durability_timeout + Duration::from_secs(10),
        ..ClientConfig::default()
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// What a lane log's first open batch allocates; it grows from there as needed.
const BATCH_CAPACITY_FIRST: usize = 16 * 1024;

impl OpenBatch {
    fn new(limits: BatchLimits, abandon: &Arc<Abandon>, capacity: usize) -> OpenBatch {
        let capacity = capacity.min(limits.batch_bytes_max as usize);
        OpenBatch {
            builder: RecordBatchBuilder::with_buffer(BytesMut::with_capacity(capacity), limits),
            result: Arc::new(BatchResult::new(Arc::clone(abandon))),
            opened_at: tokio::time::Instant::now(),
            reserved: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic(partitions: u32) -> TopicInfo {
        TopicInfo {
            name: Arc::from("t"),
            partitions,
            lanes: vec!["standard".to_owned()],
            keyless_first: 1,
            keyless_bytes: AtomicU64::new(0),
        }
    }

    #[test]
    fn records_without_a_key_fill_one_partition_for_a_batch_then_move_on() {
        let topic = topic(3);
        let record = ProducerRecord::new("t", vec![0u8; 29]);
        let record_bytes = record.encoded_len_max();
        assert_eq!(record_bytes, 100);
        let partitions: Vec<u32> = (0..35)
            .map(|_| topic.partition(&record, record_bytes, 1000).expect("partition").0)
            .collect();
        let expected: Vec<u32> = [1, 2, 0, 1].iter().flat_map(|&p| [p; 10]).take(35).collect();
        assert_eq!(partitions, expected);
    }

    #[test]
    fn keys_and_explicit_partitions_are_not_sticky() {
        let topic = topic(4);
        let keyed = ProducerRecord::new("t", "v").key("order-42");
        let by_key = partition_for_key(b"order-42", 4);
        for _ in 0..3 {
            assert_eq!(topic.partition(&keyed, 10_000, 1000).expect("partition"), by_key);
        }
        let pinned = ProducerRecord::new("t", "v").partition(PartitionId(3));
        assert_eq!(
            topic.partition(&pinned, 10, 1000).expect("partition"),
            PartitionId(3)
        );
        let missing = ProducerRecord::new("t", "v").partition(PartitionId(4));
        assert!(matches!(
            topic.partition(&missing, 10, 1000),
            Err(ProduceError::UnknownPartition { partition: 4, .. })
        ));
    }
}
