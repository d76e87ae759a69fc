//! Where a miss's bytes come from in fleet mode: one origin download per image per fleet.
//! The one source selection of every entrance (`imgcache serve`'s fills, `imgcache fetch`
//! through [`imgcache_fetch::ImageCache::with_fleet`]).
//!
//! Asked once the key's local permit is held (so this node runs one fill per key), the
//! fleet index says who holds or is filling the image:
//! - a holder (published first, then the fillers furthest along) answers on its peer
//!   endpoint: its bytes go through the admission pipeline like an origin's, verified against
//!   the whole image's checksum (the origin's, or the one the holder records). A holder that
//!   does not answer within [`PEER_CONNECT`], is busy (its fan-out is full) or is marked
//!   suspect (it sent a bad image lately) is skipped for the next;
//! - nobody: this node takes the fleet's lease on the key (fenced by its generation), renews it
//!   while it downloads, and releases it when done ([`LeaseGuard`]);
//! - another node holds the lease but has not announced its fill yet: the index is asked again
//!   shortly, for at most two lease TTLs, then the origin is used (the lease's holder is taken
//!   to be stuck; said in the log).
//!
//! A holder whose stream breaks mid-way (it died, stalled or was cut) costs nothing but a
//! pause: the body goes on from another holder, else the origin under the lease, by `Range`
//! from the bytes already written (`Continue`).
//!
//! A database that does not answer makes the miss go to the origin, with this node's own
//! coalescing only.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use imgcache_fetch::miss::{BoxFuture, MissOrigin, MissSource, MissSources};
use imgcache_fetch::resume::{self, Continuation, Rest, RestFuture, Resumable};
use imgcache_fetch::source::http::HttpSource;
use imgcache_fetch::source::{OriginMeta, Response};
use imgcache_store::{Integrity, Key};
use reqwest::header::{HeaderMap, HeaderValue};

use crate::{Fleet, FleetConfig, FleetError, Holding, HoldingState, Lease, Lookup};

/// The header peers present their fleet token in.
pub const TOKEN_HEADER: &str = "x-imgcache-fleet-token";
/// Longest a holder may take to answer before the next source is tried.
pub const PEER_CONNECT: Duration = Duration::from_secs(1);
/// How long a holder that sent a bad image is skipped.
const SUSPECT_FOR: Duration = Duration::from_secs(600);

/// Where a miss's bytes come from.
pub enum Source {
    /// A peer's answer, to admit against `checksum`.
    Peer {
        response: Box<Response>,
        checksum: Integrity,
        node: String,
    },
    /// The origin; with the fleet's lease when the index answered.
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

    pub fn is_suspect(&self, node: &str) -> bool {
        let mut m = self.0.lock().expect("poisoned");
        m.retain(|_, until| *until > Instant::now());
        m.contains_key(node)
    }
}

/// This node's source selection: its fleet membership, the token peers want, the holders it
/// distrusts, and the HTTP client it asks them with.
pub struct FleetSource {
    fleet: Fleet,
    token: String,
    pub suspects: Suspects,
    /// Peers are asked without retries (the next source is the retry) ...
    http: HttpSource,
    /// ... but a peer body that breaks resumes as the sources' options say.
    opts: imgcache_fetch::HttpOptions,
}

impl FleetSource {
    /// `http`: the sources' client (its TLS settings); peers are asked without retries.
    pub fn new(fleet: Fleet, token: impl Into<String>, http: &HttpSource) -> Arc<FleetSource> {
        Arc::new(FleetSource {
            fleet,
            token: token.into(),
            suspects: Suspects::default(),
            http: http.without_retries(),
            opts: http.options().clone(),
        })
    }

    pub fn fleet(&self) -> &Fleet {
        &self.fleet
    }

    fn lease_ttl(&self) -> Duration {
        self.fleet.config().lease_ttl
    }

