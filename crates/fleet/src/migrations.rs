//! Versioned schema migrations, applied at start by whichever node gets there first: the
//! version table is locked (`LOCK TABLE ... IN EXCLUSIVE MODE`, held to the end of the
//! transaction) while the missing steps run, so nodes starting together apply each step
//! once. Plain SQL with no advisory locks, so a MariaDB backend can follow (`LOCK TABLES`).

use tokio_postgres::Client;

use crate::error::{FleetError, Result};

/// Each step, in order; step N brings the schema to version N+1. Never edit a released step:
/// add one.
pub const STEPS: &[&str] = &[
    // 1: nodes, their holdings, and one-download leases.
    "CREATE TABLE imgcache_nodes (
        url        TEXT PRIMARY KEY,
        instance   TEXT NOT NULL,
        started    TIMESTAMPTZ NOT NULL DEFAULT now(),
        heartbeat  TIMESTAMPTZ NOT NULL DEFAULT now()
    );
    CREATE TABLE imgcache_holdings (
        image_key  TEXT NOT NULL,
        node       TEXT NOT NULL REFERENCES imgcache_nodes(url) ON DELETE CASCADE,
        state      TEXT NOT NULL CHECK (state IN ('filling', 'published')),
        size       BIGINT,
        checksum   TEXT,
        bytes      BIGINT NOT NULL DEFAULT 0,
        updated    TIMESTAMPTZ NOT NULL DEFAULT now(),
        PRIMARY KEY (image_key, node)
    );
    CREATE INDEX imgcache_holdings_node ON imgcache_holdings(node);
    CREATE TABLE imgcache_leases (
        image_key  TEXT PRIMARY KEY,
        holder     TEXT NOT NULL,
        generation BIGINT NOT NULL,
        expires_at TIMESTAMPTZ NOT NULL
    );",
    // 2: where peers read a node's images when it has no peer endpoint of its own (an
    // `imgcache fetch` beside a `serve`: that serve's URL); NULL for the node's own URL.
    "ALTER TABLE imgcache_nodes ADD COLUMN peer_url TEXT",
];

/// Brings the database to the latest version; returns the version it was at.
pub async fn migrate(client: &mut Client) -> Result<usize> {
    // Two nodes creating the table at once can collide in the catalog even with IF NOT
    // EXISTS (PostgreSQL raises a unique violation): the loser looks again.
    let mut tries = 0;
    loop {
        match client
            .batch_execute("CREATE TABLE IF NOT EXISTS imgcache_schema (version INTEGER NOT NULL)")
            .await
        {
            Ok(()) => break,
            Err(_) if tries < 3 => tries += 1,
            Err(e) => return Err(FleetError::Migration(FleetError::from(e).to_string())),
        }
    }
    let tx = client.transaction().await?;
    // The schema is the one thing here that is not soft state: its commit is flushed even
    // though the pool's connections commit asynchronously (`ASYNC_COMMIT` in lib.rs), and the
    // flush makes the schema table's creation above durable with it.
    tx.batch_execute(
        "SET LOCAL synchronous_commit = on; LOCK TABLE imgcache_schema IN EXCLUSIVE MODE",
    )
    .await?;
    let row = tx
        .query_opt("SELECT version FROM imgcache_schema", &[])
        .await?;
    let at = match row {
        Some(r) => r.get::<_, i32>(0) as usize,
        None => {
            tx.execute("INSERT INTO imgcache_schema (version) VALUES (0)", &[])
                .await?;
            0
        }
    };
    if at > STEPS.len() {
        return Err(FleetError::Migration(format!(
            "the database is at schema version {at}, newer than this imgcache ({}): upgrade \
             this node",
            STEPS.len()
        )));
    }
    for (i, step) in STEPS.iter().enumerate().skip(at) {
        tx.batch_execute(step).await.map_err(|e| {
            FleetError::Migration(format!("step {}: {}", i + 1, FleetError::from(e)))
        })?;
        tracing::info!(version = i + 1, "fleet database schema migrated");
    }
    tx.execute(
        "UPDATE imgcache_schema SET version = $1",
        &[&(STEPS.len() as i32)],
    )
    .await?;
    tx.commit().await?;
    Ok(at)
}
