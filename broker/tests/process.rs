//! The `lanes-broker` binary as an operator runs it: killed with SIGKILL, stopped with
//! SIGTERM, and driven by the README quickstart as written.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lanes_broker::storage::{LaneLog, LogConfig};
use lanes_consumer::{Consumer, ConsumerConfig, StartFrom};
use lanes_producer::{Producer, ProducerConfig, ProducerRecord, TopicDefaults};
use lanes_protocol::client::{Client, ClientConfig};
use lanes_protocol::messages::{
    CommitLane, CreateTopicRequest, DescribeGroupRequest, JoinGroupRequest, OffsetCommitRequest,
    OffsetFetchRequest, PartitionItems, TopicItems,
};
use lanes_protocol::{ErrorCode, Lane, Offset, PartitionId};

mod process_support;

use process_support::{BrokerProcess, DEADLINE, fixed_listen_address, http_get, series_value};

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
    let mut sent_after_kill = 0;
    // Keep sending until 500 records are acknowledged, kill the broker then, and send a
    // few more into the dead connection: however fast or slow the machine, the kill
    // lands while records are in flight.
    for i in 0..1_000_000u32 {
        if killed {
            sent_after_kill += 1;
            if sent_after_kill > 200 {
                break;
            }
        }
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
            broker.kill(); // SIGKILL, mid-stream
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
    assert_eq!(records.len(), 10, "read once alone, once as the group: {stdout}");
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
    assert!(
        stdout.contains("group fulfilment"),
        "groups describe ran: {stdout}"
    );
    assert!(
        stdout.contains("total lag 0"),
        "the group committed everything it printed: {stdout}"
    );
    assert!(stderr.contains("\"records_acked\":5"), "{stderr}");
}

/// The directory of the workspace's binaries; the sibling tools are built by the
/// README's test command.
fn bin_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_BIN_EXE_lanes-broker"))
        .parent()
        .unwrap()
        .to_owned();
    for tool in ["lanes-produce", "lanes-consume"] {
        assert!(
            dir.join(tool).exists(),
            "{tool} is not built in {}: run the README's test command, cargo test --workspace",
            dir.display()
        );
    }
    dir
}

