//! The fulfilment worker against a real broker: per-key order at concurrency 64 with
//! different keys overlapping, a poison record dead-lettered after its retries, and
//! everything committed when it stops.

mod server_support;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lanes_consumer::{Consumer, ConsumerConfig, ConsumerRecord, StartFrom, Worker, WorkerConfig};
use lanes_producer::{LaneSelector, Producer, ProducerConfig, ProducerRecord};
use lanes_protocol::client::{Client, ClientConfig};
use lanes_protocol::messages::{DescribeGroupRequest, OffsetFetchRequest, TopicPartitions};
use lanes_protocol::{Lane, PartitionId};
use server_support::{TestBroker, create_topic};

const DEADLINE: Duration = Duration::from_secs(60);
const KEYS: usize = 40;
const EVENTS_PER_KEY: usize = 25;
/// Handlers that must be running at once before any of them finishes.
const OVERLAP: usize = 8;

#[derive(Default)]
struct Observed {
    /// Per key, the event numbers in the order they were handled.
    order: HashMap<String, Vec<usize>>,
    /// Keys with a handler running now.
    running: HashSet<String>,
    /// A key whose handler started while another of the same key was running.
    overlapping_key: Option<String>,
    poison_attempts: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_keeps_key_order_under_concurrency_and_dead_letters_poison() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), |_| {}).await;
    let address = broker.address();
    let admin = Client::connect(&address, ClientConfig::default()).await.unwrap();
    create_topic(&address, "orders", 4).await;

    // Each key's events in order, interleaved across keys; a poison record half way,
    // with more events of its key and its lane log after it.
    let producer = Producer::connect(ProducerConfig::new(&address)).await.unwrap();
    let mut poison_partition = None;
    for event in 0..EVENTS_PER_KEY {
        for key in 0..KEYS {
            let record = ProducerRecord::new("orders", format!("{event}"))
                .key(format!("order-{key}"))
                .lane(LaneSelector::Index(Lane((key % 3) as u8)));
            producer.send(record).await.unwrap();
        }
        if event == EVENTS_PER_KEY / 2 {
            let poison = ProducerRecord::new("orders", "poison")
                .key("order-0")
                .lane(LaneSelector::Index(Lane(0)));
            poison_partition = Some(
                producer
                    .send(poison)
                    .await
                    .unwrap()
                    .wait()
                    .await
                    .unwrap()
                    .partition,
            );
        }
    }
    producer.close().await.unwrap();
    let total_good = KEYS * EVENTS_PER_KEY;

    let observed = Arc::new(Mutex::new(Observed::default()));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let in_flight_max = Arc::new(AtomicUsize::new(0));
    let handled = Arc::new(AtomicUsize::new(0));
    let handler = {
        let (observed, in_flight, in_flight_max, handled) = (
            Arc::clone(&observed),
            Arc::clone(&in_flight),
            Arc::clone(&in_flight_max),
            Arc::clone(&handled),
        );
        move |record: ConsumerRecord| {
            let (observed, in_flight, in_flight_max, handled) = (
                Arc::clone(&observed),
                Arc::clone(&in_flight),
                Arc::clone(&in_flight_max),
                Arc::clone(&handled),
            );
            async move {
                let key = String::from_utf8(record.key.clone().unwrap().to_vec()).unwrap();
                let value = String::from_utf8(record.value.to_vec()).unwrap();
                {
                    let mut observed = observed.lock().unwrap();
                    if !observed.running.insert(key.clone()) {
                        observed.overlapping_key.get_or_insert(key.clone());
                    }
                }
                let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                in_flight_max.fetch_max(now, Ordering::SeqCst);
                // Hold the first handlers until several run at once: proof that records
                // of different keys overlap in time (fails after the deadline if not).
                let deadline = tokio::time::Instant::now() + DEADLINE;
                while in_flight_max.load(Ordering::SeqCst) < OVERLAP && tokio::time::Instant::now() < deadline
                {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                tokio::time::sleep(Duration::from_micros((record.offset.0 % 7) * 300)).await;
                in_flight.fetch_sub(1, Ordering::SeqCst);
                let mut observed = observed.lock().unwrap();
                observed.running.remove(&key);
                if value == "poison" {
                    observed.poison_attempts += 1;
                    return Err(format!("cannot fulfil {key}: poison"));
                }
                observed
                    .order
                    .entry(key)
                    .or_default()
                    .push(value.parse().unwrap());
                handled.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        }
    };

    let mut config = WorkerConfig::new(&address, "fulfilment", &["orders"]);
    config.retries_max = 2;
    config.retry_backoff = Duration::from_millis(10);
    config.commit_interval = Duration::from_millis(100);
    let worker = Worker::connect(config).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(worker.run_until(handler, 64, async move {
        let _ = stopped.await;
    }));
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while handled.load(Ordering::SeqCst) < total_good || observed.lock().unwrap().poison_attempts < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "handled only {}",
            handled.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The dead letter is written before the poison record counts as done.
    let dead = read_dead_letters(&address).await;
    stop.send(()).unwrap();
    let stats = running.await.unwrap().unwrap();

    let observed = std::mem::take(&mut *observed.lock().unwrap());
    assert_eq!(
        observed.overlapping_key, None,
        "two records of one key ran at once"
    );
    for (key, order) in &observed.order {
        assert_eq!(
            *order,
            (0..EVENTS_PER_KEY).collect::<Vec<_>>(),
            "{key} handled out of order"
        );
    }
    assert_eq!(observed.order.len(), KEYS);
    assert!(
        in_flight_max.load(Ordering::SeqCst) >= OVERLAP,
        "records of different keys overlapped"
    );
    assert!(
        in_flight_max.load(Ordering::SeqCst) <= 64,
        "concurrency is bounded"
    );
    assert_eq!(observed.poison_attempts, 3, "one attempt and two retries");
    assert_eq!(
        (stats.handled, stats.dead_lettered, stats.retries),
        (total_good as u64, 1, 2)
    );

    assert_eq!(dead.len(), 1);
    let (value, headers) = &dead[0];
    assert_eq!(value, "poison");
    assert!(headers["lanes.dlq.error"].contains("cannot fulfil order-0: poison"));
    assert_eq!(headers["lanes.dlq.attempts"], "3");
    assert_eq!(headers["lanes.dlq.topic"], "orders");
    assert_eq!(
        headers["lanes.dlq.partition"],
        poison_partition.unwrap().0.to_string()
    );
    assert_eq!(headers["lanes.dlq.lane"], "0");

    // Everything was done, so everything is committed.
    let committed = admin
        .request(&OffsetFetchRequest {
            group: "fulfilment".into(),
            partitions: vec![TopicPartitions {
                topic: "orders".into(),
                partitions: (0..4).map(PartitionId).collect(),
            }],
        })
        .await
        .unwrap();
    let mut total_committed = 0;
    for (_, _, lane) in committed.topics[0].lanes() {
        total_committed += lane.committed.map_or(0, |o| o.0);
    }
    assert_eq!(total_committed as usize, total_good + 1);
    broker.stop().await;
}

async fn read_dead_letters(address: &str) -> Vec<(String, HashMap<String, String>)> {
    let mut consumer = Consumer::connect(ConsumerConfig::new(address)).await.unwrap();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    // The worker creates the topic with its first dead letter.
    while consumer
        .assign("orders.dlq", None, None, StartFrom::Earliest)
        .await
        .is_err()
    {
        assert!(tokio::time::Instant::now() < deadline, "no dead-letter topic");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    loop {
        let records = consumer.poll().await.unwrap();
        if !records.is_empty() {
            return records
                .into_iter()
                .map(|r| {
                    let text = |b: &[u8]| String::from_utf8(b.to_vec()).unwrap();
                    let headers = r
                        .headers
                        .iter()
                        .map(|h| (text(&h.key), h.value.as_deref().map(text).unwrap_or_default()))
                        .collect();
                    (text(&r.value), headers)
                })
                .collect();
        }
        assert!(tokio::time::Instant::now() < deadline, "no dead letter");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_worker_takes_a_share_without_losing_records() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), |_| {}).await;
    let address = broker.address();
    let admin = Client::connect(&address, ClientConfig::default()).await.unwrap();
    create_topic(&address, "orders", 4).await;
    const RECORDS: usize = 2000;
    let produce = |range: std::ops::Range<usize>| {
        let address = address.clone();
        async move {
            let producer = Producer::connect(ProducerConfig::new(&address)).await.unwrap();
            for i in range {
                let record = ProducerRecord::new("orders", format!("{i}"))
                    .key(format!("order-{}", i % 100))
                    .lane(LaneSelector::Index(Lane((i % 3) as u8)));
                producer.send(record).await.unwrap();
            }
            producer.close().await.unwrap();
        }
    };
    produce(0..RECORDS / 2).await;

    // (worker, value) of every handling.
    let handled: Arc<Mutex<Vec<(usize, usize)>>> = Arc::default();
    let start = |id: usize| {
        let (address, handled) = (address.clone(), Arc::clone(&handled));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut config = WorkerConfig::new(&address, "fulfilment", &["orders"]);
            config.group.session_timeout = Duration::from_millis(3000);
            config.commit_interval = Duration::from_millis(50);
            let worker = Worker::connect(config).await.unwrap();
            let handler = move |record: ConsumerRecord| {
                let handled = Arc::clone(&handled);
                async move {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    let value: usize = std::str::from_utf8(&record.value).unwrap().parse().unwrap();
                    handled.lock().unwrap().push((id, value));
                    Ok::<(), String>(())
                }
            };
            worker
                .run_until(handler, 16, async move {
                    let _ = stopped.await;
                })
                .await
                .unwrap()
        });
        (stop, task)
    };
    let distinct = || {
        handled
            .lock()
            .unwrap()
            .iter()
            .map(|(_, v)| *v)
            .collect::<HashSet<_>>()
            .len()
    };
    let first = start(0);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while distinct() < 300 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The second joins while the first is busy: partitions move mid-stream.
    let second = start(1);
    let describe = DescribeGroupRequest {
        group: "fulfilment".into(),
    };
    loop {
        let group = admin.request(&describe).await.unwrap();
        if group.state == "stable"
            && group.members.len() == 2
            && group
                .members
                .iter()
                .all(|m| m.owned.first().is_some_and(|t| t.partitions.len() == 2))
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the workers never split the partitions"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    produce(RECORDS / 2..RECORDS).await;
    while distinct() < RECORDS {
        assert!(
            tokio::time::Instant::now() < deadline,
            "handled {} of {RECORDS}",
            distinct()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (stop, task) in [first, second] {
        stop.send(()).unwrap();
        task.await.unwrap();
    }
    let by_second = handled.lock().unwrap().iter().filter(|(id, _)| *id == 1).count();
    assert!(by_second > 0, "the second worker took a share");
    let committed = admin
        .request(&OffsetFetchRequest {
            group: "fulfilment".into(),
            partitions: vec![TopicPartitions {
                topic: "orders".into(),
                partitions: (0..4).map(PartitionId).collect(),
            }],
        })
        .await
        .unwrap();
    let total: u64 = committed.topics[0]
        .lanes()
        .map(|(_, _, l)| l.committed.map_or(0, |o| o.0))
        .sum();
    assert_eq!(total as usize, RECORDS, "everything handled is committed");
    broker.stop().await;
}

/// Bulk handlers that do not finish fill every slot they may take; an express record
/// still starts, in the slot kept for the first lane (kept since an express record
/// before them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_express_record_starts_while_bulk_holds_every_other_slot() {
    const CONCURRENCY: usize = 16;
    const BULK: usize = 2 * CONCURRENCY;
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), |_| {}).await;
    let address = broker.address();
    create_topic(&address, "orders", 1).await;
    let producer = Producer::connect(ProducerConfig::new(&address)).await.unwrap();
    let express = |n: usize| {
        ProducerRecord::new("orders", "express")
            .key(format!("express-{n}"))
            .lane(LaneSelector::Index(Lane(0)))
    };

    let bulk_running = Arc::new(AtomicUsize::new(0));
    let bulk_running_max = Arc::new(AtomicUsize::new(0));
    let bulk_handled = Arc::new(AtomicUsize::new(0));
    // Express records handled.
    let (express_done, express_seen) = tokio::sync::watch::channel(0usize);
    let mut express_waited = express_done.subscribe();
    let express_done = Arc::new(express_done);
    let handler = {
        let (bulk_running, bulk_running_max, bulk_handled) = (
            Arc::clone(&bulk_running),
            Arc::clone(&bulk_running_max),
            Arc::clone(&bulk_handled),
        );
        move |record: ConsumerRecord| {
            let (bulk_running, bulk_running_max, bulk_handled) = (
                Arc::clone(&bulk_running),
                Arc::clone(&bulk_running_max),
                Arc::clone(&bulk_handled),
            );
            let (express_done, mut express_seen) = (Arc::clone(&express_done), express_seen.clone());
            async move {
                if record.lane == Lane(0) {
                    express_done.send_modify(|done| *done += 1);
                    return Ok::<(), String>(());
                }
                // A slow bulk order: done only once the second express one is (or at
                // the deadline, so that a failing run ends).
                let now = bulk_running.fetch_add(1, Ordering::SeqCst) + 1;
                bulk_running_max.fetch_max(now, Ordering::SeqCst);
                let _ = tokio::time::timeout(DEADLINE, express_seen.wait_for(|done| *done >= 2)).await;
                bulk_running.fetch_sub(1, Ordering::SeqCst);
                bulk_handled.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        }
    };
    let mut config = WorkerConfig::new(&address, "fulfilment", &["orders"]);
    config.urgent_slots_reserved = Some(1);
    let worker = Worker::connect(config).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(worker.run_until(handler, CONCURRENCY, async move {
        let _ = stopped.await;
    }));
    // The first express record: from now on the worker keeps a slot for its lane.
    producer.send(express(0)).await.unwrap().wait().await.unwrap();
    tokio::time::timeout(DEADLINE, express_waited.wait_for(|done| *done >= 1))
        .await
        .expect("the first express record was handled")
        .unwrap();
    for order in 0..BULK {
        let record = ProducerRecord::new("orders", "bulk")
            .key(format!("bulk-{order}"))
            .lane(LaneSelector::Index(Lane(2)));
        producer.send(record).await.unwrap();
    }
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while bulk_running.load(Ordering::SeqCst) < CONCURRENCY - 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the bulk records did not start"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    producer.send(express(1)).await.unwrap().wait().await.unwrap();
    let started = tokio::time::Instant::now();
    tokio::time::timeout(DEADLINE, express_waited.wait_for(|done| *done >= 2))
        .await
        .expect("the express record was handled")
        .unwrap();
    // Had a bulk handler finished first, the express record would have waited the
    // whole deadline for it.
    assert!(started.elapsed() < DEADLINE / 2);
    assert_eq!(
        bulk_running_max.load(Ordering::SeqCst),
        CONCURRENCY - 1,
        "bulk took the slot kept for express"
    );

    while bulk_handled.load(Ordering::SeqCst) < BULK {
        assert!(
            tokio::time::Instant::now() < deadline + DEADLINE,
            "bulk did not finish"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.send(()).unwrap();
    let stats = running.await.unwrap().unwrap();
    assert_eq!(stats.handled as usize, BULK + 2);
    producer.close().await.unwrap();
    broker.stop().await;
}
