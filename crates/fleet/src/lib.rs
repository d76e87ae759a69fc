//! The fleet index: many imgcache nodes sharing one PostgreSQL database as the index of who
//! holds which image, who is filling it, and who may download it from the origin, the way
//! Ironic and Glance coordinate through their SQL databases. There is no coordinator of our
//! own: every decision is one SQL statement checked against the database's clock.
//!
//! - **Nodes** (`imgcache_nodes`): a node joins with its URL and a random instance id, and
//!   heartbeats; one whose heartbeat is older than `heartbeat_timeout` is dead, dropped from
//!   every answer, and its URL may be taken by a new instance. A live node's URL cannot be
//!   taken (a second node started with the same `--node-url` is refused).
//! - **Holdings** (`imgcache_holdings`): which node holds (`published`) or is filling
//!   (`filling`, with the bytes so far) an image key.
//! - **Leases** (`imgcache_leases`): the right to download one key from the origin, taken by
//!   a conditional insert that only succeeds when no lease exists or the current one has
//!   expired, and that returns a generation: the fencing token a renewal must present.
//!
//! Each node's own records stay in its local driver: the index is consulted on a miss, never
//! on a hit, and every call is bounded by `call_timeout` (250 ms by default), so a database
//! outage costs a miss one bounded wait and a hit nothing. The SQL needs no advisory locks,
//! `LISTEN` or other PostgreSQL-only coordination, so a MariaDB backend can follow.

pub mod error;
pub mod migrations;
pub mod source;

use std::future::Future;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{
    Hook, HookError, Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime,
};
use tokio_postgres::NoTls;

pub use error::{FleetError, Result};

#[derive(Clone, Debug)]
pub struct FleetConfig {
    /// `postgresql://user@host:5432/imgcache`.
    pub db_url: String,
    /// How peers and clients reach this node (Glance's `worker_self_reference_url`).
    pub node_url: String,
    /// A node silent for this long is dead.
    pub heartbeat_timeout: Duration,
    /// How long a download lease lasts unless renewed.
    pub lease_ttl: Duration,
    /// The longest any one call may take (a request never waits longer on the database).
    pub call_timeout: Duration,
}

/// How long a download lease lasts unless renewed. Not an operator setting: it paces the
/// holder's renewals (every third of it) and how long a waiting node follows a lease (two
/// of it), both of which the fleet's behaviour is tested at; tests shorten it in code.
pub const LEASE_TTL: Duration = Duration::from_secs(30);

/// The longest one index call may take. Not an operator setting: it is the bound that keeps
/// the database off a request's critical path (a miss waits at most this on the index).
pub const CALL_TIMEOUT: Duration = Duration::from_millis(250);

/// The file a `serve` node writes into its cache directory naming itself (dot-named, so no
/// image key can collide with it): see [`Fleet::mark_cache_dir`].
pub const NODE_MARKER: &str = ".imgcache-fleet-node";

/// Whether `url` names a node peers can read from (an http(s) URL; a fetch-only member's
/// `fetch://HOST/PID` is not one).
pub fn serves_peers(url: &str) -> bool {
    url.starts_with("http://") || url.starts_with("https://")
}

impl FleetConfig {
    /// How often a member proves itself alive: a quarter of the heartbeat timeout.
    pub fn heartbeat_every(&self) -> Duration {
        (self.heartbeat_timeout / 4).max(Duration::from_millis(200))
    }

    /// `heartbeat_timeout` is the settings table's default; the lease TTL and call timeout
    /// are [`LEASE_TTL`] and [`CALL_TIMEOUT`].
    pub fn new(db_url: impl Into<String>, node_url: impl Into<String>) -> FleetConfig {
        FleetConfig {
            db_url: db_url.into(),
            node_url: node_url.into(),
            heartbeat_timeout: imgcache_settings::default_duration("heartbeat_timeout"),
            lease_ttl: LEASE_TTL,
            call_timeout: CALL_TIMEOUT,
        }
    }
}

