//! Prometheus metrics (prometheus-client), served on `/metrics` in the format the scraper
//! asks for ([`Format::negotiate`]): OpenMetrics 1.0.0 to a Prometheus that accepts it, the
//! classic text format 0.0.4 to everyone else (`curl`, `promtool check metrics`). The two
//! differ in how a counter's family is named (`imgcache_cache_hits` in OpenMetrics, whose
//! samples add `_total`; `imgcache_cache_hits_total` in 0.0.4) and in the `# EOF` line: each
//! rendering is the library's own encoder for that format, never one passed off as the other.
//!
//! Besides the counters and gauges the server keeps, a scrape reports the process
//! ([`crate::process`]: `process_*`) and `imgcache_build_info{version}`. Requests are
//! counted and timed by [`crate::observe`], to the last byte of their body.

use std::borrow::Cow;

use axum::http::HeaderValue;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::{prometheus_text, text};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

/// Upper bounds of the request latency buckets, in seconds: from a warm hit's headers
/// (about a millisecond) to a multi-GiB image streamed for ten minutes.
pub const LATENCY_BUCKETS: [f64; 17] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
    600.0,
];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// Upper bounds of the fleet source-choice buckets, in seconds: fine around the 2 ms a miss
/// may spend in the fleet index, coarse up to a wait for another node's lease.
pub const FLEET_SOURCE_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0,
];

fn fleet_source_histogram() -> Histogram {
    Histogram::new(FLEET_SOURCE_BUCKETS)
}

/// The label of [`Metrics::fleet_source_seconds`]: where the miss's bytes come from.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    pub source: &'static str,
}

/// The labels of a request's count and latency. Every value comes from a bounded set: the
/// route is the router's template (`/v2/images/{image_id}/file`), never the path a client
/// sent; the method one of the standard ones (else `other`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: Cow<'static, str>,
    pub method: &'static str,
    pub status: u16,
}

