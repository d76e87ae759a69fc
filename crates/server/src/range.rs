//! `Range` and `If-Range` (RFC 9110 §14): one byte range is served as 206; several are
//! answered with the whole body (allowed, and what most image servers do); a malformed header
//! is ignored; a syntactically valid range that selects nothing is 416.

use axum::http::HeaderMap;
use axum::http::header::{IF_RANGE, RANGE};

/// What to send of a body of known length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// The whole body, 200.
    Full,
    /// Bytes `start..end` (end exclusive), 206.
    Partial { start: u64, end: u64 },
    /// 416 with `Content-Range: bytes */LEN`.
    Unsatisfiable,
}

/// Parses one `Range` header value against a body whose length is not known yet (a download
/// whose origin gave none, or one another process runs): only a closed range (`bytes=A-B`) can
/// be answered, as `Content-Range: bytes A-B/*`; anything else gets the whole body.
pub fn parse_unknown_len(value: &str) -> Plan {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return Plan::Full;
    };
    match parse_one(spec.trim()) {
        Some(One::FromTo(start, last)) if !spec.contains(',') => Plan::Partial {
            start,
            end: last.saturating_add(1),
        },
        _ => Plan::Full,
    }
}

/// Parses one `Range` header value against a body of `len` bytes.
pub fn parse(value: &str, len: u64) -> Plan {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return Plan::Full; // another unit, or junk: ignore
    };
    let parts: Vec<&str> = spec.split(',').map(str::trim).collect();
    if parts.len() != 1 {
        // Multi-range: answering with the whole representation is allowed, and simpler for
        // every client than multipart/byteranges.
        return Plan::Full;
    }
    let Some(r) = parse_one(parts[0]) else {
        return Plan::Full;
    };
    match r {
        One::From(start) if start < len => Plan::Partial { start, end: len },
        One::FromTo(start, last) if start < len => Plan::Partial {
            start,
            end: last.saturating_add(1).min(len),
        },
        One::Suffix(n) if n > 0 && len > 0 => Plan::Partial {
            start: len.saturating_sub(n),
            end: len,
        },
        _ => Plan::Unsatisfiable,
    }
}

enum One {
    From(u64),
    FromTo(u64, u64),
    Suffix(u64),
}

fn num(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn parse_one(p: &str) -> Option<One> {
    let (a, b) = p.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    match (a.is_empty(), b.is_empty()) {
        (true, false) => num(b).map(One::Suffix),
        (false, true) => num(a).map(One::From),
        (false, false) => {
            let (s, e) = (num(a)?, num(b)?);
            (s <= e).then_some(One::FromTo(s, e))
        }
        (true, true) => None,
    }
}

/// The plan for a request: `Range` applies only when `If-Range` (if any) matches the current
/// representation — an entity tag by strong comparison, or a date equal to Last-Modified.
pub fn plan(
    headers: &HeaderMap,
    len: Option<u64>,
    etag: Option<&str>,
    last_modified: Option<&str>,
) -> Plan {
    let Some(range) = headers.get(RANGE).and_then(|v| v.to_str().ok()) else {
        return Plan::Full;
    };
    if let Some(cond) = headers.get(IF_RANGE) {
        let Ok(cond) = cond.to_str() else {
            return Plan::Full;
        };
        let cond = cond.trim();
        let matches = if cond.starts_with('"') {
            etag == Some(cond)
        } else if cond.starts_with("W/") {
            false // weak tags never match If-Range
        } else {
            last_modified == Some(cond)
        };
        if !matches {
            return Plan::Full;
        }
    }
    match len {
        Some(len) => parse(range, len),
        None => parse_unknown_len(range),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_length_serves_closed_ranges_only() {
        assert_eq!(
            parse_unknown_len("bytes=100-199"),
            Plan::Partial {
                start: 100,
                end: 200
            }
        );
        for whole in [
            "bytes=100-",
            "bytes=-10",
            "bytes=0-1,5-9",
            "bytes=9-1",
            "pages=1-2",
        ] {
            assert_eq!(parse_unknown_len(whole), Plan::Full, "{whole}");
        }
    }

    #[test]
    fn single_ranges() {
        assert_eq!(parse("bytes=0-9", 100), Plan::Partial { start: 0, end: 10 });
        assert_eq!(
            parse("bytes=90-", 100),
            Plan::Partial {
                start: 90,
                end: 100
            }
        );
        assert_eq!(
            parse("bytes=-10", 100),
            Plan::Partial {
                start: 90,
                end: 100
            }
        );
        assert_eq!(
            parse("bytes=-1000", 100),
            Plan::Partial { start: 0, end: 100 }
        );
        assert_eq!(
            parse("bytes=50-1000", 100),
            Plan::Partial {
                start: 50,
                end: 100
            }
        );
        assert_eq!(parse("bytes=100-", 100), Plan::Unsatisfiable);
        assert_eq!(parse("bytes=100-200", 100), Plan::Unsatisfiable);
        assert_eq!(parse("bytes=-0", 100), Plan::Unsatisfiable);
        assert_eq!(parse("bytes=0-", 0), Plan::Unsatisfiable);
    }

    #[test]
    fn malformed_and_multi_are_full() {
        for v in [
            "bytes=",
            "bytes=a-b",
            "bytes=5-1",
            "items=0-1",
            "bytes=--1",
            "0-1",
            "bytes=1-2-3",
            "bytes=0-1,5-9",
            "bytes=0-1, x",
        ] {
            assert_eq!(parse(v, 100), Plan::Full, "{v}");
        }
    }

    #[test]
    fn if_range() {
        let mut h = HeaderMap::new();
        h.insert(RANGE, "bytes=0-0".parse().unwrap());
        h.insert(IF_RANGE, "\"abc\"".parse().unwrap());
        assert_eq!(
            plan(&h, Some(10), Some("\"abc\""), None),
            Plan::Partial { start: 0, end: 1 }
        );
        assert_eq!(plan(&h, Some(10), Some("\"xyz\""), None), Plan::Full);
        h.insert(IF_RANGE, "Tue, 15 Nov 1994 08:12:31 GMT".parse().unwrap());
        assert_eq!(
            plan(&h, Some(10), None, Some("Tue, 15 Nov 1994 08:12:31 GMT")),
            Plan::Partial { start: 0, end: 1 }
        );
        assert_eq!(plan(&h, Some(10), None, None), Plan::Full);
    }
}
