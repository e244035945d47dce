//! The sender task: seals batches, sends them, retries them, completes deliveries.
//!
//! Per lane log it keeps the batches waiting to be sent (in the order they were
//! sealed) and those in flight. It sends lane 0's batches first, at most
//! `in_flight_per_log_max` per lane log, and never lets a batch overtake an earlier one
//! of its lane log: a batch waiting out a retry backoff holds back those after it.
//!
//! A retriable failure puts the batch back in its place. Each batch remembers whether
//! an attempt may have appended it: a lost connection, a timeout or `REQUEST_TIMED_OUT`
//! leave that possible, while an error the broker gives after its duplicate check
//! (`OUT_OF_ORDER_SEQUENCE`, `STORAGE_FULL`) proves it was not.
//!
//! A permanent failure fails the batch, and with idempotence leaves a hole in the lane
//! log's sequence that nothing can fill. The lane log then *resets*: batches that may
//! already be in the log keep being retried as they are (a retry of an appended batch is
//! recognized; one that was not appended now gets `OUT_OF_ORDER_SEQUENCE`, which proves
//! it); once none are left in doubt, the lane log gets a fresh producer id and the
//! waiting batches, none of them in the log, are renumbered from 0. Renumbering a batch
//! that might be in the log would append it twice.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lanes_protocol::client::{Client, ClientError};
use lanes_protocol::messages::{
    Acks, InitProducerIdRequest, PartitionItems, ProduceLane, ProduceRequest, ProduceResponse, TopicItems,
};
use lanes_protocol::record_batch::{ProducerStamp, restamp_producer, sequence_plus};
use lanes_protocol::{ErrorCode, Lane, Offset, PartitionId, RecordBatchBuilder};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::record::BatchResult;
use crate::{ProduceError, Shared, client_config, keep_to_broker_limit};

/// A lane log, as the producer addresses it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct LogKey {
    pub(crate) topic: Arc<str>,
    pub(crate) partition: PartitionId,
    pub(crate) lane: Lane,
}

/// A batch still taking records.
#[derive(Debug)]
pub(crate) struct OpenBatch {
    pub(crate) builder: RecordBatchBuilder,
    pub(crate) result: Arc<BatchResult>,
    pub(crate) opened_at: Instant,
    /// Buffer bytes held for its records.
    pub(crate) reserved: usize,
}

/// Batches between `send` and the sender: open ones per lane log, and full ones; and
/// the topics `send` looked up, under the same lock so that a send takes only one.
#[derive(Debug, Default)]
pub(crate) struct Accumulator {
    pub(crate) open: foldhash::HashMap<LogKey, OpenBatch>,
    pub(crate) closed: VecDeque<(LogKey, OpenBatch)>,
    pub(crate) topics: foldhash::HashMap<Arc<str>, Arc<crate::TopicInfo>>,
}

#[derive(Debug)]
pub(crate) enum Command {
    /// Send everything now; answer with the results to wait for.
    Flush(oneshot::Sender<Vec<Arc<BatchResult>>>),
    Stop,
}

/// A finished batch.
#[derive(Debug)]
struct Sealed {
    bytes: Bytes,
    records: u32,
    base_sequence: i32,
    result: Arc<BatchResult>,
    reserved: usize,
    created: Instant,
    not_before: Instant,
    last_error: String,
    /// An attempt may have appended it (the outcome was not known).
    maybe_appended: bool,
}

#[derive(Debug, Default)]
struct LogState {
    /// Producer id and epoch for this lane log (idempotent producers only).
    producer: Option<(i64, i16)>,
    next_sequence: i32,
    /// By seal number: waiting to be sent, in order.
    waiting: BTreeMap<u64, Sealed>,
    in_flight: BTreeMap<u64, Sealed>,
    /// A batch failed for good: settle the batches in doubt, then renumber the rest
    /// under a new producer id.
    resetting: bool,
}

