use std::io;
use std::path::{Path, PathBuf};

use lanes_protocol::{BatchError, Offset};

/// What can go wrong in the storage engine. Operating errors only: broken invariants
/// are assertions.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("invalid batch: {0}")]
    InvalidBatch(#[from] BatchError),
    #[error("no space left on the device holding {path}")]
    StorageFull { path: PathBuf },
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("offset {requested} is out of range: the log holds {start}..{end}")]
    OffsetOutOfRange {
        requested: Offset,
        start: Offset,
        end: Offset,
    },
    #[error("lane log {path} is corrupt at offset {offset}: {reason}")]
    Corrupt {
        path: PathBuf,
        offset: Offset,
        reason: String,
    },
    #[error("lane log {path} stopped accepting writes after an I/O failure: {reason}")]
    Failed { path: PathBuf, reason: String },
    #[error("producer {producer_id} with epoch {epoch} is fenced by epoch {current_epoch}")]
    ProducerFenced {
        producer_id: i64,
        epoch: i16,
        current_epoch: i16,
    },
    #[error("producer {producer_id}: base sequence {received} is out of order, expected {expected}")]
    OutOfOrderSequence {
        producer_id: i64,
        expected: i32,
        received: i32,
    },
    #[error("producer {producer_id}: sequence {received} was appended long ago (expected {expected})")]
    DuplicateSequence {
        producer_id: i64,
        expected: i32,
        received: i32,
    },
    #[error("producer {producer_id}: sequence {base_sequence} was already used by a different batch")]
    SequenceReused { producer_id: i64, base_sequence: i32 },
    #[error("lane log {path} is open elsewhere (another broker on the same data directory?)")]
    Locked { path: PathBuf },
    #[error("lane log {path} is closed")]
    Closed { path: PathBuf },
    #[error("invalid storage configuration: {0}")]
    InvalidConfig(String),
}

impl StorageError {
    /// Wraps an I/O error with the path it happened on; a full disk gets its own
    /// variant so callers can tell the client plainly.
    pub(crate) fn io(path: &Path, source: io::Error) -> StorageError {
        if source.kind() == io::ErrorKind::StorageFull {
            StorageError::StorageFull {
                path: path.to_owned(),
            }
        } else {
            StorageError::Io {
                path: path.to_owned(),
                source,
            }
        }
    }
}

/// Adds the path to an `io::Result`.
pub(crate) trait IoContext<T> {
    fn at(self, path: &Path) -> Result<T, StorageError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, path: &Path) -> Result<T, StorageError> {
        self.map_err(|source| StorageError::io(path, source))
    }
}
