//! Named caches with priorities, and clean-up across the caches that share a filesystem
//! (Ironic's `clean_up_caches`): when a deploy needs more space than is free, the caches on
//! that filesystem are cleaned highest priority first, each asked for the bytes still missing.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::cache::Cache;
use crate::error::{IoContext, Result, StoreError};
use crate::policy::{EvictPolicy, PruneReport};

/// Ironic's clean-up priorities for its master-image caches.
pub const PRIORITY_ISO: u32 = 75;
pub const PRIORITY_INSTANCE: u32 = 50;
pub const PRIORITY_TFTP: u32 = 25;

/// Ironic's defaults for a master-image cache.
pub const DEFAULT_MAX_SIZE: u64 = 20 << 30;
pub const DEFAULT_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// One registered cache and its limits.
#[derive(Clone, Debug)]
pub struct CacheSpec {
    pub name: String,
    pub cache: Cache,
    pub max_size: u64,
    pub ttl: Duration,
    pub priority: u32,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct CleanUpReport {
    pub name: String,
    pub evicted: PruneReport,
    /// Leftovers of failed downloads removed (incomplete files with no live writer, invalid).
    pub leftovers: Vec<String>,
}

impl CacheSpec {
    /// Ironic's `clean_up(amount)`: leftovers of failed downloads, then masters past the TTL,
    /// then least recently used ones until the size cap holds; with `amount`, also until that
    /// many bytes are reclaimed. Never a file open for reading or linked elsewhere.
    pub fn clean_up(&self, amount: Option<u64>) -> Result<CleanUpReport> {
        // older_than = now: an incomplete file whose writer holds no lock is a dead download.
        let mut leftovers = self.cache.delete_stalled_files(SystemTime::now())?;
        leftovers.extend(self.cache.delete_invalid_files()?);
        let evicted = self.cache.evict(&EvictPolicy {
            ttl: Some(self.ttl),
            max_size: Some(self.max_size),
            amount,
        })?;
        Ok(CleanUpReport {
            name: self.name.clone(),
            evicted,
            leftovers,
        })
    }
}

/// Free bytes for unprivileged use on the filesystem holding `path`.
pub fn free_space(path: &Path) -> Result<u64> {
    let st = rustix::fs::statvfs(path).map_err(|e| StoreError::io("statvfs", path, e.into()))?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

fn device(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path).ctx("stat", path)?.dev())
}

#[derive(Clone, Debug, Default)]
pub struct Registry {
    caches: Vec<CacheSpec>,
}

impl Registry {
    pub fn new() -> Self {
        Registry::default()
    }

    pub fn register(&mut self, spec: CacheSpec) {
        self.caches.retain(|c| c.name != spec.name);
        self.caches.push(spec);
        // Highest priority first; by name for a stable order among equals.
        self.caches
            .sort_by(|a, b| b.priority.cmp(&a.priority).then(a.name.cmp(&b.name)));
    }

    pub fn caches(&self) -> &[CacheSpec] {
        &self.caches
    }

    pub fn get(&self, name: &str) -> Option<&CacheSpec> {
        self.caches.iter().find(|c| c.name == name)
    }

    /// Makes `required` bytes free on the filesystem holding `directory`, cleaning the caches
    /// on that filesystem in priority order until enough is free. Fails with
    /// [`StoreError::InsufficientDiskSpace`] when even that is not enough.
    pub fn clean_up_caches(&self, directory: &Path, required: u64) -> Result<Vec<CleanUpReport>> {
        let mut available = free_space(directory)?;
        let mut reports = Vec::new();
        if available >= required {
            return Ok(reports);
        }
        let dev = device(directory)?;
        // An image that could not fit even with every evictable master gone evicts nothing:
        // emptying the caches and failing anyway would only cost every other deploy its hit.
        let mut reclaimable = available;
        for spec in self
            .caches
            .iter()
            .filter(|s| device(s.cache.root()).ok() == Some(dev))
        {
            reclaimable += spec.cache.evictable_bytes()? + spec.cache.leftover_bytes()?;
        }
        if reclaimable < required {
            return Err(StoreError::InsufficientDiskSpace {
                path: directory.to_path_buf(),
                required,
                available,
            });
        }
        for spec in &self.caches {
            if device(spec.cache.root())? != dev {
                continue;
            }
            reports.push(spec.clean_up(Some(required - available))?);
            available = free_space(directory)?;
            if available >= required {
                return Ok(reports);
            }
        }
        Err(StoreError::InsufficientDiskSpace {
            path: directory.to_path_buf(),
            required,
            available,
        })
    }

    /// Ironic's "clean up all entries from all caches": each cache's `clean_up` with no amount.
    pub fn clean_up_all(&self) -> Result<Vec<CleanUpReport>> {
        self.caches.iter().map(|c| c.clean_up(None)).collect()
    }
}