    /// Live holders of `key` other than this node, best first; empty when the database does
    /// not answer within the call timeout (the miss goes to the origin).
    pub async fn holders(&self, key: &str) -> Vec<Holding> {
        match self.fleet.holders(key).await {
            Ok(h) => h
                .into_iter()
                .filter(|h| h.node != self.fleet.node_url())
                .collect(),
            Err(e) => {
                tracing::warn!(key, error = %e, "fleet index unavailable: going to the origin");
                Vec::new()
            }
        }
    }

    /// The source of `key`'s miss (see the module docs).
    pub async fn source(self: &Arc<Self>, key: &Key, origin: Arc<dyn MissOrigin>) -> Source {
        let wait_until = Instant::now() + self.lease_ttl() * 2;
        // What the origin vouches for (a Glance image's record), asked once if a peer is tried.
        let mut vouched: Option<Option<OriginMeta>> = None;
        // Whether the lease's holder can be followed once it fills, asked once.
        let mut followable: Option<bool> = None;
        loop {
            let found = match self.lookup(key).await {
                Ok(found) => found,
                Err(e) => {
                    tracing::warn!(%key, error = %e, "fleet index unavailable: downloading from the origin");
                    return Source::Origin(None);
                }
            };
            let lease = if found.lease.is_some() || found.holders.is_empty() {
                Ok(found.lease)
            } else {
                for h in found.holders {
                    if vouched.is_none() {
                        vouched = Some(origin.vouched().await);
                    }
                    if let Some(src) = self
                        .try_peer(&h, key, &origin, vouched.clone().flatten())
                        .await
                    {
                        return src;
                    }
                }
                // Holders were listed, so the lookup took no lease; none served.
                self.fleet.take_lease(key.as_str()).await
            };
            match lease {
                Ok(Some(lease)) => return Source::Origin(Some(LeaseGuard::new(self, lease))),
                Ok(None) => {
                    if followable.is_none() {
                        followable = Some(self.lease_followable(key).await);
                    }
                    if followable == Some(false) {
                        // A fetch-only member (`fetch://HOST/PID`) has no peer endpoint:
                        // waiting for it would cost this miss its whole download and save no
                        // origin byte.
                        tracing::info!(%key, "the origin lease is held by a fetch process, which no peer can follow: downloading here");
                        return Source::Origin(None);
                    }
                    if Instant::now() >= wait_until {
                        tracing::warn!(%key, "another node holds the origin lease but shows no fill: downloading here");
                        return Source::Origin(None);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => {
                    tracing::warn!(%key, error = %e, "fleet index unavailable: downloading from the origin");
                    return Source::Origin(None);
                }
            }
        }
    }

    /// One look at the index for `key`'s miss ([`Fleet::lookup`]), suspect holders left out.
    /// When every listed holder is a suspect, the lease is taken as if none were listed.
    async fn lookup(&self, key: &Key) -> crate::Result<Lookup> {
        let mut found = self.fleet.lookup(key.as_str()).await?;
        let listed = !found.holders.is_empty();
        found.holders.retain(|h| !self.suspects.is_suspect(&h.node));
        if listed && found.holders.is_empty() {
            found.lease = self.fleet.take_lease(key.as_str()).await?;
        }
        Ok(found)
    }

    /// Whether the holder of `key`'s lease is a node peers can read from (an http(s) URL);
    /// `true` when it cannot be told (the wait is bounded anyway).
    async fn lease_followable(&self, key: &Key) -> bool {
        match self.fleet.lease_holder(key.as_str()).await {
            Ok(Some(holder)) => crate::serves_peers(&holder),
            Ok(None) | Err(_) => true,
        }
    }

    fn peer_url(peer: &str, key: &Key) -> Option<url::Url> {
        url::Url::parse(&format!(
            "{}/v1/peer/images/{key}",
            peer.trim_end_matches('/')
        ))
        .ok()
    }

    fn peer_headers(&self) -> Option<HeaderMap> {
        let mut headers = HeaderMap::new();
        headers.insert(TOKEN_HEADER, HeaderValue::from_str(&self.token).ok()?);
        Some(headers)
    }

    /// Asks one holder; `None` to try the next source.
    async fn try_peer(
        self: &Arc<Self>,
        h: &Holding,
        key: &Key,
        origin: &Arc<dyn MissOrigin>,
        vouched: Option<OriginMeta>,
    ) -> Option<Source> {
        // The whole image is verified on every peer fill: by what the origin vouches for,
        // else by the checksum the holder announced: the one it recorded when it published,
        // or, for a filler, the one its own origin vouched for (Glance's, `Content-MD5`) that
        // it verifies against. A filler of a plain URL with no checksum has none to give, and
        // is followed only once published.
        let checksum = vouched
            .as_ref()
            .and_then(|m| m.checksum.clone())
            .or_else(|| h.checksum.as_deref().and_then(|c| c.parse().ok()))?;
        let url = Self::peer_url(&h.node, key)?;
        let headers = self.peer_headers()?;
        let asked = tokio::time::timeout(PEER_CONNECT, self.http.get(&url, None, &headers)).await;
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
        // The image as its origin describes it (validators, md5, format), so the record here
        // says what the holder's says; the bytes are the peer's.
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
        // Should the holder die or stall mid-stream, the body goes on from another holder or
        // the origin, by `Range` from the bytes already here: the fill's clients are never cut.
        let if_range = meta.validators.etag.clone().filter(|e| e.starts_with('"'));
        let then = Arc::new(Continue {
            source: self.clone(),
            key: key.clone(),
            origin: origin.clone(),
            if_range,
            broken: Mutex::new(vec![h.node.clone()]),
        });
        let body = resume::continuing(&url, body, Resumable::elsewhere(&self.opts, &url, then));
        Some(Source::Peer {
            response: Box::new(Response::Body { meta, body }),
            checksum,
            node: h.node.clone(),
        })
    }
}

/// Where a peer fill's bytes come from once its holder's stream broke: another live holder
/// (not one that broke already, not a suspect), asked for the rest by `Range`; else the
/// origin, under the fleet's lease (waited for while the lease's holder, perhaps the dead
/// node, still holds it: at most two lease TTLs, then without it, as
/// [`FleetSource::source`] does). The whole image is verified against the fill's checksum
/// whatever mix of sources it came from.
struct Continue {
    source: Arc<FleetSource>,
    key: Key,
    origin: Arc<dyn MissOrigin>,
    /// A strong `ETag` the origin vouched for, sent as `If-Range` to it.
    if_range: Option<String>,
    /// The holders whose stream broke, the current one last.
    broken: Mutex<Vec<String>>,
}

impl Continuation for Continue {
    fn rest(&self, offset: u64) -> RestFuture<'_> {
        Box::pin(self.rest_from(offset))
    }
}

impl Continue {
    async fn rest_from(
        &self,
        offset: u64,
    ) -> imgcache_fetch::Result<std::result::Result<Rest, String>> {
        let key = &self.key;
        let gone = self.broken.lock().expect("poisoned").last().cloned();
        tracing::warn!(%key, peer = gone, offset, "a peer's stream broke: continuing from another source");
        let wait_until = Instant::now() + self.source.lease_ttl() * 2;
        loop {
            for h in self.source.holders(key.as_str()).await {
                let broken = self.broken.lock().expect("poisoned").contains(&h.node);
                if broken || self.source.suspects.is_suspect(&h.node) {
                    continue;
                }
                if let Some(response) = self.ask_peer(&h.node, offset).await {
                    tracing::info!(%key, peer = h.node, offset, "continuing from another holder");
                    self.broken.lock().expect("poisoned").push(h.node.clone());
                    return Ok(Ok(Rest {
                        response,
                        keep: None,
                        skip: 0,
                    }));
                }
            }
            let lease = match self.source.fleet.take_lease(key.as_str()).await {
                Ok(Some(lease)) => Some(LeaseGuard::new(&self.source, lease)),
                Ok(None) if Instant::now() < wait_until => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Ok(None) => {
                    tracing::warn!(%key, "another node holds the origin lease but shows no fill: continuing from the origin");
                    None
                }
                Err(e) => {
                    tracing::warn!(%key, error = %e, "fleet index unavailable: continuing from the origin");
                    None
                }
            };
            tracing::info!(%key, offset, "continuing from the origin");
            let rest = self.origin.rest(offset, self.if_range.clone()).await?;
            return Ok(rest.map(|response| Rest {
                response,
                keep: lease.map(|l| Box::new(l) as Box<dyn std::any::Any + Send + Sync>),
                skip: 0,
            }));
        }
    }

