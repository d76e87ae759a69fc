//! Fuzz href parsing (`Href::parse`, `cache_key`) and the allow-list (`AllowList::new`,
//! `permits`): never panics; every href that parses keys to a valid cache key; an allowed URL
//! never has userinfo, and has its prefix's scheme.
//!
//! Input: a prefix and an href separated by 0xff (no 0xff: the whole input is the href,
//! checked against a fixed prefix).
#![no_main]

use imgcache_fetch::allow::AllowList;
use imgcache_fetch::href::{Href, cache_key};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let (prefix, href) = match input.iter().position(|&b| b == 0xff) {
        Some(i) => (
            String::from_utf8_lossy(&input[..i]).into_owned(),
            String::from_utf8_lossy(&input[i + 1..]).into_owned(),
        ),
        None => (
            "http://images.example:8080/pub/".to_string(),
            String::from_utf8_lossy(input).into_owned(),
        ),
    };
    let parsed = Href::parse(&href);
    if let Ok(h) = &parsed {
        for raw in [false, true] {
            let key = cache_key(h, &href, raw);
            assert!(imgcache_store::Key::new(key.as_str()).is_ok(), "{key}");
        }
    }
    let Ok(list) = AllowList::new([prefix.as_str()]) else {
        return;
    };
    let url = match &parsed {
        Ok(Href::Http(u)) => u.clone(),
        _ => match url::Url::parse(href.trim()) {
            Ok(u) => u,
            Err(_) => return,
        },
    };
    if list.permits(&url).is_ok() {
        assert!(
            url.username().is_empty() && url.password().is_none(),
            "{prefix:?} permits {url}"
        );
        // Only the prefix's own scheme (http, https or file) is ever allowed.
        let scheme = url::Url::parse(prefix.trim()).map(|p| p.scheme().to_string());
        assert_eq!(
            scheme.as_deref(),
            Ok(url.scheme()),
            "{prefix:?} permits {url}"
        );
    }
});
