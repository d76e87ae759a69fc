//! Test fixtures for the fetch integration tests: an in-process origin (axum, plus a raw TCP
//! listener for the misbehaviours an HTTP library will not produce), a fake Glance, cache
//! environments, a tmpfs mount guard and the assertions every failure test shares.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use imgcache_fetch::{FetchError, Href, HttpOptions, ImageCache, SourceConfig, cache_key};
use imgcache_store::{Cache, CacheSpec, DriverKind, Key, Status};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

pub const MIB: usize = 1 << 20;

pub use imgcache_testkit::image_bytes;

/// How a route answers.
#[derive(Clone, Debug)]
pub enum Behave {
    Normal,
    /// Always this status.
    Status(u16),
    /// `failures` answers with `status`, then normal.
    FailThen {
        status: u16,
        failures: usize,
    },
    /// The body in `chunk`-byte pieces, `delay` apart (Content-Length still sent).
    Throttle {
        chunk: usize,
        delay: Duration,
    },
    /// `after` bytes, then silence for `stall`, then the rest.
    Stall {
        after: usize,
        stall: Duration,
    },
    /// Chunked transfer encoding: no Content-Length, so the client cannot preallocate.
    Chunked,
    /// A redirect: `status` (301, 302, 303, 307, 308) with this `Location`, verbatim.
    Redirect {
        status: u16,
        location: String,
    },
    // Raw listener only:
    /// Content-Length of the whole body, `after` bytes, then a TCP RST.
    Reset {
        after: usize,
    },
    /// Content-Length of the whole body, only `send` bytes, then a clean close (FIN).
    Short {
        send: usize,
    },
    /// Content-Length of the whole body, then the body and `extra` more bytes.
    Long {
        extra: usize,
    },
}

#[derive(Clone, Debug)]
pub struct Route {
    pub body: Bytes,
    pub etag: Option<String>,
    pub last_modified: Option<String>,
    pub content_type: &'static str,
    pub behave: Behave,
}

impl Route {
    pub fn new(body: Bytes) -> Route {
        Route {
            body,
            etag: None,
            last_modified: None,
            content_type: "application/octet-stream",
            behave: Behave::Normal,
        }
    }
    pub fn etag(mut self, e: &str) -> Route {
        self.etag = Some(format!("\"{e}\""));
        self
    }
    pub fn last_modified(mut self, lm: &str) -> Route {
        self.last_modified = Some(lm.to_string());
        self
    }
    pub fn behave(mut self, b: Behave) -> Route {
        self.behave = b;
        self
    }
    /// A 302 to `location`.
    pub fn redirect(location: &str) -> Route {
        Route::new(Bytes::new()).behave(Behave::Redirect {
            status: 302,
            location: location.to_string(),
        })
    }
}

/// Requests seen on one path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Unconditional GETs.
    pub get: usize,
    /// GETs with If-None-Match / If-Modified-Since.
    pub conditional: usize,
    /// 304 answers.
    pub not_modified: usize,
}

impl Counts {
    pub fn total(&self) -> usize {
        self.get + self.conditional
    }
}

#[derive(Default)]
struct State {
    routes: Mutex<HashMap<String, Route>>,
    counts: Mutex<HashMap<String, Counts>>,
    tokens: Mutex<Vec<Option<String>>>,
    /// When each path last finished sending a full body.
    body_done: Mutex<HashMap<String, Instant>>,
}

impl State {
    /// Counts the request and returns its route, with `FailThen` already consumed.
    fn arrive(&self, path: &str, headers: &HeaderMap) -> Option<(Route, bool)> {
        let conditional = headers.contains_key(header::IF_NONE_MATCH)
            || headers.contains_key(header::IF_MODIFIED_SINCE);
        {
            let mut c = self.counts.lock().unwrap();
            let e = c.entry(path.to_string()).or_default();
            if conditional {
                e.conditional += 1;
            } else {
                e.get += 1;
            }
        }
        self.tokens.lock().unwrap().push(
            headers
                .get("x-auth-token")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        );
        let mut routes = self.routes.lock().unwrap();
        let route = routes.get_mut(path)?;
        let snapshot = route.clone();
        if let Behave::FailThen { failures, .. } = &mut route.behave
            && *failures > 0
        {
            *failures -= 1;
        }
        Some((snapshot, conditional))
    }

    fn not_modified(&self, path: &str) {
        self.counts
            .lock()
            .unwrap()
            .entry(path.to_string())
            .or_default()
            .not_modified += 1;
    }

    fn done(&self, path: &str) {
        self.body_done
            .lock()
            .unwrap()
            .insert(path.to_string(), Instant::now());
    }
}

