//! A plain HTTP file origin: serves a directory as a static web server does (GET and HEAD),
//! with `Last-Modified` (the file's mtime), a strong `ETag` (nginx's form,
//! `"<mtime hex>-<size hex>"`), `Accept-Ranges: bytes`, one-range `Range` requests and
//! RFC 9110's conditional requests in its evaluation order. It counts data requests (GET
//! answered 200 or 206) and 304s per path, so tests can tell whether a client or a cache
//! downloaded or revalidated. Knobs for tests: a path's body sent slowly or cut mid-way, and
//! a path answered with a redirect (a rewrite rule).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::background::Background;
use crate::glance::{Pace, paced_body, parse_range};

pub struct Origin {
    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub url: String,
    pub addr: std::net::SocketAddr,
    pub root: PathBuf,
    state: Arc<OriginState>,
    _server: Background,
    _dir: Option<tempfile::TempDir>,
}

#[derive(Default)]
struct OriginState {
    data: Mutex<HashMap<String, usize>>,
    all: Mutex<HashMap<String, usize>>,
    not_modified: Mutex<HashMap<String, usize>>,
    body_end: Arc<Mutex<HashMap<String, Instant>>>,
    paces: Mutex<HashMap<String, Pace>>,
    redirects: Mutex<HashMap<String, String>>,
}

fn set_mtime(file: &std::path::Path, t: SystemTime) {
    std::fs::File::options()
        .write(true)
        .open(file)
        .and_then(|f| f.set_modified(t))
        .expect("set mtime");
}

fn count(m: &Mutex<HashMap<String, usize>>, path: &str) -> usize {
    m.lock().unwrap().get(path).copied().unwrap_or(0)
}

impl Origin {
    /// Serves `root` (files may be added or changed while it runs).
    pub fn start(root: impl Into<PathBuf>) -> Origin {
        let root = root.into();
        let state = Arc::new(OriginState::default());
        let (r, s) = (root.clone(), state.clone());
        let server = Background::start("file-origin", move |_| {
            Router::new().fallback(serve).with_state((Arc::new(r), s))
        });
        Origin {
            url: server.url(),
            addr: server.addr,
            root,
            state,
            _server: server,
            _dir: None,
        }
    }

    /// Serves a fresh temporary directory (removed when dropped); add files with
    /// [`Origin::put`].
    pub fn temp() -> Origin {
        let dir = tempfile::Builder::new()
            .prefix("file-origin")
            .tempdir()
            .expect("temp dir");
        let mut origin = Origin::start(dir.path());
        origin._dir = Some(dir);
        origin
    }

    /// The URL of `path`.
    pub fn at(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// Writes `body` as the file at `path` (e.g. `/files/a.img`), as a deploy replacing it
    /// would: its mtime is later than the previous file's (so its validators change), and the
    /// path's knobs ([`Origin::throttle`], [`Origin::die_after`]) are reset.
    pub fn put(&self, path: &str, body: &[u8]) {
        let file = self.root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(file.parent().expect("a file path")).expect("mkdir");
        let before = std::fs::metadata(&file).and_then(|m| m.modified()).ok();
        std::fs::write(&file, body).expect("write origin file");
        let now = SystemTime::now();
        let mtime = match before {
            Some(b) if b + Duration::from_secs(1) > now => b + Duration::from_secs(1),
            _ => now,
        };
        set_mtime(&file, mtime);
        self.state.paces.lock().unwrap().remove(path);
    }

    /// Sets the file's mtime, so that it is served with `Last-Modified: last_modified` (an
    /// HTTP date).
    pub fn touch(&self, path: &str, last_modified: &str) {
        let t = httpdate::parse_http_date(last_modified).expect("an HTTP date");
        set_mtime(&self.root.join(path.trim_start_matches('/')), t);
    }

    /// `path`'s body sent `chunk` bytes at a time, `delay` apart.
    pub fn throttle(&self, path: &str, chunk: usize, delay: Duration) {
        let mut p = self.state.paces.lock().unwrap();
        let pace = p.entry(path.to_string()).or_default();
        pace.chunk = chunk.max(1);
        pace.delay = delay;
    }

    /// `path`'s downloads cut (the connection reset) once `n` bytes of it are sent.
    pub fn die_after(&self, path: &str, n: u64) {
        let mut p = self.state.paces.lock().unwrap();
        p.entry(path.to_string()).or_default().die_after = Some(n);
    }

    /// `GET path` answers `302 Found` with `Location: location` (verbatim).
    pub fn redirect(&self, path: &str, location: &str) {
        let mut r = self.state.redirects.lock().unwrap();
        r.insert(path.to_string(), location.to_string());
    }

    /// The (ETag, Last-Modified) `path` is served with now.
    pub fn validators_of(&self, path: &str) -> (String, String) {
        let file = self.root.join(path.trim_start_matches('/'));
        validators(&std::fs::metadata(file).expect("origin file"))
    }

    /// GET requests for `path` (e.g. `/images/disk.img`) answered with data.
    pub fn data_requests(&self, path: &str) -> usize {
        count(&self.state.data, path)
    }

    /// Conditional requests for `path` answered 304 Not Modified.
    pub fn not_modified(&self, path: &str) -> usize {
        count(&self.state.not_modified, path)
    }

    /// Every request for `path`, any method and status.
    pub fn requests(&self, path: &str) -> usize {
        count(&self.state.all, path)
    }

    /// Every request so far, any path, method and status.
    pub fn all_requests(&self) -> usize {
        self.state.all.lock().unwrap().values().sum()
    }

    /// When a download of `path` last sent its last byte (or was cut).
    pub fn body_end(&self, path: &str) -> Option<Instant> {
        self.state.body_end.lock().unwrap().get(path).copied()
    }
}

/// The validators this origin gives `meta`'s file: (ETag, Last-Modified).
pub fn validators(meta: &std::fs::Metadata) -> (String, String) {
    let mtime = meta.modified().unwrap_or(UNIX_EPOCH);
    let secs = mtime
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    (
        format!("\"{secs:x}-{:x}\"", meta.len()),
        httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(secs)),
    )
}

