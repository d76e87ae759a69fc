//! Image serving through the real server loop (`imgcache_server::run_on` on 127.0.0.1:0)
//! against an in-process fake Glance / http origin, with real clients (reqwest, curl, aria2c).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ID: &str = "6a2b5b54-2d8c-4d6a-9f4e-0c1b2c3d4e5f";
const ID2: &str = "7b3c6c65-3e9d-4e7b-8a5f-1d2c3e4f5a6b";
/// The `Last-Modified` of the file the validators test serves.
const FILES_LAST_MODIFIED: &str = "Mon, 30 Nov 2026 08:00:00 GMT";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn miss_then_hit_byte_exact_with_headers_and_ranges() {
    let fake = fake_glance();
    let data = image_bytes(3 * MIB + 17, 1);
    fake.seed(image(ID, data.clone()));
    let mut srv = Server::start_with(Some(&fake.url), |_| {}).await;
    let c = client();
    let head = || {
        c.head(srv.image_url(ID))
            .header("x-auth-token", MEMBER_TOKEN)
            .send()
    };
    // HEAD on a miss: the headers Glance's record gives, and no download.
    let r = head().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-length"],
        data.len().to_string().as_str()
    );
    assert_eq!(
        r.headers()["etag"],
        format!("\"{}\"", sha512_hex(&data)).as_str()
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(fake.data_requests(ID), 0, "a HEAD starts no download");
    assert!(!srv.published(ID).exists());
    let get = |range: Option<&str>, if_range: Option<&str>| {
        let mut r = c
            .get(srv.image_url(ID))
            .header("x-auth-token", MEMBER_TOKEN);
        if let Some(v) = range {
            r = r.header("range", v);
        }
        if let Some(v) = if_range {
            r = r.header("if-range", v);
        }
        r.send()
    };

    // Miss, with curl: byte-exact; then published.
    let out = srv.dir.path().join("out");
    let (ok, _, err) = run_cmd(
        "curl",
        vec![
            "-sSf".into(),
            "-H".into(),
            format!("X-Auth-Token: {MEMBER_TOKEN}"),
            "-o".into(),
            out.display().to_string(),
            srv.image_url(ID),
        ],
    )
    .await;
    assert!(ok, "curl: {err}");
    assert_eq!(read(&out), data.as_ref());
    assert_eq!(read(&srv.wait_published(ID).await), data.as_ref());

    // Hit: same bytes, headers, and the origin saw one data request in all.
    let r = get(None, None).await.unwrap();
    assert_eq!(r.status(), 200);
    let h = r.headers().clone();
    assert_eq!(h["content-length"], data.len().to_string().as_str());
    assert_eq!(h["accept-ranges"], "bytes");
    let md5 = md5_hex(&data);
    // The strongest checksum Glance's record gives: its sha512 os_hash_value.
    let etag = format!("\"{}\"", sha512_hex(&data));
    assert_eq!(h["etag"], etag.as_str());
    // As Glance sends it: the hex digest (python-glanceclient compares it with hexdigest()).
    assert_eq!(h["content-md5"], md5.as_str());
    let last_modified = h["last-modified"].to_str().unwrap().to_string();
    assert!(httpdate::parse_http_date(&last_modified).is_ok());
    assert_eq!(r.bytes().await.unwrap(), data);
    assert_eq!(fake.data_requests(ID), 1);

    // HEAD: headers only.
    let r = head().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-length"],
        data.len().to_string().as_str()
    );
    assert_eq!(r.bytes().await.unwrap().len(), 0);

    // Ranges.
    let len = data.len();
    let r = get(Some("bytes=100-199"), None).await.unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes 100-199/{len}").as_str()
    );
    assert!(r.headers().get("content-md5").is_none());
    assert_eq!(r.bytes().await.unwrap(), data.slice(100..200));
    let r = get(Some("bytes=-10"), None).await.unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap(), data.slice(len - 10..));
    let r = get(Some(&format!("bytes={}-", len - 5)), None)
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap(), data.slice(len - 5..));
    let r = get(Some(&format!("bytes={len}-")), None).await.unwrap();
    assert_eq!(r.status(), 416);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes */{len}").as_str()
    );
    for whole in ["bytes=0-1,5-9", "bytes=x-y", "pages=1-2", "bytes=9-1"] {
        let r = get(Some(whole), None).await.unwrap();
        assert_eq!(r.status(), 200, "{whole}");
        assert_eq!(r.bytes().await.unwrap(), data, "{whole}");
    }
    // If-Range: a matching validator gets the range, a stale one the whole image.
    let r = get(Some("bytes=0-9"), Some(&etag)).await.unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap(), data.slice(0..10));
    let r = get(Some("bytes=0-9"), Some(&last_modified)).await.unwrap();
    assert_eq!(r.status(), 206);
    let r = get(Some("bytes=0-9"), Some("\"stale\"")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), data);
    assert_eq!(fake.data_requests(ID), 1);
    srv.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn private_images_need_a_token_upstream_accepts() {
    let fake = fake_glance();
    let data = image_bytes(MIB, 2);
    fake.seed(image(ID, data.clone()).private_to(MEMBER_PROJECT));
    let mut srv = Server::start_with(Some(&fake.url), |_| {}).await;
    let c = client();
    // Cache it with a good token.
    let r = c
        .get(srv.image_url(ID))
        .header("x-auth-token", MEMBER_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), data);
    assert!(srv.wait_published(ID).await.exists());
    // Cached now, but a token whose project upstream does not show the image gets upstream's
    // answer (Glance hides another project's private image: 404), and no token 401.
    for (token, status) in [(Some(OTHER_TOKEN), 404), (None, 401)] {
        let mut r = c.get(srv.image_url(ID));
        if let Some(t) = token {
            r = r.header("x-auth-token", t);
        }
        let r = r.send().await.unwrap();
        assert_eq!(r.status(), status);
        let body: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        assert_eq!(body["error"]["code"], status);
    }
    // An image upstream does not know: 404 passes through.
    let r = c
        .get(srv.image_url(ID2))
        .header("x-auth-token", MEMBER_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(fake.data_requests(ID), 1);
    srv.stop().await.unwrap();
}

