//! Fleet mode: real `imgcache serve` processes as nodes sharing a real PostgreSQL server
//! (started by the test kit; never skipped), clients driven with curl. Each image is fetched
//! from its origin once per fleet; nodes fill from each other through the peer endpoint.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use imgcache_testkit::glance::{ADMIN_TOKEN, FakeGlance, MEMBER_TOKEN, seed_bytes};
use imgcache_testkit::image_bytes;
use imgcache_testkit::origin::Origin;
use imgcache_testkit::postgres::Postgres;

const TOKEN: &str = "fleet-secret";
const ADMIN: &str = "local-admin";

struct Node {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts a node on its own cache directory; returns once it serves.
fn node(pg: &Postgres, extra: &[&str]) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let child = Command::new(env!("CARGO_BIN_EXE_imgcache"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("IMGCACHE_HEARTBEAT_TIMEOUT", "2s")
        .arg("--cache-dir")
        .arg(dir.path().join("cache"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--fleet-db", &pg.url(), "--fleet-token", TOKEN])
        .args(["--admin-token", ADMIN])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let n = Node {
        child,
        url,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while get(&format!("{}/healthz", n.url), &[]).0 != 200 {
        assert!(Instant::now() < deadline, "node {} did not start", n.url);
        std::thread::sleep(Duration::from_millis(50));
    }
    n
}

/// `curl` GET: status, body, time taken.
fn get(url: &str, headers: &[(&str, &str)]) -> (u16, Vec<u8>, Duration) {
    let out = tempfile::NamedTempFile::new().unwrap();
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-o"])
        .arg(out.path())
        .args(["-w", "%{http_code}", "--max-time", "60"]);
    for (k, v) in headers {
        cmd.args(["-H", &format!("{k}: {v}")]);
    }
    let t = Instant::now();
    let o = cmd.arg(url).output().unwrap();
    let took = t.elapsed();
    let status = String::from_utf8_lossy(&o.stdout).parse().unwrap_or(0);
    (status, std::fs::read(out.path()).unwrap_or_default(), took)
}

fn fetch_url(node: &Node, href: &str) -> String {
    format!("{}/v1/fetch?href={}", node.url, urlencode(href))
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn origin_with(name: &str, data: &[u8]) -> (Origin, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("images")).unwrap();
    std::fs::write(dir.path().join("images").join(name), data).unwrap();
    (Origin::start(dir.path().to_path_buf()), dir)
}

fn pg() -> Postgres {
    Postgres::start().unwrap_or_else(|e| panic!("PostgreSQL for the fleet tests: {e}"))
}

/// The nodes the fleet says hold `id` (Glance's `GET /v2/cache/nodes/{id}`).
fn holders(n: &Node, id: &str) -> Vec<String> {
    let (status, body, _) = get(
        &format!("{}/v2/cache/nodes/{id}", n.url),
        &[("X-Auth-Token", ADMIN)],
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).unwrap()
}

fn key_of(href: &str) -> String {
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, href.as_bytes()).to_string()
}

fn eventually(what: &str, within: Duration, mut ok: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !ok() {
        assert!(t.elapsed() < within, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
    t.elapsed()
}

#[test]
fn sequential_misses_on_every_node_fetch_once_from_the_origin() {
    let pg = pg();
    let data = image_bytes(4 << 20, 1);
    let (origin, _d) = origin_with("disk.img", &data);
    let allow = format!("{}/", origin.url);
    let nodes: Vec<Node> = (0..3)
        .map(|_| node(&pg, &["--allow-href-prefix", &allow]))
        .collect();
    let href = format!("{}/images/disk.img", origin.url);
    for n in &nodes {
        let (status, body, _) = get(&fetch_url(n, &href), &[]);
        assert_eq!(status, 200, "{}", n.url);
        assert!(body == data.as_ref(), "{}: exact bytes", n.url);
    }
    assert_eq!(
        origin.data_requests("/images/disk.img"),
        1,
        "one origin download for the fleet"
    );
    // Every node holds it now, as the fleet index says.
    let key = key_of(&href);
    eventually("all three nodes listed", Duration::from_secs(5), || {
        holders(&nodes[0], &key).len() == 3
    });
    eprintln!(
        "fleet: 3 nodes, sequential misses: origin data requests = {}",
        origin.data_requests("/images/disk.img")
    );
}

#[test]
fn concurrent_clients_on_three_nodes_one_origin_request() {
    let glance = match FakeGlance::start() {
        Ok(g) => g,
        Err(e) => panic!("fake Glance: {e}"),
    };
    let pg = pg();
    let data = image_bytes(32 << 20, 2);
    let id = seed_bytes(&glance, "fleet.img", &data);
    let nodes: Vec<Node> = (0..3)
        .map(|_| node(&pg, &["--glance-url", &glance.url]))
        .collect();
    let url = |n: &Node| format!("{}/v2/images/{id}/file", n.url);
    let clients: Vec<_> = nodes
        .iter()
        .flat_map(|n| std::iter::repeat_n(url(n), 3))
        .map(|u| std::thread::spawn(move || get(&u, &[("X-Auth-Token", MEMBER_TOKEN)])))
        .collect();
    for c in clients {
        let (status, body, _) = c.join().unwrap();
        assert_eq!(status, 200);
        assert!(body == data.as_ref(), "exact bytes");
    }
    assert_eq!(
        glance.data_requests(&id),
        1,
        "9 clients on 3 nodes, one origin download"
    );
    eprintln!(
        "fleet: 3 nodes x 3 clients at once: origin data requests = {}",
        glance.data_requests(&id)
    );
    // The real glance client reads the holders list (no version flag), from any node.
    let home = tempfile::tempdir().unwrap();
    let mut last = String::new();
    eventually(
        "glance cache-nodes-list names all three nodes",
        Duration::from_secs(10),
        || {
            let mut cmd = Command::new("glance");
            imgcache_testkit::clients::client_env(&mut cmd, home.path());
            let o = cmd
                .args([
                    "--os-image-url",
                    &nodes[1].url,
                    "--os-auth-token",
                    ADMIN_TOKEN,
                ])
                .args(["cache-nodes-list", &id])
                .stdin(Stdio::null())
                .output()
                .expect("glance");
            last = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            nodes.iter().all(|n| last.contains(&n.url))
        },
    );
    eprintln!("fleet: glance cache-nodes-list:\n{last}");
}

#[test]
fn the_peer_endpoint_needs_the_fleet_token_and_dead_nodes_leave() {
    let pg = pg();
    let data = image_bytes(1 << 20, 3);
    let (origin, _d) = origin_with("a.img", &data);
    let allow = format!("{}/", origin.url);
    let a = node(&pg, &["--allow-href-prefix", &allow]);
    let mut b = node(&pg, &["--allow-href-prefix", &allow]);
    let href = format!("{}/images/a.img", origin.url);
    assert_eq!(get(&fetch_url(&b, &href), &[]).0, 200);
    let key = key_of(&href);
    let peer = format!("{}/v1/peer/images/{key}", b.url);
    assert_eq!(get(&peer, &[]).0, 401, "no token");
    assert_eq!(get(&peer, &[("X-Imgcache-Fleet-Token", "wrong")]).0, 401);
    let (status, body, _) = get(&peer, &[("X-Imgcache-Fleet-Token", TOKEN)]);
    assert_eq!((status, body == data.as_ref()), (200, true));

    eventually("b listed as a holder", Duration::from_secs(5), || {
        holders(&a, &key) == [b.url.clone()]
    });
    // b dies without a word: within the heartbeat timeout (2 s) it is out of the list.
    b.child.kill().unwrap();
    let took = eventually("b dropped", Duration::from_secs(6), || {
        holders(&a, &key).is_empty()
    });
    eprintln!("fleet: a killed node left the holders list after {took:?} (heartbeat timeout 2s)");
}

#[test]
fn the_database_going_away_stops_no_hit_and_no_miss() {
    let pg = pg();
    let one = image_bytes(2 << 20, 4);
    let two = image_bytes(2 << 20, 5);
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("images")).unwrap();
    std::fs::write(dir.path().join("images/one.img"), &one).unwrap();
    std::fs::write(dir.path().join("images/two.img"), &two).unwrap();
    let origin = Origin::start(dir.path().to_path_buf());
    let allow = format!("{}/", origin.url);
    let a = node(&pg, &["--allow-href-prefix", &allow]);
    let b = node(&pg, &["--allow-href-prefix", &allow]);
    let h1 = format!("{}/images/one.img", origin.url);
    let h2 = format!("{}/images/two.img", origin.url);
    assert_eq!(get(&fetch_url(&a, &h1), &[]).0, 200);
    let ready = |n: &Node| {
        let (status, body, _) = get(&format!("{}/readyz", n.url), &[]);
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        (status, body)
    };
    let (status, body) = ready(&a);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["checks"]["fleet_db"]["ok"], true, "{body}");

    pg.stop_immediate().unwrap();
    // Not ready, and says it is the fleet database (liveness stays).
    let (status, body) = ready(&a);
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["failed"], serde_json::json!(["fleet_db"]), "{body}");
    assert!(
        body["checks"]["fleet_db"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("fleet database")),
        "{body}"
    );
    assert_eq!(get(&format!("{}/healthz", a.url), &[]).0, 200);
    // A hit: served at the usual latency (the index is never on a hit's path).
    let mut worst = Duration::ZERO;
    for _ in 0..5 {
        let (status, body, took) = get(&fetch_url(&a, &h1), &[]);
        assert_eq!((status, body == one.as_ref()), (200, true));
        worst = worst.max(took);
    }
    assert!(worst < Duration::from_millis(250), "hit took {worst:?}");
    // A new miss: the index does not answer within its bound, the origin serves it.
    let (status, body, took) = get(&fetch_url(&b, &h2), &[]);
    assert_eq!((status, body == two.as_ref()), (200, true));
    eprintln!("fleet: database down: worst hit {worst:?}, new miss {took:?}");

    // The database comes back: b's bookkeeping is replayed.
    pg.resume().unwrap();
    let caught_up = eventually("b announced two.img", Duration::from_secs(15), || {
        holders(&a, &key_of(&h2)) == [b.url.clone()]
    });
    eprintln!("fleet: index caught up {caught_up:?} after the database returned");
    assert_eq!(ready(&b).0, 200, "ready again with the database back");
}
