//! Fixtures for the image-serving tests: a fake upstream Glance / http origin (axum) that
//! counts data requests and can throttle, die mid-body or lie about checksums, and the
//! server itself run in-process on 127.0.0.1:0.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use imgcache_server::ServerConfig;
use imgcache_store::{Algorithm, Integrity};
use tokio::net::TcpListener;

pub const MIB: usize = 1 << 20;
pub const GOOD_TOKEN: &str = "good-token";
pub const STRANGER_TOKEN: &str = "stranger-token";

pub use imgcache_testkit::image_bytes;

pub fn md5_hex(data: &[u8]) -> String {
    Integrity::of(Algorithm::Md5, data).hex().to_string()
}

#[derive(Clone, Debug)]
pub struct Img {
    pub body: Bytes,
    /// Only GOOD_TOKEN may see it (others get 403).
    pub private: bool,
    /// The md5 Glance claims (defaults to the true one).
    pub md5: Option<String>,
    /// Send the body in `chunk`-byte pieces `delay` apart.
    pub throttle: Option<(usize, Duration)>,
    /// Send this many bytes, then fail the body (the connection is cut).
    pub die_after: Option<usize>,
}

impl Img {
    pub fn new(body: Bytes) -> Img {
        Img {
            body,
            private: false,
            md5: None,
            throttle: None,
            die_after: None,
        }
    }
}

#[derive(Default)]
pub struct FakeState {
    images: Mutex<HashMap<String, Img>>,
    /// Data requests (`.../file` and `/files/...`) per image id / name.
    data: Mutex<HashMap<String, usize>>,
    meta: AtomicUsize,
    /// When each image's body was last completely sent (or failed).
    body_end: Mutex<HashMap<String, Instant>>,
    /// Conditional requests on `/files/...` answered 304, per name.
    not_modified: Mutex<HashMap<String, usize>>,
    /// `/redirect/{name}` answers 302 to this Location.
    redirects: Mutex<HashMap<String, String>>,
    /// Every request, on any path.
    requests: AtomicUsize,
}

pub struct Fake {
    pub addr: SocketAddr,
    pub state: Arc<FakeState>,
}

