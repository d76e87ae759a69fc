//! `/v1/fetch?href=` is no open proxy: the href and every redirect its origin answers are
//! checked against the allowed prefixes on parsed URLs (scheme, host, port exact; the path on
//! a segment boundary), userinfo is refused, at most five redirects are followed, and a
//! refused request caches nothing and never reaches the URL it was refused.

mod common;

use common::*;

/// A second origin holding an image that must never leak through the server.
const SECRET: &str = "secret.img";

fn fetch_url(srv: &Server, href: &str) -> reqwest::Url {
    reqwest::Url::parse_with_params(&srv.url("/v1/fetch"), &[("href", href)]).unwrap()
}

/// GET and HEAD of `/v1/fetch?href=`: the status of each, and the GET's error message (its
/// OpenStack error JSON) when it is not a 200.
async fn get_and_head(srv: &Server, href: &str) -> (u16, u16, String) {
    let c = client();
    let r = c.get(fetch_url(srv, href)).send().await.unwrap();
    let status = r.status().as_u16();
    let body = r.bytes().await.unwrap();
    let message = if status == 200 {
        String::new()
    } else {
        let v: serde_json::Value = serde_json::from_slice(&body)
            .unwrap_or_else(|e| panic!("{href}: {status}, not an error JSON ({e})"));
        assert_eq!(v["error"]["code"], status, "{href}");
        v["error"]["message"].as_str().unwrap().to_string()
    };
    let head = c.head(fetch_url(srv, href)).send().await.unwrap();
    (status, head.status().as_u16(), message)
}

/// No record, no published file, nothing being written or queued.
fn assert_nothing_cached(srv: &Server) {
    let cache =
        imgcache_store::Cache::open(srv.cache_dir(), imgcache_store::DriverKind::Sqlite).unwrap();
    assert!(cache.get_cached_images().unwrap().is_empty(), "a record");
    let files = |dir: std::path::PathBuf| -> Vec<String> {
        std::fs::read_dir(&dir)
            .map(|d| {
                d.map(|e| e.unwrap())
                    .filter(|e| e.file_type().unwrap().is_file())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| !n.starts_with('.'))
                    .collect()
            })
            .unwrap_or_default()
    };
    for dir in [
        srv.cache_dir(),
        srv.cache_dir().join("incomplete"),
        srv.cache_dir().join("queue"),
    ] {
        let left = files(dir.clone());
        assert!(left.is_empty(), "{}: {left:?}", dir.display());
    }
}

