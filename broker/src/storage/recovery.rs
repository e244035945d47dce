//! Opening a lane log, after a clean close or a crash.
//!
//! 1. Leftovers go: temp files of interrupted atomic writes, index files without a log.
//! 2. Segments before the clean point (see `checkpoint`) hold durable data
//!    that was checked when it was written. They are trusted without reading them:
//!    their indexes are checked for sanity and the batch headers after the last index
//!    entry must end exactly where the next segment begins. A damaged index is rebuilt
//!    from the batch headers. Their checksums are checked lazily, by reads.
//! 3. The segment holding the clean point is trusted up to it (its indexes kept after a
//!    clean close, rebuilt from the headers otherwise). From the clean point to the end
//!    of the log, every batch is checked fully (checksum and records) and re-indexed.
//!    The first batch that fails ends the log: the file is cut there and any later
//!    segments are deleted. That data was never durable, so it was never acknowledged
//!    as durable. The end of the log comes from this scan, never from a file size.
//! 4. Anything wrong *before* the clean point is corruption of acknowledged data: it is
//!    reported, nothing is cut, and the lane log refuses to serve at or past it.
//! 5. What the scan kept is fsynced, so all of it is durable from here on, and the
//!    idempotent producer table is rebuilt from the newest snapshot plus the headers
//!    after it.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use lanes_protocol::Offset;

use super::checkpoint::CleanPoint;
use super::config::LogConfig;
use super::error::{IoContext, StorageError};
use super::faults;
use super::files::{
    self, INDEX_SUFFIX, LOG_SUFFIX, SNAPSHOT_SUFFIX, TEMP_SUFFIX, TIME_INDEX_SUFFIX, fsync_dir,
    offset_file_name, parse_offset_file_name, remove_if_exists,
};
use super::producer_state::ProducerStateTable;
use super::segment::{ScanStop, Segment};

/// How many producer-state snapshots a lane log keeps.
const SNAPSHOTS_KEPT: usize = 2;
/// Records corruption found at run time, so that it is known again after a restart:
/// the offset on the first line, the reason on the second. An operator deletes it once
/// the lane log is repaired or the loss accepted (docs/STORAGE.md).
const CORRUPTION_MARKER: &str = "corrupt";

/// Writes the corruption marker (atomically).
pub(crate) fn write_marker(dir: &Path, corruption: &Corruption) -> Result<(), StorageError> {
    let text = format!(
        "{}\n{}\n",
        corruption.offset,
        corruption.reason.replace('\n', " ")
    );
    files::write_file_atomic(&dir.join(CORRUPTION_MARKER), text.as_bytes())
}

/// Adds a recorded corruption marker, if there is one, to what recovery found.
pub(crate) fn merge_marker(dir: &Path, report: &mut RecoveryReport) -> Result<(), StorageError> {
    let path = dir.join(CORRUPTION_MARKER);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(StorageError::io(&path, error)),
    };
    let (offset, reason) = text.split_once('\n').unwrap_or((text.as_str(), ""));
    let offset = offset.trim().parse().unwrap_or(0);
    record_corruption(
        report,
        Corruption {
            offset: Offset(offset),
            reason: format!("recorded earlier: {}", reason.trim()),
        },
    );
    Ok(())
}

/// Damage found in data that was acknowledged: where, and what was wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Corruption {
    pub offset: Offset,
    pub reason: String,
}

impl From<ScanStop> for Corruption {
    fn from(stop: ScanStop) -> Corruption {
        Corruption {
            offset: stop.offset,
            reason: format!("at byte {}: {}", stop.position, stop.reason),
        }
    }
}

/// What opening a lane log did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    pub segments: usize,
    /// The last run ended with a clean close.
    pub clean_shutdown: bool,
    /// Bytes whose checksums were checked during recovery.
    pub checked_bytes: u64,
    /// Bytes cut from the end of the log: a torn or unsynced tail, and, where the active
    /// segment is a recycled file, the old bytes past what was written over them (the
    /// two cannot be told apart).
    pub truncated_bytes: u64,
    /// A recycled file's old bytes cut from past a sealed segment's end: never records.
    pub recycled_bytes: u64,
    /// Segments deleted because they followed the cut.
    pub deleted_segments: usize,
    pub rebuilt_indexes: usize,
    pub corruption: Option<Corruption>,
}

