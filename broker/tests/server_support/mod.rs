//! A real broker on 127.0.0.1:0 with a temp data directory, for integration tests.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use lanes_broker::{Broker, Settings};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Creates a topic with the broker's default lanes.
pub async fn create_topic(address: &str, name: &str, partitions: u32) {
    let client = lanes_protocol::client::Client::connect(address, Default::default())
        .await
        .unwrap();
    client
        .request(&lanes_protocol::messages::CreateTopicRequest {
            name: name.into(),
            partitions,
            lanes: vec![],
            configs: vec![],
        })
        .await
        .unwrap();
}

/// Creates a topic with these lanes (none: the broker's default) and `key=value`
/// settings.
pub async fn create_topic_with(
    client: &lanes_protocol::client::Client,
    name: &str,
    partitions: u32,
    lanes: &[&str],
    configs: &[(&str, &str)],
) -> Result<(), lanes_protocol::client::ClientError> {
    client
        .request(&lanes_protocol::messages::CreateTopicRequest {
            name: name.into(),
            partitions,
            lanes: lanes.iter().map(|l| (*l).to_owned()).collect(),
            configs: configs
                .iter()
                .map(|(key, value)| lanes_protocol::messages::TopicConfig {
                    key: (*key).into(),
                    value: (*value).into(),
                })
                .collect(),
        })
        .await
        .map(|_| ())
}

pub struct TestBroker {
    pub addr: SocketAddr,
    pub broker: Arc<Broker>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl TestBroker {
    /// Starts a broker on `data_dir` with test-friendly settings, changed by `tweak`.
    pub async fn start(data_dir: &Path, tweak: impl FnOnce(&mut Settings)) -> TestBroker {
        TestBroker::start_on("127.0.0.1:0".parse().unwrap(), data_dir, tweak).await
    }

    /// Like [`TestBroker::start`], listening on `addr` (a restart on the same port).
    pub async fn start_on(
        addr: SocketAddr,
        data_dir: &Path,
        tweak: impl FnOnce(&mut Settings),
    ) -> TestBroker {
        let mut settings = Settings {
            data_dir: data_dir.to_owned(),
            segment_bytes_max: 1 << 20,
            index_bytes_max: 64 * 1024,
            ..Settings::default()
        };
        tweak(&mut settings);
        let broker = tokio::task::spawn_blocking(move || Broker::open(settings))
            .await
            .unwrap()
            .expect("broker opens");
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let broker = Arc::clone(&broker);
            let shutdown = shutdown.clone();
            async move { broker.serve(listener, shutdown).await }
        });
        TestBroker {
            addr,
            broker,
            shutdown,
            task,
        }
    }

    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    /// Stops serving (graceful shutdown) and closes every lane log cleanly.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .expect("serve returns after shutdown")
            .unwrap();
        let broker = self.broker;
        tokio::task::spawn_blocking(move || broker.close())
            .await
            .unwrap()
            .unwrap();
    }
}

/// Reads one frame, its 4-byte length prefix included (for test proxies).
pub async fn read_frame(from: &mut (impl tokio::io::AsyncRead + Unpin)) -> std::io::Result<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut prefix = [0u8; 4];
    from.read_exact(&mut prefix).await?;
    let mut frame = prefix.to_vec();
    frame.resize(4 + u32::from_be_bytes(prefix) as usize, 0);
    from.read_exact(&mut frame[4..]).await?;
    Ok(frame)
}
