//! This server as a node of a fleet ([`imgcache_fleet`]): it joins at start (a live node with
//! the same `node_url` refuses it), announces what it holds, heartbeats, and keeps the index
//! told of every image it publishes or evicts.
//!
//! The index is bookkeeping, never on a hit's path, and the database may go away: updates go
//! through a queue that keeps the latest state per key, and while the database is down they
//! wait there; when it answers again they are replayed and the node re-announces everything
//! it holds (the index may have dropped it as dead meanwhile). Every heartbeat timeout the
//! index is checked against the cache directory, which other processes change too (a fetch,
//! the cache commands). Lookups on a miss are bounded by the fleet's call timeout and treated
//! as "nobody holds it" when the database is down, so the miss goes to the origin with this
//! node's own coalescing.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use imgcache_fetch::source::http::HttpSource;
use imgcache_fleet::source::FleetSource;
use imgcache_fleet::{Fleet, FleetConfig, FleetError, Holding, HoldingState};
use imgcache_store::Cache;
use tokio::sync::{Mutex, Notify};

/// What `serve` is told about the fleet.
#[derive(Clone, Debug)]
pub struct FleetSettings {
    pub index: FleetConfig,
    /// What peers present to each other (`X-Imgcache-Fleet-Token`).
    pub token: String,
    /// A node serves at most this many peers at once; further peers go elsewhere, so that
    /// the fleet fills as a pipelined tree, not a star on the first holder. At least 1
    /// ([`crate::Server::bind`] refuses 0).
    pub peer_fanout: usize,
}

impl FleetSettings {
    /// `index` and `token` with the settings table's default fan-out (`peer_fanout`).
    pub fn new(index: FleetConfig, token: impl Into<String>) -> FleetSettings {
        FleetSettings {
            index,
            token: token.into(),
            peer_fanout: imgcache_settings::default_count("peer_fanout") as usize,
        }
    }
}

/// A pending update of this node's holding of a key.
#[derive(Clone, Debug)]
enum Update {
    Holds {
        state: HoldingState,
        size: Option<u64>,
        checksum: Option<String>,
        bytes: u64,
    },
    Gone,
}

pub struct FleetNode {
    pub fleet: Fleet,
    pub settings: FleetSettings,
    cache: Cache,
    pending: Mutex<HashMap<String, Update>>,
    wake: Notify,
    /// Peer streams this node is serving now.
    pub serving_peers: AtomicUsize,
    /// The fleet's source selection for this node's misses (and the peers it distrusts).
    pub source: Arc<FleetSource>,
}

impl FleetNode {
    /// Joins the fleet and announces the local cache (adoption of an existing cache).
    /// `http`: the client peers are asked with.
    pub async fn start(
        settings: FleetSettings,
        cache: Cache,
        http: &HttpSource,
    ) -> Result<Arc<FleetNode>, FleetError> {
        let fleet = Fleet::connect(settings.index.clone()).await?;
        fleet.warm().await;
        // An `imgcache fetch` on this directory announces what it publishes under this
        // node's URL, once the marker shows this node serves the directory.
        if let Err(e) = fleet.mark_cache_dir(cache.root()) {
            tracing::warn!(error = %e, "cannot mark the cache directory: a fetch on it will not feed the fleet");
        }
        let node = Arc::new(FleetNode {
            source: FleetSource::new(fleet.clone(), settings.token.clone(), http),
            fleet,
            settings,
            cache,
            pending: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            serving_peers: AtomicUsize::new(0),
        });
        node.announce_all().await;
        Ok(node)
    }

    /// Queues every published local image for announcement.
    async fn announce_all(&self) {
        let cache = self.cache.clone();
        let records = imgcache_store::off_thread(move || cache.get_cached_images())
            .await
            .unwrap_or_default();
        let n = records.len();
        let mut pending = self.pending.lock().await;
        for r in records {
            pending.insert(r.image_id.clone(), held(&r));
        }
        drop(pending);
        tracing::info!(
            images = n,
            node = self.fleet.node_url(),
            "announcing the local cache to the fleet"
        );
        self.wake.notify_one();
    }

