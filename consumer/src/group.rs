//! Group membership: the background heartbeat and the state it shares with the
//! consumer.
//!
//! The heartbeat task joins the group and then reports, every heartbeat, the partitions
//! the member holds. The broker's answer is what the member may hold now. The consumer
//! compares the two in `poll`: partitions in the answer it does not hold it takes
//! (starting from the group's committed offsets); partitions it holds that are not in the
//! answer are being moved to another member, so it commits and releases them, and the
//! next heartbeat (sent at once) tells the broker they are free.
//!
//! Heartbeats are long polls: while the answer would be what the member already holds,
//! the broker holds the heartbeat until the group changes (for at most a heartbeat
//! interval), so a move reaches the member in a round trip. The task sends the next one
//! as soon as an answer is in, except while the consumer is giving partitions up: then
//! it waits for the release (or the interval), since until then the broker would answer
//! the same at once.
//!
//! Heartbeats use a connection of their own, so a held heartbeat never delays a commit
//! or a leave, and never queues behind a long-poll fetch; commits, offset fetches and
//! leaves share another, besides the fetcher's. Both reconnect when the connection is
//! lost. Against a broker from before long polls (its handshake lists Heartbeat version
//! 0 only), the task heartbeats every interval as before; each new connection's
//! handshake is asked again.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use lanes_protocol::client::{ClientConfig, ClientError};
use lanes_protocol::messages::{
    Assignment, HeartbeatRequest, HeartbeatRequestV0, JoinGroupRequest, TopicPartitions,
};
use lanes_protocol::{ApiKey, ErrorCode, PartitionId};
use tokio::sync::{Notify, watch};

use crate::ConsumeError;
use crate::link::Link;

/// Settings of group membership.
#[derive(Clone, Debug)]
pub struct GroupConfig {
    pub group: String,
    /// The subscription.
    pub topics: Vec<String>,
    /// The broker gives the member's partitions to others when it has not heard from it
    /// for this long.
    pub session_timeout: Duration,
    /// Commit the records [`Consumer::poll`](crate::Consumer::poll) handed out, at the
    /// next poll (so after the application handled them) once this much time has
    /// passed, and before giving partitions up. `None`: only explicit commits.
    pub auto_commit_interval: Option<Duration>,
    /// Leave partitions the group takes away for the application to give up with
    /// [`Consumer::release`](crate::Consumer::release) (after finishing its work on
    /// them), instead of `poll` doing it. For frameworks such as the [`Worker`](crate::Worker).
    pub manual_release: bool,
}

impl GroupConfig {
    pub fn new(group: impl Into<String>, topics: &[&str]) -> GroupConfig {
        GroupConfig {
            group: group.into(),
            topics: topics.iter().map(|t| (*t).to_owned()).collect(),
            session_timeout: Duration::from_secs(10),
            auto_commit_interval: Some(Duration::from_secs(1)),
            manual_release: false,
        }
    }
}

/// One partition of one topic.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TopicPartition {
    pub topic: Arc<str>,
    pub partition: PartitionId,
}

/// What the heartbeat task and the consumer share.
#[derive(Debug, Default)]
pub(crate) struct Membership {
    pub(crate) member_id: Option<String>,
    pub(crate) generation: u32,
    /// What the broker last said the member may hold.
    pub(crate) answer: BTreeSet<TopicPartition>,
    /// What the consumer holds: reads, and may commit.
    pub(crate) held: BTreeSet<TopicPartition>,
    /// The member was dropped by the group (its session expired): what it held is
    /// someone else's now, and its commits would be refused.
    pub(crate) lost: bool,
    /// Joining failed for good (bad group name, unknown topic…).
    pub(crate) error: Option<ConsumeError>,
}

/// The consumer's handle on its membership.
#[derive(Debug)]
pub(crate) struct GroupHandle {
    pub(crate) config: GroupConfig,
    /// Commits, offset fetches and the leave; heartbeats have a connection of their own.
    pub(crate) link: Arc<Link>,
    pub(crate) shared: Arc<Mutex<Membership>>,
    /// Ticks whenever the membership changes.
    pub(crate) changed: watch::Receiver<u64>,
    /// Wakes the heartbeat task (after a release).
    pub(crate) wake: Arc<Notify>,
    pub(crate) task: tokio::task::JoinHandle<()>,
    pub(crate) last_commit: Instant,
}

impl GroupHandle {
    pub(crate) fn start(config: GroupConfig, broker: &str, client_id: &str) -> GroupHandle {
        let client_config = ClientConfig {
            client_id: client_id.to_owned(),
            request_timeout: Duration::from_secs(30),
            ..ClientConfig::default()
        };
        let link = Arc::new(Link::new(broker, client_config.clone()));
        let heartbeat_link = Link::new(broker, client_config);
        let shared = Arc::new(Mutex::new(Membership::default()));
        let (changes, changed) = watch::channel(0);
        let wake = Arc::new(Notify::new());
        let task = tokio::spawn(heartbeats(
            heartbeat_link,
            config.clone(),
            client_id.to_owned(),
            Arc::clone(&shared),
            changes,
            Arc::clone(&wake),
        ));
        GroupHandle {
            config,
            link,
            shared,
            changed,
            wake,
            task,
            last_commit: Instant::now(),
        }
    }

    pub(crate) fn membership(&self) -> MutexGuard<'_, Membership> {
        lock(&self.shared)
    }
}

impl Drop for GroupHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock(shared: &Mutex<Membership>) -> MutexGuard<'_, Membership> {
    shared.lock().expect("membership lock poisoned")
}

