//! API errors: a status and a message, sent in OpenStack's JSON shape,
//! `{"error": {"code": N, "title": "...", "message": "..."}}` (keystonemiddleware's). Clients
//! read the `message` of each object in the body: python-glanceclient fails on a flat body
//! (`'int' object has no attribute 'get'`) instead of reporting the error.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": {
                "code": self.status.as_u16(),
                "title": self.status.canonical_reason().unwrap_or(""),
                "message": self.message,
            }
        });
        (self.status, Json(body)).into_response()
    }
}

impl From<imgcache_store::StoreError> for ApiError {
    fn from(e: imgcache_store::StoreError) -> Self {
        use imgcache_store::StoreError as E;
        match e {
            E::Key(k) => ApiError::bad_request(k.to_string()),
            E::NotCached(_) => ApiError::not_found(e.to_string()),
            // A file the store has no record of is not the cache's to delete or replace.
            E::NotOwned { .. } | E::ForeignFile { .. } => {
                ApiError::new(StatusCode::CONFLICT, e.to_string())
            }
            other => ApiError::internal(other.to_string()),
        }
    }
}
