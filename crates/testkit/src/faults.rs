//! A fault-injection HTTP origin: raw HTTP/1.1 over std TCP (one thread per connection), so a
//! response can break every rule a real server's framework would enforce, and so it works from
//! sync tests, async tests and tests of the real binary alike.
//!
//! Each path has its bytes ([`File`]: a strong `ETag`, by default of its content, and
//! `Last-Modified`, both optional, and optionally `Content-MD5`) and a queue of [`Fault`]s,
//! each for a number of GETs; once the queue is used up (and for HEADs) a path is answered
//! correctly, with `Accept-Ranges: bytes` and one-range `Range` honoured when `If-Range` is
//! absent or matches the current validator (RFC 9110; else the whole body, a 200). Every
//! request is logged (method, path, `Range`, `If-Range`, the status answered), so a test can
//! tell a resume (a `Range` request) from a restart.
//!
//! Like a static web server it answers conditional requests (`If-None-Match`, else
//! `If-Modified-Since`, RFC 9110) with `304 Not Modified` when the path's validator matches;
//! a [`File::bare`] has no validators, so it is always sent whole. A path may also be a
//! permanent redirect ([`FaultOrigin::redirect`], any method), and a fault may be queued for
//! a number of GETs ([`FaultOrigin::fail`], [`ALWAYS`]).

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use md5::Digest as _;

/// What goes wrong with one response.
#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// Nothing: a correct answer.
    None,
    /// The full `Content-Length`, `n` body bytes, then a TCP reset (RST).
    ResetAfter(u64),
    /// The full `Content-Length`, `n` body bytes, then a clean close (FIN).
    ShortBody(u64),
    /// The body, then `extra` bytes (0xee) more than `Content-Length` said.
    TooLongBody(u64),
    /// `Content-Length` (and the body) `k` bytes shorter than the file: a consistent but
    /// truncated answer that only a checksum can tell.
    LengthShort(u64),
    /// The request is read, then nothing for this long; then the correct answer.
    StallBeforeHeaders(Duration),
    /// The request is read, and nothing is ever answered (the connection is held open until
    /// the origin is dropped).
    NoHeaders,
    /// Headers and `after` bytes, then nothing for `pause`, then the rest.
    StallMidBody { after: u64, pause: Duration },
    /// Headers and `after` bytes, then silence (the connection held open) until the origin
    /// is dropped.
    StallAfter(u64),
    /// This status (e.g. 503) with a short body.
    Status(u16),
    /// The byte at this offset flipped (the length is right).
    CorruptByte(u64),
    /// `302 Found` with this `Location`.
    Redirect(String),
    /// No `Content-Length`, bytes without end (until `cap` bytes, then a reset: never a
    /// complete body).
    Endless { cap: u64 },
    /// A correct answer sent slowly: `step` bytes, then `pause`, and so on (a download a test
    /// can kill mid-way).
    Paced { step: u64, pause: Duration },
    /// The body with `Transfer-Encoding: chunked` and no `Content-Length` (a client cannot
    /// know the size before the end).
    Chunked,
    /// Chunked as [`Fault::Chunked`], `step` bytes at a time with `pause` between them (an
    /// unannounced length that grows slowly enough for clients to join its download).
    ChunkedPaced { step: u64, pause: Duration },
    /// The file is replaced by `then` (with `then_etag`, quoted here, or else its content's
    /// ETag) during this answer, which is cut (reset) after `cut_after` bytes: the next
    /// attempt finds another file (another ETag).
    ChangedAfter {
        cut_after: u64,
        then: Bytes,
        then_etag: Option<String>,
    },
}

/// One logged request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Logged {
    pub method: String,
    pub path: String,
    pub range: Option<String>,
    pub if_range: Option<String>,
    /// Whether it was conditional (`If-None-Match` or `If-Modified-Since`).
    pub conditional: bool,
    /// Its `X-Auth-Token`.
    pub token: Option<String>,
    /// The status answered (0: none, for [`Fault::NoHeaders`]).
    pub status: u16,
}

/// Requests seen on one path ([`FaultOrigin::counts`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Unconditional requests.
    pub get: usize,
    /// Requests with `If-None-Match` or `If-Modified-Since`.
    pub conditional: usize,
    /// Those answered `304 Not Modified`.
    pub not_modified: usize,
}

