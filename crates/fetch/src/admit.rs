//! The admission pipeline: the one door through which an origin's bytes enter the cache.
//!
//! Every entrance (a server miss on `/v2` or `/v1/fetch`, the prefetcher, a background
//! revalidation, the server's `file://` path, `imgcache fetch` with or without `--raw`) takes
//! the key's write permit, asks its origin, and hands the answer here. [`ImageCache::admit`]
//! applies, in this order and for all of them:
//! 1. room: a reservation under the hard size limit ([`RoomPolicy::HardLimit`], the server),
//!    or free disk space across the registry's caches ([`RoomPolicy::DiskSpace`], Ironic's
//!    provisioning); an image that cannot fit evicts nothing and is handed back to be
//!    streamed uncached (or refused);
//! 2. zstd decompression and streaming inspection against the declared format (the caller's,
//!    else Glance's `disk_format`) and the permitted formats ([`pipeline::prepare`]);
//! 3. length and checksum (the caller's, else the origin's) as the bytes are written;
//! 4. final inspection, conversion to raw, typed metadata and the commit ([`pipeline::finish`]).
//!
//! Redirects and the allow-list are the HTTP source's, below this (each hop re-checked).
//! The caller's hooks see the bytes as they are written (readers following a download) and
//! the moment they are verified; nothing is visible in the cache before the commit.

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use imgcache_store::record::now;
use imgcache_store::{
    CacheReader, FileLock, Integrity, Key, Reservation, Room, Status, StoreError, WriteOptions,
};

use crate::download::{WrittenHook, stream_into_reporting};
use crate::error::{FetchError, Result};
use crate::formats::DiskFormat;
use crate::href::Href;
use crate::meta::ImageMeta;
use crate::pipeline::{self, VerifiedHook};
use crate::progress::{Progress, Quiet};
use crate::provision::ImageCache;
use crate::resume;
use crate::source::{BodyStream, OriginMeta, Response};
use imgcache_store::off_thread;

/// How a download makes room in the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoomPolicy {
    /// `max_size` is a hard limit: room is reserved before the first byte (evicting least
    /// recently used images when that makes enough), an unannounced length grows its
    /// reservation as it is written, and what cannot fit is handed back uncached (also
    /// mid-way, once an unannounced length outgrows the room the cache can make).
    HardLimit(u64),
    /// Ironic's: free disk space is made across the caches on the filesystem (with a
    /// registry), and the size cap is restored by clean-up after the download.
    DiskSpace,
}

/// A reservation for an unannounced length grows by at least this much at a time.
const GROW_STEP: u64 = 64 << 20;

/// What the admission needs besides the origin's answer.
pub struct Admission {
    pub key: Key,
    pub href: Href,
    /// The href as the client gave it (recorded in the image's metadata).
    pub href_raw: String,
    /// The key's write permit: held until the image is published or discarded.
    pub permit: FileLock,
    /// The format the caller declares (`--format`); else the origin's (Glance's `disk_format`).
    pub declared: Option<DiskFormat>,
    /// A checksum the caller vouches for; else the origin's.
    pub checksum: Option<Integrity>,
    /// Convert to raw (Ironic's `force_raw`).
    pub force_raw: bool,
    pub hooks: Hooks,
}

/// The caller's view of a download in progress.
#[derive(Default)]
pub struct Hooks {
    pub progress: Option<Arc<dyn Progress>>,
    /// Bytes are about to flow into the file: a read-only descriptor of it (valid after the
    /// rename that publishes it), and the size and checksum the origin announced.
    pub streaming: Option<Box<dyn FnOnce(StreamInfo) + Send>>,
    /// The bytes written so far, after each batch.
    pub written: Option<WrittenHook>,
    /// The bytes passed every check and are about to be published.
    pub verified: Option<VerifiedHook>,
    /// Wraps the origin's body before anything reads it (the server counts its bytes and
    /// cuts it at shutdown).
    pub body: Option<Box<dyn FnOnce(BodyStream) -> BodyStream + Send>>,
    /// Images evicted to make this download's room (the server counts them).
    pub evicted: Option<EvictedHook>,
}

