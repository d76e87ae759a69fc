//! Shared state of the running server.

use std::sync::Arc;

use imgcache_store::Cache;
use tokio::sync::Notify;

use crate::config::ServerConfig;
use crate::metrics::Metrics;

#[derive(Clone)]
pub struct AppState {
    pub config: Arc<ServerConfig>,
    pub cache: Cache,
    pub metrics: Arc<Metrics>,
    /// Wakes the prefetcher when `PUT /v2/cache/{id}` queues an image.
    pub prefetch_wake: Arc<Notify>,
    /// Wakes the pruner early (after a download grew the cache).
    pub prune_wake: Arc<Notify>,
    /// Remembers which tokens upstream Glance granted the admin role.
    pub admin_auth: Arc<crate::auth::AdminAuth>,
}

impl AppState {
    pub fn new(config: ServerConfig) -> anyhow::Result<AppState> {
        let cache = Cache::open(&config.cache_dir, config.driver)?;
        Ok(AppState {
            config: Arc::new(config),
            cache,
            metrics: Arc::new(Metrics::new()),
            prefetch_wake: Arc::new(Notify::new()),
            prune_wake: Arc::new(Notify::new()),
            admin_auth: Arc::default(),
        })
    }
}
