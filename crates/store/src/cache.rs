//! `Cache`: a cache directory plus its metadata driver, with the seed's driver interface.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use crate::driver::{Driver, DriverKind};
use crate::error::{IoContext, Result, StoreError};
use crate::key::Key;
use crate::layout::{Layout, Status, key_files};
use crate::lock::{FileLock, Mode};
use crate::reader::CacheReader;
use crate::record::{LruEntry, Record, now};
use crate::sqlite::{SqliteDriver, SqliteOptions};
use crate::writer::{CacheWriter, WriteOptions};
use crate::xattr::XattrDriver;

/// A cache directory. Cheap to clone; clones share the driver. Safe to use from many threads,
/// and from many processes at once on the same directory (they coordinate through `locks/`).
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

struct Inner {
    layout: Layout,
    driver: Box<dyn Driver>,
    kind: DriverKind,
    /// Room held by this process's writers ([`crate::room`]).
    reserved: Arc<crate::room::Reserved>,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("root", &self.inner.layout.root())
            .field("driver", &self.inner.kind)
            .finish()
    }
}

impl Cache {
    /// Opens a cache directory with the given driver, creating what is missing. This is the
    /// seed's `configure`: it fails with [`StoreError::BadDriverConfiguration`] or
    /// [`StoreError::CacheDir`] when the store cannot work, not later on first use.
    pub fn open(root: impl Into<PathBuf>, kind: DriverKind) -> Result<Cache> {
        let layout = Layout::open(root)?;
        // First opens of a directory race to create the database, switch it to WAL (which
        // SQLite may refuse with "database is locked" at once rather than wait) and write the
        // driver marker: opening is serialised across processes by a lock of its own.
        let _init = FileLock::acquire(&layout.locks_dir().join(".init.lock"), Mode::Exclusive)?;
        driver_marker(&layout, kind, false)?;
        // Records gone while images sit here, or in the other driver: refused, never
        // silently started afresh (`fsck --repair` rebuilds them).
        crate::fsck::check_before_open(&layout, kind)?;
        let driver: Box<dyn Driver> = match kind {
            DriverKind::Sqlite => {
                let path = layout.sqlite_path();
                match SqliteDriver::open(&path, &SqliteOptions::default()) {
                    Ok(d) => Box::new(d),
                    Err(StoreError::BadDriverConfiguration { driver, reason }) => {
                        return Err(unreadable_db(&layout, driver, reason));
                    }
                    Err(e) => return Err(e),
                }
            }
            DriverKind::Xattr => Box::new(XattrDriver::open(layout.clone())?),
        };
        // Recorded only once the driver has shown it works here.
        driver_marker(&layout, kind, true)?;
        Ok(Cache::with_driver(layout, driver, kind))
    }

    pub fn with_driver(layout: Layout, driver: Box<dyn Driver>, kind: DriverKind) -> Cache {
        Cache {
            inner: Arc::new(Inner {
                layout,
                driver,
                kind,
                reserved: Arc::default(),
            }),
        }
    }

    pub fn layout(&self) -> &Layout {
        &self.inner.layout
    }
    pub fn root(&self) -> &Path {
        self.inner.layout.root()
    }
    pub fn driver(&self) -> &dyn Driver {
        self.inner.driver.as_ref()
    }
    pub fn driver_kind(&self) -> DriverKind {
        self.inner.kind
    }
    pub(crate) fn reserved(&self) -> Arc<crate::room::Reserved> {
        self.inner.reserved.clone()
    }

    /// The global lock: shared by publishers for the instant of a publish, exclusive for
    /// clean-up, so a clean-up never sees a record and its file out of step.
    pub(crate) fn global_lock(&self, mode: Mode) -> Result<FileLock> {
        FileLock::acquire(&self.layout().global_lock_path(), mode)
    }

    /// Takes the key's writer lock (blocking) for a caller that must decide, under the lock,
    /// whether to write: check freshness, then [`Cache::open_for_write_locked`].
    pub fn lock_key(&self, key: &Key) -> Result<FileLock> {
        Ok(self.key_lock(key, true)?.expect("blocking lock"))
    }

