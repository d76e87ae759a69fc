//! Ironic's master-image cache: `fetch_image(href, dest, force_raw)` downloads an image once
//! into the cache and hard-links it into each deploy's `dest`.
//!
//! One download per key, however many callers: every caller takes the key's write permit (the
//! store's key lock: one writer per key in the process, the key's flock across processes)
//! before deciding to download, so tasks and processes sharing a cache directory queue behind
//! the first, then find the image published and fresh and only link it.

use imgcache_store::off_thread;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use imgcache_store::{
    Acquired, CacheReader, CacheSpec, Done, FailKind, FileLock, Followed, Integrity, Key, KeyLocks,
    Outcome as Ended, Permit, Record, Registry, Room,
};
use url::Url;

use crate::admit::{Admission, Admitted, Hooks, RoomPolicy};
use crate::checksum::ChecksumSpec;
use crate::error::{FetchError, Result};
use crate::formats::DiskFormat;
use crate::href::{Href, cache_key};
use crate::meta::{Freshness, ImageMeta, freshness};
use crate::miss::{BoxFuture, FillAnnouncement, MissOrigin, MissSource, MissSources};
use crate::pipeline::ImageOptions;
use crate::place::{Placement, check_dest, place, same_file};
use crate::progress::Progress;
use crate::source::file::FileSource;
use crate::source::glance::GlanceSource;
use crate::source::http::{HttpOptions, HttpSource};
use crate::source::{OriginMeta, Response, Validators};

/// How the sources are reached.
#[derive(Clone, Debug)]
pub struct SourceConfig {
    pub http: HttpOptions,
    /// Directories `file://` hrefs may read from; none by default.
    pub allowed_file_dirs: Vec<PathBuf>,
    pub glance_url: Option<Url>,
    pub glance_token: Option<String>,
    /// An http(s) or file master younger than this (since its last validation) is used
    /// without asking the origin; older ones are revalidated with one conditional request.
    pub revalidate_interval: Duration,
    /// When set, `http(s)` hrefs follow only redirects to URLs it permits (the href itself is
    /// the caller's to check). Glance and checksum-file requests are not constrained by it;
    /// every request follows at most 5 redirects, none to a URL with userinfo.
    pub allow: Option<Arc<crate::allow::AllowList>>,
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            http: HttpOptions::default(),
            allowed_file_dirs: Vec::new(),
            glance_url: None,
            glance_token: None,
            revalidate_interval: Duration::from_secs(60),
            allow: None,
        }
    }
}

#[derive(Clone, Default)]
pub struct FetchOptions {
    pub force_raw: bool,
    pub checksum: Option<ChecksumSpec>,
    pub progress: Option<Arc<dyn Progress>>,
    /// The format the caller declares (`--format`); else Glance's `disk_format` is used. The
    /// content must match it.
    pub disk_format: Option<DiskFormat>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The master was fresh without asking the origin (or `dest` already was it).
    Hit,
    /// The origin confirmed the master is current (304 / unchanged mtime).
    Revalidated,
    /// The image was downloaded (first time, or the master was stale).
    Downloaded,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct FetchReport {
    pub key: String,
    pub master: PathBuf,
    pub dest: PathBuf,
    pub outcome: Outcome,
    pub placement: Placement,
    pub size: u64,
    pub checksum: Option<Integrity>,
}

/// A master-image cache with its sources: Ironic's `ImageCache`.
pub struct ImageCache {
    spec: CacheSpec,
    registry: Option<Arc<Registry>>,
    sources: SourceConfig,
    /// Built on first use: loading the system's CA roots costs ~10 ms, which a hit (a stat,
    /// a database read and a link) must not pay.
    http: std::sync::OnceLock<HttpSource>,
    files: FileSource,
    revalidate_interval: Duration,
    /// Permitted formats, zstd, qemu-img (see [`ImageCache::with_images`]).
    images: ImageOptions,
    room: RoomPolicy,
    /// The key lock: one writer per key in this process, the key's flock across processes.
    locks: KeyLocks,
    /// Fleet mode: where a miss may come from besides the origin ([`ImageCache::with_fleet`]).
    fleet: Option<Arc<dyn MissSources>>,
}

impl ImageCache {
    pub fn new(spec: CacheSpec, sources: &SourceConfig) -> Result<Self> {
        Ok(ImageCache {
            registry: None,
            files: FileSource::new(&sources.allowed_file_dirs),
            sources: sources.clone(),
            http: std::sync::OnceLock::new(),
            revalidate_interval: sources.revalidate_interval,
            images: ImageOptions::default(),
            room: RoomPolicy::DiskSpace,
            locks: KeyLocks::new(spec.cache.clone(), sources.http.read_timeout),
            fleet: None,
            spec,
        })
    }

