//! Checking a cache directory's files against its records, and repairing what disagrees.
//!
//! [`Cache::open`] refuses a directory whose records are gone (the database missing, empty or
//! unreadable while images sit there) or whose driver marker disagrees with where the records
//! are: starting afresh would silently turn every image into a foreign file. [`Cache::open_for_fsck`]
//! opens such a directory anyway, saying what it found, and [`Cache::fsck`] reports (and with
//! `repair` fixes):
//!
//! - records without files (removed);
//! - files without records (adopted with a freshly computed sha256 and their size, or moved
//!   aside into `invalid/` when they cannot be read or the caller's check refuses them);
//! - stale `incomplete/` files (older than the stall time, no live writer) and lock files of
//!   keys with nothing left;
//! - a driver marker that disagrees with what is there (rewritten).
//!
//! The quick form (no hashing, nothing changed) is what `serve` runs at start.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::cache::{Cache, mtime};
use crate::driver::{Driver, DriverKind};
use crate::error::{IoContext, Result, StoreError};
use crate::integrity::{Algorithm, Hasher};
use crate::key::Key;
use crate::layout::{Layout, Status, key_files};
use crate::lock::{self, FileLock, Mode};
use crate::record::{LruEntry, Record, Timestamp, now, to_timestamp};
use crate::sqlite::{SqliteDriver, SqliteOptions};
use crate::xattr::XattrDriver;

/// The name of the driver marker file in a cache directory.
pub const MARKER: &str = ".imgcache-driver";

/// A check an adopted file must pass (the CLI passes the format inspector's safety verdict).
/// `Err(reason)` moves the file aside into `invalid/` on repair.
pub type Validate<'a> = &'a (dyn Fn(&Path) -> std::result::Result<(), String> + Sync);

/// Told how much hashing there is to do and how it goes (a progress bar).
pub trait FsckProgress {
    fn start(&self, _files: usize, _bytes: u64) {}
    fn advance(&self, _bytes: u64) {}
    fn finish(&self) {}
}

#[derive(Clone, Copy, Default)]
pub struct FsckOptions<'a> {
    /// Fix what is found; without it nothing is changed.
    pub repair: bool,
    /// The quick, read-only pass (`serve` at start): no reading of image files, no probing of
    /// lock files. Ignored with `repair`.
    pub quick: bool,
    /// Age after which a file in `incomplete/` whose writer is gone is stale.
    pub stall_time: Duration,
    pub validate: Option<Validate<'a>>,
    pub progress: Option<&'a dyn FsckProgress>,
}

/// What [`Cache::fsck`] found and, with `repair`, did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FsckReport {
    pub repaired: bool,
    pub driver: &'static str,
    /// Published images with a record (the healthy ones), before any repair.
    pub images: usize,
    /// The database, when it was missing, empty or unreadable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database: Option<DatabaseIssue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub driver_marker: Option<MarkerIssue>,
    /// Records whose file is gone (removed on repair).
    pub records_without_files: Vec<String>,
    pub files_without_records: Vec<Orphan>,
    /// Files in `incomplete/` older than the stall time whose writer is gone (removed on repair).
    pub stale_incomplete: Vec<String>,
    /// Lock files of keys with nothing left (removed on repair).
    pub stale_locks: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct DatabaseIssue {
    pub path: PathBuf,
    /// "missing", "empty (0 bytes)" or "unreadable (<why>)".
    pub state: String,
    /// Where repair moved an unreadable database.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub moved_to: Option<PathBuf>,
}

#[derive(Clone, Debug, Serialize)]
pub struct MarkerIssue {
    /// What `.imgcache-driver` said; `None` when there was none.
    pub found: Option<String>,
    /// The driver whose records are there.
    pub records_in: &'static str,
    /// Rewritten on repair.
    pub fixed: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Orphan {
    pub image_id: String,
    pub size: u64,
    /// `adopt` / `move_aside` (what repair would do, or could not be decided in the quick
    /// pass: `unchecked`), `adopted` / `moved_aside` (what it did).
    pub action: &'static str,
    /// Why it is (to be) moved aside.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The sha256 it was adopted with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
}

impl FsckReport {
    /// How many problems were found (repaired or not).
    pub fn problems(&self) -> usize {
        usize::from(self.database.is_some())
            + usize::from(self.driver_marker.is_some())
            + self.records_without_files.len()
            + self.files_without_records.len()
            + self.stale_incomplete.len()
            + self.stale_locks.len()
    }
}

/// How the database file looks before anything opens it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum DbState {
    Missing,
    Empty,
    Present,
}