pub struct Metrics {
    registry: Registry,
    pub hits: Counter,
    pub misses: Counter,
    pub bytes_from_cache: Counter,
    pub bytes_sendfile: Counter,
    pub bytes_from_origin: Counter,
    pub origin_requests: Counter,
    /// Origin requests that failed: unreachable, a 5xx or 429 answer, or a body that broke.
    pub origin_errors: Counter,
    pub inflight_downloads: Gauge,
    pub cache_bytes: Gauge,
    pub cache_entries: Gauge,
    /// The configured hard limit (`max_size`).
    pub cache_max_bytes: Gauge,
    /// The cache directory's file system: its size and the bytes still available to us.
    pub fs_size_bytes: Gauge,
    pub fs_avail_bytes: Gauge,
    /// Images queued for prefetching (`queue/`).
    pub prefetch_queue: Gauge,
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
    /// Fleet mode: how long a miss took to choose its source (see its registration).
    pub fleet_source_seconds: Family<SourceLabel, Histogram>,
    /// Finished requests, and their time from arrival to the last byte of the body.
    pub requests: Family<RequestLabels, Counter>,
    pub request_seconds: Family<RequestLabels, Histogram>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut m = Metrics {
            hits: Counter::default(),
            misses: Counter::default(),
            bytes_from_cache: Counter::default(),
            bytes_sendfile: Counter::default(),
            bytes_from_origin: Counter::default(),
            origin_requests: Counter::default(),
            origin_errors: Counter::default(),
            inflight_downloads: Gauge::default(),
            cache_bytes: Gauge::default(),
            cache_entries: Gauge::default(),
            cache_max_bytes: Gauge::default(),
            fs_size_bytes: Gauge::default(),
            fs_avail_bytes: Gauge::default(),
            prefetch_queue: Gauge::default(),
            evictions: Counter::default(),
            checksum_failures: Counter::default(),
            scrubbed: Counter::default(),
            scrub_mismatches: Counter::default(),
            refusals: Family::default(),
            revalidations: Counter::default(),
            revalidation_failures: Counter::default(),
            peer_streams: Counter::default(),
            peer_fills: Counter::default(),
            fleet_source_seconds: Family::new_with_constructor(fleet_source_histogram),
            requests: Family::default(),
            request_seconds: Family::new_with_constructor(latency_histogram),
            registry: Registry::default(),
        };
        // `process_*` are unprefixed, as every exporter names them.
        m.registry
            .register_collector(Box::new(crate::process::ProcessCollector));
        let r = m.registry.sub_registry_with_prefix("imgcache");
        r.register(
            "build",
            "The running imgcache: its version",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        r.register(
            "cache_hits",
            "Image requests served from the cache",
            m.hits.clone(),
        );
        r.register(
            "cache_misses",
            "Image requests that needed the origin",
            m.misses.clone(),
        );
        r.register(
            "served_from_cache_bytes",
            "Bytes sent from cached images",
            m.bytes_from_cache.clone(),
        );
        r.register(
            "served_sendfile_bytes",
            "Bytes of cached images sent with sendfile (zero-copy; also in served_from_cache)",
            m.bytes_sendfile.clone(),
        );
        r.register(
            "fetched_from_origin_bytes",
            "Bytes received from origins",
            m.bytes_from_origin.clone(),
        );
        r.register(
            "revalidations",
            "Background checks of cached /v1/fetch images against their origin",
            m.revalidations.clone(),
        );
        r.register(
            "revalidation_failures",
            "Background checks that failed (origin down, new download failed): the cached copy stays",
            m.revalidation_failures.clone(),
        );
        r.register(
            "peer_streams",
            "Fleet mode: image streams served to other nodes",
            m.peer_streams.clone(),
        );
        r.register(
            "peer_fills",
            "Fleet mode: misses filled from another node instead of the origin",
            m.peer_fills.clone(),
        );
        r.register(
            "fleet_source_seconds",
            "Fleet mode: time a miss took to choose its source before its first byte (the index's lookups; for a peer, its answer's headers too; plus any wait for another node's origin lease)",
            m.fleet_source_seconds.clone(),
        );
        r.register(
            "origin_requests",
            "Requests sent to origins",
            m.origin_requests.clone(),
        );
        r.register(
            "origin_errors",
            "Origin requests that failed: unreachable, a 5xx or 429 answer, or a body cut short",
            m.origin_errors.clone(),
        );
        r.register(
            "inflight_downloads",
            "Origin downloads in progress",
            m.inflight_downloads.clone(),
        );
        r.register(
            "cache_size_bytes",
            "Bytes of published images",
            m.cache_bytes.clone(),
        );
        r.register(
            "cache_max_bytes",
            "The cache's configured hard limit (max_size)",
            m.cache_max_bytes.clone(),
        );
        r.register(
            "filesystem_size_bytes",
            "Size of the file system holding the cache directory",
            m.fs_size_bytes.clone(),
        );
        r.register(
            "filesystem_avail_bytes",
            "Bytes still available to imgcache on the file system holding the cache directory",
            m.fs_avail_bytes.clone(),
        );
        r.register("cache_entries", "Published images", m.cache_entries.clone());
        r.register(
            "prefetch_queue_length",
            "Images queued for prefetching",
            m.prefetch_queue.clone(),
        );
        r.register(
            "evictions",
            "Images evicted by the pruner or to make room for a download",
            m.evictions.clone(),
        );
        r.register(
            "checksum_failures",
            "Downloads refused for a checksum mismatch",
            m.checksum_failures.clone(),
        );
        r.register(
            "scrubbed_images",
            "Cached images the background scrubber re-hashed against their recorded checksum",
            m.scrubbed.clone(),
        );
        r.register(
            "scrub_mismatches",
            "Cached images the scrubber found not matching their checksum (moved to invalid/)",
            m.scrub_mismatches.clone(),
        );
        r.register(
            "refused_images",
            "Downloads the admission pipeline refused (nothing was published), by reason",
            m.refusals.clone(),
        );
        r.register(
            "requests",
            "HTTP requests answered, by route template, method and status (counted at the \
             body's end)",
            m.requests.clone(),
        );
        r.register(
            "request_duration_seconds",
            "HTTP request latency from arrival to the last byte of the body, by route \
             template, method and status",
            m.request_seconds.clone(),
        );
        m
    }

    /// The registry rendered in `format`.
    pub fn render(&self, format: Format) -> String {
        let mut out = String::new();
        let res = match format {
            Format::OpenMetrics => text::encode(&mut out, &self.registry),
            Format::Text004 => prometheus_text::encode(&mut out, &self.registry),
        };
        res.expect("writing to a String cannot fail");
        out
    }

    /// Counts one finished request.
    pub fn observe_request(&self, labels: &RequestLabels, seconds: f64) {
        self.requests.get_or_create(labels).inc();
        self.request_seconds.get_or_create(labels).observe(seconds);
    }
}