impl Counts {
    /// Every request.
    pub fn total(&self) -> usize {
        self.get + self.conditional
    }
}

/// [`FaultOrigin::fail`]'s count for a fault on every GET (until the path is put again).
pub const ALWAYS: usize = usize::MAX;

/// What a path serves.
#[derive(Clone, Debug)]
pub struct File {
    body: Bytes,
    /// `None`: the content's ([`etag`]).
    etag: Option<Option<String>>,
    last_modified: Option<String>,
    content_md5: bool,
}

impl File {
    /// `body` with its content's ETag and [`LAST_MODIFIED`].
    pub fn new(body: impl Into<Bytes>) -> File {
        File {
            body: body.into(),
            etag: None,
            last_modified: Some(LAST_MODIFIED.to_string()),
            content_md5: false,
        }
    }
    /// `body` without validators (no `ETag`, no `Last-Modified`): it can be neither
    /// revalidated nor resumed.
    pub fn bare(body: impl Into<Bytes>) -> File {
        File::new(body).etag(None).last_modified(None)
    }
    /// This strong ETag (`"tag"`, quoted here), or none at all.
    pub fn etag(mut self, tag: Option<&str>) -> File {
        self.etag = Some(tag.map(|t| format!("\"{t}\"")));
        self
    }
    /// This `Last-Modified`, or none at all.
    pub fn last_modified(mut self, lm: Option<&str>) -> File {
        self.last_modified = lm.map(str::to_string);
        self
    }
    /// Sends `Content-MD5` (base64, of the correct bytes).
    pub fn content_md5(mut self, yes: bool) -> File {
        self.content_md5 = yes;
        self
    }
    fn tag(&self) -> Option<String> {
        match &self.etag {
            None => Some(etag(&self.body)),
            Some(t) => t.clone(),
        }
    }
}

struct Entry {
    file: File,
    /// Faults still to come, each for this many GETs.
    faults: VecDeque<(Fault, usize)>,
}

#[derive(Default)]
struct State {
    files: HashMap<String, Entry>,
    log: Vec<Logged>,
    redirects: HashMap<String, String>,
    body_end: HashMap<String, Instant>,
    no_ranges: bool,
    stop: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }
    fn stopped(&self) -> bool {
        self.lock().stop
    }
    /// Blocks until the origin is dropped.
    fn hold(&self) {
        let mut s = self.lock();
        while !s.stop {
            s = self.changed.wait(s).unwrap();
        }
    }
}

pub struct FaultOrigin {
    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub url: String,
    shared: Arc<Shared>,
}

impl Drop for FaultOrigin {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.changed.notify_all();
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.url.trim_start_matches("http://"));
    }
}

impl Default for FaultOrigin {
    fn default() -> Self {
        Self::start()
    }
}

