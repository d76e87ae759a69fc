//! Conditional requests on image responses (RFC 9110 §13), evaluated in the RFC's order
//! (§13.2.2) before `Range`:
//! 1. `If-Match` (strong comparison, `*` matches any current image): false → 412;
//! 2. else `If-Unmodified-Since`: the image changed after the date → 412;
//! 3. `If-None-Match` (weak comparison, `*`): a match → 304 (for GET and HEAD);
//! 4. else `If-Modified-Since`: not changed since the date → 304;
//! 5. then `If-Range` with `Range` ([`crate::range::plan`]).
//!
//! A date that does not parse is ignored, as is a date condition on an image with no
//! `Last-Modified`. One deliberate difference from nginx: nginx's default
//! (`if_modified_since exact`) answers 304 only to a date equal to `Last-Modified`; this
//! follows the RFC and answers 304 to any date not before it.

use std::time::SystemTime;

use axum::http::HeaderMap;
use axum::http::header::{IF_MATCH, IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_UNMODIFIED_SINCE};

/// What the preconditions decide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precondition {
    /// Serve the image (maybe a range of it).
    Proceed,
    /// 304 Not Modified.
    NotModified,
    /// 412 Precondition Failed.
    Failed,
}

/// Evaluates a GET or HEAD's preconditions against the image's `etag` and `last_modified`.
pub fn evaluate(req: &HeaderMap, etag: Option<&str>, last_modified: Option<&str>) -> Precondition {
    let modified = last_modified.and_then(|d| httpdate::parse_http_date(d).ok());
    if let Some(v) = header(req, &IF_MATCH) {
        if !list_matches(&v, etag, true) {
            return Precondition::Failed;
        }
    } else if let (Some(since), Some(m)) = (date(req, &IF_UNMODIFIED_SINCE), modified)
        && m > since
    {
        return Precondition::Failed;
    }
    if let Some(v) = header(req, &IF_NONE_MATCH) {
        if list_matches(&v, etag, false) {
            return Precondition::NotModified;
        }
    } else if let (Some(since), Some(m)) = (date(req, &IF_MODIFIED_SINCE), modified)
        && m <= since
    {
        return Precondition::NotModified;
    }
    Precondition::Proceed
}

/// All values of a header, joined as one list (a list header may be sent several times).
fn header(req: &HeaderMap, name: &axum::http::HeaderName) -> Option<String> {
    let values: Vec<&str> = req
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    (!values.is_empty()).then(|| values.join(","))
}

fn date(req: &HeaderMap, name: &axum::http::HeaderName) -> Option<SystemTime> {
    httpdate::parse_http_date(req.get(name)?.to_str().ok()?.trim()).ok()
}

/// Whether an `If-Match`/`If-None-Match` list matches the current tag: `*` matches any
/// image (there always is one here); otherwise by strong or weak comparison (§8.8.3.2).
fn list_matches(list: &str, current: Option<&str>, strong: bool) -> bool {
    if list.trim() == "*" {
        return true;
    }
    let Some(current) = current.map(parse_tag) else {
        return false;
    };
    entity_tags(list).any(|t| {
        let t = parse_tag(t);
        t.1 == current.1 && (!strong || (!t.0 && !current.0))
    })
}

/// `(weak, opaque)` of one entity tag.
fn parse_tag(t: &str) -> (bool, &str) {
    let t = t.trim();
    match t.strip_prefix("W/") {
        Some(rest) => (true, rest),
        None => (false, t),
    }
}

/// The tags of a comma-separated list; commas inside the quotes of a tag are part of it.
fn entity_tags(list: &str) -> impl Iterator<Item = &str> {
    let mut rest = list;
    std::iter::from_fn(move || {
        loop {
            let trimmed = rest.trim_start_matches([' ', '\t', ',']);
            if trimmed.is_empty() {
                return None;
            }
            let weak = trimmed.starts_with("W/");
            let body = if weak { &trimmed[2..] } else { trimmed };
            if !body.starts_with('"') {
                // Not a tag: skip to the next comma.
                let end = trimmed.find(',').unwrap_or(trimmed.len());
                rest = &trimmed[end..];
                continue;
            }
            let close = body[1..].find('"').map(|i| i + 2).unwrap_or(body.len());
            let len = close + if weak { 2 } else { 0 };
            rest = &trimmed[len..];
            return Some(&trimmed[..len]);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TAG: &str = "\"abc\"";
    const LM: &str = "Tue, 01 Dec 2026 09:30:05 GMT";
    const BEFORE: &str = "Tue, 01 Dec 2026 09:30:04 GMT";
    const AFTER: &str = "Tue, 01 Dec 2026 09:30:06 GMT";

    fn eval(h: &[(&str, &str)]) -> Precondition {
        let mut m = HeaderMap::new();
        for (k, v) in h {
            m.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        evaluate(&m, Some(TAG), Some(LM))
    }

    use Precondition::*;

    #[test]
    fn rfc_9110_cases() {
        assert_eq!(eval(&[]), Proceed);
        assert_eq!(eval(&[("if-none-match", TAG)]), NotModified);
        assert_eq!(eval(&[("if-none-match", "W/\"abc\"")]), NotModified, "weak");
        assert_eq!(eval(&[("if-none-match", "*")]), NotModified);
        assert_eq!(eval(&[("if-none-match", "\"x\", \"abc\"")]), NotModified);
        assert_eq!(eval(&[("if-none-match", "\"x\"")]), Proceed);
        assert_eq!(eval(&[("if-modified-since", LM)]), NotModified);
        assert_eq!(eval(&[("if-modified-since", AFTER)]), NotModified);
        assert_eq!(eval(&[("if-modified-since", BEFORE)]), Proceed);
        assert_eq!(eval(&[("if-modified-since", "junk")]), Proceed);
        assert_eq!(eval(&[("if-match", TAG)]), Proceed);
        assert_eq!(eval(&[("if-match", "*")]), Proceed);
        assert_eq!(eval(&[("if-match", "W/\"abc\"")]), Failed, "strong only");
        assert_eq!(eval(&[("if-match", "\"x\"")]), Failed);
        assert_eq!(eval(&[("if-unmodified-since", BEFORE)]), Failed);
        assert_eq!(eval(&[("if-unmodified-since", LM)]), Proceed);
        assert_eq!(eval(&[("if-unmodified-since", "junk")]), Proceed);
    }

    #[test]
    fn evaluation_order() {
        // If-Match wins over If-Unmodified-Since, which is then ignored.
        assert_eq!(
            eval(&[("if-match", TAG), ("if-unmodified-since", BEFORE)]),
            Proceed
        );
        // A failed If-Match is 412 even when If-None-Match would say 304.
        assert_eq!(
            eval(&[("if-match", "\"x\""), ("if-none-match", TAG)]),
            Failed
        );
        // If-None-Match present: If-Modified-Since is ignored.
        assert_eq!(
            eval(&[("if-none-match", "\"x\""), ("if-modified-since", AFTER)]),
            Proceed
        );
    }

    #[test]
    fn tag_lists() {
        let tags: Vec<&str> = entity_tags(" \"a,b\", W/\"c\" ,junk, \"d\"").collect();
        assert_eq!(tags, ["\"a,b\"", "W/\"c\"", "\"d\""]);
        let none = HeaderMap::new();
        assert_eq!(evaluate(&none, None, None), Proceed);
        let mut m = HeaderMap::new();
        m.insert(IF_MATCH, TAG.parse().unwrap());
        assert_eq!(
            evaluate(&m, None, None),
            Failed,
            "no current tag matches nothing"
        );
    }
}