    /// [`Cache::lock_key`] without waiting: `None` while another writer (in this process or
    /// another) holds it.
    pub fn try_lock_key(&self, key: &Key) -> Result<Option<FileLock>> {
        self.key_lock(key, false)
    }

    /// A writer for a key whose lock the caller already holds (from [`Cache::lock_key`]).
    /// Always writes, replacing any published image on commit.
    pub fn open_for_write_locked(
        &self,
        key: &Key,
        lock: FileLock,
        opts: WriteOptions,
    ) -> Result<CacheWriter> {
        CacheWriter::create(self.clone(), key.clone(), lock, opts)
    }

    pub(crate) fn key_lock(&self, key: &Key, wait: bool) -> Result<Option<FileLock>> {
        let path = self.layout().key_lock_path(key);
        if wait {
            FileLock::acquire(&path, Mode::Exclusive).map(Some)
        } else {
            FileLock::try_acquire(&path, Mode::Exclusive)
        }
    }

    // ---- The seed's driver interface ---------------------------------------------------

    /// Total bytes of published images.
    pub fn get_cache_size(&self) -> Result<u64> {
        self.driver().total_size()
    }

    /// Records of published images, ordered by image id.
    pub fn get_cached_images(&self) -> Result<Vec<Record>> {
        self.driver().list()
    }

    /// The record of one published image, if there is one.
    pub fn get_record(&self, key: &Key) -> Result<Option<Record>> {
        if !self.get_image_filepath(key, Status::Active).exists() {
            return Ok(None);
        }
        self.driver().get(key)
    }

    /// True when the image is published: its file is in place and it has a record.
    pub fn is_cached(&self, key: &Key) -> Result<bool> {
        Ok(self.get_record(key)?.is_some())
    }

    /// True while somebody is writing the image (a thread or process holds its key lock).
    pub fn is_being_cached(&self, key: &Key) -> Result<bool> {
        Ok(self.key_lock(key, false)?.is_none())
    }

    /// True when the image could be cached now: not cached and not being cached.
    pub fn is_cacheable(&self, key: &Key) -> Result<bool> {
        Ok(!self.is_cached(key)? && !self.is_being_cached(key)?)
    }

    pub fn get_hit_count(&self, key: &Key) -> Result<u64> {
        Ok(self.get_record(key)?.map_or(0, |r| r.hits))
    }

    /// Size in bytes of a published image, or `None` when it is not cached.
    pub fn get_image_size(&self, key: &Key) -> Result<Option<u64>> {
        Ok(self.get_record(key)?.map(|r| r.size))
    }

    pub fn get_image_filepath(&self, key: &Key, status: Status) -> PathBuf {
        self.layout().path(key, status)
    }

    /// Key-named regular files in one of the cache's directories (see [`Status`]).
    pub fn get_cache_files(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        Ok(key_files(dir)?
            .into_iter()
            .map(|(k, _)| dir.join(k.as_str()))
            .collect())
    }

    /// The image least recently opened for reading (or published), with its size.
    pub fn get_least_recently_accessed(&self) -> Result<Option<(String, u64)>> {
        Ok(self
            .driver()
            .lru_page(None, 1)?
            .into_iter()
            .next()
            .map(|e| (e.image_id, e.size)))
    }

    /// Removes a published image and its record. Readers that already have it open keep
    /// reading the bytes they opened (the inode lives until they close it). `true` when there
    /// was an image or a record; fails with [`StoreError::NotOwned`], removing nothing, when
    /// the key's path holds a file the store has no record of. See [`Cache::delete_image`].
    pub fn delete_cached_image(&self, key: &Key) -> Result<bool> {
        Ok(self.delete_image(key)? != Deleted::Nothing)
    }

    /// [`Cache::delete_cached_image`], saying what there was: an image (file and record), a
    /// record whose file had gone (the record is removed), or nothing.
    pub fn delete_image(&self, key: &Key) -> Result<Deleted> {
        let _g = self.global_lock(Mode::Exclusive)?;
        self.delete_locked(key)
    }

