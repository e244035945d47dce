//! Producer ids for idempotent producers: unique for the life of the data directory.
//!
//! The next free id is stored in `DATA_DIR/meta/producer_ids` (a decimal number,
//! replaced atomically) before an id is handed out, so an id is never given twice, even
//! across a crash.

use std::path::PathBuf;
use std::sync::Mutex;

use crate::storage::{StorageError, files};

#[derive(Debug)]
pub struct ProducerIds {
    path: PathBuf,
    next: Mutex<i64>,
}

impl ProducerIds {
    pub fn open(meta_dir: PathBuf) -> Result<ProducerIds, StorageError> {
        files::create_dir_all_durable(&meta_dir)?;
        let path = meta_dir.join("producer_ids");
        let next = match std::fs::read_to_string(&path) {
            Ok(text) => text.trim().parse().map_err(|_| {
                StorageError::InvalidConfig(format!("{} does not hold a number", path.display()))
            })?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => 0,
            Err(error) => return Err(StorageError::io(&path, error)),
        };
        Ok(ProducerIds {
            path,
            next: Mutex::new(next),
        })
    }

    /// A new producer id.
    pub fn allocate(&self) -> Result<i64, StorageError> {
        let mut next = self.next.lock().expect("producer ids lock poisoned");
        let id = *next;
        files::write_file_atomic(&self.path, (id + 1).to_string().as_bytes())?;
        *next = id + 1;
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_across_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let ids = ProducerIds::open(dir.path().join("meta")).unwrap();
        assert_eq!((ids.allocate().unwrap(), ids.allocate().unwrap()), (0, 1));
        drop(ids);
        let ids = ProducerIds::open(dir.path().join("meta")).unwrap();
        assert_eq!(ids.allocate().unwrap(), 2);
    }
}
