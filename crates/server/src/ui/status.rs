//! The JSON model of `/ui/status.json`, built from what the server already keeps: the
//! metrics counters, the store's records and queue (metadata only: no image file is read),
//! the running flights with their [`super::progress::Progress`], the event ring and, in fleet
//! mode, the fleet index.

use std::time::Duration;

use imgcache_fetch::ImageMeta;
use imgcache_store::{Phase, Record, off_thread};
use serde::Serialize;
use uuid::Uuid;

use super::events::Event;
use crate::error::ApiError;
use crate::state::AppState;

/// Images listed as most recently used, and as largest.
pub const TOP: usize = 10;
/// Queued images listed (the count is always whole).
pub const QUEUE_SHOWN: usize = 50;
/// Longest the fleet index may take to answer the page.
const FLEET_BUDGET: Duration = Duration::from_secs(2);

#[derive(Debug, Serialize)]
pub struct Status {
    pub version: &'static str,
    pub cache: CacheSize,
    pub traffic: Traffic,
    pub downloads: Vec<Download>,
    pub queue: Queue,
    pub recent: Vec<Image>,
    pub largest: Vec<Image>,
    pub events: Vec<Event>,
    /// `null` unless fleet mode is on.
    pub fleet: Option<FleetView>,
}

#[derive(Debug, Serialize)]
pub struct CacheSize {
    pub bytes: u64,
    pub entries: usize,
    pub max_bytes: u64,
    /// `bytes / max_bytes`, 0 for an unbounded cache.
    pub used_ratio: f64,
}

#[derive(Debug, Serialize)]
pub struct Traffic {
    pub hits: u64,
    pub misses: u64,
    /// `hits / (hits + misses)`; `null` before the first image request.
    pub hit_ratio: Option<f64>,
    pub bytes_from_cache: u64,
    pub bytes_from_origin: u64,
    pub origin_requests: u64,
    pub peer_fills: u64,
    pub evictions: u64,
}

#[derive(Debug, Serialize)]
pub struct Download {
    pub key: String,
    #[serde(flatten)]
    pub name: Name,
    /// `origin`, `peer` (see `peer`) or `another process` (a writer sharing the cache dir).
    pub source: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// `starting`, `streaming` or `verified` (being published).
    pub phase: &'static str,
    pub bytes: u64,
    /// The size the origin announced, when it did.
    pub total: Option<u64>,
    pub percent: Option<f64>,
    /// Bytes per second.
    pub rate: f64,
    pub eta_seconds: Option<f64>,
    pub elapsed_seconds: f64,
    /// Clients streaming the download now: the one whose request started it included, and
    /// peers of the fleet (a prefetch has none of its own).
    pub clients: usize,
}

/// How an image is named on the page: the href it came from, or its Glance image id.
#[derive(Debug, Default, Serialize)]
pub struct Name {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub href: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub glance_id: Option<String>,
}

impl Name {
    /// From the href as the client gave it (a bare id or `glance://id` is a Glance image)
    /// or, with none, from the key (Glance images are keyed by their id).
    pub fn of(href: Option<&str>, key: &str) -> Name {
        let glance = |s: &str| {
            Uuid::parse_str(s.strip_prefix("glance://").unwrap_or(s))
                .ok()
                .map(|u| u.hyphenated().to_string())
        };
        match href {
            Some(h) => match glance(h) {
                Some(id) => Name {
                    href: None,
                    glance_id: Some(id),
                },
                None => Name {
                    href: Some(redact(h)),
                    glance_id: None,
                },
            },
            None => Name {
                href: None,
                glance_id: glance(key),
            },
        }
    }
}

/// An href without the password of its userinfo, if it has one.
fn redact(href: &str) -> String {
    match url::Url::parse(href) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => href.to_string(),
    }
}