/// Does an `If-Match`/`If-None-Match` list match `etag`? `weak`: the weak comparison.
fn etag_matches(list: &str, etag: &str, weak: bool) -> bool {
    let bare = |t: &str| t.trim().trim_start_matches("W/").to_string();
    list.split(',').map(str::trim).any(|t| {
        t == "*"
            || if weak {
                bare(t) == bare(etag)
            } else {
                !t.starts_with("W/") && t == etag
            }
    })
}

fn date(h: &HeaderMap, name: header::HeaderName) -> Option<SystemTime> {
    httpdate::parse_http_date(h.get(name)?.to_str().ok()?).ok()
}

fn text(h: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    h.get(name)?.to_str().ok()
}

type St = (Arc<PathBuf>, Arc<OriginState>);

async fn serve(State((root, st)): State<St>, req: Request) -> Response {
    let path = req.uri().path().to_string();
    *st.all.lock().unwrap().entry(path.clone()).or_default() += 1;
    let method = req.method().clone();
    if method != Method::GET && method != Method::HEAD {
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    }
    if let Some(location) = st.redirects.lock().unwrap().get(&path) {
        return Response::builder()
            .status(StatusCode::FOUND)
            .header(header::LOCATION, location)
            .body(axum::body::Body::empty())
            .expect("response");
    }
    let rel = path.trim_start_matches('/');
    if rel.split('/').any(|s| s == ".." || s.is_empty()) {
        return StatusCode::NOT_FOUND.into_response();
    }
    let file = root.join(rel);
    let Some(meta) = std::fs::metadata(&file).ok().filter(|m| m.is_file()) else {
        return (StatusCode::NOT_FOUND, "not found\n").into_response();
    };
    let (etag, lm) = validators(&meta);
    let lm_time = httpdate::parse_http_date(&lm).expect("own date");
    let size = meta.len();
    let h = req.headers();
    let base = |status: StatusCode| {
        Response::builder()
            .status(status)
            .header(header::ETAG, &etag)
            .header(header::LAST_MODIFIED, &lm)
            .header(header::ACCEPT_RANGES, "bytes")
    };
    // RFC 9110 13.2.2: If-Match, else If-Unmodified-Since; If-None-Match, else
    // If-Modified-Since; then Range under If-Range.
    if let Some(im) = text(h, header::IF_MATCH) {
        if !etag_matches(im, &etag, false) {
            return base(StatusCode::PRECONDITION_FAILED)
                .body(axum::body::Body::empty())
                .expect("response");
        }
    } else if let Some(t) = date(h, header::IF_UNMODIFIED_SINCE)
        && lm_time > t
    {
        return base(StatusCode::PRECONDITION_FAILED)
            .body(axum::body::Body::empty())
            .expect("response");
    }
    let not_modified = if let Some(inm) = text(h, header::IF_NONE_MATCH) {
        etag_matches(inm, &etag, true)
    } else if let Some(t) = date(h, header::IF_MODIFIED_SINCE) {
        lm_time <= t
    } else {
        false
    };
    if not_modified {
        *st.not_modified.lock().unwrap().entry(path).or_default() += 1;
        return base(StatusCode::NOT_MODIFIED)
            .body(axum::body::Body::empty())
            .expect("response");
    }
    let mut range = text(h, header::RANGE).map(str::to_string);
    if let Some(ir) = text(h, header::IF_RANGE) {
        let ok = if ir.starts_with('"') {
            ir == etag
        } else {
            httpdate::parse_http_date(ir).is_ok_and(|t| t == lm_time)
        };
        if !ok {
            range = None;
        }
    }
    let (status, start, len, cr) = match range {
        None => (StatusCode::OK, 0, size, None),
        Some(r) => match parse_range(&r, size) {
            Some((s, e)) => (
                StatusCode::PARTIAL_CONTENT,
                s,
                e - s + 1,
                Some(format!("bytes {s}-{e}/{size}")),
            ),
            None => {
                return base(StatusCode::RANGE_NOT_SATISFIABLE)
                    .header(header::CONTENT_RANGE, format!("bytes */{size}"))
                    .body(axum::body::Body::empty())
                    .expect("response");
            }
        },
    };
    let mut b = base(status)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, len);
    if let Some(cr) = cr {
        b = b.header(header::CONTENT_RANGE, cr);
    }
    if method == Method::HEAD {
        return b.body(axum::body::Body::empty()).expect("response");
    }
    *st.data.lock().unwrap().entry(path.clone()).or_default() += 1;
    let pace = st
        .paces
        .lock()
        .unwrap()
        .get(&path)
        .cloned()
        .unwrap_or_default();
    let ends = st.body_end.clone();
    let body = paced_body(file, start, len, pace, move || {
        ends.lock().unwrap().insert(path.clone(), Instant::now());
    });
    b.body(body).expect("response")
}
