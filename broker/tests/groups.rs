//! Consumer groups against a real broker: balanced, sticky moves on join, leave and
//! session timeout with nothing skipped; fenced zombie commits; committed offsets that
//! survive a restart; expiry of empty groups.

mod server_support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lanes_consumer::{Consumer, ConsumerConfig, GroupConfig, TopicPartition};
use lanes_producer::{LaneSelector, Producer, ProducerConfig, ProducerRecord};
use lanes_protocol::api::{ApiKey, encode_error_response};
use lanes_protocol::client::{Client, ClientConfig, ClientError};
use lanes_protocol::messages::{
    Assignment, CommitLane, DescribeGroupRequest, HeartbeatRequest, JoinGroupRequest, LeaveGroupRequest,
    ListGroupsRequest, ListOffsetsLane, ListOffsetsRequest, OffsetCommitRequest, OffsetFetchRequest,
    OffsetSpec, PartitionItems, TopicItems, TopicPartitions,
};
use lanes_protocol::{ErrorCode, Lane, Offset, PartitionId};
use server_support::{TestBroker, create_topic, read_frame};

const DEADLINE: Duration = Duration::from_secs(60);

async fn client(address: &str) -> Client {
    Client::connect(address, ClientConfig::default()).await.unwrap()
}

/// Polls `condition` every 20 ms until it holds; fails after [`DEADLINE`].
async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What the members did, in one global order.
#[derive(Clone, Debug)]
enum Event {
    Handled {
        member: usize,
        log: (u32, u8),
        offset: u64,
    },
    Committed {
        log: (u32, u8),
        offset: u64,
    },
}

#[derive(Debug)]
enum Stop {
    /// Leave the group cleanly.
    Leave,
    /// Vanish without a word, as a crashed process does.
    Kill,
}