/// Told of the images (key, bytes) evicted to make room, each time some are.
pub type EvictedHook = Arc<dyn Fn(&[(String, u64)]) + Send + Sync>;

pub struct StreamInfo {
    pub file: File,
    pub size: Option<u64>,
    pub checksum: Option<Integrity>,
    /// What the record will say of the image (validators, the origin's checksums): what a
    /// reader of the growing file describes it with, as a hit does from the record.
    pub meta: ImageMeta,
}

/// How an admission ended (its failures are errors: nothing was published).
pub enum Admitted {
    /// The origin confirmed the copy held (a 304, an unchanged mtime); it is open for reading,
    /// or `None` if it was evicted while being checked.
    Unchanged(Option<CacheReader>),
    /// Verified and published; open for reading (its flock keeps eviction away).
    Published(CacheReader),
    /// It does not fit the cache: the origin's answer, untouched, for the caller to stream
    /// uncached. Nothing was evicted for it.
    Passthrough {
        meta: OriginMeta,
        body: BodyStream,
        room: Room,
        /// How many of the body's first bytes were written to the file the streaming hook
        /// was given before the download outgrew the cache (0: handed back before a byte was
        /// written, and the streaming hook was never called).
        written: u64,
    },
}

impl ImageCache {
    /// Admits the origin's answer `response` for `adm.key` (see the module docs).
    ///
    /// Every download's story is logged here, once for all entrances: started (the origin
    /// answered with bytes), finished (published), refused (a verdict on the image: unsafe,
    /// checksum, size, truncated) or failed.
    pub async fn admit(&self, adm: Admission, response: Response) -> Result<Admitted> {
        let (key, href) = (adm.key.clone(), adm.href_raw.clone());
        if let Response::Body { meta, .. } | Response::LocalFile { meta, .. } = &response {
            tracing::info!(%key, %href, size = ?meta.size, "download started");
        }
        let t0 = std::time::Instant::now();
        let res = self.admit_response(adm, response).await;
        let seconds = (t0.elapsed().as_secs_f64() * 1000.0).round() / 1000.0;
        match &res {
            Ok(Admitted::Published(r)) => {
                tracing::info!(%key, %href, size = r.record().size, seconds, "download finished: published")
            }
            Ok(Admitted::Unchanged(_)) => {
                tracing::debug!(%key, %href, "the origin confirmed the cached copy")
            }
            // Logged where the decision is made (it does not fit the cache).
            Ok(Admitted::Passthrough { .. }) => {}
            Err(e) => match e.refusal() {
                Some(reason) => {
                    tracing::warn!(%key, %href, reason, error = %e, seconds, "download refused")
                }
                None => tracing::warn!(%key, %href, error = %e, seconds, "download failed"),
            },
        }
        res
    }

    async fn admit_response(&self, adm: Admission, response: Response) -> Result<Admitted> {
        let (meta, body) = match response {
            Response::NotModified => return self.unchanged(adm).await,
            Response::Body { meta, body } => (meta, body),
            Response::LocalFile { meta, path } => {
                let meta = OriginMeta {
                    checksum: adm.checksum.clone().or(meta.checksum),
                    ..meta
                };
                return self.admit_local(adm, meta, path).await;
            }
        };
        self.admit_body(adm, meta, body).await
    }

    /// A 304 or an unchanged file: the check time is refreshed, the copy opened.
    async fn unchanged(&self, adm: Admission) -> Result<Admitted> {
        let cache = self.cache().clone();
        let key = adm.key;
        let reader = off_thread(move || {
            cache.set_prop(&key, ImageMeta::VALIDATED_AT, &now().to_string())?;
            cache.open_for_read_uncounted(&key)
        })
        .await?;
        drop(adm.permit);
        Ok(Admitted::Unchanged(reader))
    }