    fn http(&self) -> Result<&HttpSource> {
        if let Some(h) = self.http.get() {
            return Ok(h);
        }
        let built = HttpSource::new(self.sources.http.clone())?;
        Ok(self.http.get_or_init(|| built))
    }

    fn glance(&self, id: &uuid::Uuid, token: Option<String>) -> Result<GlanceSource> {
        self.remote(token)?.glance(id)
    }

    /// The network side of the sources, owned (what outlives a call: a fleet continuation).
    fn remote(&self, glance_token: Option<String>) -> Result<Remote> {
        Ok(Remote {
            http: self.http()?.clone(),
            allow: self.sources.allow.clone(),
            glance_url: self.sources.glance_url.clone(),
            glance_token: glance_token.or_else(|| self.sources.glance_token.clone()),
        })
    }

    /// `href`'s origin as a fleet's source selection asks it ([`MissOrigin`]): what it
    /// vouches for, and its bytes from an offset, through the same checks as
    /// [`ImageCache::origin_head`] and [`ImageCache::request_rest`].
    pub fn miss_origin(
        &self,
        href: &Href,
        glance_token: Option<String>,
    ) -> Result<Arc<dyn MissOrigin>> {
        Ok(Arc::new(OriginOf {
            remote: self.remote(glance_token)?,
            href: href.clone(),
        }))
    }

    /// Fleet mode: a miss asks `sources` first ([`crate::miss`]): a peer's bytes are admitted
    /// like the origin's, verified against the whole image's checksum; else the origin is
    /// asked under whatever the hook keeps (the fleet's origin lease).
    pub fn with_fleet(mut self, sources: Arc<dyn MissSources>) -> Self {
        self.fleet = Some(sources);
        self
    }

    /// The origin's answer for `href`; conditional on `held` validators when given. A Glance
    /// request uses `glance_token` when given, else the configured token.
    pub async fn request(
        &self,
        href: &Href,
        held: Option<&Validators>,
        glance_token: Option<String>,
    ) -> Result<Response> {
        match href {
            Href::Http(url) => {
                let allow = self.sources.allow.as_deref();
                self.http()?
                    .get_allowed(url, held, &Default::default(), allow)
                    .await
            }
            Href::File(path) => self.files.get(path, held),
            Href::Glance(id) => self.glance(id, glance_token)?.get(id).await,
        }
    }

    /// The origin's bytes of `href` from `offset` on (a `Range` request, through the same
    /// redirect and allow-list checks as [`ImageCache::request`]), under `If-Range` when
    /// `if_range` is given: how a fill whose first source is gone (a fleet peer) goes on from
    /// the origin. `Ok(Err(why))` when the origin will not give them, or for a `file://` href
    /// (read from its source, never continued).
    pub async fn request_rest(
        &self,
        href: &Href,
        glance_token: Option<String>,
        offset: u64,
        if_range: Option<&str>,
    ) -> Result<std::result::Result<reqwest::Response, String>> {
        self.remote(glance_token)?
            .rest(href, offset, if_range)
            .await
    }

    /// The cache this image cache writes into.
    pub fn cache(&self) -> &imgcache_store::Cache {
        &self.spec.cache
    }

    /// The shared HTTP client (built on first use).
    pub fn http_source(&self) -> Result<HttpSource> {
        self.http().cloned()
    }

    /// A server `HEAD` on a miss: what the origin would send for `href` (size, checksum,
    /// validators), without any image data: a HEAD for http(s), the image record for Glance, a
    /// stat for `file://`.
    pub async fn origin_head(
        &self,
        href: &Href,
        glance_token: Option<String>,
    ) -> Result<OriginMeta> {
        match href {
            Href::Http(url) => {
                let allow = self.sources.allow.as_deref();
                self.http()?
                    .head_allowed(url, &Default::default(), allow)
                    .await
            }
            Href::File(path) => match self.files.get(path, None)? {
                Response::LocalFile { meta, .. } | Response::Body { meta, .. } => Ok(meta),
                Response::NotModified => Ok(OriginMeta::default()),
            },
            Href::Glance(id) => self.glance(id, glance_token)?.meta(id).await,
        }
    }

