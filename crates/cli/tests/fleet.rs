//! Fleet mode: real `imgcache serve` processes as nodes sharing a real PostgreSQL server
//! (started by the test kit; never skipped), clients driven with curl. Each image is fetched
//! from its origin once per fleet; nodes fill from each other through the peer endpoint.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use imgcache_testkit::glance::{ADMIN_TOKEN, FakeGlance, MEMBER_TOKEN};
use imgcache_testkit::image_bytes;
use imgcache_testkit::origin::Origin;
use imgcache_testkit::postgres::Postgres;

const TOKEN: &str = "fleet-secret";
const ADMIN: &str = "local-admin";

struct Node {
    child: Child,
    url: String,
    /// Its cache directory.
    cache: std::path::PathBuf,
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
    node_on(pg, free_port(), extra)
}

/// [`node`] on `port`.
fn node_on(pg: &Postgres, port: u16, extra: &[&str]) -> Node {
    node_in(pg, port, tempfile::tempdir().unwrap(), extra)
}

/// [`node`] on `port`, its cache directory `dir/cache` (which may hold images already).
fn node_in(pg: &Postgres, port: u16, dir: tempfile::TempDir, extra: &[&str]) -> Node {
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
        cache: dir.path().join("cache"),
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
    let (status, body, took, _) = get_timed(url, headers);
    (status, body, took)
}

/// [`get`], and when its first byte came.
fn get_timed(url: &str, headers: &[(&str, &str)]) -> (u16, Vec<u8>, Duration, Instant) {
    let out = tempfile::NamedTempFile::new().unwrap();
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-o"]).arg(out.path()).args([
        "-w",
        "%{http_code} %{time_starttransfer}",
        "--max-time",
        "60",
    ]);
    for (k, v) in headers {
        cmd.args(["-H", &format!("{k}: {v}")]);
    }
    let t = Instant::now();
    let o = cmd.arg(url).output().unwrap();
    let took = t.elapsed();
    let w = String::from_utf8_lossy(&o.stdout).to_string();
    let mut w = w.split_whitespace();
    let status = w.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let ttfb = w.next().and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    let first = t + Duration::from_secs_f64(ttfb);
    (
        status,
        std::fs::read(out.path()).unwrap_or_default(),
        took,
        first,
    )
}

fn fetch_url(node: &Node, href: &str) -> String {
    format!("{}/v1/fetch?href={}", node.url, urlencode(href))
}

