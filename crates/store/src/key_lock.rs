//! The key lock: one download per key, in this process and across processes.
//!
//! [`KeyLocks`] owns both halves of "one download per key":
//! - **in this process**, a map of key → the one [`Flight`] (write in progress) for it; every
//!   later acquirer of the key follows that flight;
//! - **across processes**, the key's flock (`locks/<key>.lock`, [`Cache::try_lock_key`]), taken
//!   by the first acquirer. While another process holds it, the flight follows that writer's
//!   `incomplete/<key>` as it grows ([`Elsewhere::follow`]), so this process's followers are
//!   streamed its bytes.
//!
//! [`KeyLocks::acquire`] says explicitly what the caller got ([`Acquired`]): a write
//! [`Permit`] (the flock is held), a [`Follower`] of this process's writer, or an [`Elsewhere`]
//! that follows another process's writer. A flight always ends with an explicit [`Outcome`]:
//! [`Outcome::Done`] (published, with what a follower needs to serve it), [`Outcome::Failed`]
//! (a reason and a [`FailKind`]), [`Outcome::Passthrough`] (it does not fit: streamed
//! uncached) or [`Outcome::TimedOut`]. A permit dropped without an outcome ends its flight as
//! failed ("the writer went away"), so no follower ever hangs.
//!
//! flock(2) has no timeout, so following another process means polling its lock and watching
//! its file grow: a writer whose file has not grown for the bound ([`Stall`]; the origin read
//! timeout by default) is taken to be hung, and its followers give up with
//! [`Outcome::TimedOut`] ([`StoreError::WriterStalled`]) instead of waiting forever.
//!
//! Only the file is shared between processes, so what it says is all there is to go by:
//! - its size is what has been written (writers preallocate with `KEEP_SIZE`, and only append);
//! - the writer is done when its key lock can be taken;
//! - it succeeded if the image is then published *with the inode followed* (a record, and the
//!   published name is that file). Anything else (moved to `invalid/`, never published, another
//!   inode) is a failure. A writer's file is a new inode (a dead writer's leftover is unlinked,
//!   not truncated), so a follower that opened a leftover never has it published. A file is
//!   followed once it has bytes; an empty one may still be replaced (a `file://` source is
//!   hard-linked into place), and is looked at again.
//!
//! The store knows nothing of HTTP: what a server keeps beside a flight (an origin's body to
//! stream uncached) is the flight's extra `X`, and a [`FailKind`] is what it maps to a status.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::cache::Cache;
use crate::error::{Result, StoreError};
use crate::integrity::Integrity;
use crate::key::Key;
use crate::layout::Status;
use crate::lock::FileLock;
use crate::reader::CacheReader;
use crate::record::Record;

/// How often a follower of another process looks at its lock and file.
pub const POLL: Duration = Duration::from_millis(20);

/// Bytes written between two wake-ups of a flight's followers. The count itself
/// ([`Flight::written`]) is updated after every chunk; waking every follower per chunk costs
/// more CPU than sending the bytes once many follow one download.
pub const NOTIFY_STEP: u64 = 1 << 20;

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

// ---- What a flight says ---------------------------------------------------------------------

/// Where a flight is.
#[derive(Clone, Debug)]
pub enum Phase {
    /// Taking the key lock, asking the origin, or waiting for another process's first bytes.
    Starting,
    /// Bytes `0..written` are in the file ([`Flight::info`]) and may be read.
    Streaming { written: u64 },
    /// All `size` bytes are written and verified, and may all be read; the image is being
    /// fsynced and published (an [`Outcome`] next).
    Verified { size: u64 },
    /// The flight is over.
    Ended(Outcome),
}

impl Phase {
    pub fn outcome(&self) -> Option<&Outcome> {
        match self {
            Phase::Ended(o) => Some(o),
            _ => None,
        }
    }
}

/// How a flight ended.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// The image is published.
    Done(Done),
    /// Nothing was published.
    Failed(Failure),
    /// The image does not fit the cache: each follower streams it uncached.
    Passthrough,
    /// The other process's writer made no progress for the bound
    /// ([`StoreError::WriterStalled`], see [`Outcome::error`]).
    TimedOut {
        key: Key,
        stalled: Duration,
        waited: Duration,
    },
}

impl Outcome {
    /// A failure, from its kind and reason.
    pub fn failed(kind: FailKind, reason: impl Into<Arc<str>>) -> Outcome {
        Outcome::Failed(Failure::new(kind, reason))
    }

