//! Issue 10: real Glance and Ironic clients, unchanged and without version flags, through the
//! real `imgcache serve` binary in front of a fake Keystone-protected Glance
//! (`imgcache_testkit::glance`) and a plain HTTP file origin (`imgcache_testkit::origin`).
//!
//! - python-glanceclient's `glance` CLI, openstacksdk and Ironic 39 run as the pip packages
//!   ship them (the Python drivers are in `tests/clients/`); curl for the HTTP semantics,
//!   compared with nginx serving the same file.
//! - Each client family is its own test. A test skips, saying why, only when its client is not
//!   installed; everything else is asserted.
//! - `fake_glance_is_realistic` points the clients at the fakes themselves: if a real client
//!   cannot use a fake, the fake is wrong, and the other tests prove nothing.

mod common;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use common::{Server, serve_env};
use imgcache_testkit::digest::{md5_file, md5_hex, sha256_hex, sha512_hex};
use imgcache_testkit::glance::{self, ADMIN_TOKEN, FakeGlance, MEMBER_TOKEN, Seed};
use imgcache_testkit::origin::Origin;
use imgcache_testkit::{httpdate, image_bytes};
use serde_json::Value;

/// imgcache's own admin token (`--admin-token`).
const LOCAL_ADMIN: &str = "imgcache-local-admin";
/// Everything waited for is bounded by this.
const WAIT: Duration = Duration::from_secs(30);

// ---- Running clients -----------------------------------------------------------------------

fn clients_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients")
}

use imgcache_testkit::cmd::on_path;

/// Whether `python3 -c "import MODULE"` works (the client is installed).
fn py_has(module: &str) -> bool {
    let mut cmd = Command::new("python3");
    cmd.args(["-c", &format!("import {module}")]);
    client_env(&mut cmd, &std::env::temp_dir());
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Skips the calling test (returns from it) with a message when `$cond` is false.
macro_rules! require {
    ($cond:expr, $why:expr) => {
        if !$cond {
            eprintln!("SKIPPED: {}", $why);
            return;
        }
    };
}

use imgcache_testkit::clients::client_env;

struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Out {
    fn json(&self) -> Value {
        assert!(self.ok, "client failed:\n{}\n{}", self.stdout, self.stderr);
        let last = self.stdout.lines().last().unwrap_or("");
        serde_json::from_str(last).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }
}

/// Runs `cmd` to completion (killed after `limit`), echoing what it printed.
fn run(mut cmd: Command, what: &str, limit: Duration) -> Out {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(limit) {
        Ok(out) => out.expect("wait"),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("{what} did not finish in {limit:?}");
        }
    };
    let o = Out {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    eprintln!("$ {what}\n{}{}", o.stdout, o.stderr);
    o
}

/// `glance --os-image-url BASE --os-auth-token TOKEN ARGS` with no version flag and stdin
/// closed (an open stdin is image data to `image-create`; closed is "no data", as in cron).
fn glance(home: &Path, base: &str, token: &str, args: &[&str]) -> Out {
    let bin = on_path("glance").expect("glance");
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("exec \"$0\" \"$@\" <&-")
        .arg(bin)
        .args(["--os-image-url", base, "--os-auth-token", token])
        .args(args);
    client_env(&mut cmd, home);
    run(
        cmd,
        &format!("glance {}", args.join(" ")),
        Duration::from_secs(180),
    )
}

/// `python3 tests/clients/SCRIPT ARGS`.
fn py(home: &Path, script: &str, args: &[&str]) -> Out {
    let mut cmd = Command::new("python3");
    cmd.arg(clients_dir().join(script)).args(args);
    client_env(&mut cmd, home);
    run(
        cmd,
        &format!("{script} {}", args.join(" ")),
        Duration::from_secs(120),
    )
}

/// Fails the test when glance printed an error: cache-queue/-delete/-clear report HTTP errors
/// on stderr with exit status 0.
fn glance_ok(o: &Out) {
    assert!(o.ok, "glance failed: {}\n{}", o.stdout, o.stderr);
    let noise: Vec<&str> = o
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.contains("Warning") && !l.contains("warn"))
        .collect();
    assert!(noise.is_empty(), "glance reported errors: {}", o.stderr);
}

/// Rows of a glance table as their cells.
fn rows(table: &str) -> Vec<Vec<String>> {
    table
        .lines()
        .filter(|l| l.starts_with('|'))
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_string())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// A `glance image-show` table's property value.
fn prop(table: &str, name: &str) -> Option<String> {
    rows(table)
        .into_iter()
        .find(|r| r.first().map(String::as_str) == Some(name))
        .and_then(|r| r.get(1).cloned())
}

/// Independent parts of one client's test: each runs even when an earlier one failed, and
/// the test fails at the end naming every failed part with its message.
struct Parts {
    client: &'static str,
    failed: std::cell::RefCell<Vec<String>>,
}

impl Parts {
    fn new(client: &'static str) -> Parts {
        Parts {
            client,
            failed: Default::default(),
        }
    }

    fn run(&self, name: &str, f: impl FnOnce()) {
        if let Err(e) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            eprintln!("PART FAILED {}: {name}", self.client);
            self.failed.borrow_mut().push(format!("{name}: {msg}"));
        } else {
            eprintln!("PART OK {}: {name}", self.client);
        }
    }

    fn finish(self) {
        let f = self.failed.into_inner();
        assert!(
            f.is_empty(),
            "{} parts failed through imgcache:\n{}",
            self.client,
            f.join("\n---\n")
        );
    }
}

// ---- curl ----------------------------------------------------------------------------------

