//! http(s) happy paths: download, hit, revalidation by conditional GET, replacement of a stale
//! master, and origins without validators.

mod common;

use std::time::Duration;

use common::*;
use imgcache_fetch::{FetchOptions, ImageCache, Outcome, Placement, SourceConfig};
use imgcache_store::{Algorithm, Integrity};
use imgcache_testkit::faults::{Counts, FaultOrigin, File};

fn opts() -> FetchOptions {
    FetchOptions::default()
}

fn revalidate_always() -> SourceConfig {
    SourceConfig {
        revalidate_interval: Duration::ZERO,
        ..sources()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn miss_downloads_and_hard_links_then_hit_asks_nothing() {
    let origin = FaultOrigin::start();
    let body = image_bytes(3 * MIB + 17, 1);
    origin.put("/img/a.raw", File::bare(body.clone()).etag(Some("v1")));
    let env = Env::new();
    let href = origin.at("/img/a.raw");
    let key = key_of(&href, false);

    let d1 = env.dest("d1");
    let r = env.ic.fetch_image(&href, &d1, &opts()).await.unwrap();
    assert_eq!(r.outcome, Outcome::Downloaded);
    assert_eq!(r.placement, Placement::HardLinked);
    assert_eq!(r.key, key.as_str());
    assert_eq!(r.size, body.len() as u64);
    assert_eq!(r.checksum, Some(Integrity::of(Algorithm::Sha256, &body)));
    assert_eq!(r.master, env.master(&key));
    assert_linked(&env.master(&key), &d1, &body);
    assert_eq!(inode(&d1).2, 2, "master + one dest");
    assert_eq!(
        origin.counts("/img/a.raw"),
        Counts {
            get: 1,
            conditional: 0,
            not_modified: 0
        }
    );
    assert!(env.cache().is_cached(&key).unwrap());
    assert!(!env.cache().is_being_cached(&key).unwrap());

    // Inside the revalidation interval: no request at all, just another link.
    let d2 = env.dest("d2");
    let r = env.ic.fetch_image(&href, &d2, &opts()).await.unwrap();
    assert_eq!(r.outcome, Outcome::Hit);
    assert_eq!(r.placement, Placement::HardLinked);
    assert_linked(&env.master(&key), &d2, &body);
    assert_eq!(inode(&d2).2, 3);

    // dest already is the master: nothing to do.
    let r = env.ic.fetch_image(&href, &d1, &opts()).await.unwrap();
    assert_eq!(
        (r.outcome, r.placement),
        (Outcome::Hit, Placement::AlreadyInPlace)
    );
    assert_eq!(origin.all_requests(), 1, "hits must not reach the origin");
    assert_eq!(
        env.cache().get_hit_count(&key).unwrap(),
        2,
        "two hits; the download that published the master is not one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_interval_one_conditional_get_and_304_revalidates() {
    let origin = FaultOrigin::start();
    let a = image_bytes(2 * MIB, 2);
    let b = image_bytes(2 * MIB, 3);
    origin.put("/etag.img", File::bare(a.clone()).etag(Some("e1")));
    origin.put(
        "/lm.img",
        File::bare(b.clone()).last_modified(Some("Wed, 01 May 2024 10:00:00 GMT")),
    );
    let env = Env::with(revalidate_always());
    for (path, body) in [("/etag.img", &a), ("/lm.img", &b)] {
        let href = origin.at(path);
        let key = key_of(&href, false);
        let d1 = env.dest(&format!("{}-1", &path[1..]));
        let r = env.ic.fetch_image(&href, &d1, &opts()).await.unwrap();
        assert_eq!(r.outcome, Outcome::Downloaded);
        let master_ino = inode(&env.master(&key)).1;

        let d2 = env.dest(&format!("{}-2", &path[1..]));
        let r = env.ic.fetch_image(&href, &d2, &opts()).await.unwrap();
        assert_eq!(r.outcome, Outcome::Revalidated, "{path}");
        assert_eq!(
            origin.counts(path),
            Counts {
                get: 1,
                conditional: 1,
                not_modified: 1
            },
            "{path}"
        );
        assert_eq!(inode(&env.master(&key)).1, master_ino, "not re-downloaded");
        assert_linked(&env.master(&key), &d2, body);
        assert_linked(&env.master(&key), &d1, body);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_origin_replaces_master_and_dest() {
    let origin = FaultOrigin::start();
    let v1 = image_bytes(2 * MIB, 4);
    let v2 = image_bytes(3 * MIB, 5);
    origin.put("/x.img", File::bare(v1.clone()).etag(Some("v1")));
    let env = Env::with(revalidate_always());
    let href = origin.at("/x.img");
    let key = key_of(&href, false);
    let dest = env.dest("node-1");
    let other = env.dest("node-2");
    env.ic.fetch_image(&href, &dest, &opts()).await.unwrap();
    env.ic.fetch_image(&href, &other, &opts()).await.unwrap();
    let old_ino = inode(&env.master(&key)).1;

    origin.put("/x.img", File::bare(v2.clone()).etag(Some("v2")));
    let r = env.ic.fetch_image(&href, &dest, &opts()).await.unwrap();
    assert_eq!(r.outcome, Outcome::Downloaded);
    assert_eq!(r.size, v2.len() as u64);
    let c = origin.counts("/x.img");
    assert_eq!((c.get, c.conditional, c.not_modified), (1, 2, 1));
    assert_ne!(inode(&env.master(&key)).1, old_ino, "master replaced");
    assert_linked(&env.master(&key), &dest, &v2);
    assert_eq!(inode(&dest).2, 2, "new master linked only into dest");
    // A deploy still using the old master keeps its bytes intact (replaced by rename, not
    // rewritten in place).
    assert_eq!(std::fs::read(&other).unwrap(), v1);
    assert_eq!(inode(&other).1, old_ino);
    let rec = env.cache().get_record(&key).unwrap().unwrap();
    assert_eq!(rec.props.get("etag").map(String::as_str), Some("\"v2\""));
    assert_eq!(rec.checksum, Some(Integrity::of(Algorithm::Sha256, &v2)));

    // And the new master now revalidates against the new ETag.
    let r = env.ic.fetch_image(&href, &dest, &opts()).await.unwrap();
    assert_eq!(
        (r.outcome, r.placement),
        (Outcome::Revalidated, Placement::AlreadyInPlace)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_without_validators_is_not_redownloaded_within_the_interval() {
    let origin = FaultOrigin::start();
    let body = image_bytes(MIB, 6);
    origin.put("/plain.img", File::bare(body.clone()));
    let env = Env::new(); // interval: one hour
    let href = origin.at("/plain.img");
    let key = key_of(&href, false);
    for i in 0..4 {
        let r = env
            .ic
            .fetch_image(&href, &env.dest(&format!("d{i}")), &opts())
            .await
            .unwrap();
        let want = if i == 0 {
            Outcome::Downloaded
        } else {
            Outcome::Hit
        };
        assert_eq!(r.outcome, want);
    }
    assert_eq!(origin.counts("/plain.img").total(), 1);

    // Past the interval there is nothing to revalidate with: one plain GET, a new master.
    let stale = ImageCache::new(env.spec.clone(), &revalidate_always()).unwrap();
    let r = stale
        .fetch_image(&href, &env.dest("late"), &opts())
        .await
        .unwrap();
    assert_eq!(r.outcome, Outcome::Downloaded);
    assert_eq!(
        origin.counts("/plain.img"),
        Counts {
            get: 2,
            conditional: 0,
            not_modified: 0
        }
    );
    assert_linked(&env.master(&key), &env.dest("late"), &body);
}

/// The cache on one filesystem (a tmpfs), `dest` on another: a copy, never a failure, and the
/// master stays unlinked (nlink 1) because the deploy holds a copy, not a link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dest_on_another_filesystem_is_copied() {
    let fs = Tmpfs::mount("32m");
    let origin = FaultOrigin::start();
    let body = image_bytes(3 * MIB, 9);
    origin.put("/far.img", File::bare(body.clone()).etag(Some("f")));
    let env = Env::at(Some(fs.path.join("cache")), sources());
    let href = origin.at("/far.img");
    let key = key_of(&href, false);
    let dest = env.dest("far");
    let r = env.ic.fetch_image(&href, &dest, &opts()).await.unwrap();
    assert_eq!(
        (r.outcome, r.placement),
        (Outcome::Downloaded, Placement::Copied)
    );
    assert_eq!(std::fs::read(&dest).unwrap(), body);
    let (mdev, mino, mlinks) = inode(&env.master(&key));
    let (ddev, dino, dlinks) = inode(&dest);
    assert_ne!((mdev, mino), (ddev, dino));
    assert_eq!((mlinks, dlinks), (1, 1));
    let leftovers: Vec<_> = std::fs::read_dir(&env.dests)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "only dest itself: {leftovers:?}");

    // A hit copies again into a fresh dest, without asking the origin.
    let r = env
        .ic
        .fetch_image(&href, &env.dest("far2"), &opts())
        .await
        .unwrap();
    assert_eq!((r.outcome, r.placement), (Outcome::Hit, Placement::Copied));
    assert_eq!(std::fs::read(env.dest("far2")).unwrap(), body);
    assert_eq!(origin.all_requests(), 1);
    drop(env);
}
