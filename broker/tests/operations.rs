//! Operations: retention in the background under load, per-topic overrides, and a data
//! directory on a full filesystem.

mod server_support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use lanes_consumer::{Consumer, ConsumerConfig, StartFrom};
use lanes_producer::{Producer, ProducerConfig, ProducerRecord};
use lanes_protocol::client::{Client, ClientConfig, ClientError};
use lanes_protocol::messages::{
    Acks, FetchLane, FetchRequest, PartitionItems, ProduceLane, ProduceRequest, TopicItems,
};
use lanes_protocol::record_batch::ProducerStamp;
use lanes_protocol::{BatchLimits, ErrorCode, Lane, Offset, PartitionId, RecordBatchBuilder};
use server_support::TestBroker;

/// Generous: the machine may be busy. Tests wait for conditions, not for time.
const DEADLINE: Duration = Duration::from_secs(60);

async fn create(
    address: &str,
    name: &str,
    lanes: &[&str],
    configs: &[(&str, &str)],
) -> Result<(), ClientError> {
    let client = Client::connect(address, ClientConfig::default()).await?;
    server_support::create_topic_with(&client, name, 1, lanes, configs).await
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.retain(|path| path.extension().is_some_and(|e| e == "log"));
    files.sort();
    files
}

/// Retention runs in the background: old segments go while a producer and a consumer
/// keep going, and both keep making progress afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_old_segments_while_produce_and_fetch_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), |s| {
        s.retention_check_ms = 50;
        s.batch_bytes_max = 64 * 1024;
    })
    .await;
    let address = broker.address();
    let configs = [("segment_bytes_max", "131072"), ("retention_bytes", "262144")];
    create(&address, "events", &["events"], &configs).await.unwrap();
    let lane_dir = dir.path().join("topics").join("events").join("0").join("0");

    let stop = Arc::new(AtomicBool::new(false));
    let (produced, consumed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let producing = tokio::spawn({
        let (address, stop, produced) = (address.clone(), Arc::clone(&stop), Arc::clone(&produced));
        async move {
            let mut config = ProducerConfig::new(&address);
            config.batch_bytes_max = 16 * 1024;
            let producer = Producer::connect(config).await.unwrap();
            while !stop.load(Ordering::Relaxed) {
                let delivery = producer
                    .send(ProducerRecord::new("events", vec![b'x'; 1000]))
                    .await
                    .unwrap();
                delivery.wait().await.unwrap();
                produced.fetch_add(1, Ordering::Relaxed);
            }
            producer.close().await.unwrap();
        }
    });
    let consuming = tokio::spawn({
        let (address, stop, consumed) = (address.clone(), Arc::clone(&stop), Arc::clone(&consumed));
        async move {
            let mut consumer = Consumer::connect(ConsumerConfig::new(&address)).await.unwrap();
            consumer
                .assign("events", None, None, StartFrom::Latest)
                .await
                .unwrap();
            while !stop.load(Ordering::Relaxed) {
                let records = consumer.poll_timeout(Duration::from_millis(100)).await.unwrap();
                consumed.fetch_add(records.len() as u64, Ordering::Relaxed);
            }
        }
    });

    // Wait until the first segment is gone: retention ran under load.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let files = segment_files(&lane_dir);
        let first = files
            .first()
            .and_then(|f| f.file_stem())
            .map(|s| s.to_string_lossy().into_owned());
        if first.is_some_and(|name| name != format!("{:020}", 0)) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no segment was deleted: {files:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Both sides keep going after it.
    let (produced_then, consumed_then) = (produced.load(Ordering::Relaxed), consumed.load(Ordering::Relaxed));
    loop {
        if produced.load(Ordering::Relaxed) > produced_then + 300
            && consumed.load(Ordering::Relaxed) > consumed_then + 300
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "produce or fetch stalled after retention"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    producing.await.unwrap();
    consuming.await.unwrap();
    // Retention keeps the log near its bound: 256 KiB in 128 KiB segments, plus the
    // active one and whatever arrived since the last check.
    let files = segment_files(&lane_dir);
    assert!(files.len() <= 6, "{} segments: {files:?}", files.len());
    broker.stop().await;
}

/// Per-topic segment size and fsync override the broker's; bad values are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_override_segment_size_and_fsync() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), |s| {
        s.batch_bytes_max = 16 * 1024;
        s.writeback_bytes = 16 * 1024;
    })
    .await;
    let address = broker.address();
    create(
        &address,
        "small",
        &["a"],
        &[
            ("segment_bytes_max", "32768"),
            ("fsync", "never"),
            ("durability", "written"),
        ],
    )
    .await
    .unwrap();
    let mut config = ProducerConfig::new(&address);
    config.batch_bytes_max = 8 * 1024;
    let producer = Producer::connect(config).await.unwrap();
    for _ in 0..100 {
        producer
            .send(ProducerRecord::new("small", vec![b'x'; 1000]))
            .await
            .unwrap();
    }
    producer.flush().await.unwrap();
    producer.close().await.unwrap();
    let lane_dir = dir.path().join("topics").join("small").join("0").join("0");
    assert!(segment_files(&lane_dir).len() >= 3, "100 KB in 32 KiB segments");
    // The broker fsyncs always; this topic never did.
    let topic = broker.broker.topics.get("small").unwrap();
    let (_, _, handle) = topic.logs().next().unwrap();
    // Instead, the fsync threads started its writeback every 16 KiB.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while handle.log.stats().writeback_starts == 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stats = handle.log.stats();
    assert!(stats.writeback_starts > 0, "{stats:?}");
    assert_eq!(stats.sync_rounds, 0, "{stats:?}");
    assert_eq!(stats.durable_offset, Offset(0), "{stats:?}");
    assert_eq!(stats.next_offset, Offset(100), "{stats:?}");
    // Metadata shows the overrides.
    let client = Client::connect(&address, ClientConfig::default()).await.unwrap();
    let metadata = client
        .request(&lanes_protocol::messages::MetadataRequest {
            topics: vec!["small".into()],
        })
        .await
        .unwrap();
    let configs = &metadata.topics[0].configs;
    let value = |key: &str| configs.iter().find(|c| c.key == key).map(|c| c.value.clone());
    assert_eq!(value("segment_bytes_max").as_deref(), Some("32768"));
    assert_eq!(value("fsync").as_deref(), Some("never"));
    let bad_ones: [&[(&str, &str)]; 4] = [
        &[("fsync", "sometimes")],
        &[("segment_bytes_max", "1000")],
        &[("fsync_interval_ms", "0")],
        // fsync never cannot keep a durable promise: refused rather than weakened.
        &[("fsync", "never"), ("durability", "durable")],
    ];
    for bad in bad_ones {
        let refused = create(&address, "bad", &["a"], bad).await;
        assert!(
            matches!(
                refused,
                Err(ClientError::Broker {
                    code: ErrorCode::InvalidConfig,
                    ..
                })
            ),
            "{bad:?}: {refused:?}"
        );
    }
    broker.stop().await;
}

