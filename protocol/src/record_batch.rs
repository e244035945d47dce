//! Record batches: the unit of produce, storage and fetch.
//!
//! A producer builds a batch with [`RecordBatchBuilder`]; the broker checks it with
//! [`validate_batch`], stamps the base offset with [`stamp_base_offset`] and appends the
//! bytes unchanged; a fetch returns those same bytes; the consumer checks the checksum
//! again with [`RecordBatch::new`] and iterates records as [`Bytes`] slices of the batch,
//! without copying. The layout follows Kafka's record batch v2, simplified.
//!
//! All integers are big-endian. The checksum is CRC-32 (IEEE, as computed by crc32fast)
//! of every byte after the checksum field, so the broker can stamp the base offset
//! without recomputing it.
//!
//! | offset | size | field               | meaning                                                   |
//! |-------:|-----:|---------------------|-----------------------------------------------------------|
//! |      0 |    8 | `base_offset`       | offset of the first record; 0 from the producer, set by the broker |
//! |      8 |    4 | `crc`               | CRC-32 of bytes `12..batch_length`                        |
//! |     12 |    4 | `batch_length`      | size of the whole batch in bytes, header included         |
//! |     16 |    1 | `magic`             | format version, 1                                         |
//! |     17 |    1 | `attributes`        | 0; bits 0–2 will name a compression codec                 |
//! |     18 |    2 | `producer_epoch`    | i16, -1 when the producer is not idempotent               |
//! |     20 |    4 | `record_count`      | u32, at least 1                                           |
//! |     24 |    4 | `last_offset_delta` | u32, `record_count - 1` (offsets in a batch are dense)    |
//! |     28 |    8 | `first_timestamp`   | i64 ms since the Unix epoch; record timestamps are deltas from it |
//! |     36 |    8 | `max_timestamp`     | i64 ms, the largest record timestamp in the batch         |
//! |     44 |    8 | `producer_id`       | i64, -1 when the producer is not idempotent               |
//! |     52 |    4 | `base_sequence`     | i32 sequence of the first record, -1 when not idempotent  |
//! |     56 |    … | records             | `record_count` records, laid out as below                 |
//!
//! Each record; `varint` is a zigzag varint (see [`crate::varint`]):
//!
//! | field               | type     | meaning                                          |
//! |---------------------|----------|--------------------------------------------------|
//! | `length`            | varint   | bytes in the rest of this record                  |
//! | `attributes`        | u8       | 0, reserved                                       |
//! | `timestamp_delta`   | varint   | record timestamp minus `first_timestamp`          |
//! | `offset_delta`      | varint   | record offset minus `base_offset`: 0, 1, 2, …     |
//! | `key_length`        | varint   | -1 for no key                                     |
//! | `key`               | bytes    |                                                   |
//! | `value_length`      | varint   | ≥ 0                                               |
//! | `value`             | bytes    |                                                   |
//! | `header_count`      | varint   | ≥ 0                                               |
//! | `header_key_length` | varint   | ≥ 0, then the key bytes                           |
//! | `header_value_length` | varint | -1 for no value, then the value bytes             |

use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};

use crate::Offset;
use crate::varint::{get_varint, put_varint, varint_len};

/// Size of the fixed batch header; records start here.
pub const HEADER_BYTES: usize = 56;
/// Bytes a scanner must read to learn a batch's base offset and length.
pub const LENGTH_PREFIX_BYTES: usize = 16;
/// The only batch format version so far.
pub const MAGIC: u8 = 1;
/// `producer_id`, `producer_epoch` and `base_sequence` of a batch from a producer that
/// is not idempotent.
pub const NO_PRODUCER_ID: i64 = -1;
pub const NO_PRODUCER_EPOCH: i16 = -1;
pub const NO_SEQUENCE: i32 = -1;

const BASE_OFFSET_AT: usize = 0;
const CRC_AT: usize = 8;
const BATCH_LENGTH_AT: usize = 12;
const MAGIC_AT: usize = 16;
const ATTRIBUTES_AT: usize = 17;
const PRODUCER_EPOCH_AT: usize = 18;
const RECORD_COUNT_AT: usize = 20;
const LAST_OFFSET_DELTA_AT: usize = 24;
const FIRST_TIMESTAMP_AT: usize = 28;
const MAX_TIMESTAMP_AT: usize = 36;
const PRODUCER_ID_AT: usize = 44;
const BASE_SEQUENCE_AT: usize = 52;
/// The checksum covers everything after itself; the base offset stays outside it.
const CRC_COVERS_FROM: usize = CRC_AT + 4;

const _: () = assert!(BASE_SEQUENCE_AT + 4 == HEADER_BYTES);
const _: () = assert!(BATCH_LENGTH_AT + 4 == LENGTH_PREFIX_BYTES);
const _: () = assert!(BASE_OFFSET_AT + 8 == CRC_AT && CRC_COVERS_FROM == BATCH_LENGTH_AT);

/// Bounds a batch must respect; the broker's limits come from its configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchLimits {
    pub batch_bytes_max: u32,
    pub batch_records_max: u32,
}

impl Default for BatchLimits {
    fn default() -> Self {
        BatchLimits {
            batch_bytes_max: 1 << 20,
            batch_records_max: 1 << 16,
        }
    }
}

