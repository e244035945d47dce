//! Which partition a keyed record goes to: the same on every client, in every language.
//!
//! `partition = fnv1a_64(key) mod partitions`, where FNV-1a 64 starts from
//! `0xcbf29ce484222325` and, for each key byte, XORs the byte in and multiplies by
//! `0x100000001b3` (wrapping). All events of one order share its key, so they share a
//! partition (and, in one lane, an order).

use crate::PartitionId;

const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a, 64 bits.
pub fn fnv1a_64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(FNV_OFFSET_BASIS, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(FNV_PRIME)
    })
}

/// The partition for `key` among `partitions` (at least 1).
pub fn partition_for_key(key: &[u8], partitions: u32) -> PartitionId {
    assert!(partitions > 0, "a topic has at least one partition");
    PartitionId((fnv1a_64(key) % u64::from(partitions)) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_published_fnv1a_values() {
        assert_eq!(fnv1a_64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a_64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a_64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn spreads_keys_and_is_stable() {
        let mut counts = [0u32; 8];
        for order in 0..8000 {
            counts[partition_for_key(format!("order-{order}").as_bytes(), 8).0 as usize] += 1;
        }
        assert!(counts.iter().all(|&c| (800..1200).contains(&c)), "{counts:?}");
        assert_eq!(
            partition_for_key(b"order-42", 12),
            partition_for_key(b"order-42", 12)
        );
    }
}
