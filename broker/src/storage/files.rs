//! File-system steps that must be done in a particular order to survive a crash.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use lanes_protocol::Offset;

use super::error::{IoContext, StorageError};
use super::faults;

pub(crate) const LOG_SUFFIX: &str = "log";
pub(crate) const INDEX_SUFFIX: &str = "index";
pub(crate) const TIME_INDEX_SUFFIX: &str = "timeindex";
pub(crate) const SNAPSHOT_SUFFIX: &str = "snapshot";
pub(crate) const TEMP_SUFFIX: &str = "tmp";

/// `{base_offset:020}.{suffix}`: names sort in offset order.
pub(crate) fn offset_file_name(dir: &Path, base_offset: Offset, suffix: &str) -> PathBuf {
    dir.join(format!("{:020}.{suffix}", base_offset.0))
}

/// Parses a name made by [`offset_file_name`] into its offset and suffix.
pub(crate) fn parse_offset_file_name(name: &str) -> Option<(Offset, &str)> {
    let (stem, suffix) = name.split_once('.')?;
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((Offset(stem.parse().ok()?), suffix))
}

/// Makes a directory's entries (created, renamed or removed files) durable.
pub(crate) fn fsync_dir(dir: &Path) -> Result<(), StorageError> {
    faults::dir_synced(dir, || File::open(dir).and_then(|d| d.sync_all())).at(dir)
}

/// Creates `dir` and any missing parents, fsyncing each parent after the entry for its
/// new child is made, so that the whole path survives a crash.
pub(crate) fn create_dir_all_durable(dir: &Path) -> Result<(), StorageError> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dir_all_durable(parent)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        Err(error) => return Err(StorageError::io(dir, error)),
    }
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fsync_dir(parent)
}

/// Replaces `path` with `bytes` so that after a crash it holds either the old or the new
/// contents, never a mix: write a temp file, fsync it, rename it over, fsync the directory.
pub(crate) fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<(), StorageError> {
    let temp = path.with_extension(TEMP_SUFFIX);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&temp)
        .at(&temp)?;
    file.write_all(bytes).at(&temp)?;
    file.sync_all().at(&temp)?;
    drop(file);
    fs::rename(&temp, path).at(path)?;
    fsync_dir(path.parent().expect("file paths have a parent"))
}

/// Writes `path` afresh with `bytes` and returns it open, without waiting for the disk:
/// no fsync, no temp file. Until an fsync of the returned file, a crash can leave it
/// missing, empty or torn, so this is only for files that carry a checksum and that
/// recovery can do without (producer snapshots).
pub(crate) fn write_file_unsynced(path: &Path, bytes: &[u8]) -> Result<File, StorageError> {
    faults::created(path);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .at(path)?;
    file.write_all(bytes).at(path)?;
    faults::wrote(path, 0, bytes.len() as u64);
    Ok(file)
}

/// Removes a file, treating "already gone" as done.
pub(crate) fn remove_if_exists(path: &Path) -> Result<(), StorageError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(StorageError::io(path, error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_file_names_roundtrip() {
        let path = offset_file_name(Path::new("/d"), Offset(42), LOG_SUFFIX);
        assert_eq!(path, Path::new("/d/00000000000000000042.log"));
        let name = path.file_name().unwrap().to_str().unwrap();
        assert_eq!(parse_offset_file_name(name), Some((Offset(42), "log")));
        assert_eq!(parse_offset_file_name("42.log"), None);
        assert_eq!(parse_offset_file_name("0000000000000000004x.log"), None);
        assert_eq!(parse_offset_file_name("checkpoint"), None);
    }

    #[test]
    fn atomic_write_replaces_contents() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta");
        write_file_atomic(&path, b"one").unwrap();
        write_file_atomic(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert!(!path.with_extension(TEMP_SUFFIX).exists());
    }

    #[test]
    fn creates_nested_directories() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b/c");
        create_dir_all_durable(&nested).unwrap();
        assert!(nested.is_dir());
        create_dir_all_durable(&nested).unwrap();
    }
}
