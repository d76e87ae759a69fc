//! Keeping the cache in bounds: `prune` (LRU eviction to a size) and `clean` (stalled and
//! invalid files, records whose file is gone, unused lock files).
//!
//! Both run under the global lock and never delete a file that is open for reading (its shared
//! flock blocks ours) or hard-linked elsewhere (`nlink > 1`: a deploy still uses it). Only files
//! the store has a record of are candidates: a foreign file in the directory is reported,
//! never deleted.

use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::cache::{Cache, mtime};
use crate::error::{IoContext, Result, StoreError};
use crate::key::Key;
use crate::layout::{Status, key_files};
use crate::lock::{self, Mode};

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PruneReport {
    /// Images evicted, in the order they went.
    pub evicted: Vec<(String, u64)>,
    pub bytes_freed: u64,
    /// Images that would have gone but were open or hard-linked.
    pub skipped_in_use: Vec<String>,
    /// Cache size after pruning.
    pub size_after: u64,
    /// Bytes of the requested `amount` that could not be reclaimed.
    pub still_needed: u64,
}

/// What [`Cache::evict`] removes; any combination, all optional.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EvictPolicy {
    /// Images not accessed for this long go.
    pub ttl: Option<Duration>,
    /// Evict least recently used images until the cache is at most this big.
    pub max_size: Option<u64>,
    /// Reclaim at least this many bytes (Ironic's `clean_up(amount)`).
    pub amount: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct CleanReport {
    /// Stalled files removed from `incomplete/`.
    pub stalled: Vec<String>,
    /// Files removed from `invalid/`.
    pub invalid: Vec<String>,
    /// Records whose image file had disappeared, dropped.
    pub dangling_records: Vec<String>,
    /// Key-named files in the cache directory the store has no record of: not ours, left alone.
    pub foreign_files: Vec<String>,
    /// Lock files of keys with nothing left, removed.
    pub stale_locks: u64,
}

/// Why a candidate could not be evicted.
enum Evict {
    Done(u64),
    InUse,
    Gone,
}

impl Cache {
    /// Evicts least recently accessed images until the cache holds at most `max_size` bytes.
    pub fn prune(&self, max_size: u64) -> Result<PruneReport> {
        self.evict(&EvictPolicy {
            max_size: Some(max_size),
            ..EvictPolicy::default()
        })
    }

    /// One pass over the LRU order (oldest access first), evicting each image that is past
    /// the TTL, or while the cache is over `max_size`, or while `amount` bytes are still to be
    /// reclaimed. Expired images come first in LRU order, so this is Ironic's "too old, then
    /// least recently used" in a single walk. Files open for reading or hard-linked are skipped.
    pub fn evict(&self, policy: &EvictPolicy) -> Result<PruneReport> {
        let _g = self.global_lock(Mode::Exclusive)?;
        let mut size = self.get_cache_size()?;
        let mut report = PruneReport::default();
        let expired_before = policy
            .ttl
            .map(|ttl| crate::record::now() - ttl.as_secs_f64());
        let wants = |size: u64, freed: u64, last_accessed: f64| {
            policy.max_size.is_some_and(|m| size > m)
                || policy.amount.is_some_and(|a| freed < a)
                || expired_before.is_some_and(|t| last_accessed < t)
        };
        // Records of removed files are forgotten in one batch after the walk (one transaction,
        // not one per image); if the walk fails midway they are still flushed before returning.
        let mut removed: Vec<Key> = Vec::new();
        let mut walked = Ok(());
        if policy.max_size.is_some() || policy.amount.is_some() || policy.ttl.is_some() {
            walked = self.lru_walk(|entry| {
                if !wants(size, report.bytes_freed, entry.last_accessed) {
                    // Size and amount are satisfied and, in LRU order, every later entry is
                    // newer than this unexpired one: nothing further is wanted.
                    return Ok(false);
                }
                let key = Key::new(&entry.image_id)?;
                match self.evict_locked(&key)? {
                    Evict::Done(bytes) => {
                        size = size.saturating_sub(bytes);
                        report.bytes_freed += bytes;
                        report.evicted.push((entry.image_id.clone(), bytes));
                        removed.push(key);
                    }
                    Evict::InUse => report.skipped_in_use.push(entry.image_id.clone()),
                    Evict::Gone => {
                        size = size.saturating_sub(entry.size);
                        removed.push(key);
                    }
                }
                Ok(true)
            });
        }
        self.driver().remove_many(&removed)?;
        walked?;
        report.size_after = self.get_cache_size()?;
        report.still_needed = policy
            .amount
            .map_or(0, |a| a.saturating_sub(report.bytes_freed));
        Ok(report)
    }