    /// Whether the cached copy `rec` of `href` may be used as it is ([`meta::freshness`],
    /// the one rule for every entrance). A `file://` source is stat'ed.
    pub fn freshness(&self, rec: &Record, href: &Href) -> Freshness {
        let source_mtime = match href {
            Href::File(path) => match self.files.get(path, None) {
                Ok(Response::LocalFile { meta, .. }) | Ok(Response::Body { meta, .. }) => {
                    meta.validators.mtime_ns
                }
                _ => None,
            },
            _ => None,
        };
        freshness(
            &ImageMeta::from_props(&rec.props),
            href,
            self.revalidate_interval,
            source_mtime,
        )
    }

    /// How long a checked copy is trusted without asking its origin again.
    pub fn revalidate_interval(&self) -> Duration {
        self.revalidate_interval
    }

    /// With a registry, a download first makes room with `clean_up_caches` across every
    /// cache on the same filesystem, and fails with InsufficientDiskSpace if it cannot.
    pub fn with_registry(mut self, registry: Arc<Registry>) -> Self {
        self.registry = Some(registry);
        self
    }

    /// How images are checked and converted: the permitted formats, zstd decompression, and
    /// the qemu-img used for `force_raw`.
    pub fn with_images(mut self, images: ImageOptions) -> Self {
        self.images = images;
        self
    }

    /// How downloads make room ([`RoomPolicy`]; default: Ironic's free disk space).
    pub fn with_room(mut self, room: RoomPolicy) -> Self {
        self.room = room;
        self
    }

    pub fn spec(&self) -> &CacheSpec {
        &self.spec
    }

    pub(crate) fn images(&self) -> &ImageOptions {
        &self.images
    }

    pub(crate) fn registry(&self) -> Option<&Arc<Registry>> {
        self.registry.as_ref()
    }

    pub(crate) fn room_policy(&self) -> RoomPolicy {
        self.room
    }

    /// Ironic's `clean_up(amount)`; returns the bytes of `amount` still unreclaimed.
    pub async fn clean_up(&self, amount: Option<u64>) -> Result<u64> {
        let spec = self.spec.clone();
        let report = off_thread(move || spec.clean_up(amount)).await?;
        Ok(report.evicted.still_needed)
    }