/// A live node.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub url: String,
    /// Seconds since its last heartbeat.
    pub heartbeat_age: f64,
}

/// A live node and what it holds, for [`Fleet::node_holdings`].
#[derive(Clone, Debug, PartialEq)]
pub struct NodeHoldings {
    pub node: Node,
    /// Images it has published, and images it is filling.
    pub published: u64,
    pub filling: u64,
    /// Bytes of its published images.
    pub published_bytes: u64,
}

/// Whether a node holds an image or is still filling it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HoldingState {
    Filling,
    Published,
}

impl HoldingState {
    fn as_str(self) -> &'static str {
        match self {
            HoldingState::Filling => "filling",
            HoldingState::Published => "published",
        }
    }
}

/// One node's holding of an image.
#[derive(Clone, Debug, PartialEq)]
pub struct Holding {
    /// Where peers read it: the holding node's URL, or, for an `imgcache fetch` beside a
    /// `serve`, that serve's ([`Fleet::serve_through`]).
    pub node: String,
    pub state: HoldingState,
    pub size: Option<u64>,
    /// `algorithm:hex`, as the store writes checksums.
    pub checksum: Option<String>,
    /// Bytes written so far (the size once published).
    pub bytes: u64,
}

/// The right to download one key from the origin, until `ttl` after the last renewal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub key: String,
    /// The fencing token: a renewal or release with an older generation fails.
    pub generation: i64,
}

/// What a miss learns from the index in one call ([`Fleet::lookup`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Lookup {
    /// Live holders other than this node, best first.
    pub holders: Vec<Holding>,
    /// The origin lease, taken because nobody holds the key; `None` when holders are listed
    /// or another live node holds the lease.
    pub lease: Option<Lease>,
}

/// The conflict clause of taking a lease (`$2` the taker, `$3` the TTL and `$4` the heartbeat
/// timeout in seconds): a lease is free when expired (by the database's clock), or when its
/// holder is dead (silent past the heartbeat timeout, or gone): a killed holder's lease need
/// not be waited out. The generation grows with every taking: the fencing token.
macro_rules! lease_taken_over {
    () => {
        "ON CONFLICT (image_key) DO UPDATE
        SET holder = EXCLUDED.holder,
            generation = imgcache_leases.generation + 1,
            expires_at = EXCLUDED.expires_at
        WHERE imgcache_leases.expires_at <= now()
           OR NOT EXISTS (
                SELECT 1 FROM imgcache_nodes n
                WHERE n.url = imgcache_leases.holder
                  AND n.heartbeat >= now() - make_interval(secs => $4))"
    };
}

/// A miss's one statement ([`Fleet::lookup`]).
const LOOKUP_SQL: &str = concat!(
    "WITH h AS (
        SELECT coalesce(n.peer_url, h.node) AS node, h.state, h.size, h.checksum, h.bytes
        FROM imgcache_holdings h JOIN imgcache_nodes n ON n.url = h.node
        WHERE h.image_key = $1 AND h.node <> $2 AND coalesce(n.peer_url, h.node) <> $2
          AND n.heartbeat >= now() - make_interval(secs => $4)
     ), l AS (
        INSERT INTO imgcache_leases (image_key, holder, generation, expires_at)
        SELECT $1, $2, 1, now() + make_interval(secs => $3)
        WHERE NOT EXISTS (SELECT 1 FROM h) ",
    lease_taken_over!(),
    " RETURNING generation
     )
     SELECT * FROM (
        SELECT node, state, size, checksum, bytes, NULL::bigint AS generation FROM h
        UNION ALL
        SELECT NULL, NULL, NULL, NULL, NULL, generation FROM l
     ) u
     ORDER BY (state = 'published') DESC, bytes DESC, node"
);

/// [`Fleet::take_lease`]'s statement.
const TAKE_LEASE_SQL: &str = concat!(
    "INSERT INTO imgcache_leases (image_key, holder, generation, expires_at)
     VALUES ($1, $2, 1, now() + make_interval(secs => $3)) ",
    lease_taken_over!(),
    " RETURNING generation"
);

