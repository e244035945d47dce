//! Consumer groups: who is in a group, which member owns which partition, and what
//! each group has committed.
//!
//! Moves are cooperative. The coordinator keeps two maps per group: the *target*
//! ([`assignment::assign`], recomputed on every membership or topic change, each change
//! a new generation) and the *owners* (who holds a partition now). A heartbeat reports
//! what the member holds; partitions it no longer reports are released, and free
//! partitions whose target is the member are granted to it. A partition whose target
//! moved is left out of its owner's answer: the owner stops reading it, commits, and
//! leaves it out of its next heartbeat, and only then is it granted to its new owner.
//! A member whose session times out, or that leaves, releases everything at once.
//!
//! Commits are accepted only from a partition's current owner, checked and appended
//! under the same lock that moves partitions, so a former owner's late commit can never
//! land after its successor's (no zombie commits).

pub mod assignment;
pub mod offsets;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use lanes_protocol::messages::{
    Assignment, CommitLaneResult, CommittedLane, DescribeGroupResponse, GroupMember, GroupSummary,
    HeartbeatRequest, HeartbeatResponse, JoinGroupRequest, JoinGroupResponse, LaneLag, OffsetCommitRequest,
    OffsetCommitResponse, OffsetFetchRequest, OffsetFetchResponse, PartitionItems, TopicItems,
    TopicPartitions, is_valid_topic_name,
};
use lanes_protocol::{ErrorCode, Lane, PartitionId};

use self::assignment::{TopicPartition, assign};
use self::offsets::{LaneKey, OffsetStore, OffsetsError};
use crate::config::Settings;
use crate::storage::StorageError;
use crate::topic::{TopicError, Topics, storage_error_code};

/// Why a group request failed, with its wire code.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    #[error("invalid group name {0:?}: use 1 to 249 characters of [A-Za-z0-9._-]")]
    InvalidName(String),
    #[error("member {member:?} is not in group {group}: join again")]
    UnknownMember { group: String, member: String },
    #[error("group {0} does not exist")]
    UnknownGroup(String),
    #[error("{0}")]
    InvalidConfig(String),
    #[error("{0}")]
    LimitExceeded(String),
    #[error(transparent)]
    Topic(#[from] TopicError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl GroupError {
    pub fn code(&self) -> ErrorCode {
        match self {
            GroupError::InvalidName(_) => ErrorCode::InvalidGroupName,
            GroupError::UnknownMember { .. } => ErrorCode::UnknownMember,
            GroupError::UnknownGroup(_) => ErrorCode::UnknownGroup,
            GroupError::InvalidConfig(_) => ErrorCode::InvalidConfig,
            GroupError::LimitExceeded(_) => ErrorCode::LimitExceeded,
            GroupError::Topic(error) => error.code(),
            GroupError::Storage(error) => storage_error_code(error),
        }
    }
}

/// The coordinator's bounds, from the broker settings.
#[derive(Clone, Debug)]
struct Limits {
    session_ms_min: u32,
    session_ms_max: u32,
    empty_expiry: Duration,
    groups_max: usize,
    members_max: usize,
}

#[derive(Debug)]
struct Member {
    client_id: String,
    topics: BTreeSet<String>,
    session: Duration,
    deadline: Instant,
}

#[derive(Debug, Default)]
struct Group {
    members: BTreeMap<String, Member>,
    /// Where each partition should be.
    target: BTreeMap<TopicPartition, String>,
    /// Who holds each partition now (granted and not yet released).
    owners: BTreeMap<TopicPartition, String>,
    generation: u32,
    /// When the last member left (or the broker started, for a group known only by its
    /// offsets).
    empty_since: Option<Instant>,
    changes: Changes,
}

/// Ticks whenever a group's target or owners change, or a member goes: the heartbeats
/// the broker holds ([`Beat::Hold`]) wake on it and answer again.
#[derive(Debug)]
struct Changes(watch::Sender<u64>);

impl Default for Changes {
    fn default() -> Changes {
        Changes(watch::channel(0).0)
    }
}

