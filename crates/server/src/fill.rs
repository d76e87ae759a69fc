//! Misses: one origin download per key, every concurrent client served from the growing file.
//!
//! The first miss for a key puts a [`Fill`] in the in-process map and spawns its download task;
//! later misses for the same key find it there and follow it. Other processes sharing the cache
//! directory are kept out by the store's per-key flock, which the download task holds from
//! before it asks the origin until the image is published or discarded; while another process
//! holds it, the fill follows that process's file instead ([`crate::fill_elsewhere`]).
//!
//! Readers follow the writer through a `watch` of the fill's [`Phase`]: the writer thread
//! reports the bytes *written* to `incomplete/<key>` after each chunk, and each reader reads
//! (by `pread`, on its own descriptor of the same inode, so the later rename to the published
//! name or to `invalid/` changes nothing for it) up to that point. A reader whose response ends
//! at the image's last byte holds that byte back until the image is verified (size, checksum,
//! format), so a checksum mismatch or an origin failure always reaches it as an error (its
//! connection is cut), never as a clean, complete-looking 200. The verified bytes go out while
//! the image is still being fsynced and published ([`Phase::Verified`]); should publishing fail,
//! the image is not cached, and readers that have not sent their last byte yet are cut.

use std::collections::HashMap;
use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::http::StatusCode;
use futures_util::StreamExt;
use imgcache_fetch::source::{BodyStream, OriginMeta};
use imgcache_fetch::{Admission, Admitted, FetchError, Hooks, Href, ImageMeta, StreamInfo};
use imgcache_store::{Integrity, Key, StoreError};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::error::ApiError;
use crate::fill_elsewhere::Turn;
use crate::state::AppState;

/// Where a fill is.
#[derive(Clone, Debug)]
pub enum Phase {
    /// Taking the key lock, asking the origin.
    Starting,
    /// Bytes `0..written` are in the file and may be read.
    Streaming { written: u64 },
    /// All `size` bytes are written and verified, and may all be read; the image is being
    /// fsynced and published (`Done` next, or `Failed` if publishing fails).
    Verified { size: u64 },
    /// Verified and published; the file holds `size` bytes.
    Done { size: u64 },
    /// Someone else (another process) published the image: serve it as a hit.
    Published,
    /// The image cannot be cached (larger than the cache may hold): each client streams it
    /// from the origin itself.
    Passthrough,
    /// Failed. Readers already streaming abort; new ones answer with this status.
    Failed {
        status: StatusCode,
        message: Arc<str>,
    },
}

impl Phase {
    /// The fill is over: nothing follows this phase.
    pub fn is_end(&self) -> bool {
        matches!(
            self,
            Phase::Done { .. } | Phase::Published | Phase::Passthrough | Phase::Failed { .. }
        )
    }
}

/// What readers need once bytes flow.
#[derive(Debug)]
pub struct Streaming {
    /// A read-only descriptor of `incomplete/<key>`, opened before the first byte was written.
    pub file: Arc<File>,
    /// Total size, when the origin said.
    pub size: Option<u64>,
    /// The checksum the bytes are verified against.
    pub checksum: Option<Integrity>,
    /// What the record will say of the image: the response's validators come from it, as a
    /// hit's come from the record.
    pub meta: ImageMeta,
}

pub struct Fill {
    pub key: Key,
    phase: watch::Sender<Phase>,
    /// For [`Phase::Passthrough`]: the origin's answer, handed to the first client that
    /// streams it (its request is not wasted; later clients ask the origin themselves).
    passthrough: Mutex<Option<(OriginMeta, BodyStream)>>,
    /// Bytes written so far, updated after every chunk. The `phase` watch only carries it
    /// every [`NOTIFY_STEP`] bytes (waking every reader per chunk costs more CPU than sending
    /// the bytes once many follow one download); readers look here between wake-ups.
    written: Arc<AtomicU64>,
    info: OnceLock<Streaming>,
}

/// Bytes written between two wake-ups of the readers following a download.
pub const NOTIFY_STEP: u64 = 1 << 20;

