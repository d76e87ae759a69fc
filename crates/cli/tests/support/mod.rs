//! What the suites (verify, faults, torture) share: the real binary, a tolerant HTTP/1.1
//! client (a cut response is an outcome, not a panic), and looks at a cache directory.
#![allow(dead_code)] // each test binary uses its own subset

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub fn imgcache(cache: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_imgcache"));
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .arg("--cache-dir")
        .arg(cache);
    c
}

/// `imgcache list --json` as (image_id, size, href) rows.
pub fn list(cache: &Path) -> Vec<(String, u64, Option<String>)> {
    let driver = std::fs::read_to_string(cache.join(".imgcache-driver"))
        .map(|d| d.trim().to_string())
        .unwrap_or_else(|_| "sqlite".into());
    let out = imgcache(cache)
        .args(["--driver", &driver, "list", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "list: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["image_id"].as_str().unwrap().to_string(),
                r["size"].as_u64().unwrap(),
                r["href"].as_str().map(str::to_string),
            )
        })
        .collect()
}

/// The key `href` is cached under, waiting up to 10 s for its publish (a server sends the
/// last byte while it renames the file into place).
pub fn wait_key(cache: &Path, href: &str) -> Option<String> {
    let t0 = std::time::Instant::now();
    loop {
        if let Some(r) = list(cache)
            .into_iter()
            .find(|r| r.2.as_deref() == Some(href))
        {
            return Some(r.0);
        }
        if t0.elapsed() > Duration::from_secs(10) {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Names of the regular files directly in `dir` (sorted).
pub fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Published-looking files in the cache root: key-named regular files (not dot-files).
pub fn published_files(cache: &Path) -> Vec<String> {
    files(cache)
        .into_iter()
        .filter(|f| !f.starts_with('.'))
        .collect()
}

/// Checks that `list` and the files agree: every record has its file with the recorded size,
/// every key-named file in the root has a record. Returns a description of each disagreement.
pub fn disagreements(cache: &Path) -> Vec<String> {
    let rows = list(cache);
    let mut bad = Vec::new();
    for (id, size, _) in &rows {
        match std::fs::metadata(cache.join(id)) {
            Ok(m) if m.len() == *size => {}
            Ok(m) => bad.push(format!("{id}: record {size} bytes, file {}", m.len())),
            Err(_) => bad.push(format!("{id}: record without file")),
        }
    }
    for f in published_files(cache) {
        if !rows.iter().any(|(id, _, _)| *id == f) {
            bad.push(format!("{f}: file without record"));
        }
    }
    bad
}

/// What an HTTP exchange ended as.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
    /// The body was complete: its Content-Length (or final chunk) arrived, then a clean EOF.
    pub complete: bool,
}

/// One request on a fresh connection (`Connection: close`). `Err` only when no response head
/// arrived; a response cut mid-body has `complete == false`.
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> Result<Response, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(timeout)).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req += &format!("{k}: {v}\r\n");
    }
    req += "\r\n";
    s.write_all(req.as_bytes())
        .map_err(|e| format!("send: {e}"))?;
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut clean_eof = false;
    loop {
        match s.read(&mut buf) {
            Ok(0) => {
                clean_eof = true;
                break;
            }
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no response head ({} bytes)", raw.len()))?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("bad status line")?;
    let lower = head.to_ascii_lowercase();
    let mut body = raw[split + 4..].to_vec();
    let complete;
    if lower.contains("transfer-encoding: chunked") {
        let (b, done) = dechunk(&body);
        body = b;
        complete = done;
    } else if let Some(len) = header(&head, "content-length").and_then(|v| v.parse::<usize>().ok())
    {
        complete = clean_eof && body.len() == len || method == "HEAD";
        body.truncate(len);
    } else {
        complete = clean_eof;
    }
    Ok(Response {
        status,
        head,
        body,
        complete,
    })
}

pub fn header(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

fn dechunk(mut b: &[u8]) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    loop {
        let Some(nl) = b.windows(2).position(|w| w == b"\r\n") else {
            return (out, false);
        };
        let Some(len) = std::str::from_utf8(&b[..nl])
            .ok()
            .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
        else {
            return (out, false);
        };
        if len == 0 {
            return (out, true);
        }
        if b.len() < nl + 2 + len {
            out.extend_from_slice(&b[nl + 2..]);
            return (out, false);
        }
        out.extend_from_slice(&b[nl + 2..nl + 2 + len]);
        b = b.get(nl + 2 + len + 2..).unwrap_or_default();
    }
}

/// A temporary directory under the target directory (its filesystem takes user xattrs).
pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

/// Where a test keeps a path's bytes for comparison.
pub fn read(p: &Path) -> Option<Vec<u8>> {
    std::fs::read(p).ok()
}

pub fn join(a: &Path, b: &str) -> PathBuf {
    a.join(b)
}
