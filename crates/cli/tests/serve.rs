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

/// `imgcache serve ARGS` with only `PATH` and `env` in its environment, stdout and stderr
/// piped.
fn spawn_serve(
    cache: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_imgcache"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .arg("--cache-dir")
        .arg(cache)
        .arg("serve")
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// A unix datagram socket standing in for systemd's notify socket, and its path.
fn notify_socket(dir: &std::path::Path) -> (std::os::unix::net::UnixDatagram, String) {
    let path = dir.join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    (sock, path.to_str().unwrap().to_string())
}

/// The datagrams waiting on `sock`, without blocking.
fn pending_datagrams(sock: &std::os::unix::net::UnixDatagram) -> Vec<String> {
    sock.set_nonblocking(true).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = sock.recv(&mut buf) {
        out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    sock.set_nonblocking(false).unwrap();
    out
}

/// The next datagram on `sock`, waiting at most `timeout`.
fn next_datagram(sock: &std::os::unix::net::UnixDatagram, timeout: Duration) -> String {
    sock.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = [0u8; 4096];
    let n = sock
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no notification within {timeout:?}: {e}"));
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Runs `imgcache serve ARGS` to its exit (it must fail at start) and returns its stdout and
/// stderr; with `NOTIFY_SOCKET` set, asserts no readiness was ever sent.
fn serve_fails(cache: &std::path::Path, args: &[&str]) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let (sock, path) = notify_socket(dir.path());
    let child = spawn_serve(cache, args, &[("NOTIFY_SOCKET", &path)]);
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        !out.status.success(),
        "serve {args:?} started: {stdout}{stderr}"
    );
    assert!(
        !stdout.contains("serving") && !stderr.contains("serving on"),
        "serve {args:?} announced it was serving before failing:\n{stdout}\n{stderr}"
    );
    let sent = pending_datagrams(&sock);
    assert!(
        sent.iter().all(|d| !d.contains("READY=1")),
        "READY=1 sent by a serve that failed: {sent:?}"
    );
    (stdout, stderr)
}

/// Issue 13: `serve` said "serving on" before it had opened the TLS files or the cache, then
/// failed. Each start-up failure now ends it with one clear line, before any "serving" and
/// any readiness notification.
#[test]
fn start_up_failures_never_say_serving() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let cache = dir.path().join("cache");
    let listen = ["--listen", "127.0.0.1:0"];

    // A certificate file that does not exist.
    let missing = dir.path().join("missing.pem");
    let missing = missing.to_str().unwrap();
    let (_, err) = serve_fails(
        &cache,
        &[&listen[..], &["--tls-cert", missing, "--tls-key", missing]].concat(),
    );
    assert!(
        err.contains(&format!("imgcache: TLS certificate {missing}")),
        "{err}"
    );

    // Files that are there but hold no certificate / no key.
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    let junk = junk.to_str().unwrap();
    let (_, err) = serve_fails(
        &cache,
        &[&listen[..], &["--tls-cert", junk, "--tls-key", junk]].concat(),
    );
    assert!(
        err.contains(&format!("TLS certificate {junk}: no certificate found")),
        "{err}"
    );

    // A cache directory that cannot be created: its parent is a regular file.
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let (_, err) = serve_fails(&file.join("cache"), &listen);
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("imgcache: ") && last.contains("a-file/cache"),
        "no clear error naming the directory: {err}"
    );

    // A listen address that does not resolve (a `.invalid` name never does).
    let (_, err) = serve_fails(&cache, &["--listen", "nosuch.invalid:9292"]);
    assert!(
        err.contains("imgcache: listen on nosuch.invalid:9292"),
        "{err}"
    );
}

/// Waits for `imgcache: serving on SCHEME://ADDR` on `child`'s stdout and returns ADDR.
fn serving_addr(child: &mut std::process::Child) -> String {
    use std::io::BufRead;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    line.trim()
        .strip_prefix("imgcache: serving on http://")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string()
}

/// Stops `child` with SIGTERM and waits (bounded) for a clean exit.
fn stop(child: std::process::Child) {
    assert_eq!(sigterm(child.id() as i32), 0);
    stop_waited(child);
}

