//! Stale-while-revalidate for `/v1/fetch` hits.
//!
//! A plain http(s) or `file://` origin can change behind a cached copy (Glance images cannot).
//! A hit whose copy is older than the revalidation interval is served from the cache at once,
//! and a background fill asks the origin whether it changed (one conditional request under
//! the key lock, through the admission pipeline like any miss; a 304 only refreshes the
//! check time). A changed
//! image is downloaded, verified and renamed over the old one: responses already sending the
//! old copy finish with it (they hold its descriptor), later ones get the new one. An origin
//! that is down, or a new download that fails, leaves the cached copy in place and served.
//!
//! At most one check per key runs at a time, and a key is not checked again within the
//! interval, whatever the origin answered: a busy image costs its origin one request per
//! interval, not one per hit.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use imgcache_store::{Key, Record};

use imgcache_store::{Done, Outcome};

use crate::fill::Origin;
use crate::state::AppState;

#[derive(Default)]
pub struct Revalidations {
    /// When each key's last check started.
    started: Mutex<HashMap<Key, Instant>>,
}

impl Revalidations {
    /// Starts a background check of `key` if its copy `rec` is due for one and none ran
    /// within the interval.
    pub fn maybe_start(&self, state: &AppState, key: &Key, rec: &Record, origin: &Origin) {
        if state.fetcher.freshness(rec, &origin.href) != imgcache_fetch::Freshness::Revalidate {
            return;
        }
        let interval = state.fetcher.revalidate_interval();
        {
            let mut started = self.started.lock().expect("poisoned");
            let now = Instant::now();
            if started
                .get(key)
                .is_some_and(|at| now.duration_since(*at) < interval)
            {
                return;
            }
            // Forget keys not checked for a while, so the map stays as small as the set of
            // images hit within one interval.
            started.retain(|_, at| now.duration_since(*at) < interval);
            started.insert(key.clone(), now);
        }
        let (st, key, origin, old) = (state.clone(), key.clone(), origin.clone(), rec.clone());
        tokio::spawn(async move {
            st.metrics.revalidations.inc();
            let origin = Origin {
                revalidate: true,
                ..origin
            };
            // A fill like a miss's (the same key lock and admission pipeline), asking with
            // the copy's validators.
            let fill = match st.fills.join_or_start(&st, &key, origin.clone()) {
                Ok((f, _)) => f,
                Err(e) => {
                    tracing::debug!(%key, error = %e.message, "revalidation not started");
                    return;
                }
            };
            match fill.ended().await {
                Outcome::Done(Done::Written { size, .. }) => {
                    tracing::info!(%key, href = %origin.href, size, "origin changed: cached copy replaced");
                    if size > old.size {
                        st.prune_wake.notify_one(); // the cache may now be over its limit
                    }
                }
                Outcome::Done(Done::Held { .. }) => tracing::debug!(%key, "revalidated: unchanged"),
                Outcome::Failed(f) => {
                    st.metrics.revalidation_failures.inc();
                    tracing::warn!(%key, href = %origin.href, error = %f, "revalidation failed: still serving the cached copy");
                }
                other => {
                    st.metrics.revalidation_failures.inc();
                    tracing::warn!(%key, href = %origin.href, outcome = ?other, "revalidation did not replace the cached copy");
                }
            }
        });
    }
}
