//! The fleet index: many imgcache nodes sharing one PostgreSQL database as the index of who
//! holds which image, who is filling it, and who may download it from the origin, the way
//! Ironic and Glance coordinate through their SQL databases. There is no coordinator of our
//! own: every decision is one SQL statement checked against the database's clock.
//!
//! - **Nodes** (`imgcache_nodes`, `nodes.rs`): a node joins with its URL and a random
//!   instance id, and heartbeats; one whose heartbeat is older than `heartbeat_timeout` is
//!   dead, dropped from every answer, and its URL may be taken by a new instance. A live
//!   node's URL cannot be taken (a second node started with the same `--node-url` is refused).
//! - **Holdings** (`imgcache_holdings`, `holdings.rs`): which node holds (`published`) or is
//!   filling (`filling`, with the bytes so far) an image key.
//! - **Leases** (`imgcache_leases`, `lease.rs`): the right to download one key from the
//!   origin, taken by a conditional insert that only succeeds when no lease exists or the
//!   current one has expired, and that returns a generation: the fencing token a renewal
//!   must present.
//!
//! Each node's own records stay in its local driver: the index is consulted on a miss, never
//! on a hit, and every call is bounded by `call_timeout` (250 ms by default), so a database
//! outage costs a miss one bounded wait and a hit nothing. The SQL needs no advisory locks,
//! `LISTEN` or other PostgreSQL-only coordination, so a MariaDB backend can follow.

pub mod error;
// First: its `lease_taken_over!` is part of `holdings`' lookup statement too.
#[macro_use]
mod lease;
mod holdings;
pub mod migrations;
mod nodes;
pub mod source;

use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{
    Hook, HookError, Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime,
};
use tokio_postgres::NoTls;

pub use error::{FleetError, Result};
pub use holdings::{Holding, HoldingState, Lookup};
pub use lease::Lease;
pub use nodes::{Node, NodeHoldings};

use holdings::LOOKUP_SQL;
use lease::TAKE_LEASE_SQL;

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
}