    /// Fetches `href` into `dest` (see the module docs). `dest`'s directory must exist.
    ///
    /// The master is opened before anything is decided from it (its shared flock keeps
    /// prune and clean-up away) and linked while open, so a fetch racing an eviction either
    /// links a whole master or downloads again; it never fails because of the race.
    pub async fn fetch_image(
        &self,
        href_raw: &str,
        dest: &Path,
        opts: &FetchOptions,
    ) -> Result<FetchReport> {
        let href = Href::parse(href_raw)?;
        let key = cache_key(&href, href_raw, opts.force_raw);
        check_dest(dest)?;

        // Fast path, no lock: a master that is fresh without asking the origin.
        if let Some(reader) = self.open_fresh(&key, &href).await? {
            return self.link(reader, dest, Outcome::Hit).await;
        }
        // A checksum file is read before the image request: a name it does not list fails
        // without having started a multi-GiB transfer.
        let given = self.given_checksum(&href, opts).await?;
        // Slow path: under the key lock, revalidate or download. Callers queued here behind a
        // download find it published and fresh once they get the lock. A master evicted
        // while it was being revalidated is simply downloaded on the next turn.
        let mut restarted = false;
        for _ in 0..3 {
            let mut permit = self.wait_for_permit(&key).await?;
            if let Some(reader) = self.open_fresh(&key, &href).await? {
                end_with(permit, &reader, false);
                return self.link(reader, dest, Outcome::Hit).await;
            }
            let held = self.held_validators(&key).await?;
            // Fleet mode: a miss (not a revalidation) may fill from another node, else it
            // takes the fleet's origin lease, kept until the download ends.
            let source = match (&self.fleet, &held) {
                (Some(fleet), None) => match self.miss_origin(&href, None) {
                    Ok(o) => fleet.source(&key, o).await,
                    Err(e) => return Err(fail(permit, e)),
                },
                _ => MissSource::Origin { keep: None },
            };
            let (response, checksum, peer, keep) = match source {
                MissSource::Peer {
                    response,
                    checksum,
                    node,
                } => {
                    tracing::info!(%key, peer = node, "filling from a fleet peer");
                    // The caller's checksum, when given, is the one the image must match.
                    let checksum = given.clone().or(Some(checksum));
                    (*response, checksum, Some(node), None)
                }
                MissSource::Origin { keep } => {
                    match self.request(&href, held.as_ref(), None).await {
                        Ok(r) => (r, given.clone(), None, keep),
                        Err(e) => return Err(fail(permit, e)),
                    }
                }
            };
            let announcing = FillAnnouncement::default();
            let adm = Admission {
                key: key.clone(),
                href: href.clone(),
                href_raw: href_raw.to_string(),
                permit: flock(&mut permit)?,
                declared: opts.disk_format,
                checksum,
                force_raw: opts.force_raw,
                hooks: Hooks {
                    progress: opts.progress.clone(),
                    streaming: self
                        .fleet
                        .as_ref()
                        .filter(|_| !opts.force_raw)
                        .map(|f| announcing.hook(f.clone(), key.clone())),
                    ..Hooks::default()
                },
            };
            let admitted = match self.admit(adm, response).await {
                Ok(a) => a,
                // The origin changed (or stopped serving ranges) while its body was resumed:
                // nothing was kept of the old bytes; the next turn downloads from byte 0.
                Err(e @ FetchError::Restart { .. }) if !restarted => {
                    tracing::warn!(error = %e, "starting the download over");
                    restarted = true;
                    let _ = fail(permit, e);
                    continue;
                }
                // A peer sent a bad image: it is skipped from now on, and the next turn asks
                // another holder or the origin.
                Err(e) if !restarted && peer.is_some() && e.refusal().is_some() => {
                    let node = peer.as_deref().unwrap_or_default();
                    tracing::warn!(peer = node, error = %e, "the peer's image was refused: asking elsewhere");
                    if let Some(fleet) = &self.fleet {
                        fleet.refused(node);
                    }
                    restarted = true;
                    let _ = fail(permit, e);
                    continue;
                }
                Err(e) => return Err(fail(permit, e)),
            };
            match admitted {
                Admitted::Unchanged(Some(reader)) => {
                    end_with(permit, &reader, false);
                    return self.link(reader, dest, Outcome::Revalidated).await;
                }
                Admitted::Unchanged(None) => continue,
                Admitted::Published(reader) => {
                    announcing.done().await;
                    if let Some(fleet) = &self.fleet {
                        let rec = reader.record();
                        let sum = rec.checksum.as_ref().map(ToString::to_string);
                        fleet.published(&key, rec.size, sum).await;
                    }
                    // The origin lease is given up once the holding is announced.
                    drop(keep);
                    end_with(permit, &reader, true);
                    let report = self.link(reader, dest, Outcome::Downloaded).await?;
                    // The cache grew: time to clean up (the new master is linked, so it stays).
                    if let Err(e) = self.clean_up(None).await {
                        tracing::warn!(error = %e, cache = %self.spec.name, "clean-up after download failed");
                    }
                    return Ok(report);
                }
                Admitted::Passthrough { meta, room, .. } => {
                    permit.finish(Ended::Passthrough);
                    return Err(too_large(&href, meta.size, &room));
                }
            }
        }
        Err(FetchError::Origin {
            url: href.to_string(),
            reason: "the master kept being evicted while it was revalidated".into(),
        })
    }

    /// Links the master held open by `reader` into `dest` (the reader's shared flock keeps the
    /// evictor away until the link exists).
    async fn link(
        &self,
        reader: CacheReader,
        dest: &Path,
        outcome: Outcome,
    ) -> Result<FetchReport> {
        let d = dest.to_path_buf();
        let master = reader.path().to_path_buf();
        let m = master.clone();
        let rec = reader.record().clone();
        let placement = off_thread(move || -> Result<Placement> {
            let placed = if same_file(&m, &d) {
                Placement::AlreadyInPlace
            } else {
                place(&m, &d)?
            };
            drop(reader);
            Ok(placed)
        })
        .await?;
        Ok(FetchReport {
            key: rec.image_id.clone(),
            master,
            dest: dest.to_path_buf(),
            outcome,
            placement,
            size: rec.size,
            checksum: rec.checksum,
        })
    }