impl Fake {
    pub async fn start() -> Fake {
        let state = Arc::new(FakeState::default());
        let app = axum::Router::new()
            .route("/v2/images/{id}", get(image_record))
            .route("/v2/images/{id}/file", get(image_file))
            .route("/files/{name}", get(plain_file))
            .route("/redirect/{name}", get(redirect))
            .layer(axum::middleware::from_fn_with_state(state.clone(), count))
            .with_state(state.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Fake { addr, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn add(&self, id: &str, img: Img) {
        self.state
            .images
            .lock()
            .unwrap()
            .insert(id.to_string(), img);
    }

    pub fn data_requests(&self, id: &str) -> usize {
        self.state
            .data
            .lock()
            .unwrap()
            .get(id)
            .copied()
            .unwrap_or(0)
    }

    /// Conditional requests for `/files/{name}` answered 304 Not Modified.
    pub fn not_modified(&self, name: &str) -> usize {
        self.state
            .not_modified
            .lock()
            .unwrap()
            .get(name)
            .copied()
            .unwrap_or(0)
    }

    /// `GET /redirect/{name}` answers `302 Found` with `Location: location` (verbatim).
    pub fn redirect(&self, name: &str, location: &str) {
        self.state
            .redirects
            .lock()
            .unwrap()
            .insert(name.to_string(), location.to_string());
    }

    /// Requests of any kind on any path so far.
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    pub fn body_end(&self, id: &str) -> Option<Instant> {
        self.state.body_end.lock().unwrap().get(id).copied()
    }
}

async fn count(
    State(st): State<Arc<FakeState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    st.requests.fetch_add(1, Ordering::SeqCst);
    next.run(req).await
}

async fn redirect(State(st): State<Arc<FakeState>>, UrlPath(name): UrlPath<String>) -> Response {
    match st.redirects.lock().unwrap().get(&name) {
        Some(location) => Response::builder()
            .status(StatusCode::FOUND)
            .header(header::LOCATION, location)
            .body(Body::empty())
            .unwrap(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn image_record(
    State(st): State<Arc<FakeState>>,
    UrlPath(id): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    st.meta.fetch_add(1, Ordering::Relaxed);
    let token = headers.get("x-auth-token").and_then(|v| v.to_str().ok());
    let Some(token) = token else {
        return StatusCode::UNAUTHORIZED.into_response();
    };
    let Some(img) = st.images.lock().unwrap().get(&id).cloned() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    if img.private && token != GOOD_TOKEN {
        return StatusCode::FORBIDDEN.into_response();
    }
    let md5 = img.md5.clone().unwrap_or_else(|| md5_hex(&img.body));
    axum::Json(serde_json::json!({
        "id": id,
        "status": "active",
        "size": img.body.len(),
        "checksum": md5,
        "disk_format": "raw",
        "updated_at": "2026-11-30T08:00:00Z",
    }))
    .into_response()
}

async fn image_file(State(st): State<Arc<FakeState>>, UrlPath(id): UrlPath<String>) -> Response {
    send(st, id, None).await
}

/// A plain file, with an ETag (its md5) and If-None-Match answered with 304; a HEAD is not
/// counted as a data request.
async fn plain_file(
    State(st): State<Arc<FakeState>>,
    UrlPath(name): UrlPath<String>,
    method: axum::http::Method,
    headers: HeaderMap,
) -> Response {
    let etag = st
        .images
        .lock()
        .unwrap()
        .get(&name)
        .map(|img| format!("\"{}\"", md5_hex(&img.body)));
    if let Some(etag) = &etag
        && headers
            .get(header::IF_NONE_MATCH)
            .is_some_and(|v| v.as_bytes() == etag.as_bytes())
    {
        *st.not_modified.lock().unwrap().entry(name).or_default() += 1;
        return StatusCode::NOT_MODIFIED.into_response();
    }
    if method == axum::http::Method::HEAD {
        let Some(len) = st.images.lock().unwrap().get(&name).map(|i| i.body.len()) else {
            return StatusCode::NOT_FOUND.into_response();
        };
        let mut r = Response::builder()
            .header(header::CONTENT_LENGTH, len)
            .header(header::LAST_MODIFIED, FILES_LAST_MODIFIED);
        if let Some(etag) = etag {
            r = r.header(header::ETAG, etag);
        }
        return r.body(Body::empty()).unwrap();
    }
    let mut r = send(st, name, etag).await;
    if r.status().is_success() {
        r.headers_mut()
            .insert(header::LAST_MODIFIED, FILES_LAST_MODIFIED.parse().unwrap());
    }
    r
}

/// The `Last-Modified` of every plain file.
pub const FILES_LAST_MODIFIED: &str = "Mon, 30 Nov 2026 08:00:00 GMT";

async fn send(st: Arc<FakeState>, id: String, etag: Option<String>) -> Response {
    *st.data.lock().unwrap().entry(id.clone()).or_default() += 1;
    let Some(img) = st.images.lock().unwrap().get(&id).cloned() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let len = img.body.len();
    let (chunk, delay) = img.throttle.unwrap_or((256 << 10, Duration::ZERO));
    let stream = futures_util::stream::unfold(0usize, move |pos| {
        let img = img.clone();
        let st = st.clone();
        let id = id.clone();
        async move {
            if pos >= img.body.len() {
                st.body_end.lock().unwrap().insert(id, Instant::now());
                return None;
            }
            if let Some(d) = img.die_after
                && pos >= d
            {
                st.body_end.lock().unwrap().insert(id, Instant::now());
                return Some((Err(std::io::Error::other("origin died")), usize::MAX));
            }
            if !delay.is_zero() && pos > 0 {
                tokio::time::sleep(delay).await;
            }
            let mut end = (pos + chunk).min(img.body.len());
            if let Some(d) = img.die_after {
                end = end.min(d.max(pos + 1));
            }
            if end >= img.body.len() {
                // hyper stops polling once Content-Length is reached: the last chunk is the end.
                st.body_end.lock().unwrap().insert(id, Instant::now());
            }
            Some((Ok::<_, std::io::Error>(img.body.slice(pos..end)), end))
        }
    });
    let mut r = Response::builder()
        .header(header::CONTENT_LENGTH, len)
        .header(header::CONTENT_TYPE, "application/octet-stream");
    if let Some(etag) = etag {
        r = r.header(header::ETAG, etag);
    }
    r.body(Body::from_stream(stream)).unwrap()
}

/// The server, in-process.
pub struct Server {
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Server {
    pub async fn start(fake: &Fake, tweak: impl FnOnce(&mut ServerConfig)) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = ServerConfig::new(dir.path().join("cache"));
        cfg.sources.glance_url = Some(fake.url().parse().unwrap());
        cfg.sources.http.retries = 0;
        cfg.allow_href_prefixes = vec![format!("{}/files/", fake.url())];
        cfg.header_read_timeout = Duration::from_secs(1);
        cfg.shutdown_grace = Duration::from_secs(2);
        tweak(&mut cfg);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(imgcache_server::run_on(listener, cfg, async {
            let _ = rx.await;
        }));
        Server {
            addr,
            dir,
            stop: Some(tx),
            handle: Some(handle),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn image_url(&self, id: &str) -> String {
        self.url(&format!("/v2/images/{id}/file"))
    }

    pub fn cache_dir(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    pub fn published(&self, key: &str) -> PathBuf {
        self.cache_dir().join(key)
    }

    /// The published file of `key`, once there: a miss's clients get their last byte when the
    /// bytes are verified, and the fsync and rename that publish them may finish just after.
    pub async fn wait_published(&self, key: &str) -> PathBuf {
        let path = self.published(key);
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !path.exists() && std::time::Instant::now() < until {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        path
    }

    pub fn invalid(&self, key: &str) -> PathBuf {
        self.cache_dir().join("invalid").join(key)
    }

    /// Triggers shutdown and waits for `run_on` to return.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match self.handle.take() {
            Some(h) => tokio::time::timeout(Duration::from_secs(30), h)
                .await
                .expect("server stops in time")
                .expect("server task"),
            None => Ok(()),
        }
    }
}

pub fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// Runs a command (off the runtime), returning (status ok, stdout).
pub async fn run_cmd(program: &str, args: Vec<String>) -> (bool, Vec<u8>, String) {
    let program = program.to_string();
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(&program)
            .args(&args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        (
            out.status.success(),
            out.stdout,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

pub fn have(program: &str) -> bool {
    std::process::Command::new(program)
        .arg("--version")
        .output()
        .is_ok()
}

pub fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            out.push(if i <= c.len() {
                T[(n >> (18 - 6 * i) & 63) as usize] as char
            } else {
                '='
            });
        }
    }
    out
}

pub fn hex_bytes(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

/// Sends a raw HTTP/1.1 request (so the path goes out exactly as written: no client
/// normalises `..` away) and returns the status and the body.
pub async fn raw_get(addr: SocketAddr, path: &str, headers: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("answer in time")
        .unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}