/// A tmpfs of `bytes` mounted on a fresh directory, unmounted on drop; `None` without
/// the privilege to mount.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(bytes: u64) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().ok()?;
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        mounted.then_some(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(self.dir.path()).status();
    }
}

fn batch(tag: u32, value_bytes: usize) -> bytes::Bytes {
    let mut builder = RecordBatchBuilder::new(BatchLimits::default());
    let value = vec![(tag % 251) as u8; value_bytes];
    builder.push(0, Some(&tag.to_be_bytes()), &value, &[]).unwrap();
    builder.finish(ProducerStamp::NONE)
}

/// One batch to `full` partition 0 lane 0; the lane result's code and base offset.
async fn produce_one(client: &Client, tag: u32) -> (ErrorCode, Offset) {
    let request = ProduceRequest {
        acks: Acks::Durable,
        timeout_ms: 30_000,
        topics: vec![TopicItems {
            name: "full".into(),
            partitions: vec![PartitionItems {
                partition: PartitionId(0),
                lanes: vec![ProduceLane {
                    lane: Lane(0),
                    batch: batch(tag, 64 * 1024),
                }],
            }],
        }],
    };
    let response = client.request(&request).await.unwrap();
    let lane = &response.topics[0].partitions[0].lanes[0];
    (lane.error_code, lane.base_offset)
}

/// Every record of `full`, as the tags of their keys, read with plain fetches.
async fn read_tags(client: &Client) -> Vec<u32> {
    let mut tags = Vec::new();
    let mut offset = Offset(0);
    loop {
        let request = FetchRequest {
            wait_ms_max: 0,
            bytes_min: 0,
            bytes_max: 4 << 20,
            topics: vec![TopicItems {
                name: "full".into(),
                partitions: vec![PartitionItems {
                    partition: PartitionId(0),
                    lanes: vec![FetchLane {
                        lane: Lane(0),
                        offset,
                        bytes_max: 4 << 20,
                    }],
                }],
            }],
            lane_bytes_max: Vec::new(),
        };
        let response = client.request(&request).await.unwrap();
        let lane = &response.topics[0].partitions[0].lanes[0];
        assert_eq!(
            lane.error_code,
            ErrorCode::None,
            "reads work: {}",
            lane.error_message
        );
        let batches =
            lanes_protocol::record_batch::Batches::new(lane.records.clone(), BatchLimits::default());
        let before = tags.len();
        for batch in batches {
            let batch = batch.unwrap();
            for record in batch.records() {
                if record.offset >= offset {
                    let key = record.key.expect("keyed");
                    tags.push(u32::from_be_bytes(key[..4].try_into().unwrap()));
                    offset = record.offset.plus(1);
                }
            }
        }
        if tags.len() == before {
            return tags;
        }
    }
}