/// 64 clients on one uncached image from a throttled origin: one origin data request, every
/// client byte-exact, and bytes reach the clients while the download is still running.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_clients_one_origin_request_streamed_while_filling() {
    let fake = fake_glance();
    let data = image_bytes(4 * MIB, 3);
    fake.seed(image(ID, data.clone()).throttle(128 << 10, Duration::from_millis(25)));
    let srv = Server::start_with(Some(&fake.url), |_| {}).await;
    let h1 = client();
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..64 {
        // HTTP/1.1 followers are sent with sendfile, HTTP/2 ones through user space.
        let c = if i % 4 < 2 { h1.clone() } else { h2.clone() };
        let url = srv.image_url(ID);
        // Half of them ask for a range in the middle: they wait only for their own bytes.
        let range = (i % 2 == 1).then_some((MIB, 2 * MIB));
        tasks.push(tokio::spawn(async move {
            let mut req = c.get(url).header("x-auth-token", MEMBER_TOKEN);
            if let Some((s, e)) = range {
                req = req.header("range", format!("bytes={s}-{}", e - 1));
            }
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            let mut first = None;
            let mut got = Vec::new();
            let mut s = r.bytes_stream();
            while let Some(chunk) = s.next().await {
                let chunk = chunk.unwrap();
                if first.is_none() && !chunk.is_empty() {
                    first = Some(Instant::now());
                }
                got.extend_from_slice(&chunk);
            }
            (status, range, got, first.unwrap())
        }));
    }
    let mut firsts = Vec::new();
    for t in tasks {
        let (status, range, got, first) = t.await.unwrap();
        match range {
            None => {
                assert_eq!(status, 200);
                assert!(got == data.as_ref(), "full body differs");
            }
            Some((s, e)) => {
                assert_eq!(status, 206);
                assert!(got == data[s..e], "range body differs");
            }
        }
        firsts.push(first);
    }
    assert_eq!(fake.data_requests(ID), 1, "one origin data request");
    let end = fake.body_end(ID).expect("origin finished");
    let early = firsts.iter().filter(|f| **f < end).count();
    assert_eq!(
        early, 64,
        "every client got bytes before the origin finished"
    );
    assert_eq!(read(&srv.wait_published(ID).await), data.as_ref());
}