    /// Mends the index's record of what this node holds where it differs from the cache
    /// directory: other processes change that directory too (an `imgcache fetch` that could
    /// not read through this node publishes into it; `imgcache delete`, `prune` and `clean`
    /// remove from it, as does an operator's `rm`) and tell the index nothing. Queued like
    /// every update, never overriding one already pending. The index is read before the
    /// directory: whatever it lists was published here before, so a key it lists that the
    /// directory lacks was removed since. A race this leaves (an image removed and published
    /// again meanwhile) is mended by the next round.
    async fn reconcile(&self) -> Result<(), FleetError> {
        let listed: HashSet<String> = self.fleet.published_here().await?.into_iter().collect();
        let cache = self.cache.clone();
        // Published: a record whose file is in place, as `Cache::get_record` has it (a file
        // removed by hand leaves its record), in one listing rather than a lookup per key.
        let published = move || {
            let mut records = cache.get_cached_images()?;
            records.retain(|r| {
                imgcache_store::Key::new(&r.image_id).is_ok_and(|k| {
                    cache
                        .get_image_filepath(&k, imgcache_store::Status::Active)
                        .exists()
                })
            });
            Ok::<_, imgcache_store::StoreError>(records)
        };
        let local = match imgcache_store::off_thread(published).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the cache to check the fleet index");
                return Ok(());
            }
        };
        let local_keys: HashSet<&str> = local.iter().map(|r| r.image_id.as_str()).collect();
        let unlisted: Vec<_> = local
            .iter()
            .filter(|r| !listed.contains(&r.image_id))
            .collect();
        let removed: Vec<&String> = listed
            .iter()
            .filter(|k| !local_keys.contains(k.as_str()))
            .collect();
        if unlisted.is_empty() && removed.is_empty() {
            return Ok(());
        }
        let mut pending = self.pending.lock().await;
        for r in &unlisted {
            pending.entry(r.image_id.clone()).or_insert_with(|| held(r));
        }
        for k in &removed {
            pending.entry((*k).clone()).or_insert(Update::Gone);
        }
        drop(pending);
        tracing::info!(
            announced = unlisted.len(),
            withdrawn = removed.len(),
            "the fleet index differed from the cache directory: mending it"
        );
        Ok(())
    }

    /// This node published `key`. Queued like every update, and also written to the index
    /// now (within its call bound): the caller holds the key's origin lease and releases it
    /// next, and a node that finds the lease free must find this holding, or it would go to
    /// the origin a second time. The queued copy re-applies it if the write fails, and
    /// overrides a "filling" update the loop may still be applying.
    pub async fn published(&self, key: &str, size: u64, checksum: Option<String>) {
        self.queue(
            key,
            Update::Holds {
                state: HoldingState::Published,
                size: Some(size),
                checksum: checksum.clone(),
                bytes: size,
            },
        )
        .await;
        if let Err(e) = self
            .fleet
            .announce(
                key,
                HoldingState::Published,
                Some(size),
                checksum.as_deref(),
                size,
            )
            .await
        {
            tracing::debug!(key, error = %e, "announcing the published image later");
        }
    }

    /// This node started filling `key` (peers may follow it).
    pub async fn filling(&self, key: &str, size: Option<u64>, checksum: Option<String>) {
        self.queue(
            key,
            Update::Holds {
                state: HoldingState::Filling,
                size,
                checksum,
                bytes: 0,
            },
        )
        .await;
    }

    /// This node no longer holds `key` (evicted, deleted, or its fill failed).
    pub async fn gone(&self, key: &str) {
        self.queue(key, Update::Gone).await;
    }

    async fn queue(&self, key: &str, u: Update) {
        self.pending.lock().await.insert(key.to_string(), u);
        self.wake.notify_one();
    }

    /// Live holders of `key` other than this node, best first; empty when the database does
    /// not answer within the call timeout (the miss goes to the origin).
    pub async fn holders(&self, key: &str) -> Vec<Holding> {
        self.source.holders(key).await
    }

    /// A slot for serving one peer stream, or `None` at the fan-out limit.
    pub fn serve_peer(self: &Arc<Self>) -> Option<PeerSlot> {
        let k = self.settings.peer_fanout;
        let prev = self.serving_peers.fetch_add(1, Ordering::AcqRel);
        if prev >= k {
            self.serving_peers.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(PeerSlot(self.clone()))
    }

    /// The bookkeeping loop: applies pending updates, heartbeats, re-joins when the index took
    /// this node for dead, and replays everything once the database is back.
    pub async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let beat = self.settings.index.heartbeat_every();
        let mut down = false;
        // When the database server started, as of the last heartbeat.
        let mut server_started: Option<String> = None;
        let mut last_beat: Option<std::time::Instant> = None;
        // The cache directory was announced at start; checked again every heartbeat timeout.
        let check_every = self.settings.index.heartbeat_timeout;
        let mut last_check = std::time::Instant::now();
        loop {
            let due = last_beat.map_or(Duration::ZERO, |t| beat.saturating_sub(t.elapsed()));
            tokio::select! {
                _ = tokio::time::sleep(due) => {}
                _ = self.wake.notified() => {}
                _ = stop.wait_for(|s| *s) => break,
            }
            // A beat when one is due, not on every update (a busy node's misses would each
            // cost the database one more write); while the database is away, every round
            // asks, since its return is what the loop waits for.
            let beat_due = last_beat.is_none_or(|t| t.elapsed() >= beat);
            if down || beat_due {
                last_beat = Some(std::time::Instant::now());
                match self.fleet.heartbeat().await {
                    Ok(started) => {
                        // A restart between two beats goes unnoticed by every failed call: its
                        // last commits may be lost all the same, so the node says it all again.
                        if !down && server_started.as_ref().is_some_and(|s| *s != started) {
                            tracing::warn!(
                                "the fleet database restarted since the last heartbeat: re-announcing"
                            );
                            down = true;
                        }
                        server_started = Some(started);
                    }
                    Err(FleetError::DuplicateNode { .. }) => {
                        tracing::warn!("the fleet took this node for dead: joining again");
                        match self.fleet.join().await {
                            Ok(()) => self.announce_all().await,
                            Err(e) => tracing::warn!(error = %e, "cannot rejoin the fleet"),
                        }
                        continue;
                    }
                    Err(e) => {
                        if !down {
                            tracing::warn!(error = %e, "fleet database unavailable: bookkeeping queued");
                        }
                        down = true;
                        continue;
                    }
                }
            }
            if down {
                down = false;
                tracing::info!("fleet database back: replaying and re-announcing");
                // The index may have dropped this node meanwhile: join again (keeps the URL
                // if no one took it), then announce everything held.
                if let Err(e) = self.fleet.join().await {
                    tracing::warn!(error = %e, "cannot rejoin the fleet");
                    continue;
                }
                self.announce_all().await;
                last_check = std::time::Instant::now();
            }
            if last_check.elapsed() >= check_every {
                last_check = std::time::Instant::now();
                if let Err(e) = self.reconcile().await {
                    tracing::debug!(error = %e, "the fleet index is checked against the cache later");
                }
            }
            let batch: Vec<(String, Update)> = self.pending.lock().await.drain().collect();
            for (i, (key, u)) in batch.iter().enumerate() {
                let res = match u {
                    Update::Holds {
                        state,
                        size,
                        checksum,
                        bytes,
                    } => {
                        self.fleet
                            .announce(key, *state, *size, checksum.as_deref(), *bytes)
                            .await
                    }
                    Update::Gone => self.fleet.withdraw(key).await,
                };
                if let Err(e) = res {
                    // Put back what was not applied, unless a newer update came meanwhile.
                    let mut pending = self.pending.lock().await;
                    for (k, u) in batch[i..].iter().cloned() {
                        pending.entry(k).or_insert(u);
                    }
                    tracing::warn!(error = %e, "fleet bookkeeping deferred");
                    down = true;
                    break;
                }
            }
        }
        if let Err(e) = self.fleet.leave().await {
            tracing::warn!(error = %e, "cannot leave the fleet cleanly (it will drop this node after the heartbeat timeout)");
        }
    }
}