    /// The room for `size` bytes (`None`: not announced, the reservation starts empty and
    /// grows), or the reason there is none.
    async fn room(
        &self,
        size: Option<u64>,
        evicted: Option<&EvictedHook>,
    ) -> Result<std::result::Result<Option<Reservation>, Room>> {
        match self.room_policy() {
            RoomPolicy::HardLimit(max) => {
                let cache = self.cache().clone();
                let need = size.unwrap_or(0);
                match off_thread(move || cache.reserve(need, max)).await? {
                    Room::Reserved(r) => {
                        if !r.evicted.is_empty() {
                            tracing::info!(evicted = r.evicted.len(), size = need, "made room");
                            if let Some(hook) = evicted {
                                hook(&r.evicted);
                            }
                        }
                        Ok(Ok(Some(r)))
                    }
                    refused => Ok(Err(refused)),
                }
            }
            RoomPolicy::DiskSpace => {
                if let Some(size) = size {
                    self.make_disk_space(size).await?;
                }
                Ok(Ok(None))
            }
        }
    }

    async fn admit_body(
        &self,
        mut adm: Admission,
        meta: OriginMeta,
        body: BodyStream,
    ) -> Result<Admitted> {
        let origin = adm.href.to_string();
        let declared = pipeline::declared(adm.declared, meta.disk_format.as_deref(), &origin)?;
        let wrap = adm.hooks.body.take();
        let wrap = move |b: BodyStream| match wrap {
            Some(w) => w(b),
            None => b,
        };
        let reservation = match self.room(meta.size, adm.hooks.evicted.as_ref()).await? {
            Ok(r) => r,
            Err(room) => {
                tracing::info!(key = %adm.key, size = ?meta.size, ?room, "does not fit the cache");
                return Ok(Admitted::Passthrough {
                    meta,
                    body: wrap(body),
                    room,
                    written: 0,
                });
            }
        };
        // A dead writer's leftover of this very image: its bytes, then the rest from the origin.
        let body = match self.resume_leftover(&adm.key, &adm.href_raw, &meta).await {
            Some((prefix, rest)) => {
                drop(body);
                Box::pin(prefix.chain(wrap(rest)))
            }
            None => wrap(body),
        };
        // An unannounced length under the hard limit: once past what the cache can make room
        // for, the origin's body is parked (not read further) and handed back to be streamed
        // uncached, after the bytes already written.
        let reservation = Arc::new(Mutex::new(reservation));
        let overflow = match (self.room_policy(), meta.size) {
            (RoomPolicy::HardLimit(max), None) => Some(Overflow::new(
                max,
                reservation.clone(),
                self.cache().clone(),
                adm.hooks.evicted.clone(),
            )),
            _ => None,
        };
        let body = match &overflow {
            Some(o) => o.tap(body, &origin),
            None => body,
        };
        let expected = adm.checksum.clone().or_else(|| meta.checksum.clone());
        let prepared = pipeline::prepare(
            body,
            meta.size,
            expected.clone(),
            declared,
            self.images(),
            &origin,
        )
        .await?;
        // A zstd body's length and checksum are of the compressed bytes: its stream checks them.
        let (expected, size) = match prepared.compressed {
            Some(_) => (None, None),
            None => (expected, meta.size),
        };
        let mut record_meta = self.record_meta(&adm.href_raw, &meta);
        if prepared.compressed.is_some() {
            // What the origin vouched for is the compressed body, not the image published.
            (record_meta.origin_checksum, record_meta.md5) = (None, None);
        }
        let wopts = WriteOptions {
            expected: expected.clone(),
            expected_size: size,
            replace: true,
            props: record_meta.to_props(),
            ..WriteOptions::default()
        };
        let cache = self.cache().clone();
        let (key, permit) = (adm.key.clone(), adm.permit);
        let writer = off_thread(move || cache.open_for_write_locked(&key, permit, wopts)).await?;
        // Removed when this admission ends, published or not; left behind by a crash.
        let _note = meta
            .resume
            .as_ref()
            .and_then(|r| resume::write_note(self.cache(), &adm.key, &adm.href_raw, r));
        if let Some(streaming) = adm.hooks.streaming.take() {
            let file =
                File::open(writer.path()).map_err(|e| FetchError::io("open", writer.path(), e))?;
            streaming(StreamInfo {
                file,
                size,
                checksum: expected.clone(),
                meta: record_meta.clone(),
            });
        }
        // The bytes written, readable after the writer gives up (an overflow hands them back).
        let partial = match &overflow {
            Some(_) if prepared.compressed.is_none() => File::open(writer.path()).ok(),
            _ => None,
        };
        let evicted = adm.hooks.evicted.clone();
        let written = self.room_watch(
            reservation.clone(),
            overflow.as_ref().map(|o| o.over.clone()),
            size,
            adm.hooks.written.take(),
            evicted,
        );
        let progress: Arc<dyn Progress> = adm
            .hooks
            .progress
            .clone()
            .unwrap_or_else(|| Arc::new(Quiet));
        let writer = match stream_into_reporting(
            writer,
            prepared.body,
            size,
            &origin,
            progress.as_ref(),
            written,
        )
        .await
        {
            Ok(w) => w,
            Err(e) => {
                return match overflow.and_then(|o| o.handed_back(partial, &adm.key, self.cache())) {
                    Some((body, seen)) => {
                        let RoomPolicy::HardLimit(max_size) = self.room_policy() else {
                            unreachable!("overflow is HardLimit's")
                        };
                        tracing::info!(key = %adm.key, written = seen, max_size, "grew past the room the cache can make: streamed on without caching");
                        Ok(Admitted::Passthrough {
                            meta,
                            body,
                            written: seen,
                            room: Room::Full {
                                size: seen,
                                max_size,
                            },
                        })
                    }
                    None => Err(e),
                };
            }
        };
        let source_checksum = prepared.compressed.as_ref().map(|d| d.get().cloned());
        let verified = adm.hooks.verified.take();
        let finish = self.finish_of(
            &origin,
            declared,
            adm.force_raw,
            progress.as_ref(),
            source_checksum,
            verified,
        );
        let reader = pipeline::finish(writer, finish).await?;
        // Published: its bytes count in the cache size now.
        drop(reservation);
        Ok(Admitted::Published(reader))
    }