/// `n` clients on one failing download, half on HTTP/1.1 (followers sent with sendfile), half
/// on HTTP/2 (followers read through user space): none may see a clean 200.
async fn all_clients_fail(srv: &Server, n: usize) {
    let h1 = client();
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..n {
        let c = if i % 2 == 0 { h1.clone() } else { h2.clone() };
        let url = srv.image_url(ID);
        tasks.push(tokio::spawn(async move {
            let r = c.get(url).header("x-auth-token", MEMBER_TOKEN).send().await;
            match r {
                Err(_) => true,
                Ok(r) if r.status() != 200 => true,
                Ok(r) => r.bytes().await.is_err(),
            }
        }));
    }
    for t in tasks {
        assert!(t.await.unwrap(), "a client saw a clean 200");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn origin_dies_mid_download_every_client_sees_an_error() {
    let fake = fake_glance();
    let data = image_bytes(4 * MIB, 4);
    fake.seed(
        image(ID, data.clone())
            .throttle(256 << 10, Duration::from_millis(10))
            .die_after(2 * MIB as u64),
    );
    let mut srv = Server::start_with(Some(&fake.url), |_| {}).await;
    all_clients_fail(&srv, 8).await;
    assert!(!srv.published(ID).exists(), "nothing published");
    let invalid = srv.invalid(ID);
    assert!(
        common_wait(|| invalid.exists()).await,
        "invalid/ holds the partial file"
    );
    srv.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn checksum_mismatch_aborts_every_reader() {
    let fake = fake_glance();
    let data = image_bytes(2 * MIB, 5);
    fake.seed(
        image(ID, data)
            .wrong_checksums()
            .throttle(256 << 10, Duration::from_millis(5)),
    );
    let mut srv = Server::start_with(Some(&fake.url), |_| {}).await;
    all_clients_fail(&srv, 8).await;
    assert!(!srv.published(ID).exists());
    let invalid = srv.invalid(ID);
    assert!(common_wait(|| invalid.exists()).await);
    // Counted just after the file went to invalid/.
    assert_eq!(
        metric_reaching(&srv, "imgcache_checksum_failures_total", 1).await,
        1
    );
    srv.stop().await.unwrap();
}

async fn common_wait(mut f: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_mid_download_publishes_nothing() {
    let fake = fake_glance();
    let data = image_bytes(4 * MIB, 6);
    fake.seed(image(ID, data).throttle(64 << 10, Duration::from_millis(50)));
    let mut srv = Server::start_with(Some(&fake.url), |c| {
        c.shutdown_grace = Duration::from_millis(300)
    })
    .await;
    let c = client();
    let url = srv.image_url(ID);
    let reader = tokio::spawn(async move {
        let r = c
            .get(url)
            .header("x-auth-token", MEMBER_TOKEN)
            .send()
            .await
            .unwrap();
        r.bytes().await.is_err()
    });
    let incomplete = srv.cache_dir().join("incomplete").join(ID);
    assert!(common_wait(|| incomplete.exists()).await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    srv.stop().await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(10));
    assert!(reader.await.unwrap(), "the client saw the cut");
    assert!(!srv.published(ID).exists(), "nothing published");
    assert!(
        srv.invalid(ID).exists(),
        "the partial file went to invalid/"
    );
    // And the store has no record of it.
    let cache =
        imgcache_store::Cache::open(srv.cache_dir(), imgcache_store::DriverKind::Sqlite).unwrap();
    assert!(cache.get_cached_images().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fetch_by_href_only_under_allowed_prefixes() {
    let origin = Origin::temp();
    let data = image_bytes(MIB + 3, 7);
    origin.put("/files/a.img", &data);
    let mut srv = Server::for_origin(None, &origin, |_| {}).await;
    let c = client();
    let fetch = |href: String| {
        let url =
            reqwest::Url::parse_with_params(&srv.url("/v1/fetch"), &[("href", href)]).unwrap();
        c.get(url).send()
    };
    let href = format!("{}/files/a.img", origin.url);
    // HEAD on a miss: the origin's HEAD, no download.
    let head_url =
        reqwest::Url::parse_with_params(&srv.url("/v1/fetch"), &[("href", &href)]).unwrap();
    let r = c.head(head_url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-length"],
        data.len().to_string().as_str()
    );
    assert_eq!(
        origin.data_requests("/files/a.img"),
        0,
        "a HEAD starts no download"
    );
    for _ in 0..2 {
        let r = fetch(href.clone()).await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.bytes().await.unwrap(), data);
    }
    assert_eq!(origin.data_requests("/files/a.img"), 1);
    let key = imgcache_fetch::cache_key(&imgcache_fetch::Href::parse(&href).unwrap(), &href, false);
    assert!(srv.published(key.as_str()).exists());
    for (href, status) in [
        (format!("{}/private/a.img", origin.url), 403),
        (format!("{}/files/../private/a.img", origin.url), 403),
        ("http://example.com/x".to_string(), 403),
        (String::new(), 400),
    ] {
        let r = fetch(href.clone()).await.unwrap();
        assert_eq!(r.status(), status, "{href}");
    }
    let r = c.get(srv.url("/v1/fetch")).send().await.unwrap();
    assert_eq!(r.status(), 400);
    srv.stop().await.unwrap();
}

/// Another process (here: another `Cache` handle, whose flock conflicts the same way) is
/// downloading an image: clients of the server are streamed from its `incomplete/` file while it
/// writes, without a download of the server's own, and get the last byte only once the other
/// writer has published; if that writer fails instead, every client is cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_download_by_another_process_is_streamed_while_it_runs() {
    use std::io::Write;
    let fake = fake_glance();
    let data = image_bytes(4 * MIB + 3, 31);
    fake.seed(image(ID, data.clone()));
    let fake2 = image_bytes(2 * MIB, 32);
    fake.seed(image(ID2, fake2.clone()));
    let mut srv = Server::start_with(Some(&fake.url), |_| {}).await;
    let other =
        imgcache_store::Cache::open(srv.cache_dir(), imgcache_store::DriverKind::Sqlite).unwrap();

    for (id, body, publish) in [(ID, data.clone(), true), (ID2, fake2.clone(), false)] {
        let key = imgcache_store::Key::new(id).unwrap();
        let mut w = other.open_for_write(&key).unwrap().expect("key lock");
        let half = body.len() / 2;
        w.write_all(&body[..half]).unwrap();
        let url = srv.image_url(id);
        // Told when the client has its first bytes (an event, not a timed wait).
        let (first_tx, first_rx) = tokio::sync::oneshot::channel::<()>();
        let client_task = tokio::spawn(async move {
            let r = client()
                .get(url)
                .header("x-auth-token", MEMBER_TOKEN)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let mut s = r.bytes_stream();
            let mut got = Vec::new();
            let mut first_tx = Some(first_tx);
            while let Some(chunk) = s.next().await {
                match chunk {
                    Ok(c) => {
                        if !c.is_empty()
                            && let Some(tx) = first_tx.take()
                        {
                            let _ = tx.send(());
                        }
                        got.extend_from_slice(&c);
                    }
                    Err(_) => return (got, false),
                }
            }
            (got, true)
        });
        // Ranges while the size is unknown: a closed one is served (`/*`), one past the end
        // is cut once the end is known.
        let ranged = |range: String| {
            let url = srv.image_url(id);
            tokio::spawn(async move {
                let r = client()
                    .get(url)
                    .header("x-auth-token", MEMBER_TOKEN)
                    .header("range", range)
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                let content_range = r.headers()["content-range"].to_str().unwrap().to_string();
                (status, content_range, r.bytes().await.ok())
            })
        };
        let inside = ranged("bytes=100-199".into());
        let past = ranged(format!("bytes={}-{}", body.len(), body.len() + 9));
        // The client gets the bytes written so far while the other writer is still at it:
        // the rest is written only once it has them.
        tokio::time::timeout(Duration::from_secs(20), first_rx)
            .await
            .unwrap_or_else(|_| panic!("{id}: no bytes streamed while the writer was at it"))
            .expect("client task");
        // A range waits only for its own bytes (as with any download it follows): inside the
        // first half, it is answered before the writer goes on.
        let (status, content_range, bytes) = inside.await.unwrap();
        assert_eq!((status, content_range.as_str()), (206, "bytes 100-199/*"));
        assert_eq!(bytes.unwrap(), body.slice(100..200));
        w.write_all(&body[half..]).unwrap();
        if publish {
            w.commit().unwrap();
        } else {
            drop(w); // a failed download: to invalid/, nothing published
        }
        let (got, clean) = client_task.await.unwrap();
        // A range past the end: cut once the end is known while it follows, or 416 if it
        // only arrived once the length was known.
        let (status, _, past_bytes) = past.await.unwrap();
        match status {
            206 => assert!(past_bytes.is_none(), "{id}: a range past the end is cut"),
            416 => {}
            s => panic!("{id}: a range past the end got {s}"),
        }
        if publish {
            assert!(clean, "{id}: a complete response");
            assert!(
                got == body.as_ref(),
                "{id}: the other writer's bytes, exactly"
            );
        } else {
            assert!(!clean, "{id}: a failed writer cuts the client");
            assert!(got.len() < body.len());
        }
        // Only a range that arrived after the other writer had ended (416) may have been a
        // miss of the server's own; nothing that followed the other writer downloaded.
        assert_eq!(
            fake.data_requests(id),
            usize::from(status == 416 && !publish),
            "{id}: no download of the server's own while the other writer ran"
        );
    }
    // Published by the other writer: a hit now.
    let r = client()
        .get(srv.image_url(ID))
        .header("x-auth-token", MEMBER_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap(), data);
    assert_eq!(fake.data_requests(ID), 0);
    srv.stop().await.unwrap();
}

/// `/v1/fetch` hits older than the revalidation interval are served at once from the cache
/// while one conditional request checks the origin in the background: a 304 keeps the copy, a
/// changed origin replaces it, a failed new download leaves the old copy served.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fetch_hits_are_revalidated_in_the_background() {
    let origin = Origin::temp();
    let v1 = image_bytes(MIB, 21);
    let v2 = image_bytes(MIB + 7, 22);
    origin.put("/files/r.img", &v1);
    let interval = Duration::from_millis(300);
    let mut srv =
        Server::for_origin(None, &origin, |c| c.sources.revalidate_interval = interval).await;
    let c = client();
    let href = format!("{}/files/r.img", origin.url);
    let url = reqwest::Url::parse_with_params(&srv.url("/v1/fetch"), &[("href", &href)]).unwrap();
    let get = || async {
        c.get(url.clone())
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
    };
    let key = imgcache_fetch::cache_key(&imgcache_fetch::Href::parse(&href).unwrap(), &href, false);
    let published = srv.published(key.as_str());

    assert_eq!(get().await, v1);
    assert_eq!(get().await, v1, "a hit within the interval");
    assert_eq!(
        (
            origin.data_requests("/files/r.img"),
            origin.not_modified("/files/r.img")
        ),
        (1, 0)
    );

    // Due: served from the cache, one conditional request answered 304.
    tokio::time::sleep(interval).await;
    assert_eq!(get().await, v1);
    assert_eq!(get().await, v1, "a second hit starts no second check");
    assert!(
        common_wait(|| origin.not_modified("/files/r.img") == 1).await,
        "one 304"
    );
    assert_eq!(origin.data_requests("/files/r.img"), 1);

    // The origin changes: the next due hit still gets the old copy (already on disk), and the
    // new one replaces it in the background.
    origin.put("/files/r.img", &v2);
    tokio::time::sleep(interval).await;
    assert_eq!(get().await, v1, "stale copy served while revalidating");
    assert!(
        common_wait(|| read(&published) == v2.as_ref()).await,
        "the new image replaced the old one"
    );
    assert_eq!(get().await, v2);
    assert_eq!(origin.data_requests("/files/r.img"), 2);

    // The origin changes again but its download dies: the cached copy stays and is served.
    origin.put("/files/r.img", &image_bytes(MIB, 23));
    origin.die_after("/files/r.img", MIB as u64 / 2);
    tokio::time::sleep(interval).await;
    assert_eq!(get().await, v2);
    assert!(common_wait(|| origin.data_requests("/files/r.img") == 3).await);
    assert_eq!(
        metric_reaching(&srv, "imgcache_revalidation_failures_total", 1).await,
        1,
        "the failed revalidation is counted"
    );
    assert_eq!(read(&published), v2.as_ref(), "the cached copy is intact");
    assert_eq!(get().await, v2);
    srv.stop().await.unwrap();
}

/// An image larger than the cache streams from the origin uncached: the first client costs
/// one origin request (the fill's own, handed over), and a corrupt one is cut, not a clean 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn too_big_for_the_cache_is_streamed_without_caching() {
    let fake = fake_glance();
    let data = image_bytes(2 * MIB, 8);
    fake.seed(image(ID, data.clone()));
    let mut srv = Server::start_with(Some(&fake.url), |c| c.max_size = MIB as u64).await;
    let get = || {
        client()
            .get(srv.image_url(ID))
            .header("x-auth-token", MEMBER_TOKEN)
            .send()
    };
    let r = get().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), data);
    assert!(!srv.published(ID).exists());
    assert_eq!(
        fake.data_requests(ID),
        1,
        "one origin request for one client"
    );
    let r = get().await.unwrap();
    assert_eq!(r.bytes().await.unwrap(), data);
    assert_eq!(
        fake.data_requests(ID),
        2,
        "not cached: each client streams it"
    );

    // Glance's checksum does not match what its data sends: the client never gets it whole.
    fake.seed(image(ID, data.clone()).wrong_checksums());
    let r = get().await.unwrap();
    assert_eq!(r.status(), 200);
    let body = r.bytes().await;
    assert!(body.is_err(), "a corrupt passthrough must be cut");
    assert!(!srv.published(ID).exists());
    srv.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_clean_4xx_and_the_server_keeps_serving() {
    let fake = fake_glance();
    let data = image_bytes(64 << 10, 9);
    fake.seed(image(ID, data.clone()));
    let mut srv = Server::start_with(Some(&fake.url), |_| {}).await;
    let c = client();
    let long = "a".repeat(300);
    for id in [
        "%2e%2e",
        "..",
        "a%2Fb",
        "a%00b",
        ".hidden",
        long.as_str(),
        "%ff",
        "%2E%2E%2Fx",
    ] {
        let (status, body) = raw_get(
            srv.addr,
            &format!("/v2/images/{id}/file"),
            &format!("X-Auth-Token: {MEMBER_TOKEN}\r\n"),
        )
        .await;
        assert_eq!(status, 400, "{id}: {body}");
        let body: serde_json::Value = serde_json::from_str(body.trim()).unwrap_or_else(|e| {
            // A chunked body: take the JSON object out of it.
            let start = body
                .find('{')
                .unwrap_or_else(|| panic!("{id}: {e}: {body}"));
            let end = body.rfind('}').unwrap();
            serde_json::from_str(&body[start..=end]).unwrap()
        });
        assert_eq!(body["error"]["code"], 400, "{id}");
    }
    // Not a UUID: Glance would not know it.
    let r = c
        .get(srv.image_url("not-a-uuid"))
        .header("x-auth-token", MEMBER_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // Huge headers: 431, not a crash.
    let (status, _) = raw_get(
        srv.addr,
        &format!("/v2/images/{ID}/file"),
        &format!(
            "X-Auth-Token: {MEMBER_TOKEN}\r\nX-Junk: {}\r\n",
            "j".repeat(100 << 10)
        ),
    )
    .await;
    assert_eq!(status, 431);
    // Slowloris: a request head that never ends is cut after the header read timeout.
    let mut slow = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    slow.write_all(b"GET /v2/images/").await.unwrap();
    let t = Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "slowloris connection still open after 10 s");
    assert!(t.elapsed() >= Duration::from_millis(500));
    // Still serving.
    let r = c
        .get(srv.image_url(ID))
        .header("x-auth-token", MEMBER_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), data);
    srv.stop().await.unwrap();
}

