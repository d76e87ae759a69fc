//! What an image response's headers say of the image: length, `ETag`, `Last-Modified` and
//! `Content-MD5`, by one rule for a hit (from the record), a miss (from what the admission
//! will record, known before the first byte) and a `HEAD` of a miss (from what the origin
//! says). Because all three read the same [`ImageMeta`], a client sees one stable `ETag` and
//! `Last-Modified` from the first byte of a miss onwards, and its conditional requests and
//! `If-Range` resumes keep working after the image is cached, re-cached or served by a HEAD.

use std::time::{Duration, UNIX_EPOCH};

use imgcache_fetch::ImageMeta;
use imgcache_store::{Algorithm, Integrity};

/// How `Content-MD5` is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Md5Style {
    /// As Glance writes it on `/v2/images/{id}/file`: the hex digest (python-glanceclient
    /// compares it with `hashlib.md5().hexdigest()`).
    Hex,
    /// RFC 1864: base64 of the digest (`/v1/fetch`).
    Base64,
}

/// The image as its response headers describe it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Representation {
    /// `None`: a download whose length the origin did not give (sent chunked, no ranges).
    pub len: Option<u64>,
    pub etag: Option<String>,
    pub last_modified: Option<String>,
    /// The `Content-MD5` value, in the route's style.
    pub md5: Option<String>,
}

impl Representation {
    /// The one rule. `ETag`: the origin's strong tag; else the checksum the origin vouched
    /// for before the first byte; else nginx's form of `Last-Modified` and length; else the
    /// origin's weak tag. `Last-Modified`: the origin's (Glance's `updated_at`), or a local
    /// source's mtime. Never the time imgcache cached the image: that changes when it is
    /// re-cached, and Ironic would then take its master for outdated.
    pub fn of(len: Option<u64>, meta: &ImageMeta, style: Md5Style) -> Representation {
        let v = &meta.validators;
        let last_modified = v.last_modified.clone().or_else(|| {
            let ns = v.mtime_ns.filter(|n| *n >= 0)?;
            let t = UNIX_EPOCH + Duration::from_secs((ns / 1_000_000_000) as u64);
            Some(httpdate::fmt_http_date(t))
        });
        let strong = v.etag.clone().filter(|e| e.starts_with('"'));
        let etag = strong
            .or_else(|| {
                meta.origin_checksum
                    .as_ref()
                    .map(|c| format!("\"{}\"", c.hex()))
            })
            .or_else(|| {
                let t = httpdate::parse_http_date(last_modified.as_deref()?).ok()?;
                let secs = t.duration_since(UNIX_EPOCH).ok()?.as_secs();
                Some(format!("\"{secs:x}-{:x}\"", len?))
            })
            .or_else(|| v.etag.clone());
        let md5 = meta
            .md5
            .as_ref()
            .or(meta
                .origin_checksum
                .as_ref()
                .filter(|c| c.algorithm == Algorithm::Md5))
            .map(|c| md5_header(c, style));
        Representation {
            len,
            etag,
            last_modified,
            md5,
        }
    }
}

fn md5_header(c: &Integrity, style: Md5Style) -> String {
    match style {
        Md5Style::Hex => c.hex().to_string(),
        Md5Style::Base64 => {
            use base64::Engine;
            let raw = hex::decode(c.hex()).unwrap_or_default();
            base64::engine::general_purpose::STANDARD.encode(raw)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imgcache_fetch::source::Validators;

    fn meta(etag: Option<&str>, lm: Option<&str>, vouched: Option<Integrity>) -> ImageMeta {
        ImageMeta {
            validators: Validators {
                etag: etag.map(str::to_owned),
                last_modified: lm.map(str::to_owned),
                mtime_ns: None,
            },
            origin_checksum: vouched,
            ..ImageMeta::default()
        }
    }

    const LM: &str = "Tue, 01 Dec 2026 09:30:05 GMT";

    #[test]
    fn etag_prefers_the_origins_strong_tag_then_its_checksum_then_date_and_length() {
        let md5 = Integrity::of(Algorithm::Md5, b"abc");
        let r = Representation::of(Some(3), &meta(Some("\"o\""), Some(LM), None), Md5Style::Hex);
        assert_eq!(r.etag.as_deref(), Some("\"o\""));
        assert_eq!(r.last_modified.as_deref(), Some(LM));
        let r = Representation::of(
            Some(3),
            &meta(Some("W/\"w\""), Some(LM), Some(md5.clone())),
            Md5Style::Hex,
        );
        assert_eq!(r.etag, Some(format!("\"{}\"", md5.hex())));
        assert_eq!(r.md5.as_deref(), Some("900150983cd24fb0d6963f7d28e17f72"));
        let r = Representation::of(Some(3), &meta(None, None, Some(md5)), Md5Style::Base64);
        assert_eq!(r.md5.as_deref(), Some("kAFQmDzST7DWlj99KOF/cg=="));
        // nginx's form: hex mtime and hex length.
        let r = Representation::of(Some(4096), &meta(None, Some(LM), None), Md5Style::Hex);
        assert_eq!(r.etag.as_deref(), Some("\"6b0e939d-1000\""));
        let r = Representation::of(Some(3), &meta(Some("W/\"w\""), None, None), Md5Style::Hex);
        assert_eq!(r.etag.as_deref(), Some("W/\"w\""));
        let r = Representation::of(None, &meta(None, None, None), Md5Style::Hex);
        assert_eq!(r, Representation::default());
    }

    #[test]
    fn a_local_files_mtime_is_its_last_modified() {
        let mut m = meta(None, None, None);
        m.validators.mtime_ns = Some(1_795_000_000_999_999_999);
        let r = Representation::of(Some(1), &m, Md5Style::Hex);
        assert_eq!(
            r.last_modified.as_deref(),
            Some(httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(1_795_000_000)).as_str())
        );
        assert!(r.etag.is_some());
    }
}