impl FaultOrigin {
    pub fn start() -> FaultOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let shared = Arc::new(Shared::default());
        let st = shared.clone();
        std::thread::Builder::new()
            .name("fault-origin".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if st.stopped() {
                        return;
                    }
                    let Ok(conn) = conn else { continue };
                    let st = st.clone();
                    std::thread::spawn(move || handle(&st, conn));
                }
            })
            .expect("spawn");
        FaultOrigin { url, shared }
    }

    /// The URL of `path`.
    pub fn at(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// Serves `file` at `path` (e.g. `/images/a.img`), correctly until faults are queued.
    pub fn put(&self, path: &str, file: File) {
        self.shared.lock().files.insert(
            path.to_string(),
            Entry {
                file,
                faults: VecDeque::new(),
            },
        );
    }

    /// Serves `body` at `path`, `fault` applied to the first GET.
    pub fn add(&self, path: &str, body: Bytes, fault: Fault) {
        self.add_with(path, body, fault, 1, false);
    }

    /// [`FaultOrigin::add`] with the fault on the first `times` GETs, and `Content-MD5` sent
    /// (of the correct bytes) when `content_md5`.
    pub fn add_with(&self, path: &str, body: Bytes, fault: Fault, times: usize, content_md5: bool) {
        self.put(path, File::new(body).content_md5(content_md5));
        if times == 0 {
            return;
        }
        self.shared
            .lock()
            .files
            .get_mut(path)
            .expect("just put")
            .faults
            .push_back((fault, times));
    }

    /// The next `times` GETs of `path` (served already) get `fault` ([`ALWAYS`]: every one),
    /// after the faults queued before.
    pub fn fail(&self, path: &str, fault: Fault, times: usize) {
        let mut s = self.shared.lock();
        let e = s.files.get_mut(path).expect("fault for a path not served");
        e.faults.push_back((fault, times));
    }

    /// Every request for `path` (any method) answers `302 Found` with `Location: location`
    /// (verbatim), as a rewrite rule does.
    pub fn redirect(&self, path: &str, location: &str) {
        let mut s = self.shared.lock();
        s.redirects.insert(path.to_string(), location.to_string());
    }

    /// The next GETs of `path` get these faults, one each, in order (then correct answers).
    pub fn script(&self, path: &str, faults: impl IntoIterator<Item = Fault>) {
        let mut s = self.shared.lock();
        let e = s.files.get_mut(path).expect("script for a path not served");
        e.faults.extend(faults.into_iter().map(|f| (f, 1)));
    }

    /// Ignores `Range` (always the whole body, a 200), as an origin without range support.
    pub fn no_ranges(&self) {
        self.shared.lock().no_ranges = true;
    }

    /// The bytes `path` serves now (a [`Fault::ChangedAfter`] path changes them).
    pub fn body(&self, path: &str) -> Option<Bytes> {
        self.shared
            .lock()
            .files
            .get(path)
            .map(|e| e.file.body.clone())
    }

    /// Every request for `path` so far, in order.
    pub fn log(&self, path: &str) -> Vec<Logged> {
        let s = self.shared.lock();
        s.log.iter().filter(|l| l.path == path).cloned().collect()
    }

    /// Requests for `path` so far, unconditional and conditional.
    pub fn counts(&self, path: &str) -> Counts {
        let mut c = Counts::default();
        for l in self.log(path) {
            if l.conditional {
                c.conditional += 1;
            } else {
                c.get += 1;
            }
            c.not_modified += usize::from(l.status == 304);
        }
        c
    }

    /// Every request so far, any path.
    pub fn all_requests(&self) -> usize {
        self.shared.lock().log.len()
    }

    /// The `X-Auth-Token` of every request so far, in order.
    pub fn tokens(&self) -> Vec<Option<String>> {
        let s = self.shared.lock();
        s.log.iter().map(|l| l.token.clone()).collect()
    }

    /// When a whole body of `path` was last sent to its end.
    pub fn body_end(&self, path: &str) -> Option<Instant> {
        self.shared.lock().body_end.get(path).copied()
    }

    /// GETs of `path` so far.
    pub fn gets(&self, path: &str) -> usize {
        self.log(path).iter().filter(|l| l.method == "GET").count()
    }

    /// GETs of `path` that asked for a range (a resume).
    pub fn range_gets(&self, path: &str) -> usize {
        self.log(path)
            .iter()
            .filter(|l| l.method == "GET" && l.range.is_some())
            .count()
    }

    /// Waits until `n` requests (any path) have arrived (false if not within `within`).
    pub fn wait_requests(&self, n: usize, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let mut s = self.shared.lock();
        while s.log.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            s = self.shared.changed.wait_timeout(s, left).unwrap().0;
        }
        true
    }
}

/// The strong validator this origin gives `body` by default.
pub fn etag(body: &[u8]) -> String {
    let d = sha2::Sha256::digest(body);
    format!("\"{}\"", hex::encode(&d[..8]))
}

/// The `Last-Modified` a [`File`] has unless told otherwise.
pub const LAST_MODIFIED: &str = "Tue, 01 Jul 2025 12:00:00 GMT";

fn reset(conn: &TcpStream) {
    // SO_LINGER 0: close sends RST, not FIN.
    let _ = rustix::net::sockopt::set_socket_linger(conn, Some(Duration::ZERO));
}

/// The request line's method and path, and its headers (lower-case names).
fn read_request(conn: &TcpStream) -> Option<(String, String, HashMap<String, String>)> {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let mut reader = BufReader::new(conn.try_clone().ok()?);
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("/");
    let path = target.split('?').next().unwrap_or("/").to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" || h == "\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    Some((method, path, headers))
}

