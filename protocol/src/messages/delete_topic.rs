//! DeleteTopic (key 2): removes a topic and all its data.
//!
//! Request body: `name string`. Response body: empty. Errors: `UNKNOWN_TOPIC`.

use crate::api::{ApiKey, RequestBody, ResponseBody};
use crate::messages::TOPIC_NAME_BYTES_MAX;
use crate::wire::{DecodeError, Reader, Writer};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeleteTopicRequest {
    pub name: String,
}

impl DeleteTopicRequest {
    pub(crate) fn decode(reader: &mut Reader) -> Result<DeleteTopicRequest, DecodeError> {
        Ok(DeleteTopicRequest {
            name: reader.string("name", TOPIC_NAME_BYTES_MAX)?,
        })
    }
}

impl RequestBody for DeleteTopicRequest {
    const API_KEY: ApiKey = ApiKey::DeleteTopic;
    type Response = DeleteTopicResponse;

    fn encode(&self, writer: &mut Writer) {
        writer.string(&self.name);
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeleteTopicResponse;

impl ResponseBody for DeleteTopicResponse {
    fn encode(&self, _writer: &mut Writer) {}

    fn decode(_reader: &mut Reader) -> Result<DeleteTopicResponse, DecodeError> {
        Ok(DeleteTopicResponse)
    }
}
