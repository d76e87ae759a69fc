//! Misses: one origin download per key, every concurrent client served from the growing file.
//!
//! The key lock is the store's ([`imgcache_store::KeyLocks`]): the first miss for a key gets
//! its write permit (the key's flock, so other processes sharing the cache directory are kept
//! out) and this module spawns the download; later misses for the same key follow that flight.
//! While another process holds the flock, the flight follows that process's file instead
//! ([`imgcache_store::Elsewhere::follow`]), and the permit is ours if it comes free unwritten.
//!
//! Readers follow the writer through the flight's phase watch: the writer thread reports the
//! bytes *written* to `incomplete/<key>` after each chunk, and each reader reads (by `pread`, on
//! its own descriptor of the same inode, so the later rename to the published name or to
//! `invalid/` changes nothing for it) up to that point. A reader whose response ends at the
//! image's last byte holds that byte back until the image is verified (size, checksum, format),
//! so a checksum mismatch or an origin failure always reaches it as an error (its connection is
//! cut), never as a clean, complete-looking 200. The verified bytes go out while the image is
//! still being fsynced and published ([`Phase::Verified`]); should publishing fail, the image is
//! not cached, and readers that have not sent their last byte yet are cut.
//!
//! Every flight ends with an explicit [`Outcome`]; what the server keeps beside it is only the
//! origin's answer for a [`Outcome::Passthrough`] ([`Beside`]).

use imgcache_store::off_thread;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::http::StatusCode;
use futures_util::StreamExt;
use imgcache_fetch::source::{BodyStream, OriginMeta};
use imgcache_fetch::{Admission, Admitted, FetchError, Hooks, Href, ImageMeta, StreamInfo};
use imgcache_store::{
    Acquired, Cache, Done, FailKind, Failure, Flight, Followed, Key, KeyLocks, Outcome, Permit,
    StoreError, Streaming,
};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::watch;
use tokio::task::JoinSet;

pub use imgcache_store::Phase;

use crate::error::ApiError;
use crate::peer_fill::Source;
use crate::state::AppState;

/// What the server keeps beside a flight: for [`Outcome::Passthrough`], the origin's answer,
/// handed to the first client that streams it (its request is not wasted; later clients ask
/// the origin themselves).
#[derive(Default)]
pub struct Beside {
    passthrough: Mutex<Option<(OriginMeta, BodyStream)>>,
    /// What the record will say of the image (set before the first byte): the responses of
    /// its followers take their validators from it, as a hit's come from the record.
    meta: OnceLock<ImageMeta>,
    /// What the status page shows of the download (`/ui/`).
    pub progress: crate::ui::progress::Progress,
    /// The responses following the growing file, carried on by a relay should the download
    /// outgrow the cache mid-way.
    pub followers: Arc<crate::relay::Followers>,
}

/// Whether a fill's bytes come from another node of the fleet (its progress says where they
/// come from, set before the first byte).
pub fn from_peer(fill: &Fill) -> bool {
    fill.extra().progress.source().0 == "peer"
}

/// How a request came to a fill.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Joined {
    /// Its download started for this request.
    Started,
    /// It follows a download already running (this server's or another process's).
    Followed,
}

/// What a fill's record will say of its image, once it streams (`None` while it follows
/// another process: only that process knows).
pub fn image_meta(fill: &Fill) -> Option<&ImageMeta> {
    fill.extra().meta.get()
}

/// A download in progress, as its followers see it.
pub type Fill = Flight<Beside>;

