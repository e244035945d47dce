//! Request and response bodies, one API per file. Each documents its layout; the
//! primitive types are in [`crate::wire`].

mod api_versions;
mod create_topic;
mod delete_topic;
mod fetch;
mod group;
mod init_producer_id;
mod list_offsets;
mod metadata;
mod produce;

pub use api_versions::{
    ApiVersion, ApiVersionsRequest, ApiVersionsRequestV0, ApiVersionsResponse, ApiVersionsResponseV0,
};
pub use create_topic::{
    CONFIG_KEY_BYTES_MAX, CONFIG_VALUE_BYTES_MAX, CONFIGS_MAX, CreateTopicRequest, CreateTopicResponse,
    TopicConfig,
};
pub use delete_topic::{DeleteTopicRequest, DeleteTopicResponse};
pub use fetch::{FetchLane, FetchLaneResult, FetchRequest, FetchResponse};
pub use group::{
    Assignment, CommitLane, CommitLaneResult, CommittedLane, DescribeGroupRequest, DescribeGroupResponse,
    GROUP_NAME_BYTES_MAX, GroupMember, GroupSummary, HeartbeatRequest, HeartbeatRequestV0, HeartbeatResponse,
    JoinGroupRequest, JoinGroupResponse, LaneLag, LeaveGroupRequest, LeaveGroupResponse, ListGroupsRequest,
    ListGroupsResponse, MEMBER_ID_BYTES_MAX, OffsetCommitRequest, OffsetCommitResponse, OffsetFetchRequest,
    OffsetFetchResponse, TopicPartitions,
};
pub use init_producer_id::{InitProducerIdRequest, InitProducerIdResponse};
pub use list_offsets::{
    ListOffsetsLane, ListOffsetsLaneResult, ListOffsetsRequest, ListOffsetsResponse, OffsetSpec,
};
pub use metadata::{LaneState, MetadataRequest, MetadataResponse, PartitionMetadata, TopicMetadata};
pub use produce::{
    Acks, IN_FLIGHT_PER_LOG_MAX, ProduceLane, ProduceLaneResult, ProduceRequest, ProduceResponse,
};

use crate::wire::{DecodeError, Reader, Writer};
use crate::{ErrorCode, LANES_MAX, Lane, PartitionId};

/// Topic names: 1 to 249 bytes of `[A-Za-z0-9._-]`, not `.` or `..` (as Kafka's).
pub const TOPIC_NAME_BYTES_MAX: usize = 249;
/// Lane names: 1 to 32 bytes of `[a-z0-9_-]`.
pub const LANE_NAME_BYTES_MAX: usize = 32;
/// Topics named in one request.
pub const TOPICS_PER_REQUEST_MAX: usize = 10_000;
/// Partitions of one topic named in one request, and partitions a topic can have.
pub const PARTITIONS_MAX: usize = 10_000;

/// Whether `name` is a valid topic name.
pub fn is_valid_topic_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= TOPIC_NAME_BYTES_MAX
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// Whether `name` is a valid lane name.
pub fn is_valid_lane_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= LANE_NAME_BYTES_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// Items addressed to lane logs, grouped by topic and partition, as Produce, Fetch and
/// ListOffsets carry them: `name string, partitions array<{partition u32, lanes array<T>}>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicItems<T> {
    pub name: String,
    pub partitions: Vec<PartitionItems<T>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionItems<T> {
    pub partition: PartitionId,
    pub lanes: Vec<T>,
}

impl<T> TopicItems<T> {
    /// The same topic and partitions, with every lane item turned into a result by `f`,
    /// called in order with the topic name and partition: how a broker answers.
    pub fn map_lanes<R>(self, mut f: impl FnMut(&str, PartitionId, T) -> R) -> TopicItems<R> {
        let name = self.name;
        let partitions = self
            .partitions
            .into_iter()
            .map(|partition| PartitionItems {
                partition: partition.partition,
                lanes: partition
                    .lanes
                    .into_iter()
                    .map(|lane| f(&name, partition.partition, lane))
                    .collect(),
            })
            .collect();
        TopicItems { name, partitions }
    }

