//! `imgcache serve` as an operator runs it: the real binary, the embedded SQLite default, no
//! other set-up; an image fetched through it from an origin in this test, the cache API,
//! metrics, and a clean exit on SIGTERM.

mod common;

use common::{serve, sigterm};
use imgcache_testkit::origin::Origin;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

/// A minimal HTTP/1.1 client (no dependency for one GET): status, headers, body.
fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String, Vec<u8>) {
    request_on(
        TcpStream::connect(addr).unwrap(),
        addr,
        method,
        path,
        headers,
    )
}

fn request_on(
    mut s: TcpStream,
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String, Vec<u8>) {
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
    let origin = Origin::temp();
    origin.put("/img.raw", &body);
    let base = origin.url.clone();
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
    assert_eq!(origin.all_requests(), 1, "the second GET is a hit");
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
    let origin = Origin::temp();
    origin.put("/images/a.img", &body);
    origin.throttle("/images/a.img", 256 << 10, Duration::from_millis(50));
    let url = origin.url.clone();
    let href = origin.at("/images/a.img");
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
    assert_eq!(origin.all_requests(), 1, "one origin request in all");
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
    // The last line says it stopped, and that the stop was clean.
    let last = err.trim_end().lines().last().unwrap_or_default();
    assert!(
        last.contains("INFO") && last.contains(": stopped uptime_s="),
        "{err}"
    );
}

/// `request`, also telling the client address the request went from.
fn request_from(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String, Vec<u8>, std::net::SocketAddr) {
    let s = TcpStream::connect(addr).unwrap();
    let local = s.local_addr().unwrap();
    let (status, head, body) = request_on(s, addr, method, path, headers);
    (status, head, body, local)
}

/// A response header's value (the first of that name).
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// promtool from Debian's `prometheus` package: required in CI (`CI=true`), else a test may
/// skip what needs it, saying so.
fn promtool() -> Option<&'static str> {
    let found = Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some("promtool");
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "promtool is missing in CI: .ci/run installs it (Debian's prometheus package)"
    );
    eprintln!(
        "SKIPPED the promtool checks: promtool is not installed (apt-get install prometheus)"
    );
    None
}

/// The value of the sample `name{labels}` (labels exactly as rendered, in order).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
}

