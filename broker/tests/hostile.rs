//! Bad input over raw TCP: each gets its answer (an error response, or a closed
//! connection) while an honest client keeps producing and consuming.

mod server_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use lanes_consumer::{Consumer, ConsumerConfig, StartFrom};
use lanes_producer::{Producer, ProducerConfig, ProducerRecord};
use lanes_protocol::ErrorCode;
use server_support::TestBroker;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Generous: a busy machine may be slow, the broker must still get there.
const DEADLINE: Duration = Duration::from_secs(20);

fn request_frame(api_key: u16, correlation_id: u32, body: &[u8]) -> Vec<u8> {
    let mut payload = Vec::new();
    payload.extend_from_slice(&api_key.to_be_bytes());
    payload.extend_from_slice(&0u16.to_be_bytes());
    payload.extend_from_slice(&correlation_id.to_be_bytes());
    payload.extend_from_slice(&4u16.to_be_bytes());
    payload.extend_from_slice(b"test");
    payload.extend_from_slice(body);
    let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&payload);
    frame
}

/// The next response's correlation id and error code; `None` if the connection closed.
async fn response(stream: &mut TcpStream) -> Option<(u32, ErrorCode)> {
    let read = async {
        let mut length = [0u8; 4];
        stream.read_exact(&mut length).await.ok()?;
        let mut payload = vec![0u8; u32::from_be_bytes(length) as usize];
        stream.read_exact(&mut payload).await.ok()?;
        let correlation_id = u32::from_be_bytes(payload[0..4].try_into().unwrap());
        let code = ErrorCode::from_u16(u16::from_be_bytes(payload[4..6].try_into().unwrap())).unwrap();
        Some((correlation_id, code))
    };
    tokio::time::timeout(DEADLINE, read)
        .await
        .expect("an answer within the deadline")
}

/// Waits until the broker closes the connection.
async fn closed(stream: &mut TcpStream) {
    let mut sink = [0u8; 1024];
    let drained = async {
        loop {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(DEADLINE, drained)
        .await
        .expect("the broker closes the connection");
}

async fn connect(broker: &TestBroker) -> TcpStream {
    TcpStream::connect(broker.addr).await.unwrap()
}

async fn handshake(stream: &mut TcpStream) {
    stream.write_all(&request_frame(0, 1, &[])).await.unwrap();
    assert_eq!(response(stream).await, Some((1, ErrorCode::None)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_answered_or_closed_while_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), |s| {
        s.frame_bytes_max = 2 << 20;
        s.request_receive_ms_max = 500;
        s.connection_idle_ms_max = 1_000;
    })
    .await;

    // An honest client produces and consumes the whole time.
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let honest = tokio::spawn({
        let (address, stop, acked) = (broker.address(), Arc::clone(&stop), Arc::clone(&acked));
        async move {
            let producer = Producer::connect(ProducerConfig::new(address)).await.unwrap();
            let mut i = 0u64;
            while !stop.load(Ordering::Acquire) {
                let delivery = producer
                    .send(ProducerRecord::new("honest", format!("record {i}")).key(format!("k{}", i % 7)))
                    .await
                    .unwrap();
                delivery.wait().await.unwrap();
                acked.fetch_add(1, Ordering::AcqRel);
                i += 1;
            }
            producer.close().await.unwrap();
        }
    });

    // A 4 GiB length prefix: answered with FRAME_TOO_LARGE, then closed, nothing read.
    let mut stream = connect(&broker).await;
    let mut frame = u32::MAX.to_be_bytes().to_vec();
    frame.extend_from_slice(&[0, 4, 0, 0, 0, 0, 0, 42]);
    stream.write_all(&frame).await.unwrap();
    assert_eq!(response(&mut stream).await, Some((42, ErrorCode::FrameTooLarge)));
    closed(&mut stream).await;

    // The same when the head arrives after the prefix, in another segment.
    let mut stream = connect(&broker).await;
    stream.set_nodelay(true).unwrap();
    stream.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    stream.write_all(&[0, 4, 0, 0, 0, 0, 0, 44]).await.unwrap();
    assert_eq!(response(&mut stream).await, Some((44, ErrorCode::FrameTooLarge)));
    closed(&mut stream).await;

    // A frame just over frame_bytes_max: the same.
    let mut stream = connect(&broker).await;
    let mut frame = ((2u32 << 20) + 1).to_be_bytes().to_vec();
    frame.extend_from_slice(&[0, 4, 0, 0, 0, 0, 0, 43]);
    stream.write_all(&frame).await.unwrap();
    assert_eq!(response(&mut stream).await, Some((43, ErrorCode::FrameTooLarge)));
    closed(&mut stream).await;

    // A request before the handshake is refused, the connection stays usable.
    let mut stream = connect(&broker).await;
    stream
        .write_all(&request_frame(3, 5, &[0, 0, 0, 0]))
        .await
        .unwrap();
    assert_eq!(
        response(&mut stream).await,
        Some((5, ErrorCode::HandshakeRequired))
    );
    handshake(&mut stream).await;
    // An unknown api key: answered, and the connection goes on.
    stream
        .write_all(&request_frame(999, 6, b"whatever"))
        .await
        .unwrap();
    assert_eq!(response(&mut stream).await, Some((6, ErrorCode::UnknownApiKey)));
    // A malformed body (a produce cut short): answered, and the connection goes on.
    stream.write_all(&request_frame(4, 7, &[2, 0, 0])).await.unwrap();
    assert_eq!(
        response(&mut stream).await,
        Some((7, ErrorCode::MalformedRequest))
    );
    stream.write_all(&request_frame(0, 8, &[])).await.unwrap();
    assert_eq!(response(&mut stream).await, Some((8, ErrorCode::None)));

    // Random bytes: answered or closed, never a hang or a crash.
    let mut stream = connect(&broker).await;
    let mut seed = 0x2545_f491_u32;
    let noise: Vec<u8> = (0..300)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed as u8
        })
        .collect();
    stream.write_all(&noise).await.unwrap();
    closed(&mut stream).await;

    // Half a frame, then silence: closed after request_receive_ms_max.
    let mut stream = connect(&broker).await;
    handshake(&mut stream).await;
    let mut half = 100u32.to_be_bytes().to_vec();
    half.extend_from_slice(&[0; 10]);
    stream.write_all(&half).await.unwrap();
    closed(&mut stream).await;

    // A silent connection: closed after connection_idle_ms_max.
    let mut stream = connect(&broker).await;
    closed(&mut stream).await;

    // The honest client was served throughout.
    let before = acked.load(Ordering::Acquire);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while acked.load(Ordering::Acquire) < before + 20 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the honest producer stalled"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::Release);
    honest.await.unwrap();
    let total = acked.load(Ordering::Acquire) as usize;
    let mut consumer = Consumer::connect(ConsumerConfig::new(broker.address()))
        .await
        .unwrap();
    consumer
        .assign("honest", None, None, StartFrom::Earliest)
        .await
        .unwrap();
    let mut seen = 0;
    while seen < total {
        assert!(
            tokio::time::Instant::now() < deadline + DEADLINE,
            "consumed {seen} of {total}"
        );
        seen += consumer.poll().await.unwrap().len();
    }
    assert_eq!(seen, total);
    broker.stop().await;
}

