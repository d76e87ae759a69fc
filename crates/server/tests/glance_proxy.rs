//! The Glance v2 API relayed upstream: what imgcache does not answer itself goes to the
//! upstream Glance with the client's headers and body, streamed both ways, and comes back with
//! the upstream's status and headers, its links naming imgcache. The upstream here is a
//! recording HTTP server (the real clients' tests, `crates/cli/tests/glance_clients.rs`, use
//! the test kit's fake Glance): each test checks what arrived on the far side.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use common::*;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::sync::Notify;

const TOKEN: &str = "user-token";
const SERVICE: &str = "service-token";
const ID1: &str = "0c3e4d2a-1111-4a00-8a00-000000000001";
const ID2: &str = "0c3e4d2a-1111-4a00-8a00-000000000002";
const ID3: &str = "0c3e4d2a-1111-4a00-8a00-000000000003";
const ID4: &str = "0c3e4d2a-1111-4a00-8a00-000000000004";

#[derive(Default)]
struct Up {
    url: Mutex<String>,
    /// Image id → status.
    status: Mutex<HashMap<String, String>>,
    received: AtomicU64,
    progress: Notify,
    upload_sha: Mutex<Option<String>>,
    /// Every request: (method, path, x-auth-token).
    log: Mutex<Vec<(String, String, Option<String>)>>,
    down: AtomicBool,
}

fn token(h: &HeaderMap) -> Option<String> {
    h.get("x-auth-token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [("www-authenticate", "Keystone uri=\"http://keystone/v3\"")],
        Json(
            serde_json::json!({"error": {"code": 401, "title": "Unauthorized",
            "message": "The request you have made requires authentication."}}),
        ),
    )
        .into_response()
}

