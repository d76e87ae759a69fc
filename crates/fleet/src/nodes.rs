//! Nodes (`imgcache_nodes`): joining under a URL no live node holds, heartbeats, leaving, the
//! marker a `serve` writes into its cache directory, and the list of live nodes.

use std::path::Path;

use crate::{Fleet, FleetError, NODE_MARKER, Result};

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

impl Fleet {
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
    /// `ASYNC_COMMIT` in lib.rs), or failed over to a replica behind it, and re-announces what it
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
