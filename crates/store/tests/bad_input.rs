//! Bad input and a hostile environment: each gets a clear error or is repaired by `clean`, and
//! no published image is lost or corrupted.
//!
//! Tests that need a filesystem of their own (read-only, without xattrs, full) mount one with
//! `mount(8)` on a fresh directory and unmount it in a `Drop` guard; they need root and print
//! a SKIPPED line otherwise.

mod common;

use std::fs;
use std::io::{ErrorKind, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Mount, assert_intact, file_names, key, pattern, publish, tempdir};
use imgcache_store::sqlite::{SqliteDriver, SqliteOptions};
use imgcache_store::{Cache, DriverKind, Key, KeyError, Layout, Status, StoreError, WriteOptions};

fn open(dir: &Path, kind: DriverKind) -> Cache {
    Cache::open(dir, kind).unwrap_or_else(|e| panic!("{kind} cache at {}: {e}", dir.display()))
}

// ---- keys ---------------------------------------------------------------------------------

#[test]
fn invalid_keys_are_refused_with_a_clear_error() {
    let long = "x".repeat(300);
    let cases: [(&str, KeyError); 9] = [
        ("../x", KeyError::BadChar('/')),
        ("", KeyError::Empty),
        (&long, KeyError::TooLong(300)),
        ("a\0b", KeyError::BadChar('\0')),
        ("%2e%2e", KeyError::BadChar('%')),
        ("..", KeyError::LeadingDot),
        (".imgcache.sqlite", KeyError::LeadingDot),
        ("incomplete", KeyError::Reserved("incomplete".into())),
        ("a/../../etc/passwd", KeyError::BadChar('/')),
    ];
    for (raw, want) in cases {
        let err = Key::new(raw).unwrap_err();
        assert_eq!(err, want, "{raw:?}");
        let msg = err.to_string();
        assert!(msg.starts_with("invalid key"), "{raw:?}: {msg}");
        // Through the store's error type, the message is the same one line.
        let store: StoreError = err.into();
        assert_eq!(store.to_string(), msg);
        assert!(!msg.contains('\n'));
        assert!(raw.parse::<Key>().is_err());
    }
    assert!(Key::new("x".repeat(255)).is_ok());

    // Keys are checked before any path exists, so nothing can escape or clobber the cache.
    let tmp = tempdir();
    let cache = open(&tmp.path().join("cache"), DriverKind::Sqlite);
    publish(&cache, "x", b"published");
    for raw in ["../x", "%2e%2e", "..", "incomplete"] {
        assert!(Key::new(raw).is_err());
    }
    assert_eq!(file_names(tmp.path()), Vec::<String>::new());
    assert_intact(&cache, "x", b"published");
}

// ---- the cache directory ------------------------------------------------------------------

fn missing_cache_dir_is_created(kind: DriverKind) {
    let tmp = tempdir();
    let dir = tmp.path().join("does/not/exist/yet");
    let cache = open(&dir, kind);
    for sub in ["incomplete", "invalid", "queue", "locks"] {
        assert!(dir.join(sub).is_dir(), "{sub}/");
    }
    publish(&cache, "img", b"works");
    assert_intact(&cache, "img", b"works");
}

fn uncreatable_cache_dir_is_a_cache_dir_error(kind: DriverKind) {
    for bad in ["/proc/imgcache-test/cache", "/proc/self/status/cache"] {
        match Cache::open(bad, kind) {
            Err(e @ StoreError::CacheDir { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("/proc/"), "names the path: {msg}");
            }
            other => panic!("{bad}: expected CacheDir, got {other:?}"),
        }
    }
    // A file where the directory should be.
    let tmp = tempdir();
    let file = tmp.path().join("a-file");
    fs::write(&file, b"x").unwrap();
    match Cache::open(&file, kind) {
        Err(StoreError::CacheDir { path, reason }) => {
            assert_eq!(path, file);
            assert!(reason.contains("not a directory"), "{reason}");
        }
        other => panic!("expected CacheDir, got {other:?}"),
    }
    assert!(matches!(
        Cache::open("", kind),
        Err(StoreError::CacheDir { .. })
    ));
}

