//! Waiting for a key's writer in another process, with a bound.
//!
//! A key's permit is its flock (see [`Cache::try_lock_key`]); another process holding it is
//! writing `incomplete/<key>`. flock(2) has no timeout, so a waiter polls the lock and watches
//! that file grow: a writer whose file has not grown for the bound is taken to be hung, and
//! the waiter gives up with [`StoreError::WriterStalled`] instead of waiting forever. The same
//! rule serves a server following the other writer's bytes and `imgcache fetch` queued
//! behind it.

use std::time::{Duration, Instant};

use crate::cache::Cache;
use crate::error::{Result, StoreError};
use crate::key::Key;
use crate::layout::Status;

/// How often a waiter looks at the other writer's lock and file.
pub const POLL: Duration = Duration::from_millis(20);

/// Progress of another process's write, as its file shows it.
#[derive(Debug)]
pub struct Stall {
    key: Key,
    bound: Duration,
    seen: Option<u64>,
    since: Instant,
    started: Instant,
}

impl Stall {
    /// A watcher that allows `bound` without progress.
    pub fn new(key: &Key, bound: Duration) -> Stall {
        let now = Instant::now();
        Stall {
            key: key.clone(),
            bound,
            seen: None,
            since: now,
            started: now,
        }
    }

    /// Records the writer's file length now (`None`: no file yet); fails once it has not
    /// changed for longer than the bound.
    pub fn observe(&mut self, len: Option<u64>) -> Result<()> {
        if len != self.seen {
            self.seen = len;
            self.since = Instant::now();
            return Ok(());
        }
        if self.since.elapsed() > self.bound {
            return Err(StoreError::WriterStalled {
                key: self.key.to_string(),
                stalled: self.since.elapsed(),
                waited: self.started.elapsed(),
            });
        }
        Ok(())
    }

    /// Bytes the other writer had written at the last look.
    pub fn seen(&self) -> Option<u64> {
        self.seen
    }
}

impl Cache {
    /// The length of `incomplete/<key>`, the file a writer of `key` is filling, if any.
    pub fn incomplete_len(&self, key: &Key) -> Option<u64> {
        std::fs::metadata(self.get_image_filepath(key, Status::Incomplete))
            .ok()
            .map(|m| m.len())
    }
}
