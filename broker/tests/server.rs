//! The end-to-end path through a real broker on 127.0.0.1:0: producing and consuming
//! across partitions and lanes, restarts, idempotent retries.

mod server_support;

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use lanes_consumer::{Consumer, ConsumerConfig, StartFrom};
use lanes_producer::{LaneSelector, Producer, ProducerConfig, ProducerRecord, TopicDefaults};
use lanes_protocol::client::{Client, ClientConfig, ClientError};
use lanes_protocol::messages::{
    Acks, CreateTopicRequest, InitProducerIdRequest, MetadataRequest, PartitionItems, ProduceLane,
    ProduceRequest, TopicConfig, TopicItems,
};
use lanes_protocol::record_batch::ProducerStamp;
use lanes_protocol::{BatchLimits, ErrorCode, Lane, Offset, PartitionId, RecordBatchBuilder};
use server_support::TestBroker;

type Log = BTreeMap<(u32, u8), Vec<(Offset, Option<Bytes>, Bytes)>>;

/// Every record of `topic`, grouped by lane log, in offset order.
async fn consume_all(address: &str, topic: &str, expected: usize) -> Log {
    let mut consumer = Consumer::connect(ConsumerConfig::new(address)).await.unwrap();
    consumer
        .assign(topic, None, None, StartFrom::Earliest)
        .await
        .unwrap();
    let mut log = Log::new();
    let mut count = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while count < expected {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {count} of {expected} records came back"
        );
        for record in consumer.poll().await.unwrap() {
            log.entry((record.partition.0, record.lane.0)).or_default().push((
                record.offset,
                record.key,
                record.value,
            ));
            count += 1;
        }
    }
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_come_back_byte_identical_and_in_order_also_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), |_| {}).await;
    let mut config = ProducerConfig::new(broker.address());
    config.create_topics = Some(TopicDefaults {
        partitions: 4,
        lanes: vec!["express".into(), "standard".into(), "bulk".into()],
    });
    let producer = Producer::connect(config).await.unwrap();
    let lanes = ["express", "standard", "bulk"];
    let mut sent: Log = Log::new();
    let mut deliveries = Vec::new();
    for i in 0..600u32 {
        // Binary values, including bytes that are not UTF-8, and some empty ones.
        let value: Vec<u8> = (0..(i % 50)).map(|j| (i * 7 + j * 13) as u8).collect();
        let key = format!("order-{}", i % 37);
        let record = ProducerRecord::new("orders", value.clone())
            .key(key.clone())
            .lane(LaneSelector::Name(lanes[(i % 3) as usize].into()))
            .header("seq", Some(Bytes::from(i.to_string())));
        deliveries.push((key, value, producer.send(record).await.unwrap()));
    }
    // In send order: a lane log must hold its records in the order they were sent.
    for (key, value, delivery) in deliveries {
        let metadata = delivery.wait().await.unwrap();
        let record = (
            metadata.offset.unwrap(),
            Some(Bytes::from(key)),
            Bytes::from(value),
        );
        sent.entry((metadata.partition.0, metadata.lane.0))
            .or_default()
            .push(record);
    }
    producer.close().await.unwrap();
    for records in sent.values() {
        // Offsets 0, 1, 2, … in send order: dense, and nothing reordered.
        for (i, record) in records.iter().enumerate() {
            assert_eq!(record.0, Offset(i as u64), "record {i} sent to its lane log");
        }
    }
    assert!(sent.len() > 4, "records spread over partitions and lanes");

    assert_eq!(consume_all(&broker.address(), "orders", 600).await, sent);
    broker.stop().await;

    let broker = TestBroker::start(dir.path(), |_| {}).await;
    assert_eq!(
        consume_all(&broker.address(), "orders", 600).await,
        sent,
        "after a restart"
    );
    broker.stop().await;
}

fn one_batch(topic: &str, partition: u32, lane: u8, batch: Bytes) -> Vec<TopicItems<ProduceLane>> {
    vec![TopicItems {
        name: topic.into(),
        partitions: vec![PartitionItems {
            partition: PartitionId(partition),
            lanes: vec![ProduceLane {
                lane: Lane(lane),
                batch,
            }],
        }],
    }]
}