impl LogState {
    /// The batch this lane log sends next (once its backoff is over): the oldest waiting
    /// one. While resetting, the oldest of those an attempt may have appended: each
    /// answer to one (a duplicate, or out of order) settles it, and the others wait to
    /// be renumbered. Holding those behind one that waits for the renumbering would
    /// leave the reset unsettled until the delivery timeout.
    fn next_to_send(&self) -> Option<(u64, &Sealed)> {
        let mut waiting = self.waiting.iter();
        let next = if self.resetting {
            waiting.find(|(_, batch)| batch.maybe_appended)
        } else {
            waiting.next()
        };
        next.map(|(number, batch)| (*number, batch))
    }
}

/// What a finished request reports.
struct Done {
    sent: Vec<(LogKey, u64)>,
    result: Result<Option<ProduceResponse>, ClientError>,
}

type Request = Pin<Box<dyn Future<Output = Done> + Send>>;

struct Sender {
    shared: Arc<Shared>,
    logs: foldhash::HashMap<LogKey, LogState>,
    next_number: u64,
    client: Option<Arc<Client>>,
    reconnect_at: Instant,
    /// The producer id new lane logs start with (idempotent producers).
    producer: Option<(i64, i16)>,
}

pub(crate) async fn run(
    shared: Arc<Shared>,
    client: Arc<Client>,
    producer: Option<(i64, i16)>,
    mut commands: mpsc::Receiver<Command>,
) {
    let mut sender = Sender {
        shared: Arc::clone(&shared),
        logs: foldhash::HashMap::default(),
        next_number: 0,
        client: Some(client),
        reconnect_at: Instant::now(),
        producer,
    };
    let mut requests: FuturesUnordered<Request> = FuturesUnordered::new();
    let mut stopping = false;
    loop {
        let now = Instant::now();
        // Expiry first: a batch it removes may be what held an open batch back, and
        // nothing else would wake the loop to seal that one.
        sender.expire(now);
        let next_linger = sender.seal(now, false);
        sender.send(&mut requests, now).await;
        if stopping && requests.is_empty() && sender.idle() {
            return;
        }
        // Instants after `now`, the one this pass decided by. One that came while `send`
        // ran (a reconnection can outlast a retry's backoff) was not due to this pass:
        // it wakes the loop at once. One at or before `now` was due, and is held back by
        // something a completion or a reconnection ends: waiting for it would spin.
        // (Dropping the first kind left a retried batch asleep until its delivery
        // timeout when nothing else woke the sender.)
        let deadline = [
            next_linger,
            sender.next_retry(now),
            sender.next_expiry(),
            sender.next_reconnect(now),
        ]
        .into_iter()
        .flatten()
        .filter(|at| *at > now)
        .min()
        .unwrap_or_else(|| now + std::time::Duration::from_secs(3600));
        tokio::select! {
            Some(done) = requests.next(), if !requests.is_empty() => sender.complete(done),
            () = shared.wake.notified() => {}
            command = commands.recv() => match command {
                Some(Command::Flush(reply)) => {
                    sender.seal(Instant::now(), true);
                    let _ = reply.send(sender.outstanding());
                }
                Some(Command::Stop) | None => stopping = true,
            },
            () = tokio::time::sleep_until(deadline) => {}
        }
    }
}

impl Sender {
    /// Moves full batches, and open ones that lingered long enough (all of them with
    /// `force`), to their lane logs; returns when the next open batch is due.
    ///
    /// A lingered batch is sealed only when its lane log could send it now (nothing
    /// sealed waits and a slot is free): otherwise it keeps taking records until it can
    /// go or is full. So under load batches grow by themselves, and with no linger a
    /// record waits for nothing but the batches ahead of it.
    fn seal(&mut self, now: Instant, force: bool) -> Option<Instant> {
        let config = &self.shared.config;
        let logs = &self.logs;
        let can_send = |key: &LogKey| {
            logs.get(key).is_none_or(|log| {
                log.waiting.is_empty() && log.in_flight.len() < config.in_flight_per_log_max
            })
        };
        let linger = |key: &LogKey| {
            config
                .lane_linger
                .get(key.lane.0 as usize)
                .copied()
                .unwrap_or(config.linger)
        };
        let mut ready = Vec::new();
        let next_due = {
            let mut accumulator = self.shared.accumulator.lock().expect("accumulator lock poisoned");
            ready.extend(accumulator.closed.drain(..));
            let due: Vec<LogKey> = accumulator
                .open
                .iter()
                .filter(|(key, open)| force || (open.opened_at + linger(key) <= now && can_send(key)))
                .map(|(key, _)| key.clone())
                .collect();
            for key in due {
                let open = accumulator.open.remove(&key).expect("listed");
                ready.push((key, open));
            }
            accumulator
                .open
                .iter()
                .map(|(key, open)| open.opened_at + linger(key))
                .min()
        };
        for (key, open) in ready {
            self.enqueue(key, open, now);
        }
        next_due
    }

