//! Consumer groups: JoinGroup (8), Heartbeat (9), LeaveGroup (10), OffsetCommit (11),
//! OffsetFetch (12), DescribeGroup (13), ListGroups (14).
//!
//! The broker assigns partitions (all lanes of a partition to one member) and moves
//! them cooperatively: every heartbeat reports the partitions the member holds and gets
//! back the ones it should hold. A partition left out of the answer is being moved: the
//! member stops reading it, commits, and leaves it out of its next heartbeat; only then
//! does the coordinator give it to its new owner (or once the old owner's session has
//! timed out). OffsetCommit is accepted only from a partition's current owner.
//!
//! An *assignment* is `array<{topic string, partitions array<u32>}>`.

use super::{
    PARTITIONS_MAX, TOPIC_NAME_BYTES_MAX, TOPICS_PER_REQUEST_MAX, TopicItems, decode_topics, encode_topics,
    get_error, get_lane, put_error,
};
use crate::api::{ApiKey, RequestBody, ResponseBody};
use crate::wire::{DecodeError, Reader, Writer};
use crate::{ErrorCode, LANES_MAX, Lane, Offset, PartitionId};

pub const GROUP_NAME_BYTES_MAX: usize = TOPIC_NAME_BYTES_MAX;
pub const MEMBER_ID_BYTES_MAX: usize = 255;

/// The partitions of one topic, as assignments list them.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TopicPartitions {
    pub topic: String,
    pub partitions: Vec<PartitionId>,
}

pub type Assignment = Vec<TopicPartitions>;

fn put_assignment(writer: &mut Writer, assignment: &[TopicPartitions]) {
    writer.array(assignment, |writer, topic| {
        writer.string(&topic.topic);
        writer.array(&topic.partitions, |writer, p| writer.u32(p.0));
    });
}

fn get_assignment(reader: &mut Reader) -> Result<Assignment, DecodeError> {
    reader.array("assignment", TOPICS_PER_REQUEST_MAX, 6, |reader| {
        Ok(TopicPartitions {
            topic: reader.string("topic", TOPIC_NAME_BYTES_MAX)?,
            partitions: reader.array("partitions", PARTITIONS_MAX, 4, |r| {
                Ok(PartitionId(r.u32("partition")?))
            })?,
        })
    })
}

/// JoinGroup (8). Request: `group string, member_id string` (empty to join as a new
/// member), `client_id string, topics array<string>` (the subscription),
/// `session_timeout_ms u32`. Response: `member_id string, generation u32,
/// heartbeat_interval_ms u32, assignment, pending u32` (as in Heartbeat). Errors:
/// `INVALID_GROUP_NAME`, `LIMIT_EXCEEDED` (groups_max, group_members_max),
/// `INVALID_CONFIG` (session timeout out of the broker's range), `UNKNOWN_TOPIC`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinGroupRequest {
    pub group: String,
    pub member_id: String,
    pub client_id: String,
    pub topics: Vec<String>,
    pub session_timeout_ms: u32,
}

impl JoinGroupRequest {
    pub(crate) fn decode(reader: &mut Reader) -> Result<JoinGroupRequest, DecodeError> {
        Ok(JoinGroupRequest {
            group: reader.string("group", GROUP_NAME_BYTES_MAX)?,
            member_id: reader.string("member_id", MEMBER_ID_BYTES_MAX)?,
            client_id: reader.string("client_id", MEMBER_ID_BYTES_MAX)?,
            topics: reader.array("topics", TOPICS_PER_REQUEST_MAX, 2, |r| {
                r.string("topic", TOPIC_NAME_BYTES_MAX)
            })?,
            session_timeout_ms: reader.u32("session_timeout_ms")?,
        })
    }
}

impl RequestBody for JoinGroupRequest {
    const API_KEY: ApiKey = ApiKey::JoinGroup;
    type Response = JoinGroupResponse;

