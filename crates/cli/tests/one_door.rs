//! One door: every way an image enters the cache refuses every bad image the same way.
//!
//! Entrances (the real binary): a `GET /v2/images/{id}/file` miss, a `GET /v1/fetch` miss,
//! a `PUT /v2/cache/{id}` prefetch, a background revalidation that would replace a cached
//! `/v1/fetch` hit, `imgcache fetch` and `imgcache fetch --raw`. Bad images: a qcow2 with a
//! backing file, a qcow2 with a data file, a VMDK with a flat extent, qcow2 bytes declared
//! `raw` by Glance's `disk_format`, a checksum mismatch, a truncated body, and a format
//! outside the permitted ones. For each pair: it is refused, nothing is published, nothing
//! is served afterwards, and (for the server's entrances) the refusal is counted in
//! `/metrics` under its reason.
//!
//! A plain URL carries no declared format, so "qcow2 declared raw" applies to the Glance
//! entrances only; the table says so rather than skipping silently.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;

const TOKEN: &str = "user-token";
const ADMIN: &str = "admin-secret";

// ---- A fake origin: a Keystone-protected Glance and plain files ----------------------------

#[derive(Clone)]
struct Obj {
    body: Bytes,
    /// The md5 the origin vouches for (Glance's `checksum`, a file's `Content-MD5`).
    md5: String,
    disk_format: String,
    /// Send this many bytes of a `Content-Length: body.len()` response, then cut it.
    cut_at: Option<usize>,
}

#[derive(Default)]
struct Origin {
    objs: Mutex<HashMap<String, Obj>>,
}

fn md5_hex(b: &[u8]) -> String {
    imgcache_store::Integrity::of(imgcache_store::Algorithm::Md5, b)
        .hex()
        .to_string()
}

fn md5_b64(hex: &str) -> String {
    use base64::Engine;
    let raw: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    base64::engine::general_purpose::STANDARD.encode(raw)
}

fn start_origin() -> (String, Arc<Origin>) {
    let origin = Arc::new(Origin::default());
    let app = axum::Router::new()
        .route("/v2/images/{id}", get(glance_record))
        .route("/v2/images/{id}/file", get(glance_file))
        .route("/files/{name}", get(plain_file))
        .with_state(origin.clone());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(l, app).await.unwrap();
        });
    });
    (url, origin)
}

fn authorised(h: &HeaderMap) -> bool {
    h.get("x-auth-token")
        .is_some_and(|t| t == TOKEN || t == ADMIN)
}

async fn glance_record(
    State(o): State<Arc<Origin>>,
    UrlPath(id): UrlPath<String>,
    h: HeaderMap,
) -> Response {
    if !authorised(&h) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let Some(obj) = o.objs.lock().unwrap().get(&id).cloned() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    axum::Json(serde_json::json!({
        "id": id, "status": "active", "size": obj.body.len(), "checksum": obj.md5,
        "disk_format": obj.disk_format, "container_format": "bare",
    }))
    .into_response()
}

