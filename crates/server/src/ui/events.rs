//! Recent evictions and refusals, for the status page: a ring of the last [`KEEP`], fed from
//! where they are counted (the fill's admission result and `evicted` hook, and the pruner).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// Events kept; older ones are dropped.
pub const KEEP: usize = 50;

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Event {
    /// Seconds since the epoch.
    pub at: f64,
    /// `eviction` or `refusal`.
    pub kind: &'static str,
    pub key: String,
    /// The href as the client gave it (refusals only: an evicted record is gone).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub href: Option<String>,
    /// For a refusal, its metric label (`unsafe_image`, `checksum`, ...); for an eviction,
    /// what made room.
    pub reason: String,
    /// The full error of a refusal.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

#[derive(Debug, Default)]
pub struct Events {
    ring: Mutex<VecDeque<Event>>,
}

impl Events {
    fn push(&self, e: Event) {
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        if ring.len() >= KEEP {
            ring.pop_front();
        }
        ring.push_back(e);
    }

    /// A failed download: kept when it was a verdict on the image (see
    /// [`imgcache_fetch::FetchError::refusal`]), as `Metrics::count_refusal` counts it.
    pub fn refused(&self, key: &str, href: &str, e: &imgcache_fetch::FetchError) {
        if let Some(reason) = e.refusal() {
            self.push(Event {
                at: now(),
                kind: "refusal",
                key: key.to_string(),
                href: Some(href.to_string()),
                reason: reason.to_string(),
                detail: Some(e.to_string()),
                size: None,
            });
        }
    }

    /// Images evicted (key, size), and why.
    pub fn evicted(&self, gone: &[(String, u64)], reason: &str) {
        for (key, size) in gone {
            self.push(Event {
                at: now(),
                kind: "eviction",
                key: key.clone(),
                href: None,
                reason: reason.to_string(),
                detail: None,
                size: Some(*size),
            });
        }
    }

    /// Newest first.
    pub fn recent(&self) -> Vec<Event> {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        ring.iter().rev().cloned().collect()
    }
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_newest_first_and_is_bounded() {
        let ev = Events::default();
        let gone: Vec<(String, u64)> = (0..KEEP + 7).map(|i| (format!("k{i}"), i as u64)).collect();
        ev.evicted(&gone, "pruned");
        let recent = ev.recent();
        assert_eq!(recent.len(), KEEP);
        assert_eq!(recent[0].key, format!("k{}", KEEP + 6));
        assert_eq!(recent[KEEP - 1].key, "k7");
        assert!(
            recent
                .iter()
                .all(|e| e.kind == "eviction" && e.reason == "pruned")
        );
    }
}
