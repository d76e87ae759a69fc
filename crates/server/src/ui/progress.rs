//! What the status page shows of one download, kept beside its flight
//! ([`crate::fill::Beside`]): where it comes from, when it started, and its recent rate,
//! fed by the fill's `written` hook (the same one that wakes its followers). How many clients
//! stream it is the flight's own count ([`imgcache_store::key_lock::Flight::watchers`]), so
//! it falls when one leaves. Nothing here reads the image file.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often the rate is re-estimated; a sample older than [`STALL`] means no bytes lately.
const SAMPLE_EVERY: Duration = Duration::from_millis(500);
const STALL: Duration = Duration::from_secs(3);

/// One download's progress beside its flight.
#[derive(Debug)]
pub struct Progress {
    started: Instant,
    /// The href as the client gave it (a Glance image id for `/v2/images/{id}/file`) and
    /// where the bytes come from (`origin`, `peer <url>`, `another process`).
    origin: Mutex<Option<String>>,
    source: Mutex<&'static str>,
    peer: Mutex<Option<String>>,
    rate: Mutex<Rate>,
}

#[derive(Debug)]
struct Rate {
    at: Instant,
    bytes: u64,
    /// Bytes per second, smoothed; 0 until the first estimate.
    per_sec: f64,
}

impl Default for Progress {
    fn default() -> Self {
        let now = Instant::now();
        Progress {
            started: now,
            origin: Mutex::new(None),
            source: Mutex::new("origin"),
            peer: Mutex::new(None),
            rate: Mutex::new(Rate {
                at: now,
                bytes: 0,
                per_sec: 0.0,
            }),
        }
    }
}

impl Progress {
    pub fn set_origin(&self, href_raw: &str) {
        *lock(&self.origin) = Some(href_raw.to_string());
    }

    /// Where the bytes come from: `origin`, `peer` (with its URL) or `another process`.
    pub fn set_source(&self, source: &'static str, peer: Option<&str>) {
        *lock(&self.source) = source;
        *lock(&self.peer) = peer.map(str::to_string);
    }

    /// `n` bytes are written (called after every chunk: cheap, and never waits for a reader).
    pub fn sample(&self, n: u64) {
        let Ok(mut r) = self.rate.try_lock() else {
            return;
        };
        let now = Instant::now();
        let dt = now.duration_since(r.at);
        if dt < SAMPLE_EVERY {
            return;
        }
        let inst = n.saturating_sub(r.bytes) as f64 / dt.as_secs_f64();
        r.per_sec = if r.per_sec == 0.0 {
            inst
        } else {
            0.5 * inst + 0.5 * r.per_sec
        };
        r.at = now;
        r.bytes = n;
    }

    pub fn origin(&self) -> Option<String> {
        lock(&self.origin).clone()
    }

    pub fn source(&self) -> (&'static str, Option<String>) {
        (*lock(&self.source), lock(&self.peer).clone())
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Bytes per second now, given `written` so far: the smoothed estimate, or the average
    /// since the start before the first one, or the rate since the last sample when the
    /// download has stalled.
    pub fn rate(&self, written: u64) -> f64 {
        let r = lock(&self.rate);
        let since = r.at.elapsed();
        if r.per_sec == 0.0 || since > STALL {
            let (from, base) = if r.per_sec == 0.0 {
                (self.started.elapsed(), 0)
            } else {
                (since, r.bytes)
            };
            let secs = from.as_secs_f64();
            return if secs > 0.0 {
                written.saturating_sub(base) as f64 / secs
            } else {
                0.0
            };
        }
        r.per_sec
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_starts_as_the_average_and_follows_samples() {
        let p = Progress::default();
        assert_eq!(p.rate(0), 0.0);
        // Pretend the download began 2 s ago.
        {
            let mut r = lock(&p.rate);
            r.at -= Duration::from_secs(2);
        }
        p.sample(2_000_000);
        let rate = p.rate(2_000_000);
        assert!((900_000.0..=1_100_000.0).contains(&rate), "{rate}");
    }
}
