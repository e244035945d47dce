//! Fetch: read many lane logs at once, waiting (long poll) until there is enough.
//!
//! Each lane log is read once (whole batches, zero-copy, up to its own cap); the lane
//! scheduler ([`crate::scheduler`]) then decides how many of those batches each lane log
//! sends, sharing the response by the topics' lane policies and weights. Credit a lane
//! could not spend is carried in the connection's [`LaneCredit`] to its next fetch.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::{join_all, select_all};
use lanes_protocol::api::encode_response;
use lanes_protocol::messages::{FetchLane, FetchLaneResult, FetchRequest, FetchResponse, TopicItems};
use lanes_protocol::record_batch::{count_records, peek_prefix};
use lanes_protocol::{ErrorCode, Offset};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::Broker;
use crate::scheduler::{self, LaneDemand, LanePolicy};
use crate::storage::READ_AHEAD_WAIT;
use crate::topic::{LogHandle, Progress, Topic, storage_error_code};

/// One requested lane log, resolved.
struct Target {
    lane: FetchLane,
    handle: Result<Arc<LogHandle>, (ErrorCode, String)>,
}

/// A connection's lane scheduling state, carried from one fetch to the next.
#[derive(Debug, Default)]
pub(crate) struct LaneCredit {
    /// Per (topic, lane): credit a lane with waiting data could not spend yet, and the
    /// fetch that last named it (entries not named for a while are forgotten).
    deficits: HashMap<(String, u8), (u64, usize)>,
    /// The lane whose turn the last response ended in.
    resume: Option<(String, u8)>,
    fetches: usize,
}

/// Fetches after which credit of a lane no fetch names is forgotten.
const CREDIT_FETCHES_KEPT: usize = 64;

pub(super) async fn fetch(
    broker: Arc<Broker>,
    id: u32,
    request: FetchRequest,
    credit: Arc<Mutex<LaneCredit>>,
    shutdown: CancellationToken,
) -> Option<Vec<bytes::Bytes>> {
    let settings = &broker.settings;
    let wait = Duration::from_millis(u64::from(request.wait_ms_max.min(settings.fetch_wait_ms_max)));
    let deadline = tokio::time::Instant::now() + wait;
    let bytes_max = request.bytes_max.min(settings.fetch_bytes_max) as usize;
    let lane_caps: Vec<usize> = request.lane_bytes_max.iter().map(|cap| *cap as usize).collect();
    let mut specs: Vec<Option<Arc<Topic>>> = Vec::with_capacity(request.topics.len());
    let topics: Vec<TopicItems<Target>> = request
        .topics
        .into_iter()
        .map(|topic_request| {
            let topic = broker.topics.get(&topic_request.name);
            specs.push(topic.clone());
            topic_request.map_lanes(|name, partition, lane| {
                let handle = match &topic {
                    None => Err((ErrorCode::UnknownTopic, format!("topic {name} does not exist"))),
                    Some(topic) => topic.log(partition, lane.lane).map(Arc::clone).map_err(|code| {
                        (
                            code,
                            format!("topic {name} has no partition {partition} lane {}", lane.lane),
                        )
                    }),
                };
                Target { lane, handle }
            })
        })
        .collect();
    // Subscribe before the first read, so no append between a read and the wait is missed.
    let mut watches: Vec<watch::Receiver<Progress>> = topics
        .iter()
        .flat_map(|t| t.lanes())
        .filter_map(|(_, _, target)| target.handle.as_ref().ok().map(|h| h.subscribe()))
        .collect();
    loop {
        // Bytes being read ahead from the disk are awaited here, without holding a
        // runtime thread; what still needs the disk after that is read on a blocking
        // thread (`read_lane`).
        let pending: Vec<_> = topics
            .iter()
            .flat_map(|t| t.lanes())
            .filter_map(|(_, _, target)| {
                let handle = target.handle.as_ref().ok()?;
                handle.log.read_ahead_done(target.lane.offset)
            })
            .collect();
        if !pending.is_empty() {
            // Past the bound, the read waits (or reads itself) on a blocking thread.
            let _ = tokio::time::timeout(READ_AHEAD_WAIT, join_all(pending)).await;
        }
        let mut scheduled = {
            let credit = credit.lock().expect("lane credit lock poisoned");
            Schedule::new(&topics, &specs, &credit)
        };
        let (response, bytes, errors, sent) = read(&topics, &mut scheduled, &lane_caps, bytes_max);
        let done = bytes >= request.bytes_min as usize
            || errors
            || watches.is_empty()
            || tokio::time::Instant::now() >= deadline
            || shutdown.is_cancelled();
        if done {
            // Only what is sent counts: credit moves on with the answered fetch.
            scheduled.keep(&mut credit.lock().expect("lane credit lock poisoned"));
            for (handle, records) in sent {
                handle.counters.fetch_bytes.increment(records.len() as u64);
                handle.counters.fetch_records.increment(count_records(&records));
            }
            return Some(encode_response(id, &response));
        }
        let changed = select_all(watches.iter_mut().map(|w| Box::pin(w.changed())));
        tokio::select! {
            _ = changed => {}
            () = tokio::time::sleep_until(deadline) => {}
            () = shutdown.cancelled() => {}
        }
    }
}

