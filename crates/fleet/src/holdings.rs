//! Holdings (`imgcache_holdings`): who holds or is filling a key, announced and withdrawn by
//! each node, and a miss's one lookup (holders, else the origin lease).

use crate::{Fleet, Lease, Result};

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

/// What a miss learns from the index in one call ([`Fleet::lookup`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Lookup {
    /// Live holders other than this node, best first.
    pub holders: Vec<Holding>,
    /// The origin lease, taken because nobody holds the key; `None` when holders are listed
    /// or another live node holds the lease.
    pub lease: Option<Lease>,
}

/// A miss's one statement ([`Fleet::lookup`]).
pub(crate) const LOOKUP_SQL: &str = concat!(
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

impl Fleet {
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
}
