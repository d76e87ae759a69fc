//! Glance's cache-management API (Image API v2.14–v2.18), so that python-glanceclient's
//! `cache-*` commands and openstacksdk work against imgcache unchanged.
//!
//! | call | answer |
//! | --- | --- |
//! | `GET /versions` | 200, the versions list (`GET /`: the same with 300, as Glance) |
//! | `GET /v2/cache` | 200 `{"cached_images": [...], "queued_images": [...]}` |
//! | `PUT /v2/cache/{id}` | 202: queued (not when already cached) and the prefetcher woken; 404 for an id the upstream does not know, 400 for an inactive image |
//! | `DELETE /v2/cache/{id}` | 204: cached file and queue entry removed; 404 when neither cached, queued nor known upstream |
//! | `DELETE /v2/cache` | 204; `x-image-cache-clear-target`: `cache`, `queue`, empty/absent = both |
//! | `POST /v2/cache/clean` | 200: stalled and invalid files removed |
//! | `POST /v2/cache/prune` | 200 `{"total_files_pruned": N, "total_bytes_pruned": N}` |
//! | `GET /v2/cache/nodes/{id}` | 200, the nodes holding the image: this one, or none |
//!
//! Every `/v2/cache` call needs an admin token ([`crate::auth`]). The status codes are Glance
//! 33's (`glance/api/v2/cached_images.py`); the differences are listed in the README
//! ("Deliberate differences").

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use imgcache_store::off_thread;
use imgcache_store::{Key, StoreError};
use serde::Serialize;

use crate::auth::Admin;
use crate::error::ApiError;
use crate::public_url::base_url;
use crate::state::AppState;
use crate::workers::refresh_gauges;

/// Image API versions served, newest first; the first is CURRENT.
pub const VERSIONS: [&str; 5] = ["2.18", "2.17", "2.16", "2.15", "2.14"];

pub const CLEAR_TARGET_HEADER: &str = "x-image-cache-clear-target";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(versions_root))
        .route("/versions", get(versions))
        .route("/v2/cache", get(list).delete(clear))
        .route("/v2/cache/{image_id}", put(queue).delete(delete_entry))
        .route("/v2/cache/nodes/{image_id}", get(nodes))
        .route("/v2/cache/clean", post(clean))
        .route("/v2/cache/prune", post(prune))
}

#[derive(Serialize)]
struct Version {
    id: String,
    status: &'static str,
    links: [Link; 1],
}

#[derive(Serialize)]
struct Link {
    rel: &'static str,
    href: String,
}

fn versions_body(state: &AppState, headers: &HeaderMap) -> serde_json::Value {
    let href = format!("{}/v2/", base_url(state, headers));
    let versions: Vec<Version> = VERSIONS
        .iter()
        .enumerate()
        .map(|(i, v)| Version {
            id: format!("v{v}"),
            status: if i == 0 { "CURRENT" } else { "SUPPORTED" },
            links: [Link {
                rel: "self",
                href: href.clone(),
            }],
        })
        .collect();
    serde_json::json!({ "versions": versions })
}

async fn versions(State(state): State<AppState>, headers: HeaderMap) -> Response {
    Json(versions_body(&state, &headers)).into_response()
}

/// Glance answers the unversioned root with the same list and 300 Multiple Choices
/// (keystoneauth's version discovery reads it from there).
async fn versions_root(State(state): State<AppState>, headers: HeaderMap) -> Response {
    (
        StatusCode::MULTIPLE_CHOICES,
        Json(versions_body(&state, &headers)),
    )
        .into_response()
}

fn key(raw: &str) -> Result<Key, ApiError> {
    Key::new(raw).map_err(|e| ApiError::bad_request(format!("invalid image id: {e}")))
}

#[derive(Serialize)]
struct CachedImage {
    image_id: String,
    hits: u64,
    last_accessed: f64,
    last_modified: f64,
    size: u64,
    /// Not in Glance's answer: the URL a `/v1/fetch` entry came from (its id is a uuid5 of
    /// it). Clients ignore fields they do not know.
    #[serde(skip_serializing_if = "Option::is_none")]
    href: Option<String>,
}

