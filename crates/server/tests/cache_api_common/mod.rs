//! Shared by the cache-API tests: an in-process server on a loopback port, a fake upstream
//! Glance that counts its requests, and helpers to seed the cache directly.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use imgcache_server::ServerConfig;
use imgcache_store::{Cache, DriverKind, Key};
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const ADMIN: &str = "admin-secret";
/// Tokens the fake Glance knows: one with the admin role, one without.
pub const UPSTREAM_ADMIN: &str = "upstream-admin";
pub const UPSTREAM_MEMBER: &str = "upstream-member";

/// Everything a test waits for is bounded by this.
pub const WAIT: Duration = Duration::from_secs(20);

pub fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(WAIT)
        .build()
        .expect("client")
}

// ---- Fake upstream Glance -------------------------------------------------------------------

#[derive(Default)]
pub struct FakeState {
    pub images: Mutex<HashMap<String, Vec<u8>>>,
    /// `GET /v2/images/{id}/file` requests (data requests).
    pub file_requests: AtomicUsize,
    /// While set, data requests answer 500.
    pub fail_files: AtomicBool,
}

pub struct FakeGlance {
    pub url: String,
    pub state: Arc<FakeState>,
    task: JoinHandle<()>,
}

impl Drop for FakeGlance {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeGlance {
    pub async fn start() -> FakeGlance {
        let state = Arc::new(FakeState::default());
        let app = Router::new()
            .route("/v2/images/{id}", get(fake_image))
            .route("/v2/images/{id}/file", get(fake_file))
            .route("/v2/info/stores/detail", get(fake_stores_detail))
            .route("/v2/schemas/image", get(fake_image_schema))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        FakeGlance {
            url: format!("http://{addr}"),
            state,
            task,
        }
    }

    pub fn add_image(&self, id: &str, data: Vec<u8>) {
        self.state
            .images
            .lock()
            .unwrap()
            .insert(id.to_string(), data);
    }

    pub fn file_requests(&self) -> usize {
        self.state.file_requests.load(Ordering::SeqCst)
    }

    pub fn set_failing(&self, failing: bool) {
        self.state.fail_files.store(failing, Ordering::SeqCst);
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn fake_image(State(s): State<Arc<FakeState>>, UrlPath(id): UrlPath<String>) -> Response {
    let images = s.images.lock().unwrap();
    let Some(data) = images.get(&id) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    Json(serde_json::json!({
        "id": id,
        "status": "active",
        "size": data.len(),
        "disk_format": "raw",
        "os_hash_algo": "sha256",
        "os_hash_value": hex(&Sha256::digest(data)),
    }))
    .into_response()
}

async fn fake_file(State(s): State<Arc<FakeState>>, UrlPath(id): UrlPath<String>) -> Response {
    s.file_requests.fetch_add(1, Ordering::SeqCst);
    if s.fail_files.load(Ordering::SeqCst) {
        return (StatusCode::INTERNAL_SERVER_ERROR, "origin is down").into_response();
    }
    match s.images.lock().unwrap().get(&id) {
        Some(data) => data.clone().into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// A cut-down image schema, enough for python-glanceclient's version check.
async fn fake_image_schema() -> Response {
    Json(serde_json::json!({
        "name": "image",
        "properties": {
            "id": {"type": "string", "description": "An identifier for the image"},
            "name": {"type": ["null", "string"], "description": "Descriptive name for the image"},
            "status": {"type": "string", "readOnly": true,
                       "enum": ["queued", "saving", "active", "killed", "deleted"]},
            "size": {"type": ["null", "integer"], "readOnly": true}
        },
        "additionalProperties": {"type": "string"},
        "links": []
    }))
    .into_response()
}

/// Glance's admin-only call: admin → 200, another valid token → 403, anything else → 401.
async fn fake_stores_detail(headers: HeaderMap) -> Response {
    match headers.get("x-auth-token").and_then(|v| v.to_str().ok()) {
        Some(UPSTREAM_ADMIN) => Json(serde_json::json!({"stores": []})).into_response(),
        Some(UPSTREAM_MEMBER) => StatusCode::FORBIDDEN.into_response(),
        _ => StatusCode::UNAUTHORIZED.into_response(),
    }
}

// ---- The server under test ------------------------------------------------------------------

pub struct TestServer {
    pub base: String,
    pub dir: tempfile::TempDir,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

/// A config for a cache in `dir`: admin token [`ADMIN`], upstream `glance` if any, no origin
/// retries (the prefetcher's own backoff is under test), workers on long intervals.
pub fn config(dir: &Path, glance: Option<&str>) -> ServerConfig {
    let mut c = ServerConfig::new(dir);
    c.listen = free_port().to_string();
    c.admin_token = Some(ADMIN.to_string());
    c.sources.glance_url = glance.map(|u| u.parse().unwrap());
    c.sources.http.retries = 0;
    c.sources.http.connect_timeout = Duration::from_secs(2);
    c.prune_interval = Duration::from_secs(3600);
    c.clean_interval = Duration::from_secs(3600);
    c
}

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

impl TestServer {
    pub async fn start(glance: Option<&str>) -> TestServer {
        Self::start_with(glance, |_| {}).await
    }

    pub async fn start_with(
        glance: Option<&str>,
        tweak: impl FnOnce(&mut ServerConfig),
    ) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(&dir.path().join("cache"), glance);
        tweak(&mut cfg);
        Self::start_config(dir, cfg).await
    }

    pub async fn start_config(dir: tempfile::TempDir, cfg: ServerConfig) -> TestServer {
        let base = format!("http://{}", cfg.listen);
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(imgcache_server::run(cfg, async {
            let _ = rx.await;
        }));
        let c = client();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Ok(r) = c.get(format!("{base}/healthz")).send().await
                && r.status().is_success()
            {
                break;
            }
            assert!(!task.is_finished(), "server exited at start");
            assert!(
                tokio::time::Instant::now() < deadline,
                "server did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        TestServer {
            base,
            dir,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    pub fn cache_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("cache")
    }

    /// The same cache directory opened by the test, as another process would.
    pub fn cache(&self) -> Cache {
        Cache::open(self.cache_dir(), DriverKind::Sqlite).unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Stops the server and checks it stopped cleanly, in bounded time.
    pub async fn stop(mut self) {
        let _ = self.shutdown.take().unwrap().send(());
        let task = self.task.take().unwrap();
        tokio::time::timeout(WAIT, task)
            .await
            .expect("server stops in time")
            .expect("server task")
            .expect("server result");
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
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

pub async fn cache_state(c: &reqwest::Client, srv: &TestServer) -> serde_json::Value {
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