impl Changes {
    fn tick(&self) {
        self.0.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// Which run of a heartbeat [`Coordinator::heartbeat`] is asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BeatRun {
    /// The heartbeat just arrived: the member is alive.
    Arrived,
    /// A held heartbeat, after the group changed: may be held again.
    Changed,
    /// A held heartbeat whose wait is over (or the broker is shutting down): answered.
    Over,
}

/// The coordinator's answer to a heartbeat.
#[derive(Debug)]
pub enum Beat {
    Answer(HeartbeatResponse),
    /// Nothing new for the member: hold the heartbeat until `changes` ticks or `wait`
    /// passes, then ask again.
    Hold {
        changes: watch::Receiver<u64>,
        wait: Duration,
    },
}

impl Group {
    /// Recomputes the target; a changed target is a new generation.
    fn rebalance(&mut self, name: &str, topics: &Topics) {
        let mut universe = BTreeSet::new();
        let subscribed: BTreeSet<&String> = self.members.values().flat_map(|m| &m.topics).collect();
        for topic_name in subscribed {
            if let Some(topic) = topics.get(topic_name) {
                universe.extend((0..topic.spec.partitions).map(|p| TopicPartition {
                    topic: topic_name.clone(),
                    partition: PartitionId(p),
                }));
            }
        }
        // A deleted topic's partitions are held by nobody.
        let owners_before = self.owners.len();
        self.owners.retain(|p, _| universe.contains(p));
        if self.owners.len() != owners_before {
            self.changes.tick();
        }
        let members = self
            .members
            .iter()
            .map(|(id, member)| (id.clone(), member.topics.clone()))
            .collect();
        let target = assign(&members, &universe, &self.target);
        if target != self.target {
            self.target = target;
            self.generation = self.generation.wrapping_add(1);
            self.changes.tick();
            metrics::counter!(crate::metrics::GROUP_REBALANCES, "group" => name.to_owned()).increment(1);
            tracing::info!(group = %name, generation = self.generation, members = self.members.len(),
                partitions = self.target.len(), "group rebalanced");
        }
    }

    fn remove_member(&mut self, member: &str, now: Instant) {
        self.members.remove(member);
        self.owners.retain(|_, owner| owner != member);
        self.changes.tick();
        if self.members.is_empty() {
            self.empty_since = Some(now);
        }
    }

    /// What `member` should hold now, granting it the free partitions whose target it
    /// is, and how many more are still held by their previous owners.
    fn answer(&mut self, member: &str) -> (Assignment, u32) {
        let mut holds = Vec::new();
        let mut pending = 0;
        for (partition, target) in &self.target {
            if target != member {
                continue;
            }
            match self.owners.get(partition) {
                None => {
                    self.owners.insert(partition.clone(), member.to_owned());
                    holds.push(partition);
                }
                Some(owner) if owner == member => holds.push(partition),
                Some(_) => pending += 1,
            }
        }
        // No tick for a grant: it changes no other member's answer (the partition's
        // target is this member).
        (to_assignment(holds), pending)
    }

    fn state(&self) -> &'static str {
        if self.members.is_empty() {
            "empty"
        } else if self.target.len() != self.owners.len()
            || self.target.iter().any(|(p, m)| self.owners.get(p) != Some(m))
        {
            "rebalancing"
        } else {
            "stable"
        }
    }

    fn partitions_of<'a>(
        map: &'a BTreeMap<TopicPartition, String>,
        member: &'a str,
    ) -> Vec<&'a TopicPartition> {
        map.iter().filter(|(_, m)| *m == member).map(|(p, _)| p).collect()
    }
}

fn to_assignment<'a>(partitions: impl IntoIterator<Item = &'a TopicPartition>) -> Assignment {
    let mut assignment: Assignment = Vec::new();
    for p in partitions {
        match assignment.last_mut() {
            Some(last) if last.topic == p.topic => last.partitions.push(p.partition),
            _ => assignment.push(TopicPartitions {
                topic: p.topic.clone(),
                partitions: vec![p.partition],
            }),
        }
    }
    assignment
}

fn from_assignment(assignment: &Assignment) -> BTreeSet<TopicPartition> {
    assignment
        .iter()
        .flat_map(|t| {
            t.partitions.iter().map(|p| TopicPartition {
                topic: t.topic.clone(),
                partition: *p,
            })
        })
        .collect()
}

