//! Where a miss's bytes come from in fleet mode: the fleet's one source selection
//! ([`imgcache_fleet::source`]: holders, then the origin lease), asked with this server's
//! origin, whose requests it counts.

use std::sync::Arc;

use imgcache_fetch::Href;
use imgcache_fetch::miss::{BoxFuture, MissOrigin};
use imgcache_fetch::source::OriginMeta;
use imgcache_store::Key;

pub use imgcache_fleet::source::{LeaseGuard, PEER_CONNECT, Source, Suspects};

use crate::fill::Origin;
use crate::state::AppState;

/// The source of `key`'s miss (see [`imgcache_fleet::source`]); the origin, without a lease,
/// when fleet mode is off.
pub async fn source(state: &AppState, key: &Key, origin: &Origin) -> Source {
    let Some(node) = state.fleet.clone() else {
        return Source::Origin(None);
    };
    let origin = Arc::new(ServerOrigin {
        state: state.clone(),
        origin: origin.clone(),
    });
    let started = std::time::Instant::now();
    let source = node.source.source(key, origin).await;
    let label = match &source {
        Source::Peer { .. } => "peer",
        Source::Origin(Some(_)) => "origin",
        // The index did not answer, or another node's lease was waited out.
        Source::Origin(None) => "origin_unleased",
    };
    state
        .metrics
        .fleet_source_seconds
        .get_or_create(&crate::metrics::SourceLabel { source: label })
        .observe(started.elapsed().as_secs_f64());
    source
}

/// This server's origin of one miss, as the fleet's source selection asks it.
struct ServerOrigin {
    state: AppState,
    origin: Origin,
}

impl MissOrigin for ServerOrigin {
    fn vouched(&self) -> BoxFuture<'_, Option<OriginMeta>> {
        Box::pin(async move {
            match &self.origin.href {
                Href::Glance(_) => self
                    .state
                    .fetcher
                    .origin_head(&self.origin.href, self.origin.glance_token.clone())
                    .await
                    .ok(),
                _ => None,
            }
        })
    }

    fn rest(
        &self,
        offset: u64,
        if_range: Option<String>,
    ) -> BoxFuture<'_, imgcache_fetch::Result<std::result::Result<reqwest::Response, String>>> {
        Box::pin(async move {
            self.state.metrics.origin_requests.inc();
            self.state
                .fetcher
                .request_rest(
                    &self.origin.href,
                    self.origin.glance_token.clone(),
                    offset,
                    if_range.as_deref(),
                )
                .await
        })
    }
}
