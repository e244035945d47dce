//! The clean point of a lane log: how far it is known to be durable and checked, so
//! recovery only re-checks what lies beyond.
//!
//! The `checkpoint` file holds two 64-byte slots written alternately, so a torn write
//! of one leaves the other. Recovery takes the valid slot with the higher sequence.
//! A slot is written after every fsync *without* an fsync of its own: everything it
//! points at is already on stable storage, so losing the newest slot only moves the
//! clean point back and makes recovery check more. Clean close fsyncs it.
//!
//! Slot, big-endian:
//!
//! | offset | size | field            | meaning                                              |
//! |-------:|-----:|------------------|------------------------------------------------------|
//! |      0 |    8 | `sequence`       | incremented on every write; the higher valid slot wins |
//! |      8 |    8 | `clean_offset`   | every record below this offset is durable and was checked |
//! |     16 |    8 | `segment_base`   | base offset of the segment where `clean_offset` lies  |
//! |     24 |    4 | `position`       | byte position of `clean_offset` in that segment       |
//! |     28 |    1 | `clean_shutdown` | 1 if written by a clean close: the indexes were flushed |
//! |     29 |   31 | reserved         | zero                                                  |
//! |     60 |    4 | `crc`            | CRC-32 of bytes 0..60                                 |

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use lanes_protocol::Offset;

use super::error::{IoContext, StorageError};
use super::faults;

const SLOT_BYTES: usize = 64;
const CRC_AT: usize = 60;

/// Where the lane log is known to be durable and checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CleanPoint {
    pub(crate) clean_offset: Offset,
    pub(crate) segment_base: Offset,
    pub(crate) position: u32,
    pub(crate) clean_shutdown: bool,
}

#[derive(Debug)]
pub(crate) struct CheckpointFile {
    path: PathBuf,
    file: File,
    sequence: u64,
}

impl CheckpointFile {
    /// Opens (creating if missing) the checkpoint file and returns the clean point it
    /// holds, if any slot is valid.
    pub(crate) fn open(path: &Path) -> Result<(CheckpointFile, Option<CleanPoint>), StorageError> {
        if !path.exists() {
            faults::created(path);
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .at(path)?;
        // One process, one lane log: a second opener would recover files under the
        // first one's live mappings.
        file.try_lock().map_err(|error| match error {
            std::fs::TryLockError::WouldBlock => StorageError::Locked {
                path: path.parent().unwrap_or(path).to_owned(),
            },
            std::fs::TryLockError::Error(error) => StorageError::io(path, error),
        })?;
        let mut bytes = [0u8; 2 * SLOT_BYTES];
        let file_len = file.metadata().at(path)?.len();
        faults::sized(path, file_len);
        let len = file_len.min(bytes.len() as u64) as usize;
        file.read_exact_at(&mut bytes[..len], 0).at(path)?;
        let best = bytes
            .chunks_exact(SLOT_BYTES)
            .filter_map(decode_slot)
            .max_by_key(|(sequence, _)| *sequence);
        let sequence = best.map_or(0, |(sequence, _)| sequence);
        let checkpoint = CheckpointFile {
            path: path.to_owned(),
            file,
            sequence,
        };
        Ok((checkpoint, best.map(|(_, point)| point)))
    }

    /// Fsyncs the slots written so far.
    pub(crate) fn sync(&self) -> Result<(), StorageError> {
        faults::synced(&self.path, || self.file.sync_data()).at(&self.path)
    }

    /// Writes `point` into the older slot. With `sync`, also fsyncs it.
    pub(crate) fn write(&mut self, point: CleanPoint, sync: bool) -> Result<(), StorageError> {
        self.sequence += 1;
        let slot = encode_slot(self.sequence, point);
        let at = (self.sequence % 2) * SLOT_BYTES as u64;
        self.file.write_all_at(&slot, at).at(&self.path)?;
        faults::wrote(&self.path, at, SLOT_BYTES as u64);
        if sync {
            self.sync()?;
        }
        Ok(())
    }
}

fn encode_slot(sequence: u64, point: CleanPoint) -> [u8; SLOT_BYTES] {
    let mut slot = [0u8; SLOT_BYTES];
    slot[0..8].copy_from_slice(&sequence.to_be_bytes());
    slot[8..16].copy_from_slice(&point.clean_offset.0.to_be_bytes());
    slot[16..24].copy_from_slice(&point.segment_base.0.to_be_bytes());
    slot[24..28].copy_from_slice(&point.position.to_be_bytes());
    slot[28] = u8::from(point.clean_shutdown);
    let crc = crc32fast::hash(&slot[..CRC_AT]);
    slot[CRC_AT..].copy_from_slice(&crc.to_be_bytes());
    slot
}

fn decode_slot(slot: &[u8]) -> Option<(u64, CleanPoint)> {
    let crc = u32::from_be_bytes(slot[CRC_AT..].try_into().ok()?);
    if crc != crc32fast::hash(&slot[..CRC_AT]) || slot[..CRC_AT].iter().all(|&b| b == 0) {
        return None;
    }
    let u64_at = |at: usize| u64::from_be_bytes(slot[at..at + 8].try_into().expect("8 bytes"));
    let point = CleanPoint {
        clean_offset: Offset(u64_at(8)),
        segment_base: Offset(u64_at(16)),
        position: u32::from_be_bytes(slot[24..28].try_into().ok()?),
        clean_shutdown: slot[28] == 1,
    };
    Some((u64_at(0), point))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(offset: u64) -> CleanPoint {
        CleanPoint {
            clean_offset: Offset(offset),
            segment_base: Offset(0),
            position: offset as u32 * 10,
            clean_shutdown: false,
        }
    }

    #[test]
    fn newest_valid_slot_wins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint");
        let (mut checkpoint, found) = CheckpointFile::open(&path).unwrap();
        assert_eq!(found, None);
        checkpoint.write(point(1), false).unwrap();
        checkpoint.write(point(2), true).unwrap();
        drop(checkpoint);
        let (mut checkpoint, found) = CheckpointFile::open(&path).unwrap();
        assert_eq!(found, Some(point(2)));
        checkpoint.write(point(3), false).unwrap();
        drop(checkpoint);
        assert_eq!(CheckpointFile::open(&path).unwrap().1, Some(point(3)));
    }

    #[test]
    fn a_second_open_is_refused_while_the_first_holds_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint");
        let (first, _) = CheckpointFile::open(&path).unwrap();
        assert!(matches!(
            CheckpointFile::open(&path),
            Err(StorageError::Locked { .. })
        ));
        drop(first);
        CheckpointFile::open(&path).unwrap();
    }

    #[test]
    fn a_torn_slot_falls_back_to_the_other() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint");
        let (mut checkpoint, _) = CheckpointFile::open(&path).unwrap();
        checkpoint.write(point(1), false).unwrap(); // slot 1
        checkpoint.write(point(2), false).unwrap(); // slot 0
        drop(checkpoint);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[10] ^= 0xff; // tear slot 0
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(CheckpointFile::open(&path).unwrap().1, Some(point(1)));
    }
}
