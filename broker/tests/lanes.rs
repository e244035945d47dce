//! Lane scheduling through a real broker: fetch responses shared by weight under
//! backlog, strict priority, work conservation, per-lane caps, and topic lane settings.

mod server_support;

use std::collections::BTreeMap;

use lanes_producer::{LaneSelector, Producer, ProducerConfig, ProducerRecord};
use lanes_protocol::client::{Client, ClientConfig};
use lanes_protocol::messages::{
    CreateTopicRequest, FetchLane, FetchRequest, MetadataRequest, PartitionItems, TopicConfig, TopicItems,
};
use lanes_protocol::{BatchLimits, Batches, Lane, Offset, PartitionId};
use server_support::TestBroker;

const PARTITIONS: u32 = 2;
const RECORD_BYTES: usize = 1000;

async fn create(client: &Client, name: &str, configs: &[(&str, &str)]) {
    server_support::create_topic_with(client, name, PARTITIONS, &[], configs)
        .await
        .unwrap();
}

/// `records` records of 1000 bytes to every lane log of `topic` (the given lanes).
async fn fill(address: &str, topic: &str, lanes: &[u8], records: usize) {
    let mut config = ProducerConfig::new(address);
    config.batch_bytes_max = 4 * 1024;
    let producer = Producer::connect(config).await.unwrap();
    let value = vec![b'x'; RECORD_BYTES];
    for partition in 0..PARTITIONS {
        for &lane in lanes {
            for _ in 0..records {
                let record = ProducerRecord::new(topic, value.clone())
                    .partition(PartitionId(partition))
                    .lane(LaneSelector::Index(Lane(lane)));
                producer.send(record).await.unwrap();
            }
        }
    }
    producer.close().await.unwrap();
}

/// Fetches on one connection, as a consumer does, and counts the bytes of each lane.
struct Reader {
    client: Client,
    topic: String,
    positions: BTreeMap<(u32, u8), Offset>,
}

impl Reader {
    async fn new(address: &str, topic: &str) -> Reader {
        let positions = (0..PARTITIONS)
            .flat_map(|p| (0..3).map(move |l| ((p, l), Offset::ZERO)))
            .collect();
        Reader {
            client: Client::connect(address, ClientConfig::default()).await.unwrap(),
            topic: topic.into(),
            positions,
        }
    }

