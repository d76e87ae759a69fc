//! Where things live inside a cache directory.
//!
//! ```text
//! <root>/<key>              published images (visible only after fsync + rename)
//! <root>/incomplete/<key>   writes in progress
//! <root>/invalid/<key>      writes that failed (checksum, truncation), kept for inspection
//! <root>/queue/<key>        images waiting to be prefetched
//! <root>/locks/             flock files: <key>.lock per key, .global.lock for clean-up
//! <root>/.imgcache.sqlite   the SQLite driver's records (dot-named: no key can collide)
//! <root>/.imgcache-fleet-node  fleet mode: the `serve` node answering peers for this directory
//! ```

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{IoContext, Result, StoreError};
use crate::key::Key;

/// The four places an image file can be, as the seed's `get_image_filepath` names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Active,
    Incomplete,
    Invalid,
    Queue,
}

#[derive(Clone, Debug)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    /// Opens (creating if needed) a cache directory and its subdirectories, and checks that it is
    /// writable, so a read-only or missing mount fails here with its path rather than mid-download.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root: PathBuf = root.into();
        if root.as_os_str().is_empty() {
            return Err(StoreError::CacheDir {
                path: root,
                reason: "no cache directory given".into(),
            });
        }
        match fs::metadata(&root) {
            Ok(m) if !m.is_dir() => {
                return Err(StoreError::CacheDir {
                    path: root,
                    reason: "exists and is not a directory".into(),
                });
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                fs::create_dir_all(&root).map_err(|e| StoreError::CacheDir {
                    path: root.clone(),
                    reason: format!("cannot create it: {e}"),
                })?;
            }
            Err(e) => {
                return Err(StoreError::CacheDir {
                    path: root,
                    reason: e.to_string(),
                });
            }
        }
        let layout = Layout { root };
        for dir in [
            layout.incomplete_dir(),
            layout.invalid_dir(),
            layout.queue_dir(),
            layout.locks_dir(),
        ] {
            fs::create_dir_all(&dir).map_err(|e| StoreError::CacheDir {
                path: dir.clone(),
                reason: format!("cannot create it: {e}"),
            })?;
        }
        layout.check_writable()?;
        Ok(layout)
    }

    fn check_writable(&self) -> Result<()> {
        // Unique per call, not just per process: threads opening the same cache at once
        // would otherwise remove each other's probe.
        static PROBES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let probe = self
            .incomplete_dir()
            .join(format!(".probe-{}-{n}", std::process::id()));
        match fs::File::create(&probe) {
            Ok(_) => fs::remove_file(&probe).ctx("remove", &probe),
            Err(e) => Err(StoreError::CacheDir {
                path: self.root.clone(),
                reason: format!("not writable: {e}"),
            }),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn incomplete_dir(&self) -> PathBuf {
        self.root.join("incomplete")
    }
    pub fn invalid_dir(&self) -> PathBuf {
        self.root.join("invalid")
    }
    pub fn queue_dir(&self) -> PathBuf {
        self.root.join("queue")
    }
    pub fn locks_dir(&self) -> PathBuf {
        self.root.join("locks")
    }
    pub fn sqlite_path(&self) -> PathBuf {
        self.root.join(".imgcache.sqlite")
    }

    pub fn path(&self, key: &Key, status: Status) -> PathBuf {
        match status {
            Status::Active => self.root.join(key.as_str()),
            Status::Incomplete => self.incomplete_dir().join(key.as_str()),
            Status::Invalid => self.invalid_dir().join(key.as_str()),
            Status::Queue => self.queue_dir().join(key.as_str()),
        }
    }

    pub fn key_lock_path(&self, key: &Key) -> PathBuf {
        self.locks_dir().join(format!("{key}.lock"))
    }
    pub fn global_lock_path(&self) -> PathBuf {
        self.locks_dir().join(".global.lock")
    }
}

/// Regular files in `dir` whose names are valid keys, sorted by name. Dot-files and anything
/// that is not a valid key are the store's own or foreign, and never listed as cache files.
pub fn key_files(dir: &Path) -> Result<Vec<(Key, fs::Metadata)>> {
    let mut out = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(StoreError::io("read directory", dir, e)),
    };
    for entry in entries {
        let entry = entry.ctx("read directory", dir)?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let Ok(key) = Key::new(&name) else { continue };
        // symlink_metadata: a symlink planted in the cache dir is foreign, never followed.
        let meta = match fs::symlink_metadata(entry.path()) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(StoreError::io("stat", entry.path(), e)),
        };
        if meta.is_file() {
            out.push((key, meta));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}
