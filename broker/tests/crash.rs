//! Reliability suite 1, process crash: idempotent producers with `acks = durable` log
//! every acknowledgement while the broker is SIGKILLed at random moments and restarted,
//! 20 times (`LANES_CRASH_KILLS`). At the end, as Jepsen's Kafka checker does: every
//! acknowledged record is read exactly once, at the offset it was acknowledged with;
//! each lane log's offsets run 0, 1, 2… with no gap or repeat (one value per offset);
//! and no record, acknowledged or not, is stored twice.

mod process_support;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lanes_consumer::{Consumer, ConsumerConfig, StartFrom};
use lanes_producer::{LaneSelector, Producer, ProducerConfig, ProducerRecord};
use lanes_protocol::client::{Client, ClientConfig};
use lanes_protocol::messages::CreateTopicRequest;
use lanes_protocol::{Lane, Offset};
use process_support::{BrokerProcess, DEADLINE};
use tokio::sync::mpsc;

const TOPIC: &str = "crash";
const PRODUCERS: u32 = 2;
const PARTITIONS: u32 = 4;

/// Where an acknowledged record landed: (partition, lane, offset).
type Position = (u32, u8, Offset);

/// A small deterministic generator: the seed is printed, so a failing run can be
/// repeated with `LANES_CRASH_SEED`.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % below
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Sends `p{producer}-{n}` records until `stop`; returns every acknowledgement.
async fn produce(address: String, producer: u32, stop: Arc<AtomicBool>) -> Vec<(String, Position)> {
    let mut config = ProducerConfig::new(&address);
    config.client_id = format!("crash-{producer}");
    config.delivery_timeout = Duration::from_secs(120);
    config.retry_backoff = Duration::from_millis(20);
    let producer_handle = Producer::connect(config).await.unwrap();
    // Acknowledgements are awaited in order by a second task, through a bounded queue.
    let (pending, mut deliveries) = mpsc::channel::<(String, lanes_producer::Delivery)>(4096);
    let acker = tokio::spawn(async move {
        let mut acked = Vec::new();
        while let Some((value, delivery)) = deliveries.recv().await {
            if let Ok(metadata) = delivery.wait().await {
                let offset = metadata.offset.expect("acks = durable reports offsets");
                acked.push((value, (metadata.partition.0, metadata.lane.0, offset)));
            }
        }
        acked
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
async fn read_all(address: &str) -> BTreeMap<(u32, u8), Vec<(Offset, String)>> {
    let mut consumer = Consumer::connect(ConsumerConfig::new(address)).await.unwrap();
    consumer
        .assign(TOPIC, None, None, StartFrom::Earliest)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_records_survive_repeated_sigkill_exactly_once() {
    let kills = env_u64("LANES_CRASH_KILLS", 20);
    let seed = env_u64(
        "LANES_CRASH_SEED",
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64,
    );
    eprintln!("crash suite: {kills} kills, LANES_CRASH_SEED={seed}");
    let mut random = Lcg(seed);

    // A fixed port, so producers reconnect to the restarted broker.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let args = ["--metrics-listen", "off"];
    let mut broker = BrokerProcess::start_on(&listen, dir.path(), &args);
    let client = Client::connect(&broker.address, ClientConfig::default())
        .await
        .unwrap();
    client
        .request(&CreateTopicRequest {
            name: TOPIC.into(),
            partitions: PARTITIONS,
            lanes: vec!["express".into(), "standard".into(), "bulk".into()],
            configs: Vec::new(),
        })
        .await
        .unwrap();
    drop(client);

    let stop = Arc::new(AtomicBool::new(false));
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| tokio::spawn(produce(broker.address.clone(), p, Arc::clone(&stop))))
        .collect();
    for _ in 0..kills {
        tokio::time::sleep(Duration::from_millis(100 + random.next(600))).await;
        broker.kill();
        tokio::time::sleep(Duration::from_millis(random.next(200))).await;
        broker = BrokerProcess::start_on(&listen, dir.path(), &args);
    }
    // Some traffic on the last incarnation, then stop and settle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked: Vec<(String, Position)> = Vec::new();
    for producer in producers {
        acked.extend(producer.await.unwrap());
    }
    assert!(
        acked.len() > 100,
        "too little was acknowledged to check: {}",
        acked.len()
    );

    let logs = read_all(&broker.address).await;
    // One value per offset, and offsets 0, 1, 2… in each lane log (nothing lost from
    // the middle of a log, nothing written twice at one offset).
    let mut stored: HashMap<&str, Position> = HashMap::new();
    let mut stored_count = 0;
    for (&(partition, lane), records) in &logs {
        for (index, (offset, value)) in records.iter().enumerate() {
            assert_eq!(
                *offset,
                Offset(index as u64),
                "lane log {partition}/{lane}: offsets not dense and increasing"
            );
            stored_count += 1;
            let previous = stored.insert(value, (partition, lane, *offset));
            assert!(
                previous.is_none(),
                "{value} is stored twice: {previous:?} and {offset}"
            );
        }
    }
    // Every acknowledged record exactly once, where its acknowledgement said.
    let mut lost = Vec::new();
    for (value, position) in &acked {
        match stored.get(value.as_str()) {
            Some(found) => assert_eq!(
                found, position,
                "{value} acknowledged at {position:?}, stored at {found:?}"
            ),
            None => lost.push(value),
        }
    }
    assert!(
        lost.is_empty(),
        "{} acknowledged records lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    eprintln!(
        "crash suite: {kills} SIGKILLs; {} records acknowledged, {stored_count} stored (the rest were in flight at a kill and retried or not), 0 lost, 0 duplicated, {} lane logs dense",
        acked.len(),
        logs.len()
    );
}