impl Fill {
    fn new(key: Key) -> Fill {
        Fill {
            key,
            phase: watch::Sender::new(Phase::Starting),
            passthrough: Mutex::new(None),
            written: Arc::new(AtomicU64::new(0)),
            info: OnceLock::new(),
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    /// Waits for the fill's end (for callers with no client to stream: the prefetcher and
    /// revalidation).
    pub async fn ended(&self) -> Phase {
        let mut rx = self.subscribe();
        // The sender lives in `self`, so the watch cannot close while this waits.
        rx.wait_for(Phase::is_end)
            .await
            .map(|p| p.clone())
            .expect("a fill holds its own sender")
    }

    /// The origin's answer of a [`Phase::Passthrough`] fill, to the first caller only.
    pub fn take_passthrough(&self) -> Option<(OriginMeta, BodyStream)> {
        self.passthrough.lock().expect("poisoned").take()
    }

    /// Readers may start: the file they follow, and what the origin said of it.
    pub(crate) fn start_streaming(&self, streaming: Streaming) {
        let _ = self.info.set(streaming);
        self.phase.send_replace(Phase::Streaming { written: 0 });
    }

    /// `n` bytes are in the file: readers see it at once through the count, and are woken
    /// for the first bytes (time to first byte) and then every [`NOTIFY_STEP`]. `notified`
    /// is the caller's record of the last wake-up.
    pub(crate) fn report_written(&self, n: u64, notified: &AtomicU64) {
        self.written.store(n, Ordering::Release);
        let last = notified.load(Ordering::Relaxed);
        if last == 0 || n.saturating_sub(last) >= NOTIFY_STEP {
            notified.store(n, Ordering::Relaxed);
            self.phase.send_replace(Phase::Streaming { written: n });
        }
    }

    /// The bytes written so far (at least what the last `Streaming` phase said).
    pub fn written(&self) -> Arc<AtomicU64> {
        self.written.clone()
    }

    pub fn info(&self) -> Option<&Streaming> {
        self.info.get()
    }
}

/// Where an image comes from, for a miss.
#[derive(Clone, Debug)]
pub struct Origin {
    pub href: Href,
    /// The href as the client gave it (the key and the record's `href` prop come from it).
    pub href_raw: String,
    /// Token for an upstream Glance download (the configured one wins when set).
    pub glance_token: Option<String>,
    /// A background check of a cached copy: one conditional request with its validators
    /// (a changed image replaces it), instead of a miss's unconditional one.
    pub revalidate: bool,
}

/// The fills in progress.
pub struct Fills {
    map: Mutex<HashMap<Key, Arc<Fill>>>,
    cancel: watch::Sender<bool>,
    tasks: Mutex<JoinSet<()>>,
}

impl Default for Fills {
    fn default() -> Self {
        Fills {
            map: Mutex::new(HashMap::new()),
            cancel: watch::Sender::new(false),
            tasks: Mutex::new(JoinSet::new()),
        }
    }
}

impl Fills {
    /// The fill for `key`: the running one, or a new one whose download starts now.
    pub fn join_or_start(&self, state: &AppState, key: &Key, origin: Origin) -> Arc<Fill> {
        let mut map = self.map.lock().expect("poisoned");
        if let Some(f) = map.get(key) {
            return f.clone();
        }
        let fill = Arc::new(Fill::new(key.clone()));
        map.insert(key.clone(), fill.clone());
        drop(map);
        if *self.cancel.borrow() {
            fill.phase.send_replace(Phase::Failed {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: "the server is shutting down".into(),
            });
            self.forget(&fill);
            return fill;
        }
        let st = state.clone();
        let f = fill.clone();
        let mut tasks = self.tasks.lock().expect("poisoned");
        while tasks.try_join_next().is_some() {}
        tasks.spawn(async move {
            let end = run(&st, &f, &origin).await;
            if let Err(e) = &end {
                tracing::warn!(key = %f.key, error = %e.message, "download failed");
            }
            f.phase.send_replace(match end {
                Ok(p) => p,
                Err(e) => Phase::Failed {
                    status: e.status,
                    message: e.message.into(),
                },
            });
            st.fills.forget(&f);
        });
        fill
    }

    /// Waits while `key`'s download is verified but still being published (its fsync and
    /// rename): a request that comes after a client got the whole image is then a hit, as it
    /// was before clients got their last byte ahead of publishing. Returns at once otherwise.
    pub async fn settle(&self, key: &Key) {
        let fill = self.map.lock().expect("poisoned").get(key).cloned();
        if let Some(fill) = fill {
            let mut rx = fill.subscribe();
            drop(fill);
            let _ = rx.wait_for(|p| !matches!(p, Phase::Verified { .. })).await;
        }
    }

    /// The running fill of `key`, if any.
    pub fn get(&self, key: &Key) -> Option<Arc<Fill>> {
        self.map.lock().expect("poisoned").get(key).cloned()
    }

    /// Downloads in progress.
    pub fn in_progress(&self) -> usize {
        self.map.lock().expect("poisoned").len()
    }

    fn forget(&self, fill: &Arc<Fill>) {
        let mut map = self.map.lock().expect("poisoned");
        if map.get(&fill.key).is_some_and(|f| Arc::ptr_eq(f, fill)) {
            map.remove(&fill.key);
        }
    }

    /// Shutdown: every download still running is aborted (its file goes to `invalid/`,
    /// nothing is published) and new misses are refused. Waits for the tasks to wind up.
    pub async fn abort_all(&self, within: Duration) {
        self.cancel.send_replace(true);
        let mut tasks = std::mem::take(&mut *self.tasks.lock().expect("poisoned"));
        let all = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(within, all).await.is_err() {
            tracing::warn!("downloads did not stop in time");
        }
    }

    pub(crate) fn cancelled(&self) -> watch::Receiver<bool> {
        self.cancel.subscribe()
    }
}

/// The download task: the key's permit (or another process's download, followed), the
/// origin's answer, and the admission pipeline, which is the only code that writes it into
/// the cache. Ok(final phase) or the error new readers answer with.
async fn run(state: &AppState, fill: &Arc<Fill>, origin: &Origin) -> Result<Phase, ApiError> {
    // Another process writing this key holds its flock: follow its file until it is done.
    let permit = match crate::fill_elsewhere::lock_or_follow(state, fill).await? {
        Turn::Ours(lock) => lock,
        Turn::Followed(phase) => return Ok(phase),
    };
    let cache = state.cache.clone();
    let key = fill.key.clone();
    let rec = blocking(move || cache.get_record(&key)).await?;
    // A revalidation asks with the copy's validators; a miss that finds the image published
    // (by the writer it waited for) is done.
    let held = match (&rec, origin.revalidate) {
        (Some(_), false) => return Ok(Phase::Published),
        (Some(rec), true) => {
            Some(ImageMeta::from_props(&rec.props).validators).filter(|v| !v.is_empty())
        }
        (None, _) => None,
    };
    state.metrics.origin_requests.inc();
    let response = state
        .fetcher
        .request(&origin.href, held.as_ref(), origin.glance_token.clone())
        .await
        .map_err(origin_error)?;
    let _inflight = InFlight::new(&state.metrics.inflight_downloads);
    let verified = Arc::new(AtomicBool::new(false));
    let hooks = Hooks {
        progress: None,
        streaming: Some({
            let f = fill.clone();
            Box::new(move |s: StreamInfo| {
                f.start_streaming(Streaming {
                    file: Arc::new(s.file),
                    size: s.size,
                    checksum: s.checksum,
                    meta: s.meta,
                })
            })
        }),
        written: Some({
            let f = fill.clone();
            let notified = AtomicU64::new(0);
            Arc::new(move |n| f.report_written(n, &notified))
        }),
        // Readers get the last byte as soon as the bytes are verified; fsync, record and
        // rename (the file is durable before it is published) finish after.
        verified: Some({
            let (f, verified) = (fill.clone(), verified.clone());
            Box::new(move |rec| {
                verified.store(true, Ordering::Release);
                f.phase.send_replace(Phase::Verified { size: rec.size });
            })
        }),
        evicted: Some({
            let counter = state.metrics.evictions.clone();
            Arc::new(move |gone: &[(String, u64)]| {
                counter.inc_by(gone.len() as u64);
            })
        }),
        body: Some({
            let (cancel, counter) = (
                state.fills.cancelled(),
                state.metrics.bytes_from_origin.clone(),
            );
            Box::new(move |body| watched(body, cancel, counter))
        }),
    };
    let adm = Admission {
        key: fill.key.clone(),
        href: origin.href.clone(),
        href_raw: origin.href_raw.clone(),
        permit,
        declared: None,
        checksum: None,
        force_raw: false,
        hooks,
    };
    match state.fetcher.admit(adm, response).await {
        Ok(Admitted::Published(reader)) => {
            let size = reader.record().size;
            drop(reader);
            state.prune_wake.notify_one();
            Ok(Phase::Done { size })
        }
        Ok(Admitted::Unchanged(_)) => Ok(Phase::Published),
        Ok(Admitted::Passthrough { meta, body, room }) => {
            tracing::info!(key = %fill.key, size = ?meta.size, ?room, "does not fit the cache: streamed without caching");
            *fill.passthrough.lock().expect("poisoned") = Some((meta, body));
            Ok(Phase::Passthrough)
        }
        Err(e) => {
            if verified.load(Ordering::Acquire) {
                // Clients that already had every byte got the right image; it is just not
                // cached. Readers still sending are cut (`Failed`): the file they read did not
                // make it to the disk.
                tracing::warn!(key = %fill.key, error = %e, "verified download served but not cached: publishing failed");
            }
            state.metrics.count_refusal(&e);
            Err(origin_error(e))
        }
    }
}

/// Counts a download in flight for as long as it lives.
struct InFlight<'a>(&'a prometheus_client::metrics::gauge::Gauge);
impl<'a> InFlight<'a> {
    fn new(g: &'a prometheus_client::metrics::gauge::Gauge) -> Self {
        g.inc();
        InFlight(g)
    }
}
impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The origin's body, counted, and cut with an error when the server shuts down (so the
/// download fails and its file goes to `invalid/`).
pub fn watched(body: BodyStream, cancel: watch::Receiver<bool>, counter: Counter) -> BodyStream {
    Box::pin(futures_util::stream::unfold(
        Some((body, cancel)),
        move |state| {
            let counter = counter.clone();
            async move {
                let (mut body, mut cancel) = state?;
                let stop = async {
                    let _ = cancel.wait_for(|c| *c).await;
                };
                tokio::select! {
                    biased;
                    _ = stop => Some((
                        Err(FetchError::Cancelled("the server is shutting down".into())),
                        None,
                    )),
                    item = body.next() => match item {
                        Some(Ok(b)) => {
                            counter.inc_by(b.len() as u64);
                            Some((Ok(b), Some((body, cancel))))
                        }
                        Some(Err(e)) => Some((Err(e), None)),
                        None => None,
                    },
                }
            }
        },
    ))
}

/// How an origin or store failure reaches a client that has no bytes yet.
pub fn origin_error(e: FetchError) -> ApiError {
    match &e {
        FetchError::Status { status, .. } if matches!(status, 401 | 403 | 404) => ApiError::new(
            StatusCode::from_u16(*status).expect("valid status"),
            e.to_string(),
        ),
        FetchError::GlanceNotActive { .. } => ApiError::new(StatusCode::CONFLICT, e.to_string()),
        FetchError::FileNotAllowed { .. } => ApiError::new(StatusCode::FORBIDDEN, e.to_string()),
        FetchError::BadHref { .. } | FetchError::UnsupportedScheme { .. } => {
            ApiError::bad_request(e.to_string())
        }
        // The origin (or a redirect it answered) pointed somewhere not allowed: a bad
        // gateway, whose reason the client sees; nothing was asked of the target.
        FetchError::RedirectRefused { .. } | FetchError::TooManyRedirects { .. } => {
            ApiError::new(StatusCode::BAD_GATEWAY, e.to_string())
        }
        FetchError::NoGlance { .. } => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
        FetchError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            ApiError::not_found(e.to_string())
        }
        FetchError::Store(StoreError::DiskFull { .. }) => {
            ApiError::new(StatusCode::INSUFFICIENT_STORAGE, e.to_string())
        }
        _ => ApiError::new(StatusCode::BAD_GATEWAY, e.to_string()),
    }
}

/// Runs blocking store work off the async runtime.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("blocking task: {e}")))?
        .map_err(ApiError::from)
}
