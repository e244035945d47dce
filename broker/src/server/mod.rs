//! The network side: [`Broker`] holds the state, [`Broker::serve`] accepts connections
//! on a listener it is handed, `connection` runs one connection, `dispatch` sends each
//! request to its handler.

mod admin;
mod connection;
mod dispatch;
mod fetch;
mod group;
mod produce;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Settings;
use crate::durability::Syncer;
use crate::group::Coordinator;
use crate::group::offsets::OffsetsError;
use crate::producer_ids::ProducerIds;
use crate::storage::{Reaper, StorageError};
use crate::topic::{TopicError, Topics};

/// The broker's software version, as ApiVersions reports it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Why the data directory could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Topics(#[from] TopicError),
    #[error(transparent)]
    Offsets(#[from] OffsetsError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// How often group sessions are checked for expiry.
const GROUP_TICK: Duration = Duration::from_millis(100);
/// With `cached_tail_bytes`, every this many group ticks the lane logs learn the lowest
/// offset groups have committed on them (a pass over every committed offset).
const GROUP_FLOOR_TICKS: u64 = 10;

/// A running broker's state.
#[derive(Debug)]
pub struct Broker {
    pub settings: Settings,
    pub topics: Topics,
    pub groups: Coordinator,
    producer_ids: ProducerIds,
    syncer: Arc<Syncer>,
    reaper: Arc<Reaper>,
    /// Bytes of requests being received or handled, over all connections.
    request_bytes: Arc<Semaphore>,
    connections: Arc<Semaphore>,
}

impl Broker {
    /// Opens the data directory: recovers every topic's lane logs and starts the
    /// fsync threads. Does not listen yet.
    pub fn open(settings: Settings) -> Result<Arc<Broker>, OpenError> {
        settings
            .validate()
            .map_err(|error| TopicError::InvalidConfig(error.to_string()))?;
        let syncer = Syncer::start(
            settings.fsync_threads,
            Duration::from_millis(settings.fsync_interval_ms),
        );
        let reaper = Reaper::start(settings.delete_bytes_per_s);
        let topics = Topics::open(&settings, Arc::clone(&syncer), Arc::clone(&reaper))?;
        let producer_ids = ProducerIds::open(settings.data_dir.join("meta"))?;
        let groups = Coordinator::open(&settings, &topics)?;
        Ok(Arc::new(Broker {
            request_bytes: Arc::new(Semaphore::new(
                usize::try_from(settings.requests_bytes_max).unwrap_or(usize::MAX >> 4),
            )),
            connections: Arc::new(Semaphore::new(settings.connections_max as usize)),
            settings,
            topics,
            groups,
            producer_ids,
            syncer,
            reaper,
        }))
    }

    /// Serves connections from `listener` until `shutdown` is cancelled; then stops
    /// accepting and lets every connection finish its in-flight requests (for at most
    /// `shutdown_ms_max`). Call [`Broker::close`] afterwards.
    pub async fn serve(self: &Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        let connections = TaskTracker::new();
        let retention = tokio::spawn(Arc::clone(self).run_retention(shutdown.clone()));
        let group_ticks = tokio::spawn(Arc::clone(self).run_group_ticks(shutdown.clone()));
        // Computing every group's backlog is work: only when something can see it.
        let backlog_metrics = (self.settings.metrics_listen != "off")
            .then(|| tokio::spawn(Arc::clone(self).run_backlog_metrics(shutdown.clone())));
        let mut refused: u64 = 0;
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, most likely: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = Arc::clone(&self.connections).try_acquire_owned() else {
                refused += 1;
                if refused.is_power_of_two() {
                    tracing::warn!(%peer, refused, limit = self.settings.connections_max,
                        "connections_max reached; closing new connections");
                }
                drop(stream);
                continue;
            };
            let broker = Arc::clone(self);
            let shutdown = shutdown.clone();
            metrics::counter!(crate::metrics::CONNECTIONS_ACCEPTED).increment(1);
            self.record_connections();
            connections.spawn(async move {
                connection::serve(Arc::clone(&broker), stream, peer, shutdown).await;
                drop(permit);
                broker.record_connections();
            });
        }
        connections.close();
        // In-flight durable acks need their fsync now, not at the next interval.
        self.topics.request_sync_all();
        let grace = Duration::from_millis(self.settings.shutdown_ms_max);
        if tokio::time::timeout(grace, connections.wait()).await.is_err() {
            tracing::warn!(
                ?grace,
                "connections still open after the shutdown grace period; closing them"
            );
        }
        retention.abort();
        group_ticks.abort();
        if let Some(task) = backlog_metrics {
            task.abort();
        }
    }

    /// Sets the open-connections gauge from the connection permits in use.
    fn record_connections(&self) {
        let open = self.settings.connections_max as usize - self.connections.available_permits();
        metrics::gauge!(crate::metrics::CONNECTIONS).set(open as f64);
    }

    async fn run_backlog_metrics(self: Arc<Self>, shutdown: CancellationToken) {
        let period = Duration::from_millis(self.settings.metrics_backlog_interval_ms.max(100));
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            // Set again, not only on connect and close: gauges not set for a while are
            // dropped from the export.
            self.record_connections();
            let broker = Arc::clone(&self);
            let _ = tokio::task::spawn_blocking(move || {
                broker.groups.record_backlog_metrics(&broker.topics);
                broker.topics.record_log_metrics();
            })
            .await;
        }
    }

    async fn run_group_ticks(self: Arc<Self>, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(GROUP_TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let share_floors = self.settings.cached_tail_bytes > 0;
        for tick in 0u64.. {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let share_floors = share_floors && tick.is_multiple_of(GROUP_FLOOR_TICKS);
            // Off the runtime's threads: expiring a group appends to the offsets log.
            let broker = Arc::clone(&self);
            let _ = tokio::task::spawn_blocking(move || {
                if broker.groups.tick(&broker.topics, std::time::Instant::now())
                    && let Err(error) = broker.groups.flush()
                {
                    tracing::warn!(%error, "could not flush the deleted offsets of expired groups");
                }
                if share_floors {
                    broker.groups.share_group_floors(&broker.topics);
                }
            })
            .await;
        }
    }

    async fn run_retention(self: Arc<Self>, shutdown: CancellationToken) {
        let period = Duration::from_millis(self.settings.retention_check_ms.max(1));
        let mut ticker = tokio::time::interval(period);
        ticker.tick().await;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let broker = Arc::clone(&self);
            let _ = tokio::task::spawn_blocking(move || broker.topics.enforce_retention()).await;
        }
    }

    /// Fsyncs and closes every lane log cleanly and stops the fsync threads.
    pub fn close(&self) -> Result<(), StorageError> {
        let result = self.topics.close().and(self.groups.close());
        self.syncer.stop();
        self.reaper.stop();
        result
    }
}