fn group_commit(member: &str, partition: u32, offset: u64) -> OffsetCommitRequest {
    OffsetCommitRequest {
        group: "fulfilment".into(),
        member_id: member.into(),
        topics: vec![TopicItems {
            name: "orders".into(),
            partitions: vec![PartitionItems {
                partition: PartitionId(partition),
                lanes: vec![CommitLane {
                    lane: Lane(1),
                    offset: Offset(offset),
                }],
            }],
        }],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_offsets_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProcess::start(dir.path());
    let producer = Producer::connect(producer_config(&broker.address)).await.unwrap();
    for i in 0..40 {
        let record = ProducerRecord::new("orders", format!("e{i}"))
            .partition(PartitionId(0))
            .lane(lanes_producer::LaneSelector::Index(Lane(1)));
        producer.send(record).await.unwrap();
    }
    producer.close().await.unwrap();
    let client = Client::connect(&broker.address, ClientConfig::default())
        .await
        .unwrap();
    let joined = client
        .request(&JoinGroupRequest {
            group: "fulfilment".into(),
            member_id: String::new(),
            client_id: "worker".into(),
            topics: vec!["orders".into()],
            session_timeout_ms: 30_000,
        })
        .await
        .unwrap();
    // A few commits, the last one acknowledged just before the kill.
    for offset in [10, 20, 33] {
        let response = client
            .request(&group_commit(&joined.member_id, 0, offset))
            .await
            .unwrap();
        assert_eq!(
            response.topics[0].partitions[0].lanes[0].error_code,
            ErrorCode::None
        );
    }
    broker.child.kill().unwrap();
    broker.child.wait().unwrap();

    let broker = BrokerProcess::start(dir.path());
    let output = Command::new(env!("CARGO_BIN_EXE_lanes-broker"))
        .args(["groups", "--broker", &broker.address, "describe", "fulfilment"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(text.contains("state       empty"), "{text}");
    let line = text
        .lines()
        .find(|l| {
            l.starts_with("orders") && l.contains("1:standard") && l.split_whitespace().nth(1) == Some("0")
        })
        .unwrap_or_else(|| panic!("no line for orders/0 lane 1:\n{text}"));
    let columns: Vec<&str> = line.split_whitespace().collect();
    // TOPIC PARTITION LANE OWNER COMMITTED END LAG LAG_BYTES OLDEST_MS
    assert_eq!(&columns[4..7], ["33", "40", "7"], "{line}");
    assert!(columns[7].parse::<u64>().unwrap() > 0, "lag in bytes: {line}");
    assert!(
        columns[8].parse::<i64>().unwrap() >= 0,
        "age of the oldest: {line}"
    );
    let list = Command::new(env!("CARGO_BIN_EXE_lanes-broker"))
        .args(["groups", "--broker", &broker.address, "list"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&list.stdout).contains("fulfilment"));
}

/// A child process, killed when dropped, whose stdout lines are collected.
struct Tool {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Tool {
    fn start(exe: &Path, args: &[&str]) -> Tool {
        let mut child = Command::new(exe)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn({
            let lines = Arc::clone(&lines);
            move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    lines.lock().unwrap().push(line);
                }
            }
        });
        Tool { child, lines }
    }

    /// (partition, lane, offset) of every record printed.
    fn printed(&self) -> Vec<(u64, u64, u64)> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .map(|line| {
                let record: serde_json::Value = serde_json::from_str(line).unwrap();
                let field = |name: &str| record[name].as_u64().unwrap();
                (field("partition"), field("lane"), field("offset"))
            })
            .collect()
    }
}

impl Drop for Tool {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn produce_keyed(address: &str, from: usize, count: usize) {
    let producer = Producer::connect(producer_config(address)).await.unwrap();
    for i in from..from + count {
        let record = ProducerRecord::new("orders", format!("e{i}")).key(format!("order-{i}"));
        producer.send(record).await.unwrap();
    }
    producer.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_consumers_split_a_topic_and_a_survivor_takes_over() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let client = Client::connect(&broker.address, ClientConfig::default())
        .await
        .unwrap();
    client
        .request(&CreateTopicRequest {
            name: "orders".into(),
            partitions: 4,
            lanes: vec![],
            configs: vec![],
        })
        .await
        .unwrap();
    let exe = bin_dir().join("lanes-consume");
    let args = [
        "--broker",
        &broker.address,
        "--topic",
        "orders",
        "--group",
        "fulfilment",
        "--session-timeout-ms",
        "2000",
        "--format",
        "json",
    ];
    let first = Tool::start(&exe, &args);
    let mut second = Tool::start(&exe, &args);
    let describe = DescribeGroupRequest {
        group: "fulfilment".into(),
    };
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Ok(group) = client.request(&describe).await
            && group.state == "stable"
            && group.members.len() == 2
            && group.members.iter().all(|m| m.owned[0].partitions.len() == 2)
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the two members never split the partitions"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    produce_keyed(&broker.address, 0, 400).await;
    let distinct = |tools: &[&Tool]| {
        tools
            .iter()
            .flat_map(|t| t.printed())
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    };
    wait_for("the two printed all 400 records", || {
        distinct(&[&first, &second]) == 400
    })
    .await;
    assert!(
        !first.printed().is_empty() && !second.printed().is_empty(),
        "both got a share"
    );
    assert_eq!(
        first.printed().len() + second.printed().len(),
        400,
        "nothing printed twice"
    );

    // The second dies without leaving; after its session times out the first takes
    // over its partitions, from where it committed.
    second.child.kill().unwrap();
    second.child.wait().unwrap();
    produce_keyed(&broker.address, 400, 400).await;
    wait_for("all 800 records were printed", || {
        distinct(&[&first, &second]) == 800
    })
    .await;
    let partitions: std::collections::BTreeSet<u64> = first.printed().iter().map(|r| r.0).collect();
    assert_eq!(partitions.len(), 4, "the survivor read every partition");

    // It commits after printing: the group catches up with the end of every lane log.
    let fetch = OffsetFetchRequest {
        group: "fulfilment".into(),
        partitions: vec![lanes_protocol::messages::TopicPartitions {
            topic: "orders".into(),
            partitions: (0..4).map(PartitionId).collect(),
        }],
    };
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let committed = client.request(&fetch).await.unwrap();
        let total: u64 = committed.topics[0]
            .lanes()
            .map(|(_, _, l)| l.committed.map_or(0, |o| o.0))
            .sum();
        if total == 800 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "committed {total} of 800");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_lane_metrics_are_exported() {
    let metrics_address = fixed_listen_address();
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start_with(
        dir.path(),
        &[
            "--metrics-listen",
            &metrics_address,
            "--metrics-backlog-interval-ms",
            "100",
        ],
    );
    let producer = Producer::connect(producer_config(&broker.address)).await.unwrap();
    for (lane, count) in [(0u8, 5), (2, 20)] {
        for i in 0..count {
            let record = ProducerRecord::new("orders", format!("e{i}"))
                .partition(PartitionId(0))
                .lane(lanes_producer::LaneSelector::Index(Lane(lane)));
            producer.send(record).await.unwrap();
        }
    }
    producer.close().await.unwrap();
    // A group that has read express only: bulk waits.
    let client = Client::connect(&broker.address, ClientConfig::default())
        .await
        .unwrap();
    let joined = client
        .request(&JoinGroupRequest {
            group: "fulfilment".into(),
            member_id: String::new(),
            client_id: "worker".into(),
            topics: vec!["orders".into()],
            session_timeout_ms: 30_000,
        })
        .await
        .unwrap();
    let mut commit = group_commit(&joined.member_id, 0, 5);
    commit.topics[0].partitions[0].lanes[0].lane = Lane(0);
    client.request(&commit).await.unwrap();
    // A commit from a member that does not exist: rejected, and counted.
    assert!(client.request(&group_commit("nobody", 0, 1)).await.is_err());
    read_back(&broker.address, "orders", 25).await;

    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let metrics = http_get(&metrics_address, "/metrics");
        let express = ["topic=\"orders\"", "lane=\"express\""];
        let bulk = ["topic=\"orders\"", "lane=\"bulk\""];
        let group_bulk = ["group=\"fulfilment\"", "topic=\"orders\"", "lane=\"bulk\""];
        let group_express = ["group=\"fulfilment\"", "topic=\"orders\"", "lane=\"express\""];
        let found = (
            series_value(&metrics, "lanes_produce_records_total", &express),
            series_value(&metrics, "lanes_produce_records_total", &bulk),
            series_value(&metrics, "lanes_fetch_bytes_total", &bulk),
            series_value(&metrics, "lanes_group_backlog_records", &group_bulk),
            series_value(&metrics, "lanes_group_backlog_records", &group_express),
            series_value(&metrics, "lanes_group_backlog_bytes", &group_bulk),
            series_value(&metrics, "lanes_group_oldest_unconsumed_age_seconds", &group_bulk),
        );
        let operations = (
            series_value(&metrics, "lanes_fetch_records_total", &bulk),
            series_value(&metrics, "lanes_log_segments", &bulk),
            series_value(&metrics, "lanes_log_bytes", &bulk),
            series_value(&metrics, "lanes_log_unsynced_records", &bulk),
            series_value(&metrics, "lanes_fsync_total", &[]),
        );
        if let (Some(5.0), Some(20.0), Some(fetched), Some(20.0), Some(0.0), Some(bytes), Some(age)) = found
            && let (Some(fetched_records), Some(segments), Some(log_bytes), Some(0.0), Some(fsyncs)) =
                operations
        {
            assert!(fetched > 0.0 && bytes > 0.0 && age >= 0.0, "{found:?}");
            assert!(
                metrics.contains("# HELP lanes_group_backlog_records"),
                "described"
            );
            // Every bulk record was read once; each partition has a segment; what is on
            // disk holds at least the records' values.
            assert_eq!(fetched_records, 20.0, "{operations:?}");
            assert!(
                segments >= 1.0 && log_bytes >= 20.0 * 2.0 && fsyncs >= 1.0,
                "{operations:?}"
            );
            let at_least_one = |name: &str, labels: &[&str]| {
                let value = series_value(&metrics, name, labels);
                assert!(
                    value.is_some_and(|v| v >= 1.0),
                    "{name} {labels:?}: {value:?}\n{metrics}"
                );
            };
            at_least_one("lanes_requests_total", &["api=\"produce\""]);
            at_least_one("lanes_requests_total", &["api=\"fetch\""]);
            at_least_one("lanes_request_duration_seconds_count", &["api=\"produce\""]);
            at_least_one("lanes_fsync_duration_seconds_count", &[]);
            at_least_one("lanes_produce_durability_wait_seconds_count", &[]);
            assert_eq!(
                series_value(&metrics, "lanes_delete_pending_bytes", &[]),
                Some(0.0),
                "{metrics}"
            );
            at_least_one("lanes_group_rebalances_total", &["group=\"fulfilment\""]);
            at_least_one("lanes_connections ", &[]);
            at_least_one("lanes_connections_total", &[]);
            at_least_one(
                "lanes_rejected_total",
                &["api=\"offset_commit\"", "code=\"UNKNOWN_MEMBER\""],
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "metrics never showed up: {found:?}\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `lanes-broker --print-config` with `env` set and every other `LANES_` variable of the
/// test's own environment removed; its output, or its error.
fn print_config(args: &[&str], env: &[(&str, &str)]) -> Result<lanes_broker::Settings, String> {
    let mut command = Command::new(env!("CARGO_BIN_EXE_lanes-broker"));
    for (name, _) in std::env::vars().filter(|(name, _)| name.starts_with("LANES_")) {
        command.env_remove(name);
    }
    let output = command
        .args(args)
        .arg("--print-config")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    Ok(toml::from_str(&String::from_utf8_lossy(&output.stdout)).unwrap())
}

/// Each setting comes from the first source that sets it: flag, then environment, then
/// file, then default; and a bad value stops the start with an error naming its key.
#[test]
fn configuration_sources_take_precedence_and_bad_values_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lanes.toml");
    std::fs::write(
        &file,
        "segment_bytes_max = 1000000\nfsync_interval_ms = 30\nconnections_max = 300\n",
    )
    .unwrap();
    let file = file.to_str().unwrap();
    let settings = print_config(
        &["--config", file, "--segment-bytes-max", "3000000"],
        &[
            ("LANES_SEGMENT_BYTES_MAX", "2000000"),
            ("LANES_FSYNC_INTERVAL_MS", "20"),
        ],
    )
    .unwrap();
    let defaults = lanes_broker::Settings::default();
    assert_eq!(
        settings.segment_bytes_max, 3_000_000,
        "the flag beats env and file"
    );
    assert_eq!(settings.fsync_interval_ms, 20, "the environment beats the file");
    assert_eq!(settings.connections_max, 300, "the file beats the default");
    assert_eq!(
        settings.retention_check_ms, defaults.retention_check_ms,
        "the default"
    );
    assert_ne!(defaults.connections_max, 300);

    // Bad values, from each source: the error names the setting.
    let flag = print_config(&["--fsync", "sometimes"], &[]).unwrap_err();
    assert!(flag.contains("fsync"), "{flag}");
    let env = print_config(&[], &[("LANES_CONNECTIONS_MAX", "many")]).unwrap_err();
    assert!(
        env.contains("connections-max") || env.contains("connections_max"),
        "{env}"
    );
    std::fs::write(dir.path().join("bad.toml"), "segment_bytes_max = \"big\"\n").unwrap();
    let bad = dir.path().join("bad.toml");
    let in_file = print_config(&["--config", bad.to_str().unwrap()], &[]).unwrap_err();
    assert!(in_file.contains("segment_bytes_max"), "{in_file}");
    let invalid = print_config(&["--fsync", "interval", "--fsync-interval-ms", "0"], &[]).unwrap_err();
    assert!(invalid.contains("fsync_interval_ms"), "{invalid}");
}

/// A busy lane log past its retention overwrites the files of the segments retention
/// deletes: the broker counts them, and what a consumer reads back is the newest records,
/// in order, with no old batch among them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_lane_log_past_its_retention_recycles_segment_files() {
    let metrics_address = fixed_listen_address();
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start_with(
        dir.path(),
        &[
            "--metrics-listen",
            &metrics_address,
            "--segment-bytes-max",
            "131072",
            "--batch-bytes-max",
            "65536",
            "--retention-bytes",
            "262144",
            "--retention-check-ms",
            "50",
        ],
    );
    let mut config = producer_config(&broker.address);
    config.batch_bytes_max = 16 * 1024;
    let producer = Producer::connect(config).await.unwrap();
    let value = |i: usize| format!("r{i:08}{}", "x".repeat(990)).into_bytes();
    let recycled = || {
        series_value(
            &http_get(&metrics_address, "/metrics"),
            "lanes_segments_recycled_total",
            &[],
        )
    };
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut sent = 0;
    // Rounds of about 200 KB, with a retention pass or two between them, until a roll
    // has taken a recycled file.
    while recycled().is_none_or(|count| count < 1.0) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no segment file recycled after {sent} records"
        );
        let mut deliveries = Vec::new();
        for i in sent..sent + 200 {
            let record = ProducerRecord::new("orders", value(i))
                .partition(PartitionId(0))
                .lane(lanes_producer::LaneSelector::Index(Lane(0)));
            deliveries.push(producer.send(record).await.unwrap());
        }
        for delivery in deliveries {
            delivery_ok(delivery).await;
        }
        sent += 200;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    producer.close().await.unwrap();

    let records = read_back(&broker.address, "orders", 1).await;
    let mut kept: Vec<(Offset, Vec<u8>)> = records
        .into_iter()
        .filter(|((partition, lane, _), _)| (*partition, *lane) == (0, 0))
        .map(|((_, _, offset), value)| (offset, value))
        .collect();
    kept.sort();
    assert!(kept.len() < sent, "retention deleted some");
    let first = sent - kept.len();
    for (i, (offset, got)) in kept.iter().enumerate() {
        assert_eq!(offset.0 as usize, first + i);
        assert!(*got == value(first + i), "offset {offset} holds another record");
    }
}