/// Why a batch was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("batch is truncated: {needed} bytes needed, {available} available")]
    Truncated { needed: usize, available: usize },
    #[error("batch length {length} is out of range {min}..={max}")]
    LengthOutOfRange { length: u64, min: u64, max: u64 },
    #[error("batch length field says {length} bytes but {actual} were given")]
    LengthMismatch { length: usize, actual: usize },
    #[error("unsupported batch format version (magic) {0}")]
    UnsupportedMagic(u8),
    #[error("checksum mismatch: batch says {expected:#010x}, its bytes give {actual:#010x}")]
    ChecksumMismatch { expected: u32, actual: u32 },
    #[error("unsupported batch attributes {0:#04x}")]
    UnsupportedAttributes(u8),
    #[error("record count {count} is out of range 1..={max}")]
    RecordCountOutOfRange { count: u32, max: u32 },
    #[error("last offset delta {last_offset_delta} does not fit record count {record_count}")]
    LastOffsetDeltaMismatch {
        last_offset_delta: u32,
        record_count: u32,
    },
    #[error("record {index} is malformed: {reason}")]
    MalformedRecord { index: u32, reason: &'static str },
    #[error("max timestamp {header} differs from the records' largest timestamp {records}")]
    MaxTimestampMismatch { header: i64, records: i64 },
    #[error(
        "invalid producer fields: id {producer_id}, epoch {producer_epoch}, base sequence {base_sequence}"
    )]
    InvalidProducerFields {
        producer_id: i64,
        producer_epoch: i16,
        base_sequence: i32,
    },
}

fn read_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

fn read_u64(buf: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(buf[at..at + 8].try_into().expect("8 bytes"))
}

fn read_i64(buf: &[u8], at: usize) -> i64 {
    read_u64(buf, at) as i64
}

/// Reads the base offset and total length of the batch at the start of `buf` from its
/// first [`LENGTH_PREFIX_BYTES`], or `None` if `buf` is shorter than that. The values
/// are unchecked: a scanner compares them with what it expects.
pub fn peek_prefix(buf: &[u8]) -> Option<(Offset, u32)> {
    if buf.len() < LENGTH_PREFIX_BYTES {
        return None;
    }
    Some((
        Offset(read_u64(buf, BASE_OFFSET_AT)),
        read_u32(buf, BATCH_LENGTH_AT),
    ))
}

/// Sums the record counts of the whole batches in `buf` (concatenated, as a fetch
/// returns them), from their headers alone; stops at anything that is not a whole batch.
pub fn count_records(buf: &[u8]) -> u64 {
    let mut at = 0;
    let mut records = 0u64;
    while let Some((_, length)) = peek_prefix(&buf[at..]) {
        let length = length as usize;
        if length < HEADER_BYTES || at + length > buf.len() {
            break;
        }
        records += u64::from(read_u32(&buf[at..], RECORD_COUNT_AT));
        at += length;
    }
    records
}

/// Writes the broker-assigned offset of the batch's first record. Does not touch the
/// checksum, which does not cover this field.
pub fn stamp_base_offset(batch: &mut [u8], base_offset: Offset) {
    batch[BASE_OFFSET_AT..BASE_OFFSET_AT + 8].copy_from_slice(&base_offset.0.to_be_bytes());
}

/// Rewrites a finished batch's producer fields and checksum: how a producer renumbers
/// a batch whose predecessor failed for good. `batch` must hold exactly one batch.
pub fn restamp_producer(batch: &mut [u8], producer: ProducerStamp) {
    assert!(batch.len() >= HEADER_BYTES, "a whole batch");
    batch[PRODUCER_EPOCH_AT..PRODUCER_EPOCH_AT + 2].copy_from_slice(&producer.producer_epoch.to_be_bytes());
    batch[PRODUCER_ID_AT..PRODUCER_ID_AT + 8].copy_from_slice(&producer.producer_id.to_be_bytes());
    batch[BASE_SEQUENCE_AT..BASE_SEQUENCE_AT + 4].copy_from_slice(&producer.base_sequence.to_be_bytes());
    let crc = crc32fast::hash(&batch[CRC_COVERS_FROM..]);
    batch[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_be_bytes());
}

/// The fixed-size header of a batch, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchHeader {
    pub base_offset: Offset,
    pub crc: u32,
    pub batch_length: u32,
    pub magic: u8,
    pub attributes: u8,
    pub producer_epoch: i16,
    pub record_count: u32,
    pub last_offset_delta: u32,
    pub first_timestamp_ms: i64,
    pub max_timestamp_ms: i64,
    pub producer_id: i64,
    pub base_sequence: i32,
}