    fn encode(&self, writer: &mut Writer) {
        writer.string(&self.group);
        writer.string(&self.member_id);
        writer.string(&self.client_id);
        writer.array(&self.topics, |w, t| w.string(t));
        writer.u32(self.session_timeout_ms);
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinGroupResponse {
    pub member_id: String,
    pub generation: u32,
    pub heartbeat_interval_ms: u32,
    pub assignment: Assignment,
    pub pending: u32,
}

impl ResponseBody for JoinGroupResponse {
    fn encode(&self, writer: &mut Writer) {
        writer.string(&self.member_id);
        writer.u32(self.generation);
        writer.u32(self.heartbeat_interval_ms);
        put_assignment(writer, &self.assignment);
        writer.u32(self.pending);
    }

    fn decode(reader: &mut Reader) -> Result<JoinGroupResponse, DecodeError> {
        Ok(JoinGroupResponse {
            member_id: reader.string("member_id", MEMBER_ID_BYTES_MAX)?,
            generation: reader.u32("generation")?,
            heartbeat_interval_ms: reader.u32("heartbeat_interval_ms")?,
            assignment: get_assignment(reader)?,
            pending: reader.u32("pending")?,
        })
    }
}

/// Heartbeat (9). Request: `group string, member_id string, owned` (an assignment: the
/// partitions the member holds now), and from version 1 `wait_ms_max u32`. Response:
/// `generation u32, assignment` (the partitions it should hold now), `pending u32` (how
/// many more it will get once their previous owners release them). Errors:
/// `UNKNOWN_MEMBER` (join again).
///
/// With `wait_ms_max` above 0, a heartbeat with nothing new to answer (the assignment
/// is what the member reports holding) is held by the broker until the group changes or
/// that long passes (at most half the member's session): a long poll, so a member
/// learns of a move at once instead of at its next heartbeat. Version 0 means 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeartbeatRequest {
    pub group: String,
    pub member_id: String,
    pub owned: Assignment,
    pub wait_ms_max: u32,
}

impl HeartbeatRequest {
    pub(crate) fn decode(reader: &mut Reader, api_version: u16) -> Result<HeartbeatRequest, DecodeError> {
        Ok(HeartbeatRequest {
            group: reader.string("group", GROUP_NAME_BYTES_MAX)?,
            member_id: reader.string("member_id", MEMBER_ID_BYTES_MAX)?,
            owned: get_assignment(reader)?,
            wait_ms_max: if api_version >= 1 {
                reader.u32("wait_ms_max")?
            } else {
                0
            },
        })
    }
}

impl RequestBody for HeartbeatRequest {
    const API_KEY: ApiKey = ApiKey::Heartbeat;
    // Version 1 adds `wait_ms_max`.
    const API_VERSION: u16 = 1;
    type Response = HeartbeatResponse;

    fn encode(&self, writer: &mut Writer) {
        writer.string(&self.group);
        writer.string(&self.member_id);
        put_assignment(writer, &self.owned);
        writer.u32(self.wait_ms_max);
    }
}

/// Heartbeat at version 0, for a broker whose handshake lists only version 0: the same
/// request without `wait_ms_max`, answered at once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeartbeatRequestV0(pub HeartbeatRequest);

impl RequestBody for HeartbeatRequestV0 {
    const API_KEY: ApiKey = ApiKey::Heartbeat;
    type Response = HeartbeatResponse;

    fn encode(&self, writer: &mut Writer) {
        writer.string(&self.0.group);
        writer.string(&self.0.member_id);
        put_assignment(writer, &self.0.owned);
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeartbeatResponse {
    pub generation: u32,
    pub assignment: Assignment,
    pub pending: u32,
}

impl ResponseBody for HeartbeatResponse {
    fn encode(&self, writer: &mut Writer) {
        writer.u32(self.generation);
        put_assignment(writer, &self.assignment);
        writer.u32(self.pending);
    }

    fn decode(reader: &mut Reader) -> Result<HeartbeatResponse, DecodeError> {
        Ok(HeartbeatResponse {
            generation: reader.u32("generation")?,
            assignment: get_assignment(reader)?,
            pending: reader.u32("pending")?,
        })
    }
}

/// LeaveGroup (10). Request: `group string, member_id string`. Response: empty. The
/// member's partitions go to others at once: commit before leaving.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaveGroupRequest {
    pub group: String,
    pub member_id: String,
}

impl LeaveGroupRequest {
    pub(crate) fn decode(reader: &mut Reader) -> Result<LeaveGroupRequest, DecodeError> {
        Ok(LeaveGroupRequest {
            group: reader.string("group", GROUP_NAME_BYTES_MAX)?,
            member_id: reader.string("member_id", MEMBER_ID_BYTES_MAX)?,
        })
    }
}

impl RequestBody for LeaveGroupRequest {
    const API_KEY: ApiKey = ApiKey::LeaveGroup;
    type Response = LeaveGroupResponse;