/// Every group of the broker.
#[derive(Debug)]
pub struct Coordinator {
    limits: Limits,
    offsets: OffsetStore,
    /// Whether lane logs learn the lowest offset groups have committed on them
    /// (`cached_tail_bytes` is set): see [`Coordinator::share_group_floors`].
    shares_group_floors: bool,
    groups: Mutex<HashMap<String, Group>>,
    /// Makes member ids unique across broker restarts.
    boot_id: u64,
    members_joined: AtomicU64,
    /// [`Topics::version`] when groups were last rebalanced for topic changes.
    topics_version: AtomicU64,
}

impl Coordinator {
    /// Opens the committed offsets in `DATA_DIR/meta/offsets`; every group that has
    /// some starts out empty. Offsets of topics that no longer exist (a delete cut
    /// short by a crash) are dropped.
    pub fn open(settings: &Settings, topics: &Topics) -> Result<Coordinator, OffsetsError> {
        let dir: PathBuf = settings.data_dir.join("meta").join("offsets");
        let offsets = OffsetStore::open(dir, settings.offsets_segment_bytes_max)?;
        let gone: BTreeSet<String> = offsets
            .groups()
            .iter()
            .flat_map(|group| offsets.group(group).into_keys().map(|key| key.topic))
            .filter(|topic| topics.get(topic).is_none())
            .collect();
        for topic in &gone {
            tracing::info!(%topic, "dropping the group offsets of a deleted topic");
            offsets.forget_topic(topic)?;
        }
        if !gone.is_empty() {
            offsets.flush()?;
        }
        let now = Instant::now();
        let groups = offsets
            .groups()
            .into_iter()
            .map(|name| {
                let group = Group {
                    empty_since: Some(now),
                    ..Group::default()
                };
                (name, group)
            })
            .collect();
        let boot_id = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Ok(Coordinator {
            limits: Limits {
                session_ms_min: settings.group_session_timeout_ms_min,
                session_ms_max: settings.group_session_timeout_ms_max,
                empty_expiry: Duration::from_millis(settings.group_empty_expiry_ms),
                groups_max: settings.groups_max as usize,
                members_max: settings.group_members_max as usize,
            },
            offsets,
            shares_group_floors: settings.cached_tail_bytes > 0,
            groups: Mutex::new(groups),
            boot_id,
            members_joined: AtomicU64::new(0),
            topics_version: AtomicU64::new(0),
        })
    }