/// The state a lane log starts from.
#[derive(Debug)]
pub(crate) struct Recovered {
    pub(crate) segments: Vec<Arc<Segment>>,
    pub(crate) active_file: File,
    pub(crate) producers: ProducerStateTable,
    pub(crate) report: RecoveryReport,
}

#[derive(Debug, Default)]
struct Listing {
    bases: Vec<Offset>,
    snapshots: Vec<Offset>,
    changed: bool,
}

/// Lists segments and snapshots; removes temp files and indexes that lost their log.
fn list_directory(dir: &Path) -> Result<Listing, StorageError> {
    let mut listing = Listing::default();
    let mut index_files: BTreeMap<Offset, Vec<PathBuf>> = BTreeMap::new();
    for entry in fs::read_dir(dir).at(dir)? {
        let path = entry.at(dir)?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if name.ends_with(&format!(".{TEMP_SUFFIX}")) {
            remove_if_exists(&path)?;
            listing.changed = true;
            continue;
        }
        match parse_offset_file_name(name) {
            Some((base, LOG_SUFFIX)) => listing.bases.push(base),
            Some((base, SNAPSHOT_SUFFIX)) => listing.snapshots.push(base),
            Some((base, INDEX_SUFFIX | TIME_INDEX_SUFFIX)) => index_files.entry(base).or_default().push(path),
            _ => {}
        }
    }
    listing.bases.sort_unstable();
    listing.snapshots.sort_unstable();
    for (base, paths) in index_files {
        if listing.bases.binary_search(&base).is_err() {
            for path in paths {
                remove_if_exists(&path)?;
            }
            listing.changed = true;
        }
    }
    Ok(listing)
}

pub(crate) fn recover(
    dir: &Path,
    config: &LogConfig,
    clean: Option<CleanPoint>,
) -> Result<Recovered, StorageError> {
    let listing = list_directory(dir)?;
    let mut dir_changed = listing.changed;
    let mut report = RecoveryReport::default();
    if listing.bases.is_empty() {
        if let Some(point) = clean.filter(|p| p.clean_offset > Offset::ZERO) {
            report.corruption = Some(Corruption {
                offset: Offset::ZERO,
                reason: format!(
                    "the checkpoint says offsets below {} are durable but the log has no segments",
                    point.clean_offset
                ),
            });
        }
        let (segment, file) = Segment::create(dir, Offset::ZERO, config, None)?;
        fsync_dir(dir)?;
        report.segments = 1;
        return Ok(Recovered {
            segments: vec![Arc::new(segment)],
            active_file: file,
            producers: ProducerStateTable::new(config.producer_ids_max),
            report,
        });
    }
    let bases = &listing.bases;
    let clean_index = clean.and_then(|point| bases.iter().position(|&b| b == point.segment_base));
    if clean.is_some() && clean_index.is_none() {
        tracing::warn!(dir = %dir.display(), "checkpoint names a segment that is gone; checking every segment");
    }
    let (first_scanned, clean) = match clean_index {
        Some(index) => (index, clean),
        None => (0, None),
    };
    report.clean_shutdown = clean.is_some_and(|point| point.clean_shutdown);

    let mut segments = Vec::with_capacity(bases.len());
    for (i, &base) in bases[..first_scanned].iter().enumerate() {
        let segment = open_sealed(dir, base, bases[i + 1], config, &mut report)?;
        segments.push(Arc::new(segment));
    }

    // Scanned segments are sealed as soon as the next one follows them, so recovery holds
    // at most two open files whatever the number of segments after the clean point.
    let mut last: Option<(Segment, File)> = None;
    let mut expected = bases[first_scanned];
    let mut cut = false;
    let scanned = &bases[first_scanned..];
    for (i, &base) in scanned.iter().enumerate() {
        if cut || base != expected {
            if !cut {
                tracing::warn!(dir = %dir.display(), %base, %expected, "segment does not follow the log; deleting it and all after it");
            }
            cut = true;
            delete_segment_files(dir, base)?;
            report.deleted_segments += 1;
            dir_changed = true;
            continue;
        }
        if let Some((previous, file)) = last.take() {
            segments.push(Arc::new(seal_scanned(previous, &file)?));
        }
        let point = clean.filter(|p| p.segment_base == base);
        let next_base = scanned.get(i + 1).copied();
        let (segment, file, outcome) = scan_segment(dir, base, next_base, point, config, &mut report)?;
        expected = segment.next_offset();
        last = Some((segment, file));
        match outcome {
            ScanOutcome::Complete => {}
            ScanOutcome::Cut => cut = true,
            // Acknowledged data is damaged: later segments are neither read nor deleted.
            ScanOutcome::Damaged => break,
        }
    }

    if let Some(corruption) = &report.corruption {
        tracing::error!(dir = %dir.display(), offset = %corruption.offset, reason = %corruption.reason,
            "lane log is corrupt; it serves only the offsets before the damage and refuses writes");
    }
    if report.truncated_bytes > 0 || report.deleted_segments > 0 {
        tracing::warn!(dir = %dir.display(), bytes = report.truncated_bytes, segments = report.deleted_segments,
            "cut a torn or unsynced tail from the log (in a recycled segment file, with its old bytes)");
    }
    // Make what was kept durable: from here on all of it counts as acknowledged.
    let (last, active_file) = last.expect("at least the clean segment is scanned");
    faults::synced(last.log_path(), || active_file.sync_data()).at(last.log_path())?;
    segments.push(Arc::new(last));

    let next_offset = segments.last().expect("not empty").next_offset();
    let producers = rebuild_producers(
        dir,
        &segments,
        &listing.snapshots,
        next_offset,
        config,
        &mut dir_changed,
    )?;
    if dir_changed {
        fsync_dir(dir)?;
    }
    report.segments = segments.len();
    Ok(Recovered {
        segments,
        active_file,
        producers,
        report,
    })
}