    fn encode(&self, writer: &mut Writer) {
        writer.string(&self.group);
        writer.string(&self.member_id);
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaveGroupResponse;

impl ResponseBody for LeaveGroupResponse {
    fn encode(&self, _writer: &mut Writer) {}

    fn decode(_reader: &mut Reader) -> Result<LeaveGroupResponse, DecodeError> {
        Ok(LeaveGroupResponse)
    }
}

/// One lane log's offset to commit: the offset of the next record to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommitLane {
    pub lane: Lane,
    pub offset: Offset,
}

/// OffsetCommit (11). Request: `group string, member_id string, topics` (common
/// nesting, lanes `lane u8, offset u64`: the next offset to read). Response: common
/// nesting, lanes `lane u8, error_code u16, error_message string`. The commit is durable
/// when answered. Per-lane errors: `NOT_PARTITION_OWNER`; request errors:
/// `UNKNOWN_MEMBER`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OffsetCommitRequest {
    pub group: String,
    pub member_id: String,
    pub topics: Vec<TopicItems<CommitLane>>,
}

impl OffsetCommitRequest {
    pub(crate) fn decode(reader: &mut Reader) -> Result<OffsetCommitRequest, DecodeError> {
        Ok(OffsetCommitRequest {
            group: reader.string("group", GROUP_NAME_BYTES_MAX)?,
            member_id: reader.string("member_id", MEMBER_ID_BYTES_MAX)?,
            topics: decode_topics(reader, 9, LANES_MAX, |r| {
                Ok(CommitLane {
                    lane: get_lane(r)?,
                    offset: Offset(r.u64("offset")?),
                })
            })?,
        })
    }
}

impl RequestBody for OffsetCommitRequest {
    const API_KEY: ApiKey = ApiKey::OffsetCommit;
    type Response = OffsetCommitResponse;