impl BatchHeader {
    /// Decodes the header fields at the start of `buf` without checking them.
    pub fn parse(buf: &[u8]) -> Result<BatchHeader, BatchError> {
        if buf.len() < HEADER_BYTES {
            return Err(BatchError::Truncated {
                needed: HEADER_BYTES,
                available: buf.len(),
            });
        }
        Ok(BatchHeader {
            base_offset: Offset(read_u64(buf, BASE_OFFSET_AT)),
            crc: read_u32(buf, CRC_AT),
            batch_length: read_u32(buf, BATCH_LENGTH_AT),
            magic: buf[MAGIC_AT],
            attributes: buf[ATTRIBUTES_AT],
            producer_epoch: i16::from_be_bytes([buf[PRODUCER_EPOCH_AT], buf[PRODUCER_EPOCH_AT + 1]]),
            record_count: read_u32(buf, RECORD_COUNT_AT),
            last_offset_delta: read_u32(buf, LAST_OFFSET_DELTA_AT),
            first_timestamp_ms: read_i64(buf, FIRST_TIMESTAMP_AT),
            max_timestamp_ms: read_i64(buf, MAX_TIMESTAMP_AT),
            producer_id: read_i64(buf, PRODUCER_ID_AT),
            base_sequence: read_u32(buf, BASE_SEQUENCE_AT) as i32,
        })
    }

    /// Offset of the last record in the batch.
    pub fn last_offset(&self) -> Offset {
        self.base_offset.plus(u64::from(self.last_offset_delta))
    }

    /// Offset that follows the batch.
    pub fn next_offset(&self) -> Offset {
        self.last_offset().plus(1)
    }

    /// Whether the batch comes from an idempotent producer.
    pub fn has_producer_id(&self) -> bool {
        self.producer_id != NO_PRODUCER_ID
    }

    /// Sequence number of the batch's last record; sequences wrap from `i32::MAX` to 0.
    pub fn last_sequence(&self) -> i32 {
        sequence_plus(self.base_sequence, self.last_offset_delta)
    }
}

/// `sequence + delta`, wrapping from `i32::MAX` to 0 as producer sequences do.
pub fn sequence_plus(sequence: i32, delta: u32) -> i32 {
    let modulus = i64::from(i32::MAX) + 1;
    ((i64::from(sequence) + i64::from(delta)) % modulus) as i32
}

/// Checks a batch completely: header bounds, format version, checksum, producer fields
/// and the structure of every record. `batch` must hold exactly one batch. Reads the
/// bytes once for the checksum and walks the records once; copies nothing.
pub fn validate_batch(batch: &[u8], limits: BatchLimits) -> Result<BatchHeader, BatchError> {
    let header = check_header_and_checksum(batch, limits)?;
    let records_max_timestamp = walk_records(batch, &header)?;
    if records_max_timestamp != header.max_timestamp_ms {
        return Err(BatchError::MaxTimestampMismatch {
            header: header.max_timestamp_ms,
            records: records_max_timestamp,
        });
    }
    Ok(header)
}

fn check_header_and_checksum(batch: &[u8], limits: BatchLimits) -> Result<BatchHeader, BatchError> {
    let header = BatchHeader::parse(batch)?;
    let length = header.batch_length as usize;
    if length < HEADER_BYTES || header.batch_length > limits.batch_bytes_max {
        return Err(BatchError::LengthOutOfRange {
            length: u64::from(header.batch_length),
            min: HEADER_BYTES as u64,
            max: u64::from(limits.batch_bytes_max),
        });
    }
    if length != batch.len() {
        return Err(BatchError::LengthMismatch {
            length,
            actual: batch.len(),
        });
    }
    if header.magic != MAGIC {
        return Err(BatchError::UnsupportedMagic(header.magic));
    }
    let actual = crc32fast::hash(&batch[CRC_COVERS_FROM..]);
    if actual != header.crc {
        return Err(BatchError::ChecksumMismatch {
            expected: header.crc,
            actual,
        });
    }
    if header.attributes != 0 {
        return Err(BatchError::UnsupportedAttributes(header.attributes));
    }
    if header.record_count == 0 || header.record_count > limits.batch_records_max {
        return Err(BatchError::RecordCountOutOfRange {
            count: header.record_count,
            max: limits.batch_records_max,
        });
    }
    if header.last_offset_delta != header.record_count - 1 {
        return Err(BatchError::LastOffsetDeltaMismatch {
            last_offset_delta: header.last_offset_delta,
            record_count: header.record_count,
        });
    }
    let idempotent = header.producer_id >= 0 && header.producer_epoch >= 0 && header.base_sequence >= 0;
    let anonymous = header.producer_id == NO_PRODUCER_ID
        && header.producer_epoch == NO_PRODUCER_EPOCH
        && header.base_sequence == NO_SEQUENCE;
    if !idempotent && !anonymous {
        return Err(BatchError::InvalidProducerFields {
            producer_id: header.producer_id,
            producer_epoch: header.producer_epoch,
            base_sequence: header.base_sequence,
        });
    }
    Ok(header)
}

/// Where one record's parts lie in its batch.
#[derive(Clone, Debug)]
struct RecordLayout {
    timestamp_ms: i64,
    key: Option<Range<usize>>,
    value: Range<usize>,
    headers: Range<usize>,
    header_count: u32,
}

/// Walks the records of a batch whose header is already checked and returns the largest
/// record timestamp.
fn walk_records(batch: &[u8], header: &BatchHeader) -> Result<i64, BatchError> {
    let mut at = HEADER_BYTES;
    let mut max_timestamp_ms = i64::MIN;
    for index in 0..header.record_count {
        let (layout, end) = parse_record(batch, at, header.first_timestamp_ms, index)?;
        max_timestamp_ms = max_timestamp_ms.max(layout.timestamp_ms);
        at = end;
    }
    if at != batch.len() {
        return Err(BatchError::MalformedRecord {
            index: header.record_count,
            reason: "bytes remain after the last record",
        });
    }
    Ok(max_timestamp_ms)
}

