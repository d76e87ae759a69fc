//! `http://` and `https://` origins (reqwest on rustls with the ring provider).
//!
//! A revalidation is one conditional GET (`If-None-Match` / `If-Modified-Since`): a 304 costs
//! one round trip, and a changed image starts streaming in the same response, where Ironic
//! does a HEAD and then a GET. Connection errors and 5xx answers are retried with exponential
//! backoff; 4xx answers never are.
//!
//! Redirects are followed here, not by reqwest: at most [`MAX_REDIRECTS`] hops, each target
//! resolved against the URL that answered and checked before it is asked (http or https, no
//! userinfo, and under the request's [`AllowList`] when it has one), so an open redirect under
//! an allowed prefix cannot reach anything outside it. A refused hop is
//! [`FetchError::RedirectRefused`] and is never retried. Every hop gets the same request
//! headers (the conditional ones, `Range`), except that credentials (`Authorization`,
//! `X-Auth-Token`, cookies) are dropped once a hop leaves the origin they were meant for.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use reqwest::header::{
    AUTHORIZATION, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_RANGE, COOKIE, ETAG, HeaderMap,
    HeaderName, HeaderValue, IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_RANGE, LAST_MODIFIED, LOCATION,
    PROXY_AUTHORIZATION, RANGE,
};
use reqwest::{Method, StatusCode};
use url::Url;

use super::{OriginMeta, Response, Validators};
use crate::allow::{AllowList, Refusal, check_userinfo, redacted};
use crate::error::{FetchError, Result};
use crate::resume::Resumable;

/// The most redirects one request follows (each hop checked, see the module docs); the next
/// redirect after these is [`FetchError::TooManyRedirects`].
pub const MAX_REDIRECTS: usize = 5;

#[derive(Clone, Debug)]
pub struct HttpOptions {
    pub connect_timeout: Duration,
    /// Longest wait for the next bytes of a response: a stalled origin fails after this.
    pub read_timeout: Duration,
    /// One origin attempt's budget: connecting plus the response headers, its retries of
    /// connection errors and 5xx included. An origin that accepts and never answers fails
    /// within it.
    pub attempt_timeout: Duration,
    /// Retries after the first attempt, for connection errors and 5xx; also the most times
    /// one download resumes a broken body (see [`crate::resume`]).
    pub retries: u32,
    /// The total time one download may spend resuming after its body first broke.
    pub retry_budget: Duration,
    /// First backoff; doubles on each retry.
    pub backoff: Duration,
    /// Extra CA certificates (PEM bundle) to trust, e.g. a lab's private CA.
    pub ca_bundle: Option<PathBuf>,
    /// Accept any certificate. For labs only.
    pub insecure: bool,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(60),
            attempt_timeout: Duration::from_secs(30),
            retries: 3,
            retry_budget: Duration::from_secs(300),
            backoff: Duration::from_millis(500),
            ca_bundle: None,
            insecure: false,
        }
    }
}

#[derive(Clone, Debug)]
pub struct HttpSource {
    client: reqwest::Client,
    opts: HttpOptions,
}

