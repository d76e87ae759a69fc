//! Helpers shared by the store's integration tests.
#![allow(dead_code)] // each test binary uses its own subset

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use imgcache_store::{Algorithm, Cache, CacheReader, Integrity, Key, Record};
use tempfile::TempDir;

/// A temp dir under the target dir: on this machine's ext4, which takes user xattrs (the system
/// temp dir may be a tmpfs or overlay that does not), so the xattr driver is never skipped.
pub fn tempdir() -> TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir under CARGO_TARGET_TMPDIR")
}

pub fn key(s: &str) -> Key {
    Key::new(s).unwrap_or_else(|e| panic!("test key {s:?}: {e}"))
}

pub fn sha256(data: &[u8]) -> Integrity {
    Integrity::of(Algorithm::Sha256, data)
}

/// Deterministic, incompressible-looking bytes (the test kit's), distinct per seed.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    imgcache_testkit::image_bytes(len, seed).to_vec()
}

/// Writes and commits an image; panics if it was already cached or the commit fails.
pub fn publish(cache: &Cache, k: &str, data: &[u8]) -> Record {
    let mut w = cache
        .open_for_write(&key(k))
        .expect("open_for_write")
        .unwrap_or_else(|| panic!("{k} unexpectedly already cached"));
    w.write_all(data).expect("write");
    w.commit().expect("commit")
}

/// Reads a whole image through `open_for_read` (counts a hit).
pub fn read_image(cache: &Cache, k: &str) -> Option<(Record, Vec<u8>)> {
    let mut r: CacheReader = cache.open_for_read(&key(k)).expect("open_for_read")?;
    let mut buf = Vec::new();
    r.read_to_end(&mut buf).expect("read");
    Some((r.record().clone(), buf))
}

/// Asserts that a published image is present, complete and matches `data`.
pub fn assert_intact(cache: &Cache, k: &str, data: &[u8]) {
    assert!(
        cache.is_cached(&key(k)).unwrap(),
        "{k} should still be cached"
    );
    let (rec, got) = read_image(cache, k).unwrap_or_else(|| panic!("{k} should be readable"));
    assert_eq!(got.len(), data.len(), "{k}: length");
    assert!(got == data, "{k}: bytes differ from what was published");
    assert_eq!(rec.size, data.len() as u64, "{k}: recorded size");
    assert_eq!(rec.checksum, Some(sha256(data)), "{k}: recorded checksum");
}

/// Names of the regular files directly in `dir`, sorted.
pub fn file_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// A filesystem mounted on a fresh directory for one test, unmounted when dropped.
/// Declare it before anything that keeps files open on it, so it is dropped last.
pub struct Mount {
    dir: PathBuf,
    // Removed after the unmount in `drop` (fields drop after the body).
    _parent: TempDir,
}

impl Mount {
    /// Mounts `fstype` with `opts`; `None` (with a skip message) when not root.
    pub fn new(test: &str, fstype: &str, opts: &str) -> Option<Mount> {
        if !is_root() {
            eprintln!(
                "SKIPPED {test}: needs root to mount a {fstype} ({opts}); run the tests as root to cover it"
            );
            return None;
        }
        let parent = tempdir();
        let dir = parent.path().join("mnt");
        std::fs::create_dir(&dir).unwrap();
        let mut cmd = Command::new("mount");
        cmd.args(["-t", fstype]);
        if !opts.is_empty() {
            cmd.args(["-o", opts]);
        }
        let out = cmd.arg(fstype).arg(&dir).output().expect("run mount");
        assert!(
            out.status.success(),
            "mount -t {fstype} -o {opts} {} failed: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Some(Mount {
            dir,
            _parent: parent,
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn remount(&self, opts: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,{opts}")])
            .arg(&self.dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "remount {opts} {} failed: {}",
            self.dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Something still has a file open on it: detach it rather than leak the mount.
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}
