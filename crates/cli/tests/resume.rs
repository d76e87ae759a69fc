//! `kill -9` of the real `imgcache fetch` mid-download: the leftover and its resume note stay
//! in `incomplete/`; the next `imgcache fetch` of the same href asks the origin only for the
//! rest (Range + If-Range) and publishes the exact image; `clean` removes a stale leftover
//! with its note.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use imgcache_store::{Algorithm, Integrity};
use imgcache_testkit::faults::{Fault, FaultOrigin, File};

fn command(cache: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_imgcache"));
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .arg("--cache-dir")
        .arg(cache)
        .args(args);
    c
}

fn run(cache: &Path, args: &[&str]) -> Output {
    command(cache, args).output().unwrap()
}

fn key_of(url: &str) -> String {
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, url.as_bytes()).to_string()
}

/// Waits (polling the file, the only event another process's write gives) until `path` holds
/// at least `len` bytes.
fn wait_len(path: &Path, len: u64, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if std::fs::metadata(path).is_ok_and(|m| m.len() >= len) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

struct Killed {
    _dir: tempfile::TempDir,
    cache: PathBuf,
    origin: FaultOrigin,
    url: String,
    body: Vec<u8>,
    sum: String,
    leftover: PathBuf,
    note: PathBuf,
}

/// Starts `imgcache fetch`, lets the origin send `at` bytes and stall, and kills it (-9).
fn killed_mid_download(at: usize) -> Killed {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let cache = dir.path().join("cache");
    let body = imgcache_testkit::image_bytes(8 << 20, 21).to_vec();
    let sum = Integrity::of(Algorithm::Sha256, &body).to_string();
    let origin = FaultOrigin::start();
    let path = "/images/disk.img";
    origin.put(
        path,
        File::new(body.clone()).etag(Some("v1")).last_modified(None),
    );
    origin.script(path, [Fault::StallAfter(at as u64)]);
    let url = origin.at(path);
    let dest = dir.path().join("d1");
    let mut child: Child = command(
        &cache,
        &["fetch", "--checksum", &sum, &url, dest.to_str().unwrap()],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let key = key_of(&url);
    let leftover = cache.join("incomplete").join(&key);
    let note = cache.join("incomplete").join(format!("{key}.resume"));
    assert!(
        wait_len(&leftover, at as u64, Duration::from_secs(30)),
        "the download never reached {at} bytes"
    );
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert_eq!(std::fs::metadata(&leftover).unwrap().len(), at as u64);
    assert!(note.exists(), "the resume note is kept beside the leftover");
    assert!(!dest.exists());
    Killed {
        _dir: dir,
        cache,
        origin,
        url,
        body,
        sum,
        leftover,
        note,
    }
}

#[test]
fn kill_9_of_fetch_then_fetch_again_resumes_with_a_range_request() {
    let at = 3 << 20;
    let k = killed_mid_download(at);
    let dest = k.cache.parent().unwrap().join("d2");
    let out = run(
        &k.cache,
        &[
            "fetch",
            "--json",
            "--checksum",
            &k.sum,
            &k.url,
            dest.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["outcome"], "downloaded");
    assert_eq!(
        report["checksum"],
        k.sum.as_str(),
        "verified over every byte"
    );
    assert!(std::fs::read(&dest).unwrap() == k.body, "the exact image");
    let log = k.origin.log("/images/disk.img");
    assert_eq!(log.len(), 3, "killed GET, fresh GET, one Range: {log:?}");
    assert_eq!(log[2].range.as_deref(), Some(&*format!("bytes={at}-")));
    assert_eq!(log[2].if_range.as_deref(), Some("\"v1\""));
    assert_eq!(log[2].status, 206);
    eprintln!(
        "resumed after kill -9 at byte {at} of {}: {} bytes fetched again",
        k.body.len(),
        k.body.len() - at
    );
    assert!(
        !k.leftover.exists() && !k.note.exists(),
        "nothing left behind"
    );
}

#[test]
fn clean_removes_a_stale_leftover_and_its_note() {
    let k = killed_mid_download(1 << 20);
    // Within the stall time, the leftover is kept for a resume.
    let out = run(&k.cache, &["clean", "--stall-time", "1h"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(k.leftover.exists() && k.note.exists());
    let out = run(&k.cache, &["clean", "--stall-time", "0s"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!k.leftover.exists(), "stale leftover removed");
    assert!(!k.note.exists(), "its note removed with it");
}
