//! Metadata (key 3): topics, their partitions and lanes, and each lane log's offsets.
//!
//! Request body: `topics array<string>`; an empty array asks for every topic.
//!
//! Response body: `topics array<topic>`, where a topic is:
//!
//! | field        | type          | meaning                                              |
//! |--------------|---------------|------------------------------------------------------|
//! | `name`       | string        |                                                      |
//! | `error_code` | u16           | `UNKNOWN_TOPIC` if it does not exist (the rest is then empty) |
//! | `lanes`      | `array<string>` | lane names, lane 0 first                             |
//! | `configs`    | array         | of `key string, value string`: the topic's settings  |
//! | `partitions` | array         | of `partition u32, lanes array<lane state>`          |
//!
//! Lane state, one per lane log:
//!
//! | field            | type | meaning                                                   |
//! |------------------|------|-----------------------------------------------------------|
//! | `lane`           | u8   |                                                           |
//! | `start_offset`   | u64  | oldest offset still stored                                |
//! | `end_offset`     | u64  | next offset to be written (everything below is written)   |
//! | `durable_offset` | u64  | everything below is fsynced                               |
//! | `visible_offset` | u64  | everything below may be fetched (the high watermark)      |
//! | `size_bytes`     | u64  | bytes on disk in segment files                            |
//! | `segments`       | u32  | segment files                                             |

use super::create_topic::{TopicConfig, decode_configs, encode_configs};
use super::{
    LANE_NAME_BYTES_MAX, PARTITIONS_MAX, TOPIC_NAME_BYTES_MAX, TOPICS_PER_REQUEST_MAX, get_error, get_lane,
    put_error,
};
use crate::api::{ApiKey, RequestBody, ResponseBody};
use crate::wire::{DecodeError, Reader, Writer};
use crate::{ErrorCode, LANES_MAX, Lane, Offset, PartitionId};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MetadataRequest {
    pub topics: Vec<String>,
}

impl MetadataRequest {
    pub(crate) fn decode(reader: &mut Reader) -> Result<MetadataRequest, DecodeError> {
        Ok(MetadataRequest {
            topics: reader.array("topics", TOPICS_PER_REQUEST_MAX, 2, |reader| {
                reader.string("topic", TOPIC_NAME_BYTES_MAX)
            })?,
        })
    }
}

impl RequestBody for MetadataRequest {
    const API_KEY: ApiKey = ApiKey::Metadata;
    type Response = MetadataResponse;

    fn encode(&self, writer: &mut Writer) {
        writer.array(&self.topics, |writer, topic| writer.string(topic));
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaneState {
    pub lane: Lane,
    pub start_offset: Offset,
    pub end_offset: Offset,
    pub durable_offset: Offset,
    pub visible_offset: Offset,
    pub size_bytes: u64,
    pub segments: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionMetadata {
    pub partition: PartitionId,
    pub lanes: Vec<LaneState>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicMetadata {
    pub name: String,
    pub error_code: ErrorCode,
    pub error_message: String,
    pub lanes: Vec<String>,
    pub configs: Vec<TopicConfig>,
    pub partitions: Vec<PartitionMetadata>,
}

impl TopicMetadata {
    /// The index of the lane called `name`.
    pub fn lane_named(&self, name: &str) -> Option<Lane> {
        self.lanes.iter().position(|l| l == name).map(|i| Lane(i as u8))
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MetadataResponse {
    pub topics: Vec<TopicMetadata>,
}

impl ResponseBody for MetadataResponse {
    fn encode(&self, writer: &mut Writer) {
        writer.array(&self.topics, |writer, topic| {
            writer.string(&topic.name);
            put_error(writer, topic.error_code, &topic.error_message);
            writer.array(&topic.lanes, |writer, lane| writer.string(lane));
            encode_configs(writer, &topic.configs);
            writer.array(&topic.partitions, |writer, partition| {
                writer.u32(partition.partition.0);
                writer.array(&partition.lanes, |writer, lane| {
                    writer.u8(lane.lane.0);
                    writer.u64(lane.start_offset.0);
                    writer.u64(lane.end_offset.0);
                    writer.u64(lane.durable_offset.0);
                    writer.u64(lane.visible_offset.0);
                    writer.u64(lane.size_bytes);
                    writer.u32(lane.segments);
                });
            });
        });
    }

    fn decode(reader: &mut Reader) -> Result<MetadataResponse, DecodeError> {
        let topics = reader.array("topics", TOPICS_PER_REQUEST_MAX, 16, |reader| {
            let name = reader.string("name", TOPIC_NAME_BYTES_MAX)?;
            let (error_code, error_message) = get_error(reader)?;
            let lanes = reader.array("lanes", LANES_MAX, 2, |reader| {
                reader.string("lane", LANE_NAME_BYTES_MAX)
            })?;
            let configs = decode_configs(reader)?;
            let partitions = reader.array("partitions", PARTITIONS_MAX, 8, |reader| {
                let partition = PartitionId(reader.u32("partition")?);
                let lanes = reader.array("lanes", LANES_MAX, 45, |reader| {
                    Ok(LaneState {
                        lane: get_lane(reader)?,
                        start_offset: Offset(reader.u64("start_offset")?),
                        end_offset: Offset(reader.u64("end_offset")?),
                        durable_offset: Offset(reader.u64("durable_offset")?),
                        visible_offset: Offset(reader.u64("visible_offset")?),
                        size_bytes: reader.u64("size_bytes")?,
                        segments: reader.u32("segments")?,
                    })
                })?;
                Ok(PartitionMetadata { partition, lanes })
            })?;
            Ok(TopicMetadata {
                name,
                error_code,
                error_message,
                lanes,
                configs,
                partitions,
            })
        })?;
        Ok(MetadataResponse { topics })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::testing::response_roundtrip;

    #[test]
    fn roundtrip_and_truncation() {
        let lane = |n| LaneState {
            lane: Lane(n),
            start_offset: Offset(1),
            end_offset: Offset(10),
            durable_offset: Offset(9),
            visible_offset: Offset(9),
            size_bytes: 1000,
            segments: 2,
        };
        response_roundtrip(&MetadataResponse {
            topics: vec![
                TopicMetadata {
                    name: "orders".into(),
                    error_code: ErrorCode::None,
                    error_message: String::new(),
                    lanes: vec!["express".into(), "bulk".into()],
                    configs: vec![TopicConfig {
                        key: "durability".into(),
                        value: "durable".into(),
                    }],
                    partitions: vec![PartitionMetadata {
                        partition: PartitionId(0),
                        lanes: vec![lane(0), lane(1)],
                    }],
                },
                TopicMetadata {
                    name: "missing".into(),
                    error_code: ErrorCode::UnknownTopic,
                    error_message: "no such topic".into(),
                    lanes: vec![],
                    configs: vec![],
                    partitions: vec![],
                },
            ],
        });
    }
}