fn idempotent_batch(producer_id: i64, base_sequence: i32, records: u32) -> Bytes {
    let mut builder = RecordBatchBuilder::new(BatchLimits::default());
    for i in 0..records {
        builder
            .push(1_000 + i64::from(i), None, format!("v{i}").as_bytes(), &[])
            .unwrap();
    }
    builder.finish(ProducerStamp {
        producer_id,
        producer_epoch: 0,
        base_sequence,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_batch_is_not_appended_twice_and_a_gap_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), |_| {}).await;
    let client = Client::connect(&broker.address(), ClientConfig::default())
        .await
        .unwrap();
    client
        .request(&CreateTopicRequest {
            name: "payments".into(),
            partitions: 1,
            lanes: vec![],
            configs: vec![],
        })
        .await
        .unwrap();
    let producer = client.request(&InitProducerIdRequest).await.unwrap();
    let batch = idempotent_batch(producer.producer_id, 0, 3);
    let produce = |batch: Bytes| ProduceRequest {
        acks: Acks::Durable,
        timeout_ms: 10_000,
        topics: one_batch("payments", 0, 1, batch),
    };
    let first = client.request(&produce(batch.clone())).await.unwrap();
    let retry = client.request(&produce(batch)).await.unwrap();
    let (first, retry) = (
        &first.topics[0].partitions[0].lanes[0],
        &retry.topics[0].partitions[0].lanes[0],
    );
    assert_eq!(first.error_code, ErrorCode::None);
    assert_eq!(
        (retry.base_offset, retry.last_offset),
        (first.base_offset, first.last_offset)
    );

    let gap = client
        .request(&produce(idempotent_batch(producer.producer_id, 9, 1)))
        .await
        .unwrap();
    assert_eq!(
        gap.topics[0].partitions[0].lanes[0].error_code,
        ErrorCode::OutOfOrderSequence
    );

    let metadata = client
        .request(&MetadataRequest {
            topics: vec!["payments".into()],
        })
        .await
        .unwrap();
    let lane = metadata.topics[0].partitions[0].lanes[1];
    assert_eq!(lane.end_offset, Offset(3), "three records, not six");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_errors_are_answered_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), |s| s.auto_create_topics = false).await;
    let client = Client::connect(&broker.address(), ClientConfig::default())
        .await
        .unwrap();
    let create = |name: &str, lanes: Vec<String>, configs: Vec<TopicConfig>| CreateTopicRequest {
        name: name.into(),
        partitions: 2,
        lanes,
        configs,
    };
    let code = |result: Result<_, ClientError>| result.err().and_then(|e| e.code());
    assert_eq!(
        code(client.request(&create("bad name!", vec![], vec![])).await),
        Some(ErrorCode::InvalidTopicName)
    );
    assert_eq!(
        code(client.request(&create("t", vec!["Express".into()], vec![])).await),
        Some(ErrorCode::InvalidConfig)
    );
    let unknown_setting = TopicConfig {
        key: "colour".into(),
        value: "blue".into(),
    };
    assert_eq!(
        code(client.request(&create("t", vec![], vec![unknown_setting])).await),
        Some(ErrorCode::InvalidConfig)
    );
    client.request(&create("t", vec![], vec![])).await.unwrap();
    assert_eq!(
        code(client.request(&create("t", vec![], vec![])).await),
        Some(ErrorCode::TopicAlreadyExists)
    );

    // Producing to a missing topic without auto-creation, or to a missing partition.
    let batch = idempotent_batch(-1, -1, 1);
    let anonymous = {
        let mut builder = RecordBatchBuilder::new(BatchLimits::default());
        builder.push(0, None, b"x", &[]).unwrap();
        builder.finish(ProducerStamp::NONE)
    };
    drop(batch);
    for (topic, partition, lane, expected) in [
        ("missing", 0, 0, ErrorCode::UnknownTopic),
        ("t", 7, 0, ErrorCode::UnknownPartition),
        ("t", 0, 5, ErrorCode::UnknownLane),
    ] {
        let response = client
            .request(&ProduceRequest {
                acks: Acks::Written,
                timeout_ms: 1000,
                topics: one_batch(topic, partition, lane, anonymous.clone()),
            })
            .await
            .unwrap();
        assert_eq!(response.topics[0].partitions[0].lanes[0].error_code, expected);
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_written_topic_shows_records_without_waiting_for_fsync() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), |s| {
        // An fsync that never comes: only a `written` topic can show anything.
        s.fsync = lanes_broker::config::FsyncMode::Interval;
        s.fsync_interval_ms = 3_600_000;
    })
    .await;
    let client = Client::connect(&broker.address(), ClientConfig::default())
        .await
        .unwrap();
    client
        .request(&CreateTopicRequest {
            name: "fast".into(),
            partitions: 1,
            lanes: vec!["only".into()],
            configs: vec![TopicConfig {
                key: "durability".into(),
                value: "written".into(),
            }],
        })
        .await
        .unwrap();
    let mut config = ProducerConfig::new(broker.address());
    config.acks = Acks::Written;
    let producer = Producer::connect(config).await.unwrap();
    let delivery = producer.send(ProducerRecord::new("fast", "hello")).await.unwrap();
    assert_eq!(delivery.wait().await.unwrap().offset, Some(Offset(0)));
    let log = consume_all(&broker.address(), "fast", 1).await;
    assert_eq!(log[&(0, 0)][0].2, Bytes::from("hello"));
    broker.stop().await;
}

