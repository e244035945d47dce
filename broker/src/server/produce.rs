//! Produce: append each batch now, then wait (if asked) until it is as durable as its
//! topic promises.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use lanes_protocol::api::encode_response;
use lanes_protocol::messages::{Acks, ProduceLane, ProduceLaneResult, ProduceRequest, ProduceResponse};
use lanes_protocol::{ErrorCode, Lane, Offset, PartitionId};

use super::dispatch::{ResponseFuture, ready};
use super::{Broker, blocking};
use crate::config::Durability;
use crate::topic::{LogHandle, Topic, TopicError, storage_error_code};

/// An appended batch whose acknowledgement waits for durability.
struct Wait {
    topic: usize,
    /// Position among the topic's lane results, in request order.
    lane: usize,
    handle: Arc<LogHandle>,
    last_offset: Offset,
}

pub(super) fn produce(broker: &Arc<Broker>, id: u32, request: ProduceRequest<BytesMut>) -> ResponseFuture {
    let acks = request.acks;
    let timeout_ms = request.timeout_ms.min(broker.settings.produce_timeout_ms_max);
    let mut waits = Vec::new();
    let topics: Vec<_> = request
        .topics
        .into_iter()
        .enumerate()
        .map(|(topic_index, topic_request)| {
            // Creating a missing topic touches the disk: do not stall this worker. Only
            // then: handing the worker over costs a thread wake-up per request.
            let topic = match broker.topics.get(&topic_request.name) {
                Some(topic) => Ok(topic),
                None => blocking(|| broker.topics.get_or_create(&topic_request.name)),
            };
            let mut lane_index = 0;
            topic_request.map_lanes(|_, partition, lane| {
                let lane_id = lane.lane;
                let result = append(&topic, partition, lane);
                if let Ok((handle, outcome)) = &result
                    && acks == Acks::Durable
                    && handle.visibility() == Durability::Durable
                {
                    waits.push(Wait {
                        topic: topic_index,
                        lane: lane_index,
                        handle: Arc::clone(handle),
                        last_offset: outcome.last_offset,
                    });
                }
                lane_index += 1;
                lane_result(lane_id, result)
            })
        })
        .collect();
    if acks == Acks::None {
        return Box::pin(std::future::ready(None));
    }
    let mut response = ProduceResponse { topics };
    if waits.is_empty() {
        quiet(&mut response);
        return ready(encode_response(id, &response));
    }
    let appended_at = Instant::now();
    Box::pin(async move {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(u64::from(timeout_ms));
        for wait in waits {
            let outcome = tokio::time::timeout_at(deadline, wait.handle.wait_visible(wait.last_offset)).await;
            let failure = match outcome {
                Ok(true) => continue,
                Ok(false) => (
                    ErrorCode::StorageFailed,
                    "the lane log failed before the records were durable",
                ),
                Err(_) => (
                    ErrorCode::RequestTimedOut,
                    "written, but not durable within the timeout; retry to learn the offsets",
                ),
            };
            let result = response.topics[wait.topic]
                .partitions
                .iter_mut()
                .flat_map(|p| p.lanes.iter_mut())
                .nth(wait.lane)
                .expect("a wait points at a lane result");
            crate::metrics::rejected("produce", failure.0);
            result.error_code = failure.0;
            result.error_message = failure.1.to_owned();
        }
        ::metrics::histogram!(crate::metrics::PRODUCE_DURABILITY_WAIT_SECONDS)
            .record(appended_at.elapsed().as_secs_f64());
        quiet(&mut response);
        Some(encode_response(id, &response))
    })
}

fn quiet(response: &mut ProduceResponse) {
    super::quiet_lane_messages(&mut response.topics, |lane| &mut lane.error_message);
}

type Appended = (Arc<LogHandle>, crate::storage::AppendOutcome);

fn append(
    topic: &Result<Arc<Topic>, TopicError>,
    partition: PartitionId,
    mut lane: ProduceLane<BytesMut>,
) -> Result<Appended, (ErrorCode, String)> {
    let topic = topic
        .as_ref()
        .map_err(|error| (error.code(), error.to_string()))?;
    let handle = topic.log(partition, lane.lane).map_err(|code| {
        let message = format!(
            "topic {} has no partition {partition} lane {}",
            topic.spec.name, lane.lane
        );
        (code, message)
    })?;
    let outcome = handle
        .append(&mut lane.batch)
        .map_err(|error| (storage_error_code(&error), error.to_string()))?;
    Ok((Arc::clone(handle), outcome))
}

fn lane_result(lane: Lane, result: Result<Appended, (ErrorCode, String)>) -> ProduceLaneResult {
    match result {
        Ok((handle, outcome)) => ProduceLaneResult {
            lane,
            error_code: ErrorCode::None,
            error_message: String::new(),
            base_offset: outcome.base_offset,
            last_offset: outcome.last_offset,
            log_start_offset: handle.log.start_offset(),
        },
        Err((error_code, error_message)) => {
            crate::metrics::rejected("produce", error_code);
            ProduceLaneResult {
                lane,
                error_code,
                error_message,
                base_offset: Offset::ZERO,
                last_offset: Offset::ZERO,
                log_start_offset: Offset::ZERO,
            }
        }
    }
}
