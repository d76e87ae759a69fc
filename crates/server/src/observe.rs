//! The one per-request observation: every request the router answers is counted and timed
//! in the metrics (`imgcache_requests_total`, `imgcache_request_duration_seconds`) and, unless
//! turned off, logged as one access-log line (target `imgcache::access`), both from the same
//! [`Observation`] when its body ends, so the two never disagree.
//!
//! The time runs from the request's arrival to the last byte of the response body, not to its
//! head: the response body is wrapped ([`Observed`]) and the observation is made when the body
//! ends, fails, or is dropped by the connection (a client that went away). For a body sent
//! with `sendfile`, the last byte is handed to the socket a frame (at most
//! [`crate::sendfile::SPAN`]) after hyper takes it from the body.
//!
//! What the request was for the cache (hit, miss, ...) is told by the handlers in a response
//! extension, [`CacheOutcome`]; the route is the router's template ([`MatchedPath`]), so the
//! metrics' label values stay few whatever paths clients send.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};

use crate::metrics::{Metrics, RequestLabels};
use crate::state::AppState;

/// The tracing target of the access log.
pub const ACCESS_TARGET: &str = "imgcache::access";

/// The address of the client a request came from (put in each request's extensions by the
/// connection that read it).
#[derive(Clone, Copy, Debug)]
pub struct ClientAddr(pub SocketAddr);

/// What a request was for the cache, as the access log says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Served from a published image.
    Hit,
    /// Not cached: this request started the origin download it is served from.
    Miss,
    /// Not cached: served from a download already running (another client's, a prefetch,
    /// or another process's on the same directory).
    Follow,
    /// Too big for the cache: streamed from the origin without being cached.
    Passthrough,
    /// Not cached: this request started a download filled from another node of the fleet.
    Peer,
    /// Relayed to the upstream Glance.
    Proxy,
    /// Nothing of the cache (the cache API, health, metrics, errors before any lookup).
    None,
}

impl CacheOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheOutcome::Hit => "hit",
            CacheOutcome::Miss => "miss",
            CacheOutcome::Follow => "follow",
            CacheOutcome::Passthrough => "passthrough",
            CacheOutcome::Peer => "peer",
            CacheOutcome::Proxy => "proxy",
            CacheOutcome::None => "none",
        }
    }
}

/// `resp`, marked with what it was for the cache.
pub fn tagged(mut resp: Response, outcome: CacheOutcome) -> Response {
    resp.extensions_mut().insert(outcome);
    resp
}

/// The router's outermost layer: see the module docs.
pub async fn observe(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = method_label(req.method());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned());
    let target = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.uri().path().to_owned(), |p| p.as_str().to_owned());
    let client = req.extensions().get::<ClientAddr>().map(|c| c.0);
    let resp = next.run(req).await;
    let outcome = resp
        .extensions()
        .get::<CacheOutcome>()
        .copied()
        .unwrap_or(CacheOutcome::None);
    let route: Cow<'static, str> = match route {
        Some(r) => r.into(),
        None if outcome == CacheOutcome::Proxy => "proxy".into(),
        None => "other".into(),
    };
    let request_id = resp
        .headers()
        .get(crate::router::REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (parts, body) = resp.into_parts();
    let observation = Observation {
        start,
        labels: RequestLabels {
            route,
            method,
            status: parts.status.as_u16(),
        },
        target,
        client,
        request_id,
        outcome,
        metrics: state.metrics.clone(),
        log: state.config.access_log,
    };
    // A streamed body does not know its length; the `Content-Length` it is sent with does.
    let expected = body.size_hint().exact().or_else(|| {
        parts
            .headers
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok())
    });
    let body = Observed {
        inner: body,
        bytes: 0,
        expected,
        observation: Some(observation),
    };
    Response::from_parts(parts, Body::new(body))
}

/// A bounded label for a method: the standard ones by name, anything else `other`.
fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        Method::TRACE => "TRACE",
        Method::CONNECT => "CONNECT",
        _ => "other",
    }
}

/// One request, waiting for the end of its body.
struct Observation {
    start: Instant,
    labels: RequestLabels,
    /// The path and query the client asked for (the log has it; the metrics never).
    target: String,
    client: Option<SocketAddr>,
    request_id: Option<String>,
    outcome: CacheOutcome,
    metrics: Arc<Metrics>,
    log: bool,
}

/// How a response body ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// Every byte was handed to the connection.
    Complete,
    /// The body failed (an origin cut, a checksum mismatch): the client's connection is cut.
    Error,
    /// The connection dropped the body before its end (the client went away).
    Dropped,
}

impl Observation {
    fn finish(self, bytes: u64, end: End) {
        let seconds = self.start.elapsed().as_secs_f64();
        self.metrics.observe_request(&self.labels, seconds);
        if !self.log {
            return;
        }
        let client = self
            .client
            .map_or_else(|| "-".to_string(), |c| c.to_string());
        tracing::info!(
            target: ACCESS_TARGET,
            method = %self.labels.method,
            path = %self.target,
            status = self.labels.status,
            bytes,
            duration_s = (seconds * 1e6).round() / 1e6,
            outcome = %self.outcome.as_str(),
            client = %client,
            request_id = %self.request_id.as_deref().unwrap_or("-"),
            complete = end == End::Complete,
            error = end == End::Error,
            "request",
        );
    }
}

/// A response body that counts the bytes it yields and makes its request's observation when
/// it ends (see the module docs).
struct Observed {
    inner: Body,
    bytes: u64,
    /// The length announced for the body, if any: a connection that stops polling once it
    /// has sent that many bytes (HTTP/1 with `Content-Length`) has sent it whole.
    expected: Option<u64>,
    observation: Option<Observation>,
}

impl Observed {
    fn finish(&mut self, end: End) {
        if let Some(o) = self.observation.take() {
            o.finish(self.bytes, end);
        }
    }
}

impl HttpBody for Observed {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        let polled = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &polled {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                }
            }
            Some(Err(_)) => this.finish(End::Error),
            None => this.finish(End::Complete),
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        let whole = self.inner.is_end_stream() || self.expected == Some(self.bytes);
        self.finish(if whole { End::Complete } else { End::Dropped });
    }
}
