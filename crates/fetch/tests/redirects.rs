//! Redirects: followed by hand, at most five hops, each target checked (http or https, no
//! userinfo, under the allow-list when there is one), the request headers re-sent on every
//! hop and credentials dropped when a hop leaves their origin. A refused redirect fails the
//! fetch cleanly and its target is never asked.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use imgcache_fetch::source::http::{HttpSource, MAX_REDIRECTS};
use imgcache_fetch::{AllowList, FetchError, FetchOptions, Outcome, Refusal, SourceConfig};
use imgcache_testkit::faults::{Counts, FaultOrigin, File};
use reqwest::header::{HeaderMap, HeaderValue};

fn opts() -> FetchOptions {
    FetchOptions::default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_is_followed_and_revalidated_through() {
    let origin = FaultOrigin::start();
    let body = image_bytes(MIB + 5, 31);
    origin.redirect("/old/a.img", "/new/a.img");
    origin.put("/new/a.img", File::bare(body.clone()).etag(Some("r1")));
    let env = Env::with(SourceConfig {
        revalidate_interval: Duration::ZERO,
        ..sources()
    });
    let href = origin.at("/old/a.img");
    let key = key_of(&href, false);
    let r = env
        .ic
        .fetch_image(&href, &env.dest("d1"), &opts())
        .await
        .unwrap();
    assert_eq!(r.outcome, Outcome::Downloaded);
    assert_linked(&env.master(&key), &env.dest("d1"), &body);
    // The revalidation's If-None-Match goes to every hop: the final one answers 304.
    let r = env
        .ic
        .fetch_image(&href, &env.dest("d2"), &opts())
        .await
        .unwrap();
    assert_eq!(r.outcome, Outcome::Revalidated);
    assert_eq!(
        origin.counts("/old/a.img"),
        Counts {
            get: 1,
            conditional: 1,
            not_modified: 0
        }
    );
    assert_eq!(
        origin.counts("/new/a.img"),
        Counts {
            get: 1,
            conditional: 1,
            not_modified: 1
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_to_userinfo_or_file_is_refused_without_an_allow_list() {
    let origin = FaultOrigin::start();
    let body = image_bytes(64 << 10, 32);
    origin.put("/target.img", File::bare(body));
    let env = Env::new();
    let with_userinfo = origin
        .at("/target.img")
        .replacen("http://", "http://user:secret@", 1);
    for (path, location, want) in [
        ("/to-userinfo", with_userinfo, Refusal::Userinfo),
        (
            "/to-file",
            "file:///etc/passwd".to_string(),
            Refusal::Scheme("file".into()),
        ),
        (
            "/to-ftp",
            "ftp://example.com/x".to_string(),
            Refusal::Scheme("ftp".into()),
        ),
    ] {
        origin.redirect(path, &location);
        let href = origin.at(path);
        let key = key_of(&href, false);
        let dest = env.dest(&path[1..]);
        let e = expect_err(env.ic.fetch_image(&href, &dest, &opts()).await);
        match &e {
            FetchError::RedirectRefused { reason, .. } => assert_eq!(reason, &want, "{path}"),
            other => panic!("{path}: expected RedirectRefused, got {other:?}"),
        }
        assert!(!e.is_transient());
        assert!(!e.to_string().contains("secret"), "{e}");
        assert!(e.to_string().contains("redirect"), "{e}");
        assert_eq!(origin.counts(path).total(), 1, "{path}: not retried");
        assert_failed_cleanly(&env, &key, &dest);
    }
    assert_eq!(origin.counts("/target.img").total(), 0);
    assert!(env.cache().get_cached_images().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_five_hops() {
    let origin = FaultOrigin::start();
    let body = image_bytes(64 << 10, 33);
    origin.put("/end.img", File::bare(body.clone()));
    // Chain `/c{n}/0` -> `/c{n}/1` -> ... -> `/c{n}/{n-1}` -> `/end.img`: n redirects.
    for n in [MAX_REDIRECTS, MAX_REDIRECTS + 1] {
        for i in 0..n {
            let next = if i + 1 == n {
                "/end.img".to_string()
            } else {
                format!("/c{n}/{}", i + 1)
            };
            origin.redirect(&format!("/c{n}/{i}"), &next);
        }
    }
    let env = Env::new();
    let href = origin.at(&format!("/c{MAX_REDIRECTS}/0"));
    let r = env
        .ic
        .fetch_image(&href, &env.dest("five"), &opts())
        .await
        .unwrap();
    assert_linked(&env.master(&key_of(&href, false)), &env.dest("five"), &body);
    assert_eq!(r.size, body.len() as u64);
    assert_eq!(origin.counts("/end.img").total(), 1);

    let n = MAX_REDIRECTS + 1;
    let href = origin.at(&format!("/c{n}/0"));
    let dest = env.dest("six");
    let e = expect_err(env.ic.fetch_image(&href, &dest, &opts()).await);
    assert!(
        matches!(e, FetchError::TooManyRedirects { max: 5, .. }),
        "{e:?}"
    );
    assert!(!e.is_transient());
    for i in 0..n {
        assert_eq!(origin.counts(&format!("/c{n}/{i}")).total(), 1, "hop {i}");
    }
    assert_eq!(origin.counts("/end.img").total(), 1, "the end is not asked");
    assert_failed_cleanly(&env, &key_of(&href, false), &dest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_allow_list_every_hop_is_checked() {
    let origin = FaultOrigin::start();
    let other = FaultOrigin::start();
    let body = image_bytes(64 << 10, 34);
    origin.redirect("/images/a.img", "/images/b.img");
    origin.put("/images/b.img", File::bare(body.clone()));
    origin.redirect("/images/out", "/private/x");
    origin.redirect("/images/away", &other.at("/images/b.img"));
    origin.put("/private/x", File::bare(body.clone()));
    other.put("/images/b.img", File::bare(body.clone()));
    let allow = AllowList::new([format!("{}/images", origin.url)]).unwrap();
    let env = Env::with(SourceConfig {
        allow: Some(Arc::new(allow)),
        ..sources()
    });
    let href = origin.at("/images/a.img");
    env.ic
        .fetch_image(&href, &env.dest("ok"), &opts())
        .await
        .unwrap();
    assert_linked(&env.master(&key_of(&href, false)), &env.dest("ok"), &body);
    for path in ["/images/out", "/images/away"] {
        let href = origin.at(path);
        let dest = env.dest(&path[8..]);
        let e = expect_err(env.ic.fetch_image(&href, &dest, &opts()).await);
        assert!(
            matches!(
                e,
                FetchError::RedirectRefused {
                    reason: Refusal::NotAllowed,
                    ..
                }
            ),
            "{path}: {e:?}"
        );
        assert_failed_cleanly(&env, &key_of(&href, false), &dest);
    }
    assert_eq!(origin.counts("/private/x").total(), 0);
    assert_eq!(other.all_requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_are_resent_and_credentials_stay_with_their_origin() {
    let origin = FaultOrigin::start();
    let other = FaultOrigin::start();
    let body = image_bytes(4 << 10, 35);
    origin.redirect("/same", "/final");
    origin.put("/final", File::bare(body.clone()));
    origin.redirect("/cross", &other.at("/final"));
    other.put("/final", File::bare(body.clone()));
    let http = HttpSource::new(http_options()).unwrap();
    let mut h = HeaderMap::new();
    h.insert("x-auth-token", HeaderValue::from_static("tok"));
    for path in ["/same", "/cross"] {
        let url = origin.at(path).parse().unwrap();
        let got = http.get_small(&url, &h, 1 << 20).await.unwrap();
        assert_eq!(got, body, "{path}");
    }
    let tok = Some("tok".to_string());
    // /same, /final (same origin: kept), /cross; then the other origin's /final: dropped.
    assert_eq!(origin.tokens(), vec![tok.clone(), tok.clone(), tok.clone()]);
    assert_eq!(other.tokens(), vec![None]);
}