/// Fsyncs a scanned segment that is not the last and seals it.
fn seal_scanned(segment: Segment, file: &File) -> Result<Segment, StorageError> {
    faults::synced(segment.log_path(), || file.sync_data()).at(segment.log_path())?;
    let last_batch = segment
        .last_batch_base()
        .map_err(|stop| corrupt_invariant(&segment, stop))?;
    segment.seal(Some(last_batch))?;
    Ok(segment)
}

fn corrupt_invariant(segment: &Segment, stop: ScanStop) -> StorageError {
    StorageError::Corrupt {
        path: segment.log_path().to_owned(),
        offset: stop.offset,
        reason: stop.reason,
    }
}

fn record_corruption(report: &mut RecoveryReport, corruption: Corruption) {
    if report
        .corruption
        .as_ref()
        .is_none_or(|c| corruption.offset < c.offset)
    {
        report.corruption = Some(corruption);
    }
}

/// Opens a segment before the clean point, trusting its content but checking that its
/// indexes are sane and its batches end exactly where the next segment begins.
fn open_sealed(
    dir: &Path,
    base: Offset,
    next_base: Offset,
    config: &LogConfig,
    report: &mut RecoveryReport,
) -> Result<Segment, StorageError> {
    let (mut segment, _, health) = Segment::open(dir, base, false, config)?;
    let file_len = u32::try_from(segment.mapped_len()).unwrap_or(u32::MAX);
    let span = next_base.0.saturating_sub(base.0);
    let sane = health.present
        && health.whole_entries
        && segment.index().is_sane(file_len, span)
        && segment.time_index().is_sane(span);
    if sane {
        let (relative, position) = segment.index().last().unwrap_or((0, 0));
        let start = base.plus(u64::from(relative));
        if let Ok((end, scanned_max)) = segment.follow_headers(position, start, file_len, next_base) {
            let indexed_max = segment.time_index().last().map_or(i64::MIN, |(t, _)| t);
            if end < file_len {
                tracing::warn!(segment = %segment.log_path().display(), end, file_len,
                    "sealed segment has bytes after its last batch; ignoring them");
            }
            segment.set_recovered(end, next_base, scanned_max.max(indexed_max), end);
            return Ok(segment);
        }
    }
    tracing::info!(segment = %segment.log_path().display(), "rebuilding indexes of a sealed segment");
    report.rebuilt_indexes += 1;
    segment.reset_indexes(config.index_bytes_max)?;
    segment.set_recovered(0, base, i64::MIN, 0);
    let mut last_batch = base;
    let (mut position, mut expected) = (0, base);
    while expected < next_base {
        match segment.header_at(position, file_len, expected) {
            Ok(header) => {
                segment.publish_append(position, &header, config.index_interval_bytes);
                last_batch = header.base_offset;
                position += header.batch_length;
                expected = header.next_offset();
            }
            Err(stop) => {
                record_corruption(report, stop.into());
                break;
            }
        }
    }
    if expected > next_base {
        record_corruption(
            report,
            Corruption {
                offset: next_base,
                reason: format!("segment {base} runs past the next segment's base offset {next_base}"),
            },
        );
    }
    segment.seal(Some(last_batch))?;
    let size = segment.size();
    segment.set_trusted(size);
    Ok(segment)
}

