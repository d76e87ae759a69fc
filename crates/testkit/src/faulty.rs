//! A scripted, range-capable HTTP origin for resume and fault tests: std threads, one per
//! connection, so it works from sync tests, async tests and tests of the real binary alike.
//!
//! It serves one body at every path, with an optional strong `ETag` and `Last-Modified`,
//! `Accept-Ranges: bytes` and one `Range: bytes=N-` (honoured when `If-Range` is absent or
//! matches the current validator, as RFC 9110 says; else the whole body, a 200). Each request
//! takes the next [`Fault`] of the script (then behaves normally), and is logged with its
//! `Range` and `If-Range`, so a test can tell a resumed download from one that started over.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// What one request gets.
#[derive(Clone, Debug)]
pub enum Fault {
    /// The normal answer.
    Normal,
    /// The response head and `n` body bytes, then a TCP reset.
    ResetAfter(usize),
    /// [`Fault::ResetAfter`], and the image is replaced by `body` with ETag `etag` before the
    /// reset (an origin whose file changed mid-download).
    ResetThenChange(usize, Vec<u8>, &'static str),
    /// The response head and `n` body bytes, then silence (the connection held open) until
    /// the origin is dropped.
    StallAfter(usize),
    /// The request is read, nothing is ever answered (held open until the origin is dropped).
    NoHeaders,
    /// This status, empty body.
    Status(u16),
}

/// One request as the origin saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub range: Option<String>,
    pub if_range: Option<String>,
    /// The status answered (0: none, for [`Fault::NoHeaders`]).
    pub status: u16,
}

struct Inner {
    body: Arc<Vec<u8>>,
    etag: Option<String>,
    last_modified: Option<String>,
    ranges: bool,
    script: VecDeque<Fault>,
    log: Vec<Seen>,
    closed: bool,
}

struct Shared {
    inner: Mutex<Inner>,
    changed: Condvar,
}

pub struct FaultyOrigin {
    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub url: String,
    shared: Arc<Shared>,
}

impl FaultyOrigin {
    /// Serves `body` with the strong ETag `"etag"` (quoted here) when given.
    pub fn start(body: Vec<u8>, etag: Option<&str>) -> FaultyOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                body: Arc::new(body),
                etag: etag.map(|e| format!("\"{e}\"")),
                last_modified: None,
                ranges: true,
                script: VecDeque::new(),
                log: Vec::new(),
                closed: false,
            }),
            changed: Condvar::new(),
        });
        let s = shared.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                if s.inner.lock().unwrap().closed {
                    return;
                }
                let s = s.clone();
                std::thread::spawn(move || {
                    let _ = answer(&s, stream);
                });
            }
        });
        FaultyOrigin { url, shared }
    }

    /// The URL of `path` (any path serves the body).
    pub fn at(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// The next requests' faults, in order.
    pub fn script(&self, faults: impl IntoIterator<Item = Fault>) {
        self.shared.inner.lock().unwrap().script.extend(faults);
    }

    /// A new version of the image (a new ETag): what an origin whose file was replaced sends.
    pub fn change(&self, body: Vec<u8>, etag: Option<&str>) {
        let mut i = self.shared.inner.lock().unwrap();
        i.body = Arc::new(body);
        i.etag = etag.map(|e| format!("\"{e}\""));
    }

    /// Sends `Last-Modified: lm` too.
    pub fn last_modified(&self, lm: &str) {
        self.shared.inner.lock().unwrap().last_modified = Some(lm.to_string());
    }

    /// Ignores `Range` (always the whole body, a 200), as an origin without range support.
    pub fn no_ranges(&self) {
        self.shared.inner.lock().unwrap().ranges = false;
    }

    pub fn log(&self) -> Vec<Seen> {
        self.shared.inner.lock().unwrap().log.clone()
    }

    /// Waits until `n` requests have arrived (false if not within `within`).
    pub fn wait_requests(&self, n: usize, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let mut i = self.shared.inner.lock().unwrap();
        while i.log.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            i = self.shared.changed.wait_timeout(i, left).unwrap().0;
        }
        true
    }
}

