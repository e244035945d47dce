//! One client connection: read frames, dispatch them, write the responses in order.
//!
//! Bounds, all from the settings:
//! - a frame longer than `frame_bytes_max` is answered with `FRAME_TOO_LARGE` (to the
//!   correlation id in its first bytes) and the connection is closed, without reading it;
//! - before a frame's body is read, its length is reserved from the broker-wide
//!   `requests_bytes_max` budget, released when its response is written: when the budget
//!   is spent, connections wait, so request memory has one bound for the whole broker;
//! - at most `requests_in_flight_max` requests per connection; beyond that the broker
//!   stops reading and TCP pushes back;
//! - a frame must arrive whole within `request_receive_ms_max` of the previous one ending
//!   (a slow or stalled sender is cut off), a response must be taken within
//!   `response_send_ms_max`, and a connection with nothing to do is closed after
//!   `connection_idle_ms_max`.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use lanes_protocol::ErrorCode;
use lanes_protocol::api::encode_error_response;
use lanes_protocol::codec::{FrameCodec, FrameError, LENGTH_BYTES, write_frame};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::{AcquireError, OwnedSemaphorePermit};
use tokio::time::Instant;
use tokio_util::codec::Decoder;
use tokio_util::sync::CancellationToken;

use super::Broker;
use super::dispatch::{Reply, ResponseFuture, Session, dispatch};

/// How much the read buffer grows by when no large frame is being received.
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// Less spare room than this in the read buffer, and it grows before the next read.
const READ_ROOM_BYTES_MIN: usize = 1024;

type Acquire = Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>;

/// The state of one connection between reads.
struct Connection {
    broker: Arc<Broker>,
    peer: SocketAddr,
    codec: FrameCodec,
    buf: BytesMut,
    in_flight: FuturesOrdered<ResponseFuture>,
    session: Session,
    /// No more requests are read; in-flight ones are answered, then it closes.
    closing: bool,
    /// Memory reserved for the frame being received.
    reserved: Option<OwnedSemaphorePermit>,
    acquiring: Option<Acquire>,
    /// When the frame now partly in the buffer began to arrive.
    partial_since: Option<Instant>,
    /// When the connection last did anything.
    active_at: Instant,
}

pub(super) async fn serve(
    broker: Arc<Broker>,
    stream: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let (mut reader, mut writer) = stream.into_split();
    let now = Instant::now();
    let mut connection = Connection {
        codec: FrameCodec::new(broker.settings.frame_bytes_max as usize),
        broker,
        peer,
        buf: BytesMut::new(),
        in_flight: FuturesOrdered::new(),
        session: Session::default(),
        closing: false,
        reserved: None,
        acquiring: None,
        partial_since: None,
        active_at: now,
    };
    let settings = connection.broker.settings.clone();
    let in_flight_max = settings.requests_in_flight_max as usize;
    let send_max = Duration::from_millis(settings.response_send_ms_max);
    loop {
        connection.take_frames(in_flight_max, &shutdown);
        if connection.closing && connection.in_flight.is_empty() {
            break;
        }
        connection.reserve_for_next_frame();
        connection.make_room_to_read();
        let frame_bytes_max = settings.frame_bytes_max as usize;
        let can_read = !connection.closing
            && connection.in_flight.len() < in_flight_max
            && match FrameCodec::pending_frame_len(&connection.buf) {
                None => true,
                // Too large: read on, so the codec sees the head it answers to.
                Some(length) if length > frame_bytes_max => true,
                Some(_) => connection.reserved.is_some(),
            };
        if !can_read && connection.partial_since.is_some() {
            // The clock for receiving a request only runs while the broker reads: a
            // client is not cut off for waiting on the broker's own limits.
            connection.partial_since = Some(Instant::now());
        }
        let deadline = connection.deadline(&settings);
        tokio::select! {
            biased;
            Some(reply) = connection.in_flight.next(), if !connection.in_flight.is_empty() => {
                connection.active_at = Instant::now();
                if let Some(frame) = reply {
                    match tokio::time::timeout(send_max, write_frame(&mut writer, &frame)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(error)) => {
                            tracing::debug!(peer = %connection.peer, %error, "write failed; closing");
                            return;
                        }
                        Err(_) => {
                            tracing::info!(peer = %connection.peer, "client did not take a response within response_send_ms_max; closing");
                            return;
                        }
                    }
                }
            }
            () = shutdown.cancelled(), if !connection.closing => connection.closing = true,
            permit = poll_acquire(&mut connection.acquiring), if connection.acquiring.is_some() => {
                connection.acquiring = None;
                match permit {
                    Ok(permit) => connection.reserved = Some(permit),
                    Err(_) => connection.closing = true,
                }
            }
            read = reader.read_buf(&mut connection.buf), if can_read => match read {
                Ok(0) => connection.closing = true,
                Ok(_) => {
                    connection.active_at = Instant::now();
                    connection.partial_since.get_or_insert(connection.active_at);
                }
                Err(error) => {
                    tracing::debug!(peer = %connection.peer, %error, "read failed; closing");
                    return;
                }
            },
            () = tokio::time::sleep_until(deadline) => {
                if !connection.buf.is_empty() {
                    tracing::info!(peer = %connection.peer, "request not received whole within request_receive_ms_max; closing");
                } else {
                    tracing::debug!(peer = %connection.peer, "idle connection closed");
                }
                return;
            }
        }
    }
}

