//! Image serving: `GET`/`HEAD /v2/images/{image_id}/file` (Glance's download path, origin the
//! upstream Glance, readable only with a token upstream accepts for the image) and
//! `GET`/`HEAD /v1/fetch?href=URL` (http(s)/file hrefs under the allowed prefixes).
//!
//! The key is validated before anything else; no path is ever built from an invalid one.
//! A hit is served from the published file (opened with `open_for_read`: the hit is counted,
//! and the shared flock keeps the evictor off while the response runs). A miss joins or starts
//! the key's single download ([`crate::fill`]) and streams from the growing file.
//!
//! HEAD on a hit does not count a hit. HEAD on a miss starts the download (it is the one way
//! to learn the length) and answers once the origin has.

use axum::Router;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Extension, Path, RawQuery, State};
use axum::http::header::{
    ACCEPT_RANGES, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, ETAG, HeaderName, HeaderValue,
    LAST_MODIFIED,
};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use imgcache_fetch::source::Response as OriginResponse;
use imgcache_fetch::{Href, ImageMeta, cache_key};
use imgcache_store::off_thread;
use imgcache_store::{CacheReader, Done, Key, Outcome, Phase, Record};
use std::sync::Arc;
use uuid::Uuid;

use crate::conditional::{self, Precondition};
use crate::error::ApiError;
use crate::fill::{Fill, Joined, Origin, origin_error, outcome_error, take_passthrough, watched};
use crate::observe::{CacheOutcome, tagged};
use crate::range::{self, Plan};
use crate::representation::{Md5Style, Representation};
use crate::sendfile::Sendfile;
use crate::serve_file::{self, Cursor, Follow};
use crate::state::AppState;
use crate::upstream_auth::Denied;

const CONTENT_MD5: HeaderName = HeaderName::from_static("content-md5");
/// Longest href `/v1/fetch` accepts.
const MAX_HREF: usize = 8192;

pub fn routes() -> Router<AppState> {
    Router::new()
        // Uploads (`PUT`) of image data go to the upstream Glance.
        .route(
            "/v2/images/{image_id}/file",
            get(glance_file)
                .head(glance_file)
                .fallback(crate::proxy::fallback),
        )
        .route("/v1/fetch", get(fetch).head(fetch))
        .route("/v1/fetch/{*href}", get(fetch_path).head(fetch_path))
}

async fn glance_file(
    State(state): State<AppState>,
    method: Method,
    path: Result<Path<String>, PathRejection>,
    zero_copy: Option<Extension<Sendfile>>,
    headers: HeaderMap,
) -> Response {
    let Ok(Path(id)) = path else {
        return ApiError::bad_request("invalid image id").into_response();
    };
    if let Err(e) = Key::new(&id) {
        return ApiError::bad_request(format!("invalid image id: {e}")).into_response();
    }
    let uuid = match Uuid::parse_str(&id) {
        Ok(u) if id.len() == 36 => u,
        _ => return ApiError::not_found(format!("no image {id}")).into_response(),
    };
    let token = headers
        .get("x-auth-token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    match state.upstream_auth.check(token.as_deref(), &uuid).await {
        Ok(()) => {}
        Err(Denied::Refused(e)) => return e.into_response(),
        Err(Denied::Inactive(inactive)) => {
            crate::proxy::evict_glance_image(&state, &uuid, "no longer active upstream").await;
            return ApiError::from(inactive).into_response();
        }
    }
    let href = Href::Glance(uuid);
    let key = cache_key(&href, &id, false);
    let origin = Origin {
        href,
        href_raw: uuid.hyphenated().to_string(),
        glance_token: token,
        revalidate: false,
    };
    let zero_copy = zero_copy.map(|Extension(z)| z);
    serve(
        &state,
        key,
        origin,
        method == Method::HEAD,
        zero_copy,
        &headers,
    )
    .await
}

