//! CreateTopic (key 1).
//!
//! Request body:
//!
//! | field        | type          | meaning                                                    |
//! |--------------|---------------|------------------------------------------------------------|
//! | `name`       | string        | the topic's name                                           |
//! | `partitions` | u32           | 1 or more; 0 takes the broker's default                    |
//! | `lanes`      | `array<string>` | lane names, most urgent first, at most 8; empty takes the broker's default |
//! | `configs`    | array         | of `key string, value string`: topic settings (docs/PROTOCOL.md) |
//!
//! Response body: empty. Errors: `INVALID_TOPIC_NAME`, `TOPIC_ALREADY_EXISTS`,
//! `INVALID_CONFIG`, `LIMIT_EXCEEDED`.

use crate::api::{ApiKey, RequestBody, ResponseBody};
use crate::wire::{DecodeError, Reader, Writer};
use crate::{LANES_MAX, messages::LANE_NAME_BYTES_MAX, messages::TOPIC_NAME_BYTES_MAX};

pub const CONFIG_KEY_BYTES_MAX: usize = 128;
pub const CONFIG_VALUE_BYTES_MAX: usize = 1024;
pub const CONFIGS_MAX: usize = 64;

/// One topic setting, as text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicConfig {
    pub key: String,
    pub value: String,
}

pub(crate) fn encode_configs(writer: &mut Writer, configs: &[TopicConfig]) {
    writer.array(configs, |writer, config| {
        writer.string(&config.key);
        writer.string(&config.value);
    });
}

pub(crate) fn decode_configs(reader: &mut Reader) -> Result<Vec<TopicConfig>, DecodeError> {
    reader.array("configs", CONFIGS_MAX, 4, |reader| {
        Ok(TopicConfig {
            key: reader.string("config key", CONFIG_KEY_BYTES_MAX)?,
            value: reader.string("config value", CONFIG_VALUE_BYTES_MAX)?,
        })
    })
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateTopicRequest {
    pub name: String,
    pub partitions: u32,
    pub lanes: Vec<String>,
    pub configs: Vec<TopicConfig>,
}

impl CreateTopicRequest {
    pub(crate) fn decode(reader: &mut Reader) -> Result<CreateTopicRequest, DecodeError> {
        Ok(CreateTopicRequest {
            name: reader.string("name", TOPIC_NAME_BYTES_MAX)?,
            partitions: reader.u32("partitions")?,
            lanes: reader.array("lanes", LANES_MAX, 2, |reader| {
                reader.string("lane", LANE_NAME_BYTES_MAX)
            })?,
            configs: decode_configs(reader)?,
        })
    }
}

impl RequestBody for CreateTopicRequest {
    const API_KEY: ApiKey = ApiKey::CreateTopic;
    type Response = CreateTopicResponse;

    fn encode(&self, writer: &mut Writer) {
        writer.string(&self.name);
        writer.u32(self.partitions);
        writer.array(&self.lanes, |writer, lane| writer.string(lane));
        encode_configs(writer, &self.configs);
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CreateTopicResponse;

impl ResponseBody for CreateTopicResponse {
    fn encode(&self, _writer: &mut Writer) {}

    fn decode(_reader: &mut Reader) -> Result<CreateTopicResponse, DecodeError> {
        Ok(CreateTopicResponse)
    }
}