/// aria2c with 8 ranged connections, through the server, on a miss and then on a hit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn aria2c_eight_connections_on_a_miss_and_a_hit() {
    assert!(
        have("aria2c"),
        "aria2c is needed for this test: apt-get install -y aria2"
    );
    let fake = fake_glance();
    let data = image_bytes(24 * MIB + 5, 10);
    fake.seed(image(ID, data.clone()).throttle(512 << 10, Duration::from_millis(5)));
    let mut srv = Server::start_with(Some(&fake.url), |_| {}).await;
    let out = Arc::new(tempfile::tempdir().unwrap());
    for name in ["miss.img", "hit.img"] {
        let (ok, stdout, err) = run_cmd(
            "aria2c",
            vec![
                "-x8".into(),
                "-s8".into(),
                "-k1M".into(),
                "--min-split-size=1M".into(),
                "--file-allocation=none".into(),
                "--allow-overwrite=true".into(),
                "--console-log-level=warn".into(),
                "--summary-interval=0".into(),
                format!("--header=X-Auth-Token: {MEMBER_TOKEN}"),
                "-d".into(),
                out.path().display().to_string(),
                "-o".into(),
                name.into(),
                srv.image_url(ID),
            ],
        )
        .await;
        assert!(ok, "aria2c: {err} {}", String::from_utf8_lossy(&stdout));
        assert!(
            read(&out.path().join(name)) == data.as_ref(),
            "{name} differs"
        );
    }
    assert_eq!(fake.data_requests(ID), 1);
    srv.stop().await.unwrap();
}

