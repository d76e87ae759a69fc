//! Verify on read (scrub): re-hash a published image against its recorded checksum.
//!
//! The image is opened as a reader (its shared flock keeps prune and clean away, so eviction
//! cannot race the hash) without counting a hit. A mismatch, of size or digest, is moved to
//! `invalid/` and its record dropped under the global lock, file first and record second (a
//! crash between the two leaves a record without a file, which `clean` drops: never a
//! published file nobody vouches for). If the image was replaced while it was hashed (a
//! revalidation published a new copy), the new copy is left alone: it was not what was hashed.

use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use serde::Serialize;

use crate::cache::Cache;
use crate::error::{IoContext, Result};
use crate::integrity::{Hasher, Integrity};
use crate::key::Key;
use crate::layout::Status;
use crate::lock::Mode;

/// What [`Cache::verify`] found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum VerifyOutcome {
    /// The bytes hash to the recorded checksum and have the recorded size.
    Ok { checksum: Integrity, size: u64 },
    /// The bytes do not match the record: the file is now `invalid/<key>`, the record gone.
    Mismatch {
        /// The recorded checksum and size.
        expected: Integrity,
        expected_size: u64,
        /// What the file holds now.
        actual: Integrity,
        actual_size: u64,
        moved_to: PathBuf,
    },
    /// The record has no checksum: nothing to compare with (nothing moved).
    NoChecksum { size: u64 },
    /// The image is not cached (or went while it was opened).
    NotCached,
    /// The image was replaced (or removed) while it was hashed: the new copy is not judged.
    Replaced,
}

impl VerifyOutcome {
    pub fn is_mismatch(&self) -> bool {
        matches!(self, VerifyOutcome::Mismatch { .. })
    }
}

/// Read size of one hashing step (and of one progress report).
const CHUNK: usize = 1 << 20;

impl Cache {
    /// Re-hashes the published image `key` against its recorded checksum; `progress` is told
    /// the bytes hashed after each chunk. See the module docs for what a mismatch does.
    pub fn verify(&self, key: &Key, progress: &mut dyn FnMut(u64)) -> Result<VerifyOutcome> {
        let Some(mut reader) = self.open_for_read_uncounted(key)? else {
            return Ok(VerifyOutcome::NotCached);
        };
        let record = reader.record().clone();
        let Some(expected) = record.checksum.clone() else {
            return Ok(VerifyOutcome::NoChecksum { size: record.size });
        };
        let path = reader.path().to_path_buf();
        let ino = reader.file().metadata().ctx("stat", &path)?.ino();
        let mut hasher = Hasher::new(expected.algorithm);
        let mut buf = vec![0u8; CHUNK];
        let mut size = 0u64;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(crate::StoreError::io("read", &path, e)),
            };
            hasher.update(&buf[..n]);
            size += n as u64;
            progress(n as u64);
        }
        let actual = hasher.finish();
        if actual == expected && size == record.size {
            return Ok(VerifyOutcome::Ok {
                checksum: actual,
                size,
            });
        }
        // Mismatch: move the file we hashed (and only it) aside, then forget its record.
        let _g = self.global_lock(Mode::Exclusive)?;
        match fs::symlink_metadata(&path) {
            Ok(m) if m.ino() == ino => {}
            Ok(_) => return Ok(VerifyOutcome::Replaced),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(VerifyOutcome::Replaced);
            }
            Err(e) => return Err(crate::StoreError::io("stat", &path, e)),
        }
        let moved_to = self.get_image_filepath(key, Status::Invalid);
        fs::rename(&path, &moved_to).ctx("rename", &path)?;
        if let Some(dir) = path.parent() {
            fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .ctx("fsync", dir)?;
        }
        self.driver().remove(key)?;
        tracing::info!(
            key = %key,
            expected = %expected,
            actual = %actual,
            expected_size = record.size,
            actual_size = size,
            "verify: image does not match its record; moved to invalid/"
        );
        Ok(VerifyOutcome::Mismatch {
            expected,
            expected_size: record.size,
            actual,
            actual_size: size,
            moved_to,
        })
    }
}