/// Most bytes of a per-item error message (one lane log's result).
const ITEM_MESSAGE_BYTES_MAX: usize = 128;

/// Keeps per-item error messages from multiplying a response: each is cut to
/// [`ITEM_MESSAGE_BYTES_MAX`], and one equal to the previous item's is sent empty (its
/// error code says the rest). Without this, a small request naming thousands of lane
/// logs of a bad topic would get a response a hundred times its size.
pub(crate) fn quiet_messages<'a>(messages: impl Iterator<Item = &'a mut String>) {
    let mut previous = String::new();
    for message in messages {
        if message.is_empty() {
            continue;
        }
        let cut = lanes_protocol::api::truncate(message, ITEM_MESSAGE_BYTES_MAX).len();
        message.truncate(cut);
        if *message == previous {
            message.clear();
        } else {
            previous.clone_from(message);
        }
    }
}

/// [`quiet_messages`] over the lane results of a response in the common nesting.
pub(crate) fn quiet_lane_messages<T>(
    topics: &mut [lanes_protocol::messages::TopicItems<T>],
    message: impl Fn(&mut T) -> &mut String,
) {
    quiet_messages(
        topics
            .iter_mut()
            .flat_map(|t| t.partitions.iter_mut())
            .flat_map(|p| p.lanes.iter_mut())
            .map(message),
    );
}

/// Runs `work`, which may block on disk I/O, without stalling the other tasks of this
/// runtime worker (on the multi-threaded runtime the broker uses).
pub(crate) fn blocking<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(work),
        _ => work(),
    }
}
