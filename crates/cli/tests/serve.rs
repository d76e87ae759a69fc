//! `imgcache serve` as an operator runs it: the real binary, the embedded SQLite default, no
//! other set-up; an image fetched through it from an origin in this test, the cache API,
//! metrics, and a clean exit on SIGTERM.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::atomic::Ordering;

use common::{origin, origin_paced, serve, sigterm};
use std::time::{Duration, Instant};

/// A minimal HTTP/1.1 client (no dependency for one GET): status, headers, body.
fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req += &format!("{k}: {v}\r\n");
    }
    req += "\r\n";
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let mut body = raw[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    (status, head, body)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let nl = b.windows(2).position(|w| w == b"\r\n").unwrap();
        let len = usize::from_str_radix(std::str::from_utf8(&b[..nl]).unwrap().trim(), 16).unwrap();
        if len == 0 {
            return out;
        }
        out.extend_from_slice(&b[nl + 2..nl + 2 + len]);
        b = &b[nl + 2 + len + 2..];
    }
}

#[test]
fn serve_caches_an_image_and_stops_on_sigterm() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let cache = dir.path().join("cache");
    let body: Vec<u8> = (0..(2u32 << 20)).map(|i| (i % 251) as u8).collect();
    let (base, count) = origin(body.clone());
    let mut server = serve(
        &cache,
        "http",
        &["--allow-href-prefix", &base, "--admin-token", "s3cret"],
    );
    let addr = server.addr.clone();

    let (status, _, health) = request(&addr, "GET", "/healthz", &[]);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&health));

    let path = format!("/v1/fetch?href={base}/img.raw");
    for round in 0..2 {
        let (status, head, got) = request(&addr, "GET", &path, &[]);
        assert_eq!(status, 200, "round {round}: {head}");
        assert_eq!(got, body, "round {round}");
    }
    assert_eq!(count.load(Ordering::SeqCst), 1, "the second GET is a hit");
    let (status, _, _) = request(&addr, "GET", "/v1/fetch?href=http://elsewhere/x", &[]);
    assert_eq!(status, 403, "not an open proxy");

    // The cache API lists it (admin token), and refuses without one.
    let (status, _, list) = request(&addr, "GET", "/v2/cache", &[("X-Auth-Token", "s3cret")]);
    assert_eq!(status, 200);
    let list: serde_json::Value = serde_json::from_slice(&list).unwrap();
    let cached = list["cached_images"].as_array().unwrap();
    assert_eq!(cached.len(), 1);
    assert_eq!(cached[0]["size"], body.len() as u64);
    assert_eq!(cached[0]["hits"], 1);
    assert_eq!(request(&addr, "GET", "/v2/cache", &[]).0, 401);

    let (_, _, metrics) = request(&addr, "GET", "/metrics", &[]);
    let metrics = String::from_utf8(metrics).unwrap();
    assert!(metrics.contains("imgcache_cache_hits_total 1"), "{metrics}");
    assert!(
        metrics.contains("imgcache_cache_misses_total 1"),
        "{metrics}"
    );

    // SIGTERM: a clean, prompt exit.
    let pid = server.child.id() as i32;
    assert_eq!(sigterm(pid), 0);
    let started = Instant::now();
    let status = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    // The published image survives the restart-less stop, readable by the CLI.
    let out = Command::new(env!("CARGO_BIN_EXE_imgcache"))
        .arg("--cache-dir")
        .arg(&cache)
        .args(["list", "--json"])
        .output()
        .unwrap();
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);
}

