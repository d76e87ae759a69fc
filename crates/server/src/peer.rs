//! The peer endpoint, `GET /v1/peer/images/{key}`: how one node of a fleet fills from another
//! (a peer is one more origin for the admission pipeline). It serves a published image whole,
//! or follows a fill in progress exactly as a local client follows it (each byte once it is
//! written, the last once it is verified), and never starts a download itself. Only a request
//! carrying the fleet token is answered; a node already serving its fan-out of peers answers
//! 503, so that the asking node tries another holder and the fleet fills as a pipelined tree.
//!
//! `Range: bytes=N-` is honoured as a client's is (a 206 from byte N, waiting for bytes not
//! yet written): how a node whose holder died mid-stream continues from another.
//!
//! `X-Imgcache-Checksum` carries the checksum the image is (or will be) verified against, for
//! the asking node to verify the whole image by.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::StreamExt;
use imgcache_store::{Key, Phase};

use crate::error::ApiError;
use crate::observe::{CacheOutcome, tagged};
use crate::representation::Md5Style;
use crate::state::AppState;
use imgcache_store::off_thread;

use imgcache_fleet::source::PEER_CONNECT;
pub use imgcache_fleet::source::TOKEN_HEADER;
pub const CHECKSUM_HEADER: &str = "x-imgcache-checksum";

pub fn routes() -> Router<AppState> {
    Router::new().route("/v1/peer/images/{key}", get(peer_image))
}

async fn peer_image(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(key): Path<String>,
) -> Response {
    let Some(node) = state.fleet.clone() else {
        return ApiError::not_found("fleet mode is off").into_response();
    };
    let token = headers.get(TOKEN_HEADER).map(HeaderValue::as_bytes);
    if !token.is_some_and(|t| crate::auth::ct_eq(t, node.settings.token.as_bytes())) {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "the peer endpoint needs the fleet token",
        )
        .into_response();
    }
    let key = match Key::new(&key) {
        Ok(k) => k,
        Err(e) => return ApiError::bad_request(format!("invalid key: {e}")).into_response(),
    };
    let Some(slot) = node.serve_peer() else {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "serving {} peers already: ask another holder",
                node.settings.peer_fanout
            ),
        )
        .into_response();
    };
    // Followed while it fills (this server's fill, or an `imgcache fetch`'s on this cache
    // directory): the peer's bytes as they are written.
    let fill = match state.fills.get(&key) {
        Some(fill) => Some(fill),
        None => match state.fills.follow_other_writer(&state, &key) {
            Ok(fill) => fill,
            Err(e) => return e.into_response(),
        },
    };
    if let Some(fill) = &fill {
        // A flight following another process streams once it has opened the file (its
        // first poll); the asking node gives up on this holder after PEER_CONNECT.
        let mut rx = fill.subscribe();
        let started = rx.wait_for(|p| !matches!(p, Phase::Starting));
        let _ = tokio::time::timeout(PEER_CONNECT / 2, started).await;
    }
    let resp = if let Some(fill) = fill
        && matches!(
            fill.phase(),
            Phase::Streaming { .. } | Phase::Verified { .. }
        )
        && let Some(info) = fill.info()
    {
        let checksum = info.checksum.as_ref().map(ToString::to_string);
        let rx = fill.subscribe();
        let resp = with_checksum(
            crate::images::follow(&state, &fill, Md5Style::Base64, rx, None, &headers),
            checksum,
        );
        tagged(resp, CacheOutcome::Follow)
    } else {
        let (cache, k) = (state.cache.clone(), key.clone());
        match off_thread(move || cache.open_for_read_uncounted(&k)).await {
            Ok(Some(reader)) => {
                let rec = reader.record().clone();
                let meta = crate::images::record_representation(&rec, Md5Style::Base64);
                let file = std::sync::Arc::new(reader.into_file());
                let resp = with_checksum(
                    crate::images::file_response(&state, &meta, file, None, &headers),
                    rec.checksum.as_ref().map(ToString::to_string),
                );
                tagged(resp, CacheOutcome::Hit)
            }
            Ok(None) => {
                return ApiError::not_found(format!("{key} is not held here")).into_response();
            }
            Err(e) => return ApiError::from(e).into_response(),
        }
    };
    state.metrics.peer_streams.inc();
    // The slot is held for as long as the body streams.
    let (parts, body) = resp.into_parts();
    let body = axum::body::Body::from_stream(body.into_data_stream().map(move |chunk| {
        let _held = &slot;
        chunk
    }));
    Response::from_parts(parts, body)
}

fn with_checksum(mut resp: Response, checksum: Option<String>) -> Response {
    if let Some(v) = checksum.and_then(|c| HeaderValue::from_str(&c).ok()) {
        resp.headers_mut().insert(CHECKSUM_HEADER, v);
    }
    resp
}