#[derive(Debug)]
struct Http {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Http {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One request with curl (no retries, no redirects followed).
fn curl(method: &str, url: &str, headers: &[(&str, &str)]) -> Http {
    let dir = tempfile::tempdir().unwrap();
    let (hd, bd) = (dir.path().join("h"), dir.path().join("b"));
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-g", "--max-time", "60", "-D"])
        .arg(&hd)
        .arg("-o")
        .arg(&bd);
    if method == "HEAD" {
        cmd.arg("-I");
    } else {
        cmd.args(["-X", method]);
    }
    for (k, v) in headers {
        cmd.arg("-H").arg(format!("{k}: {v}"));
    }
    let out = cmd.arg(url).output().expect("curl");
    assert!(
        out.status.success(),
        "curl {method} {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let head = std::fs::read_to_string(&hd).unwrap_or_default();
    // The last response's head (curl -I -D prints one head; no 100-continue here).
    let block = head
        .split("\r\n\r\n")
        .filter(|b| b.starts_with("HTTP/"))
        .last()
        .unwrap_or("")
        .to_string();
    let mut lines = block.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Http {
        status,
        headers,
        body: std::fs::read(&bd).unwrap_or_default(),
    }
}

// ---- imgcache, nginx -----------------------------------------------------------------------

struct Img {
    server: Server,
    _cache: tempfile::TempDir,
    base: String,
}

/// `imgcache serve` in front of `glance` (service token: the fake's admin token), allowing
/// `/v1/fetch` under `origin`.
fn imgcache(glance: &FakeGlance, origin: Option<&str>) -> Img {
    let cache = tempfile::tempdir().unwrap();
    let mut args = vec![
        "--glance-url".to_string(),
        glance.url.clone(),
        "--admin-token".to_string(),
        LOCAL_ADMIN.to_string(),
    ];
    if let Some(o) = origin {
        args.push("--allow-href-prefix".to_string());
        args.push(format!("{o}/"));
    }
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = serve_env(
        cache.path(),
        "http",
        &a,
        &[("IMGCACHE_GLANCE_TOKEN", ADMIN_TOKEN)],
    );
    let base = format!("http://{}", server.addr);
    Img {
        server,
        _cache: cache,
        base,
    }
}

impl Img {
    /// `/v1/fetch/<scheme>/<host:port>/<path>` for an `http://host:port/path` href.
    fn fetch_url(&self, href: &str) -> String {
        let rest = href.strip_prefix("http://").expect("http href");
        format!("{}/v1/fetch/http/{rest}", self.base)
    }

    /// Peak RSS (VmHWM) in KiB.
    fn peak_rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.server.child.id()))
            .expect("proc status");
        s.lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM")
    }

    fn cache_state(&self) -> Value {
        let r = curl(
            "GET",
            &format!("{}/v2/cache", self.base),
            &[("X-Auth-Token", LOCAL_ADMIN)],
        );
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        serde_json::from_slice(&r.body).expect("cache JSON")
    }

    fn cached(&self, key: &str) -> bool {
        self.cache_state()["cached_images"]
            .as_array()
            .is_some_and(|a| a.iter().any(|e| e["image_id"] == key))
    }

