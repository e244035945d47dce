//! Fetch (key 5): reads record batches from many lane logs at once, with long polling.
//!
//! Request body:
//!
//! | field         | type  | meaning                                                        |
//! |---------------|-------|----------------------------------------------------------------|
//! | `wait_ms_max` | u32   | wait up to this long for `bytes_min` bytes (capped by the broker) |
//! | `bytes_min`   | u32   | answer as soon as this many bytes are available (0 or 1: at once if any) |
//! | `bytes_max`   | u32   | soft cap on the response's record bytes (capped by the broker) |
//! | `lane_bytes_max` | `array<u32>` | per lane number (0 first, ≤ 8): soft cap on that lane's bytes over the whole response; lanes past the end are capped by `bytes_max` only |
//! | `topics`      | array | of `name string, partitions array<{partition u32, lanes array<lane>}>` |
//!
//! Lane: `lane u8, offset u64, bytes_max u32` (soft cap for this lane log).
//!
//! Response body: the same nesting, with lane results:
//!
//! | field              | type   | meaning                                              |
//! |--------------------|--------|------------------------------------------------------|
//! | `lane`             | u8     |                                                      |
//! | `error_code`       | u16    | e.g. `OFFSET_OUT_OF_RANGE`; records are then empty   |
//! | `error_message`    | string |                                                      |
//! | `high_watermark`   | u64    | offsets below it may be fetched                      |
//! | `log_start_offset` | u64    | oldest offset still stored                           |
//! | `records`          | bytes  | whole record batches, as stored, starting with the one holding `offset` |
//!
//! Soft caps: at least one whole batch is returned for a lane log that has data at the
//! requested offset, even if it is larger than the caps, so a consumer never gets stuck.
//! The first batch may start before the requested offset; skip records below it.

use bytes::Bytes;

use super::{TopicItems, decode_topics, encode_topics, get_error, get_lane, put_error};
use crate::api::{ApiKey, RequestBody, ResponseBody};
use crate::wire::{DecodeError, Reader, Writer};
use crate::{ErrorCode, LANES_MAX, Lane, Offset};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FetchLane {
    pub lane: Lane,
    pub offset: Offset,
    pub bytes_max: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchRequest {
    pub wait_ms_max: u32,
    pub bytes_min: u32,
    pub bytes_max: u32,
    /// Per lane number: a soft cap on that lane's bytes in the response, so a client can
    /// keep a budget per lane. Lanes past the end have no cap of their own.
    pub lane_bytes_max: Vec<u32>,
    pub topics: Vec<TopicItems<FetchLane>>,
}

impl FetchRequest {
    pub(crate) fn decode(reader: &mut Reader) -> Result<FetchRequest, DecodeError> {
        Ok(FetchRequest {
            wait_ms_max: reader.u32("wait_ms_max")?,
            bytes_min: reader.u32("bytes_min")?,
            bytes_max: reader.u32("bytes_max")?,
            lane_bytes_max: reader.array("lane_bytes_max", LANES_MAX, 4, |r| r.u32("lane bytes_max"))?,
            topics: decode_topics(reader, 1 + 8 + 4, LANES_MAX, |reader| {
                Ok(FetchLane {
                    lane: get_lane(reader)?,
                    offset: Offset(reader.u64("offset")?),
                    bytes_max: reader.u32("bytes_max")?,
                })
            })?,
        })
    }
}

impl RequestBody for FetchRequest {
    const API_KEY: ApiKey = ApiKey::Fetch;
    type Response = FetchResponse;

    fn encode(&self, writer: &mut Writer) {
        writer.u32(self.wait_ms_max);
        writer.u32(self.bytes_min);
        writer.u32(self.bytes_max);
        writer.array(&self.lane_bytes_max, |w, cap| w.u32(*cap));
        encode_topics(writer, &self.topics, |writer, lane| {
            writer.u8(lane.lane.0);
            writer.u64(lane.offset.0);
            writer.u32(lane.bytes_max);
        });
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchLaneResult {
    pub lane: Lane,
    pub error_code: ErrorCode,
    pub error_message: String,
    pub high_watermark: Offset,
    pub log_start_offset: Offset,
    /// Whole batches; on the broker, slices of the stored segments (sent without a copy).
    pub records: Bytes,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FetchResponse {
    pub topics: Vec<TopicItems<FetchLaneResult>>,
}

impl ResponseBody for FetchResponse {
    fn encode(&self, writer: &mut Writer) {
        encode_topics(writer, &self.topics, |writer, lane| {
            writer.u8(lane.lane.0);
            put_error(writer, lane.error_code, &lane.error_message);
            writer.u64(lane.high_watermark.0);
            writer.u64(lane.log_start_offset.0);
            writer.bytes(&lane.records);
        });
    }

    fn decode(reader: &mut Reader) -> Result<FetchResponse, DecodeError> {
        let topics = decode_topics(reader, 1 + 4 + 16 + 4, LANES_MAX, |reader| {
            let lane = get_lane(reader)?;
            let (error_code, error_message) = get_error(reader)?;
            Ok(FetchLaneResult {
                lane,
                error_code,
                error_message,
                high_watermark: Offset(reader.u64("high_watermark")?),
                log_start_offset: Offset(reader.u64("log_start_offset")?),
                records: reader.bytes("records", u32::MAX as usize)?,
            })
        })?;
        Ok(FetchResponse { topics })
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
        response_roundtrip(&FetchResponse {
            topics: vec![TopicItems {
                name: "orders".into(),
                partitions: vec![PartitionItems {
                    partition: PartitionId(1),
                    lanes: vec![
                        FetchLaneResult {
                            lane: Lane(0),
                            error_code: ErrorCode::None,
                            error_message: String::new(),
                            high_watermark: Offset(100),
                            log_start_offset: Offset(0),
                            records: Bytes::from(vec![7u8; 5000]),
                        },
                        FetchLaneResult {
                            lane: Lane(1),
                            error_code: ErrorCode::OffsetOutOfRange,
                            error_message: "offset 5 is before 10".into(),
                            high_watermark: Offset(20),
                            log_start_offset: Offset(10),
                            records: Bytes::new(),
                        },
                    ],
                }],
            }],
        });
    }
}