    /// Only a file whose record exists is removed: clean-up never deletes what it does not own.
    /// Caller holds the global lock exclusively, so no publish is half done.
    pub(crate) fn delete_locked(&self, key: &Key) -> Result<Deleted> {
        let path = self.get_image_filepath(key, Status::Active);
        let meta = match path.symlink_metadata() {
            Ok(m) => Some(m),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(StoreError::io("stat", &path, e)),
        };
        // A symlink or directory at the key's path is never the store's (and the xattr driver
        // would read the record of whatever a symlink points at).
        if meta.as_ref().is_some_and(|m| !m.is_file()) {
            return Err(StoreError::NotOwned { path });
        }
        if self.driver().get(key)?.is_none() {
            return match meta {
                Some(_) => Err(StoreError::NotOwned { path }),
                None => Ok(Deleted::Nothing),
            };
        }
        let had_file = match fs::remove_file(&path) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(StoreError::io("remove", &path, e)),
        };
        self.driver().remove(key)?;
        Ok(if had_file {
            Deleted::Image
        } else {
            Deleted::RecordOnly
        })
    }

    /// Removes every published image the store has a record of; returns how many.
    /// Files in the cache directory without a record are not the store's and are left alone.
    pub fn delete_all_cached_images(&self) -> Result<u64> {
        let _g = self.global_lock(Mode::Exclusive)?;
        let mut n = 0;
        for rec in self.driver().list()? {
            let key = Key::new(&rec.image_id)?;
            if self.delete_locked(&key)? != Deleted::Nothing {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Opens a published image for reading: counts a hit and updates `last_accessed`.
    /// `None` when it is not cached. While the reader is open, prune and clean leave the file be.
    pub fn open_for_read(&self, key: &Key) -> Result<Option<CacheReader>> {
        self.open_for_read_counted(key, true)
    }

    /// [`Cache::open_for_read`] that does not count a hit (nor update the last access): for
    /// serving the image to the client whose miss just brought it into the cache.
    pub fn open_for_read_uncounted(&self, key: &Key) -> Result<Option<CacheReader>> {
        self.open_for_read_counted(key, false)
    }

    fn open_for_read_counted(&self, key: &Key, count: bool) -> Result<Option<CacheReader>> {
        let path = self.get_image_filepath(key, Status::Active);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::io("open", &path, e)),
        };
        // Shared flock on the image itself marks it in use; the evictor only removes a file it
        // can lock exclusively. Then check it was not unlinked between our open and lock.
        crate::lock::lock_file(&file, Mode::Shared, true).ctx("lock", &path)?;
        let meta = file.metadata().ctx("stat", &path)?;
        if std::os::unix::fs::MetadataExt::nlink(&meta) == 0 {
            return Ok(None);
        }
        // Counting the hit is a write; a database held locked by another process for longer
        // than the busy timeout must not turn a cached image into an error, so serve it
        // uncounted (reads still work in WAL mode) and say so in the log.
        if !count {
            return Ok(self
                .driver()
                .get(key)?
                .map(|record| CacheReader::new(file, record, path)));
        }
        let record = match self.driver().record_hit(key, &file, now()) {
            Ok(r) => r,
            Err(e @ StoreError::Database { .. }) => {
                tracing::warn!(%key, error = %e, "hit not counted");
                self.driver().get(key)?
            }
            Err(e) => return Err(e),
        };
        let Some(record) = record else {
            return Ok(None); // a file with no record is not the store's
        };
        Ok(Some(CacheReader::new(file, record, path)))
    }

    /// Opens a writer into `incomplete/`. Waits for any other writer of the same key (in this
    /// or another process) and returns `None` if, by then, the image is cached.
    pub fn open_for_write(&self, key: &Key) -> Result<Option<CacheWriter>> {
        self.open_for_write_with(key, WriteOptions::default())
    }

    pub fn open_for_write_with(
        &self,
        key: &Key,
        opts: WriteOptions,
    ) -> Result<Option<CacheWriter>> {
        let Some(lock) = self.key_lock(key, opts.wait)? else {
            return Err(StoreError::Busy(key.to_string()));
        };
        if !opts.replace && self.is_cached(key)? {
            return Ok(None);
        }
        self.check_not_foreign(key)?;
        CacheWriter::create(self.clone(), key.clone(), lock, opts).map(Some)
    }

    /// Fails when a file the store has no record of sits at the key's published path.
    pub(crate) fn check_not_foreign(&self, key: &Key) -> Result<()> {
        let path = self.get_image_filepath(key, Status::Active);
        if path.symlink_metadata().is_ok() && self.driver().get(key)?.is_none() {
            return Err(StoreError::ForeignFile { path });
        }
        Ok(())
    }

    /// Sets a free-form property on a published image (origin validators and the like).
    pub fn set_prop(&self, key: &Key, name: &str, value: &str) -> Result<()> {
        let path = self.get_image_filepath(key, Status::Active);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::NotCached(key.to_string()));
            }
            Err(e) => return Err(StoreError::io("open", &path, e)),
        };
        self.driver().set_prop(key, &file, name, value)
    }

    /// Walks the whole LRU order, a page at a time.
    pub(crate) fn lru_walk(&self, mut f: impl FnMut(&LruEntry) -> Result<bool>) -> Result<()> {
        let mut after: Option<LruEntry> = None;
        loop {
            let page = self
                .driver()
                .lru_page(after.as_ref(), self.driver().lru_page_size())?;
            let Some(last) = page.last().cloned() else {
                return Ok(());
            };
            for e in &page {
                if !f(e)? {
                    return Ok(());
                }
            }
            after = Some(last);
        }
    }
}