/// `/metrics` as `curl` gets it, in the classic text format, passes `promtool check metrics`
/// without a word, after a miss, a hit, a 404 and a slow download; the slow download's
/// latency is its whole transfer (the last byte), labelled by the route template.
#[test]
fn metrics_pass_promtool_and_time_downloads_to_the_last_byte() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let body: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
    let fast_origin = Origin::temp();
    fast_origin.put("/a.img", &body);
    let fast = fast_origin.url.clone();
    // 12 pieces 60 ms apart: at least 0.66 s from the first byte to the last.
    let slow_body: Vec<u8> = (0..(96u32 << 10)).map(|i| (i % 241) as u8).collect();
    let slow_origin = Origin::temp();
    slow_origin.put("/slow.img", &slow_body);
    slow_origin.throttle("/slow.img", 8 << 10, Duration::from_millis(60));
    let slow = slow_origin.url.clone();
    let (server, log) = common::serve_logged(
        &dir.path().join("cache"),
        "http",
        &[
            "--allow-href-prefix",
            &fast,
            "--allow-href-prefix",
            &slow,
            "--max-size",
            "64M",
        ],
        &[],
    );
    let addr = server.addr.clone();
    let path = format!("/v1/fetch?href={fast}/a.img");
    for _ in 0..2 {
        let (status, head, got) = request(&addr, "GET", &path, &[]);
        assert_eq!(status, 200, "{head}");
        assert!(got == body);
    }
    assert_eq!(request(&addr, "GET", "/no/such/thing", &[]).0, 404);
    // Path-style, so that its route is a series of its own.
    let slow_path = format!(
        "/v1/fetch/http/{}/slow.img",
        slow.trim_start_matches("http://")
    );
    let t0 = Instant::now();
    let (status, head, got) = request(&addr, "GET", &slow_path, &[]);
    let took = t0.elapsed();
    assert_eq!(status, 200, "{head}");
    assert!(got == slow_body);
    assert!(
        took > Duration::from_millis(600),
        "the origin is throttled: {took:?}"
    );
    // Observed when its body ended: the access-log line is written right after.
    let line = log.wait_for("the slow download", Duration::from_secs(10), |l| {
        l.contains("imgcache::access") && l.contains("/slow.img")
    });
    assert!(line.contains("outcome=miss"), "{line}");

    let (status, head, text) = request(&addr, "GET", "/metrics", &[("Accept", "*/*")]);
    assert_eq!(status, 200);
    assert_eq!(
        header(&head, "content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let text = String::from_utf8(text).unwrap();
    assert!(!text.contains("# EOF"), "no OpenMetrics in 0.0.4");
    if let Some(promtool) = promtool() {
        let mut child = Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!(
            "promtool check metrics: rc {:?}, output {said:?}",
            out.status.code()
        );
        assert!(
            out.status.success() && said.is_empty(),
            "promtool check metrics: {:?}\n{said}\n{text}",
            out.status.code()
        );
    }

    let slow_series = r#"route="/v1/fetch/{*href}",method="GET",status="200""#;
    let bucket = |le: &str| {
        sample(
            &text,
            &format!("imgcache_request_duration_seconds_bucket{{{slow_series},le=\"{le}\"}}"),
        )
    };
    assert_eq!(
        sample(
            &text,
            &format!("imgcache_request_duration_seconds_count{{{slow_series}}}")
        ),
        Some(1.0),
        "{text}"
    );
    // In no bucket up to 0.5 s (its head came at once, its last byte after 0.66 s).
    assert_eq!(bucket("0.25"), Some(0.0), "{text}");
    assert_eq!(bucket("0.5"), Some(0.0), "{text}");
    assert_eq!(bucket("600"), Some(1.0), "{text}");
    assert_eq!(bucket("+Inf"), Some(1.0), "{text}");
    let sum = sample(
        &text,
        &format!("imgcache_request_duration_seconds_sum{{{slow_series}}}"),
    )
    .unwrap();
    assert!(
        sum > 0.6 && sum <= took.as_secs_f64() + 0.05,
        "{sum} against {took:?}"
    );

    // The counter by route, method and status: the miss and the hit share the route.
    for (series, n) in [
        (
            r#"imgcache_requests_total{route="/v1/fetch",method="GET",status="200"}"#,
            2.0,
        ),
        (
            r#"imgcache_requests_total{route="other",method="GET",status="404"}"#,
            1.0,
        ),
        (
            r#"imgcache_requests_total{route="/v1/fetch/{*href}",method="GET",status="200"}"#,
            1.0,
        ),
    ] {
        assert_eq!(sample(&text, series), Some(n), "{series}\n{text}");
    }
    assert!(
        !text.contains("/no/such/thing"),
        "raw paths never become labels"
    );
    // Process, build and configuration.
    for family in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ] {
        let v = sample(&text, family).unwrap_or_else(|| panic!("no {family}:\n{text}"));
        assert!(
            v > 0.0 || family == "process_cpu_seconds_total",
            "{family} {v}"
        );
    }
    assert_eq!(
        sample(
            &text,
            &format!(
                "imgcache_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "imgcache_cache_max_bytes"),
        Some(64.0 * 1048576.0)
    );
    assert_eq!(sample(&text, "imgcache_prefetch_queue_length"), Some(0.0));
    assert_eq!(sample(&text, "imgcache_cache_hits_total"), Some(1.0));
    assert_eq!(sample(&text, "imgcache_cache_misses_total"), Some(2.0));

    // A Prometheus scrape asks for OpenMetrics first, and gets it.
    let (_, head, om) = request(
        &addr,
        "GET",
        "/metrics",
        &[(
            "Accept",
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
             version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
        )],
    );
    assert_eq!(
        header(&head, "content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    let om = String::from_utf8(om).unwrap();
    assert!(om.ends_with("# EOF\n"), "{om}");
    assert!(om.contains("# TYPE imgcache_cache_hits counter\n"), "{om}");
    assert!(om.contains("# TYPE imgcache_build info\n"), "{om}");
}

/// One access-log line per request, in JSON with `--log-format json`: what was asked, the
/// answer, its bytes and time, what it was for the cache, who asked, and the request id the
/// client got.
#[test]
fn the_access_log_has_one_line_per_request() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let body: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
    let origin = Origin::temp();
    origin.put("/a.img", &body);
    let base = origin.url.clone();
    let (server, log) = common::serve_logged(
        &dir.path().join("cache"),
        "http",
        &["--allow-href-prefix", &base, "--log-format", "json"],
        &[],
    );
    let path = format!("/v1/fetch?href={base}/a.img");
    let mut asked = Vec::new();
    for (want_status, want_outcome, p) in [
        (200, "miss", path.as_str()),
        (200, "hit", path.as_str()),
        (404, "none", "/nothing/here"),
        (200, "none", "/healthz"),
    ] {
        let (status, head, got, from) = request_from(&server.addr, "GET", p, &[]);
        assert_eq!(status, want_status, "{p}: {head}");
        let id = header(&head, "x-openstack-request-id").unwrap().to_string();
        asked.push((p.to_string(), status, want_outcome, got.len(), from, id));
    }
    let (status, head, _, from) = request_from(&server.addr, "HEAD", &path, &[]);
    assert_eq!(status, 200);
    let id = header(&head, "x-openstack-request-id").unwrap().to_string();
    asked.push((path.clone(), 200, "hit", 0, from, id));

    assert_eq!(common::sigterm(server.child.id() as i32), 0);
    let lines = log.closed(Duration::from_secs(30));
    let access: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("JSON log lines"))
        .filter(|v| v["target"] == "imgcache::access")
        .collect();
    assert_eq!(
        access.len(),
        asked.len(),
        "one line per request: {lines:#?}"
    );
    for (p, status, outcome, bytes, from, id) in asked {
        let mine: Vec<&serde_json::Value> = access
            .iter()
            .filter(|v| v["fields"]["request_id"] == id.as_str())
            .collect();
        assert_eq!(mine.len(), 1, "request {id}: {access:#?}");
        let f = &mine[0]["fields"];
        assert_eq!(f["path"], p.as_str(), "{f}");
        assert_eq!(f["status"], status, "{f}");
        assert_eq!(f["outcome"], outcome, "{f}");
        assert_eq!(f["bytes"], bytes as u64, "{f}");
        assert_eq!(f["client"], from.to_string(), "{f}");
        assert_eq!(f["complete"], true, "{f}");
        assert!(f["duration_s"].as_f64().unwrap() >= 0.0, "{f}");
        assert!(f["method"] == "GET" || f["method"] == "HEAD", "{f}");
        assert_eq!(mine[0]["level"], "INFO");
    }

    // access_log = false: the same server says nothing per request.
    let (server, log) = common::serve_logged(
        &dir.path().join("cache"),
        "http",
        &["--allow-href-prefix", &base],
        &[("IMGCACHE_ACCESS_LOG", "false")],
    );
    assert_eq!(request(&server.addr, "GET", &path, &[]).0, 200);
    assert_eq!(common::sigterm(server.child.id() as i32), 0);
    let lines = log.closed(Duration::from_secs(30));
    assert!(
        lines.iter().any(|l| l.contains("shutting down")),
        "{lines:#?}"
    );
    assert!(
        !lines.iter().any(|l| l.contains("imgcache::access")),
        "{lines:#?}"
    );
}

/// The shipped alert rules load in Prometheus (`promtool check rules`), and every metric the
/// rules and the Grafana dashboard name is one a live server exposes.
#[test]
fn alert_rules_and_dashboard_name_live_metrics() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let alerts_path = root.join("packaging/prometheus/alerts.yml");
    let dashboard_path = root.join("packaging/grafana/imgcache.json");
    if let Some(promtool) = promtool() {
        let out = Command::new(promtool)
            .args(["check", "rules"])
            .arg(&alerts_path)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        eprintln!("promtool check rules: rc {:?}\n{said}", out.status.code());
        assert!(out.status.success(), "{said}");
        assert!(said.contains("SUCCESS"), "{said}");
    }

    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    let unsafe_image = imgcache_testkit::bad_images::qcow2_backing_file(&images);
    let server = serve(
        &dir.path().join("cache"),
        "http",
        &[
            "--allow-file-dir",
            images.to_str().unwrap(),
            "--allow-href-prefix",
            &format!("file://{}/", images.display()),
        ],
    );
    // Families with labels have samples once something happened: a request, a refusal.
    assert_eq!(request(&server.addr, "GET", "/healthz", &[]).0, 200);
    let refused = format!("/v1/fetch?href=file://{}", unsafe_image.display());
    // Streamed as it downloads, then cut when the inspection refuses it (a refusal on the
    // first bytes can cut it before the head went out: nothing arrives at all).
    let mut s = TcpStream::connect(&server.addr).unwrap();
    write!(
        s,
        "GET {refused} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        server.addr
    )
    .unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let got = match raw.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(end) => &raw[end + 4..],
        None => &raw[..0],
    };
    assert!(got.len() < std::fs::metadata(&unsafe_image).unwrap().len() as usize);
    let (_, _, text) = request(&server.addr, "GET", "/metrics", &[]);
    let text = String::from_utf8(text).unwrap();
    assert_eq!(
        sample(
            &text,
            r#"imgcache_refused_images_total{reason="unsafe_image"}"#
        ),
        Some(1.0),
        "{text}"
    );
    // Every sample name the families give (histograms: _bucket, _sum, _count).
    let mut exposed = std::collections::BTreeSet::new();
    for l in text.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    exposed.insert(format!("{name}{suffix}"));
                }
            } else {
                exposed.insert(name.to_string());
            }
        }
    }
    let names_in = |s: &str| -> Vec<String> {
        s.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .filter(|t| t.starts_with("imgcache_") || t.starts_with("process_"))
            .map(str::to_owned)
            .collect()
    };
    let alerts = std::fs::read_to_string(&alerts_path).unwrap();
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&dashboard_path).unwrap()).unwrap();
    let mut exprs = Vec::new();
    fn collect(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match v {
                        serde_json::Value::String(s) if k == "expr" || k == "definition" => {
                            out.push(s.clone())
                        }
                        _ => collect(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| collect(v, out)),
            _ => {}
        }
    }
    collect(&dashboard, &mut exprs);
    assert!(exprs.len() >= 20, "the dashboard's queries: {exprs:?}");
    let from_alerts = names_in(&alerts);
    let from_dashboard: Vec<String> = exprs.iter().flat_map(|e| names_in(e)).collect();
    for (what, names) in [
        ("alerts.yml", &from_alerts),
        ("imgcache.json", &from_dashboard),
    ] {
        assert!(names.len() >= 5, "{what} names {names:?}");
        for n in names {
            assert!(
                exposed.contains(n),
                "{what} uses {n}, which /metrics does not expose:\n{text}"
            );
        }
    }
    // What the issue asks the alerts to watch.
    for needed in [
        "imgcache_cache_size_bytes",
        "imgcache_cache_max_bytes",
        "imgcache_checksum_failures_total",
        "imgcache_origin_errors_total",
        "imgcache_cache_hits_total",
    ] {
        assert!(
            from_alerts.iter().any(|n| n == needed),
            "alerts.yml lacks {needed}"
        );
    }
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
