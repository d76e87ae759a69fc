//! The driver conformance suite: every operation of the seed's driver interface (Glance's
//! `image_cache.drivers.base.Driver`), exercised on `Cache` once per metadata driver.
//!
//! Each test is a generic function taking a [`DriverKind`]; the `conformance!` macro at the
//! bottom instantiates all of them for `sqlite::` and `xattr::`. The xattr run is never skipped:
//! temp dirs live under `CARGO_TARGET_TMPDIR`, on a filesystem with user xattrs, and a cache
//! that cannot open fails the test.

mod common;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use common::{file_names, key, pattern, publish, read_image, sha256, tempdir};
use imgcache_store::record::now;
use imgcache_store::{
    Algorithm, Cache, DriverKind, Integrity, PruneReport, Status, StoreError, WriteOptions,
};
use tempfile::TempDir;

fn fresh(kind: DriverKind) -> (TempDir, Cache) {
    let dir = tempdir();
    let cache = Cache::open(dir.path().join("cache"), kind)
        .unwrap_or_else(|e| panic!("{kind} driver must work on {}: {e}", dir.path().display()));
    assert_eq!(cache.driver().name(), kind.name());
    assert_eq!(cache.driver_kind(), kind);
    (dir, cache)
}

fn ids(cache: &Cache) -> Vec<String> {
    cache
        .get_cached_images()
        .unwrap()
        .into_iter()
        .map(|r| r.image_id)
        .collect()
}

fn lru(cache: &Cache) -> Option<(String, u64)> {
    cache.get_least_recently_accessed().unwrap()
}

fn evicted(report: &PruneReport) -> Vec<&str> {
    report.evicted.iter().map(|(k, _)| k.as_str()).collect()
}

fn set_mtime(path: &std::path::Path, t: SystemTime) {
    File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

fn hours_ago(h: u64) -> SystemTime {
    SystemTime::now() - Duration::from_secs(h * 3600)
}

// ---- sizes and listings -------------------------------------------------------------------

fn cache_size_and_cached_images(kind: DriverKind) {
    let (_d, cache) = fresh(kind);
    assert_eq!(cache.get_cache_size().unwrap(), 0);
    assert!(cache.get_cached_images().unwrap().is_empty());

    let before = now();
    // Published out of id order: the listing must come back ordered by id anyway.
    let data: [(&str, Vec<u8>); 3] = [
        ("img-b", pattern(2, 3000)),
        ("img-C", pattern(3, 10)),
        ("img-a", pattern(1, 70_000)),
    ];
    for (k, d) in &data {
        publish(&cache, k, d);
    }
    let after = now();

    assert_eq!(cache.get_cache_size().unwrap(), 3000 + 10 + 70_000);
    let recs = cache.get_cached_images().unwrap();
    // Byte order of ids, as SQL's ORDER BY image_id: upper case sorts first.
    assert_eq!(
        recs.iter().map(|r| r.image_id.as_str()).collect::<Vec<_>>(),
        ["img-C", "img-a", "img-b"]
    );
    for rec in &recs {
        let (_, d) = data.iter().find(|(k, _)| *k == rec.image_id).unwrap();
        assert_eq!(rec.size, d.len() as u64, "{}", rec.image_id);
        assert_eq!(rec.hits, 0, "{}", rec.image_id);
        assert_eq!(rec.checksum, Some(sha256(d)), "{}", rec.image_id);
        assert!(
            before <= rec.last_modified && rec.last_modified <= after,
            "{}: last_modified {} not within publish window [{before}, {after}]",
            rec.image_id,
            rec.last_modified
        );
        assert_eq!(rec.last_accessed, rec.last_modified, "{}", rec.image_id);
    }

    // The listing and the total follow deletions and hits.
    read_image(&cache, "img-b").unwrap();
    assert!(cache.delete_cached_image(&key("img-a")).unwrap());
    assert_eq!(cache.get_cache_size().unwrap(), 3010);
    let recs = cache.get_cached_images().unwrap();
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[1].image_id, "img-b");
    assert_eq!(recs[1].hits, 1);
    assert!(recs[1].last_accessed > recs[1].last_modified);
}

fn records_survive_reopen(kind: DriverKind) {
    let (d, cache) = fresh(kind);
    publish(&cache, "a", b"alpha");
    publish(&cache, "b", b"bravo!");
    read_image(&cache, "a").unwrap();
    read_image(&cache, "a").unwrap();
    cache
        .set_prop(&key("b"), "origin", "http://example/b")
        .unwrap();
    let before = cache.get_cached_images().unwrap();
    drop(cache);

    let cache = Cache::open(d.path().join("cache"), kind).unwrap();
    assert_eq!(cache.get_cached_images().unwrap(), before);
    assert_eq!(cache.get_hit_count(&key("a")).unwrap(), 2);
    assert_eq!(cache.get_cache_size().unwrap(), 11);
    assert_eq!(lru(&cache), Some(("b".into(), 6)));
}

// ---- state queries ------------------------------------------------------------------------

