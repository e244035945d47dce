//! Fetch: read many lane logs at once, waiting (long poll) until there is enough.
//!
//! Lane logs are read in request order until the response budget is spent. (Lane
//! scheduling across priorities replaces this order in the priority-lanes issue.) The
//! first lane log with data always gets at least one whole batch, so a consumer never
//! gets stuck behind a batch larger than its budget; later ones only get what fits.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::select_all;
use lanes_protocol::api::encode_response;
use lanes_protocol::messages::{FetchLane, FetchLaneResult, FetchRequest, FetchResponse, TopicItems};
use lanes_protocol::{ErrorCode, Offset};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::Broker;
use crate::topic::{LogHandle, Progress, storage_error_code};

/// One requested lane log, resolved.
struct Target {
    lane: FetchLane,
    handle: Result<Arc<LogHandle>, (ErrorCode, String)>,
}

pub(super) async fn fetch(
    broker: Arc<Broker>,
    id: u32,
    request: FetchRequest,
    shutdown: CancellationToken,
) -> Option<Vec<bytes::Bytes>> {
    let settings = &broker.settings;
    let wait = Duration::from_millis(u64::from(request.wait_ms_max.min(settings.fetch_wait_ms_max)));
    let deadline = tokio::time::Instant::now() + wait;
    let bytes_max = request.bytes_max.min(settings.fetch_bytes_max) as usize;
    let topics: Vec<TopicItems<Target>> = request
        .topics
        .into_iter()
        .map(|topic_request| {
            let topic = broker.topics.get(&topic_request.name);
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
        let (response, bytes, errors) = read(&topics, bytes_max);
        let done = bytes >= request.bytes_min as usize
            || errors
            || watches.is_empty()
            || tokio::time::Instant::now() >= deadline
            || shutdown.is_cancelled();
        if done {
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

/// Reads every target once; returns the response, its record bytes and whether any
/// lane log answered with an error.
fn read(topics: &[TopicItems<Target>], bytes_max: usize) -> (FetchResponse, usize, bool) {
    let mut total = 0;
    let mut errors = false;
    let mut topics: Vec<TopicItems<FetchLaneResult>> = topics
        .iter()
        .map(|topic| {
            topic.as_ref().map_lanes(|_, _, target| {
                let result = read_lane(target, bytes_max.saturating_sub(total), total == 0);
                total += result.records.len();
                errors |= result.error_code != ErrorCode::None;
                result
            })
        })
        .collect();
    super::quiet_lane_messages(&mut topics, |lane| &mut lane.error_message);
    (FetchResponse { topics }, total, errors)
}

fn read_lane(target: &Target, budget: usize, first: bool) -> FetchLaneResult {
    let lane = target.lane;
    let handle = match &target.handle {
        Ok(handle) => handle,
        Err((code, message)) => return failed(lane, *code, message.clone(), Offset::ZERO, Offset::ZERO),
    };
    let visible = handle.visible_offset();
    let start = handle.log.start_offset();
    let bytes_max = (lane.bytes_max as usize).min(budget);
    if bytes_max == 0 && !first {
        return records(lane, visible, start, Bytes::new());
    }
    match handle.log.read(lane.offset, bytes_max.max(1), visible) {
        // Only the first lane log with data may go over the budget.
        Ok(slice) if !first && slice.bytes.len() > bytes_max => records(lane, visible, start, Bytes::new()),
        Ok(slice) => records(lane, visible, start, slice.bytes),
        Err(error) => failed(
            lane,
            storage_error_code(&error),
            error.to_string(),
            visible,
            start,
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
    FetchLaneResult {
        lane: lane.lane,
        error_code,
        error_message,
        high_watermark,
        log_start_offset,
        records: Bytes::new(),
    }
}
