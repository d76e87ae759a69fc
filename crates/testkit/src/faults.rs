//! A fault-injection HTTP origin: raw HTTP/1.1 over std TCP (one thread per connection), so a
//! response can break every rule a real server's framework would enforce. Each path has its
//! bytes and a [`Fault`] applied to its first `times` GETs; later GETs (and HEADs) are answered
//! correctly, with a strong `ETag`, `Last-Modified`, `Accept-Ranges: bytes`, one-range `Range`
//! under `If-Range` and, optionally, `Content-MD5`. Every request is logged (method, `Range`,
//! `If-Range`), so a test can tell a resume (a `Range` request) from a restart.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use md5::Digest as _;

/// What goes wrong with a path's response.
#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// Nothing: a correct answer.
    None,
    /// The full `Content-Length`, `n` body bytes, then a TCP reset (RST).
    ResetAfter(u64),
    /// The full `Content-Length`, `n` body bytes, then a clean close (FIN).
    ShortBody(u64),
    /// The body, then `extra` bytes more than `Content-Length` said.
    TooLongBody(u64),
    /// `Content-Length` (and the body) `k` bytes shorter than the file: a consistent but
    /// truncated answer that only a checksum can tell.
    LengthShort(u64),
    /// The request is read, then nothing for this long; then the correct answer.
    StallBeforeHeaders(Duration),
    /// Headers and `after` bytes, then nothing for `pause`, then the rest.
    StallMidBody { after: u64, pause: Duration },
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
    /// The file is replaced by `then` after this answer, which is cut (reset) after `cut_after`
    /// bytes: the next attempt finds another file (another ETag).
    ChangedAfter { cut_after: u64, then: Bytes },
}

/// One logged request.
#[derive(Clone, Debug, PartialEq)]
pub struct Logged {
    pub method: String,
    pub path: String,
    pub range: Option<String>,
    pub if_range: Option<String>,
}

struct Entry {
    body: Bytes,
    fault: Fault,
    /// GETs still to get the fault.
    times: usize,
    content_md5: bool,
}

#[derive(Default)]
struct State {
    files: Mutex<HashMap<String, Entry>>,
    log: Mutex<Vec<Logged>>,
    stop: AtomicBool,
}

pub struct FaultOrigin {
    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub url: String,
    state: Arc<State>,
}

impl Drop for FaultOrigin {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
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
        let state = Arc::new(State::default());
        let st = state.clone();
        std::thread::Builder::new()
            .name("fault-origin".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if st.stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(conn) = conn else { continue };
                    let st = st.clone();
                    std::thread::spawn(move || handle(&st, conn));
                }
            })
            .expect("spawn");
        FaultOrigin { url, state }
    }

    /// Serves `body` at `path` (e.g. `/images/a.img`), `fault` applied to the first GET.
    pub fn add(&self, path: &str, body: Bytes, fault: Fault) {
        self.add_with(path, body, fault, 1, false);
    }

    /// [`FaultOrigin::add`] with the fault on the first `times` GETs, and `Content-MD5` sent
    /// (of the correct bytes) when `content_md5`.
    pub fn add_with(&self, path: &str, body: Bytes, fault: Fault, times: usize, content_md5: bool) {
        self.state.files.lock().unwrap().insert(
            path.to_string(),
            Entry {
                body,
                fault,
                times,
                content_md5,
            },
        );
    }

    /// The bytes `path` serves now (a [`Fault::ChangedAfter`] path changes them).
    pub fn body(&self, path: &str) -> Option<Bytes> {
        self.state
            .files
            .lock()
            .unwrap()
            .get(path)
            .map(|e| e.body.clone())
    }

    /// Every request for `path` so far, in order.
    pub fn log(&self, path: &str) -> Vec<Logged> {
        self.state
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.path == path)
            .cloned()
            .collect()
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
}

/// The strong validator of `body`.
pub fn etag(body: &[u8]) -> String {
    let d = sha2::Sha256::digest(body);
    format!("\"{}\"", hex::encode(&d[..8]))
}

const LAST_MODIFIED: &str = "Tue, 01 Jul 2025 12:00:00 GMT";

fn reset(conn: &TcpStream) {
    // SO_LINGER 0: close sends RST, not FIN.
    let _ = rustix::net::sockopt::set_socket_linger(conn, Some(Duration::ZERO));
}