/// A bounds-checked reader over one record's bytes.
struct Cursor<'a> {
    buf: &'a [u8],
    at: usize,
    end: usize,
    index: u32,
}

impl Cursor<'_> {
    #[cold]
    fn malformed(&self, reason: &'static str) -> BatchError {
        BatchError::MalformedRecord {
            index: self.index,
            reason,
        }
    }

    #[inline]
    fn varint(&mut self) -> Result<i64, BatchError> {
        let (value, len) = get_varint(&self.buf[self.at..self.end])
            .map_err(|_| self.malformed("bad or truncated varint"))?;
        self.at += len;
        Ok(value)
    }

    #[inline]
    fn u8(&mut self) -> Result<u8, BatchError> {
        if self.at >= self.end {
            return Err(self.malformed("truncated"));
        }
        self.at += 1;
        Ok(self.buf[self.at - 1])
    }

    /// Takes `length` bytes, where -1 means absent if `nullable`.
    #[inline]
    fn bytes(&mut self, length: i64, nullable: bool) -> Result<Option<Range<usize>>, BatchError> {
        if length == -1 && nullable {
            return Ok(None);
        }
        let length = usize::try_from(length).map_err(|_| self.malformed("negative length"))?;
        if length > self.end - self.at {
            return Err(self.malformed("length runs past the record"));
        }
        self.at += length;
        Ok(Some(self.at - length..self.at))
    }
}

fn parse_record(
    batch: &[u8],
    at: usize,
    first_timestamp_ms: i64,
    index: u32,
) -> Result<(RecordLayout, usize), BatchError> {
    let (length, length_len) = get_varint(&batch[at..]).map_err(|_| BatchError::MalformedRecord {
        index,
        reason: "bad or truncated record length",
    })?;
    let body_start = at + length_len;
    let end = usize::try_from(length)
        .ok()
        .and_then(|length| body_start.checked_add(length))
        .filter(|&end| end <= batch.len())
        .ok_or(BatchError::MalformedRecord {
            index,
            reason: "record length runs past the batch",
        })?;
    let mut cursor = Cursor {
        buf: batch,
        at: body_start,
        end,
        index,
    };
    if cursor.u8()? != 0 {
        return Err(cursor.malformed("unsupported record attributes"));
    }
    let timestamp_delta = cursor.varint()?;
    let timestamp_ms = first_timestamp_ms
        .checked_add(timestamp_delta)
        .ok_or_else(|| cursor.malformed("timestamp overflows"))?;
    if cursor.varint()? != i64::from(index) {
        return Err(cursor.malformed("offset delta is not the record's index"));
    }
    let key_length = cursor.varint()?;
    let key = cursor.bytes(key_length, true)?;
    let value_length = cursor.varint()?;
    let value = cursor
        .bytes(value_length, false)?
        .expect("values are not nullable");
    let header_count = cursor.varint()?;
    let header_count = u32::try_from(header_count).map_err(|_| cursor.malformed("bad header count"))?;
    let headers_start = cursor.at;
    for _ in 0..header_count {
        let key_length = cursor.varint()?;
        cursor.bytes(key_length, false)?;
        let value_length = cursor.varint()?;
        cursor.bytes(value_length, true)?;
    }
    if cursor.at != end {
        return Err(cursor.malformed("record length does not match its fields"));
    }
    let layout = RecordLayout {
        timestamp_ms,
        key,
        value,
        headers: headers_start..end,
        header_count,
    };
    Ok((layout, end))
}

/// A checked batch over shared bytes. Its records borrow nothing and copy nothing:
/// keys, values and headers are [`Bytes`] slices of the batch.
#[derive(Clone, Debug)]
pub struct RecordBatch {
    bytes: Bytes,
    header: BatchHeader,
}

impl RecordBatch {
    /// Checks `bytes` (exactly one batch) as the broker does on append, checksum included.
    pub fn new(bytes: Bytes, limits: BatchLimits) -> Result<RecordBatch, BatchError> {
        let header = validate_batch(&bytes, limits)?;
        Ok(RecordBatch { bytes, header })
    }

    pub fn header(&self) -> &BatchHeader {
        &self.header
    }

    /// The batch's bytes, as stored and sent.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    pub fn base_offset(&self) -> Offset {
        self.header.base_offset
    }

    pub fn last_offset(&self) -> Offset {
        self.header.last_offset()
    }

    pub fn record_count(&self) -> u32 {
        self.header.record_count
    }

    pub fn records(&self) -> Records<'_> {
        Records {
            batch: self,
            at: HEADER_BYTES,
            index: 0,
        }
    }
}

/// Iterator over the records of a [`RecordBatch`].
#[derive(Debug)]
pub struct Records<'a> {
    batch: &'a RecordBatch,
    at: usize,
    index: u32,
}