    /// The error a caller with no bytes yet reports for an outcome that is not `Done`.
    pub fn error(&self) -> Option<StoreError> {
        match self {
            Outcome::TimedOut {
                key,
                stalled,
                waited,
            } => Some(StoreError::WriterStalled {
                key: key.to_string(),
                stalled: *stalled,
                waited: *waited,
            }),
            _ => None,
        }
    }
}

/// A published image, as a flight's followers get it: no second lookup, and no eviction race
/// (the file is open).
#[derive(Clone, Debug)]
pub enum Done {
    /// The flight wrote it (or followed another process writing it), and it was published
    /// with the inode its followers read: `file` is that inode, `size` bytes.
    Written { size: u64, file: Arc<File> },
    /// It was already published when the flight's flock was taken (or its origin confirmed
    /// the copy held): opened under the flock, with a shared flock of its own (see
    /// [`Cache::open_for_read`]) for as long as the file is open.
    Held { record: Record, file: Arc<File> },
}

impl Done {
    /// The image this flight wrote and published, open.
    pub fn written(reader: CacheReader) -> Done {
        Done::Written {
            size: reader.record().size,
            file: Arc::new(reader.into_file()),
        }
    }

    /// The image found published, open.
    pub fn held(reader: CacheReader) -> Done {
        Done::Held {
            record: reader.record().clone(),
            file: Arc::new(reader.into_file()),
        }
    }

    pub fn size(&self) -> u64 {
        match self {
            Done::Written { size, .. } => *size,
            Done::Held { record, .. } => record.size,
        }
    }

    pub fn file(&self) -> &Arc<File> {
        match self {
            Done::Written { file, .. } | Done::Held { file, .. } => file,
        }
    }
}

/// Why a flight failed: a reason an operator can read, and what kind of failure it is.
#[derive(Clone, Debug)]
pub struct Failure {
    pub kind: FailKind,
    pub reason: Arc<str>,
}

impl Failure {
    pub fn new(kind: FailKind, reason: impl Into<Arc<str>>) -> Failure {
        Failure {
            kind,
            reason: reason.into(),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

/// What kind of failure ended a flight (a server maps it to a status).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailKind {
    /// What was asked for is invalid (a bad href).
    BadRequest,
    /// The origin needs credentials it was not given.
    Unauthorized,
    /// The origin, or the configuration, refuses access.
    Forbidden,
    /// The origin has no such image.
    NotFound,
    /// The image is in no state to be downloaded (Glance: not active).
    Conflict,
    /// The origin failed, or its bytes were refused (checksum, format, length).
    Origin,
    /// This process is stopping, or a service it needs is not there.
    Unavailable,
    /// The cache's disk is full.
    Storage,
    /// The writer went away without saying how its write ended (a dropped permit, a task
    /// that panicked or was aborted).
    WriterGone,
    /// Anything else on this side.
    Internal,
}

/// What followers need once bytes flow.
#[derive(Debug)]
pub struct Streaming {
    /// A read-only descriptor of `incomplete/<key>` (valid after the rename that publishes
    /// it or moves it to `invalid/`).
    pub file: Arc<File>,
    /// Total size, when the origin said.
    pub size: Option<u64>,
    /// The checksum the origin vouches for.
    pub checksum: Option<Integrity>,
}

// ---- Flights --------------------------------------------------------------------------------

/// One write of a key in progress, followed by every acquirer of the key in this process.
/// `X` is what the caller keeps beside it (the server: an origin's body for a passthrough).
pub struct Flight<X = ()> {
    key: Key,
    phase: watch::Sender<Phase>,
    written: Arc<AtomicU64>,
    /// The count at the last wake-up (only the flight's one writer reports).
    notified: AtomicU64,
    info: OnceLock<Streaming>,
    extra: X,
}

impl<X> std::fmt::Debug for Flight<X> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flight")
            .field("key", &self.key)
            .field("phase", &*self.phase.borrow())
            .finish()
    }
}

impl<X> Flight<X> {
    fn new(key: Key, extra: X) -> Flight<X> {
        Flight {
            key,
            phase: watch::Sender::new(Phase::Starting),
            written: Arc::new(AtomicU64::new(0)),
            notified: AtomicU64::new(0),
            info: OnceLock::new(),
            extra,
        }
    }

    pub fn key(&self) -> &Key {
        &self.key
    }

