//! The thin layer between frames and tokio: a `tokio_util` decoder that splits a byte
//! stream into frames with a hard size bound, and a vectored frame writer.

use std::io::{self, IoSlice};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio_util::codec::Decoder;

/// Bytes of the length prefix.
pub const LENGTH_BYTES: usize = 4;
/// Bytes after the length prefix handed back with a frame that is too large, so the
/// receiver can still name the request it refuses (api key, version, correlation id).
pub const OVERSIZED_HEAD_BYTES: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length prefix is above the bound. The connection cannot continue: the rest
    /// of the frame will not be read.
    #[error("frame of {length} bytes exceeds the maximum of {max}")]
    TooLarge {
        length: usize,
        max: usize,
        /// The first bytes after the length prefix.
        head: Bytes,
    },
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Splits `u32`-length-prefixed frames; yields each frame without its prefix.
///
/// A frame longer than `frame_bytes_max` is refused as soon as its prefix and first
/// [`OVERSIZED_HEAD_BYTES`] bytes have arrived, before any of it is buffered: a peer
/// sending a length of 4 GiB costs 12 bytes of memory. (Why a hard cap at all: without
/// one, one hostile length prefix could make the receiver allocate without limit.)
#[derive(Clone, Copy, Debug)]
pub struct FrameCodec {
    frame_bytes_max: usize,
}

impl FrameCodec {
    pub fn new(frame_bytes_max: usize) -> FrameCodec {
        FrameCodec { frame_bytes_max }
    }

    /// The length of the frame at the front of `buf`, once its prefix has arrived.
    pub fn pending_frame_len(buf: &[u8]) -> Option<usize> {
        (buf.len() >= LENGTH_BYTES)
            .then(|| u32::from_be_bytes(buf[..4].try_into().expect("4 bytes")) as usize)
    }
}

impl Decoder for FrameCodec {
    type Item = BytesMut;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, FrameError> {
        let Some(length) = FrameCodec::pending_frame_len(src) else {
            return Ok(None);
        };
        if length > self.frame_bytes_max {
            if src.len() < LENGTH_BYTES + OVERSIZED_HEAD_BYTES {
                return Ok(None);
            }
            let head = Bytes::copy_from_slice(&src[LENGTH_BYTES..LENGTH_BYTES + OVERSIZED_HEAD_BYTES]);
            return Err(FrameError::TooLarge {
                length,
                max: self.frame_bytes_max,
                head,
            });
        }
        if src.len() < LENGTH_BYTES + length {
            return Ok(None);
        }
        src.advance(LENGTH_BYTES);
        Ok(Some(src.split_to(length)))
    }
}

/// Writes a frame made of chunks with vectored writes: large chunks (record bytes from
/// storage) go to the socket without being copied into one buffer first.
pub async fn write_frame<W: AsyncWrite + Unpin>(writer: &mut W, chunks: &[Bytes]) -> io::Result<()> {
    let mut index = 0;
    let mut offset = 0;
    while index < chunks.len() {
        let slices: Vec<IoSlice<'_>> = std::iter::once(&chunks[index][offset..])
            .chain(chunks[index + 1..].iter().map(|c| &c[..]))
            .take(64)
            .map(IoSlice::new)
            .collect();
        let mut written = writer.write_vectored(&slices).await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while index < chunks.len() && written >= chunks[index].len() - offset {
            written -= chunks[index].len() - offset;
            index += 1;
            offset = 0;
        }
        offset += written;
    }
    Ok(())
}

/// Writes several frames with as few syscalls as possible.
pub async fn write_frames<W: AsyncWrite + Unpin>(writer: &mut W, frames: &[Vec<Bytes>]) -> io::Result<()> {
    let chunks: Vec<Bytes> = frames.iter().flatten().cloned().collect();
    write_frame(writer, &chunks).await?;
    writer.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_frames_and_waits_for_partial_ones() {
        let mut codec = FrameCodec::new(100);
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&3u32.to_be_bytes());
        buf.extend_from_slice(b"abc");
        buf.extend_from_slice(&5u32.to_be_bytes());
        buf.extend_from_slice(b"de");
        assert_eq!(&codec.decode(&mut buf).unwrap().unwrap()[..], b"abc");
        assert!(codec.decode(&mut buf).unwrap().is_none());
        buf.extend_from_slice(b"fgh");
        assert_eq!(&codec.decode(&mut buf).unwrap().unwrap()[..], b"defgh");
        assert!(buf.is_empty());
    }

    #[test]
    fn refuses_oversized_frames_from_their_prefix() {
        let mut codec = FrameCodec::new(100);
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&u32::MAX.to_be_bytes());
        buf.extend_from_slice(&[0, 4, 0, 0, 0, 0]);
        assert!(codec.decode(&mut buf).unwrap().is_none(), "waits for the head");
        buf.extend_from_slice(&[0, 9]);
        match codec.decode(&mut buf) {
            Err(FrameError::TooLarge { length, max, head }) => {
                assert_eq!((length, max), (u32::MAX as usize, 100));
                assert_eq!(&head[..], &[0, 4, 0, 0, 0, 0, 0, 9]);
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn writes_chunks_in_order() {
        let chunks = vec![
            Bytes::from_static(b"he"),
            Bytes::from(vec![b'l'; 100_000]),
            Bytes::from_static(b"o"),
        ];
        let mut out = Vec::new();
        write_frame(&mut out, &chunks).await.unwrap();
        assert_eq!(out.len(), 100_003);
        assert_eq!(&out[..3], b"hel");
        assert_eq!(out[100_002], b'o');
    }

    proptest::proptest! {
        #[test]
        fn random_streams_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let mut codec = FrameCodec::new(64);
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = codec.decode(&mut buf) {}
        }
    }
}