impl Iterator for Records<'_> {
    type Item = Record;

    fn next(&mut self) -> Option<Record> {
        let header = &self.batch.header;
        if self.index == header.record_count {
            return None;
        }
        let bytes = &self.batch.bytes;
        let (layout, end) = parse_record(bytes, self.at, header.first_timestamp_ms, self.index)
            .expect("a RecordBatch is validated when it is made");
        let record = Record {
            offset: header.base_offset.plus(u64::from(self.index)),
            timestamp_ms: layout.timestamp_ms,
            key: layout.key.map(|range| bytes.slice(range)),
            value: bytes.slice(layout.value),
            headers: Headers {
                bytes: bytes.slice(layout.headers),
                remaining: layout.header_count,
            },
        };
        self.at = end;
        self.index += 1;
        Some(record)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = (self.batch.header.record_count - self.index) as usize;
        (left, Some(left))
    }
}

impl ExactSizeIterator for Records<'_> {}

/// One record of a batch. Key, value and headers share the batch's memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub offset: Offset,
    pub timestamp_ms: i64,
    pub key: Option<Bytes>,
    pub value: Bytes,
    pub headers: Headers,
}

/// The headers of one record, decoded lazily as they are iterated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Headers {
    bytes: Bytes,
    remaining: u32,
}

/// One record header: a key and an optional value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub key: Bytes,
    pub value: Option<Bytes>,
}

impl Iterator for Headers {
    type Item = Header;

    fn next(&mut self) -> Option<Header> {
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        // The batch was validated, so these reads stay in bounds.
        let (key_length, len) = get_varint(&self.bytes).expect("validated header");
        let key_start = len;
        let key = self.bytes.slice(key_start..key_start + key_length as usize);
        let value_at = key_start + key_length as usize;
        let (value_length, len) = get_varint(&self.bytes[value_at..]).expect("validated header");
        let value_start = value_at + len;
        let (value, end) = if value_length < 0 {
            (None, value_start)
        } else {
            let end = value_start + value_length as usize;
            (Some(self.bytes.slice(value_start..end)), end)
        };
        self.bytes = self.bytes.slice(end..);
        Some(Header { key, value })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining as usize, Some(self.remaining as usize))
    }
}

impl ExactSizeIterator for Headers {}

/// The producer fields a batch is stamped with when it is finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProducerStamp {
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
}

impl ProducerStamp {
    /// The stamp of a producer that is not idempotent.
    pub const NONE: ProducerStamp = ProducerStamp {
        producer_id: NO_PRODUCER_ID,
        producer_epoch: NO_PRODUCER_EPOCH,
        base_sequence: NO_SEQUENCE,
    };
}

/// Why a record could not be added to a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// The batch cannot take this record; finish it and start another.
    #[error("the batch is full")]
    BatchFull,
    /// Not even an empty batch can hold this record.
    #[error("a record of {record_bytes} bytes does not fit in a batch of at most {batch_bytes_max} bytes")]
    RecordTooLarge {
        record_bytes: usize,
        batch_bytes_max: u32,
    },
    /// The record's timestamp is too far from the batch's first timestamp to encode.
    #[error("record timestamp {0} is too far from the batch's first timestamp")]
    TimestampOutOfRange(i64),
}

/// Encodes records into one batch, respecting [`BatchLimits`].
#[derive(Debug)]
pub struct RecordBatchBuilder {
    buf: BytesMut,
    limits: BatchLimits,
    record_count: u32,
    first_timestamp_ms: i64,
    max_timestamp_ms: i64,
}

impl RecordBatchBuilder {
    pub fn new(limits: BatchLimits) -> RecordBatchBuilder {
        RecordBatchBuilder::with_buffer(BytesMut::new(), limits)
    }

    /// Builds into `buf` (cleared first), so a producer can reuse allocations.
    pub fn with_buffer(mut buf: BytesMut, limits: BatchLimits) -> RecordBatchBuilder {
        buf.clear();
        buf.put_bytes(0, HEADER_BYTES);
        RecordBatchBuilder {
            buf,
            limits,
            record_count: 0,
            first_timestamp_ms: 0,
            max_timestamp_ms: i64::MIN,
        }
    }

    /// The bounds `push` keeps the batch within.
    pub fn limits(&self) -> BatchLimits {
        self.limits
    }

    pub fn record_count(&self) -> u32 {
        self.record_count
    }

    pub fn is_empty(&self) -> bool {
        self.record_count == 0
    }

    /// Size the batch would have if finished now.
    pub fn len_bytes(&self) -> usize {
        self.buf.len()
    }

