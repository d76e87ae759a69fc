//! Resuming broken downloads (Range + If-Range), starting over when the origin changed or
//! serves no ranges, the bounded origin attempt, and an unannounced length that outgrows the
//! cache's room, handed back to stream uncached.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use imgcache_fetch::{Admission, Admitted, FetchError, FetchOptions, Hooks, Href, RoomPolicy};
use imgcache_store::Status;
use imgcache_testkit::faults::{ALWAYS, Fault, FaultOrigin, File, Logged};

const PATH: &str = "/disk.img";

/// An origin serving `body` at [`PATH`] with the strong ETag `"etag"` when given (and no
/// `Last-Modified`).
fn origin_of(body: &[u8], etag: Option<&str>) -> FaultOrigin {
    let origin = FaultOrigin::start();
    origin.put(
        PATH,
        File::new(body.to_vec()).etag(etag).last_modified(None),
    );
    origin
}

fn env_with(f: impl FnOnce(&mut imgcache_fetch::SourceConfig)) -> Env {
    let mut src = sources();
    f(&mut src);
    Env::with(src)
}

fn ranged(log: &[Logged]) -> Vec<&Logged> {
    log.iter().filter(|s| s.range.is_some()).collect()
}

/// The offset a `bytes=N-` range asks from.
fn offset(s: &Logged) -> u64 {
    let r = s.range.as_deref().unwrap();
    r.trim_start_matches("bytes=")
        .trim_end_matches('-')
        .parse()
        .unwrap()
}

fn nothing_left(env: &Env, href: &str) {
    let key = key_of(href, false);
    for status in [Status::Incomplete, Status::Invalid] {
        assert!(
            !env.cache().get_image_filepath(&key, status).exists(),
            "{status:?} file left"
        );
    }
    let note = env.cache().resume_note_path(&key).unwrap();
    assert!(!note.exists(), "resume note left");
}

#[tokio::test]
async fn a_reset_mid_body_resumes_with_one_range_request_and_exact_bytes() {
    let body = image_bytes(6 * MIB, 1).to_vec();
    let origin = origin_of(&body, Some("v1"));
    origin.script(PATH, [Fault::ResetAfter((2 * MIB) as u64)]);
    let env = Env::new();
    let href = origin.at(PATH);
    let dest = env.dest("d");
    let report = env
        .ic
        .fetch_image(&href, &dest, &FetchOptions::default())
        .await
        .unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), body, "exact bytes");
    assert_eq!(report.size, body.len() as u64);
    let log = origin.log(PATH);
    assert_eq!(log.len(), 2, "one request, one resume: {log:?}");
    let r = ranged(&log);
    assert_eq!(r.len(), 1, "{log:?}");
    assert_eq!(r[0].if_range.as_deref(), Some("\"v1\""));
    assert_eq!(r[0].status, 206);
    let at = offset(r[0]);
    assert!(at > 0 && at <= 2 * MIB as u64, "resumed at {at}");
    eprintln!("resumed at byte {at} of {}", body.len());
    nothing_left(&env, &href);
}

#[tokio::test]
async fn a_5xx_while_resuming_is_retried_then_resumes() {
    let body = image_bytes(3 * MIB, 2).to_vec();
    let origin = origin_of(&body, Some("v1"));
    origin.script(
        PATH,
        [
            Fault::ResetAfter(MIB as u64),
            Fault::Status(503),
            Fault::None,
        ],
    );
    let env = Env::new();
    let dest = env.dest("d");
    env.ic
        .fetch_image(&origin.at(PATH), &dest, &FetchOptions::default())
        .await
        .unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), body);
    let log = origin.log(PATH);
    assert_eq!(log.len(), 3, "{log:?}");
    assert_eq!(
        ranged(&log).len(),
        2,
        "both retries ask for the rest: {log:?}"
    );
    assert_eq!(log[2].status, 206);
}

#[tokio::test]
async fn last_modified_is_the_validator_without_a_strong_etag() {
    let body = image_bytes(2 * MIB, 3).to_vec();
    let lm = "Wed, 01 May 2024 10:00:00 GMT";
    let origin = FaultOrigin::start();
    origin.put(
        PATH,
        File::new(body.clone()).etag(None).last_modified(Some(lm)),
    );
    origin.script(PATH, [Fault::ResetAfter(MIB as u64)]);
    let env = Env::new();
    let dest = env.dest("d");
    env.ic
        .fetch_image(&origin.at(PATH), &dest, &FetchOptions::default())
        .await
        .unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), body);
    let log = origin.log(PATH);
    assert_eq!(log[1].if_range.as_deref(), Some(lm), "{log:?}");
    assert_eq!(log[1].status, 206);
}