struct Member {
    stop: Option<tokio::sync::oneshot::Sender<Stop>>,
    holds: Arc<Mutex<BTreeSet<u32>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Member {
    fn holds(&self) -> BTreeSet<u32> {
        self.holds.lock().unwrap().clone()
    }

    async fn stop(mut self, how: Stop) {
        self.stop.take().unwrap().send(how).unwrap();
        self.task.await.unwrap();
    }
}

/// A group member that handles records by logging them, and commits after every third
/// poll: a crash or a move then leaves an uncommitted window to handle again.
fn start_member(address: &str, id: usize, events: Arc<Mutex<Vec<Event>>>) -> Member {
    let (stop, mut stopped) = tokio::sync::oneshot::channel();
    let holds = Arc::new(Mutex::new(BTreeSet::new()));
    let address = address.to_owned();
    let task = tokio::spawn({
        let holds = Arc::clone(&holds);
        async move {
            let mut config = ConsumerConfig::new(address);
            config.client_id = format!("member-{id}");
            let mut consumer = Consumer::connect(config).await.unwrap();
            let mut group = GroupConfig::new("fulfilment", &["orders"]);
            group.session_timeout = Duration::from_millis(2000);
            group.auto_commit_interval = None;
            consumer.subscribe(group).unwrap();
            let mut polls = 0u64;
            loop {
                tokio::select! {
                    how = &mut stopped => {
                        match how.unwrap() {
                            Stop::Leave => consumer.close().await.unwrap(),
                            Stop::Kill => drop(consumer),
                        }
                        return;
                    }
                    records = consumer.poll_timeout(Duration::from_millis(100)) => {
                        let records = records.unwrap();
                        {
                            let mut events = events.lock().unwrap();
                            for r in &records {
                                events.push(Event::Handled { member: id, log: (r.partition.0, r.lane.0), offset: r.offset.0 });
                            }
                        }
                        polls += 1;
                        let positions: Vec<_> = consumer.positions().iter().map(|(k, o)| (k.clone(), *o)).collect();
                        if polls.is_multiple_of(3) && consumer.commit_offsets(&positions).await.is_ok() {
                            let mut events = events.lock().unwrap();
                            for (key, offset) in positions {
                                events.push(Event::Committed { log: (key.partition.0, key.lane.0), offset: offset.0 });
                            }
                        }
                        *holds.lock().unwrap() = consumer.assignment().iter().map(|p: &TopicPartition| p.partition.0).collect();
                    }
                }
            }
        }
    });
    Member {
        stop: Some(stop),
        holds,
        task,
    }
}

/// Produces keyed records to every partition and lane until told to stop.
fn start_producing(address: &str, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    let address = address.to_owned();
    tokio::spawn(async move {
        let producer = Producer::connect(ProducerConfig::new(address)).await.unwrap();
        let mut sent = 0u64;
        while !stop.load(Ordering::Acquire) {
            let mut deliveries = Vec::new();
            for _ in 0..24 {
                let record = ProducerRecord::new("orders", format!("event-{sent}"))
                    .key(format!("order-{}", sent % 97))
                    .lane(LaneSelector::Index(Lane((sent % 3) as u8)));
                deliveries.push(producer.send(record).await.unwrap());
                sent += 1;
            }
            for delivery in deliveries {
                delivery.wait().await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        producer.close().await.unwrap();
        sent
    })
}

async fn end_offsets(address: &str, partitions: u32) -> BTreeMap<(u32, u8), u64> {
    let lanes = (0..3).map(|lane| ListOffsetsLane {
        lane: Lane(lane),
        spec: OffsetSpec::Latest,
    });
    let request = ListOffsetsRequest {
        topics: vec![TopicItems {
            name: "orders".into(),
            partitions: (0..partitions)
                .map(|p| PartitionItems {
                    partition: PartitionId(p),
                    lanes: lanes.clone().collect(),
                })
                .collect(),
        }],
    };
    let response = client(address).await.request(&request).await.unwrap();
    response.topics[0]
        .lanes()
        .map(|(_, p, lane)| ((p.0, lane.lane.0), lane.offset.0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_share_partitions_and_moves_skip_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), |_| {}).await;
    let address = broker.address();
    create_topic(&address, "orders", 12).await;
    let stop_producing = Arc::new(AtomicBool::new(false));
    let producing = start_producing(&address, Arc::clone(&stop_producing));
    let events = Arc::new(Mutex::new(Vec::new()));

    // Three members on twelve partitions: four each.
    let a = start_member(&address, 0, Arc::clone(&events));
    let b = start_member(&address, 1, Arc::clone(&events));
    let c = start_member(&address, 2, Arc::clone(&events));
    wait_until("each of three members holds 4 partitions", || {
        [&a, &b, &c].iter().all(|m| m.holds().len() == 4)
    })
    .await;
    let all: BTreeSet<u32> = [&a, &b, &c].iter().flat_map(|m| m.holds()).collect();
    assert_eq!(all.len(), 12, "the three hold every partition once");

    // One leaves: only its partitions move.
    let (a_before, b_before) = (a.holds(), b.holds());
    c.stop(Stop::Leave).await;
    wait_until("two members hold 6 partitions each", || {
        a.holds().len() == 6 && b.holds().len() == 6
    })
    .await;
    assert!(
        a.holds().is_superset(&a_before) && b.holds().is_superset(&b_before),
        "nothing else moved"
    );

    // One is killed: its partitions move once its session times out.
    let a_before = a.holds();
    b.stop(Stop::Kill).await;
    wait_until("the survivor holds all 12 partitions", || a.holds().len() == 12).await;
    assert!(a.holds().is_superset(&a_before));

    stop_producing.store(true, Ordering::Release);
    let sent = producing.await.unwrap();
    let ends = end_offsets(&address, 12).await;
    assert_eq!(ends.values().sum::<u64>(), sent);
    let handled_all = || {
        let events = events.lock().unwrap();
        let mut next: HashMap<(u32, u8), BTreeSet<u64>> = HashMap::new();
        for event in events.iter() {
            if let Event::Handled { log, offset, .. } = event {
                next.entry(*log).or_default().insert(*offset);
            }
        }
        ends.iter()
            .all(|(log, end)| next.get(log).map_or(0, |s| s.len() as u64) == *end)
    };
    wait_until("every record was handled", handled_all).await;
    a.stop(Stop::Leave).await;

    // No record skipped: every offset below the end was handled. A record handled twice
    // was not committed when it was handled the first time.
    let events = events.lock().unwrap().clone();
    let mut handled: HashMap<(u32, u8), BTreeSet<u64>> = HashMap::new();
    let mut committed: HashMap<(u32, u8), u64> = HashMap::new();
    let mut duplicates = 0;
    for event in &events {
        match *event {
            Event::Handled { log, offset, member } => {
                if !handled.entry(log).or_default().insert(offset) {
                    duplicates += 1;
                    let floor = committed.get(&log).copied().unwrap_or(0);
                    assert!(
                        offset >= floor,
                        "member {member} handled {log:?}@{offset} again, below the committed {floor}"
                    );
                }
            }
            Event::Committed { log, offset } => {
                let entry = committed.entry(log).or_default();
                *entry = (*entry).max(offset);
            }
        }
    }
    for (log, end) in &ends {
        let offsets = &handled[log];
        assert_eq!(offsets.len() as u64, *end, "{log:?}: every offset handled");
        assert_eq!(offsets.last().copied(), end.checked_sub(1));
    }
    println!("{sent} records, {duplicates} handled twice (from uncommitted windows)");
    broker.stop().await;
}

fn assignment(partitions: &[u32]) -> Assignment {
    vec![TopicPartitions {
        topic: "orders".into(),
        partitions: partitions.iter().copied().map(PartitionId).collect(),
    }]
}

fn partitions_of(assignment: &Assignment) -> Vec<u32> {
    assignment
        .iter()
        .flat_map(|t| t.partitions.iter().map(|p| p.0))
        .collect()
}

async fn join(client: &Client, name: &str, session_timeout_ms: u32) -> (String, Vec<u32>) {
    let joined = client
        .request(&JoinGroupRequest {
            group: "fulfilment".into(),
            member_id: String::new(),
            client_id: name.into(),
            topics: vec!["orders".into()],
            session_timeout_ms,
        })
        .await
        .unwrap();
    (joined.member_id, partitions_of(&joined.assignment))
}

async fn heartbeat(client: &Client, member: &str, owned: &[u32]) -> Result<(Vec<u32>, u32), ClientError> {
    client
        .request(&HeartbeatRequest {
            group: "fulfilment".into(),
            member_id: member.into(),
            owned: assignment(owned),
            wait_ms_max: 0,
        })
        .await
        .map(|beat| (partitions_of(&beat.assignment), beat.pending))
}

async fn commit(
    client: &Client,
    member: &str,
    partition: u32,
    offset: u64,
) -> Result<ErrorCode, ClientError> {
    let response = client
        .request(&OffsetCommitRequest {
            group: "fulfilment".into(),
            member_id: member.into(),
            topics: vec![TopicItems {
                name: "orders".into(),
                partitions: vec![PartitionItems {
                    partition: PartitionId(partition),
                    lanes: vec![CommitLane {
                        lane: Lane(0),
                        offset: Offset(offset),
                    }],
                }],
            }],
        })
        .await?;
    Ok(response.topics[0].partitions[0].lanes[0].error_code)
}

async fn committed(client: &Client, partition: u32) -> Option<Offset> {
    let response = client
        .request(&OffsetFetchRequest {
            group: "fulfilment".into(),
            partitions: assignment(&[partition]),
        })
        .await
        .unwrap();
    response.topics[0].partitions[0].lanes[0].committed
}

async fn produce(address: &str, partition: u32, count: usize) {
    let producer = Producer::connect(ProducerConfig::new(address)).await.unwrap();
    for i in 0..count {
        let record = ProducerRecord::new("orders", format!("r{i}"))
            .partition(PartitionId(partition))
            .lane(LaneSelector::Index(Lane(0)));
        producer.send(record).await.unwrap();
    }
    producer.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_former_owner_cannot_commit() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), |_| {}).await;
    let address = broker.address();
    create_topic(&address, "orders", 2).await;
    produce(&address, 1, 20).await;
    let client = client(&address).await;

    let (a, a_holds) = join(&client, "a", 30_000).await;
    assert_eq!(a_holds, vec![0, 1]);
    let (b, b_holds) = join(&client, "b", 30_000).await;
    assert!(b_holds.is_empty(), "partition 1 is still a's");
    assert_eq!(
        heartbeat(&client, &b, &[]).await.unwrap(),
        (vec![], 1),
        "one partition is on its way"
    );

    // a learns that partition 1 moves; it may still commit it until it lets go.
    let (a_holds, _) = heartbeat(&client, &a, &[0, 1]).await.unwrap();
    assert_eq!(a_holds, vec![0]);
    assert_eq!(commit(&client, &a, 1, 10).await.unwrap(), ErrorCode::None);
    heartbeat(&client, &a, &[0]).await.unwrap();
    assert_eq!(heartbeat(&client, &b, &[]).await.unwrap(), (vec![1], 0));

    // Now a is a zombie for partition 1: its commit is refused and changes nothing.
    assert_eq!(
        commit(&client, &a, 1, 15).await.unwrap(),
        ErrorCode::NotPartitionOwner
    );
    assert_eq!(committed(&client, 1).await, Some(Offset(10)));
    assert_eq!(commit(&client, &b, 1, 12).await.unwrap(), ErrorCode::None);
    assert_eq!(committed(&client, 1).await, Some(Offset(12)));
    // An offset past the end of the lane log is refused too.
    assert_eq!(
        commit(&client, &b, 1, 21).await.unwrap(),
        ErrorCode::OffsetOutOfRange
    );

    // A member whose session timed out is not a member at all.
    let (c, _) = join(&client, "c", 1000).await;
    wait_until_member_gone(&client, &c).await;
    let error = commit(&client, &c, 0, 0).await.unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::UnknownMember));
    assert_eq!(
        heartbeat(&client, &c, &[]).await.unwrap_err().code(),
        Some(ErrorCode::UnknownMember)
    );
    broker.stop().await;
}