#[test]
fn a_miss_and_a_hit_are_counted_once_each_even_when_the_fill_is_instant() {
    // A file:// source is hard-linked into the cache: the fill is published before the first
    // request even looks at it. That request is still one miss, not a miss and a hit.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    let body: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 253) as u8).collect();
    std::fs::write(images.join("a.img"), &body).unwrap();
    let prefix = format!("file://{}/", images.display());
    let server = serve(
        &dir.path().join("cache"),
        "http",
        &[
            "--allow-href-prefix",
            &prefix,
            "--allow-file-dir",
            images.to_str().unwrap(),
        ],
    );
    let path = format!("/v1/fetch?href={prefix}a.img");
    for round in 0..2 {
        let (status, head, got) = request(&server.addr, "GET", &path, &[]);
        assert_eq!(status, 200, "round {round}: {head}");
        assert_eq!(got, body);
    }
    let (_, _, metrics) = request(&server.addr, "GET", "/metrics", &[]);
    let metrics = String::from_utf8(metrics).unwrap();
    assert!(
        metrics.contains("imgcache_cache_misses_total 1"),
        "{metrics}"
    );
    assert!(metrics.contains("imgcache_cache_hits_total 1"), "{metrics}");
    // The record agrees (Glance's `hits` in /v2/cache): one hit, the second request.
    let cache =
        imgcache_store::Cache::open(dir.path().join("cache"), imgcache_store::DriverKind::Sqlite)
            .unwrap();
    let hits: Vec<u64> = cache
        .get_cached_images()
        .unwrap()
        .iter()
        .map(|r| r.hits)
        .collect();
    assert_eq!(hits, [1]);
}

/// Two processes, one download: an `imgcache fetch` is pulling an image when a client asks
/// `imgcache serve` (same cache directory) for it. The server streams the fetch's file to the
/// client while it is written, the origin sees one request, and both get the exact bytes.
#[test]
fn serve_streams_a_download_another_process_is_running() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let cache = dir.path().join("cache");
    let body: Vec<u8> = (0..(8u32 << 20)).map(|i| (i % 251) as u8).collect();
    // About 1.6 s for the whole body.
    let (url, count) = origin_paced(body.clone(), 256 << 10, Duration::from_millis(50));
    let href = format!("{url}/images/a.img");
    let server = serve(&cache, "http", &["--allow-href-prefix", &url]);
    let dest = dir.path().join("a.img");
    let mut fetch = Command::new(env!("CARGO_BIN_EXE_imgcache"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .arg("--cache-dir")
        .arg(&cache)
        .args(["fetch", "-q", &href])
        .arg(&dest)
        .spawn()
        .unwrap();
    // Wait for the fetch's file to have bytes.
    let incomplete = cache.join("incomplete");
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until
        && !std::fs::read_dir(&incomplete).is_ok_and(|d| {
            d.flatten()
                .any(|e| e.metadata().is_ok_and(|m| m.is_file() && m.len() > 0))
        })
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut s = TcpStream::connect(&server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET /v1/fetch?href={href} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut fetch_running_at_first_bytes = None;
    loop {
        let n = s.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        if fetch_running_at_first_bytes.is_none()
            && let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n")
            && raw.len() > split + 4
        {
            fetch_running_at_first_bytes = Some(fetch.try_wait().unwrap().is_none());
        }
    }
    assert!(fetch.wait().unwrap().success(), "imgcache fetch failed");
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut got = raw[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        got = dechunk(&got);
    }
    assert!(got == body, "the client's bytes differ");
    assert_eq!(
        fetch_running_at_first_bytes,
        Some(true),
        "the client got bytes while the other process was still downloading"
    );
    assert_eq!(std::fs::read(&dest).unwrap(), body);
    assert_eq!(count.load(Ordering::SeqCst), 1, "one origin request in all");
}

/// Logs written to a file or a pipe carry no ANSI colour codes (issue 13: journald and log
/// files showed `\x1b[32m`).
#[test]
fn logs_to_a_pipe_have_no_colour_codes() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_imgcache"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .arg("--cache-dir")
        .arg(dir.path().join("cache"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 1];
    // The first stdout byte comes once it serves (after its start-up log lines).
    child.stdout.take().unwrap().read_exact(&mut first).unwrap();
    common::sigterm(child.id() as i32);
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    child.wait().unwrap();
    assert!(err.contains("startup check"), "{err}");
    assert!(!err.contains('\u{1b}'), "ANSI codes in piped logs: {err:?}");
}