    fn enqueue(&mut self, key: LogKey, open: OpenBatch, now: Instant) {
        let producer = self.producer;
        let log = self.logs.entry(key).or_insert_with(|| LogState {
            producer,
            ..LogState::default()
        });
        let records = open.builder.record_count();
        // `send` opens no batch it does not push a record into. Were one left empty all
        // the same, it is dropped here in release builds: sealing it would panic and stop
        // every delivery.
        debug_assert!(records > 0, "an empty batch was opened");
        if records == 0 {
            return;
        }
        let stamp = match log.producer {
            Some((producer_id, producer_epoch)) => ProducerStamp {
                producer_id,
                producer_epoch,
                base_sequence: log.next_sequence,
            },
            None => ProducerStamp::NONE,
        };
        if log.producer.is_some() {
            log.next_sequence = sequence_plus(log.next_sequence, records);
        }
        let sealed = Sealed {
            bytes: open.builder.finish(stamp),
            records,
            base_sequence: stamp.base_sequence,
            result: open.result,
            reserved: open.reserved,
            created: open.opened_at,
            not_before: now,
            last_error: String::new(),
            maybe_appended: false,
        };
        log.waiting.insert(self.next_number, sealed);
        self.next_number += 1;
    }

    fn idle(&self) -> bool {
        let accumulator = self.shared.accumulator.lock().expect("accumulator lock poisoned");
        accumulator.open.is_empty()
            && accumulator.closed.is_empty()
            && self
                .logs
                .values()
                .all(|log| log.waiting.is_empty() && log.in_flight.is_empty())
    }

    fn has_waiting(&self) -> bool {
        self.logs.values().any(|log| !log.waiting.is_empty())
    }

    /// When the earliest backed-off batch may go again.
    fn next_retry(&self, now: Instant) -> Option<Instant> {
        self.logs
            .values()
            .filter_map(|log| log.next_to_send().map(|(_, batch)| batch.not_before))
            .filter(|at| *at > now)
            .min()
    }

    /// When to try connecting again. One already due counts as due in a millisecond:
    /// the loop drops instants in the past, and time passes between `send` deciding it
    /// was too early and this check. Dropping it left the sender asleep until the
    /// delivery timeout whenever no new record came to wake it (a producer held back
    /// by its own unacknowledged records), which stalled a producer after a broker
    /// restart for 120 s in about one crash-suite run in ten.
    fn next_reconnect(&self, now: Instant) -> Option<Instant> {
        let disconnected = self.client.as_ref().is_none_or(|c| c.is_closed());
        (disconnected && self.has_waiting())
            .then(|| self.reconnect_at.max(now + std::time::Duration::from_millis(1)))
    }

    /// Fails the waiting batches that are out of time: while the broker cannot be
    /// reached they are never sent, so the retry path never sees them.
    fn expire(&mut self, now: Instant) {
        let timeout = self.shared.config.delivery_timeout;
        for log in self.logs.values_mut() {
            let expired: Vec<u64> = log
                .waiting
                .iter()
                .filter(|(_, batch)| now.duration_since(batch.created) >= timeout)
                .map(|(number, _)| *number)
                .collect();
            for number in expired {
                let batch = log.waiting.remove(&number).expect("listed");
                let last_error = if batch.last_error.is_empty() {
                    "the broker could not be reached".to_owned()
                } else {
                    batch.last_error.clone()
                };
                batch.result.complete(Err(ProduceError::TimedOut(last_error)));
                self.shared.buffer.add_permits(batch.reserved);
                if log.producer.is_some() {
                    log.resetting = true;
                }
            }
        }
    }