fn beat(member: &str, owned: &[u32], wait_ms_max: u32) -> HeartbeatRequest {
    HeartbeatRequest {
        group: "fulfilment".into(),
        member_id: member.into(),
        owned: assignment(owned),
        wait_ms_max,
    }
}

/// Far below the 30 s a held heartbeat may wait (half the 60 s session), far above a
/// round trip on a busy machine.
const HELD_ANSWER_DEADLINE: Duration = Duration::from_secs(20);

async fn within_deadline<T>(what: &str, work: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(HELD_ANSWER_DEADLINE, work)
        .await
        .unwrap_or_else(|_| panic!("{what}: the held heartbeat did not answer when the group changed"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_with_nothing_new_is_held_until_the_group_changes() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), |_| {}).await;
    let address = broker.address();
    create_topic(&address, "orders", 2).await;
    // One connection: the broker runs its requests in the order sent, so each held
    // heartbeat below is held before the change queued behind it arrives.
    let client = client(&address).await;
    let (a, a_holds) = join(&client, "a", 60_000).await;
    assert_eq!(a_holds, vec![0, 1]);

    // Nothing changes: held for the whole wait, then the same answer.
    let started = std::time::Instant::now();
    let held = client.request(&beat(&a, &[0, 1], 300)).await.unwrap();
    assert_eq!((partitions_of(&held.assignment), held.pending), (vec![0, 1], 0));
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "answered after {:?}, before its wait",
        started.elapsed()
    );

    // b joins: a's held heartbeat hears at once that partition 1 moves.
    let (b, held) = within_deadline("a, on b's join", async {
        let held = client.queue(&beat(&a, &[0, 1], 60_000)).await.unwrap();
        let (b, b_holds) = join(&client, "b", 60_000).await;
        assert!(b_holds.is_empty(), "partition 1 is still a's");
        (b, held.wait().await.unwrap())
    })
    .await;
    assert_eq!((partitions_of(&held.assignment), held.pending), (vec![0], 0));

    // b waits for partition 1, held until a lets it go.
    let held = within_deadline("b, on a's release", async {
        let held = client.queue(&beat(&b, &[], 60_000)).await.unwrap();
        heartbeat(&client, &a, &[0]).await.unwrap();
        held.wait().await.unwrap()
    })
    .await;
    assert_eq!((partitions_of(&held.assignment), held.pending), (vec![1], 0));

    // a leaves: b's held heartbeat gets partition 0 at once.
    let held = within_deadline("b, on a's leave", async {
        let held = client.queue(&beat(&b, &[1], 60_000)).await.unwrap();
        let leave = LeaveGroupRequest {
            group: "fulfilment".into(),
            member_id: a.clone(),
        };
        client.request(&leave).await.unwrap();
        held.wait().await.unwrap()
    })
    .await;
    assert_eq!((partitions_of(&held.assignment), held.pending), (vec![0, 1], 0));

    // A held heartbeat does not hold up the broker's shutdown.
    let held = client.queue(&beat(&b, &[0, 1], 60_000)).await.unwrap();
    within_deadline("shutdown", broker.stop()).await;
    drop(held);
}