async fn fetch(
    State(state): State<AppState>,
    method: Method,
    RawQuery(query): RawQuery,
    zero_copy: Option<Extension<Sendfile>>,
    headers: HeaderMap,
) -> Response {
    let href_raw = query.as_deref().and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "href")
            .map(|(_, v)| v.into_owned())
    });
    let Some(href_raw) = href_raw.filter(|h| !h.is_empty()) else {
        return ApiError::bad_request("the href query parameter is required").into_response();
    };
    fetch_href(&state, method, href_raw, zero_copy, &headers).await
}

/// `GET`/`HEAD /v1/fetch/<scheme>/<host[:port]>/<path...>[?query]`: `/v1/fetch?href=` with the
/// href in the path, so that the URL's last segment is the image's file name. Ironic's and
/// IPA's checksum lookup matches a `SHA256SUMS` line by that basename, which
/// `/v1/fetch?href=` hides (its basename is `fetch`).
async fn fetch_path(
    State(state): State<AppState>,
    method: Method,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
    zero_copy: Option<Extension<Sendfile>>,
    headers: HeaderMap,
) -> Response {
    let Ok(Path(rest)) = path else {
        return ApiError::bad_request("invalid path").into_response();
    };
    let Some(href_raw) = path_style_href(&rest, query.as_deref()) else {
        return ApiError::bad_request(
            "a path-style fetch is /v1/fetch/<http|https>/<host[:port]>/<path>",
        )
        .into_response();
    };
    fetch_href(&state, method, href_raw, zero_copy, &headers).await
}

/// `http/host:port/a/b.img` and a query → `http://host:port/a/b.img?query`.
fn path_style_href(rest: &str, query: Option<&str>) -> Option<String> {
    let (scheme, rest) = rest.split_once('/')?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    if !matches!(scheme, "http" | "https") || host.is_empty() || host.contains('@') {
        return None;
    }
    let mut href = format!("{scheme}://{host}/{path}");
    if let Some(q) = query.filter(|q| !q.is_empty()) {
        href.push('?');
        href.push_str(q);
    }
    Some(href)
}

/// `/v1/fetch` of one href, however the client named it.
async fn fetch_href(
    state: &AppState,
    method: Method,
    href_raw: String,
    zero_copy: Option<Extension<Sendfile>>,
    headers: &HeaderMap,
) -> Response {
    if href_raw.len() > MAX_HREF || href_raw.contains('\0') {
        return ApiError::bad_request("invalid href").into_response();
    }
    let href = match Href::parse(&href_raw) {
        Ok(h) => h,
        Err(e) => return ApiError::bad_request(e.to_string()).into_response(),
    };
    if matches!(href, Href::Glance(_)) {
        return ApiError::bad_request("Glance image ids are served at /v2/images/{id}/file")
            .into_response();
    }
    // Checked on the parsed, normalised URL (the one `Href::parse` read): scheme, host and
    // port exact, the path on a segment boundary, `..` resolved, no userinfo. The origin's
    // redirects are checked against the same list as they are followed.
    let url = match url::Url::parse(href_raw.trim()) {
        Ok(u) => u,
        Err(e) => return ApiError::bad_request(format!("invalid href: {e}")).into_response(),
    };
    if let Err(refusal) = state.allow.permits(&url) {
        return ApiError::new(StatusCode::FORBIDDEN, format!("href refused: {refusal}"))
            .into_response();
    }
    let key = cache_key(&href, &href_raw, false);
    let origin = Origin {
        href,
        href_raw,
        glance_token: None,
        revalidate: false,
    };
    let zero_copy = zero_copy.map(|Extension(z)| z);
    serve(
        state,
        key,
        origin,
        method == Method::HEAD,
        zero_copy,
        headers,
    )
    .await
}