pub(crate) fn to_set(assignment: &Assignment) -> BTreeSet<TopicPartition> {
    assignment
        .iter()
        .flat_map(|t| {
            let topic: Arc<str> = Arc::from(t.topic.as_str());
            t.partitions.iter().map(move |p| TopicPartition {
                topic: Arc::clone(&topic),
                partition: *p,
            })
        })
        .collect()
}

pub(crate) fn to_assignment<'a>(partitions: impl IntoIterator<Item = &'a TopicPartition>) -> Assignment {
    let mut assignment: Assignment = Vec::new();
    for p in partitions {
        match assignment.last_mut() {
            Some(last) if *last.topic == *p.topic => last.partitions.push(p.partition),
            _ => assignment.push(TopicPartitions {
                topic: p.topic.to_string(),
                partitions: vec![p.partition],
            }),
        }
    }
    assignment
}

/// Pause after a failed heartbeat or join.
const RETRY_BACKOFF: Duration = Duration::from_millis(200);
/// Against a broker without long-poll heartbeats (Heartbeat version 0): the heartbeat
/// period while partitions are on their way to this member.
const PENDING_HEARTBEAT: Duration = Duration::from_millis(100);

/// Joins, then heartbeats until the consumer goes. Rejoins after losing the membership.
async fn heartbeats(
    link: Link,
    config: GroupConfig,
    client_id: String,
    shared: Arc<Mutex<Membership>>,
    changes: watch::Sender<u64>,
    wake: Arc<Notify>,
) {
    let session_ms = u32::try_from(config.session_timeout.as_millis()).unwrap_or(u32::MAX);
    let mut interval = config.session_timeout / 3;
    let mut last_ok = Instant::now();
    // Whether the latest heartbeat was a long poll: Heartbeat version 1, where the
    // connection's handshake says the broker has it. With a broker from before long
    // polls, version 0 every interval, as it expects; each new connection asks again, so
    // a broker upgraded meanwhile gets long polls.
    let mut long_polls = true;
    let notify = || changes.send_modify(|n| *n += 1);
    loop {
        let member_id = lock(&shared).member_id.clone();
        let result = match member_id {
            None => {
                let request = JoinGroupRequest {
                    group: config.group.clone(),
                    member_id: String::new(),
                    client_id: client_id.clone(),
                    topics: config.topics.clone(),
                    session_timeout_ms: session_ms,
                };
                let joined = match link.client().await {
                    Ok(client) => {
                        // The delay after the join depends on it, before any heartbeat.
                        long_polls = client.broker_versions().common_version(ApiKey::Heartbeat) >= Some(1);
                        link.request_on(&client, &request).await
                    }
                    Err(error) => Err(error),
                };
                joined.map(|joined| {
                    interval = Duration::from_millis(u64::from(joined.heartbeat_interval_ms.max(1)));
                    tracing::info!(group = %config.group, member = %joined.member_id,
                        generation = joined.generation, "joined the group");
                    (
                        Some(joined.member_id),
                        joined.generation,
                        joined.assignment,
                        joined.pending,
                    )
                })
            }
            Some(member_id) => {
                let owned = {
                    let membership = lock(&shared);
                    // What it holds, and what it was just given and may be taking now.
                    to_assignment(membership.held.union(&membership.answer))
                };
                let request = HeartbeatRequest {
                    group: config.group.clone(),
                    member_id,
                    owned,
                    wait_ms_max: u32::try_from(interval.as_millis()).unwrap_or(u32::MAX),
                };
                let beat = match link.client().await {
                    Ok(client) => {
                        long_polls = client.broker_versions().common_version(ApiKey::Heartbeat) >= Some(1);
                        if long_polls {
                            link.request_on(&client, &request).await
                        } else {
                            link.request_on(&client, &HeartbeatRequestV0(request)).await
                        }
                    }
                    Err(error) => Err(error),
                };
                beat.map(|beat| (None, beat.generation, beat.assignment, beat.pending))
            }
        };
        let (giving_up, pending) = match result {
            Ok((joined_as, generation, assignment, pending)) => {
                last_ok = Instant::now();
                let mut membership = lock(&shared);
                if let Some(member_id) = joined_as {
                    membership.member_id = Some(member_id);
                }
                membership.generation = generation;
                membership.answer = to_set(&assignment);
                let giving_up = !membership.held.is_subset(&membership.answer);
                drop(membership);
                notify();
                (giving_up, pending)
            }
            Err(error) if error.code() == Some(ErrorCode::UnknownMember) => {
                tracing::warn!(group = %config.group, "the group dropped this member; joining again");
                lose(&shared);
                notify();
                continue;
            }
            Err(ClientError::Broker { code, message })
                if !code.is_retriable() && code != ErrorCode::ShuttingDown =>
            {
                lock(&shared).error = Some(ConsumeError::Group {
                    group: config.group.clone(),
                    code,
                    message,
                });
                notify();
                return;
            }
            Err(error) => {
                tracing::warn!(group = %config.group, %error, "heartbeat failed; retrying");
                // Without heartbeats the broker gives the partitions to others once the
                // session times out; stop treating them as ours at the same time.
                if last_ok.elapsed() >= config.session_timeout && lock(&shared).member_id.is_some() {
                    lose(&shared);
                    notify();
                }
                tokio::time::sleep(RETRY_BACKOFF).await;
                continue;
            }
        };
        let delay = if !long_polls {
            Some(if pending > 0 { PENDING_HEARTBEAT } else { interval })
        } else {
            // The broker answered at once and would again until the release.
            giving_up.then_some(interval)
        };
        if let Some(delay) = delay {
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = wake.notified() => {}
            }
        }
    }
}

fn lose(shared: &Mutex<Membership>) {
    let mut membership = lock(shared);
    membership.member_id = None;
    membership.answer.clear();
    membership.lost = true;
}