    /// When the oldest waiting batch runs out of time.
    fn next_expiry(&self) -> Option<Instant> {
        let timeout = self.shared.config.delivery_timeout;
        self.logs
            .values()
            .flat_map(|log| log.waiting.values())
            .map(|batch| batch.created + timeout)
            .min()
    }

    /// Results of every batch not yet completed.
    fn outstanding(&self) -> Vec<Arc<BatchResult>> {
        self.logs
            .values()
            .flat_map(|log| log.waiting.values().chain(log.in_flight.values()))
            .map(|batch| Arc::clone(&batch.result))
            .collect()
    }

    async fn connect(&mut self, now: Instant) -> Option<Arc<Client>> {
        if let Some(client) = self.client.as_ref().filter(|c| !c.is_closed()) {
            return Some(Arc::clone(client));
        }
        if now < self.reconnect_at {
            return None;
        }
        let config = &self.shared.config;
        match Client::connect(&config.broker, client_config(config)).await {
            Ok(client) => {
                // The broker may have restarted with another batch limit.
                keep_to_broker_limit(&self.shared.batch_bytes_max, config, &client);
                let client = Arc::new(client);
                self.client = Some(Arc::clone(&client));
                Some(client)
            }
            Err(error) => {
                tracing::warn!(broker = %config.broker, %error, "cannot reach the broker; retrying");
                self.reconnect_at = Instant::now() + config.retry_backoff;
                None
            }
        }
    }