async fn wait_until_member_gone(client: &Client, member: &str) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let group = client
            .request(&DescribeGroupRequest {
                group: "fulfilment".into(),
            })
            .await
            .unwrap();
        if group.members.iter().all(|m| m.member_id != member) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{member}'s session never timed out"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_offsets_survive_a_restart_and_describe_shows_lag() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), |_| {}).await;
    let address = broker.address();
    create_topic(&address, "orders", 2).await;
    produce(&address, 0, 30).await;
    {
        let client = client(&address).await;
        let (a, holds) = join(&client, "a", 30_000).await;
        assert_eq!(holds, vec![0, 1]);
        assert_eq!(commit(&client, &a, 0, 25).await.unwrap(), ErrorCode::None);
    }
    broker.stop().await;

    let broker = TestBroker::start(dir.path(), |_| {}).await;
    let client = client(&broker.address()).await;
    assert_eq!(committed(&client, 0).await, Some(Offset(25)));
    assert_eq!(committed(&client, 1).await, None);
    let group = client
        .request(&DescribeGroupRequest {
            group: "fulfilment".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        group.state, "empty",
        "members do not survive a restart; their offsets do"
    );
    let lane = group.offsets[0].partitions[0].lanes[0];
    assert_eq!(
        (lane.committed, lane.end_offset, lane.lag),
        (Some(Offset(25)), Offset(30), 5)
    );
    // At least the batch holding offset 25 (a header is 61 bytes).
    assert!(lane.lag_bytes > 61, "{lane:?}");
    assert!(lane.oldest_age_ms.is_some_and(|age| age >= 0), "{lane:?}");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_groups_expire_with_their_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let expiry = |s: &mut lanes_broker::Settings| s.group_empty_expiry_ms = 300;
    let broker = TestBroker::start(dir.path(), expiry).await;
    let address = broker.address();
    create_topic(&address, "orders", 1).await;
    produce(&address, 0, 5).await;
    let client = client(&address).await;
    let (a, _) = join(&client, "a", 30_000).await;
    assert_eq!(commit(&client, &a, 0, 5).await.unwrap(), ErrorCode::None);
    client
        .request(&lanes_protocol::messages::LeaveGroupRequest {
            group: "fulfilment".into(),
            member_id: a,
        })
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !client
        .request(&ListGroupsRequest)
        .await
        .unwrap()
        .groups
        .is_empty()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the empty group never expired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(committed(&client, 0).await, None);
    broker.stop().await;
    let broker = TestBroker::start(dir.path(), expiry).await;
    let client = self::client(&broker.address()).await;
    assert!(
        client
            .request(&ListGroupsRequest)
            .await
            .unwrap()
            .groups
            .is_empty(),
        "expired for good"
    );
    assert_eq!(committed(&client, 0).await, None);
    broker.stop().await;
}