/// A hit, else the key's download. `zero_copy`: the connection can send a hit with
/// `sendfile` (plain-TCP HTTP/1). The answer says what it was for the cache
/// ([`CacheOutcome`], for the access log).
async fn serve(
    state: &AppState,
    key: Key,
    origin: Origin,
    head: bool,
    zero_copy: Option<Sendfile>,
    headers: &HeaderMap,
) -> Response {
    match hit(state, &key, &origin, head, zero_copy.clone(), headers).await {
        Ok(Some(resp)) => return tagged(resp, CacheOutcome::Hit),
        Ok(None) => {}
        Err(e) => return e.into_response(),
    }
    if head {
        return head_of_miss(state, &key, &origin, headers).await;
    }
    let (fill, joined) = match state.fills.join_or_start(state, &key, origin.clone()) {
        Ok(f) => f,
        Err(e) => return e.into_response(),
    };
    let mut rx = fill.subscribe();
    // Every byte is written and verified, and the image is being published: this request
    // needs nothing of the origin. It is a hit once the flight is done (as it was when the
    // image was published before clients got their last byte).
    if matches!(*rx.borrow_and_update(), Phase::Verified { .. }) {
        let resp = match fill.ended().await {
            Outcome::Done(done) => {
                state.metrics.hits.inc();
                let (cache, k, file) = (state.cache.clone(), key.clone(), done.file().clone());
                let counted = off_thread(move || {
                    cache
                        .driver()
                        .record_hit(&k, &file, imgcache_store::record::now())
                })
                .await;
                let rec = match counted {
                    Ok(Some(rec)) => rec,
                    Ok(None) => {
                        return ApiError::not_found(format!("{key} was removed")).into_response();
                    }
                    Err(e) => return ApiError::from(e).into_response(),
                };
                send_published(
                    state,
                    &key,
                    &origin,
                    &rec,
                    done.file().clone(),
                    zero_copy,
                    headers,
                )
            }
            other => outcome_error(&other).into_response(),
        };
        return tagged(resp, CacheOutcome::Hit);
    }
    // A miss, whatever happens next: this request needed the origin (even if the fill it
    // joined is published by the time it is served, which is then not counted as a hit too).
    state.metrics.misses.inc();
    let phase = match rx.wait_for(|p| !matches!(p, Phase::Starting)).await {
        Ok(p) => p.clone(),
        Err(_) => return ApiError::internal("download vanished").into_response(),
    };
    // Known once the download streams (its source is chosen before its first byte).
    let outcome = match joined {
        Joined::Started if crate::fill::from_peer(&fill) => CacheOutcome::Peer,
        Joined::Started => CacheOutcome::Miss,
        Joined::Followed => CacheOutcome::Follow,
    };
    let resp = match phase {
        // The bytes flow into a file readers follow (set before the first `Streaming`).
        Phase::Streaming { .. } | Phase::Verified { .. } => {
            follow(state, &fill, md5_style(&origin), rx, zero_copy, headers)
        }
        Phase::Ended(Outcome::Done(Done::Written { .. })) if fill.info().is_some() => {
            follow(state, &fill, md5_style(&origin), rx, zero_copy, headers)
        }
        // Published before this request read a byte: the file the flight holds open.
        Phase::Ended(Outcome::Done(Done::Written { size, file })) => {
            let meta = fill_representation(&fill, Some(size), md5_style(&origin));
            file_response(state, &meta, file, zero_copy, headers)
        }
        Phase::Ended(Outcome::Done(Done::Held { record, file })) => {
            send_published(state, &key, &origin, &record, file, zero_copy, headers)
        }
        Phase::Ended(Outcome::Passthrough) => {
            let resp = passthrough(state, &origin, take_passthrough(&fill)).await;
            return tagged(resp, CacheOutcome::Passthrough);
        }
        Phase::Ended(other) => outcome_error(&other).into_response(),
        Phase::Starting => unreachable!("waited for a later phase"),
    };
    tagged(resp, outcome)
}

