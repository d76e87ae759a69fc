//! HTTP from the client side: a reqwest client as the crates' tests use it, and a raw
//! HTTP/1.1 GET for what no client sends as written.

use std::net::SocketAddr;
use std::time::Duration;

/// A reqwest client with a `timeout` on every request, rustls' ring provider installed first
/// (reqwest is built without a default provider).
pub fn client_with_timeout(timeout: Duration) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .expect("reqwest client")
}

/// [`client_with_timeout`] of 60 s.
pub fn client() -> reqwest::Client {
    client_with_timeout(Duration::from_secs(60))
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