#[tokio::test]
async fn an_origin_that_changed_restarts_and_never_mixes_bytes() {
    let old = image_bytes(4 * MIB, 4).to_vec();
    let new = image_bytes(4 * MIB, 5).to_vec();
    let origin = origin_of(&old, Some("v1"));
    // The first request is answered (and cut) with v1, the file replaced meanwhile.
    origin.script(
        PATH,
        [Fault::ChangedAfter {
            cut_after: MIB as u64,
            then: new.clone().into(),
            then_etag: Some("v2".into()),
        }],
    );
    let env = Env::new();
    let href = origin.at(PATH);
    let dest = env.dest("d");
    env.ic
        .fetch_image(&href, &dest, &FetchOptions::default())
        .await
        .unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), new, "the new image, whole");
    let log = origin.log(PATH);
    assert_eq!(
        log.len(),
        3,
        "cut, range refused (200), whole again: {log:?}"
    );
    assert_eq!(log[1].if_range.as_deref(), Some("\"v1\""));
    assert_eq!(log[1].status, 200, "If-Range did not match");
    assert_eq!(log[2].range, None, "started over from byte 0");
    nothing_left(&env, &href);
}

#[tokio::test]
async fn an_origin_without_ranges_is_read_again_past_the_bytes_already_had() {
    let body = image_bytes(3 * MIB, 6).to_vec();
    let origin = origin_of(&body, Some("v1"));
    origin.no_ranges();
    origin.script(PATH, [Fault::ResetAfter(MIB as u64)]);
    let env = Env::new();
    let dest = env.dest("d");
    env.ic
        .fetch_image(&origin.at(PATH), &dest, &FetchOptions::default())
        .await
        .unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), body);
    // The range request was answered with the same image whole (same ETag, same length):
    // its first MiB passed over, the download went on; no third request from byte 0.
    let log = origin.log(PATH);
    assert_eq!(log.len(), 2, "{log:?}");
    assert_eq!(log[1].range.as_deref(), Some("bytes=1048576-"));
    assert_eq!(log[1].status, 200);
}

#[tokio::test]
async fn an_origin_without_ranges_whose_image_changed_starts_over() {
    let body = image_bytes(3 * MIB, 16).to_vec();
    let other = bytes::Bytes::from(image_bytes(3 * MIB, 17).to_vec());
    let origin = origin_of(&body, Some("v1"));
    origin.no_ranges();
    origin.script(
        PATH,
        [Fault::ChangedAfter {
            cut_after: MIB as u64,
            then: other.clone(),
            then_etag: Some("v2".into()),
        }],
    );
    let env = Env::new();
    let dest = env.dest("d");
    env.ic
        .fetch_image(&origin.at(PATH), &dest, &FetchOptions::default())
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(&dest).unwrap(),
        other,
        "the new image, never a mix"
    );
    let log = origin.log(PATH);
    assert_eq!(log.len(), 3, "{log:?}");
    assert_eq!(log[1].status, 200);
    assert_eq!(log[2].range, None, "started over from byte 0");
}

#[tokio::test]
async fn a_restart_inside_one_admission_is_a_clear_error() {
    let body = image_bytes(3 * MIB, 7).to_vec();
    let origin = origin_of(&body, Some("v1"));
    origin.no_ranges();
    origin.script(
        PATH,
        [Fault::ChangedAfter {
            cut_after: MIB as u64,
            then: bytes::Bytes::from(image_bytes(3 * MIB, 8).to_vec()),
            then_etag: Some("v2".into()),
        }],
    );
    let env = Env::new();
    let href = origin.at(PATH);
    let key = key_of(&href, false);
    let parsed = Href::parse(&href).unwrap();
    let response = env.ic.request(&parsed, None, None).await.unwrap();
    let permit = env.cache().try_lock_key(&key).unwrap().unwrap();
    let adm = Admission {
        key: key.clone(),
        href: parsed,
        href_raw: href.clone(),
        permit,
        declared: None,
        checksum: None,
        force_raw: false,
        hooks: Hooks::default(),
    };
    let e = match env.ic.admit(adm, response).await {
        Err(e) => e,
        Ok(_) => panic!("admitted a restarted body"),
    };
    assert!(matches!(e, FetchError::Restart { .. }), "{e}");
    assert!(e.to_string().contains("starts over"), "{e}");
    assert_eq!(e.refusal(), Some("truncated"));
    assert!(env.cache().get_record(&key).unwrap().is_none());
}