fn handle(st: &Shared, mut conn: TcpStream) {
    let Some((method, path, headers)) = read_request(&conn) else {
        return;
    };
    // The answer's plan, taken under the lock (a fault is used up by a GET).
    let (plan, no_ranges, redirect) = {
        let mut s = st.lock();
        let no_ranges = s.no_ranges;
        let redirect = s.redirects.get(&path).cloned();
        let plan = s.files.get_mut(&path).map(|e| {
            let fault = match e.faults.front_mut() {
                Some((f, n)) if method == "GET" => {
                    let f = f.clone();
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        e.faults.pop_front();
                    }
                    f
                }
                _ => Fault::None,
            };
            let file = e.file.clone();
            if let Fault::ChangedAfter {
                then, then_etag, ..
            } = &fault
            {
                e.file.body = then.clone();
                e.file.etag = then_etag.as_ref().map(|t| Some(format!("\"{t}\"")));
            }
            (file, fault)
        });
        (plan, no_ranges, redirect)
    };
    let log = |status: u16| {
        let mut s = st.lock();
        s.log.push(Logged {
            method: method.clone(),
            path: path.clone(),
            range: headers.get("range").cloned(),
            if_range: headers.get("if-range").cloned(),
            conditional: headers.contains_key("if-none-match")
                || headers.contains_key("if-modified-since"),
            token: headers.get("x-auth-token").cloned(),
            status,
        });
        st.changed.notify_all();
    };
    if let Some(to) = redirect {
        log(302);
        let _ = write!(
            conn,
            "HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        return;
    }
    let Some((file, fault)) = plan else {
        log(404);
        let _ = conn.write_all(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 10\r\nConnection: close\r\n\r\nnot found\n",
        );
        return;
    };
    let body = &file.body;
    let tag = file.tag();
    let mut head = String::from(
        "Accept-Ranges: bytes\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n",
    );
    if let Some(t) = &tag {
        head += &format!("ETag: {t}\r\n");
    }
    if let Some(lm) = &file.last_modified {
        head += &format!("Last-Modified: {lm}\r\n");
    }
    if file.content_md5 {
        let d = md5::Md5::digest(body);
        head += &format!(
            "Content-MD5: {}\r\n",
            base64::engine::general_purpose::STANDARD.encode(d)
        );
    }
    match &fault {
        Fault::Status(code) => {
            log(*code);
            let _ = write!(
                conn,
                "HTTP/1.1 {code} Injected\r\nContent-Length: 9\r\nConnection: close\r\n\r\ninjected\n"
            );
            return;
        }
        Fault::Redirect(to) => {
            log(302);
            let _ = write!(
                conn,
                "HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            return;
        }
        Fault::NoHeaders => {
            log(0);
            st.hold();
            return;
        }
        Fault::StallBeforeHeaders(d) => std::thread::sleep(*d),
        _ => {}
    }
    if not_modified(&headers, tag.as_deref(), file.last_modified.as_deref()) {
        log(304);
        let _ = write!(conn, "HTTP/1.1 304 Not Modified\r\n{head}\r\n");
        return;
    }
    // Range under If-Range.
    let size = body.len() as u64;
    let (mut status, mut start, mut end) = (200, 0u64, size);
    let validator_ok = headers
        .get("if-range")
        .is_none_or(|ir| tag.as_ref() == Some(ir) || file.last_modified.as_ref() == Some(ir));
    if let Some(r) = headers.get("range").filter(|_| !no_ranges && validator_ok) {
        match crate::glance::parse_range(r, size) {
            Some((s, e)) => {
                status = 206;
                head += &format!("Content-Range: bytes {s}-{e}/{size}\r\n");
                (start, end) = (s, e + 1);
            }
            None => {
                log(416);
                let _ = write!(
                    conn,
                    "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{size}\r\n\
                     Content-Length: 0\r\nConnection: close\r\n\r\n"
                );
                return;
            }
        }
    }
    log(status);
    let mut data = body.slice(start as usize..end as usize).to_vec();
    let declared = match &fault {
        Fault::LengthShort(k) => {
            data.truncate(data.len().saturating_sub(*k as usize));
            Some(data.len() as u64)
        }
        Fault::Endless { .. } | Fault::Chunked | Fault::ChunkedPaced { .. } => None,
        _ => Some(data.len() as u64),
    };
    if let Fault::CorruptByte(at) = &fault
        && let Some(b) = data.get_mut(*at as usize)
    {
        *b ^= 0x5a;
    }
    if let Some(n) = declared {
        head += &format!("Content-Length: {n}\r\n");
    }
    if matches!(fault, Fault::Chunked | Fault::ChunkedPaced { .. }) {
        head += "Transfer-Encoding: chunked\r\n";
    }
    let reason = if status == 206 {
        "206 Partial Content"
    } else {
        "200 OK"
    };
    if conn
        .write_all(format!("HTTP/1.1 {reason}\r\n{head}\r\n").as_bytes())
        .is_err()
        || method == "HEAD"
    {
        return;
    }
    let send = |conn: &mut TcpStream, bytes: &[u8]| -> bool {
        bytes.chunks(64 << 10).all(|c| conn.write_all(c).is_ok())
    };
    let upto = |n: u64| &data[..(n as usize).min(data.len())];
    let ended = || {
        st.lock().body_end.insert(path.clone(), Instant::now());
    };
    match fault {
        Fault::ResetAfter(n) | Fault::ChangedAfter { cut_after: n, .. } => {
            send(&mut conn, upto(n));
            let _ = conn.flush();
            // Let the client read what was sent before the reset discards it.
            std::thread::sleep(Duration::from_millis(100));
            reset(&conn);
        }
        Fault::ShortBody(n) => {
            send(&mut conn, upto(n));
            let _ = conn.shutdown(Shutdown::Both);
        }
        Fault::TooLongBody(extra) => {
            send(&mut conn, &data);
            send(&mut conn, &vec![0xeeu8; extra as usize]);
            let _ = conn.shutdown(Shutdown::Write);
        }
        Fault::StallMidBody { after, pause } => {
            send(&mut conn, upto(after));
            let _ = conn.flush();
            std::thread::sleep(pause);
            send(&mut conn, &data[upto(after).len()..]);
        }
        Fault::StallAfter(n) => {
            send(&mut conn, upto(n));
            let _ = conn.flush();
            st.hold();
        }
        Fault::Paced { step, pause } => {
            for (i, c) in data.chunks((step as usize).max(1)).enumerate() {
                if i > 0 {
                    std::thread::sleep(pause);
                }
                if !send(&mut conn, c) || st.stopped() {
                    return;
                }
            }
            ended();
        }
        Fault::Chunked | Fault::ChunkedPaced { .. } => {
            let (step, pause) = match fault {
                Fault::ChunkedPaced { step, pause } => ((step as usize).max(1), pause),
                _ => (64 << 10, Duration::ZERO),
            };
            for (i, c) in data.chunks(step).enumerate() {
                if i > 0 && !pause.is_zero() {
                    std::thread::sleep(pause);
                }
                let mut piece = format!("{:x}\r\n", c.len()).into_bytes();
                piece.extend_from_slice(c);
                piece.extend_from_slice(b"\r\n");
                if !send(&mut conn, &piece) || st.stopped() {
                    return;
                }
            }
            if send(&mut conn, b"0\r\n\r\n") {
                ended();
            }
        }
        Fault::Endless { cap } => {
            let mut sent = 0u64;
            while sent < cap && !st.stopped() {
                if !send(&mut conn, &data) {
                    return;
                }
                sent += data.len().max(1) as u64;
            }
            reset(&conn);
        }
        _ => {
            if send(&mut conn, &data) {
                ended();
            }
        }
    }
}

/// RFC 9110 13.2.2: `If-None-Match` (weak comparison), else `If-Modified-Since`.
fn not_modified(h: &HashMap<String, String>, etag: Option<&str>, lm: Option<&str>) -> bool {
    let bare = |t: &str| t.trim().trim_start_matches("W/").to_string();
    if let Some(inm) = h.get("if-none-match") {
        return etag.is_some_and(|e| {
            inm.split(',')
                .any(|t| t.trim() == "*" || bare(t) == bare(e))
        });
    }
    let date = |v: &str| httpdate::parse_http_date(v).ok();
    match (
        h.get("if-modified-since").and_then(|v| date(v)),
        lm.and_then(date),
    ) {
        (Some(since), Some(lm)) => lm <= since,
        _ => false,
    }
}
