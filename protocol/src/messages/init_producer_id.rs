//! InitProducerId (key 7): gives an idempotent producer its id and epoch.
//!
//! Request body: empty.
//!
//! Response body: `producer_id i64, producer_epoch i16`. Ids are unique for the life
//! of the broker's data directory; the epoch starts at 0.

use crate::api::{ApiKey, RequestBody, ResponseBody};
use crate::wire::{DecodeError, Reader, Writer};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InitProducerIdRequest;

impl InitProducerIdRequest {
    pub(crate) fn decode(_reader: &mut Reader) -> Result<InitProducerIdRequest, DecodeError> {
        Ok(InitProducerIdRequest)
    }
}

impl RequestBody for InitProducerIdRequest {
    const API_KEY: ApiKey = ApiKey::InitProducerId;
    type Response = InitProducerIdResponse;

    fn encode(&self, _writer: &mut Writer) {}
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitProducerIdResponse {
    pub producer_id: i64,
    pub producer_epoch: i16,
}

impl ResponseBody for InitProducerIdResponse {
    fn encode(&self, writer: &mut Writer) {
        writer.i64(self.producer_id);
        writer.i16(self.producer_epoch);
    }

    fn decode(reader: &mut Reader) -> Result<InitProducerIdResponse, DecodeError> {
        Ok(InitProducerIdResponse {
            producer_id: reader.i64("producer_id")?,
            producer_epoch: reader.i16("producer_epoch")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::testing::response_roundtrip;

    #[test]
    fn roundtrip_and_truncation() {
        response_roundtrip(&InitProducerIdResponse {
            producer_id: 77,
            producer_epoch: 3,
        });
    }
}