    /// Adds one record. `headers` are `(key, value)` pairs.
    pub fn push(
        &mut self,
        timestamp_ms: i64,
        key: Option<&[u8]>,
        value: &[u8],
        headers: &[(&[u8], Option<&[u8]>)],
    ) -> Result<(), BuildError> {
        let first_timestamp_ms = if self.is_empty() {
            timestamp_ms
        } else {
            self.first_timestamp_ms
        };
        let timestamp_delta = timestamp_ms
            .checked_sub(first_timestamp_ms)
            .ok_or(BuildError::TimestampOutOfRange(timestamp_ms))?;
        let offset_delta = i64::from(self.record_count);
        let body_len = 1
            + varint_len(timestamp_delta)
            + varint_len(offset_delta)
            + nullable_len(key)
            + nullable_len(Some(value))
            + varint_len(headers.len() as i64)
            + headers
                .iter()
                .map(|(key, value)| nullable_len(Some(key)) + nullable_len(*value))
                .sum::<usize>();
        let record_len = varint_len(body_len as i64) + body_len;
        if self.buf.len() + record_len > self.limits.batch_bytes_max as usize
            || self.record_count == self.limits.batch_records_max
        {
            return Err(if self.is_empty() {
                BuildError::RecordTooLarge {
                    record_bytes: record_len,
                    batch_bytes_max: self.limits.batch_bytes_max,
                }
            } else {
                BuildError::BatchFull
            });
        }
        let start = self.buf.len();
        put_varint(&mut self.buf, body_len as i64);
        self.buf.put_u8(0);
        put_varint(&mut self.buf, timestamp_delta);
        put_varint(&mut self.buf, offset_delta);
        put_nullable(&mut self.buf, key);
        put_nullable(&mut self.buf, Some(value));
        put_varint(&mut self.buf, headers.len() as i64);
        for (key, value) in headers {
            put_nullable(&mut self.buf, Some(key));
            put_nullable(&mut self.buf, *value);
        }
        debug_assert_eq!(self.buf.len() - start, record_len);
        self.first_timestamp_ms = first_timestamp_ms;
        self.max_timestamp_ms = self.max_timestamp_ms.max(timestamp_ms);
        self.record_count += 1;
        Ok(())
    }

    /// Writes the header and checksum and returns the batch. Base offset is 0 until the
    /// broker stamps it.
    pub fn finish(mut self, producer: ProducerStamp) -> Bytes {
        assert!(!self.is_empty(), "a batch holds at least one record");
        let length = u32::try_from(self.buf.len()).expect("bounded by batch_bytes_max");
        let header = &mut self.buf[..HEADER_BYTES];
        header[BATCH_LENGTH_AT..BATCH_LENGTH_AT + 4].copy_from_slice(&length.to_be_bytes());
        header[MAGIC_AT] = MAGIC;
        header[ATTRIBUTES_AT] = 0;
        header[PRODUCER_EPOCH_AT..PRODUCER_EPOCH_AT + 2]
            .copy_from_slice(&producer.producer_epoch.to_be_bytes());
        header[RECORD_COUNT_AT..RECORD_COUNT_AT + 4].copy_from_slice(&self.record_count.to_be_bytes());
        header[LAST_OFFSET_DELTA_AT..LAST_OFFSET_DELTA_AT + 4]
            .copy_from_slice(&(self.record_count - 1).to_be_bytes());
        header[FIRST_TIMESTAMP_AT..FIRST_TIMESTAMP_AT + 8]
            .copy_from_slice(&self.first_timestamp_ms.to_be_bytes());
        header[MAX_TIMESTAMP_AT..MAX_TIMESTAMP_AT + 8].copy_from_slice(&self.max_timestamp_ms.to_be_bytes());
        header[PRODUCER_ID_AT..PRODUCER_ID_AT + 8].copy_from_slice(&producer.producer_id.to_be_bytes());
        header[BASE_SEQUENCE_AT..BASE_SEQUENCE_AT + 4].copy_from_slice(&producer.base_sequence.to_be_bytes());
        let crc = crc32fast::hash(&self.buf[CRC_COVERS_FROM..]);
        self.buf[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_be_bytes());
        self.buf.freeze()
    }
}

fn nullable_len(bytes: Option<&[u8]>) -> usize {
    match bytes {
        None => varint_len(-1),
        Some(bytes) => varint_len(bytes.len() as i64) + bytes.len(),
    }
}

fn put_nullable(buf: &mut BytesMut, bytes: Option<&[u8]>) {
    match bytes {
        None => put_varint(buf, -1),
        Some(bytes) => {
            put_varint(buf, bytes.len() as i64);
            buf.put_slice(bytes);
        }
    }
}

/// Splits concatenated batches (a fetch response's bytes for one lane log) into checked
/// batches. Stops with an error at the first batch that fails its checks.
#[derive(Debug)]
pub struct Batches {
    bytes: Bytes,
    limits: BatchLimits,
}

impl Batches {
    pub fn new(bytes: Bytes, limits: BatchLimits) -> Batches {
        Batches { bytes, limits }
    }
}