    /// With the permit held: a dead writer's leftover of the same image (same href, same
    /// strong validator, same length, same boot), as its bytes and the origin's rest after
    /// them (a 206 to `Range` + `If-Range`). `None`: start over.
    async fn resume_leftover(
        &self,
        key: &Key,
        href_raw: &str,
        meta: &OriginMeta,
    ) -> Option<(BodyStream, BodyStream)> {
        let r = meta.resume.clone()?;
        let (cache, k, href) = (self.cache().clone(), key.clone(), href_raw.to_string());
        let r2 = r.clone();
        let (file, len) =
            tokio::task::spawn_blocking(move || resume::leftover(&cache, &k, &href, &r2))
                .await
                .ok()??;
        match r.rest(len).await {
            Ok(Ok(rest)) => {
                tracing::info!(key = %key, offset = len, "resuming the download a dead writer left");
                let path = self.cache().get_image_filepath(key, Status::Incomplete);
                Some((resume::file_prefix(file, &path, len), rest))
            }
            Ok(Err(why)) => {
                tracing::info!(key = %key, offset = len, reason = %why, "cannot resume the leftover download: starting over");
                None
            }
            Err(e) => {
                tracing::info!(key = %key, offset = len, error = %e, "cannot resume the leftover download: starting over");
                None
            }
        }
    }