#[tokio::test]
async fn resumes_are_bounded_by_the_retry_count() {
    let body = image_bytes(3 * MIB, 8).to_vec();
    let origin = origin_of(&body, Some("v1"));
    origin.script(PATH, std::iter::repeat_n(Fault::ResetAfter(256 << 10), 10));
    let env = env_with(|s| s.http.retries = 2);
    let dest = env.dest("d");
    let e = expect_err(
        env.ic
            .fetch_image(&origin.at(PATH), &dest, &FetchOptions::default())
            .await,
    );
    assert!(matches!(e, FetchError::Truncated { .. }), "{e}");
    assert!(
        e.to_string().contains("gave up after 2 resume attempts"),
        "{e}"
    );
    assert_eq!(origin.log(PATH).len(), 3, "{:?}", origin.log(PATH));
    assert!(!dest.exists());
}

#[tokio::test]
async fn resumes_are_bounded_by_the_retry_budget() {
    let body = image_bytes(3 * MIB, 9).to_vec();
    let origin = origin_of(&body, Some("v1"));
    origin.script(PATH, std::iter::repeat_n(Fault::ResetAfter(256 << 10), 50));
    let env = env_with(|s| {
        s.http.retries = 100;
        s.http.retry_budget = Duration::from_millis(300);
        s.http.backoff = Duration::from_millis(100);
    });
    let t = Instant::now();
    let e = expect_err(
        env.ic
            .fetch_image(&origin.at(PATH), &dest_of(&env), &FetchOptions::default())
            .await,
    );
    let took = t.elapsed();
    assert!(e.to_string().contains("gave up"), "{e}");
    assert!(origin.log(PATH).len() < 10, "{:?}", origin.log(PATH));
    assert!(took < Duration::from_secs(3), "{took:?}");
}

fn dest_of(env: &Env) -> std::path::PathBuf {
    env.dest("d")
}

#[tokio::test]
async fn an_origin_that_never_sends_headers_fails_within_the_attempt_budget() {
    let origin = origin_of(&image_bytes(MIB, 10), Some("v1"));
    origin.script(PATH, std::iter::repeat_n(Fault::NoHeaders, 10));
    let budget = Duration::from_secs(1);
    let env = env_with(|s| {
        s.http.attempt_timeout = budget;
        s.http.read_timeout = Duration::from_secs(3);
        s.http.retries = 3;
    });
    let t = Instant::now();
    let e = expect_err(
        env.ic
            .fetch_image(&origin.at(PATH), &dest_of(&env), &FetchOptions::default())
            .await,
    );
    let took = t.elapsed();
    eprintln!("no-header origin failed after {took:?} (attempt budget {budget:?})");
    assert!(e.to_string().contains("attempt timeout"), "{e}");
    assert!(took >= budget, "{took:?}");
    assert!(took < budget + Duration::from_millis(500), "{took:?}");
    assert_eq!(origin.log(PATH).len(), 1, "not retried past the budget");
}

/// A body without Content-Length that outgrows the room the cache can make: caching stops,
/// the whole image comes back (written bytes, then the rest of the same connection) for the
/// server to stream uncached, and nothing stays on disk.
#[tokio::test]
async fn an_unannounced_length_past_the_hard_limit_is_handed_back_whole() {
    let body = image_bytes(6 * MIB, 11);
    let origin = FaultOrigin::start();
    origin.put("/big", File::bare(body.clone()));
    origin.fail("/big", Fault::Chunked, ALWAYS);
    let env = Env::new();
    let ic = imgcache_fetch::ImageCache::new(env.spec.clone(), &sources())
        .unwrap()
        .with_room(RoomPolicy::HardLimit(2 * MIB as u64));
    let href = origin.at("/big");
    let key = key_of(&href, false);
    let parsed = Href::parse(&href).unwrap();
    let response = ic.request(&parsed, None, None).await.unwrap();
    let permit = env.cache().try_lock_key(&key).unwrap().unwrap();
    let adm = Admission {
        key: key.clone(),
        href: parsed,
        href_raw: href.clone(),
        permit,
        declared: None,
        checksum: None,
        force_raw: false,
        hooks: Hooks::default(),
    };
    let Admitted::Passthrough { body: mut got, .. } = ic.admit(adm, response).await.unwrap() else {
        panic!("not handed back");
    };
    let mut all = Vec::new();
    while let Some(c) = got.next().await {
        all.extend_from_slice(&c.unwrap());
    }
    assert_eq!(all.len(), body.len());
    assert!(all == body, "the whole image, in order");
    assert_eq!(origin.counts("/big").total(), 1, "one origin request");
    assert!(env.cache().get_record(&key).unwrap().is_none());
    nothing_left(&env, &href);
}
