//! The metadata driver: where per-image records live.
//!
//! Glance's drivers each re-implement the whole cache (files, queue, clean-up) around their
//! record keeping, and drift apart. Here the file lifecycle, queue, locks and policies live once,
//! in [`crate::Cache`]; a driver only keeps records. The seed's full driver interface is the
//! public API of `Cache`, and the conformance suite (`tests/conformance.rs`) runs it on every driver.

use std::fs::File;

use crate::error::Result;
use crate::key::Key;
use crate::record::{LruEntry, Record, Timestamp};

pub trait Driver: Send + Sync {
    /// Short name for messages and `stats` ("sqlite", "xattr").
    fn name(&self) -> &'static str;

    /// Called before the staged file is fsynced, outside any lock: a driver that keeps records
    /// on the file itself writes them here, so the one fsync covers data and record.
    fn stage(&self, _record: &Record, _staged: &File) -> Result<()> {
        Ok(())
    }

    /// Records a new or replacing image. Called under the global lock, with the image's file
    /// still in `incomplete/` and already fsynced, just before the rename that publishes it.
    fn insert(&self, record: &Record, staged: &File) -> Result<()>;

    fn get(&self, key: &Key) -> Result<Option<Record>>;

    /// Every record, ordered by image id.
    fn list(&self) -> Result<Vec<Record>>;

    /// Forgets a record whose file the caller has removed. Returns whether there was one.
    fn remove(&self, key: &Key) -> Result<bool>;

    /// Forgets several records at once (the evictor batches a walk's removals).
    fn remove_many(&self, keys: &[Key]) -> Result<()> {
        for k in keys {
            self.remove(k)?;
        }
        Ok(())
    }

    /// Counts a hit on `file` (the open published image) and moves it to the head of the LRU
    /// order. Returns the updated record, or `None` if there is no record for it.
    fn record_hit(&self, key: &Key, file: &File, at: Timestamp) -> Result<Option<Record>>;

    /// Up to `limit` entries in least-recently-accessed order, strictly after `after`
    /// (keyset pagination, so a caller skipping entries in use can walk the whole order).
    fn lru_page(&self, after: Option<&LruEntry>, limit: usize) -> Result<Vec<LruEntry>>;

    /// The page size the evictor asks for. A driver without an index (xattr) scans everything
    /// for any page, so it asks for the whole order at once.
    fn lru_page_size(&self) -> usize {
        256
    }

    /// Total bytes of published images.
    fn total_size(&self) -> Result<u64>;

    /// Sets one free-form property on a published image (`file` is it, open).
    fn set_prop(&self, key: &Key, file: &File, name: &str, value: &str) -> Result<()>;
}

/// Which driver a cache directory uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DriverKind {
    #[default]
    Sqlite,
    Xattr,
}

impl DriverKind {
    pub fn name(self) -> &'static str {
        match self {
            DriverKind::Sqlite => "sqlite",
            DriverKind::Xattr => "xattr",
        }
    }
}

impl std::str::FromStr for DriverKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sqlite" => Ok(DriverKind::Sqlite),
            "xattr" => Ok(DriverKind::Xattr),
            _ => Err(format!("unknown driver {s:?} (expected sqlite or xattr)")),
        }
    }
}

impl std::fmt::Display for DriverKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