fn read_only_cache_dir(kind: DriverKind) {
    // A fresh read-only filesystem: nothing can be created, and opening says so.
    let Some(ro) = Mount::new("read_only_cache_dir", "tmpfs", "ro,size=1m") else {
        return;
    };
    for dir in [ro.path().to_path_buf(), ro.path().join("cache")] {
        match Cache::open(&dir, kind) {
            Err(e @ StoreError::CacheDir { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains(&*ro.path().to_string_lossy()), "{msg}");
                assert!(msg.contains("Read-only file system"), "{msg}");
            }
            other => panic!("{}: expected CacheDir, got {other:?}", dir.display()),
        }
    }
    drop(ro);

    // An existing cache whose filesystem went read-only: refused at open, images kept.
    let Some(mnt) = Mount::new("read_only_cache_dir", "tmpfs", "size=4m") else {
        return;
    };
    let dir = mnt.path().join("cache");
    let data = pattern(1, 100_000);
    {
        let cache = open(&dir, kind);
        publish(&cache, "img", &data);
    }
    mnt.remount("ro");
    match Cache::open(&dir, kind) {
        Err(StoreError::CacheDir { path, reason }) => {
            assert_eq!(path, dir);
            assert!(reason.contains("not writable"), "{reason}");
        }
        other => panic!("expected CacheDir, got {other:?}"),
    }
    mnt.remount("rw");
    let cache = open(&dir, kind);
    assert_intact(&cache, "img", &data);
    drop(cache);
}

// ---- SQLite file --------------------------------------------------------------------------

#[test]
fn corrupt_sqlite_file_beside_images_is_refused_naming_the_repair() {
    let tmp = tempdir();
    let dir = tmp.path().join("cache");
    let data = pattern(2, 50_000);
    {
        let cache = open(&dir, DriverKind::Sqlite);
        publish(&cache, "img", &data);
    }
    let db = dir.join(".imgcache.sqlite");
    for garbage in [
        pattern(3, 8192),
        b"this is not a database, just some text\n".repeat(100),
    ] {
        for aux in ["-wal", "-shm"] {
            let _ = fs::remove_file(dir.join(format!(".imgcache.sqlite{aux}")));
        }
        fs::write(&db, &garbage).unwrap();
        match Cache::open(&dir, DriverKind::Sqlite) {
            // The records of the image beside it are lost: refused, naming the repair.
            Err(e @ StoreError::MetadataLost { images: 1, .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("is unreadable"), "{msg}");
                assert!(msg.contains("imgcache fsck --repair"), "{msg}");
                assert!(
                    msg.contains(&*db.to_string_lossy()),
                    "names the file: {msg}"
                );
                assert!(msg.contains("not a database"), "{msg}");
            }
            other => panic!("expected MetadataLost, got {other:?}"),
        }
        // The failed open touched neither the image nor the bad file (left for the operator).
        assert!(fs::read(dir.join("img")).unwrap() == data);
        assert!(fs::read(&db).unwrap() == garbage);
    }
}

#[test]
fn corrupt_sqlite_file_alone_is_a_bad_driver_configuration() {
    let tmp = tempdir();
    let dir = tmp.path().join("cache");
    fs::create_dir_all(&dir).unwrap();
    let db = dir.join(".imgcache.sqlite");
    fs::write(&db, pattern(3, 8192)).unwrap();
    match Cache::open(&dir, DriverKind::Sqlite) {
        Err(
            e @ StoreError::BadDriverConfiguration {
                driver: "sqlite", ..
            },
        ) => {
            let msg = e.to_string();
            assert!(msg.contains("not a database"), "{msg}");
            assert!(msg.contains("imgcache fsck --repair"), "{msg}");
        }
        other => panic!("expected BadDriverConfiguration, got {other:?}"),
    }
    assert!(fs::read(&db).unwrap() == pattern(3, 8192));
}

fn exclusive_lock(db: &Path) -> rusqlite::Connection {
    let holder = rusqlite::Connection::open(db).unwrap();
    holder.execute_batch("BEGIN EXCLUSIVE").unwrap();
    holder
}