    /// Sends every batch that may go now, in requests of at most `request_bytes_max`.
    async fn send(&mut self, requests: &mut FuturesUnordered<Request>, now: Instant) {
        if !self.has_waiting() {
            return;
        }
        let Some(client) = self.connect(now).await else {
            return;
        };
        self.reset_logs(&client).await;
        let config = Arc::clone(&self.shared);
        let config = &config.config;
        // Lane 0 of every lane log before lane 1, and so on.
        let mut keys: Vec<LogKey> = self.logs.keys().cloned().collect();
        keys.sort_by(|a, b| (a.lane, &a.topic, a.partition).cmp(&(b.lane, &b.topic, b.partition)));
        // `queue` waits for a free slot on the connection, and slots free up only as this
        // task completes requests: never queue more than there are slots, less one for
        // the InitProducerId a reset sends.
        let slots = client.requests_in_flight_max().saturating_sub(1).max(1);
        let mut lists: Vec<Vec<(LogKey, u64, Bytes)>> = Vec::new();
        let mut batch_list: Vec<(LogKey, u64, Bytes)> = Vec::new();
        let mut size = 0;
        'keys: for key in keys {
            let log = self.logs.get_mut(&key).expect("listed");
            while log.in_flight.len() < config.in_flight_per_log_max {
                if batch_list.is_empty() && requests.len() + lists.len() >= slots {
                    break 'keys;
                }
                // Requests of only less urgent batches leave the last slots to lane 0's,
                // so an express batch never waits behind a queue of bulk requests.
                // Checked per batch: one lane log may start several requests.
                if key.lane.0 > 0
                    && batch_list.is_empty()
                    && requests.len() + lists.len() >= config.requests_in_flight_max.max(1)
                {
                    break 'keys;
                }
                let Some((number, next)) = log.next_to_send() else {
                    break;
                };
                if next.not_before > now {
                    break;
                }
                let batch = log.waiting.remove(&number).expect("just seen");
                size += batch.bytes.len();
                batch_list.push((key.clone(), number, batch.bytes.clone()));
                log.in_flight.insert(number, batch);
                if size >= config.request_bytes_max {
                    lists.push(std::mem::take(&mut batch_list));
                    size = 0;
                }
            }
        }
        if !batch_list.is_empty() {
            lists.push(batch_list);
        }
        // Queued one after another: batches of a lane log must reach the broker in
        // order, whatever order the response futures are polled in.
        for batches in lists {
            let request = queue(&client, config, batches).await;
            requests.push(request);
        }
    }

    /// Gives resetting lane logs a new producer id once no batch of theirs is in doubt,
    /// and renumbers their waiting batches from 0.
    async fn reset_logs(&mut self, client: &Client) {
        for log in self.logs.values_mut() {
            let settled = log.in_flight.is_empty() && log.waiting.values().all(|b| !b.maybe_appended);
            if !log.resetting || !settled {
                continue;
            }
            let Ok(id) = client.request(&InitProducerIdRequest).await else {
                return;
            };
            log.producer = Some((id.producer_id, id.producer_epoch));
            log.next_sequence = 0;
            for batch in log.waiting.values_mut() {
                let mut bytes = BytesMut::from(&batch.bytes[..]);
                let stamp = ProducerStamp {
                    producer_id: id.producer_id,
                    producer_epoch: id.producer_epoch,
                    base_sequence: log.next_sequence,
                };
                restamp_producer(&mut bytes, stamp);
                batch.bytes = bytes.freeze();
                batch.base_sequence = log.next_sequence;
                log.next_sequence = sequence_plus(log.next_sequence, batch.records);
            }
            log.resetting = false;
        }
    }

    fn complete(&mut self, done: Done) {
        let now = Instant::now();
        match done.result {
            Ok(Some(response)) => {
                let mut results = response
                    .topics
                    .into_iter()
                    .flat_map(|topic| topic.partitions.into_iter().flat_map(|p| p.lanes));
                for (key, number) in done.sent {
                    let Some(result) = results.next() else {
                        self.retry(&key, number, "the response left the batch out".into(), true, now);
                        continue;
                    };
                    let message = format!("{}: {}", result.error_code, result.error_message);
                    match result.error_code {
                        ErrorCode::None => self.succeed(&key, number, Some(result.base_offset)),
                        // Appended by an earlier attempt whose offsets the broker no
                        // longer remembers: delivered, offsets unknown.
                        ErrorCode::DuplicateSequence => self.succeed(&key, number, None),
                        // Refused after the duplicate check: certainly not in the log.
                        ErrorCode::OutOfOrderSequence | ErrorCode::StorageFull => {
                            self.retry(&key, number, message, false, now);
                        }
                        code if code.is_retriable() => self.retry(&key, number, message, true, now),
                        code => self.fail(
                            &key,
                            number,
                            ProduceError::Broker {
                                code,
                                message: result.error_message,
                            },
                        ),
                    }
                }
            }
            Ok(None) => {
                for (key, number) in done.sent {
                    self.succeed(&key, number, None);
                }
            }
            Err(error) if error.is_connection_lost() || error.code().is_some_and(ErrorCode::is_retriable) => {
                if error.is_connection_lost() {
                    self.client = None;
                }
                for (key, number) in done.sent {
                    self.retry(&key, number, error.to_string(), true, now);
                }
            }
            Err(error) => {
                let error = ProduceError::from(error);
                for (key, number) in done.sent {
                    self.fail(&key, number, error.clone());
                }
            }
        }
    }

    fn take_in_flight(&mut self, key: &LogKey, number: u64) -> Option<(&mut LogState, Sealed)> {
        let log = self.logs.get_mut(key)?;
        let batch = log.in_flight.remove(&number)?;
        Some((log, batch))
    }

    fn succeed(&mut self, key: &LogKey, number: u64, base_offset: Option<Offset>) {
        if let Some((_, batch)) = self.take_in_flight(key, number) {
            batch.result.complete(Ok(base_offset));
            self.shared.buffer.add_permits(batch.reserved);
        }
    }

    /// Puts a batch back to wait its turn; `maybe_appended` says whether this attempt
    /// may have appended it.
    fn retry(&mut self, key: &LogKey, number: u64, message: String, maybe_appended: bool, now: Instant) {
        let shared = Arc::clone(&self.shared);
        let config = &shared.config;
        let Some((log, mut batch)) = self.take_in_flight(key, number) else {
            return;
        };
        if now.duration_since(batch.created) >= config.delivery_timeout {
            batch.result.complete(Err(ProduceError::TimedOut(message)));
            shared.buffer.add_permits(batch.reserved);
            if log.producer.is_some() {
                log.resetting = true;
            }
            return;
        }
        tracing::debug!(topic = %key.topic, partition = %key.partition, lane = %key.lane, %message, "retrying a batch");
        batch.not_before = now + config.retry_backoff;
        batch.last_error = message;
        batch.maybe_appended = maybe_appended;
        log.waiting.insert(number, batch);
    }

    fn fail(&mut self, key: &LogKey, number: u64, error: ProduceError) {
        let Some((log, batch)) = self.take_in_flight(key, number) else {
            return;
        };
        tracing::warn!(topic = %key.topic, partition = %key.partition, lane = %key.lane, %error,
            sequence = batch.base_sequence, "a batch failed");
        if log.producer.is_some() {
            log.resetting = true;
        }
        batch.result.complete(Err(error));
        self.shared.buffer.add_permits(batch.reserved);
    }
}