/// The in-process origin: an axum server and a raw TCP server sharing one route table.
pub struct Origin {
    addr: SocketAddr,
    raw_addr: SocketAddr,
    state: Arc<State>,
}

impl Origin {
    /// Starts both listeners on 127.0.0.1:0 on the current tokio runtime.
    pub async fn start() -> Origin {
        let state = Arc::new(State::default());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let st = state.clone();
        let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
            let st = st.clone();
            async move { serve(st, req).await }
        });
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        let raw = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let raw_addr = raw.local_addr().unwrap();
        let st = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = raw.accept().await else {
                    return;
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let _ = serve_raw(st, sock).await;
                });
            }
        });
        Origin {
            addr,
            raw_addr,
            state,
        }
    }

    pub fn set(&self, path: &str, route: Route) {
        self.state
            .routes
            .lock()
            .unwrap()
            .insert(path.to_string(), route);
    }

    /// URL on the axum listener.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// URL on the raw listener (Reset / Short / Long routes).
    pub fn raw_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.raw_addr)
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn counts(&self, path: &str) -> Counts {
        self.state
            .counts
            .lock()
            .unwrap()
            .get(path)
            .copied()
            .unwrap_or_default()
    }

    /// Requests on every path.
    pub fn total_requests(&self) -> usize {
        self.state
            .counts
            .lock()
            .unwrap()
            .values()
            .map(Counts::total)
            .sum()
    }

    pub fn body_done(&self, path: &str) -> Option<Instant> {
        self.state.body_done.lock().unwrap().get(path).copied()
    }

    pub fn tokens(&self) -> Vec<Option<String>> {
        self.state.tokens.lock().unwrap().clone()
    }

    /// A fake Glance image: `GET /v2/images/{id}` and `GET /v2/images/{id}/file`.
    pub fn glance_image(&self, id: &str, image: &GlanceImage) {
        let json = serde_json::json!({
            "id": id,
            "status": image.status,
            "size": image.body.len(),
            "checksum": image.md5,
            "os_hash_algo": image.os_hash_algo,
            "os_hash_value": image.os_hash_value,
            "disk_format": image.disk_format,
            "container_format": "bare",
            "updated_at": "2024-05-01T10:00:00Z",
        });
        let mut meta = Route::new(Bytes::from(json.to_string()));
        meta.content_type = "application/json";
        self.set(&format!("/v2/images/{id}"), meta);
        self.set(
            &format!("/v2/images/{id}/file"),
            Route::new(image.body.clone()),
        );
    }
}

pub struct GlanceImage {
    pub status: &'static str,
    pub body: Bytes,
    pub md5: Option<String>,
    pub os_hash_algo: Option<&'static str>,
    pub os_hash_value: Option<String>,
    pub disk_format: &'static str,
}

impl GlanceImage {
    /// An active raw image whose metadata carries its true md5 and sha512.
    pub fn active(body: Bytes) -> GlanceImage {
        use imgcache_store::{Algorithm, Integrity};
        GlanceImage {
            status: "active",
            md5: Some(Integrity::of(Algorithm::Md5, &body).hex().to_string()),
            os_hash_algo: Some("sha512"),
            os_hash_value: Some(Integrity::of(Algorithm::Sha512, &body).hex().to_string()),
            disk_format: "raw",
            body,
        }
    }
}

fn status_response(code: u16) -> Response {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap())
        .body(Body::from(format!("status {code}\n")))
        .unwrap()
}

