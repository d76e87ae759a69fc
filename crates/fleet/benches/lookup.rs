//! What a fleet miss spends in the index before it knows its source, against one database
//! round trip measured in the same run.
//!
//! `cargo bench -p imgcache-fleet --bench lookup` starts a throwaway PostgreSQL (the test
//! kit's), joins 5 nodes holding 2,000 images each, then times, on node 1, for fresh keys
//! (every one a miss), interleaved so that the machine's drift hits each alike:
//! - `ping`: `SELECT 1` through the pool: the floor, one checkout and one round trip;
//! - `two calls`: `holders` then `take_lease`, what a miss made before `lookup`;
//! - `lookup`: the one statement a miss makes now (it takes the lease, nobody holding it);
//! - `lookup, held`: `lookup` of a key another node holds (lists it, takes no lease).
//!
//! Prints p50, p99 and max per operation, and each p50 and p99 as a ratio to `ping`'s.
//! `ROUNDS` (default 3000) sets the number of samples per operation; `FSYNC=on` runs the
//! server with its commits flushed to disk, as in production (the test kit's default is off).
//! `GAP_MS=N` idles N ms before each timed call, as a node's misses come (a serve node's
//! lookups are apart, not back to back): the client, the pool's connection and the server's
//! backend are then woken from sleep for each call, and `ping` shows what that costs any
//! round trip on this machine.

use std::time::{Duration, Instant};

use imgcache_fleet::{Fleet, FleetConfig, HoldingState};
use imgcache_testkit::postgres::Postgres;

const NODES: usize = 5;
const HELD_PER_NODE: usize = 2000;

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    sorted[i - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[tokio::main]
async fn main() {
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    let gap = Duration::from_millis(
        std::env::var("GAP_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    );
    // FSYNC=on: commits flushed to disk, as on a production server.
    let durable = std::env::var("FSYNC").is_ok_and(|v| v == "on");
    let pg = if durable {
        Postgres::start_durable()
    } else {
        Postgres::start()
    }
    .unwrap_or_else(|e| panic!("PostgreSQL for the bench: {e}"));
    let mut nodes = Vec::new();
    for n in 0..NODES {
        let mut cfg = FleetConfig::new(pg.url(), format!("http://node{n}:9292"));
        // Generous: a loaded machine must not turn a slow call into a failed sample.
        cfg.call_timeout = Duration::from_secs(5);
        nodes.push(Fleet::connect(cfg).await.expect("join"));
    }
    for (n, f) in nodes.iter().enumerate() {
        for i in 0..HELD_PER_NODE {
            f.announce(
                &format!("held-{n}-{i}"),
                HoldingState::Published,
                Some(1 << 30),
                Some("sha256:00"),
                1 << 30,
            )
            .await
            .expect("announce");
        }
    }
    let me = &nodes[0];
    // Warm the pool and the prepared statements.
    for i in 0..200 {
        me.ping().await.unwrap();
        me.holders(&format!("warm-{i}")).await.unwrap();
        me.take_lease(&format!("warm-{i}")).await.unwrap();
        me.lookup(&format!("warm2-{i}")).await.unwrap();
    }

    let names = ["ping", "two calls", "lookup", "lookup, held"];
    let mut took: [Vec<Duration>; 4] = Default::default();
    for r in 0..rounds {
        idle(gap).await;
        let t = Instant::now();
        me.ping().await.unwrap();
        took[0].push(t.elapsed());

        let key = format!("two-{r}");
        idle(gap).await;
        let t = Instant::now();
        assert!(me.holders(&key).await.unwrap().is_empty());
        assert!(me.take_lease(&key).await.unwrap().is_some());
        took[1].push(t.elapsed());

        let key = format!("one-{r}");
        idle(gap).await;
        let t = Instant::now();
        assert!(me.lookup(&key).await.unwrap().lease.is_some());
        took[2].push(t.elapsed());

        let key = format!("held-1-{}", r % HELD_PER_NODE);
        idle(gap).await;
        let t = Instant::now();
        let seen = me.lookup(&key).await.unwrap();
        took[3].push(t.elapsed());
        assert_eq!(seen.holders.len(), 1);
        assert_eq!(seen.lease, None);
    }

    for t in took.iter_mut() {
        t.sort();
    }
    let (p50, p99) = (quantile(&took[0], 0.5), quantile(&took[0], 0.99));
    println!(
        "fleet lookup: {rounds} samples per operation, {NODES} nodes x {HELD_PER_NODE} holdings, \
         PostgreSQL on loopback, fsync {}, {} ms idle before each call",
        if durable { "on" } else { "off" },
        gap.as_millis()
    );
    println!(
        "{:<14} {:>9} {:>9} {:>9} {:>12} {:>12}",
        "operation", "p50 ms", "p99 ms", "max ms", "p50 / ping", "p99 / ping"
    );
    for (name, t) in names.iter().zip(&took) {
        let (a, b) = (quantile(t, 0.5), quantile(t, 0.99));
        println!(
            "{:<14} {:>9.3} {:>9.3} {:>9.3} {:>12.2} {:>12.2}",
            name,
            ms(a),
            ms(b),
            ms(*t.last().unwrap()),
            ms(a) / ms(p50),
            ms(b) / ms(p99)
        );
    }
}

/// Idles `gap` (nothing when zero).
async fn idle(gap: Duration) {
    if !gap.is_zero() {
        tokio::time::sleep(gap).await;
    }
}
