//! All routes. Unknown paths get a JSON 404; a known path with the wrong method gets axum's
//! 405 with an `Allow` header.

use axum::Router;

use crate::error::ApiError;
use crate::state::AppState;

pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(crate::images::routes())
        .merge(crate::cache_api::routes())
        .merge(crate::health::routes())
        .fallback(|| async { ApiError::not_found("no such resource") })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::metrics::track_latency,
        ))
        .with_state(state)
}
