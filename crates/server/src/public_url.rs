//! This server's address as its client reached it (Glance's `req.application_url`), for
//! the links it answers with: `/versions`, the nodes holding an image, and the upstream
//! Glance's links rewritten by the proxy. A TLS-terminating proxy in front says what the
//! client used with `X-Forwarded-Proto`/`X-Forwarded-Host` (or RFC 7239's `Forwarded`).

use axum::http::{HeaderMap, header};

use crate::state::AppState;

/// `scheme://host[:port]`, no trailing slash.
pub fn base_url(state: &AppState, headers: &HeaderMap) -> String {
    let forwarded = forwarded(headers);
    let scheme = first(headers, "x-forwarded-proto")
        .or(forwarded.0)
        .filter(|s| matches!(s.as_str(), "http" | "https"))
        .unwrap_or_else(|| {
            if state.config.tls_cert.is_some() {
                "https".into()
            } else {
                "http".into()
            }
        });
    let host = first(headers, "x-forwarded-host")
        .or(forwarded.1)
        .or_else(|| {
            headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .filter(|h| valid_host(h))
        .unwrap_or_else(|| state.config.listen.to_string());
    format!("{scheme}://{host}")
}

/// The first value of a comma-separated header a chain of proxies appends to.
fn first(headers: &HeaderMap, name: &str) -> Option<String> {
    let v = headers.get(name)?.to_str().ok()?;
    let v = v.split(',').next()?.trim();
    (!v.is_empty()).then(|| v.to_ascii_lowercase())
}

/// `proto` and `host` of the first element of `Forwarded` (RFC 7239).
fn forwarded(headers: &HeaderMap) -> (Option<String>, Option<String>) {
    let Some(v) = headers.get("forwarded").and_then(|v| v.to_str().ok()) else {
        return (None, None);
    };
    let elem = v.split(',').next().unwrap_or("");
    let (mut proto, mut host) = (None, None);
    for pair in elem.split(';') {
        let Some((k, v)) = pair.split_once('=') else {
            continue;
        };
        let v = v.trim().trim_matches('"').to_string();
        match k.trim().to_ascii_lowercase().as_str() {
            "proto" => proto = Some(v.to_ascii_lowercase()),
            "host" => host = Some(v),
            _ => {}
        }
    }
    (proto, host)
}

/// A host[:port] that can go into a URL as it is: no spaces, slashes, userinfo or quotes.
fn valid_host(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 255
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_elements() {
        let mut h = HeaderMap::new();
        h.insert(
            "forwarded",
            "for=1.2.3.4;proto=HTTPS;host=\"img.example:8443\", for=5.6.7.8"
                .parse()
                .unwrap(),
        );
        assert_eq!(
            forwarded(&h),
            (Some("https".into()), Some("img.example:8443".into()))
        );
        h.insert("x-forwarded-proto", "https, http".parse().unwrap());
        assert_eq!(first(&h, "x-forwarded-proto").as_deref(), Some("https"));
        assert!(valid_host("[::1]:9292"));
        assert!(!valid_host("evil.example/path"));
        assert!(!valid_host("a@b"));
    }
}
