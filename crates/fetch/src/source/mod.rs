//! Where images come from. Each source answers one request: "give me this image, unless the
//! copy I hold (described by its validators) is still current".

pub mod file;
pub mod glance;
pub mod http;

use std::pin::Pin;

use bytes::Bytes;
use futures_util::Stream;
use imgcache_store::Integrity;

use crate::error::FetchError;

/// A body arriving in chunks; memory is bounded by the chunk size and the channel depth.
pub type BodyStream = Pin<Box<dyn Stream<Item = Result<Bytes, FetchError>> + Send>>;

/// What the cached copy was fetched as, kept in its record's props to revalidate it later.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Validators {
    pub etag: Option<String>,
    /// HTTP `Last-Modified`, verbatim (sent back as `If-Modified-Since`).
    pub last_modified: Option<String>,
    /// A local source's mtime, in nanoseconds since the epoch.
    pub mtime_ns: Option<i128>,
}

/// What the origin said about the image it is sending.
#[derive(Clone, Debug, Default)]
pub struct OriginMeta {
    pub size: Option<u64>,
    pub validators: Validators,
    /// A checksum the origin vouches for (Glance's os_hash_value or md5 checksum).
    pub checksum: Option<Integrity>,
    /// The format the origin declares (Glance's disk_format).
    pub disk_format: Option<String>,
    /// The body's md5 when the origin gives it (Glance's legacy `checksum`, `Content-MD5`),
    /// also when `checksum` is a stronger one: Glance's clients check downloads against it.
    pub md5: Option<Integrity>,
    /// How to ask the origin for the rest of this body from an offset (an HTTP 200 with a
    /// strong validator); `None` when it cannot be resumed.
    pub resume: Option<crate::resume::Resumable>,
}

pub enum Response {
    /// The held copy is current (HTTP 304, unchanged mtime).
    NotModified,
    Body {
        meta: OriginMeta,
        body: BodyStream,
    },
    /// A local file that can be hard-linked into the cache instead of copied.
    LocalFile {
        meta: OriginMeta,
        path: std::path::PathBuf,
    },
}

impl Validators {
    pub fn is_empty(&self) -> bool {
        self.etag.is_none() && self.last_modified.is_none() && self.mtime_ns.is_none()
    }
}
