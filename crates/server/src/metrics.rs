//! Prometheus metrics (prometheus-client), rendered in the text exposition format on `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

pub struct Metrics {
    registry: Registry,
    pub hits: Counter,
    pub misses: Counter,
    pub bytes_from_cache: Counter,
    pub bytes_sendfile: Counter,
    pub bytes_from_origin: Counter,
    pub origin_requests: Counter,
    pub inflight_downloads: Gauge,
    pub cache_bytes: Gauge,
    pub cache_entries: Gauge,
    pub evictions: Counter,
    pub checksum_failures: Counter,
    /// Images the background scrubber re-hashed, and those that no longer matched.
    pub scrubbed: Counter,
    pub scrub_mismatches: Counter,
    /// Images the admission pipeline refused, by reason (unsafe_image, checksum, size, ...).
    pub refusals: Family<Refusal, Counter>,
    pub revalidations: Counter,
    pub revalidation_failures: Counter,
    /// Fleet mode: streams served to peers, and misses filled from a peer.
    pub peer_streams: Counter,
    pub peer_fills: Counter,
    pub request_seconds: Histogram,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("imgcache");
        let m = Metrics {
            hits: Counter::default(),
            misses: Counter::default(),
            bytes_from_cache: Counter::default(),
            bytes_sendfile: Counter::default(),
            bytes_from_origin: Counter::default(),
            origin_requests: Counter::default(),
            inflight_downloads: Gauge::default(),
            cache_bytes: Gauge::default(),
            cache_entries: Gauge::default(),
            evictions: Counter::default(),
            checksum_failures: Counter::default(),
            scrubbed: Counter::default(),
            scrub_mismatches: Counter::default(),
            refusals: Family::default(),
            revalidations: Counter::default(),
            revalidation_failures: Counter::default(),
            peer_streams: Counter::default(),
            peer_fills: Counter::default(),
            request_seconds: Histogram::new(exponential_buckets(0.0005, 4.0, 10)),
            registry: Registry::default(),
        };
        registry.register(
            "cache_hits",
            "Image requests served from the cache",
            m.hits.clone(),
        );
        registry.register(
            "cache_misses",
            "Image requests that needed the origin",
            m.misses.clone(),
        );
        registry.register(
            "served_from_cache_bytes",
            "Bytes sent from cached images",
            m.bytes_from_cache.clone(),
        );
        registry.register(
            "served_sendfile_bytes",
            "Bytes of cached images sent with sendfile (zero-copy; also in served_from_cache)",
            m.bytes_sendfile.clone(),
        );
        registry.register(
            "fetched_from_origin_bytes",
            "Bytes received from origins",
            m.bytes_from_origin.clone(),
        );
        registry.register(
            "revalidations",
            "Background checks of cached /v1/fetch images against their origin",
            m.revalidations.clone(),
        );
        registry.register(
            "revalidation_failures",
            "Background checks that failed (origin down, new download failed): the cached copy stays",
            m.revalidation_failures.clone(),
        );
        registry.register(
            "peer_streams",
            "Fleet mode: image streams served to other nodes",
            m.peer_streams.clone(),
        );
        registry.register(
            "peer_fills",
            "Fleet mode: misses filled from another node instead of the origin",
            m.peer_fills.clone(),
        );
        registry.register(
            "origin_requests",
            "Requests sent to origins",
            m.origin_requests.clone(),
        );
        registry.register(
            "inflight_downloads",
            "Origin downloads in progress",
            m.inflight_downloads.clone(),
        );
        registry.register(
            "cache_size_bytes",
            "Bytes of published images",
            m.cache_bytes.clone(),
        );
        registry.register("cache_entries", "Published images", m.cache_entries.clone());
        registry.register(
            "evictions",
            "Images evicted by the pruner or to make room for a download",
            m.evictions.clone(),
        );
        registry.register(
            "checksum_failures",
            "Downloads refused for a checksum mismatch",
            m.checksum_failures.clone(),
        );
        registry.register(
            "scrubbed_images",
            "Cached images the background scrubber re-hashed against their recorded checksum",
            m.scrubbed.clone(),
        );
        registry.register(
            "scrub_mismatches",
            "Cached images the scrubber found not matching their checksum (moved to invalid/)",
            m.scrub_mismatches.clone(),
        );
        registry.register(
            "refused_images",
            "Downloads the admission pipeline refused (nothing was published), by reason",
            m.refusals.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "HTTP request latency",
            m.request_seconds.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// Axum middleware feeding `request_seconds`: time from the request to its response head (for a
/// streamed image, its time to first byte).
pub async fn track_latency(
    axum::extract::State(state): axum::extract::State<crate::state::AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let start = std::time::Instant::now();
    let resp = next.run(req).await;
    state
        .metrics
        .request_seconds
        .observe(start.elapsed().as_secs_f64());
    resp
}

impl Metrics {
    /// Sets the cache gauges from the store (blocking: the entry count lists every record).
    pub fn refresh_cache_gauges(
        &self,
        cache: &imgcache_store::Cache,
    ) -> imgcache_store::Result<()> {
        let size = cache.get_cache_size()?;
        let entries = cache.get_cached_images()?.len();
        self.cache_bytes
            .set(i64::try_from(size).unwrap_or(i64::MAX));
        self.cache_entries
            .set(i64::try_from(entries).unwrap_or(i64::MAX));
        Ok(())
    }
}

/// The label of [`Metrics::refusals`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Refusal {
    pub reason: &'static str,
}

impl Metrics {
    /// Counts a failed download that was a verdict on the image (see
    /// [`imgcache_fetch::FetchError::refusal`]); every entrance's failures come here.
    pub fn count_refusal(&self, e: &imgcache_fetch::FetchError) {
        if let Some(reason) = e.refusal() {
            self.refusals.get_or_create(&Refusal { reason }).inc();
            if reason == "checksum" {
                self.checksum_failures.inc();
            }
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