#[derive(Serialize)]
struct CacheState {
    cached_images: Vec<CachedImage>,
    queued_images: Vec<String>,
}

async fn list(_: Admin, State(state): State<AppState>) -> Result<Json<CacheState>, ApiError> {
    let cache = state.cache.clone();
    let (records, queued) = off_thread(move || {
        Ok::<_, StoreError>((cache.get_cached_images()?, cache.get_queued_images()?))
    })
    .await?;
    let cached_images = records
        .into_iter()
        .map(|r| CachedImage {
            image_id: r.image_id.clone(),
            hits: r.hits,
            last_accessed: r.last_accessed,
            last_modified: r.last_modified,
            size: r.size,
            href: imgcache_fetch::ImageMeta::from_props(&r.props)
                .href
                .filter(|h| h != &r.image_id),
        })
        .collect();
    Ok(Json(CacheState {
        cached_images,
        queued_images: queued,
    }))
}

async fn queue(
    _: Admin,
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(image_id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let k = key(&image_id)?;
    // As Glance 33: an image the upstream does not know is 404, one that is not active 400,
    // at once (not dropped later by the prefetcher).
    match upstream_image(&state, &headers, &image_id).await {
        Upstream::Missing => {
            return Err(ApiError::not_found(format!("Image {image_id} not found.")));
        }
        Upstream::Image(status) if status != "active" => {
            return Err(ApiError::bad_request(
                "Only images with status active can be targeted for queueing",
            ));
        }
        Upstream::Unreachable(e) => return Err(e),
        Upstream::Image(_) | Upstream::Unknown => {}
    }
    let cache = state.cache.clone();
    // false when already cached, being cached or queued: nothing to do.
    let queued = off_thread(move || cache.queue_image(&k)).await?;
    if queued {
        tracing::info!(image_id, "queued for prefetching");
    }
    // Also wakes a prefetcher backing off this id: an operator's PUT asks for a retry now.
    state.prefetch_wake.notify_one();
    Ok(StatusCode::ACCEPTED)
}

/// What the upstream Glance says of an image id, for the cache API's answers.
enum Upstream {
    /// It exists, with this status.
    Image(String),
    /// 404: no such image.
    Missing,
    /// No upstream configured, not an image id, or the token could not tell (401/403: e.g.
    /// imgcache's own admin token with no service token configured).
    Unknown,
    /// The upstream could not be asked.
    Unreachable(ApiError),
}

/// Asks with the service token (`glance_token`) when one is configured, as Glance looks up
/// the image without the caller's authorization; else with the caller's token.
async fn upstream_image(state: &AppState, headers: &HeaderMap, id: &str) -> Upstream {
    let Some(glance) = state.config.sources.glance_url.clone() else {
        return Upstream::Unknown;
    };
    let Ok(uuid) = uuid::Uuid::parse_str(id) else {
        return Upstream::Missing;
    };
    let token = state.config.sources.glance_token.clone().or_else(|| {
        headers
            .get(crate::auth::TOKEN_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    });
    let http = match state.fetcher.http_source() {
        Ok(h) => h,
        Err(e) => return Upstream::Unreachable(ApiError::internal(e.to_string())),
    };
    let src = imgcache_fetch::source::glance::GlanceSource::new(glance, token, http);
    match src.image(&uuid).await {
        Ok(img) => Upstream::Image(img.status),
        Err(imgcache_fetch::FetchError::Status { status: 404, .. }) => Upstream::Missing,
        Err(imgcache_fetch::FetchError::Status {
            status: 401 | 403, ..
        }) => Upstream::Unknown,
        Err(e) => Upstream::Unreachable(ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!("cannot ask the upstream Glance about image {id}: {e}"),
        )),
    }
}

async fn delete_entry(
    _: Admin,
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(image_id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let k = key(&image_id)?;
    let cache = state.cache.clone();
    let held = off_thread(move || {
        let cached = cache.delete_cached_image(&k)?;
        let queued = cache.delete_queued_image(&k)?;
        Ok::<_, StoreError>(cached || queued)
    })
    .await?;
    state.withdraw([image_id.clone()]).await;
    refresh_gauges(&state).await;
    if !held {
        // As Glance 33: 404 only when the image is neither cached, queued nor known upstream.
        match upstream_image(&state, &headers, &image_id).await {
            Upstream::Image(_) => {}
            Upstream::Missing | Upstream::Unknown => {
                return Err(ApiError::not_found(format!("Image {image_id} not found.")));
            }
            Upstream::Unreachable(e) => return Err(e),
        }
    }
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Clone, Copy)]
enum ClearTarget {
    Cache,
    Queue,
    Both,
}

async fn clear(
    _: Admin,
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let raw = match headers.get(CLEAR_TARGET_HEADER) {
        None => String::new(),
        Some(v) => v
            .to_str()
            .map_err(|_| bad_target())?
            .trim()
            .to_ascii_lowercase(),
    };
    let target = match raw.as_str() {
        "" => ClearTarget::Both,
        "cache" => ClearTarget::Cache,
        "queue" => ClearTarget::Queue,
        _ => return Err(bad_target()),
    };
    let cache = state.cache.clone();
    let before: Vec<String> = match target {
        ClearTarget::Queue => Vec::new(),
        _ => {
            let c = cache.clone();
            off_thread(move || c.get_cached_images())
                .await?
                .into_iter()
                .map(|r| r.image_id)
                .collect()
        }
    };
    let (cached, queued) = off_thread(move || {
        let cached = match target {
            ClearTarget::Cache | ClearTarget::Both => cache.delete_all_cached_images()?,
            ClearTarget::Queue => 0,
        };
        let queued = match target {
            ClearTarget::Queue | ClearTarget::Both => cache.delete_all_queued_images()?,
            ClearTarget::Cache => 0,
        };
        Ok::<_, StoreError>((cached, queued))
    })
    .await?;
    tracing::info!(cached, queued, "cache cleared");
    state.withdraw(before).await;
    refresh_gauges(&state).await;
    Ok(StatusCode::NO_CONTENT)
}

fn bad_target() -> ApiError {
    ApiError::bad_request(
        "If provided 'x-image-cache-clear-target' must be 'cache', 'queue' or empty string.",
    )
}

/// Glance answers 200 with an empty body.
async fn clean(_: Admin, State(state): State<AppState>) -> Result<StatusCode, ApiError> {
    let cache = state.cache.clone();
    let stall = state.config.stall_time;
    let report = off_thread(move || cache.clean(stall)).await?;
    tracing::info!(
        stalled = report.stalled.len(),
        invalid = report.invalid.len(),
        dangling = report.dangling_records.len(),
        "cache cleaned"
    );
    refresh_gauges(&state).await;
    Ok(StatusCode::OK)
}

#[derive(Serialize)]
struct PruneResult {
    total_files_pruned: u64,
    total_bytes_pruned: u64,
}

async fn prune(_: Admin, State(state): State<AppState>) -> Result<Json<PruneResult>, ApiError> {
    let report = crate::workers::prune_now(&state).await?;
    Ok(Json(PruneResult {
        total_files_pruned: report.evicted.len() as u64,
        total_bytes_pruned: report.bytes_freed,
    }))
}

/// The nodes holding the image (Glance 33's bare JSON list of node URLs), from the fleet
/// index; 409 when fleet mode is off, as Glance answers without its `centralized_db` driver.
async fn nodes(
    _: Admin,
    State(state): State<AppState>,
    Path(image_id): Path<String>,
) -> Result<Json<Vec<String>>, ApiError> {
    let k = key(&image_id)?;
    let Some(fleet) = &state.fleet else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "fleet mode is off (no fleet_db): this node does not know other nodes' caches",
        ));
    };
    let holders = fleet
        .fleet
        .holders(k.as_str())
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    Ok(Json(
        holders
            .into_iter()
            .filter(|h| h.state == imgcache_fleet::HoldingState::Published)
            .map(|h| h.node)
            .collect(),
    ))
}
