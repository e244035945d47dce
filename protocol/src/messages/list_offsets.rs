//! ListOffsets (key 6): the earliest or latest offset of lane logs, or the first offset
//! at or after a timestamp.
//!
//! Request body: `topics array<{name string, partitions array<{partition u32, lanes
//! array<{lane u8, spec i64}>}>}>`, where `spec` is -2 for the earliest offset, -1 for
//! the latest (the high watermark: where the next visible record will be), or a
//! timestamp in ms since the Unix epoch.
//!
//! Response body: the same nesting, with lane results `lane u8, error_code u16,
//! error_message string, offset u64`. For a timestamp with no record at or after it,
//! `offset` is the latest offset.

use super::{TopicItems, decode_topics, encode_topics, get_error, get_lane, put_error};
use crate::api::{ApiKey, RequestBody, ResponseBody};
use crate::wire::{DecodeError, Reader, Writer};
use crate::{ErrorCode, LANES_MAX, Lane, Offset};

/// Which offset to look up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OffsetSpec {
    Earliest,
    Latest,
    Timestamp(i64),
}

impl OffsetSpec {
    fn to_wire(self) -> i64 {
        match self {
            OffsetSpec::Earliest => -2,
            OffsetSpec::Latest => -1,
            OffsetSpec::Timestamp(ms) => ms,
        }
    }

    fn from_wire(value: i64) -> Result<OffsetSpec, DecodeError> {
        match value {
            -2 => Ok(OffsetSpec::Earliest),
            -1 => Ok(OffsetSpec::Latest),
            ms if ms >= 0 => Ok(OffsetSpec::Timestamp(ms)),
            other => Err(DecodeError::InvalidValue {
                field: "spec",
                value: other,
            }),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListOffsetsLane {
    pub lane: Lane,
    pub spec: OffsetSpec,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListOffsetsRequest {
    pub topics: Vec<TopicItems<ListOffsetsLane>>,
}

impl ListOffsetsRequest {
    pub(crate) fn decode(reader: &mut Reader) -> Result<ListOffsetsRequest, DecodeError> {
        Ok(ListOffsetsRequest {
            topics: decode_topics(reader, 1 + 8, LANES_MAX, |reader| {
                Ok(ListOffsetsLane {
                    lane: get_lane(reader)?,
                    spec: OffsetSpec::from_wire(reader.i64("spec")?)?,
                })
            })?,
        })
    }
}

impl RequestBody for ListOffsetsRequest {
    const API_KEY: ApiKey = ApiKey::ListOffsets;
    type Response = ListOffsetsResponse;

    fn encode(&self, writer: &mut Writer) {
        encode_topics(writer, &self.topics, |writer, lane| {
            writer.u8(lane.lane.0);
            writer.i64(lane.spec.to_wire());
        });
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListOffsetsLaneResult {
    pub lane: Lane,
    pub error_code: ErrorCode,
    pub error_message: String,
    pub offset: Offset,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListOffsetsResponse {
    pub topics: Vec<TopicItems<ListOffsetsLaneResult>>,
}

impl ResponseBody for ListOffsetsResponse {
    fn encode(&self, writer: &mut Writer) {
        encode_topics(writer, &self.topics, |writer, lane| {
            writer.u8(lane.lane.0);
            put_error(writer, lane.error_code, &lane.error_message);
            writer.u64(lane.offset.0);
        });
    }

    fn decode(reader: &mut Reader) -> Result<ListOffsetsResponse, DecodeError> {
        let topics = decode_topics(reader, 1 + 4 + 8, LANES_MAX, |reader| {
            let lane = get_lane(reader)?;
            let (error_code, error_message) = get_error(reader)?;
            Ok(ListOffsetsLaneResult {
                lane,
                error_code,
                error_message,
                offset: Offset(reader.u64("offset")?),
            })
        })?;
        Ok(ListOffsetsResponse { topics })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PartitionId;
    use crate::messages::PartitionItems;
    use crate::messages::testing::response_roundtrip;

    #[test]
    fn response_roundtrip_and_truncation() {
        response_roundtrip(&ListOffsetsResponse {
            topics: vec![TopicItems {
                name: "orders".into(),
                partitions: vec![PartitionItems {
                    partition: PartitionId(0),
                    lanes: vec![ListOffsetsLaneResult {
                        lane: Lane(1),
                        error_code: ErrorCode::None,
                        error_message: String::new(),
                        offset: Offset(42),
                    }],
                }],
            }],
        });
    }
}