/// The statements on a miss's path, prepared as each pooled connection is made, so that no
/// miss pays a Parse round trip (the first use on each new connection would otherwise).
const MISS_PATH: [&str; 2] = [LOOKUP_SQL, TAKE_LEASE_SQL];

/// Prepares [`MISS_PATH`] on `client` (into its statement cache). Best effort: before the
/// first migration the tables do not exist yet, and a statement not prepared here is
/// prepared at its first use.
async fn prepare_miss_path(client: &deadpool_postgres::ClientWrapper) {
    for sql in MISS_PATH {
        let _ = client.prepare_cached(sql).await;
    }
}

/// Set on every pooled connection: a commit returns once its WAL record is written, not
/// flushed (PostgreSQL's asynchronous commit; visibility to other sessions is unchanged).
/// A miss's lookup commits when it takes the lease, and the flush was most of its time on a
/// durable server (`FSYNC=on cargo bench -p imgcache-fleet --bench lookup`).
///
/// Safe because every row here is soft state that the fleet rebuilds: should the database
/// server itself crash, the last fraction of a second of commits may be lost, and then
/// - a lease: another node may take the key's lease while this one still downloads, so the
///   origin serves it twice once (each copy still verified), as when the database is down;
///   fencing holds, since a renewal names its holder as well as its generation;
/// - a holding or a withdrawal: one extra peer or origin request, or one 404 from a peer
///   that no longer holds the image (the next source is tried); nodes re-announce on rejoin;
/// - a heartbeat: the next one, a quarter of the timeout later.
const ASYNC_COMMIT: &str = "SET synchronous_commit = off";

/// One row of `node, state, size, checksum, bytes` as a holding.
fn holding(r: &tokio_postgres::Row) -> Holding {
    Holding {
        node: r.get(0),
        state: if r.get::<_, &str>(1) == "published" {
            HoldingState::Published
        } else {
            HoldingState::Filling
        },
        size: r.get::<_, Option<i64>>(2).map(|v| v as u64),
        checksum: r.get(3),
        bytes: r.get::<_, i64>(4) as u64,
    }
}

/// Adds `h` to `list` (ranked best first) unless its node is listed already: a serve and the
/// fetch beside it are one place to read from, listed once, at its best holding.
fn add_holding(list: &mut Vec<Holding>, h: Holding) {
    if !list.iter().any(|l| l.node == h.node) {
        list.push(h);
    }
}

/// A connection pool to the fleet database, as one node of the fleet.
#[derive(Clone)]
pub struct Fleet {
    pool: Pool,
    cfg: FleetConfig,
    instance: String,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("node_url", &self.cfg.node_url)
            .finish_non_exhaustive()
    }
}

impl Fleet {
    /// Connects, applies missing migrations (under the schema table's lock) and joins the
    /// fleet as `cfg.node_url`: refused with [`FleetError::DuplicateNode`] while another live
    /// node uses that URL.
    pub async fn connect(cfg: FleetConfig) -> Result<Fleet> {
        let fleet = Fleet::observe(cfg).await?;
        fleet.join().await?;
        Ok(fleet)
    }

    /// Opens the connections a node's misses and bookkeeping use at once (each prepares the
    /// miss path as it is made), so that no early miss waits for a connection to be made (a
    /// pool makes them lazily). Best effort. For a long-lived node (`serve`); a one-shot
    /// `fetch` makes the one or two it needs.
    pub async fn warm(&self) {
        const WARM: usize = 4;
        let mut held = Vec::with_capacity(WARM);
        while held.len() < WARM {
            let Ok(c) = self.pool.get().await else { break };
            held.push(c);
        }
    }

