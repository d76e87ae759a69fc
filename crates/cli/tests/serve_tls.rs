//! `imgcache serve --tls-cert --tls-key` as an operator runs it: the real binary with a
//! self-signed certificate made by the `openssl` CLI, spoken to by `curl` (which checks the
//! certificate): an image fetched through it (miss, then hit), `/healthz`, no image for
//! plain HTTP on the TLS port, no trust without the CA, and a clean exit on SIGTERM.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Serves `body` at any path over plain HTTP, counting requests.
fn origin(body: Vec<u8>) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            c.fetch_add(1, Ordering::SeqCst);
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
            }
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream
                .write_all(head.as_bytes())
                .and_then(|_| stream.write_all(&body));
        }
    });
    (url, count)
}

struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve_tls(cache: &Path, cert: &Path, key: &Path, args: &[&str]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_imgcache"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .arg("--cache-dir")
        .arg(cache)
        .args(["serve", "--listen", "127.0.0.1:0", "--tls-cert"])
        .arg(cert)
        .arg("--tls-key")
        .arg(key)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("imgcache: serving on https://")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    Server { child, addr }
}

/// A self-signed certificate for 127.0.0.1 and its key, made by `openssl` in `dir`.
fn self_signed(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .args(["-days", "1", "-subj", "/CN=127.0.0.1"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        .output()
        .expect("openssl CLI");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

/// `curl URL` (no proxy, bounded time) with `extra` arguments; the body goes to `body_out`.
/// Returns curl's output, whose stdout is the HTTP status code (`000` if none).
fn curl(url: &str, body_out: &Path, extra: &[&std::ffi::OsStr]) -> Output {
    Command::new("curl")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .args(["-sS", "--noproxy", "*", "--max-time", "60"])
        .args(["-w", "%{http_code}", "-o"])
        .arg(body_out)
        .args(extra)
        .arg(url)
        .output()
        .expect("curl CLI")
}

fn code(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn serve_over_tls_caches_an_image_and_stops_on_sigterm() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let cache = dir.path().join("cache");
    let (cert, key) = self_signed(dir.path());
    let body: Vec<u8> = (0..(2u32 << 20)).map(|i| (i % 251) as u8).collect();
    let (base, count) = origin(body.clone());
    let mut server = serve_tls(&cache, &cert, &key, &["--allow-href-prefix", &base]);
    let addr = server.addr.clone();
    let got = dir.path().join("got");
    let trust = [std::ffi::OsStr::new("--cacert"), cert.as_os_str()];

    let out = curl(&format!("https://{addr}/healthz"), &got, &trust);
    assert_eq!(
        code(&out),
        "200",
        "healthz over TLS: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A miss (streamed while the origin download runs), then a hit (from the published
    // file); once over HTTP/2 (ALPN's first choice) and once over HTTP/1.1.
    let url = format!("https://{addr}/v1/fetch?href={base}/img.raw");
    for (round, version) in ["--http2", "--http1.1"].into_iter().enumerate() {
        let _ = std::fs::remove_file(&got);
        let mut args = trust.to_vec();
        args.push(std::ffi::OsStr::new(version));
        let out = curl(&url, &got, &args);
        assert_eq!(
            code(&out),
            "200",
            "round {round} ({version}): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            std::fs::read(&got).unwrap() == body,
            "round {round} ({version}): bytes differ"
        );
    }
    assert_eq!(count.load(Ordering::SeqCst), 1, "the second GET is a hit");

    // Plain HTTP to the TLS port: no image (curl fails, or at least gets no 200).
    let _ = std::fs::remove_file(&got);
    let out = curl(
        &format!("http://{addr}/v1/fetch?href={base}/img.raw"),
        &got,
        &[],
    );
    assert_ne!(code(&out), "200", "plain HTTP served on the TLS port");
    assert!(
        std::fs::read(&got).unwrap_or_default() != body,
        "plain HTTP got the image"
    );

    // Without the CA the self-signed certificate is not trusted (curl exit 60).
    let out = curl(&format!("https://{addr}/healthz"), &got, &[]);
    assert!(
        !out.status.success() && code(&out) == "000",
        "curl trusted a self-signed certificate: {:?}",
        out.status
    );
    assert_eq!(
        out.status.code(),
        Some(60),
        "expected a certificate verification failure: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The server still serves TLS after those failed handshakes.
    let out = curl(&format!("https://{addr}/healthz"), &got, &trust);
    assert_eq!(
        code(&out),
        "200",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // SIGTERM: a clean, prompt exit.
    let pid = server.child.id() as i32;
    assert_eq!(sigterm(pid), 0);
    let started = Instant::now();
    let status = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
}

/// `kill -TERM pid` through the kill(1) command (no libc dependency for one call).
fn sigterm(pid: i32) -> i32 {
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .map(|s| s.code().unwrap_or(1))
        .unwrap_or(1)
}