fn key(href: &str) -> String {
    imgcache_fetch::cache_key(&imgcache_fetch::Href::parse(href).unwrap(), href, false).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redirect_out_of_the_allowed_prefixes_is_refused_and_nothing_is_cached() {
    let allowed = Origin::temp();
    let internal = Origin::temp();
    let secret = image_bytes(64 << 10, 41);
    internal.put(&format!("/files/{SECRET}"), &secret);
    allowed.redirect("/redirect/out", &format!("{}/files/{SECRET}", internal.url));
    allowed.redirect("/redirect/file", "file:///etc/passwd");
    let mut srv = Server::for_origin(None, &allowed, |c| {
        c.allow_href_prefixes
            .push(format!("{}/redirect", allowed.url));
    })
    .await;
    for (name, reason) in [
        ("out", "not under an allowed href prefix"),
        ("file", "is not http or https"),
    ] {
        let href = format!("{}/redirect/{name}", allowed.url);
        let (get, head, message) = get_and_head(&srv, &href).await;
        assert_eq!((get, head), (502, 502), "{name}: {message}");
        assert!(message.contains("redirect refused"), "{name}: {message}");
        assert!(message.contains(reason), "{name}: {message}");
        // Asked again: refused again, not served from anything cached.
        let (get, _, _) = get_and_head(&srv, &href).await;
        assert_eq!(get, 502);
    }
    assert_eq!(
        internal.all_requests(),
        0,
        "the internal origin was reached"
    );
    assert_eq!(internal.data_requests(&format!("/files/{SECRET}")), 0);
    assert_nothing_cached(&srv);
    srv.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redirect_under_an_allowed_prefix_is_followed_byte_exact() {
    let a = Origin::temp();
    let b = Origin::temp();
    let data = image_bytes(MIB + 7, 42);
    let other = image_bytes(MIB + 9, 43);
    a.put("/files/a.img", &data);
    b.put("/files/b.img", &other);
    a.redirect("/redirect/same", "/files/a.img");
    a.redirect("/redirect/cross", &format!("{}/files/b.img", b.url));
    let mut srv = Server::for_origin(None, &a, |c| {
        c.allow_href_prefixes.push(format!("{}/redirect/", a.url));
        c.allow_href_prefixes.push(format!("{}/files", b.url));
    })
    .await;
    let c = client();
    for (name, want) in [("same", &data), ("cross", &other)] {
        let href = format!("{}/redirect/{name}", a.url);
        let r = c.get(fetch_url(&srv, &href)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{name}");
        assert_eq!(&r.bytes().await.unwrap(), want, "{name}");
        // Published under the href the client gave.
        assert_eq!(
            &read(&srv.wait_published(&key(&href)).await),
            want,
            "{name}"
        );
    }
    assert_eq!(a.data_requests("/files/a.img"), 1);
    assert_eq!(b.data_requests("/files/b.img"), 1);
    srv.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn userinfo_after_an_allowed_host_port_is_refused() {
    let allowed = Origin::temp();
    let internal = Origin::temp();
    let data = image_bytes(64 << 10, 44);
    allowed.put("/files/a.img", &data);
    internal.put(&format!("/files/{SECRET}"), &image_bytes(64 << 10, 45));
    // `http://127.0.0.1:PORT`, no trailing slash: a raw `starts_with` let the userinfo
    // trick through.
    let mut srv = Server::for_origin(None, &allowed, |c| {
        c.allow_href_prefixes = vec![allowed.url.clone()];
    })
    .await;
    let ok = format!("{}/files/a.img", allowed.url);
    let r = client().get(fetch_url(&srv, &ok)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), data);
    let (host, port) = (internal.addr.ip(), internal.addr.port());
    for href in [
        format!("{}@{host}:{port}/files/{SECRET}", allowed.url),
        format!("http://user:pw@{}/files/a.img", allowed.addr),
    ] {
        let (get, head, message) = get_and_head(&srv, &href).await;
        assert_eq!((get, head), (403, 403), "{href}: {message}");
        assert!(message.contains("userinfo"), "{href}: {message}");
        assert!(!message.contains("pw"), "{message}");
    }
    assert_eq!(internal.all_requests(), 0);
    let cache =
        imgcache_store::Cache::open(srv.cache_dir(), imgcache_store::DriverKind::Sqlite).unwrap();
    assert_eq!(cache.get_cached_images().unwrap().len(), 1, "only {ok}");
    srv.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sibling_ports_and_paths_of_a_prefix_without_trailing_slash_are_refused() {
    let allowed = Origin::temp();
    let internal = Origin::temp();
    let data = image_bytes(64 << 10, 46);
    allowed.put("/files/a.img", &data);
    internal.put(&format!("/files/{SECRET}"), &image_bytes(64 << 10, 47));
    // The internal origin's port is the prefix's port followed by one digit (`4567` and
    // `45678`): every ephemeral port has five digits, so the prefix takes the first four.
    let port = internal.addr.port();
    let prefix_port = port / 10;
    assert_eq!(format!("{prefix_port}{}", port % 10), port.to_string());
    let mut srv = Server::for_origin(None, &allowed, |c| {
        c.allow_href_prefixes = vec![
            format!("http://127.0.0.1:{prefix_port}"),
            format!("{}/files", allowed.url),
        ];
    })
    .await;
    let before = allowed.all_requests();
    for href in [
        format!("http://127.0.0.1:{port}/files/{SECRET}"),
        format!("{}/files2/a.img", allowed.url),
        format!("{}/filesx", allowed.url),
        format!("{}/files/../private/a.img", allowed.url),
        format!("{}/files/..%2Fprivate/a.img", allowed.url),
    ] {
        let (get, head, message) = get_and_head(&srv, &href).await;
        assert_eq!((get, head), (403, 403), "{href}: {message}");
        assert!(message.starts_with("href refused: "), "{href}: {message}");
    }
    assert_eq!(internal.all_requests(), 0);
    assert_eq!(
        allowed.all_requests(),
        before,
        "a refused href reached its origin"
    );
    assert_nothing_cached(&srv);
    // The prefix itself still works, on its segment boundary.
    let ok = format!("{}/files/a.img", allowed.url);
    let r = client().get(fetch_url(&srv, &ok)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), data);
    srv.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn more_than_five_redirects_fail_and_nothing_is_cached() {
    let a = Origin::temp();
    let data = image_bytes(64 << 10, 48);
    a.put("/files/a.img", &data);
    // `five-0` -> ... -> `five-4` -> the image: five hops; `six-*`: six.
    for (chain, n) in [("five", 5), ("six", 6)] {
        for i in 0..n {
            let next = if i + 1 == n {
                "/files/a.img".to_string()
            } else {
                format!("/redirect/{chain}-{}", i + 1)
            };
            a.redirect(&format!("/redirect/{chain}-{i}"), &next);
        }
    }
    let mut srv = Server::for_origin(None, &a, |c| {
        c.allow_href_prefixes.push(format!("{}/redirect/", a.url));
    })
    .await;
    let six = format!("{}/redirect/six-0", a.url);
    let (get, head, message) = get_and_head(&srv, &six).await;
    assert_eq!((get, head), (502, 502), "{message}");
    assert!(message.contains("more than 5 redirects"), "{message}");
    assert_eq!(
        a.data_requests("/files/a.img"),
        0,
        "the end of the chain was asked"
    );
    assert_nothing_cached(&srv);

    let five = format!("{}/redirect/five-0", a.url);
    let r = client().get(fetch_url(&srv, &five)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), data);
    srv.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_prefix_that_does_not_parse_stops_the_server() {
    let fake = Origin::temp();
    let mut srv = Server::for_origin(None, &fake, |c| {
        c.allow_href_prefixes.push("not a url".into());
    })
    .await;
    let err = srv.stop().await.unwrap_err().to_string();
    assert!(err.contains("\"not a url\""), "{err}");
}
