//! ApiVersions (key 0): the handshake. It must be the first request on a connection;
//! the broker answers any other first request with `HANDSHAKE_REQUIRED`.
//!
//! Request body: empty.
//!
//! Response body:
//!
//! | field            | type   | meaning                                      |
//! |------------------|--------|----------------------------------------------|
//! | `apis`           | array  | of `api_key u16, min_version u16, max_version u16` |
//! | `broker_version` | string | the broker's software version                |
//! | `batch_bytes_max` | u32   | the largest record batch the broker takes    |

use crate::api::{ApiKey, RequestBody, ResponseBody};
use crate::wire::{DecodeError, Reader, Writer};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApiVersionsRequest;

impl ApiVersionsRequest {
    pub(crate) fn decode(_reader: &mut Reader) -> Result<ApiVersionsRequest, DecodeError> {
        Ok(ApiVersionsRequest)
    }
}

impl RequestBody for ApiVersionsRequest {
    const API_KEY: ApiKey = ApiKey::ApiVersions;
    type Response = ApiVersionsResponse;

    fn encode(&self, _writer: &mut Writer) {}
}

/// The versions of one API that the broker speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiVersion {
    pub api_key: u16,
    pub min_version: u16,
    pub max_version: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiVersionsResponse {
    pub apis: Vec<ApiVersion>,
    pub broker_version: String,
    /// The largest record batch the broker takes (its `batch_bytes_max`): a producer
    /// makes none larger.
    pub batch_bytes_max: u32,
}

impl ApiVersionsResponse {
    /// What this crate speaks, from a broker taking batches of up to `batch_bytes_max`.
    pub fn supported(broker_version: &str, batch_bytes_max: u32) -> ApiVersionsResponse {
        let apis = ApiKey::ALL
            .iter()
            .map(|key| {
                let (min_version, max_version) = key.versions();
                ApiVersion {
                    api_key: *key as u16,
                    min_version,
                    max_version,
                }
            })
            .collect();
        ApiVersionsResponse {
            apis,
            broker_version: broker_version.to_owned(),
            batch_bytes_max,
        }
    }

    /// The highest version of `key` both sides speak, if any.
    pub fn common_version(&self, key: ApiKey) -> Option<u16> {
        let (ours_min, ours_max) = key.versions();
        let theirs = self.apis.iter().find(|a| a.api_key == key as u16)?;
        let max = ours_max.min(theirs.max_version);
        (max >= ours_min.max(theirs.min_version)).then_some(max)
    }
}

impl ResponseBody for ApiVersionsResponse {
    fn encode(&self, writer: &mut Writer) {
        writer.array(&self.apis, |writer, api| {
            writer.u16(api.api_key);
            writer.u16(api.min_version);
            writer.u16(api.max_version);
        });
        writer.string(&self.broker_version);
        writer.u32(self.batch_bytes_max);
    }

    fn decode(reader: &mut Reader) -> Result<ApiVersionsResponse, DecodeError> {
        let apis = reader.array("apis", 1024, 6, |reader| {
            Ok(ApiVersion {
                api_key: reader.u16("api_key")?,
                min_version: reader.u16("min_version")?,
                max_version: reader.u16("max_version")?,
            })
        })?;
        let broker_version = reader.string("broker_version", 255)?;
        let batch_bytes_max = reader.u32("batch_bytes_max")?;
        Ok(ApiVersionsResponse {
            apis,
            broker_version,
            batch_bytes_max,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::testing::response_roundtrip;

    #[test]
    fn roundtrip_and_truncation() {
        response_roundtrip(&ApiVersionsResponse::supported("0.1.0", 1 << 20));
    }

    #[test]
    fn common_version() {
        let response = ApiVersionsResponse::supported("x", 1 << 20);
        assert_eq!(response.common_version(ApiKey::Produce), Some(0));
        let none = ApiVersionsResponse {
            apis: vec![],
            broker_version: "x".into(),
            batch_bytes_max: 1 << 20,
        };
        assert_eq!(none.common_version(ApiKey::Produce), None);
    }
}
