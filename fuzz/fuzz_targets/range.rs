//! Fuzz the Range parser (`range::parse`, `parse_unknown_len`, `plan` with `If-Range`): never
//! panics, and a partial answer always lies inside the body.
//!
//! Input: 8 bytes of body length, then `Range` and `If-Range` values separated by 0xff.
#![no_main]

use axum::http::{HeaderMap, HeaderValue, header};
use imgcache_server::range::{Plan, parse, parse_unknown_len, plan};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    if input.len() < 8 {
        return;
    }
    let len = u64::from_le_bytes(input[..8].try_into().unwrap()) >> (input[0] % 64);
    let mut fields = input[8..].split(|&b| b == 0xff);
    let range = fields.next().unwrap_or_default();
    let if_range = fields.next();
    let value = String::from_utf8_lossy(range);
    match parse(&value, len) {
        Plan::Partial { start, end } => {
            assert!(
                start < end && end <= len,
                "{value:?} len {len}: {start}..{end}"
            )
        }
        Plan::Unsatisfiable | Plan::Full => {}
    }
    if let Plan::Partial { start, end } = parse_unknown_len(&value) {
        assert!(start < end, "{value:?}: {start}..{end}");
    }
    let mut h = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_bytes(range) {
        h.insert(header::RANGE, v);
    }
    if let Some(ir) = if_range
        && let Ok(v) = HeaderValue::from_bytes(ir)
    {
        h.insert(header::IF_RANGE, v);
    }
    let etag = "\"abc-123\"";
    let lm = "Tue, 01 Jul 2025 12:00:00 GMT";
    for l in [Some(len), None] {
        if let Plan::Partial { start, end } = plan(&h, l, Some(etag), Some(lm)) {
            assert!(start < end, "{h:?}");
            if let Some(l) = l {
                assert!(end <= l, "{h:?} len {l}: {start}..{end}");
            }
        }
        let _ = plan(&h, l, None, None);
    }
});