    /// A `file://` source: hard-linked into the cache when on its filesystem (no bytes
    /// copied; inspected and verified in full before publishing), streamed like a download
    /// otherwise.
    async fn admit_local(
        &self,
        mut adm: Admission,
        meta: OriginMeta,
        path: std::path::PathBuf,
    ) -> Result<Admitted> {
        let origin = adm.href.to_string();
        let declared = pipeline::declared(adm.declared, meta.disk_format.as_deref(), &origin)?;
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| FetchError::io("open", &path, e))?;
        let stat = file
            .metadata()
            .await
            .map_err(|e| FetchError::io("stat", &path, e))?;
        let size = stat.len();
        let meta = OriginMeta {
            size: Some(size),
            ..meta
        };
        let same_fs = std::fs::metadata(self.cache().root()).is_ok_and(|m| {
            std::os::unix::fs::MetadataExt::dev(&m) == std::os::unix::fs::MetadataExt::dev(&stat)
        });
        if !same_fs {
            // Another filesystem: streamed like any download (inspected on the way).
            return self.admit_body(adm, meta, file_stream(file, &path)).await;
        }
        let reservation = match self.room(meta.size, adm.hooks.evicted.as_ref()).await? {
            Ok(r) => r,
            Err(room) => {
                let body = file_stream(file, &path);
                return Ok(Admitted::Passthrough {
                    meta,
                    body,
                    room,
                    written: 0,
                });
            }
        };
        let record_meta = self.record_meta(&adm.href_raw, &meta);
        let wopts = WriteOptions {
            expected: meta.checksum.clone(),
            expected_size: None,
            replace: true,
            props: record_meta.to_props(),
            ..WriteOptions::default()
        };
        let cache = self.cache().clone();
        let (key, src) = (adm.key.clone(), path.clone());
        let permit = adm.permit;
        let writer = off_thread(move || {
            let mut writer = cache.open_for_write_locked(&key, permit, wopts)?;
            if !writer.fill_by_link(&src)? {
                return Err(imgcache_store::StoreError::io(
                    "hard link",
                    &src,
                    std::io::Error::other("crosses filesystems"),
                ));
            }
            Ok(writer)
        })
        .await?;
        if let Some(streaming) = adm.hooks.streaming.take()
            && let Ok(f) = File::open(writer.path())
        {
            streaming(StreamInfo {
                file: f,
                size: Some(size),
                checksum: meta.checksum.clone(),
                meta: record_meta,
            });
        }
        if let Some(written) = &adm.hooks.written {
            written(writer.bytes_written());
        }
        let progress: Arc<dyn Progress> = adm
            .hooks
            .progress
            .clone()
            .unwrap_or_else(|| Arc::new(Quiet));
        let verified = adm.hooks.verified.take();
        let finish = self.finish_of(
            &origin,
            declared,
            adm.force_raw,
            progress.as_ref(),
            None,
            verified,
        );
        let reader = pipeline::finish(writer, finish).await?;
        drop(reservation);
        Ok(Admitted::Published(reader))
    }

    /// What [`pipeline::finish`] needs: the complete file's checks, conversion and commit.
    /// `decompressed`: `Some` when the body was zstd, with the compressed bytes' checksum.
    fn finish_of<'a>(
        &'a self,
        origin: &'a str,
        declared: Option<DiskFormat>,
        force_raw: bool,
        progress: &'a dyn Progress,
        decompressed: Option<Option<Integrity>>,
        on_verified: Option<VerifiedHook>,
    ) -> pipeline::Finish<'a> {
        pipeline::Finish {
            href: origin,
            declared,
            force_raw,
            images: self.images(),
            progress,
            registry: self.registry(),
            decompressed: decompressed.is_some(),
            source_checksum: decompressed.flatten(),
            on_verified,
        }
    }

    /// The record's metadata for a download of `href_raw` that the origin described as `meta`.
    fn record_meta(&self, href_raw: &str, meta: &OriginMeta) -> ImageMeta {
        ImageMeta::from_origin(href_raw, meta)
    }

    /// The written-bytes hook: grows the reservation of an unannounced length (raising `over`
    /// when the cache cannot make more room), then tells the caller's hook.
    fn room_watch(
        &self,
        reservation: Arc<Mutex<Option<Reservation>>>,
        over: Option<Arc<AtomicBool>>,
        size: Option<u64>,
        inner: Option<WrittenHook>,
        evicted: Option<EvictedHook>,
    ) -> Option<WrittenHook> {
        let RoomPolicy::HardLimit(max) = self.room_policy() else {
            return inner;
        };
        let Some(over) = over.filter(|_| size.is_none()) else {
            return inner;
        };
        let cache = self.cache().clone();
        Some(Arc::new(move |n: u64| {
            let mut held = reservation.lock().expect("poisoned");
            if let Some(r) = held.as_mut()
                && n > r.bytes()
            {
                let more = (n - r.bytes()).max(GROW_STEP.min(max.saturating_sub(r.bytes())));
                let before = r.evicted.len();
                if !matches!(r.grow(&cache, more, max), Ok(true)) && n > r.bytes() {
                    over.store(true, Ordering::Release);
                }
                if let Some(hook) = evicted.as_ref().filter(|_| r.evicted.len() > before) {
                    hook(&r.evicted[before..]);
                }
            }
            drop(held);
            if let Some(h) = &inner {
                h(n);
            }
        }))
    }
}

