//! The async client connection that producers, consumers and admin commands share.
//!
//! [`Client::connect`] opens a TCP connection and does the ApiVersions handshake. Any
//! number of tasks may then call [`Client::request`] at once: requests are pipelined
//! (at most `requests_in_flight_max` outstanding) and the broker answers in order, so
//! each reply is matched to the oldest outstanding request and its correlation id is
//! checked. When the connection fails, every outstanding request fails with it and the
//! client is closed; callers reconnect.
//!
//! Requests are written in the order they are queued. A caller whose requests must
//! reach the broker in order (a producer's batches of one lane log) queues them one
//! after another with [`Client::queue`] and waits for the responses side by side:
//! polling several [`Client::request`] futures at once does not fix their order, since
//! one that yields (its task's cooperative budget spent, say) is polled again after
//! those behind it.

use std::collections::VecDeque;
use std::io;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_util::codec::FramedRead;

use crate::ErrorCode;
use crate::api::{
    ApiKey, RequestBody, ResponseHeader, decode_response_body, decode_response_header, encode_request,
};
use crate::codec::{FrameCodec, write_frames};
use crate::messages::{ApiVersionsRequest, ApiVersionsRequestV0, ApiVersionsResponse};
use crate::wire::{DecodeError, Reader};

#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Sent in every request header, for the broker's logs.
    pub client_id: String,
    pub requests_in_flight_max: usize,
    /// Largest response frame accepted; must exceed the largest fetch response.
    pub frame_bytes_max: usize,
    pub connect_timeout: Duration,
    /// How long a request may wait for its response.
    pub request_timeout: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            client_id: "lanes".into(),
            requests_in_flight_max: 64,
            frame_bytes_max: 64 << 20,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("connection to {0} is closed")]
    Closed(String),
    #[error("no response within {0:?}")]
    Timeout(Duration),
    #[error("malformed response: {0}")]
    Decode(#[from] DecodeError),
    #[error("{code}: {message}")]
    Broker { code: ErrorCode, message: String },
    #[error("the broker does not support {0:?}")]
    Unsupported(ApiKey),
}

impl ClientError {
    /// The broker's error code, if the broker refused the request.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Broker { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether the connection is gone (as opposed to one request failing).
    pub fn is_connection_lost(&self) -> bool {
        matches!(
            self,
            ClientError::Closed(_) | ClientError::Connect { .. } | ClientError::Timeout(_)
        )
    }
}

type Reply = oneshot::Sender<Result<(ResponseHeader, Reader), ClientError>>;

struct Outgoing {
    frame: Vec<Bytes>,
    reply: Option<(u32, Reply)>,
}

/// Requests waiting for their responses, oldest first.
type Pending = Arc<Mutex<VecDeque<(u32, Reply)>>>;