async fn glance_file(
    State(o): State<Arc<Origin>>,
    UrlPath(id): UrlPath<String>,
    h: HeaderMap,
) -> Response {
    if !authorised(&h) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    match o.objs.lock().unwrap().get(&id).cloned() {
        Some(obj) => body_of(&obj, HeaderMap::new()),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn plain_file(
    State(o): State<Arc<Origin>>,
    UrlPath(name): UrlPath<String>,
    h: HeaderMap,
) -> Response {
    let Some(obj) = o.objs.lock().unwrap().get(&name).cloned() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let etag = format!("\"{}\"", md5_hex(&obj.body));
    if h.get(header::IF_NONE_MATCH)
        .is_some_and(|v| v == etag.as_str())
    {
        return StatusCode::NOT_MODIFIED.into_response();
    }
    let mut extra = HeaderMap::new();
    extra.insert(header::ETAG, etag.parse().unwrap());
    extra.insert("content-md5", md5_b64(&obj.md5).parse().unwrap());
    body_of(&obj, extra)
}

fn body_of(obj: &Obj, extra: HeaderMap) -> Response {
    let len = obj.body.len();
    let sent = obj.body.slice(..obj.cut_at.unwrap_or(len));
    let cut = obj.cut_at.is_some();
    // The cut comes after the head and the bytes before it are on the wire (hyper drops a
    // response whose body fails before anything was flushed, which is not a truncation).
    let chunks = futures_util::stream::unfold(0u8, move |step| {
        let sent = sent.clone();
        async move {
            match step {
                0 => Some((Ok(sent), 1)),
                1 if cut => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Some((Err(std::io::Error::other("origin cut the body")), 2))
                }
                _ => None,
            }
        }
    });
    let mut r = Response::builder().header(header::CONTENT_LENGTH, len);
    for (k, v) in &extra {
        r = r.header(k, v);
    }
    r.body(Body::from_stream(chunks)).unwrap()
}

// ---- The images ----------------------------------------------------------------------------

fn read(p: &Path) -> Bytes {
    Bytes::from(std::fs::read(p).unwrap())
}

/// A safe raw image: pseudo-random bytes.
fn raw_image(len: usize, seed: u64) -> Bytes {
    imgcache_testkit::image_bytes(len, seed)
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Bad {
    BackingFile,
    DataFile,
    VmdkFlatExtent,
    Qcow2DeclaredRaw,
    ChecksumMismatch,
    Truncated,
    NotPermitted,
}

impl Bad {
    const ALL: [Bad; 7] = [
        Bad::BackingFile,
        Bad::DataFile,
        Bad::VmdkFlatExtent,
        Bad::Qcow2DeclaredRaw,
        Bad::ChecksumMismatch,
        Bad::Truncated,
        Bad::NotPermitted,
    ];

    /// The `reason` label of `imgcache_refused_images_total` it must be counted under.
    fn reason(self) -> &'static str {
        match self {
            Bad::ChecksumMismatch => "checksum",
            Bad::Truncated => "truncated",
            _ => "unsafe_image",
        }
    }
}

/// The bytes and what the origin says of them.
fn bad_object(bad: Bad, dir: &Path) -> Obj {
    let good = raw_image(1 << 20, 7);
    let obj = |body: Bytes, fmt: &str| Obj {
        md5: md5_hex(&body),
        body,
        disk_format: fmt.into(),
        cut_at: None,
    };
    use imgcache_testkit::bad_images as u;
    match bad {
        Bad::BackingFile => obj(read(&u::qcow2_backing_file(dir)), "qcow2"),
        Bad::DataFile => obj(read(&u::qcow2_data_file(dir)), "qcow2"),
        Bad::VmdkFlatExtent => obj(read(&u::vmdk_flat_extent(dir)), "vmdk"),
        Bad::Qcow2DeclaredRaw => obj(read(&u::plain(dir, "qcow2")), "raw"),
        Bad::ChecksumMismatch => Obj {
            md5: md5_hex(b"not these bytes"),
            ..obj(good, "raw")
        },
        Bad::Truncated => Obj {
            cut_at: Some(300 << 10),
            ..obj(good, "raw")
        },
        Bad::NotPermitted => obj(read(&u::plain(dir, "vdi")), "vdi"),
    }
}

// ---- The entrances -------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum Entrance {
    GlanceMiss,
    FetchMiss,
    Prefetch,
    Revalidation,
    CliFetch,
    CliFetchRaw,
}

impl Entrance {
    const ALL: [Entrance; 6] = [
        Entrance::GlanceMiss,
        Entrance::FetchMiss,
        Entrance::Prefetch,
        Entrance::Revalidation,
        Entrance::CliFetch,
        Entrance::CliFetchRaw,
    ];
    /// Served by `imgcache serve` (counted in its `/metrics`).
    fn server(self) -> bool {
        !matches!(self, Entrance::CliFetch | Entrance::CliFetchRaw)
    }
    /// The image is named by a plain URL (no declared format).
    fn plain_url(self) -> bool {
        matches!(self, Entrance::FetchMiss | Entrance::Revalidation)
    }
}