/// The update saying this node holds the published image `r`.
fn held(r: &imgcache_store::Record) -> Update {
    Update::Holds {
        state: HoldingState::Published,
        size: Some(r.size),
        checksum: r.checksum.as_ref().map(ToString::to_string),
        bytes: r.size,
    }
}

/// How often a fill's bytes so far are written to the index.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// A fill's bytes so far, refreshed in the index at most every [`PROGRESS_EVERY`], best
/// effort (an update the database misses is not queued: the next one supersedes it). Peers
/// pick the filler furthest along by it, and `imgcache fleet holders` shows it move.
pub struct FillProgress {
    node: Arc<FleetNode>,
    key: String,
    last: std::sync::Mutex<std::time::Instant>,
    rt: tokio::runtime::Handle,
}

impl FillProgress {
    /// For `key`'s fill; call from within the runtime (the hook may run off it).
    pub fn new(node: Arc<FleetNode>, key: &str) -> FillProgress {
        FillProgress {
            node,
            key: key.to_string(),
            last: std::sync::Mutex::new(std::time::Instant::now()),
            rt: tokio::runtime::Handle::current(),
        }
    }

    /// `bytes` are written.
    pub fn written(&self, bytes: u64) {
        {
            let mut last = self.last.lock().expect("poisoned");
            if last.elapsed() < PROGRESS_EVERY {
                return;
            }
            *last = std::time::Instant::now();
        }
        let (node, key) = (self.node.clone(), self.key.clone());
        self.rt.spawn(async move {
            if let Err(e) = node.fleet.filling_progress(&key, bytes).await {
                tracing::debug!(key, error = %e, "fill progress not written to the fleet index");
            }
        });
    }
}

/// One peer stream being served; frees its slot when dropped.
pub struct PeerSlot(Arc<FleetNode>);

impl Drop for PeerSlot {
    fn drop(&mut self) {
        self.0.serving_peers.fetch_sub(1, Ordering::AcqRel);
    }
}
