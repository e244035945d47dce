//! The workload and checker shared by reliability suites 1 (`crash.rs`, SIGKILL) and 2
//! (`power_loss.rs`, SIGKILL plus simulated power loss): idempotent producers with
//! `acks = durable` log every acknowledgement while the test crashes the broker; at the
//! end, as Jepsen's Kafka checker does, no two records were acknowledged at one offset;
//! every acknowledged record is read exactly once, at the offset it was acknowledged
//! with; each lane log's offsets run on from its
//! earliest offset with no gap or repeat (one value per offset); and no record,
//! acknowledged or not, is stored twice. Retention may have deleted the start of a lane
//! log: an acknowledged record below the lane log's earliest offset counts as deleted,
//! not lost ([`Checked::deleted_by_retention`]). `read_all` also serves suite 8
//! (`fsync_failure.rs`).
#![allow(dead_code, unreachable_pub)]

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lanes_consumer::{Consumer, ConsumerConfig, StartFrom};
use lanes_producer::{LaneSelector, Producer, ProducerConfig, ProducerRecord};
use lanes_protocol::client::{Client, ClientConfig};
use lanes_protocol::messages::{
    CreateTopicRequest, ListOffsetsLane, ListOffsetsRequest, OffsetSpec, PartitionItems, TopicItems,
};
use lanes_protocol::{ErrorCode, Lane, Offset, PartitionId};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::process_support::DEADLINE;

pub const TOPIC: &str = "crash";
const PRODUCERS: u32 = 2;
const PARTITIONS: u32 = 4;
const LANES: [&str; 3] = ["express", "standard", "bulk"];

/// The broker settings of the suites' second runs: retention keeps two 32 KiB segments
/// per lane log and runs every 50 ms, so that deleted segments' files are recycled all
/// through a run.
pub const KEEPING_TWO_SEGMENTS: [&str; 8] = [
    "--segment-bytes-max",
    "32768",
    "--batch-bytes-max",
    "16384",
    "--retention-bytes",
    "65536",
    "--retention-check-ms",
    "50",
];

/// What [`KEEPING_TWO_SEGMENTS`] keeps per lane log: its `--retention-bytes`.
pub const KEPT_BYTES: u64 = 65_536;

/// Where an acknowledged record landed: (partition, lane, offset).
type Position = (u32, u8, Offset);

/// What one producer saw: every acknowledgement (value, where), and the errors of
/// deliveries that failed.
type Sent = (Vec<(String, Position)>, Vec<String>);

/// A small deterministic generator: the seed is printed, so a failing run can be
/// repeated with `LANES_CRASH_SEED`.
pub struct Lcg(pub u64);

impl Lcg {
    pub fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % below
    }
}

pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Sends `p{producer}-{n}` records until `stop`; returns every acknowledgement, and the
/// errors of deliveries that failed.
async fn produce(address: String, producer: u32, stop: Arc<AtomicBool>) -> Sent {
    let mut config = ProducerConfig::new(&address);
    config.client_id = format!("crash-{producer}");
    config.delivery_timeout = Duration::from_secs(120);
    config.retry_backoff = Duration::from_millis(20);
    let producer_handle = Producer::connect(config).await.unwrap();
    // Acknowledgements are awaited in order by a second task, through a bounded queue.
    let (pending, mut deliveries) = mpsc::channel::<(String, lanes_producer::Delivery)>(4096);
    let acker = tokio::spawn(async move {
        let (mut acked, mut failed) = (Vec::new(), Vec::new());
        while let Some((value, delivery)) = deliveries.recv().await {
            match delivery.wait().await {
                Ok(metadata) => {
                    let offset = metadata.offset.expect("acks = durable reports offsets");
                    acked.push((value, (metadata.partition.0, metadata.lane.0, offset)));
                }
                Err(error) => failed.push(format!("{value}: {error}")),
            }
        }
        (acked, failed)
    });
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let value = format!("p{producer}-{n}");
        let record = ProducerRecord::new(TOPIC, value.clone())
            .key(format!("order-{}", n % 64))
            .lane(LaneSelector::Index(Lane((n % 3) as u8)));
        let delivery = producer_handle.send(record).await.unwrap();
        if pending.send((value, delivery)).await.is_err() {
            break;
        }
        n += 1;
        if n.is_multiple_of(64) {
            // Let the acker and the sender run: the buffer would otherwise fill at once.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    drop(pending);
    // Everything sent is settled now that the broker is up for good.
    let _ = producer_handle.close().await;
    acker.await.unwrap()
}

/// Every stored record, per lane log, in offset order.
pub async fn read_all(address: &str, topic: &str) -> BTreeMap<(u32, u8), Vec<(Offset, String)>> {
    let mut consumer = Consumer::connect(ConsumerConfig::new(address)).await.unwrap();
    consumer
        .assign(topic, None, None, StartFrom::Earliest)
        .await
        .unwrap();
    let mut logs: BTreeMap<(u32, u8), Vec<(Offset, String)>> = BTreeMap::new();
    let mut empty_polls = 0;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while empty_polls < 5 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "reading back took too long"
        );
        let records = consumer.poll_timeout(Duration::from_millis(200)).await.unwrap();
        empty_polls = if records.is_empty() { empty_polls + 1 } else { 0 };
        for record in records {
            logs.entry((record.partition.0, record.lane.0))
                .or_default()
                .push((record.offset, String::from_utf8(record.value.to_vec()).unwrap()));
        }
    }
    logs
}

