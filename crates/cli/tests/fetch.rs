//! `imgcache fetch`, `cleanup` and `caches` through the real binary, against a small origin
//! served from a thread in this test (std only: one connection at a time is all it needs).

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use imgcache_store::{Algorithm, Integrity};
use serde_json::Value;

/// Serves `body` at any path with an ETag (304 on a matching If-None-Match) and counts
/// requests; `/missing` is a 404. Returns the base URL and the counter.
fn origin(body: Vec<u8>) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            c.fetch_add(1, Ordering::SeqCst);
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            let _ = reader.read_line(&mut request_line);
            let mut etag_match = false;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if line.to_ascii_lowercase().starts_with("if-none-match:")
                    && line.contains("\"v1\"")
                {
                    etag_match = true;
                }
            }
            let _ = if request_line.contains("/missing") {
                stream.write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                )
            } else if etag_match {
                stream.write_all(
                    b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\nConnection: close\r\n\r\n",
                )
            } else {
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nETag: \"v1\"\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                stream
                    .write_all(head.as_bytes())
                    .and_then(|_| stream.write_all(&body))
            };
        }
    });
    (url, count)
}

fn imgcache(cache: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_imgcache"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .arg("--cache-dir")
        .arg(cache)
        .args(args)
        .output()
        .unwrap()
}

fn json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn image(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[test]
fn fetch_downloads_once_then_links() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let cache = dir.path().join("cache");
    let body = image(3 << 20);
    let (base, count) = origin(body.clone());
    let url = format!("{base}/images/a.img");
    let sum = Integrity::of(Algorithm::Sha256, &body).to_string();
    let d1 = dir.path().join("d1");
    let d2 = dir.path().join("d2");

    let first = json(&imgcache(
        &cache,
        &[
            "fetch",
            "--json",
            "--checksum",
            &sum,
            &url,
            d1.to_str().unwrap(),
        ],
    ));
    assert_eq!(first["outcome"], "downloaded");
    assert_eq!(first["placement"], "hard_linked");
    assert_eq!(first["checksum"], sum.as_str());
    // Ironic's key for a URL: uuid5(NAMESPACE_URL, href).
    assert_eq!(
        first["key"].as_str().unwrap(),
        uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, url.as_bytes()).to_string()
    );
    assert_eq!(fs::read(&d1).unwrap(), body);
    assert_eq!(count.load(Ordering::SeqCst), 1);

    let second = json(&imgcache(
        &cache,
        &[
            "fetch",
            "--json",
            "--revalidate-interval",
            "1h",
            &url,
            d2.to_str().unwrap(),
        ],
    ));
    assert_eq!(second["outcome"], "hit");
    assert_eq!(
        count.load(Ordering::SeqCst),
        1,
        "a master checked within the interval asks the origin nothing"
    );
    assert_eq!(
        fs::metadata(&d1).unwrap().ino(),
        fs::metadata(&d2).unwrap().ino()
    );
    assert_eq!(
        fs::metadata(&d1).unwrap().nlink(),
        3,
        "master + two deploys"
    );

    let third = json(&imgcache(
        &cache,
        &["fetch", "--json", &url, d2.to_str().unwrap()],
    ));
    assert_eq!(third["outcome"], "revalidated");
    assert_eq!(
        count.load(Ordering::SeqCst),
        2,
        "by default every call asks: one conditional GET, answered 304"
    );

    // Linked masters are in use: cleanup keeps them, whatever the amount asked.
    let cleaned = json(&imgcache(&cache, &["cleanup", "--json", "--amount", "1G"]));
    assert_eq!(cleaned[0]["cache"], "default");
    assert_eq!(cleaned[0]["evicted"].as_array().unwrap().len(), 0);
    assert_eq!(cleaned[0]["skipped_in_use"].as_array().unwrap().len(), 1);
    // Once the deploys are gone, it goes.
    fs::remove_file(&d1).unwrap();
    fs::remove_file(&d2).unwrap();
    let cleaned = json(&imgcache(&cache, &["cleanup", "--json", "--amount", "1"]));
    assert_eq!(cleaned[0]["bytes_freed"], body.len() as u64);
}

#[test]
fn fetch_errors_are_one_line_and_publish_nothing() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let cache = dir.path().join("cache");
    let body = image(1 << 20);
    let (base, _) = origin(body.clone());
    let dest = dir.path().join("d");
    let bad_sum = Integrity::of(Algorithm::Sha256, b"other").to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![format!("{base}/a.img"), "--checksum".into(), bad_sum],
            "checksum mismatch",
        ),
        (vec![format!("{base}/missing")], "answered 404"),
        (vec!["ftp://x/y.img".into()], "unsupported href scheme"),
        (
            vec!["file:///etc/shadow".into()],
            "not under an allowed file directory",
        ),
        (
            vec!["6a2b5b54-2d8c-4d6a-9f4e-0c1b2c3d4e5f".into()],
            "no Glance endpoint configured",
        ),
    ];
    for (extra, want) in cases {
        let mut args = vec!["fetch".to_string()];
        args.extend(extra);
        args.push(dest.to_str().unwrap().into());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = imgcache(&cache, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(!dest.exists(), "no dest after {args:?}");
    }
    let list = json(&imgcache(&cache, &["list", "--json"]));
    assert_eq!(list.as_array().unwrap().len(), 0, "nothing published");
    // A dest in a missing directory fails before the origin is asked.
    let out = imgcache(
        &cache,
        &[
            "fetch",
            &format!("{base}/a.img"),
            dir.path().join("no/such/dir/x").to_str().unwrap(),
        ],
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("destination"));
}

#[test]
fn caches_lists_named_caches_from_the_config() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let cache = dir.path().join("cache");
    let config = dir.path().join("imgcache.toml");
    fs::write(
        &config,
        format!(
            "[caches.iso]\ndir = {:?}\npriority = 75\n[caches.tftp]\ndir = {:?}\npriority = 25\nmax_size = \"1G\"\nttl = \"1d\"\n",
            dir.path().join("iso"),
            dir.path().join("tftp"),
        ),
    )
    .unwrap();
    let rows = json(&imgcache(
        &cache,
        &["--config", config.to_str().unwrap(), "caches", "--json"],
    ));
    let names: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["iso", "default", "tftp"], "highest priority first");
    assert_eq!(rows[2]["max_size"], 1u64 << 30);
    assert_eq!(rows[2]["ttl_seconds"], 86400);
    assert!(rows[0]["free"].as_u64().unwrap() > 0);
    let out = imgcache(
        &cache,
        &[
            "--config",
            config.to_str().unwrap(),
            "cleanup",
            "--cache",
            "nope",
        ],
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("no cache named \"nope\""));
}
