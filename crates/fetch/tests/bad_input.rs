//! Bad input, and what it gets: each a clear error, nothing published, no partial `dest`,
//! the key lock released, and the bytes that did arrive kept in `invalid/` for inspection.

mod common;

use std::time::{Duration, Instant};

use common::*;
use imgcache_fetch::{FetchError, FetchOptions, HttpOptions, Outcome, Placement, SourceConfig};
use imgcache_store::{Algorithm, Integrity, StoreError};
use imgcache_testkit::faults::{ALWAYS, Fault, FaultOrigin, File};

fn opts() -> FetchOptions {
    FetchOptions::default()
}

/// After a failure, the same key fetches fine from a healthy route (lock released, no
/// leftover blocking it).
async fn then_fetch_works(env: &Env, origin: &FaultOrigin, path: &str, href: &str) {
    let body = image_bytes(MIB / 2, 77);
    origin.put(path, File::bare(body.clone()).etag(Some("fixed")));
    let dest = env.dest("after-fix");
    let r = env.ic.fetch_image(href, &dest, &opts()).await.unwrap();
    assert_eq!(r.outcome, Outcome::Downloaded);
    if r.placement == Placement::Copied {
        // The cache is on a tmpfs here and the dests are not.
        assert_eq!(std::fs::read(&dest).unwrap(), body);
    } else {
        assert_linked(&env.master(&key_of(href, false)), &dest, &body);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors_are_not_retried() {
    let origin = FaultOrigin::start();
    let env = Env::new();
    for code in [404u16, 403] {
        let path = format!("/e{code}.img");
        origin.put(&path, File::bare(image_bytes(1024, 1)));
        origin.fail(&path, Fault::Status(code), ALWAYS);
        let href = origin.at(&path);
        let key = key_of(&href, false);
        let dest = env.dest(&format!("d{code}"));
        let err = expect_err(env.ic.fetch_image(&href, &dest, &opts()).await);
        match &err {
            FetchError::Status { status, url } => {
                assert_eq!(*status, code);
                assert_eq!(url, &href);
            }
            other => panic!("{code}: {other:?}"),
        }
        assert!(err.to_string().contains(&code.to_string()), "{err}");
        assert_eq!(
            origin.counts(&path).total(),
            1,
            "{code} must not be retried"
        );
        assert_failed_cleanly(&env, &key, &dest);
        assert_eq!(invalid_len(&env, &key), None, "no bytes were written");
        then_fetch_works(&env, &origin, &path, &href).await;
    }
    // A path the origin does not know at all.
    let href = origin.at("/nowhere.img");
    let err = expect_err(env.ic.fetch_image(&href, &env.dest("x"), &opts()).await);
    assert!(
        matches!(err, FetchError::Status { status: 404, .. }),
        "{err:?}"
    );
    assert_eq!(origin.counts("/nowhere.img").total(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_retried_with_backoff() {
    let origin = FaultOrigin::start();
    let env = Env::new(); // 3 retries
    let body = image_bytes(2 * MIB, 2);
    origin.put("/flaky.img", File::bare(body.clone()));
    origin.fail("/flaky.img", Fault::Status(500), 2);
    let href = origin.at("/flaky.img");
    let dest = env.dest("flaky");
    let r = env.ic.fetch_image(&href, &dest, &opts()).await.unwrap();
    assert_eq!(r.outcome, Outcome::Downloaded);
    assert_eq!(
        origin.counts("/flaky.img").total(),
        3,
        "two 500s, then the 200"
    );
    assert_linked(&env.master(&key_of(&href, false)), &dest, &body);

    // A 503 that never recovers: 1 + retries attempts, then the status as the error.
    origin.put("/down.img", File::bare(body.clone()));
    origin.fail("/down.img", Fault::Status(503), ALWAYS);
    let href = origin.at("/down.img");
    let dest = env.dest("down");
    let err = expect_err(env.ic.fetch_image(&href, &dest, &opts()).await);
    assert!(
        matches!(err, FetchError::Status { status: 503, .. }),
        "{err:?}"
    );
    assert_eq!(origin.counts("/down.img").total(), 4);
    assert_failed_cleanly(&env, &key_of(&href, false), &dest);
    then_fetch_works(&env, &origin, "/down.img", &href).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_reset_mid_body() {
    let origin = FaultOrigin::start();
    let env = Env::new();
    let body = image_bytes(4 * MIB, 3);
    origin.put("/reset.img", File::bare(body));
    origin.fail("/reset.img", Fault::ResetAfter(MIB as u64), ALWAYS);
    let href = origin.at("/reset.img");
    let key = key_of(&href, false);
    let dest = env.dest("reset");
    let err = expect_err(env.ic.fetch_image(&href, &dest, &opts()).await);
    assert!(
        matches!(err, FetchError::Truncated { got, expected: Some(e), .. } if got == MIB as u64 && e == 4 * MIB as u64),
        "{err:?}"
    );
    assert!(err.to_string().contains(&href), "names the origin: {err}");
    assert!(err.to_string().contains("reset"), "says why: {err}");
    assert_eq!(origin.counts("/reset.img").total(), 1);
    assert_failed_cleanly(&env, &key, &dest);
    let kept = invalid_len(&env, &key).expect("partial download kept in invalid/");
    assert!(kept > 0 && kept <= MIB as u64, "{kept}");
    then_fetch_works(&env, &origin, "/reset.img", &href).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_shorter_than_content_length() {
    let origin = FaultOrigin::start();
    let env = Env::new();
    let body = image_bytes(4 * MIB, 4);
    origin.put("/short.img", File::bare(body));
    origin.fail("/short.img", Fault::ShortBody(3 * MIB as u64), ALWAYS);
    let href = origin.at("/short.img");
    let key = key_of(&href, false);
    let dest = env.dest("short");
    let err = expect_err(env.ic.fetch_image(&href, &dest, &opts()).await);
    assert!(
        matches!(
            err,
            FetchError::Truncated { .. } | FetchError::Length { .. }
        ),
        "{err:?}"
    );
    assert_failed_cleanly(&env, &key, &dest);
    assert_eq!(invalid_len(&env, &key), Some(3 * MIB as u64));
    then_fetch_works(&env, &origin, "/short.img", &href).await;
}

/// HTTP/1.1 ends a body at Content-Length: whatever follows is not part of it. The image must
/// be exactly the declared bytes, never the declared bytes plus trailing garbage, and when the
/// caller expects the checksum of what the origin meant to send, that is a checksum error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_longer_than_content_length() {
    let origin = FaultOrigin::start();
    let env = Env::new();
    let body = image_bytes(2 * MIB, 5);
    origin.put("/long.img", File::bare(body.clone()));
    origin.fail("/long.img", Fault::TooLongBody(MIB as u64), ALWAYS);
    let href = origin.at("/long.img");
    let key = key_of(&href, false);

    // The whole stream (declared body + extra), as a broken origin would have hashed it.
    let mut whole = body.to_vec();
    whole.extend_from_slice(&vec![0xee; MIB]);
    let expected = Integrity::of(Algorithm::Sha256, &whole);
    let dest = env.dest("long-checked");
    let err = expect_err(
        env.ic
            .fetch_image(
                &href,
                &dest,
                &FetchOptions {
                    checksum: Some(imgcache_fetch::ChecksumSpec::Inline(expected.clone())),
                    ..opts()
                },
            )
            .await,
    );
    match &err {
        FetchError::Checksum {
            expected: e,
            actual,
            ..
        } => {
            assert_eq!(e, &expected);
            assert_eq!(actual, &Integrity::of(Algorithm::Sha256, &body));
        }
        other => panic!("{other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains(expected.hex()) && msg.contains(Integrity::of(Algorithm::Sha256, &body).hex()),
        "names expected and actual: {msg}"
    );
    assert_failed_cleanly(&env, &key, &dest);
    assert_eq!(invalid_len(&env, &key), Some(body.len() as u64));

    // Without a checksum: exactly the declared bytes, no trailing garbage.
    let dest = env.dest("long");
    let r = env.ic.fetch_image(&href, &dest, &opts()).await.unwrap();
    assert_eq!(r.size, body.len() as u64);
    assert_linked(&env.master(&key), &dest, &body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_stalling_past_the_read_timeout() {
    let origin = FaultOrigin::start();
    let env = Env::with(SourceConfig {
        http: HttpOptions {
            read_timeout: Duration::from_millis(300),
            ..http_options()
        },
        ..sources()
    });
    let body = image_bytes(3 * MIB, 6);
    origin.put("/stall.img", File::bare(body));
    let stall = Fault::StallMidBody {
        after: MIB as u64,
        pause: Duration::from_secs(20),
    };
    origin.fail("/stall.img", stall, ALWAYS);
    let href = origin.at("/stall.img");
    let key = key_of(&href, false);
    let dest = env.dest("stall");
    let started = Instant::now();
    let err = expect_err(env.ic.fetch_image(&href, &dest, &opts()).await);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "gave up after {took:?}");
    assert!(matches!(err, FetchError::Truncated { .. }), "{err:?}");
    assert!(
        err.to_string().to_lowercase().contains("timed out"),
        "says it timed out: {err}"
    );
    assert_failed_cleanly(&env, &key, &dest);
    assert_eq!(invalid_len(&env, &key), Some(MIB as u64));
    then_fetch_works(&env, &origin, "/stall.img", &href).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_scheme_and_missing_dest_dir_fail_before_any_request() {
    let origin = FaultOrigin::start();
    let env = Env::new();
    let err = expect_err(
        env.ic
            .fetch_image("ftp://example.com/a.img", &env.dest("ftp"), &opts())
            .await,
    );
    match &err {
        FetchError::UnsupportedScheme { scheme, .. } => assert_eq!(scheme, "ftp"),
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("ftp"), "{err}");
    assert!(!env.dest("ftp").exists());

    origin.put("/a.img", File::bare(image_bytes(MIB, 7)));
    let href = origin.at("/a.img");
    let key = key_of(&href, false);
    let dest = env.dests.join("no/such/dir/a.img");
    let err = expect_err(env.ic.fetch_image(&href, &dest, &opts()).await);
    match &err {
        FetchError::Dest { path, .. } => assert_eq!(path, &dest),
        other => panic!("{other:?}"),
    }
    assert_eq!(origin.all_requests(), 0, "checked before asking the origin");
    assert!(!env.dests.join("no").exists(), "no directory created");
    assert_failed_cleanly(&env, &key, &dest);
    assert!(env.cache().get_cached_images().unwrap().is_empty());
}

fn assert_disk_full(err: &FetchError) {
    assert!(
        matches!(err, FetchError::Store(StoreError::DiskFull { .. })),
        "{err:?}"
    );
    assert!(err.to_string().contains("disk full"), "{err}");
}

/// An 8 MiB tmpfs holds the cache; the image is 16 MiB. With a Content-Length the space is
/// reserved up front and refused at once; chunked, the writes fail part way. Either way the
/// partial file is removed (not kept in invalid/, which would keep the disk full).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_while_downloading() {
    let fs = Tmpfs::mount("8m");
    let origin = FaultOrigin::start();
    let env = Env::at(Some(fs.path.join("cache")), sources());
    let body = image_bytes(16 * MIB, 8);
    let free_before = imgcache_store::registry::free_space(&fs.path).unwrap();
    for (path, behave) in [
        ("/big.img", Fault::None),
        ("/big-chunked.img", Fault::Chunked),
    ] {
        origin.put(path, File::bare(body.clone()));
        origin.fail(path, behave, ALWAYS);
        let href = origin.at(path);
        let key = key_of(&href, false);
        let dest = env.dest(&path[1..]);
        let err = expect_err(env.ic.fetch_image(&href, &dest, &opts()).await);
        assert_disk_full(&err);
        assert_failed_cleanly(&env, &key, &dest);
        assert_eq!(invalid_len(&env, &key), None, "{path}: partial removed");
        let free = imgcache_store::registry::free_space(&fs.path).unwrap();
        assert!(
            free + 256 * 1024 >= free_before,
            "{path}: space given back ({free} vs {free_before})"
        );
    }
    // The cache still works once the image fits.
    then_fetch_works(&env, &origin, "/big.img", &origin.at("/big.img")).await;
    drop(env);
}

/// `fetch_image` queued behind another process's download gives up with a clear error once
/// that writer's file has stopped growing for the origin read timeout (it used to wait on the
/// key's flock forever), and works again once the writer is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_writer_in_another_process_is_given_up_on() {
    let origin = FaultOrigin::start();
    let body = image_bytes(2 * MIB, 41);
    origin.put("/hung.img", File::bare(body.clone()));
    let bound = Duration::from_secs(1);
    let mut src = sources();
    src.http.read_timeout = bound;
    src.revalidate_interval = Duration::ZERO;
    let env = Env::with(src);
    let href = origin.at("/hung.img");
    let key = key_of(&href, false);
    // "Another process": a second store on the directory holds the key, writes, then hangs.
    let other =
        imgcache_store::Cache::open(&env.cache_dir, imgcache_store::DriverKind::Sqlite).unwrap();
    let mut w = other.open_for_write(&key).unwrap().expect("key lock");
    std::io::Write::write_all(&mut w, &body[..MIB]).unwrap();
    let dest = env.dest("hung");
    let started = Instant::now();
    let err = expect_err(env.ic.fetch_image(&href, &dest, &opts()).await);
    let took = started.elapsed();
    assert!(
        matches!(err, FetchError::Store(StoreError::WriterStalled { .. })),
        "{err:?}"
    );
    assert!(err.to_string().contains("made no progress"), "{err}");
    assert!(took >= bound && took < bound * 4, "gave up after {took:?}");
    assert_eq!(
        origin.all_requests(),
        0,
        "nothing asked while another writer held the key"
    );
    assert!(!dest.exists());
    drop(w);
    let r = env.ic.fetch_image(&href, &dest, &opts()).await.unwrap();
    assert_eq!(r.outcome, Outcome::Downloaded);
    assert_linked(&env.master(&key), &dest, &body);
}