    /// `imgcache add KEY FILE`: an operator's local file enters through the same door as any
    /// download (inspected, verified against `checksum`, published), copied rather than
    /// linked (the operator may remove the source). `None` when `key` is already cached.
    pub async fn add_file(
        &self,
        key: &Key,
        path: &Path,
        checksum: Option<Integrity>,
        progress: Option<Arc<dyn Progress>>,
    ) -> Result<Option<Record>> {
        let mut permit = self.wait_for_permit(key).await?;
        if self.record(key).await?.is_some() {
            return Ok(None);
        }
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|e| FetchError::io("open", path, e))?;
        let stat = file
            .metadata()
            .await
            .map_err(|e| FetchError::io("stat", path, e))?;
        let meta = OriginMeta {
            // A regular file's length is known: preallocated, and a file that changes size
            // while it is copied is caught.
            size: stat.is_file().then_some(stat.len()),
            ..OriginMeta::default()
        };
        let response = Response::Body {
            meta,
            body: crate::admit::file_stream(file, path),
        };
        let adm = Admission {
            key: key.clone(),
            href: Href::File(path.to_path_buf()),
            href_raw: path.display().to_string(),
            permit: flock(&mut permit)?,
            declared: None,
            checksum,
            force_raw: false,
            hooks: Hooks {
                progress,
                ..Hooks::default()
            },
        };
        match self.admit(adm, response).await {
            Ok(Admitted::Published(reader)) => {
                end_with(permit, &reader, true);
                Ok(Some(reader.record().clone()))
            }
            Ok(Admitted::Unchanged(_)) => Ok(None),
            Ok(Admitted::Passthrough { meta, room, .. }) => {
                permit.finish(Ended::Passthrough);
                Err(too_large(&Href::File(path.to_path_buf()), meta.size, &room))
            }
            Err(e) => Err(fail(permit, e)),
        }
    }

    /// The key's write permit, from the store's key lock ([`KeyLocks`]): behind a writer in
    /// this process or another, follows it to its end and asks again; a writer in another
    /// process whose file has not grown for the origin read timeout is given up on
    /// ([`Ended::TimedOut`], `StoreError::WriterStalled`): a hung writer never holds a deploy
    /// forever.
    async fn wait_for_permit(&self, key: &Key) -> Result<Permit> {
        let mut said = false;
        loop {
            let outcome = match self.locks.acquire(key)? {
                Acquired::Write(permit) => return Ok(permit),
                // Another task of this process writes it: look again once it is done.
                Acquired::Follow(f) => f.ended().await,
                Acquired::Elsewhere(mut other) => {
                    if !said {
                        tracing::info!(%key, "another process is downloading this image; waiting for it");
                        said = true;
                    }
                    match other.follow().await {
                        Followed::Write(permit) => return Ok(permit),
                        Followed::Ended(o) => o,
                    }
                }
            };
            // A hung writer is given up on; whatever else the writer made of it, the caller
            // decides again under the permit (a published master is then found fresh).
            if let Some(e) = outcome.error() {
                return Err(e.into());
            }
        }
    }

    async fn record(&self, key: &Key) -> Result<Option<Record>> {
        let cache = self.spec.cache.clone();
        let k = key.clone();
        Ok(off_thread(move || cache.get_record(&k)).await?)
    }

    async fn held_validators(&self, key: &Key) -> Result<Option<Validators>> {
        Ok(self
            .record(key)
            .await?
            .map(|r| ImageMeta::from_props(&r.props).validators)
            .filter(|v| !v.is_empty()))
    }

    /// The master, open (a hit counted), when it can be used without asking the origin.
    async fn open_fresh(&self, key: &Key, href: &Href) -> Result<Option<CacheReader>> {
        let cache = self.spec.cache.clone();
        let k = key.clone();
        let Some(reader) = off_thread(move || cache.open_for_read(&k)).await? else {
            return Ok(None);
        };
        Ok(match self.freshness(reader.record(), href) {
            Freshness::Immutable | Freshness::Fresh => Some(reader),
            Freshness::Revalidate => None,
        })
    }

    /// With a registry, frees `size` bytes on the cache's filesystem (cleaning every cache
    /// there, by priority) or fails with InsufficientDiskSpace before the transfer starts.
    pub(crate) async fn make_disk_space(&self, size: u64) -> Result<()> {
        if let Some(registry) = &self.registry {
            let registry = registry.clone();
            let root = self.spec.cache.root().to_path_buf();
            off_thread(move || registry.clean_up_caches(&root, size)).await?;
        }
        Ok(())
    }