impl HttpSource {
    pub fn new(opts: HttpOptions) -> Result<Self> {
        // reqwest is built without a default crypto provider: install ring once per process.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut b = reqwest::Client::builder()
            .connect_timeout(opts.connect_timeout)
            .read_timeout(opts.read_timeout)
            .user_agent(concat!("imgcache/", env!("CARGO_PKG_VERSION")))
            // Redirects are followed by `send`, which checks every hop.
            .redirect(reqwest::redirect::Policy::none())
            .tls_danger_accept_invalid_certs(opts.insecure);
        if let Some(path) = &opts.ca_bundle {
            let pem = std::fs::read(path).map_err(|e| FetchError::io("read CA bundle", path, e))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| FetchError::Config(format!("CA bundle {}: {e}", path.display())))?;
            b = b.tls_certs_merge(certs);
        }
        let client = b
            .build()
            .map_err(|e| FetchError::Config(format!("HTTP client: {e}")))?;
        Ok(HttpSource { client, opts })
    }

    /// The same client (its connection pool shared) with no retries: for calls that must
    /// answer quickly, such as an auth check.
    pub fn without_retries(&self) -> HttpSource {
        HttpSource {
            client: self.client.clone(),
            opts: HttpOptions {
                retries: 0,
                ..self.opts.clone()
            },
        }
    }

    pub fn options(&self) -> &HttpOptions {
        &self.opts
    }

    /// The process's HTTP client (connection pools, TLS roots), for a caller that relays
    /// requests itself: the server's Glance API proxy. It follows no redirects.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// GETs `url`; with `held`, conditionally, answering `NotModified` on a 304.
    pub async fn get(
        &self,
        url: &Url,
        held: Option<&Validators>,
        extra: &HeaderMap,
    ) -> Result<Response> {
        self.get_allowed(url, held, extra, None).await
    }

    /// [`HttpSource::get`], following only redirects `allow` permits (when given).
    pub async fn get_allowed(
        &self,
        url: &Url,
        held: Option<&Validators>,
        extra: &HeaderMap,
        allow: Option<&AllowList>,
    ) -> Result<Response> {
        let mut headers = extra.clone();
        if let Some(v) = held {
            if let Some(etag) = v
                .etag
                .as_deref()
                .and_then(|e| HeaderValue::from_str(e).ok())
            {
                headers.insert(IF_NONE_MATCH, etag);
            }
            if let Some(lm) = v
                .last_modified
                .as_deref()
                .and_then(|e| HeaderValue::from_str(e).ok())
            {
                headers.insert(IF_MODIFIED_SINCE, lm);
            }
        }
        let resp = self.send(Method::GET, url, headers.clone(), allow).await?;
        if resp.status() == StatusCode::NOT_MODIFIED {
            return Ok(Response::NotModified);
        }
        let mut meta = origin_meta(resp.headers());
        // A whole 200 body with a strong validator can be asked again from an offset.
        for h in [IF_NONE_MATCH, IF_MODIFIED_SINCE] {
            headers.remove(h);
        }
        let resume = (resp.status() == StatusCode::OK && !headers.contains_key(RANGE))
            .then(|| Resumable::of(self, url, &headers, allow, resp.headers()))
            .flatten();
        meta.resume = resume.clone();
        Ok(Response::Body {
            meta,
            body: crate::resume::resuming(url.clone(), resp, 0, resume),
        })
    }

    /// What a GET of `url` would send, from a HEAD: its size and validators, no body.
    pub async fn head(&self, url: &Url, extra: &HeaderMap) -> Result<OriginMeta> {
        self.head_allowed(url, extra, None).await
    }

    /// [`HttpSource::head`], following only redirects `allow` permits (when given).
    pub async fn head_allowed(
        &self,
        url: &Url,
        extra: &HeaderMap,
        allow: Option<&AllowList>,
    ) -> Result<OriginMeta> {
        let resp = self.send(Method::HEAD, url, extra.clone(), allow).await?;
        Ok(origin_meta(resp.headers()))
    }

    /// GETs a small document (JSON, a checksum file) into memory, refusing more than `limit`.
    pub async fn get_small(&self, url: &Url, extra: &HeaderMap, limit: usize) -> Result<Bytes> {
        let resp = self.send(Method::GET, url, extra.clone(), None).await?;
        let mut body = body_stream(url.clone(), resp);
        let mut buf = Vec::new();
        while let Some(chunk) = body.next().await {
            buf.extend_from_slice(&chunk?);
            if buf.len() > limit {
                return Err(FetchError::Origin {
                    url: url.to_string(),
                    reason: format!("document larger than {limit} bytes"),
                });
            }
        }
        Ok(buf.into())
    }

    /// GETs the bytes of `url` from `offset` on, under `If-Range: if_range` when given (a
    /// caller that verifies the whole image's checksum may go without): the rest of the
    /// same image on a 206 whose `Content-Range` starts at `offset` (and whose total is
    /// `total`, when known), else why not (the image changed, or no range support).
    pub async fn get_rest(
        &self,
        url: &Url,
        extra: &HeaderMap,
        allow: Option<&AllowList>,
        offset: u64,
        if_range: Option<&str>,
        total: Option<u64>,
    ) -> Result<std::result::Result<reqwest::Response, String>> {
        Ok(self
            .get_rest_or_whole(url, extra, allow, offset, if_range, total)
            .await?
            .and_then(|(resp, skip)| match skip {
                0 => Ok(resp),
                _ => Err(
                    "answered a range request with the whole image (ranges are not supported)"
                        .into(),
                ),
            }))
    }

    /// [`HttpSource::get_rest`], and also the whole image again when the origin ignores
    /// ranges but provably still has the same image (the strong validator `if_range` and the
    /// length `total` both unchanged): then with the count of leading bytes to pass over
    /// (`offset`), so that the download goes on instead of starting over.
    pub async fn get_rest_or_whole(
        &self,
        url: &Url,
        extra: &HeaderMap,
        allow: Option<&AllowList>,
        offset: u64,
        if_range: Option<&str>,
        total: Option<u64>,
    ) -> Result<std::result::Result<(reqwest::Response, u64), String>> {
        let mut headers = extra.clone();
        let range = HeaderValue::from_str(&format!("bytes={offset}-")).expect("ASCII");
        headers.insert(RANGE, range);
        if let Some(if_range) = if_range {
            let Ok(ir) = HeaderValue::from_str(if_range) else {
                return Ok(Err("its validator is not a header value".into()));
            };
            headers.insert(IF_RANGE, ir);
        }
        let resp = self.send(Method::GET, url, headers, allow).await?;
        match resp.status() {
            StatusCode::PARTIAL_CONTENT => {}
            StatusCode::OK if same_image(resp.headers(), if_range, total) => {
                return Ok(Ok((resp, offset)));
            }
            StatusCode::OK => {
                return Ok(Err(
                    "answered a range request with the whole image (it changed, or ranges are not supported)".into(),
                ));
            }
            other => return Ok(Err(format!("answered a range request with {other}"))),
        }
        let cr = header(resp.headers(), &CONTENT_RANGE).unwrap_or_default();
        match crate::resume::content_range(&cr) {
            Some((start, _, t))
                if start == offset && (total.is_none() || t.is_none() || t == total) =>
            {
                Ok(Ok((resp, 0)))
            }
            _ => Ok(Err(format!(
                "answered bytes={offset}- with Content-Range {cr:?}"
            ))),
        }
    }

    /// The final answer to `method url`: a success or a 304, after at most [`MAX_REDIRECTS`]
    /// redirects, each checked by [`check_hop`] before it is followed.
    async fn send(
        &self,
        method: Method,
        url: &Url,
        mut headers: HeaderMap,
        allow: Option<&AllowList>,
    ) -> Result<reqwest::Response> {
        let mut current = url.clone();
        let mut hops = 0;
        loop {
            let resp = self.send_once(&method, &current, &headers).await?;
            if !is_redirect(&resp) {
                return Ok(resp);
            }
            let location = resp.headers().get(LOCATION).expect("is_redirect");
            let next = match location.to_str() {
                Ok(l) => current
                    .join(l)
                    .map_err(|e| (l.to_string(), Refusal::Unparsable(e.to_string()))),
                Err(_) => Err((
                    String::from_utf8_lossy(location.as_bytes()).into_owned(),
                    Refusal::Unparsable("not ASCII".into()),
                )),
            };
            let next = next.map_err(|(to, reason)| FetchError::RedirectRefused {
                from: redacted(&current),
                to,
                reason,
            })?;
            if hops >= MAX_REDIRECTS {
                return Err(FetchError::TooManyRedirects {
                    url: redacted(url),
                    max: MAX_REDIRECTS,
                });
            }
            check_hop(&next, allow).map_err(|reason| FetchError::RedirectRefused {
                from: redacted(&current),
                to: redacted(&next),
                reason,
            })?;
            if !same_origin(&current, &next) {
                for h in [AUTHORIZATION, COOKIE, PROXY_AUTHORIZATION] {
                    headers.remove(h);
                }
                headers.remove(X_AUTH_TOKEN);
            }
            tracing::debug!(from = %redacted(&current), to = %next, status = resp.status().as_u16(), "following a redirect");
            current = next;
            hops += 1;
        }
    }

    /// One request, retried on connection errors and 5xx. A success, a 304 and a redirect
    /// (a 3xx with a `Location`) are answers.
    async fn send_once(
        &self,
        method: &Method,
        url: &Url,
        headers: &HeaderMap,
    ) -> Result<reqwest::Response> {
        let mut attempt = 0;
        let deadline = tokio::time::Instant::now() + self.opts.attempt_timeout;
        loop {
            let send = self
                .client
                .request(method.clone(), url.clone())
                .headers(headers.clone())
                .send();
            let Ok(res) = tokio::time::timeout_at(deadline, send).await else {
                return Err(FetchError::Origin {
                    url: url.to_string(),
                    reason: format!(
                        "no response within the origin attempt timeout ({})",
                        humantime::format_duration(self.opts.attempt_timeout)
                    ),
                });
            };
            let err = match res {
                Ok(r)
                    if r.status().is_success()
                        || r.status() == StatusCode::NOT_MODIFIED
                        || is_redirect(&r) =>
                {
                    return Ok(r);
                }
                Ok(r) => FetchError::Status {
                    url: url.to_string(),
                    status: r.status().as_u16(),
                },
                Err(e) => FetchError::Origin {
                    url: url.to_string(),
                    reason: error_chain(&e),
                },
            };
            if !err.is_transient() || attempt >= self.opts.retries {
                return Err(err);
            }
            let wait = self.opts.backoff * 2u32.saturating_pow(attempt);
            if tokio::time::Instant::now() + wait >= deadline {
                return Err(err);
            }
            tracing::warn!(%url, error = %err, attempt, ?wait, "origin request failed; retrying");
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }
}

