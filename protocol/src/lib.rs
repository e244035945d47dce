//! The formats Lanes speaks, with no I/O: record batches (the unit of produce, storage
//! and fetch) and, as the wire protocol grows, frames, requests and responses.
//!
//! Everything here encodes into `BytesMut` and decodes from `&[u8]` or `Bytes`; nothing
//! here knows about sockets or files. Producers build batches with
//! [`RecordBatchBuilder`], the broker validates them with [`validate_batch`] and stores
//! the bytes as they are, and consumers read them back with [`RecordBatch`].

mod offset;
pub mod record_batch;
pub mod varint;

pub use offset::Offset;
pub use record_batch::{
    BatchError, BatchHeader, BatchLimits, Batches, BuildError, Header, Headers, ProducerStamp, Record,
    RecordBatch, RecordBatchBuilder, validate_batch,
};