fn code<T: std::fmt::Debug>(result: Result<T, ClientError>) -> Option<ErrorCode> {
    result.unwrap_err().code()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_group_requests_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), |s| s.auto_create_topics = false).await;
    let client = client(&broker.address()).await;
    let join = |group: &str, topics: Vec<String>, session_timeout_ms| JoinGroupRequest {
        group: group.into(),
        member_id: String::new(),
        client_id: "c".into(),
        topics,
        session_timeout_ms,
    };
    let orders = vec!["orders".to_owned()];
    assert_eq!(
        code(client.request(&join("bad/name", orders.clone(), 10_000)).await),
        Some(ErrorCode::InvalidGroupName)
    );
    assert_eq!(
        code(client.request(&join("g", orders.clone(), 10)).await),
        Some(ErrorCode::InvalidConfig)
    );
    assert_eq!(
        code(client.request(&join("g", vec![], 10_000)).await),
        Some(ErrorCode::InvalidConfig)
    );
    assert_eq!(
        code(client.request(&join("g", orders, 10_000)).await),
        Some(ErrorCode::UnknownTopic)
    );
    let describe = client
        .request(&DescribeGroupRequest { group: "nope".into() })
        .await;
    assert_eq!(code(describe), Some(ErrorCode::UnknownGroup));
    let beat = client
        .request(&HeartbeatRequest {
            group: "nope".into(),
            member_id: "m".into(),
            owned: vec![],
            wait_ms_max: 0,
        })
        .await;
    assert_eq!(code(beat), Some(ErrorCode::UnknownMember));
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_member_rides_out_a_broker_restart() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), |_| {}).await;
    let address = broker.address();
    create_topic(&address, "orders", 2).await;
    produce(&address, 0, 50).await;
    produce(&address, 1, 50).await;

    let handled: Arc<Mutex<BTreeSet<(u32, u64)>>> = Arc::default();
    let member = tokio::spawn({
        let (address, handled) = (address.clone(), Arc::clone(&handled));
        async move {
            let mut consumer = Consumer::connect(ConsumerConfig::new(address)).await.unwrap();
            let mut group = GroupConfig::new("fulfilment", &["orders"]);
            group.session_timeout = Duration::from_millis(2000);
            group.auto_commit_interval = Some(Duration::from_millis(50));
            consumer.subscribe(group).unwrap();
            loop {
                // Errors while the broker is away are retried inside; none reaches here.
                for record in consumer.poll().await.unwrap() {
                    handled
                        .lock()
                        .unwrap()
                        .insert((record.partition.0, record.offset.0));
                }
            }
        }
    });
    wait_until("the first 100 records were handled", || {
        handled.lock().unwrap().len() == 100
    })
    .await;
    broker.stop().await;

    let broker = TestBroker::start_on(address.parse().unwrap(), dir.path(), |_| {}).await;
    produce(&address, 0, 50).await;
    produce(&address, 1, 50).await;
    wait_until(
        "the member reconnected, joined again and handled the new records",
        || handled.lock().unwrap().len() == 200,
    )
    .await;
    assert!(!member.is_finished(), "the member kept running");
    member.abort();
    broker.stop().await;
}

/// How many of the pages of `path` from `from` to `to` (page multiples) are in the page
/// cache, seen through a mapping of this process's own (`mincore`).
#[allow(unsafe_code)]
fn resident_pages(path: &std::path::Path, from: usize, to: usize) -> usize {
    let file = std::fs::File::open(path).unwrap();
    // SAFETY: a read-only mapping; mincore reads no byte of it, so the broker's
    // appends meanwhile change nothing this reads.
    let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
    let page = 4096;
    let mut resident = vec![0u8; (to - from) / page];
    // SAFETY: `from..to` lies in the mapping and starts at a page boundary; `resident`
    // has a byte per page.
    let result = unsafe {
        libc::mincore(
            map.as_ptr().add(from) as *mut libc::c_void,
            to - from,
            resident.as_mut_ptr(),
        )
    };
    assert_eq!(result, 0, "{}", std::io::Error::last_os_error());
    resident.iter().filter(|&&page| page & 1 == 1).count()
}