/// The lanes of one fetch, as the scheduler sees them: one per (topic, lane) requested.
struct Schedule {
    /// Per lane: `(topic index, lane number)`.
    keys: Vec<(usize, u8)>,
    /// The same, by key.
    index: HashMap<(usize, u8), usize>,
    demands: Vec<LaneDemand>,
    deficits: Vec<u64>,
    resume: Option<usize>,
    names: Vec<String>,
    rotation: usize,
}

impl Schedule {
    fn new(topics: &[TopicItems<Target>], specs: &[Option<Arc<Topic>>], credit: &LaneCredit) -> Schedule {
        let mut keys = Vec::new();
        for (t, topic) in topics.iter().enumerate() {
            let mut lanes: Vec<u8> = topic
                .lanes()
                .filter(|(_, _, target)| target.handle.is_ok())
                .map(|(_, _, target)| target.lane.lane.0)
                .collect();
            lanes.sort_unstable();
            lanes.dedup();
            keys.extend(lanes.into_iter().map(|lane| (t, lane)));
        }
        let index: HashMap<(usize, u8), usize> = keys.iter().enumerate().map(|(i, key)| (*key, i)).collect();
        let demands = keys
            .iter()
            .enumerate()
            .map(|(i, &(t, lane))| {
                let spec = &specs[t].as_ref().expect("resolved lane logs have a topic").spec;
                // Strict: behind the next more urgent lane of this topic in the fetch.
                let after =
                    (spec.lane_policy == LanePolicy::Strict && i > 0 && keys[i - 1].0 == t).then(|| i - 1);
                LaneDemand {
                    weight: spec.weights().get(lane as usize).copied().unwrap_or(1),
                    after,
                    logs: Vec::new(),
                    more: false,
                    cap: None,
                }
            })
            .collect();
        let names: Vec<String> = topics.iter().map(|t| t.name.clone()).collect();
        let deficits = keys
            .iter()
            .map(|&(t, lane)| {
                let key = (names[t].clone(), lane);
                credit.deficits.get(&key).map_or(0, |(deficit, _)| *deficit)
            })
            .collect();
        let resume = credit
            .resume
            .as_ref()
            .and_then(|(topic, lane)| keys.iter().position(|&(t, l)| names[t] == *topic && l == *lane));
        Schedule {
            keys,
            index,
            demands,
            deficits,
            resume,
            names,
            rotation: credit.fetches,
        }
    }

    /// Stores the credit left after this fetch, for the connection's next one: lanes it
    /// named are updated, the others keep theirs for a while (a client leaves a lane out
    /// while its budget is full).
    fn keep(self, credit: &mut LaneCredit) {
        let fetch = credit.fetches;
        for (&(t, lane), deficit) in self.keys.iter().zip(self.deficits) {
            credit
                .deficits
                .insert((self.names[t].clone(), lane), (deficit, fetch));
        }
        credit
            .deficits
            .retain(|_, (deficit, seen)| *deficit > 0 && fetch.wrapping_sub(*seen) < CREDIT_FETCHES_KEPT);
        credit.resume = self.resume.map(|lane| {
            let (t, lane) = self.keys[lane];
            (self.names[t].clone(), lane)
        });
        credit.fetches = credit.fetches.wrapping_add(1);
    }
}

/// Where a lane log sits in the schedule: `(lane, log)`, and the lane log.
type Slot = (usize, usize, Arc<LogHandle>);

/// The sizes of the whole batches in `bytes` (batches as a lane log returns them).
fn batch_sizes(bytes: &Bytes) -> Vec<u32> {
    let mut sizes = Vec::new();
    let mut at = 0;
    while let Some((_, length)) = peek_prefix(&bytes[at..]) {
        let length = length as usize;
        if length == 0 || at + length > bytes.len() {
            // Not a whole batch: never cut inside it.
            sizes.push((bytes.len() - at) as u32);
            break;
        }
        sizes.push(length as u32);
        at += length;
    }
    if at < bytes.len() && sizes.is_empty() {
        sizes.push(bytes.len() as u32);
    }
    sizes
}

/// What one lane log sends in a response (a slice of it).
type Sent = (Arc<LogHandle>, Bytes);

