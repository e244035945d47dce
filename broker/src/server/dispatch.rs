//! Sends each request to its handler.
//!
//! Handlers run their effects (appends, topic changes) right away, in the order the
//! requests arrived on the connection, and return a future only for what they wait on
//! (durability, new data). So pipelined produce requests append in the order they were
//! sent, whatever order their waits end in, and responses still go out in order.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use lanes_protocol::api::{RequestError, decode_request, encode_error_response, encode_response};
use lanes_protocol::messages::ApiVersionsResponse;
use lanes_protocol::{ApiKey, ErrorCode, Request};
use tokio_util::sync::CancellationToken;

use super::fetch::LaneCredit;
use super::{Broker, VERSION, admin, fetch, group, produce};
use crate::metrics;

/// A response frame to come; `None` for requests answered with silence (acks = none).
pub(super) type ResponseFuture = Pin<Box<dyn Future<Output = Option<Vec<Bytes>>> + Send>>;

/// What the connection does with one request.
pub(super) struct Reply {
    pub(super) frame: ResponseFuture,
    /// Close the connection after answering: the byte stream cannot be trusted.
    pub(super) close: bool,
}

pub(super) fn ready(frame: Vec<Bytes>) -> ResponseFuture {
    Box::pin(std::future::ready(Some(frame)))
}

fn answer(frame: Vec<Bytes>) -> Reply {
    Reply {
        frame: ready(frame),
        close: false,
    }
}

/// What a connection remembers between its requests.
#[derive(Debug, Default)]
pub(super) struct Session {
    pub(super) handshaken: bool,
    pub(super) lane_credit: Arc<Mutex<LaneCredit>>,
}

pub(super) fn dispatch(
    broker: &Arc<Broker>,
    frame: BytesMut,
    session: &mut Session,
    shutdown: &CancellationToken,
) -> Reply {
    let (header, request) = match decode_request(frame) {
        Ok(decoded) => decoded,
        Err(error) => return refuse(&error),
    };
    let id = header.correlation_id;
    let api = metrics::api_name(&request);
    ::metrics::counter!(metrics::REQUESTS, "api" => api).increment(1);
    if !session.handshaken {
        if header.api_key != ApiKey::ApiVersions as u16 {
            let message = "the first request on a connection must be ApiVersions";
            metrics::rejected(api, ErrorCode::HandshakeRequired);
            return answer(encode_error_response(id, ErrorCode::HandshakeRequired, message));
        }
        session.handshaken = true;
    }
    let started = Instant::now();
    let frame = match request {
        Request::ApiVersions(_) => ready(encode_response(
            id,
            // Version 0's answer ends at the software version.
            &ApiVersionsResponse::supported(
                VERSION,
                (header.api_version >= 1).then_some(broker.settings.batch_bytes_max),
            ),
        )),
        Request::CreateTopic(request) => ready(admin::create_topic(broker, id, &request)),
        Request::DeleteTopic(request) => ready(admin::delete_topic(broker, id, &request)),
        Request::Metadata(request) => ready(admin::metadata(broker, id, &request)),
        Request::Produce(request) => produce::produce(broker, id, request),
        Request::Fetch(request) => Box::pin(fetch::fetch(
            Arc::clone(broker),
            id,
            request,
            Arc::clone(&session.lane_credit),
            shutdown.clone(),
        )),
        Request::ListOffsets(request) => ready(admin::list_offsets(broker, id, request)),
        Request::InitProducerId(_) => ready(admin::init_producer_id(broker, id)),
        Request::JoinGroup(request) => ready(group::join(broker, id, &request)),
        Request::Heartbeat(request) => group::heartbeat(broker, id, request, shutdown.clone()),
        Request::LeaveGroup(request) => ready(group::leave(broker, id, &request)),
        Request::OffsetCommit(request) => ready(group::offset_commit(broker, id, request)),
        Request::OffsetFetch(request) => ready(group::offset_fetch(broker, id, &request)),
        Request::DescribeGroup(request) => ready(group::describe(broker, id, &request)),
        Request::ListGroups(_) => ready(group::list(broker, id)),
    };
    let frame = Box::pin(async move {
        let frame = frame.await;
        ::metrics::histogram!(metrics::REQUEST_DURATION_SECONDS, "api" => api)
            .record(started.elapsed().as_secs_f64());
        frame
    });
    Reply { frame, close: false }
}

/// Answers a request that could not be decoded. Without a readable header there is no
/// correlation id to answer to: answer 0 and close.
fn refuse(error: &RequestError) -> Reply {
    match error.answer() {
        Some((header, code, message)) => {
            metrics::rejected("undecodable", code);
            answer(encode_error_response(header.correlation_id, code, &message))
        }
        None => Reply {
            frame: ready({
                metrics::rejected("undecodable", ErrorCode::MalformedRequest);
                encode_error_response(0, ErrorCode::MalformedRequest, &error.to_string())
            }),
            close: true,
        },
    }
}