/// `node`'s miss or hit for `href` (`/v1/fetch`): 200 and exactly `data`, or the test fails
/// saying `what`. The time it took.
fn fetch_exact(node: &Node, href: &str, data: &[u8], what: &str) -> Duration {
    let (status, body, took) = get(&fetch_url(node, href), &[]);
    assert_eq!(status, 200, "{what}");
    assert!(body == data, "{what}: the bytes differ");
    took
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

/// A 4 MiB image `disk.img` (bytes from `seed`) on an origin that sends it in about 1.5 s, so
/// a second request comes while the first is still downloading; and its href.
fn slow_origin(seed: u64) -> (bytes::Bytes, Origin, tempfile::TempDir, String) {
    let data = image_bytes(4 << 20, seed);
    let (origin, dir) = origin_with("disk.img", &data);
    origin.throttle("/images/disk.img", 128 << 10, Duration::from_millis(50));
    let href = format!("{}/images/disk.img", origin.url);
    (data, origin, dir, href)
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
        fetch_exact(n, &href, &data, &n.url);
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
    // Slow enough (about 3 s) that every node's clients start while the first node fills.
    let id = glance.seed(
        imgcache_testkit::glance::Seed::new("fleet.img", data.to_vec())
            .throttle(256 << 10, Duration::from_millis(25)),
    );
    let nodes: Vec<Node> = (0..3)
        .map(|_| node(&pg, &["--glance-url", &glance.url]))
        .collect();
    let url = |n: &Node| format!("{}/v2/images/{id}/file", n.url);
    let clients: Vec<_> = nodes
        .iter()
        .flat_map(|n| std::iter::repeat_n(url(n), 3))
        .map(|u| std::thread::spawn(move || get_timed(&u, &[("X-Auth-Token", MEMBER_TOKEN)])))
        .collect();
    let mut firsts = Vec::new();
    for c in clients {
        let (status, body, _, first) = c.join().unwrap();
        assert_eq!(status, 200);
        assert!(body == data.as_ref(), "exact bytes");
        firsts.push(first);
    }
    // Every client, on every node, had its first byte before the origin sent its last: the
    // nodes followed the first node's fill, not its finished copy.
    let end = glance.body_end(&id).expect("the origin sent the image");
    let late = firsts.iter().filter(|f| **f > end).count();
    assert_eq!(
        late, 0,
        "clients whose first byte came after the origin's last"
    );
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
    // And openstacksdk's `cached_image_nodes`, from another node.
    let sdk = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/sdk.py");
    let mut cmd = Command::new("python3");
    imgcache_testkit::clients::client_env(&mut cmd, home.path());
    let o = cmd
        .args([sdk, &nodes[2].url, ADMIN_TOKEN, "cache-nodes", &id])
        .stdin(Stdio::null())
        .output()
        .expect("python3");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let listed: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let mut got: Vec<&str> = listed["nodes"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|u| u.as_str().unwrap())
        .collect();
    got.sort();
    let mut want: Vec<&str> = nodes.iter().map(|n| n.url.as_str()).collect();
    want.sort();
    assert_eq!(got, want, "openstacksdk cached_image_nodes");
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
    // The CLI reads the same index, without joining it.
    let nodes_json = fleet_cli(&pg, &["nodes"]);
    let urls: Vec<&str> = nodes_json
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["url"].as_str().unwrap())
        .collect();
    let mut want = vec![a.url.as_str(), b.url.as_str()];
    want.sort();
    assert_eq!(
        urls, want,
        "fleet nodes: the two live nodes, and not the CLI"
    );
    let b_row = &nodes_json[urls.iter().position(|u| *u == b.url).unwrap()];
    assert_eq!(
        (
            b_row["published"].as_u64(),
            b_row["published_bytes"].as_u64()
        ),
        (Some(1), Some(data.len() as u64)),
        "{b_row}"
    );
    let holders_json = fleet_cli(&pg, &["holders", &key]);
    assert_eq!(holders_json.as_array().unwrap().len(), 1, "{holders_json}");
    assert_eq!(holders_json[0]["node"], b.url.as_str());
    assert_eq!(holders_json[0]["state"], "published");
    assert_eq!(holders_json[0]["size"].as_u64(), Some(data.len() as u64));
    assert!(
        holders_json[0]["checksum"]
            .as_str()
            .is_some_and(|c| c.starts_with("sha256:")),
        "{holders_json}"
    );
    assert_eq!(
        fleet_cli(&pg, &["holders", "not-held"]),
        serde_json::json!([])
    );
    // The status page's model shows the same fleet, from either node.
    let (status, body, _) = get(
        &format!("{}/ui/status.json", a.url),
        &[("X-Auth-Token", ADMIN)],
    );
    assert_eq!(status, 200);
    let page: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(page["fleet"]["node"], a.url.as_str());
    let on_page: Vec<(&str, u64)> = page["fleet"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["url"].as_str().unwrap(), n["published"].as_u64().unwrap()))
        .collect();
    let mut want = vec![(a.url.as_str(), 0), (b.url.as_str(), 1)];
    want.sort();
    assert_eq!(on_page, want, "{page}");
    // b dies without a word: within the heartbeat timeout (2 s) it is out of the list.
    b.child.kill().unwrap();
    let took = eventually("b dropped", Duration::from_secs(6), || {
        holders(&a, &key).is_empty()
    });
    eprintln!("fleet: a killed node left the holders list after {took:?} (heartbeat timeout 2s)");
    let left = fleet_cli(&pg, &["nodes"]);
    assert_eq!(left.as_array().unwrap().len(), 1, "{left}");
    assert_eq!(left[0]["url"], a.url.as_str());
}