#[test]
fn locked_sqlite_is_a_clear_error_and_loses_nothing() {
    let tmp = tempdir();
    let dir = tmp.path().join("cache");
    let db = dir.join(".imgcache.sqlite");
    let data = pattern(4, 30_000);
    {
        let cache = open(&dir, DriverKind::Sqlite);
        publish(&cache, "img", &data);
    }
    let opts = SqliteOptions {
        busy_timeout: Duration::from_millis(200),
    };

    // Opening while another connection holds the write lock: fails after the busy timeout.
    let holder = exclusive_lock(&db);
    let t = Instant::now();
    match SqliteDriver::open(&db, &opts) {
        Err(
            e @ StoreError::BadDriverConfiguration {
                driver: "sqlite", ..
            },
        ) => {
            let msg = e.to_string();
            assert!(msg.contains("locked"), "{msg}");
            assert!(msg.contains(&*db.to_string_lossy()), "{msg}");
        }
        Err(other) => panic!("expected BadDriverConfiguration, got {other:?}"),
        Ok(_) => panic!("opened a database another connection holds exclusively"),
    }
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "busy timeout not honoured: {:?}",
        t.elapsed()
    );
    drop(holder);

    // Opened first, then locked: a publish fails with a clear error and publishes nothing.
    let layout = Layout::open(&dir).unwrap();
    let driver = SqliteDriver::open(&db, &opts).unwrap();
    let cache = Cache::with_driver(layout, Box::new(driver), DriverKind::Sqlite);
    let holder = exclusive_lock(&db);
    let mut w = cache.open_for_write(&key("new")).unwrap().unwrap();
    w.write_all(b"new image").unwrap();
    let err = w.commit().unwrap_err();
    assert!(matches!(err, StoreError::Database { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("locked"), "{msg}");
    assert!(msg.contains(&*db.to_string_lossy()), "{msg}");
    assert!(
        !dir.join("new").exists(),
        "nothing published without its record"
    );
    assert!(
        cache
            .get_image_filepath(&key("new"), Status::Invalid)
            .exists()
    );
    // Readers still get the image (WAL readers are not blocked); only the hit goes uncounted.
    let hits_before = cache.get_hit_count(&key("img")).unwrap();
    let mut r = cache
        .open_for_read(&key("img"))
        .unwrap()
        .expect("cached image still served while the database is locked");
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut r, &mut got).unwrap();
    assert_eq!(got, data);
    drop(r);
    assert_eq!(cache.get_hit_count(&key("img")).unwrap(), hits_before);
    drop(holder);

    // Once released, everything is as it was and the store works again.
    assert!(!cache.is_cached(&key("new")).unwrap());
    assert_intact(&cache, "img", &data);
    publish(&cache, "new", b"new image");
    assert_intact(&cache, "new", b"new image");
}

// ---- xattr driver on a filesystem without user xattrs -------------------------------------

#[test]
fn xattr_driver_without_user_xattrs_is_a_bad_driver_configuration() {
    // ramfs has no xattr handlers at all (tmpfs takes user xattrs since Linux 6.6).
    let Some(mnt) = Mount::new(
        "xattr_driver_without_user_xattrs_is_a_bad_driver_configuration",
        "ramfs",
        "",
    ) else {
        return;
    };
    let dir = mnt.path().join("cache");
    match Cache::open(&dir, DriverKind::Xattr) {
        Err(
            e @ StoreError::BadDriverConfiguration {
                driver: "xattr", ..
            },
        ) => {
            let msg = e.to_string();
            assert!(msg.contains("extended attributes"), "{msg}");
            assert!(msg.contains(&*dir.to_string_lossy()), "{msg}");
            assert!(msg.contains("sqlite"), "suggests the way out: {msg}");
        }
        other => panic!("expected BadDriverConfiguration, got {other:?}"),
    }
    // The probe left nothing behind, and the same directory works with SQLite.
    assert!(file_names(&dir.join("incomplete")).is_empty());
    let cache = open(&dir, DriverKind::Sqlite);
    publish(&cache, "img", b"on ramfs");
    assert_intact(&cache, "img", b"on ramfs");
    drop(cache);
}

// ---- the store's files changed behind its back --------------------------------------------

fn file_removed_behind_the_stores_back(kind: DriverKind) {
    let tmp = tempdir();
    let cache = open(&tmp.path().join("cache"), kind);
    publish(&cache, "gone", b"will vanish");
    let kept = pattern(5, 20_000);
    publish(&cache, "kept", &kept);
    fs::remove_file(cache.root().join("gone")).unwrap();

    let k = key("gone");
    assert!(!cache.is_cached(&k).unwrap());
    assert!(cache.open_for_read(&k).unwrap().is_none());
    assert_eq!(cache.get_image_size(&k).unwrap(), None);
    assert_eq!(cache.get_hit_count(&k).unwrap(), 0);
    assert!(cache.is_cacheable(&k).unwrap());

    let report = cache.clean(Duration::from_secs(3600)).unwrap();
    match kind {
        DriverKind::Sqlite => assert_eq!(report.dangling_records, ["gone"]),
        DriverKind::Xattr => assert!(report.dangling_records.is_empty()),
    }
    let ids: Vec<String> = cache
        .get_cached_images()
        .unwrap()
        .into_iter()
        .map(|r| r.image_id)
        .collect();
    assert_eq!(ids, ["kept"]);
    assert_eq!(cache.get_cache_size().unwrap(), kept.len() as u64);
    assert_eq!(
        cache.get_least_recently_accessed().unwrap(),
        Some(("kept".into(), kept.len() as u64))
    );
    assert_intact(&cache, "kept", &kept);
    // And it can be cached again.
    publish(&cache, "gone", b"back again");
    assert_intact(&cache, "gone", b"back again");
}

