//! Glance's cache-management API, the background workers, `/healthz` and `/metrics`, against
//! `imgcache_server::run` on a loopback port (and a fake upstream Glance where one is needed).

mod common;

use std::time::Duration;

use common::*;
use imgcache_store::Key;

const ID_A: &str = "0a7e6b2c-1111-4c3a-9d7e-000000000001";
const ID_B: &str = "0a7e6b2c-1111-4c3a-9d7e-000000000002";
const ID_C: &str = "0a7e6b2c-1111-4c3a-9d7e-000000000003";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_list_2_14_to_2_18_with_2_18_current() {
    let mut srv = Server::start(None).await;
    let c = client();
    let r = c.get(srv.url("/versions")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let body: serde_json::Value = r.json().await.unwrap();
    let versions = body["versions"].as_array().unwrap();
    let ids: Vec<&str> = versions.iter().map(|v| v["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["v2.18", "v2.17", "v2.16", "v2.15", "v2.14"]);
    assert_eq!(versions[0]["status"], "CURRENT");
    assert!(versions[1..].iter().all(|v| v["status"] == "SUPPORTED"));
    for v in versions {
        assert_eq!(v["links"][0]["rel"], "self");
        assert_eq!(v["links"][0]["href"], format!("{}/v2/", srv.base));
    }
    // The unversioned root: the same list with 300 Multiple Choices, as Glance answers.
    let r = c.get(srv.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 300);
    let root: serde_json::Value = r.json().await.unwrap();
    assert_eq!(root, body);
    srv.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_calls_need_an_admin_token() {
    let mut srv = Server::start(None).await;
    let c = client();
    let calls = [
        (reqwest::Method::GET, "/v2/cache".to_string()),
        (reqwest::Method::DELETE, "/v2/cache".to_string()),
        (reqwest::Method::PUT, format!("/v2/cache/{ID_A}")),
        (reqwest::Method::DELETE, format!("/v2/cache/{ID_A}")),
        (reqwest::Method::GET, format!("/v2/cache/nodes/{ID_A}")),
        (reqwest::Method::POST, "/v2/cache/clean".to_string()),
        (reqwest::Method::POST, "/v2/cache/prune".to_string()),
    ];
    for (method, path) in &calls {
        let r = c
            .request(method.clone(), srv.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{method} {path} without a token");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], 401);
        for wrong in ["wrong", "admin-secreT", "admin-secret2"] {
            let r = c
                .request(method.clone(), srv.url(path))
                .header("x-auth-token", wrong)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 403, "{method} {path} with {wrong:?}");
            let body: serde_json::Value = r.json().await.unwrap();
            assert_eq!(body["error"]["code"], 403);
        }
    }
    // Nothing was queued by the refused calls.
    assert!(srv.cache().get_queued_images().unwrap().is_empty());
    // The versions document needs no token.
    let r = c.get(srv.url("/versions")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    srv.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_admin_role_grants_and_member_is_refused() {
    let glance = fake_glance();
    // No local admin token: only upstream can grant access.
    let mut srv = Server::start_with(Some(&glance.url), |c| c.admin_token = None).await;
    let c = client();
    let get = |token: &'static str| {
        c.get(srv.url("/v2/cache"))
            .header("x-auth-token", token)
            .send()
    };
    assert_eq!(get(ADMIN_TOKEN).await.unwrap().status(), 200);
    assert_eq!(get(ADMIN_TOKEN).await.unwrap().status(), 200); // from the answer cache
    assert_eq!(get(MEMBER_TOKEN).await.unwrap().status(), 403);
    assert_eq!(get("unknown-token").await.unwrap().status(), 401);
    // The local secret is not configured here, so it grants nothing.
    assert_eq!(get(ADMIN).await.unwrap().status(), 401);
    srv.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_leaves_a_file_without_a_record_in_place() {
    let mut srv = Server::start(None).await;
    let c = client();
    let cache = srv.cache();
    let path = cache
        .layout()
        .path(&Key::new(ID_C).unwrap(), imgcache_store::Status::Active);
    std::fs::write(&path, b"the operator's file").unwrap();
    let r = c
        .delete(srv.url(&format!("/v2/cache/{ID_C}")))
        .header("x-auth-token", ADMIN)
        .send()
        .await
        .unwrap();
    // Not the cache's to delete: 409, saying why, and the file stays.
    assert_eq!(r.status(), 409);
    let body: serde_json::Value = r.json().await.unwrap();
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("is not a cached image (no record): left alone"),
        "{msg}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"the operator's file");
    srv.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_queue_delete_and_nodes() {
    // No upstream: queued images stay queued (the prefetcher cannot fetch them).
    let mut srv = Server::start(None).await;
    let c = client();
    let cache = srv.cache();

    let empty = cache_state(&c, &srv).await;
    assert_eq!(
        empty,
        serde_json::json!({"cached_images": [], "queued_images": []})
    );

    seed(&cache, ID_A, &[7u8; 1000]);
    let r = c
        .put(srv.url(&format!("/v2/cache/{ID_B}")))
        .header("x-auth-token", ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    // Queuing twice is fine.
    let r = c
        .put(srv.url(&format!("/v2/cache/{ID_B}")))
        .header("x-auth-token", ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);

    let state = cache_state(&c, &srv).await;
    assert_eq!(queued(&state), [ID_B]);
    let cached = state["cached_images"].as_array().unwrap();
    assert_eq!(cached.len(), 1);
    let rec = cached[0].as_object().unwrap();
    let mut fields: Vec<&str> = rec.keys().map(String::as_str).collect();
    fields.sort();
    assert_eq!(
        fields,
        ["hits", "image_id", "last_accessed", "last_modified", "size"]
    );
    assert_eq!(rec["image_id"], ID_A);
    assert_eq!(rec["size"], 1000);
    assert_eq!(rec["hits"], 0);
    // Epoch seconds, as Glance's drivers report them.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    for t in ["last_accessed", "last_modified"] {
        let v = rec[t].as_f64().unwrap();
        assert!((now - v).abs() < 120.0, "{t} = {v}");
    }

    // Nodes: fleet mode is off, so 409 as Glance answers without `centralized_db` (the
    // fleet's answers are tested in crates/cli/tests/fleet.rs).
    let r = c
        .get(srv.url(&format!("/v2/cache/nodes/{ID_A}")))
        .header("x-auth-token", ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(body.to_string().contains("fleet mode is off"), "{body}");

    // DELETE removes the cached file and the queue entry. Again, for an id that is neither
    // cached, queued nor known upstream: 404, as Glance 33 answers.
    for (id, status) in [(ID_A, 204), (ID_B, 204), (ID_A, 404)] {
        let r = c
            .delete(srv.url(&format!("/v2/cache/{id}")))
            .header("x-auth-token", ADMIN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{id}");
        if status == 204 {
            assert!(r.bytes().await.unwrap().is_empty());
        }
    }
    let state = cache_state(&c, &srv).await;
    assert_eq!(
        state,
        serde_json::json!({"cached_images": [], "queued_images": []})
    );
    assert!(
        !cache
            .layout()
            .path(&Key::new(ID_A).unwrap(), imgcache_store::Status::Active)
            .exists()
    );
    srv.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_ids_are_400() {
    let mut srv = Server::start(None).await;
    let c = client();
    let long = "a".repeat(256);
    // Dot segments, plain or encoded, are resolved away by URL parsers: send them raw.
    for id in ["..", "%2e%2e", "%2E.", "."] {
        for method in ["PUT", "DELETE"] {
            let status = raw_request(&srv.base, method, &format!("/v2/cache/{id}")).await;
            assert_eq!(status, 400, "{method} {id}");
        }
    }
    for id in [".hidden", "a%00b", "a%20b", "a%2Fb", long.as_str()] {
        for method in [reqwest::Method::PUT, reqwest::Method::DELETE] {
            let r = c
                .request(method.clone(), srv.url(&format!("/v2/cache/{id}")))
                .header("x-auth-token", ADMIN)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 400, "{method} {id}");
            let body: serde_json::Value = r.json().await.unwrap();
            assert_eq!(body["error"]["code"], 400);
        }
        let r = c
            .get(srv.url(&format!("/v2/cache/nodes/{id}")))
            .header("x-auth-token", ADMIN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "nodes {id}");
    }
    assert!(srv.cache().get_queued_images().unwrap().is_empty());
    // Still serving.
    assert_eq!(
        cache_state(&c, &srv).await["queued_images"],
        serde_json::json!([])
    );
    srv.stop().await.unwrap();
}

/// Sends one request byte for byte as given (no URL normalisation); returns the status.
async fn raw_request(base: &str, method: &str, path: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nX-Auth-Token: {ADMIN}\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf);
    text.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_target_header() {
    let mut srv = Server::start(None).await;
    let c = client();
    let cache = srv.cache();
    let fill = || {
        seed(&cache, ID_A, b"a");
        cache.queue_image(&Key::new(ID_B).unwrap()).unwrap();
    };
    let clear = |target: Option<&'static str>| {
        let mut req = c.delete(srv.url("/v2/cache")).header("x-auth-token", ADMIN);
        if let Some(t) = target {
            req = req.header("x-image-cache-clear-target", t);
        }
        req.send()
    };

    fill();
    let r = clear(Some("cache")).await.unwrap();
    assert_eq!(r.status(), 204);
    let s = cache_state(&c, &srv).await;
    assert!(cached_ids(&s).is_empty());
    assert_eq!(queued(&s), [ID_B]);

    seed(&cache, ID_A, b"a");
    let r = clear(Some("QUEUE")).await.unwrap(); // case-insensitive, as Glance's .lower()
    assert_eq!(r.status(), 204);
    let s = cache_state(&c, &srv).await;
    assert_eq!(cached_ids(&s), [ID_A]);
    assert!(queued(&s).is_empty());

    for target in [None, Some("")] {
        cache.queue_image(&Key::new(ID_B).unwrap()).unwrap();
        if cache.get_cached_images().unwrap().is_empty() {
            seed(&cache, ID_A, b"a");
        }
        let r = clear(target).await.unwrap();
        assert_eq!(r.status(), 204, "target {target:?}");
        let s = cache_state(&c, &srv).await;
        assert!(
            cached_ids(&s).is_empty() && queued(&s).is_empty(),
            "{target:?}: {s}"
        );
    }

    fill();
    for bad in ["both", "all", "cache,queue"] {
        let r = clear(Some(bad)).await.unwrap();
        assert_eq!(r.status(), 400, "target {bad:?}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("x-image-cache-clear-target")
        );
    }
    // A refused clear cleared nothing.
    let s = cache_state(&c, &srv).await;
    assert_eq!(cached_ids(&s), [ID_A]);
    assert_eq!(queued(&s), [ID_B]);
    srv.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_method_is_405_with_allow() {
    let mut srv = Server::start(None).await;
    let c = client();
    let cases = [
        (
            reqwest::Method::POST,
            "/v2/cache".to_string(),
            vec!["GET", "DELETE"],
        ),
        (
            reqwest::Method::PUT,
            "/v2/cache".to_string(),
            vec!["GET", "DELETE"],
        ),
        (
            reqwest::Method::GET,
            format!("/v2/cache/{ID_A}"),
            vec!["PUT", "DELETE"],
        ),
        (
            reqwest::Method::POST,
            format!("/v2/cache/{ID_A}"),
            vec!["PUT", "DELETE"],
        ),
        (
            reqwest::Method::GET,
            "/v2/cache/prune".to_string(),
            vec!["POST"],
        ),
        (
            reqwest::Method::DELETE,
            "/v2/cache/clean".to_string(),
            vec!["POST"],
        ),
        (
            reqwest::Method::DELETE,
            format!("/v2/cache/nodes/{ID_A}"),
            vec!["GET"],
        ),
        (reqwest::Method::POST, "/versions".to_string(), vec!["GET"]),
    ];
    for (method, path, allowed) in cases {
        let r = c
            .request(method.clone(), srv.url(&path))
            .header("x-auth-token", ADMIN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 405, "{method} {path}");
        let allow = r
            .headers()
            .get("allow")
            .unwrap_or_else(|| panic!("{method} {path}: no Allow header"))
            .to_str()
            .unwrap()
            .to_string();
        for m in allowed {
            assert!(
                allow.contains(m),
                "{method} {path}: Allow {allow:?} lacks {m}"
            );
        }
    }
    // An unknown path is a JSON 404.
    let r = c.get(srv.url("/v2/cachex")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    srv.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queuing_a_cached_image_downloads_nothing() {
    let glance = fake_glance();
    glance.seed(image(ID_A, vec![1u8; 4096]));
    let mut srv = Server::start_with(Some(&glance.url), service_token).await;
    let c = client();
    seed(&srv.cache(), ID_A, &[1u8; 4096]);
    let r = c
        .put(srv.url(&format!("/v2/cache/{ID_A}")))
        .header("x-auth-token", ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    // Give the (woken) prefetcher time to act, were it to.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(file_requests(&glance), 0);
    let s = cache_state(&c, &srv).await;
    assert!(queued(&s).is_empty());
    assert_eq!(cached_ids(&s), [ID_A]);
    srv.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetcher_downloads_a_queued_image_once() {
    let glance = fake_glance();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    glance.seed(image(ID_A, data.clone()));
    let mut srv = Server::start_with(Some(&glance.url), service_token).await;
    let c = client();
    let r = c
        .put(srv.url(&format!("/v2/cache/{ID_A}")))
        .header("x-auth-token", ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    eventually("the image to be prefetched", || async {
        let s = cache_state(&c, &srv).await;
        cached_ids(&s) == [ID_A] && queued(&s).is_empty()
    })
    .await;
    assert_eq!(file_requests(&glance), 1);
    let cached = std::fs::read(srv.cache_dir().join(ID_A)).unwrap();
    assert!(cached == data, "cached bytes differ from the origin's");
    // Queuing it again does not download it again.
    let r = c
        .put(srv.url(&format!("/v2/cache/{ID_A}")))
        .header("x-auth-token", ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(file_requests(&glance), 1);
    let metrics = c
        .get(srv.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(&format!(
            "imgcache_fetched_from_origin_bytes_total {}",
            data.len()
        )),
        "{metrics}"
    );
    assert!(metrics.contains("imgcache_cache_entries 1"), "{metrics}");
    srv.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_origin_leaves_the_image_queued_and_the_worker_running() {
    let glance = fake_glance();
    glance.seed(image(ID_A, vec![5u8; 10_000]));
    glance.seed(image(ID_B, vec![6u8; 20_000]));
    glance.set_failing(true);
    let mut srv = Server::start_with(Some(&glance.url), service_token).await;
    let c = client();
    let r = c
        .put(srv.url(&format!("/v2/cache/{ID_A}")))
        .header("x-auth-token", ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    // Retried with backoff (1 s, 2 s, ...): a second attempt comes, and no spin.
    eventually("a retry", || async { file_requests(&glance) >= 2 }).await;
    let s = cache_state(&c, &srv).await;
    assert_eq!(queued(&s), [ID_A]);
    assert!(cached_ids(&s).is_empty());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        file_requests(&glance) <= 3,
        "{} attempts: spinning",
        file_requests(&glance)
    );
    assert!(
        std::fs::read_dir(srv.cache_dir().join("incomplete"))
            .unwrap()
            .next()
            .is_none()
    );

    // The origin recovers: the worker, still running, fetches it on its next retry.
    glance.set_failing(false);
    eventually("the image to be fetched after recovery", || async {
        let s = cache_state(&c, &srv).await;
        cached_ids(&s) == [ID_A] && queued(&s).is_empty()
    })
    .await;
    // And it keeps serving the queue.
    let before = file_requests(&glance);
    let r = c
        .put(srv.url(&format!("/v2/cache/{ID_B}")))
        .header("x-auth-token", ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    eventually("the second image", || async {
        cached_ids(&cache_state(&c, &srv).await) == [ID_A, ID_B]
    })
    .await;
    assert_eq!(file_requests(&glance), before + 1);
    srv.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_upstream_does_not_know_is_refused_at_once() {
    let glance = fake_glance();
    let mut srv = Server::start_with(Some(&glance.url), service_token).await;
    let c = client();
    let r = c
        .put(srv.url(&format!("/v2/cache/{ID_C}")))
        .header("x-auth-token", ADMIN)
        .send()
        .await
        .unwrap();
    // As Glance 33: 404 with the reason, and nothing queued for the prefetcher to drop later.
    assert_eq!(r.status(), 404);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body.to_string()
            .contains(&format!("Image {ID_C} not found")),
        "{body}"
    );
    assert!(queued(&cache_state(&c, &srv).await).is_empty());
    assert_eq!(file_requests(&glance), 0);
    srv.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_survives_a_restart() {
    let glance = fake_glance();
    glance.seed(image(ID_A, vec![9u8; 5000]));
    let dir = tempfile::tempdir().unwrap();
    let cache_dir = dir.path().join("cache");
    {
        // Queued while no server runs (as `imgcache queue` would).
        let cache =
            imgcache_store::Cache::open(&cache_dir, imgcache_store::DriverKind::Sqlite).unwrap();
        cache.queue_image(&Key::new(ID_A).unwrap()).unwrap();
    }
    let mut cfg = config(&cache_dir, Some(&glance.url));
    service_token(&mut cfg);
    let mut srv = Server::start_config(dir, cfg).await;
    let c = client();
    eventually("the queued image to be fetched at start", || async {
        cached_ids(&cache_state(&c, &srv).await) == [ID_A]
    })
    .await;
    assert_eq!(file_requests(&glance), 1);
    srv.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_endpoint_reports_what_it_evicted() {
    let mut srv = Server::start_with(None, |c| c.max_size = 2500).await;
    let c = client();
    let cache = srv.cache();
    seed(&cache, ID_A, &[1u8; 1000]);
    std::thread::sleep(Duration::from_millis(20));
    seed(&cache, ID_B, &[2u8; 1000]);
    std::thread::sleep(Duration::from_millis(20));
    seed(&cache, ID_C, &[3u8; 1000]);
    let r = c
        .post(srv.url("/v2/cache/prune"))
        .header("x-auth-token", ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        body,
        serde_json::json!({"total_files_pruned": 1, "total_bytes_pruned": 1000})
    );
    // The least recently used one went.
    assert_eq!(cached_ids(&cache_state(&c, &srv).await), [ID_B, ID_C]);
    // Under the limit: nothing more.
    let body: serde_json::Value = c
        .post(srv.url("/v2/cache/prune"))
        .header("x-auth-token", ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        body,
        serde_json::json!({"total_files_pruned": 0, "total_bytes_pruned": 0})
    );
    let metrics = c
        .get(srv.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("imgcache_evictions_total 1"), "{metrics}");
    assert!(
        metrics.contains("imgcache_cache_size_bytes 2000"),
        "{metrics}"
    );
    assert!(metrics.contains("imgcache_cache_entries 2"), "{metrics}");
    srv.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruner_worker_keeps_the_cache_under_max_size() {
    let mut srv = Server::start_with(None, |c| {
        c.max_size = 2500;
        c.prune_interval = Duration::from_millis(100);
    })
    .await;
    let cache = srv.cache();
    seed(&cache, ID_A, &[1u8; 1000]);
    seed(&cache, ID_B, &[2u8; 1000]);
    seed(&cache, ID_C, &[3u8; 1000]);
    eventually("the pruner", || async {
        cache.get_cache_size().unwrap() <= 2500
    })
    .await;
    assert_eq!(cache.get_cached_images().unwrap().len(), 2);
    srv.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_endpoint_and_cleaner_worker_remove_invalid_files() {
    let mut srv = Server::start(None).await;
    let c = client();
    let invalid = srv.cache_dir().join("invalid").join(ID_A);
    std::fs::write(&invalid, b"broken").unwrap();
    let r = c
        .post(srv.url("/v2/cache/clean"))
        .header("x-auth-token", ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.bytes().await.unwrap().is_empty(),
        "Glance answers clean with no body"
    );
    assert!(!invalid.exists());
    srv.stop().await.unwrap();

    let mut srv = Server::start_with(None, |c| c.clean_interval = Duration::from_millis(100)).await;
    let invalid = srv.cache_dir().join("invalid").join(ID_B);
    std::fs::write(&invalid, b"broken").unwrap();
    eventually("the cleaner", || async { !invalid.exists() }).await;
    srv.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_readyz_and_metrics() {
    let mut srv = Server::start(None).await;
    let c = client();
    let r = c.get(srv.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["status"], "ok");
    let r = c.get(srv.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["status"], "ready", "{body}");
    assert_eq!(body["driver"], "sqlite");
    assert_eq!(body["failed"], serde_json::json!([]));
    assert_eq!(body["checks"]["cache_dir_writable"]["ok"], true);
    assert_eq!(body["checks"]["driver"]["ok"], true);
    // Neither an upstream nor a fleet is configured: nothing is checked of them.
    assert!(body["checks"].get("upstream_glance").is_none(), "{body}");
    assert!(body["checks"].get("fleet_db").is_none(), "{body}");

    seed(&srv.cache(), ID_A, &[0u8; 123]);
    // A few requests for the latency histogram.
    for _ in 0..3 {
        cache_state(&c, &srv).await;
    }
    let r = c.get(srv.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text = r.text().await.unwrap();
    for needle in [
        "# TYPE imgcache_cache_hits_total counter",
        "imgcache_cache_hits_total 0",
        "imgcache_cache_misses_total",
        "imgcache_served_from_cache_bytes_total",
        "imgcache_fetched_from_origin_bytes_total",
        "imgcache_origin_requests_total",
        "imgcache_origin_errors_total 0",
        "imgcache_inflight_downloads 0",
        "imgcache_cache_size_bytes 123",
        "imgcache_evictions_total 0",
        "imgcache_checksum_failures_total 0",
        "# TYPE imgcache_request_duration_seconds histogram",
        "imgcache_request_duration_seconds_bucket{route=\"/v2/cache\",method=\"GET\",status=\"200\",le=\"+Inf\"}",
        "imgcache_requests_total{route=\"/readyz\",method=\"GET\",status=\"200\"} 1",
        "# TYPE process_resident_memory_bytes gauge",
    ] {
        assert!(text.contains(needle), "metrics lack {needle:?}:\n{text}");
    }
    assert!(!text.contains("# EOF"), "OpenMetrics only when asked for");
    let count: u64 = text
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                "imgcache_request_duration_seconds_count{route=\"/v2/cache\",method=\"GET\",status=\"200\"} ",
            )
        })
        .expect("histogram count")
        .parse()
        .unwrap();
    assert_eq!(count, 3, "the cache-state requests");

    // OpenMetrics for a scraper that asks for it.
    let r = c
        .get(srv.url("/metrics"))
        .header("accept", "application/openmetrics-text; version=1.0.0")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["content-type"],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let om = r.text().await.unwrap();
    assert!(om.contains("# TYPE imgcache_cache_hits counter\n"), "{om}");
    assert!(om.ends_with("# EOF\n"), "{om}");

    // The cache directory gone: not ready, and said why; still alive.
    std::fs::remove_dir_all(srv.cache_dir()).unwrap();
    let r = c.get(srv.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["status"], "not_ready");
    assert_eq!(body["checks"]["cache_dir_writable"]["ok"], false);
    assert!(
        body["checks"]["cache_dir_writable"]["error"]
            .as_str()
            .is_some_and(|e| e.contains(&srv.cache_dir().display().to_string())),
        "{body}"
    );
    assert!(
        body["failed"]
            .as_array()
            .unwrap()
            .contains(&"cache_dir_writable".into()),
        "{body}"
    );
    let r = c.get(srv.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200, "liveness does not depend on the disk");
    srv.stop().await.unwrap();
}

/// `/readyz` asks the upstream Glance: down, it is 503 naming the upstream and why; up, 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_names_an_unreachable_upstream() {
    // A port nothing listens on any more.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let mut srv = Server::start(Some(&dead)).await;
    let c = client();
    let r = c.get(srv.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["status"], "not_ready", "{body}");
    assert_eq!(
        body["failed"],
        serde_json::json!(["upstream_glance"]),
        "{body}"
    );
    let up = &body["checks"]["upstream_glance"];
    assert_eq!(up["ok"], false, "{body}");
    let error = up["error"].as_str().unwrap();
    assert!(
        error.contains(&dead) && error.contains("cannot reach"),
        "the cause names the upstream: {error}"
    );
    assert_eq!(body["checks"]["cache_dir_writable"]["ok"], true);
    assert_eq!(
        c.get(srv.url("/healthz")).send().await.unwrap().status(),
        200
    );
    srv.stop().await.unwrap();

    let glance = fake_glance();
    let mut srv = Server::start(Some(&glance.url)).await;
    let r = c.get(srv.url("/readyz")).send().await.unwrap();
    let status = r.status();
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "ready");
    assert_eq!(body["checks"]["upstream_glance"]["ok"], true, "{body}");
    srv.stop().await.unwrap();
}
