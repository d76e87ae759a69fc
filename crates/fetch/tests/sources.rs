//! Checksums (inline, checksum files), `file://` origins under allowed directories, and
//! Glance image ids.

mod common;

use std::path::Path;
use std::time::{Duration, SystemTime};

use common::*;
use imgcache_fetch::{ChecksumSpec, FetchError, FetchOptions, ImageCache, Outcome, SourceConfig};
use imgcache_store::{Algorithm, Integrity};
use imgcache_testkit::faults::{FaultOrigin, File};
use imgcache_testkit::glance::{ADMIN_TOKEN, FakeGlance, Seed};
use url::Url;

fn with_checksum(spec: ChecksumSpec) -> FetchOptions {
    FetchOptions {
        checksum: Some(spec),
        ..FetchOptions::default()
    }
}

fn inline(s: &str) -> ChecksumSpec {
    s.parse().unwrap()
}

// ---- --checksum ----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_checksums_match_and_mismatch() {
    let origin = FaultOrigin::start();
    let env = Env::new();
    for (i, algo) in [Algorithm::Sha256, Algorithm::Md5, Algorithm::Sha512]
        .into_iter()
        .enumerate()
    {
        let body = image_bytes(MIB + i, 10 + i as u64);
        let good_path = format!("/good-{}.img", algo.name());
        let bad_path = format!("/bad-{}.img", algo.name());
        origin.put(&good_path, File::bare(body.clone()));
        origin.put(&bad_path, File::bare(body.clone()));
        let right = Integrity::of(algo, &body);
        let wrong = Integrity::of(algo, b"something else");

        let href = origin.at(&good_path);
        let dest = env.dest(&format!("good-{}", algo.name()));
        let r = env
            .ic
            .fetch_image(&href, &dest, &with_checksum(inline(&right.to_string())))
            .await
            .unwrap();
        assert_eq!(r.outcome, Outcome::Downloaded);
        assert_eq!(
            r.checksum.as_ref(),
            Some(&right),
            "recorded in the given algorithm"
        );
        assert_linked(&env.master(&key_of(&href, false)), &dest, &body);

        let href = origin.at(&bad_path);
        let key = key_of(&href, false);
        let dest = env.dest(&format!("bad-{}", algo.name()));
        let err = expect_err(
            env.ic
                .fetch_image(&href, &dest, &with_checksum(inline(&wrong.to_string())))
                .await,
        );
        match &err {
            FetchError::Checksum {
                expected, actual, ..
            } => {
                assert_eq!(expected, &wrong);
                assert_eq!(actual, &right);
            }
            other => panic!("{other:?}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains(&wrong.to_string()) && msg.contains(&right.to_string()),
            "{msg}"
        );
        assert_failed_cleanly(&env, &key, &dest);
        assert_eq!(
            invalid_len(&env, &key),
            Some(body.len() as u64),
            "kept for inspection"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checksum_file_matched_by_file_name() {
    let origin = FaultOrigin::start();
    let env = Env::new();
    let focal = image_bytes(MIB, 20);
    let jammy = image_bytes(MIB, 21);
    origin.put("/images/focal.img", File::bare(focal.clone()));
    origin.put("/images/jammy.img", File::bare(jammy.clone()));
    origin.put("/images/noble.img", File::bare(image_bytes(MIB, 22)));
    let sums = format!(
        "# SHA256SUMS\n{}  other.img\n{} *focal.img\n{}  jammy.img\n",
        "0".repeat(64),
        Integrity::of(Algorithm::Sha256, &focal).hex(),
        Integrity::of(Algorithm::Sha256, b"not jammy").hex(),
    );
    origin.put("/images/SHA256SUMS", File::bare(sums));
    let sums_url = origin.at("/images/SHA256SUMS");
    let spec = ChecksumSpec::File(Url::parse(&sums_url).unwrap());

    let href = origin.at("/images/focal.img");
    let dest = env.dest("focal");
    let r = env
        .ic
        .fetch_image(&href, &dest, &with_checksum(spec.clone()))
        .await
        .unwrap();
    assert_eq!(r.checksum, Some(Integrity::of(Algorithm::Sha256, &focal)));
    assert_linked(&env.master(&key_of(&href, false)), &dest, &focal);

    // Listed with the wrong digest: a checksum error.
    let href = origin.at("/images/jammy.img");
    let key = key_of(&href, false);
    let dest = env.dest("jammy");
    let err = expect_err(
        env.ic
            .fetch_image(&href, &dest, &with_checksum(spec.clone()))
            .await,
    );
    assert!(matches!(err, FetchError::Checksum { .. }), "{err:?}");
    assert_failed_cleanly(&env, &key, &dest);

    // Not listed at all.
    let href = origin.at("/images/noble.img");
    let key = key_of(&href, false);
    let dest = env.dest("noble");
    let err = expect_err(env.ic.fetch_image(&href, &dest, &with_checksum(spec)).await);
    match &err {
        FetchError::ChecksumNotListed { url, name } => {
            assert_eq!(url, &sums_url);
            assert_eq!(name, "noble.img");
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("noble.img"), "{err}");
    assert_failed_cleanly(&env, &key, &dest);
    assert_eq!(invalid_len(&env, &key), None, "nothing was written");
    assert_eq!(origin.counts("/images/SHA256SUMS").total(), 3);
}

// ---- file:// -------------------------------------------------------------------------------

fn file_env(allowed: &Path) -> Env {
    Env::with(SourceConfig {
        allowed_file_dirs: vec![allowed.to_path_buf()],
        ..sources()
    })
}

fn file_href(p: &Path) -> String {
    Url::from_file_path(p).unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_under_an_allowed_dir_is_linked_into_the_cache_and_refetched_on_mtime_change() {
    let images = tempfile::tempdir().unwrap();
    let src = images.path().join("deploy.img");
    let v1 = image_bytes(2 * MIB, 30);
    std::fs::write(&src, &v1).unwrap();
    let env = file_env(images.path());
    let href = file_href(&src);
    let key = key_of(&href, false);

    let dest = env.dest("d1");
    let r = env
        .ic
        .fetch_image(&href, &dest, &FetchOptions::default())
        .await
        .unwrap();
    assert_eq!(r.outcome, Outcome::Downloaded);
    assert_eq!(r.checksum, Some(Integrity::of(Algorithm::Sha256, &v1)));
    // Same filesystem: the master is the source's inode, no bytes copied.
    assert_eq!(inode(&src).1, inode(&env.master(&key)).1);
    assert_linked(&env.master(&key), &dest, &v1);
    assert_eq!(inode(&src).2, 3, "source + master + dest");

    let r = env
        .ic
        .fetch_image(&href, &env.dest("d2"), &FetchOptions::default())
        .await
        .unwrap();
    assert_eq!(r.outcome, Outcome::Hit, "unchanged mtime");

    // The operator replaces the image (new inode, new mtime): fetched again.
    let v2 = image_bytes(3 * MIB, 31);
    let staged = images.path().join(".staged");
    std::fs::write(&staged, &v2).unwrap();
    std::fs::rename(&staged, &src).unwrap();
    let r = env
        .ic
        .fetch_image(&href, &dest, &FetchOptions::default())
        .await
        .unwrap();
    assert_eq!(r.outcome, Outcome::Downloaded);
    assert_linked(&env.master(&key), &dest, &v2);
    assert_eq!(
        std::fs::read(env.dest("d2")).unwrap(),
        v1,
        "old deploy intact"
    );

    // Only the mtime moves (touch): the master is re-fetched too.
    let f = std::fs::File::options().write(true).open(&src).unwrap();
    f.set_modified(SystemTime::now() + Duration::from_secs(5))
        .unwrap();
    drop(f);
    let r = env
        .ic
        .fetch_image(&href, &dest, &FetchOptions::default())
        .await
        .unwrap();
    assert_eq!(r.outcome, Outcome::Downloaded);
    assert_linked(&env.master(&key), &dest, &v2);
    let incomplete: Vec<_> = std::fs::read_dir(env.cache().layout().incomplete_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(incomplete.is_empty(), "left in incomplete/: {incomplete:?}");
    let r = env
        .ic
        .fetch_image(&href, &dest, &FetchOptions::default())
        .await
        .unwrap();
    assert_eq!(r.outcome, Outcome::Hit);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_on_another_filesystem_is_copied_into_the_cache() {
    let fs = Tmpfs::mount("16m");
    let src = fs.path.join("remote.img");
    let body = image_bytes(3 * MIB, 32);
    std::fs::write(&src, &body).unwrap();
    let env = file_env(&fs.path);
    let href = file_href(&src);
    let key = key_of(&href, false);
    let dest = env.dest("d");
    let r = env
        .ic
        .fetch_image(&href, &dest, &FetchOptions::default())
        .await
        .unwrap();
    assert_eq!(r.outcome, Outcome::Downloaded);
    assert_ne!(inode(&src).0, inode(&env.master(&key)).0);
    assert_eq!(inode(&src).2, 1, "source untouched");
    assert_linked(&env.master(&key), &dest, &body);
    drop(env);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_outside_allowed_dirs_is_refused() {
    let images = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let outside = elsewhere.path().join("secret.img");
    std::fs::write(&outside, b"not for you").unwrap();
    std::fs::write(images.path().join("ok.img"), b"fine").unwrap();
    std::os::unix::fs::symlink(&outside, images.path().join("sneaky.img")).unwrap();
    let env = file_env(images.path());
    let dotdot = images
        .path()
        .join("..")
        .join(elsewhere.path().file_name().unwrap())
        .join("secret.img");
    for path in [
        outside.clone(),
        Path::new("/etc/shadow").to_path_buf(),
        images.path().join("sneaky.img"),
        dotdot,
    ] {
        let href = format!("file://{}", path.display());
        let key = key_of(&href, false);
        let dest = env.dest("refused");
        let err = expect_err(
            env.ic
                .fetch_image(&href, &dest, &FetchOptions::default())
                .await,
        );
        assert!(
            matches!(err, FetchError::FileNotAllowed { .. }),
            "{path:?}: {err:?}"
        );
        assert!(err.to_string().contains("allowed"), "{err}");
        assert_failed_cleanly(&env, &key, &dest);
    }
    // Nothing is allowed by default.
    let env = Env::new();
    let href = file_href(&images.path().join("ok.img"));
    let err = expect_err(
        env.ic
            .fetch_image(&href, &env.dest("d"), &FetchOptions::default())
            .await,
    );
    assert!(matches!(err, FetchError::FileNotAllowed { .. }), "{err:?}");
    assert!(env.cache().get_cached_images().unwrap().is_empty());
}

// ---- Glance --------------------------------------------------------------------------------

const ID: &str = "6a2b5b54-2d8c-4d6a-9f4e-0c1b2c3d4e5f";

/// A fake Glance holding `body` as the active raw image [`ID`].
fn glance_with(body: &[u8]) -> FakeGlance {
    let glance =
        FakeGlance::start().unwrap_or_else(|e| panic!("the fake Glance cannot start: {e}"));
    glance.seed(Seed::new("img", body).id(ID));
    glance
}

fn glance_env(glance: &FakeGlance) -> Env {
    Env::with(SourceConfig {
        glance_url: Some(Url::parse(&glance.url).unwrap()),
        glance_token: Some(ADMIN_TOKEN.into()),
        ..sources()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn glance_id_bare_and_glance_scheme_verified_by_os_hash_value() {
    let body = image_bytes(3 * MIB, 40);
    let origin = glance_with(&body);
    let env = glance_env(&origin);

    let dest = env.dest("bare");
    let r = env
        .ic
        .fetch_image(ID, &dest, &FetchOptions::default())
        .await
        .unwrap();
    assert_eq!(r.outcome, Outcome::Downloaded);
    assert_eq!(r.key, ID, "a Glance id keys by itself");
    assert_eq!(
        r.checksum,
        Some(Integrity::of(Algorithm::Sha512, &body)),
        "verified against os_hash_value (sha512), not the md5"
    );
    assert_linked(&env.master(&key_of(ID, false)), &dest, &body);
    let rec = env.cache().get_record(&key_of(ID, false)).unwrap().unwrap();
    assert_eq!(
        rec.props.get("disk_format").map(String::as_str),
        Some("raw")
    );
    let tokens: Vec<_> = origin.log().into_iter().map(|l| l.token).collect();
    assert!(
        tokens.iter().all(|t| t.as_deref() == Some(ADMIN_TOKEN)),
        "token sent on every Glance request: {tokens:?}"
    );
    let requests = origin.log().len();
    assert_eq!(requests, 2, "metadata + file");

    // glance://<id> is the same image; Glance images are immutable per id: no request.
    let dest2 = env.dest("scheme");
    let r = env
        .ic
        .fetch_image(&format!("glance://{ID}"), &dest2, &FetchOptions::default())
        .await
        .unwrap();
    assert_eq!(r.outcome, Outcome::Hit);
    assert_eq!(r.key, ID);
    assert_linked(&env.master(&key_of(ID, false)), &dest2, &body);
    assert_eq!(origin.log().len(), requests);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn glance_md5_checksum_used_when_there_is_no_multihash() {
    let body = image_bytes(MIB, 41);
    // An image uploaded before Glance had multihash (Rocky): md5 `checksum` only.
    let origin = glance_with(&body);
    origin.set_field(ID, "os_hash_algo", serde_json::Value::Null);
    origin.set_field(ID, "os_hash_value", serde_json::Value::Null);
    let env = glance_env(&origin);
    let r = env
        .ic
        .fetch_image(ID, &env.dest("d"), &FetchOptions::default())
        .await
        .unwrap();
    assert_eq!(r.checksum, Some(Integrity::of(Algorithm::Md5, &body)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn glance_image_not_active_is_refused() {
    let origin = glance_with(&image_bytes(MIB, 42));
    origin.set_field(ID, "status", "queued".into());
    let env = glance_env(&origin);
    let key = key_of(ID, false);
    let dest = env.dest("d");
    let err = expect_err(
        env.ic
            .fetch_image(&format!("glance://{ID}"), &dest, &FetchOptions::default())
            .await,
    );
    match &err {
        FetchError::GlanceNotActive { id, status } => {
            assert_eq!(id, ID);
            assert_eq!(status, "queued");
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("queued"), "{err}");
    assert_eq!(
        origin.requests("GET", "/v2/images/{id}/file"),
        0,
        "no data requested"
    );
    assert_failed_cleanly(&env, &key, &dest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn glance_checksum_mismatch_names_expected_and_actual() {
    let body = image_bytes(2 * MIB, 43);
    let origin = glance_with(&body);
    let claimed = Integrity::of(Algorithm::Sha512, b"what glance thinks it holds");
    origin.set_field(ID, "os_hash_value", claimed.hex().into());
    let env = glance_env(&origin);
    let key = key_of(ID, false);
    let dest = env.dest("d");
    let err = expect_err(
        env.ic
            .fetch_image(ID, &dest, &FetchOptions::default())
            .await,
    );
    let actual_want = Integrity::of(Algorithm::Sha512, &body);
    match &err {
        FetchError::Checksum {
            expected, actual, ..
        } => {
            assert_eq!(expected, &claimed);
            assert_eq!(actual, &actual_want);
        }
        other => panic!("{other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains(claimed.hex()) && msg.contains(actual_want.hex()),
        "{msg}"
    );
    assert_failed_cleanly(&env, &key, &dest);
    assert_eq!(invalid_len(&env, &key), Some(body.len() as u64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn glance_id_without_a_glance_endpoint() {
    let env = Env::new();
    let err = expect_err(
        env.ic
            .fetch_image(ID, &env.dest("d"), &FetchOptions::default())
            .await,
    );
    assert!(matches!(err, FetchError::NoGlance { .. }), "{err:?}");
    assert_failed_cleanly(&env, &key_of(ID, false), &env.dest("d"));
    // And an ImageCache with one works on the same cache dir afterwards.
    let body = image_bytes(MIB, 44);
    let origin = glance_with(&body);
    let ic = ImageCache::new(
        env.spec.clone(),
        &SourceConfig {
            glance_url: Some(Url::parse(&origin.url).unwrap()),
            glance_token: Some(ADMIN_TOKEN.into()),
            ..sources()
        },
    )
    .unwrap();
    ic.fetch_image(ID, &env.dest("d"), &FetchOptions::default())
        .await
        .unwrap();
    assert_linked(&env.master(&key_of(ID, false)), &env.dest("d"), &body);
}