/// Streams the fill's growing file, each byte once it is written (the last once verified).
pub(crate) fn follow(
    state: &AppState,
    fill: &Fill,
    style: Md5Style,
    rx: tokio::sync::watch::Receiver<Phase>,
    zero_copy: Option<Sendfile>,
    headers: &HeaderMap,
) -> Response {
    let Some(info) = fill.info() else {
        return ApiError::internal("download has no file").into_response();
    };
    let meta = fill_representation(fill, info.size, style);
    let file = info.file.clone();
    let total = info.size;
    let written = fill.written();
    let followers = fill.extra().followers.clone();
    let counter = state.metrics.bytes_from_cache.clone();
    let zero_copied = state.metrics.bytes_sendfile.clone();
    respond(&meta, headers, false, move |start, end| {
        let follow = Some(Follow {
            phase: rx,
            written,
            total,
            position: followers.register(start),
            followers,
        });
        match zero_copy {
            Some(conn) => {
                let cursor = Cursor::new(start, end, follow);
                crate::sendfile::body(conn, file, cursor, counter, zero_copied)
            }
            None => serve_file::body(file, start, end, follow, counter),
        }
    })
}

/// `HEAD` of an image that is not cached: its headers from the running download if there is
/// one, else from what the origin says of it (a HEAD, Glance's image record, a stat). A HEAD
/// never starts a download: probing clients (`curl -I`, size checks before a deploy) must not
/// pull multi-GiB images into the cache.
async fn head_of_miss(
    state: &AppState,
    key: &Key,
    origin: &Origin,
    headers: &HeaderMap,
) -> Response {
    if let Some(fill) = state.fills.get(key) {
        // Verified and being published: the headers of the hit it is about to be (a GET
        // now is that hit), once the flight says it is done.
        if matches!(fill.phase(), Phase::Verified { .. })
            && let Outcome::Done(_) = fill.ended().await
        {
            let (cache, k) = (state.cache.clone(), key.clone());
            if let Ok(Some(rec)) = off_thread(move || cache.get_record(&k)).await {
                let resp = respond(&hit_meta(&rec, origin), headers, true, |_, _| Body::empty());
                return tagged(resp, CacheOutcome::Hit);
            }
        }
        if let Some(info) = fill.info() {
            let meta = fill_representation(&fill, info.size, md5_style(origin));
            let resp = respond(&meta, headers, true, |_, _| Body::empty());
            return tagged(resp, CacheOutcome::Follow);
        }
    }
    state.metrics.origin_requests.inc();
    let meta = match state
        .fetcher
        .origin_head(&origin.href, origin.glance_token.clone())
        .await
    {
        Ok(m) => m,
        Err(e) => {
            state.metrics.count_origin_error(&e);
            return tagged(origin_error(e).into_response(), CacheOutcome::Miss);
        }
    };
    let meta = Representation::of(
        meta.size,
        &ImageMeta::from_origin(&origin.href_raw, &meta),
        md5_style(origin),
    );
    tagged(
        respond(&meta, headers, true, |_, _| Body::empty()),
        CacheOutcome::Miss,
    )
}

/// Serves a published image, or `None` when it is not cached. With `zero_copy`, the body goes
/// from the file to the socket with `sendfile` ([`crate::sendfile`]); the headers are the same.
async fn hit(
    state: &AppState,
    key: &Key,
    origin: &Origin,
    head: bool,
    zero_copy: Option<Sendfile>,
    headers: &HeaderMap,
) -> Result<Option<Response>, ApiError> {
    let cache = state.cache.clone();
    let k = key.clone();
    if head {
        let Some(rec) = off_thread(move || cache.get_record(&k)).await? else {
            return Ok(None);
        };
        state.revalidations.maybe_start(state, key, &rec, origin);
        return Ok(Some(respond(
            &hit_meta(&rec, origin),
            headers,
            true,
            |_, _| Body::empty(),
        )));
    }
    let Some(reader): Option<CacheReader> = off_thread(move || cache.open_for_read(&k)).await?
    else {
        return Ok(None);
    };
    state.metrics.hits.inc();
    let rec = reader.record().clone();
    let file = Arc::new(reader.into_file());
    Ok(Some(send_published(
        state, key, origin, &rec, file, zero_copy, headers,
    )))
}

