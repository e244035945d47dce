//! The formats Lanes speaks, with no I/O: record batches (the unit of produce, storage
//! and fetch), and the wire protocol's frames, requests, responses and error codes.
//!
//! Everything here encodes into `BytesMut` chunks and decodes from `BytesMut` or
//! `&[u8]`; nothing here knows about sockets or files. Producers build batches with
//! [`RecordBatchBuilder`], the broker validates them with [`validate_batch`] and stores
//! the bytes as they are, and consumers read them back with [`RecordBatch`].
//! docs/PROTOCOL.md describes every byte on the wire.

pub mod api;
#[cfg(feature = "client")]
pub mod client;
#[cfg(feature = "codec")]
pub mod codec;
mod error_code;
mod ids;
pub mod messages;
pub mod partitioner;
pub mod record_batch;
pub mod varint;
pub mod wire;

pub use api::{ApiKey, Request, RequestBody, RequestError, RequestHeader, ResponseBody, ResponseHeader};
pub use error_code::ErrorCode;
pub use ids::{LANES_MAX, Lane, Offset, PartitionId};
pub use record_batch::{
    BatchError, BatchHeader, BatchLimits, Batches, BuildError, Header, Headers, ProducerStamp, Record,
    RecordBatch, RecordBatchBuilder, validate_batch,
};
