//! The status page `/ui/`: admin-only (header, or the cookie the login form sets), its JSON
//! model, and the page itself in a real browser (headless Chromium from Debian's `chromium`)
//! while a slow download runs.

mod common;
mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::serve;
use imgcache_testkit::origin::Origin;
use support::{header, http, tempdir};

const TOKEN: &str = "ui-s3cret";
const T: Duration = Duration::from_secs(30);

fn json(addr: &str, headers: &[(&str, &str)]) -> (u16, serde_json::Value) {
    let r = http(addr, "GET", "/ui/status.json", headers, T).unwrap();
    let v = serde_json::from_slice(&r.body).unwrap_or(serde_json::Value::Null);
    (r.status, v)
}

/// `POST path` with a form body, on a fresh connection: (status, head, body).
fn post_form(addr: &str, path: &str, body: &str) -> (u16, String, String) {
    post_form_with(addr, path, body, "")
}

/// [`post_form`] with extra header lines (each ending in `\r\n`).
fn post_form_with(addr: &str, path: &str, body: &str, extra: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{extra}\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.to_string(), body.to_string())
}

#[test]
fn status_needs_the_admin_token_in_the_header_or_the_login_cookie() {
    let dir = tempdir();
    let cache = dir.path().join("cache");
    let server = serve(&cache, "http", &["--admin-token", TOKEN]);
    let addr = server.addr.as_str();

    // No token: the JSON is a 401, the page the login form.
    assert_eq!(json(addr, &[]).0, 401);
    let page = http(addr, "GET", "/ui/", &[], T).unwrap();
    assert_eq!(page.status, 401);
    let html = String::from_utf8_lossy(&page.body);
    assert!(
        html.contains("<form id=\"login\" method=\"post\" action=\"/ui/login\""),
        "{html}"
    );
    assert!(html.contains("name=\"token\""), "{html}");
    assert!(html.contains("name=viewport") || html.contains("name=\"viewport\""));
    assert!(header(&page.head, "content-security-policy").is_some());

    // A wrong token, as the header or as the cookie: 401 again.
    assert_eq!(json(addr, &[("X-Auth-Token", "nope")]).0, 401);
    assert_eq!(json(addr, &[("Cookie", "imgcache_admin=nope")]).0, 401);
    let page = http(addr, "GET", "/ui/", &[("Cookie", "imgcache_admin=nope")], T).unwrap();
    assert_eq!(page.status, 401);
    assert!(String::from_utf8_lossy(&page.body).contains("id=\"login\""));

    // The right header: the model, every part of it.
    let (status, v) = json(addr, &[("X-Auth-Token", TOKEN)]);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["cache"]["bytes"], 0);
    assert_eq!(v["cache"]["entries"], 0);
    assert_eq!(v["cache"]["max_bytes"], 10u64 << 30);
    assert_eq!(v["traffic"]["hits"], 0);
    assert_eq!(v["traffic"]["misses"], 0);
    assert!(v["traffic"]["hit_ratio"].is_null());
    assert_eq!(v["traffic"]["bytes_from_cache"], 0);
    assert_eq!(v["traffic"]["bytes_from_origin"], 0);
    assert_eq!(v["downloads"], serde_json::json!([]));
    assert_eq!(v["queue"]["length"], 0);
    assert_eq!(v["recent"], serde_json::json!([]));
    assert_eq!(v["largest"], serde_json::json!([]));
    assert_eq!(v["events"], serde_json::json!([]));
    assert!(v["fleet"].is_null(), "not in fleet mode");

    // The login form: a wrong token is the form again, the right one a cookie and a
    // redirect to the page.
    let (status, _, body) = post_form(addr, "/ui/login", "token=nope");
    assert_eq!(status, 401);
    assert!(body.contains("not an admin token"), "{body}");
    let (status, head, _) = post_form(addr, "/ui/login", &format!("token={TOKEN}"));
    assert_eq!(status, 303, "{head}");
    assert_eq!(header(&head, "location").as_deref(), Some("/ui/"));
    let cookie = header(&head, "set-cookie").expect("a session cookie");
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/ui"] {
        assert!(cookie.contains(attr), "{cookie}");
    }
    let pair = cookie.split(';').next().unwrap().to_string();
    // The cookie names a session; the token never leaves the server.
    let id = pair
        .strip_prefix("imgcache_admin=")
        .expect("the session cookie");
    assert!(!cookie.contains(TOKEN), "{cookie}");
    assert!(
        id.len() >= 32 && id.chars().all(|c| c.is_ascii_hexdigit()),
        "{id}"
    );
    let (status, v) = json(addr, &[("Cookie", &pair)]);
    assert_eq!(status, 200, "{v}");
    let page = http(addr, "GET", "/ui/", &[("Cookie", &pair)], T).unwrap();
    assert_eq!(page.status, 200);
    let html = String::from_utf8_lossy(&page.body);
    assert!(
        html.contains("/ui/page.js") && html.contains("id=\"downloads\""),
        "{html}"
    );
    // The assets need no token (they hold no data) and are the binary's own.
    let js = http(addr, "GET", "/ui/page.js", &[], T).unwrap();
    assert_eq!(js.status, 200);
    assert!(String::from_utf8_lossy(&js.body).contains("/ui/status.json"));
    // Logging out clears the cookie and ends the session: the old cookie is refused.
    let (status, head, _) = post_form_with(addr, "/ui/logout", "", &format!("Cookie: {pair}\r\n"));
    assert_eq!(status, 303);
    assert!(header(&head, "set-cookie").unwrap().contains("Max-Age=0"));
    let (status, v) = json(addr, &[("Cookie", &pair)]);
    assert_eq!(status, 401, "{v}");
    assert!(v.to_string().contains("session ended"), "{v}");
}

