//! The prefetch queue: one file per key in `queue/`, holding the time it was queued in
//! nanoseconds. Files (not driver records) so that the queue survives restarts and is shared
//! by every process on the directory whatever the driver.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::time::UNIX_EPOCH;

use crate::cache::{Cache, mtime};
use crate::error::{IoContext, Result, StoreError};
use crate::key::Key;
use crate::layout::{Status, key_files};

impl Cache {
    pub fn is_queued(&self, key: &Key) -> Result<bool> {
        Ok(self.get_image_filepath(key, Status::Queue).exists())
    }

    /// Queues an image for prefetching. `false` (and nothing queued) when it is already cached,
    /// being cached, or queued.
    pub fn queue_image(&self, key: &Key) -> Result<bool> {
        if self.is_cached(key)? || self.is_being_cached(key)? {
            return Ok(false);
        }
        let path = self.get_image_filepath(key, Status::Queue);
        // create_new makes "is it queued?" and "queue it" one atomic step across processes.
        let mut f = match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
            Err(e) => return Err(StoreError::io("queue", &path, e)),
        };
        let nanos = std::time::SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        f.write_all(nanos.to_string().as_bytes())
            .ctx("queue", &path)?;
        Ok(true)
    }

    /// Queued image ids, oldest first.
    pub fn get_queued_images(&self) -> Result<Vec<String>> {
        let dir = self.layout().queue_dir();
        let mut items: Vec<(u128, String)> = key_files(&dir)?
            .into_iter()
            .map(|(key, meta)| {
                let path = dir.join(key.as_str());
                let at = fs::read_to_string(&path)
                    .ok()
                    .and_then(|s| s.trim().parse::<u128>().ok())
                    .unwrap_or_else(|| {
                        mtime(&meta)
                            .duration_since(UNIX_EPOCH)
                            .map_or(0, |d| d.as_nanos())
                    });
                (at, key.to_string())
            })
            .collect();
        items.sort();
        Ok(items.into_iter().map(|(_, k)| k).collect())
    }

    /// Removes an image from the queue; returns whether it was queued.
    pub fn delete_queued_image(&self, key: &Key) -> Result<bool> {
        let path = self.get_image_filepath(key, Status::Queue);
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(StoreError::io("remove", &path, e)),
        }
    }

    /// Empties the queue; returns how many entries were removed.
    pub fn delete_all_queued_images(&self) -> Result<u64> {
        let mut n = 0;
        for key in self.get_queued_images()? {
            if self.delete_queued_image(&Key::new(&key)?)? {
                n += 1;
            }
        }
        Ok(n)
    }
}