    /// The checksum the caller gave (inline, or looked up in a checksum file).
    async fn given_checksum(&self, href: &Href, opts: &FetchOptions) -> Result<Option<Integrity>> {
        if let Some(spec) = &opts.checksum {
            let name = match href {
                Href::Http(u) => u
                    .path_segments()
                    .and_then(|mut s| s.next_back())
                    .unwrap_or("")
                    .to_string(),
                Href::File(p) => p
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                Href::Glance(id) => id.to_string(),
            };
            return spec.resolve(self.http()?, &name).await.map(Some);
        }
        Ok(None)
    }
}

/// The error for an image that cannot fit where the caller cannot stream it uncached.
pub fn too_large(href: &Href, size: Option<u64>, room: &Room) -> FetchError {
    let max_size = match room {
        Room::TooLarge { max_size, .. } | Room::Full { max_size, .. } => *max_size,
        Room::Reserved(_) => 0,
    };
    FetchError::TooLarge {
        href: href.to_string(),
        size: size.unwrap_or(0),
        max_size,
    }
}

/// The permit's flock, for the admission's writer.
fn flock(permit: &mut Permit) -> Result<FileLock> {
    permit.take_lock().ok_or_else(|| FetchError::Origin {
        url: permit.key().to_string(),
        reason: "the key's flock was handed out twice".into(),
    })
}

/// Ends the permit's flight with the master `reader` holds (`written`: this call wrote it).
/// Followers in this process look again, whatever it says.
fn end_with(permit: Permit, reader: &CacheReader, written: bool) {
    let outcome = match reader.file().try_clone() {
        Ok(f) if written => Ended::Done(Done::Written {
            size: reader.record().size,
            file: Arc::new(f),
        }),
        Ok(f) => Ended::Done(Done::Held {
            record: reader.record().clone(),
            file: Arc::new(f),
        }),
        Err(e) => Ended::failed(FailKind::Internal, e.to_string()),
    };
    permit.finish(outcome);
}

/// Ends the permit's flight with `e`, and returns it.
fn fail(permit: Permit, e: FetchError) -> FetchError {
    permit.finish(Ended::failed(FailKind::Origin, e.to_string()));
    e
}

/// The network side of the sources (http(s) and Glance), owned.
#[derive(Clone)]
struct Remote {
    http: HttpSource,
    allow: Option<Arc<crate::allow::AllowList>>,
    glance_url: Option<Url>,
    glance_token: Option<String>,
}

impl Remote {
    fn glance(&self, id: &uuid::Uuid) -> Result<GlanceSource> {
        let url = self
            .glance_url
            .clone()
            .ok_or_else(|| FetchError::NoGlance { id: id.to_string() })?;
        Ok(GlanceSource::new(
            url,
            self.glance_token.clone(),
            self.http.clone(),
        ))
    }

    /// See [`ImageCache::request_rest`].
    async fn rest(
        &self,
        href: &Href,
        offset: u64,
        if_range: Option<&str>,
    ) -> Result<std::result::Result<reqwest::Response, String>> {
        match href {
            Href::Http(url) => {
                self.http
                    .get_rest(
                        url,
                        &Default::default(),
                        self.allow.as_deref(),
                        offset,
                        if_range,
                        None,
                    )
                    .await
            }
            Href::File(_) => Ok(Err("a file:// image is not continued from an offset".into())),
            Href::Glance(id) => self.glance(id)?.rest(id, offset, if_range).await,
        }
    }
}

/// One href's origin, for a fleet's source selection.
struct OriginOf {
    remote: Remote,
    href: Href,
}

impl MissOrigin for OriginOf {
    fn vouched(&self) -> BoxFuture<'_, Option<OriginMeta>> {
        Box::pin(async move {
            match &self.href {
                Href::Glance(id) => self.remote.glance(id).ok()?.meta(id).await.ok(),
                _ => None,
            }
        })
    }

    fn rest(
        &self,
        offset: u64,
        if_range: Option<String>,
    ) -> BoxFuture<'_, Result<std::result::Result<reqwest::Response, String>>> {
        Box::pin(async move {
            self.remote
                .rest(&self.href, offset, if_range.as_deref())
                .await
        })
    }
}
