//! Handlers for the requests that manage and describe topics.

use std::sync::Arc;

use bytes::Bytes;
use lanes_protocol::api::{encode_error_response, encode_response};
use lanes_protocol::messages::{
    CreateTopicRequest, CreateTopicResponse, DeleteTopicRequest, DeleteTopicResponse, InitProducerIdResponse,
    LaneState, ListOffsetsLane, ListOffsetsLaneResult, ListOffsetsRequest, ListOffsetsResponse,
    MetadataRequest, MetadataResponse, OffsetSpec, PartitionMetadata, TopicMetadata,
};
use lanes_protocol::{ErrorCode, Offset, PartitionId};

use super::{Broker, blocking};
use crate::topic::{Topic, TopicError, TopicSpec, storage_error_code};

fn refused(api: &'static str, id: u32, error: &TopicError) -> Vec<Bytes> {
    crate::metrics::rejected(api, error.code());
    encode_error_response(id, error.code(), &error.to_string())
}

pub(super) fn create_topic(broker: &Arc<Broker>, id: u32, request: &CreateTopicRequest) -> Vec<Bytes> {
    let created = TopicSpec::from_request(request, &broker.settings)
        .and_then(|spec| blocking(|| broker.topics.create(spec)));
    match created {
        Ok(_) => encode_response(id, &CreateTopicResponse),
        Err(error) => refused("create_topic", id, &error),
    }
}

pub(super) fn delete_topic(broker: &Arc<Broker>, id: u32, request: &DeleteTopicRequest) -> Vec<Bytes> {
    let forget = |name: &str| {
        // If this fails (or the broker dies first), the next start forgets them.
        if let Err(error) = broker.groups.forget_topic(name) {
            tracing::warn!(topic = %name, %error, "could not delete the group offsets of a deleted topic");
        }
    };
    match blocking(|| broker.topics.delete(&request.name, forget)) {
        Ok(()) => encode_response(id, &DeleteTopicResponse),
        Err(error) => refused("delete_topic", id, &error),
    }
}

pub(super) fn init_producer_id(broker: &Arc<Broker>, id: u32) -> Vec<Bytes> {
    match blocking(|| broker.producer_ids.allocate()) {
        Ok(producer_id) => encode_response(
            id,
            &InitProducerIdResponse {
                producer_id,
                producer_epoch: 0,
            },
        ),
        Err(error) => {
            crate::metrics::rejected("init_producer_id", storage_error_code(&error));
            encode_error_response(id, storage_error_code(&error), &error.to_string())
        }
    }
}

pub(super) fn metadata(broker: &Arc<Broker>, id: u32, request: &MetadataRequest) -> Vec<Bytes> {
    let topics = if request.topics.is_empty() {
        broker.topics.list().iter().map(|t| describe(t)).collect()
    } else {
        // Each topic once, however often it is named: a request cannot multiply the
        // (large) description of a topic.
        let mut seen = std::collections::HashSet::new();
        request
            .topics
            .iter()
            .filter(|name| seen.insert(name.as_str()))
            .map(|name| match broker.topics.get(name) {
                Some(topic) => describe(&topic),
                None => TopicMetadata {
                    name: name.clone(),
                    error_code: ErrorCode::UnknownTopic,
                    error_message: format!("topic {name} does not exist"),
                    lanes: Vec::new(),
                    configs: Vec::new(),
                    partitions: Vec::new(),
                },
            })
            .collect()
    };
    encode_response(id, &MetadataResponse { topics })
}

fn describe(topic: &Topic) -> TopicMetadata {
    let mut partitions: Vec<PartitionMetadata> = (0..topic.spec.partitions)
        .map(|p| PartitionMetadata {
            partition: lanes_protocol::PartitionId(p),
            lanes: Vec::with_capacity(topic.spec.lanes.len()),
        })
        .collect();
    for (partition, lane, handle) in topic.logs() {
        let stats = handle.log.stats();
        partitions[partition.0 as usize].lanes.push(LaneState {
            lane,
            start_offset: stats.start_offset,
            end_offset: stats.next_offset,
            durable_offset: stats.durable_offset,
            visible_offset: handle.visible_offset(),
            size_bytes: stats.size_bytes,
            segments: stats.segments as u32,
        });
    }
    TopicMetadata {
        name: topic.spec.name.clone(),
        error_code: ErrorCode::None,
        error_message: String::new(),
        lanes: topic.spec.lanes.clone(),
        configs: topic.spec.configs(),
        partitions,
    }
}

pub(super) fn list_offsets(broker: &Arc<Broker>, id: u32, request: ListOffsetsRequest) -> Vec<Bytes> {
    let mut topics: Vec<_> = request
        .topics
        .into_iter()
        .map(|topic_request| {
            let topic = broker.topics.get(&topic_request.name);
            topic_request.map_lanes(|name, partition, lane| {
                let (error_code, error_message, offset) =
                    match lane_offset(topic.as_deref(), name, partition, lane) {
                        Ok(offset) => (ErrorCode::None, String::new(), offset),
                        Err((code, message)) => (code, message, Offset::ZERO),
                    };
                ListOffsetsLaneResult {
                    lane: lane.lane,
                    error_code,
                    error_message,
                    offset,
                }
            })
        })
        .collect();
    super::quiet_lane_messages(&mut topics, |lane: &mut ListOffsetsLaneResult| {
        &mut lane.error_message
    });
    encode_response(id, &ListOffsetsResponse { topics })
}

fn lane_offset(
    topic: Option<&Topic>,
    name: &str,
    partition: PartitionId,
    lane: ListOffsetsLane,
) -> Result<Offset, (ErrorCode, String)> {
    let topic = topic.ok_or_else(|| (ErrorCode::UnknownTopic, format!("topic {name} does not exist")))?;
    let handle = topic.log(partition, lane.lane).map_err(|code| {
        (
            code,
            format!("topic {name} has no partition {partition} lane {}", lane.lane),
        )
    })?;
    let visible = handle.visible_offset();
    match lane.spec {
        OffsetSpec::Earliest => Ok(handle.log.start_offset()),
        OffsetSpec::Latest => Ok(visible),
        OffsetSpec::Timestamp(ms) => handle
            .log
            .offset_for_timestamp(ms, visible)
            .map(|found| found.unwrap_or(visible))
            .map_err(|error| (storage_error_code(&error), error.to_string())),
    }
}
