use std::time::Duration;

use lanes_protocol::BatchLimits;
use lanes_protocol::record_batch::HEADER_BYTES;

use super::StorageError;
use super::index::{OFFSET_ENTRY_BYTES, TIME_ENTRY_BYTES};

/// When a lane log calls fsync.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// As soon as there is unsynced data; appends that arrive during one fsync share
    /// the next (group commit).
    Always,
    /// When the oldest unsynced append is this old.
    Interval(Duration),
    /// Only on clean close; the OS writes back when it likes.
    Never,
}

/// The settings of one lane log. Every bound carries its unit in its name.
#[derive(Clone, Debug)]
pub struct LogConfig {
    /// A segment rolls before an append would make it larger than this.
    pub segment_bytes_max: u32,
    /// A non-empty segment rolls on the first append after it has been active this long.
    pub segment_ms_max: u64,
    /// One offset-index entry (and time-index entry) per this many bytes of log.
    pub index_interval_bytes: u32,
    /// Size bound of each index file; the segment rolls when an index is full.
    pub index_bytes_max: u32,
    /// Size and record-count bounds of an appended batch.
    pub batch: BatchLimits,
    pub fsync: FsyncPolicy,
    /// With a policy other than `Always`: once this many bytes have been appended to the
    /// active segment since the kernel was last asked to, the syncer starts their
    /// writeback (`sync_file_range`), so dirty pages leave steadily instead of piling up
    /// to the kernel's threshold and going out in bursts. 0 leaves it to the kernel.
    pub writeback_bytes: u32,
    /// How much of the log's newest data stays in the page cache once on disk; the
    /// fsync threads drop the pages behind it (see `LaneLog::drop_cached_behind`). 0
    /// leaves the page cache to the kernel.
    pub cached_tail_bytes: u64,
    /// Sealed segments whose newest record is older than this are deleted.
    pub retention_ms: Option<u64>,
    /// Oldest sealed segments are deleted while the log is larger than this.
    pub retention_bytes: Option<u64>,
    /// Idempotent producers remembered per lane log; the least recently active one is
    /// forgotten when a new one arrives at the bound.
    pub producer_ids_max: usize,
    /// Sealed segments rolled but not yet fsynced that a lane log keeps open. Past it an
    /// fsync round is due, which the fsync threads run; past twice it, a roll fsyncs
    /// the oldest itself. Bounds open files per lane log.
    pub unsynced_segments_max: usize,
    /// For tests (reliability suite 8): while set, every fsync of a segment fails as a
    /// disk would. Not reachable from the broker's settings.
    pub fsync_fault: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// Frees the `.log` files of deleted segments gradually; without one they are freed
    /// at once.
    pub reaper: Option<std::sync::Arc<super::Reaper>>,
    /// Reads of batches mostly gone from the page cache use these buffers, with
    /// `O_DIRECT`; without them (or with none free) every read goes through the mapping.
    pub direct_reads: Option<std::sync::Arc<super::DirectReads>>,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes_max: 1 << 30,
            segment_ms_max: 7 * 24 * 3600 * 1000,
            index_interval_bytes: 4096,
            index_bytes_max: 10 << 20,
            batch: BatchLimits::default(),
            writeback_bytes: 1 << 20,
            cached_tail_bytes: 0,
            fsync: FsyncPolicy::Always,
            retention_ms: Some(7 * 24 * 3600 * 1000),
            retention_bytes: None,
            producer_ids_max: 10_000,
            unsynced_segments_max: 4,
            fsync_fault: None,
            reaper: None,
            direct_reads: None,
        }
    }
}

impl LogConfig {
    /// Checks the relationships between settings; a bad value is an error naming it.
    pub fn validate(&self) -> Result<(), StorageError> {
        let fail = |message: String| Err(StorageError::InvalidConfig(message));
        if (self.segment_bytes_max as usize) < HEADER_BYTES {
            return fail(format!(
                "segment_bytes_max {} is smaller than one batch header ({HEADER_BYTES} bytes)",
                self.segment_bytes_max
            ));
        }
        if self.batch.batch_bytes_max > self.segment_bytes_max {
            return fail(format!(
                "batch_bytes_max {} exceeds segment_bytes_max {}",
                self.batch.batch_bytes_max, self.segment_bytes_max
            ));
        }
        if (self.batch.batch_bytes_max as usize) < HEADER_BYTES || self.batch.batch_records_max == 0 {
            return fail("batch_bytes_max and batch_records_max must admit one record".into());
        }
        if self.index_interval_bytes == 0 {
            return fail("index_interval_bytes must be at least 1".into());
        }
        // Room for at least one entry plus the final time-index entry written at seal.
        let index_bytes_min = 2 * TIME_ENTRY_BYTES.max(OFFSET_ENTRY_BYTES);
        if (self.index_bytes_max as usize) < index_bytes_min {
            return fail(format!(
                "index_bytes_max {} is below the minimum of {index_bytes_min}",
                self.index_bytes_max
            ));
        }
        if let FsyncPolicy::Interval(interval) = self.fsync
            && interval.is_zero()
        {
            return fail("fsync interval must be positive; use fsync always instead".into());
        }
        if self.producer_ids_max == 0 || self.unsynced_segments_max == 0 {
            return fail("producer_ids_max and unsynced_segments_max must be at least 1".into());
        }
        Ok(())
    }
}
