//! Putting a master image at a deploy's destination path: a hard link when both are on one
//! filesystem (about 10 µs, and the link count then protects the master from eviction),
//! otherwise a copy — a reflink where the filesystem can, else `copy_file_range`.
//! Either way the destination appears atomically (temp name + rename), never half-written.

use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{FetchError, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// `dest` already was the master (same inode): nothing done.
    AlreadyInPlace,
    HardLinked,
    Copied,
}

/// True when `a` and `b` name the same inode.
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

fn dest_err(dest: &Path, reason: impl Into<String>) -> FetchError {
    FetchError::Dest {
        path: dest.to_path_buf(),
        reason: reason.into(),
    }
}

/// Checks `dest` can be written before anything is downloaded for it.
pub fn check_dest(dest: &Path) -> Result<()> {
    let parent = parent_of(dest)?;
    match fs::metadata(&parent) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(dest_err(
                dest,
                format!("{} is not a directory", parent.display()),
            ));
        }
        Err(e) => {
            return Err(dest_err(
                dest,
                format!("directory {}: {e}", parent.display()),
            ));
        }
    }
    if fs::symlink_metadata(dest).is_ok_and(|m| m.is_dir()) {
        return Err(dest_err(dest, "is a directory"));
    }
    Ok(())
}

fn parent_of(dest: &Path) -> Result<PathBuf> {
    if dest.file_name().is_none() {
        return Err(dest_err(dest, "has no file name"));
    }
    Ok(match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    })
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Places `master` at `dest`, replacing whatever `dest` was.
pub fn place(master: &Path, dest: &Path) -> Result<Placement> {
    if same_file(master, dest) {
        return Ok(Placement::AlreadyInPlace);
    }
    check_dest(dest)?;
    let parent = parent_of(dest)?;
    let name = dest.file_name().expect("checked").to_string_lossy();
    let tmp = parent.join(format!(
        ".{name}.imgcache-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let how = match fs::hard_link(master, &tmp) {
        Ok(()) => Placement::HardLinked,
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::XDEV.raw_os_error()) => {
            if let Err(e) = copy(master, &tmp) {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
            Placement::Copied
        }
        Err(e) => {
            return Err(dest_err(
                dest,
                format!("cannot link {}: {e}", master.display()),
            ));
        }
    };
    if let Err(e) = fs::rename(&tmp, dest) {
        let _ = fs::remove_file(&tmp);
        return Err(dest_err(dest, format!("cannot rename into place: {e}")));
    }
    Ok(how)
}

/// Copies across filesystems: reflink (FICLONE) first, then `std::io::copy`, which uses
/// `copy_file_range` (no bytes through user space) where the kernel allows it and falls back
/// to `sendfile`/read-write where it does not: since Linux 5.19 `copy_file_range` between two
/// different filesystem types fails with EXDEV, the very case this copy exists for.
fn copy(src: &Path, to: &Path) -> Result<()> {
    let mut from = File::open(src).map_err(|e| FetchError::io("open", src, e))?;
    let mut out = File::create(to).map_err(|e| FetchError::io("create", to, e))?;
    if rustix::fs::ioctl_ficlone(&out, &from).is_err() {
        let len = from
            .metadata()
            .map_err(|e| FetchError::io("stat", src, e))?
            .len();
        let copied =
            std::io::copy(&mut from, &mut out).map_err(|e| FetchError::io("copy", to, e))?;
        if copied != len {
            return Err(FetchError::io(
                "copy",
                to,
                std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("copied {copied} of {len} bytes: the source changed while copying"),
                ),
            ));
        }
    }
    out.sync_all().map_err(|e| FetchError::io("fsync", to, e))
}