/// What [`Cache::delete_image`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Deleted {
    /// The image file and its record were removed.
    Image,
    /// There was a record but its file had already gone; the record was removed.
    RecordOnly,
    /// Neither file nor record.
    Nothing,
}

/// A directory's records live in one driver; opened with the other it would look empty and
/// every image foreign. The first open writes the driver's name to `.imgcache-driver`; later
/// opens with another driver fail with a bad driver configuration.
fn driver_marker(layout: &Layout, kind: DriverKind, create: bool) -> Result<()> {
    let path = layout.root().join(".imgcache-driver");
    match fs::read_to_string(&path) {
        Ok(found) if found.trim() == kind.name() => Ok(()),
        Ok(found) => Err(StoreError::BadDriverConfiguration {
            driver: kind.name(),
            reason: format!(
                "{} holds a cache made with the {} driver; open it with --driver {}",
                layout.root().display(),
                found.trim(),
                found.trim()
            ),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !create => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Written whole under a temporary name, then hard-linked into place: linking fails
            // if the marker exists, so two first opens cannot both win, and no process ever
            // reads a marker that is created but not yet written.
            static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let tmp = layout
                .incomplete_dir()
                .join(format!(".driver-{}-{n}", std::process::id()));
            fs::write(&tmp, format!("{}\n", kind.name())).ctx("write", &tmp)?;
            let linked = fs::hard_link(&tmp, &path);
            let _ = fs::remove_file(&tmp);
            match linked {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    driver_marker(layout, kind, false)
                }
                Err(e) => Err(StoreError::io("create", &path, e)),
            }
        }
        Err(e) => Err(StoreError::io("read", &path, e)),
    }
}

/// A database SQLite could not open: when it is unreadable (not a database, corrupt) and
/// images sit beside it, their records are lost and `fsck --repair` is the way back; when no
/// image is there, it still names what to do. Anything else (a lock held too long) stays as
/// it was.
fn unreadable_db(layout: &Layout, driver: &'static str, reason: String) -> StoreError {
    let path = layout.sqlite_path();
    let Some(why) = crate::fsck::sqlite_unreadable(&path) else {
        return StoreError::BadDriverConfiguration { driver, reason };
    };
    match key_files(layout.root()).map(|f| f.len()) {
        Ok(images) if images > 0 => StoreError::MetadataLost {
            path,
            state: format!("unreadable ({why})"),
            images,
        },
        _ => StoreError::BadDriverConfiguration {
            driver,
            reason: format!(
                "{reason}; move it away, or run `imgcache fsck --repair`, which moves it aside into invalid/"
            ),
        },
    }
}

/// Modification time of a file as a `SystemTime`, `UNIX_EPOCH` when unknown.
pub(crate) fn mtime(meta: &fs::Metadata) -> SystemTime {
    meta.modified().unwrap_or(SystemTime::UNIX_EPOCH)
}