    /// `peer`'s bytes of the key from `offset`, if it answers within [`PEER_CONNECT`].
    async fn ask_peer(&self, peer: &str, offset: u64) -> Option<reqwest::Response> {
        let url = FleetSource::peer_url(peer, &self.key)?;
        let headers = self.source.peer_headers()?;
        let asked = tokio::time::timeout(
            PEER_CONNECT,
            self.source
                .http
                .get_rest(&url, &headers, None, offset, None, None),
        )
        .await;
        match asked {
            Ok(Ok(Ok(resp))) => Some(resp),
            Ok(Ok(Err(why))) => {
                tracing::debug!(peer, why, "peer cannot continue");
                None
            }
            Ok(Err(e)) => {
                tracing::debug!(peer, error = %e, "peer cannot continue");
                None
            }
            Err(_) => {
                tracing::debug!(peer, "peer did not answer in time");
                None
            }
        }
    }
}

/// The fleet's origin lease on a key, renewed while the download runs and released when
/// dropped.
pub struct LeaseGuard {
    fleet: Fleet,
    lease: Lease,
    renew: tokio::task::JoinHandle<()>,
}

impl LeaseGuard {
    fn new(source: &FleetSource, lease: Lease) -> LeaseGuard {
        let every = source.lease_ttl() / 3;
        let (f, l) = (source.fleet.clone(), lease.clone());
        let renew = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = f.renew(&l).await {
                    // Lost (fenced by a newer generation) or the database is away: the
                    // download goes on (its bytes are verified all the same); another node
                    // may start its own once the lease expires.
                    tracing::warn!(key = l.key, error = %e, "cannot renew the origin lease");
                    if matches!(e, FleetError::LeaseLost { .. }) {
                        return;
                    }
                }
            }
        });
        LeaseGuard {
            fleet: source.fleet.clone(),
            lease,
            renew,
        }
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        self.renew.abort();
        let (f, l) = (self.fleet.clone(), self.lease.clone());
        tokio::spawn(async move {
            let _ = f.release(&l).await;
        });
    }
}

