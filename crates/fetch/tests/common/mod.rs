//! Test fixtures for the fetch integration tests: cache environments, a tmpfs mount guard and
//! the assertions every failure test shares. The origins are the test kit's
//! ([`FaultOrigin`] for http(s), `imgcache_testkit::glance::FakeGlance` for Glance).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use imgcache_fetch::{FetchError, Href, HttpOptions, ImageCache, SourceConfig, cache_key};
use imgcache_store::{Cache, CacheSpec, DriverKind, Key, Status};

pub const MIB: usize = 1 << 20;

pub use imgcache_testkit::image_bytes;

/// Short timeouts and backoffs, so failure tests finish fast.
pub fn http_options() -> HttpOptions {
    HttpOptions {
        connect_timeout: Duration::from_secs(2),
        read_timeout: Duration::from_secs(3),
        retries: 3,
        backoff: Duration::from_millis(20),
        ..HttpOptions::default()
    }
}

pub fn sources() -> SourceConfig {
    SourceConfig {
        http: http_options(),
        revalidate_interval: Duration::from_secs(3600),
        ..SourceConfig::default()
    }
}

/// A cache directory and a destination directory under one temp dir (one filesystem).
pub struct Env {
    pub tmp: tempfile::TempDir,
    pub cache_dir: PathBuf,
    pub dests: PathBuf,
    pub spec: CacheSpec,
    pub ic: ImageCache,
}

pub fn spec_at(dir: &Path, name: &str, priority: u32) -> CacheSpec {
    CacheSpec {
        name: name.to_string(),
        cache: Cache::open(dir, DriverKind::Sqlite).unwrap(),
        max_size: 1 << 40,
        ttl: Duration::from_secs(7 * 24 * 3600),
        priority,
    }
}

impl Env {
    pub fn new() -> Env {
        Env::with(sources())
    }

    pub fn with(src: SourceConfig) -> Env {
        Env::at(None, src)
    }

    /// With the cache in `cache_dir` (e.g. on a tmpfs) instead of beside the dests.
    pub fn at(cache_dir: Option<PathBuf>, src: SourceConfig) -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let cache_dir = cache_dir.unwrap_or_else(|| tmp.path().join("cache"));
        let dests = tmp.path().join("dests");
        std::fs::create_dir_all(&dests).unwrap();
        let spec = spec_at(&cache_dir, "instance", 50);
        let ic = ImageCache::new(spec.clone(), &src).unwrap();
        Env {
            tmp,
            cache_dir,
            dests,
            spec,
            ic,
        }
    }

    pub fn cache(&self) -> &Cache {
        &self.spec.cache
    }

    pub fn dest(&self, name: &str) -> PathBuf {
        self.dests.join(name)
    }

    pub fn master(&self, key: &Key) -> PathBuf {
        self.cache().get_image_filepath(key, Status::Active)
    }
}

pub fn key_of(href: &str, force_raw: bool) -> Key {
    cache_key(&Href::parse(href).unwrap(), href, force_raw)
}

pub fn inode(p: &Path) -> (u64, u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).unwrap();
    (m.dev(), m.ino(), m.nlink())
}

/// `dest` is a hard link of `master` (same inode) holding exactly `bytes`.
pub fn assert_linked(master: &Path, dest: &Path, bytes: &[u8]) {
    let (md, mi, _) = inode(master);
    let (dd, di, dn) = inode(dest);
    assert_eq!(
        (md, mi),
        (dd, di),
        "{} is not a hard link of {}",
        dest.display(),
        master.display()
    );
    assert!(dn >= 2, "nlink {dn}");
    let got = std::fs::read(dest).unwrap();
    assert!(
        got == bytes,
        "dest bytes differ ({} vs {} bytes)",
        got.len(),
        bytes.len()
    );
}

/// The invariants of every failed fetch: nothing published, no `dest` (nor a temp file beside
/// it), nothing left in `incomplete/`, and the key lock free.
pub fn assert_failed_cleanly(env: &Env, key: &Key, dest: &Path) {
    let cache = env.cache();
    assert!(!cache.is_cached(key).unwrap(), "{key} was published");
    assert!(!env.master(key).exists(), "master file exists");
    assert!(!dest.exists(), "dest {} exists", dest.display());
    let name = dest.file_name().unwrap().to_string_lossy().into_owned();
    if let Some(parent) = dest.parent().filter(|p| p.is_dir()) {
        let leftovers: Vec<_> = std::fs::read_dir(parent)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&format!(".{name}.")))
            .collect();
        assert!(
            leftovers.is_empty(),
            "temp files beside dest: {leftovers:?}"
        );
    }
    let incomplete = cache.get_image_filepath(key, Status::Incomplete);
    assert!(!incomplete.exists(), "{} left behind", incomplete.display());
    let stray: Vec<_> = std::fs::read_dir(cache.layout().incomplete_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(stray.is_empty(), "incomplete/ not empty: {stray:?}");
    // A child forked by another test of this binary (qemu-img, spawned with a pre_exec hook,
    // so by fork + exec) holds copies of every descriptor, the key lock's included, until its
    // exec closes them: under load that window can outlast the fetch. So the lock must be
    // released soon, not necessarily at once.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while cache.is_being_cached(key).unwrap() && std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(!cache.is_being_cached(key).unwrap(), "key lock still held");
}

/// Whether `invalid/<key>` holds the failed write, and how many bytes.
pub fn invalid_len(env: &Env, key: &Key) -> Option<u64> {
    std::fs::metadata(env.cache().get_image_filepath(key, Status::Invalid))
        .ok()
        .map(|m| m.len())
}

pub fn expect_err<T: std::fmt::Debug>(r: Result<T, FetchError>) -> FetchError {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e,
    }
}

/// A tmpfs mounted on a fresh temp dir, unmounted on drop.
pub struct Tmpfs {
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount tmpfs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs {
            path: dir.path().to_path_buf(),
            _dir: dir,
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Something still has a file open there: detach it so the temp dir can go.
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

/// Polls `f` until it is true or `within` passes.
pub fn wait_until(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    f()
}