/// A data directory on a full filesystem: produce gets STORAGE_FULL and no false
/// acknowledgement, reads go on, produce works again once space is freed, and every
/// acknowledged record is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_keeps_reads_and_recovers() {
    let Some(tmpfs) = Tmpfs::mount(8 << 20) else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN)");
        return;
    };
    let data = tmpfs.path().join("data");
    let broker = TestBroker::start(&data, |s| {
        s.segment_bytes_max = 1 << 20;
        s.index_bytes_max = 64 * 1024;
    })
    .await;
    let address = broker.address();
    create(&address, "full", &["a"], &[]).await.unwrap();
    // Most of the space goes to a file the test can delete later.
    let ballast = tmpfs.path().join("ballast");
    std::fs::write(&ballast, vec![1u8; 5 << 20]).unwrap();

    let client = Client::connect(&address, ClientConfig::default()).await.unwrap();
    let mut acknowledged = Vec::new();
    let mut full = false;
    for tag in 0..200u32 {
        match produce_one(&client, tag).await {
            (ErrorCode::None, _) => acknowledged.push(tag),
            (ErrorCode::StorageFull, _) => {
                full = true;
                break;
            }
            (code, _) => panic!("unexpected {code:?}"),
        }
    }
    assert!(full, "the disk never filled up");
    assert!(!acknowledged.is_empty());
    // Refused again while full; reads still work and show exactly what was acknowledged.
    assert_eq!(produce_one(&client, 10_000).await.0, ErrorCode::StorageFull);
    assert_eq!(read_tags(&client).await, acknowledged);

    std::fs::remove_file(&ballast).unwrap();
    let (code, _) = produce_one(&client, 20_000).await;
    assert_eq!(code, ErrorCode::None, "produce works again once space is freed");
    acknowledged.push(20_000);
    assert_eq!(read_tags(&client).await, acknowledged);

    // And after a restart: everything acknowledged, nothing else.
    let addr = broker.addr;
    broker.stop().await;
    let broker = TestBroker::start_on(addr, &data, |s| {
        s.segment_bytes_max = 1 << 20;
        s.index_bytes_max = 64 * 1024;
    })
    .await;
    let client = Client::connect(&broker.address(), ClientConfig::default())
        .await
        .unwrap();
    assert_eq!(read_tags(&client).await, acknowledged);
    broker.stop().await;
}

/// Deleting a topic removes its files; a topic created again under the name is empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_topic_removes_its_files() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), |_| {}).await;
    let address = broker.address();
    create(&address, "gone", &["a", "b"], &[]).await.unwrap();
    let producer = Producer::connect(ProducerConfig::new(&address)).await.unwrap();
    producer.send(ProducerRecord::new("gone", "x")).await.unwrap();
    producer.flush().await.unwrap();
    producer.close().await.unwrap();
    let topic_dir = dir.path().join("topics").join("gone");
    assert!(!segment_files(&topic_dir.join("0").join("0")).is_empty());

    let client = Client::connect(&address, ClientConfig::default()).await.unwrap();
    client
        .request(&lanes_protocol::messages::DeleteTopicRequest { name: "gone".into() })
        .await
        .unwrap();
    assert!(!topic_dir.exists(), "{} is still there", topic_dir.display());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("topics"))
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // The broker (in this process) frees the unlinked segment files gradually, then
    // closes them: none stays open.
    let held = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
            .filter(|target| target.starts_with(&topic_dir))
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !held().is_empty() {
        assert!(std::time::Instant::now() < deadline, "still open: {:?}", held());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    create(&address, "gone", &["a"], &[]).await.unwrap();
    let mut consumer = Consumer::connect(ConsumerConfig::new(&address)).await.unwrap();
    consumer
        .assign("gone", None, None, StartFrom::Earliest)
        .await
        .unwrap();
    let records = consumer.poll_timeout(Duration::from_millis(300)).await.unwrap();
    assert!(records.is_empty(), "{records:?}");
    broker.stop().await;
}