/// `imgcache fleet ARGS --json` against `pg`: its stdout, parsed.
fn fleet_cli(pg: &Postgres, args: &[&str]) -> serde_json::Value {
    let o = Command::new(env!("CARGO_BIN_EXE_imgcache"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("IMGCACHE_HEARTBEAT_TIMEOUT", "2s")
        .env("HOME", std::env::temp_dir())
        .args(["--json", "fleet", "--fleet-db", &pg.url()])
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "imgcache fleet {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn fleet_commands_without_a_fleet_database_say_how_to_configure_one() {
    let o = Command::new(env!("CARGO_BIN_EXE_imgcache"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", std::env::temp_dir())
        .args(["fleet", "nodes"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("fleet mode is off") && err.contains("IMGCACHE_FLEET_DB"),
        "{err}"
    );
    // A database that does not answer: a clear error, not a hang.
    let o = Command::new(env!("CARGO_BIN_EXE_imgcache"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", std::env::temp_dir())
        .args(["fleet", "--fleet-db"])
        .arg(format!("postgresql://nobody@127.0.0.1:{}/x", free_port()))
        .arg("nodes")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("fleet database"), "{err}");
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

    // The database comes back: b's bookkeeping is replayed, and a's holding of one.img is
    // there too (the crash may have lost its commit: the fleet's connections commit
    // asynchronously; a node re-announces what it holds once the database answers again).
    pg.resume().unwrap();
    let caught_up = eventually("the index caught up", Duration::from_secs(15), || {
        let (h2s, h1s) = (holders(&a, &key_of(&h2)), holders(&b, &key_of(&h1)));
        h2s == [b.url.clone()] && h1s == [a.url.clone()]
    });
    eprintln!("fleet: index caught up {caught_up:?} after the database returned");
    assert_eq!(ready(&b).0, 200, "ready again with the database back");
}

/// The holding `node` reports for `key` in the index: (state, bytes), if any.
fn holding_of(pg: &Postgres, key: &str, node: &str) -> Option<(String, u64)> {
    fleet_cli(pg, &["holders", key])
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["node"] == node)
        .map(|h| {
            (
                h["state"].as_str().unwrap().to_string(),
                h["bytes"].as_u64().unwrap(),
            )
        })
}

#[test]
fn a_holder_killed_mid_stream_costs_its_follower_nothing() {
    use imgcache_testkit::faults::{Fault, FaultOrigin};
    let pg = pg();
    let data = image_bytes(24 << 20, 5);
    let origin = FaultOrigin::start();
    // Slow (about 10 s), with Content-MD5 so a peer may be followed while it fills.
    let pace = Fault::Paced {
        step: 128 << 10,
        pause: Duration::from_millis(50),
    };
    origin.add_with("/images/k.img", data.clone(), pace, 1, true);
    let allow = format!("{}/", origin.url);
    let mut a = node(&pg, &["--allow-href-prefix", &allow]);
    let b = node(&pg, &["--allow-href-prefix", &allow]);
    let href = format!("{}/images/k.img", origin.url);
    let key = key_of(&href);

    // A fills from the origin (holding the fleet's lease); B's client follows A's fill.
    let ua = fetch_url(&a, &href);
    let first = std::thread::spawn(move || get(&ua, &[]));
    eventually("a is filling", Duration::from_secs(10), || {
        holding_of(&pg, &key, &a.url).is_some_and(|(s, n)| s == "filling" && n > 0)
    });
    let ub = fetch_url(&b, &href);
    let second = std::thread::spawn(move || get(&ub, &[]));
    eventually("b follows a", Duration::from_secs(10), || {
        holding_of(&pg, &key, &b.url).is_some_and(|(_, n)| n >= 1 << 20)
    });
    let before = origin.gets("/images/k.img");
    let b_had = holding_of(&pg, &key, &b.url).unwrap().1;
    a.child.kill().unwrap();
    a.child.wait().unwrap();

    // A's own client is cut (never a clean wrong body); B's gets every byte.
    let (sa, ba, _) = first.join().unwrap();
    assert!(
        sa != 200 || ba != data.as_ref(),
        "a's client cannot have finished"
    );
    let (sb, bb, took) = second.join().unwrap();
    assert_eq!(sb, 200);
    assert!(bb == data.as_ref(), "b's client: exact bytes");
    assert_eq!(before, 1, "one origin download before the kill");
    let log = origin.log("/images/k.img");
    let gets: Vec<_> = log.iter().filter(|l| l.method == "GET").collect();
    assert_eq!(
        gets.len(),
        2,
        "the first download, then one continuation: {log:?}"
    );
    let range = gets[1].range.as_deref().expect("continued by Range");
    let from: u64 = range
        .trim_start_matches("bytes=")
        .trim_end_matches('-')
        .parse()
        .unwrap();
    assert!(
        from >= b_had,
        "continued from b's bytes ({from} >= {b_had})"
    );
    eventually("b published", Duration::from_secs(5), || {
        holding_of(&pg, &key, &b.url).is_some_and(|(s, _)| s == "published")
    });
    eprintln!(
        "fleet: holder killed with b at {b_had} bytes; b continued from the origin at byte {from}, \
         its client got all {} bytes in {took:?}",
        data.len()
    );
}

#[test]
fn a_corrupt_peer_publishes_nothing_and_the_next_source_is_the_origin() {
    use std::io::{Seek, SeekFrom, Write};
    let pg = pg();
    let data = image_bytes(4 << 20, 6);
    let (origin, _d) = origin_with("c.img", &data);
    let allow = format!("{}/", origin.url);
    let a = node(&pg, &["--allow-href-prefix", &allow]);
    let b = node(&pg, &["--allow-href-prefix", &allow]);
    let href = format!("{}/images/c.img", origin.url);
    let key = key_of(&href);
    assert_eq!(get(&fetch_url(&a, &href), &[]).0, 200);
    eventually("a holds it", Duration::from_secs(5), || {
        holding_of(&pg, &key, &a.url).is_some_and(|(s, _)| s == "published")
    });
    // A's copy rots on disk: one byte flipped, its record (and sha256) unchanged.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(a.cache.join(&key))
        .unwrap();
    f.seek(SeekFrom::Start(1 << 20)).unwrap();
    f.write_all(&[!data[1 << 20]]).unwrap();
    drop(f);

    // B fills from A, verifies against A's recorded checksum, and publishes nothing: its
    // client is cut (never a clean 200 with the wrong bytes), the bytes go to invalid/.
    let (status, body, _) = get(&fetch_url(&b, &href), &[]);
    assert!(
        !(status == 200 && body.len() == data.len()),
        "a complete answer from a corrupt peer ({status}, {} bytes)",
        body.len()
    );
    assert!(
        !b.cache.join(&key).exists(),
        "nothing published from the corrupt peer"
    );
    assert!(
        b.cache.join("invalid").join(&key).exists(),
        "kept in invalid/"
    );
    assert_eq!(
        origin.data_requests("/images/c.img"),
        1,
        "a served it, not the origin"
    );

    // The next request skips the suspect peer for the origin, and gets exact bytes.
    fetch_exact(&b, &href, &data, "exact bytes from the origin");
    assert_eq!(origin.data_requests("/images/c.img"), 2);
    // Published once durable, just after the client's last byte.
    eventually("b published", Duration::from_secs(5), || {
        b.cache.join(&key).exists()
    });
    eprintln!("fleet: a corrupt peer: B published nothing from it; the retry came from the origin");
}

/// `imgcache fetch HREF DEST` on `cache` with `extra` flags: the process, started.
fn fetch_cmd(cache: &std::path::Path, href: &str, dest: &std::path::Path, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_imgcache"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("IMGCACHE_HEARTBEAT_TIMEOUT", "2s")
        .arg("--cache-dir")
        .arg(cache)
        .args(["fetch", "-q", href])
        .arg(dest)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

fn fetched(mut c: Child) {
    let status = c.wait().unwrap();
    assert!(status.success(), "imgcache fetch: {status}");
}

#[test]
fn fetch_in_fleet_mode_fills_from_a_serve_node_without_the_origin() {
    let pg = pg();
    let data = image_bytes(4 << 20, 7);
    let (origin, _d) = origin_with("disk.img", &data);
    let allow = format!("{}/", origin.url);
    let n = node(&pg, &["--allow-href-prefix", &allow]);
    let href = format!("{}/images/disk.img", origin.url);
    fetch_exact(&n, &href, &data, "exact");
    eventually("the node is listed", Duration::from_secs(5), || {
        holders(&n, &key_of(&href)).len() == 1
    });
    assert_eq!(origin.data_requests("/images/disk.img"), 1);
    // A conductor's `imgcache fetch` on a fresh cache: the bytes come from the node.
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("deploy.img");
    let db = pg.url();
    let flags = ["--fleet-db", db.as_str(), "--fleet-token", TOKEN];
    fetched(fetch_cmd(&dir.path().join("cache"), &href, &dest, &flags));
    assert!(
        std::fs::read(&dest).unwrap() == data.as_ref(),
        "exact bytes"
    );
    assert_eq!(
        origin.data_requests("/images/disk.img"),
        1,
        "the fetch filled from the serve node, not the origin"
    );
    // It left the fleet at exit: only the serve node is a node.
    let nodes = fleet_cli(&pg, &["nodes"]);
    assert_eq!(nodes.as_array().map(Vec::len), Some(1), "{nodes}");
}

#[test]
fn a_fetch_beside_a_serve_feeds_the_fleet_under_its_url() {
    let pg = pg();
    let data = image_bytes(4 << 20, 11);
    let (origin, _d) = origin_with("disk.img", &data);
    let allow = format!("{}/", origin.url);
    // Conductor A runs `imgcache serve` on its cache directory; its deploys use `imgcache
    // fetch` on the same directory, with the same fleet settings and no --node-url.
    let a = node(&pg, &["--allow-href-prefix", &allow]);
    let b = node(&pg, &["--allow-href-prefix", &allow]);
    let href = format!("{}/images/disk.img", origin.url);
    let key = key_of(&href);
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("deploy.img");
    let db = pg.url();
    let flags = ["--fleet-db", db.as_str(), "--fleet-token", TOKEN];
    fetched(fetch_cmd(&a.cache, &href, &dest, &flags));
    assert!(std::fs::read(&dest).unwrap() == data.as_ref());
    assert_eq!(origin.data_requests("/images/disk.img"), 1);
    // What the fetch published is announced under A's URL (A answers peers from the
    // directory), so B's miss fills from A, not from the origin.
    assert_eq!(holders(&b, &key), vec![a.url.clone()]);
    fetch_exact(&b, &href, &data, "exact bytes from the peer");
    assert_eq!(
        origin.data_requests("/images/disk.img"),
        1,
        "B filled from A's directory through A"
    );
    // A marker naming a node that is gone is not believed: once A is dead, a fetch on a
    // directory holding A's marker announces nothing (no one would answer peers for it).
    let stale = dir.path().join("stale-cache");
    std::fs::create_dir_all(&stale).unwrap();
    let marker = imgcache_fleet::NODE_MARKER;
    std::fs::copy(a.cache.join(marker), stale.join(marker)).unwrap();
    drop(a);
    eventually("A leaves the fleet", Duration::from_secs(10), || {
        fleet_cli(&pg, &["nodes"]).as_array().map(Vec::len) == Some(1)
    });
    let href2 = format!("{}/images/disk.img?second", origin.url);
    fetched(fetch_cmd(
        &stale,
        &href2,
        &dir.path().join("second.img"),
        &flags,
    ));
    assert!(stale.join(key_of(&href2)).exists(), "published");
    assert!(holders(&b, &key_of(&href2)).is_empty());
}

#[test]
fn conductors_fetching_one_image_at_once_download_it_once() {
    use imgcache_testkit::digest::sha256_hex;
    let pg = pg();
    let (data, origin, _d, href) = slow_origin(12);
    let allow = format!("{}/", origin.url);
    // Two conductors, each with `imgcache serve` on its cache directory, deploy one image at
    // once with `imgcache fetch` (Ironic gives the image's checksum).
    let serves = [
        node(&pg, &["--allow-href-prefix", &allow]),
        node(&pg, &["--allow-href-prefix", &allow]),
    ];
    let key = key_of(&href);
    let sum = format!("sha256:{}", sha256_hex(&data));
    let db = pg.url();
    let flags = [
        "--fleet-db",
        db.as_str(),
        "--fleet-token",
        TOKEN,
        "--checksum",
        sum.as_str(),
    ];
    let dir = tempfile::tempdir().unwrap();
    let dest = |i: usize| dir.path().join(format!("deploy{i}.img"));
    let t = Instant::now();
    let procs: Vec<_> = serves
        .iter()
        .enumerate()
        .map(|(i, s)| fetch_cmd(&s.cache, &href, &dest(i), &flags))
        .collect();
    // The fill in progress is in the index, listed under the serve that answers for it.
    let listed = eventually(
        "a fetch's fill is listed under its serve",
        Duration::from_secs(5),
        || {
            fleet_cli(&pg, &["holders", &key])
                .as_array()
                .unwrap()
                .iter()
                .any(|h| h["state"] == "filling" && serves.iter().any(|s| h["node"] == s.url))
        },
    );
    procs.into_iter().for_each(fetched);
    let took = t.elapsed();
    for i in 0..2 {
        assert!(std::fs::read(dest(i)).unwrap() == data.as_ref(), "exact");
    }
    assert_eq!(
        origin.data_requests("/images/disk.img"),
        1,
        "one conductor downloaded; the other followed its fill through its serve"
    );
    assert!(
        took < Duration::from_millis(2800),
        "the second followed the first, it did not download after it: {took:?}"
    );
    // Each serve holds the image its fetch published (announced under its URL), and the
    // fetches left the fleet, their fills' holdings with them.
    let mut want: Vec<_> = serves.iter().map(|s| s.url.clone()).collect();
    want.sort();
    let mut held = holders(&serves[0], &key);
    held.sort();
    assert_eq!(held, want);
    let states = fleet_cli(&pg, &["holders", &key]);
    assert!(
        states
            .as_array()
            .unwrap()
            .iter()
            .all(|h| h["state"] == "published"),
        "{states}"
    );
    let nodes = fleet_cli(&pg, &["nodes"]);
    assert_eq!(nodes.as_array().map(Vec::len), Some(2), "{nodes}");
    eprintln!(
        "fleet: two conductors' fetches: 1 origin request in {took:?}; a fill was listed after {listed:?}"
    );
}

#[test]
fn a_fetch_never_takes_the_url_of_a_serve_that_is_down() {
    let pg = pg();
    let (data, origin, _d, href) = slow_origin(13);
    let allow = format!("{}/", origin.url);
    let b = node(&pg, &["--allow-href-prefix", &allow]);
    // The conductor's config names its serve (`node_url`), which is down (restarting).
    let port = free_port();
    let serve_url = format!("http://127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let db = pg.url();
    let flags = [
        "--fleet-db",
        db.as_str(),
        "--fleet-token",
        TOKEN,
        "--node-url",
        serve_url.as_str(),
    ];
    let fetch = fetch_cmd(
        &dir.path().join("cache"),
        &href,
        &dir.path().join("deploy.img"),
        &flags,
    );
    eventually("the fetch joins", Duration::from_secs(5), || {
        let nodes = fleet_cli(&pg, &["nodes"]);
        nodes
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["url"].as_str().is_some_and(|u| u.starts_with("fetch://")))
    });
    // The fetch joined as itself, so the serve comes back at its URL while the fetch runs
    // (under that URL, it would be refused as a duplicate of a live node) ...
    let serve = node_on(&pg, port, &["--allow-href-prefix", &allow]);
    assert!(
        fleet_cli(&pg, &["nodes"])
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["url"] == serve.url.as_str())
    );
    // ... and a miss on another node does not wait on the fetch's lease for a fill no peer
    // can follow: it downloads at once.
    let took = fetch_exact(&b, &href, &data, "exact");
    assert!(
        took < Duration::from_secs(5),
        "not held up by the fetch's lease: {took:?}"
    );
    fetched(fetch);
    assert!(std::fs::read(dir.path().join("deploy.img")).unwrap() == data.as_ref());
    assert_eq!(origin.data_requests("/images/disk.img"), 2);
}

#[test]
fn the_index_follows_the_cache_directory_whatever_process_changes_it() {
    let pg = pg();
    let data = image_bytes(1 << 20, 14);
    let (origin, _d) = origin_with("disk.img", &data);
    let a = node(&pg, &[]);
    let href = format!("{}/images/disk.img", origin.url);
    let key = key_of(&href);
    // A fetch that tells the fleet nothing (no fleet flags) publishes into the serve's
    // directory: the serve finds it there and announces it, within a heartbeat timeout
    // (2 s here) and one check.
    let dir = tempfile::tempdir().unwrap();
    fetched(fetch_cmd(
        &a.cache,
        &href,
        &dir.path().join("deploy.img"),
        &[],
    ));
    assert!(holders(&a, &key).is_empty(), "not announced by the fetch");
    let found = eventually(
        "the serve announces what a fetch published",
        Duration::from_secs(8),
        || holders(&a, &key) == [a.url.clone()],
    );
    // Deleted by the cache commands, which tell the fleet nothing either: withdrawn.
    let o = Command::new(env!("CARGO_BIN_EXE_imgcache"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .arg("--cache-dir")
        .arg(&a.cache)
        .args(["delete", &key])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let gone = eventually(
        "the serve withdraws what was deleted",
        Duration::from_secs(8),
        || holders(&a, &key).is_empty(),
    );
    // An image file an operator removes by hand (its record stays): withdrawn too.
    let href2 = format!("{href}?second");
    let key2 = key_of(&href2);
    fetched(fetch_cmd(
        &a.cache,
        &href2,
        &dir.path().join("second.img"),
        &[],
    ));
    eventually("announced", Duration::from_secs(8), || {
        holders(&a, &key2) == [a.url.clone()]
    });
    std::fs::remove_file(a.cache.join(&key2)).unwrap();
    eventually(
        "the serve withdraws a file removed by hand",
        Duration::from_secs(8),
        || holders(&a, &key2).is_empty(),
    );
    // The two downloads were the fetches'.
    assert_eq!(origin.data_requests("/images/disk.img"), 2);
    eprintln!(
        "fleet: a fetch's image announced after {found:?}; a deletion withdrawn after {gone:?}"
    );
}

#[test]
fn a_node_joining_with_a_cache_announces_it() {
    let pg = pg();
    let data = image_bytes(1 << 20, 15);
    let (origin, _d) = origin_with("disk.img", &data);
    let href = format!("{}/images/disk.img", origin.url);
    // A cache filled before fleet mode was turned on (a plain fetch, no fleet flags).
    let dir = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    fetched(fetch_cmd(
        &dir.path().join("cache"),
        &href,
        &out.path().join("d.img"),
        &[],
    ));
    let a = node_in(&pg, free_port(), dir, &[]);
    // Announced at start, well before the first check against the directory (one heartbeat
    // timeout, 2 s, after start).
    let took = eventually(
        "the node announces its cache",
        Duration::from_secs(1),
        || holders(&a, &key_of(&href)) == [a.url.clone()],
    );
    // And another node fills from it, not from the origin.
    let allow = format!("{}/", origin.url);
    let b = node(&pg, &["--allow-href-prefix", &allow]);
    fetch_exact(&b, &href, &data, "exact");
    assert_eq!(
        origin.data_requests("/images/disk.img"),
        1,
        "only the first fetch's"
    );
    eprintln!("fleet: a node's existing cache was announced {took:?} after it answered");
}

#[test]
fn two_fetch_only_members_do_not_wait_on_each_other() {
    let pg = pg();
    let (data, origin, _d, href) = slow_origin(8);
    let db = pg.url();
    let flags = ["--fleet-db", db.as_str(), "--fleet-token", TOKEN];
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let t = Instant::now();
    let procs: Vec<_> = dirs
        .iter()
        .map(|d| {
            fetch_cmd(
                &d.path().join("cache"),
                &href,
                &d.path().join("deploy.img"),
                &flags,
            )
        })
        .collect();
    procs.into_iter().for_each(fetched);
    let took = t.elapsed();
    for d in &dirs {
        assert!(std::fs::read(d.path().join("deploy.img")).unwrap() == data.as_ref());
    }
    // What is true: a fetch-only member (`fetch://HOST/PID`) has no peer endpoint, so the
    // second cannot read from the first; waiting for the first's lease would save no origin
    // byte, so it does not wait: two origin requests, side by side.
    assert_eq!(origin.data_requests("/images/disk.img"), 2);
    assert!(
        took < Duration::from_millis(2500),
        "the second did not wait for the first's whole download: {took:?}"
    );
    let nodes = fleet_cli(&pg, &["nodes"]);
    assert_eq!(
        nodes.as_array().map(Vec::len),
        Some(0),
        "both left: {nodes}"
    );
}

#[test]
fn fetch_with_the_fleet_database_down_goes_to_the_origin() {
    let data = image_bytes(1 << 20, 9);
    let (origin, _d) = origin_with("disk.img", &data);
    let href = format!("{}/images/disk.img", origin.url);
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("deploy.img");
    let db = format!("postgresql://imgcache@127.0.0.1:{}/imgcache", free_port());
    let flags = ["--fleet-db", db.as_str(), "--fleet-token", TOKEN];
    let t = Instant::now();
    fetched(fetch_cmd(&dir.path().join("cache"), &href, &dest, &flags));
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "bounded: {:?}",
        t.elapsed()
    );
    assert!(std::fs::read(&dest).unwrap() == data.as_ref());
    assert_eq!(origin.data_requests("/images/disk.img"), 1);
}