/// Makes room in a connection's read buffer for the next read.
///
/// For a frame whose memory is reserved (`frame_reserved`: the frame whose length is at
/// the front of `buf`), room for all of its rest at once. Growing a chunk at a time
/// under a produce request of megabytes reallocated, and copied what had arrived of it,
/// at every growth; now only what arrived before its length was known is copied.
///
/// Otherwise a chunk of room, and no more: a buffer left with the room of a large frame
/// once that frame is handled (its memory no longer counted against the broker-wide
/// budget) is swapped for a small one, so an idle connection does not keep megabytes.
fn make_room_to_read(buf: &mut BytesMut, frame_reserved: bool) {
    let spare = buf.capacity() - buf.len();
    if let (Some(length), true) = (FrameCodec::pending_frame_len(buf), frame_reserved) {
        // Nothing more once it is whole: it waits to be handled, and growing the buffer
        // now would copy all of it.
        let frame_rest = (LENGTH_BYTES + length).saturating_sub(buf.len());
        if spare < frame_rest {
            buf.reserve(frame_rest);
        }
        return;
    }
    // What is in the buffer then is at most a read's worth, mostly far less: copying it
    // into a smaller buffer is cheap. A large rest is left to be handled first.
    let oversized = spare > 2 * READ_CHUNK_BYTES && buf.len() <= READ_CHUNK_BYTES;
    if spare < READ_ROOM_BYTES_MIN || oversized {
        let mut fresh = BytesMut::with_capacity(buf.len() + READ_CHUNK_BYTES);
        fresh.extend_from_slice(buf);
        *buf = fresh;
    }
}

async fn poll_acquire(acquiring: &mut Option<Acquire>) -> Result<OwnedSemaphorePermit, AcquireError> {
    acquiring.as_mut().expect("guarded by the select condition").await
}

impl Connection {
    /// Decodes and dispatches every complete frame there is room for.
    fn take_frames(&mut self, in_flight_max: usize, shutdown: &CancellationToken) {
        while !self.closing && self.in_flight.len() < in_flight_max {
            match self.codec.decode(&mut self.buf) {
                Ok(Some(frame)) => {
                    // The next frame, if it has begun, began now.
                    self.partial_since = (!self.buf.is_empty()).then(Instant::now);
                    let reserved = self.reserved.take();
                    let reply = dispatch(&self.broker, frame, &mut self.session, shutdown);
                    self.push(reply, reserved);
                }
                Ok(None) => return,
                Err(FrameError::TooLarge { length, max, head }) => {
                    tracing::warn!(peer = %self.peer, length, max, "frame too large; answering and closing");
                    let correlation_id = u32::from_be_bytes(head[4..8].try_into().expect("8 head bytes"));
                    let message = format!("frame of {length} bytes exceeds frame_bytes_max = {max}");
                    let frame = encode_error_response(correlation_id, ErrorCode::FrameTooLarge, &message);
                    self.in_flight
                        .push_back(Box::pin(std::future::ready(Some(frame))));
                    self.closing = true;
                }
                Err(FrameError::Io(_)) => unreachable!("decoding does no I/O"),
            }
        }
    }