/// A short-lived process (`imgcache fetch`) as a fleet node: it must be a live node while it
/// holds an origin lease (a lease whose holder stops heartbeating is free), so it joins, beats
/// every quarter of the heartbeat timeout while it runs, and leaves at [`FetchMember::leave`].
/// Its node is its own (`fetch://HOST/PID`, from the caller), never a URL it does not answer:
/// peers would wait on its lease for a fill they cannot follow, and a `serve` starting at that
/// URL meanwhile would be refused as a duplicate.
///
/// It has no peer endpoint, so what it fills and publishes is read through the live `serve`
/// whose cache directory it shares, if there is one: the one named by the marker that serve
/// wrote there ([`Fleet::node_beside`]), else the one the operator named (`node_url`), if the
/// index shows it alive. Its fill in progress is announced as its own holding, read through
/// the serve ([`Fleet::serve_through`]; the serve's peer endpoint follows the growing file),
/// and what it publishes is announced under the serve's URL (the serve then holds it): a
/// conductor's fetches beside a serve feed the fleet, and conductors deploying one image at
/// once download it from the origin once. A fetch with no serve beside it announces nothing:
/// no peer could read from it.
pub struct FetchMember {
    source: Arc<FleetSource>,
    /// The serve peers read this process's images through.
    through: Option<String>,
    beat: tokio::task::JoinHandle<()>,
}

