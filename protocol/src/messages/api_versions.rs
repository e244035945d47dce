//! ApiVersions (key 0): the handshake. It must be the first request on a connection;
//! the broker answers any other first request with `HANDSHAKE_REQUIRED`. Versions 0 and
//! 1; a client asks for 1 and falls back to 0 if the broker refuses it (an older
//! broker).
//!
//! Request body: empty.
//!
//! Response body:
//!
//! | field            | type   | meaning                                      |
//! |------------------|--------|----------------------------------------------|
//! | `apis`           | array  | of `api_key u16, min_version u16, max_version u16` |
//! | `broker_version` | string | the broker's software version                |
//! | `batch_bytes_max` | u32   | version 1 only: the largest record batch the broker takes |

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
    const API_VERSION: u16 = 1;
    type Response = ApiVersionsResponse;

    fn encode(&self, _writer: &mut Writer) {}
}

/// ApiVersions at version 0, for a broker that refuses version 1: its answer has no
/// `batch_bytes_max`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApiVersionsRequestV0;

impl RequestBody for ApiVersionsRequestV0 {
    const API_KEY: ApiKey = ApiKey::ApiVersions;
    type Response = ApiVersionsResponseV0;

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
    /// makes none larger. Only in version 1.
    pub batch_bytes_max: Option<u32>,
}

impl ApiVersionsResponse {
    /// What this crate speaks, from a broker taking batches of up to `batch_bytes_max`
    /// (`None` for an answer at version 0).
    pub fn supported(broker_version: &str, batch_bytes_max: Option<u32>) -> ApiVersionsResponse {
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
        if let Some(batch_bytes_max) = self.batch_bytes_max {
            writer.u32(batch_bytes_max);
        }
    }

    /// Version 1's answer.
    fn decode(reader: &mut Reader) -> Result<ApiVersionsResponse, DecodeError> {
        let mut response = decode_version_0(reader)?;
        response.batch_bytes_max = Some(reader.u32("batch_bytes_max")?);
        Ok(response)
    }
}

/// The fields both versions have.
fn decode_version_0(reader: &mut Reader) -> Result<ApiVersionsResponse, DecodeError> {
    let apis = reader.array("apis", 1024, 6, |reader| {
        Ok(ApiVersion {
            api_key: reader.u16("api_key")?,
            min_version: reader.u16("min_version")?,
            max_version: reader.u16("max_version")?,
        })
    })?;
    let broker_version = reader.string("broker_version", 255)?;
    Ok(ApiVersionsResponse {
        apis,
        broker_version,
        batch_bytes_max: None,
    })
}

/// The answer to [`ApiVersionsRequestV0`]: no `batch_bytes_max`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiVersionsResponseV0(pub ApiVersionsResponse);

impl ResponseBody for ApiVersionsResponseV0 {
    fn encode(&self, writer: &mut Writer) {
        debug_assert!(self.0.batch_bytes_max.is_none(), "not in version 0");
        self.0.encode(writer);
    }

    fn decode(reader: &mut Reader) -> Result<ApiVersionsResponseV0, DecodeError> {
        decode_version_0(reader).map(ApiVersionsResponseV0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::testing::response_roundtrip;

    #[test]
    fn roundtrip_and_truncation() {
        response_roundtrip(&ApiVersionsResponse::supported("0.1.0", Some(1 << 20)));
        response_roundtrip(&ApiVersionsResponseV0(ApiVersionsResponse::supported(
            "0.1.0", None,
        )));
    }

    #[test]
    fn common_version() {
        let response = ApiVersionsResponse::supported("x", Some(1 << 20));
        assert_eq!(response.common_version(ApiKey::Produce), Some(0));
        let none = ApiVersionsResponse {
            apis: vec![],
            broker_version: "x".into(),
            batch_bytes_max: None,
        };
        assert_eq!(none.common_version(ApiKey::Produce), None);
    }
}