const X_AUTH_TOKEN: &str = "x-auth-token";

/// Whether a whole-image answer (a 200 to a range request) is provably the image the first
/// answer was: the same strong validator (a strong `ETag`, or the `Last-Modified` the
/// download resumes under) and the same known length, with no content coding.
fn same_image(resp: &HeaderMap, validator: Option<&str>, total: Option<u64>) -> bool {
    let (Some(validator), Some(total)) = (validator, total) else {
        return false;
    };
    if header(resp, &CONTENT_ENCODING).is_some_and(|v| !v.eq_ignore_ascii_case("identity")) {
        return false;
    }
    let now = match validator.starts_with('"') {
        true => header(resp, &ETAG),
        false => header(resp, &LAST_MODIFIED),
    };
    now.as_deref() == Some(validator)
        && header(resp, &CONTENT_LENGTH).and_then(|v| v.parse().ok()) == Some(total)
}

/// A redirect that can be followed: 301, 302, 303, 307 or 308 with a `Location`. The method
/// is kept (only GET and HEAD are sent).
fn is_redirect(r: &reqwest::Response) -> bool {
    matches!(r.status().as_u16(), 301 | 302 | 303 | 307 | 308) && r.headers().contains_key(LOCATION)
}

/// Whether a redirect to `next` may be followed: http or https, no userinfo, and permitted
/// by `allow` when there is one.
fn check_hop(next: &Url, allow: Option<&AllowList>) -> std::result::Result<(), Refusal> {
    if !matches!(next.scheme(), "http" | "https") {
        return Err(Refusal::Scheme(next.scheme().to_string()));
    }
    check_userinfo(next)?;
    match allow {
        Some(a) => a.permits(next),
        None => Ok(()),
    }
}