    fn push(&mut self, reply: Reply, reserved: Option<OwnedSemaphorePermit>) {
        let Reply { frame, close } = reply;
        self.closing |= close;
        self.in_flight.push_back(Box::pin(async move {
            let frame = frame.await;
            // The request's memory is released once its response exists.
            drop(reserved);
            frame
        }));
    }

    /// Once the next frame's length is known, reserves that much of the broker-wide
    /// request budget before reading its body.
    fn reserve_for_next_frame(&mut self) {
        if self.closing || self.reserved.is_some() || self.acquiring.is_some() {
            return;
        }
        let Some(length) = FrameCodec::pending_frame_len(&self.buf) else {
            return;
        };
        if length > self.broker.settings.frame_bytes_max as usize {
            return; // refused by the codec, never read
        }
        let permits = u32::try_from(length + 4).expect("frame_bytes_max is validated below 4 GiB - 4");
        let semaphore = Arc::clone(&self.broker.request_bytes);
        match Arc::clone(&semaphore).try_acquire_many_owned(permits) {
            Ok(permit) => self.reserved = Some(permit),
            Err(_) => self.acquiring = Some(Box::pin(semaphore.acquire_many_owned(permits))),
        }
    }

    fn make_room_to_read(&mut self) {
        if !self.closing {
            make_room_to_read(&mut self.buf, self.reserved.is_some());
        }
    }

    fn deadline(&self, settings: &crate::config::Settings) -> Instant {
        if let Some(since) = self.partial_since.filter(|_| !self.buf.is_empty()) {
            since + Duration::from_millis(settings.request_receive_ms_max)
        } else if self.in_flight.is_empty() {
            self.active_at + Duration::from_millis(settings.connection_idle_ms_max)
        } else {
            // Waiting on our own work (a long poll, a durable ack): no timeout here.
            Instant::now() + Duration::from_secs(24 * 3600)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_length_prefix(length: usize, body_bytes: usize) -> BytesMut {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&u32::try_from(length).unwrap().to_be_bytes());
        buf.extend_from_slice(&vec![7; body_bytes]);
        buf
    }

    #[test]
    fn a_reserved_frame_gets_room_for_its_rest_at_once() {
        let length = 1 << 20;
        let mut buf = with_length_prefix(length, 100);
        make_room_to_read(&mut buf, true);
        let start = buf.as_ptr();
        let mut arrived = 100;
        while arrived < length {
            let piece = (length - arrived).min(7_919);
            assert!(
                buf.capacity() - buf.len() >= piece,
                "room for the rest, after {arrived} bytes"
            );
            buf.extend_from_slice(&vec![7; piece]);
            arrived += piece;
            make_room_to_read(&mut buf, true);
            assert_eq!(buf.as_ptr(), start, "the frame moved after {arrived} bytes");
        }
        assert_eq!(buf.len(), LENGTH_BYTES + length);
    }

    #[test]
    fn a_frame_without_reserved_memory_gets_only_a_chunk() {
        let mut buf = with_length_prefix(16 << 20, 0);
        make_room_to_read(&mut buf, false);
        assert!(buf.capacity() >= READ_ROOM_BYTES_MIN);
        assert!(buf.capacity() <= 2 * READ_CHUNK_BYTES, "{}", buf.capacity());
    }

    #[test]
    fn a_buffer_left_large_by_a_handled_frame_is_swapped_for_a_small_one() {
        let length = 4 << 20;
        let mut buf = with_length_prefix(length, 0);
        make_room_to_read(&mut buf, true);
        buf.extend_from_slice(&vec![7; length]);
        // The next frame's first bytes came with the end of this one.
        buf.extend_from_slice(&[0, 0]);
        let frame = buf.split_to(LENGTH_BYTES + length);
        drop(frame);
        make_room_to_read(&mut buf, false);
        assert_eq!(&buf[..], &[0, 0]);
        assert!(buf.capacity() <= 2 * READ_CHUNK_BYTES, "{}", buf.capacity());
        assert!(buf.capacity() - buf.len() >= READ_ROOM_BYTES_MIN);
    }
}