/// The exposition formats `/metrics` speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `application/openmetrics-text; version=1.0.0`, what Prometheus asks for first.
    OpenMetrics,
    /// `text/plain; version=0.0.4`, the classic format every tool reads.
    Text004,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Text004 => prometheus_text::CONTENT_TYPE,
        }
    }

    /// The format an `Accept` header prefers (RFC 9110 §12.5.1 quality values): OpenMetrics
    /// when it is accepted (version 1.0.0, 0.0.1 or unnamed) with a quality at least that of
    /// `text/plain`; 0.0.4 otherwise, including for no header or `*/*`.
    pub fn negotiate(accept: Option<&HeaderValue>) -> Format {
        let Some(accept) = accept.and_then(|v| v.to_str().ok()) else {
            return Format::Text004;
        };
        let (mut om, mut plain) = (0.0f32, 0.0f32);
        for range in accept.split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or_default().to_ascii_lowercase();
            let (mut q, mut version) = (1.0f32, None);
            for p in parts {
                let Some((k, v)) = p.split_once('=') else {
                    continue;
                };
                match k.trim().to_ascii_lowercase().as_str() {
                    "q" => q = v.trim().parse().unwrap_or(0.0),
                    "version" => version = Some(v.trim().trim_matches('"').to_string()),
                    _ => {}
                }
            }
            match media.as_str() {
                "application/openmetrics-text"
                    if matches!(version.as_deref(), None | Some("1.0.0" | "0.0.1")) =>
                {
                    om = om.max(q)
                }
                "text/plain" if matches!(version.as_deref(), None | Some("0.0.4")) => {
                    plain = plain.max(q)
                }
                "text/*" | "*/*" => plain = plain.max(q),
                _ => {}
            }
        }
        if om > 0.0 && om >= plain {
            Format::OpenMetrics
        } else {
            Format::Text004
        }
    }
}

impl Metrics {
    /// Sets the cache gauges from the store (blocking: the entry count lists every record).
    pub fn refresh_cache_gauges(
        &self,
        cache: &imgcache_store::Cache,
    ) -> imgcache_store::Result<()> {
        let size = cache.get_cache_size()?;
        let entries = cache.get_cached_images()?.len();
        self.cache_bytes.set(clamp(size));
        self.cache_entries.set(clamp(entries as u64));
        Ok(())
    }

    /// What a scrape reads fresh (blocking, and cheap: a running total, one directory
    /// listing, one statvfs): the cache's size, the prefetch queue and the file system.
    pub fn refresh_scrape_gauges(&self, cache: &imgcache_store::Cache) {
        if let Ok(size) = cache.get_cache_size() {
            self.cache_bytes.set(clamp(size));
        }
        if let Ok(queued) = cache.get_queued_images() {
            self.prefetch_queue.set(clamp(queued.len() as u64));
        }
        if let Ok(fs) = rustix::fs::statvfs(cache.root()) {
            let frag = fs.f_frsize.max(1);
            self.fs_size_bytes
                .set(clamp(fs.f_blocks.saturating_mul(frag)));
            self.fs_avail_bytes
                .set(clamp(fs.f_bavail.saturating_mul(frag)));
        }
    }
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
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

    /// Counts an origin request that failed for the origin's sake: unreachable, an answer
    /// of 5xx or 429, or a body cut short. A 4xx is the client's (an unknown image, a token
    /// refused) and a refusal of the image is counted in `refused_images`.
    pub fn count_origin_error(&self, e: &imgcache_fetch::FetchError) {
        use imgcache_fetch::FetchError as E;
        let origin_failed = match e {
            E::Origin { .. } | E::Truncated { .. } | E::Restart { .. } => true,
            E::Status { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        };
        if origin_failed {
            self.origin_errors.inc();
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn negotiate(accept: &str) -> Format {
        Format::negotiate(Some(&HeaderValue::from_str(accept).unwrap()))
    }

    #[test]
    fn content_negotiation() {
        assert_eq!(Format::negotiate(None), Format::Text004);
        assert_eq!(negotiate("*/*"), Format::Text004);
        assert_eq!(negotiate("text/plain"), Format::Text004);
        // What Prometheus 2.x and 3.x send.
        assert_eq!(
            negotiate(
                "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                 version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
            ),
            Format::OpenMetrics
        );
        assert_eq!(
            negotiate("application/openmetrics-text; version=0.0.1; q=0.75, text/plain; q=0.9"),
            Format::Text004
        );
        assert_eq!(
            negotiate("application/openmetrics-text;version=2.0.0"),
            Format::Text004
        );
        assert_eq!(
            negotiate("application/openmetrics-text;q=0"),
            Format::Text004
        );
    }

    #[test]
    fn each_format_names_counters_its_way() {
        let m = Metrics::new();
        m.hits.inc();
        let om = m.render(Format::OpenMetrics);
        assert!(om.contains("# TYPE imgcache_cache_hits counter\n"), "{om}");
        assert!(om.contains("\nimgcache_cache_hits_total 1\n"), "{om}");
        assert!(om.ends_with("# EOF\n"), "{om}");
        let text = m.render(Format::Text004);
        assert!(
            text.contains("# TYPE imgcache_cache_hits_total counter\n"),
            "{text}"
        );
        assert!(text.contains("\nimgcache_cache_hits_total 1\n"), "{text}");
        assert!(!text.contains("# EOF"), "{text}");
        assert!(text.contains("imgcache_build_info{version=\""), "{text}");
        assert!(text.contains("\nprocess_resident_memory_bytes "), "{text}");
    }
}
