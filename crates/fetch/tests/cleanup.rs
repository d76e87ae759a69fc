//! Clean-up: TTL then LRU to the size cap, `clean_up(amount)`, never a linked master nor a
//! foreign file; priority clean-up across the caches on one filesystem; and `force_raw`.

mod common;

use std::io::Write;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use imgcache_fetch::{FetchError, FetchOptions, ImageCache, Outcome};
use imgcache_store::record::now;
use imgcache_store::registry::free_space;
use imgcache_store::{Cache, CacheSpec, Key, Registry, Status, StoreError};
use imgcache_testkit::faults::{FaultOrigin, File};

const H: u64 = 3600;

/// Publishes `len` bytes under `name` and makes its last access `ago` in the past.
fn publish(cache: &Cache, name: &str, len: usize, ago: Duration) -> Key {
    let key = Key::new(name).unwrap();
    let mut w = cache.open_for_write(&key).unwrap().expect("not cached yet");
    w.write_all(&image_bytes(len, name.len() as u64 + len as u64))
        .unwrap();
    w.commit().unwrap();
    let f = std::fs::File::open(cache.get_image_filepath(&key, Status::Active)).unwrap();
    cache
        .driver()
        .record_hit(&key, &f, now() - ago.as_secs_f64())
        .unwrap()
        .unwrap();
    key
}

fn ago(secs: u64) -> Duration {
    Duration::from_secs(secs)
}

fn names(v: &[(String, u64)]) -> Vec<&str> {
    v.iter().map(|(k, _)| k.as_str()).collect()
}

fn cached(cache: &Cache) -> Vec<String> {
    let mut v: Vec<_> = cache
        .get_cached_images()
        .unwrap()
        .into_iter()
        .map(|r| r.image_id)
        .collect();
    v.sort();
    v
}