/// One connection to a broker. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Client {
    addr: Arc<str>,
    config: ClientConfig,
    outgoing: mpsc::Sender<Outgoing>,
    in_flight: Arc<Semaphore>,
    next_correlation_id: AtomicU32,
    closed: Arc<AtomicBool>,
    versions: ApiVersionsResponse,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outgoing").finish_non_exhaustive()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Client {
    /// Connects to `addr` and does the version handshake.
    pub async fn connect(addr: &str, config: ClientConfig) -> Result<Client, ClientError> {
        let connect_error = |source| ClientError::Connect {
            addr: addr.to_owned(),
            source,
        };
        let stream = tokio::time::timeout(config.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| connect_error(io::ErrorKind::TimedOut.into()))?
            .map_err(connect_error)?;
        stream.set_nodelay(true).map_err(connect_error)?;
        let (outgoing, receiver) = mpsc::channel(config.requests_in_flight_max.max(1));
        let closed = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(run_connection(
            stream,
            receiver,
            config.frame_bytes_max,
            addr.to_owned(),
            Arc::clone(&closed),
        ));
        let mut client = Client {
            addr: Arc::from(addr),
            in_flight: Arc::new(Semaphore::new(config.requests_in_flight_max.max(1))),
            config,
            outgoing,
            next_correlation_id: AtomicU32::new(1),
            closed,
            // Replaced by the handshake's answer before `connect` returns.
            versions: ApiVersionsResponse {
                apis: Vec::new(),
                broker_version: String::new(),
                batch_bytes_max: None,
            },
            task,
        };
        client.versions = match client.request_unchecked(&ApiVersionsRequest).await {
            // A broker from before version 1: the handshake is not done yet.
            Err(error) if error.code() == Some(ErrorCode::UnsupportedVersion) => {
                client.request_unchecked(&ApiVersionsRequestV0).await?.0
            }
            answer => answer?,
        };
        Ok(client)
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// What the broker said it supports.
    pub fn broker_versions(&self) -> &ApiVersionsResponse {
        &self.versions
    }

    /// How many requests may await their responses at once.
    pub fn requests_in_flight_max(&self) -> usize {
        self.config.requests_in_flight_max.max(1)
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Sends `request` and waits for its response. A response whose header carries an
    /// error code is returned as [`ClientError::Broker`].
    pub async fn request<R: RequestBody>(&self, request: &R) -> Result<R::Response, ClientError> {
        if self.versions.common_version(R::API_KEY).is_none() {
            return Err(ClientError::Unsupported(R::API_KEY));
        }
        self.request_unchecked(request).await
    }

    /// Queues `request` behind every request queued before it (waiting for a free
    /// in-flight slot) and returns the wait for its response.
    pub async fn queue<R: RequestBody>(&self, request: &R) -> Result<PendingResponse<R>, ClientError> {
        if self.versions.common_version(R::API_KEY).is_none() {
            return Err(ClientError::Unsupported(R::API_KEY));
        }
        self.queue_unchecked(request).await
    }

    async fn request_unchecked<R: RequestBody>(&self, request: &R) -> Result<R::Response, ClientError> {
        self.queue_unchecked(request).await?.wait().await
    }

    async fn queue_unchecked<R: RequestBody>(&self, request: &R) -> Result<PendingResponse<R>, ClientError> {
        let permit = Arc::clone(&self.in_flight)
            .acquire_owned()
            .await
            .map_err(|_| self.closed_error())?;
        let correlation_id = self.next_correlation_id.fetch_add(1, Ordering::Relaxed);
        let frame = encode_request(correlation_id, &self.config.client_id, request);
        let (reply, response) = oneshot::channel();
        self.outgoing
            .send(Outgoing {
                frame,
                reply: Some((correlation_id, reply)),
            })
            .await
            .map_err(|_| self.closed_error())?;
        Ok(PendingResponse {
            response,
            timeout: self.config.request_timeout,
            addr: Arc::clone(&self.addr),
            _permit: permit,
            _request: PhantomData,
        })
    }

    /// Sends a request that gets no response (a produce with `acks = none`); waits at
    /// most `request_timeout` for room in the outgoing queue.
    pub async fn send_only<R: RequestBody>(&self, request: &R) -> Result<(), ClientError> {
        let correlation_id = self.next_correlation_id.fetch_add(1, Ordering::Relaxed);
        let frame = encode_request(correlation_id, &self.config.client_id, request);
        tokio::time::timeout(
            self.config.request_timeout,
            self.outgoing.send(Outgoing { frame, reply: None }),
        )
        .await
        .map_err(|_| ClientError::Timeout(self.config.request_timeout))?
        .map_err(|_| self.closed_error())
    }

    fn closed_error(&self) -> ClientError {
        ClientError::Closed(self.addr.to_string())
    }
}

/// A queued request's response to come; holds its in-flight slot until dropped.
#[derive(Debug)]
pub struct PendingResponse<R> {
    response: oneshot::Receiver<Result<(ResponseHeader, Reader), ClientError>>,
    timeout: Duration,
    addr: Arc<str>,
    _permit: OwnedSemaphorePermit,
    _request: PhantomData<fn() -> R>,
}

impl<R: RequestBody> PendingResponse<R> {
    /// Waits at most `request_timeout` for the response. A response whose header
    /// carries an error code is returned as [`ClientError::Broker`].
    pub async fn wait(self) -> Result<R::Response, ClientError> {
        let (header, reader) = tokio::time::timeout(self.timeout, self.response)
            .await
            .map_err(|_| ClientError::Timeout(self.timeout))?
            .map_err(|_| ClientError::Closed(self.addr.to_string()))??;
        if header.error_code != ErrorCode::None {
            return Err(ClientError::Broker {
                code: header.error_code,
                message: header.error_message,
            });
        }
        Ok(decode_response_body(reader)?)
    }
}

/// Writes requests and reads responses until the connection fails or the client goes.
async fn run_connection(
    stream: TcpStream,
    mut outgoing: mpsc::Receiver<Outgoing>,
    frame_bytes_max: usize,
    addr: String,
    closed: Arc<AtomicBool>,
) {
    let (read_half, mut write_half) = stream.into_split();
    let pending: Pending = Arc::default();
    let writer = {
        let pending = Arc::clone(&pending);
        async move {
            let mut frames = Vec::new();
            while let Some(first) = outgoing.recv().await {
                // Write whatever else is queued with it, in one go.
                let mut next = Some(first);
                while let Some(out) = next {
                    if let Some(reply) = out.reply {
                        pending.lock().expect("pending lock").push_back(reply);
                    }
                    frames.push(out.frame);
                    next = if frames.len() < 64 {
                        outgoing.try_recv().ok()
                    } else {
                        None
                    };
                }
                write_frames(&mut write_half, &frames).await?;
                frames.clear();
            }
            Ok::<(), io::Error>(())
        }
    };
    let reader = {
        let pending = Arc::clone(&pending);
        async move {
            let mut frames = FramedRead::new(read_half, FrameCodec::new(frame_bytes_max));
            while let Some(frame) = frames.next().await {
                let Ok(frame) = frame else { return };
                let Some((expected, reply)) = pending.lock().expect("pending lock").pop_front() else {
                    return; // a response nobody asked for: the stream cannot be trusted
                };
                match decode_response_header(frame) {
                    Ok((header, reader)) if header.correlation_id == expected => {
                        let _ = reply.send(Ok((header, reader)));
                    }
                    Ok(_) => return,
                    Err(error) => {
                        let _ = reply.send(Err(ClientError::Decode(error)));
                        return;
                    }
                }
            }
        }
    };
    tokio::select! {
        _ = writer => {}
        () = reader => {}
    }
    closed.store(true, Ordering::Release);
    for (_, reply) in pending.lock().expect("pending lock").drain(..) {
        let _ = reply.send(Err(ClientError::Closed(addr.clone())));
    }
}