impl FetchMember {
    /// Joins the fleet as `cfg.node_url` (the caller's `fetch://HOST/PID`; bounded by the
    /// fleet's call timeout), for a fetch into the cache directory `cache_root`; `stated`: the
    /// serve the operator says answers for that directory (`node_url`).
    pub async fn join(
        cfg: FleetConfig,
        token: impl Into<String>,
        http: &HttpSource,
        cache_root: &std::path::Path,
        stated: Option<&str>,
    ) -> crate::Result<Arc<FetchMember>> {
        let every = cfg.heartbeat_every();
        let fleet = Fleet::connect(cfg).await?;
        let through = read_through(&fleet, cache_root, stated).await;
        match &through {
            Some(serve) => {
                tracing::debug!(serve, "this fetch's images are read through this serve")
            }
            None => tracing::debug!(
                "no live serve answers for this cache directory: this fetch announces nothing"
            ),
        }
        let f = fleet.clone();
        let beat = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = f.heartbeat().await {
                    tracing::debug!(error = %e, "fleet heartbeat missed");
                }
            }
        });
        Ok(Arc::new(FetchMember {
            source: FleetSource::new(fleet, token, http),
            through,
            beat,
        }))
    }

    pub fn source(&self) -> &Arc<FleetSource> {
        &self.source
    }

    /// Leaves the fleet (its holdings go with it).
    pub async fn leave(&self) {
        self.beat.abort();
        if let Err(e) = self.source.fleet.leave().await {
            tracing::debug!(error = %e, "cannot leave the fleet cleanly (it drops this node after the heartbeat timeout)");
        }
    }
}

/// The live serve peers read a fetch's images through (set as this node's `peer_url`): the
/// one the marker in `cache_root` names, else `stated` if the index lists it alive. `None`
/// when there is none, or it cannot be set (the fetch then announces nothing).
async fn read_through(
    fleet: &Fleet,
    cache_root: &std::path::Path,
    stated: Option<&str>,
) -> Option<String> {
    let serve = match fleet.node_beside(cache_root).await {
        Some(serve) => serve,
        None => {
            let url = stated.filter(|u| crate::serves_peers(u))?;
            let nodes = fleet.nodes().await.ok()?;
            nodes.iter().find(|n| n.url == url)?.url.clone()
        }
    };
    if let Err(e) = fleet.serve_through(&serve).await {
        tracing::debug!(error = %e, "this fetch's images are not announced");
        return None;
    }
    Some(serve)
}

impl MissSources for FetchMember {
    fn source<'a>(
        &'a self,
        key: &'a Key,
        origin: Arc<dyn MissOrigin>,
    ) -> BoxFuture<'a, MissSource> {
        Box::pin(async move {
            match self.source.source(key, origin).await {
                Source::Peer {
                    response,
                    checksum,
                    node,
                } => MissSource::Peer {
                    response,
                    checksum,
                    node,
                },
                Source::Origin(lease) => MissSource::Origin {
                    keep: lease.map(|l| Box::new(l) as Box<dyn std::any::Any + Send + Sync>),
                },
            }
        })
    }

    fn filling<'a>(
        &'a self,
        key: &'a Key,
        size: Option<u64>,
        checksum: Option<String>,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if self.through.is_none() {
                return;
            }
            let fleet = &self.source.fleet;
            let state = HoldingState::Filling;
            if let Err(e) = fleet
                .announce(key.as_str(), state, size, checksum.as_deref(), 0)
                .await
            {
                tracing::debug!(%key, error = %e, "the fill is not announced");
            }
        })
    }

    fn refused(&self, node: &str) {
        self.source.suspects.mark(node);
    }

    fn published<'a>(
        &'a self,
        key: &'a Key,
        size: u64,
        checksum: Option<String>,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let Some(node) = &self.through else {
                return;
            };
            let fleet = &self.source.fleet;
            if let Err(e) = fleet
                .announce_for(
                    node,
                    key.as_str(),
                    HoldingState::Published,
                    Some(size),
                    checksum.as_deref(),
                    size,
                )
                .await
            {
                tracing::debug!(%key, error = %e, "the published image is not announced");
            }
            // The serve holds it now; this process's fill is over.
            if let Err(e) = fleet.withdraw(key.as_str()).await {
                tracing::debug!(%key, error = %e, "the fill's holding stays until this fetch leaves");
            }
        })
    }
}
