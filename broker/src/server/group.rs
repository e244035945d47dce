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

use super::{Broker, blocking};
use crate::group::GroupError;

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

pub(super) fn heartbeat(broker: &Arc<Broker>, id: u32, request: &HeartbeatRequest) -> Vec<Bytes> {
    reply("heartbeat", id, broker.groups.heartbeat(request))
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