/// Issue 13: `--listen localhost:9292` was refused. Host names are resolved (flag, variable
/// and config file alike), IPv6 addresses go in brackets, and a malformed address is a usage
/// error naming the expected form.
#[test]
fn listen_takes_host_names_and_ipv6() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let cache = dir.path().join("cache");

    let mut child = spawn_serve(&cache, &["--listen", "localhost:0"], &[]);
    let addr = serving_addr(&mut child);
    let resolved: Vec<std::net::SocketAddr> =
        std::net::ToSocketAddrs::to_socket_addrs("localhost:0")
            .unwrap()
            .collect();
    let got: std::net::SocketAddr = addr.parse().unwrap();
    assert!(
        resolved.iter().any(|a| a.ip() == got.ip()),
        "bound {got}, localhost is {resolved:?}"
    );
    assert_eq!(request(&addr, "GET", "/healthz", &[]).0, 200);
    stop(child);

    let mut child = spawn_serve(&cache, &["--listen", "[::1]:0"], &[]);
    let addr = serving_addr(&mut child);
    assert!(addr.starts_with("[::1]:"), "{addr}");
    assert_eq!(request(&addr, "GET", "/healthz", &[]).0, 200);
    stop(child);

    // The same through the config file.
    let config = dir.path().join("imgcache.toml");
    std::fs::write(&config, "listen = \"localhost:0\"\n").unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_imgcache"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .arg("--config")
        .arg(&config)
        .arg("--cache-dir")
        .arg(&cache)
        .arg("serve")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let addr = serving_addr(&mut child);
    assert_eq!(request(&addr, "GET", "/healthz", &[]).0, 200);
    stop(child);

    for bad in [
        "localhost",
        "::1:9292",
        "local host:9292",
        "localhost:99999",
        ":9292",
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_imgcache"))
            .env_clear()
            .arg("--cache-dir")
            .arg(&cache)
            .args(["serve", "--listen", bad])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {err}");
        assert!(err.contains("invalid listen address"), "{bad}: {err}");
        assert!(err.contains("expected HOST:PORT"), "{bad}: {err}");
    }
}

/// Under systemd (`Type=notify`): `READY=1` arrives on `NOTIFY_SOCKET` once the port accepts
/// connections (never before: the listener is bound and the cache open by then), and
/// `STOPPING=1` when SIGTERM begins the shutdown.
#[test]
fn readiness_and_stopping_are_sent_to_systemd() {
    let dir = tempfile::tempdir().unwrap();
    let (sock, path) = notify_socket(dir.path());
    // A port to ask for, so the test can connect the moment READY=1 arrives.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let mut child = spawn_serve(
        &dir.path().join("cache"),
        &["--listen", &listen],
        &[("NOTIFY_SOCKET", &path)],
    );
    let ready = next_datagram(&sock, Duration::from_secs(60));
    // The port accepts at once: no retry, no wait.
    let conn = TcpStream::connect(&listen);
    assert!(
        conn.is_ok(),
        "READY=1 came before the port accepted: {conn:?}"
    );
    drop(conn);
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    assert!(
        ready
            .lines()
            .any(|l| l == format!("STATUS=serving on http://{listen}")),
        "{ready:?}"
    );
    assert_eq!(serving_addr(&mut child), listen, "stdout says the same");
    assert_eq!(request(&listen, "GET", "/healthz", &[]).0, 200);
    assert!(
        pending_datagrams(&sock).is_empty(),
        "one notification while serving"
    );

    assert_eq!(sigterm(child.id() as i32), 0);
    let stopping = next_datagram(&sock, Duration::from_secs(20));
    assert_eq!(stopping.trim_end(), "STOPPING=1");
    stop_waited(child);
}

/// Waits (bounded) for `child`, already signalled, to exit cleanly.
fn stop_waited(mut child: std::process::Child) {
    let until = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < until, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
}

/// Issue 13: `--config`'s help named 4 keys of 15. It is built from the settings table, so it
/// names every key: checked here against README.md's configuration table (which a unit test
/// checks against the settings table), in `-h` and `--help` alike.
#[test]
fn config_help_lists_every_key() {
    let readme = include_str!("../../../README.md");
    let keys: Vec<&str> = readme
        .lines()
        .skip_while(|l| !l.starts_with("| Setting | TOML key |"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            let cell = l.split('|').nth(2).unwrap();
            cell.split('`').nth(1).unwrap()
        })
        .collect();
    assert!(keys.len() >= 20, "{keys:?}");
    for flag in ["-h", "--help"] {
        let out = Command::new(env!("CARGO_BIN_EXE_imgcache"))
            .arg(flag)
            .output()
            .unwrap();
        assert!(out.status.success());
        let help = String::from_utf8(out.stdout).unwrap();
        // The --config entry alone: up to the next option.
        let config = &help[help.find("--config <FILE>").expect("--config in help")..];
        let end = ["\n  -", "\n      --"]
            .iter()
            .filter_map(|next| config.find(next))
            .min()
            .unwrap_or(config.len());
        let config = &config[..end];
        for key in &keys {
            assert!(config.contains(key), "{flag}: {key} missing:\n{help}");
        }
        assert!(config.contains("[caches.NAME]"), "{help}");
    }
}