/// An unannounced length under the hard limit: raised by the room watch when the cache can
/// make no more room. Its tap then stops reading the origin's body, parks it, and fails the
/// download with [`FetchError::TooLarge`]; [`Overflow::handed_back`] gives the bytes written
/// and the parked rest, to stream on uncached.
struct Overflow {
    max_size: u64,
    over: Arc<AtomicBool>,
    /// The download's room, grown by the tap before it passes a chunk on, so that no byte
    /// past the room ever reaches the writer (the limit is hard for the bytes in flight too).
    reservation: Arc<Mutex<Option<Reservation>>>,
    cache: imgcache_store::Cache,
    evicted: Option<EvictedHook>,
    /// The origin's body, not read past `seen`.
    parked: Arc<Mutex<Option<BodyStream>>>,
    /// Bytes of the body passed on to the pipeline.
    seen: Arc<AtomicU64>,
}

impl Overflow {
    fn new(
        max_size: u64,
        reservation: Arc<Mutex<Option<Reservation>>>,
        cache: imgcache_store::Cache,
        evicted: Option<EvictedHook>,
    ) -> Overflow {
        Overflow {
            max_size,
            over: Arc::new(AtomicBool::new(false)),
            reservation,
            cache,
            evicted,
            parked: Arc::new(Mutex::new(None)),
            seen: Arc::new(AtomicU64::new(0)),
        }
    }

    fn tap(&self, body: BodyStream, origin: &str) -> BodyStream {
        let (over, parked, seen) = (self.over.clone(), self.parked.clone(), self.seen.clone());
        let (origin, max_size) = (origin.to_string(), self.max_size);
        let (reservation, cache, evicted) = (
            self.reservation.clone(),
            self.cache.clone(),
            self.evicted.clone(),
        );
        Box::pin(futures_util::stream::unfold(Some(body), move |state| {
            let (over, parked, seen, origin) =
                (over.clone(), parked.clone(), seen.clone(), origin.clone());
            let (reservation, cache, evicted) =
                (reservation.clone(), cache.clone(), evicted.clone());
            async move {
                let mut body = state?;
                let too_large = |size| FetchError::TooLarge {
                    href: origin.clone(),
                    size,
                    max_size,
                };
                if over.load(Ordering::Acquire) {
                    let size = seen.load(Ordering::Acquire);
                    *parked.lock().expect("poisoned") = Some(body);
                    return Some((Err(too_large(size)), None));
                }
                let item = body.next().await?;
                if let Ok(c) = &item {
                    let had = seen.load(Ordering::Acquire);
                    let need = had + c.len() as u64;
                    if !room_for(need, max_size, &reservation, &cache, evicted).await {
                        // This chunk goes back in front of the parked rest.
                        over.store(true, Ordering::Release);
                        let chunk = futures_util::stream::once(std::future::ready(item));
                        *parked.lock().expect("poisoned") = Some(Box::pin(chunk.chain(body)));
                        return Some((Err(too_large(had)), None));
                    }
                    seen.fetch_add(c.len() as u64, Ordering::AcqRel);
                }
                Some((item, Some(body)))
            }
        }))
    }