/// ApiVersions version 1 tells the broker's `batch_bytes_max`; version 0, which clients
/// from before it send, gets the answer they can read, without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handshake_tells_the_batch_limit_at_version_1_only() {
    use lanes_protocol::api::{decode_response_body, decode_response_header};
    use lanes_protocol::messages::ApiVersionsResponseV0;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), |settings| settings.batch_bytes_max = 65_536).await;
    let client = Client::connect(&broker.address(), ClientConfig::default())
        .await
        .unwrap();
    assert_eq!(client.broker_versions().batch_bytes_max, Some(65_536));

    let mut stream = tokio::net::TcpStream::connect(broker.addr).await.unwrap();
    // api_key 0, api_version 0, correlation_id 7, client_id "old"; empty body.
    let mut frame = vec![0, 0, 0, 13, 0, 0, 0, 0, 0, 0, 0, 7, 0, 3];
    frame.extend_from_slice(b"old");
    stream.write_all(&frame).await.unwrap();
    let mut length = [0u8; 4];
    stream.read_exact(&mut length).await.unwrap();
    let mut payload = vec![0u8; u32::from_be_bytes(length) as usize];
    stream.read_exact(&mut payload).await.unwrap();
    let (header, body) = decode_response_header(bytes::BytesMut::from(&payload[..])).unwrap();
    assert_eq!((header.correlation_id, header.error_code), (7, ErrorCode::None));
    // Decoded as version 0, which checks that nothing follows the software version.
    let answer: ApiVersionsResponseV0 = decode_response_body(body).unwrap();
    assert_eq!(answer.0.broker_version, client.broker_versions().broker_version);
    broker.stop().await;
}

/// A client still talks to a broker from before ApiVersions version 1, which refuses it
/// with `UNSUPPORTED_VERSION`: it asks again at version 0. That broker cannot run here,
/// so a listener answers as it did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_falls_back_to_version_0_with_an_older_broker() {
    use lanes_protocol::api::{encode_error_response, encode_response};
    use lanes_protocol::messages::{ApiVersionsResponse, ApiVersionsResponseV0};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let old_broker = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut versions_asked = Vec::new();
        while versions_asked.len() < 2 {
            let mut length = [0u8; 4];
            stream.read_exact(&mut length).await.unwrap();
            let mut payload = vec![0u8; u32::from_be_bytes(length) as usize];
            stream.read_exact(&mut payload).await.unwrap();
            let version = u16::from_be_bytes([payload[2], payload[3]]);
            let correlation_id = u32::from_be_bytes(payload[4..8].try_into().unwrap());
            versions_asked.push(version);
            let frame = match version {
                0 => encode_response(
                    correlation_id,
                    &ApiVersionsResponseV0(ApiVersionsResponse::supported("old", None)),
                ),
                _ => encode_error_response(correlation_id, ErrorCode::UnsupportedVersion, "version 0 only"),
            };
            for chunk in frame {
                stream.write_all(&chunk).await.unwrap();
            }
        }
        versions_asked
    });
    let client = Client::connect(&address, ClientConfig::default()).await.unwrap();
    assert_eq!(client.broker_versions().broker_version, "old");
    assert_eq!(client.broker_versions().batch_bytes_max, None);
    assert_eq!(old_broker.await.unwrap(), vec![1, 0]);
}