impl Drop for FaultyOrigin {
    fn drop(&mut self) {
        self.shared.inner.lock().unwrap().closed = true;
        self.shared.changed.notify_all();
        // Wake the accept loop so it sees `closed`.
        let _ = TcpStream::connect(self.url.trim_start_matches("http://"));
    }
}

fn answer(s: &Shared, mut stream: TcpStream) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let is_head = line.starts_with("HEAD ");
    let (mut range, mut if_range) = (None, None);
    loop {
        let mut l = String::new();
        if reader.read_line(&mut l)? == 0 || l == "\r\n" {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            let v = v.trim().to_string();
            match k.trim().to_ascii_lowercase().as_str() {
                "range" => range = Some(v),
                "if-range" => if_range = Some(v),
                _ => {}
            }
        }
    }
    let (fault, body, etag, lm, ranges) = {
        let mut i = s.inner.lock().unwrap();
        let fault = i.script.pop_front().unwrap_or(Fault::Normal);
        (
            fault,
            i.body.clone(),
            i.etag.clone(),
            i.last_modified.clone(),
            i.ranges,
        )
    };
    let validator_ok = match &if_range {
        None => true,
        Some(v) => Some(v) == etag.as_ref() || Some(v) == lm.as_ref(),
    };
    let start = range
        .as_deref()
        .filter(|_| ranges && validator_ok)
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|n| *n < body.len());
    let status = match &fault {
        Fault::NoHeaders => 0,
        Fault::Status(c) => *c,
        _ if start.is_some() => 206,
        _ => 200,
    };
    {
        let mut i = s.inner.lock().unwrap();
        i.log.push(Seen {
            range: range.clone(),
            if_range: if_range.clone(),
            status,
        });
        s.changed.notify_all();
    }
    let hold = || {
        let mut i = s.inner.lock().unwrap();
        while !i.closed {
            i = s.changed.wait(i).unwrap();
        }
    };
    match fault {
        Fault::NoHeaders => {
            hold();
            return Ok(());
        }
        Fault::Status(c) => {
            let head =
                format!("HTTP/1.1 {c} Failure\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            return stream.write_all(head.as_bytes());
        }
        _ => {}
    }
    let from = start.unwrap_or(0);
    let mut head = if start.is_some() {
        format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {from}-{}/{}\r\n",
            body.len() - 1,
            body.len()
        )
    } else {
        "HTTP/1.1 200 OK\r\n".to_string()
    };
    head.push_str(&format!(
        "Content-Length: {}\r\nAccept-Ranges: bytes\r\nConnection: close\r\n",
        body.len() - from
    ));
    if let Some(e) = &etag {
        head.push_str(&format!("ETag: {e}\r\n"));
    }
    if let Some(lm) = &lm {
        head.push_str(&format!("Last-Modified: {lm}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    if is_head {
        return Ok(());
    }
    let rest = &body[from..];
    match fault {
        Fault::ResetAfter(n) | Fault::ResetThenChange(n, ..) => {
            stream.write_all(&rest[..n.min(rest.len())])?;
            if let Fault::ResetThenChange(_, new, etag) = fault {
                let mut i = s.inner.lock().unwrap();
                i.body = Arc::new(new);
                i.etag = Some(format!("\"{etag}\""));
            }
            stream.flush()?;
            // Let the client read what was sent before the reset discards it.
            std::thread::sleep(Duration::from_millis(100));
            socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO))?;
            drop(stream);
        }
        Fault::StallAfter(n) => {
            stream.write_all(&rest[..n.min(rest.len())])?;
            stream.flush()?;
            hold();
        }
        _ => stream.write_all(rest)?,
    }
    Ok(())
}