    fn encode(&self, writer: &mut Writer) {
        writer.string(&self.group);
        writer.string(&self.member_id);
        encode_topics(writer, &self.topics, |w, lane| {
            w.u8(lane.lane.0);
            w.u64(lane.offset.0);
        });
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitLaneResult {
    pub lane: Lane,
    pub error_code: ErrorCode,
    pub error_message: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OffsetCommitResponse {
    pub topics: Vec<TopicItems<CommitLaneResult>>,
}

impl ResponseBody for OffsetCommitResponse {
    fn encode(&self, writer: &mut Writer) {
        encode_topics(writer, &self.topics, |w, lane| {
            w.u8(lane.lane.0);
            put_error(w, lane.error_code, &lane.error_message);
        });
    }

    fn decode(reader: &mut Reader) -> Result<OffsetCommitResponse, DecodeError> {
        Ok(OffsetCommitResponse {
            topics: decode_topics(reader, 5, LANES_MAX, |r| {
                let lane = get_lane(r)?;
                let (error_code, error_message) = get_error(r)?;
                Ok(CommitLaneResult {
                    lane,
                    error_code,
                    error_message,
                })
            })?,
        })
    }
}

/// OffsetFetch (12). Request: `group string, partitions` (an assignment). Response:
/// common nesting with every lane of each partition: `lane u8, committed i64` (-1 when
/// nothing was committed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OffsetFetchRequest {
    pub group: String,
    pub partitions: Assignment,
}

impl OffsetFetchRequest {
    pub(crate) fn decode(reader: &mut Reader) -> Result<OffsetFetchRequest, DecodeError> {
        Ok(OffsetFetchRequest {
            group: reader.string("group", GROUP_NAME_BYTES_MAX)?,
            partitions: get_assignment(reader)?,
        })
    }
}

impl RequestBody for OffsetFetchRequest {
    const API_KEY: ApiKey = ApiKey::OffsetFetch;
    type Response = OffsetFetchResponse;

    fn encode(&self, writer: &mut Writer) {
        writer.string(&self.group);
        put_assignment(writer, &self.partitions);
    }
}

/// A lane log's committed offset, if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommittedLane {
    pub lane: Lane,
    pub committed: Option<Offset>,
}

fn put_committed(writer: &mut Writer, committed: Option<Offset>) {
    writer.i64(committed.map_or(-1, |o| o.0 as i64));
}

fn get_committed(reader: &mut Reader) -> Result<Option<Offset>, DecodeError> {
    match reader.i64("committed")? {
        -1 => Ok(None),
        value if value >= 0 => Ok(Some(Offset(value as u64))),
        value => Err(DecodeError::InvalidValue {
            field: "committed",
            value,
        }),
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OffsetFetchResponse {
    pub topics: Vec<TopicItems<CommittedLane>>,
}

impl ResponseBody for OffsetFetchResponse {
    fn encode(&self, writer: &mut Writer) {
        encode_topics(writer, &self.topics, |w, lane| {
            w.u8(lane.lane.0);
            put_committed(w, lane.committed);
        });
    }

    fn decode(reader: &mut Reader) -> Result<OffsetFetchResponse, DecodeError> {
        Ok(OffsetFetchResponse {
            topics: decode_topics(reader, 9, LANES_MAX, |r| {
                Ok(CommittedLane {
                    lane: get_lane(r)?,
                    committed: get_committed(r)?,
                })
            })?,
        })
    }
}

/// DescribeGroup (13). Request: `group string`. Response: `group string, state string`
/// (`stable`, `rebalancing` or `empty`), `generation u32, members array<member>,
/// offsets` (common nesting, lanes `lane u8, committed i64, end_offset u64, lag u64,
/// lag_bytes u64, oldest_age_ms i64`: the lane log's high watermark, how far the group is
/// behind it in records and bytes, and how old the oldest record it has not consumed is,
/// -1 if none). Member:
/// `member_id string, client_id string, owned, target` (what it holds, what it will
/// hold). Errors: `UNKNOWN_GROUP`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DescribeGroupRequest {
    pub group: String,
}

impl DescribeGroupRequest {
    pub(crate) fn decode(reader: &mut Reader) -> Result<DescribeGroupRequest, DecodeError> {
        Ok(DescribeGroupRequest {
            group: reader.string("group", GROUP_NAME_BYTES_MAX)?,
        })
    }
}

impl RequestBody for DescribeGroupRequest {
    const API_KEY: ApiKey = ApiKey::DescribeGroup;
    type Response = DescribeGroupResponse;

    fn encode(&self, writer: &mut Writer) {
        writer.string(&self.group);
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupMember {
    pub member_id: String,
    pub client_id: String,
    pub owned: Assignment,
    pub target: Assignment,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaneLag {
    pub lane: Lane,
    pub committed: Option<Offset>,
    pub end_offset: Offset,
    pub lag: u64,
    pub lag_bytes: u64,
    /// Age of the oldest record not consumed (ms); `None` when there is none.
    pub oldest_age_ms: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DescribeGroupResponse {
    pub group: String,
    pub state: String,
    pub generation: u32,
    pub members: Vec<GroupMember>,
    pub offsets: Vec<TopicItems<LaneLag>>,
}

impl ResponseBody for DescribeGroupResponse {
    fn encode(&self, writer: &mut Writer) {
        writer.string(&self.group);
        writer.string(&self.state);
        writer.u32(self.generation);
        writer.array(&self.members, |w, m| {
            w.string(&m.member_id);
            w.string(&m.client_id);
            put_assignment(w, &m.owned);
            put_assignment(w, &m.target);
        });
        encode_topics(writer, &self.offsets, |w, lane| {
            w.u8(lane.lane.0);
            put_committed(w, lane.committed);
            w.u64(lane.end_offset.0);
            w.u64(lane.lag);
            w.u64(lane.lag_bytes);
            w.i64(lane.oldest_age_ms.unwrap_or(-1));
        });
    }

    fn decode(reader: &mut Reader) -> Result<DescribeGroupResponse, DecodeError> {
        Ok(DescribeGroupResponse {
            group: reader.string("group", GROUP_NAME_BYTES_MAX)?,
            state: reader.string("state", 32)?,
            generation: reader.u32("generation")?,
            members: reader.array("members", 100_000, 12, |r| {
                Ok(GroupMember {
                    member_id: r.string("member_id", MEMBER_ID_BYTES_MAX)?,
                    client_id: r.string("client_id", MEMBER_ID_BYTES_MAX)?,
                    owned: get_assignment(r)?,
                    target: get_assignment(r)?,
                })
            })?,
            offsets: decode_topics(reader, 41, LANES_MAX, |r| {
                Ok(LaneLag {
                    lane: get_lane(r)?,
                    committed: get_committed(r)?,
                    end_offset: Offset(r.u64("end_offset")?),
                    lag: r.u64("lag")?,
                    lag_bytes: r.u64("lag_bytes")?,
                    oldest_age_ms: Some(r.i64("oldest_age_ms")?).filter(|age| *age >= 0),
                })
            })?,
        })
    }
}

/// ListGroups (14). Request: empty. Response: `groups array<{name string, state
/// string, generation u32, members u32}>`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListGroupsRequest;

impl ListGroupsRequest {
    pub(crate) fn decode(_reader: &mut Reader) -> Result<ListGroupsRequest, DecodeError> {
        Ok(ListGroupsRequest)
    }
}

impl RequestBody for ListGroupsRequest {
    const API_KEY: ApiKey = ApiKey::ListGroups;
    type Response = ListGroupsResponse;

    fn encode(&self, _writer: &mut Writer) {}
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupSummary {
    pub name: String,
    pub state: String,
    pub generation: u32,
    pub members: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListGroupsResponse {
    pub groups: Vec<GroupSummary>,
}

impl ResponseBody for ListGroupsResponse {
    fn encode(&self, writer: &mut Writer) {
        writer.array(&self.groups, |w, g| {
            w.string(&g.name);
            w.string(&g.state);
            w.u32(g.generation);
            w.u32(g.members);
        });
    }

    fn decode(reader: &mut Reader) -> Result<ListGroupsResponse, DecodeError> {
        Ok(ListGroupsResponse {
            groups: reader.array("groups", 1_000_000, 12, |r| {
                Ok(GroupSummary {
                    name: r.string("name", GROUP_NAME_BYTES_MAX)?,
                    state: r.string("state", 32)?,
                    generation: r.u32("generation")?,
                    members: r.u32("members")?,
                })
            })?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::PartitionItems;
    use crate::messages::testing::response_roundtrip;

    fn assignment() -> Assignment {
        vec![TopicPartitions {
            topic: "orders".into(),
            partitions: vec![PartitionId(0), PartitionId(3)],
        }]
    }

    #[test]
    fn responses_roundtrip_and_every_truncation_fails() {
        response_roundtrip(&JoinGroupResponse {
            member_id: "m-1".into(),
            generation: 4,
            heartbeat_interval_ms: 1000,
            assignment: assignment(),
            pending: 2,
        });
        response_roundtrip(&HeartbeatResponse {
            generation: 5,
            assignment: assignment(),
            pending: 0,
        });
        response_roundtrip(&OffsetCommitResponse {
            topics: vec![TopicItems {
                name: "orders".into(),
                partitions: vec![PartitionItems {
                    partition: PartitionId(3),
                    lanes: vec![CommitLaneResult {
                        lane: Lane(1),
                        error_code: ErrorCode::NotPartitionOwner,
                        error_message: "moved".into(),
                    }],
                }],
            }],
        });
        response_roundtrip(&OffsetFetchResponse {
            topics: vec![TopicItems {
                name: "orders".into(),
                partitions: vec![PartitionItems {
                    partition: PartitionId(0),
                    lanes: vec![
                        CommittedLane {
                            lane: Lane(0),
                            committed: Some(Offset(17)),
                        },
                        CommittedLane {
                            lane: Lane(1),
                            committed: None,
                        },
                    ],
                }],
            }],
        });
        response_roundtrip(&DescribeGroupResponse {
            group: "fulfilment".into(),
            state: "stable".into(),
            generation: 2,
            members: vec![GroupMember {
                member_id: "m-1".into(),
                client_id: "worker".into(),
                owned: assignment(),
                target: assignment(),
            }],
            offsets: vec![TopicItems {
                name: "orders".into(),
                partitions: vec![PartitionItems {
                    partition: PartitionId(0),
                    lanes: vec![LaneLag {
                        lane: Lane(2),
                        committed: Some(Offset(5)),
                        end_offset: Offset(9),
                        lag: 4,
                        lag_bytes: 4096,
                        oldest_age_ms: Some(1500),
                    }],
                }],
            }],
        });
        response_roundtrip(&ListGroupsResponse {
            groups: vec![GroupSummary {
                name: "fulfilment".into(),
                state: "empty".into(),
                generation: 7,
                members: 0,
            }],
        });
    }
}
