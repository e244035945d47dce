//! Zigzag varints, as in protobuf's `sint64` and Kafka's record format: a signed value
//! is mapped to unsigned (`0, -1, 1, -2, …` → `0, 1, 2, 3, …`) and written 7 bits at a
//! time, least significant group first, with the high bit set on every byte but the last.
//! An `i64` takes 1 to 10 bytes.

use bytes::BufMut;

/// The longest encoding of an `i64`.
pub const VARINT_BYTES_MAX: usize = 10;

/// Why a varint could not be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VarintError {
    #[error("varint is truncated")]
    Truncated,
    #[error("varint is longer than 10 bytes or overflows 64 bits")]
    Overflow,
}

fn zigzag(value: i64) -> u64 {
    ((value << 1) ^ (value >> 63)) as u64
}

fn unzigzag(raw: u64) -> i64 {
    ((raw >> 1) as i64) ^ -((raw & 1) as i64)
}

/// How many bytes [`put_varint`] writes for `value`.
pub fn varint_len(value: i64) -> usize {
    let raw = zigzag(value);
    // 1 byte for 0..=127, one more for every further 7 significant bits.
    let bits = 64 - (raw | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

/// Appends the zigzag varint encoding of `value`.
pub fn put_varint(buf: &mut impl BufMut, value: i64) {
    let mut raw = zigzag(value);
    while raw >= 0x80 {
        buf.put_u8((raw as u8) | 0x80);
        raw >>= 7;
    }
    buf.put_u8(raw as u8);
}

/// Decodes a zigzag varint from the start of `buf`, returning it and its length.
#[inline]
pub fn get_varint(buf: &[u8]) -> Result<(i64, usize), VarintError> {
    // Lengths, deltas and counts are nearly always one or two bytes: decode those
    // without the loop, since the broker walks every record of every batch it appends.
    match *buf {
        [first, ..] if first < 0x80 => Ok((unzigzag(u64::from(first)), 1)),
        [first, second, ..] if second < 0x80 => {
            Ok((unzigzag(u64::from(first & 0x7f) | u64::from(second) << 7), 2))
        }
        _ => get_varint_long(buf),
    }
}

fn get_varint_long(buf: &[u8]) -> Result<(i64, usize), VarintError> {
    let mut raw: u64 = 0;
    for (index, &byte) in buf.iter().take(VARINT_BYTES_MAX).enumerate() {
        let shift = 7 * index as u32;
        let group = u64::from(byte & 0x7f);
        // The 10th byte may only carry the one remaining bit of a u64.
        if index == VARINT_BYTES_MAX - 1 && group > 1 {
            return Err(VarintError::Overflow);
        }
        raw |= group << shift;
        if byte & 0x80 == 0 {
            return Ok((unzigzag(raw), index + 1));
        }
    }
    if buf.len() >= VARINT_BYTES_MAX {
        Err(VarintError::Overflow)
    } else {
        Err(VarintError::Truncated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_encodings() {
        let cases: [(i64, &[u8]); 6] = [
            (0, &[0x00]),
            (-1, &[0x01]),
            (1, &[0x02]),
            (63, &[0x7e]),
            (-64, &[0x7f]),
            (64, &[0x80, 0x01]),
        ];
        for (value, encoded) in cases {
            let mut buf = Vec::new();
            put_varint(&mut buf, value);
            assert_eq!(buf, encoded, "encoding of {value}");
            assert_eq!(get_varint(encoded), Ok((value, encoded.len())));
        }
    }

    #[test]
    fn overlong_and_truncated_are_errors() {
        assert_eq!(get_varint(&[]), Err(VarintError::Truncated));
        assert_eq!(get_varint(&[0x80, 0x80]), Err(VarintError::Truncated));
        assert_eq!(get_varint(&[0xff; 11]), Err(VarintError::Overflow));
        let mut tenth_too_big = [0xffu8; 10];
        tenth_too_big[9] = 0x02;
        assert_eq!(get_varint(&tenth_too_big), Err(VarintError::Overflow));
    }

    proptest! {
        #[test]
        fn roundtrip(value: i64) {
            let mut buf = Vec::new();
            put_varint(&mut buf, value);
            prop_assert_eq!(buf.len(), varint_len(value));
            prop_assert_eq!(get_varint(&buf), Ok((value, buf.len())));
            for cut in 0..buf.len() {
                prop_assert_eq!(get_varint(&buf[..cut]), Err(VarintError::Truncated));
            }
        }
    }
}
