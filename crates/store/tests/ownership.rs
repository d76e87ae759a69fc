//! Nothing owned deleted or forgotten: `delete` removes only what the store has a record of,
//! a directory whose records are gone is refused instead of silently started afresh, and
//! `fsck` reports and repairs every way files and records can disagree.

mod common;

use std::fs;
use std::path::Path;
use std::time::{Duration, SystemTime};

use common::{assert_intact, key, pattern, publish, sha256, tempdir};
use imgcache_store::{Cache, Deleted, DriverKind, FsckOptions, FsckReport, Status, StoreError};

const KINDS: [DriverKind; 2] = [DriverKind::Sqlite, DriverKind::Xattr];

fn open(dir: &Path, kind: DriverKind) -> Cache {
    Cache::open(dir, kind).unwrap_or_else(|e| panic!("{kind} cache at {}: {e}", dir.display()))
}

fn fsck(cache: &Cache, repair: bool) -> FsckReport {
    cache
        .fsck(&FsckOptions {
            repair,
            stall_time: Duration::from_secs(3600),
            ..FsckOptions::default()
        })
        .unwrap()
}

/// Sets a file's modification time `age` in the past.
fn age(path: &Path, age: Duration) {
    let f = fs::File::options().write(true).open(path).unwrap();
    f.set_modified(SystemTime::now() - age).unwrap();
}

#[test]
fn delete_refuses_a_file_without_a_record_and_leaves_it_alone() {
    for kind in KINDS {
        let tmp = tempdir();
        let root = tmp.path().join("cache");
        let cache = open(&root, kind);
        publish(&cache, "mine", b"published");
        fs::write(root.join("f"), b"the operator's file").unwrap();

        match cache.delete_image(&key("f")) {
            Err(StoreError::NotOwned { path }) => assert_eq!(path, root.join("f")),
            other => panic!("{kind}: expected NotOwned, got {other:?}"),
        }
        let msg = cache
            .delete_cached_image(&key("f"))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("is not a cached image (no record): left alone")
                && msg.contains("imgcache fsck --repair"),
            "{kind}: {msg}"
        );
        assert_eq!(fs::read(root.join("f")).unwrap(), b"the operator's file");

        // A symlink planted at a key's path is not the store's either (nor is its target).
        std::os::unix::fs::symlink(root.join("mine"), root.join("link")).unwrap();
        assert!(matches!(
            cache.delete_image(&key("link")),
            Err(StoreError::NotOwned { .. })
        ));
        assert!(root.join("link").symlink_metadata().is_ok());

        // clear deletes what it owns only.
        assert_eq!(cache.delete_all_cached_images().unwrap(), 1, "{kind}");
        assert!(!root.join("mine").exists());
        assert_eq!(fs::read(root.join("f")).unwrap(), b"the operator's file");
        assert_eq!(
            cache.delete_image(&key("nothing")).unwrap(),
            Deleted::Nothing
        );
    }
}

#[test]
fn delete_of_an_image_and_of_a_record_without_its_file() {
    let tmp = tempdir();
    let root = tmp.path().join("cache");
    let cache = open(&root, DriverKind::Sqlite);
    publish(&cache, "a", b"aaa");
    publish(&cache, "b", b"bbb");
    assert_eq!(cache.delete_image(&key("a")).unwrap(), Deleted::Image);
    assert!(!root.join("a").exists());
    assert!(cache.driver().get(&key("a")).unwrap().is_none());
    // The file vanished behind the store's back: the record goes, and that is what is said.
    fs::remove_file(root.join("b")).unwrap();
    assert_eq!(cache.delete_image(&key("b")).unwrap(), Deleted::RecordOnly);
    assert!(cache.driver().get(&key("b")).unwrap().is_none());
    assert_eq!(cache.get_cache_size().unwrap(), 0);
}

