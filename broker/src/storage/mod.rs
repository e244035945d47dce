//! The storage engine: lane logs on disk.
//!
//! A [`LaneLog`] is a directory of segments, each a `{base_offset:020}.log` file of
//! record batches exactly as producers sent them (with the base offset stamped), a
//! sparse `.index` (offset → position) and a `.timeindex` (timestamp → offset), both
//! memory-mapped. Appends are checked (size, checksum, records, producer sequence)
//! and written with one `pwrite` (`pwritev` with padding over a recycled file's old
//! bytes); reads are slices of the mapped segment, no copy, or, for bytes mostly gone
//! from the page cache, of a pooled buffer read with `O_DIRECT` ([`DirectReads`]).
//! Durability is group commit: one fsync covers every append made before it, and the
//! durable offset says how far that is. Opening a log recovers it (see [`recovery`]).
//!
//! This module knows nothing of sockets, topics, groups or lane policies. Byte layouts
//! are documented in the module that owns each file and in docs/STORAGE.md.

mod checkpoint;
mod config;
mod direct_read;
mod error;
pub mod faults;
pub(crate) mod files;
mod index;
mod log;
mod producer_state;
mod reaper;
pub mod recovery;
mod segment;

pub use config::{FsyncPolicy, LogConfig};
pub(crate) use direct_read::READ_AHEAD_WAIT;
pub use direct_read::{DirectReadStats, DirectReads};
pub use error::StorageError;
pub use log::{AppendOutcome, Backlog, LaneLog, LogStats, ReadSlice, RetentionOutcome};
pub use producer_state::SEQUENCES_REMEMBERED;
pub use reaper::{Doomed, Reaper, ReaperStats};
pub use recovery::{Corruption, RecoveryReport};