    /// The same nesting over references to the items.
    pub fn as_ref(&self) -> TopicItems<&T> {
        TopicItems {
            name: self.name.clone(),
            partitions: self
                .partitions
                .iter()
                .map(|p| PartitionItems {
                    partition: p.partition,
                    lanes: p.lanes.iter().collect(),
                })
                .collect(),
        }
    }

    /// Every lane item with its topic name and partition.
    pub fn lanes(&self) -> impl Iterator<Item = (&str, PartitionId, &T)> {
        self.partitions.iter().flat_map(move |p| {
            p.lanes
                .iter()
                .map(move |lane| (self.name.as_str(), p.partition, lane))
        })
    }
}

pub(crate) fn encode_topics<T>(
    writer: &mut Writer,
    topics: &[TopicItems<T>],
    mut item: impl FnMut(&mut Writer, &T),
) {
    writer.array_len(topics.len());
    for topic in topics {
        writer.string(&topic.name);
        writer.array_len(topic.partitions.len());
        for partition in &topic.partitions {
            writer.u32(partition.partition.0);
            writer.array_len(partition.lanes.len());
            for lane in &partition.lanes {
                item(writer, lane);
            }
        }
    }
}

/// Items per partition in one message: one per lane, except in Produce, which may carry
/// up to [`produce::IN_FLIGHT_PER_LOG_MAX`] batches of each lane log.
pub(crate) fn decode_topics<T>(
    reader: &mut Reader,
    item_bytes_min: usize,
    items_per_partition_max: usize,
    mut item: impl FnMut(&mut Reader) -> Result<T, DecodeError>,
) -> Result<Vec<TopicItems<T>>, DecodeError> {
    reader.array("topics", TOPICS_PER_REQUEST_MAX, 2 + 4, |reader| {
        let name = reader.string("topic", TOPIC_NAME_BYTES_MAX)?;
        let partitions = reader.array("partitions", PARTITIONS_MAX, 4 + 4, |reader| {
            let partition = PartitionId(reader.u32("partition")?);
            let lanes = reader.array("lanes", items_per_partition_max, item_bytes_min, &mut item)?;
            Ok(PartitionItems { partition, lanes })
        })?;
        Ok(TopicItems { name, partitions })
    })
}

pub(crate) fn put_error(writer: &mut Writer, code: ErrorCode, message: &str) {
    writer.u16(code as u16);
    writer.string(crate::api::truncate(message, crate::api::ERROR_MESSAGE_BYTES_MAX));
}

pub(crate) fn get_error(reader: &mut Reader) -> Result<(ErrorCode, String), DecodeError> {
    let raw = reader.u16("error_code")?;
    let code = ErrorCode::from_u16(raw).ok_or(DecodeError::InvalidValue {
        field: "error_code",
        value: i64::from(raw),
    })?;
    let message = reader.string("error_message", crate::api::ERROR_MESSAGE_BYTES_MAX)?;
    Ok((code, message))
}

pub(crate) fn get_lane(reader: &mut Reader) -> Result<Lane, DecodeError> {
    let lane = reader.u8("lane")?;
    if lane as usize >= LANES_MAX {
        return Err(DecodeError::InvalidValue {
            field: "lane",
            value: i64::from(lane),
        });
    }
    Ok(Lane(lane))
}

#[cfg(test)]
pub(crate) mod testing {
    //! Every message gets a roundtrip test and a test that every truncation of it is
    //! an error, never a panic.
    use bytes::BytesMut;

    use crate::api::ResponseBody;
    use crate::wire::{Reader, Writer};

    pub(crate) fn response_roundtrip<B: ResponseBody + PartialEq + std::fmt::Debug>(body: &B) {
        let mut writer = Writer::new();
        body.encode(&mut writer);
        let bytes = writer.into_bytes();
        let mut reader = Reader::new(bytes.clone());
        let decoded = B::decode(&mut reader).expect("decodes");
        reader.finish().expect("uses every byte");
        assert_eq!(&decoded, body);
        for cut in 0..bytes.len() {
            let mut reader = Reader::new(BytesMut::from(&bytes[..cut]));
            let result = B::decode(&mut reader).and_then(|_| reader.finish());
            assert!(
                result.is_err(),
                "a response cut at {cut} of {} decoded",
                bytes.len()
            );
        }
    }
}