impl DbState {
    fn describe(&self) -> &'static str {
        match self {
            DbState::Missing => "missing",
            DbState::Empty => "empty (0 bytes)",
            DbState::Present => "present",
        }
    }
}

pub(crate) fn db_state(layout: &Layout) -> Result<DbState> {
    let path = layout.sqlite_path();
    match fs::metadata(&path) {
        Ok(m) if m.len() > 0 => Ok(DbState::Present),
        Ok(_) => {
            // A main file with no pages yet but a write-ahead log holding them is a database.
            let wal = wal_path(&path, "-wal");
            match fs::metadata(&wal) {
                Ok(w) if w.len() > 0 => Ok(DbState::Present),
                _ => Ok(DbState::Empty),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(DbState::Missing),
        Err(e) => Err(StoreError::io("stat", &path, e)),
    }
}

fn wal_path(db: &Path, suffix: &str) -> PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Why an existing database cannot be read as one, `None` when it can (a lock held by another
/// process is not unreadable).
pub(crate) fn sqlite_unreadable(path: &Path) -> Option<String> {
    use rusqlite::{Connection, ErrorCode, OpenFlags};
    let conn = match Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY) {
        Ok(c) => c,
        Err(e) => return Some(e.to_string()),
    };
    let _ = conn.busy_timeout(Duration::from_secs(2));
    match conn.query_row("PRAGMA quick_check(1)", [], |r| r.get::<_, String>(0)) {
        Ok(s) if s == "ok" => None,
        Ok(s) => Some(format!("integrity check failed: {s}")),
        Err(e) => match e.sqlite_error_code() {
            Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => Some(e.to_string()),
            _ => None,
        },
    }
}

/// Records in the SQLite database, read-only; `None` when there is none or it cannot be read.
fn sqlite_record_count(layout: &Layout) -> Option<u64> {
    use rusqlite::{Connection, OpenFlags};
    if db_state(layout).ok()? != DbState::Present {
        return None;
    }
    let conn =
        Connection::open_with_flags(layout.sqlite_path(), OpenFlags::SQLITE_OPEN_READ_ONLY).ok()?;
    let _ = conn.busy_timeout(Duration::from_secs(2));
    conn.query_row("SELECT count(*) FROM images", [], |r| r.get::<_, i64>(0))
        .ok()
        .map(|n| n.max(0) as u64)
}

/// Published files that carry an xattr record.
fn xattr_record_count(layout: &Layout, files: &[(Key, fs::Metadata)]) -> usize {
    files
        .iter()
        .filter(|(k, _)| {
            File::open(layout.path(k, Status::Active))
                .ok()
                .is_some_and(|f| crate::xattr::has_record(&f))
        })
        .count()
}

pub(crate) fn read_marker(layout: &Layout) -> Result<Option<String>> {
    let path = layout.root().join(MARKER);
    match fs::read_to_string(&path) {
        Ok(s) => Ok(Some(s.trim().to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::io("read", &path, e)),
    }
}

fn write_marker(layout: &Layout, kind: DriverKind) -> Result<()> {
    let path = layout.root().join(MARKER);
    let tmp = layout
        .incomplete_dir()
        .join(format!(".driver-fsck-{}", std::process::id()));
    fs::write(&tmp, format!("{}\n", kind.name())).ctx("write", &tmp)?;
    fs::rename(&tmp, &path).ctx("rename", &path)
}

fn marker_words(m: &Option<String>) -> String {
    match m {
        Some(m) => m.clone(),
        None => "nothing (there is no marker)".into(),
    }
}

/// The checks [`Cache::open`] makes before opening the driver, with the marker already
/// known to match `kind` (or be absent). Fails when opening would forget images.
pub(crate) fn check_before_open(layout: &Layout, kind: DriverKind) -> Result<()> {
    let files = key_files(layout.root())?;
    if files.is_empty() {
        return Ok(()); // a new or empty directory initialises as it always has
    }
    let marker = read_marker(layout)?;
    match kind {
        DriverKind::Sqlite => {
            let state = db_state(layout)?;
            if state == DbState::Present {
                return Ok(()); // unreadable is told apart when the driver fails to open it
            }
            let x = xattr_record_count(layout, &files);
            if x > 0 {
                return Err(StoreError::DriverMismatch {
                    root: layout.root().to_path_buf(),
                    marker: marker_words(&marker),
                    evidence: format!(
                        "there is no SQLite database and {x} of the {} image files carry xattr records",
                        files.len()
                    ),
                    actual: "xattr",
                });
            }
            Err(StoreError::MetadataLost {
                path: layout.sqlite_path(),
                state: state.describe().into(),
                images: files.len(),
            })
        }
        DriverKind::Xattr => {
            // Cheap first: only a directory with a database can be a SQLite cache.
            let Some(n) = sqlite_record_count(layout).filter(|n| *n > 0) else {
                return Ok(());
            };
            if xattr_record_count(layout, &files) > 0 {
                return Ok(());
            }
            Err(StoreError::DriverMismatch {
                root: layout.root().to_path_buf(),
                marker: marker_words(&marker),
                evidence: format!(
                    "{} holds {n} records and none of the {} image files carries an xattr record",
                    layout.sqlite_path().display(),
                    files.len()
                ),
                actual: "sqlite",
            })
        }
    }
}

/// The driver [`Cache::open_for_fsck`] uses, without repair, when the database is missing,
/// empty or unreadable: it knows nothing, so every file shows as a file without a record.
struct NoRecords;

impl Driver for NoRecords {
    fn name(&self) -> &'static str {
        "sqlite"
    }
    fn insert(&self, _: &Record, _: &File) -> Result<()> {
        unreachable!("fsck without repair writes nothing")
    }
    fn get(&self, _: &Key) -> Result<Option<Record>> {
        Ok(None)
    }
    fn list(&self) -> Result<Vec<Record>> {
        Ok(Vec::new())
    }
    fn remove(&self, _: &Key) -> Result<bool> {
        Ok(false)
    }
    fn record_hit(&self, _: &Key, _: &File, _: Timestamp) -> Result<Option<Record>> {
        Ok(None)
    }
    fn lru_page(&self, _: Option<&LruEntry>, _: usize) -> Result<Vec<LruEntry>> {
        Ok(Vec::new())
    }
    fn total_size(&self) -> Result<u64> {
        Ok(0)
    }
    fn set_prop(&self, _: &Key, _: &File, _: &str, _: &str) -> Result<()> {
        Ok(())
    }
}

/// What [`Cache::open_for_fsck`] found before the driver was open.
#[derive(Clone, Debug, Default)]
pub struct Prelude {
    pub database: Option<DatabaseIssue>,
    pub driver_marker: Option<MarkerIssue>,
}

impl Cache {
    /// Opens a cache directory for `fsck`: where [`Cache::open`] refuses (records gone, a
    /// marker that disagrees), this says so in the [`Prelude`] and, with `repair`, fixes the
    /// marker and moves an unreadable database aside into `invalid/` so a fresh one can be
    /// rebuilt from the files. Without `repair` it changes nothing there. Fails only when the
    /// records are in the other driver (run fsck with that one) or the directory is unusable.
    pub fn open_for_fsck(
        root: impl Into<PathBuf>,
        kind: DriverKind,
        repair: bool,
    ) -> Result<(Cache, Prelude)> {
        let layout = Layout::open(root)?;
        let _init = FileLock::acquire(&layout.locks_dir().join(".init.lock"), Mode::Exclusive)?;
        let files = key_files(layout.root())?;
        let marker = read_marker(&layout)?;
        let mut prelude = Prelude::default();

        // Where are the records? Only evidence decides; with none, the marker stands.
        let in_sqlite = sqlite_record_count(&layout).unwrap_or(0);
        let in_xattr = xattr_record_count(&layout, &files);
        let records_in = match (in_sqlite > 0, in_xattr > 0) {
            (true, false) => Some(DriverKind::Sqlite),
            (false, true) => Some(DriverKind::Xattr),
            _ => None,
        };
        let marker_kind = marker.as_deref().and_then(|m| m.parse::<DriverKind>().ok());
        let actual = records_in.or(marker_kind).unwrap_or(kind);
        if actual != kind {
            return Err(StoreError::DriverMismatch {
                root: layout.root().to_path_buf(),
                marker: marker_words(&marker),
                evidence: format!(
                    "the records are in the {} driver, and this fsck was asked to use {}",
                    actual.name(),
                    kind.name()
                ),
                actual: actual.name(),
            });
        }
        let marker_ok = marker_kind == Some(kind) || (marker.is_none() && files.is_empty());
        if !marker_ok {
            if repair {
                write_marker(&layout, kind)?;
            }
            prelude.driver_marker = Some(MarkerIssue {
                found: marker.clone(),
                records_in: kind.name(),
                fixed: repair,
            });
        }

        let driver: Box<dyn Driver> = match kind {
            DriverKind::Xattr => Box::new(XattrDriver::open(layout.clone())?),
            DriverKind::Sqlite => {
                let path = layout.sqlite_path();
                let state = db_state(&layout)?;
                let issue = match &state {
                    DbState::Present => sqlite_unreadable(&path).map(|why| DatabaseIssue {
                        path: path.clone(),
                        state: format!("unreadable ({why})"),
                        moved_to: None,
                    }),
                    // Nothing to lose: a new directory is not a problem.
                    _ if files.is_empty() => None,
                    other => Some(DatabaseIssue {
                        path: path.clone(),
                        state: other.describe().into(),
                        moved_to: None,
                    }),
                };
                match issue {
                    Some(mut issue) => {
                        let unreadable = state == DbState::Present;
                        let driver: Box<dyn Driver> = if !repair {
                            Box::new(NoRecords)
                        } else {
                            if unreadable {
                                issue.moved_to = Some(move_db_aside(&layout)?);
                            }
                            Box::new(SqliteDriver::open(&path, &SqliteOptions::default())?)
                        };
                        prelude.database = Some(issue);
                        driver
                    }
                    None => Box::new(SqliteDriver::open(&path, &SqliteOptions::default())?),
                }
            }
        };
        if repair && marker.is_none() && prelude.driver_marker.is_none() {
            write_marker(&layout, kind)?; // a new directory, as `open` would
        }
        Ok((Cache::with_driver(layout, driver, kind), prelude))
    }

    /// Checks the directory against the records; see the module docs. Runs the record and
    /// clean-up parts under the global lock, and hashes files without records outside it (a
    /// publish is never held up by a long hash), re-checking each one before adopting it.
    pub fn fsck(&self, opts: &FsckOptions<'_>) -> Result<FsckReport> {
        let quick = opts.quick && !opts.repair;
        let mut report = FsckReport {
            repaired: opts.repair,
            driver: self.driver_kind().name(),
            ..FsckReport::default()
        };
        let mut orphans: Vec<(Key, fs::Metadata)> = Vec::new();
        {
            let _g = self.global_lock(Mode::Exclusive)?;
            let records = self.driver().list()?;
            let mut known = BTreeSet::new();
            let mut gone = Vec::new();
            for rec in records {
                let key = Key::new(&rec.image_id)?;
                if self.get_image_filepath(&key, Status::Active).exists() {
                    known.insert(rec.image_id);
                } else {
                    report.records_without_files.push(rec.image_id);
                    gone.push(key);
                }
            }
            report.images = known.len();
            if opts.repair {
                self.driver().remove_many(&gone)?;
            }
            for (key, meta) in key_files(self.root())? {
                if !known.contains(key.as_str()) {
                    orphans.push((key, meta));
                }
            }

            // Stale writes: old, and no live writer holds the key's lock.
            let cutoff = SystemTime::now()
                .checked_sub(opts.stall_time)
                .unwrap_or(SystemTime::UNIX_EPOCH);
            let incomplete = self.layout().incomplete_dir();
            for (key, meta) in key_files(&incomplete)? {
                if mtime(&meta) > cutoff {
                    continue;
                }
                let Some(_lock) = self.try_lock_key(&key)? else {
                    continue;
                };
                let path = incomplete.join(key.as_str());
                if opts.repair {
                    match fs::remove_file(&path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(StoreError::io("remove", &path, e)),
                    }
                }
                report.stale_incomplete.push(key.to_string());
            }

            // Lock files of keys with nothing left. The quick pass does not probe them (a
            // probe could make a writer's non-blocking attempt fail for an instant).
            for (key, path) in self.idle_lock_files()? {
                let stale = if opts.repair {
                    lock::remove_if_unused(&path)?
                } else if quick {
                    true
                } else {
                    lock_unused(&path)?
                };
                if stale {
                    report.stale_locks.push(key.to_string());
                }
            }
        }
        report.stale_locks.sort();

        // Files without records: checked (and on repair hashed) outside the global lock.
        let total: u64 = orphans.iter().map(|(_, m)| m.len()).sum();
        let progress = opts.progress.filter(|_| opts.repair);
        if let Some(p) = progress {
            p.start(orphans.len(), total);
        }
        for (key, meta) in orphans {
            let orphan = if quick {
                Orphan {
                    image_id: key.to_string(),
                    size: meta.len(),
                    action: "unchecked",
                    reason: None,
                    checksum: None,
                }
            } else {
                self.check_orphan(&key, &meta, opts, progress)?
            };
            report.files_without_records.push(orphan);
        }
        if let Some(p) = progress {
            p.finish();
        }
        Ok(report)
    }

    /// One file without a record: readable and accepted by the check, it is adopted (on
    /// repair, with its sha256 and size); otherwise moved aside into `invalid/`.
    fn check_orphan(
        &self,
        key: &Key,
        meta: &fs::Metadata,
        opts: &FsckOptions<'_>,
        progress: Option<&dyn FsckProgress>,
    ) -> Result<Orphan> {
        let path = self.get_image_filepath(key, Status::Active);
        let mut orphan = Orphan {
            image_id: key.to_string(),
            size: meta.len(),
            action: "adopt",
            reason: None,
            checksum: None,
        };
        let opened = File::open(&path).map_err(|e| format!("cannot open it: {e}"));
        let verdict = opened.and_then(|mut f| {
            if let Some(validate) = opts.validate {
                validate(&path)?;
            }
            if !opts.repair {
                // Readable at all? The first block says, without hashing the whole file.
                let mut buf = [0u8; 4096];
                f.read(&mut buf)
                    .map_err(|e| format!("cannot read it: {e}"))?;
                return Ok((f, None));
            }
            let mut h = Hasher::new(Algorithm::Sha256);
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = match f.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(format!("cannot read it: {e}")),
                };
                h.update(&buf[..n]);
                if let Some(p) = progress {
                    p.advance(n as u64);
                }
            }
            Ok((f, Some(h.finish())))
        });
        match verdict {
            Err(reason) => {
                orphan.action = "move_aside";
                orphan.reason = Some(reason);
                if opts.repair && self.move_aside(key, meta)? {
                    orphan.action = "moved_aside";
                }
            }
            Ok((file, Some(sum))) => {
                orphan.checksum = Some(sum.to_string());
                let at = to_timestamp(mtime(meta));
                let mut props = BTreeMap::new();
                props.insert("adopted".to_string(), format!("fsck {:.0}", now()));
                let rec = Record {
                    image_id: key.to_string(),
                    size: meta.len(),
                    checksum: Some(sum),
                    hits: 0,
                    last_modified: at,
                    last_accessed: at,
                    props,
                };
                let _g = self.global_lock(Mode::Exclusive)?;
                // Still the file we hashed, unchanged, and still without a record?
                let now_meta = file.metadata().ctx("stat", &path)?;
                if !same_file(&path, &now_meta)?
                    || now_meta.len() != meta.len()
                    || now_meta.mtime() != meta.mtime()
                    || now_meta.mtime_nsec() != meta.mtime_nsec()
                    || self.driver().get(key)?.is_some()
                {
                    orphan.action = "adopt";
                    orphan.reason = Some("it changed while it was hashed; run fsck again".into());
                    return Ok(orphan);
                }
                self.driver().stage(&rec, &file)?;
                self.driver().insert(&rec, &file)?;
                file.sync_all().ctx("fsync", &path)?;
                orphan.action = "adopted";
            }
            Ok((_, None)) => {}
        }
        Ok(orphan)
    }

    /// Renames a file without a record into `invalid/`, if it is still there and unrecorded.
    fn move_aside(&self, key: &Key, meta: &fs::Metadata) -> Result<bool> {
        let _g = self.global_lock(Mode::Exclusive)?;
        let from = self.get_image_filepath(key, Status::Active);
        if !same_file(&from, meta)? || self.driver().get(key)?.is_some() {
            return Ok(false);
        }
        let to = self.get_image_filepath(key, Status::Invalid);
        fs::rename(&from, &to).ctx("rename", &from)?;
        Ok(true)
    }
}