async fn serve(st: Arc<State>, req: axum::extract::Request) -> Response {
    let path = req.uri().path().to_string();
    let Some((route, conditional)) = st.arrive(&path, req.headers()) else {
        return status_response(404);
    };
    match route.behave {
        Behave::Status(code) => return status_response(code),
        Behave::FailThen { status, failures } if failures > 0 => return status_response(status),
        Behave::Redirect { status, location } => {
            return Response::builder()
                .status(StatusCode::from_u16(status).unwrap())
                .header(header::LOCATION, location)
                .body(Body::empty())
                .unwrap();
        }
        _ => {}
    }
    if conditional {
        let h = req.headers();
        let etag_match = match (h.get(header::IF_NONE_MATCH), &route.etag) {
            (Some(v), Some(e)) => v.to_str().ok() == Some(e.as_str()),
            _ => false,
        };
        let lm_match = !h.contains_key(header::IF_NONE_MATCH)
            && match (h.get(header::IF_MODIFIED_SINCE), &route.last_modified) {
                (Some(v), Some(lm)) => v.to_str().ok() == Some(lm.as_str()),
                _ => false,
            };
        if etag_match || lm_match {
            st.not_modified(&path);
            let mut b = Response::builder().status(StatusCode::NOT_MODIFIED);
            if let Some(e) = &route.etag {
                b = b.header(header::ETAG, e);
            }
            return b.body(Body::empty()).unwrap();
        }
    }
    let mut b = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, route.content_type);
    if let Some(e) = &route.etag {
        b = b.header(header::ETAG, e);
    }
    if let Some(lm) = &route.last_modified {
        b = b.header(header::LAST_MODIFIED, lm);
    }
    if !matches!(route.behave, Behave::Chunked) {
        b = b.header(header::CONTENT_LENGTH, HeaderValue::from(route.body.len()));
    }
    let body = route.body.clone();
    let (chunk, delay, stall_at, stall) = match route.behave {
        Behave::Throttle { chunk, delay } => (chunk, delay, usize::MAX, Duration::ZERO),
        Behave::Stall { after, stall } => (64 * 1024, Duration::ZERO, after, stall),
        _ => (256 * 1024, Duration::ZERO, usize::MAX, Duration::ZERO),
    };
    let len = body.len();
    let stream = futures_util::stream::unfold((0usize, false), move |(off, stalled)| {
        let body = body.clone();
        let st = st.clone();
        let path = path.clone();
        async move {
            if off >= len {
                st.done(&path);
                return None;
            }
            let mut stalled = stalled;
            if off == stall_at && !stalled {
                tokio::time::sleep(stall).await;
                stalled = true;
            }
            if !delay.is_zero() && off > 0 {
                tokio::time::sleep(delay).await;
            }
            let mut end = (off + chunk).min(len);
            if off < stall_at && end > stall_at {
                end = stall_at;
            }
            if end == len {
                // hyper stops polling once Content-Length bytes are out: mark it here.
                st.done(&path);
            }
            Some((
                Ok::<_, std::io::Error>(body.slice(off..end)),
                (end, stalled),
            ))
        }
    });
    b.body(Body::from_stream(stream)).unwrap()
}

/// The raw listener: reads one request head and misbehaves as the route says.
async fn serve_raw(st: Arc<State>, mut sock: tokio::net::TcpStream) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = sock.read(&mut buf).await?;
        if n == 0 || head.len() > 64 * 1024 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines = text.split("\r\n");
    let path = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("/")
        .to_string();
    let mut headers = HeaderMap::new();
    for l in lines {
        if let Some((k, v)) = l.split_once(':')
            && let (Ok(k), Ok(v)) = (
                header::HeaderName::from_bytes(k.trim().as_bytes()),
                HeaderValue::from_str(v.trim()),
            )
        {
            headers.insert(k, v);
        }
    }
    let Some((route, _)) = st.arrive(&path, &headers) else {
        sock.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await?;
        return Ok(());
    };
    let body = &route.body;
    let resp_head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    sock.write_all(resp_head.as_bytes()).await?;
    match route.behave {
        Behave::Reset { after } => {
            sock.write_all(&body[..after]).await?;
            sock.flush().await?;
            tokio::time::sleep(Duration::from_millis(200)).await;
            // SO_LINGER 0: close sends RST instead of FIN.
            #[allow(deprecated)]
            sock.set_linger(Some(Duration::ZERO))?;
            drop(sock);
        }
        Behave::Short { send } => {
            sock.write_all(&body[..send]).await?;
            sock.shutdown().await?;
        }
        Behave::Long { extra } => {
            sock.write_all(body).await?;
            sock.write_all(&image_bytes(extra, 99)).await?;
            sock.flush().await?;
            tokio::time::sleep(Duration::from_millis(50)).await;
            sock.shutdown().await?;
        }
        _ => {
            sock.write_all(body).await?;
            sock.shutdown().await?;
        }
    }
    Ok(())
}

/// Short timeouts and backoffs, so failure tests finish fast.
pub fn http_options() -> HttpOptions {
    HttpOptions {
        connect_timeout: Duration::from_secs(2),
        read_timeout: Duration::from_secs(3),
        retries: 3,
        backoff: Duration::from_millis(20),
        ..HttpOptions::default()
    }
}

pub fn sources() -> SourceConfig {
    SourceConfig {
        http: http_options(),
        revalidate_interval: Duration::from_secs(3600),
        ..SourceConfig::default()
    }
}

/// A cache directory and a destination directory under one temp dir (one filesystem).
pub struct Env {
    pub tmp: tempfile::TempDir,
    pub cache_dir: PathBuf,
    pub dests: PathBuf,
    pub spec: CacheSpec,
    pub ic: ImageCache,
}

