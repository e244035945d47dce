//! Frames, headers and the list of APIs.
//!
//! Every message travels in a frame: a `u32` length (of what follows), then a header,
//! then the body.
//!
//! | request header   | type   | meaning                                             |
//! |------------------|--------|-----------------------------------------------------|
//! | `api_key`        | u16    | which API ([`ApiKey`])                              |
//! | `api_version`    | u16    | its version (all are 0 so far)                     |
//! | `correlation_id` | u32    | chosen by the client, echoed in the response        |
//! | `client_id`      | string | free text naming the client, ≤ 255 bytes           |
//!
//! | response header  | type   | meaning                                             |
//! |------------------|--------|-----------------------------------------------------|
//! | `correlation_id` | u32    | the request's                                       |
//! | `error_code`     | u16    | [`ErrorCode`]; 0 if the request as a whole succeeded |
//! | `error_message`  | string | empty, or a human-readable reason, ≤ 1024 bytes     |
//!
//! The response body follows only when `error_code` is 0. Responses come back in the
//! order the requests were sent. Produce requests with `acks = none` get no response.

use bytes::{Bytes, BytesMut};

use crate::ErrorCode;
use crate::messages::{
    ApiVersionsRequest, CreateTopicRequest, DeleteTopicRequest, DescribeGroupRequest, FetchRequest,
    HeartbeatRequest, InitProducerIdRequest, JoinGroupRequest, LeaveGroupRequest, ListGroupsRequest,
    ListOffsetsRequest, MetadataRequest, OffsetCommitRequest, OffsetFetchRequest, ProduceRequest,
};
use crate::wire::{DecodeError, Reader, Writer};

pub const CLIENT_ID_BYTES_MAX: usize = 255;
pub const ERROR_MESSAGE_BYTES_MAX: usize = 1024;
/// Bytes of a frame that hold the api key, version and correlation id: enough to answer
/// a frame even when the rest cannot be read.
pub const REQUEST_PREFIX_BYTES: usize = 8;

/// The APIs, numbered for the wire. Numbers never change.
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ApiKey {
    ApiVersions = 0,
    CreateTopic = 1,
    DeleteTopic = 2,
    Metadata = 3,
    Produce = 4,
    Fetch = 5,
    ListOffsets = 6,
    InitProducerId = 7,
    JoinGroup = 8,
    Heartbeat = 9,
    LeaveGroup = 10,
    OffsetCommit = 11,
    OffsetFetch = 12,
    DescribeGroup = 13,
    ListGroups = 14,
}

impl ApiKey {
    pub const ALL: &'static [ApiKey] = &[
        ApiKey::ApiVersions,
        ApiKey::CreateTopic,
        ApiKey::DeleteTopic,
        ApiKey::Metadata,
        ApiKey::Produce,
        ApiKey::Fetch,
        ApiKey::ListOffsets,
        ApiKey::InitProducerId,
        ApiKey::JoinGroup,
        ApiKey::Heartbeat,
        ApiKey::LeaveGroup,
        ApiKey::OffsetCommit,
        ApiKey::OffsetFetch,
        ApiKey::DescribeGroup,
        ApiKey::ListGroups,
    ];

    pub fn from_u16(value: u16) -> Option<ApiKey> {
        ApiKey::ALL.iter().copied().find(|k| *k as u16 == value)
    }

    /// The versions of this API this crate speaks.
    pub fn versions(self) -> (u16, u16) {
        match self {
            // Version 1 adds the broker's `batch_bytes_max` to the answer.
            ApiKey::ApiVersions => (0, 1),
            // Version 1 adds `wait_ms_max`: the long-poll heartbeat.
            ApiKey::Heartbeat => (0, 1),
            _ => (0, 0),
        }
    }
}

/// A request header, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    /// Raw, so that an unknown key can still be answered.
    pub api_key: u16,
    pub api_version: u16,
    pub correlation_id: u32,
    pub client_id: String,
}

/// A response header, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseHeader {
    pub correlation_id: u32,
    pub error_code: ErrorCode,
    pub error_message: String,
}

/// A request the client can send: its API, its encoding and the type of its answer.
pub trait RequestBody {
    const API_KEY: ApiKey;
    const API_VERSION: u16 = 0;
    type Response: ResponseBody;
    fn encode(&self, writer: &mut Writer);
}

/// A response body: encoded by the broker, decoded by the client.
pub trait ResponseBody: Sized {
    fn encode(&self, writer: &mut Writer);
    fn decode(reader: &mut Reader) -> Result<Self, DecodeError>;
}

