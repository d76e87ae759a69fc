//! `/healthz` (can the cache work: its directory writable, its driver answering) and
//! `/metrics` (Prometheus text exposition).

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use crate::state::AppState;

/// Prometheus text exposition format 0.0.4.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
}

#[derive(Serialize)]
struct Check {
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl Check {
    fn from(res: Result<(), String>) -> Check {
        match res {
            Ok(()) => Check {
                ok: true,
                error: None,
            },
            Err(e) => Check {
                ok: false,
                error: Some(e),
            },
        }
    }
}

#[derive(Serialize)]
struct Health {
    status: &'static str,
    cache_dir: String,
    driver: &'static str,
    cache_dir_writable: Check,
    driver_ok: Check,
}

async fn healthz(State(state): State<AppState>) -> Response {
    let s = state.clone();
    let checks = tokio::task::spawn_blocking(move || {
        let writable = probe_writable(s.cache.root());
        let driver = s
            .cache
            .get_cache_size()
            .map(|_| ())
            .map_err(|e| e.to_string());
        (writable, driver)
    })
    .await;
    let (writable, driver) = match checks {
        Ok(c) => c,
        Err(e) => (Err(format!("health check failed: {e}")), Err(String::new())),
    };
    let ok = writable.is_ok() && driver.is_ok();
    let body = Health {
        status: if ok { "ok" } else { "error" },
        cache_dir: state.cache.root().display().to_string(),
        driver: state.cache.driver_kind().name(),
        cache_dir_writable: Check::from(writable),
        driver_ok: Check::from(driver),
    };
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// Creates, writes and removes a probe file in the cache directory. Its name starts with a dot,
/// so it is never taken for an image.
fn probe_writable(root: &std::path::Path) -> Result<(), String> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let path = root.join(format!(
        ".healthz-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let res = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .and_then(|mut f| f.write_all(b"ok"));
    let removed = std::fs::remove_file(&path);
    res.and(removed)
        .map_err(|e| format!("{}: {e}", root.display()))
}

async fn metrics(State(state): State<AppState>) -> Response {
    // The byte total is a running total (cheap); the entry count is kept by the workers and
    // the management calls.
    let s = state.clone();
    if let Ok(Ok(size)) = tokio::task::spawn_blocking(move || s.cache.get_cache_size()).await {
        state
            .metrics
            .cache_bytes
            .set(i64::try_from(size).unwrap_or(i64::MAX));
    }
    (
        [(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)],
        state.metrics.render(),
    )
        .into_response()
}