    /// Waits until `key` is cached (the fill commits as the last byte goes out; this waits
    /// for the commit, not for time).
    fn wait_cached(&self, key: &str) {
        let deadline = Instant::now() + WAIT;
        while !self.cached(key) {
            assert!(Instant::now() < deadline, "{key} never became cached");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn evict(&self, key: &str) {
        let r = curl(
            "DELETE",
            &format!("{}/v2/cache/{key}", self.base),
            &[("X-Auth-Token", LOCAL_ADMIN)],
        );
        assert!(
            r.status == 204 || r.status == 200,
            "DELETE /v2/cache/{key}: {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        assert!(!self.cached(key), "{key} still cached after DELETE");
    }
}

/// imgcache's key for a `/v1/fetch` href: uuid5(NAMESPACE_URL, href), as Ironic names masters.
fn href_key(href: &str) -> String {
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, href.as_bytes()).to_string()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A throwaway nginx (as bench/serve.sh runs one) serving `root` with its defaults
/// (`etag on`, `if_modified_since exact`, `max_ranges` unlimited); killed on drop.
struct Nginx {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nginx(root: &Path) -> Nginx {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let d = dir.path().display();
    let conf = format!(
        "daemon off; master_process off; worker_processes 1; pid {d}/nginx.pid;\n\
         error_log {d}/error.log;\nevents {{ worker_connections 64; }}\n\
         http {{ access_log off; client_body_temp_path {d}; proxy_temp_path {d};\n\
         fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};\n\
         default_type application/octet-stream;\n\
         server {{ listen 127.0.0.1:{port}; root {root}; }} }}\n",
        root = root.display()
    );
    let path = dir.path().join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    let child = Command::new("nginx")
        .arg("-c")
        .arg(&path)
        .arg("-p")
        .arg(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nginx");
    let mut n = Nginx {
        child,
        url: format!("http://127.0.0.1:{port}"),
        _dir: dir,
    };
    let deadline = Instant::now() + WAIT;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(st) = n.child.try_wait().unwrap() {
            let mut err = String::new();
            if let Some(e) = n.child.stderr.take() {
                for l in BufReader::new(e).lines().map_while(Result::ok) {
                    err.push_str(&l);
                }
            }
            panic!("nginx exited ({st}): {err}");
        }
        assert!(Instant::now() < deadline, "nginx did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    n
}

/// A directory the file origin and nginx serve: `images/NAME` files, world-readable (nginx's
/// worker runs unprivileged), modified a day ago (well before any cache fill).
struct Www {
    dir: tempfile::TempDir,
}

impl Www {
    fn new() -> Www {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("images")).unwrap();
        for p in [dir.path().to_path_buf(), dir.path().join("images")] {
            chmod(&p, 0o755);
        }
        Www { dir }
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn put(&self, name: &str, data: &[u8]) -> PathBuf {
        let p = self.dir.path().join("images").join(name);
        std::fs::write(&p, data).unwrap();
        chmod(&p, 0o644);
        let day_ago = SystemTime::now() - Duration::from_secs(86_400);
        std::fs::File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_modified(day_ago)
            .unwrap();
        p
    }
}

fn chmod(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

// ---- The fakes, checked with the real clients ----------------------------------------------

/// The fakes are realistic: glanceclient, openstacksdk and Ironic work against the fake Glance
/// itself, with its auth, records, schemas and headers; Ironic's HTTP image service and
/// checksum lookup work against the file origin, and the origin answers conditional
/// requests as nginx does (RFC 9110's one difference aside).
#[test]
fn fake_glance_is_realistic() {
    let fake = match FakeGlance::start() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("SKIPPED: {e}");
            return;
        }
    };
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let g = fake.url.as_str();
    let data = image_bytes(3 << 20, 11);
    let id = glance::seed_bytes(&fake, "realistic", &data);
    let private = fake.seed(Seed::new("theirs", image_bytes(4096, 12)).private_to("someone-else"));

    // keystonemiddleware's 401 and Glance's request id.
    let r = curl(
        "GET",
        &format!("{g}/v2/images"),
        &[("X-Auth-Token", "nope")],
    );
    assert_eq!(r.status, 401);
    assert!(
        r.header("www-authenticate")
            .is_some_and(|v| v.starts_with("Keystone uri=")),
        "{r:?}"
    );
    let body: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(body["error"]["code"], 401);
    assert!(
        r.header("x-openstack-request-id")
            .is_some_and(|v| v.starts_with("req-")),
        "{r:?}"
    );
    assert_eq!(curl("GET", &format!("{g}/versions"), &[]).status, 200);
    assert_eq!(curl("GET", &format!("{g}/"), &[]).status, 300);
    let r = curl(
        "GET",
        &format!("{g}/v2/images/{private}"),
        &[("X-Auth-Token", MEMBER_TOKEN)],
    );
    assert_eq!(r.status, 404, "another project's private image");

    if on_path("glance").is_some() {
        let o = glance(h, g, MEMBER_TOKEN, &["image-list"]);
        assert!(o.ok && o.stdout.contains(&id), "{}", o.stderr);
        assert!(!o.stdout.contains(&private));
        let o = glance(h, g, MEMBER_TOKEN, &["image-show", &id]);
        assert!(o.ok, "{}", o.stderr);
        assert_eq!(prop(&o.stdout, "checksum"), Some(md5_hex(&data)));
        let out = h.join("dl.img");
        let o = glance(
            h,
            g,
            MEMBER_TOKEN,
            &["image-download", "--file", out.to_str().unwrap(), &id],
        );
        assert!(o.ok, "{}", o.stderr);
        assert_eq!(std::fs::read(&out).unwrap(), data.as_ref());
        // Create, upload, update, deactivate, delete.
        let o = glance(
            h,
            g,
            MEMBER_TOKEN,
            &[
                "image-create",
                "--name",
                "made",
                "--disk-format",
                "raw",
                "--container-format",
                "bare",
            ],
        );
        assert!(o.ok, "{}", o.stderr);
        let new = prop(&o.stdout, "id").expect("id");
        assert_eq!(prop(&o.stdout, "status").as_deref(), Some("queued"));
        let up = h.join("up.img");
        let up_data = image_bytes(1 << 20, 13);
        std::fs::write(&up, &up_data).unwrap();
        let o = glance(
            h,
            g,
            MEMBER_TOKEN,
            &["image-upload", "--file", up.to_str().unwrap(), &new],
        );
        assert!(o.ok, "{}", o.stderr);
        let rec = fake.record(&new).unwrap();
        assert_eq!(rec["status"], "active");
        assert_eq!(rec["checksum"], md5_hex(&up_data));
        assert_eq!(rec["os_hash_value"], sha512_hex(&up_data));
        let o = glance(
            h,
            g,
            MEMBER_TOKEN,
            &["image-update", "--property", "purpose=test", &new],
        );
        assert!(o.ok, "{}", o.stderr);
        assert_eq!(fake.record(&new).unwrap()["purpose"], "test");
        let o = glance(h, g, MEMBER_TOKEN, &["image-deactivate", &new]);
        assert!(o.ok, "{}", o.stderr);
        let r = curl(
            "GET",
            &format!("{g}/v2/images/{new}/file"),
            &[("X-Auth-Token", MEMBER_TOKEN)],
        );
        assert_eq!(r.status, 403, "deactivated, not admin");
        let o = glance(h, g, MEMBER_TOKEN, &["image-delete", &new]);
        assert!(o.ok, "{}", o.stderr);
        assert!(fake.record(&new).is_none());
        let o = glance(h, g, "unknown-token", &["image-list"]);
        assert!(!o.ok);
        assert!(
            o.stderr.contains("Invalid OpenStack Identity credentials"),
            "{}",
            o.stderr
        );
    } else {
        eprintln!("glanceclient part skipped: the `glance` command is not installed");
    }

    if py_has("openstack") {
        let img = py(h, "sdk.py", &[g, MEMBER_TOKEN, "get-image", &id]).json();
        assert_eq!(img["os_hash_value"], sha512_hex(&data));
        let all = py(h, "sdk.py", &[g, MEMBER_TOKEN, "images"]).json();
        assert!(
            all["images"]
                .as_array()
                .unwrap()
                .iter()
                .any(|i| i["id"] == id)
        );
        let out = h.join("sdk.img");
        let d = py(
            h,
            "sdk.py",
            &[g, MEMBER_TOKEN, "download", &id, out.to_str().unwrap()],
        )
        .json();
        assert_eq!(d["sha256"], sha256_hex(&data));
        let d = py(
            h,
            "sdk.py",
            &[
                g,
                MEMBER_TOKEN,
                "download-stream",
                &id,
                out.to_str().unwrap(),
            ],
        )
        .json();
        assert_eq!(d["content_md5"], md5_hex(&data));
    } else {
        eprintln!("openstacksdk part skipped: openstacksdk is not installed");
    }

    let www = Www::new();
    let disk = image_bytes(1 << 20, 14);
    www.put("disk.img", &disk);
    www.put(
        "SHA256SUMS",
        format!("{}  disk.img\n", sha256_hex(&disk)).as_bytes(),
    );
    let origin = Origin::start(www.root());
    if py_has("ironic") {
        let work = h.join("ironic");
        let w = work.to_str().unwrap();
        let m = py(
            h,
            "ironic_client.py",
            &[w, "glance-show", g, ADMIN_TOKEN, &id],
        )
        .json();
        assert_eq!(m["checksum"], md5_hex(&data));
        let out = h.join("ironic.img");
        let m = py(
            h,
            "ironic_client.py",
            &[
                w,
                "glance-download",
                g,
                ADMIN_TOKEN,
                &id,
                out.to_str().unwrap(),
                &sha512_hex(&data),
            ],
        )
        .json();
        assert_eq!(m["size"], data.len());
        let url = format!("{}/images/disk.img", origin.url);
        let m = py(h, "ironic_client.py", &[w, "http-show", &url]).json();
        assert_eq!(m["size"], disk.len());
        let sums = format!("{}/images/SHA256SUMS", origin.url);
        let m = py(h, "ironic_client.py", &[w, "checksum", &sums, &url]).json();
        assert_eq!(m["checksum"], sha256_hex(&disk));
        let (master, dest) = (work.join("master"), work.join("dest"));
        std::fs::create_dir_all(&master).unwrap();
        let args = |d: &str| {
            vec![
                w.to_string(),
                "fetch-image".to_string(),
                master.to_str().unwrap().to_string(),
                url.clone(),
                dest.join(d).to_str().unwrap().to_string(),
            ]
        };
        std::fs::create_dir_all(&dest).unwrap();
        let a1 = args("1");
        let first = py(
            h,
            "ironic_client.py",
            &a1.iter().map(String::as_str).collect::<Vec<_>>(),
        )
        .json();
        let a2 = args("2");
        let second = py(
            h,
            "ironic_client.py",
            &a2.iter().map(String::as_str).collect::<Vec<_>>(),
        )
        .json();
        assert_eq!(first["inode"], second["inode"], "Ironic kept its master");
        assert_eq!(origin.data_requests("/images/disk.img"), 1);
    } else {
        eprintln!("Ironic part skipped: ironic is not installed");
    }

    // The origin's conditional answers are nginx's, but for If-Modified-Since later than
    // Last-Modified (see `curl_conditional_requests`).
    if on_path("nginx").is_some() {
        let ngx = nginx(www.root());
        let path = "/images/disk.img";
        let (o, n) = (
            curl("HEAD", &format!("{}{path}", origin.url), &[]),
            curl("HEAD", &format!("{}{path}", ngx.url), &[]),
        );
        assert_eq!(o.header("etag"), n.header("etag"), "nginx's ETag form");
        assert_eq!(o.header("last-modified"), n.header("last-modified"));
        let (etag, lm) = (
            n.header("etag").unwrap().to_string(),
            n.header("last-modified").unwrap().to_string(),
        );
        for case in cases(&etag, &lm) {
            if case.name == "If-Modified-Since later than Last-Modified" {
                continue;
            }
            let hs: Vec<(&str, &str)> =
                case.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let a = curl(case.method, &format!("{}{path}", origin.url), &hs);
            let b = curl(case.method, &format!("{}{path}", ngx.url), &hs);
            assert_eq!(a.status, b.status, "origin vs nginx: {}", case.name);
            assert_eq!(
                a.header("content-range"),
                b.header("content-range"),
                "{}",
                case.name
            );
        }
    } else {
        eprintln!("origin vs nginx part skipped: nginx is not installed");
    }
}

// ---- glanceclient --------------------------------------------------------------------------

/// python-glanceclient's CLI through imgcache, no version flag: image-list, image-show,
/// image-download (its checksum checks on, including the md5 of a pre-Rocky record), and the
/// cache commands with the upstream admin token and with imgcache's own.
#[test]
fn glanceclient_through_imgcache() {
    require!(
        on_path("glance").is_some(),
        "the `glance` command is not installed (pip install python-glanceclient)"
    );
    let fake = match FakeGlance::start() {
        Ok(f) => f,
        Err(e) => return eprintln!("SKIPPED: {e}"),
    };
    let data = image_bytes(5 << 20, 21);
    let id = glance::seed_bytes(&fake, "cirros", &data);
    // A pre-Rocky record: md5 `checksum` only, no os_hash_value (glanceclient checks md5).
    let legacy_data = image_bytes(2 << 20, 22);
    let legacy = glance::seed_bytes(&fake, "legacy", &legacy_data);
    fake.set_field(&legacy, "os_hash_algo", Value::Null);
    fake.set_field(&legacy, "os_hash_value", Value::Null);
    let img = imgcache(&fake, None);
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let b = img.base.as_str();

    let parts = Parts::new("glanceclient");
    parts.run("image-list", || {
        let o = glance(h, b, MEMBER_TOKEN, &["image-list"]);
        assert!(o.ok, "image-list: {}", o.stderr);
        assert!(
            o.stdout.contains(&id) && o.stdout.contains(&legacy),
            "{}",
            o.stdout
        );
    });
    parts.run("image-show", || {
        let o = glance(h, b, MEMBER_TOKEN, &["image-show", &id]);
        assert!(o.ok, "image-show: {}", o.stderr);
        assert_eq!(prop(&o.stdout, "checksum"), Some(md5_hex(&data)));
        assert_eq!(prop(&o.stdout, "status").as_deref(), Some("active"));
    });
    for (what, which, bytes) in [
        ("image-download (os_hash_value checked)", &id, &data),
        (
            "image-download (md5 checksum checked)",
            &legacy,
            &legacy_data,
        ),
    ] {
        parts.run(what, || {
            let out = h.join(format!("{which}.img"));
            let o = glance(
                h,
                b,
                MEMBER_TOKEN,
                &["image-download", "--file", out.to_str().unwrap(), which],
            );
            assert!(o.ok, "image-download {which}: {}", o.stderr);
            assert_eq!(
                std::fs::read(&out).unwrap(),
                bytes.as_ref(),
                "bytes of {which}"
            );
        });
    }
    parts.run("Glance's download headers (hex Content-MD5)", || {
        let r = curl(
            "GET",
            &format!("{b}/v2/images/{id}/file"),
            &[("X-Auth-Token", MEMBER_TOKEN)],
        );
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-md5"), Some(md5_hex(&data).as_str()));
        assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    });

    // The cache commands, with either admin token, each without a version flag (the
    // client negotiates v2 through /versions and the schemas).
    for (what, token) in [
        ("cache-* with the upstream admin token", ADMIN_TOKEN),
        ("cache-* with imgcache's admin token", LOCAL_ADMIN),
    ] {
        parts.run(what, || {
            let home = tempfile::tempdir().unwrap();
            let h = home.path();
            let o = glance(h, b, token, &["cache-clear"]);
            glance_ok(&o);
            let o = glance(h, b, token, &["cache-queue", &legacy]);
            glance_ok(&o);
            img.wait_cached(&legacy);
            let o = glance(h, b, token, &["cache-list"]);
            glance_ok(&o);
            assert!(o.stdout.contains(&legacy), "{}", o.stdout);
            let o = glance(h, b, token, &["cache-delete", &legacy]);
            glance_ok(&o);
            assert!(!img.cached(&legacy));
            let o = glance(h, b, token, &["cache-queue", &id]);
            glance_ok(&o);
            img.wait_cached(&id);
            let o = glance(h, b, token, &["cache-clear"]);
            glance_ok(&o);
            let s = img.cache_state();
            assert_eq!(s["cached_images"], serde_json::json!([]), "{s}");
            assert_eq!(s["queued_images"], serde_json::json!([]), "{s}");
        });
    }

    parts.run("an unknown token", || {
        let o = glance(h, b, "unknown-token", &["image-list"]);
        assert!(!o.ok, "an unknown token listed images: {}", o.stdout);
        assert!(
            o.stderr.contains("Invalid OpenStack Identity credentials"),
            "{}",
            o.stderr
        );
    });
    parts.finish();
}

/// `glance image-create` then `image-upload` of 256 MiB through imgcache: the bytes arrive
/// upstream exact, and imgcache's peak RSS stays under 64 MiB (streamed, never buffered).
#[test]
fn glanceclient_upload_streams_through_imgcache() {
    require!(
        on_path("glance").is_some(),
        "the `glance` command is not installed (pip install python-glanceclient)"
    );
    let fake = match FakeGlance::start() {
        Ok(f) => f,
        Err(e) => return eprintln!("SKIPPED: {e}"),
    };
    let img = imgcache(&fake, None);
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let b = img.base.as_str();
    const SIZE: usize = 256 << 20;
    let file = h.join("big.img");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&file).unwrap();
        for i in 0..(SIZE >> 24) {
            f.write_all(&image_bytes(1 << 24, 100 + i as u64)).unwrap();
        }
    }
    let md5 = md5_file(&file);

    let o = glance(
        h,
        b,
        MEMBER_TOKEN,
        &[
            "image-create",
            "--name",
            "big",
            "--disk-format",
            "raw",
            "--container-format",
            "bare",
        ],
    );
    assert!(o.ok, "image-create: {}", o.stderr);
    let id = prop(&o.stdout, "id").expect("image-create printed an id");
    assert_eq!(
        fake.record(&id).expect("created upstream")["status"],
        "queued"
    );

    let o = glance(
        h,
        b,
        MEMBER_TOKEN,
        &["image-upload", "--file", file.to_str().unwrap(), &id],
    );
    assert!(o.ok, "image-upload: {}", o.stderr);
    let rec = fake.record(&id).unwrap();
    assert_eq!(rec["status"], "active", "{rec}");
    assert_eq!(rec["size"], SIZE, "{rec}");
    assert_eq!(rec["checksum"], md5, "the bytes arrived exact");
    assert_eq!(fake.upload_bytes(), SIZE as u64);
    let peak = img.peak_rss_kib();
    eprintln!("upload through imgcache: 256 MiB relayed, imgcache peak RSS {peak} KiB");
    assert!(
        peak < 64 * 1024,
        "imgcache's peak RSS while relaying 256 MiB: {peak} KiB (limit 64 MiB)"
    );
}

// ---- openstacksdk --------------------------------------------------------------------------

/// openstacksdk through imgcache: get_image, images(), download_image(stream=True) with the
/// SDK's own hash check and with the documented stream check, and the cache calls.
#[test]
fn openstacksdk_through_imgcache() {
    require!(
        py_has("openstack"),
        "openstacksdk is not installed (pip install openstacksdk)"
    );
    let fake = match FakeGlance::start() {
        Ok(f) => f,
        Err(e) => return eprintln!("SKIPPED: {e}"),
    };
    let data = image_bytes(4 << 20, 31);
    let id = glance::seed_bytes(&fake, "sdk", &data);
    let other = glance::seed_bytes(&fake, "sdk-2", &image_bytes(1 << 20, 32));
    let img = imgcache(&fake, None);
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let b = img.base.as_str();

    let parts = Parts::new("openstacksdk");
    parts.run("get_image", || {
        let rec = py(h, "sdk.py", &[b, MEMBER_TOKEN, "get-image", &id]).json();
        assert_eq!(rec["checksum"], md5_hex(&data));
        assert_eq!(rec["os_hash_algo"], "sha512");
        assert_eq!(rec["os_hash_value"], sha512_hex(&data));
        assert_eq!(rec["disk_format"], "raw");
        assert!(rec["updated_at"].is_string());
    });
    parts.run("images()", || {
        let all = py(h, "sdk.py", &[b, MEMBER_TOKEN, "images"]).json();
        let ids: Vec<&str> = all["images"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|i| i["id"].as_str())
            .collect();
        assert!(
            ids.contains(&id.as_str()) && ids.contains(&other.as_str()),
            "{all}"
        );
    });
    let out = h.join("sdk.img");
    parts.run(
        "download_image(stream=True, output=...): the SDK's hash check",
        || {
            let d = py(
                h,
                "sdk.py",
                &[b, MEMBER_TOKEN, "download", &id, out.to_str().unwrap()],
            )
            .json();
            assert_eq!(d["sha256"], sha256_hex(&data));
        },
    );
    parts.run(
        "download_image(stream=True): os_hash_value of the stream",
        || {
            let d = py(
                h,
                "sdk.py",
                &[
                    b,
                    MEMBER_TOKEN,
                    "download-stream",
                    &id,
                    out.to_str().unwrap(),
                ],
            )
            .json();
            assert_eq!(d["size"], data.len());
            assert_eq!(d["content_md5"], md5_hex(&data), "Glance's hex Content-MD5");
            assert_eq!(std::fs::read(&out).unwrap(), data.as_ref());
        },
    );

    for (what, token) in [
        ("cache calls with imgcache's admin token", LOCAL_ADMIN),
        ("cache calls with the upstream admin token", ADMIN_TOKEN),
    ] {
        parts.run(what, || {
            py(h, "sdk.py", &[b, token, "cache-clear"]).json();
            py(h, "sdk.py", &[b, token, "cache-queue", &other]).json();
            img.wait_cached(&other);
            let c = py(h, "sdk.py", &[b, token, "cache-list"]).json();
            assert_eq!(c["cached_images"], serde_json::json!([other]), "{c}");
            py(h, "sdk.py", &[b, token, "cache-delete", &other]).json();
            assert!(!img.cached(&other));
            py(h, "sdk.py", &[b, token, "cache-queue", &id]).json();
            img.wait_cached(&id);
            py(h, "sdk.py", &[b, token, "cache-clear", "cache"]).json();
            let c = py(h, "sdk.py", &[b, token, "cache-list"]).json();
            assert_eq!(c["cached_images"], serde_json::json!([]), "{c}");
        });
    }
    parts.finish();
}

// ---- Ironic --------------------------------------------------------------------------------

/// Ironic 39 through imgcache: GlanceImageService.show/download, HttpImageService through the
/// path-style `/v1/fetch/http/HOST:PORT/PATH` route, get_checksum_from_url with a SHA256SUMS
/// beside the image, and ImageCache.fetch_image keeping its master across a re-cache.
#[test]
fn ironic_through_imgcache() {
    require!(
        py_has("ironic"),
        "ironic is not installed (pip install ironic)"
    );
    let fake = match FakeGlance::start() {
        Ok(f) => f,
        Err(e) => return eprintln!("SKIPPED: {e}"),
    };
    let data = image_bytes(3 << 20, 41);
    let id = glance::seed_bytes(&fake, "deploy", &data);
    let www = Www::new();
    let disk = image_bytes(2 << 20, 42);
    www.put("disk.img", &disk);
    www.put(
        "SHA256SUMS",
        format!(
            "{}  other.img\n{}  disk.img\n",
            sha256_hex(b"other"),
            sha256_hex(&disk)
        )
        .as_bytes(),
    );
    let origin = Origin::start(www.root());
    let img = imgcache(&fake, Some(&origin.url));
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let work = h.join("ironic");
    let w = work.to_str().unwrap();
    let b = img.base.as_str();

    let parts = Parts::new("Ironic");
    parts.run("GlanceImageService.show/download", || {
        let m = py(
            h,
            "ironic_client.py",
            &[w, "glance-show", b, ADMIN_TOKEN, &id],
        )
        .json();
        assert_eq!(m["checksum"], md5_hex(&data));
        assert_eq!(m["status"], "active");
        let out = h.join("glance.img");
        let m = py(
            h,
            "ironic_client.py",
            &[
                w,
                "glance-download",
                b,
                ADMIN_TOKEN,
                &id,
                out.to_str().unwrap(),
                &sha512_hex(&data),
            ],
        )
        .json();
        assert_eq!(m["verified"], format!("sha512:{}", sha512_hex(&data)));
        assert_eq!(std::fs::read(&out).unwrap(), data.as_ref());
    });

    let href = format!("{}/images/disk.img", origin.url);
    let url = img.fetch_url(&href);
    parts.run("HttpImageService via /v1/fetch/http/...", || {
        let m = py(h, "ironic_client.py", &[w, "http-show", &url]).json();
        assert_eq!(m["size"], disk.len());
        let out = h.join("http.img");
        let m = py(
            h,
            "ironic_client.py",
            &[w, "http-download", &url, out.to_str().unwrap()],
        )
        .json();
        assert_eq!(m["sha256"], sha256_hex(&disk));
    });

    parts.run("checksum_utils.get_checksum_from_url", || {
        let sums = img.fetch_url(&format!("{}/images/SHA256SUMS", origin.url));
        let m = py(h, "ironic_client.py", &[w, "checksum", &sums, &url]).json();
        assert_eq!(m["checksum"], sha256_hex(&disk));
    });

    parts.run("ImageCache.fetch_image across a re-cache", || {
        let (master, dest) = (work.join("master"), work.join("dest"));
        std::fs::create_dir_all(&master).unwrap();
        std::fs::create_dir_all(&dest).unwrap();
        let m = master.to_str().unwrap();
        let fetch = |n: &str| {
            let d = dest.join(n);
            py(
                h,
                "ironic_client.py",
                &[w, "fetch-image", m, &url, d.to_str().unwrap()],
            )
            .json()
        };
        let first = fetch("1");
        let second = fetch("2");
        assert_eq!(first["inode"], second["inode"], "second call: master kept");
        // As if Ironic had fetched its master 10 s ago: HTTP dates have whole seconds, so a
        // re-cache within the master's own second could not show a moved Last-Modified.
        py(h, "ironic_client.py", &[w, "age-master", m, &url, "10"]).json();
        // imgcache re-caches the unchanged image.
        let key = href_key(&href);
        img.wait_cached(&key);
        img.evict(&key);
        let r = curl("GET", &url, &[]);
        assert_eq!(r.status, 200);
        assert_eq!(r.body, disk.as_ref());
        img.wait_cached(&key);
        let third = fetch("3");
        assert_eq!(
            first["inode"], third["inode"],
            "Ironic re-downloaded its master after imgcache re-cached an unchanged image"
        );
    });

    parts.finish();
}

// ---- curl and nginx ------------------------------------------------------------------------

struct Case {
    name: &'static str,
    method: &'static str,
    headers: Vec<(&'static str, String)>,
}

/// Issue 10 item 4's cases, given the validators `etag` and `lm` the server gave.
fn cases(etag: &str, lm: &str) -> Vec<Case> {
    let t = httpdate::parse_http_date(lm).expect("Last-Modified is an HTTP date");
    let later = httpdate::fmt_http_date(t + Duration::from_secs(3600));
    let earlier = httpdate::fmt_http_date(t - Duration::from_secs(3600));
    let weak = format!("W/{etag}");
    let c = |name, method, headers: &[(&'static str, &str)]| Case {
        name,
        method,
        headers: headers.iter().map(|(k, v)| (*k, v.to_string())).collect(),
    };
    vec![
        c("If-None-Match: the ETag", "GET", &[("If-None-Match", etag)]),
        c(
            "HEAD If-None-Match: the ETag",
            "HEAD",
            &[("If-None-Match", etag)],
        ),
        c("If-None-Match: *", "GET", &[("If-None-Match", "*")]),
        c(
            "If-None-Match: the weak ETag",
            "GET",
            &[("If-None-Match", &weak)],
        ),
        c(
            "If-None-Match: another, the ETag",
            "GET",
            &[("If-None-Match", &format!("\"other\", {etag}"))],
        ),
        c(
            "If-None-Match: another",
            "GET",
            &[("If-None-Match", "\"other\"")],
        ),
        c(
            "If-Modified-Since = Last-Modified",
            "GET",
            &[("If-Modified-Since", lm)],
        ),
        c(
            "If-Modified-Since later than Last-Modified",
            "GET",
            &[("If-Modified-Since", &later)],
        ),
        c(
            "If-Modified-Since earlier",
            "GET",
            &[("If-Modified-Since", &earlier)],
        ),
        c(
            "If-None-Match another beats If-Modified-Since",
            "GET",
            &[("If-None-Match", "\"other\""), ("If-Modified-Since", lm)],
        ),
        c("If-Match: the ETag", "GET", &[("If-Match", etag)]),
        c("If-Match: *", "GET", &[("If-Match", "*")]),
        c("If-Match: another", "GET", &[("If-Match", "\"other\"")]),
        c(
            "HEAD If-Match: another",
            "HEAD",
            &[("If-Match", "\"other\"")],
        ),
        c(
            "If-Match another beats If-None-Match",
            "GET",
            &[("If-Match", "\"other\""), ("If-None-Match", etag)],
        ),
        c(
            "If-Unmodified-Since = Last-Modified",
            "GET",
            &[("If-Unmodified-Since", lm)],
        ),
        c(
            "If-Unmodified-Since earlier",
            "GET",
            &[("If-Unmodified-Since", &earlier)],
        ),
        c(
            "If-Range: the ETag",
            "GET",
            &[("Range", "bytes=100-199"), ("If-Range", etag)],
        ),
        c(
            "If-Range: another ETag",
            "GET",
            &[("Range", "bytes=100-199"), ("If-Range", "\"other\"")],
        ),
        c(
            "If-Range: Last-Modified",
            "GET",
            &[("Range", "bytes=100-199"), ("If-Range", lm)],
        ),
        c(
            "If-Range: an earlier date",
            "GET",
            &[("Range", "bytes=100-199"), ("If-Range", &earlier)],
        ),
    ]
}

/// What must agree with nginx: the status, and the range a 206 carries.
fn outcome(r: &Http) -> (u16, Option<String>) {
    (r.status, r.header("content-range").map(str::to_string))
}

/// Each conditional-request case of issue 10 item 4 through imgcache's `/v1/fetch` (the
/// path-style route and `?href=`), on a miss
/// (the entry evicted after the client saw its validators) and on a hit, compared with nginx
/// serving the same file with the validators nginx gave. One deliberate difference:
/// nginx's default `if_modified_since exact` answers 200 to an If-Modified-Since later than
/// Last-Modified; RFC 9110 13.1.3 says 304 (not modified since), and imgcache answers 304.
#[test]
fn curl_conditional_requests() {
    require!(on_path("curl").is_some(), "curl is not installed");
    require!(
        on_path("nginx").is_some(),
        "nginx is not installed (apt-get install nginx)"
    );
    let fake = match FakeGlance::start() {
        Ok(f) => f,
        Err(e) => return eprintln!("SKIPPED: {e}"),
    };
    let www = Www::new();
    let data = image_bytes(256 << 10, 51);
    let origin = Origin::start(www.root());
    let img = imgcache(&fake, Some(&origin.url));
    let ngx = nginx(www.root());

    let mut failures = Vec::new();
    let names = cases("\"x\"", "Mon, 01 Jan 2024 00:00:00 GMT");
    for (route, (i, case)) in ["/v1/fetch/http/HOST:PORT/PATH", "/v1/fetch?href="]
        .into_iter()
        .flat_map(|r| names.iter().enumerate().map(move |c| (r, c)))
    {
        // A file per case and route, same bytes and mtime: each case starts from a miss.
        let name = format!("c{}-{i}.img", route.len());
        www.put(&name, &data);
        let path = format!("/images/{name}");
        let href = format!("{}{path}", origin.url);
        let url = if route.contains("href") {
            format!("{}/v1/fetch?href={href}", img.base)
        } else {
            img.fetch_url(&href)
        };
        let key = href_key(&href);
        let case_name = format!("{route}: {}", case.name);

        let n = curl("HEAD", &format!("{}{path}", ngx.url), &[]);
        let n_case = &cases(
            n.header("etag").unwrap(),
            n.header("last-modified").unwrap(),
        )[i];
        let hs: Vec<(&str, &str)> = n_case
            .headers
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .collect();
        let want = outcome(&curl(n_case.method, &format!("{}{path}", ngx.url), &hs));

        // The client's first GET (a miss): the validators it keeps.
        let first = curl("GET", &url, &[]);
        if first.status != 200 || first.body != data.as_ref() {
            failures.push(format!(
                "{}: plain GET: {} ({} bytes) {}",
                case_name,
                first.status,
                first.body.len(),
                String::from_utf8_lossy(&first.body[..first.body.len().min(200)])
            ));
            continue;
        }
        let mut seen = first;
        if seen.header("etag").is_none() || seen.header("last-modified").is_none() {
            failures.push(format!(
                "{}: a GET on a miss carries no ETag or Last-Modified: {:?}",
                case_name, seen.headers
            ));
            // Go on with the validators a HEAD gives, to check the conditional answers too.
            seen = curl("HEAD", &url, &[]);
        }
        let (Some(etag), Some(lm)) = (seen.header("etag"), seen.header("last-modified")) else {
            failures.push(format!(
                "{}: neither GET nor HEAD carries an ETag and a Last-Modified: {:?}",
                case_name, seen.headers
            ));
            continue;
        };
        let mine = &cases(etag, lm)[i];
        let hs: Vec<(&str, &str)> = mine.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let rfc_differs = case.name == "If-Modified-Since later than Last-Modified";
        let expect = if rfc_differs {
            // nginx: 200 (if_modified_since exact). RFC 9110: 304.
            assert_eq!(want.0, 200, "nginx's known answer changed");
            (304, None)
        } else {
            want.clone()
        };
        for phase in ["miss", "hit"] {
            if phase == "miss" {
                img.wait_cached(&key);
                img.evict(&key);
            } else {
                let r = curl("GET", &url, &[]);
                assert_eq!(r.status, 200);
                img.wait_cached(&key);
            }
            let got = curl(mine.method, &url, &hs);
            if outcome(&got) != expect {
                failures.push(format!(
                    "{} on a {phase}: imgcache {:?}, nginx {:?}{}",
                    case_name,
                    outcome(&got),
                    want,
                    if rfc_differs { " (RFC 9110: 304)" } else { "" }
                ));
            }
            if got.status == 206 && got.body != data[100..200] {
                failures.push(format!("{case_name} on a {phase}: wrong range bytes"));
            }
            if got.status == 304 && got.header("etag") != Some(etag) {
                failures.push(format!(
                    "{} on a {phase}: 304 without the same ETag ({:?})",
                    case_name,
                    got.header("etag")
                ));
            }
        }
        // One stable validator pair, miss or hit.
        let again = curl("HEAD", &url, &[]);
        if again.header("etag") != Some(etag) || again.header("last-modified") != Some(lm) {
            failures.push(format!(
                "{}: validators moved: GET on the miss {:?}/{:?}, HEAD on the hit {:?}/{:?}",
                case_name,
                etag,
                lm,
                again.header("etag"),
                again.header("last-modified")
            ));
        }
        if lm != n.header("last-modified").unwrap() {
            failures.push(format!(
                "{}: Last-Modified {lm:?} is not the origin's {:?}",
                case_name,
                n.header("last-modified")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} conditional-request checks failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