    /// The flight's phase, as it changes (woken every [`NOTIFY_STEP`] while streaming).
    pub fn subscribe(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    /// How many subscribers watch the flight now: its clients (each holds one from its
    /// request to the end of its response body), so the count falls when one leaves.
    pub fn watchers(&self) -> usize {
        self.phase.receiver_count()
    }

    /// The phase now.
    pub fn phase(&self) -> Phase {
        self.phase.borrow().clone()
    }

    /// Waits for the flight's outcome.
    pub async fn ended(&self) -> Outcome {
        let mut rx = self.subscribe();
        // The sender lives in `self`, so the watch cannot close while this waits.
        let phase = rx
            .wait_for(|p| matches!(p, Phase::Ended(_)))
            .await
            .map(|p| p.clone())
            .expect("a flight holds its own sender");
        match phase {
            Phase::Ended(o) => o,
            _ => unreachable!("waited for the end"),
        }
    }

    /// The bytes written so far, after every chunk (at least what the last
    /// [`Phase::Streaming`] said).
    pub fn written(&self) -> Arc<AtomicU64> {
        self.written.clone()
    }

    /// The file followers read, once bytes flow.
    pub fn info(&self) -> Option<&Streaming> {
        self.info.get()
    }

    /// What the caller keeps beside the flight.
    pub fn extra(&self) -> &X {
        &self.extra
    }

    fn start_streaming(&self, streaming: Streaming) {
        let _ = self.info.set(streaming);
        self.phase.send_replace(Phase::Streaming { written: 0 });
    }

    /// `n` bytes are in the file: followers see it at once through the count, and are woken
    /// for the first bytes (time to first byte) and then every [`NOTIFY_STEP`].
    fn report_written(&self, n: u64) {
        self.written.store(n, Ordering::Release);
        let last = self.notified.load(Ordering::Relaxed);
        if last == 0 || n.saturating_sub(last) >= NOTIFY_STEP {
            self.notified.store(n, Ordering::Relaxed);
            self.phase.send_replace(Phase::Streaming { written: n });
        }
    }

    fn report_verified(&self, size: u64) {
        self.phase.send_replace(Phase::Verified { size });
    }
}

type Map<X> = Mutex<HashMap<Key, Arc<Flight<X>>>>;

/// Ends `flight` with `outcome` and takes it out of the map, at once: an acquirer finds either
/// the running flight or none.
fn conclude<X>(map: &Map<X>, flight: &Arc<Flight<X>>, outcome: Outcome) {
    let mut m = map.lock().expect("poisoned");
    if m.get(&flight.key).is_some_and(|f| Arc::ptr_eq(f, flight)) {
        m.remove(&flight.key);
    }
    flight.phase.send_replace(Phase::Ended(outcome));
}

/// The key locks of one cache directory, in one process.
pub struct KeyLocks<X = ()> {
    cache: Cache,
    bound: Duration,
    map: Arc<Map<X>>,
}

/// What [`KeyLocks::acquire`] got.
pub enum Acquired<X = ()> {
    /// The key's flock is held: write (or find the image published), then say how it ended.
    Write(Permit<X>),
    /// A writer in this process has the key: follow its flight.
    Follow(Follower<X>),
    /// Another process holds the key's flock: follow its writer's file
    /// ([`Elsewhere::follow`]); this process's later acquirers follow this flight.
    Elsewhere(Elsewhere<X>),
}

impl<X: Default> KeyLocks<X> {
    /// `bound`: how long a follower of another process's writer allows its file not to grow.
    pub fn new(cache: Cache, bound: Duration) -> KeyLocks<X> {
        KeyLocks {
            cache,
            bound,
            map: Arc::default(),
        }
    }

    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// The key's flight: a new one (with the flock, or following the process that holds it),
    /// or the running one. Does not wait.
    pub fn acquire(&self, key: &Key) -> Result<Acquired<X>> {
        let mut map = self.map.lock().expect("poisoned");
        if let Some(f) = map.get(key) {
            return Ok(Acquired::Follow(Follower(f.clone())));
        }
        let lock = self.cache.try_lock_key(key)?;
        let flight = Arc::new(Flight::new(key.clone(), X::default()));
        map.insert(key.clone(), flight.clone());
        drop(map);
        Ok(match lock {
            Some(lock) => Acquired::Write(Permit {
                flight,
                lock: Some(lock),
                map: self.map.clone(),
                ended: false,
            }),
            None => Acquired::Elsewhere(Elsewhere {
                flight: Some(flight),
                map: self.map.clone(),
                cache: self.cache.clone(),
                bound: self.bound,
            }),
        })
    }
}

impl<X> KeyLocks<X> {
    /// The running flight of `key`, if any.
    pub fn get(&self, key: &Key) -> Option<Arc<Flight<X>>> {
        self.map.lock().expect("poisoned").get(key).cloned()
    }

