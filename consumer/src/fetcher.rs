//! The background fetcher: long-polls the assigned lane logs and hands checked batches
//! to the consumer, holding at most `prefetch_bytes_max` bytes that the consumer has
//! not taken yet. A lost connection is made again (with backoff); fetching goes on from
//! the same positions.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use lanes_protocol::messages::{FetchLane, FetchRequest, OffsetSpec, TopicItems};
use lanes_protocol::{BatchLimits, Batches, ErrorCode, Offset, RecordBatch};
use tokio::sync::{Semaphore, mpsc};

use crate::link::Link;
use crate::{ConsumeError, ConsumerConfig, LogKey, ResetPolicy, list_offsets, push_lane};

/// Pause after a failed fetch before the next one.
const RETRY_BACKOFF: Duration = Duration::from_millis(200);

#[derive(Debug)]
pub(crate) enum FetcherCommand {
    /// Fetch these lane logs from these offsets; tag what is fetched with `epoch`.
    Assign {
        epoch: u64,
        positions: HashMap<LogKey, Offset>,
    },
}

/// What the fetcher tells the consumer.
#[derive(Debug)]
pub(crate) enum Fetched {
    /// A checked batch; `permits` of prefetch budget go back when it is taken.
    Batch {
        key: LogKey,
        epoch: u64,
        batch: RecordBatch,
        permits: usize,
    },
    /// The lane log no longer held the position; fetching went on from `offset`.
    Reset { key: LogKey, epoch: u64, offset: Offset },
    /// A lane log failed for good; it is not fetched again until positions change.
    Failed { epoch: u64, error: ConsumeError },
}

pub(crate) async fn run(
    client: Arc<Link>,
    config: ConsumerConfig,
    prefetch: Arc<Semaphore>,
    mut commands: mpsc::UnboundedReceiver<FetcherCommand>,
    fetched: mpsc::Sender<Fetched>,
) {
    let mut epoch = 0;
    let mut positions: HashMap<LogKey, Offset> = HashMap::new();
    // Never ask for more than the budget holds: a response (apart from one oversized
    // batch, below) always fits.
    let reserve = (config.fetch_bytes_max as usize).min(config.prefetch_bytes_max);
    loop {
        while let Ok(command) = commands.try_recv() {
            apply(command, &mut epoch, &mut positions);
        }
        if positions.is_empty() {
            match commands.recv().await {
                Some(command) => apply(command, &mut epoch, &mut positions),
                None => return,
            }
            continue;
        }
        // Room for one response before asking for it.
        let Ok(permit) = prefetch.acquire_many(reserve as u32).await else {
            return;
        };
        permit.forget();
        let request = fetch_request(&config, &positions, reserve);
        let response = tokio::select! {
            response = client.request(&request) => response,
            command = commands.recv() => {
                prefetch.add_permits(reserve);
                match command {
                    Some(command) => apply(command, &mut epoch, &mut positions),
                    None => return,
                }
                continue;
            }
        };
        let response = match response {
            Ok(response) => response,
            Err(error) => {
                prefetch.add_permits(reserve);
                tracing::warn!(%error, "fetch failed; retrying");
                tokio::time::sleep(RETRY_BACKOFF).await;
                continue;
            }
        };
        let mut events = Vec::new();
        let mut sizes = Vec::new();
        let mut failed_lanes = Vec::new();
        let mut back_off = false;
        for topic in response.topics {
            let name: Arc<str> = Arc::from(topic.name.as_str());
            for partition in topic.partitions {
                for lane in partition.lanes {
                    let key = LogKey {
                        topic: Arc::clone(&name),
                        partition: partition.partition,
                        lane: lane.lane,
                    };
                    let Some(position) = positions.get_mut(&key) else {
                        continue;
                    };
                    match lane.error_code {
                        ErrorCode::None => {}
                        ErrorCode::OffsetOutOfRange => {
                            match reset(&client, &config, &key, *position).await {
                                Ok(offset) => {
                                    *position = offset;
                                    events.push(Fetched::Reset { key, epoch, offset });
                                }
                                Err(error) => {
                                    events.push(Fetched::Failed { epoch, error });
                                    failed_lanes.push(key);
                                }
                            }
                            continue;
                        }
                        code if code.is_retriable() => {
                            back_off = true;
                            continue;
                        }
                        code => {
                            // Reported once; this lane log is not fetched again until
                            // the consumer seeks or reassigns it.
                            events.push(Fetched::Failed {
                                epoch,
                                error: ConsumeError::Fetch {
                                    topic: key.topic.to_string(),
                                    partition: key.partition,
                                    lane: key.lane,
                                    code,
                                    message: lane.error_message,
                                },
                            });
                            failed_lanes.push(key);
                            continue;
                        }
                    }
                    let limits = BatchLimits {
                        batch_bytes_max: u32::MAX,
                        batch_records_max: u32::MAX,
                    };
                    for batch in Batches::new(lane.records, limits) {
                        let batch = match batch {
                            Ok(batch) if batch.last_offset() < *position => continue,
                            // The base offset is outside the checksum: a batch that starts
                            // past the position would silently skip records.
                            Ok(batch) if batch.base_offset() > *position => Err(format!(
                                "batch starts at offset {} but {} was expected",
                                batch.base_offset(),
                                *position
                            )),
                            Ok(batch) => Ok(batch),
                            Err(error) => Err(error.to_string()),
                        };
                        match batch {
                            Ok(batch) => {
                                *position = batch.last_offset().plus(1);
                                sizes.push(batch.bytes().len());
                                events.push(Fetched::Batch {
                                    key: key.clone(),
                                    epoch,
                                    batch,
                                    permits: 0,
                                });
                            }
                            Err(error) => {
                                events.push(Fetched::Failed {
                                    epoch,
                                    error: ConsumeError::InvalidBatch(format!(
                                        "{} partition {} lane {}: {error}",
                                        key.topic, key.partition, key.lane
                                    )),
                                });
                                failed_lanes.push(key.clone());
                                break;
                            }
                        }
                    }
                }
            }
        }
        // Settle the budget with what the response held. One batch may be larger than
        // the whole budget (a fetch always returns at least one batch): then the budget
        // is held in full, never more, so the permits cannot outgrow the semaphore.
        let used: usize = sizes.iter().sum();
        let held = used.min(config.prefetch_bytes_max);
        if held < reserve {
            prefetch.add_permits(reserve - held);
        } else if held > reserve {
            match prefetch.acquire_many((held - reserve) as u32).await {
                Ok(extra) => extra.forget(),
                Err(_) => return,
            }
        }
        let mut unassigned = held;
        let mut sizes = sizes.into_iter();
        for mut event in events {
            if let Fetched::Batch { permits, .. } = &mut event {
                *permits = sizes.next().unwrap_or(0).min(unassigned);
                unassigned -= *permits;
            }
            if fetched.send(event).await.is_err() {
                return;
            }
        }
        for key in failed_lanes {
            positions.remove(&key);
        }
        if back_off {
            tokio::time::sleep(RETRY_BACKOFF).await;
        }
    }
}

