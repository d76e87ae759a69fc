//! The fleet index against a real PostgreSQL server (started by the test kit): migrations,
//! node liveness, holdings, and one-download leases with fencing.

use std::time::{Duration, Instant};

use imgcache_fleet::{Fleet, FleetConfig, FleetError, HoldingState};
use imgcache_testkit::postgres::Postgres;

fn pg() -> Postgres {
    // Never skipped: CI installs PostgreSQL (.ci/run).
    Postgres::start().unwrap_or_else(|e| panic!("PostgreSQL for the fleet tests: {e}"))
}

fn cfg(pg: &Postgres, node: &str) -> FleetConfig {
    let mut c = FleetConfig::new(pg.url(), node);
    c.heartbeat_timeout = Duration::from_secs(2);
    c.lease_ttl = Duration::from_millis(600);
    c
}

#[tokio::test]
async fn nodes_join_once_per_url_and_leave_when_silent() {
    let pg = pg();
    // Two nodes starting at once both migrate safely (the schema table is locked).
    let (a, b) = tokio::join!(
        Fleet::connect(cfg(&pg, "http://a:9292")),
        Fleet::connect(cfg(&pg, "http://b:9292"))
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let urls = |n: Vec<imgcache_fleet::Node>| n.into_iter().map(|n| n.url).collect::<Vec<_>>();
    assert_eq!(
        urls(a.nodes().await.unwrap()),
        ["http://a:9292", "http://b:9292"]
    );

    // A second live node with a's URL is refused, saying why.
    let dup = Fleet::connect(cfg(&pg, "http://a:9292")).await.unwrap_err();
    assert!(matches!(dup, FleetError::DuplicateNode { .. }), "{dup}");
    assert!(
        dup.to_string().contains("already used by a live node"),
        "{dup}"
    );

    // b holds an image; once b stops heartbeating it drops out of every answer.
    b.announce(
        "img1",
        HoldingState::Published,
        Some(10),
        Some("sha256:ab"),
        10,
    )
    .await
    .unwrap();
    assert_eq!(a.holders("img1").await.unwrap().len(), 1);
    let silent_since = Instant::now();
    loop {
        a.heartbeat().await.unwrap();
        if a.holders("img1").await.unwrap().is_empty() {
            break;
        }
        assert!(
            silent_since.elapsed() < Duration::from_secs(5),
            "b never dropped out"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let gone = silent_since.elapsed();
    assert!(
        gone >= Duration::from_secs(2) - Duration::from_millis(200),
        "{gone:?}"
    );
    assert_eq!(urls(a.nodes().await.unwrap()), ["http://a:9292"]);
    // A dead node's URL can be taken by a new instance; the old one learns it on heartbeat.
    let b2 = Fleet::connect(cfg(&pg, "http://b:9292")).await.unwrap();
    assert!(matches!(
        b.heartbeat().await,
        Err(FleetError::DuplicateNode { .. })
    ));
    b2.heartbeat().await.unwrap();
    assert!(
        b2.holders("img1").await.unwrap().is_empty(),
        "the dead instance's holdings are gone"
    );
    assert_eq!(a.drop_dead_nodes().await.unwrap(), 0);
    b2.leave().await.unwrap();
    assert_eq!(urls(a.nodes().await.unwrap()), ["http://a:9292"]);
}

#[tokio::test]
async fn one_lease_per_key_fenced_by_generation() {
    let pg = pg();
    let a = Fleet::connect(cfg(&pg, "http://a:1")).await.unwrap();
    let b = Fleet::connect(cfg(&pg, "http://b:1")).await.unwrap();

    // Taken by exactly one of many concurrent tries.
    let tries = futures_util::future::join_all((0..8).map(|i| {
        let f = if i % 2 == 0 { a.clone() } else { b.clone() };
        async move { f.take_lease("k").await.unwrap() }
    }))
    .await;
    let won: Vec<_> = tries.into_iter().flatten().collect();
    assert_eq!(won.len(), 1, "{won:?}");
    let first = won[0].clone();
    assert_eq!(first.generation, 1);
    let (holder, other) =
        if a.take_lease("k").await.unwrap().is_none() && a.renew(&first).await.is_ok() {
            (&a, &b)
        } else {
            (&b, &a)
        };
    holder.renew(&first).await.unwrap();
    assert_eq!(
        other.take_lease("k").await.unwrap(),
        None,
        "held and renewed"
    );

    // The holder stops renewing: the lease expires by the database's clock, the other node
    // takes it with a new generation, and the old holder is fenced off.
    let stopped = Instant::now();
    let second = loop {
        if let Some(l) = other.take_lease("k").await.unwrap() {
            break l;
        }
        assert!(stopped.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        stopped.elapsed() <= Duration::from_millis(600 + 400),
        "{:?}",
        stopped.elapsed()
    );
    assert_eq!(second.generation, 2);
    let lost = holder.renew(&first).await.unwrap_err();
    assert!(
        matches!(lost, FleetError::LeaseLost { generation: 1, .. }),
        "{lost}"
    );
    // Releasing the stale lease does nothing; the current holder's release frees the key,
    // and generations keep growing.
    holder.release(&first).await.unwrap();
    assert_eq!(holder.take_lease("k").await.unwrap(), None);
    other.release(&second).await.unwrap();
    assert_eq!(holder.take_lease("k").await.unwrap().unwrap().generation, 3);
}

#[tokio::test]
async fn a_dead_holders_lease_is_free_before_it_expires() {
    let pg = pg();
    let mut long = cfg(&pg, "http://dies:1");
    long.lease_ttl = Duration::from_secs(600);
    let dies = Fleet::connect(long).await.unwrap();
    let other = Fleet::connect(cfg(&pg, "http://other:1")).await.unwrap();
    let held = dies.take_lease("k").await.unwrap().expect("free");
    assert_eq!(
        other.take_lease("k").await.unwrap(),
        None,
        "its holder lives"
    );
    // The holder stops heartbeating (killed): past the heartbeat timeout (2 s) its lease is
    // free, long before its 600 s expiry; the dead holder is fenced off.
    let stopped = Instant::now();
    let taken = loop {
        other.heartbeat().await.unwrap();
        if let Some(l) = other.take_lease("k").await.unwrap() {
            break l;
        }
        assert!(stopped.elapsed() < Duration::from_secs(6), "not taken over");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        stopped.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        stopped.elapsed()
    );
    assert_eq!(taken.generation, held.generation + 1);
    assert!(matches!(
        dies.renew(&held).await.unwrap_err(),
        FleetError::LeaseLost { .. }
    ));
    // A holder that left the fleet frees its lease at once.
    other.leave().await.unwrap();
    let third = Fleet::connect(cfg(&pg, "http://third:1")).await.unwrap();
    assert_eq!(
        third.take_lease("k").await.unwrap().map(|l| l.generation),
        Some(taken.generation + 1)
    );
}

#[tokio::test]
async fn holders_rank_published_first_and_calls_are_bounded_when_the_database_is_down() {
    let pg = pg();
    let a = Fleet::connect(cfg(&pg, "http://a:1")).await.unwrap();
    let b = Fleet::connect(cfg(&pg, "http://b:1")).await.unwrap();
    let c = Fleet::connect(cfg(&pg, "http://c:1")).await.unwrap();
    a.announce("k", HoldingState::Filling, Some(100), None, 40)
        .await
        .unwrap();
    b.announce(
        "k",
        HoldingState::Published,
        Some(100),
        Some("sha256:cd"),
        100,
    )
    .await
    .unwrap();
    let h = c.holders("k").await.unwrap();
    assert_eq!(
        h.iter()
            .map(|h| (h.node.as_str(), h.state))
            .collect::<Vec<_>>(),
        [
            ("http://b:1", HoldingState::Published),
            ("http://a:1", HoldingState::Filling)
        ]
    );
    assert_eq!(h[0].checksum.as_deref(), Some("sha256:cd"));
    a.withdraw("k").await.unwrap();
    assert_eq!(c.holders("k").await.unwrap().len(), 1);

    // The database goes away: every call fails within the call timeout, with a clear error.
    let before = b.heartbeat().await.unwrap();
    pg.stop_immediate().unwrap();
    for _ in 0..3 {
        let t = Instant::now();
        let e = c.holders("k").await.unwrap_err();
        assert!(
            t.elapsed() < Duration::from_millis(400),
            "{:?}",
            t.elapsed()
        );
        assert!(
            matches!(e, FleetError::Unavailable(_) | FleetError::TimedOut(_)),
            "{e}"
        );
    }
    // It comes back: the pool reconnects, and b's heartbeat says the server restarted (its
    // last commits, asynchronous, may be lost: b's row among them, then b joins again), so b
    // announces what it holds again, as a node does.
    pg.resume().unwrap();
    let t = Instant::now();
    let after = loop {
        match b.heartbeat().await {
            Ok(started) => break started,
            Err(FleetError::DuplicateNode { .. }) => b.join().await.unwrap(),
            Err(_) if t.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("no reconnect: {e}"),
        }
    };
    assert_ne!(before, after, "the restart shows in the heartbeat");
    b.announce(
        "k",
        HoldingState::Published,
        Some(100),
        Some("sha256:cd"),
        100,
    )
    .await
    .unwrap();
    let h = c.holders("k").await.unwrap();
    assert_eq!(h.len(), 1, "{h:?}");
}

#[tokio::test]
async fn node_holdings_count_each_live_nodes_images() {
    let pg = pg();
    let a = Fleet::connect(cfg(&pg, "http://a:9292")).await.unwrap();
    let b = Fleet::connect(cfg(&pg, "http://b:9292")).await.unwrap();
    a.announce("img1", HoldingState::Published, Some(10), None, 10)
        .await
        .unwrap();
    a.announce("img2", HoldingState::Published, Some(32), None, 32)
        .await
        .unwrap();
    a.announce("img3", HoldingState::Filling, Some(100), None, 7)
        .await
        .unwrap();
    let all = a.node_holdings().await.unwrap();
    let got: Vec<_> = all
        .iter()
        .map(|n| {
            (
                n.node.url.as_str(),
                n.published,
                n.filling,
                n.published_bytes,
            )
        })
        .collect();
    // b holds nothing and is still listed; a filling image's bytes are not counted as held.
    assert_eq!(
        got,
        [("http://a:9292", 2, 1, 42), ("http://b:9292", 0, 0, 0)]
    );
    assert!(all.iter().all(|n| n.node.heartbeat_age >= 0.0));
    drop(b);
}

#[tokio::test]
async fn a_lookup_lists_holders_or_takes_the_lease_in_one_call() {
    let pg = pg();
    let a = Fleet::connect(cfg(&pg, "http://a:1")).await.unwrap();
    let b = Fleet::connect(cfg(&pg, "http://b:1")).await.unwrap();
    let c = Fleet::connect(cfg(&pg, "http://c:1")).await.unwrap();

    // Nobody holds "k": of many concurrent lookups exactly one comes back with the lease, and
    // none lists a holder.
    let looks = futures_util::future::join_all((0..9).map(|i| {
        let f = [&a, &b, &c][i % 3].clone();
        async move { f.lookup("k").await.unwrap() }
    }))
    .await;
    assert!(looks.iter().all(|l| l.holders.is_empty()), "{looks:?}");
    let leases: Vec<_> = looks.iter().filter_map(|l| l.lease.clone()).collect();
    assert_eq!(leases.len(), 1, "{looks:?}");
    assert_eq!(leases[0].generation, 1);

    // Once holders are listed, a lookup takes no lease (the miss tries them first), and a
    // node never lists itself: ranked published first, then the filler furthest along.
    a.announce("j", HoldingState::Filling, Some(100), None, 10)
        .await
        .unwrap();
    b.announce("j", HoldingState::Filling, Some(100), None, 70)
        .await
        .unwrap();
    c.announce("j", HoldingState::Published, Some(100), Some("md5:00"), 100)
        .await
        .unwrap();
    let seen = a.lookup("j").await.unwrap();
    let nodes: Vec<_> = seen.holders.iter().map(|h| h.node.as_str()).collect();
    assert_eq!(nodes, ["http://c:1", "http://b:1"]);
    assert_eq!(seen.holders[0].checksum.as_deref(), Some("md5:00"));
    assert_eq!(seen.lease, None);
    assert_eq!(
        b.take_lease("j").await.unwrap().map(|l| l.generation),
        Some(1),
        "the lookups took no lease on j"
    );

    // A holder that went silent is no holder: past the heartbeat timeout the lookup of "m"
    // held only by b takes the lease.
    b.announce("m", HoldingState::Published, Some(1), None, 1)
        .await
        .unwrap();
    assert_eq!(a.lookup("m").await.unwrap().holders.len(), 1);
    let silent = Instant::now();
    let taken = loop {
        a.heartbeat().await.unwrap();
        let l = a.lookup("m").await.unwrap();
        if l.holders.is_empty() {
            break l.lease;
        }
        assert!(silent.elapsed() < Duration::from_secs(6), "b never dropped");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(taken.map(|l| l.generation), Some(1));
}

#[tokio::test]
async fn a_fetch_beside_a_serve_is_read_through_the_serve() {
    let pg = pg();
    let serve = Fleet::connect(cfg(&pg, "http://s:9292")).await.unwrap();
    let other = Fleet::connect(cfg(&pg, "http://o:9292")).await.unwrap();
    let fetch = Fleet::connect(cfg(&pg, "fetch://host/42")).await.unwrap();
    fetch.serve_through("http://s:9292").await.unwrap();
    // The fetch takes the origin lease and starts filling: another node that finds the
    // lease is told where to follow it (the serve), and lists the fill under the serve.
    let l = fetch.lookup("img").await.unwrap();
    assert!(l.lease.is_some());
    assert_eq!(
        other.lease_holder("img").await.unwrap().as_deref(),
        Some("http://s:9292")
    );
    fetch
        .announce("img", HoldingState::Filling, Some(10), Some("sha256:ab"), 0)
        .await
        .unwrap();
    let found = other.lookup("img").await.unwrap();
    assert_eq!(found.lease, None);
    let nodes: Vec<_> = found.holders.iter().map(|h| h.node.as_str()).collect();
    assert_eq!(nodes, ["http://s:9292"]);
    // The serve never lists itself, so never asks itself for its fetch's fill.
    assert!(serve.holders("img").await.unwrap().len() == 1);
    assert!(serve.lookup("img").await.unwrap().holders.is_empty());
    // Published through the serve while the fill's holding is still there: listed once, as
    // the published one.
    fetch
        .announce_for(
            "http://s:9292",
            "img",
            HoldingState::Published,
            Some(10),
            Some("sha256:ab"),
            10,
        )
        .await
        .unwrap();
    let h = other.holders("img").await.unwrap();
    assert_eq!(h.len(), 1, "{h:?}");
    assert_eq!(h[0].state, HoldingState::Published);
    // The fetch leaves: its fill's holding goes with it, the serve's stays.
    fetch
        .announce("img2", HoldingState::Filling, None, None, 0)
        .await
        .unwrap();
    assert_eq!(other.holders("img2").await.unwrap().len(), 1);
    fetch.leave().await.unwrap();
    assert!(other.holders("img2").await.unwrap().is_empty());
    assert_eq!(other.holders("img").await.unwrap().len(), 1);
}