fn is_cached_and_is_cacheable(kind: DriverKind) {
    let (_d, cache) = fresh(kind);
    let k = key("img");
    assert!(!cache.is_cached(&k).unwrap());
    assert!(cache.is_cacheable(&k).unwrap());
    assert!(!cache.is_being_cached(&k).unwrap());

    let mut w = cache.open_for_write(&k).unwrap().unwrap();
    w.write_all(b"partial").unwrap();
    // Being written: neither cached nor cacheable, and the partial file is not visible.
    assert!(!cache.is_cached(&k).unwrap());
    assert!(!cache.is_cacheable(&k).unwrap());
    assert!(cache.is_being_cached(&k).unwrap());
    assert!(!cache.get_image_filepath(&k, Status::Active).exists());
    assert!(cache.open_for_read(&k).unwrap().is_none());

    w.commit().unwrap();
    assert!(cache.is_cached(&k).unwrap());
    assert!(!cache.is_cacheable(&k).unwrap());
    assert!(!cache.is_being_cached(&k).unwrap());
}

/// `is_being_cached` sees a writer held by another thread (a separate flock holder), and stops
/// seeing it once that writer commits.
fn is_being_cached_sees_writer_in_other_thread(kind: DriverKind) {
    let (_d, cache) = fresh(kind);
    let k = key("img");
    assert!(!cache.is_being_cached(&k).unwrap());

    let (opened_tx, opened_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let writer = {
        let cache = cache.clone();
        let k = k.clone();
        std::thread::spawn(move || {
            let mut w = cache.open_for_write(&k).unwrap().unwrap();
            w.write_all(&pattern(7, 100_000)).unwrap();
            opened_tx.send(()).unwrap();
            go_rx.recv().unwrap();
            w.commit().unwrap()
        })
    };
    opened_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("writer thread opened");
    assert!(cache.is_being_cached(&k).unwrap());
    assert!(!cache.is_cached(&k).unwrap());
    assert!(!cache.is_cacheable(&k).unwrap());
    // A non-waiting second writer is refused with Busy rather than blocking.
    let busy = cache.open_for_write_with(
        &k,
        WriteOptions {
            wait: false,
            ..WriteOptions::default()
        },
    );
    assert!(
        matches!(busy, Err(StoreError::Busy(ref s)) if s == "img"),
        "{busy:?}"
    );

    go_tx.send(()).unwrap();
    let rec = writer.join().unwrap();
    assert_eq!(rec.size, 100_000);
    assert!(!cache.is_being_cached(&k).unwrap());
    assert!(cache.is_cached(&k).unwrap());
}

fn hit_count_and_image_size(kind: DriverKind) {
    let (_d, cache) = fresh(kind);
    let k = key("img");
    assert_eq!(cache.get_hit_count(&k).unwrap(), 0);
    assert_eq!(cache.get_image_size(&k).unwrap(), None);

    publish(&cache, "img", &pattern(1, 12_345));
    assert_eq!(cache.get_hit_count(&k).unwrap(), 0);
    assert_eq!(cache.get_image_size(&k).unwrap(), Some(12_345));
    for n in 1..=3 {
        let (rec, _) = read_image(&cache, "img").unwrap();
        assert_eq!(rec.hits, n);
        assert_eq!(cache.get_hit_count(&k).unwrap(), n);
    }
    // Another image's hits are its own.
    publish(&cache, "other", b"x");
    assert_eq!(cache.get_hit_count(&key("other")).unwrap(), 0);
    assert_eq!(cache.get_hit_count(&k).unwrap(), 3);
}

fn image_filepath_for_each_status(kind: DriverKind) {
    let (_d, cache) = fresh(kind);
    let root = cache.root().to_path_buf();
    let k = key("img.converted");
    assert_eq!(
        cache.get_image_filepath(&k, Status::Active),
        root.join("img.converted")
    );
    assert_eq!(
        cache.get_image_filepath(&k, Status::Incomplete),
        root.join("incomplete/img.converted")
    );
    assert_eq!(
        cache.get_image_filepath(&k, Status::Invalid),
        root.join("invalid/img.converted")
    );
    assert_eq!(
        cache.get_image_filepath(&k, Status::Queue),
        root.join("queue/img.converted")
    );

    // And those are where the files really are at each stage.
    assert!(cache.queue_image(&k).unwrap());
    assert!(cache.get_image_filepath(&k, Status::Queue).is_file());
    let mut w = cache.open_for_write(&k).unwrap().unwrap();
    assert_eq!(w.path(), cache.get_image_filepath(&k, Status::Incomplete));
    w.write_all(b"abc").unwrap();
    assert!(cache.get_image_filepath(&k, Status::Incomplete).is_file());
    drop(w);
    assert!(cache.get_image_filepath(&k, Status::Invalid).is_file());
    assert!(!cache.get_image_filepath(&k, Status::Incomplete).exists());
    publish(&cache, "img.converted", b"abc");
    assert!(cache.get_image_filepath(&k, Status::Active).is_file());
    let r = cache.open_for_read(&k).unwrap().unwrap();
    assert_eq!(r.path(), cache.get_image_filepath(&k, Status::Active));
}

fn cache_files_lists_key_files(kind: DriverKind) {
    let (_d, cache) = fresh(kind);
    let root = cache.root().to_path_buf();
    publish(&cache, "b", b"bb");
    publish(&cache, "a", b"a");
    let mut w = cache.open_for_write(&key("in-flight")).unwrap().unwrap();
    w.write_all(b"..").unwrap();
    {
        let mut failed = cache.open_for_write(&key("failed")).unwrap().unwrap();
        failed.write_all(b"oops").unwrap();
    }

    // Only key-named regular files: not the subdirectories, the database, or lock files.
    assert_eq!(
        cache.get_cache_files(&root).unwrap(),
        [root.join("a"), root.join("b")]
    );
    let inc = cache.layout().incomplete_dir();
    assert_eq!(
        cache.get_cache_files(&inc).unwrap(),
        [inc.join("in-flight")]
    );
    let inv = cache.layout().invalid_dir();
    assert_eq!(cache.get_cache_files(&inv).unwrap(), [inv.join("failed")]);
    assert!(
        cache
            .get_cache_files(&cache.layout().queue_dir())
            .unwrap()
            .is_empty()
    );
    drop(w);
}

// ---- the queue ----------------------------------------------------------------------------

fn queue_image_refuses_cached_queued_and_being_cached(kind: DriverKind) {
    let (_d, cache) = fresh(kind);
    let q = key("queued");
    assert!(!cache.is_queued(&q).unwrap());
    assert!(cache.queue_image(&q).unwrap());
    assert!(cache.is_queued(&q).unwrap());
    assert!(!cache.queue_image(&q).unwrap(), "already queued");

    publish(&cache, "cached", b"data");
    assert!(
        !cache.queue_image(&key("cached")).unwrap(),
        "already cached"
    );
    assert!(!cache.is_queued(&key("cached")).unwrap());

    let busy = key("busy");
    let w = cache.open_for_write(&busy).unwrap().unwrap();
    assert!(!cache.queue_image(&busy).unwrap(), "being cached");
    assert!(!cache.is_queued(&busy).unwrap());
    drop(w);
    assert!(cache.queue_image(&busy).unwrap(), "writer gone: queueable");

    assert_eq!(cache.get_queued_images().unwrap(), ["queued", "busy"]);
}

fn queued_images_in_insertion_order(kind: DriverKind) {
    let (_d, cache) = fresh(kind);
    assert!(cache.get_queued_images().unwrap().is_empty());
    // Deliberately not alphabetical.
    let order = ["m", "a", "z", "b", "a0", "Q"];
    for k in order {
        assert!(cache.queue_image(&key(k)).unwrap());
    }
    assert_eq!(cache.get_queued_images().unwrap(), order);
    // Queue state is on disk: a second handle sees the same order.
    let other = Cache::open(cache.root(), kind).unwrap();
    assert_eq!(other.get_queued_images().unwrap(), order);
}

fn delete_queued_image_and_all(kind: DriverKind) {
    let (_d, cache) = fresh(kind);
    for k in ["q1", "q2", "q3", "q4"] {
        assert!(cache.queue_image(&key(k)).unwrap());
    }
    assert!(cache.delete_queued_image(&key("q2")).unwrap());
    assert!(!cache.delete_queued_image(&key("q2")).unwrap());
    assert!(!cache.is_queued(&key("q2")).unwrap());
    assert!(!cache.delete_queued_image(&key("never")).unwrap());
    assert_eq!(cache.get_queued_images().unwrap(), ["q1", "q3", "q4"]);

    publish(&cache, "img", b"not queued");
    assert_eq!(cache.delete_all_queued_images().unwrap(), 3);
    assert!(cache.get_queued_images().unwrap().is_empty());
    assert_eq!(cache.delete_all_queued_images().unwrap(), 0);
    // Clearing the queue leaves the cache alone.
    assert!(cache.is_cached(&key("img")).unwrap());
}

// ---- deletion -----------------------------------------------------------------------------

fn delete_cached_image_and_all(kind: DriverKind) {
    let (_d, cache) = fresh(kind);
    for (i, k) in ["a", "b", "c"].into_iter().enumerate() {
        publish(&cache, k, &pattern(i as u64, 1000));
    }
    let a = key("a");
    assert!(cache.delete_cached_image(&a).unwrap());
    assert!(!cache.is_cached(&a).unwrap());
    assert!(!cache.get_image_filepath(&a, Status::Active).exists());
    assert!(cache.open_for_read(&a).unwrap().is_none());
    assert!(!cache.delete_cached_image(&a).unwrap(), "second delete");
    assert_eq!(ids(&cache), ["b", "c"]);
    assert_eq!(cache.get_cache_size().unwrap(), 2000);

    // A file the store has no record of is not the store's to delete.
    fs::write(cache.root().join("foreign"), b"someone else's").unwrap();
    assert!(cache.queue_image(&key("queued")).unwrap());

    assert_eq!(cache.delete_all_cached_images().unwrap(), 2);
    assert!(ids(&cache).is_empty());
    assert_eq!(cache.get_cache_size().unwrap(), 0);
    assert_eq!(
        cache.get_cache_files(cache.root()).unwrap(),
        [cache.root().join("foreign")]
    );
    assert_eq!(
        fs::read(cache.root().join("foreign")).unwrap(),
        b"someone else's"
    );
    assert_eq!(cache.get_queued_images().unwrap(), ["queued"]);
    assert_eq!(cache.delete_all_cached_images().unwrap(), 0);

    // A deleted image can be cached again.
    publish(&cache, "a", b"again");
    assert_eq!(read_image(&cache, "a").unwrap().1, b"again");
}

fn delete_keeps_bytes_for_open_reader(kind: DriverKind) {
    let (_d, cache) = fresh(kind);
    let data = pattern(9, 200_000);
    publish(&cache, "img", &data);
    let mut r = cache.open_for_read(&key("img")).unwrap().unwrap();
    assert!(cache.delete_cached_image(&key("img")).unwrap());
    assert!(!cache.is_cached(&key("img")).unwrap());
    let mut got = Vec::new();
    r.read_to_end(&mut got).unwrap();
    assert!(
        got == data,
        "an open reader keeps reading the bytes it opened"
    );
}

// ---- LRU ----------------------------------------------------------------------------------

fn least_recently_accessed_follows_reads(kind: DriverKind) {
    let (_d, cache) = fresh(kind);
    assert_eq!(lru(&cache), None);
    publish(&cache, "a", &[1; 10]);
    publish(&cache, "b", &[2; 20]);
    publish(&cache, "c", &[3; 30]);
    assert_eq!(lru(&cache), Some(("a".into(), 10)));

    // Reading the LRU image makes it the most recent: a real LRU, not publish order.
    read_image(&cache, "a").unwrap();
    assert_eq!(lru(&cache), Some(("b".into(), 20)));
    read_image(&cache, "b").unwrap();
    assert_eq!(lru(&cache), Some(("c".into(), 30)));
    read_image(&cache, "c").unwrap();
    assert_eq!(lru(&cache), Some(("a".into(), 10)));
    // Reading the most recent one changes nothing.
    read_image(&cache, "c").unwrap();
    assert_eq!(lru(&cache), Some(("a".into(), 10)));

    cache.delete_cached_image(&key("a")).unwrap();
    assert_eq!(lru(&cache), Some(("b".into(), 20)));
}

// ---- reading ------------------------------------------------------------------------------

fn open_for_read_counts_hit_and_updates_last_accessed(kind: DriverKind) {
    let (_d, cache) = fresh(kind);
    assert!(cache.open_for_read(&key("missing")).unwrap().is_none());

    let data = pattern(4, 1 << 20);
    let published = publish(&cache, "img", &data);
    // Uncounted (the server's read for the miss that published it): bytes, no hit, no access.
    let mut r = cache.open_for_read_uncounted(&key("img")).unwrap().unwrap();
    assert_eq!(r.record().hits, 0);
    let mut got = Vec::new();
    r.read_to_end(&mut got).unwrap();
    assert!(got == data);
    drop(r);
    let stored = cache.get_record(&key("img")).unwrap().unwrap();
    assert_eq!(
        (stored.hits, stored.last_accessed),
        (0, published.last_accessed)
    );
    let t0 = now();
    let mut r = cache.open_for_read(&key("img")).unwrap().unwrap();
    let t1 = now();
    let rec = r.record().clone();
    assert_eq!(rec.hits, 1);
    assert!(
        t0 <= rec.last_accessed && rec.last_accessed <= t1,
        "last_accessed {} not within [{t0}, {t1}]",
        rec.last_accessed
    );
    assert_eq!(rec.last_modified, published.last_modified);
    assert_eq!(rec.size, data.len() as u64);
    assert_eq!(rec.checksum, Some(sha256(&data)));
    let mut got = Vec::new();
    r.read_to_end(&mut got).unwrap();
    assert!(got == data);
    drop(r);

    let stored = cache.get_record(&key("img")).unwrap().unwrap();
    assert_eq!(stored.hits, 1);
    assert_eq!(stored.last_accessed, rec.last_accessed);
    let (again, _) = read_image(&cache, "img").unwrap();
    assert_eq!(again.hits, 2);
    assert!(again.last_accessed > rec.last_accessed);
}

// ---- writing ------------------------------------------------------------------------------

fn commit_publishes_with_size_and_checksum(kind: DriverKind) {
    let (_d, cache) = fresh(kind);
    let k = key("img");
    let data = pattern(5, 3 * 1024 * 1024 + 17);
    let mut w = cache.open_for_write(&k).unwrap().unwrap();
    assert_eq!(w.key(), &k);
    for chunk in data.chunks(64 * 1024) {
        w.write_all(chunk).unwrap();
    }
    assert_eq!(w.bytes_written(), data.len() as u64);
    let rec = w.commit().unwrap();
    assert_eq!(rec.image_id, "img");
    assert_eq!(rec.size, data.len() as u64);
    assert_eq!(rec.hits, 0);
    let sum = rec.checksum.clone().unwrap();
    assert_eq!(sum.algorithm, Algorithm::Sha256);
    assert_eq!(sum, sha256(&data));

    assert_eq!(cache.get_record(&k).unwrap().unwrap(), rec);
    assert!(fs::read(cache.get_image_filepath(&k, Status::Active)).unwrap() == data);
    assert!(file_names(&cache.layout().incomplete_dir()).is_empty());
    assert!(file_names(&cache.layout().invalid_dir()).is_empty());

    // Cached: a second writer gets None, and the image is untouched.
    assert!(cache.open_for_write(&k).unwrap().is_none());
    assert_eq!(cache.get_record(&k).unwrap().unwrap().checksum, Some(sum));
}

fn commit_with_expected_checksum_and_size(kind: DriverKind) {
    let (_d, cache) = fresh(kind);
    let data = pattern(6, 5000);
    let md5 = Integrity::of(Algorithm::Md5, &data);
    let mut w = cache
        .open_for_write_with(
            &key("img"),
            WriteOptions {
                expected: Some(md5.clone()),
                expected_size: Some(5000),
                ..WriteOptions::default()
            },
        )
        .unwrap()
        .unwrap();
    w.write_all(&data).unwrap();
    let rec = w.commit().unwrap();
    // The expected checksum's algorithm is the one computed and recorded.
    assert_eq!(rec.checksum, Some(md5));
    assert_eq!(rec.size, 5000);

    // replace: a stale image is replaced by a new version, record and bytes together.
    let newer = pattern(60, 7000);
    let mut w = cache
        .open_for_write_with(
            &key("img"),
            WriteOptions {
                replace: true,
                ..WriteOptions::default()
            },
        )
        .unwrap()
        .expect("replace opens a writer on a cached image");
    w.write_all(&newer).unwrap();
    w.commit().unwrap();
    common::assert_intact(&cache, "img", &newer);
    assert_eq!(cache.get_cache_size().unwrap(), 7000);
    assert_eq!(ids(&cache), ["img"]);
}

fn write_bytes_hashes_in_parallel_and_mixes_with_write(kind: DriverKind) {
    let (_d, cache) = fresh(kind);
    let k = key("img");
    let data = pattern(7, 3 * 1024 * 1024 + 5);
    let mut w = cache.open_for_write(&k).unwrap().unwrap();
    // Write first (hashed inline), then refcounted chunks (hashed on the writer's thread),
    // then Write again: one checksum over all of it, in order.
    let (head, rest) = data.split_at(1000);
    let (mid, tail) = rest.split_at(rest.len() - 777);
    w.write_all(head).unwrap();
    let mid = bytes::Bytes::copy_from_slice(mid);
    for i in (0..mid.len()).step_by(100_003) {
        w.write_bytes(mid.slice(i..(i + 100_003).min(mid.len())))
            .unwrap();
    }
    w.write_bytes(bytes::Bytes::new()).unwrap();
    w.write_all(tail).unwrap();
    assert_eq!(w.bytes_written(), data.len() as u64);
    let rec = w.commit().unwrap();
    assert_eq!(rec.checksum, Some(sha256(&data)));
    common::assert_intact(&cache, "img", &data);

    // A mismatch found by the hasher thread fails the commit like any other.
    let mut w = cache
        .open_for_write_with(
            &key("bad"),
            WriteOptions {
                expected: Some(sha256(b"something else")),
                ..WriteOptions::default()
            },
        )
        .unwrap()
        .unwrap();
    w.write_bytes(bytes::Bytes::from(pattern(8, 70_000)))
        .unwrap();
    let mut told = false;
    let err = w.commit_notify(|_| told = true).unwrap_err();
    assert!(matches!(err, StoreError::ChecksumMismatch { .. }), "{err}");
    assert!(!told, "a mismatch is never reported as verified");
    assert!(!cache.is_cached(&key("bad")).unwrap());
    assert!(
        cache
            .get_image_filepath(&key("bad"), Status::Invalid)
            .exists()
    );

    // A writer dropped with its hasher thread running publishes nothing.
    {
        let mut w = cache.open_for_write(&key("dropped")).unwrap().unwrap();
        w.write_bytes(bytes::Bytes::from(pattern(9, 4096))).unwrap();
    }
    assert!(!cache.is_cached(&key("dropped")).unwrap());
}

fn commit_notify_reports_verified_before_publishing(kind: DriverKind) {
    let (_d, cache) = fresh(kind);
    let k = key("img");
    let data = pattern(10, 100_000);
    let mut w = cache
        .open_for_write_with(
            &k,
            WriteOptions {
                expected: Some(sha256(&data)),
                expected_size: Some(data.len() as u64),
                ..WriteOptions::default()
            },
        )
        .unwrap()
        .unwrap();
    w.write_bytes(bytes::Bytes::from(data.clone())).unwrap();
    let mut seen = None;
    let rec = w
        .commit_notify(|r| {
            // Verified, not yet published.
            assert!(!cache.get_image_filepath(&k, Status::Active).exists());
            assert!(cache.get_record(&k).unwrap().is_none());
            seen = Some(r.clone());
        })
        .unwrap();
    assert_eq!(seen.as_ref(), Some(&rec));
    assert_eq!(rec.size, data.len() as u64);
    common::assert_intact(&cache, "img", &data);

    // A short write is not verified.
    let mut w = cache
        .open_for_write_with(
            &key("short"),
            WriteOptions {
                expected_size: Some(10),
                ..WriteOptions::default()
            },
        )
        .unwrap()
        .unwrap();
    w.write_bytes(bytes::Bytes::from_static(b"12345")).unwrap();
    let mut told = false;
    assert!(w.commit_notify(|_| told = true).is_err());
    assert!(!told);
}

fn dropped_writer_publishes_nothing(kind: DriverKind) {
    let (_d, cache) = fresh(kind);
    let k = key("img");
    {
        let mut w = cache.open_for_write(&k).unwrap().unwrap();
        w.write_all(&pattern(1, 4096)).unwrap();
    }
    assert!(!cache.is_cached(&k).unwrap());
    assert!(ids(&cache).is_empty());
    assert_eq!(cache.get_cache_size().unwrap(), 0);
    assert!(!cache.get_image_filepath(&k, Status::Active).exists());
    assert!(!cache.get_image_filepath(&k, Status::Incomplete).exists());
    let partial = fs::read(cache.get_image_filepath(&k, Status::Invalid)).unwrap();
    assert!(
        partial == pattern(1, 4096),
        "the partial file is kept in invalid/"
    );
    // The key lock went with the writer.
    assert!(!cache.is_being_cached(&k).unwrap());
    assert!(cache.is_cacheable(&k).unwrap());

    // abort() does the same explicitly.
    let mut w = cache.open_for_write(&key("other")).unwrap().unwrap();
    w.write_all(b"xyz").unwrap();
    w.abort();
    assert!(!cache.is_cached(&key("other")).unwrap());
    assert!(
        cache
            .get_image_filepath(&key("other"), Status::Invalid)
            .exists()
    );

    // And a fresh writer can publish it afterwards.
    publish(&cache, "img", b"complete");
    assert_eq!(read_image(&cache, "img").unwrap().1, b"complete");
}

fn checksum_mismatch_publishes_nothing(kind: DriverKind) {
    let (_d, cache) = fresh(kind);
    let k = key("img");
    let data = pattern(8, 10_000);
    let expected = sha256(b"something else");
    let mut w = cache
        .open_for_write_with(
            &k,
            WriteOptions {
                expected: Some(expected.clone()),
                ..WriteOptions::default()
            },
        )
        .unwrap()
        .unwrap();
    w.write_all(&data).unwrap();
    let err = w.commit().unwrap_err();
    let msg = err.to_string();
    match err {
        StoreError::ChecksumMismatch {
            key,
            expected: e,
            actual,
        } => {
            assert_eq!(key, "img");
            assert_eq!(e, expected);
            assert_eq!(actual, sha256(&data));
        }
        other => panic!("expected ChecksumMismatch, got {other:?}"),
    }
    assert!(msg.contains(&expected.to_string()), "{msg}");
    assert!(msg.contains(&sha256(&data).to_string()), "{msg}");
    assert!(msg.contains("invalid/"), "{msg}");

    assert!(!cache.is_cached(&k).unwrap());
    assert!(ids(&cache).is_empty());
    assert_eq!(cache.get_cache_size().unwrap(), 0);
    assert!(!cache.get_image_filepath(&k, Status::Active).exists());
    assert!(!cache.get_image_filepath(&k, Status::Incomplete).exists());
    assert!(fs::read(cache.get_image_filepath(&k, Status::Invalid)).unwrap() == data);
    assert!(!cache.is_being_cached(&k).unwrap());
}

fn size_mismatch_publishes_nothing(kind: DriverKind) {
    let (_d, cache) = fresh(kind);
    for (k, expected, written) in [("short", 10_000u64, 6000usize), ("long", 100, 101)] {
        let mut w = cache
            .open_for_write_with(
                &key(k),
                WriteOptions {
                    expected_size: Some(expected),
                    ..WriteOptions::default()
                },
            )
            .unwrap()
            .unwrap();
        w.write_all(&pattern(1, written)).unwrap();
        match w.commit() {
            Err(StoreError::SizeMismatch {
                key,
                expected: e,
                actual,
            }) => {
                assert_eq!(key, k);
                assert_eq!(e, expected);
                assert_eq!(actual, written as u64);
            }
            other => panic!("{k}: expected SizeMismatch, got {other:?}"),
        }
        assert!(!cache.is_cached(&key(k)).unwrap());
        let invalid = cache.get_image_filepath(&key(k), Status::Invalid);
        assert_eq!(fs::metadata(invalid).unwrap().len(), written as u64);
    }
    assert!(ids(&cache).is_empty());
    assert_eq!(cache.get_cache_size().unwrap(), 0);
}

// ---- clean-up -----------------------------------------------------------------------------

fn delete_invalid_files_removes_failed_writes(kind: DriverKind) {
    let (_d, cache) = fresh(kind);
    publish(&cache, "kept", b"published");
    for k in ["bad2", "bad1"] {
        let mut w = cache.open_for_write(&key(k)).unwrap().unwrap();
        w.write_all(b"partial").unwrap();
    }
    assert_eq!(file_names(&cache.layout().invalid_dir()), ["bad1", "bad2"]);
    assert_eq!(cache.delete_invalid_files().unwrap(), ["bad1", "bad2"]);
    assert!(file_names(&cache.layout().invalid_dir()).is_empty());
    assert!(cache.delete_invalid_files().unwrap().is_empty());
    common::assert_intact(&cache, "kept", b"published");
}

fn delete_stalled_files_respects_age_and_live_writers(kind: DriverKind) {
    let (_d, cache) = fresh(kind);
    let inc = cache.layout().incomplete_dir();
    // Left behind by writers that crashed: one long ago, one just now.
    fs::write(inc.join("old"), b"stale").unwrap();
    set_mtime(&inc.join("old"), hours_ago(2));
    fs::write(inc.join("fresh"), b"recent").unwrap();
    // A writer that is alive (holds the key lock) but has not written for two hours.
    let mut live = cache.open_for_write(&key("live")).unwrap().unwrap();
    live.write_all(b"slow ").unwrap();
    set_mtime(live.path(), hours_ago(2));

    let removed = cache.delete_stalled_files(hours_ago(1)).unwrap();
    assert_eq!(removed, ["old"]);
    assert_eq!(file_names(&inc), ["fresh", "live"]);

    // The live writer was not disturbed: it finishes and publishes whole.
    live.write_all(b"but alive").unwrap();
    live.commit().unwrap();
    common::assert_intact(&cache, "live", b"slow but alive");

    // older_than is inclusive of everything written up to then.
    assert_eq!(
        cache.delete_stalled_files(SystemTime::now()).unwrap(),
        ["fresh"]
    );
    assert!(file_names(&inc).is_empty());
}

fn clean_reports_and_repairs(kind: DriverKind) {
    let (_d, cache) = fresh(kind);
    let root = cache.root().to_path_buf();
    publish(&cache, "kept", b"kept bytes");
    publish(&cache, "gone", b"removed behind the store's back");
    fs::remove_file(root.join("gone")).unwrap();
    fs::write(root.join("foreign"), b"not ours").unwrap();
    let inc = cache.layout().incomplete_dir();
    fs::write(inc.join("stalled"), b"crashed writer").unwrap();
    set_mtime(&inc.join("stalled"), hours_ago(48));
    fs::write(inc.join("recent"), b"crashed a moment ago").unwrap();
    {
        let mut w = cache.open_for_write(&key("failed")).unwrap().unwrap();
        w.write_all(b"bad").unwrap();
    }
    let mut live = cache.open_for_write(&key("live")).unwrap().unwrap();
    live.write_all(b"in progress").unwrap();
    set_mtime(live.path(), hours_ago(48));
    assert!(cache.queue_image(&key("queued")).unwrap());

    let report = cache.clean(Duration::from_secs(24 * 3600)).unwrap();
    assert_eq!(report.stalled, ["stalled"]);
    assert_eq!(report.invalid, ["failed"]);
    match kind {
        // A SQLite row outlives its file; clean drops it.
        DriverKind::Sqlite => assert_eq!(report.dangling_records, ["gone"]),
        // xattr records live on the file: gone with it, nothing dangling to drop.
        DriverKind::Xattr => assert!(report.dangling_records.is_empty()),
    }
    assert_eq!(report.foreign_files, ["foreign"]);
    // Lock files of keys with nothing left ("gone", "failed", "stalled"); live, kept and
    // queued keep theirs.
    let locks = file_names(&cache.layout().locks_dir());
    for k in ["gone.lock", "failed.lock", "stalled.lock"] {
        assert!(
            !locks.contains(&k.to_string()),
            "{k} should be removed: {locks:?}"
        );
    }
    assert!(locks.contains(&"live.lock".to_string()), "{locks:?}");
    assert!(report.stale_locks >= 2, "{report:?}");

    // What is left is consistent and untouched.
    assert_eq!(ids(&cache), ["kept"]);
    assert_eq!(cache.get_cache_size().unwrap(), 10);
    common::assert_intact(&cache, "kept", b"kept bytes");
    assert_eq!(fs::read(root.join("foreign")).unwrap(), b"not ours");
    assert_eq!(file_names(&inc), ["live", "recent"]);
    assert!(file_names(&cache.layout().invalid_dir()).is_empty());
    assert_eq!(cache.get_queued_images().unwrap(), ["queued"]);
    live.write_all(b"!").unwrap();
    live.commit().unwrap();
    common::assert_intact(&cache, "live", b"in progress!");

    // Nothing more to do the second time.
    let again = cache.clean(Duration::from_secs(24 * 3600)).unwrap();
    assert!(again.stalled.is_empty() && again.invalid.is_empty());
    assert!(again.dangling_records.is_empty());
    assert_eq!(again.foreign_files, ["foreign"]);
}

// ---- prune --------------------------------------------------------------------------------

fn prune_evicts_least_recently_accessed_until_it_fits(kind: DriverKind) {
    let (_d, cache) = fresh(kind);
    for (i, k) in ["a", "b", "c", "d"].into_iter().enumerate() {
        publish(&cache, k, &pattern(i as u64, 100));
    }
    read_image(&cache, "a").unwrap(); // LRU order now: b c d a

    let nothing = cache.prune(400).unwrap();
    assert!(nothing.evicted.is_empty());
    assert_eq!(nothing.size_after, 400);

    let report = cache.prune(250).unwrap();
    assert_eq!(
        report.evicted,
        [("b".to_string(), 100), ("c".to_string(), 100)]
    );
    assert_eq!(report.bytes_freed, 200);
    assert!(report.skipped_in_use.is_empty());
    assert_eq!(report.size_after, 200);
    assert_eq!(cache.get_cache_size().unwrap(), 200);
    assert_eq!(ids(&cache), ["a", "d"]);
    assert!(!cache.root().join("b").exists() && !cache.root().join("c").exists());
    common::assert_intact(&cache, "d", &pattern(3, 100)); // now: a d

    let report = cache.prune(100).unwrap();
    assert_eq!(evicted(&report), ["a"]);
    assert_eq!(ids(&cache), ["d"]);
    let report = cache.prune(0).unwrap();
    assert_eq!(evicted(&report), ["d"]);
    assert_eq!(cache.get_cache_size().unwrap(), 0);
    assert_eq!(lru(&cache), None);
}

fn prune_never_deletes_an_open_image(kind: DriverKind) {
    let (_d, cache) = fresh(kind);
    for (i, k) in ["a", "b", "c"].into_iter().enumerate() {
        publish(&cache, k, &pattern(i as u64, 100));
    }
    let mut held = cache.open_for_read(&key("a")).unwrap().unwrap();
    read_image(&cache, "b").unwrap();
    read_image(&cache, "c").unwrap(); // LRU order: a (held open) b c

    let report = cache.prune(150).unwrap();
    assert_eq!(report.skipped_in_use, ["a"]);
    // It walks past the image in use to the next ones.
    assert_eq!(evicted(&report), ["b", "c"]);
    assert_eq!(report.size_after, 100);
    assert!(cache.is_cached(&key("a")).unwrap());
    let mut got = Vec::new();
    held.read_to_end(&mut got).unwrap();
    assert!(got == pattern(0, 100));

    // Same from another thread's reader; and once closed, it goes.
    let (tx, rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let t = {
        let cache = cache.clone();
        std::thread::spawn(move || {
            let r = cache.open_for_read(&key("a")).unwrap().unwrap();
            tx.send(()).unwrap();
            done_rx.recv().unwrap();
            drop(r);
        })
    };
    drop(held);
    rx.recv_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(cache.prune(0).unwrap().skipped_in_use, ["a"]);
    done_tx.send(()).unwrap();
    t.join().unwrap();
    assert_eq!(evicted(&cache.prune(0).unwrap()), ["a"]);
    assert_eq!(cache.get_cache_size().unwrap(), 0);
}

fn prune_never_deletes_a_hard_linked_image(kind: DriverKind) {
    let (d, cache) = fresh(kind);
    publish(&cache, "a", &pattern(1, 100));
    publish(&cache, "b", &pattern(2, 100));
    // A deploy hard-linked the image elsewhere on the same filesystem.
    let deployed = d.path().join("deployed.img");
    fs::hard_link(cache.root().join("a"), &deployed).unwrap();

    let report = cache.prune(0).unwrap();
    assert_eq!(report.skipped_in_use, ["a"]);
    assert_eq!(evicted(&report), ["b"]);
    assert_eq!(report.size_after, 100);
    common::assert_intact(&cache, "a", &pattern(1, 100));
    // clean leaves it be too.
    cache.clean(Duration::ZERO).unwrap();
    assert!(cache.is_cached(&key("a")).unwrap());

    fs::remove_file(&deployed).unwrap();
    assert_eq!(evicted(&cache.prune(0).unwrap()), ["a"]);
    assert!(ids(&cache).is_empty());
}

// ---- properties ---------------------------------------------------------------------------

fn set_prop_round_trip(kind: DriverKind) {
    let (_d, cache) = fresh(kind);
    let k = key("img");
    assert!(matches!(
        cache.set_prop(&k, "origin", "x"),
        Err(StoreError::NotCached(ref s)) if s == "img"
    ));
    publish(&cache, "img", b"data");
    assert!(cache.get_record(&k).unwrap().unwrap().props.is_empty());
    cache
        .set_prop(&k, "origin", "https://example.test/a.qcow2")
        .unwrap();
    cache.set_prop(&k, "etag", "\"abc\"").unwrap();
    cache
        .set_prop(&k, "weird name.with:chars", "ü ∑ \n")
        .unwrap();
    cache
        .set_prop(&k, "origin", "https://example.test/b.qcow2")
        .unwrap();
    let expected: BTreeMap<String, String> = [
        ("etag", "\"abc\""),
        ("origin", "https://example.test/b.qcow2"),
        ("weird name.with:chars", "ü ∑ \n"),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(cache.get_record(&k).unwrap().unwrap().props, expected);
    // Props ride along with reads and listings, and do not disturb the rest of the record.
    let (rec, data) = read_image(&cache, "img").unwrap();
    assert_eq!(rec.props, expected);
    assert_eq!(data, b"data");
    assert_eq!(rec.checksum, Some(sha256(b"data")));
    assert_eq!(cache.get_cached_images().unwrap()[0].props, expected);
}

// ---- instantiation ------------------------------------------------------------------------

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[test] fn $name() { super::$name(imgcache_store::DriverKind::Sqlite) } )*
        }
        mod xattr {
            $( #[test] fn $name() { super::$name(imgcache_store::DriverKind::Xattr) } )*
        }
    };
}

conformance!(
    cache_size_and_cached_images,
    records_survive_reopen,
    is_cached_and_is_cacheable,
    is_being_cached_sees_writer_in_other_thread,
    hit_count_and_image_size,
    image_filepath_for_each_status,
    cache_files_lists_key_files,
    queue_image_refuses_cached_queued_and_being_cached,
    queued_images_in_insertion_order,
    delete_queued_image_and_all,
    delete_cached_image_and_all,
    delete_keeps_bytes_for_open_reader,
    least_recently_accessed_follows_reads,
    open_for_read_counts_hit_and_updates_last_accessed,
    commit_publishes_with_size_and_checksum,
    commit_with_expected_checksum_and_size,
    write_bytes_hashes_in_parallel_and_mixes_with_write,
    commit_notify_reports_verified_before_publishing,
    dropped_writer_publishes_nothing,
    checksum_mismatch_publishes_nothing,
    size_mismatch_publishes_nothing,
    delete_invalid_files_removes_failed_writes,
    delete_stalled_files_respects_age_and_live_writers,
    clean_reports_and_repairs,
    prune_evicts_least_recently_accessed_until_it_fits,
    prune_never_deletes_an_open_image,
    prune_never_deletes_a_hard_linked_image,
    set_prop_round_trip,
);