/// The origin's answer of a [`Outcome::Passthrough`] fill, to the first caller only.
pub fn take_passthrough(fill: &Fill) -> Option<(OriginMeta, BodyStream)> {
    fill.extra().passthrough.lock().expect("poisoned").take()
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

/// The fills in progress: the key locks of this server, and the tasks that run them.
pub struct Fills {
    locks: KeyLocks<Beside>,
    cancel: watch::Sender<bool>,
    tasks: Mutex<JoinSet<()>>,
}

/// How a fill task starts.
enum Lead {
    Write(Permit<Beside>),
    Elsewhere(imgcache_store::Elsewhere<Beside>),
}

impl Fills {
    /// `bound`: how long a follower of another process's writer waits for its file to grow.
    pub fn new(cache: Cache, bound: Duration) -> Fills {
        Fills {
            locks: KeyLocks::new(cache, bound),
            cancel: watch::Sender::new(false),
            tasks: Mutex::new(JoinSet::new()),
        }
    }

    /// The fill for `key`: the running one, or a new one whose download starts now.
    pub fn join_or_start(
        &self,
        state: &AppState,
        key: &Key,
        origin: Origin,
    ) -> Result<(Arc<Fill>, Joined), ApiError> {
        if *self.cancel.borrow() {
            return Err(shutting_down());
        }
        let lead = match self.locks.acquire(key)? {
            Acquired::Follow(f) => return Ok((f.into_flight(), Joined::Followed)),
            Acquired::Write(p) => Lead::Write(p),
            Acquired::Elsewhere(e) => Lead::Elsewhere(e),
        };
        let (fill, joined) = match &lead {
            Lead::Write(p) => (p.flight().clone(), Joined::Started),
            Lead::Elsewhere(e) => {
                e.flight()
                    .extra()
                    .progress
                    .set_source("another process", None);
                (e.flight().clone(), Joined::Followed)
            }
        };
        fill.extra().progress.set_origin(&origin.href_raw);
        let st = state.clone();
        let mut tasks = self.tasks.lock().expect("poisoned");
        while tasks.try_join_next().is_some() {}
        tasks.spawn(async move {
            let Some(mut permit) = lead_to_permit(&st, lead).await else {
                return;
            };
            let outcome = match run(&st, &mut permit, &origin).await {
                Ok(o) => o,
                Err(e) => {
                    // Said where it happened (admission, or the origin request in `run`).
                    tracing::debug!(key = %permit.key(), error = %e.message, "download failed");
                    Outcome::Failed(failure(&e))
                }
            };
            permit.finish(outcome);
        });
        Ok((fill, joined))
    }

    /// The fill of `key` another process on this cache directory is writing (an `imgcache
    /// fetch` beside this server), followed as a client's miss follows it, but never taken
    /// over: should that process stop before its first byte, the flight just ends (this
    /// server was given no origin for it). `None` when no other process writes it. For the
    /// peer endpoint, which never starts a download.
    pub fn follow_other_writer(
        &self,
        state: &AppState,
        key: &Key,
    ) -> Result<Option<Arc<Fill>>, ApiError> {
        // Nothing is written (a stat, not the flock: a lock taken here could end a flight a
        // client of this server just joined).
        if self.locks.cache().incomplete_len(key).unwrap_or(0) == 0 {
            return Ok(None);
        }
        let elsewhere = match self.locks.acquire(key)? {
            Acquired::Follow(f) => return Ok(Some(f.into_flight())),
            Acquired::Elsewhere(e) => e,
            // A dead writer's leftover (or a writer that just finished): nothing to follow.
            Acquired::Write(p) => {
                p.finish(Outcome::failed(FailKind::WriterGone, "nobody writes it"));
                return Ok(None);
            }
        };
        let fill = elsewhere.flight().clone();
        fill.extra().progress.set_source("another process", None);
        let st = state.clone();
        let mut tasks = self.tasks.lock().expect("poisoned");
        while tasks.try_join_next().is_some() {}
        tasks.spawn(async move {
            // Followed as a client's miss follows it; a permit handed back means the other
            // process stopped unwritten, and this server has no origin to take over with.
            if let Some(p) = lead_to_permit(&st, Lead::Elsewhere(elsewhere)).await {
                p.finish(Outcome::failed(
                    FailKind::WriterGone,
                    "the process writing it stopped before its first byte",
                ));
            }
        });
        Ok(Some(fill))
    }

    /// The running fill of `key`, if any.
    pub fn get(&self, key: &Key) -> Option<Arc<Fill>> {
        self.locks.get(key)
    }

    /// The downloads in progress (a snapshot).
    pub fn flights(&self) -> Vec<Arc<Fill>> {
        self.locks.flights()
    }

    /// Downloads in progress.
    pub fn in_progress(&self) -> usize {
        self.locks.in_flight()
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

fn shutting_down() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "the server is shutting down",
    )
}

/// The write permit: ours at once, or once another process's writer gives the flock back
/// unwritten. `None` when the flight already ended (the other writer's outcome, or shutdown).
async fn lead_to_permit(state: &AppState, lead: Lead) -> Option<Permit<Beside>> {
    let mut elsewhere = match lead {
        Lead::Write(p) => return Some(p),
        Lead::Elsewhere(e) => e,
    };
    let key = elsewhere.flight().key().clone();
    let mut cancel = state.fills.cancelled();
    let followed = tokio::select! {
        f = elsewhere.follow() => Some(f),
        _ = cancel.wait_for(|c| *c) => None,
    };
    match followed {
        Some(Followed::Write(p)) => Some(p),
        Some(Followed::Ended(o)) => {
            if let Outcome::Failed(f) = &o {
                tracing::warn!(%key, error = %f, "the download run by another process failed");
            }
            None
        }
        None => {
            elsewhere.end(Outcome::Failed(failure(&shutting_down())));
            None
        }
    }
}

/// How a failure is kept in a flight's outcome, and how a client with no bytes yet gets it.
pub fn failure(e: &ApiError) -> Failure {
    let kind = match e.status {
        StatusCode::BAD_REQUEST => FailKind::BadRequest,
        StatusCode::UNAUTHORIZED => FailKind::Unauthorized,
        StatusCode::FORBIDDEN => FailKind::Forbidden,
        StatusCode::NOT_FOUND => FailKind::NotFound,
        StatusCode::CONFLICT => FailKind::Conflict,
        StatusCode::SERVICE_UNAVAILABLE => FailKind::Unavailable,
        StatusCode::INSUFFICIENT_STORAGE => FailKind::Storage,
        StatusCode::INTERNAL_SERVER_ERROR => FailKind::Internal,
        _ => FailKind::Origin,
    };
    Failure::new(kind, e.message.as_str())
}

/// The status of a failed flight.
pub fn status_of(kind: FailKind) -> StatusCode {
    match kind {
        FailKind::BadRequest => StatusCode::BAD_REQUEST,
        FailKind::Unauthorized => StatusCode::UNAUTHORIZED,
        FailKind::Forbidden => StatusCode::FORBIDDEN,
        FailKind::NotFound => StatusCode::NOT_FOUND,
        FailKind::Conflict => StatusCode::CONFLICT,
        FailKind::Origin | FailKind::WriterGone => StatusCode::BAD_GATEWAY,
        FailKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        FailKind::Storage => StatusCode::INSUFFICIENT_STORAGE,
        FailKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The answer to a client with no bytes yet, for a flight that did not end `Done`.
pub fn outcome_error(o: &Outcome) -> ApiError {
    match o {
        Outcome::Failed(f) => ApiError::new(status_of(f.kind), f.reason.to_string()),
        Outcome::TimedOut { .. } => ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            o.error().map(|e| e.to_string()).unwrap_or_default(),
        ),
        Outcome::Passthrough => ApiError::internal("the image is streamed uncached"),
        Outcome::Done(_) => ApiError::internal("the image is published"),
    }
}

/// The download, under the key's permit: the origin's answer, and the admission pipeline,
/// which is the only code that writes it into the cache. Ok(the flight's outcome) or the
/// error new readers answer with.
async fn run(
    state: &AppState,
    permit: &mut Permit<Beside>,
    origin: &Origin,
) -> Result<Outcome, ApiError> {
    let cache = state.cache.clone();
    let key = permit.key().clone();
    // A miss that finds the image published (by the writer it waited for) is done: the image
    // is opened under the flock, so no eviction comes between. A revalidation asks with the
    // copy's validators.
    let held = if origin.revalidate {
        let rec = off_thread(move || cache.get_record(&key))
            .await
            .inspect_err(|e| tracing::warn!(key = %permit.key(), error = %e, "download failed: the cache could not be read"))?;
        rec.map(|r| ImageMeta::from_props(&r.props).validators)
            .filter(|v| !v.is_empty())
    } else {
        let open = off_thread(move || cache.open_for_read_uncounted(&key))
            .await
            .inspect_err(|e| tracing::warn!(key = %permit.key(), error = %e, "download failed: the cache could not be read"))?;
        if let Some(reader) = open {
            return Ok(Outcome::Done(Done::held(reader)));
        }
        None
    };
    // Fleet mode: another node holding or filling the image is one more origin; else this
    // node takes the fleet's origin lease (kept until the download ends).
    let source = match origin.revalidate {
        true => Source::Origin(None),
        false => crate::peer_fill::source(state, permit.key(), origin).await,
    };
    let (response, checksum, peer, _lease) = match source {
        Source::Peer {
            response,
            checksum,
            node,
        } => {
            state.metrics.peer_fills.inc();
            let progress = &permit.flight().extra().progress;
            progress.set_source("peer", Some(&node));
            (*response, Some(checksum), Some(node), None)
        }
        Source::Origin(lease) => {
            state.metrics.origin_requests.inc();
            permit.flight().extra().progress.set_source("origin", None);
            let response = state
                .fetcher
                .request(&origin.href, held.as_ref(), origin.glance_token.clone())
                .await
                .map_err(|e| {
                    // Admission logs its own refusals and failures; this one came before it.
                    tracing::warn!(key = %permit.key(), error = %e, "download failed: the origin did not answer with the image");
                    state.metrics.count_origin_error(&e);
                    origin_error(e)
                })?;
            (response, None, None, lease)
        }
    };
    let _inflight = InFlight::new(&state.metrics.inflight_downloads);
    let verified = Arc::new(AtomicBool::new(false));
    let report = permit.reporter();
    let hooks = Hooks {
        progress: None,
        streaming: Some({
            let (r, f, fleet) = (report.clone(), permit.flight().clone(), state.fleet.clone());
            Box::new(move |s: StreamInfo| {
                let _ = f.extra().meta.set(s.meta);
                // Peers may follow this fill from now on.
                if let Some(fleet) = fleet {
                    let (k, size, sum) = (f.key().to_string(), s.size, s.checksum.clone());
                    tokio::spawn(async move {
                        fleet.filling(&k, size, sum.map(|c| c.to_string())).await;
                    });
                }
                r.streaming(Streaming {
                    file: Arc::new(s.file),
                    size: s.size,
                    checksum: s.checksum,
                })
            })
        }),
        written: Some({
            let (r, f) = (report.clone(), permit.flight().clone());
            let fleet = state
                .fleet
                .clone()
                .map(|n| crate::fleet_node::FillProgress::new(n, permit.key().as_str()));
            Arc::new(move |n| {
                r.written(n);
                f.extra().progress.sample(n);
                if let Some(fleet) = &fleet {
                    fleet.written(n);
                }
            })
        }),
        // Readers get the last byte as soon as the bytes are verified; fsync, record and
        // rename (the file is durable before it is published) finish after.
        verified: Some({
            let (r, verified) = (report.clone(), verified.clone());
            Box::new(move |rec| {
                verified.store(true, Ordering::Release);
                r.verified(rec.size);
            })
        }),
        evicted: Some({
            let (counter, st) = (state.metrics.evictions.clone(), state.clone());
            let reason = format!("room for {}", permit.key());
            Arc::new(move |gone: &[(String, u64)]| {
                counter.inc_by(gone.len() as u64);
                st.events.evicted(gone, &reason);
                let (st, keys) = (
                    st.clone(),
                    gone.iter().map(|g| g.0.clone()).collect::<Vec<_>>(),
                );
                tokio::spawn(async move { st.withdraw(keys).await });
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
    let Some(lock) = permit.take_lock() else {
        return Err(ApiError::internal("the key's flock was handed out twice"));
    };
    // What a relayed rest is checked against, should the download outgrow the cache.
    let relay_expected = checksum.clone();
    let adm = Admission {
        key: permit.key().clone(),
        href: origin.href.clone(),
        href_raw: origin.href_raw.clone(),
        permit: lock,
        declared: None,
        checksum,
        force_raw: false,
        hooks,
    };
    match state.fetcher.admit(adm, response).await {
        Ok(Admitted::Published(reader)) => {
            state.prune_wake.notify_one();
            if let Some(fleet) = &state.fleet {
                let rec = reader.record();
                let sum = rec.checksum.as_ref().map(ToString::to_string);
                fleet.published(permit.key().as_str(), rec.size, sum).await;
            }
            Ok(Outcome::Done(Done::written(reader)))
        }
        Ok(Admitted::Unchanged(Some(reader))) => Ok(Outcome::Done(Done::held(reader))),
        // The copy the origin confirmed was evicted while it was asked.
        Ok(Admitted::Unchanged(None)) => Ok(Outcome::failed(
            FailKind::Unavailable,
            "the cached copy was evicted while it was revalidated; retry",
        )),
        Ok(Admitted::Passthrough {
            meta,
            body,
            room,
            written,
        }) if written > 0 => {
            // Outgrew the cache mid-way: the followers have the file's bytes; the relay
            // carries them on with the rest, checked as it passes.
            tracing::info!(key = %permit.key(), written, ?room, "outgrew the cache: its followers are streamed the rest without caching");
            let expected = relay_expected.or_else(|| meta.checksum.clone());
            let body = crate::verify_stream::verified(
                body,
                expected,
                meta.size,
                state.metrics.checksum_failures.clone(),
            );
            permit.flight().extra().followers.start(written, body);
            Ok(Outcome::Passthrough)
        }
        Ok(Admitted::Passthrough {
            meta, body, room, ..
        }) => {
            tracing::info!(key = %permit.key(), size = ?meta.size, ?room, "does not fit the cache: streamed without caching");
            *permit
                .flight()
                .extra()
                .passthrough
                .lock()
                .expect("poisoned") = Some((meta, body));
            Ok(Outcome::Passthrough)
        }
        Err(e) => {
            if verified.load(Ordering::Acquire) {
                // Clients that already had every byte got the right image; it is just not
                // cached. Readers still sending are cut (`Failed`): the file they read did not
                // make it to the disk.
                tracing::warn!(key = %permit.key(), error = %e, "verified download served but not cached: publishing failed");
            }
            state.metrics.count_refusal(&e);
            if peer.is_none() {
                state.metrics.count_origin_error(&e);
            }
            state
                .events
                .refused(permit.key().as_str(), &origin.href_raw, &e);
            if let Some(fleet) = &state.fleet {
                // Nothing here to follow any more; a peer that sent a bad image is skipped
                // for a while (the next miss tries another holder or the origin).
                if let Some(node) = &peer
                    && e.refusal().is_some()
                {
                    fleet.source.suspects.mark(node);
                }
                fleet.gone(permit.key().as_str()).await;
            }
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
