//! The background fetcher: long-polls the assigned lane logs and hands checked batches
//! to the consumer, holding at most `lane_prefetch_bytes_max` bytes per lane that the
//! application has not taken yet. A lane whose budget is full is left out of the next
//! fetch while the others go on, and the request's per-lane caps keep the broker from
//! sending a lane more than its budget has room for. A lost connection is made again
//! (with backoff); fetching goes on from the same positions.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use lanes_protocol::messages::{FetchLane, FetchRequest, OffsetSpec, TopicItems};
use lanes_protocol::{BatchLimits, Batches, ErrorCode, LANES_MAX, Offset, RecordBatch};
use tokio::sync::mpsc;

use crate::budget::LaneBudgets;
use crate::link::Link;
use crate::{ConsumeError, ConsumerConfig, LogKey, ResetPolicy, list_offsets, push_lane};

/// Pause after a failed fetch before the next one.
const RETRY_BACKOFF: Duration = Duration::from_millis(200);
/// Long-poll wait while some lane is left out for lack of budget: it may get room any
/// moment, and should not wait out a whole long poll of the others.
const WAIT_WITH_LANES_LEFT_OUT: Duration = Duration::from_millis(20);

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
    /// A checked batch; its `bytes` of its lane's budget go back when its records are
    /// handed out or dropped.
    Batch {
        key: LogKey,
        epoch: u64,
        batch: RecordBatch,
        bytes: usize,
    },
    /// The lane log no longer held the position; fetching went on from `offset`.
    Reset { key: LogKey, epoch: u64, offset: Offset },
    /// A lane log failed for good; it is not fetched again until positions change.
    Failed { epoch: u64, error: ConsumeError },
}

pub(crate) async fn run(
    client: Arc<Link>,
    config: ConsumerConfig,
    budgets: Arc<LaneBudgets>,
    mut commands: mpsc::UnboundedReceiver<FetcherCommand>,
    fetched: mpsc::Sender<Fetched>,
) {
    let mut epoch = 0;
    let mut positions: HashMap<LogKey, Offset> = HashMap::new();
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
        // Room in each lane's budget before asking; lanes without room wait.
        let mut lanes: Vec<usize> = positions.keys().map(|k| k.lane.0 as usize).collect();
        lanes.sort_unstable();
        lanes.dedup();
        let mut reserved = [0usize; LANES_MAX];
        for &lane in &lanes {
            reserved[lane] = budgets.reserve(lane, config.fetch_bytes_max as usize);
        }
        let release_all = |reserved: &[usize; LANES_MAX]| {
            for (lane, bytes) in reserved.iter().enumerate() {
                budgets.release(lane, *bytes);
            }
        };
        if reserved.iter().all(|r| *r == 0) {
            tokio::select! {
                () = budgets.wait_for_any(&lanes) => {}
                command = commands.recv() => match command {
                    Some(command) => apply(command, &mut epoch, &mut positions),
                    None => return,
                },
            }
            continue;
        }
        let request = fetch_request(&config, &positions, &reserved);
        let response = tokio::select! {
            response = client.request(&request) => response,
            command = commands.recv() => {
                release_all(&reserved);
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
                release_all(&reserved);
                tracing::warn!(%error, "fetch failed; retrying");
                tokio::time::sleep(RETRY_BACKOFF).await;
                continue;
            }
        };
        let mut events = Vec::new();
        let mut used = [0usize; LANES_MAX];
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
                                let bytes = batch.bytes().len();
                                used[key.lane.0 as usize] += bytes;
                                events.push(Fetched::Batch {
                                    key: key.clone(),
                                    epoch,
                                    batch,
                                    bytes,
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
        // Settle each lane's budget with what the response held: the batches are held
        // until the application takes their records (or they are dropped). A lane may
        // have got one batch more than it reserved.
        for lane in 0..LANES_MAX {
            if used[lane] <= reserved[lane] {
                budgets.release(lane, reserved[lane] - used[lane]);
            } else {
                budgets.charge(lane, used[lane] - reserved[lane]);
            }
        }
        for event in events {
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

/// A fetch of the lane logs whose lanes have budget, each lane capped by its reservation.
fn fetch_request(
    config: &ConsumerConfig,
    positions: &HashMap<LogKey, Offset>,
    reserved: &[usize; LANES_MAX],
) -> FetchRequest {
    let total: usize = reserved.iter().sum();
    let bytes_max = u32::try_from(total)
        .unwrap_or(u32::MAX)
        .min(config.fetch_bytes_max);
    let left_out = positions.keys().any(|key| reserved[key.lane.0 as usize] == 0);
    let wait = if left_out {
        config.fetch_wait.min(WAIT_WITH_LANES_LEFT_OUT)
    } else {
        config.fetch_wait
    };
    let lane_bytes_max = reserved
        .iter()
        .map(|r| u32::try_from(*r).unwrap_or(u32::MAX))
        .collect();
    let mut keys: Vec<(&LogKey, &Offset)> = positions
        .iter()
        .filter(|(key, _)| reserved[key.lane.0 as usize] > 0)
        .collect();
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
        wait_ms_max: u32::try_from(wait.as_millis()).unwrap_or(u32::MAX),
        bytes_min: config.fetch_bytes_min,
        bytes_max,
        lane_bytes_max,
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
