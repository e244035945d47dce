//! What a producer sends, and what it gets back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use lanes_protocol::{Lane, Offset, PartitionId};
use tokio::sync::Notify;

use crate::ProduceError;

/// Which lane a record goes to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum LaneSelector {
    /// The topic's lane named `standard` if it has one, else lane 0.
    #[default]
    Default,
    Index(Lane),
    Name(String),
}

/// One record to send.
#[derive(Clone, Debug)]
pub struct ProducerRecord {
    /// Shared, so that sending many records to one topic allocates nothing per record:
    /// keep an `Arc<str>` and clone it.
    pub topic: Arc<str>,
    pub key: Option<Bytes>,
    pub value: Bytes,
    pub headers: Vec<(Bytes, Option<Bytes>)>,
    pub lane: LaneSelector,
    /// `None`: from the key's hash; without a key, the partition the producer is filling
    /// (it moves on after `batch_bytes_max` bytes).
    pub partition: Option<PartitionId>,
    /// `None`: now.
    pub timestamp_ms: Option<i64>,
}

impl ProducerRecord {
    pub fn new(topic: impl Into<Arc<str>>, value: impl Into<Bytes>) -> ProducerRecord {
        ProducerRecord {
            topic: topic.into(),
            key: None,
            value: value.into(),
            headers: Vec::new(),
            lane: LaneSelector::Default,
            partition: None,
            timestamp_ms: None,
        }
    }

    #[must_use]
    pub fn key(mut self, key: impl Into<Bytes>) -> ProducerRecord {
        self.key = Some(key.into());
        self
    }

    #[must_use]
    pub fn lane(mut self, lane: LaneSelector) -> ProducerRecord {
        self.lane = lane;
        self
    }

    #[must_use]
    pub fn partition(mut self, partition: PartitionId) -> ProducerRecord {
        self.partition = Some(partition);
        self
    }

    #[must_use]
    pub fn header(mut self, key: impl Into<Bytes>, value: Option<Bytes>) -> ProducerRecord {
        self.headers.push((key.into(), value));
        self
    }

    #[must_use]
    pub fn timestamp_ms(mut self, timestamp_ms: i64) -> ProducerRecord {
        self.timestamp_ms = Some(timestamp_ms);
        self
    }

    /// Bytes the record takes in a batch, at most.
    pub(crate) fn encoded_len_max(&self) -> usize {
        // Seven varints of at most 10 bytes and an attributes byte, plus the contents.
        let headers: usize = self
            .headers
            .iter()
            .map(|(k, v)| 20 + k.len() + v.as_ref().map_or(0, Bytes::len))
            .sum();
        71 + self.key.as_ref().map_or(0, Bytes::len) + self.value.len() + headers
    }
}

/// Where an acknowledged record landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordMetadata {
    pub partition: PartitionId,
    pub lane: Lane,
    /// `None` with `acks = none` (the broker does not answer), or when a retry found the
    /// record appended so long ago that the broker no longer knows its offset.
    pub offset: Option<Offset>,
    /// When the producer learned of the acknowledgement (before any task waiting for
    /// it ran): for measuring acknowledgement latency.
    pub acknowledged_at: std::time::Instant,
}

/// Raised when the producer is dropped without `close`: its sender is gone, so
/// deliveries it never completed end with [`ProduceError::Closed`].
#[derive(Debug, Default)]
pub(crate) struct Abandon {
    raised: AtomicBool,
    notify: Notify,
}

impl Abandon {
    pub(crate) fn raise(&self) {
        self.raised.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }
}

/// The outcome of one batch, shared by the deliveries of its records.
#[derive(Debug)]
pub(crate) struct BatchResult {
    /// The batch's base offset (`None` with `acks = none`), or why it failed.
    outcome: OnceLock<Result<Option<Offset>, ProduceError>>,
    completed_at: OnceLock<std::time::Instant>,
    done: Notify,
    abandon: Arc<Abandon>,
}

impl BatchResult {
    pub(crate) fn new(abandon: Arc<Abandon>) -> BatchResult {
        BatchResult {
            outcome: OnceLock::new(),
            completed_at: OnceLock::new(),
            done: Notify::new(),
            abandon,
        }
    }

    pub(crate) fn complete(&self, outcome: Result<Option<Offset>, ProduceError>) {
        // The time first: whoever sees the outcome finds the time set.
        let _ = self.completed_at.set(std::time::Instant::now());
        if self.outcome.set(outcome).is_ok() {
            self.done.notify_waiters();
        }
    }

    pub(crate) async fn wait(&self) -> Result<Option<Offset>, ProduceError> {
        loop {
            let (done, abandoned) = (self.done.notified(), self.abandon.notify.notified());
            if let Some(outcome) = self.outcome.get() {
                return outcome.clone();
            }
            if self.abandon.raised.load(Ordering::Acquire) {
                return Err(ProduceError::Closed);
            }
            tokio::select! {
                () = done => {}
                () = abandoned => {}
            }
        }
    }
}

/// The pending acknowledgement of one sent record.
#[derive(Debug)]
pub struct Delivery {
    pub(crate) batch: Arc<BatchResult>,
    pub(crate) index: u32,
    pub(crate) partition: PartitionId,
    pub(crate) lane: Lane,
}

impl Delivery {
    /// The outcome if it is already known, without waiting.
    pub fn try_outcome(&self) -> Option<Result<RecordMetadata, ProduceError>> {
        let outcome = self.batch.outcome.get()?.clone();
        Some(outcome.map(|base| self.metadata(base)))
    }

    fn metadata(&self, base: Option<Offset>) -> RecordMetadata {
        RecordMetadata {
            partition: self.partition,
            lane: self.lane,
            offset: base.map(|base| base.plus(u64::from(self.index))),
            acknowledged_at: self
                .batch
                .completed_at
                .get()
                .copied()
                .unwrap_or_else(std::time::Instant::now),
        }
    }

    /// Waits until the broker has acknowledged the record (as the producer's `acks`
    /// ask) or the producer gave up on it.
    pub async fn wait(self) -> Result<RecordMetadata, ProduceError> {
        let base = self.batch.wait().await?;
        Ok(self.metadata(base))
    }
}