#[derive(Debug, Serialize)]
pub struct Queue {
    pub length: usize,
    /// The first [`QUEUE_SHOWN`] queued Glance image ids, oldest first.
    pub images: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Image {
    pub key: String,
    #[serde(flatten)]
    pub name: Name,
    pub size: u64,
    pub hits: u64,
    /// Seconds since the epoch.
    pub last_accessed: f64,
}

impl Image {
    fn of(r: &Record) -> Image {
        let href = ImageMeta::from_props(&r.props).href;
        Image {
            name: Name::of(href.as_deref(), &r.image_id),
            key: r.image_id.clone(),
            size: r.size,
            hits: r.hits,
            last_accessed: r.last_accessed,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct FleetView {
    /// This node's URL.
    pub node: String,
    pub nodes: Vec<FleetNodeView>,
    /// Why `nodes` is empty, when the index did not answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct FleetNodeView {
    pub url: String,
    pub heartbeat_age: f64,
    pub published: u64,
    pub filling: u64,
    pub published_bytes: u64,
}

/// The status now.
pub async fn build(state: &AppState) -> Result<Status, ApiError> {
    let cache = state.cache.clone();
    let (size, records, queued) = off_thread(move || {
        Ok::<_, imgcache_store::StoreError>((
            cache.get_cache_size()?,
            cache.get_cached_images()?,
            cache.get_queued_images()?,
        ))
    })
    .await?;
    let max = state.config.max_size;
    let m = &state.metrics;
    let (hits, misses) = (m.hits.get(), m.misses.get());
    let mut by_use: Vec<&Record> = records.iter().collect();
    by_use.sort_by(|a, b| b.last_accessed.total_cmp(&a.last_accessed));
    let mut by_size: Vec<&Record> = records.iter().collect();
    by_size.sort_by(|a, b| b.size.cmp(&a.size).then(a.image_id.cmp(&b.image_id)));
    let fleet = match &state.fleet {
        None => None,
        Some(f) => Some(fleet_view(f).await),
    };
    Ok(Status {
        version: env!("CARGO_PKG_VERSION"),
        cache: CacheSize {
            bytes: size,
            entries: records.len(),
            max_bytes: max,
            used_ratio: if max == 0 || max == u64::MAX {
                0.0
            } else {
                size as f64 / max as f64
            },
        },
        traffic: Traffic {
            hits,
            misses,
            hit_ratio: (hits + misses > 0).then(|| hits as f64 / (hits + misses) as f64),
            bytes_from_cache: m.bytes_from_cache.get(),
            bytes_from_origin: m.bytes_from_origin.get(),
            origin_requests: m.origin_requests.get(),
            peer_fills: m.peer_fills.get(),
            evictions: m.evictions.get(),
        },
        downloads: downloads(state),
        queue: Queue {
            length: queued.len(),
            images: queued.into_iter().take(QUEUE_SHOWN).collect(),
        },
        recent: by_use.iter().take(TOP).map(|r| Image::of(r)).collect(),
        largest: by_size.iter().take(TOP).map(|r| Image::of(r)).collect(),
        events: state.events.recent(),
        fleet,
    })
}

/// The running flights, longest-running first.
fn downloads(state: &AppState) -> Vec<Download> {
    let mut out: Vec<Download> = state
        .fills
        .flights()
        .iter()
        .filter_map(|f| {
            let phase = f.phase();
            let p = &f.extra().progress;
            let total = f.info().and_then(|i| i.size);
            let written = f.written().load(std::sync::atomic::Ordering::Acquire);
            let (phase, bytes, total) = match phase {
                Phase::Starting => ("starting", 0, None),
                Phase::Streaming { .. } => ("streaming", written, total),
                Phase::Verified { size } => ("verified", size, Some(size)),
                Phase::Ended(_) => return None,
            };
            let rate = p.rate(bytes);
            let (source, peer) = p.source();
            let key = f.key().to_string();
            Some(Download {
                name: Name::of(p.origin().as_deref(), &key),
                key,
                source,
                peer,
                phase,
                bytes,
                total,
                percent: total
                    .filter(|t| *t > 0)
                    .map(|t| (bytes as f64 * 100.0 / t as f64).min(100.0)),
                rate,
                eta_seconds: total
                    .filter(|_| rate > 0.0)
                    .map(|t| t.saturating_sub(bytes) as f64 / rate),
                elapsed_seconds: p.elapsed().as_secs_f64(),
                clients: f.watchers(),
            })
        })
        .collect();
    out.sort_by(|a, b| b.elapsed_seconds.total_cmp(&a.elapsed_seconds));
    out
}

async fn fleet_view(f: &crate::fleet_node::FleetNode) -> FleetView {
    let node = f.fleet.node_url().to_string();
    match tokio::time::timeout(FLEET_BUDGET, f.fleet.node_holdings()).await {
        Ok(Ok(nodes)) => FleetView {
            node,
            nodes: nodes
                .into_iter()
                .map(|n| FleetNodeView {
                    url: n.node.url,
                    heartbeat_age: n.node.heartbeat_age,
                    published: n.published,
                    filling: n.filling,
                    published_bytes: n.published_bytes,
                })
                .collect(),
            error: None,
        },
        Ok(Err(e)) => FleetView {
            node,
            nodes: Vec::new(),
            error: Some(e.to_string()),
        },
        Err(_) => FleetView {
            node,
            nodes: Vec::new(),
            error: Some("the fleet index did not answer in time".into()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_glance_ids_or_redacted_hrefs() {
        let id = "0b1f6a5e-58c4-4a57-9a51-4c6c8b0b7a41";
        let n = Name::of(Some(id), "k");
        assert_eq!(n.glance_id.as_deref(), Some(id));
        assert!(n.href.is_none());
        let n = Name::of(Some(&format!("glance://{id}")), "k");
        assert_eq!(n.glance_id.as_deref(), Some(id));
        let n = Name::of(None, id);
        assert_eq!(n.glance_id.as_deref(), Some(id));
        let n = Name::of(Some("https://u:pw@example.com/a.img"), "k");
        assert_eq!(n.href.as_deref(), Some("https://u:***@example.com/a.img"));
        let n = Name::of(Some("https://example.com/a.img?x=1"), "k");
        assert_eq!(n.href.as_deref(), Some("https://example.com/a.img?x=1"));
    }
}
