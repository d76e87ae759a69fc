//! Glance's JSON schemas (`GET /v2/schemas/...`), relayed with a fallback. python-glanceclient
//! run without `--os-image-api-version` reads `/versions` and then a schema to confirm that v2
//! works; when none answers it falls back to the removed v1 API (`invalid choice:
//! 'cache-list'`). An operator using imgcache's own admin token (which a Keystone-protected
//! Glance does not know) must still get one, so a schema is asked for:
//! 1. with the client's token;
//! 2. refused or unreachable: with the configured service token (`glance_token`);
//! 3. still nothing: the last good copy, kept in memory and in `<cache_dir>/.glance-schemas/`
//!    (a dot-directory, which the store never counts or cleans), so it survives restarts.
//!
//! Schemas describe the API, not any image or tenant, so a copy is safe to hand to anyone.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use imgcache_store::Key;

use crate::auth::TOKEN_HEADER;
use crate::error::ApiError;
use crate::state::AppState;

/// Largest schema accepted from upstream (Glance's image schema is about 10 KiB).
const MAX_SCHEMA: usize = 1 << 20;

/// The last good copy of each schema.
pub struct Schemas {
    dir: PathBuf,
    copies: Mutex<HashMap<String, Bytes>>,
}

impl Schemas {
    pub fn new(cache_root: &std::path::Path) -> Schemas {
        Schemas {
            dir: cache_root.join(".glance-schemas"),
            copies: Mutex::new(HashMap::new()),
        }
    }

    fn file(&self, name: &str) -> PathBuf {
        // Segments are valid keys ([A-Za-z0-9._-]), so `+` cannot collide.
        self.dir.join(format!("{}.json", name.replace('/', "+")))
    }

    fn keep(&self, name: &str, body: &Bytes) {
        let prev = self
            .copies
            .lock()
            .expect("poisoned")
            .insert(name.to_string(), body.clone());
        if prev.as_ref() == Some(body) {
            return;
        }
        // Best effort, written aside and renamed: a torn copy is never read back.
        let path = self.file(name);
        let tmp = path.with_extension("tmp");
        let res = std::fs::create_dir_all(&self.dir)
            .and_then(|_| std::fs::write(&tmp, body))
            .and_then(|_| std::fs::rename(&tmp, &path));
        if let Err(e) = res {
            tracing::warn!(path = %path.display(), error = %e, "cannot keep a schema copy");
        }
    }

    fn copy(&self, name: &str) -> Option<Bytes> {
        if let Some(b) = self.copies.lock().expect("poisoned").get(name) {
            return Some(b.clone());
        }
        let body = Bytes::from(std::fs::read(self.file(name)).ok()?);
        serde_json::from_slice::<serde_json::Value>(&body).ok()?;
        Some(body)
    }
}

/// Answers `GET {path}` (a `/v2/schemas/...` path), see the module docs.
pub async fn get(state: &AppState, upstream: &str, path: &str, headers: &HeaderMap) -> Response {
    let name = path
        .trim_start_matches("/v2/schemas/")
        .trim_end_matches('/');
    if name.is_empty() || !name.split('/').all(|seg| Key::new(seg).is_ok()) {
        return ApiError::bad_request("invalid schema name").into_response();
    }
    let url = format!("{upstream}/v2/schemas/{name}");
    let client_token = headers.get(TOKEN_HEADER).cloned();
    let first = ask(state, &url, client_token.clone()).await;
    if let Ok(body) = &first {
        state.schemas.keep(name, body);
        return json(body.clone());
    }
    let service = state
        .config
        .sources
        .glance_token
        .as_deref()
        .and_then(|t| HeaderValue::from_str(t).ok())
        .filter(|t| Some(t) != client_token.as_ref());
    if let Some(token) = service
        && let Ok(body) = ask(state, &url, Some(token)).await
    {
        state.schemas.keep(name, &body);
        return json(body);
    }
    if let Some(body) = state.schemas.copy(name) {
        tracing::debug!(name, "upstream gave no schema: serving the last good copy");
        return json(body);
    }
    match first {
        // imgcache's own admin token is valid here; the upstream refusing it says nothing
        // of the client's credentials (glanceclient would report "Invalid OpenStack Identity
        // credentials"): the schema is just not available yet.
        Err(Some(StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN))
            if crate::auth::is_local_admin(state, headers) =>
        {
            ApiError::not_found(format!(
                "schema {name}: the upstream refuses imgcache's admin token, and no copy is \
                 kept yet (configure glance_token, the service token, to relay it)"
            ))
            .into_response()
        }
        Err(Some(status)) => ApiError::new(
            status,
            format!("the upstream Glance refused the schema request ({status})"),
        )
        .into_response(),
        _ => ApiError::new(StatusCode::BAD_GATEWAY, "cannot reach the upstream Glance")
            .into_response(),
    }
}

/// The schema's body, or the upstream's status (`None`: unreachable or not JSON).
async fn ask(
    state: &AppState,
    url: &str,
    token: Option<HeaderValue>,
) -> Result<Bytes, Option<StatusCode>> {
    let http = state.fetcher.http_source().map_err(|_| None)?;
    let mut req = http
        .client()
        .get(url)
        .header(header::ACCEPT, "application/json");
    if let Some(t) = token {
        req = req.header(TOKEN_HEADER, t);
    }
    let resp = req.send().await.map_err(|e| {
        tracing::warn!(url, error = %e, "cannot reach the upstream Glance for a schema");
        None
    })?;
    if !resp.status().is_success() {
        return Err(Some(resp.status()));
    }
    if resp
        .content_length()
        .is_some_and(|n| n as usize > MAX_SCHEMA)
    {
        return Err(None);
    }
    let body = resp.bytes().await.map_err(|_| None)?;
    if body.len() > MAX_SCHEMA || serde_json::from_slice::<serde_json::Value>(&body).is_err() {
        return Err(None);
    }
    Ok(body)
}

fn json(body: Bytes) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json; charset=UTF-8")],
        body,
    )
        .into_response()
}
