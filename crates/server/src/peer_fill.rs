//! Where a miss's bytes come from in fleet mode: one origin download per image per fleet.
//!
//! Asked once the key's local permit is held (so this node runs one fill per key), the
//! fleet index says who holds or is filling the image:
//! - a holder (published first, then the fillers furthest along) answers on its peer
//!   endpoint: its bytes go through the admission pipeline like an origin's, verified against
//!   the whole image's checksum (Glance's, or the one the holder records). A holder that does
//!   not answer within [`PEER_CONNECT`], is busy (its fan-out is full) or is marked suspect (it
//!   sent a bad image lately) is skipped for the next;
//! - nobody: this node takes the fleet's lease on the key (fenced by its generation), renews it
//!   while it downloads, and releases it when done;
//! - another node holds the lease but has not announced its fill yet: the index is asked again
//!   shortly, for at most two lease TTLs, then the origin is used (the lease's holder is taken
//!   to be stuck; said in the log).
//!
//! A database that does not answer makes the miss go to the origin, with this node's own
//! coalescing only.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue};
use imgcache_fetch::Href;
use imgcache_fetch::source::{OriginMeta, Response};
use imgcache_fleet::{Holding, HoldingState, Lease};
use imgcache_store::{Integrity, Key};

use crate::fill::Origin;
use crate::fleet_node::FleetNode;
use crate::peer::TOKEN_HEADER;
use crate::state::AppState;

/// Longest a holder may take to answer before the next source is tried.
pub const PEER_CONNECT: Duration = Duration::from_secs(1);
/// How long a holder that sent a bad image is skipped.
const SUSPECT_FOR: Duration = Duration::from_secs(600);

pub enum Source {
    /// A peer's answer, to admit against `checksum`.
    Peer {
        response: Box<Response>,
        checksum: Integrity,
        node: String,
    },
    /// The origin; with the fleet's lease when fleet mode is on and the index answered.
    Origin(Option<LeaseGuard>),
}

/// Holders that sent a bad image, until when they are skipped.
#[derive(Default)]
pub struct Suspects(Mutex<HashMap<String, Instant>>);

impl Suspects {
    pub fn mark(&self, node: &str) {
        tracing::warn!(node, "peer sent a bad image: skipped for a while");
        self.0
            .lock()
            .expect("poisoned")
            .insert(node.to_string(), Instant::now() + SUSPECT_FOR);
    }

    fn is_suspect(&self, node: &str) -> bool {
        let mut m = self.0.lock().expect("poisoned");
        m.retain(|_, until| *until > Instant::now());
        m.contains_key(node)
    }
}

/// The source of `key`'s miss (see the module docs).
pub async fn source(state: &AppState, key: &Key, origin: &Origin) -> Source {
    let Some(node) = state.fleet.clone() else {
        return Source::Origin(None);
    };
    let wait_until = Instant::now() + node.settings.index.lease_ttl * 2;
    // What the origin vouches for (a Glance image's record), asked once if a peer is tried.
    let mut vouched: Option<Option<OriginMeta>> = None;
    loop {
        for h in node.holders(key.as_str()).await {
            if node.suspects.is_suspect(&h.node) {
                continue;
            }
            if vouched.is_none() {
                vouched = Some(match &origin.href {
                    Href::Glance(_) => state
                        .fetcher
                        .origin_head(&origin.href, origin.glance_token.clone())
                        .await
                        .ok(),
                    _ => None,
                });
            }
            if let Some(src) = try_peer(state, &node, &h, key, vouched.clone().flatten()).await {
                return src;
            }
        }
        match node.fleet.take_lease(key.as_str()).await {
            Ok(Some(lease)) => return Source::Origin(Some(LeaseGuard::new(node, lease))),
            Ok(None) if Instant::now() < wait_until => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(None) => {
                tracing::warn!(%key, "another node holds the origin lease but shows no fill: downloading here");
                return Source::Origin(None);
            }
            Err(e) => {
                tracing::warn!(%key, error = %e, "fleet index unavailable: downloading from the origin");
                return Source::Origin(None);
            }
        }
    }
}

/// Asks one holder; `None` to try the next source.
async fn try_peer(
    state: &AppState,
    node: &FleetNode,
    h: &Holding,
    key: &Key,
    vouched: Option<OriginMeta>,
) -> Option<Source> {
    // The whole image is verified on every peer fill: by what the origin vouches for, else
    // by the checksum the holder recorded when it published (a filler has none to give).
    let checksum = vouched
        .as_ref()
        .and_then(|m| m.checksum.clone())
        .or_else(|| match h.state {
            HoldingState::Published => h.checksum.as_deref().and_then(|c| c.parse().ok()),
            HoldingState::Filling => None,
        })?;
    let url = url::Url::parse(&format!(
        "{}/v1/peer/images/{key}",
        h.node.trim_end_matches('/')
    ))
    .ok()?;
    let mut headers = HeaderMap::new();
    headers.insert(
        TOKEN_HEADER,
        HeaderValue::from_str(&node.settings.token).ok()?,
    );
    let http = state.fetcher.http_source().ok()?.without_retries();
    let asked = tokio::time::timeout(PEER_CONNECT, http.get(&url, None, &headers)).await;
    let response = match asked {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            tracing::debug!(peer = h.node, error = %e, "peer cannot serve");
            return None;
        }
        Err(_) => {
            tracing::debug!(peer = h.node, "peer did not answer in time");
            return None;
        }
    };
    let Response::Body { meta, body } = response else {
        return None;
    };
    // The image as its origin describes it (validators, md5, format), so the record here says
    // what the holder's says; the bytes are the peer's.
    let meta = match vouched {
        Some(v) => OriginMeta {
            size: v.size.or(meta.size),
            ..v
        },
        None => OriginMeta {
            checksum: None,
            ..meta
        },
    };
    tracing::info!(%key, peer = h.node, state = ?h.state, "filling from a peer");
    Some(Source::Peer {
        response: Box::new(Response::Body { meta, body }),
        checksum,
        node: h.node.clone(),
    })
}

/// The fleet's origin lease on a key, renewed while the download runs and released when
/// dropped.
pub struct LeaseGuard {
    node: Arc<FleetNode>,
    lease: Lease,
    renew: tokio::task::JoinHandle<()>,
}

impl LeaseGuard {
    fn new(node: Arc<FleetNode>, lease: Lease) -> LeaseGuard {
        let every = node.settings.index.lease_ttl / 3;
        let (n, l) = (node.clone(), lease.clone());
        let renew = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = n.fleet.renew(&l).await {
                    // Lost (fenced by a newer generation) or the database is away: the
                    // download goes on (its bytes are verified all the same); another node
                    // may start its own once the lease expires.
                    tracing::warn!(key = l.key, error = %e, "cannot renew the origin lease");
                    if matches!(e, imgcache_fleet::FleetError::LeaseLost { .. }) {
                        return;
                    }
                }
            }
        });
        LeaseGuard { node, lease, renew }
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        self.renew.abort();
        let (n, l) = (self.node.clone(), self.lease.clone());
        tokio::spawn(async move {
            let _ = n.fleet.release(&l).await;
        });
    }
}