/// Whether the file system of `dir` drops a clean page from the page cache when asked
/// (tmpfs cannot: its pages are the files).
#[allow(unsafe_code)]
fn drops_clean_pages(dir: &std::path::Path) -> bool {
    use std::os::fd::AsRawFd;
    let path = dir.join("probe");
    std::fs::write(&path, vec![1u8; 4096]).unwrap();
    let file = std::fs::File::open(&path).unwrap();
    file.sync_all().unwrap();
    // SAFETY: a plain system call on an open descriptor.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    let dropped = resident_pages(&path, 0, 4096) == 0;
    std::fs::remove_file(&path).unwrap();
    dropped
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_cached_tail_bytes_what_a_group_has_not_committed_stays_in_the_page_cache() {
    const MIB: usize = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    // SAFETY: sysconf has no preconditions.
    #[allow(unsafe_code)]
    let page_bytes = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if page_bytes != 4096 || !drops_clean_pages(dir.path()) {
        eprintln!(
            "skipped: pages are not 4 KiB, or the temp dir's file system keeps pages it is asked to drop"
        );
        return;
    }
    // Pages more than 1 MiB behind the end go, after each fsync round (`fsync always`).
    // No metrics export: its lag gauges read the batch header at each committed offset,
    // which brings back the page it is in if it was dropped.
    let broker = TestBroker::start(dir.path(), |settings| {
        settings.cached_tail_bytes = MIB as u64;
        settings.segment_bytes_max = 8 * MIB as u32;
        settings.metrics_listen = "off".into();
    })
    .await;
    let address = broker.address();
    create_topic(&address, "orders", 1).await;
    let producer = Producer::connect(ProducerConfig::new(&address)).await.unwrap();
    let mut produced = 0u64;
    let mut produce = async |count: u64| {
        for _ in 0..count {
            let record = ProducerRecord::new("orders", vec![7u8; 16 * 1024])
                .partition(PartitionId(0))
                .lane(LaneSelector::Index(Lane(0)));
            producer.send(record).await.unwrap();
            produced += 1;
        }
        producer.flush().await.unwrap();
        produced
    };
    // The group commits from the start (the log learns it at once): nothing of the first
    // segment goes.
    let client = client(&address).await;
    let (member, holds) = join(&client, "a", 30_000).await;
    assert_eq!(holds, vec![0]);
    assert_eq!(commit(&client, &member, 0, 0).await.unwrap(), ErrorCode::None);
    // 16 KiB records: offset 200 begins about 3.3 MB in, within the second 2 MiB step
    // (the drop works in steps of 2 MiB).
    produce(400).await;
    assert_eq!(commit(&client, &member, 0, 200).await.unwrap(), ErrorCode::None);

    // Far past the first segment (8 MiB) and the window: without the group, all of
    // the first segment would go.
    let first = dir.path().join("topics/orders/0/0/00000000000000000000.log");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut total = produce(0).await;
    loop {
        // Up to 16 MiB: enough for the window to pass the first segment; after that
        // the fsync rounds have run and only the page cache is looked at again.
        if total * 16 * 1024 < 16 * MIB as u64 {
            total = produce(50).await;
        }
        let first_len = std::fs::metadata(&first).unwrap().len() as usize;
        let rolled = total * 16 * 1024 > 12 * MIB as u64;
        let dropped = resident_pages(&first, 0, 2 * MIB);
        let kept = resident_pages(&first, 2 * MIB, first_len / 4096 * 4096);
        if rolled && dropped == 0 && kept == (first_len / 4096 * 4096 - 2 * MIB) / 4096 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "after {total} records: {dropped} pages cached before the group's offset, {kept} from it on"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    producer.close().await.unwrap();
    broker.stop().await;
}

/// Whether a file in `dir` can be read with `O_DIRECT` (tmpfs, for one, refuses it).
fn reads_directly(dir: &std::path::Path) -> bool {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let path = dir.join("direct-probe");
    std::fs::write(&path, vec![1u8; 8192]).unwrap();
    let read = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .and_then(|file| {
            // An aligned 4 KiB region inside an 8 KiB buffer.
            let mut buffer = vec![0u8; 8192];
            let start = buffer.as_ptr().align_offset(4096);
            file.read_at(&mut buffer[start..start + 4096], 0)
        });
    std::fs::remove_file(&path).unwrap();
    read.is_ok_and(|read| read == 4096)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_outside_groups_far_behind_the_cached_tail_gets_every_record_read_from_the_disk() {
    const MIB: usize = 1 << 20;
    const RECORDS: u32 = 1_200;
    let dir = tempfile::tempdir().unwrap();
    let from_disk = drops_clean_pages(dir.path()) && reads_directly(dir.path());
    let broker = TestBroker::start(dir.path(), |settings| {
        settings.cached_tail_bytes = MIB as u64;
        settings.segment_bytes_max = 8 * MIB as u32;
    })
    .await;
    let address = broker.address();
    create_topic(&address, "orders", 1).await;
    let producer = Producer::connect(ProducerConfig::new(&address)).await.unwrap();
    // 16 KiB values, each telling its number: about 19 MB over three segments, all but
    // the last MiB dropped from the page cache after the fsync rounds.
    let value = |i: u32| -> Vec<u8> {
        let mut value = vec![(i % 251) as u8; 16 * 1024];
        value[..4].copy_from_slice(&i.to_le_bytes());
        value
    };
    for i in 0..RECORDS {
        let record = ProducerRecord::new("orders", value(i))
            .partition(PartitionId(0))
            .lane(LaneSelector::Index(Lane(0)));
        producer.send(record).await.unwrap();
    }
    producer.flush().await.unwrap();
    producer.close().await.unwrap();

    let mut consumer = Consumer::connect(ConsumerConfig::new(&address)).await.unwrap();
    consumer
        .assign("orders", None, None, lanes_consumer::StartFrom::Earliest)
        .await
        .unwrap();
    let mut next = 0u32;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while next < RECORDS {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {next} of {RECORDS} records came back"
        );
        for record in consumer.poll().await.unwrap() {
            assert_eq!(record.offset, Offset(u64::from(next)), "in order, none skipped");
            assert!(record.value[..] == value(next)[..], "record {next} intact");
            next += 1;
        }
    }
    let stats = broker.broker.topics.direct_read_stats().unwrap();
    if from_disk {
        assert!(
            stats.bytes >= 8 * MIB as u64,
            "the first segment came from the disk: {stats:?}"
        );
    } else {
        eprintln!("not checked: the temp dir's file system keeps pages or refuses O_DIRECT");
    }
    broker.stop().await;
}

/// What [`request_proxy`] does with a request frame.
enum Verdict {
    Pass,
    /// Close the connection, the request not passed on.
    Cut,
}

/// A TCP proxy to `broker` that asks `decide` about every request frame (length prefix
/// included).
async fn request_proxy(
    broker: std::net::SocketAddr,
    decide: impl Fn(&[u8]) -> Verdict + Send + Sync + 'static,
) -> std::net::SocketAddr {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let decide = Arc::new(decide);
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(upstream) = tokio::net::TcpStream::connect(broker).await else {
                continue;
            };
            let decide = Arc::clone(&decide);
            tokio::spawn(async move {
                let (mut client_read, mut client_write) = client.into_split();
                let (mut upstream_read, mut upstream_write) = upstream.into_split();
                let responses = tokio::io::copy(&mut upstream_read, &mut client_write);
                let requests = async {
                    loop {
                        let frame = read_frame(&mut client_read).await?;
                        match decide(&frame) {
                            Verdict::Pass => upstream_write.write_all(&frame).await?,
                            Verdict::Cut => return Ok::<(), std::io::Error>(()),
                        }
                    }
                };
                tokio::select! {
                    _ = responses => {}
                    _ = requests => {}
                }
            });
        }
    });
    address
}

