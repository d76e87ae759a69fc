//! What can go wrong with the fleet index, as an operator reads it.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The database did not answer in time, or the connection failed: callers go on without
    /// the fleet (a miss goes to the origin), and bookkeeping is replayed later.
    #[error("fleet database unavailable: {0}")]
    Unavailable(String),
    #[error("fleet database call timed out after {0:?}")]
    TimedOut(Duration),
    /// Another live node already uses this node URL.
    #[error(
        "node URL {url} is already used by a live node (last heartbeat {age_secs:.1}s ago): \
         give each node its own --node-url"
    )]
    DuplicateNode { url: String, age_secs: f64 },
    /// The lease was taken over (it expired, or another node fenced it with a newer
    /// generation): stop writing as its holder.
    #[error("lease on {key} lost (generation {generation} is no longer current)")]
    LeaseLost { key: String, generation: i64 },
    #[error("fleet database schema: {0}")]
    Migration(String),
    #[error("fleet database URL: {0}")]
    Config(String),
}

impl From<tokio_postgres::Error> for FleetError {
    fn from(e: tokio_postgres::Error) -> Self {
        FleetError::Unavailable(chain(&e))
    }
}

impl From<deadpool_postgres::PoolError> for FleetError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        FleetError::Unavailable(chain(&e))
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

pub type Result<T> = std::result::Result<T, FleetError>;
