//! The `lanes-broker` binary as an operator runs it: killed with SIGKILL, stopped with
//! SIGTERM, and driven by the README quickstart as written.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lanes_broker::storage::{LaneLog, LogConfig};
use lanes_consumer::{Consumer, ConsumerConfig, StartFrom};
use lanes_producer::{Producer, ProducerConfig, ProducerRecord, TopicDefaults};
use lanes_protocol::Offset;

const DEADLINE: Duration = Duration::from_secs(60);

/// A broker process on 127.0.0.1:0; killed when dropped.
struct BrokerProcess {
    child: Child,
    address: String,
    log: Arc<Mutex<String>>,
}

impl BrokerProcess {
    fn start(data_dir: &Path) -> BrokerProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_lanes-broker"))
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start lanes-broker");
        let log = Arc::new(Mutex::new(String::new()));
        let (address_tx, address_rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().expect("piped stderr");
        std::thread::spawn({
            let log = Arc::clone(&log);
            move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if line.contains(" listening ")
                        && let Some(address) = line.split("address=").nth(1)
                    {
                        let _ = address_tx.send(address.split_whitespace().next().unwrap().to_owned());
                    }
                    log.lock().unwrap().push_str(&(line + "\n"));
                }
            }
        });
        // Owned by the guard before anything can fail: a panicking test kills it too.
        let mut broker = BrokerProcess {
            child,
            address: String::new(),
            log,
        };
        broker.address = address_rx.recv_timeout(DEADLINE).unwrap_or_else(|_| {
            panic!(
                "the broker did not start listening:\n{}",
                broker.log.lock().unwrap()
            )
        });
        broker
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit; returns whether it exited successfully.
    fn wait(&mut self) -> bool {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.success();
            }
            assert!(
                Instant::now() < deadline,
                "the broker did not exit:\n{}",
                self.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn producer_config(address: &str) -> ProducerConfig {
    let mut config = ProducerConfig::new(address);
    config.create_topics = Some(TopicDefaults {
        partitions: 3,
        lanes: vec!["express".into(), "standard".into(), "bulk".into()],
    });
    config.delivery_timeout = Duration::from_secs(3);
    config.retry_backoff = Duration::from_millis(50);
    config
}

/// Every record of `topic` as (partition, lane, offset) → value.
async fn read_back(
    address: &str,
    topic: &str,
    at_least: usize,
) -> std::collections::HashMap<(u32, u8, Offset), Vec<u8>> {
    let mut consumer = Consumer::connect(ConsumerConfig::new(address)).await.unwrap();
    consumer
        .assign(topic, None, None, StartFrom::Earliest)
        .await
        .unwrap();
    let mut records = std::collections::HashMap::new();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let batch = consumer.poll().await.unwrap();
        if batch.is_empty() && records.len() >= at_least {
            return records;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "read back only {} records",
            records.len()
        );
        for record in batch {
            let previous = records.insert(
                (record.partition.0, record.lane.0, record.offset),
                record.value.to_vec(),
            );
            assert!(previous.is_none(), "an offset came back twice");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_records_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProcess::start(dir.path());
    let producer = Producer::connect(producer_config(&broker.address)).await.unwrap();
    let acked = Arc::new(Mutex::new(Vec::new()));
    let mut waits = Vec::new();
    let mut killed = false;
    for i in 0..5_000u32 {
        let value = format!("order-event-{i}");
        let record = ProducerRecord::new("orders", value.clone())
            .key(format!("order-{}", i % 50))
            .lane(lanes_producer::LaneSelector::Index(lanes_protocol::Lane(
                (i % 3) as u8,
            )));
        let Ok(delivery) = producer.send(record).await else {
            break;
        };
        waits.push(tokio::spawn({
            let acked = Arc::clone(&acked);
            async move {
                if let Ok(metadata) = delivery.wait().await {
                    let key = (metadata.partition.0, metadata.lane.0, metadata.offset.unwrap());
                    acked.lock().unwrap().push((key, value.into_bytes()));
                }
            }
        }));
        if !killed && acked.lock().unwrap().len() >= 500 {
            broker.child.kill().unwrap(); // SIGKILL, mid-stream
            broker.child.wait().unwrap();
            killed = true;
        }
        if i % 50 == 0 {
            tokio::task::yield_now().await;
        }
    }
    assert!(killed, "the broker was killed while records were in flight");
    for wait in waits {
        wait.await.unwrap();
    }
    drop(producer);
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 500);

    let broker = BrokerProcess::start(dir.path());
    let stored = read_back(&broker.address, "orders", acked.len()).await;
    for (key, value) in &acked {
        assert_eq!(
            stored.get(key),
            Some(value),
            "acknowledged record {key:?} is missing or changed"
        );
    }
    // Retries across the kill appended nothing twice.
    let mut values: Vec<&Vec<u8>> = stored.values().collect();
    let stored_count = values.len();
    values.sort();
    values.dedup();
    assert_eq!(values.len(), stored_count, "a record is stored twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_work_and_shuts_down_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProcess::start(dir.path());
    let producer = Producer::connect(producer_config(&broker.address)).await.unwrap();
    // Half acknowledged before SIGTERM, the other half sent while it arrives: what
    // was acknowledged, before or during the shutdown, must be stored.
    let mut acked = Vec::new();
    let mut deliveries = Vec::new();
    for i in 0..3_000 {
        if i == 1_500 {
            for (i, delivery) in deliveries.drain(..) {
                let metadata: lanes_producer::RecordMetadata = delivery_ok(delivery).await;
                acked.push((metadata, format!("e{i}")));
            }
            broker.signal("TERM");
        }
        match producer
            .send(ProducerRecord::new("orders", format!("e{i}")))
            .await
        {
            Ok(delivery) => deliveries.push((i, delivery)),
            Err(_) => break,
        }
    }
    for (i, delivery) in deliveries {
        if let Ok(metadata) = delivery.wait().await {
            acked.push((metadata, format!("e{i}")));
        }
    }
    drop(producer);
    assert!(
        broker.wait(),
        "exit status 0 after SIGTERM:\n{}",
        broker.log.lock().unwrap()
    );
    assert!(broker.log.lock().unwrap().contains("shut down cleanly"));
    assert!(acked.len() >= 1_500);
    // Every lane log recorded a clean shutdown: the next start checks nothing.
    let lane_dir: PathBuf = dir.path().join("topics/orders/0/1");
    let log = LaneLog::open(lane_dir, LogConfig::default()).unwrap();
    assert!(log.recovery_report().clean_shutdown);
    assert_eq!(log.recovery_report().checked_bytes, 0);
    drop(log);
    let broker = BrokerProcess::start(dir.path());
    let stored = read_back(&broker.address, "orders", acked.len()).await;
    for (metadata, value) in &acked {
        let key = (metadata.partition.0, metadata.lane.0, metadata.offset.unwrap());
        assert_eq!(
            stored.get(&key).map(Vec::as_slice),
            Some(value.as_bytes()),
            "acknowledged {value}"
        );
    }
}

async fn delivery_ok(delivery: lanes_producer::Delivery) -> lanes_producer::RecordMetadata {
    delivery.wait().await.expect("acknowledged before the shutdown")
}

/// The README's quickstart block, run as written against a broker on an ephemeral port.
#[test]
fn readme_quickstart_works_as_written() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).unwrap();
    let block = readme
        .split("<!-- quickstart -->")
        .nth(1)
        .and_then(|rest| rest.split("<!-- /quickstart -->").next())
        .expect("a quickstart block in the README");
    let script: String = block
        .lines()
        .filter(|line| !line.starts_with("```") && !line.starts_with("cargo "))
        .collect::<Vec<_>>()
        .join("\n");
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_lanes-broker"))
        .parent()
        .unwrap()
        .to_owned();
    for tool in ["lanes-produce", "lanes-consume"] {
        assert!(
            bin_dir.join(tool).exists(),
            "{tool} is not built in {}: run the README's test command, cargo test --workspace",
            bin_dir.display()
        );
    }
    let script = script.replace("./target/release/", &format!("{}/", bin_dir.display()));

    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(&dir.path().join("data"));
    let output = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(dir.path())
        .env("LANES_BROKER", &broker.address)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "quickstart failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("created topic orders: 4 partitions, lanes express,standard,bulk"));
    let records: Vec<serde_json::Value> = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 5, "{stdout}");
    for record in &records {
        let value: serde_json::Value = serde_json::from_str(record["value"].as_str().unwrap()).unwrap();
        assert_eq!(
            record["lane_name"], value["class"],
            "each event is in its class's lane"
        );
        assert_eq!(record["key"], value["order"]);
    }
    let events_of_1001: Vec<&str> = records
        .iter()
        .filter(|r| r["key"] == "o-1001")
        .map(|r| r["value"].as_str().unwrap())
        .collect();
    assert!(events_of_1001[0].contains("placed") && events_of_1001[1].contains("paid"));
    assert!(stdout.contains("PARTITION  LANE"), "topics describe ran");
    assert!(stderr.contains("\"records_acked\":5"), "{stderr}");
}