/// Reads one HTTP/1.1 response with a `Content-Length` from `s`, `buf` holding bytes already
/// read past the previous response; returns the head's lines and the body.
async fn read_response(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> (Vec<String>, Vec<u8>) {
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = vec![0u8; 64 << 10];
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed before the head");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head: Vec<String> = String::from_utf8(buf[..head_end - 4].to_vec())
        .unwrap()
        .split("\r\n")
        .map(str::to_owned)
        .collect();
    buf.drain(..head_end);
    let len: usize = head
        .iter()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(|v| v.parse().unwrap())
        })
        .expect("content-length");
    while buf.len() < len {
        let mut chunk = vec![0u8; 1 << 20];
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed mid-body");
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf.drain(..len).collect();
    (head, body)
}

/// The head's lines without `date` (which changes between responses), sorted.
fn head_without_date(head: &[String]) -> Vec<String> {
    let mut h: Vec<String> = head
        .iter()
        .map(|l| l.to_ascii_lowercase())
        // Per response, not per image.
        .filter(|l| !l.starts_with("date:") && !l.starts_with("x-openstack-request-id:"))
        .collect();
    h.sort();
    h
}

/// A counter's value on `/metrics` (0 when absent).
async fn metric(srv: &Server, name: &str) -> u64 {
    let text = client()
        .get(srv.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// A counter's value once it reaches `want` (or after 5 s): for counts a background task or
/// the end of a download updates just after what the test can see.
async fn metric_reaching(srv: &Server, name: &str, want: u64) -> u64 {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let v = metric(srv, name).await;
        if v >= want || Instant::now() > until {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn sendfile_bytes(srv: &Server) -> u64 {
    metric(srv, "imgcache_served_sendfile_bytes_total").await
}

/// Plain HTTP/1.1 goes out with sendfile, on a miss (following the growing file) and on hits:
/// full and ranged bodies byte-exact (across the 8 MiB span boundaries), the exact headers of
/// the hit response (the same as HEAD's, status line included), keep-alive and pipelining
/// intact; HTTP/2 (h2c) keeps the user-space path.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sendfile_hits_byte_exact_with_exact_headers() {
    let fake = fake_glance();
    let data = image_bytes(24 * MIB + 5, 11);
    fake.seed(image(ID, data.clone()));
    // This test is about bytes and headers; the fixture's 1 s slowloris bound cut the
    // pipelined connection on a loaded CI machine (the slowloris test keeps the short one).
    let mut srv = Server::start_with(Some(&fake.url), |c| {
        c.header_read_timeout = Duration::from_secs(30)
    })
    .await;
    let len = data.len();
    // The miss: sendfile from the growing file.
    let r = client()
        .get(srv.image_url(ID))
        .header("x-auth-token", MEMBER_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap(), data);
    assert_eq!(sendfile_bytes(&srv).await, len as u64);

    let md5 = md5_hex(&data);
    // The strongest checksum Glance's record gives: its sha512 os_hash_value.
    let etag = format!("\"{}\"", sha512_hex(&data));
    let mut s = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    let mut buf = Vec::new();
    let req = |method: &str, extra: &str| {
        format!(
            "{method} /v2/images/{ID}/file HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {MEMBER_TOKEN}\r\n{extra}\r\n"
        )
    };
    // HEAD, then a full GET on the same connection: the same head, status line included.
    s.write_all(req("HEAD", "").as_bytes()).await.unwrap();
    let (head_of_head, _) = {
        // HEAD has a Content-Length but no body.
        let (h, b) = read_response_head_only(&mut s, &mut buf).await;
        (h, b)
    };
    s.write_all(req("GET", "").as_bytes()).await.unwrap();
    let (h, body) = read_response(&mut s, &mut buf).await;
    assert_eq!(h[0], "HTTP/1.1 200 OK");
    assert_eq!(head_without_date(&h), head_without_date(&head_of_head));
    let lower = head_without_date(&h);
    for want in [
        format!("content-length: {len}"),
        "accept-ranges: bytes".to_string(),
        "content-type: application/octet-stream".to_string(),
        format!("etag: {etag}"),
        format!("content-md5: {md5}"),
    ] {
        assert!(lower.contains(&want), "{want} missing from {h:?}");
    }
    assert!(lower.iter().any(|l| l.starts_with("last-modified: ")));
    assert!(body == data.as_ref(), "full body differs");
    assert_eq!(sendfile_bytes(&srv).await, 2 * len as u64);

    // Ranges, pipelined on the same connection (keep-alive survives sendfile): inside one
    // span, across span boundaries, a suffix, the last byte, and If-Range.
    let span = 8 * MIB;
    let ranges = [
        (100, 199),
        (span - 10, 2 * span + 10),
        (len - 1000, len - 1),
        (len - 1, len - 1),
        (0, len - 1),
    ];
    let mut pipelined = String::new();
    for (a, b) in ranges {
        pipelined += &req("GET", &format!("Range: bytes={a}-{b}\r\n"));
    }
    pipelined += &req("GET", &format!("Range: bytes=0-9\r\nIf-Range: {etag}\r\n"));
    pipelined += &req("GET", "Range: bytes=0-9\r\nIf-Range: \"stale\"\r\n");
    s.write_all(pipelined.as_bytes()).await.unwrap();
    for (a, b) in ranges {
        let (h, body) = read_response(&mut s, &mut buf).await;
        assert_eq!(h[0], "HTTP/1.1 206 Partial Content", "{a}-{b}");
        let lower = head_without_date(&h);
        assert!(lower.contains(&format!("content-range: bytes {a}-{b}/{len}")));
        assert!(lower.contains(&format!("content-length: {}", b + 1 - a)));
        assert!(lower.contains(&format!("etag: {etag}")));
        assert!(!lower.iter().any(|l| l.starts_with("content-md5")));
        assert!(body == data[a..=b], "range {a}-{b} differs");
    }
    let (h, body) = read_response(&mut s, &mut buf).await;
    assert_eq!(h[0], "HTTP/1.1 206 Partial Content");
    assert_eq!(body, data[..10]);
    let (h, body) = read_response(&mut s, &mut buf).await;
    assert_eq!(h[0], "HTTP/1.1 200 OK");
    assert!(body == data.as_ref());
    drop(s);

    // reqwest over HTTP/1.1: the same bytes and headers as before this change.
    let r = client()
        .get(srv.image_url(ID))
        .header("x-auth-token", MEMBER_TOKEN)
        .header("range", "bytes=-10")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap(), data.slice(len - 10..));

    // HTTP/2 (prior knowledge, plain TCP): the user-space path, byte-exact, no sendfile.
    let before = sendfile_bytes(&srv).await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = h2
        .get(srv.image_url(ID))
        .header("x-auth-token", MEMBER_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.bytes().await.unwrap(), data);
    assert_eq!(sendfile_bytes(&srv).await, before);
    assert_eq!(fake.data_requests(ID), 1);
    srv.stop().await.unwrap();
}

async fn read_response_head_only(
    s: &mut tokio::net::TcpStream,
    buf: &mut Vec<u8>,
) -> (Vec<String>, Vec<u8>) {
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = vec![0u8; 4096];
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed before the head");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buf[..head_end - 4].to_vec())
        .unwrap()
        .split("\r\n")
        .map(str::to_owned)
        .collect();
    buf.drain(..head_end);
    (head, Vec::new())
}

/// A file being sent with sendfile keeps its shared flock until the last byte is out: a prune
/// to size 0 meanwhile evicts nothing and the client still gets every byte; once the response
/// is done, the same prune evicts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sendfile_hit_cannot_be_evicted_mid_send() {
    let fake = fake_glance();
    let data = image_bytes(48 * MIB + 3, 12);
    fake.seed(image(ID, data.clone()));
    let mut srv = Server::start_with(Some(&fake.url), |_| {}).await;
    let r = client()
        .get(srv.image_url(ID))
        .header("x-auth-token", MEMBER_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap(), data);
    let before = sendfile_bytes(&srv).await;

    let mut s = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(
        format!(
            "GET /v2/images/{ID}/file HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {MEMBER_TOKEN}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    let (h, _) = read_response_head_only(&mut s, &mut buf).await;
    assert_eq!(h[0], "HTTP/1.1 200 OK");
    // Stop reading: the socket buffers fill and the send stalls mid-file.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        sendfile_bytes(&srv).await > before,
        "the hit did not go out with sendfile"
    );
    let cache_dir = srv.cache_dir();
    let prune = move || {
        let cache =
            imgcache_store::Cache::open(&cache_dir, imgcache_store::DriverKind::Sqlite).unwrap();
        cache.prune(0).unwrap()
    };
    let p = prune.clone();
    let report = tokio::task::spawn_blocking(p).await.unwrap();
    assert!(report.evicted.is_empty(), "evicted mid-send: {report:?}");
    assert_eq!(report.skipped_in_use.len(), 1, "{report:?}");
    assert!(srv.published(ID).exists());

    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    buf.extend_from_slice(&rest);
    assert!(buf == data.as_ref(), "body differs ({} bytes)", buf.len());
    drop(s);

    // Done: nothing holds the file now.
    let mut evicted = false;
    for _ in 0..50 {
        let p = prune.clone();
        if !tokio::task::spawn_blocking(p)
            .await
            .unwrap()
            .evicted
            .is_empty()
        {
            evicted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(evicted, "the file stayed locked after the response");
    assert!(!srv.published(ID).exists());
    srv.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_zstd_compressed_image_is_served_as_the_origin_sent_it() {
    // A transparent cache: the bytes the origin sent, on the miss (clients follow the file as
    // it is written) and on the hit; nothing decompressed behind the clients' backs.
    let origin = Origin::temp();
    let mut data = b"\x28\xb5\x2f\xfd".to_vec();
    data.extend_from_slice(&image_bytes(MIB, 11));
    let data = bytes::Bytes::from(data);
    origin.put("/files/z.img.zst", &data);
    let mut srv = Server::for_origin(None, &origin, |_| {}).await;
    let c = client();
    let href = format!("{}/files/z.img.zst", origin.url);
    let url = reqwest::Url::parse_with_params(&srv.url("/v1/fetch"), &[("href", &href)]).unwrap();
    for round in ["miss", "hit"] {
        let r = c.get(url.clone()).send().await.unwrap();
        assert_eq!(r.status(), 200, "{round}");
        assert_eq!(r.bytes().await.unwrap(), data, "{round}");
    }
    assert_eq!(origin.data_requests("/files/z.img.zst"), 1);
    srv.stop().await.unwrap();
}

/// One `ETag` and `Last-Modified` from the first byte of a miss on: a HEAD of the miss, the
/// miss itself (mid-stream), the hit, and the hit after the image is re-cached all carry the
/// origin's validators, and conditional requests are answered from them (RFC 9110 order).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn validators_are_the_origins_from_the_first_byte_and_answer_conditionals() {
    let origin = Origin::temp();
    let data = image_bytes(4 * MIB, 31);
    origin.put("/files/v.img", &data);
    origin.touch("/files/v.img", FILES_LAST_MODIFIED);
    origin.throttle("/files/v.img", 256 << 10, Duration::from_millis(20));
    let mut srv = Server::for_origin(None, &origin, |_| {}).await;
    let c = client();
    let href = format!("{}/files/v.img", origin.url);
    let url = reqwest::Url::parse_with_params(&srv.url("/v1/fetch"), &[("href", &href)]).unwrap();
    let (origin_etag, last_modified) = origin.validators_of("/files/v.img");
    assert_eq!(last_modified, FILES_LAST_MODIFIED);
    let validators = |h: &reqwest::header::HeaderMap| {
        (
            h.get("etag").map(|v| v.to_str().unwrap().to_string()),
            h.get("last-modified")
                .map(|v| v.to_str().unwrap().to_string()),
        )
    };
    let want = (
        Some(origin_etag.clone()),
        Some(FILES_LAST_MODIFIED.to_string()),
    );

    let head = c.head(url.clone()).send().await.unwrap();
    assert_eq!(validators(head.headers()), want, "HEAD of the miss");
    let miss = c.get(url.clone()).send().await.unwrap();
    assert_eq!(miss.status(), 200);
    assert_eq!(
        validators(miss.headers()),
        want,
        "the miss, at its first byte"
    );
    assert_eq!(miss.bytes().await.unwrap(), data);

    let key = imgcache_fetch::cache_key(&imgcache_fetch::Href::parse(&href).unwrap(), &href, false);
    srv.wait_published(key.as_str()).await;
    let cond = |h: &[(&str, &str)]| {
        let mut r = c.get(url.clone());
        for (k, v) in h {
            r = r.header(*k, *v);
        }
        async move {
            let r = r.send().await.unwrap();
            let v = validators(r.headers());
            (r.status().as_u16(), v, r.bytes().await.unwrap().len())
        }
    };
    let (status, v, _) = cond(&[]).await;
    assert_eq!((status, v), (200, want.clone()), "the hit");
    let before = "Sun, 29 Nov 2026 08:00:00 GMT";
    let after = "Tue, 01 Dec 2026 08:00:00 GMT";
    for (headers, status) in [
        (vec![("if-none-match", origin_etag.as_str())], 304),
        (vec![("if-none-match", "*")], 304),
        (vec![("if-none-match", "\"other\"")], 200),
        (vec![("if-modified-since", FILES_LAST_MODIFIED)], 304),
        (vec![("if-modified-since", after)], 304),
        (vec![("if-modified-since", before)], 200),
        (vec![("if-match", origin_etag.as_str())], 200),
        (vec![("if-match", "\"other\"")], 412),
        (vec![("if-unmodified-since", before)], 412),
        (vec![("if-unmodified-since", after)], 200),
        (
            vec![("range", "bytes=0-9"), ("if-range", FILES_LAST_MODIFIED)],
            206,
        ),
        (
            vec![("range", "bytes=0-9"), ("if-range", origin_etag.as_str())],
            206,
        ),
        (vec![("range", "bytes=0-9"), ("if-range", before)], 200),
    ] {
        let (got, v, len) = cond(&headers).await;
        assert_eq!(got, status, "{headers:?}");
        if status == 304 {
            assert_eq!((v, len), (want.clone(), 0), "a 304 carries the validators");
        }
    }

    // Re-cached (deleted, fetched again): the same validators, so a client's saved ones hold.
    let cache =
        imgcache_store::Cache::open(srv.cache_dir(), imgcache_store::DriverKind::Sqlite).unwrap();
    cache.delete_cached_image(&key).unwrap();
    let (status, v, len) = cond(&[]).await;
    assert_eq!((status, v, len), (200, want.clone(), data.len()));
    srv.stop().await.unwrap();
}