/// A request frame's API key and version.
fn api_of(frame: &[u8]) -> (u16, u16) {
    (
        u16::from_be_bytes([frame[4], frame[5]]),
        u16::from_be_bytes([frame[6], frame[7]]),
    )
}

/// A member of group `fulfilment` of topic `orders`, without auto-commit, once it has
/// read `records` records.
async fn member_that_read(address: &str, records: usize) -> Consumer {
    let mut consumer = Consumer::connect(ConsumerConfig::new(address)).await.unwrap();
    let mut group = GroupConfig::new("fulfilment", &["orders"]);
    group.auto_commit_interval = None;
    consumer.subscribe(group).unwrap();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut seen = 0;
    while seen < records {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{seen} of {records} records"
        );
        seen += consumer
            .poll_timeout(Duration::from_millis(100))
            .await
            .unwrap()
            .len();
    }
    consumer
}

/// A commit or a leave whose connection is lost with it goes out once more on a new
/// connection (both are idempotent), so the caller does not see the loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_or_leave_whose_connection_is_lost_goes_out_once_more() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), |_| {}).await;
    let address = broker.address();
    create_topic(&address, "orders", 1).await;
    produce(&address, 0, 10).await;
    // The connection carrying the first commit, and the one carrying the first leave, is
    // closed, the request not passed on, as a broker closing an idle connection would as
    // the request goes out on it.
    let (commit_cut, leave_cut) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let proxy = request_proxy(broker.addr, {
        let (commit_cut, leave_cut) = (Arc::clone(&commit_cut), Arc::clone(&leave_cut));
        move |frame| match api_of(frame) {
            (key, _) if key == ApiKey::OffsetCommit as u16 && !commit_cut.swap(true, Ordering::SeqCst) => {
                Verdict::Cut
            }
            (key, _) if key == ApiKey::LeaveGroup as u16 && !leave_cut.swap(true, Ordering::SeqCst) => {
                Verdict::Cut
            }
            _ => Verdict::Pass,
        }
    })
    .await;
    let mut consumer = member_that_read(&proxy.to_string(), 10).await;
    consumer.commit().await.expect("committed on a new connection");
    assert!(commit_cut.load(Ordering::SeqCst), "the proxy cut a commit");
    let client = client(&address).await;
    assert_eq!(committed(&client, 0).await, Some(Offset(10)));
    consumer.close().await.expect("left on a new connection");
    assert!(leave_cut.load(Ordering::SeqCst), "the proxy cut a leave");
    let group = client
        .request(&DescribeGroupRequest {
            group: "fulfilment".into(),
        })
        .await
        .unwrap();
    assert_eq!(group.state, "empty", "the member left");
    broker.stop().await;
}