/// Queues one produce request for `batches` on the connection; returns the wait for
/// its outcome.
async fn queue(
    client: &Client,
    config: &crate::ProducerConfig,
    batches: Vec<(LogKey, u64, Bytes)>,
) -> Request {
    let mut topics: Vec<TopicItems<ProduceLane>> = Vec::new();
    let mut sent = Vec::with_capacity(batches.len());
    for (key, number, bytes) in batches {
        let topic_index = match topics.iter().position(|t| *t.name == *key.topic) {
            Some(index) => index,
            None => {
                topics.push(TopicItems {
                    name: key.topic.to_string(),
                    partitions: Vec::new(),
                });
                topics.len() - 1
            }
        };
        let partitions = &mut topics[topic_index].partitions;
        let partition_index = match partitions.iter().position(|p| p.partition == key.partition) {
            Some(index) => index,
            None => {
                partitions.push(PartitionItems {
                    partition: key.partition,
                    lanes: Vec::new(),
                });
                partitions.len() - 1
            }
        };
        partitions[partition_index].lanes.push(ProduceLane {
            lane: key.lane,
            batch: bytes,
        });
        sent.push((key, number));
    }
    // The response lists lanes in request order: topic by topic, partition by partition.
    let mut order = Vec::with_capacity(sent.len());
    for topic in &topics {
        for partition in &topic.partitions {
            for lane in &partition.lanes {
                let position = sent
                    .iter()
                    .position(|(key, _)| {
                        *key.topic == *topic.name
                            && key.partition == partition.partition
                            && key.lane == lane.lane
                    })
                    .expect("every lane was sent");
                // `remove`, not `swap_remove`: batches of one lane log keep their order.
                order.push(sent.remove(position));
            }
        }
    }
    let request = ProduceRequest {
        acks: config.acks,
        timeout_ms: u32::try_from(config.durability_timeout.as_millis()).unwrap_or(u32::MAX),
        topics,
    };
    if request.acks == Acks::None {
        let result = client.send_only(&request).await.map(|()| None);
        return Box::pin(std::future::ready(Done { sent: order, result }));
    }
    match client.queue(&request).await {
        Ok(response) => Box::pin(async move {
            let result = response.wait().await.map(Some);
            Done { sent: order, result }
        }),
        Err(error) => Box::pin(std::future::ready(Done {
            sent: order,
            result: Err(error),
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Abandon;

    fn sealed(maybe_appended: bool) -> Sealed {
        let now = Instant::now();
        Sealed {
            bytes: Bytes::new(),
            records: 1,
            base_sequence: 0,
            result: Arc::new(BatchResult::new(Arc::new(Abandon::default()))),
            reserved: 0,
            created: now,
            not_before: now,
            last_error: String::new(),
            maybe_appended,
        }
    }

    #[test]
    fn a_resetting_log_sends_the_batches_in_doubt_past_those_that_wait_to_be_renumbered() {
        let mut log = LogState::default();
        log.waiting.insert(1, sealed(false));
        log.waiting.insert(2, sealed(true));
        log.waiting.insert(3, sealed(true));
        assert_eq!(log.next_to_send().map(|(number, _)| number), Some(1));
        log.resetting = true;
        assert_eq!(log.next_to_send().map(|(number, _)| number), Some(2));
        log.waiting.remove(&2);
        assert_eq!(log.next_to_send().map(|(number, _)| number), Some(3));
        log.waiting.remove(&3);
        // Nothing in doubt: the reset can settle, and batch 1 waits for its new number.
        assert_eq!(log.next_to_send().map(|(number, _)| number), None);
    }
}
