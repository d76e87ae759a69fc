//! `/healthz` (liveness: the process answers), `/readyz` (readiness: can it do its work, and
//! if not, why) and `/metrics` (Prometheus exposition, OpenMetrics or text 0.0.4 as asked).
//!
//! `/healthz` touches nothing: a liveness probe that fails gets the process restarted, which
//! mends neither a full disk nor an unreachable upstream. `/readyz` checks, concurrently and
//! each within a few seconds at most: the cache directory is writable (a probe file is
//! created and removed), the metadata driver answers, the upstream Glance answers (when one is
//! configured: a GET of its root, whose version list needs no token) and the fleet database
//! answers (fleet mode). It is 200 when every check passes and 503 otherwise, with a JSON
//! body naming every check, whether it passed, and the cause when it did not.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use crate::metrics::Format;
use crate::state::AppState;

/// Longest the upstream Glance may take to answer `/readyz`'s GET.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

async fn healthz() -> Response {
    Json(serde_json::json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
    }))
    .into_response()
}

#[derive(Serialize)]
struct Check {
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl From<Result<(), String>> for Check {
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
struct Readiness {
    /// `ready` or `not_ready`.
    status: &'static str,
    /// The names of the checks that failed.
    failed: Vec<&'static str>,
    checks: BTreeMap<&'static str, Check>,
    cache_dir: String,
    driver: &'static str,
}

async fn readyz(State(state): State<AppState>) -> Response {
    let local = {
        let s = state.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let writable = probe_writable(s.cache.root());
                let driver = s
                    .cache
                    .get_cache_size()
                    .map(|_| ())
                    .map_err(|e| e.to_string());
                (writable, driver)
            })
            .await
            .unwrap_or_else(|e| {
                let e = format!("the check did not finish: {e}");
                (Err(e.clone()), Err(e))
            })
        }
    };
    let ((writable, driver), upstream, fleet) =
        tokio::join!(local, upstream_check(&state), fleet_check(&state));
    let mut checks = BTreeMap::new();
    checks.insert("cache_dir_writable", Check::from(writable));
    checks.insert("driver", Check::from(driver));
    if let Some(u) = upstream {
        checks.insert("upstream_glance", Check::from(u));
    }
    if let Some(f) = fleet {
        checks.insert("fleet_db", Check::from(f));
    }
    let failed: Vec<&'static str> = checks
        .iter()
        .filter(|(_, c)| !c.ok)
        .map(|(name, _)| *name)
        .collect();
    let (status, word) = if failed.is_empty() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not_ready")
    };
    let body = Readiness {
        status: word,
        failed,
        checks,
        cache_dir: state.cache.root().display().to_string(),
        driver: state.cache.driver_kind().name(),
    };
    (status, Json(body)).into_response()
}

/// The upstream Glance answers a GET of its root (its version list) within
/// [`UPSTREAM_TIMEOUT`]: any answer but a 5xx. `None` when no upstream is configured.
async fn upstream_check(state: &AppState) -> Option<Result<(), String>> {
    let url = state.config.sources.glance_url.clone()?;
    let http = match state.fetcher.http_source() {
        Ok(h) => h,
        Err(e) => return Some(Err(e.to_string())),
    };
    let res = http
        .client()
        .get(url.clone())
        .timeout(UPSTREAM_TIMEOUT)
        .send()
        .await;
    Some(match res {
        Ok(r) if r.status().is_server_error() => {
            Err(format!("the upstream Glance {url} answered {}", r.status()))
        }
        Ok(_) => Ok(()),
        Err(e) => Err(format!(
            "cannot reach the upstream Glance {url}: {}",
            imgcache_fetch::source::http::error_chain(&e)
        )),
    })
}

/// The fleet database answers a `SELECT 1` within the fleet's call timeout. `None` when
/// fleet mode is off.
async fn fleet_check(state: &AppState) -> Option<Result<(), String>> {
    let node = state.fleet.as_ref()?;
    Some(
        node.fleet
            .ping()
            .await
            .map_err(|e| format!("the fleet database does not answer: {e}")),
    )
}

/// Creates, writes and removes a probe file in the cache directory. Its name starts with a dot,
/// so it is never taken for an image.
fn probe_writable(root: &std::path::Path) -> Result<(), String> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let path = root.join(format!(
        ".readyz-{}-{}",
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

async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    // The byte total is a running total (cheap); the entry count is kept by the workers and
    // the management calls.
    let s = state.clone();
    let _ = tokio::task::spawn_blocking(move || s.metrics.refresh_scrape_gauges(&s.cache)).await;
    let format = Format::negotiate(headers.get(header::ACCEPT));
    (
        [(header::CONTENT_TYPE, format.content_type())],
        state.metrics.render(format),
    )
        .into_response()
}
