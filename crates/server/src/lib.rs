//! `imgcache serve`: serves images from the cache (one origin download per image, every
//! waiting client streamed while it runs), Glance's `/v2/cache` management API, background
//! prefetch/prune/clean, and Prometheus metrics.

pub mod auth;
pub mod cache_api;
pub mod config;
pub mod error;
pub mod health;
pub mod images;
pub mod metrics;
pub mod router;
pub mod state;
pub mod workers;

use std::future::Future;

pub use config::ServerConfig;
pub use error::ApiError;
pub use state::AppState;

/// Runs the server until `shutdown` resolves, then stops accepting and lets in-flight
/// requests finish (up to the configured grace period).
pub async fn run(
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let state = AppState::new(config)?;
    let listener = tokio::net::TcpListener::bind(state.config.listen).await?;
    tracing::info!(listen = %listener.local_addr()?, "serving");
    let workers = workers::spawn(state.clone());
    let app = router::router(state.clone());
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    workers.stop().await;
    Ok(())
}
