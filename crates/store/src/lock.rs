//! Advisory `flock` locks on files under `locks/`, so that threads and separate processes sharing
//! a cache directory serialise the same way.
//!
//! A lock file may be unlinked by the cleaner while someone is about to lock it, so after taking
//! the lock we check that the path still names the inode we locked; if not, we retry on the new
//! file. The cleaner only unlinks a lock file while holding it exclusively, which makes this safe.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::{IoContext, Result, StoreError};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Shared,
    Exclusive,
}

/// A held lock; released when dropped (closing the file releases the flock).
#[derive(Debug)]
pub struct FileLock {
    _file: File,
    path: PathBuf,
}

impl FileLock {
    /// Blocks until the lock is held.
    pub fn acquire(path: &Path, mode: Mode) -> Result<FileLock> {
        Ok(Self::take(path, mode, true)?.expect("blocking lock always returns a lock"))
    }

    /// Returns `None` at once when another holder conflicts.
    pub fn try_acquire(path: &Path, mode: Mode) -> Result<Option<FileLock>> {
        Self::take(path, mode, false)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn take(path: &Path, mode: Mode, wait: bool) -> Result<Option<FileLock>> {
        loop {
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(path)
                .ctx("open lock file", path)?;
            if !lock_file(&file, mode, wait).ctx("lock", path)? {
                return Ok(None);
            }
            if same_inode(&file, path)? {
                return Ok(Some(FileLock {
                    _file: file,
                    path: path.to_path_buf(),
                }));
            }
            // The file was unlinked (and maybe recreated) between open and lock: retry.
        }
    }
}

/// Takes a flock on an already open file; `Ok(false)` when `wait` is off and it is held elsewhere.
pub fn lock_file(file: &File, mode: Mode, wait: bool) -> std::io::Result<bool> {
    let res = match (mode, wait) {
        (Mode::Shared, true) => return file.lock_shared().map(|_| true),
        (Mode::Exclusive, true) => return file.lock().map(|_| true),
        (Mode::Shared, false) => file.try_lock_shared(),
        (Mode::Exclusive, false) => file.try_lock(),
    };
    match res {
        Ok(()) => Ok(true),
        Err(TryLockError::WouldBlock) => Ok(false),
        Err(TryLockError::Error(e)) => Err(e),
    }
}

fn same_inode(file: &File, path: &Path) -> Result<bool> {
    let held = file.metadata().ctx("stat lock file", path)?;
    match fs::metadata(path) {
        Ok(now) => Ok(now.dev() == held.dev() && now.ino() == held.ino()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(StoreError::io("stat lock file", path, e)),
    }
}

/// Unlinks a lock file nobody holds. Returns whether it was removed.
pub fn remove_if_unused(path: &Path) -> Result<bool> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(StoreError::io("open lock file", path, e)),
    };
    if !lock_file(&file, Mode::Exclusive, false).ctx("lock", path)? || !same_inode(&file, path)? {
        return Ok(false);
    }
    fs::remove_file(path).ctx("remove lock file", path)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_excludes_and_shared_shares() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.lock");
        let a = FileLock::acquire(&p, Mode::Exclusive).unwrap();
        assert!(
            FileLock::try_acquire(&p, Mode::Exclusive)
                .unwrap()
                .is_none()
        );
        assert!(FileLock::try_acquire(&p, Mode::Shared).unwrap().is_none());
        assert!(!remove_if_unused(&p).unwrap());
        drop(a);
        let s1 = FileLock::try_acquire(&p, Mode::Shared).unwrap().unwrap();
        let _s2 = FileLock::try_acquire(&p, Mode::Shared).unwrap().unwrap();
        assert!(
            FileLock::try_acquire(&p, Mode::Exclusive)
                .unwrap()
                .is_none()
        );
        drop(s1);
        drop(_s2);
        assert!(remove_if_unused(&p).unwrap());
        assert!(!p.exists());
        // Re-acquiring after removal recreates the file.
        let _again = FileLock::acquire(&p, Mode::Exclusive).unwrap();
        assert!(p.exists());
    }
}