#[test]
fn lost_database_with_images_is_refused_and_nothing_is_touched() {
    type Damage = fn(&Path);
    let cases: [(&str, Damage); 4] = [
        ("missing", |db| remove_db(db)),
        ("empty (0 bytes)", |db| {
            remove_db(db);
            fs::write(db, b"").unwrap();
        }),
        ("unreadable", |db| {
            remove_db(db);
            fs::write(db, vec![0x5a; 8192]).unwrap();
        }),
        ("unreadable", |db| {
            // A database whose first page is gone.
            let mut bytes = fs::read(db).unwrap();
            bytes[..100].fill(0);
            fs::write(db, bytes).unwrap();
        }),
    ];
    for (state, damage) in cases {
        let tmp = tempdir();
        let root = tmp.path().join("cache");
        let db = root.join(".imgcache.sqlite");
        {
            let cache = open(&root, DriverKind::Sqlite);
            for k in ["a", "b", "c"] {
                publish(&cache, k, &pattern(1, 1000));
            }
        }
        checkpoint(&db);
        damage(&db);
        let before = fs::read(&db).ok();
        match Cache::open(&root, DriverKind::Sqlite) {
            Err(e @ StoreError::MetadataLost { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains(state), "{state}: {msg}");
                assert!(msg.contains("holds 3 image file(s)"), "{msg}");
                assert!(msg.contains("imgcache fsck --repair"), "{msg}");
            }
            Err(e) => panic!("{state}: expected MetadataLost, got {e}"),
            Ok(_) => panic!("{state}: opened a cache whose records are gone"),
        }
        assert_eq!(fs::read(&db).ok(), before, "{state}: database changed");
        for k in ["a", "b", "c"] {
            assert_eq!(fs::read(root.join(k)).unwrap(), pattern(1, 1000));
        }

        // fsck without repair reports every image as a file without a record, changing nothing.
        let (cache, prelude) = Cache::open_for_fsck(&root, DriverKind::Sqlite, false).unwrap();
        assert!(prelude.database.unwrap().state.starts_with(state));
        let r = fsck(&cache, false);
        assert_eq!(r.files_without_records.len(), 3, "{state}: {r:?}");
        assert!(r.files_without_records.iter().all(|o| o.action == "adopt"));
        assert_eq!(
            fs::read(&db).ok(),
            before,
            "{state}: fsck changed the database"
        );
        drop(cache);

        // Repaired: records rebuilt from the files, with their sha256 and size.
        let (cache, prelude) = Cache::open_for_fsck(&root, DriverKind::Sqlite, true).unwrap();
        let db_issue = prelude.database.unwrap();
        assert_eq!(
            db_issue.moved_to.is_some(),
            state == "unreadable",
            "{db_issue:?}"
        );
        let r = fsck(&cache, true);
        assert!(
            r.files_without_records
                .iter()
                .all(|o| o.action == "adopted"),
            "{r:?}"
        );
        drop(cache);
        let cache = open(&root, DriverKind::Sqlite);
        for k in ["a", "b", "c"] {
            assert_intact(&cache, k, &pattern(1, 1000));
        }
        assert_eq!(cache.get_cache_size().unwrap(), 3000);
    }
}

fn remove_db(db: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let _ = fs::remove_file(format!("{}{suffix}", db.display()));
    }
}

/// Folds the WAL into the database file, so damage to the file is damage to the records.
fn checkpoint(db: &Path) {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    conn.pragma_update(None, "journal_mode", "DELETE").unwrap();
}

#[test]
fn new_and_empty_directories_still_initialise() {
    let tmp = tempdir();
    // A new directory.
    let cache = open(&tmp.path().join("new"), DriverKind::Sqlite);
    publish(&cache, "a", b"a");
    // An existing empty directory, and one with only an empty database file in it.
    fs::create_dir(tmp.path().join("empty")).unwrap();
    open(&tmp.path().join("empty"), DriverKind::Sqlite);
    fs::create_dir(tmp.path().join("emptydb")).unwrap();
    fs::write(tmp.path().join("emptydb/.imgcache.sqlite"), b"").unwrap();
    let c = open(&tmp.path().join("emptydb"), DriverKind::Sqlite);
    publish(&c, "b", b"b");
    assert_intact(&c, "b", b"b");
}