    /// Flights in progress.
    pub fn in_flight(&self) -> usize {
        self.map.lock().expect("poisoned").len()
    }

    /// The flights in progress, in no particular order (a snapshot: the map is not held).
    pub fn flights(&self) -> Vec<Arc<Flight<X>>> {
        self.map
            .lock()
            .expect("poisoned")
            .values()
            .cloned()
            .collect()
    }
}

/// A follower of a flight.
#[derive(Clone, Debug)]
pub struct Follower<X = ()>(Arc<Flight<X>>);

impl<X> Follower<X> {
    pub fn flight(&self) -> &Arc<Flight<X>> {
        &self.0
    }

    pub fn into_flight(self) -> Arc<Flight<X>> {
        self.0
    }

    pub async fn ended(&self) -> Outcome {
        self.0.ended().await
    }
}

/// The writer's side of a flight, for the hooks that see the bytes as they are written.
pub struct Reporter<X = ()>(Arc<Flight<X>>);

impl<X> Clone for Reporter<X> {
    fn clone(&self) -> Self {
        Reporter(self.0.clone())
    }
}

impl<X> Reporter<X> {
    /// Followers may start: the file they follow, and what the origin said of it.
    pub fn streaming(&self, streaming: Streaming) {
        self.0.start_streaming(streaming);
    }

    /// `n` bytes are in the file (wake-ups batched by [`NOTIFY_STEP`]).
    pub fn written(&self, n: u64) {
        self.0.report_written(n);
    }

    /// All `size` bytes are written and verified; publishing follows.
    pub fn verified(&self, size: u64) {
        self.0.report_verified(size);
    }
}

/// The right to write a key: its flock, and its flight. End it with [`Permit::finish`];
/// dropped without an outcome, the flight fails with [`FailKind::WriterGone`].
pub struct Permit<X = ()> {
    flight: Arc<Flight<X>>,
    lock: Option<FileLock>,
    map: Arc<Map<X>>,
    ended: bool,
}

impl<X> std::fmt::Debug for Permit<X> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("key", &self.flight.key)
            .field("locked", &self.lock.is_some())
            .finish()
    }
}

impl<X> Permit<X> {
    pub fn key(&self) -> &Key {
        &self.flight.key
    }

    pub fn flight(&self) -> &Arc<Flight<X>> {
        &self.flight
    }

    /// The writer's hooks into the flight.
    pub fn reporter(&self) -> Reporter<X> {
        Reporter(self.flight.clone())
    }

    /// The key's flock, for the writer that writes the image (it holds it until the image is
    /// published or discarded). `None` if already handed out.
    pub fn take_lock(&mut self) -> Option<FileLock> {
        self.lock.take()
    }

    /// Ends the flight: its followers get `outcome`. The flock (if still held here) is
    /// released first.
    pub fn finish(mut self, outcome: Outcome) {
        self.end(outcome);
    }

    fn end(&mut self, outcome: Outcome) {
        if std::mem::replace(&mut self.ended, true) {
            return;
        }
        drop(self.lock.take());
        conclude(&self.map, &self.flight, outcome);
    }
}

impl<X> Drop for Permit<X> {
    fn drop(&mut self) {
        self.end(Outcome::failed(
            FailKind::WriterGone,
            "the writer went away before the image was published",
        ));
    }
}

/// A flight following another process's writer of the key.
pub struct Elsewhere<X = ()> {
    flight: Option<Arc<Flight<X>>>,
    map: Arc<Map<X>>,
    cache: Cache,
    bound: Duration,
}

/// How following another process's writer ended.
pub enum Followed<X = ()> {
    /// The flock came free with nothing published from a followed file (the other writer
    /// had not started writing): it is this flight's now.
    Write(Permit<X>),
    /// The flight is over (its followers have the same outcome).
    Ended(Outcome),
}

impl<X> Elsewhere<X> {
    pub fn flight(&self) -> &Arc<Flight<X>> {
        self.flight.as_ref().expect("a flight until it ends")
    }

    /// Ends the flight before the other writer did (the caller stops following).
    pub fn end(mut self, outcome: Outcome) {
        if let Some(f) = self.flight.take() {
            conclude(&self.map, &f, outcome);
        }
    }