/// Reads every target once and lets the scheduler share `bytes_max` between them;
/// returns the response, its record bytes, whether any lane log answered with an error,
/// and what each lane log sends.
fn read(
    topics: &[TopicItems<Target>],
    schedule: &mut Schedule,
    lane_caps: &[usize],
    bytes_max: usize,
) -> (FetchResponse, usize, bool, Vec<Sent>) {
    let mut errors = false;
    // Each lane log's readable batches, and where it sits in the schedule.
    let mut reads: Vec<TopicItems<(FetchLaneResult, Option<Slot>)>> = Vec::with_capacity(topics.len());
    for (t, topic) in topics.iter().enumerate() {
        reads.push(topic.as_ref().map_lanes(|_, _, target| {
            let (result, more) = read_lane(target, bytes_max);
            errors |= result.error_code != ErrorCode::None;
            let slot = match (&target.handle, result.error_code) {
                (Ok(handle), ErrorCode::None) => {
                    let lane = schedule.index[&(t, target.lane.lane.0)];
                    let demand = &mut schedule.demands[lane];
                    demand.logs.push(batch_sizes(&result.records));
                    demand.more |= more;
                    Some((lane, demand.logs.len() - 1, Arc::clone(handle)))
                }
                _ => None,
            };
            (result, slot)
        }));
    }
    for (demand, &(_, lane)) in schedule.demands.iter_mut().zip(&schedule.keys) {
        demand.cap = ((lane as usize) < lane_caps.len()).then_some(lane as usize);
    }
    let plan = scheduler::plan(
        &schedule.demands,
        lane_caps,
        &mut schedule.deficits,
        &mut schedule.resume,
        bytes_max,
        schedule.rotation,
    );
    let mut total = 0;
    let mut sent = Vec::new();
    let mut topics: Vec<TopicItems<FetchLaneResult>> = reads
        .into_iter()
        .map(|topic| {
            topic.map_lanes(|_, _, (mut result, slot)| {
                if let Some((lane, log, handle)) = slot {
                    let taken = plan[lane][log];
                    result.records = result.records.slice(..taken);
                    total += taken;
                    if taken > 0 {
                        sent.push((handle, result.records.clone()));
                    }
                }
                result
            })
        })
        .collect();
    super::quiet_lane_messages(&mut topics, |lane| &mut lane.error_message);
    (FetchResponse { topics }, total, errors, sent)
}

/// Reads whole batches of one lane log, up to its own cap and the response's (at least
/// one batch if it has any); and whether it has more visible records than that.
fn read_lane(target: &Target, bytes_max: usize) -> (FetchLaneResult, bool) {
    let lane = target.lane;
    let handle = match &target.handle {
        Ok(handle) => handle,
        Err((code, message)) => {
            return (
                failed(lane, *code, message.clone(), Offset::ZERO, Offset::ZERO),
                false,
            );
        }
    };
    let visible = handle.visible_offset();
    let start = handle.log.start_offset();
    let bytes_max = (lane.bytes_max as usize).min(bytes_max).max(1);
    // A read from the disk (a consumer catching up) waits on a thread of its own, so
    // that the other connections of this runtime worker do not wait with it
    // (docs/BENCHMARKS.md, "A consumer catching up beside live traffic").
    let read = handle.log.try_read(lane.offset, bytes_max, visible).transpose();
    let read = read.unwrap_or_else(|| {
        let started = std::time::Instant::now();
        let read = super::blocking(|| handle.log.read(lane.offset, bytes_max, visible));
        metrics::histogram!(crate::metrics::FETCH_DISK_WAIT_SECONDS).record(started.elapsed().as_secs_f64());
        read
    });
    match read {
        Ok(slice) => {
            let more = slice.next_offset < visible && !slice.bytes.is_empty();
            (records(lane, visible, start, slice.bytes), more)
        }
        Err(error) => (
            failed(
                lane,
                storage_error_code(&error),
                error.to_string(),
                visible,
                start,
            ),
            false,
        ),
    }
}

fn records(
    lane: FetchLane,
    high_watermark: Offset,
    log_start_offset: Offset,
    records: Bytes,
) -> FetchLaneResult {
    FetchLaneResult {
        lane: lane.lane,
        error_code: ErrorCode::None,
        error_message: String::new(),
        high_watermark,
        log_start_offset,
        records,
    }
}

fn failed(
    lane: FetchLane,
    error_code: ErrorCode,
    error_message: String,
    high_watermark: Offset,
    log_start_offset: Offset,
) -> FetchLaneResult {
    crate::metrics::rejected("fetch", error_code);
    FetchLaneResult {
        lane: lane.lane,
        error_code,
        error_message,
        high_watermark,
        log_start_offset,
        records: Bytes::new(),
    }
}
