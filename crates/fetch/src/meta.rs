//! What a cached image's record says of it beyond size and checksum, as one typed struct,
//! and the one rule that decides whether a cached copy may be used without asking its origin.
//!
//! The store keeps these as free-form string properties (Glance's records have no room for
//! them otherwise); [`ImageMeta::from_props`] and [`ImageMeta::to_props`] are the only code
//! that knows their names.

use std::collections::BTreeMap;
use std::time::Duration;

use imgcache_store::Integrity;
use imgcache_store::record::now;

use crate::href::Href;
use crate::source::{OriginMeta, Validators};

const HREF: &str = "href";
const ETAG: &str = "etag";
const LAST_MODIFIED: &str = "origin_last_modified";
const MTIME_NS: &str = "origin_mtime_ns";
const VALIDATED_AT: &str = "validated_at";
const DISK_FORMAT: &str = "disk_format";
pub(crate) const FORMAT: &str = "format";
pub(crate) const VIRTUAL_SIZE: &str = "virtual_size";
pub(crate) const SOURCE_FORMAT: &str = "source_format";
pub(crate) const SOURCE_CHECKSUM: &str = "source_checksum";
const ORIGIN_CHECKSUM: &str = "origin_checksum";
const MD5: &str = "origin_md5";

/// The typed form of a record's properties.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ImageMeta {
    /// The href the image was fetched from, as the client gave it.
    pub href: Option<String>,
    /// The origin's validators, sent back on revalidation.
    pub validators: Validators,
    /// When the origin last confirmed this copy (seconds since the epoch).
    pub validated_at: Option<f64>,
    /// The format the origin declared (Glance's `disk_format`).
    pub disk_format: Option<String>,
    /// The format the inspector found in the published bytes.
    pub format: Option<String>,
    pub virtual_size: Option<u64>,
    /// For a converted or decompressed image: what the source sent.
    pub source_format: Option<String>,
    pub source_checksum: Option<Integrity>,
    /// The checksum the origin vouched for before the first byte (Glance's, `Content-MD5`),
    /// as opposed to one computed over the bytes: a miss's `ETag` can only come from it, so
    /// a hit's does too (one stable `ETag`).
    pub origin_checksum: Option<Integrity>,
    /// The origin's md5 of the bytes, for Glance clients' `Content-MD5` check.
    pub md5: Option<Integrity>,
}

impl ImageMeta {
    pub fn from_props(props: &BTreeMap<String, String>) -> ImageMeta {
        let get = |k: &str| props.get(k).cloned();
        ImageMeta {
            href: get(HREF),
            validators: Validators {
                etag: get(ETAG),
                last_modified: get(LAST_MODIFIED),
                mtime_ns: props.get(MTIME_NS).and_then(|v| v.parse().ok()),
            },
            validated_at: props.get(VALIDATED_AT).and_then(|v| v.parse().ok()),
            disk_format: get(DISK_FORMAT),
            format: get(FORMAT),
            virtual_size: props.get(VIRTUAL_SIZE).and_then(|v| v.parse().ok()),
            source_format: get(SOURCE_FORMAT),
            source_checksum: props.get(SOURCE_CHECKSUM).and_then(|v| v.parse().ok()),
            origin_checksum: props.get(ORIGIN_CHECKSUM).and_then(|v| v.parse().ok()),
            md5: props.get(MD5).and_then(|v| v.parse().ok()),
        }
    }

    /// The record's metadata for a download of `href_raw` that its origin described as
    /// `meta` (what is known before the first byte; the admission adds what it finds).
    pub fn from_origin(href_raw: &str, meta: &OriginMeta) -> ImageMeta {
        ImageMeta {
            href: Some(href_raw.to_string()),
            validators: meta.validators.clone(),
            validated_at: Some(now()),
            disk_format: meta.disk_format.clone(),
            origin_checksum: meta.checksum.clone(),
            md5: meta.md5.clone(),
            ..ImageMeta::default()
        }
    }