    fn ended(&mut self, outcome: Outcome) -> Followed<X> {
        if let Some(f) = self.flight.take() {
            conclude(&self.map, &f, outcome.clone());
        }
        Followed::Ended(outcome)
    }

    /// Follows the other writer's file, reporting its bytes to the flight's followers, until
    /// the key's flock comes free (or the writer stalls for the bound). Cancel-safe: dropping
    /// the future leaves the flight running, for [`Elsewhere::end`] or another `follow`.
    pub async fn follow(&mut self) -> Followed<X> {
        let Some(flight) = self.flight.clone() else {
            return Followed::Ended(Outcome::failed(FailKind::Internal, "followed twice"));
        };
        let cache = self.cache.clone();
        let key = flight.key.clone();
        let incomplete = cache.get_image_filepath(&key, Status::Incomplete);
        // The file followed (and its inode), once it had bytes; the bytes seen so far.
        let mut followed: Option<(Arc<File>, u64)> = flight
            .info()
            .and_then(|i| Some((i.file.clone(), i.file.metadata().ok()?.ino())));
        let mut seen = flight.written.load(Ordering::Acquire);
        let mut stall = Stall::new(&key, self.bound);
        loop {
            let lock = match cache.try_lock_key(&key) {
                Ok(l) => l,
                Err(e) => return self.ended(Outcome::failed(FailKind::Internal, e.to_string())),
            };
            if let Some(lock) = lock {
                let Some((_, ino)) = followed else {
                    let flight = self.flight.take().expect("checked above");
                    return Followed::Write(Permit {
                        flight,
                        lock: Some(lock),
                        map: self.map.clone(),
                        ended: false,
                    });
                };
                // Under the key's flock: nobody publishes or replaces it meanwhile.
                let (c, k) = (cache.clone(), key.clone());
                let opened = off_thread(move || c.open_for_read_uncounted(&k)).await;
                drop(lock);
                let outcome = match opened {
                    Some(Ok(Some(reader)))
                        if reader.file().metadata().is_ok_and(|m| m.ino() == ino)
                            && reader.record().size == seen_len(&reader) =>
                    {
                        Outcome::Done(Done::written(reader))
                    }
                    Some(Ok(_)) => Outcome::failed(
                        FailKind::Origin,
                        "the download run by another process on this cache failed",
                    ),
                    Some(Err(e)) => Outcome::failed(FailKind::Internal, e.to_string()),
                    None => Outcome::failed(FailKind::Internal, "opening the image panicked"),
                };
                return self.ended(outcome);
            }
            match &followed {
                None => {
                    // Not there yet (the other writer is asking its origin), or still empty.
                    if let Ok(f) = File::open(&incomplete)
                        && let Ok(m) = f.metadata()
                        && m.len() > 0
                    {
                        let file = Arc::new(f);
                        followed = Some((file.clone(), m.ino()));
                        tracing::info!(key = %key, "following a download run by another process");
                        flight.start_streaming(Streaming {
                            file,
                            size: None,
                            checksum: None,
                        });
                        seen = m.len();
                        flight.report_written(seen);
                    }
                }
                Some((file, ino)) => {
                    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
                    // Writers only append, and only ever publish the inode they wrote.
                    let replaced = std::fs::metadata(&incomplete).is_ok_and(|m| m.ino() != *ino);
                    if len < seen || replaced {
                        return self.ended(Outcome::failed(
                            FailKind::Origin,
                            "the file written by another process changed under its readers",
                        ));
                    }
                    if len > seen {
                        seen = len;
                        flight.report_written(seen);
                    }
                }
            }
            if let Err(StoreError::WriterStalled {
                stalled, waited, ..
            }) = stall.observe(cache.incomplete_len(&key))
            {
                tracing::warn!(key = %key, ?stalled, "the other process's writer made no progress: giving up");
                return self.ended(Outcome::TimedOut {
                    key,
                    stalled,
                    waited,
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// The length of the file a reader holds.
fn seen_len(reader: &CacheReader) -> u64 {
    reader.file().metadata().map(|m| m.len()).unwrap_or(0)
}

impl<X> Drop for Elsewhere<X> {
    fn drop(&mut self) {
        if let Some(f) = self.flight.take() {
            conclude(
                &self.map,
                &f,
                Outcome::failed(
                    FailKind::WriterGone,
                    "stopped following the download run by another process",
                ),
            );
        }
    }
}

/// Runs blocking store work (a database read) on a thread of its own: the store has no
/// runtime of its own to lend one. `None` if it panicked.
async fn off_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.await.ok()
}
