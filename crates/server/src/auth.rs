//! Admin authentication for the cache-management API.
//!
//! A request is admin when its `X-Auth-Token` is the configured `admin_token`, or, with an
//! upstream Glance configured, when upstream grants the token an admin-only call:
//! `GET /v2/info/stores/detail` (Glance's `stores_info_detail` policy, admin or service role).
//! A token upstream accepts for ordinary calls is not enough. Upstream answers 404 there when it
//! has no multi-store backends configured; then roles cannot be verified and only the
//! configured `admin_token` grants access. Positive answers are reused for `auth_cache_ttl`.
//!
//! Missing token: 401. A token that is not admin: 403 (401 when upstream rejects the token
//! itself).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use imgcache_fetch::FetchError;
use imgcache_fetch::source::http::HttpSource;
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::state::AppState;

pub const TOKEN_HEADER: &str = "x-auth-token";
/// Upstream's admin-only call used to verify the admin role.
const ADMIN_PROBE_PATH: &str = "/v2/info/stores/detail";
/// Entries kept in the positive-answer cache before expired ones are swept.
const SWEEP_AT: usize = 1024;

/// Answers "is this token admin?", remembering upstream's positive answers for a while.
#[derive(Default)]
pub struct AdminAuth {
    /// sha256(token) → when upstream's "admin" answer expires. Tokens are not kept verbatim.
    granted: Mutex<HashMap<[u8; 32], Instant>>,
    http: OnceLock<HttpSource>,
}

impl std::fmt::Debug for AdminAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminAuth").finish_non_exhaustive()
    }
}

/// Extractor: the handler runs only for an admin request.
#[derive(Debug, Clone, Copy)]
pub struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = crate::error::ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        check_admin(state, &parts.headers).await.map(|()| Admin)
    }
}

/// Ok when the request's token grants the cache-management API.
pub async fn check_admin(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let token = headers
        .get(TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "this call needs an admin X-Auth-Token",
            )
        })?;
    if let Some(secret) = &state.config.admin_token
        && ct_eq(secret.as_bytes(), token.as_bytes())
    {
        return Ok(());
    }
    if state.config.sources.glance_url.is_some() {
        return state.admin_auth.check_upstream(state, token).await;
    }
    Err(forbidden())
}

/// Whether `headers` carry imgcache's own admin token (`admin_token`), which the upstream
/// does not know.
pub fn is_local_admin(state: &AppState, headers: &HeaderMap) -> bool {
    let token = headers.get(TOKEN_HEADER).and_then(|v| v.to_str().ok());
    match (&state.config.admin_token, token) {
        (Some(secret), Some(t)) => ct_eq(secret.as_bytes(), t.trim().as_bytes()),
        _ => false,
    }
}

fn forbidden() -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "the token is not allowed to manage the image cache",
    )
}

impl AdminAuth {
    async fn check_upstream(&self, state: &AppState, token: &str) -> Result<(), ApiError> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = Instant::now();
        {
            let mut granted = self.granted.lock().unwrap_or_else(|p| p.into_inner());
            match granted.get(&digest) {
                Some(until) if *until > now => return Ok(()),
                Some(_) => {
                    granted.remove(&digest);
                }
                None => {}
            }
        }
        let base = state
            .config
            .sources
            .glance_url
            .as_ref()
            .expect("checked by the caller");
        let url = url::Url::parse(&format!(
            "{}{ADMIN_PROBE_PATH}",
            base.as_str().trim_end_matches('/')
        ))
        .map_err(|e| ApiError::internal(format!("glance url: {e}")))?;
        let http = self.http(state)?;
        let mut headers = HeaderMap::new();
        let value = HeaderValue::from_str(token)
            .map_err(|_| ApiError::bad_request("X-Auth-Token is not a valid header value"))?;
        headers.insert(TOKEN_HEADER, value);
        state.metrics.origin_requests.inc();
        match http.get_small(&url, &headers, 1 << 20).await {
            Ok(_) => {
                let mut granted = self.granted.lock().unwrap_or_else(|p| p.into_inner());
                if granted.len() >= SWEEP_AT {
                    granted.retain(|_, until| *until > now);
                }
                granted.insert(digest, now + state.config.auth_cache_ttl);
                Ok(())
            }
            Err(FetchError::Status { status: 401, .. }) => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "the upstream Glance does not accept this token",
            )),
            Err(FetchError::Status { status, .. }) => {
                tracing::debug!(status, "upstream did not grant the admin probe");
                Err(forbidden())
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot verify an admin token upstream");
                Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "cannot reach the upstream Glance to verify the token",
                ))
            }
        }
    }

    /// A client for quick upstream calls (no retries), built on first use.
    pub(crate) fn http(&self, state: &AppState) -> Result<&HttpSource, ApiError> {
        if let Some(h) = self.http.get() {
            return Ok(h);
        }
        // An auth check must answer quickly: no retries (the process's one client, its
        // connection pool shared).
        let built = state
            .fetcher
            .http_source()
            .map_err(|e| ApiError::internal(e.to_string()))?
            .without_retries();
        Ok(self.http.get_or_init(|| built))
    }
}

/// Equality whose time does not depend on where the inputs first differ.
pub(crate) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::ct_eq;

    #[test]
    fn constant_time_eq() {
        assert!(ct_eq(b"secret", b"secret"));
        assert!(!ct_eq(b"secret", b"secreT"));
        assert!(!ct_eq(b"secret", b"secret2"));
        assert!(!ct_eq(b"", b"x"));
    }
}
