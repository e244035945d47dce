//! Primitive wire types: how integers, strings, byte strings and arrays are written.
//!
//! | type       | encoding                                                          |
//! |------------|-------------------------------------------------------------------|
//! | `u8`…`u64`, `i16`…`i64` | big-endian, fixed width                              |
//! | `bool`     | `u8`: 0 or 1                                                      |
//! | `string`   | `u16` byte length, then that many bytes of UTF-8                  |
//! | `bytes`    | `u32` byte length, then that many bytes                           |
//! | `array<T>` | `u32` element count, then the elements                            |
//!
//! Decoding never trusts a length: every string has a per-field maximum, and an array
//! count must fit in the bytes that remain (each element takes at least one byte), so a
//! hostile count cannot make the decoder allocate more than the frame it came in.

use bytes::{BufMut, Bytes, BytesMut};

/// Why a message could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("message is truncated: {field} needs {needed} more bytes")]
    Truncated { field: &'static str, needed: usize },
    #[error("{field} is {length} bytes, more than its maximum of {max}")]
    TooLong {
        field: &'static str,
        length: usize,
        max: usize,
    },
    #[error("{field} is not valid UTF-8")]
    InvalidUtf8 { field: &'static str },
    #[error("{field} has invalid value {value}")]
    InvalidValue { field: &'static str, value: i64 },
    #[error("{0} bytes remain after the end of the message")]
    TrailingBytes(usize),
}

/// Reads wire types from the front of a frame. Byte strings are split off the frame
/// without copying.
#[derive(Debug)]
pub struct Reader {
    buf: BytesMut,
}

macro_rules! get_int {
    ($name:ident, $ty:ty) => {
        pub fn $name(&mut self, field: &'static str) -> Result<$ty, DecodeError> {
            const N: usize = std::mem::size_of::<$ty>();
            let bytes = self.take(N, field)?;
            Ok(<$ty>::from_be_bytes(bytes[..].try_into().expect("N bytes")))
        }
    };
}

impl Reader {
    pub fn new(buf: BytesMut) -> Reader {
        Reader { buf }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    fn take(&mut self, n: usize, field: &'static str) -> Result<BytesMut, DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated {
                field,
                needed: n - self.buf.len(),
            });
        }
        Ok(self.buf.split_to(n))
    }

    get_int!(u8, u8);
    get_int!(u16, u16);
    get_int!(u32, u32);
    get_int!(u64, u64);
    get_int!(i16, i16);
    get_int!(i32, i32);
    get_int!(i64, i64);

    pub fn bool(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(DecodeError::InvalidValue {
                field,
                value: i64::from(other),
            }),
        }
    }

    /// A string of at most `max` bytes.
    pub fn string(&mut self, field: &'static str, max: usize) -> Result<String, DecodeError> {
        let length = self.u16(field)? as usize;
        if length > max {
            return Err(DecodeError::TooLong { field, length, max });
        }
        let bytes = self.take(length, field)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::InvalidUtf8 { field })
    }

    /// A byte string, split off the frame (no copy), of at most `max` bytes.
    pub fn bytes_mut(&mut self, field: &'static str, max: usize) -> Result<BytesMut, DecodeError> {
        let length = self.u32(field)? as usize;
        if length > max {
            return Err(DecodeError::TooLong { field, length, max });
        }
        self.take(length, field)
    }

    pub fn bytes(&mut self, field: &'static str, max: usize) -> Result<Bytes, DecodeError> {
        self.bytes_mut(field, max).map(BytesMut::freeze)
    }

    /// An array count, at most `max`, and no more than the remaining bytes could hold at
    /// `element_bytes_min` bytes per element.
    pub fn array_len(
        &mut self,
        field: &'static str,
        max: usize,
        element_bytes_min: usize,
    ) -> Result<usize, DecodeError> {
        let count = self.u32(field)? as usize;
        if count > max {
            return Err(DecodeError::TooLong {
                field,
                length: count,
                max,
            });
        }
        let needed = count.saturating_mul(element_bytes_min.max(1));
        if needed > self.buf.len() {
            return Err(DecodeError::Truncated {
                field,
                needed: needed - self.buf.len(),
            });
        }
        Ok(count)
    }

    /// Reads an array of `T`s with `read` for each element.
    pub fn array<T>(
        &mut self,
        field: &'static str,
        max: usize,
        element_bytes_min: usize,
        mut read: impl FnMut(&mut Reader) -> Result<T, DecodeError>,
    ) -> Result<Vec<T>, DecodeError> {
        let count = self.array_len(field, max, element_bytes_min)?;
        let mut items = Vec::with_capacity(count);
        for _ in 0..count {
            items.push(read(self)?);
        }
        Ok(items)
    }

    /// Fails if anything is left: a message must use its whole frame.
    pub fn finish(self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes(self.buf.len()))
        }
    }
}

/// Byte strings at least this long are not copied into the frame: the writer keeps them
/// as their own chunk, so a fetch response sends record bytes straight from storage.
const SPLICE_BYTES_MIN: usize = 4096;

/// Writes wire types into a frame made of chunks: small fields are copied into a
/// buffer, large byte strings are kept as they are, by reference.
#[derive(Debug, Default)]
pub struct Writer {
    /// The first buffer, kept mutable once a splice has ended it, so that a frame's
    /// length prefix can still be filled in.
    head: Option<BytesMut>,
    chunks: Vec<Bytes>,
    buf: BytesMut,
    /// Bytes written, not counting a frame's length prefix.
    len: usize,
}