fn file_without_a_record_is_left_alone(kind: DriverKind) {
    let tmp = tempdir();
    let cache = open(&tmp.path().join("cache"), kind);
    publish(&cache, "ours", b"ours");
    let foreign = cache.root().join("foreign");
    fs::write(&foreign, b"put here by someone else").unwrap();
    let k = key("foreign");

    assert!(!cache.is_cached(&k).unwrap());
    assert!(cache.open_for_read(&k).unwrap().is_none());
    assert_eq!(cache.get_cached_images().unwrap().len(), 1);
    assert_eq!(cache.get_cache_size().unwrap(), 4);

    let report = cache.clean(Duration::ZERO).unwrap();
    assert_eq!(report.foreign_files, ["foreign"]);
    assert!(report.dangling_records.is_empty());
    assert_eq!(cache.prune(0).unwrap().evicted.len(), 1); // only "ours"
    assert_eq!(cache.delete_all_cached_images().unwrap(), 0);
    assert_eq!(fs::read(&foreign).unwrap(), b"put here by someone else");
    assert_eq!(
        cache.clean(Duration::ZERO).unwrap().foreign_files,
        ["foreign"]
    );
}

// ---- failed writes ------------------------------------------------------------------------

fn disk_full_during_a_write(kind: DriverKind) {
    let Some(mnt) = Mount::new("disk_full_during_a_write", "tmpfs", "size=8m") else {
        return;
    };
    let cache = open(&mnt.path().join("cache"), kind);
    let kept = pattern(6, 1024 * 1024);
    publish(&cache, "kept", &kept);
    let big = pattern(7, 16 * 1024 * 1024);

    // Streaming 16 MiB into 8: the write fails, and so does the commit; nothing is published.
    let k = key("big");
    let mut w = cache.open_for_write(&k).unwrap().unwrap();
    let write_err = big
        .chunks(1024 * 1024)
        .try_for_each(|c| w.write_all(c))
        .unwrap_err();
    assert_eq!(write_err.kind(), ErrorKind::StorageFull, "{write_err}");
    match w.commit() {
        Err(e @ StoreError::DiskFull { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("disk full") && msg.contains("big"), "{msg}");
        }
        other => panic!("expected DiskFull, got {other:?}"),
    }
    let no_trace = |cache: &Cache, k: &Key| {
        assert!(!cache.is_cached(k).unwrap());
        for s in [Status::Active, Status::Incomplete, Status::Invalid] {
            let p = cache.get_image_filepath(k, s);
            assert!(!p.exists(), "{} should be removed", p.display());
        }
    };
    no_trace(&cache, &k);
    assert_intact(&cache, "kept", &kept);

    // A writer dropped after the failed write cleans up the same way.
    let k2 = key("big2");
    let mut w = cache.open_for_write(&k2).unwrap().unwrap();
    assert!(w.write_all(&big).is_err());
    drop(w);
    no_trace(&cache, &k2);

    // With the size known up front, the space is reserved and the failure comes at once.
    match cache.open_for_write_with(
        &key("big3"),
        WriteOptions {
            expected_size: Some(big.len() as u64),
            ..WriteOptions::default()
        },
    ) {
        Err(StoreError::DiskFull { .. }) => {}
        other => panic!("expected DiskFull, got {other:?}"),
    }
    no_trace(&cache, &key("big3"));

    // The space came back: the published image is whole and a fitting image still goes in.
    assert_intact(&cache, "kept", &kept);
    let small = pattern(8, 2 * 1024 * 1024);
    publish(&cache, "small", &small);
    assert_intact(&cache, "small", &small);
    assert_eq!(cache.get_cached_images().unwrap().len(), 2);
    drop(cache);
}