fn apply(command: FetcherCommand, epoch: &mut u64, positions: &mut HashMap<LogKey, Offset>) {
    match command {
        FetcherCommand::Assign {
            epoch: new_epoch,
            positions: new_positions,
        } => {
            *epoch = new_epoch;
            *positions = new_positions;
        }
    }
}

fn fetch_request(
    config: &ConsumerConfig,
    positions: &HashMap<LogKey, Offset>,
    bytes_max: usize,
) -> FetchRequest {
    let bytes_max = u32::try_from(bytes_max).unwrap_or(u32::MAX);
    let mut keys: Vec<(&LogKey, &Offset)> = positions.iter().collect();
    keys.sort();
    let mut topics: Vec<TopicItems<FetchLane>> = Vec::new();
    for (key, offset) in keys {
        push_lane(
            &mut topics,
            key,
            FetchLane {
                lane: key.lane,
                offset: *offset,
                bytes_max: config.lane_bytes_max.min(bytes_max),
            },
        );
    }
    FetchRequest {
        wait_ms_max: u32::try_from(config.fetch_wait.as_millis()).unwrap_or(u32::MAX),
        bytes_min: config.fetch_bytes_min,
        bytes_max,
        lane_bytes_max: Vec::new(),
        topics,
    }
}

/// Where to continue a lane log that no longer holds `offset`.
async fn reset(
    client: &Link,
    config: &ConsumerConfig,
    key: &LogKey,
    offset: Offset,
) -> Result<Offset, ConsumeError> {
    let spec = match config.reset {
        ResetPolicy::Earliest => OffsetSpec::Earliest,
        ResetPolicy::Latest => OffsetSpec::Latest,
        ResetPolicy::Fail => {
            return Err(ConsumeError::OffsetOutOfRange {
                topic: key.topic.to_string(),
                partition: key.partition,
                lane: key.lane,
                offset,
            });
        }
    };
    let offset = list_offsets(client, std::slice::from_ref(key), spec).await?[0];
    tracing::info!(topic = %key.topic, partition = %key.partition, lane = %key.lane, %offset,
        "offset out of range; reset");
    Ok(offset)
}