fn same_origin(a: &Url, b: &Url) -> bool {
    a.scheme() == b.scheme()
        && a.host() == b.host()
        && a.port_or_known_default() == b.port_or_known_default()
}

/// What a response's headers say about the image: its size and validators.
fn origin_meta(h: &HeaderMap) -> OriginMeta {
    OriginMeta {
        size: header(h, &CONTENT_LENGTH).and_then(|v| v.parse().ok()),
        validators: Validators {
            etag: header(h, &ETAG),
            last_modified: header(h, &LAST_MODIFIED),
            mtime_ns: None,
        },
        checksum: content_md5(h),
        md5: content_md5(h),
        ..OriginMeta::default()
    }
}

/// RFC 1864's `Content-MD5` (base64 of the body's md5), when the origin sends one: a
/// checksum it vouches for, verified like Glance's.
fn content_md5(h: &HeaderMap) -> Option<imgcache_store::Integrity> {
    use base64::Engine;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(h.get("content-md5")?.as_bytes())
        .ok()?;
    let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    imgcache_store::Integrity::new(imgcache_store::Algorithm::Md5, &hex).ok()
}

pub(crate) fn header(h: &HeaderMap, name: &HeaderName) -> Option<String> {
    h.get(name)?.to_str().ok().map(str::to_owned)
}

/// reqwest's Display hides the cause ("error decoding response body"); show the chain.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}

fn body_stream(url: Url, resp: reqwest::Response) -> super::BodyStream {
    Box::pin(resp.bytes_stream().map(move |r| {
        r.map_err(|e| FetchError::Origin {
            url: url.to_string(),
            reason: error_chain(&e),
        })
    }))
}