/// How the scan of one segment ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ScanOutcome {
    /// Every batch checked out, to the end of the file or to where the next segment
    /// begins.
    Complete,
    /// The file was cut at the first bad batch after the clean point.
    Cut,
    /// The trusted prefix is damaged (recorded as corruption); nothing was cut.
    Damaged,
}

/// Opens a segment at or after the clean point with writable indexes, trusts it up to
/// the clean point (if it holds it) and checks every batch after, cutting the file at
/// the first bad one. Bad bytes that begin exactly where the next segment (`next_base`)
/// does are not a cut in the log: they are a recycled file's old bytes that a crash kept
/// past a sealed segment's end, and go alone.
fn scan_segment(
    dir: &Path,
    base: Offset,
    next_base: Option<Offset>,
    point: Option<CleanPoint>,
    config: &LogConfig,
    report: &mut RecoveryReport,
) -> Result<(Segment, File, ScanOutcome), StorageError> {
    let (mut segment, file, health) = Segment::open(dir, base, true, config)?;
    let file = file.expect("opened for writing");
    let file_len = file.metadata().at(segment.log_path())?.len();
    let file_len = u32::try_from(file_len)
        .unwrap_or(u32::MAX)
        .min(segment.mapped_len() as u32);

    let trusted = match point {
        Some(point) => match trust_prefix(&mut segment, point, health.present, file_len, config, report)? {
            Ok(trusted) => trusted,
            Err(corruption) => {
                record_corruption(report, corruption);
                let size = segment.size();
                segment.set_trusted(size);
                return Ok((segment, file, ScanOutcome::Damaged));
            }
        },
        None => {
            segment.reset_indexes(config.index_bytes_max)?;
            segment.set_recovered(0, base, i64::MIN, 0);
            0
        }
    };

    let mut position = trusted;
    let mut expected = segment.next_offset();
    let stop = loop {
        if position == file_len {
            break None;
        }
        let checked = segment
            .header_at(position, file_len, expected)
            .and_then(|header| segment.validate_at(position, &header).map(|()| header));
        match checked {
            Ok(header) => {
                segment.publish_append(position, &header, config.index_interval_bytes);
                position += header.batch_length;
                expected = header.next_offset();
            }
            Err(stop) => break Some(stop),
        }
    };
    report.checked_bytes += u64::from(position - trusted);
    segment.set_trusted(trusted);
    let Some(stop) = stop else {
        return Ok((segment, file, ScanOutcome::Complete));
    };
    if Some(stop.offset) == next_base {
        tracing::info!(segment = %segment.log_path().display(), position, bytes = file_len - position,
            "cutting a recycled file's old bytes after the segment's last batch");
        report.recycled_bytes += u64::from(file_len - position);
        file.set_len(u64::from(position)).at(segment.log_path())?;
        faults::sized(segment.log_path(), u64::from(position));
        return Ok((segment, file, ScanOutcome::Complete));
    }
    tracing::warn!(segment = %segment.log_path().display(), position = stop.position, offset = %stop.offset,
        reason = %stop.reason, "log ends at a torn or invalid batch; cutting it there");
    report.truncated_bytes += u64::from(file_len - position);
    file.set_len(u64::from(position)).at(segment.log_path())?;
    faults::sized(segment.log_path(), u64::from(position));
    Ok((segment, file, ScanOutcome::Cut))
}

/// Establishes the trusted prefix `..point.position` of the segment holding the clean
/// point: after a clean close its indexes are kept if they check out; otherwise they are
/// rebuilt from the batch headers. An `Err` inside says the prefix is damaged.
fn trust_prefix(
    segment: &mut Segment,
    point: CleanPoint,
    indexes_present: bool,
    file_len: u32,
    config: &LogConfig,
    report: &mut RecoveryReport,
) -> Result<Result<u32, Corruption>, StorageError> {
    if point.clean_shutdown && indexes_present && point.position <= file_len && keep_indexes(segment, point) {
        return Ok(Ok(point.position));
    }
    report.rebuilt_indexes += 1;
    let base = segment.base_offset();
    segment.reset_indexes(config.index_bytes_max)?;
    segment.set_recovered(0, base, i64::MIN, 0);
    let end = point.position.min(file_len);
    let (mut position, mut expected) = (0, base);
    while expected < point.clean_offset {
        match segment.header_at(position, end, expected) {
            Ok(header) => {
                segment.publish_append(position, &header, config.index_interval_bytes);
                position += header.batch_length;
                expected = header.next_offset();
            }
            Err(stop) => return Ok(Err(stop.into())),
        }
    }
    if expected != point.clean_offset || position != point.position {
        return Ok(Err(Corruption {
            offset: point.clean_offset.min(expected),
            reason: format!(
                "batches end at offset {expected}, byte {position}; the checkpoint says offset {}, byte {}",
                point.clean_offset, point.position
            ),
        }));
    }
    Ok(Ok(position))
}