#[test]
fn ttl_first_then_lru_to_the_cap_never_linked_never_foreign() {
    let tmp = tempfile::tempdir().unwrap();
    let mut spec = spec_at(&tmp.path().join("cache"), "instance", 50);
    spec.max_size = 3 * MIB as u64;
    spec.ttl = Duration::from_secs(H);
    let cache = spec.cache.clone();
    let m = MIB;
    let linked = publish(&cache, "linked-old", m, ago(4 * H));
    publish(&cache, "old1", m, ago(3 * H));
    publish(&cache, "old2", m, ago(2 * H));
    publish(&cache, "a", m, ago(1800));
    publish(&cache, "b", m, ago(1200));
    publish(&cache, "c", m, ago(600));
    publish(&cache, "d", m, ago(300));
    // A deploy holds linked-old (nlink 2).
    let deploy = tmp.path().join("deploy.img");
    std::fs::hard_link(cache.get_image_filepath(&linked, Status::Active), &deploy).unwrap();
    // An operator's file, key-shaped, old, alone (nlink 1), with no record: not ours.
    let foreign = tmp.path().join("cache").join("operator-file.img");
    std::fs::write(&foreign, image_bytes(m, 1)).unwrap();
    let old = std::time::SystemTime::now() - Duration::from_secs(30 * 24 * H);
    std::fs::File::options()
        .write(true)
        .open(&foreign)
        .unwrap()
        .set_modified(old)
        .unwrap();
    // A leftover of a failed download.
    std::fs::write(
        cache.get_image_filepath(&Key::new("broken").unwrap(), Status::Invalid),
        b"x",
    )
    .unwrap();

    let report = spec.clean_up(None).unwrap();
    // Expired ones first (oldest first), then LRU until 3 MiB; linked-old is skipped.
    assert_eq!(names(&report.evicted.evicted), ["old1", "old2", "a", "b"]);
    assert_eq!(report.evicted.skipped_in_use, ["linked-old"]);
    assert_eq!(report.evicted.size_after, 3 * m as u64);
    assert_eq!(report.leftovers, ["broken"]);
    assert_eq!(cached(&cache), ["c", "d", "linked-old"]);
    assert!(foreign.exists(), "a foreign file is never deleted");
    assert_eq!(std::fs::read(&deploy).unwrap().len(), m);
    assert_eq!(inode(&deploy).2, 2);

    // Under the cap and nothing expired (linked-old is, but in use): nothing more goes.
    let report = spec.clean_up(None).unwrap();
    assert!(report.evicted.evicted.is_empty(), "{report:?}");
    // Once the deploy lets go, the expired master goes.
    std::fs::remove_file(&deploy).unwrap();
    let report = spec.clean_up(None).unwrap();
    assert_eq!(names(&report.evicted.evicted), ["linked-old"]);
    assert!(foreign.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_up_amount_stops_once_reclaimed() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = spec_at(&tmp.path().join("cache"), "instance", 50);
    let cache = spec.cache.clone();
    for (i, name) in ["k1", "k2", "k3", "k4"].iter().enumerate() {
        publish(&cache, name, MIB, ago(1000 - i as u64 * 100));
    }
    let report = spec.clean_up(Some(MIB as u64 + MIB as u64 / 2)).unwrap();
    assert_eq!(names(&report.evicted.evicted), ["k1", "k2"]);
    assert_eq!(report.evicted.still_needed, 0);
    assert_eq!(cached(&cache), ["k3", "k4"]);

    // Through ImageCache: asking for more than can go returns what is still missing, and a
    // linked master stays.
    let deploy = tmp.path().join("deploy");
    std::fs::hard_link(
        cache.get_image_filepath(&Key::new("k4").unwrap(), Status::Active),
        &deploy,
    )
    .unwrap();
    let ic = ImageCache::new(spec.clone(), &sources()).unwrap();
    let left = ic.clean_up(Some(10 * MIB as u64)).await.unwrap();
    assert_eq!(left, 9 * MIB as u64);
    assert_eq!(cached(&cache), ["k4"]);
}

#[test]
fn clean_up_caches_by_priority_on_one_filesystem() {
    let fs = Tmpfs::mount("24m");
    let far_dir = tempfile::tempdir().unwrap(); // on the disk, not the tmpfs
    let iso = spec_at(&fs.path.join("iso"), "iso", 75);
    let instance = spec_at(&fs.path.join("instance"), "instance", 50);
    let tftp = spec_at(&fs.path.join("tftp"), "tftp", 25);
    let far = spec_at(far_dir.path(), "far", 100);
    for (i, n) in ["iso1", "iso2"].iter().enumerate() {
        publish(&iso.cache, n, MIB, ago(500 - i as u64));
    }
    for (i, n) in ["in1", "in2", "in3", "in4"].iter().enumerate() {
        publish(&instance.cache, n, MIB, ago(400 - i as u64 * 10));
    }
    publish(&tftp.cache, "tftp1", MIB, ago(9000));
    publish(&far.cache, "far1", MIB, ago(99_000));
    publish(&far.cache, "far2", MIB, ago(99_000));
    // A master linked into a deploy on the same tmpfs: never deleted.
    let deploys = fs.path.join("deploys");
    std::fs::create_dir(&deploys).unwrap();
    let pinned = publish(&instance.cache, "in0-pinned", MIB, ago(100_000));
    std::fs::hard_link(
        instance.cache.get_image_filepath(&pinned, Status::Active),
        deploys.join("node"),
    )
    .unwrap();

    let mut registry = Registry::new();
    for s in [&tftp, &instance, &far, &iso] {
        registry.register(s.clone());
    }

    // Already enough: nothing cleaned.
    let free = free_space(&deploys).unwrap();
    assert!(
        registry
            .clean_up_caches(&deploys, free / 2)
            .unwrap()
            .is_empty()
    );

    // 3.5 MiB short: iso (75) gives its 2 MiB, then instance (50) is asked only for the
    // ~1.5 MiB still missing and gives its two least recently used; tftp is not needed and
    // far (100, another filesystem) is never touched.
    let required = free + 3 * MIB as u64 + MIB as u64 / 2;
    let reports = registry.clean_up_caches(&deploys, required).unwrap();
    let order: Vec<_> = reports.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(order, ["iso", "instance"]);
    assert_eq!(names(&reports[0].evicted.evicted), ["iso1", "iso2"]);
    assert_eq!(names(&reports[1].evicted.evicted), ["in1", "in2"]);
    assert_eq!(reports[1].evicted.skipped_in_use, ["in0-pinned"]);
    assert!(free_space(&deploys).unwrap() >= required);
    assert_eq!(cached(&instance.cache), ["in0-pinned", "in3", "in4"]);
    assert_eq!(cached(&tftp.cache), ["tftp1"]);
    assert_eq!(cached(&far.cache), ["far1", "far2"]);

    // Far more than the filesystem could ever free: refused at once, and nothing is evicted
    // (emptying the caches for a download that fails anyway would cost every deploy its hit).
    let required = free_space(&deploys).unwrap() + 100 * MIB as u64;
    let err = registry.clean_up_caches(&deploys, required).unwrap_err();
    match &err {
        StoreError::InsufficientDiskSpace {
            path,
            required: r,
            available,
        } => {
            assert_eq!(path, &deploys);
            assert_eq!(*r, required);
            assert_eq!(*available, free_space(&deploys).unwrap());
            assert!(*available < required);
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains(&required.to_string()), "{err}");
    assert_eq!(cached(&instance.cache), ["in0-pinned", "in3", "in4"]);
    assert_eq!(cached(&tftp.cache), ["tftp1"]);
    assert_eq!(
        cached(&far.cache),
        ["far1", "far2"],
        "other filesystem untouched"
    );
    assert!(deploys.join("node").exists());
    drop((iso, instance, tftp, registry));
}

/// With a registry, a download that cannot fit even after cleaning every cache on the
/// filesystem fails up front with InsufficientDiskSpace, before a byte is written, and
/// without evicting anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_with_registry_refuses_what_cannot_fit() {
    let fs = Tmpfs::mount("8m");
    let origin = FaultOrigin::start();
    origin.put("/huge.img", File::bare(image_bytes(16 * MIB, 60)));
    let env = Env::at(Some(fs.path.join("cache")), sources());
    publish(env.cache(), "evictable", MIB, ago(10));
    let mut registry = Registry::new();
    registry.register(env.spec.clone());
    let ic = ImageCache::new(env.spec.clone(), &sources())
        .unwrap()
        .with_registry(Arc::new(registry));
    let href = origin.at("/huge.img");
    let dest = env.dest("huge");
    let err = expect_err(ic.fetch_image(&href, &dest, &FetchOptions::default()).await);
    assert!(
        matches!(
            err,
            FetchError::Store(StoreError::InsufficientDiskSpace { required, .. })
                if required == 16 * MIB as u64
        ),
        "{err:?}"
    );
    assert_failed_cleanly(&env, &key_of(&href, false), &dest);
    assert_eq!(
        cached(env.cache()),
        ["evictable"],
        "a download that can never fit evicts nothing"
    );
    drop(ic);
    drop(env);
}

/// `force_raw`: a raw image is keyed `<uuid5>.converted` and published as it is; a qcow2 is
/// converted by qemu-img into the same bytes `qemu-img convert -O raw` makes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_raw_keys_converted_and_converts_qcow2() {
    let origin = FaultOrigin::start();
    let env = Env::new();
    let raw = image_bytes(2 * MIB, 70);
    origin.put("/disk.raw", File::bare(raw.clone()));
    let href = origin.at("/disk.raw");
    let raw_opts = FetchOptions {
        force_raw: true,
        ..FetchOptions::default()
    };
    let dest = env.dest("raw");
    let r = env.ic.fetch_image(&href, &dest, &raw_opts).await.unwrap();
    assert_eq!(r.outcome, Outcome::Downloaded);
    let key = key_of(&href, true);
    assert_eq!(r.key, key.as_str());
    assert!(r.key.ends_with(".converted"), "{}", r.key);
    assert_eq!(
        r.key.trim_end_matches(".converted"),
        key_of(&href, false).as_str()
    );
    assert_linked(&env.master(&key), &dest, &raw);
    assert!(!env.cache().is_cached(&key_of(&href, false)).unwrap());

    let qcow = tempfile::tempdir().unwrap();
    let qpath = qcow.path().join("disk.qcow2");
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&qpath)
        .arg("1M")
        .output()
        .expect("qemu-img");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let qbytes = std::fs::read(&qpath).unwrap();
    assert_eq!(&qbytes[..4], b"QFI\xfb");
    origin.put("/disk.qcow2", File::bare(qbytes.clone()));
    let href = origin.at("/disk.qcow2");
    let key = key_of(&href, true);
    let dest = env.dest("qcow");
    let r = env.ic.fetch_image(&href, &dest, &raw_opts).await.unwrap();
    assert_eq!(r.outcome, Outcome::Downloaded);
    assert_eq!(r.key, key.as_str());
    let expected_path = qcow.path().join("expected.raw");
    let out = Command::new("qemu-img")
        .args(["convert", "-q", "-f", "qcow2", "-O", "raw"])
        .arg(&qpath)
        .arg(&expected_path)
        .output()
        .expect("qemu-img");
    assert!(out.status.success());
    let expected = std::fs::read(&expected_path).unwrap();
    assert_eq!(expected.len(), MIB);
    assert_linked(&env.master(&key), &dest, &expected);
    assert_eq!(invalid_len(&env, &key), None);
    // Without force_raw the same qcow2 is cached as it is.
    let r = env
        .ic
        .fetch_image(&href, &env.dest("qcow-as-is"), &FetchOptions::default())
        .await
        .unwrap();
    assert_linked(
        &env.master(&key_of(&href, false)),
        &env.dest("qcow-as-is"),
        &qbytes,
    );
    assert_eq!(r.outcome, Outcome::Downloaded);
}

