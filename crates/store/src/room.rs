//! Admission against the size limit: a download reserves its size before it writes a byte.
//!
//! Pruning after a download lets concurrent misses together overshoot the limit (8 misses of
//! 16 MiB under a 40 MiB limit held 128 MiB until the pruner ran). Here every writer of this
//! process takes a [`Reservation`] first: the published images plus every reservation never
//! exceed `max_size`. Eviction runs only when it can actually make the room: an image larger
//! than the limit, or one that would not fit even with every evictable image gone (the rest is
//! open or hard-linked), evicts nothing and is told so ([`Room::TooLarge`], [`Room::Full`]).
//!
//! Reservations are per process (one `Cache` and its clones); writers in other processes on
//! the same directory are bounded by the pruner, as before.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex};

use crate::cache::Cache;
use crate::error::Result;
use crate::key::Key;
use crate::layout::Status;
use crate::lock::{self, Mode};

/// Bytes reserved by this process's writers that are not yet published.
#[derive(Debug, Default)]
pub(crate) struct Reserved(Mutex<u64>);

/// The answer to "may `size` more bytes be written?".
#[derive(Debug)]
pub enum Room {
    /// Room is held for the bytes until the reservation is dropped (after publishing).
    Reserved(Reservation),
    /// Larger than the limit itself: nothing was evicted.
    TooLarge { size: u64, max_size: u64 },
    /// Would fit only by evicting images that are in use (open, or hard-linked elsewhere), or
    /// that other writers reserved: nothing was evicted.
    Full { size: u64, max_size: u64 },
}

/// Room held for one download. Dropping it returns the room (do so once the image is
/// published, when its bytes count in the cache size instead).
#[derive(Debug)]
pub struct Reservation {
    reserved: Arc<Reserved>,
    bytes: u64,
    /// Images evicted to make this room.
    pub evicted: Vec<(String, u64)>,
}

impl Reservation {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Grows the reservation by `more` bytes (a download whose length was not announced),
    /// evicting as [`Cache::reserve`] would. `false` when it cannot: the reservation is then
    /// unchanged.
    pub fn grow(&mut self, cache: &Cache, more: u64, max_size: u64) -> Result<bool> {
        match cache.reserve_more(more, max_size, self.bytes)? {
            Room::Reserved(mut r) => {
                // Fold `r` into self: its bytes are ours now, so it must not give them back.
                self.bytes += std::mem::take(&mut r.bytes);
                self.evicted.append(&mut r.evicted);
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut r = self.reserved.0.lock().expect("poisoned");
        *r = r.saturating_sub(self.bytes);
    }
}

impl Cache {
    /// Reserves room for `size` bytes under `max_size`, evicting least recently used images
    /// when (and only when) that makes enough room.
    pub fn reserve(&self, size: u64, max_size: u64) -> Result<Room> {
        self.reserve_more(size, max_size, 0)
    }

    /// [`Cache::reserve`] for a writer that already holds `held` bytes of reservation.
    fn reserve_more(&self, size: u64, max_size: u64, held: u64) -> Result<Room> {
        if held + size > max_size {
            return Ok(Room::TooLarge {
                size: held + size,
                max_size,
            });
        }
        let reserved = self.reserved();
        // Held across the eviction: two reservations never evict for the same free room.
        let mut total = reserved.0.lock().expect("poisoned");
        let grant = |total: &mut u64, evicted| {
            *total += size;
            Room::Reserved(Reservation {
                reserved: reserved.clone(),
                bytes: size,
                evicted,
            })
        };
        let cached = self.get_cache_size()?;
        if cached + *total + size <= max_size {
            return Ok(grant(&mut total, Vec::new()));
        }
        let full = Room::Full {
            size: held + size,
            max_size,
        };
        // `total` includes `held`; the room others hold is not ours to evict for.
        let Some(target) = max_size.checked_sub(*total + size) else {
            return Ok(full);
        };
        let must_free = cached - target;
        if self.evictable_bytes()? < must_free {
            return Ok(full);
        }
        let report = self.prune(target)?;
        if report.size_after <= target {
            Ok(grant(&mut total, report.evicted))
        } else {
            // A reader opened an image between the count and the eviction.
            Ok(full)
        }
    }

    /// Bytes of published images that eviction could remove now: not open for reading and
    /// not hard-linked elsewhere.
    pub fn evictable_bytes(&self) -> Result<u64> {
        let mut bytes = 0u64;
        self.lru_walk(|entry| {
            let key = Key::new(&entry.image_id)?;
            let path = self.get_image_filepath(&key, Status::Active);
            if let Ok(file) = File::open(&path)
                && file.metadata().is_ok_and(|m| m.nlink() == 1)
                && lock::lock_file(&file, Mode::Exclusive, false).unwrap_or(false)
            {
                bytes += entry.size;
            }
            Ok(true)
        })?;
        Ok(bytes)
    }

    /// Bytes of failed downloads in `invalid/`, which every clean-up removes.
    pub fn leftover_bytes(&self) -> Result<u64> {
        let dir = self.layout().invalid_dir();
        Ok(self
            .get_cache_files(&dir)?
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum())
    }
}