/// Sends a published image, open as `file` (its shared flock keeps the evictor away while
/// the response runs), described by `rec`.
fn send_published(
    state: &AppState,
    key: &Key,
    origin: &Origin,
    rec: &Record,
    file: Arc<std::fs::File>,
    zero_copy: Option<Sendfile>,
    headers: &HeaderMap,
) -> Response {
    state.revalidations.maybe_start(state, key, rec, origin);
    file_response(state, &hit_meta(rec, origin), file, zero_copy, headers)
}

/// A complete file's bytes, as `meta` describes them.
pub(crate) fn file_response(
    state: &AppState,
    meta: &Representation,
    file: Arc<std::fs::File>,
    zero_copy: Option<Sendfile>,
    headers: &HeaderMap,
) -> Response {
    let counter = state.metrics.bytes_from_cache.clone();
    let zero_copied = state.metrics.bytes_sendfile.clone();
    respond(meta, headers, false, move |start, end| {
        match (zero_copy, end) {
            (Some(conn), Some(end)) => {
                let cursor = Cursor::new(start, Some(end), None);
                crate::sendfile::body(conn, file, cursor, counter, zero_copied)
            }
            _ => serve_file::body(file, start, end, None, counter),
        }
    })
}

/// A running fill's image, described from what its record will say (before the first byte).
fn fill_representation(fill: &Fill, len: Option<u64>, style: Md5Style) -> Representation {
    let meta = crate::fill::image_meta(fill).cloned().unwrap_or_default();
    Representation::of(len, &meta, style)
}

fn hit_meta(rec: &Record, origin: &Origin) -> Representation {
    record_representation(rec, md5_style(origin))
}

pub(crate) fn record_representation(rec: &Record, style: Md5Style) -> Representation {
    Representation::of(Some(rec.size), &ImageMeta::from_props(&rec.props), style)
}

/// Glance images carry Glance's hex `Content-MD5`; other hrefs RFC 1864's.
fn md5_style(origin: &Origin) -> Md5Style {
    match origin.href {
        Href::Glance(_) => Md5Style::Hex,
        _ => Md5Style::Base64,
    }
}

/// The image is too big for the cache: stream it straight from the origin, with the answer
/// the fill already got (`given`) or a request of this client's own. The bytes are checked
/// against the origin's checksum as they pass, and the last chunk is held back until they
/// match: a corrupt image ends in a cut connection, never a clean response.
async fn passthrough(
    state: &AppState,
    origin: &Origin,
    given: Option<(
        imgcache_fetch::source::OriginMeta,
        imgcache_fetch::source::BodyStream,
    )>,
) -> Response {
    let (meta, body) = match given {
        Some(g) => g,
        None => {
            state.metrics.origin_requests.inc();
            match state
                .fetcher
                .request(&origin.href, None, origin.glance_token.clone())
                .await
            {
                Ok(OriginResponse::Body { meta, body }) => (meta, body),
                // A `file://` source too big for the cache: streamed from the file.
                Ok(OriginResponse::LocalFile { meta, path }) => {
                    match tokio::fs::File::open(&path).await {
                        Ok(f) => (meta, imgcache_fetch::admit::file_stream(f, &path)),
                        Err(e) => {
                            return ApiError::not_found(format!("{}: {e}", path.display()))
                                .into_response();
                        }
                    }
                }
                Ok(_) => {
                    return ApiError::new(StatusCode::BAD_GATEWAY, "unexpected origin answer")
                        .into_response();
                }
                Err(e) => {
                    state.metrics.count_origin_error(&e);
                    return origin_error(e).into_response();
                }
            }
        }
    };
    let m = Representation::of(
        meta.size,
        &ImageMeta::from_origin(&origin.href_raw, &meta),
        md5_style(origin),
    );
    let mut r = Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, "application/octet-stream");
    if let Some(len) = m.len {
        r = r.header(CONTENT_LENGTH, len);
    }
    for (name, value) in [
        (ETAG, &m.etag),
        (LAST_MODIFIED, &m.last_modified),
        (CONTENT_MD5, &m.md5),
    ] {
        if let Some(v) = value {
            r = r.header(name, v);
        }
    }
    let body = watched(
        body,
        state.fills.cancelled(),
        state.metrics.bytes_from_origin.clone(),
    );
    let body = crate::verify_stream::verified(
        body,
        meta.checksum.clone(),
        meta.size,
        state.metrics.checksum_failures.clone(),
    );
    r.body(Body::from_stream(body))
        .unwrap_or_else(|e| ApiError::internal(e.to_string()).into_response())
}

