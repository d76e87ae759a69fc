//! Fetch errors, each saying what failed and where, so an operator can act on it.

use std::path::PathBuf;

use imgcache_store::{Integrity, StoreError};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum FetchError {
    #[error("invalid href {href:?}: {reason}")]
    BadHref { href: String, reason: String },

    #[error(
        "unsupported href scheme {scheme:?} in {href:?} (use http, https, file or a Glance image id)"
    )]
    UnsupportedScheme { href: String, scheme: String },

    #[error("{path}: not under an allowed file directory (allow one with --allow-file-dir)")]
    FileNotAllowed { path: PathBuf },

    #[error("origin {url} answered {status}")]
    Status { url: String, status: u16 },

    #[error("origin {url}: {reason}")]
    Origin { url: String, reason: String },

    /// A redirect the origin answered was not followed: its target is not http(s), carries
    /// userinfo, or is outside the allowed href prefixes. Never retried.
    #[error("origin {from} redirected to {to}: redirect refused: {reason}")]
    RedirectRefused {
        from: String,
        to: String,
        reason: crate::allow::Refusal,
    },

    /// More than [`MAX_REDIRECTS`](crate::source::http::MAX_REDIRECTS) redirects in a row.
    #[error("origin {url}: more than {max} redirects, not followed")]
    TooManyRedirects { url: String, max: usize },

    #[error("origin {url} sent {got} bytes, expected {expected}: truncated or overlong body")]
    Length {
        url: String,
        expected: u64,
        got: u64,
    },

    /// The body ended early: the connection was cut or reset after `got` bytes.
    #[error("origin {url} cut the body after {got} bytes{}: {reason}", expected.map(|e| format!(" of {e}")).unwrap_or_default())]
    Truncated {
        url: String,
        got: u64,
        expected: Option<u64>,
        reason: String,
    },

    /// A broken body could not be resumed because the origin's image changed (its validator
    /// no longer matches) or it does not serve ranges: the bytes already written are not
    /// mixed with new ones, and the next attempt starts over from byte 0.
    #[error("origin {url} cut the body after {got} bytes and {reason}; the download starts over")]
    Restart {
        url: String,
        got: u64,
        reason: String,
    },

    #[error(
        "checksum mismatch for {href}: expected {expected}, got {actual}; the download was moved to invalid/"
    )]
    Checksum {
        href: String,
        expected: Integrity,
        actual: Integrity,
    },

    #[error("checksum file {url} has no entry for {name:?}")]
    ChecksumNotListed { url: String, name: String },

    #[error("Glance image {id} is {status:?}, not active")]
    GlanceNotActive { id: String, status: String },

    #[error(
        "no Glance endpoint configured for image {id} (set --glance-url or IMGCACHE_GLANCE_URL)"
    )]
    NoGlance { id: String },

    /// The image's content was refused: an unsafe or ambiguous format, a format other than
    /// the declared one, or one outside the permitted list.
    #[error("{href}: {source}")]
    Image {
        href: String,
        #[source]
        source: crate::formats::FormatError,
    },

    #[error("{href}: zstd decompression failed: {reason}")]
    Decompress { href: String, reason: String },

    #[error(transparent)]
    Convert(#[from] crate::convert::ConvertError),

    /// The image is larger than the room the cache could make for it (its limit, or what
    /// is not in use); nothing was evicted for it.
    #[error("{href}: {size} bytes do not fit the cache (max size {max_size}); nothing was evicted")]
    TooLarge {
        href: String,
        size: u64,
        max_size: u64,
    },

    #[error("destination {path}: {reason}")]
    Dest { path: PathBuf, reason: String },

    /// Stopped on purpose (the server is shutting down).
    #[error("{0}")]
    Cancelled(String),

    #[error("configuration: {0}")]
    Config(String),

    #[error(transparent)]
    Store(#[from] StoreError),

    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl FetchError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        match StoreError::io(op, path, source) {
            StoreError::Io { op, path, source } => FetchError::Io { op, path, source },
            other => FetchError::Store(other),
        }
    }

    /// Whether retrying the same request might succeed (connection trouble, 5xx).
    pub fn is_transient(&self) -> bool {
        match self {
            FetchError::Status { status, .. } => *status >= 500,
            FetchError::Origin { .. } | FetchError::Length { .. } => true,
            _ => false,
        }
    }
}

pub type Result<T, E = FetchError> = std::result::Result<T, E>;

impl FetchError {
    /// Why the admission pipeline refused an image, as a metric label; `None` for failures
    /// that are not a verdict on the image (origin down, disk full, a bad destination).
    pub fn refusal(&self) -> Option<&'static str> {
        match self {
            FetchError::Image { .. } => Some("unsafe_image"),
            FetchError::Checksum { .. }
            | FetchError::Store(StoreError::ChecksumMismatch { .. }) => Some("checksum"),
            FetchError::Length { .. } | FetchError::Store(StoreError::SizeMismatch { .. }) => {
                Some("size")
            }
            FetchError::Truncated { .. } | FetchError::Restart { .. } => Some("truncated"),
            FetchError::Decompress { .. } => Some("decompress"),
            FetchError::TooLarge { .. } => Some("too_large"),
            _ => None,
        }
    }
}
