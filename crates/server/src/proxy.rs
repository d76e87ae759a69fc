//! The rest of Glance's v2 API, relayed to the upstream Glance: image records and lists,
//! create, update, upload (`PUT /v2/images/{id}/file`, `stage`), delete, members, tags,
//! tasks, metadefs, schemas. imgcache answers itself only the image data it caches, the
//! cache-management API, `/versions` and its own endpoints; everything else under `/v2/`
//! comes here, so that Glance's clients work against `imgcache serve` unchanged.
//!
//! Bodies stream both ways through the process's one HTTP client (reqwest, on hyper): an
//! upload of many GiB is never held, only a chunk at a time. Headers and status codes pass
//! through (hop-by-hop headers excepted), `X-Openstack-Request-Id` included. Links naming the
//! upstream's own address (`Location`, and JSON bodies up to [`REWRITE_LIMIT`]) are rewritten
//! to this server's address as the client reached it ([`crate::public_url`]); Glance's usual
//! links are relative and need nothing.
//!
//! Two things are watched on the way: a successful `DELETE /v2/images/{id}` or
//! `POST .../actions/deactivate` evicts the image from the cache (and forgets access granted
//! to it), and schemas are kept ([`crate::schemas`]) so that version discovery works even with
//! a token the upstream does not know.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use imgcache_fetch::source::http::error_chain;
use imgcache_fetch::{Href, cache_key};
use uuid::Uuid;

use crate::error::ApiError;
use crate::public_url::base_url;
use crate::state::AppState;

/// JSON bodies up to this size have the upstream's absolute links rewritten; larger ones (no
/// Glance answer is) stream through untouched.
pub const REWRITE_LIMIT: usize = 4 << 20;

/// Request headers that describe one connection, not the request (RFC 9110 §7.6.1), and
/// `Host`, which names the upstream now.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The router's fallback: `/v2/...` goes upstream; anything else is not a resource here.
pub async fn fallback(State(state): State<AppState>, req: Request) -> Response {
    if !req.uri().path().starts_with("/v2/") {
        return ApiError::not_found("no such resource").into_response();
    }
    let resp = relay(&state, req).await;
    crate::observe::tagged(resp, crate::observe::CacheOutcome::Proxy)
}

/// Relays one request to the upstream Glance and its answer back.
pub async fn relay(state: &AppState, req: Request) -> Response {
    let Some(upstream) = state.config.sources.glance_url.clone() else {
        return ApiError::not_found("no such resource (no upstream Glance configured)")
            .into_response();
    };
    let (parts, body) = req.into_parts();
    let public = base_url(state, &parts.headers);
    let upstream_base = upstream.as_str().trim_end_matches('/').to_string();
    let path = parts.uri.path().to_string();
    let path_q = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| path.clone());
    if path.starts_with("/v2/schemas/") && parts.method == Method::GET {
        return crate::schemas::get(state, &upstream_base, &path, &parts.headers).await;
    }
    let url = format!("{upstream_base}{path_q}");
    let http = match state.fetcher.http_source() {
        Ok(h) => h,
        Err(e) => return ApiError::internal(e.to_string()).into_response(),
    };
    let mut headers = request_headers(&parts.headers);
    let has_body = parts.headers.contains_key(header::TRANSFER_ENCODING)
        || parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() != "0");
    if !has_body {
        headers.remove(header::CONTENT_LENGTH);
    }
    let mut request = http
        .client()
        .request(parts.method.clone(), &url)
        .headers(headers);
    if has_body {
        // Streamed: hyper sends each chunk as the client's arrives (Content-Length kept
        // when the client gave one, else chunked).
        request = request.body(reqwest::Body::wrap_stream(body.into_data_stream()));
    }
    let resp = match request.send().await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(method = %parts.method, path, error = %e, "upstream Glance unreachable");
            return ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!("cannot reach the upstream Glance: {}", error_chain(&e)),
            )
            .into_response();
        }
    };
    let status = resp.status();
    if status.is_success() {
        watch(state, &parts.method, &path).await;
    }
    let mut out_headers = response_headers(resp.headers(), &upstream_base, &public);
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.contains("json"));
    let small = resp
        .content_length()
        .is_none_or(|n| n as usize <= REWRITE_LIMIT);
    let body = if is_json && small && parts.method != Method::HEAD {
        match rewritten(resp, &upstream_base, &public).await {
            Ok(b) => {
                out_headers.insert(header::CONTENT_LENGTH, HeaderValue::from(b.len()));
                Body::from(b)
            }
            Err(b) => b,
        }
    } else {
        Body::from_stream(resp.bytes_stream())
    };
    let mut out = Response::new(body);
    *out.status_mut() = status;
    *out.headers_mut() = out_headers;
    out
}

/// The client's headers, minus the hop-by-hop ones and `Host` (reqwest sets the upstream's).
pub fn request_headers(h: &HeaderMap) -> HeaderMap {
    let mut out = h.clone();
    strip_hop_by_hop(&mut out);
    out.remove(header::HOST);
    out
}

fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Headers the `Connection` header names are hop-by-hop too.
    let named: Vec<String> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
        .collect();
    for name in HOP_BY_HOP
        .iter()
        .copied()
        .chain(named.iter().map(String::as_str))
    {
        h.remove(name);
    }
}

/// The upstream's headers for the client: hop-by-hop ones dropped, `Location` rewritten.
fn response_headers(h: &HeaderMap, upstream: &str, public: &str) -> HeaderMap {
    let mut out = h.clone();
    strip_hop_by_hop(&mut out);
    if let Some(loc) = h.get(header::LOCATION).and_then(|v| v.to_str().ok())
        && let Some(rest) = loc.strip_prefix(upstream)
        && let Ok(v) = HeaderValue::from_str(&format!("{public}{rest}"))
    {
        out.insert(header::LOCATION, v);
    }
    out
}

/// A JSON body with the upstream's absolute address replaced by ours; `Err` with the body to
/// stream as it is when it turns out larger than [`REWRITE_LIMIT`] (its length was unknown).
async fn rewritten(resp: reqwest::Response, upstream: &str, public: &str) -> Result<Bytes, Body> {
    let mut stream = resp.bytes_stream();
    let mut buf = BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                let err = std::io::Error::other(e.to_string());
                let head = futures_util::stream::iter([Ok(buf.freeze()), Err(err)]);
                return Err(Body::from_stream(head));
            }
        };
        buf.extend_from_slice(&chunk);
        if buf.len() > REWRITE_LIMIT {
            let head = futures_util::stream::iter([Ok::<_, reqwest::Error>(buf.freeze())]);
            return Err(Body::from_stream(head.chain(stream)));
        }
    }
    Ok(rewrite_links(&buf, upstream, public))
}

/// Replaces the upstream's address where it starts a JSON string and ends at a path, query
/// or the string's end (`"http://glance:9292/…`, not `"http://glance:92920`).
pub fn rewrite_links(body: &[u8], upstream: &str, public: &str) -> Bytes {
    let Ok(text) = std::str::from_utf8(body) else {
        return Bytes::copy_from_slice(body);
    };
    let from = format!("\"{upstream}");
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(&from) {
        let after = &rest[i + from.len()..];
        out.push_str(&rest[..i]);
        if after.starts_with(['/', '"', '?', '#']) {
            out.push('"');
            out.push_str(public);
        } else {
            out.push_str(&from);
        }
        rest = after;
    }
    out.push_str(rest);
    Bytes::from(out)
}

/// What a successful upstream call means for the cache: a deleted or deactivated image is
/// evicted at once (its data must not be served any more).
async fn watch(state: &AppState, method: &Method, path: &str) {
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    let id = match (method, segs.as_slice()) {
        (&Method::DELETE, ["", "v2", "images", id]) => id,
        (&Method::POST, ["", "v2", "images", id, "actions", "deactivate"]) => id,
        _ => return,
    };
    if let Ok(uuid) = Uuid::parse_str(id) {
        evict_glance_image(state, &uuid, "deleted or deactivated upstream").await;
    }
}

/// Removes a Glance image from the cache and its queue, and forgets who may read it.
pub async fn evict_glance_image(state: &AppState, id: &Uuid, why: &str) {
    state.upstream_auth.forget(id);
    let raw = id.hyphenated().to_string();
    let key = cache_key(&Href::Glance(*id), &raw, false);
    let cache = state.cache.clone();
    let res = tokio::task::spawn_blocking(move || {
        let gone = cache.delete_cached_image(&key)?;
        let dequeued = cache.delete_queued_image(&key)?;
        Ok::<_, imgcache_store::StoreError>(gone || dequeued)
    })
    .await;
    match res {
        Ok(Ok(gone)) => {
            tracing::info!(image_id = %raw, evicted = gone, why, "image evicted");
            state.withdraw([raw.clone()]).await;
        }
        Ok(Err(e)) => tracing::warn!(image_id = %raw, error = %e, "cannot evict image"),
        Err(e) => tracing::warn!(image_id = %raw, error = %e, "cannot evict image"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_naming_the_upstream_are_ours() {
        let body = br#"{"self": "/v2/images/x", "file": "http://g:9292/v2/images/x/file", "n": "http://g:92920"}"#;
        let out = rewrite_links(body, "http://g:9292", "https://img.example");
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"self": "/v2/images/x", "file": "https://img.example/v2/images/x/file", "n": "http://g:92920"}"#
        );
    }

    #[test]
    fn hop_by_hop_headers_stay_behind() {
        let mut h = HeaderMap::new();
        h.insert("connection", "close, x-private".parse().unwrap());
        h.insert("x-private", "1".parse().unwrap());
        h.insert("te", "trailers".parse().unwrap());
        h.insert("host", "imgcache:9292".parse().unwrap());
        h.insert("x-auth-token", "t".parse().unwrap());
        let out = request_headers(&h);
        assert_eq!(out.len(), 1);
        assert!(out.contains_key("x-auth-token"));
    }
}