    fn groups(&self) -> MutexGuard<'_, HashMap<String, Group>> {
        self.groups.lock().expect("groups lock poisoned")
    }

    /// Adds a member (or updates a member's subscription) and answers with what it may
    /// hold now. Topics that do not exist are created if auto-creation is on.
    pub fn join(&self, topics: &Topics, request: &JoinGroupRequest) -> Result<JoinGroupResponse, GroupError> {
        if !is_valid_topic_name(&request.group) {
            return Err(GroupError::InvalidName(request.group.clone()));
        }
        let session_ms = request.session_timeout_ms;
        if !(self.limits.session_ms_min..=self.limits.session_ms_max).contains(&session_ms) {
            return Err(GroupError::InvalidConfig(format!(
                "session_timeout_ms {session_ms} is outside the broker's range {}..={} \
                 (group_session_timeout_ms_min, group_session_timeout_ms_max)",
                self.limits.session_ms_min, self.limits.session_ms_max
            )));
        }
        if request.topics.is_empty() {
            return Err(GroupError::InvalidConfig(
                "a member subscribes to at least one topic".into(),
            ));
        }
        for topic in &request.topics {
            topics.get_or_create(topic)?;
        }
        let session = Duration::from_millis(u64::from(session_ms));
        let now = Instant::now();
        let mut groups = self.groups();
        if !request.member_id.is_empty() && !groups.contains_key(&request.group) {
            return Err(GroupError::UnknownMember {
                group: request.group.clone(),
                member: request.member_id.clone(),
            });
        }
        if !groups.contains_key(&request.group) && groups.len() >= self.limits.groups_max {
            return Err(GroupError::LimitExceeded(format!(
                "the broker holds groups_max = {} groups",
                self.limits.groups_max
            )));
        }
        let group = groups.entry(request.group.clone()).or_default();
        let subscription: BTreeSet<String> = request.topics.iter().cloned().collect();
        let member_id = if request.member_id.is_empty() {
            if group.members.len() >= self.limits.members_max {
                return Err(GroupError::LimitExceeded(format!(
                    "group {} has group_members_max = {} members",
                    request.group, self.limits.members_max
                )));
            }
            let sequence = self.members_joined.fetch_add(1, Ordering::Relaxed);
            let client = lanes_protocol::api::truncate(&request.client_id, 200);
            let member_id = format!("{client}-{:x}-{sequence}", self.boot_id);
            group.members.insert(
                member_id.clone(),
                Member {
                    client_id: request.client_id.clone(),
                    topics: subscription,
                    session,
                    deadline: now + session,
                },
            );
            group.empty_since = None;
            tracing::info!(group = %request.group, member = %member_id, "member joined");
            group.rebalance(&request.group, topics);
            member_id
        } else {
            let Some(member) = group.members.get_mut(&request.member_id) else {
                return Err(GroupError::UnknownMember {
                    group: request.group.clone(),
                    member: request.member_id.clone(),
                });
            };
            member.session = session;
            member.deadline = now + session;
            if member.topics != subscription {
                member.topics = subscription;
                group.rebalance(&request.group, topics);
            }
            request.member_id.clone()
        };
        let (assignment, pending) = group.answer(&member_id);
        Ok(JoinGroupResponse {
            member_id,
            generation: group.generation,
            heartbeat_interval_ms: heartbeat_interval_ms(session),
            assignment,
            pending,
        })
    }

    /// Keeps a member's session alive, takes back what it released and answers with
    /// what it may hold now. With the request's `wait_ms_max` above 0, a heartbeat with
    /// nothing new to answer (the answer is what the member reports holding, while the
    /// member waits for nothing or for partitions others still hold) is [`Beat::Hold`]:
    /// the caller asks again once the group changes ([`BeatRun::Changed`]) or the wait
    /// is over ([`BeatRun::Over`]), so the member hears of a move at once.
    ///
    /// Only the heartbeat's arrival keeps the session alive: a member that dies while its
    /// heartbeat is held times out a session after it sent it, as it would have without
    /// the hold. The wait is at most half the session, so a live member's next heartbeat
    /// arrives in time.
    pub fn heartbeat(&self, request: &HeartbeatRequest, run: BeatRun) -> Result<Beat, GroupError> {
        let mut groups = self.groups();
        let group = member_group(&mut groups, &request.group, &request.member_id)?;
        let member = group.members.get_mut(&request.member_id).expect("checked");
        let wait = Duration::from_millis(u64::from(request.wait_ms_max)).min(member.session / 2);
        let holds = from_assignment(&request.owned);
        // Only an arriving heartbeat says what the member holds now. A held one may be
        // stale (its connection lost, the member heartbeating on another since): on a
        // re-run, it releases nothing, and where the member holds more than it says,
        // the answer differs and goes out at once.
        if run == BeatRun::Arrived {
            member.deadline = Instant::now() + member.session;
            let released: Vec<TopicPartition> = group
                .owners
                .iter()
                .filter(|(p, owner)| **owner == request.member_id && !holds.contains(*p))
                .map(|(p, _)| p.clone())
                .collect();
            if !released.is_empty() {
                group.changes.tick();
            }
            for partition in released {
                group.owners.remove(&partition);
            }
        }
        let (assignment, pending) = group.answer(&request.member_id);
        if run != BeatRun::Over && !wait.is_zero() && from_assignment(&assignment) == holds {
            return Ok(Beat::Hold {
                changes: group.changes.0.subscribe(),
                wait,
            });
        }
        Ok(Beat::Answer(HeartbeatResponse {
            generation: group.generation,
            assignment,
            pending,
        }))
    }

    /// Removes a member; its partitions can go to others at once.
    pub fn leave(&self, topics: &Topics, group_name: &str, member_id: &str) -> Result<(), GroupError> {
        let mut groups = self.groups();
        let group = member_group(&mut groups, group_name, member_id)?;
        group.remove_member(member_id, Instant::now());
        group.rebalance(group_name, topics);
        tracing::info!(group = %group_name, member = %member_id, "member left");
        Ok(())
    }

    /// Commits offsets for the lane logs the member owns; answers once they are durable.
    /// Blocks on an fsync.
    pub fn commit(
        &self,
        topics: &Topics,
        request: OffsetCommitRequest,
    ) -> Result<OffsetCommitResponse, GroupError> {
        let member = request.member_id.as_str();
        let mut accepted = Vec::new();
        let mut response = OffsetCommitResponse::default();
        {
            let mut groups = self.groups();
            let group = member_group(&mut groups, &request.group, member)?;
            for items in &request.topics {
                let topic = topics.get(&items.name);
                let results = items.as_ref().map_lanes(|name, partition, lane| {
                    let result = |error_code, error_message: String| CommitLaneResult {
                        lane: lane.lane,
                        error_code,
                        error_message,
                    };
                    let key = TopicPartition {
                        topic: name.to_owned(),
                        partition,
                    };
                    if group.owners.get(&key).map(String::as_str) != Some(member) {
                        return result(
                            ErrorCode::NotPartitionOwner,
                            format!(
                                "{name}/{partition} is not held by this member in generation {}",
                                group.generation
                            ),
                        );
                    }
                    let Some(topic) = &topic else {
                        return result(ErrorCode::UnknownTopic, format!("topic {name} does not exist"));
                    };
                    let log = match topic.log(partition, lane.lane) {
                        Ok(log) => log,
                        Err(code) => return result(code, String::new()),
                    };
                    let end = log.visible_offset();
                    if lane.offset > end {
                        return result(
                            ErrorCode::OffsetOutOfRange,
                            format!("offset {} is beyond the end of the lane log ({end})", lane.offset),
                        );
                    }
                    accepted.push((
                        LaneKey {
                            topic: key.topic,
                            partition,
                            lane: lane.lane,
                        },
                        lane.offset,
                    ));
                    result(ErrorCode::None, String::new())
                });
                response.topics.push(results);
            }
            if !accepted.is_empty()
                && let Err(error) = self.offsets.commit(&request.group, &accepted)
            {
                fail_accepted(&mut response, &error);
                return Ok(response);
            }
        }
        if self.shares_group_floors {
            // At once, so that the pages a commit lets go can go with the next fsync
            // round; `share_group_floors` catches up with expired groups.
            let subscribed = self.subscriptions();
            for (key, _) in &accepted {
                if let Some(topic) = topics.get(&key.topic)
                    && let Ok(handle) = topic.log(key.partition, key.lane)
                {
                    let floor = self.offsets.lowest_committed_on(key, |group| {
                        subscribed
                            .get(group)
                            .is_some_and(|topics| topics.contains(&key.topic))
                    });
                    handle.log.set_group_floor(floor);
                }
            }
        }
        if !accepted.is_empty()
            && let Err(error) = self.offsets.flush()
        {
            fail_accepted(&mut response, &error);
        }
        Ok(response)
    }

    /// The committed offsets of every lane of the named partitions.
    pub fn offset_fetch(&self, topics: &Topics, request: &OffsetFetchRequest) -> OffsetFetchResponse {
        let committed = self.offsets.group(&request.group);
        let mut response = OffsetFetchResponse::default();
        for requested in &request.partitions {
            let Some(topic) = topics.get(&requested.topic) else {
                continue;
            };
            let lanes = topic.spec.lanes.len();
            let partitions = requested
                .partitions
                .iter()
                .filter(|p| p.0 < topic.spec.partitions)
                .map(|&partition| PartitionItems {
                    partition,
                    lanes: (0..lanes)
                        .map(|lane| {
                            let key = LaneKey {
                                topic: requested.topic.clone(),
                                partition,
                                lane: Lane(lane as u8),
                            };
                            CommittedLane {
                                lane: key.lane,
                                committed: committed.get(&key).copied(),
                            }
                        })
                        .collect(),
                })
                .collect();
            response.topics.push(TopicItems {
                name: requested.topic.clone(),
                partitions,
            });
        }
        response
    }

    /// A group's members, assignment, committed offsets and lag per lane log.
    pub fn describe(&self, topics: &Topics, name: &str) -> Result<DescribeGroupResponse, GroupError> {
        let (state, generation, members, subscribed) = {
            let groups = self.groups();
            let group = groups
                .get(name)
                .ok_or_else(|| GroupError::UnknownGroup(name.to_owned()))?;
            let members = group
                .members
                .iter()
                .map(|(id, member)| GroupMember {
                    member_id: id.clone(),
                    client_id: member.client_id.clone(),
                    owned: to_assignment(Group::partitions_of(&group.owners, id)),
                    target: to_assignment(Group::partitions_of(&group.target, id)),
                })
                .collect::<Vec<_>>();
            let subscribed: BTreeSet<String> = group
                .members
                .values()
                .flat_map(|m| m.topics.iter().cloned())
                .collect();
            (group.state(), group.generation, members, subscribed)
        };
        Ok(DescribeGroupResponse {
            group: name.to_owned(),
            state: state.to_owned(),
            generation,
            members,
            offsets: self.lags(topics, name, subscribed),
        })
    }

    /// Committed offset and lag of every lane log of the subscribed topics and of the
    /// topics with commits.
    fn lags(&self, topics: &Topics, name: &str, subscribed: BTreeSet<String>) -> Vec<TopicItems<LaneLag>> {
        let committed = self.offsets.group(name);
        let now_ms = unix_now_ms();
        let mut topic_names = subscribed;
        topic_names.extend(committed.keys().map(|key| key.topic.clone()));
        let mut offsets = Vec::new();
        for topic in topic_names.iter().filter_map(|name| topics.get(name)) {
            let mut partitions: Vec<PartitionItems<LaneLag>> = Vec::new();
            for (partition, lane, log) in topic.logs() {
                if partitions.last().is_none_or(|p| p.partition != partition) {
                    partitions.push(PartitionItems {
                        partition,
                        lanes: Vec::new(),
                    });
                }
                let key = LaneKey {
                    topic: topic.spec.name.clone(),
                    partition,
                    lane,
                };
                let committed = committed.get(&key).copied();
                let end_offset = log.visible_offset();
                let from = committed.unwrap_or(log.log.start_offset());
                let backlog = log.log.backlog(from, end_offset).unwrap_or_default();
                partitions.last_mut().expect("pushed").lanes.push(LaneLag {
                    lane,
                    committed,
                    end_offset,
                    lag: end_offset.0.saturating_sub(from.0),
                    lag_bytes: backlog.bytes,
                    oldest_age_ms: backlog
                        .oldest_timestamp_ms
                        .map(|ts| now_ms.saturating_sub(ts).max(0)),
                });
            }
            offsets.push(TopicItems {
                name: topic.spec.name.clone(),
                partitions,
            });
        }
        offsets
    }

    /// Tells every lane log the lowest offset any group has committed on it, so that
    /// with `cached_tail_bytes` its pages from there on stay cached for the groups to
    /// read (see `LaneLog::drop_cached_behind`).
    ///
    /// Only groups with a member subscribed to the topic count: a group that moved on
    /// to other topics, or whose members are all gone, would otherwise keep its old
    /// offsets' pages cached until it expires (`group_empty_expiry_ms`).
    pub fn share_group_floors(&self, topics: &Topics) {
        let subscribed = self.subscriptions();
        let lowest = self.offsets.lowest_committed(|group, topic| {
            subscribed.get(group).is_some_and(|topics| topics.contains(topic))
        });
        for topic in topics.list() {
            let mut key = LaneKey {
                topic: topic.spec.name.clone(),
                partition: PartitionId(0),
                lane: Lane(0),
            };
            for (partition, lane, handle) in topic.logs() {
                (key.partition, key.lane) = (partition, lane);
                handle.log.set_group_floor(lowest.get(&key).copied());
            }
        }
    }

    /// The topics each group's members subscribe to.
    fn subscriptions(&self) -> HashMap<String, BTreeSet<String>> {
        self.groups()
            .iter()
            .map(|(name, group)| {
                let topics = group
                    .members
                    .values()
                    .flat_map(|m| m.topics.iter().cloned())
                    .collect();
                (name.clone(), topics)
            })
            .collect()
    }

    /// Sets the per-lane backlog gauges of every group: records and bytes it has not
    /// consumed, and the age of the oldest, summed (the age: the oldest) over partitions.
    pub fn record_backlog_metrics(&self, topics: &Topics) {
        for (group, subscribed) in self.subscriptions() {
            for topic in self.lags(topics, &group, subscribed) {
                let Some(spec) = topics.get(&topic.name) else {
                    continue;
                };
                let mut per_lane: BTreeMap<u8, (u64, u64, i64)> = BTreeMap::new();
                for (_, _, lag) in topic.lanes() {
                    let entry = per_lane.entry(lag.lane.0).or_default();
                    entry.0 += lag.lag;
                    entry.1 += lag.lag_bytes;
                    entry.2 = entry.2.max(lag.oldest_age_ms.unwrap_or(0));
                }
                for (lane, (records, bytes, age_ms)) in per_lane {
                    let lane_name = spec
                        .spec
                        .lanes
                        .get(lane as usize)
                        .cloned()
                        .unwrap_or_else(|| lane.to_string());
                    let labels = [
                        ("group", group.clone()),
                        ("topic", topic.name.clone()),
                        ("lane", lane_name),
                    ];
                    metrics::gauge!(crate::metrics::GROUP_BACKLOG_RECORDS, &labels).set(records as f64);
                    metrics::gauge!(crate::metrics::GROUP_BACKLOG_BYTES, &labels).set(bytes as f64);
                    metrics::gauge!(crate::metrics::GROUP_OLDEST_UNCONSUMED_AGE_SECONDS, &labels)
                        .set(age_ms as f64 / 1000.0);
                }
            }
        }
    }

    /// Every group, sorted by name.
    pub fn list(&self) -> Vec<GroupSummary> {
        let groups = self.groups();
        let mut list: Vec<GroupSummary> = groups
            .iter()
            .map(|(name, group)| GroupSummary {
                name: name.clone(),
                state: group.state().to_owned(),
                generation: group.generation,
                members: group.members.len() as u32,
            })
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    /// Expires members whose session timed out and groups empty for too long, and
    /// follows topic creations and deletions. Called periodically. Returns whether
    /// groups expired: their deleted offsets are durable after [`Coordinator::flush`].
    pub fn tick(&self, topics: &Topics, now: Instant) -> bool {
        let version = topics.version();
        let topics_changed = self.topics_version.swap(version, Ordering::AcqRel) != version;
        let mut expired_groups = Vec::new();
        {
            let mut groups = self.groups();
            for (name, group) in groups.iter_mut() {
                let expired: Vec<String> = group
                    .members
                    .iter()
                    .filter(|(_, m)| m.deadline <= now)
                    .map(|(id, _)| id.clone())
                    .collect();
                for member in &expired {
                    tracing::info!(group = %name, %member, "member's session timed out");
                    group.remove_member(member, now);
                }
                if !expired.is_empty() || topics_changed {
                    group.rebalance(name, topics);
                }
                if group
                    .empty_since
                    .is_some_and(|since| now.saturating_duration_since(since) >= self.limits.empty_expiry)
                {
                    expired_groups.push(name.clone());
                }
            }
            for name in &expired_groups {
                groups.remove(name);
                tracing::info!(group = %name, "empty group expired; its offsets are deleted");
                if let Err(error) = self.offsets.forget_group(name) {
                    tracing::warn!(group = %name, %error, "could not delete the offsets of an expired group");
                }
            }
        }
        !expired_groups.is_empty()
    }

    /// Makes every change to committed offsets durable. Blocks on an fsync.
    pub fn flush(&self) -> Result<(), StorageError> {
        self.offsets.flush()
    }

    /// Drops every group's offsets of a deleted topic, and its partitions from every
    /// group's owners: a former owner cannot commit to a new topic of the same name.
    /// Under the groups lock, so no commit checked before can land after. Blocks on an
    /// fsync.
    pub fn forget_topic(&self, topic: &str) -> Result<(), StorageError> {
        {
            let mut groups = self.groups();
            for group in groups.values_mut() {
                let owners_before = group.owners.len();
                group.owners.retain(|p, _| p.topic != topic);
                if group.owners.len() != owners_before {
                    group.changes.tick();
                }
            }
            self.offsets.forget_topic(topic)?;
        }
        self.offsets.flush()
    }

    pub fn close(&self) -> Result<(), StorageError> {
        self.offsets.close()
    }
}