pub fn spec_at(dir: &Path, name: &str, priority: u32) -> CacheSpec {
    CacheSpec {
        name: name.to_string(),
        cache: Cache::open(dir, DriverKind::Sqlite).unwrap(),
        max_size: 1 << 40,
        ttl: Duration::from_secs(7 * 24 * 3600),
        priority,
    }
}

impl Env {
    pub fn new() -> Env {
        Env::with(sources())
    }

    pub fn with(src: SourceConfig) -> Env {
        Env::at(None, src)
    }

    /// With the cache in `cache_dir` (e.g. on a tmpfs) instead of beside the dests.
    pub fn at(cache_dir: Option<PathBuf>, src: SourceConfig) -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let cache_dir = cache_dir.unwrap_or_else(|| tmp.path().join("cache"));
        let dests = tmp.path().join("dests");
        std::fs::create_dir_all(&dests).unwrap();
        let spec = spec_at(&cache_dir, "instance", 50);
        let ic = ImageCache::new(spec.clone(), &src).unwrap();
        Env {
            tmp,
            cache_dir,
            dests,
            spec,
            ic,
        }
    }

    pub fn cache(&self) -> &Cache {
        &self.spec.cache
    }

    pub fn dest(&self, name: &str) -> PathBuf {
        self.dests.join(name)
    }

    pub fn master(&self, key: &Key) -> PathBuf {
        self.cache().get_image_filepath(key, Status::Active)
    }
}

pub fn key_of(href: &str, force_raw: bool) -> Key {
    cache_key(&Href::parse(href).unwrap(), href, force_raw)
}

pub fn inode(p: &Path) -> (u64, u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).unwrap();
    (m.dev(), m.ino(), m.nlink())
}

/// `dest` is a hard link of `master` (same inode) holding exactly `bytes`.
pub fn assert_linked(master: &Path, dest: &Path, bytes: &[u8]) {
    let (md, mi, _) = inode(master);
    let (dd, di, dn) = inode(dest);
    assert_eq!(
        (md, mi),
        (dd, di),
        "{} is not a hard link of {}",
        dest.display(),
        master.display()
    );
    assert!(dn >= 2, "nlink {dn}");
    let got = std::fs::read(dest).unwrap();
    assert!(
        got == bytes,
        "dest bytes differ ({} vs {} bytes)",
        got.len(),
        bytes.len()
    );
}

/// The invariants of every failed fetch: nothing published, no `dest` (nor a temp file beside
/// it), nothing left in `incomplete/`, and the key lock free.
pub fn assert_failed_cleanly(env: &Env, key: &Key, dest: &Path) {
    let cache = env.cache();
    assert!(!cache.is_cached(key).unwrap(), "{key} was published");
    assert!(!env.master(key).exists(), "master file exists");
    assert!(!dest.exists(), "dest {} exists", dest.display());
    let name = dest.file_name().unwrap().to_string_lossy().into_owned();
    if let Some(parent) = dest.parent().filter(|p| p.is_dir()) {
        let leftovers: Vec<_> = std::fs::read_dir(parent)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&format!(".{name}.")))
            .collect();
        assert!(
            leftovers.is_empty(),
            "temp files beside dest: {leftovers:?}"
        );
    }
    let incomplete = cache.get_image_filepath(key, Status::Incomplete);
    assert!(!incomplete.exists(), "{} left behind", incomplete.display());
    let stray: Vec<_> = std::fs::read_dir(cache.layout().incomplete_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(stray.is_empty(), "incomplete/ not empty: {stray:?}");
    // A child forked by another test of this binary (qemu-img, spawned with a pre_exec hook,
    // so by fork + exec) holds copies of every descriptor, the key lock's included, until its
    // exec closes them: under load that window can outlast the fetch. So the lock must be
    // released soon, not necessarily at once.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while cache.is_being_cached(key).unwrap() && std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(!cache.is_being_cached(key).unwrap(), "key lock still held");
}

/// Whether `invalid/<key>` holds the failed write, and how many bytes.
pub fn invalid_len(env: &Env, key: &Key) -> Option<u64> {
    std::fs::metadata(env.cache().get_image_filepath(key, Status::Invalid))
        .ok()
        .map(|m| m.len())
}

pub fn expect_err<T: std::fmt::Debug>(r: Result<T, FetchError>) -> FetchError {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e,
    }
}

/// A tmpfs mounted on a fresh temp dir, unmounted on drop.
pub struct Tmpfs {
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount tmpfs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs {
            path: dir.path().to_path_buf(),
            _dir: dir,
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Something still has a file open there: detach it so the temp dir can go.
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

/// Polls `f` until it is true or `within` passes.
pub fn wait_until(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    f()
}