/// A seed from `name` if set, else from the clock; printed by the caller so that a
/// failing run can be repeated.
pub fn seed(name: &str) -> u64 {
    env_u64(
        name,
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64,
    )
}

/// The producers, running until [`Workload::finish`].
pub struct Workload {
    stop: Arc<AtomicBool>,
    producers: Vec<JoinHandle<Sent>>,
}

/// What the checker saw.
pub struct Checked {
    pub acknowledged: usize,
    pub stored: usize,
    pub lane_logs: usize,
    /// Acknowledged records below their lane log's earliest offset: deleted by
    /// retention. A suite without retention expects none.
    pub deleted_by_retention: usize,
}

impl Workload {
    /// Creates the topic and starts the producers.
    pub async fn start(address: &str) -> Workload {
        let client = Client::connect(address, ClientConfig::default()).await.unwrap();
        client
            .request(&CreateTopicRequest {
                name: TOPIC.into(),
                partitions: PARTITIONS,
                lanes: LANES.map(String::from).to_vec(),
                configs: Vec::new(),
            })
            .await
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let producers = (0..PRODUCERS)
            .map(|p| tokio::spawn(produce(address.to_owned(), p, Arc::clone(&stop))))
            .collect();
        Workload { stop, producers }
    }

    /// Stops the producers, lets them settle against the broker at `address` (up for
    /// good now), reads every lane log back and checks it; panics on a violation.
    pub async fn finish(self, address: &str) -> Checked {
        self.stop.store(true, Ordering::Relaxed);
        let (mut acked, mut failed): (Vec<(String, Position)>, Vec<String>) = (Vec::new(), Vec::new());
        for producer in self.producers {
            let (producer_acked, producer_failed) = producer.await.unwrap();
            acked.extend(producer_acked);
            failed.extend(producer_failed);
        }
        // Retries ride out every crash within the delivery timeout: a failed delivery is
        // a refusal the workload should never meet (a batch too large, say), which would
        // otherwise go unseen.
        assert!(
            failed.is_empty(),
            "{} deliveries failed, e.g. {:?}",
            failed.len(),
            &failed[..failed.len().min(5)]
        );
        assert!(
            acked.len() > 100,
            "too little was acknowledged to check: {}",
            acked.len()
        );
        let starts = settled_earliest_offsets(address).await;
        let logs = read_all(address, TOPIC).await;
        assert_eq!(
            earliest_offsets(address).await,
            starts,
            "retention moved a lane log's start while the checker read"
        );
        check(&acked, &logs, &starts)
    }
}

/// Fails unless every lane log of the workload's topic under `data_dir` holds at least
/// `bytes_min` bytes of segments: retention deletes a segment only while the rest holds
/// `retention_bytes`, so this is what shows that the records counted as deleted by
/// retention were deleted by it. After a clean stop, which cuts a recycled file's old
/// bytes, so that file sizes are segment sizes.
pub fn assert_lane_logs_keep(data_dir: &std::path::Path, bytes_min: u64) {
    let topic = data_dir.join("topics").join(TOPIC);
    let mut lane_logs = 0;
    for partition in std::fs::read_dir(&topic).unwrap() {
        let partition = partition.unwrap().path();
        if !partition.is_dir() {
            continue;
        }
        for lane in std::fs::read_dir(&partition).unwrap() {
            let lane = lane.unwrap().path();
            let bytes: u64 = std::fs::read_dir(&lane)
                .unwrap()
                .map(|entry| entry.unwrap().path())
                .filter(|path| path.extension().is_some_and(|e| e == "log"))
                .map(|path| std::fs::metadata(path).unwrap().len())
                .sum();
            assert!(
                bytes >= bytes_min,
                "{} keeps {bytes} bytes, less than retention's {bytes_min}",
                lane.display()
            );
            lane_logs += 1;
        }
    }
    assert_eq!(
        lane_logs,
        PARTITIONS as usize * LANES.len(),
        "lane logs under {}",
        topic.display()
    );
}