/// After a clean close: keeps the indexes if they are sane and the headers after the
/// last entry end exactly at the clean point.
fn keep_indexes(segment: &mut Segment, point: CleanPoint) -> bool {
    let base = segment.base_offset();
    let span = point.clean_offset.0.saturating_sub(base.0);
    let kept = {
        let mut index = segment.index_mut();
        let mut time_index = segment.time_index_mut();
        index.truncate_to_position(point.position);
        time_index.truncate_to_relative_offset(u32::try_from(span).unwrap_or(u32::MAX));
        (index.is_sane(point.position, span) && time_index.is_sane(span)).then(|| {
            (
                index.last().unwrap_or((0, 0)),
                time_index.last().map_or(i64::MIN, |(t, _)| t),
            )
        })
    };
    let Some(((relative, position), indexed_max)) = kept else {
        return false;
    };
    let start = base.plus(u64::from(relative));
    match segment.follow_headers(position, start, point.position, point.clean_offset) {
        Ok((end, scanned_max)) if end == point.position => {
            segment.set_recovered(end, point.clean_offset, scanned_max.max(indexed_max), end);
            true
        }
        _ => false,
    }
}

fn delete_segment_files(dir: &Path, base: Offset) -> Result<(), StorageError> {
    for suffix in [LOG_SUFFIX, INDEX_SUFFIX, TIME_INDEX_SUFFIX] {
        remove_if_exists(&offset_file_name(dir, base, suffix))?;
    }
    Ok(())
}

/// Loads the newest usable snapshot and replays the batch headers after it. Deletes
/// snapshots past the end of the log and all but the newest few.
fn rebuild_producers(
    dir: &Path,
    segments: &[Arc<Segment>],
    snapshots: &[Offset],
    next_offset: Offset,
    config: &LogConfig,
    dir_changed: &mut bool,
) -> Result<ProducerStateTable, StorageError> {
    let start_offset = segments.first().map_or(Offset::ZERO, |s| s.base_offset());
    let mut chosen = None;
    for &offset in snapshots.iter().rev() {
        let path = offset_file_name(dir, offset, SNAPSHOT_SUFFIX);
        if offset > next_offset {
            remove_if_exists(&path)?;
            *dir_changed = true;
            continue;
        }
        if chosen.is_some() || offset < start_offset {
            continue;
        }
        let decoded = fs::read(&path)
            .ok()
            .and_then(|bytes| ProducerStateTable::decode_snapshot(&bytes, config.producer_ids_max));
        match decoded {
            Some((snapshot_offset, table)) if snapshot_offset == offset => chosen = Some((offset, table)),
            _ => tracing::warn!(snapshot = %path.display(), "ignoring a damaged producer snapshot"),
        }
    }
    let (from, mut table) =
        chosen.unwrap_or_else(|| (start_offset, ProducerStateTable::new(config.producer_ids_max)));
    for segment in segments.iter().filter(|s| s.next_offset() > from) {
        let start = if segment.base_offset() >= from {
            Some((0, segment.base_offset()))
        } else {
            segment
                .locate(from)
                .ok()
                .flatten()
                .map(|(p, h)| (p, h.base_offset))
        };
        let Some((mut position, mut expected)) = start else {
            continue;
        };
        let size = segment.size();
        while position < size {
            let Ok(header) = segment.header_at(position, size, expected) else {
                break;
            };
            if header.base_offset >= from {
                table.record(&header);
            }
            position += header.batch_length;
            expected = header.next_offset();
        }
    }
    let kept: Vec<Offset> = snapshots.iter().copied().filter(|&o| o <= next_offset).collect();
    for &offset in kept.iter().rev().skip(SNAPSHOTS_KEPT) {
        remove_if_exists(&offset_file_name(dir, offset, SNAPSHOT_SUFFIX))?;
        *dir_changed = true;
    }
    Ok(table)
}