async fn record(State(up): State<Arc<Up>>, req: Request, next: axum::middleware::Next) -> Response {
    up.log.lock().unwrap().push((
        req.method().to_string(),
        req.uri().path().to_string(),
        token(req.headers()),
    ));
    if up.down.load(Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let mut resp = next.run(req).await;
    resp.headers_mut()
        .insert("x-openstack-request-id", "req-upstream-1".parse().unwrap());
    resp
}

async fn list(State(up): State<Arc<Up>>, h: HeaderMap) -> Response {
    if token(&h).as_deref() != Some(TOKEN) {
        return unauthorized();
    }
    let base = up.url.lock().unwrap().clone();
    Json(serde_json::json!({
        "images": [{"id": ID1, "self": format!("/v2/images/{ID1}"), "file": format!("/v2/images/{ID1}/file")}],
        "first": "/v2/images",
        "next": format!("{base}/v2/images?marker={ID1}"),
        "schema": "/v2/schemas/images",
    }))
    .into_response()
}

async fn create(State(up): State<Arc<Up>>, h: HeaderMap) -> Response {
    if token(&h).as_deref() != Some(TOKEN) {
        return unauthorized();
    }
    let base = up.url.lock().unwrap().clone();
    (
        StatusCode::CREATED,
        [("location", format!("{base}/v2/images/{ID4}"))],
        Json(serde_json::json!({"id": ID4, "status": "queued"})),
    )
        .into_response()
}

async fn upload(State(up): State<Arc<Up>>, body: Body) -> Response {
    let mut s = body.into_data_stream();
    let mut sha = Sha256::new();
    while let Some(chunk) = s.next().await {
        let Ok(c) = chunk else {
            return StatusCode::BAD_REQUEST.into_response();
        };
        sha.update(&c);
        up.received.fetch_add(c.len() as u64, Ordering::SeqCst);
        up.progress.notify_waiters();
    }
    *up.upload_sha.lock().unwrap() = Some(hex::encode(sha.finalize()));
    StatusCode::NO_CONTENT.into_response()
}

async fn image(State(up): State<Arc<Up>>, UrlPath(id): UrlPath<String>) -> Response {
    match up.status.lock().unwrap().get(&id) {
        Some(status) => {
            Json(serde_json::json!({"id": id, "status": status, "size": 5})).into_response()
        }
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn delete(State(up): State<Arc<Up>>, UrlPath(id): UrlPath<String>) -> StatusCode {
    match up.status.lock().unwrap().remove(&id) {
        Some(_) => StatusCode::NO_CONTENT,
        None => StatusCode::NOT_FOUND,
    }
}

async fn deactivate(State(up): State<Arc<Up>>, UrlPath(id): UrlPath<String>) -> StatusCode {
    up.status.lock().unwrap().insert(id, "deactivated".into());
    StatusCode::NO_CONTENT
}

async fn schema(h: HeaderMap) -> Response {
    match token(&h).as_deref() {
        Some(TOKEN) | Some(SERVICE) => {
            Json(serde_json::json!({"name": "image", "properties": {}})).into_response()
        }
        _ => unauthorized(),
    }
}

async fn start_upstream() -> (String, Arc<Up>) {
    let up = Arc::new(Up::default());
    for id in [ID1, ID2, ID3] {
        up.status.lock().unwrap().insert(id.into(), "active".into());
    }
    let app = Router::new()
        .route("/v2/images", get(list).post(create))
        .route("/v2/images/{id}", get(image).delete(delete))
        .route("/v2/images/{id}/file", put(upload))
        .route("/v2/images/{id}/actions/deactivate", post(deactivate))
        .route("/v2/schemas/image", get(schema))
        .layer(axum::middleware::from_fn_with_state(up.clone(), record))
        .with_state(up.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    *up.url.lock().unwrap() = url.clone();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, up)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_lists_and_creates_are_relayed_with_links_naming_imgcache() {
    let (upstream, up) = start_upstream().await;
    let mut srv = Server::start(Some(&upstream)).await;
    let c = client();

    let r = c
        .get(srv.url("/v2/images?limit=1"))
        .header("x-auth-token", TOKEN)
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "img.example:8443")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-openstack-request-id"], "req-upstream-1");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        body["next"],
        format!("https://img.example:8443/v2/images?marker={ID1}")
    );
    assert_eq!(body["first"], "/v2/images", "relative links stay relative");
    assert_eq!(
        up.log.lock().unwrap().last().unwrap(),
        &("GET".into(), "/v2/images".into(), Some(TOKEN.into())),
        "the client's token went upstream"
    );

    // An unknown token: the upstream's 401, its WWW-Authenticate and body, untouched.
    let r = c
        .get(srv.url("/v2/images"))
        .header("x-auth-token", "nobody")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(
        r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Keystone uri=")
    );
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], 401);

    // Create: 201, Location names imgcache as the client reached it.
    let r = c
        .post(srv.url("/v2/images"))
        .header("x-auth-token", TOKEN)
        .json(&serde_json::json!({"name": "x", "disk_format": "raw", "container_format": "bare"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(
        r.headers()["location"],
        format!("{}/v2/images/{ID4}", srv.base).as_str()
    );

    // Paths outside /v2 are not relayed.
    let r = c.get(srv.url("/status-nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert!(
        up.log
            .lock()
            .unwrap()
            .iter()
            .all(|(_, p, _)| p != "/status-nope"),
        "nothing outside /v2 goes upstream"
    );
    srv.stop().await.unwrap();
}

/// The upstream has the first half of an upload before the client sends the second: the
/// proxy streams (a buffering proxy would wait for the end, and this test would time out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_stream_through_unbuffered() {
    let (upstream, up) = start_upstream().await;
    let mut srv = Server::start(Some(&upstream)).await;
    let half = 16 << 20;
    let data = imgcache_testkit::image_bytes(2 * half, 7);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(4);
    let body = reqwest::Body::wrap_stream(futures_util::stream::unfold(rx, |mut rx| async {
        rx.recv().await.map(|item| (item, rx))
    }));
    let put = tokio::spawn({
        let url = srv.url(&format!("/v2/images/{ID4}/file"));
        async move {
            client()
                .put(url)
                .header("x-auth-token", TOKEN)
                .header("content-type", "application/octet-stream")
                .body(body)
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    for chunk in data[..half].chunks(1 << 20) {
        tx.send(Ok(bytes::Bytes::copy_from_slice(chunk)))
            .await
            .unwrap();
    }
    // Wait (on the upstream's own progress events) until it holds the first half.
    tokio::time::timeout(WAIT, async {
        loop {
            let notified = up.progress.notified();
            if up.received.load(Ordering::SeqCst) >= half as u64 {
                break;
            }
            notified.await;
        }
    })
    .await
    .expect("the upstream got the first half while the client still held the second");
    for chunk in data[half..].chunks(1 << 20) {
        tx.send(Ok(bytes::Bytes::copy_from_slice(chunk)))
            .await
            .unwrap();
    }
    drop(tx);
    assert_eq!(put.await.unwrap(), 204);
    assert_eq!(
        up.upload_sha.lock().unwrap().clone().unwrap(),
        hex::encode(Sha256::digest(&data)),
        "the bytes arrived exact"
    );
    srv.stop().await.unwrap();
}

/// An image deleted or deactivated upstream is no longer served: the proxied call evicts it,
/// and an access check that finds it deactivated (done behind imgcache's back) evicts it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_or_deactivating_upstream_evicts() {
    let (upstream, up) = start_upstream().await;
    let mut srv = Server::start(Some(&upstream)).await;
    let cache = srv.cache();
    for id in [ID1, ID2, ID3] {
        seed(&cache, id, b"image");
    }
    let c = client();
    let cached = || async { cached_ids(&cache_state(&client(), &srv).await) };
    assert_eq!(cached().await, [ID1, ID2, ID3]);

    let r = c
        .delete(srv.url(&format!("/v2/images/{ID1}")))
        .header("x-auth-token", TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(cached().await, [ID2, ID3]);

    let r = c
        .post(srv.url(&format!("/v2/images/{ID2}/actions/deactivate")))
        .header("x-auth-token", TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(cached().await, [ID3]);

    // Deactivated upstream directly: the next download's access check evicts it.
    up.status
        .lock()
        .unwrap()
        .insert(ID3.into(), "deactivated".into());
    let r = c
        .get(srv.url(&format!("/v2/images/{ID3}/file")))
        .header("x-auth-token", TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("deactivated"),
        "{body}"
    );
    assert!(cached().await.is_empty());

    // A failed upstream delete evicts nothing.
    seed(&cache, ID1, b"image");
    let r = c
        .delete(srv.url(&format!("/v2/images/{ID1}")))
        .header("x-auth-token", TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "ID1 is gone upstream already");
    assert_eq!(cached().await, [ID1]);
    srv.stop().await.unwrap();
}

/// Schemas answer the local admin token too: through the service token, or the last good
/// copy (kept across restarts), so glanceclient's version discovery never falls back to v1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemas_fall_back_to_the_service_token_then_the_last_good_copy() {
    let (upstream, up) = start_upstream().await;
    let c = client();
    let schema = |srv: &Server, tok: &str| {
        c.get(srv.url("/v2/schemas/image"))
            .header("x-auth-token", tok)
            .send()
    };

    // With a service token: imgcache's own admin token gets the schema through it.
    let mut srv = Server::start_with(Some(&upstream), |cfg| {
        cfg.sources.glance_token = Some(SERVICE.into());
    })
    .await;
    let r = schema(&srv, ADMIN).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["name"],
        "image"
    );
    let tokens: Vec<Option<String>> = up
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, p, _)| p == "/v2/schemas/image")
        .map(|(_, _, t)| t.clone())
        .collect();
    assert_eq!(tokens, [Some(ADMIN.into()), Some(SERVICE.into())]);
    srv.stop().await.unwrap();

    // No service token, and nothing ever fetched: the upstream's 401.
    let keep = tempfile::tempdir().unwrap();
    let cache_dir = keep.path().join("cache");
    let start = || {
        Server::start_config(
            tempfile::tempdir().unwrap(),
            common::config(&cache_dir, Some(&upstream)),
        )
    };
    let mut srv = start().await;
    // imgcache's own token is valid here: not a 401 (glanceclient would call the
    // credentials invalid), but no copy yet.
    assert_eq!(schema(&srv, ADMIN).await.unwrap().status(), 404);
    assert_eq!(schema(&srv, "nobody").await.unwrap().status(), 401);
    // A user's token fetches it once; then the admin token gets the copy, also after a
    // restart on the same cache directory with the upstream down.
    assert_eq!(schema(&srv, TOKEN).await.unwrap().status(), 200);
    assert_eq!(schema(&srv, ADMIN).await.unwrap().status(), 200);
    srv.stop().await.unwrap();
    up.down.store(true, Ordering::SeqCst);
    let mut srv = start().await;
    let r = schema(&srv, ADMIN).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["name"],
        "image"
    );
    srv.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_honour_the_proxy_in_front() {
    let mut srv = Server::start(None).await;
    let r = client()
        .get(srv.url("/versions"))
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "img.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("x-openstack-request-id"));
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        body["versions"][0]["links"][0]["href"],
        "https://img.example/v2/"
    );
    srv.stop().await.unwrap();
}
