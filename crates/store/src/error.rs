//! Errors as types an operator can act on: each names the path or key involved and what went wrong.

use std::io;
use std::path::PathBuf;

use thiserror::Error;

use crate::integrity::Integrity;

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("invalid key: it is empty")]
    Empty,
    #[error("invalid key: {0} bytes long, at most 255 allowed")]
    TooLong(usize),
    #[error("invalid key: character {0:?} not allowed (only A-Z a-z 0-9 . _ -)")]
    BadChar(char),
    #[error("invalid key: it must not start with '.'")]
    LeadingDot,
    #[error("invalid key: {0:?} is the name of one of the cache's own directories")]
    Reserved(String),
}

#[derive(Debug, Error)]
pub enum StoreError {
    #[error(transparent)]
    Key(#[from] KeyError),

    #[error("bad driver configuration ({driver}): {reason}")]
    BadDriverConfiguration {
        driver: &'static str,
        reason: String,
    },

    #[error("cache directory {path}: {reason}")]
    CacheDir { path: PathBuf, reason: String },

    #[error("disk full while writing {path}: the partial file was removed, nothing was published")]
    DiskFull { path: PathBuf },

    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(
        "checksum mismatch for {key}: expected {expected}, got {actual}; the file was moved to invalid/"
    )]
    ChecksumMismatch {
        key: String,
        expected: Integrity,
        actual: Integrity,
    },

    #[error(
        "size mismatch for {key}: expected {expected} bytes, got {actual}; the file was moved to invalid/"
    )]
    SizeMismatch {
        key: String,
        expected: u64,
        actual: u64,
    },

    #[error(
        "not enough disk space on {path}: {required} bytes required, {available} available after cleaning every cache on that filesystem"
    )]
    InsufficientDiskSpace {
        path: PathBuf,
        required: u64,
        available: u64,
    },

    #[error(
        "{path} is in the cache directory but the cache has no record of it; it is not the cache's to replace: move it away first"
    )]
    ForeignFile { path: PathBuf },

    /// `delete` of a key whose published path holds a file the store has no record of.
    #[error(
        "{path} is not a cached image (no record): left alone; `imgcache fsck --repair` adopts or moves aside files without records"
    )]
    NotOwned { path: PathBuf },

    /// The records of a directory that holds images are gone (missing, empty or unreadable
    /// database): starting an empty one would silently turn every image into a foreign file.
    #[error(
        "metadata database {path} is {state}, but the cache directory holds {images} image file(s): refusing to start an empty one and forget them; run `imgcache fsck --repair` to rebuild the records from the files"
    )]
    MetadataLost {
        path: PathBuf,
        /// "missing", "empty (0 bytes)" or "unreadable (<why>)".
        state: String,
        images: usize,
    },

    /// The driver marker (`.imgcache-driver`) disagrees with where the records actually are.
    #[error(
        "{root}: the driver marker says {marker} but {evidence}; run `imgcache --driver {actual} fsck --repair` to set the marker from what is there"
    )]
    DriverMismatch {
        root: PathBuf,
        /// What the marker says ("sqlite", "xattr" or "nothing (no marker)").
        marker: String,
        /// What is there instead, in words.
        evidence: String,
        /// The driver whose records are there.
        actual: &'static str,
    },

    #[error("image {0} is not cached")]
    NotCached(String),

    #[error("image {0} is already cached")]
    AlreadyCached(String),

    #[error("image {0} is being written by another writer")]
    Busy(String),

    /// Another process holds the key's lock and its file has not grown for `stalled`.
    #[error(
        "gave up waiting for {key}: the process downloading it made no progress for {}s (waited {}s in all); is it hung?",
        stalled.as_secs(),
        waited.as_secs()
    )]
    WriterStalled {
        key: String,
        stalled: std::time::Duration,
        waited: std::time::Duration,
    },

    #[error("invalid checksum {0:?}: expected ALGO:HEX with ALGO one of md5, sha256, sha512")]
    BadIntegrity(String),

    #[error("metadata database {path}: {source}")]
    Database {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },

    #[error(
        "metadata database {path}: schema version {found} is newer than this imgcache understands ({supported})"
    )]
    SchemaTooNew {
        path: PathBuf,
        found: i64,
        supported: i64,
    },

    /// Store work run off the async runtime panicked or was cancelled (a bug, or shutdown).
    #[error("store task did not finish: {0}")]
    Task(String),
}

impl StoreError {
    /// Wraps an I/O error with the operation and path, turning ENOSPC/EDQUOT into [`StoreError::DiskFull`].
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        let path = path.into();
        match source.raw_os_error() {
            Some(code)
                if code == rustix::io::Errno::NOSPC.raw_os_error()
                    || code == rustix::io::Errno::DQUOT.raw_os_error() =>
            {
                StoreError::DiskFull { path }
            }
            _ => StoreError::Io { op, path, source },
        }
    }

    pub fn is_disk_full(&self) -> bool {
        matches!(self, StoreError::DiskFull { .. })
    }
}

/// Attaches an operation and a path to an `io::Result`.
pub(crate) trait IoContext<T> {
    fn ctx(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|e| StoreError::io(op, path, e))
    }
}
