//! Shared state of the running server.

use std::sync::Arc;

use imgcache_fetch::AllowList;
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
    /// Downloads in progress, one per key, followed by every client of that key.
    pub fills: Arc<crate::fill::Fills>,
    /// The sources (upstream Glance, http(s), file) misses are fetched from.
    pub fetcher: Arc<imgcache_fetch::ImageCache>,
    /// Which tokens upstream Glance lets see which images.
    pub upstream_auth: Arc<crate::upstream_auth::UpstreamAuth>,
    /// Background checks of `/v1/fetch` hits against their origin.
    pub revalidations: Arc<crate::revalidate::Revalidations>,
    /// `allow_href_prefixes`, parsed: what `/v1/fetch` hrefs, and every redirect their
    /// origins answer, must be under.
    pub allow: Arc<AllowList>,
    /// The last good copy of each Glance schema, for clients the upstream refuses them.
    pub schemas: Arc<crate::schemas::Schemas>,
    /// This node in its fleet (fleet mode only): the index of who holds what.
    pub fleet: Option<Arc<crate::fleet_node::FleetNode>>,
    /// Recent evictions and refusals, for the status page.
    pub events: Arc<crate::ui::events::Events>,
    /// Status-page logins: the cookie's session id to its token.
    pub sessions: Arc<crate::ui::session::Sessions>,
}

impl AppState {
    /// Tells the fleet index (fleet mode only) that this node no longer holds `keys`.
    pub async fn withdraw(&self, keys: impl IntoIterator<Item = String>) {
        if let Some(f) = &self.fleet {
            for k in keys {
                f.gone(&k).await;
            }
        }
    }

    pub fn new(config: ServerConfig) -> anyhow::Result<AppState> {
        let allow = Arc::new(AllowList::new(&config.allow_href_prefixes)?);
        // The fetch layer checks every redirect of an http(s) href against the same list.
        let sources = imgcache_fetch::SourceConfig {
            allow: Some(allow.clone()),
            ..config.sources.clone()
        };
        let cache = Cache::open(&config.cache_dir, config.driver)?;
        let fetcher = imgcache_fetch::ImageCache::new(
            imgcache_store::CacheSpec {
                name: "serve".into(),
                cache: cache.clone(),
                max_size: config.max_size,
                ttl: std::time::Duration::MAX,
                priority: imgcache_store::registry::PRIORITY_INSTANCE,
            },
            &sources,
        )?
        // A caching server hands out the bytes its origin sent: no zstd decompression (clients
        // following a download read the file as it is written), and the permitted formats are
        // the configured ones (by default all: Glance accepted them); unsafe images (backing
        // files, extents naming host files, ...) are refused whatever they say.
        .with_images(imgcache_fetch::pipeline::ImageOptions {
            policy: imgcache_fetch::formats::Policy {
                permitted: config.permitted_formats.clone(),
            },
            zstd: false,
            ..Default::default()
        })
        // The max size is a hard limit: room is reserved before a download writes.
        .with_room(imgcache_fetch::RoomPolicy::HardLimit(config.max_size));
        let upstream_auth = crate::upstream_auth::UpstreamAuth::new(
            config.sources.glance_url.clone(),
            fetcher.http_source()?,
            config.auth_cache_ttl,
        );
        let schemas = Arc::new(crate::schemas::Schemas::new(&config.cache_dir));
        let metrics = Metrics::new();
        metrics
            .cache_max_bytes
            .set(i64::try_from(config.max_size).unwrap_or(i64::MAX));
        Ok(AppState {
            fills: Arc::new(crate::fill::Fills::new(
                cache.clone(),
                config.sources.http.read_timeout,
            )),
            config: Arc::new(config),
            cache,
            metrics: Arc::new(metrics),
            prefetch_wake: Arc::new(Notify::new()),
            prune_wake: Arc::new(Notify::new()),
            admin_auth: Arc::default(),
            fetcher: Arc::new(fetcher),
            upstream_auth: Arc::new(upstream_auth),
            revalidations: Arc::default(),
            allow,
            schemas,
            fleet: None,
            events: Arc::default(),
            sessions: Arc::default(),
        })
    }
}