/// A decoded request, as the broker sees it.
#[derive(Debug)]
pub enum Request {
    ApiVersions(ApiVersionsRequest),
    CreateTopic(CreateTopicRequest),
    DeleteTopic(DeleteTopicRequest),
    Metadata(MetadataRequest),
    /// Batches stay mutable, split off the frame: the broker stamps offsets in place.
    Produce(ProduceRequest<BytesMut>),
    Fetch(FetchRequest),
    ListOffsets(ListOffsetsRequest),
    InitProducerId(InitProducerIdRequest),
    JoinGroup(JoinGroupRequest),
    Heartbeat(HeartbeatRequest),
    LeaveGroup(LeaveGroupRequest),
    OffsetCommit(OffsetCommitRequest),
    OffsetFetch(OffsetFetchRequest),
    DescribeGroup(DescribeGroupRequest),
    ListGroups(ListGroupsRequest),
}

/// Why a request frame could not be turned into a [`Request`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Not even the header could be read; the connection cannot be trusted.
    #[error("bad request header: {0}")]
    Header(DecodeError),
    #[error("unknown api key {}", .0.api_key)]
    UnknownApiKey(RequestHeader),
    #[error("api key {} does not support version {}", .0.api_key, .0.api_version)]
    UnsupportedVersion(RequestHeader),
    #[error("bad request body: {1}")]
    Body(RequestHeader, DecodeError),
}

impl RequestError {
    /// The error code and message to answer with, and the header to answer to.
    pub fn answer(&self) -> Option<(&RequestHeader, ErrorCode, String)> {
        let message = self.to_string();
        match self {
            RequestError::Header(_) => None,
            RequestError::UnknownApiKey(header) => Some((header, ErrorCode::UnknownApiKey, message)),
            RequestError::UnsupportedVersion(header) => {
                Some((header, ErrorCode::UnsupportedVersion, message))
            }
            RequestError::Body(header, _) => Some((header, ErrorCode::MalformedRequest, message)),
        }
    }
}

/// Encodes a whole request frame.
pub fn encode_request<R: RequestBody>(correlation_id: u32, client_id: &str, request: &R) -> Vec<Bytes> {
    let mut writer = Writer::frame();
    writer.u16(R::API_KEY as u16);
    writer.u16(R::API_VERSION);
    writer.u32(correlation_id);
    writer.string(truncate(client_id, CLIENT_ID_BYTES_MAX));
    request.encode(&mut writer);
    writer.into_frame()
}

/// Decodes a request frame (without its length prefix).
pub fn decode_request(frame: BytesMut) -> Result<(RequestHeader, Request), RequestError> {
    let mut reader = Reader::new(frame);
    let header = decode_request_header(&mut reader).map_err(RequestError::Header)?;
    let Some(api_key) = ApiKey::from_u16(header.api_key) else {
        return Err(RequestError::UnknownApiKey(header));
    };
    let (min, max) = api_key.versions();
    if header.api_version < min || header.api_version > max {
        return Err(RequestError::UnsupportedVersion(header));
    }
    let decoded = match api_key {
        ApiKey::ApiVersions => ApiVersionsRequest::decode(&mut reader).map(Request::ApiVersions),
        ApiKey::CreateTopic => CreateTopicRequest::decode(&mut reader).map(Request::CreateTopic),
        ApiKey::DeleteTopic => DeleteTopicRequest::decode(&mut reader).map(Request::DeleteTopic),
        ApiKey::Metadata => MetadataRequest::decode(&mut reader).map(Request::Metadata),
        ApiKey::Produce => ProduceRequest::decode(&mut reader).map(Request::Produce),
        ApiKey::Fetch => FetchRequest::decode(&mut reader).map(Request::Fetch),
        ApiKey::ListOffsets => ListOffsetsRequest::decode(&mut reader).map(Request::ListOffsets),
        ApiKey::InitProducerId => InitProducerIdRequest::decode(&mut reader).map(Request::InitProducerId),
        ApiKey::JoinGroup => JoinGroupRequest::decode(&mut reader).map(Request::JoinGroup),
        ApiKey::Heartbeat => {
            HeartbeatRequest::decode(&mut reader, header.api_version).map(Request::Heartbeat)
        }
        ApiKey::LeaveGroup => LeaveGroupRequest::decode(&mut reader).map(Request::LeaveGroup),
        ApiKey::OffsetCommit => OffsetCommitRequest::decode(&mut reader).map(Request::OffsetCommit),
        ApiKey::OffsetFetch => OffsetFetchRequest::decode(&mut reader).map(Request::OffsetFetch),
        ApiKey::DescribeGroup => DescribeGroupRequest::decode(&mut reader).map(Request::DescribeGroup),
        ApiKey::ListGroups => ListGroupsRequest::decode(&mut reader).map(Request::ListGroups),
    };
    let request = decoded
        .and_then(|request| reader.finish().map(|()| request))
        .map_err(|error| RequestError::Body(header.clone(), error))?;
    Ok((header, request))
}

