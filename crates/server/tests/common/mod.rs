//! What the server's tests share: the server itself run in-process on 127.0.0.1:0 (one
//! harness for the image-serving and the cache-API tests), a config for it, and helpers to
//! seed its cache directly and to poll. The fakes it talks to are the test kit's: the fake
//! Keystone-protected Glance ([`FakeGlance`]) and the plain file origin ([`Origin`]).
#![allow(dead_code, unused_imports)] // each test binary uses its own subset

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use imgcache_server::ServerConfig;
use imgcache_store::{Cache, DriverKind, Key};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use imgcache_testkit::cmd::{have, run as run_cmd};
pub use imgcache_testkit::digest::{md5_hex, sha512_hex};
pub use imgcache_testkit::glance::{
    ADMIN_TOKEN, FakeGlance, MEMBER_PROJECT, MEMBER_TOKEN, OTHER_TOKEN, Seed,
};
pub use imgcache_testkit::http::raw_get;
pub use imgcache_testkit::origin::Origin;
pub use imgcache_testkit::{image_bytes, read};

pub const MIB: usize = 1 << 20;
/// imgcache's own admin token (`admin_token`) in [`config`].
pub const ADMIN: &str = "admin-secret";

/// Everything a test waits for is bounded by this.
pub const WAIT: Duration = Duration::from_secs(20);

/// A client whose every request is bounded by [`WAIT`].
pub fn client() -> reqwest::Client {
    imgcache_testkit::http::client_with_timeout(WAIT)
}

/// The test kit's fake Glance; panics when it cannot start (it reads its image schema from
/// the installed python-glanceclient, which these tests require).
pub fn fake_glance() -> FakeGlance {
    FakeGlance::start().unwrap_or_else(|e| panic!("the fake Glance cannot start: {e}"))
}

/// `GET /v2/images/{id}/file` requests `glance` got, for any image, answered or not.
pub fn file_requests(glance: &FakeGlance) -> usize {
    glance.requests("GET", "/v2/images/{id}/file")
}

/// [`Seed`] of a public, active raw image with this id and data.
pub fn image(id: &str, data: impl Into<Vec<u8>>) -> Seed {
    Seed::new(id, data).id(id)
}

/// A config for a cache in `dir`: admin token [`ADMIN`], upstream `glance` if any, no origin
/// retries (the prefetcher's own backoff is under test), workers on long intervals, short
/// header-read and shutdown bounds.
pub fn config(dir: &Path, glance: Option<&str>) -> ServerConfig {
    let mut c = ServerConfig::new(dir);
    c.admin_token = Some(ADMIN.to_string());
    c.sources.glance_url = glance.map(|u| u.parse().unwrap());
    c.sources.http.retries = 0;
    c.sources.http.connect_timeout = Duration::from_secs(2);
    c.prune_interval = Duration::from_secs(3600);
    c.clean_interval = Duration::from_secs(3600);
    c.header_read_timeout = Duration::from_secs(1);
    c.shutdown_grace = Duration::from_secs(2);
    c
}

/// Gives the server the fake Glance's admin token as its service token (`glance_token`),
/// which its prefetcher and its checks of queued ids call Glance with, as a deployment does.
pub fn service_token(c: &mut ServerConfig) {
    c.sources.glance_token = Some(ADMIN_TOKEN.to_string());
}

/// The server, in-process (`imgcache_server::run_on` on 127.0.0.1:0).
pub struct Server {
    pub addr: SocketAddr,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    pub dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    pub handle: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Server {
    /// [`config`] with upstream `glance`.
    pub async fn start(glance: Option<&str>) -> Server {
        Self::start_with(glance, |_| {}).await
    }

    /// [`config`] with upstream `glance`, changed by `tweak`.
    pub async fn start_with(glance: Option<&str>, tweak: impl FnOnce(&mut ServerConfig)) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(&dir.path().join("cache"), glance);
        tweak(&mut cfg);
        Self::start_config(dir, cfg).await
    }

    /// Upstream `glance`, `/v1/fetch` allowed under `origin`'s `/files/`, changed by `tweak`.
    pub async fn for_origin(
        glance: Option<&str>,
        origin: &Origin,
        tweak: impl FnOnce(&mut ServerConfig),
    ) -> Server {
        let files = origin.at("/files/");
        Self::start_with(glance, |c| {
            c.allow_href_prefixes = vec![files];
            tweak(c)
        })
        .await
    }

    /// Runs `cfg` with `dir` kept for the server's life; returns once it answers `/healthz`
    /// (or has already stopped: [`Server::stop`] then gives its error).
    pub async fn start_config(dir: tempfile::TempDir, cfg: ServerConfig) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let base = format!("http://{addr}");
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(imgcache_server::run_on(listener, cfg, async {
            let _ = rx.await;
        }));
        let c = client();
        let deadline = tokio::time::Instant::now() + WAIT;
        while !handle.is_finished() {
            if let Ok(r) = c.get(format!("{base}/healthz")).send().await
                && r.status().is_success()
            {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "server did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Server {
            addr,
            base,
            dir,
            stop: Some(tx),
            handle: Some(handle),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn image_url(&self, id: &str) -> String {
        self.url(&format!("/v2/images/{id}/file"))
    }

    pub fn cache_dir(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    /// The same cache directory opened by the test, as another process would.
    pub fn cache(&self) -> Cache {
        Cache::open(self.cache_dir(), DriverKind::Sqlite).unwrap()
    }

    pub fn published(&self, key: &str) -> PathBuf {
        self.cache_dir().join(key)
    }

    /// The published file of `key`, once there: a miss's clients get their last byte when the
    /// bytes are verified, and the fsync and rename that publish them may finish just after.
    pub async fn wait_published(&self, key: &str) -> PathBuf {
        let path = self.published(key);
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while !path.exists() && std::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        path
    }

    pub fn invalid(&self, key: &str) -> PathBuf {
        self.cache_dir().join("invalid").join(key)
    }

    /// Triggers shutdown and waits (bounded) for `run_on` to return its result.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match self.handle.take() {
            Some(h) => tokio::time::timeout(Duration::from_secs(30), h)
                .await
                .expect("server stops in time")
                .expect("server task"),
            None => Ok(()),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(t) = &self.handle {
            t.abort();
        }
    }
}

/// Publishes `data` under `id` straight into the cache (as a finished download would).
pub fn seed(cache: &Cache, id: &str, data: &[u8]) {
    use std::io::Write;
    let key = Key::new(id).unwrap();
    let mut w = cache.open_for_write(&key).unwrap().expect("not cached yet");
    w.write_all(data).unwrap();
    w.commit().unwrap();
}

/// Polls `check` until it holds or [`WAIT`] passes.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

pub async fn cache_state(c: &reqwest::Client, srv: &Server) -> serde_json::Value {
    let r = c
        .get(srv.url("/v2/cache"))
        .header("x-auth-token", ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

pub fn queued(state: &serde_json::Value) -> Vec<String> {
    state["queued_images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

pub fn cached_ids(state: &serde_json::Value) -> Vec<String> {
    state["cached_images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["image_id"].as_str().unwrap().to_string())
        .collect()
}