/// The Chromium binary; with `CI=true` a missing one fails the test.
fn chromium() -> Option<PathBuf> {
    let found = ["chromium", "chromium-browser"]
        .iter()
        .find_map(|name| imgcache_testkit::cmd::on_path(name));
    if found.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "chromium is missing (apt-get install chromium): the browser test cannot be skipped in CI"
        );
        eprintln!("chromium not found: skipping the browser test");
    }
    found
}

/// Serves, at any path, a page that logs in to `target`'s status page by posting its form
/// (the way a person would; same site as `target`, so the Strict cookie then goes along).
fn login_helper(target: &str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    let page = format!(
        "<!doctype html><form method=post action=\"http://{target}/ui/login\">\
         <input name=token value=\"{TOKEN}\"></form><script>document.forms[0].submit()</script>"
    );
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
            }
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{page}",
                page.len()
            );
        }
    });
    url
}

/// Runs headless Chromium on `url` with a fresh profile: its stdout (the DOM with
/// `--dump-dom`). Killed after a minute.
fn browse(chromium: &Path, profile: &Path, url: &str, args: &[&str]) -> String {
    let log = profile.with_extension("log");
    let mut child = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            "--virtual-time-budget=4000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start chromium");
    let mut out = String::new();
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let _ = stdout.read_to_string(&mut out);
        out
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "chromium did not finish within a minute: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = reader.join().unwrap();
    assert!(
        status.success(),
        "chromium failed ({status}): {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    out
}

/// The value of attribute `name` in the first tag of `dom` that has `marker`.
fn attr(dom: &str, marker: &str, name: &str) -> Option<String> {
    let at = dom.find(marker)?;
    let start = dom[..=at].rfind('<')?;
    let tag = &dom[start..start + dom[start..].find('>')?];
    let key = format!("{name}=\"");
    let v = &tag[tag.find(&key)? + key.len()..];
    Some(v[..v.find('"')?].to_string())
}

