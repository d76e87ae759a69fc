//! Fuzz the conditional-request evaluator (`conditional::evaluate`): never panics, whatever
//! the `If-*` headers and validators; with no conditional header it always proceeds.
//!
//! Input: up to six fields separated by 0xff: If-Match, If-None-Match, If-Modified-Since,
//! If-Unmodified-Since, the ETag, the Last-Modified.
#![no_main]

use axum::http::{HeaderMap, HeaderValue, header};
use imgcache_server::conditional::{Precondition, evaluate};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let f: Vec<&[u8]> = input.split(|&b| b == 0xff).collect();
    let names = [
        header::IF_MATCH,
        header::IF_NONE_MATCH,
        header::IF_MODIFIED_SINCE,
        header::IF_UNMODIFIED_SINCE,
    ];
    let mut h = HeaderMap::new();
    for (name, v) in names.iter().zip(&f) {
        if !v.is_empty()
            && let Ok(v) = HeaderValue::from_bytes(v)
        {
            h.insert(name.clone(), v);
        }
    }
    let text = |i: usize| f.get(i).map(|b| String::from_utf8_lossy(b).into_owned());
    let (etag, lm) = (text(4), text(5));
    let got = evaluate(&h, etag.as_deref(), lm.as_deref());
    if h.is_empty() {
        assert_eq!(got, Precondition::Proceed);
    }
    let _ = evaluate(&h, None, None);
    let _ = evaluate(&h, Some("\"x\""), Some("Tue, 01 Jul 2025 12:00:00 GMT"));
});
