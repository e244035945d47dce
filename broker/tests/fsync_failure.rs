//! Reliability suite 8, fsync failure (at the storage level, through a fail-point in
//! `LogConfig`): once an fsync fails, the lane log stops acknowledging. It takes no
//! more writes, never retries the failed fsync (the kernel may have dropped the pages
//! it could not write), and its durable watermark stays where it was. Everything
//! acknowledged before survives a restart.
//!
//! With the test-only `faults` feature, the same through a broker process whose fsyncs
//! fail while a trigger file exists: producers get `STORAGE_FAILED`, never a false
//! acknowledgement.

#[cfg(feature = "faults")]
mod crash_support;
#[cfg(feature = "faults")]
mod process_support;
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use lanes_broker::storage::{LaneLog, LogConfig, StorageError};
use lanes_protocol::Offset;
use lanes_protocol::record_batch::ProducerStamp;
use support::{batch, read_all, small_config, values};

#[test]
fn a_failed_fsync_stops_the_log_and_keeps_what_was_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let fault = Arc::new(AtomicBool::new(false));
    let config = LogConfig {
        fsync_fault: Some(Arc::clone(&fault)),
        ..small_config()
    };
    let log = LaneLog::open(dir.path(), config).unwrap();
    // Acknowledged: appended and fsynced across several segments.
    let acknowledged: Vec<Vec<u8>> = (0..20).flat_map(|tag| values(tag, 3, 300)).collect();
    for chunk in acknowledged.chunks(3) {
        log.append(&mut batch(chunk, 1_000, ProducerStamp::NONE)).unwrap();
    }
    let durable = log.flush().unwrap();
    assert_eq!(durable, Offset(60));

    // The disk fails: the append is written, its fsync fails.
    fault.store(true, Ordering::Release);
    log.append(&mut batch(&values(99, 3, 300), 2_000, ProducerStamp::NONE))
        .unwrap();
    assert!(log.flush().is_err(), "the failed fsync is reported");
    assert_eq!(
        log.durable_offset(),
        durable,
        "nothing past the failure is durable"
    );

    // Fail-stop: even with the disk healthy again, no retry and no new writes.
    fault.store(false, Ordering::Release);
    assert!(log.flush().is_err(), "a failed fsync is never retried");
    let refused = log.append(&mut batch(&values(100, 1, 10), 3_000, ProducerStamp::NONE));
    assert!(matches!(refused, Err(StorageError::Failed { .. })), "{refused:?}");
    assert_eq!(log.durable_offset(), durable);
    // Reads of what was acknowledged go on.
    let read = read_all(&log, Offset(0), durable);
    assert_eq!(read.len(), acknowledged.len());
    drop(log);

    // After a restart, every acknowledged record is there, unchanged.
    let log = LaneLog::open(dir.path(), small_config()).unwrap();
    let read: Vec<Vec<u8>> = read_all(&log, Offset(0), durable)
        .into_iter()
        .map(|(_, value)| value)
        .collect();
    assert_eq!(read, acknowledged);
    // And the log takes writes again, after what it holds.
    let next = log.next_offset();
    assert!(next >= durable);
    let appended = log
        .append(&mut batch(&values(101, 1, 10), 4_000, ProducerStamp::NONE))
        .unwrap();
    assert_eq!(appended.base_offset, next);
}

#[cfg(feature = "faults")]
mod through_a_broker {

    use lanes_broker::storage::faults::FSYNC_FAULT_ENV;
    use lanes_producer::{ProduceError, Producer, ProducerConfig, ProducerRecord};
    use lanes_protocol::client::{Client, ClientConfig};
    use lanes_protocol::messages::CreateTopicRequest;
    use lanes_protocol::{ErrorCode, Offset};

    use crate::process_support::BrokerProcess;

    const TOPIC: &str = "orders";

    async fn send(producer: &Producer, value: String) -> Result<(), ProduceError> {
        producer
            .send(ProducerRecord::new(TOPIC, value))
            .await?
            .wait()
            .await
            .map(|_| ())
    }

    /// Every record of the topic's one lane log, in offset order.
    async fn read_all(address: &str) -> Vec<(Offset, String)> {
        crate::crash_support::read_all(address, TOPIC)
            .await
            .remove(&(0, 0))
            .unwrap_or_default()
    }

    fn assert_storage_failed(result: Result<(), ProduceError>) {
        assert!(
            matches!(
                result,
                Err(ProduceError::Broker {
                    code: ErrorCode::StorageFailed,
                    ..
                })
            ),
            "expected STORAGE_FAILED, got {result:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn producers_get_storage_failed_and_acknowledged_records_survive() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let trigger = dir.path().join("fail-fsyncs");
        let env = [(FSYNC_FAULT_ENV, trigger.as_os_str())];
        let args = ["--metrics-listen", "off"];
        let mut broker = BrokerProcess::start_on_with_env("127.0.0.1:0", &data, &args, &env);
        Client::connect(&broker.address, ClientConfig::default())
            .await
            .unwrap()
            .request(&CreateTopicRequest {
                name: TOPIC.into(),
                partitions: 1,
                lanes: vec!["events".into()],
                configs: Vec::new(),
            })
            .await
            .unwrap();
        let producer = Producer::connect(ProducerConfig::new(&broker.address))
            .await
            .unwrap();
        let acknowledged: Vec<String> = (0..50).map(|n| format!("acknowledged-{n}")).collect();
        for value in &acknowledged {
            send(&producer, value.clone()).await.unwrap();
        }

        // The disk fails: the next durable produce is refused, not acknowledged.
        std::fs::write(&trigger, b"").unwrap();
        assert_storage_failed(send(&producer, "refused-0".into()).await);
        // Healthy again, the lane log still refuses: a failed fsync is never retried.
        std::fs::remove_file(&trigger).unwrap();
        assert_storage_failed(send(&producer, "refused-1".into()).await);
        // Acknowledged records can still be read.
        let read = read_all(&broker.address).await;
        assert_eq!(
            read.iter().take(50).map(|(_, v)| v).collect::<Vec<_>>(),
            acknowledged.iter().collect::<Vec<_>>()
        );
        drop(producer);

        // After a restart every acknowledged record is there once, at its offset, and
        // the lane log takes writes again.
        broker.kill();
        let broker = BrokerProcess::start_on_with_env("127.0.0.1:0", &data, &args, &env);
        let read = read_all(&broker.address).await;
        for (index, value) in acknowledged.iter().enumerate() {
            assert_eq!(read[index], (Offset(index as u64), value.clone()));
        }
        // Beyond them only the refused record that was written before its fsync failed
        // may be there (written is not acknowledged).
        assert!(read[50..].iter().all(|(_, v)| v == "refused-0"), "{read:?}");
        let producer = Producer::connect(ProducerConfig::new(&broker.address))
            .await
            .unwrap();
        send(&producer, "after-restart".into()).await.unwrap();
    }
}