#[test]
fn the_page_shows_a_slow_download_moving_in_a_real_browser() {
    let Some(chromium) = chromium() else { return };
    let dir = tempdir();
    let cache = dir.path().join("cache");
    // 48 MiB at about 1.3 MiB/s: it outlasts the three page loads.
    let body: Vec<u8> = (0..(48u32 << 20)).map(|i| (i % 253) as u8).collect();
    let total = body.len() as u64;
    let origin = Origin::temp();
    origin.put("/slow.raw", &body);
    origin.throttle("/slow.raw", 64 << 10, Duration::from_millis(50));
    let base = origin.url.clone();
    let server = serve(
        &cache,
        "http",
        &["--admin-token", TOKEN, "--allow-href-prefix", &base],
    );
    let addr = server.addr.clone();
    let href = format!("{base}/slow.raw");
    // Three clients of the same image: one download. The third (curl) gives up after 3 s.
    for _ in 0..2 {
        let (addr, path) = (addr.clone(), format!("/v1/fetch?href={href}"));
        std::thread::spawn(move || {
            let _ = http(&addr, "GET", &path, &[], Duration::from_secs(300));
        });
    }
    let impatient = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "--max-time", "3"])
        .arg(format!("http://{addr}/v1/fetch?href={href}"))
        .spawn()
        .expect("curl");
    // Wait (with a deadline) until the download streams and all three clients are on it.
    let clients_are = |n: u64| {
        let deadline = Instant::now() + T;
        loop {
            let (_, v) = json(&addr, &[("X-Auth-Token", TOKEN)]);
            let d = &v["downloads"][0];
            if d["bytes"].as_u64().unwrap_or(0) > 0 && d["clients"] == n {
                assert_eq!(d["href"], href.as_str());
                assert_eq!(d["total"], total);
                assert_eq!(d["source"], "origin");
                assert!(d["rate"].as_f64().unwrap() > 0.0, "{d}");
                return;
            }
            assert!(Instant::now() < deadline, "not {n} clients streaming: {v}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    clients_are(3);
    // The impatient one leaves mid-way: the count falls.
    let gave_up = impatient.wait_with_output().expect("curl").status;
    assert!(!gave_up.success(), "curl had the whole image in 3 s");
    clients_are(2);

    let login = login_helper(&addr);
    let profiles = tempdir();
    let load = |n: u32| -> u64 {
        let dom = browse(
            &chromium,
            &profiles.path().join(format!("p{n}")),
            &login,
            &["--dump-dom"],
        );
        assert!(
            dom.contains("id=\"downloads\""),
            "not the status page: {dom}"
        );
        let bytes = attr(&dom, "class=\"download\"", "data-bytes")
            .unwrap_or_else(|| panic!("no in-flight row on load {n}: {dom}"));
        assert_eq!(
            attr(&dom, "class=\"download\"", "data-total").as_deref(),
            Some(total.to_string().as_str())
        );
        // The bar says the same as the row.
        assert_eq!(attr(&dom, "<progress", "max"), Some(total.to_string()));
        assert!(dom.contains(&href), "the row names its href");
        assert!(dom.contains("class=\"clients\">2</b> clients<"), "{dom}");
        bytes.parse().unwrap()
    };
    let first = load(1);
    assert!(first > 0 && first < total, "{first}");
    // The second load is a later state: wait until the server has more bytes than the first
    // load showed, then load again.
    let deadline = Instant::now() + T;
    while json(&addr, &[("X-Auth-Token", TOKEN)]).1["downloads"][0]["bytes"]
        .as_u64()
        .unwrap_or(0)
        <= first
    {
        assert!(Instant::now() < deadline, "the download did not move");
        std::thread::sleep(Duration::from_millis(50));
    }
    let second = load(2);
    assert!(second > first, "the progress moved: {first} then {second}");

    // A phone-sized screenshot, kept as the test's artifact.
    let artifacts = Path::new(env!("CARGO_BIN_EXE_imgcache"))
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let png = artifacts.join("ui.png");
    let _ = std::fs::remove_file(&png);
    browse(
        &chromium,
        &profiles.path().join("p3"),
        &login,
        &[
            &format!("--screenshot={}", png.display()),
            "--window-size=412,900",
        ],
    );
    let shot = std::fs::read(&png).expect("a screenshot");
    assert!(shot.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(
        shot.len() > 10_000,
        "an empty-looking screenshot: {} bytes",
        shot.len()
    );
    drop(server);
}

#[test]
fn status_lists_images_evictions_and_refusals_with_their_reasons() {
    let dir = tempdir();
    let cache = dir.path().join("cache");
    let a: Vec<u8> = (0..(2u32 << 20)).map(|i| (i % 241) as u8).collect();
    let b: Vec<u8> = (0..(2u32 << 20)).map(|i| (i % 239) as u8).collect();
    let bad = std::fs::read(imgcache_testkit::bad_images::qcow2_backing_file(dir.path())).unwrap();
    let (oa, ob, obad) = (Origin::temp(), Origin::temp(), Origin::temp());
    oa.put("/a.raw", &a);
    ob.put("/b.raw", &b);
    obad.put("/backing.qcow2", &bad);
    let (origin_a, origin_b, origin_bad) = (oa.url.clone(), ob.url.clone(), obad.url.clone());
    let server = serve(
        &cache,
        "http",
        &[
            "--admin-token",
            TOKEN,
            "--max-size",
            "3M",
            "--allow-href-prefix",
            &origin_a,
            "--allow-href-prefix",
            &origin_b,
            "--allow-href-prefix",
            &origin_bad,
        ],
    );
    let addr = server.addr.as_str();
    let get = |href: &str| http(addr, "GET", &format!("/v1/fetch?href={href}"), &[], T).unwrap();
    let (href_a, href_b) = (format!("{origin_a}/a.raw"), format!("{origin_b}/b.raw"));
    assert_eq!(get(&href_a).status, 200);
    // b does not fit beside a: a is evicted to make room, once a's last reader has closed it
    // (until then b is streamed uncached: ask again, with a deadline).
    let deadline = Instant::now() + T;
    loop {
        assert_eq!(get(&href_b).status, 200);
        let (_, v) = json(addr, &[("X-Auth-Token", TOKEN)]);
        if v["recent"][0]["href"] == href_b.as_str() {
            break;
        }
        assert!(Instant::now() < deadline, "b never cached: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Cut mid-body, a 4xx, or (refused on its first bytes) cut before the head went out.
    let href_bad = format!("/v1/fetch?href={origin_bad}/backing.qcow2");
    if let Ok(refused) = http(addr, "GET", &href_bad, &[], T) {
        assert!(
            !refused.complete || refused.status >= 400,
            "an unsafe image is refused"
        );
    }

    // The refusal is counted once the download has ended: poll (with a deadline) for it.
    let deadline = Instant::now() + T;
    let v = loop {
        let (status, v) = json(addr, &[("X-Auth-Token", TOKEN)]);
        assert_eq!(status, 200);
        if v["events"].as_array().unwrap().len() >= 2 {
            break v;
        }
        assert!(Instant::now() < deadline, "no events: {v}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let events = v["events"].as_array().unwrap();
    let refusal = events.iter().find(|e| e["kind"] == "refusal").expect("{v}");
    assert_eq!(refusal["reason"], "unsafe_image", "{refusal}");
    assert_eq!(refusal["href"], format!("{origin_bad}/backing.qcow2"));
    assert!(
        refusal["detail"].as_str().unwrap().contains("backing"),
        "{refusal}"
    );
    let eviction = events
        .iter()
        .find(|e| e["kind"] == "eviction")
        .expect("{v}");
    assert_eq!(eviction["size"], 2u64 << 20);
    assert!(
        eviction["reason"]
            .as_str()
            .unwrap()
            .starts_with("room for "),
        "{eviction}"
    );
    // Newest first: the refusal came last.
    assert_eq!(events[0]["kind"], "refusal");

    // What is cached: b alone, named by its href.
    assert_eq!(v["cache"]["entries"], 1);
    assert_eq!(v["cache"]["bytes"], 2u64 << 20);
    assert_eq!(v["cache"]["max_bytes"], 3u64 << 20);
    assert_eq!(v["recent"][0]["href"], href_b.as_str());
    assert_eq!(v["largest"][0]["href"], href_b.as_str());
    assert_eq!(v["largest"][0]["size"], 2u64 << 20);
    assert!(v["traffic"]["misses"].as_u64().unwrap() >= 3, "{v}");
    assert!(v["downloads"].as_array().unwrap().is_empty(), "{v}");
}

#[test]
fn the_page_shows_the_fleet_in_a_real_browser() {
    let Some(chromium) = chromium() else { return };
    let pg = imgcache_testkit::postgres::Postgres::start()
        .unwrap_or_else(|e| panic!("PostgreSQL for the fleet section: {e}"));
    let dir = tempdir();
    let cache = dir.path().join("cache");
    let node_url = "http://ui-node.example:9292";
    let server = serve(
        &cache,
        "http",
        &[
            "--admin-token",
            TOKEN,
            "--fleet-db",
            &pg.url(),
            "--fleet-token",
            "fleet-secret",
            "--node-url",
            node_url,
        ],
    );
    let login = login_helper(&server.addr);
    let profiles = tempdir();
    let dom = browse(
        &chromium,
        &profiles.path().join("p"),
        &login,
        &["--dump-dom"],
    );
    assert!(
        dom.contains("id=\"downloads\""),
        "not the status page: {dom}"
    );
    // The section is shown (not `hidden`), names this node, and lists it in the table.
    let section = dom
        .split("<section id=\"fleet\"")
        .nth(1)
        .unwrap_or_else(|| panic!("no fleet section: {dom}"));
    let (open, rest) = section.split_once('>').unwrap();
    assert!(!open.contains("hidden"), "fleet section hidden: {open}");
    let section = rest.split("</section>").next().unwrap();
    assert!(
        section.contains(&format!("this node: {node_url}")),
        "{section}"
    );
    let rows = section.split("<tbody>").nth(1).unwrap();
    assert!(
        rows.contains(&format!("<td class=\"name\">{node_url} (this node)</td>")),
        "{section}"
    );
    assert!(rows.contains(" ago</td>"), "a heartbeat age: {section}");
}