/// A TCP proxy to `broker` that plays a broker from before long polls on the
/// connections it accepts until `upgrade` is set: their handshake answer lists Heartbeat
/// version 0 only, and a version 1 heartbeat is refused. Setting `upgrade` closes those
/// connections at once (the "restart"); later ones pass unchanged. Returns its
/// address and counts of the heartbeats at version 0, at version 1 passed, and refused.
async fn older_broker_proxy(
    broker: std::net::SocketAddr,
    upgrade: tokio::sync::watch::Receiver<bool>,
) -> (std::net::SocketAddr, [Arc<AtomicUsize>; 3]) {
    use lanes_protocol::api::{decode_response_body, decode_response_header, encode_response};
    use lanes_protocol::messages::ApiVersionsResponse;
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let counts: [Arc<AtomicUsize>; 3] = Default::default();
    let counted = counts.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(upstream) = tokio::net::TcpStream::connect(broker).await else {
                continue;
            };
            let [version_0, passed_1, refused] = counted.clone();
            let mut upgrade = upgrade.clone();
            let older = !*upgrade.borrow_and_update();
            tokio::spawn(async move {
                let (mut client_read, client_write) = client.into_split();
                let (mut upstream_read, mut upstream_write) = upstream.into_split();
                let client_write = tokio::sync::Mutex::new(client_write);
                let responses = async {
                    // The first response answers the handshake.
                    let mut first = true;
                    loop {
                        let mut frame = read_frame(&mut upstream_read).await?;
                        if std::mem::take(&mut first) && older {
                            let (header, reader) =
                                decode_response_header(bytes::BytesMut::from(&frame[4..])).unwrap();
                            let mut versions: ApiVersionsResponse = decode_response_body(reader).unwrap();
                            for api in &mut versions.apis {
                                if api.api_key == ApiKey::Heartbeat as u16 {
                                    api.max_version = 0;
                                }
                            }
                            frame = encode_response(header.correlation_id, &versions).concat();
                        }
                        client_write.lock().await.write_all(&frame).await?;
                    }
                    #[allow(unreachable_code)]
                    Ok::<(), std::io::Error>(())
                };
                let requests = async {
                    loop {
                        let frame = read_frame(&mut client_read).await?;
                        match api_of(&frame) {
                            (key, 1) if key == ApiKey::Heartbeat as u16 && older => {
                                refused.fetch_add(1, Ordering::SeqCst);
                                let correlation_id =
                                    u32::from_be_bytes([frame[8], frame[9], frame[10], frame[11]]);
                                let answer = encode_error_response(
                                    correlation_id,
                                    ErrorCode::UnsupportedVersion,
                                    "api key 9 does not support version 1",
                                );
                                client_write.lock().await.write_all(&answer.concat()).await?;
                                continue;
                            }
                            (key, 0) if key == ApiKey::Heartbeat as u16 => {
                                version_0.fetch_add(1, Ordering::SeqCst)
                            }
                            (key, 1) if key == ApiKey::Heartbeat as u16 => {
                                passed_1.fetch_add(1, Ordering::SeqCst)
                            }
                            _ => 0,
                        };
                        upstream_write.write_all(&frame).await?;
                    }
                    #[allow(unreachable_code)]
                    Ok::<(), std::io::Error>(())
                };
                let upgraded = async {
                    if older {
                        let _ = upgrade.wait_for(|upgraded| *upgraded).await;
                    } else {
                        std::future::pending::<()>().await;
                    }
                };
                tokio::select! {
                    _ = responses => {}
                    _ = requests => {}
                    () = upgraded => {}
                }
            });
        }
    });
    (address, counts)
}

/// Against a broker without long-poll heartbeats (its handshake lists Heartbeat version
/// 0 only), a member heartbeats at version 0 and gets and reads its partitions; once the
/// broker is upgraded (its connections closed), it long-polls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_heartbeats_at_version_0_with_an_older_broker_and_long_polls_once_it_is_upgraded() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), |_| {}).await;
    let address = broker.address();
    create_topic(&address, "orders", 1).await;
    produce(&address, 0, 10).await;
    let (upgrade, upgraded) = tokio::sync::watch::channel(false);
    let (proxy, [version_0, passed_1, refused]) = older_broker_proxy(broker.addr, upgraded).await;
    let consumer = member_that_read(&proxy.to_string(), 10).await;
    wait_until("two version 0 heartbeats", || {
        version_0.load(Ordering::SeqCst) >= 2
    })
    .await;
    assert_eq!(passed_1.load(Ordering::SeqCst), 0);
    upgrade.send(true).unwrap();
    wait_until("a version 1 heartbeat after the upgrade", || {
        passed_1.load(Ordering::SeqCst) > 0
    })
    .await;
    assert_eq!(
        refused.load(Ordering::SeqCst),
        0,
        "no version 1 heartbeat to the older broker"
    );
    consumer.close().await.unwrap();
    broker.stop().await;
}