macro_rules! put_int {
    ($name:ident, $ty:ty) => {
        pub fn $name(&mut self, value: $ty) {
            self.buf.extend_from_slice(&value.to_be_bytes());
            self.len += std::mem::size_of::<$ty>();
        }
    };
}

impl Writer {
    pub fn new() -> Writer {
        Writer::default()
    }

    /// A writer for a whole frame: starts with room for the `u32` length prefix that
    /// [`Writer::into_frame`] fills in.
    pub fn frame() -> Writer {
        let mut writer = Writer::default();
        writer.buf.extend_from_slice(&[0; 4]);
        writer
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    put_int!(u8, u8);
    put_int!(u16, u16);
    put_int!(u32, u32);
    put_int!(u64, u64);
    put_int!(i16, i16);
    put_int!(i32, i32);
    put_int!(i64, i64);

    pub fn bool(&mut self, value: bool) {
        self.u8(u8::from(value));
    }

    /// A string; callers keep strings within their field's maximum (≤ 65535 bytes).
    pub fn string(&mut self, value: &str) {
        let length = u16::try_from(value.len()).expect("strings are bounded below 64 KiB");
        self.u16(length);
        self.buf.extend_from_slice(value.as_bytes());
        self.len += value.len();
    }

    /// A byte string; a large one is kept by reference instead of copied.
    pub fn bytes(&mut self, value: &Bytes) {
        let length = u32::try_from(value.len()).expect("byte strings are bounded below 4 GiB");
        self.u32(length);
        if value.len() >= SPLICE_BYTES_MIN {
            if self.head.is_none() {
                self.head = Some(self.buf.split());
            } else if !self.buf.is_empty() {
                self.chunks.push(self.buf.split().freeze());
            }
            self.chunks.push(value.clone());
        } else {
            self.buf.put_slice(value);
        }
        self.len += value.len();
    }

    pub fn array_len(&mut self, count: usize) {
        self.u32(u32::try_from(count).expect("arrays are bounded"));
    }

    /// Writes `items` as an array, each with `write`.
    pub fn array<T>(&mut self, items: &[T], mut write: impl FnMut(&mut Writer, &T)) {
        self.array_len(items.len());
        for item in items {
            write(self, item);
        }
    }

    /// The written bytes as chunks, in order.
    pub fn into_chunks(self) -> Vec<Bytes> {
        let mut out = Vec::with_capacity(self.chunks.len() + 2);
        out.extend(self.head.map(BytesMut::freeze));
        out.extend(self.chunks);
        if !self.buf.is_empty() {
            out.push(self.buf.freeze());
        }
        out
    }

    /// The frame begun by [`Writer::frame`], with its length prefix filled in.
    pub fn into_frame(mut self) -> Vec<Bytes> {
        let length = u32::try_from(self.len).expect("frames are bounded below 4 GiB");
        let head = self.head.as_mut().unwrap_or(&mut self.buf);
        assert!(head.len() >= 4, "into_frame needs a writer made by Writer::frame");
        head[..4].copy_from_slice(&length.to_be_bytes());
        self.into_chunks()
    }

    /// The written bytes as one buffer (copies spliced chunks; for tests and small messages).
    pub fn into_bytes(self) -> BytesMut {
        let mut out = BytesMut::with_capacity(self.len);
        for chunk in self.into_chunks() {
            out.extend_from_slice(&chunk);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primitives_roundtrip() {
        let mut writer = Writer::new();
        writer.u8(7);
        writer.u16(513);
        writer.i64(-5);
        writer.bool(true);
        writer.string("lané");
        let big = Bytes::from(vec![9u8; 5000]);
        writer.bytes(&Bytes::from_static(b"small"));
        writer.bytes(&big);
        writer.array(&[1u32, 2, 3], |w, v| w.u32(*v));
        let total = writer.len();
        let chunks = writer.into_chunks();
        assert!(
            chunks.iter().any(|c| c.as_ptr() == big.as_ptr()),
            "large bytes are not copied"
        );
        let mut joined = BytesMut::new();
        for chunk in &chunks {
            joined.extend_from_slice(chunk);
        }
        assert_eq!(joined.len(), total);

        let mut reader = Reader::new(joined);
        assert_eq!(reader.u8("a").unwrap(), 7);
        assert_eq!(reader.u16("b").unwrap(), 513);
        assert_eq!(reader.i64("c").unwrap(), -5);
        assert!(reader.bool("d").unwrap());
        assert_eq!(reader.string("e", 10).unwrap(), "lané");
        assert_eq!(&reader.bytes("f", 10).unwrap()[..], b"small");
        assert_eq!(reader.bytes("g", 10_000).unwrap(), big);
        assert_eq!(reader.array("h", 10, 4, |r| r.u32("x")).unwrap(), vec![1, 2, 3]);
        reader.finish().unwrap();
    }

    #[test]
    fn hostile_lengths_are_refused_before_allocating() {
        let mut writer = Writer::new();
        writer.u32(u32::MAX);
        let mut reader = Reader::new(writer.into_bytes());
        assert!(matches!(
            reader.array_len("items", usize::MAX, 1),
            Err(DecodeError::Truncated { .. })
        ));
        let mut writer = Writer::new();
        writer.u16(300);
        let mut reader = Reader::new(writer.into_bytes());
        assert!(matches!(
            reader.string("name", 249),
            Err(DecodeError::TooLong { .. })
        ));
        let mut reader = Reader::new(BytesMut::from(&[2u8][..]));
        assert!(matches!(
            reader.bool("flag"),
            Err(DecodeError::InvalidValue { .. })
        ));
        let reader = Reader::new(BytesMut::from(&[0u8][..]));
        assert_eq!(reader.finish(), Err(DecodeError::TrailingBytes(1)));
    }
}