    /// Connects and applies missing migrations without joining: for a reader of the index
    /// (`imgcache fleet nodes`), which is no node and must not appear as one. `cfg.node_url`
    /// is not used.
    pub async fn observe(cfg: FleetConfig) -> Result<Fleet> {
        let mut pg = tokio_postgres::Config::from_str(&cfg.db_url)
            .map_err(|e| FleetError::Config(e.to_string()))?;
        pg.connect_timeout(cfg.call_timeout.max(Duration::from_millis(100)));
        pg.application_name("imgcache");
        let mgr = Manager::from_config(
            pg,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(mgr)
            .max_size(8)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(cfg.call_timeout))
            .create_timeout(Some(cfg.call_timeout.max(Duration::from_millis(100))))
            .recycle_timeout(Some(cfg.call_timeout))
            .post_create(Hook::async_fn(|client, _| {
                Box::pin(async move {
                    client
                        .batch_execute(ASYNC_COMMIT)
                        .await
                        .map_err(HookError::Backend)?;
                    prepare_miss_path(client).await;
                    Ok(())
                })
            }))
            .build()
            .map_err(|e| FleetError::Config(e.to_string()))?;
        let fleet = Fleet {
            pool,
            cfg,
            instance: uuid::Uuid::new_v4().to_string(),
        };
        // Start-up may wait longer than a request would: migrations run once per version.
        let mut client = fleet.pool.get().await?;
        tokio::time::timeout(Duration::from_secs(30), migrations::migrate(&mut client))
            .await
            .map_err(|_| FleetError::TimedOut(Duration::from_secs(30)))??;
        // Made before the tables existed, perhaps: its post_create could not prepare them.
        prepare_miss_path(&client).await;
        drop(client);
        Ok(fleet)
    }

    pub fn node_url(&self) -> &str {
        &self.cfg.node_url
    }

    pub fn config(&self) -> &FleetConfig {
        &self.cfg
    }

