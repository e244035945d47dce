//! Produce (key 4): appends one record batch per lane log.
//!
//! Request body:
//!
//! | field        | type | meaning                                                        |
//! |--------------|------|----------------------------------------------------------------|
//! | `acks`       | u8   | 0 none (no response is sent), 1 written, 2 durable            |
//! | `timeout_ms` | u32  | how long to wait for durability before `REQUEST_TIMED_OUT`      |
//! | `topics`     | array | of `name string, partitions array<{partition u32, lanes array<lane>}>` |
//!
//! Lane: `lane u8, batch bytes`: exactly one record batch (docs/STORAGE.md), base offset 0.
//!
//! Response body: the same nesting, with lane results:
//!
//! | field              | type   | meaning                                             |
//! |--------------------|--------|-----------------------------------------------------|
//! | `lane`             | u8     |                                                     |
//! | `error_code`       | u16    | 0, or why this batch was not appended               |
//! | `error_message`    | string |                                                     |
//! | `base_offset`      | u64    | offset of the batch's first record                  |
//! | `last_offset`      | u64    | offset of its last record                           |
//! | `log_start_offset` | u64    | oldest offset still stored in the lane log          |
//!
//! `acks = durable` is answered once the records are as durable as the topic promises
//! (fsynced for `durability = durable` topics). A batch that is a retry of one already
//! stored (same producer id, epoch and sequences) is answered with its original offsets.

use bytes::{Bytes, BytesMut};

use super::{TopicItems, decode_topics, encode_topics, get_error, get_lane, put_error};
use crate::api::{ApiKey, RequestBody, ResponseBody};
use crate::wire::{DecodeError, Reader, Writer};
use crate::{ErrorCode, LANES_MAX, Lane, Offset};

/// How many batches of one lane log an idempotent producer may have in flight. The
/// broker remembers this many of each producer's latest batches per lane log, so a
/// retry is always recognized.
pub const IN_FLIGHT_PER_LOG_MAX: usize = 5;

/// How much the producer waits for.
#[repr(u8)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Acks {
    /// No response at all.
    None = 0,
    /// Answered once written to the broker's page cache.
    Written = 1,
    /// Answered once durable as the topic promises.
    #[default]
    Durable = 2,
}

impl Acks {
    pub fn from_u8(value: u8) -> Option<Acks> {
        match value {
            0 => Some(Acks::None),
            1 => Some(Acks::Written),
            2 => Some(Acks::Durable),
            _ => None,
        }
    }
}

/// The batch for one lane log. The client sends shared `Bytes`; the broker receives
/// `BytesMut` split off the request frame, so it can stamp offsets without a copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProduceLane<B = Bytes> {
    pub lane: Lane,
    pub batch: B,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProduceRequest<B = Bytes> {
    pub acks: Acks,
    pub timeout_ms: u32,
    pub topics: Vec<TopicItems<ProduceLane<B>>>,
}

/// Largest batch the protocol can carry; the broker's `batch_bytes_max` is lower.
const BATCH_BYTES_MAX: usize = u32::MAX as usize;

impl ProduceRequest<BytesMut> {
    pub(crate) fn decode(reader: &mut Reader) -> Result<ProduceRequest<BytesMut>, DecodeError> {
        let raw_acks = reader.u8("acks")?;
        let acks = Acks::from_u8(raw_acks).ok_or(DecodeError::InvalidValue {
            field: "acks",
            value: i64::from(raw_acks),
        })?;
        let timeout_ms = reader.u32("timeout_ms")?;
        let topics = decode_topics(reader, 1 + 4, LANES_MAX * IN_FLIGHT_PER_LOG_MAX, |reader| {
            Ok(ProduceLane {
                lane: get_lane(reader)?,
                batch: reader.bytes_mut("batch", BATCH_BYTES_MAX)?,
            })
        })?;
        Ok(ProduceRequest {
            acks,
            timeout_ms,
            topics,
        })
    }
}

impl RequestBody for ProduceRequest<Bytes> {
    const API_KEY: ApiKey = ApiKey::Produce;
    type Response = ProduceResponse;

    fn encode(&self, writer: &mut Writer) {
        writer.u8(self.acks as u8);
        writer.u32(self.timeout_ms);
        encode_topics(writer, &self.topics, |writer, lane| {
            writer.u8(lane.lane.0);
            writer.bytes(&lane.batch);
        });
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProduceLaneResult {
    pub lane: Lane,
    pub error_code: ErrorCode,
    pub error_message: String,
    pub base_offset: Offset,
    pub last_offset: Offset,
    pub log_start_offset: Offset,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProduceResponse {
    pub topics: Vec<TopicItems<ProduceLaneResult>>,
}

impl ResponseBody for ProduceResponse {
    fn encode(&self, writer: &mut Writer) {
        encode_topics(writer, &self.topics, |writer, lane| {
            writer.u8(lane.lane.0);
            put_error(writer, lane.error_code, &lane.error_message);
            writer.u64(lane.base_offset.0);
            writer.u64(lane.last_offset.0);
            writer.u64(lane.log_start_offset.0);
        });
    }

    fn decode(reader: &mut Reader) -> Result<ProduceResponse, DecodeError> {
        let topics = decode_topics(reader, 1 + 4 + 24, LANES_MAX * IN_FLIGHT_PER_LOG_MAX, |reader| {
            let lane = get_lane(reader)?;
            let (error_code, error_message) = get_error(reader)?;
            Ok(ProduceLaneResult {
                lane,
                error_code,
                error_message,
                base_offset: Offset(reader.u64("base_offset")?),
                last_offset: Offset(reader.u64("last_offset")?),
                log_start_offset: Offset(reader.u64("log_start_offset")?),
            })
        })?;
        Ok(ProduceResponse { topics })
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
        response_roundtrip(&ProduceResponse {
            topics: vec![TopicItems {
                name: "orders".into(),
                partitions: vec![PartitionItems {
                    partition: PartitionId(3),
                    lanes: vec![
                        ProduceLaneResult {
                            lane: Lane(0),
                            error_code: ErrorCode::None,
                            error_message: String::new(),
                            base_offset: Offset(10),
                            last_offset: Offset(12),
                            log_start_offset: Offset(0),
                        },
                        ProduceLaneResult {
                            lane: Lane(2),
                            error_code: ErrorCode::StorageFull,
                            error_message: "disk full".into(),
                            base_offset: Offset(0),
                            last_offset: Offset(0),
                            log_start_offset: Offset(0),
                        },
                    ],
                }],
            }],
        });
    }
}
