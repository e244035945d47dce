//! Reliability suite 11, hostile clients under load: while an honest client produces
//! and consumes, attackers open 2,000 idle connections, trickle a frame one byte a
//! second (slowloris), send 4 GiB length prefixes, random bytes, unknown API keys and
//! half frames. The honest client loses nothing, the broker's anonymous memory stays
//! under `RSS_ANON_MAX_MIB`, and the honest client's produce p99 stays within 5× of its
//! quiet value (plus 5 ms). That last one is a speed target: asserted only with
//! `LANES_HOSTILE_STRICT=1` (`scripts/reliability` sets it), printed otherwise.

mod process_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use lanes_consumer::{Consumer, ConsumerConfig, StartFrom};
use lanes_producer::{Producer, ProducerConfig, ProducerRecord};
use process_support::BrokerProcess;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// The bound this suite holds the broker to, for its anonymous memory (heap and
/// buffers) while under attack.
const RSS_ANON_MAX_MIB: u64 = 256;
const IDLE_CONNECTIONS: usize = 2_000;

fn anon_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|line| line.starts_with("RssAnon:"))
        .and_then(|line| line.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |kib| kib / 1024)
}

fn p99(latencies: &mut [Duration]) -> Duration {
    latencies.sort_unstable();
    latencies
        .get(latencies.len() * 99 / 100)
        .copied()
        .unwrap_or_default()
}

/// A request frame: length prefix, api key, version, correlation id, body.
fn frame(api_key: u16, body: &[u8]) -> Vec<u8> {
    let mut frame = Vec::new();
    frame.extend_from_slice(&((8 + body.len()) as u32).to_be_bytes());
    frame.extend_from_slice(&api_key.to_be_bytes());
    frame.extend_from_slice(&0u16.to_be_bytes());
    frame.extend_from_slice(&7u32.to_be_bytes());
    frame.extend_from_slice(body);
    frame
}

/// Produces one record at a time for `period`; each send-to-acknowledgement latency.
async fn honest_produce(producer: &Producer, period: Duration, sent: &AtomicUsize) -> Vec<Duration> {
    let mut latencies = Vec::new();
    let begun = Instant::now();
    while begun.elapsed() < period {
        let at = Instant::now();
        let n = sent.fetch_add(1, Ordering::Relaxed);
        producer
            .send(ProducerRecord::new("honest", format!("r{n}")))
            .await
            .unwrap()
            .wait()
            .await
            .unwrap();
        latencies.push(at.elapsed());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    latencies
}

/// Runs `attack` over and over until `stop`.
fn repeat<F, Fut>(stop: &Arc<AtomicBool>, attack: F) -> tokio::task::JoinHandle<()>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let stop = Arc::clone(stop);
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            attack().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_honest_client_is_served_while_others_attack() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start_with(
        dir.path(),
        &["--metrics-listen", "off", "--connections-max", "4000"],
    );
    let address = broker.address.clone();
    let pid = broker.child.id();
    let mut config = ProducerConfig::new(&address);
    config.acks = lanes_protocol::messages::Acks::Written;
    let producer = Producer::connect(config).await.unwrap();
    let sent = AtomicUsize::new(0);
    let period = Duration::from_secs(5);
    let mut quiet = honest_produce(&producer, period, &sent).await;
    let quiet_p99 = p99(&mut quiet);

    let stop = Arc::new(AtomicBool::new(false));
    // 2,000 connections that say nothing.
    let mut idle = Vec::new();
    for _ in 0..IDLE_CONNECTIONS {
        match TcpStream::connect(&address).await {
            Ok(stream) => idle.push(stream),
            Err(error) => {
                eprintln!("stopped opening idle connections at {}: {error}", idle.len());
                break;
            }
        }
    }
    let mut attacks = Vec::new();
    // Slowloris: a valid-looking frame, one byte a second.
    for _ in 0..4 {
        let address = address.clone();
        attacks.push(repeat(&stop, move || {
            let address = address.clone();
            async move {
                let Ok(mut stream) = TcpStream::connect(&address).await else {
                    return;
                };
                for byte in frame(0, &[0; 32]) {
                    if stream.write_all(&[byte]).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }));
    }
    // A 4 GiB length prefix, random bytes, an unknown API key, half a frame.
    let bad_inputs: Vec<Vec<u8>> = vec![
        u32::MAX.to_be_bytes().to_vec(),
        (0..4096u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect(),
        frame(999, b"what is this"),
        frame(4, &[0; 64])[..20].to_vec(),
    ];
    for input in bad_inputs {
        let address = address.clone();
        attacks.push(repeat(&stop, move || {
            let (address, input) = (address.clone(), input.clone());
            async move {
                let Ok(mut stream) = TcpStream::connect(&address).await else {
                    return;
                };
                let _ = stream.write_all(&input).await;
                let _ = tokio::time::timeout(Duration::from_millis(50), stream.readable()).await;
            }
        }));
    }

    let mut attacked = honest_produce(&producer, period, &sent).await;
    let attacked_p99 = p99(&mut attacked);
    let rss = anon_mib(pid);
    stop.store(true, Ordering::Relaxed);
    for attack in attacks {
        attack.abort();
    }
    let idle_count = idle.len();
    drop(idle);
    producer.close().await.unwrap();

    // Nothing the honest client sent is missing.
    let total = sent.load(Ordering::Relaxed);
    let mut consumer = Consumer::connect(ConsumerConfig::new(&address)).await.unwrap();
    consumer
        .assign("honest", None, None, StartFrom::Earliest)
        .await
        .unwrap();
    let mut read = 0;
    let deadline = Instant::now() + process_support::DEADLINE;
    while read < total {
        assert!(Instant::now() < deadline, "read back only {read} of {total}");
        read += consumer
            .poll_timeout(Duration::from_millis(200))
            .await
            .unwrap()
            .len();
    }
    eprintln!(
        "hostile: {idle_count} idle connections, 4 slowloris, 4 kinds of bad input in a loop; \
         honest produce p99 quiet {:.2} ms, attacked {:.2} ms; broker anon {rss} MiB (bound \
         {RSS_ANON_MAX_MIB}); {total} records, all read back",
        quiet_p99.as_secs_f64() * 1000.0,
        attacked_p99.as_secs_f64() * 1000.0
    );
    assert_eq!(read, total);
    assert!(rss <= RSS_ANON_MAX_MIB, "broker anonymous memory {rss} MiB");
    if std::env::var("LANES_HOSTILE_STRICT").is_ok_and(|v| v == "1") {
        assert!(
            attacked_p99 <= quiet_p99 * 5 + Duration::from_millis(5),
            "p99 {attacked_p99:?} under attack, {quiet_p99:?} quiet"
        );
    }
}