impl Iterator for Batches {
    type Item = Result<RecordBatch, BatchError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.bytes.is_empty() {
            return None;
        }
        let Some((_, length)) = peek_prefix(&self.bytes) else {
            let available = self.bytes.len();
            self.bytes.clear();
            return Some(Err(BatchError::Truncated {
                needed: LENGTH_PREFIX_BYTES,
                available,
            }));
        };
        let length = length as usize;
        if length < HEADER_BYTES || length > self.bytes.len() {
            let available = self.bytes.len();
            self.bytes.clear();
            return Some(Err(BatchError::Truncated {
                needed: length.max(HEADER_BYTES),
                available,
            }));
        }
        let batch = self.bytes.split_to(length);
        let result = RecordBatch::new(batch, self.limits);
        if result.is_err() {
            self.bytes.clear();
        }
        Some(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    type Headers<'a> = Vec<(&'a [u8], Option<&'a [u8]>)>;

    fn sample_batch() -> Bytes {
        let mut builder = RecordBatchBuilder::new(BatchLimits::default());
        builder.push(1_000, Some(b"order-1"), b"placed", &[]).unwrap();
        let headers: Headers<'_> = vec![(b"trace", Some(b"abc")), (b"empty", None)];
        builder.push(1_005, None, b"paid", &headers).unwrap();
        builder.push(990, Some(b""), b"", &[]).unwrap();
        builder.finish(ProducerStamp {
            producer_id: 7,
            producer_epoch: 2,
            base_sequence: 40,
        })
    }

    #[test]
    fn builds_and_reads_back() {
        let mut bytes = BytesMut::from(&sample_batch()[..]);
        stamp_base_offset(&mut bytes, Offset(100));
        let batch = RecordBatch::new(bytes.freeze(), BatchLimits::default()).unwrap();
        let header = batch.header();
        assert_eq!(header.base_offset, Offset(100));
        assert_eq!(header.record_count, 3);
        assert_eq!(header.last_offset(), Offset(102));
        assert_eq!(header.first_timestamp_ms, 1_000);
        assert_eq!(header.max_timestamp_ms, 1_005);
        assert_eq!((header.producer_id, header.producer_epoch), (7, 2));
        assert_eq!((header.base_sequence, header.last_sequence()), (40, 42));

        let records: Vec<Record> = batch.records().collect();
        assert_eq!(records.len(), 3);
        assert_eq!(records[0].offset, Offset(100));
        assert_eq!(records[0].key.as_deref(), Some(&b"order-1"[..]));
        assert_eq!(&records[0].value[..], b"placed");
        assert_eq!(records[1].key, None);
        assert_eq!(records[1].timestamp_ms, 1_005);
        let headers: Vec<Header> = records[1].headers.clone().collect();
        assert_eq!(headers.len(), 2);
        assert_eq!(&headers[0].key[..], b"trace");
        assert_eq!(headers[0].value.as_deref(), Some(&b"abc"[..]));
        assert_eq!(headers[1].value, None);
        assert_eq!(records[2].key.as_deref(), Some(&b""[..]));
        assert_eq!(records[2].timestamp_ms, 990);
    }

    #[test]
    fn records_share_the_batch_memory() {
        let batch = RecordBatch::new(sample_batch(), BatchLimits::default()).unwrap();
        let range = batch.bytes().as_ptr_range();
        for record in batch.records() {
            assert!(range.contains(&record.value.as_ptr()) || record.value.is_empty());
        }
    }

    #[test]
    fn stamping_the_offset_keeps_the_checksum_valid() {
        let mut bytes = BytesMut::from(&sample_batch()[..]);
        stamp_base_offset(&mut bytes, Offset(u64::MAX - 10));
        assert!(validate_batch(&bytes, BatchLimits::default()).is_ok());
    }

    #[test]
    fn every_flipped_bit_after_the_offset_is_caught() {
        let original = sample_batch();
        for byte in CRC_AT..original.len() {
            for bit in 0..8 {
                let mut bytes = original.to_vec();
                bytes[byte] ^= 1 << bit;
                assert!(
                    validate_batch(&bytes, BatchLimits::default()).is_err(),
                    "flip of bit {bit} in byte {byte} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        let original = sample_batch();
        for cut in 0..original.len() {
            assert!(validate_batch(&original[..cut], BatchLimits::default()).is_err());
        }
    }

    #[test]
    fn limits_are_enforced() {
        let batch = sample_batch();
        let small = BatchLimits {
            batch_bytes_max: batch.len() as u32 - 1,
            ..BatchLimits::default()
        };
        assert!(matches!(
            validate_batch(&batch, small),
            Err(BatchError::LengthOutOfRange { .. })
        ));
        let few = BatchLimits {
            batch_records_max: 2,
            ..BatchLimits::default()
        };
        assert!(matches!(
            validate_batch(&batch, few),
            Err(BatchError::RecordCountOutOfRange { count: 3, max: 2 })
        ));
    }

    #[test]
    fn builder_respects_limits() {
        let limits = BatchLimits {
            batch_bytes_max: 100,
            batch_records_max: 2,
        };
        let mut builder = RecordBatchBuilder::new(limits);
        assert!(matches!(
            builder.push(0, None, &[0; 100], &[]),
            Err(BuildError::RecordTooLarge { .. })
        ));
        builder.push(0, None, b"a", &[]).unwrap();
        builder.push(0, None, b"b", &[]).unwrap();
        assert_eq!(builder.push(0, None, b"c", &[]), Err(BuildError::BatchFull));
        let batch = builder.finish(ProducerStamp::NONE);
        assert!(batch.len() <= 100);
        assert!(validate_batch(&batch, limits).is_ok());
    }

    #[test]
    fn a_lying_max_timestamp_is_refused() {
        let mut bytes = sample_batch().to_vec();
        bytes[MAX_TIMESTAMP_AT..MAX_TIMESTAMP_AT + 8].copy_from_slice(&5_000i64.to_be_bytes());
        let crc = crc32fast::hash(&bytes[CRC_COVERS_FROM..]);
        bytes[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_be_bytes());
        assert_eq!(
            validate_batch(&bytes, BatchLimits::default()),
            Err(BatchError::MaxTimestampMismatch {
                header: 5_000,
                records: 1_005
            })
        );
    }

    #[test]
    fn restamping_keeps_the_batch_valid() {
        let mut bytes = sample_batch().to_vec();
        let stamp = ProducerStamp {
            producer_id: 99,
            producer_epoch: 4,
            base_sequence: 1000,
        };
        restamp_producer(&mut bytes, stamp);
        let header = validate_batch(&bytes, BatchLimits::default()).unwrap();
        assert_eq!(
            (header.producer_id, header.producer_epoch, header.base_sequence),
            (99, 4, 1000)
        );
    }

    #[test]
    fn sequences_wrap() {
        assert_eq!(sequence_plus(i32::MAX, 1), 0);
        assert_eq!(sequence_plus(i32::MAX - 1, 3), 1);
        assert_eq!(sequence_plus(5, 0), 5);
    }

    #[test]
    fn splits_concatenated_batches() {
        let one = sample_batch();
        let mut all = BytesMut::new();
        all.extend_from_slice(&one);
        all.extend_from_slice(&one);
        let parsed: Vec<_> = Batches::new(all.clone().freeze(), BatchLimits::default()).collect();
        assert_eq!(parsed.len(), 2);
        assert!(parsed.iter().all(Result::is_ok));
        all.truncate(all.len() - 1);
        let parsed: Vec<_> = Batches::new(all.freeze(), BatchLimits::default()).collect();
        assert_eq!(parsed.len(), 2);
        assert!(parsed[0].is_ok() && parsed[1].is_err());
    }

    /// Timestamp, key, value and headers of one generated record.
    type ArbRecord = (i64, Option<Vec<u8>>, Vec<u8>, Vec<(Vec<u8>, Option<Vec<u8>>)>);

    fn arb_record() -> impl Strategy<Value = ArbRecord> {
        (
            -1_000_000i64..1_000_000,
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
            proptest::collection::vec(any::<u8>(), 0..200),
            proptest::collection::vec(
                (
                    proptest::collection::vec(any::<u8>(), 0..10),
                    proptest::option::of(proptest::collection::vec(any::<u8>(), 0..10)),
                ),
                0..3,
            ),
        )
    }

    proptest! {
        #[test]
        fn roundtrip(records in proptest::collection::vec(arb_record(), 1..20), base in 0u64..1 << 60) {
            let mut builder = RecordBatchBuilder::new(BatchLimits::default());
            for (timestamp, key, value, headers) in &records {
                let headers: Headers<'_> = headers.iter().map(|(k, v)| (&k[..], v.as_deref())).collect();
                builder.push(*timestamp, key.as_deref(), value, &headers).unwrap();
            }
            let mut bytes = BytesMut::from(&builder.finish(ProducerStamp::NONE)[..]);
            stamp_base_offset(&mut bytes, Offset(base));
            let batch = RecordBatch::new(bytes.freeze(), BatchLimits::default()).unwrap();
            prop_assert_eq!(batch.records().len(), records.len());
            for (index, (record, (timestamp, key, value, headers))) in batch.records().zip(&records).enumerate() {
                prop_assert_eq!(record.offset, Offset(base + index as u64));
                prop_assert_eq!(record.timestamp_ms, *timestamp);
                prop_assert_eq!(record.key.as_deref(), key.as_deref());
                prop_assert_eq!(&record.value[..], &value[..]);
                let read: Vec<(Vec<u8>, Option<Vec<u8>>)> = record
                    .headers
                    .map(|h| (h.key.to_vec(), h.value.map(|v| v.to_vec())))
                    .collect();
                prop_assert_eq!(&read, headers);
            }
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = validate_batch(&bytes, BatchLimits::default());
            let _ = Batches::new(Bytes::from(bytes), BatchLimits::default()).count();
        }

        /// Bytes that pass the checksum but have a broken record structure are refused,
        /// never panic: rewrite the records region with arbitrary bytes and fix the crc.
        #[test]
        fn garbage_records_with_a_good_checksum_never_panic(
            tail in proptest::collection::vec(any::<u8>(), 0..200),
            count in 1u32..5,
        ) {
            let mut bytes = sample_batch()[..HEADER_BYTES].to_vec();
            bytes.extend_from_slice(&tail);
            let length = bytes.len() as u32;
            bytes[BATCH_LENGTH_AT..BATCH_LENGTH_AT + 4].copy_from_slice(&length.to_be_bytes());
            bytes[RECORD_COUNT_AT..RECORD_COUNT_AT + 4].copy_from_slice(&count.to_be_bytes());
            bytes[LAST_OFFSET_DELTA_AT..LAST_OFFSET_DELTA_AT + 4].copy_from_slice(&(count - 1).to_be_bytes());
            let crc = crc32fast::hash(&bytes[CRC_COVERS_FROM..]);
            bytes[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_be_bytes());
            if let Ok(batch) = RecordBatch::new(Bytes::from(bytes), BatchLimits::default()) {
                for record in batch.records() {
                    let _ = record.headers.count();
                }
            }
        }
    }
}