#[test]
fn a_lost_marker_does_not_make_the_other_driver_forget_the_images() {
    // An xattr cache whose marker is gone, opened as sqlite (the default).
    let tmp = tempdir();
    let root = tmp.path().join("x");
    publish(&open(&root, DriverKind::Xattr), "a", b"aaa");
    fs::remove_file(root.join(".imgcache-driver")).unwrap();
    match Cache::open(&root, DriverKind::Sqlite) {
        Err(
            e @ StoreError::DriverMismatch {
                actual: "xattr", ..
            },
        ) => {
            let msg = e.to_string();
            assert!(msg.contains("carry xattr records"), "{msg}");
            assert!(msg.contains("--driver xattr fsck --repair"), "{msg}");
        }
        other => panic!("expected DriverMismatch, got {other:?}"),
    }
    assert!(
        !root.join(".imgcache.sqlite").exists(),
        "no database was started"
    );
    // fsck with the wrong driver says which one; with the right one it rewrites the marker.
    assert!(matches!(
        Cache::open_for_fsck(&root, DriverKind::Sqlite, true),
        Err(StoreError::DriverMismatch {
            actual: "xattr",
            ..
        })
    ));
    let (cache, prelude) = Cache::open_for_fsck(&root, DriverKind::Xattr, false).unwrap();
    let m = prelude.driver_marker.unwrap();
    assert_eq!((m.found, m.records_in, m.fixed), (None, "xattr", false));
    drop(cache);
    assert!(
        !root.join(".imgcache-driver").exists(),
        "fsck without repair wrote it"
    );
    let (_, prelude) = Cache::open_for_fsck(&root, DriverKind::Xattr, true).unwrap();
    assert!(prelude.driver_marker.unwrap().fixed);
    assert_eq!(
        fs::read_to_string(root.join(".imgcache-driver")).unwrap(),
        "xattr\n"
    );
    assert_intact(&open(&root, DriverKind::Xattr), "a", b"aaa");

    // A sqlite cache whose marker is gone, opened as xattr.
    let root = tmp.path().join("s");
    publish(&open(&root, DriverKind::Sqlite), "a", b"aaa");
    fs::remove_file(root.join(".imgcache-driver")).unwrap();
    assert!(matches!(
        Cache::open(&root, DriverKind::Xattr),
        Err(StoreError::DriverMismatch {
            actual: "sqlite",
            ..
        })
    ));
    // A marker that says the other driver.
    fs::write(root.join(".imgcache-driver"), "xattr\n").unwrap();
    let (_, prelude) = Cache::open_for_fsck(&root, DriverKind::Sqlite, true).unwrap();
    let m = prelude.driver_marker.unwrap();
    assert_eq!(m.found.as_deref(), Some("xattr"));
    assert_intact(&open(&root, DriverKind::Sqlite), "a", b"aaa");
}