    /// Runs one database call within `call_timeout`.
    async fn call<T, F, Fut>(&self, f: F) -> Result<T>
    where
        F: FnOnce(Object) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let budget = self.cfg.call_timeout;
        tokio::time::timeout(budget, async {
            let client = self.pool.get().await?;
            f(client).await
        })
        .await
        .map_err(|_| FleetError::TimedOut(budget))?
    }

    /// The parameters `$1`–`$4` of the statements that take a lease ([`LOOKUP_SQL`],
    /// [`TAKE_LEASE_SQL`]): the key, this node, the lease TTL and the heartbeat timeout in
    /// seconds.
    fn lease_params(&self, key: &str) -> (String, String, f64, f64) {
        (
            key.to_string(),
            self.cfg.node_url.clone(),
            self.cfg.lease_ttl.as_secs_f64(),
            self.timeout_secs(),
        )
    }

    fn timeout_secs(&self) -> f64 {
        self.cfg.heartbeat_timeout.as_secs_f64()
    }

    /// One round trip to the database (`SELECT 1`) within `call_timeout`: is the index
    /// reachable now?
    pub async fn ping(&self) -> Result<()> {
        self.call(|c| async move {
            c.query_one(&c.prepare_cached("SELECT 1").await?, &[])
                .await?;
            Ok(())
        })
        .await
    }

    /// Writes [`NODE_MARKER`] into the cache directory `root` this node serves peers from:
    /// its URL and instance, so that an `imgcache fetch` on the same directory can announce
    /// what it publishes there under this node's URL ([`Fleet::node_beside`]). Written to a
    /// temporary name and renamed, so a reader never sees half of it.
    pub fn mark_cache_dir(&self, root: &Path) -> std::io::Result<()> {
        let tmp = root.join(format!("{NODE_MARKER}.{}", std::process::id()));
        std::fs::write(&tmp, format!("{}\n{}\n", self.cfg.node_url, self.instance))?;
        std::fs::rename(&tmp, root.join(NODE_MARKER))
    }

    /// The live `serve` node whose cache directory is `root`, by the [`NODE_MARKER`] it wrote
    /// there and the index's word that the instance it names is alive; `None` when there is
    /// no marker, it is stale (that instance stopped or was replaced), or the index does not
    /// answer.
    pub async fn node_beside(&self, root: &Path) -> Option<String> {
        let text = std::fs::read_to_string(root.join(NODE_MARKER)).ok()?;
        let mut lines = text.lines();
        let (url, instance) = (lines.next()?.to_string(), lines.next()?.to_string());
        let dead = self.timeout_secs();
        let u = url.clone();
        let live = self
            .call(|c| async move {
                let row = c
                    .query_opt(
                        &c.prepare_cached(
                            "SELECT 1 FROM imgcache_nodes
                             WHERE url = $1 AND instance = $2
                               AND heartbeat >= now() - make_interval(secs => $3)",
                        )
                        .await?,
                        &[&u, &instance, &dead],
                    )
                    .await?;
                Ok(row.is_some())
            })
            .await;
        match live {
            Ok(true) => Some(url),
            Ok(false) => None,
            Err(e) => {
                tracing::debug!(error = %e, "cannot tell whether the node beside is alive");
                None
            }
        }
    }

    /// Registers this node (or takes over its URL from a dead instance). The URL's holdings
    /// are dropped: the node announces what it holds after joining.
    pub async fn join(&self) -> Result<()> {
        let (url, instance, dead) = (
            self.cfg.node_url.clone(),
            self.instance.clone(),
            self.timeout_secs(),
        );
        self.call(|c| async move {
            let row = c
                .query_opt(
                    &c.prepare_cached(
                        "INSERT INTO imgcache_nodes (url, instance) VALUES ($1, $2)
                     ON CONFLICT (url) DO UPDATE
                        SET instance = EXCLUDED.instance, started = now(), heartbeat = now(),
                            peer_url = NULL
                        WHERE imgcache_nodes.instance = EXCLUDED.instance
                           OR imgcache_nodes.heartbeat < now() - make_interval(secs => $3)
                     RETURNING instance",
                    )
                    .await?,
                    &[&url, &instance, &dead],
                )
                .await?;
            let Some(row) = row else {
                let age: f64 = c
                    .query_one(
                        &c.prepare_cached(
                            "SELECT extract(epoch FROM now() - heartbeat)::float8
                         FROM imgcache_nodes WHERE url = $1",
                        )
                        .await?,
                        &[&url],
                    )
                    .await?
                    .get(0);
                return Err(FleetError::DuplicateNode { url, age_secs: age });
            };
            debug_assert_eq!(row.get::<_, String>(0), instance);
            // Whatever this URL held before belonged to an earlier instance: the node
            // announces what it holds after joining.
            c.execute(
                &c.prepare_cached("DELETE FROM imgcache_holdings WHERE node = $1")
                    .await?,
                &[&url],
            )
            .await?;
            Ok(())
        })
        .await
    }

    /// Proves this node alive, and says when the database server started (PostgreSQL's
    /// `pg_postmaster_start_time()`): a caller that sees it change knows the server restarted
    /// since its last beat, perhaps losing its last commits (they are asynchronous, see
    /// [`ASYNC_COMMIT`]), or failed over to a replica behind it, and re-announces what it
    /// holds. Fails with [`FleetError::DuplicateNode`] if another instance took the URL over
    /// (this one was taken for dead), or the database lost this node's row: it must join
    /// again.
    pub async fn heartbeat(&self) -> Result<String> {
        let (url, instance) = (self.cfg.node_url.clone(), self.instance.clone());
        self.call(|c| async move {
            let row = c
                .query_opt(
                    &c.prepare_cached(
                        "UPDATE imgcache_nodes SET heartbeat = now() WHERE url = $1 AND instance = $2
                         RETURNING pg_postmaster_start_time()::text",
                    )
                    .await?,
                    &[&url, &instance],
                )
                .await?;
            match row {
                Some(r) => Ok(r.get(0)),
                None => Err(FleetError::DuplicateNode { url, age_secs: 0.0 }),
            }
        })
        .await
    }

    /// Says that peers read this node's images at `url`, the live `serve` whose cache
    /// directory it writes into ([`Fleet::node_beside`]): for an `imgcache fetch`, which has
    /// no peer endpoint of its own. Its holdings and its origin lease are then listed as
    /// `url`'s, so a node that finds its lease waits for its fill and follows it through the
    /// serve, and they still go when this node does (it stops heartbeating or leaves).
    pub async fn serve_through(&self, url: &str) -> Result<()> {
        let (me, instance, url) = (
            self.cfg.node_url.clone(),
            self.instance.clone(),
            url.to_string(),
        );
        self.call(|c| async move {
            c.execute(
                &c.prepare_cached(
                    "UPDATE imgcache_nodes SET peer_url = $3 WHERE url = $1 AND instance = $2",
                )
                .await?,
                &[&me, &instance, &url],
            )
            .await?;
            Ok(())
        })
        .await
    }

    /// Leaves the fleet: this node and its holdings are removed.
    pub async fn leave(&self) -> Result<()> {
        let (url, instance) = (self.cfg.node_url.clone(), self.instance.clone());
        self.call(|c| async move {
            c.execute(
                &c.prepare_cached("DELETE FROM imgcache_nodes WHERE url = $1 AND instance = $2")
                    .await?,
                &[&url, &instance],
            )
            .await?;
            Ok(())
        })
        .await
    }

    /// Live nodes, by URL.
    pub async fn nodes(&self) -> Result<Vec<Node>> {
        let dead = self.timeout_secs();
        self.call(|c| async move {
            let rows = c
                .query(
                    &c.prepare_cached(
                        "SELECT url, extract(epoch FROM now() - heartbeat)::float8
                     FROM imgcache_nodes
                     WHERE heartbeat >= now() - make_interval(secs => $1)
                     ORDER BY url",
                    )
                    .await?,
                    &[&dead],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| Node {
                    url: r.get(0),
                    heartbeat_age: r.get(1),
                })
                .collect())
        })
        .await
    }

    /// Live nodes, by URL, each with what it holds (for a status page: one grouped query).
    pub async fn node_holdings(&self) -> Result<Vec<NodeHoldings>> {
        let dead = self.timeout_secs();
        self.call(|c| async move {
            let rows = c
                .query(
                    &c.prepare_cached(
                        "SELECT n.url, extract(epoch FROM now() - n.heartbeat)::float8,
                            count(h.image_key) FILTER (WHERE h.state = 'published'),
                            count(h.image_key) FILTER (WHERE h.state = 'filling'),
                            coalesce(sum(h.bytes) FILTER (WHERE h.state = 'published'), 0)::int8
                     FROM imgcache_nodes n LEFT JOIN imgcache_holdings h ON h.node = n.url
                     WHERE n.heartbeat >= now() - make_interval(secs => $1)
                     GROUP BY n.url, n.heartbeat
                     ORDER BY n.url",
                    )
                    .await?,
                    &[&dead],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| NodeHoldings {
                    node: Node {
                        url: r.get(0),
                        heartbeat_age: r.get(1),
                    },
                    published: r.get::<_, i64>(2) as u64,
                    filling: r.get::<_, i64>(3) as u64,
                    published_bytes: r.get::<_, i64>(4) as u64,
                })
                .collect())
        })
        .await
    }

    /// Live nodes holding or filling `key`: published ones first, then fillers with the most
    /// bytes first.
    pub async fn holders(&self, key: &str) -> Result<Vec<Holding>> {
        let (key, dead) = (key.to_string(), self.timeout_secs());
        self.call(|c| async move {
            let rows = c
                .query(
                    &c.prepare_cached(
                        "SELECT coalesce(n.peer_url, h.node), h.state, h.size, h.checksum, h.bytes
                     FROM imgcache_holdings h JOIN imgcache_nodes n ON n.url = h.node
                     WHERE h.image_key = $1
                       AND n.heartbeat >= now() - make_interval(secs => $2)
                     ORDER BY (h.state = 'published') DESC, h.bytes DESC, 1",
                    )
                    .await?,
                    &[&key, &dead],
                )
                .await?;
            let mut found = Vec::new();
            rows.iter()
                .for_each(|r| add_holding(&mut found, holding(r)));
            Ok(found)
        })
        .await
    }

    /// What a miss asks the index, in one round trip: the live holders of `key` other than
    /// this node (ranked as [`Fleet::holders`] ranks them), and, only when there are none,
    /// the origin lease as [`Fleet::take_lease`] takes it. When holders are listed no lease is
    /// taken: the miss tries them first and takes the lease with [`Fleet::take_lease`] only if
    /// none serves.
    ///
    /// One statement (a data-modifying CTE) rather than two calls: a miss's time to its
    /// source is one pool checkout and one round trip, not two.
    pub async fn lookup(&self, key: &str) -> Result<Lookup> {
        let (key, me, ttl, dead) = self.lease_params(key);
        self.call(|c| async move {
            let rows = c
                .query(
                    &c.prepare_cached(LOOKUP_SQL).await?,
                    &[&key, &me, &ttl, &dead],
                )
                .await?;
            let mut found = Lookup::default();
            for r in &rows {
                match r.get::<_, Option<i64>>(5) {
                    Some(generation) => {
                        found.lease = Some(Lease {
                            key: key.clone(),
                            generation,
                        })
                    }
                    None => add_holding(&mut found.holders, holding(r)),
                }
            }
            Ok(found)
        })
        .await
    }

    /// Records that this node holds or is filling `key`.
    pub async fn announce(
        &self,
        key: &str,
        state: HoldingState,
        size: Option<u64>,
        checksum: Option<&str>,
        bytes: u64,
    ) -> Result<()> {
        let node = self.cfg.node_url.clone();
        self.announce_for(&node, key, state, size, checksum, bytes)
            .await
    }

    /// Records that the live node `node` holds `key`: for an `imgcache fetch` that wrote the
    /// image into the cache directory `node` serves peers from ([`Fleet::node_beside`]).
    pub async fn announce_for(
        &self,
        node: &str,
        key: &str,
        state: HoldingState,
        size: Option<u64>,
        checksum: Option<&str>,
        bytes: u64,
    ) -> Result<()> {
        let (key, node) = (key.to_string(), node.to_string());
        let checksum = checksum.map(str::to_owned);
        let size = size.map(|s| s as i64);
        self.call(|c| async move {
            c.execute(
                &c.prepare_cached(
                    "INSERT INTO imgcache_holdings (image_key, node, state, size, checksum, bytes)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (image_key, node) DO UPDATE
                    SET state = EXCLUDED.state, size = EXCLUDED.size,
                        checksum = EXCLUDED.checksum, bytes = EXCLUDED.bytes, updated = now()",
                )
                .await?,
                &[
                    &key,
                    &node,
                    &state.as_str(),
                    &size,
                    &checksum,
                    &(bytes as i64),
                ],
            )
            .await?;
            Ok(())
        })
        .await
    }

    /// How far this node's fill of `key` has got: updates the bytes of its `filling`
    /// holding only (never creates one, never touches a published one), so a late update can
    /// never undo a newer state.
    pub async fn filling_progress(&self, key: &str, bytes: u64) -> Result<()> {
        let (key, node) = (key.to_string(), self.cfg.node_url.clone());
        self.call(|c| async move {
            c.execute(
                &c.prepare_cached(
                    "UPDATE imgcache_holdings SET bytes = $3, updated = now()
                 WHERE image_key = $1 AND node = $2 AND state = 'filling' AND bytes < $3",
                )
                .await?,
                &[&key, &node, &(bytes as i64)],
            )
            .await?;
            Ok(())
        })
        .await
    }

    /// Records that this node no longer holds `key`.
    pub async fn withdraw(&self, key: &str) -> Result<()> {
        let (key, node) = (key.to_string(), self.cfg.node_url.clone());
        self.call(|c| async move {
            c.execute(
                &c.prepare_cached(
                    "DELETE FROM imgcache_holdings WHERE image_key = $1 AND node = $2",
                )
                .await?,
                &[&key, &node],
            )
            .await?;
            Ok(())
        })
        .await
    }

    /// The keys the index lists this node as holding published: what a node checks against
    /// its cache directory ([`Fleet::announce`] and [`Fleet::withdraw`] mend the difference).
    pub async fn published_here(&self) -> Result<Vec<String>> {
        let node = self.cfg.node_url.clone();
        self.call(|c| async move {
            let rows = c
                .query(
                    &c.prepare_cached(
                        "SELECT image_key FROM imgcache_holdings
                         WHERE node = $1 AND state = 'published'",
                    )
                    .await?,
                    &[&node],
                )
                .await?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
        .await
    }

    /// Where the holder of `key`'s origin lease (unexpired), if any, is read from by peers:
    /// its URL, or the serve it writes beside ([`Fleet::serve_through`]).
    pub async fn lease_holder(&self, key: &str) -> Result<Option<String>> {
        let key = key.to_string();
        self.call(|c| async move {
            let row = c
                .query_opt(
                    &c.prepare_cached(
                        "SELECT coalesce(n.peer_url, l.holder)
                         FROM imgcache_leases l LEFT JOIN imgcache_nodes n ON n.url = l.holder
                         WHERE l.image_key = $1 AND l.expires_at > now()",
                    )
                    .await?,
                    &[&key],
                )
                .await?;
            Ok(row.map(|r| r.get(0)))
        })
        .await
    }

    /// Takes the origin-download lease of `key`: `Some` with a new generation when there was
    /// none, the last one expired (by the database's clock) or its holder is dead (no
    /// heartbeat within `heartbeat_timeout`, or gone from the fleet), `None` while a live
    /// node holds it.
    pub async fn take_lease(&self, key: &str) -> Result<Option<Lease>> {
        let (key, holder, ttl, dead) = self.lease_params(key);
        self.call(|c| async move {
            let row = c
                .query_opt(
                    &c.prepare_cached(TAKE_LEASE_SQL).await?,
                    &[&key, &holder, &ttl, &dead],
                )
                .await?;
            Ok(row.map(|r| Lease {
                key,
                generation: r.get(0),
            }))
        })
        .await
    }

    /// Extends `lease` by the TTL; [`FleetError::LeaseLost`] when it is no longer this node's
    /// at that generation.
    pub async fn renew(&self, lease: &Lease) -> Result<()> {
        let (key, holder, generation, ttl) = (
            lease.key.clone(),
            self.cfg.node_url.clone(),
            lease.generation,
            self.cfg.lease_ttl.as_secs_f64(),
        );
        self.call(|c| async move {
            let n = c
                .execute(
                    &c.prepare_cached(
                        "UPDATE imgcache_leases SET expires_at = now() + make_interval(secs => $4)
                     WHERE image_key = $1 AND holder = $2 AND generation = $3
                       AND expires_at >= now()",
                    )
                    .await?,
                    &[&key, &holder, &generation, &ttl],
                )
                .await?;
            if n == 0 {
                return Err(FleetError::LeaseLost { key, generation });
            }
            Ok(())
        })
        .await
    }

    /// Gives `lease` up (the download ended), so the next miss need not wait for it to
    /// expire. The row stays, expired, so the key's generations only ever grow.
    pub async fn release(&self, lease: &Lease) -> Result<()> {
        let (key, holder, generation) = (
            lease.key.clone(),
            self.cfg.node_url.clone(),
            lease.generation,
        );
        self.call(|c| async move {
            c.execute(
                &c.prepare_cached(
                    "UPDATE imgcache_leases SET expires_at = now()
                 WHERE image_key = $1 AND holder = $2 AND generation = $3",
                )
                .await?,
                &[&key, &holder, &generation],
            )
            .await?;
            Ok(())
        })
        .await
    }

    /// Removes nodes dead for longer than the heartbeat timeout, and their holdings.
    pub async fn drop_dead_nodes(&self) -> Result<u64> {
        let dead = self.timeout_secs();
        self.call(|c| async move {
            Ok(c.execute(
                &c.prepare_cached(
                    "DELETE FROM imgcache_nodes
                 WHERE heartbeat < now() - make_interval(secs => $1)",
                )
                .await?,
                &[&dead],
            )
            .await?)
        })
        .await
    }
}