    pub fn to_props(&self) -> BTreeMap<String, String> {
        let mut p = BTreeMap::new();
        let mut put = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                p.insert(k.to_string(), v);
            }
        };
        put(HREF, self.href.clone());
        put(ETAG, self.validators.etag.clone());
        put(LAST_MODIFIED, self.validators.last_modified.clone());
        put(MTIME_NS, self.validators.mtime_ns.map(|v| v.to_string()));
        put(VALIDATED_AT, self.validated_at.map(|v| v.to_string()));
        put(DISK_FORMAT, self.disk_format.clone());
        put(FORMAT, self.format.clone());
        put(VIRTUAL_SIZE, self.virtual_size.map(|v| v.to_string()));
        put(SOURCE_FORMAT, self.source_format.clone());
        put(
            SOURCE_CHECKSUM,
            self.source_checksum.as_ref().map(|c| c.to_string()),
        );
        put(
            ORIGIN_CHECKSUM,
            self.origin_checksum.as_ref().map(|c| c.to_string()),
        );
        put(MD5, self.md5.as_ref().map(|c| c.to_string()));
        p
    }

    /// The property name of `validated_at`, for the store's single-property update.
    pub const VALIDATED_AT: &'static str = VALIDATED_AT;
}

/// Whether a cached copy may be used as it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Freshness {
    /// It can never change (a Glance image: immutable per id).
    Immutable,
    /// Checked with its origin within the revalidation interval (or, for a local file, its
    /// mtime is the one recorded).
    Fresh,
    /// Due for one conditional request to its origin.
    Revalidate,
}

/// The one freshness rule, for `imgcache fetch`, `/v1/fetch` hits and revalidation. A
/// `file://` copy is fresh while the source's mtime is the recorded one (`mtime_ns` is the
/// source's current mtime, a stat the caller made); an http(s) copy while its last check is
/// younger than `interval` (zero: always ask, as Ironic's `fetch_image` does).
pub fn freshness(
    meta: &ImageMeta,
    href: &Href,
    interval: Duration,
    source_mtime_ns: Option<i128>,
) -> Freshness {
    match href {
        Href::Glance(_) => Freshness::Immutable,
        Href::File(_) => match (meta.validators.mtime_ns, source_mtime_ns) {
            (Some(held), Some(now)) if held == now => Freshness::Fresh,
            _ => Freshness::Revalidate,
        },
        Href::Http(_) => match meta.validated_at {
            Some(at) if !interval.is_zero() && now() - at < interval.as_secs_f64() => {
                Freshness::Fresh
            }
            _ => Freshness::Revalidate,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn props_round_trip() {
        let full = ImageMeta {
            href: Some("http://h/a.img".into()),
            validators: Validators {
                etag: Some("\"abc\"".into()),
                last_modified: Some("Tue, 01 Dec 2026 09:00:00 GMT".into()),
                mtime_ns: Some(1_795_000_000_123_456_789),
            },
            validated_at: Some(1_795_000_000.25),
            disk_format: Some("qcow2".into()),
            format: Some("raw".into()),
            virtual_size: Some(1 << 30),
            source_format: Some("qcow2".into()),
            source_checksum: Some(Integrity::of(imgcache_store::Algorithm::Sha256, b"x")),
            origin_checksum: Some(Integrity::of(imgcache_store::Algorithm::Sha512, b"y")),
            md5: Some(Integrity::of(imgcache_store::Algorithm::Md5, b"y")),
        };
        assert_eq!(ImageMeta::from_props(&full.to_props()), full);
        assert_eq!(full.to_props().len(), 12, "every field is a property");
        let empty = ImageMeta::default();
        assert!(empty.to_props().is_empty());
        assert_eq!(ImageMeta::from_props(&empty.to_props()), empty);
    }

    #[test]
    fn freshness_rule() {
        let http = Href::parse("http://h/a.img").unwrap();
        let glance = Href::parse("glance://5b8c4a2e-33b1-4f7e-9c4b-0a3c7f1f2d11").unwrap();
        let file = Href::File("/srv/a.img".into());
        let mut m = ImageMeta::default();
        let hour = Duration::from_secs(3600);
        assert_eq!(freshness(&m, &glance, hour, None), Freshness::Immutable);
        assert_eq!(freshness(&m, &http, hour, None), Freshness::Revalidate);
        m.validated_at = Some(now());
        assert_eq!(freshness(&m, &http, hour, None), Freshness::Fresh);
        assert_eq!(
            freshness(&m, &http, Duration::ZERO, None),
            Freshness::Revalidate,
            "interval 0 always asks"
        );
        m.validated_at = Some(now() - 7200.0);
        assert_eq!(freshness(&m, &http, hour, None), Freshness::Revalidate);
        m.validators.mtime_ns = Some(5);
        assert_eq!(freshness(&m, &file, hour, Some(5)), Freshness::Fresh);
        assert_eq!(freshness(&m, &file, hour, Some(6)), Freshness::Revalidate);
        assert_eq!(freshness(&m, &file, hour, None), Freshness::Revalidate);
    }
}
