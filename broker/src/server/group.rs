//! Handlers for the consumer-group requests; the work is the [`Coordinator`]'s.
//!
//! [`Coordinator`]: crate::group::Coordinator

use std::sync::Arc;

use bytes::Bytes;
use lanes_protocol::api::{encode_error_response, encode_response};
use lanes_protocol::messages::{
    DescribeGroupRequest, HeartbeatRequest, JoinGroupRequest, LeaveGroupRequest, LeaveGroupResponse,
    ListGroupsResponse, OffsetCommitRequest, OffsetFetchRequest,
};

use tokio_util::sync::CancellationToken;

use super::dispatch::{ResponseFuture, ready};
use super::{Broker, blocking};
use crate::group::{Beat, BeatRun, GroupError};

fn reply<T: lanes_protocol::ResponseBody>(
    api: &'static str,
    id: u32,
    result: Result<T, GroupError>,
) -> Vec<Bytes> {
    match result {
        Ok(response) => encode_response(id, &response),
        Err(error) => {
            crate::metrics::rejected(api, error.code());
            encode_error_response(id, error.code(), &error.to_string())
        }
    }
}

pub(super) fn join(broker: &Arc<Broker>, id: u32, request: &JoinGroupRequest) -> Vec<Bytes> {
    // May create topics (disk I/O).
    reply(
        "join_group",
        id,
        blocking(|| broker.groups.join(&broker.topics, request)),
    )
}

/// Answers a heartbeat, or holds it while the coordinator has nothing new for the member
/// (see [`Coordinator::heartbeat`]): until the group changes, the wait is over or the
/// broker shuts down.
///
/// [`Coordinator::heartbeat`]: crate::group::Coordinator::heartbeat
pub(super) fn heartbeat(
    broker: &Arc<Broker>,
    id: u32,
    request: HeartbeatRequest,
    shutdown: CancellationToken,
) -> ResponseFuture {
    let (mut changes, wait) = match broker.groups.heartbeat(&request, BeatRun::Arrived) {
        Ok(Beat::Hold { changes, wait }) => (changes, wait),
        beat => return ready(answer_beat(id, beat)),
    };
    let broker = Arc::clone(broker);
    Box::pin(async move {
        let until = tokio::time::Instant::now() + wait;
        loop {
            let run = tokio::select! {
                changed = changes.changed() => match changed {
                    Ok(()) => BeatRun::Changed,
                    Err(_) => BeatRun::Over, // the group is gone
                },
                () = tokio::time::sleep_until(until) => BeatRun::Over,
                () = shutdown.cancelled() => BeatRun::Over,
            };
            match broker.groups.heartbeat(&request, run) {
                Ok(Beat::Hold { changes: again, .. }) => changes = again,
                beat => return Some(answer_beat(id, beat)),
            }
        }
    })
}

fn answer_beat(id: u32, beat: Result<Beat, GroupError>) -> Vec<Bytes> {
    let response = beat.map(|beat| match beat {
        Beat::Answer(response) => response,
        Beat::Hold { .. } => unreachable!("a heartbeat is held only when asked to"),
    });
    reply("heartbeat", id, response)
}

pub(super) fn leave(broker: &Arc<Broker>, id: u32, request: &LeaveGroupRequest) -> Vec<Bytes> {
    let left = broker
        .groups
        .leave(&broker.topics, &request.group, &request.member_id)
        .map(|()| LeaveGroupResponse);
    reply("leave_group", id, left)
}

pub(super) fn offset_commit(broker: &Arc<Broker>, id: u32, request: OffsetCommitRequest) -> Vec<Bytes> {
    let committed = blocking(|| broker.groups.commit(&broker.topics, request)).map(|mut response| {
        super::quiet_lane_messages(&mut response.topics, |lane| &mut lane.error_message);
        response
    });
    reply("offset_commit", id, committed)
}

pub(super) fn offset_fetch(broker: &Arc<Broker>, id: u32, request: &OffsetFetchRequest) -> Vec<Bytes> {
    encode_response(id, &broker.groups.offset_fetch(&broker.topics, request))
}

pub(super) fn describe(broker: &Arc<Broker>, id: u32, request: &DescribeGroupRequest) -> Vec<Bytes> {
    reply(
        "describe_group",
        id,
        broker.groups.describe(&broker.topics, &request.group),
    )
}

pub(super) fn list(broker: &Arc<Broker>, id: u32) -> Vec<Bytes> {
    encode_response(
        id,
        &ListGroupsResponse {
            groups: broker.groups.list(),
        },
    )
}
