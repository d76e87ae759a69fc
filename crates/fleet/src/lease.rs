//! Leases (`imgcache_leases`): the right to download one key from the origin, taken by a
//! conditional insert that returns a generation (the fencing token), renewed by its holder
//! and released at the end; free once expired or once its holder is dead.

use crate::{Fleet, FleetError, Result};

/// The right to download one key from the origin, until `ttl` after the last renewal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub key: String,
    /// The fencing token: a renewal or release with an older generation fails.
    pub generation: i64,
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

/// [`Fleet::take_lease`]'s statement.
pub(crate) const TAKE_LEASE_SQL: &str = concat!(
    "INSERT INTO imgcache_leases (image_key, holder, generation, expires_at)
     VALUES ($1, $2, 1, now() + make_interval(secs => $3)) ",
    lease_taken_over!(),
    " RETURNING generation"
);

impl Fleet {
    /// The parameters `$1`–`$4` of the statements that take a lease ([`LOOKUP_SQL`],
    /// [`TAKE_LEASE_SQL`]): the key, this node, the lease TTL and the heartbeat timeout in
    /// seconds.
    pub(crate) fn lease_params(&self, key: &str) -> (String, String, f64, f64) {
        (
            key.to_string(),
            self.cfg.node_url.clone(),
            self.cfg.lease_ttl.as_secs_f64(),
            self.timeout_secs(),
        )
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
}