    /// Removes one published image unless it is open for reading or hard-linked elsewhere.
    /// Caller holds the global lock exclusively.
    fn evict_locked(&self, key: &Key) -> Result<Evict> {
        let path = self.get_image_filepath(key, Status::Active);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Evict::Gone),
            Err(e) => return Err(StoreError::io("open", &path, e)),
        };
        let meta = file.metadata().ctx("stat", &path)?;
        if meta.nlink() > 1 || !lock::lock_file(&file, Mode::Exclusive, false).ctx("lock", &path)? {
            return Ok(Evict::InUse);
        }
        // Holding the exclusive flock: no reader has it open (a reader that opens it now
        // blocks on its shared lock, then sees nlink == 0 and treats it as a miss).
        fs::remove_file(&path).ctx("remove", &path)?;
        Ok(Evict::Done(meta.len()))
    }

    /// Removes files in `incomplete/` last written at or before `older_than`, unless their
    /// writer is still alive (holds the key lock). A download's resume note
    /// (`<key>.resume`, see [`Cache::resume_note_path`]) goes with its file, and on its own
    /// once it is as old. Returns the keys removed.
    pub fn delete_stalled_files(&self, older_than: SystemTime) -> Result<Vec<String>> {
        let dir = self.layout().incomplete_dir();
        let mut removed = Vec::new();
        for (key, meta) in key_files(&dir)? {
            let note_of = key
                .as_str()
                .strip_suffix(crate::writer::RESUME_NOTE)
                .and_then(|k| Key::new(k).ok());
            let (owner, last_written) = match &note_of {
                // A note is as old as its leftover (the file that grows), else as itself.
                Some(base) => {
                    let data = fs::metadata(dir.join(base.as_str())).ok();
                    (base.clone(), data.as_ref().map_or(mtime(&meta), mtime))
                }
                None => (key.clone(), mtime(&meta)),
            };
            if last_written > older_than {
                continue;
            }
            let Some(_lock) = self.key_lock(&owner, false)? else {
                continue; // a live writer: slow, not stalled
            };
            let path = dir.join(key.as_str());
            match fs::remove_file(&path) {
                Ok(()) if note_of.is_none() => removed.push(key.to_string()),
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::io("remove", &path, e)),
            }
            if note_of.is_none()
                && let Some(note) = self.resume_note_path(&key)
                && let Err(e) = fs::remove_file(&note)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                return Err(StoreError::io("remove", &note, e));
            }
        }
        Ok(removed)
    }

    /// Removes every file in `invalid/`; returns the keys removed.
    pub fn delete_invalid_files(&self) -> Result<Vec<String>> {
        let dir = self.layout().invalid_dir();
        let mut removed = Vec::new();
        for path in self.get_cache_files(&dir)? {
            match fs::remove_file(&path) {
                Ok(()) => removed.push(file_name(&path)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::io("remove", &path, e)),
            }
        }
        Ok(removed)
    }

    /// The cleaner: stalled incomplete files older than `stall_time`, invalid files, records
    /// whose file vanished behind the store's back, and unused lock files.
    pub fn clean(&self, stall_time: Duration) -> Result<CleanReport> {
        let _g = self.global_lock(Mode::Exclusive)?;
        let cutoff = SystemTime::now()
            .checked_sub(stall_time)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let mut report = CleanReport {
            stalled: self.delete_stalled_files(cutoff)?,
            invalid: self.delete_invalid_files()?,
            ..CleanReport::default()
        };

        let records = self.driver().list()?;
        let files = key_files(self.root())?;
        let mut known = std::collections::BTreeSet::new();
        for rec in records {
            let key = Key::new(&rec.image_id)?;
            if !self.get_image_filepath(&key, Status::Active).exists() {
                self.driver().remove(&key)?;
                report.dangling_records.push(rec.image_id);
            } else {
                known.insert(rec.image_id);
            }
        }
        for (key, _) in files {
            if !known.contains(key.as_str()) {
                tracing::warn!(file = %key, "file in the cache directory has no record; leaving it alone");
                report.foreign_files.push(key.to_string());
            }
        }

        for (_, path) in self.idle_lock_files()? {
            if lock::remove_if_unused(&path)? {
                report.stale_locks += 1;
            }
        }
        Ok(report)
    }

    /// Lock files under `locks/` of keys with nothing left (no published, incomplete or
    /// queued file): candidates for removal once no one holds them. Used by `clean` and fsck.
    pub(crate) fn idle_lock_files(&self) -> Result<Vec<(Key, std::path::PathBuf)>> {
        let locks = self.layout().locks_dir();
        let mut out = Vec::new();
        for entry in fs::read_dir(&locks).ctx("read directory", &locks)? {
            let entry = entry.ctx("read directory", &locks)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(key) = name.strip_suffix(".lock").and_then(|k| Key::new(k).ok()) else {
                continue;
            };
            let busy = [Status::Active, Status::Incomplete, Status::Queue]
                .iter()
                .any(|s| self.get_image_filepath(&key, *s).exists());
            if !busy {
                out.push((key, entry.path()));
            }
        }
        Ok(out)
    }
}

fn file_name(p: &std::path::Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}
