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
        // The error is one line; a download that ran also says how far it got.
        let errors: Vec<&str> = err
            .lines()
            .filter(|l| !l.starts_with("imgcache: download: "))
            .collect();
        assert_eq!(errors.len(), 1, "{err}");
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

/// Progress tells time: on a terminal a bar with the total, percentage, rate and ETA (the
/// origin sent Content-Length); on a pipe one line per phase; under `--json` a JSON object.
#[test]
fn progress_shows_the_total_on_a_terminal_and_one_line_per_phase_elsewhere() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let body = image(48 << 20);
    let (base, _) = origin(body.clone());
    let href = format!("{base}/p.img");

    // A pipe: one line, with the total and 100%.
    let cache = dir.path().join("c1");
    let out = imgcache(
        &cache,
        &["fetch", &href, dir.path().join("d1").to_str().unwrap()],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].starts_with("imgcache: download: 48.0 MiB of 48.0 MiB (100%) in "),
        "{err}"
    );
    assert!(!err.contains('\x1b'), "no escape codes on a pipe: {err:?}");

    // --json: the phase as an object.
    let cache = dir.path().join("c2");
    let out = imgcache(
        &cache,
        &[
            "--json",
            "fetch",
            &href,
            dir.path().join("d2").to_str().unwrap(),
        ],
    );
    assert!(out.status.success());
    let phase: Value = serde_json::from_slice(&out.stderr).unwrap();
    assert_eq!(phase["event"], "phase");
    assert_eq!(phase["phase"], "download");
    assert_eq!(phase["bytes"], body.len() as u64);
    assert_eq!(phase["total"], body.len() as u64);

    // A terminal (script(1) gives the command a pty): a bar that knows the total.
    let cache = dir.path().join("c3");
    let cmd = format!(
        "{} --cache-dir {} fetch {href} {}",
        env!("CARGO_BIN_EXE_imgcache"),
        cache.display(),
        dir.path().join("d3").display()
    );
    let out = Command::new("script")
        .args(["-qefc", &cmd, "/dev/null"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("TERM", "xterm")
        .env("NO_COLOR", "1")
        .output()
        .expect("script(1) from util-linux");
    let tty = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{tty}");
    assert!(tty.contains("download"), "{tty:?}");
    assert!(tty.contains("/48.00 MiB"), "the total: {tty:?}");
    assert!(tty.contains('%') && tty.contains("eta"), "{tty:?}");
    assert_eq!(fs::read(dir.path().join("d3")).unwrap(), body);
}

/// Every download's story is logged, once, by the admission pipeline: started, then finished
/// or refused (with the reason).
#[test]
fn downloads_are_logged_started_finished_or_refused() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let cache = dir.path().join("cache");
    let (base, _) = origin(image(1 << 20));
    let run = |href: &str, extra: &[&str], dest: &str| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_imgcache"));
        c.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("IMGCACHE_LOG", "info")
            .arg("--cache-dir")
            .arg(&cache)
            .args(["fetch", "-q", href])
            .args(extra)
            .arg(dir.path().join(dest));
        let out = c.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, log) = run(&format!("{base}/good.img"), &[], "good");
    assert!(ok, "{log}");
    let started: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("download started"))
        .collect();
    assert_eq!(started.len(), 1, "{log}");
    assert!(started[0].contains("size=Some(1048576)"), "{log}");
    let done: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("download finished"))
        .collect();
    assert_eq!(done.len(), 1, "{log}");
    assert!(
        done[0].contains("size=1048576") && done[0].contains("good.img"),
        "{log}"
    );

    let bad = Integrity::of(Algorithm::Sha256, b"other").to_string();
    let (ok, log) = run(&format!("{base}/bad.img"), &["--checksum", &bad], "bad");
    assert!(!ok);
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("download refused"))
        .collect();
    assert_eq!(refused.len(), 1, "{log}");
    assert!(refused[0].contains("reason=\"checksum\""), "{log}");
    assert!(!log.contains("download finished"), "{log}");
}