#[test]
fn fsck_reports_then_repairs_every_kind_of_disagreement() {
    for kind in KINDS {
        let tmp = tempdir();
        let root = tmp.path().join("cache");
        let cache = open(&root, kind);
        publish(&cache, "good", b"good bytes");
        publish(&cache, "gone", b"gone bytes");
        fs::remove_file(root.join("gone")).unwrap();
        fs::write(root.join("foreign"), b"adopt me").unwrap();
        fs::write(root.join("unsafe"), b"refused by the check").unwrap();
        fs::write(root.join("incomplete/stale"), b"half").unwrap();
        age(&root.join("incomplete/stale"), Duration::from_secs(7200));
        fs::write(root.join("incomplete/fresh"), b"being written").unwrap();
        fs::write(root.join("incomplete/held"), b"slow writer").unwrap();
        age(&root.join("incomplete/held"), Duration::from_secs(7200));
        let writer = cache.lock_key(&key("held")).unwrap();
        fs::write(root.join("locks/nothing.lock"), b"").unwrap();
        let validate = |p: &Path| match p.file_name().unwrap().to_str() {
            Some("unsafe") => Err("unsafe image: test says so".to_string()),
            _ => Ok(()),
        };
        let run = |repair| {
            cache
                .fsck(&FsckOptions {
                    repair,
                    stall_time: Duration::from_secs(3600),
                    validate: Some(&validate),
                    ..FsckOptions::default()
                })
                .unwrap()
        };

        let r = run(false);
        if kind == DriverKind::Sqlite {
            assert_eq!(r.records_without_files, ["gone"], "{kind}");
        }
        let orphans: Vec<_> = r
            .files_without_records
            .iter()
            .map(|o| (o.image_id.as_str(), o.action))
            .collect();
        assert_eq!(
            orphans,
            [("foreign", "adopt"), ("unsafe", "move_aside")],
            "{kind}"
        );
        assert_eq!(r.stale_incomplete, ["stale"], "{kind}");
        // "gone" has nothing left either: its publish's lock file is unused.
        assert_eq!(r.stale_locks, ["gone", "nothing"], "{kind}");
        assert_eq!(r.images, 1);
        // Nothing changed.
        assert!(root.join("incomplete/stale").exists());
        assert!(root.join("locks/nothing.lock").exists());
        assert!(root.join("unsafe").exists());
        assert!(!cache.is_cached(&key("foreign")).unwrap());

        let r = run(true);
        assert!(r.repaired);
        let foreign = &r.files_without_records[0];
        assert_eq!(foreign.action, "adopted");
        assert_eq!(
            foreign.checksum.as_deref(),
            Some(sha256(b"adopt me").to_string().as_str())
        );
        assert_eq!(r.files_without_records[1].action, "moved_aside");
        assert_eq!(
            fs::read(cache.get_image_filepath(&key("unsafe"), Status::Invalid)).unwrap(),
            b"refused by the check"
        );
        assert!(!root.join("unsafe").exists());
        assert!(!root.join("incomplete/stale").exists());
        assert!(
            root.join("incomplete/fresh").exists(),
            "younger than the stall time"
        );
        assert!(root.join("incomplete/held").exists(), "its writer is alive");
        assert!(!root.join("locks/nothing.lock").exists());
        assert_intact(&cache, "foreign", b"adopt me");
        assert_intact(&cache, "good", b"good bytes");
        assert_eq!(
            cache.get_cache_size().unwrap(),
            (b"adopt me".len() + b"good bytes".len()) as u64
        );

        // Its writer gone, the old write is stale too; nothing else is left.
        drop(writer);
        let r = run(false);
        assert_eq!(r.stale_incomplete, ["held"], "{kind}");
        assert_eq!(r.problems(), 1, "{kind}: {r:?}");
    }
}

#[test]
fn quick_fsck_reads_no_image_and_changes_nothing() {
    let tmp = tempdir();
    let root = tmp.path().join("cache");
    let cache = open(&root, DriverKind::Sqlite);
    publish(&cache, "gone", b"x");
    fs::remove_file(root.join("gone")).unwrap();
    fs::write(root.join("foreign"), b"y").unwrap();
    fs::write(root.join("incomplete/stale"), b"half").unwrap();
    age(&root.join("incomplete/stale"), Duration::from_secs(7200));
    let r = cache
        .fsck(&FsckOptions {
            quick: true,
            stall_time: Duration::from_secs(3600),
            ..FsckOptions::default()
        })
        .unwrap();
    assert_eq!(r.records_without_files, ["gone"]);
    assert_eq!(r.files_without_records[0].action, "unchecked");
    assert_eq!(r.stale_incomplete, ["stale"]);
    assert_eq!(r.stale_locks, ["gone"]);
    assert_eq!(r.problems(), 4);
    assert!(root.join("locks/gone.lock").exists());
    assert!(cache.driver().get(&key("gone")).unwrap().is_some());
    assert!(root.join("incomplete/stale").exists());
}