/// Reads one response frame whatever its size, keeping only the header.
async fn response_len(stream: &mut TcpStream) -> (u32, ErrorCode, usize) {
    let mut length = [0u8; 4];
    stream.read_exact(&mut length).await.unwrap();
    let length = u32::from_be_bytes(length) as usize;
    let mut head = [0u8; 6];
    stream.read_exact(&mut head).await.unwrap();
    let mut left = length - 6;
    let mut sink = vec![0u8; 1 << 16];
    while left > 0 {
        let n = stream.read(&mut sink[..left.min(1 << 16)]).await.unwrap();
        assert!(n > 0, "closed mid-response");
        left -= n;
    }
    let correlation_id = u32::from_be_bytes(head[0..4].try_into().unwrap());
    let code = ErrorCode::from_u16(u16::from_be_bytes(head[4..6].try_into().unwrap())).unwrap();
    (correlation_id, code, length)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_cannot_multiply_into_a_huge_response() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), |_| {}).await;
    let mut stream = connect(&broker).await;
    handshake(&mut stream).await;
    // A produce naming 5000 partitions × 8 lanes of a topic whose (invalid) name is
    // 249 control characters, every batch empty: 40,000 errors to report.
    let name = vec![1u8; 249];
    let partitions: u32 = 5_000;
    let mut body = vec![1u8];
    body.extend_from_slice(&1000u32.to_be_bytes());
    body.extend_from_slice(&1u32.to_be_bytes());
    body.extend_from_slice(&(name.len() as u16).to_be_bytes());
    body.extend_from_slice(&name);
    body.extend_from_slice(&partitions.to_be_bytes());
    for partition in 0..partitions {
        body.extend_from_slice(&partition.to_be_bytes());
        body.extend_from_slice(&8u32.to_be_bytes());
        for lane in 0..8u8 {
            body.push(lane);
            body.extend_from_slice(&0u32.to_be_bytes());
        }
    }
    let frame = request_frame(4, 2, &body);
    stream.write_all(&frame).await.unwrap();
    let (id, code, length) = tokio::time::timeout(DEADLINE, response_len(&mut stream))
        .await
        .unwrap();
    assert_eq!((id, code), (2, ErrorCode::None));
    assert!(
        length < 10 * frame.len(),
        "a request of {} bytes made a response of {length} bytes",
        frame.len()
    );
    // Metadata naming one topic many times describes it once.
    let mut metadata = Vec::new();
    metadata.extend_from_slice(&1000u32.to_be_bytes());
    for _ in 0..1000 {
        metadata.extend_from_slice(&6u16.to_be_bytes());
        metadata.extend_from_slice(b"orders");
    }
    stream.write_all(&request_frame(3, 3, &metadata)).await.unwrap();
    let (id, code, length) = tokio::time::timeout(DEADLINE, response_len(&mut stream))
        .await
        .unwrap();
    assert_eq!((id, code), (3, ErrorCode::None));
    assert!(length < 200, "{length} bytes for one unknown topic");
    broker.stop().await;
}