/// Every download ends with the cache's clean-up: over the cap, the least recently used
/// unlinked master goes, while the one just fetched (linked into its dest) stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_runs_the_clean_up() {
    let origin = FaultOrigin::start();
    let tmp = tempfile::tempdir().unwrap();
    let mut spec: CacheSpec = spec_at(&tmp.path().join("cache"), "instance", 50);
    spec.max_size = 2 * MIB as u64 + MIB as u64 / 2;
    let ic = ImageCache::new(spec.clone(), &sources()).unwrap();
    let dests = tmp.path().join("dests");
    std::fs::create_dir(&dests).unwrap();
    let mut keys = Vec::new();
    for i in 0..3u64 {
        let path = format!("/img{i}");
        origin.put(&path, File::bare(image_bytes(MIB, 80 + i)));
        let href = origin.at(&path);
        let dest = dests.join(format!("d{i}"));
        ic.fetch_image(&href, &dest, &FetchOptions::default())
            .await
            .unwrap();
        std::fs::remove_file(&dest).unwrap(); // the deploy is done with it
        keys.push(key_of(&href, false));
        std::thread::sleep(Duration::from_millis(20)); // distinct access times
    }
    assert!(
        !spec.cache.is_cached(&keys[0]).unwrap(),
        "LRU master evicted"
    );
    assert!(spec.cache.is_cached(&keys[1]).unwrap());
    assert!(spec.cache.is_cached(&keys[2]).unwrap());
    assert!(spec.cache.get_cache_size().unwrap() <= spec.max_size);
}