fn curl(args: &[&str]) -> (i32, Vec<u8>) {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "30"])
        .args(args)
        .output()
        .unwrap();
    (out.status.code().unwrap_or(-1), out.stdout)
}

/// `imgcache_refused_images_total{reason}` as the server reports it now.
fn refused(addr: &str, reason: &str) -> u64 {
    let (_, text) = curl(&[&format!("http://{addr}/metrics")]);
    let want = format!("imgcache_refused_images_total{{reason=\"{reason}\"}} ");
    String::from_utf8_lossy(&text)
        .lines()
        .find_map(|l| l.strip_prefix(&want))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// Waits (polling the server's own counter, with a deadline) for a refusal to be counted.
fn refused_reaches(addr: &str, reason: &str, at_least: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n = refused(addr, reason);
        if n >= at_least || Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The keys with a record, per `imgcache list --json` on `cache`.
fn listed(cache: &Path) -> Vec<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_imgcache"))
        .arg("--cache-dir")
        .arg(cache)
        .args(["--json", "list"])
        .output()
        .unwrap();
    assert!(out.status.success(), "list: {out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| r["image_id"].as_str().unwrap().to_string())
        .collect()
}

fn uuid_for(n: usize) -> String {
    format!("00000000-0000-4000-8000-{n:012}")
}

struct World {
    origin_url: String,
    origin: Arc<Origin>,
    serve_cache: PathBuf,
    addr: String,
    fetch_cache: PathBuf,
    scratch: PathBuf,
}

impl World {
    /// Drives one entrance with one bad image; `n` makes its names unique.
    fn case(&self, entrance: Entrance, bad: Bad, n: usize) {
        let label = format!("{entrance:?} × {bad:?}");
        let dir = self.scratch.join(format!("case{n}"));
        std::fs::create_dir_all(&dir).unwrap();
        let obj = bad_object(bad, &dir);
        let id = uuid_for(n);
        let name = format!("img{n}.img");
        let file_url = format!("{}/files/{name}", self.origin_url);
        let reason = bad.reason();
        let before = refused(&self.addr, reason);
        let serve_key = |href: &str| {
            if entrance.plain_url() {
                uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, href.as_bytes()).to_string()
            } else {
                id.clone()
            }
        };
        match entrance {
            Entrance::GlanceMiss | Entrance::FetchMiss => {
                self.origin.objs.lock().unwrap().insert(
                    if entrance.plain_url() {
                        name.clone()
                    } else {
                        id.clone()
                    },
                    obj.clone(),
                );
                let url = match entrance {
                    Entrance::GlanceMiss => format!("http://{}/v2/images/{id}/file", self.addr),
                    _ => format!("http://{}/v1/fetch?href={file_url}", self.addr),
                };
                let token = format!("X-Auth-Token: {TOKEN}");
                for attempt in ["miss", "again"] {
                    let (rc, body) = curl(&["-f", "-H", &token, &url]);
                    assert!(
                        rc != 0 && body != obj.body,
                        "{label}: {attempt}: served (curl {rc}, {} bytes)",
                        body.len()
                    );
                }
            }
            Entrance::Prefetch => {
                self.origin
                    .objs
                    .lock()
                    .unwrap()
                    .insert(id.clone(), obj.clone());
                let (rc, _) = curl(&[
                    "-f",
                    "-X",
                    "PUT",
                    "-H",
                    &format!("X-Auth-Token: {ADMIN}"),
                    &format!("http://{}/v2/cache/{id}", self.addr),
                ]);
                assert_eq!(rc, 0, "{label}: queueing");
                assert!(
                    refused_reaches(&self.addr, reason, before + 1) > before,
                    "{label}: the prefetcher's refusal was not counted"
                );
                let (rc, body) = curl(&[
                    "-f",
                    "-H",
                    &format!("X-Auth-Token: {TOKEN}"),
                    &format!("http://{}/v2/images/{id}/file", self.addr),
                ]);
                assert!(
                    rc != 0 && body != obj.body,
                    "{label}: served after the prefetch"
                );
            }
            Entrance::Revalidation => {
                let good = raw_image(1 << 20, 1000 + n as u64);
                let good_obj = Obj {
                    md5: md5_hex(&good),
                    body: good.clone(),
                    disk_format: "raw".into(),
                    cut_at: None,
                };
                self.origin
                    .objs
                    .lock()
                    .unwrap()
                    .insert(name.clone(), good_obj);
                let url = format!("http://{}/v1/fetch?href={file_url}", self.addr);
                let (rc, body) = curl(&["-f", &url]);
                assert_eq!((rc, body.len()), (0, good.len()), "{label}: the good copy");
                assert!(body == good, "{label}: the good copy's bytes");
                // The origin changes to the bad image: the next hit is served from the cache
                // and revalidated in the background, which must refuse the new bytes.
                self.origin
                    .objs
                    .lock()
                    .unwrap()
                    .insert(name.clone(), obj.clone());
                let (rc, body) = curl(&["-f", &url]);
                assert!(rc == 0 && body == good, "{label}: the hit is the good copy");
                assert!(
                    refused_reaches(&self.addr, reason, before + 1) > before,
                    "{label}: the revalidation's refusal was not counted"
                );
                let (rc, body) = curl(&["-f", &url]);
                assert!(
                    rc == 0 && body == good,
                    "{label}: still the good copy afterwards"
                );
                let published = std::fs::read(self.serve_cache.join(serve_key(&file_url))).unwrap();
                assert!(
                    published == good,
                    "{label}: the published file is the good copy"
                );
                return;
            }
            Entrance::CliFetch | Entrance::CliFetchRaw => {
                self.origin
                    .objs
                    .lock()
                    .unwrap()
                    .insert(id.clone(), obj.clone());
                let dest = dir.join("dest.img");
                let mut cmd = Command::new(env!("CARGO_BIN_EXE_imgcache"));
                cmd.env_clear()
                    .env("PATH", std::env::var("PATH").unwrap_or_default())
                    .env("IMGCACHE_GLANCE_TOKEN", TOKEN)
                    .arg("--cache-dir")
                    .arg(&self.fetch_cache)
                    .args(["fetch", "-q", &format!("glance://{id}")])
                    .arg(&dest)
                    .args(["--glance-url", &self.origin_url]);
                if entrance == Entrance::CliFetchRaw {
                    cmd.arg("--raw");
                }
                let out = cmd.output().unwrap();
                let stderr = String::from_utf8_lossy(&out.stderr);
                assert_eq!(
                    out.status.code(),
                    Some(1),
                    "{label}: exit code; stderr {stderr}"
                );
                assert!(
                    stderr.starts_with("imgcache: "),
                    "{label}: one-line error: {stderr}"
                );
                assert!(!dest.exists(), "{label}: dest was written");
                let keys = listed(&self.fetch_cache);
                assert!(
                    !keys.iter().any(|k| k.starts_with(&id)),
                    "{label}: published {keys:?}"
                );
                return;
            }
        }
        // The server's entrances: nothing published, the refusal counted.
        let key = serve_key(&file_url);
        assert!(
            !listed(&self.serve_cache).contains(&key),
            "{label}: a record was published"
        );
        assert!(
            !self.serve_cache.join(&key).exists(),
            "{label}: a file was published"
        );
        assert!(
            refused_reaches(&self.addr, reason, before + 1) > before,
            "{label}: refusal not counted under {reason}"
        );
    }
}

#[test]
fn every_entrance_refuses_every_bad_image() {
    let (origin_url, origin) = start_origin();
    let tmp = tempfile::tempdir().unwrap();
    let serve_cache = tmp.path().join("serve");
    let fetch_cache = tmp.path().join("fetch");
    let scratch = tmp.path().join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let prefix = format!("{origin_url}/files/");
    let server = common::serve_env(
        &serve_cache,
        "http",
        &[
            "--glance-url",
            &origin_url,
            "--admin-token",
            ADMIN,
            "--allow-href-prefix",
            &prefix,
            "--permitted-formats",
            "raw,gpt,qcow2,iso",
        ],
        // Every /v1/fetch hit is revalidated (in the background); the prefetcher has no
        // client, so it downloads with the service token.
        &[
            ("IMGCACHE_REVALIDATE_INTERVAL", "0s"),
            ("IMGCACHE_GLANCE_TOKEN", TOKEN),
        ],
    );
    let world = World {
        origin_url,
        origin,
        serve_cache,
        addr: server.addr.clone(),
        fetch_cache,
        scratch,
    };
    let mut n = 0;
    let mut tried = Vec::new();
    for entrance in Entrance::ALL {
        for bad in Bad::ALL {
            n += 1;
            if bad == Bad::Qcow2DeclaredRaw && entrance.plain_url() {
                // Nothing declares a plain URL's format: qcow2 bytes are a qcow2 image.
                tried.push(format!(
                    "{entrance:?} × {bad:?}: n/a (a plain URL declares no format)"
                ));
                continue;
            }
            world.case(entrance, bad, n);
            tried.push(format!(
                "{entrance:?} × {bad:?}: refused{}",
                if entrance.server() {
                    ", counted"
                } else {
                    " (exit 1, no dest, no record)"
                }
            ));
        }
    }
    // The whole table, for the record.
    for line in &tried {
        eprintln!("one door: {line}");
    }
    let refusals = tried.iter().filter(|l| l.contains("refused")).count();
    assert_eq!(refusals, 6 * 7 - 2, "every applicable pair was tried");
    eprintln!("one door: {refusals} refusals over {} pairs", tried.len());
}

/// Hit paths open the master before deciding from it and link it while it is open: a fetch
/// racing an eviction links a whole master or downloads again, and never fails.
#[test]
fn fetch_racing_prune_never_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let body = raw_image(1 << 20, 99);
    let (origin, _) = common::origin(body.to_vec());
    let url = format!("{origin}/race.img");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let imgcache = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_imgcache"))
            .arg("--cache-dir")
            .arg(&cache)
            .args(args)
            .output()
            .unwrap()
    };
    // Prime the cache so the prune loop has something to evict from the start.
    let first = imgcache(&["fetch", "-q", &url, tmp.path().join("d0").to_str().unwrap()]);
    assert!(first.status.success(), "{first:?}");
    let prunes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let pruner = {
        let (stop, prunes, cache) = (stop.clone(), prunes.clone(), cache.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                let out = Command::new(env!("CARGO_BIN_EXE_imgcache"))
                    .arg("--cache-dir")
                    .arg(&cache)
                    .args(["prune", "--max-size", "0"])
                    .output()
                    .unwrap();
                assert!(out.status.success(), "prune: {out:?}");
                prunes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        })
    };
    let failures = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..4)
        .map(|t| {
            let (cache, url, failures, dir) = (
                cache.clone(),
                url.clone(),
                failures.clone(),
                tmp.path().to_path_buf(),
            );
            let body = body.clone();
            std::thread::spawn(move || {
                for i in 0..75 {
                    let dest = dir.join(format!("d{t}-{i}"));
                    let out = Command::new(env!("CARGO_BIN_EXE_imgcache"))
                        .arg("--cache-dir")
                        .arg(&cache)
                        .args(["fetch", "-q", &url])
                        .arg(&dest)
                        .output()
                        .unwrap();
                    let exact = std::fs::read(&dest).is_ok_and(|b| b == body);
                    if !out.status.success() || !exact {
                        failures.lock().unwrap().push(format!(
                            "{}: exact {exact}: {}",
                            dest.display(),
                            String::from_utf8_lossy(&out.stderr)
                        ));
                    }
                    // The deploy is done with it: the master is evictable again.
                    let _ = std::fs::remove_file(&dest);
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Release);
    pruner.join().unwrap();
    let failures = failures.lock().unwrap();
    eprintln!(
        "fetch racing prune: 300 fetches, {} prunes alongside, {} failures",
        prunes.load(std::sync::atomic::Ordering::Relaxed),
        failures.len()
    );
    assert!(
        prunes.load(std::sync::atomic::Ordering::Relaxed) >= 10,
        "the race ran"
    );
    assert!(failures.is_empty(), "{failures:#?}");
}
