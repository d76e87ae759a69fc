//! Ironic's master-image cache: `fetch_image(href, dest, force_raw)` downloads an image once
//! into the cache and hard-links it into each deploy's `dest`.
//!
//! One download per key, however many callers: every caller takes the key's flock before
//! deciding to download, so threads and processes sharing a cache directory queue behind the
//! first, then find the image published and fresh and only link it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use imgcache_store::record::now;
use imgcache_store::{CacheSpec, Integrity, Key, Record, Registry, Status, WriteOptions};
use url::Url;

use crate::checksum::ChecksumSpec;
use crate::download::stream_into;
use crate::error::{FetchError, Result};
use crate::formats::DiskFormat;
use crate::href::{Href, cache_key};
use crate::pipeline::{self, ImageOptions};
use crate::place::{Placement, check_dest, place, same_file};
use crate::progress::{Progress, Quiet};
use crate::source::file::FileSource;
use crate::source::glance::GlanceSource;
use crate::source::http::{HttpOptions, HttpSource};
use crate::source::{
    OriginMeta, PROP_DISK_FORMAT, PROP_HREF, PROP_VALIDATED_AT, Response, Validators,
};
use crate::zstd::InputDigest;

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
}

impl ImageCache {
    pub fn new(spec: CacheSpec, sources: &SourceConfig) -> Result<Self> {
        Ok(ImageCache {
            spec,
            registry: None,
            files: FileSource::new(&sources.allowed_file_dirs),
            sources: sources.clone(),
            http: std::sync::OnceLock::new(),
            revalidate_interval: sources.revalidate_interval,
            images: ImageOptions::default(),
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
        let url = self
            .sources
            .glance_url
            .clone()
            .ok_or_else(|| FetchError::NoGlance { id: id.to_string() })?;
        Ok(GlanceSource::new(
            url,
            token.or_else(|| self.sources.glance_token.clone()),
            self.http()?.clone(),
        ))
    }

    /// The origin's answer for `href`; conditional on `held` validators when given. A Glance
    /// request uses `glance_token` when given, else the configured token.
    async fn request(
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

    /// The cache this image cache writes into.
    pub fn cache(&self) -> &imgcache_store::Cache {
        &self.spec.cache
    }

    /// The shared HTTP client (built on first use).
    pub fn http_source(&self) -> Result<HttpSource> {
        self.http().cloned()
    }

    /// A server miss, step 1: the origin's answer for `href`, unconditionally (the caller holds
    /// the key lock and found nothing published). `glance_token` overrides the configured one.
    pub async fn origin_get(&self, href: &Href, glance_token: Option<String>) -> Result<Response> {
        self.request(href, None, glance_token).await
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

    /// A server miss, step 2: the writer for a download whose origin answered `meta` (its size
    /// and checksum are enforced at commit). The caller holds the key's lock.
    pub fn open_download_writer(
        &self,
        key: &Key,
        lock: imgcache_store::FileLock,
        href_raw: &str,
        meta: &OriginMeta,
    ) -> Result<imgcache_store::CacheWriter> {
        let wopts = WriteOptions {
            expected: meta.checksum.clone(),
            expected_size: meta.size,
            replace: true,
            props: self.props(href_raw, meta),
            ..WriteOptions::default()
        };
        Ok(self.spec.cache.open_for_write_locked(key, lock, wopts)?)
    }

    /// A server miss, step 3: verifies and publishes a finished download. On a checksum
    /// mismatch ([`FetchError::Checksum`]) the file is in `invalid/` and nothing is published.
    pub async fn commit_download(
        &self,
        writer: imgcache_store::CacheWriter,
        href: &Href,
    ) -> Result<Record> {
        self.commit(writer, href, &FetchOptions::default()).await
    }

    /// [`ImageCache::commit_download`], calling `on_verified` as soon as the bytes have passed
    /// every check, before they are fsynced and published (see [`pipeline::VerifiedHook`]).
    pub async fn commit_download_notify(
        &self,
        writer: imgcache_store::CacheWriter,
        href: &Href,
        on_verified: pipeline::VerifiedHook,
    ) -> Result<Record> {
        let opts = FetchOptions::default();
        self.commit_with(
            writer,
            href,
            &opts,
            opts.disk_format,
            None,
            Some(on_verified),
        )
        .await
    }

    /// Whether the cached copy `rec` of `href` is due for a check with its origin ([`download`]
    /// does the check: one conditional request, and a new download if the origin changed).
    /// Glance images never change; an http(s) or `file://` copy is due once its last check
    /// (its download, or a revalidation) is older than the revalidation interval.
    ///
    /// [`download`]: ImageCache::download
    pub fn revalidation_due(&self, rec: &Record, href: &Href) -> bool {
        match href {
            Href::Glance(_) => false,
            Href::Http(_) | Href::File(_) => rec
                .props
                .get(PROP_VALIDATED_AT)
                .and_then(|v| v.parse::<f64>().ok())
                .is_none_or(|at| now() - at >= self.revalidate_interval.as_secs_f64()),
        }
    }

    /// How long a checked copy is trusted without asking its origin again.
    pub fn revalidate_interval(&self) -> Duration {
        self.revalidate_interval
    }

    /// Brings `href_raw` into the cache with no destination (prefetching, `file://` hrefs in
    /// the server): one download per key across threads and processes, as in `fetch_image`.
    /// Returns the published record (an already fresh one without asking the origin).
    pub async fn download(&self, href_raw: &str, glance_token: Option<String>) -> Result<Record> {
        let href = Href::parse(href_raw)?;
        let key = cache_key(&href, href_raw, false);
        if let Some(rec) = self.fresh_record(&key, &href).await? {
            return Ok(rec);
        }
        let cache = self.spec.cache.clone();
        let k = key.clone();
        let lock = blocking(move || cache.lock_key(&k)).await?;
        if let Some(rec) = self.fresh_record(&key, &href).await? {
            return Ok(rec);
        }
        let held = self.held_validators(&key).await?;
        let opts = FetchOptions::default();
        match self.request(&href, held.as_ref(), glance_token).await? {
            Response::NotModified => {
                let cache = self.spec.cache.clone();
                let k = key.clone();
                blocking(move || cache.set_prop(&k, PROP_VALIDATED_AT, &now().to_string())).await?;
                drop(lock);
                Ok(self
                    .record(&key)
                    .await?
                    .ok_or_else(|| imgcache_store::StoreError::NotCached(key.to_string()))?)
            }
            Response::LocalFile { meta, path } => {
                self.publish_local(&key, lock, &href, href_raw, &meta, &path, &opts)
                    .await
            }
            Response::Body { meta, body } => {
                self.make_room(meta.size).await?;
                let writer = self.open_download_writer(&key, lock, href_raw, &meta)?;
                let writer =
                    stream_into(writer, body, meta.size, &href.to_string(), &Quiet).await?;
                self.commit(writer, &href, &opts).await
            }
        }
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

    pub fn spec(&self) -> &CacheSpec {
        &self.spec
    }

    /// Ironic's `clean_up(amount)`; returns the bytes of `amount` still unreclaimed.
    pub async fn clean_up(&self, amount: Option<u64>) -> Result<u64> {
        let spec = self.spec.clone();
        let report = blocking(move || spec.clean_up(amount)).await?;
        Ok(report.evicted.still_needed)
    }

    /// Fetches `href` into `dest` (see the module docs). `dest`'s directory must exist.
    pub async fn fetch_image(
        &self,
        href_raw: &str,
        dest: &Path,
        opts: &FetchOptions,
    ) -> Result<FetchReport> {
        let href = Href::parse(href_raw)?;
        let key = cache_key(&href, href_raw, opts.force_raw);
        check_dest(dest)?;
        let progress: Arc<dyn Progress> = opts.progress.clone().unwrap_or_else(|| Arc::new(Quiet));

        // Fast path, no lock: a master that is fresh without asking the origin.
        if let Some(rec) = self.fresh_record(&key, &href).await? {
            return self.link(&key, rec, dest, Outcome::Hit).await;
        }

        // Slow path: under the key lock, revalidate or download. Callers queued here behind a
        // download find it published and fresh once they get the lock.
        let cache = self.spec.cache.clone();
        let k = key.clone();
        let lock = blocking(move || cache.lock_key(&k)).await?;
        if let Some(rec) = self.fresh_record(&key, &href).await? {
            drop(lock);
            return self.link(&key, rec, dest, Outcome::Hit).await;
        }
        // A checksum file is read before the image request: a name it does not list fails
        // without having started a multi-GiB transfer.
        let given = self.given_checksum(&href, opts).await?;
        let held = self.held_validators(&key).await?;
        let response = self.request(&href, held.as_ref(), None).await?;

        let (meta, body) = match response {
            Response::NotModified => {
                let cache = self.spec.cache.clone();
                let k = key.clone();
                blocking(move || cache.set_prop(&k, PROP_VALIDATED_AT, &now().to_string())).await?;
                drop(lock);
                let rec = self
                    .record(&key)
                    .await?
                    .ok_or_else(|| imgcache_store::StoreError::NotCached(key.to_string()))?;
                return self.link(&key, rec, dest, Outcome::Revalidated).await;
            }
            Response::Body { meta, body } => (meta, Some(body)),
            Response::LocalFile { meta, path } => {
                let meta = OriginMeta {
                    checksum: given.or(meta.checksum),
                    ..meta
                };
                let rec = self
                    .publish_local(&key, lock, &href, href_raw, &meta, &path, opts)
                    .await?;
                return self.after_download(&key, rec, dest).await;
            }
        };
        let body = body.expect("body");
        let expected = given.or_else(|| meta.checksum.clone());
        // zstd is decompressed and every chunk inspected on the way in: an unsafe image is
        // refused from its headers, before the rest is downloaded.
        let origin = href.to_string();
        let declared = pipeline::declared(opts.disk_format, meta.disk_format.as_deref(), &origin)?;
        let prepared = pipeline::prepare(
            body,
            meta.size,
            expected.clone(),
            declared,
            &self.images,
            &origin,
        )
        .await?;
        // A zstd body's length and checksum are of the compressed bytes: its stream checks them.
        let (expected, size) = match prepared.compressed {
            Some(_) => (None, None),
            None => (expected, meta.size),
        };
        self.make_room(meta.size).await?;
        let wopts = WriteOptions {
            expected: expected.clone(),
            expected_size: size,
            replace: true,
            props: self.props(href_raw, &meta),
            ..WriteOptions::default()
        };
        let writer = self.spec.cache.open_for_write_locked(&key, lock, wopts)?;
        let writer = stream_into(writer, prepared.body, size, &origin, progress.as_ref()).await?;
        let rec = self
            .commit_with(
                writer,
                &href,
                opts,
                declared,
                prepared.compressed.as_ref(),
                None,
            )
            .await?;
        self.after_download(&key, rec, dest).await
    }

    /// Publishes a `file://` source: a hard link into the cache when it is on the cache's
    /// filesystem (no bytes copied), a streamed copy otherwise; hashed and verified either way.
    #[allow(clippy::too_many_arguments)]
    async fn publish_local(
        &self,
        key: &Key,
        lock: imgcache_store::FileLock,
        href: &Href,
        href_raw: &str,
        meta: &OriginMeta,
        path: &Path,
        opts: &FetchOptions,
    ) -> Result<Record> {
        let wopts = WriteOptions {
            expected: meta.checksum.clone(),
            expected_size: None,
            replace: true,
            props: self.props(href_raw, meta),
            ..WriteOptions::default()
        };
        let mut writer = self.spec.cache.open_for_write_locked(key, lock, wopts)?;
        let src = path.to_path_buf();
        let (writer, linked) = blocking(move || {
            let linked = writer.fill_by_link(&src)?;
            Ok::<_, imgcache_store::StoreError>((writer, linked))
        })
        .await?;
        let writer = if linked {
            writer
        } else {
            self.make_room(meta.size).await?;
            let file = tokio::fs::File::open(path)
                .await
                .map_err(|e| FetchError::io("open", path, e))?;
            let p = path.to_path_buf();
            let body: crate::source::BodyStream = Box::pin(futures_util::StreamExt::map(
                tokio_util_stream(file),
                move |r| r.map_err(|e| FetchError::io("read", &p, e)),
            ));
            let progress: Arc<dyn Progress> =
                opts.progress.clone().unwrap_or_else(|| Arc::new(Quiet));
            stream_into(
                writer,
                body,
                meta.size,
                &href.to_string(),
                progress.as_ref(),
            )
            .await?
        };
        self.commit(writer, href, opts).await
    }

    async fn commit(
        &self,
        writer: imgcache_store::CacheWriter,
        href: &Href,
        opts: &FetchOptions,
    ) -> Result<Record> {
        self.commit_with(writer, href, opts, opts.disk_format, None, None)
            .await
    }

    /// Finishes a complete download ([`pipeline::finish`]): the file is inspected again, the
    /// declared and permitted formats checked, converted to raw when `force_raw` asks (making
    /// room for its virtual size first), then verified and published.
    async fn commit_with(
        &self,
        writer: imgcache_store::CacheWriter,
        href: &Href,
        opts: &FetchOptions,
        declared: Option<DiskFormat>,
        compressed: Option<&InputDigest>,
        on_verified: Option<pipeline::VerifiedHook>,
    ) -> Result<Record> {
        let progress: Arc<dyn Progress> = opts.progress.clone().unwrap_or_else(|| Arc::new(Quiet));
        let href = href.to_string();
        let finish = pipeline::Finish {
            href: &href,
            declared,
            force_raw: opts.force_raw,
            images: &self.images,
            progress: progress.as_ref(),
            registry: self.registry.as_ref(),
            decompressed: compressed.is_some(),
            source_checksum: compressed.and_then(|d| d.get().cloned()),
            on_verified,
        };
        pipeline::finish(writer, finish).await
    }

    async fn after_download(&self, key: &Key, _rec: Record, dest: &Path) -> Result<FetchReport> {
        let rec = self
            .record(key)
            .await?
            .ok_or_else(|| imgcache_store::StoreError::NotCached(key.to_string()))?;
        let report = self.link(key, rec, dest, Outcome::Downloaded).await?;
        // The cache grew: time to clean up (the new master is linked, so it stays).
        if let Err(e) = self.clean_up(None).await {
            tracing::warn!(error = %e, cache = %self.spec.name, "clean-up after download failed");
        }
        Ok(report)
    }

    /// Links the master into `dest`, holding it open (a shared flock) so the evictor cannot
    /// remove it between our check and the link. Counts a hit.
    async fn link(
        &self,
        key: &Key,
        rec: Record,
        dest: &Path,
        outcome: Outcome,
    ) -> Result<FetchReport> {
        let cache = self.spec.cache.clone();
        let k = key.clone();
        let d = dest.to_path_buf();
        let master = cache.get_image_filepath(key, Status::Active);
        let m = master.clone();
        let placement = blocking(move || -> Result<Placement> {
            let reader = cache
                .open_for_read(&k)?
                .ok_or_else(|| imgcache_store::StoreError::NotCached(k.to_string()))?;
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
            key: key.to_string(),
            master,
            dest: dest.to_path_buf(),
            outcome,
            placement,
            size: rec.size,
            checksum: rec.checksum,
        })
    }

    async fn record(&self, key: &Key) -> Result<Option<Record>> {
        let cache = self.spec.cache.clone();
        let k = key.clone();
        blocking(move || cache.get_record(&k)).await
    }

    async fn held_validators(&self, key: &Key) -> Result<Option<Validators>> {
        Ok(self
            .record(key)
            .await?
            .map(|r| Validators::from_props(&r.props))
            .filter(|v| !v.is_empty()))
    }

    /// The master's record when it can be used without asking the origin: Glance images are
    /// immutable per id; a local file is checked by its mtime (a stat is cheap); an http(s)
    /// master within the revalidation interval.
    async fn fresh_record(&self, key: &Key, href: &Href) -> Result<Option<Record>> {
        let Some(rec) = self.record(key).await? else {
            return Ok(None);
        };
        let fresh = match href {
            Href::Glance(_) => true,
            Href::File(path) => {
                let held = Validators::from_props(&rec.props);
                matches!(self.files.get(path, Some(&held))?, Response::NotModified)
            }
            Href::Http(_) => rec
                .props
                .get(PROP_VALIDATED_AT)
                .and_then(|v| v.parse::<f64>().ok())
                .is_some_and(|at| now() - at < self.revalidate_interval.as_secs_f64()),
        };
        Ok(fresh.then_some(rec))
    }

    /// With a registry, frees `size` bytes on the cache's filesystem (cleaning every cache
    /// there, by priority) or fails with InsufficientDiskSpace before the transfer starts.
    async fn make_room(&self, size: Option<u64>) -> Result<()> {
        if let (Some(registry), Some(size)) = (&self.registry, size) {
            let registry = registry.clone();
            let root = self.spec.cache.root().to_path_buf();
            blocking(move || registry.clean_up_caches(&root, size)).await?;
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

    fn props(&self, href_raw: &str, meta: &OriginMeta) -> BTreeMap<String, String> {
        let mut props = BTreeMap::new();
        props.insert(PROP_HREF.into(), href_raw.to_string());
        props.insert(PROP_VALIDATED_AT.into(), now().to_string());
        if let Some(f) = &meta.disk_format {
            props.insert(PROP_DISK_FORMAT.into(), f.clone());
        }
        meta.validators.to_props(&mut props);
        props
    }
}

/// Runs blocking store work off the async runtime.
pub(crate) async fn blocking<T, E>(f: impl FnOnce() -> Result<T, E> + Send + 'static) -> Result<T>
where
    T: Send + 'static,
    E: Into<FetchError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| FetchError::Config(format!("blocking task failed: {e}")))?
        .map_err(Into::into)
}

/// A local file as a stream of 1 MiB chunks.
fn tokio_util_stream(
    file: tokio::fs::File,
) -> impl futures_util::Stream<Item = std::io::Result<bytes::Bytes>> + Send {
    use tokio::io::AsyncReadExt;
    futures_util::stream::unfold(Some(file), |state| async move {
        let mut file = state?;
        let mut buf = vec![0u8; 1 << 20];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(bytes::Bytes::from(buf)), Some(file)))
            }
            Err(e) => Some((Err(e), None)),
        }
    })
}