fn decode_request_header(reader: &mut Reader) -> Result<RequestHeader, DecodeError> {
    Ok(RequestHeader {
        api_key: reader.u16("api_key")?,
        api_version: reader.u16("api_version")?,
        correlation_id: reader.u32("correlation_id")?,
        client_id: reader.string("client_id", CLIENT_ID_BYTES_MAX)?,
    })
}

/// Encodes a successful response frame.
pub fn encode_response<B: ResponseBody>(correlation_id: u32, body: &B) -> Vec<Bytes> {
    let mut writer = Writer::frame();
    writer.u32(correlation_id);
    writer.u16(ErrorCode::None as u16);
    writer.string("");
    body.encode(&mut writer);
    writer.into_frame()
}

/// Encodes a response frame for a request that failed as a whole: header only.
pub fn encode_error_response(correlation_id: u32, error_code: ErrorCode, message: &str) -> Vec<Bytes> {
    let mut writer = Writer::frame();
    writer.u32(correlation_id);
    writer.u16(error_code as u16);
    writer.string(truncate(message, ERROR_MESSAGE_BYTES_MAX));
    writer.into_frame()
}

/// Decodes a response header and returns the reader positioned at the body.
pub fn decode_response_header(frame: BytesMut) -> Result<(ResponseHeader, Reader), DecodeError> {
    let mut reader = Reader::new(frame);
    let correlation_id = reader.u32("correlation_id")?;
    let code = reader.u16("error_code")?;
    let error_code = ErrorCode::from_u16(code).ok_or(DecodeError::InvalidValue {
        field: "error_code",
        value: i64::from(code),
    })?;
    let error_message = reader.string("error_message", ERROR_MESSAGE_BYTES_MAX)?;
    let header = ResponseHeader {
        correlation_id,
        error_code,
        error_message,
    };
    Ok((header, reader))
}

/// Decodes a response body of type `B` and checks nothing is left over.
pub fn decode_response_body<B: ResponseBody>(mut reader: Reader) -> Result<B, DecodeError> {
    let body = B::decode(&mut reader)?;
    reader.finish()?;
    Ok(body)
}