/// Every lane log's earliest offset.
async fn earliest_offsets(address: &str) -> BTreeMap<(u32, u8), Offset> {
    let client = Client::connect(address, ClientConfig::default()).await.unwrap();
    let lanes = (0..LANES.len() as u8)
        .map(|lane| ListOffsetsLane {
            lane: Lane(lane),
            spec: OffsetSpec::Earliest,
        })
        .collect::<Vec<_>>();
    let response = client
        .request(&ListOffsetsRequest {
            topics: vec![TopicItems {
                name: TOPIC.into(),
                partitions: (0..PARTITIONS)
                    .map(|partition| PartitionItems {
                        partition: PartitionId(partition),
                        lanes: lanes.clone(),
                    })
                    .collect(),
            }],
        })
        .await
        .unwrap();
    let mut starts = BTreeMap::new();
    for partition in &response.topics[0].partitions {
        for lane in &partition.lanes {
            assert_eq!(lane.error_code, ErrorCode::None, "{}", lane.error_message);
            starts.insert((partition.partition.0, lane.lane.0), lane.offset);
        }
    }
    starts
}

/// Every lane log's earliest offset, once retention has stopped moving it: with the
/// producers stopped, one more retention pass is the last to delete anything. Two reads
/// a second apart must agree.
async fn settled_earliest_offsets(address: &str) -> BTreeMap<(u32, u8), Offset> {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut starts = earliest_offsets(address).await;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = earliest_offsets(address).await;
        if now == starts {
            return starts;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "lane logs' earliest offsets still moving: {now:?}"
        );
        starts = now;
    }
}

/// The checks, over every acknowledgement and every stored record.
fn check(
    acked: &[(String, Position)],
    logs: &BTreeMap<(u32, u8), Vec<(Offset, String)>>,
    starts: &BTreeMap<(u32, u8), Offset>,
) -> Checked {
    // One value per offset, and offsets start, start + 1… in each lane log (nothing lost
    // from the middle of a log, nothing written twice at one offset).
    let mut stored: HashMap<&str, Position> = HashMap::new();
    let mut stored_count = 0;
    for (&(partition, lane), records) in logs {
        let start = starts[&(partition, lane)];
        for (index, (offset, value)) in records.iter().enumerate() {
            assert_eq!(
                *offset,
                Offset(start.0 + index as u64),
                "lane log {partition}/{lane}: offsets not dense and increasing from {start}"
            );
            stored_count += 1;
            let previous = stored.insert(value, (partition, lane, *offset));
            assert!(
                previous.is_none(),
                "{value} is stored twice: {previous:?} and {offset}"
            );
        }
    }
    // No two records acknowledged at one offset: a log that lost acknowledged records
    // and gave their offsets out again. Checked over every acknowledgement, so that
    // records retention deleted since are checked too.
    let mut acked_at: HashMap<&Position, &str> = HashMap::with_capacity(acked.len());
    for (value, position) in acked {
        if let Some(other) = acked_at.insert(position, value) {
            panic!("{other} and {value} were both acknowledged at {position:?}");
        }
    }
    // Every acknowledged record exactly once, where its acknowledgement said.
    let mut lost = Vec::new();
    let mut deleted_by_retention = 0;
    for (value, position) in acked {
        let &(partition, lane, offset) = position;
        match stored.get(value.as_str()) {
            Some(found) => assert_eq!(
                found, position,
                "{value} acknowledged at {position:?}, stored at {found:?}"
            ),
            None if offset < starts[&(partition, lane)] => deleted_by_retention += 1,
            None => lost.push(value),
        }
    }
    assert!(
        lost.is_empty(),
        "{} acknowledged records lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    Checked {
        acknowledged: acked.len(),
        stored: stored_count,
        lane_logs: logs.len(),
        deleted_by_retention,
    }
}