/// Produce requests of hundreds of kilobytes, sent back to back in odd-sized pieces (a
/// piece that ends one request begins the next), are each read whole: the broker
/// makes room for a frame once its length has arrived, and reads on from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_requests_arriving_in_pieces_are_each_read_whole() {
    use lanes_protocol::api::{decode_response_body, decode_response_header, encode_request};
    use lanes_protocol::messages::{ApiVersionsRequest, ProduceResponse};
    use tokio::io::AsyncWriteExt;

    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), |_| {}).await;
    server_support::create_topic(&broker.address(), "pieces", 1).await;
    let value = |request: usize, record: usize| -> Vec<u8> {
        let byte = u8::try_from((request * 31 + record) % 251).unwrap();
        vec![byte; 1_000 + record % 7]
    };
    let requests = 4;
    let records_per_request = 300;
    // The handshake first, in the same stream.
    let mut stream_bytes: Vec<u8> = encode_request(u32::MAX, "pieces", &ApiVersionsRequest)
        .iter()
        .flat_map(|chunk| chunk.iter().copied())
        .collect();
    for request in 0..requests {
        let mut builder = RecordBatchBuilder::new(BatchLimits::default());
        for record in 0..records_per_request {
            builder.push(1_000, None, &value(request, record), &[]).unwrap();
        }
        let produce = ProduceRequest {
            acks: Acks::Written,
            timeout_ms: 10_000,
            topics: one_batch("pieces", 0, 1, builder.finish(ProducerStamp::NONE)),
        };
        let correlation_id = u32::try_from(request).unwrap();
        for chunk in encode_request(correlation_id, "pieces", &produce) {
            stream_bytes.extend_from_slice(&chunk);
        }
    }
    let stream = tokio::net::TcpStream::connect(broker.addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let writing = tokio::spawn(async move {
        for piece in stream_bytes.chunks(7_919) {
            writer.write_all(piece).await.unwrap();
            writer.flush().await.unwrap();
            tokio::task::yield_now().await;
        }
        writer
    });
    let handshake = server_support::read_frame(&mut reader).await.unwrap();
    let (header, _) = decode_response_header(bytes::BytesMut::from(&handshake[4..])).unwrap();
    assert_eq!(
        (header.correlation_id, header.error_code),
        (u32::MAX, ErrorCode::None)
    );
    for request in 0..requests {
        let frame = server_support::read_frame(&mut reader).await.unwrap();
        let (header, body) = decode_response_header(bytes::BytesMut::from(&frame[4..])).unwrap();
        assert_eq!(
            (header.correlation_id, header.error_code),
            (u32::try_from(request).unwrap(), ErrorCode::None)
        );
        let answer: ProduceResponse = decode_response_body(body).unwrap();
        let lane = &answer.topics[0].partitions[0].lanes[0];
        assert_eq!(lane.error_code, ErrorCode::None, "{}", lane.error_message);
        assert_eq!(lane.base_offset, Offset((request * records_per_request) as u64));
    }
    drop(writing.await.unwrap());

    let log = consume_all(&broker.address(), "pieces", requests * records_per_request).await;
    let records = &log[&(0, 1)];
    assert_eq!(records.len(), requests * records_per_request);
    for (index, (offset, _, record)) in records.iter().enumerate() {
        assert_eq!(*offset, Offset(index as u64));
        let expected = value(index / records_per_request, index % records_per_request);
        assert_eq!(record[..], expected[..], "record {index}");
    }
    broker.stop().await;
}