/// The longest prefix of `text` that fits in `max` bytes on a character boundary.
pub fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use bytes::{Bytes, BytesMut};

    use super::*;
    use crate::messages::{
        Acks, FetchLane, ListOffsetsLane, OffsetSpec, PartitionItems, ProduceLane, TopicConfig, TopicItems,
    };
    use crate::{Lane, Offset, PartitionId};

    /// The frame's payload (without the length prefix), checking the prefix.
    fn payload(chunks: Vec<Bytes>) -> BytesMut {
        let mut frame = BytesMut::new();
        for chunk in chunks {
            frame.extend_from_slice(&chunk);
        }
        let length = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
        assert_eq!(length, frame.len() - 4, "length prefix");
        frame.split_off(4)
    }

    /// Encodes `request`, decodes it back and hands it to `check`; then checks that every
    /// truncation of the frame is an error.
    fn request_roundtrip<R: RequestBody>(request: &R, check: impl FnOnce(Request)) {
        let frame = payload(encode_request(9, "test-client", request));
        let (header, decoded) = decode_request(frame.clone()).expect("decodes");
        assert_eq!(header.api_key, R::API_KEY as u16);
        assert_eq!(
            (header.correlation_id, header.client_id.as_str()),
            (9, "test-client")
        );
        check(decoded);
        for cut in 0..frame.len() {
            let truncated = BytesMut::from(&frame[..cut]);
            assert!(
                decode_request(truncated).is_err(),
                "a request cut at {cut} decoded"
            );
        }
    }

    fn one_lane<T>(item: T) -> Vec<TopicItems<T>> {
        vec![TopicItems {
            name: "orders".into(),
            partitions: vec![PartitionItems {
                partition: PartitionId(2),
                lanes: vec![item],
            }],
        }]
    }

    #[test]
    fn every_request_roundtrips_and_every_truncation_fails() {
        request_roundtrip(&crate::messages::ApiVersionsRequest, |r| {
            assert!(matches!(r, Request::ApiVersions(_)))
        });
        let create = crate::messages::CreateTopicRequest {
            name: "orders".into(),
            partitions: 12,
            lanes: vec!["express".into(), "standard".into(), "bulk".into()],
            configs: vec![TopicConfig {
                key: "retention_ms".into(),
                value: "3600000".into(),
            }],
        };
        request_roundtrip(&create, |r| {
            assert!(matches!(r, Request::CreateTopic(c) if c == create))
        });
        let delete = crate::messages::DeleteTopicRequest {
            name: "orders".into(),
        };
        request_roundtrip(&delete, |r| {
            assert!(matches!(r, Request::DeleteTopic(d) if d == delete))
        });
        let metadata = crate::messages::MetadataRequest {
            topics: vec!["a".into(), "b".into()],
        };
        request_roundtrip(&metadata, |r| {
            assert!(matches!(r, Request::Metadata(m) if m == metadata))
        });
        let batch = Bytes::from(vec![5u8; 6000]);
        let produce = crate::messages::ProduceRequest {
            acks: Acks::Durable,
            timeout_ms: 5000,
            topics: one_lane(ProduceLane {
                lane: Lane(1),
                batch: batch.clone(),
            }),
        };
        request_roundtrip(&produce, |r| {
            let Request::Produce(p) = r else {
                panic!("not a produce")
            };
            assert_eq!((p.acks, p.timeout_ms), (Acks::Durable, 5000));
            let lane = &p.topics[0].partitions[0].lanes[0];
            assert_eq!((lane.lane, &lane.batch[..]), (Lane(1), &batch[..]));
        });
        let fetch = crate::messages::FetchRequest {
            wait_ms_max: 500,
            bytes_min: 1,
            bytes_max: 1 << 20,
            lane_bytes_max: vec![1 << 20, 0, 4096],
            topics: one_lane(FetchLane {
                lane: Lane(0),
                offset: Offset(77),
                bytes_max: 4096,
            }),
        };
        request_roundtrip(&fetch, |r| assert!(matches!(r, Request::Fetch(f) if f == fetch)));
        let list = crate::messages::ListOffsetsRequest {
            topics: one_lane(ListOffsetsLane {
                lane: Lane(2),
                spec: OffsetSpec::Timestamp(1_700_000_000_000),
            }),
        };
        request_roundtrip(&list, |r| {
            assert!(matches!(r, Request::ListOffsets(l) if l == list))
        });
        request_roundtrip(&crate::messages::InitProducerIdRequest, |r| {
            assert!(matches!(r, Request::InitProducerId(_)))
        });
        let partitions = vec![crate::messages::TopicPartitions {
            topic: "orders".into(),
            partitions: vec![PartitionId(1), PartitionId(4)],
        }];
        let join = crate::messages::JoinGroupRequest {
            group: "fulfilment".into(),
            member_id: String::new(),
            client_id: "worker-1".into(),
            topics: vec!["orders".into()],
            session_timeout_ms: 10_000,
        };
        request_roundtrip(&join, |r| {
            assert!(matches!(r, Request::JoinGroup(j) if j == join))
        });
        let heartbeat = crate::messages::HeartbeatRequest {
            group: "fulfilment".into(),
            member_id: "m-1".into(),
            owned: partitions.clone(),
            wait_ms_max: 1000,
        };
        request_roundtrip(&heartbeat, |r| {
            assert!(matches!(r, Request::Heartbeat(h) if h == heartbeat))
        });
        let leave = crate::messages::LeaveGroupRequest {
            group: "fulfilment".into(),
            member_id: "m-1".into(),
        };
        request_roundtrip(&leave, |r| {
            assert!(matches!(r, Request::LeaveGroup(l) if l == leave))
        });
        let commit = crate::messages::OffsetCommitRequest {
            group: "fulfilment".into(),
            member_id: "m-1".into(),
            topics: one_lane(crate::messages::CommitLane {
                lane: Lane(2),
                offset: Offset(99),
            }),
        };
        request_roundtrip(&commit, |r| {
            assert!(matches!(r, Request::OffsetCommit(c) if c == commit))
        });
        let fetch_offsets = crate::messages::OffsetFetchRequest {
            group: "fulfilment".into(),
            partitions,
        };
        request_roundtrip(&fetch_offsets, |r| {
            assert!(matches!(r, Request::OffsetFetch(f) if f == fetch_offsets))
        });
        let describe = crate::messages::DescribeGroupRequest {
            group: "fulfilment".into(),
        };
        request_roundtrip(&describe, |r| {
            assert!(matches!(r, Request::DescribeGroup(d) if d == describe))
        });
        request_roundtrip(&crate::messages::ListGroupsRequest, |r| {
            assert!(matches!(r, Request::ListGroups(_)))
        });
    }

    #[test]
    fn unknown_keys_versions_and_trailing_bytes_are_answerable() {
        let mut frame = payload(encode_request(5, "c", &crate::messages::ApiVersionsRequest));
        frame[0..2].copy_from_slice(&999u16.to_be_bytes());
        let error = decode_request(frame.clone()).unwrap_err();
        let (header, code, _) = error.answer().unwrap();
        assert_eq!((header.correlation_id, code), (5, ErrorCode::UnknownApiKey));

        frame[0..2].copy_from_slice(&0u16.to_be_bytes());
        frame[2..4].copy_from_slice(&7u16.to_be_bytes());
        let error = decode_request(frame.clone()).unwrap_err();
        assert_eq!(error.answer().unwrap().1, ErrorCode::UnsupportedVersion);

        frame[2..4].copy_from_slice(&0u16.to_be_bytes());
        frame.extend_from_slice(b"junk");
        let error = decode_request(frame).unwrap_err();
        assert_eq!(error.answer().unwrap().1, ErrorCode::MalformedRequest);

        assert!(
            decode_request(BytesMut::from(&[0u8, 0, 0][..]))
                .unwrap_err()
                .answer()
                .is_none()
        );
    }

    #[test]
    fn a_version_0_heartbeat_does_not_wait_and_has_no_wait_field() {
        let heartbeat = crate::messages::HeartbeatRequest {
            group: "fulfilment".into(),
            member_id: "m-1".into(),
            owned: Vec::new(),
            wait_ms_max: 5000,
        };
        let v0 = payload(encode_request(
            4,
            "c",
            &crate::messages::HeartbeatRequestV0(heartbeat.clone()),
        ));
        assert_eq!(&v0[2..4], &0u16.to_be_bytes(), "sent as version 0");
        let mut frame = payload(encode_request(4, "c", &heartbeat));
        assert_eq!(&frame[2..4], &1u16.to_be_bytes(), "sent as version 1");
        frame[2..4].copy_from_slice(&0u16.to_be_bytes());
        // Version 0 ends before `wait_ms_max`: its 4 bytes are trailing bytes there.
        let error = decode_request(frame.clone()).unwrap_err();
        assert_eq!(error.answer().unwrap().1, ErrorCode::MalformedRequest);
        frame.truncate(frame.len() - 4);
        assert_eq!(frame, v0, "version 0 is version 1 without `wait_ms_max`");
        let (_, decoded) = decode_request(frame).unwrap();
        let Request::Heartbeat(decoded) = decoded else {
            panic!("decoded as {decoded:?}");
        };
        assert_eq!(
            decoded,
            crate::messages::HeartbeatRequest {
                wait_ms_max: 0,
                ..heartbeat
            }
        );
    }

    #[test]
    fn responses_carry_errors_in_the_header() {
        let frame = payload(encode_error_response(3, ErrorCode::UnknownTopic, "no topic x"));
        let (header, reader) = decode_response_header(frame).unwrap();
        assert_eq!(header.correlation_id, 3);
        assert_eq!(header.error_code, ErrorCode::UnknownTopic);
        assert_eq!(header.error_message, "no topic x");
        assert_eq!(reader.remaining(), 0);

        let body = crate::messages::InitProducerIdResponse {
            producer_id: 1,
            producer_epoch: 0,
        };
        let frame = payload(encode_response(4, &body));
        let (header, reader) = decode_response_header(frame).unwrap();
        assert_eq!(header.error_code, ErrorCode::None);
        assert_eq!(
            decode_response_body::<crate::messages::InitProducerIdResponse>(reader).unwrap(),
            body
        );
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }

    proptest::proptest! {
        #[test]
        fn random_frames_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let _ = decode_request(BytesMut::from(&bytes[..]));
            let _ = decode_response_header(BytesMut::from(&bytes[..]));
        }
    }
}
