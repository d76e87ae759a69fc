//! `imgcache serve --tls-cert --tls-key` as an operator runs it: the real binary with a
//! self-signed certificate made by the `openssl` CLI, spoken to by `curl` (which checks the
//! certificate): an image fetched through it (miss, then hit), `/healthz`, no image for
//! plain HTTP on the TLS port, no trust without the CA, and a clean exit on SIGTERM.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{serve, sigterm};
use imgcache_testkit::origin::Origin;

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
    let origin = Origin::temp();
    origin.put("/img.raw", &body);
    let base = origin.url.clone();
    let mut server = serve(
        &cache,
        "https",
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--allow-href-prefix",
            &base,
        ],
    );
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
    assert_eq!(origin.all_requests(), 1, "the second GET is a hit");

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