fn unix_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Members heartbeat three times per session, and at least once a second. Moves do not
/// wait for it: a held heartbeat answers as soon as the group changes (see
/// [`Coordinator::heartbeat`]); this is how long one is held at most.
fn heartbeat_interval_ms(session: Duration) -> u32 {
    (session.as_millis() / 3).clamp(1, 1000) as u32
}

fn member_group<'a>(
    groups: &'a mut HashMap<String, Group>,
    group: &str,
    member: &str,
) -> Result<&'a mut Group, GroupError> {
    match groups.get_mut(group) {
        Some(found) if found.members.contains_key(member) => Ok(found),
        _ => Err(GroupError::UnknownMember {
            group: group.to_owned(),
            member: member.to_owned(),
        }),
    }
}

fn fail_accepted(response: &mut OffsetCommitResponse, error: &StorageError) {
    for topic in &mut response.topics {
        for partition in &mut topic.partitions {
            for lane in &mut partition.lanes {
                if lane.error_code == ErrorCode::None {
                    lane.error_code = storage_error_code(error);
                    lane.error_message = error.to_string();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_interval_is_a_third_of_the_session_at_most_a_second() {
        assert_eq!(heartbeat_interval_ms(Duration::from_millis(1500)), 500);
        assert_eq!(heartbeat_interval_ms(Duration::from_secs(30)), 1000);
    }

    #[test]
    fn only_a_heartbeats_arrival_keeps_the_session_alive() {
        let dir = tempfile::tempdir().unwrap();
        let settings = Settings {
            data_dir: dir.path().to_path_buf(),
            ..Settings::default()
        };
        let broker = crate::server::Broker::open(settings).unwrap();
        let (groups, topics) = (&broker.groups, &broker.topics);
        let joined = groups
            .join(
                topics,
                &JoinGroupRequest {
                    group: "g".into(),
                    member_id: String::new(),
                    client_id: "c".into(),
                    topics: vec!["orders".into()],
                    session_timeout_ms: 1000,
                },
            )
            .unwrap();
        let request = HeartbeatRequest {
            group: "g".into(),
            member_id: joined.member_id,
            owned: joined.assignment,
            wait_ms_max: 400,
        };
        // Nothing new: held. Its arrival renews the session.
        let beat = groups.heartbeat(&request, BeatRun::Arrived).unwrap();
        assert!(matches!(beat, Beat::Hold { wait, .. } if wait == Duration::from_millis(400)));
        let arrived_by = Instant::now();
        std::thread::sleep(Duration::from_millis(20));
        // The held heartbeat's wait ends: answered, and the session is not renewed, so
        // a member that died meanwhile times out a session after its heartbeat arrived.
        let beat = groups.heartbeat(&request, BeatRun::Over).unwrap();
        assert!(matches!(beat, Beat::Answer(_)));
        groups.tick(topics, arrived_by + Duration::from_millis(1000));
        assert!(matches!(
            groups.heartbeat(&request, BeatRun::Arrived),
            Err(GroupError::UnknownMember { .. })
        ));
        broker.close().unwrap();
    }

    #[test]
    fn assignments_group_partitions_by_topic() {
        let partitions: BTreeSet<TopicPartition> = [("a", 1), ("a", 3), ("b", 0)]
            .into_iter()
            .map(|(topic, p)| TopicPartition {
                topic: topic.into(),
                partition: PartitionId(p),
            })
            .collect();
        let assignment = to_assignment(&partitions);
        assert_eq!(assignment.len(), 2);
        assert_eq!(assignment[0].partitions, vec![PartitionId(1), PartitionId(3)]);
        assert_eq!(from_assignment(&assignment), partitions);
    }
}
