//! The per-image metadata record, with Glance's field names.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::integrity::Integrity;

/// Seconds since the Unix epoch, with sub-second precision, as Glance reports times.
pub type Timestamp = f64;

pub fn now() -> Timestamp {
    to_timestamp(SystemTime::now())
}

pub fn to_timestamp(t: SystemTime) -> Timestamp {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

/// What the store knows about one published image.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub image_id: String,
    pub size: u64,
    pub checksum: Option<Integrity>,
    pub hits: u64,
    /// When the image was published into the cache.
    pub last_modified: Timestamp,
    /// When it was last opened for reading (or published); LRU order. Kept by the store itself,
    /// never read from atime, which `relatime`/`noatime` mounts do not keep up to date.
    pub last_accessed: Timestamp,
    /// Free-form properties later layers attach (origin validators, href, disk format).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub props: BTreeMap<String, String>,
}

/// One row of the least-recently-accessed order.
#[derive(Clone, Debug, PartialEq)]
pub struct LruEntry {
    pub image_id: String,
    pub size: u64,
    pub last_accessed: Timestamp,
}