/// `path` still names the inode `meta` describes.
fn same_file(path: &Path, meta: &fs::Metadata) -> Result<bool> {
    match fs::symlink_metadata(path) {
        Ok(m) => Ok(m.dev() == meta.dev() && m.ino() == meta.ino()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(StoreError::io("stat", path, e)),
    }
}

/// Whether nobody holds a lock file (probed, not removed).
fn lock_unused(path: &Path) -> Result<bool> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(StoreError::io("open lock file", path, e)),
    };
    lock::lock_file(&file, Mode::Exclusive, false).ctx("lock", path)
}

/// Moves `.imgcache.sqlite` and its `-wal`/`-shm` into `invalid/`, dot-named (so `clean`,
/// which empties `invalid/` of key-named files, keeps them). Returns the new database path.
fn move_db_aside(layout: &Layout) -> Result<PathBuf> {
    let db = layout.sqlite_path();
    let stamp = now() as u64;
    let to = layout
        .invalid_dir()
        .join(format!(".imgcache.sqlite.unreadable-{stamp}"));
    for suffix in ["-wal", "-shm", ""] {
        let from = wal_path(&db, suffix);
        let dest = wal_path(&to, suffix);
        match fs::rename(&from, &dest) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::io("rename", &from, e)),
        }
    }
    Ok(to)
}
