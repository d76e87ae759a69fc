//! Access control for cached Glance images: a client may read `/v2/images/{id}/file` only if
//! upstream Glance lets its `X-Auth-Token` see the image (`GET /v2/images/{id}` → 200).
//! Positive answers are reused for a short time; refusals (401/403/404) pass through with the
//! same status and are never cached, so a revoked grant takes effect on the next request.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use imgcache_fetch::error::FetchError;
use imgcache_fetch::source::glance::GlanceSource;
use imgcache_fetch::source::http::HttpSource;
use url::Url;
use uuid::Uuid;

use crate::error::ApiError;

/// An image upstream has data for only while it is `active`: a deactivated one is refused to
/// everyone as Glance refuses it to its users, and any other status is as good as gone.
pub struct Inactive(pub String);

impl From<Inactive> for ApiError {
    fn from(Inactive(status): Inactive) -> ApiError {
        if status == "deactivated" {
            ApiError::new(
                StatusCode::FORBIDDEN,
                "The requested image has been deactivated. Image data download is forbidden.",
            )
        } else {
            ApiError::not_found(format!("the image is {status} upstream"))
        }
    }
}

/// Why a token may not read an image.
pub enum Denied {
    /// Refused (401/403/404 upstream) or the upstream could not be asked: answer with it.
    Refused(ApiError),
    /// The image is no longer active upstream: evict it, then answer with the error.
    Inactive(Inactive),
}

impl From<ApiError> for Denied {
    fn from(e: ApiError) -> Denied {
        Denied::Refused(e)
    }
}

/// Entries kept at most; past this the map is emptied (a burst of distinct tokens cannot grow
/// memory without bound, and a cleared entry only costs one upstream request).
const MAX_ENTRIES: usize = 10_000;

pub struct UpstreamAuth {
    glance: Option<Url>,
    http: HttpSource,
    ttl: Duration,
    allowed: Mutex<HashMap<(String, Uuid), Instant>>,
}

impl UpstreamAuth {
    pub fn new(glance: Option<Url>, http: HttpSource, ttl: Duration) -> Self {
        UpstreamAuth {
            glance,
            http,
            ttl,
            allowed: Mutex::new(HashMap::new()),
        }
    }

    /// Forgets every grant to image `id` (it was deleted or deactivated upstream).
    pub fn forget(&self, id: &Uuid) {
        self.allowed
            .lock()
            .expect("poisoned")
            .retain(|(_, image), _| image != id);
    }

    /// Ok when `token` may see image `id` upstream and it is active; otherwise why not.
    pub async fn check(&self, token: Option<&str>, id: &Uuid) -> Result<(), Denied> {
        let Some(glance) = &self.glance else {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "no upstream Glance configured (--glance-url)",
            )
            .into());
        };
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            return Err(
                ApiError::new(StatusCode::UNAUTHORIZED, "an X-Auth-Token is required").into(),
            );
        };
        let entry = (token.to_string(), *id);
        if let Some(until) = self.allowed.lock().expect("poisoned").get(&entry)
            && *until > Instant::now()
        {
            return Ok(());
        }
        let src = GlanceSource::new(glance.clone(), Some(token.to_string()), self.http.clone());
        match src.image(id).await {
            Ok(image) if image.status != "active" => Err(Denied::Inactive(Inactive(image.status))),
            Ok(_) => {
                if !self.ttl.is_zero() {
                    let mut map = self.allowed.lock().expect("poisoned");
                    if map.len() >= MAX_ENTRIES {
                        map.clear();
                    }
                    map.insert(entry, Instant::now() + self.ttl);
                }
                Ok(())
            }
            Err(FetchError::Status { status, .. }) if matches!(status, 401 | 403 | 404) => {
                let status = StatusCode::from_u16(status).expect("valid status");
                Err(ApiError::new(
                    status,
                    format!("upstream Glance refused image {id}: {status}"),
                )
                .into())
            }
            Err(e) => {
                Err(ApiError::new(StatusCode::BAD_GATEWAY, format!("upstream Glance: {e}")).into())
            }
        }
    }
}