/// Status, headers and body for a request, with `Range`/`If-Range` applied.
fn respond(
    meta: &Representation,
    req: &HeaderMap,
    head: bool,
    body: impl FnOnce(u64, Option<u64>) -> Body,
) -> Response {
    let validators = || {
        let mut h = HeaderMap::new();
        for (name, value) in [(ETAG, &meta.etag), (LAST_MODIFIED, &meta.last_modified)] {
            if let Some(v) = value.as_deref().and_then(|v| HeaderValue::from_str(v).ok()) {
                h.insert(name, v);
            }
        }
        h
    };
    match conditional::evaluate(req, meta.etag.as_deref(), meta.last_modified.as_deref()) {
        Precondition::Proceed => {}
        Precondition::NotModified => {
            let mut resp = StatusCode::NOT_MODIFIED.into_response();
            *resp.headers_mut() = validators();
            return resp;
        }
        Precondition::Failed => {
            let mut resp = ApiError::new(StatusCode::PRECONDITION_FAILED, "precondition failed")
                .into_response();
            resp.headers_mut().extend(validators());
            return resp;
        }
    }
    let plan = range::plan(
        req,
        meta.len,
        meta.etag.as_deref(),
        meta.last_modified.as_deref(),
    );
    let mut h = HeaderMap::new();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if meta.len.is_some() {
        h.insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    }
    h.extend(validators());
    let (status, start, end) = match (plan, meta.len) {
        (Plan::Unsatisfiable, Some(len)) => {
            let mut resp =
                ApiError::new(StatusCode::RANGE_NOT_SATISFIABLE, "range not satisfiable")
                    .into_response();
            resp.headers_mut().insert(
                CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{len}")).expect("ascii"),
            );
            return resp;
        }
        (Plan::Partial { start, end }, len) => {
            // `*`: the complete length is not known yet (RFC 9110 §14.4); a range past the
            // image's real end is then cut, since its length was promised.
            let len = len.map_or_else(|| "*".to_string(), |l| l.to_string());
            h.insert(
                CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes {start}-{}/{len}", end - 1)).expect("ascii"),
            );
            (StatusCode::PARTIAL_CONTENT, start, Some(end))
        }
        _ => {
            // Content-MD5 describes the whole body, so only full responses carry it.
            if let Some(v) = meta
                .md5
                .as_deref()
                .and_then(|v| HeaderValue::from_str(v).ok())
            {
                h.insert(CONTENT_MD5, v);
            }
            (StatusCode::OK, 0, meta.len)
        }
    };
    if let Some(end) = end {
        h.insert(CONTENT_LENGTH, HeaderValue::from(end - start));
    }
    let body = if head {
        Body::empty()
    } else {
        body(start, end)
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    *resp.headers_mut() = h;
    resp
}

#[cfg(test)]
mod tests {
    #[test]
    fn path_style_hrefs() {
        use super::path_style_href as h;
        assert_eq!(
            h("http/127.0.0.1:8080/images/disk.img", None).as_deref(),
            Some("http://127.0.0.1:8080/images/disk.img")
        );
        assert_eq!(
            h("https/h/a/SHA256SUMS", Some("v=1")).as_deref(),
            Some("https://h/a/SHA256SUMS?v=1")
        );
        assert_eq!(h("http/h", None).as_deref(), Some("http://h/"));
        for bad in [
            "file/etc/passwd",
            "http//x",
            "http/u@h/x",
            "ftp/h/x",
            "http",
        ] {
            assert_eq!(h(bad, None), None, "{bad}");
        }
    }
}