fn writer_dropped_mid_write(kind: DriverKind) {
    let tmp = tempdir();
    let cache = open(&tmp.path().join("cache"), kind);
    let kept = pattern(9, 10_000);
    publish(&cache, "kept", &kept);
    let k = key("img");
    let full = pattern(10, 1 << 20);
    {
        let mut w = cache.open_for_write(&k).unwrap().unwrap();
        w.write_all(&full[..300_000]).unwrap();
        // The download dies here (an error, a panic unwinding, a cancelled task).
    }
    assert!(!cache.is_cached(&k).unwrap());
    assert!(!cache.get_image_filepath(&k, Status::Active).exists());
    assert!(!cache.get_image_filepath(&k, Status::Incomplete).exists());
    let partial = fs::read(cache.get_image_filepath(&k, Status::Invalid)).unwrap();
    assert!(partial == full[..300_000]);
    assert_eq!(cache.get_cached_images().unwrap().len(), 1);

    // clean reclaims it; a retry publishes the whole image.
    assert_eq!(
        cache.clean(Duration::from_secs(3600)).unwrap().invalid,
        ["img"]
    );
    publish(&cache, "img", &full);
    assert_intact(&cache, "img", &full);
    assert_intact(&cache, "kept", &kept);
}

macro_rules! both_drivers {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[test] fn $name() { super::$name(imgcache_store::DriverKind::Sqlite) } )*
        }
        mod xattr {
            $( #[test] fn $name() { super::$name(imgcache_store::DriverKind::Xattr) } )*
        }
    };
}

both_drivers!(
    missing_cache_dir_is_created,
    uncreatable_cache_dir_is_a_cache_dir_error,
    read_only_cache_dir,
    file_removed_behind_the_stores_back,
    file_without_a_record_is_left_alone,
    disk_full_during_a_write,
    writer_dropped_mid_write,
);

#[test]
fn a_directory_opened_with_the_other_driver_is_refused() {
    for (made, other) in [
        (DriverKind::Sqlite, DriverKind::Xattr),
        (DriverKind::Xattr, DriverKind::Sqlite),
    ] {
        let tmp = tempdir();
        let dir = tmp.path().join("cache");
        let cache = open(&dir, made);
        publish(&cache, "img", b"made with one driver");
        drop(cache);
        match Cache::open(&dir, other) {
            Err(e @ StoreError::BadDriverConfiguration { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains(&format!("--driver {made}")), "{msg}");
            }
            other => panic!("expected BadDriverConfiguration, got {other:?}"),
        }
        // Nothing was lost: the right driver still sees the image.
        assert_intact(&open(&dir, made), "img", b"made with one driver");
    }
}

#[test]
fn a_foreign_file_at_a_keys_path_is_never_replaced() {
    for kind in [DriverKind::Sqlite, DriverKind::Xattr] {
        let tmp = tempdir();
        let dir = tmp.path().join("cache");
        let cache = open(&dir, kind);
        fs::write(dir.join("operators-file"), b"not the cache's").unwrap();
        match cache.open_for_write(&key("operators-file")) {
            Err(StoreError::ForeignFile { path }) => assert_eq!(path, dir.join("operators-file")),
            other => panic!("{kind}: expected ForeignFile, got {other:?}"),
        }
        // A writer opened before the file appeared does not rename over it either.
        let mut w = cache.open_for_write(&key("late")).unwrap().unwrap();
        w.write_all(b"cache bytes").unwrap();
        fs::write(dir.join("late"), b"appeared meanwhile").unwrap();
        assert!(
            matches!(w.commit(), Err(StoreError::ForeignFile { .. })),
            "{kind}"
        );
        assert_eq!(
            fs::read(dir.join("operators-file")).unwrap(),
            b"not the cache's"
        );
        assert_eq!(fs::read(dir.join("late")).unwrap(), b"appeared meanwhile");
        assert!(!cache.is_cached(&key("late")).unwrap());
    }
}

#[test]
fn many_first_opens_of_one_directory_at_once_all_succeed() {
    // The driver marker is created by whichever open comes first; the others must read a
    // whole marker, never an empty one (a race once seen as "made with the  driver").
    for kind in [DriverKind::Sqlite, DriverKind::Xattr] {
        for _ in 0..20 {
            let tmp = tempdir();
            let dir = tmp.path().join("cache");
            std::thread::scope(|s| {
                let handles: Vec<_> = (0..8)
                    .map(|_| s.spawn(|| Cache::open(&dir, kind).map(|_| ())))
                    .collect();
                for h in handles {
                    h.join().unwrap().unwrap_or_else(|e| panic!("{kind}: {e}"));
                }
            });
        }
    }
}