    /// One fetch of up to `bytes_max`; returns the record bytes per lane.
    async fn fetch(&mut self, bytes_max: u32, lane_bytes_max: Vec<u32>) -> [usize; 3] {
        let partitions = (0..PARTITIONS)
            .map(|p| PartitionItems {
                partition: PartitionId(p),
                lanes: (0..3)
                    .map(|l| FetchLane {
                        lane: Lane(l),
                        offset: self.positions[&(p, l)],
                        bytes_max: 1 << 20,
                    })
                    .collect(),
            })
            .collect();
        let request = FetchRequest {
            wait_ms_max: 0,
            bytes_min: 0,
            bytes_max,
            lane_bytes_max,
            topics: vec![TopicItems {
                name: self.topic.clone(),
                partitions,
            }],
        };
        let response = self.client.request(&request).await.unwrap();
        let mut bytes = [0; 3];
        for (_, partition, lane) in response.topics[0].lanes() {
            bytes[lane.lane.0 as usize] += lane.records.len();
            let limits = BatchLimits {
                batch_bytes_max: u32::MAX,
                batch_records_max: u32::MAX,
            };
            for batch in Batches::new(lane.records.clone(), limits) {
                let next = batch.unwrap().last_offset().plus(1);
                self.positions.insert((partition.0, lane.lane.0), next);
            }
        }
        bytes
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_lanes_share_fetches_by_weight_and_conserve_work() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), |_| {}).await;
    let address = broker.address();
    let admin = Client::connect(&address, ClientConfig::default()).await.unwrap();
    create(&admin, "orders", &[]).await;
    // 2 MB per lane log: every lane stays backlogged for the first 40 fetches of 64 KiB.
    fill(&address, "orders", &[0, 1, 2], 2000).await;

    let mut reader = Reader::new(&address, "orders").await;
    let mut served = [0usize; 3];
    for _ in 0..60 {
        let bytes = reader.fetch(64 * 1024, vec![]).await;
        for lane in 0..3 {
            served[lane] += bytes[lane];
        }
    }
    let total: usize = served.iter().sum();
    for (lane, weight) in [16.0, 4.0, 1.0].into_iter().enumerate() {
        let share = served[lane] as f64 / total as f64;
        let target = weight / 21.0;
        assert!(
            (share - target).abs() <= 0.05 * target,
            "lane {lane}: {share:.4} of the bytes, its weight says {target:.4} ({served:?})"
        );
    }

    // With lane 0 capped by the client, the others get the rest of the budget.
    let capped = reader.fetch(64 * 1024, vec![16 * 1024]).await;
    assert!(
        capped[0] <= 16 * 1024 + 16 * 1024,
        "lane 0 within its cap (one batch over at most)"
    );
    assert!(
        capped[1] + capped[2] >= 32 * 1024,
        "the rest went to the other lanes: {capped:?}"
    );

    // Only bulk has data left: it gets whole responses.
    let mut reader = Reader::new(&address, "orders").await;
    for (p, l) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
        reader.positions.insert((p, l), Offset(2000));
    }
    let bytes = reader.fetch(64 * 1024, vec![]).await;
    assert_eq!(bytes[..2], [0, 0]);
    assert!(bytes[2] >= 48 * 1024, "bulk alone fills the response: {bytes:?}");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_lanes_drain_the_most_urgent_first() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), |_| {}).await;
    let address = broker.address();
    let admin = Client::connect(&address, ClientConfig::default()).await.unwrap();
    create(&admin, "orders", &[("lane_policy", "strict")]).await;
    fill(&address, "orders", &[0, 1, 2], 100).await;

    let mut reader = Reader::new(&address, "orders").await;
    let mut order = Vec::new();
    loop {
        let bytes = reader.fetch(48 * 1024, vec![]).await;
        if bytes == [0, 0, 0] {
            break;
        }
        order.push(bytes);
    }
    // Lane 1 starts only once lane 0 is empty, lane 2 once lane 1 is.
    let first = |lane: usize| order.iter().position(|b| b[lane] > 0).unwrap();
    let last = |lane: usize| order.iter().rposition(|b| b[lane] > 0).unwrap();
    assert!(last(0) <= first(1) && last(1) <= first(2), "{order:?}");
    let totals: Vec<usize> = (0..3).map(|l| order.iter().map(|b| b[l]).sum()).collect();
    assert!(totals.iter().all(|t| *t >= 2 * 100 * RECORD_BYTES), "{totals:?}");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lane_settings_are_checked_and_shown() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), |_| {}).await;
    let admin = Client::connect(&broker.address(), ClientConfig::default())
        .await
        .unwrap();
    let configs = [
        ("lane_policy", "weighted"),
        ("lane_weights", "8,2,1"),
        ("retention_ms.bulk", "3600000"),
        ("retention_bytes.express", "1048576"),
    ];
    create(&admin, "orders", &configs).await;
    let metadata = admin
        .request(&MetadataRequest {
            topics: vec!["orders".into()],
        })
        .await
        .unwrap();
    let shown: BTreeMap<String, String> = metadata.topics[0]
        .configs
        .iter()
        .map(|c| (c.key.clone(), c.value.clone()))
        .collect();
    assert_eq!(shown["lane_policy"], "weighted");
    assert_eq!(shown["lane_weights"], "8,2,1");
    assert_eq!(shown["retention_ms.bulk"], "3600000");
    assert_eq!(shown["retention_bytes.express"], "1048576");

    for (configs, complaint) in [
        (vec![("lane_weights", "8,2")], "2 weights for 3 lanes"),
        (vec![("lane_weights", "8,0,1")], "weights from 1"),
        (vec![("lane_policy", "fastest")], "strict or weighted"),
        (vec![("retention_ms.overnight", "10")], "does not have"),
    ] {
        let configs: Vec<TopicConfig> = configs
            .into_iter()
            .map(|(key, value)| TopicConfig {
                key: key.into(),
                value: value.into(),
            })
            .collect();
        let error = admin
            .request(&CreateTopicRequest {
                name: "bad".into(),
                partitions: 1,
                lanes: vec![],
                configs,
            })
            .await
            .unwrap_err();
        assert!(error.to_string().contains(complaint), "{error}");
    }
    broker.stop().await;
}
