//! All routes. What imgcache does not answer under `/v2/` is relayed to the upstream Glance
//! ([`crate::proxy`]); other unknown paths get a JSON 404; a known path of imgcache's own with
//! the wrong method gets axum's 405 with an `Allow` header. Every answer goes through
//! [`crate::observe`] (metrics and the access log).

use axum::Router;

use crate::state::AppState;

pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(crate::images::routes())
        .merge(crate::cache_api::routes())
        .merge(crate::peer::routes())
        .merge(crate::health::routes())
        .merge(crate::ui::routes())
        // The rest of Glance's v2 API goes upstream; anything else is a JSON 404.
        .fallback(crate::proxy::fallback)
        .layer(axum::middleware::map_response(request_id))
        // Outermost, so that it sees the answer as the client gets it (request id included).
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::observe::observe,
        ))
        .with_state(state)
}

/// Glance's clients log `X-Openstack-Request-Id`: every answer carries one, the upstream's
/// own on a relayed call, else a new `req-<uuid>` as Glance makes them.
async fn request_id(mut resp: axum::response::Response) -> axum::response::Response {
    if !resp.headers().contains_key(REQUEST_ID) {
        let id = format!("req-{}", uuid::Uuid::new_v4());
        if let Ok(v) = axum::http::HeaderValue::from_str(&id) {
            resp.headers_mut().insert(REQUEST_ID, v);
        }
    }
    resp
}

/// The request id header Glance and its clients use.
pub const REQUEST_ID: &str = "x-openstack-request-id";