    /// After the download failed: when it failed because it overflowed, and the file
    /// `partial` holds exactly the bytes passed on, those bytes and then the parked rest of
    /// the origin's body (the whole image from byte 0). The partial file is removed from
    /// `invalid/` (it was never going to publish).
    fn handed_back(
        self,
        partial: Option<File>,
        key: &Key,
        cache: &imgcache_store::Cache,
    ) -> Option<(BodyStream, u64)> {
        let rest = self.parked.lock().expect("poisoned").take()?;
        let partial = partial?;
        let seen = self.seen.load(Ordering::Acquire);
        let stat = partial.metadata().ok()?;
        if stat.len() != seen {
            tracing::warn!(%key, written = stat.len(), seen, "an overflowing download lost bytes in flight: cut");
            return None;
        }
        let invalid = cache.get_image_filepath(key, Status::Invalid);
        if std::fs::symlink_metadata(&invalid).is_ok_and(|m| {
            use std::os::unix::fs::MetadataExt;
            m.ino() == stat.ino() && m.dev() == stat.dev()
        }) {
            let _ = std::fs::remove_file(&invalid);
        }
        let prefix = resume::file_prefix(partial, &invalid, seen);
        Some((Box::pin(prefix.chain(rest)), seen))
    }
}

/// Whether `reservation` holds room for `need` bytes, growing it (off the runtime: growing may
/// evict) when it does not. No reservation: no limit to keep.
async fn room_for(
    need: u64,
    max: u64,
    reservation: &Arc<Mutex<Option<Reservation>>>,
    cache: &imgcache_store::Cache,
    evicted: Option<EvictedHook>,
) -> bool {
    let held = |r: &Option<Reservation>| r.as_ref().is_none_or(|r| r.bytes() >= need);
    if held(&reservation.lock().expect("poisoned")) {
        return true;
    }
    let (reservation, cache) = (reservation.clone(), cache.clone());
    off_thread(move || {
        let mut held = reservation.lock().expect("poisoned");
        let Some(r) = held.as_mut() else {
            return Ok::<_, StoreError>(true);
        };
        if r.bytes() >= need {
            return Ok(true);
        }
        let more = (need - r.bytes()).max(GROW_STEP.min(max.saturating_sub(r.bytes())));
        let before = r.evicted.len();
        let grown = matches!(r.grow(&cache, more, max), Ok(true)) && r.bytes() >= need;
        if let Some(hook) = evicted.as_ref().filter(|_| r.evicted.len() > before) {
            hook(&r.evicted[before..]);
        }
        Ok(grown)
    })
    .await
    .unwrap_or(false)
}

/// A local file (or any reader of one, such as its first bytes) as a stream of 1 MiB chunks.
pub fn file_stream<R>(file: R, path: &std::path::Path) -> BodyStream
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
{
    use tokio::io::AsyncReadExt;
    let path = path.to_path_buf();
    Box::pin(futures_util::stream::unfold(Some(file), move |state| {
        let path = path.clone();
        async move {
            let mut file = state?;
            let mut buf = vec![0u8; 1 << 20];
            match file.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok(bytes::Bytes::from(buf)), Some(file)))
                }
                Err(e) => Some((Err(FetchError::io("read", &path, e)), None)),
            }
        }
    }))
}