fn handle(st: &State, mut conn: TcpStream) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let mut reader = BufReader::new(match conn.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    });
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("/").to_string();
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
    st.log.lock().unwrap().push(Logged {
        method: method.clone(),
        path: path.clone(),
        range: headers.get("range").cloned(),
        if_range: headers.get("if-range").cloned(),
    });
    // The answer's plan, taken under the lock (a fault is used up by a GET).
    let plan = {
        let mut files = st.files.lock().unwrap();
        match files.get_mut(&path) {
            None => None,
            Some(e) => {
                let fault = if method == "GET" && e.times > 0 {
                    e.times -= 1;
                    e.fault.clone()
                } else {
                    Fault::None
                };
                let body = e.body.clone();
                if let Fault::ChangedAfter { then, .. } = &fault {
                    e.body = then.clone();
                }
                Some((body, fault, e.content_md5))
            }
        }
    };
    let Some((body, fault, md5)) = plan else {
        let _ = conn.write_all(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 10\r\nConnection: close\r\n\r\nnot found\n",
        );
        return;
    };
    let tag = etag(&body);
    let mut head = format!(
        "ETag: {tag}\r\nLast-Modified: {LAST_MODIFIED}\r\nAccept-Ranges: bytes\r\n\
         Content-Type: application/octet-stream\r\nConnection: close\r\n"
    );
    if md5 {
        let d = md5::Md5::digest(&body);
        head += &format!(
            "Content-MD5: {}\r\n",
            base64::engine::general_purpose::STANDARD.encode(d)
        );
    }
    let head_only = method == "HEAD";
    match &fault {
        Fault::Status(code) => {
            let _ = write!(
                conn,
                "HTTP/1.1 {code} Injected\r\nContent-Length: 9\r\nConnection: close\r\n\r\ninjected\n"
            );
            return;
        }
        Fault::Redirect(to) => {
            let _ = write!(
                conn,
                "HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            return;
        }
        Fault::StallBeforeHeaders(d) => std::thread::sleep(*d),
        _ => {}
    }
    // Range under If-Range (only on a correct answer: a fault answers whole).
    let size = body.len() as u64;
    let mut status = "200 OK";
    let (mut start, mut end) = (0u64, size);
    if matches!(fault, Fault::None | Fault::Paced { .. })
        && let Some(r) = headers.get("range")
        && headers
            .get("if-range")
            .is_none_or(|ir| *ir == tag || ir == LAST_MODIFIED)
    {
        match crate::glance::parse_range(r, size) {
            Some((s, e)) => {
                status = "206 Partial Content";
                head += &format!("Content-Range: bytes {s}-{e}/{size}\r\n");
                (start, end) = (s, e + 1);
            }
            None => {
                let _ = write!(
                    conn,
                    "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{size}\r\n\
                     Content-Length: 0\r\nConnection: close\r\n\r\n"
                );
                return;
            }
        }
    }
    let mut data = body.slice(start as usize..end as usize).to_vec();
    let declared = match &fault {
        Fault::LengthShort(k) => {
            data.truncate(data.len().saturating_sub(*k as usize));
            Some(data.len() as u64)
        }
        Fault::Endless { .. } => None,
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
    if conn
        .write_all(format!("HTTP/1.1 {status}\r\n{head}\r\n").as_bytes())
        .is_err()
        || head_only
    {
        return;
    }
    let send = |conn: &mut TcpStream, bytes: &[u8]| -> bool {
        bytes.chunks(64 << 10).all(|c| conn.write_all(c).is_ok())
    };
    match fault {
        Fault::ResetAfter(n) | Fault::ChangedAfter { cut_after: n, .. } => {
            send(&mut conn, &data[..(n as usize).min(data.len())]);
            let _ = conn.flush();
            std::thread::sleep(Duration::from_millis(50));
            reset(&conn);
        }
        Fault::ShortBody(n) => {
            send(&mut conn, &data[..(n as usize).min(data.len())]);
            let _ = conn.shutdown(Shutdown::Both);
        }
        Fault::TooLongBody(extra) => {
            send(&mut conn, &data);
            send(&mut conn, &vec![0xeeu8; extra as usize]);
            let _ = conn.shutdown(Shutdown::Write);
        }
        Fault::StallMidBody { after, pause } => {
            let cut = (after as usize).min(data.len());
            send(&mut conn, &data[..cut]);
            let _ = conn.flush();
            std::thread::sleep(pause);
            send(&mut conn, &data[cut..]);
        }
        Fault::Paced { step, pause } => {
            for c in data.chunks((step as usize).max(1)) {
                if !send(&mut conn, c) || st.stop.load(Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(pause);
            }
        }
        Fault::Endless { cap } => {
            let mut sent = 0u64;
            while sent < cap && !st.stop.load(Ordering::SeqCst) {
                if !send(&mut conn, &data) {
                    return;
                }
                sent += data.len().max(1) as u64;
            }
            reset(&conn);
        }
        _ => {
            send(&mut conn, &data);
        }
    }
}
