//! Resuming broken downloads.
//!
//! An HTTP 200 whose response carries a strong validator (a strong `ETag`, else
//! `Last-Modified`) and no content coding is [`Resumable`]: the rest of the same image can be
//! asked for with `Range: bytes=N-` and `If-Range: <validator>`, through the same redirect
//! and allow-list checks as the first request ([`HttpSource::get_rest`]).
//!
//! - **Within one download** the body stream itself resumes ([`resuming`]): when the origin's
//!   connection breaks mid-body (a reset, a read past the read timeout, a 5xx when asked again)
//!   it asks for the bytes from the position it reached and goes on with a 206 whose
//!   `Content-Range` starts there. Whoever reads the stream (zstd, the inspector, the hasher,
//!   the writer, the server's followers) sees one unbroken body. An origin that ignores
//!   ranges but answers with provably the same image (the same strong validator and length)
//!   is read again from byte 0, the bytes already had passed over, and the body goes on
//!   unbroken too. A 200 of a changed image or a `Content-Range` that does not fit ends it
//!   with [`FetchError::Restart`]: nothing is mixed, the download fails and the next one
//!   starts from byte 0. Bounded by [`HttpOptions::retries`] resumes and
//!   [`HttpOptions::retry_budget`] of time from the first break.
//! - **From somewhere else**: a body whose source may be gone for good (a fleet peer that
//!   died mid-stream) resumes through a [`Continuation`] instead ([`continuing`]), which finds
//!   the rest elsewhere (another holder, the origin) by a `Range` request from the same
//!   position; the caller verifies the whole image's checksum, so mixing sources can never
//!   publish a wrong image.
//! - **After the writer died** (`kill -9`): while a resumable download is written, a note
//!   `incomplete/<key>.resume` beside the file records the href, the validator, the total
//!   length and the boot it was written in. The next writer of the key, holding its permit,
//!   finds the leftover and its note, asks the origin for the rest (If-Range), and feeds the
//!   leftover's bytes and then the rest through the whole admission pipeline into its *new*
//!   file (a new inode, as every writer's: followers of the dead writer never see its file
//!   reused). The whole-file checksum is computed over all the bytes. The note is removed when
//!   the download ends either way; the cleaner removes a leftover and its note after the
//!   stall time. A leftover from before a reboot is never resumed (unsynced pages may be lost).
//!
//! [`HttpSource::get_rest`]: crate::source::http::HttpSource
//! [`HttpOptions::retries`]: crate::source::http::HttpOptions::retries
//! [`HttpOptions::retry_budget`]: crate::source::http::HttpOptions::retry_budget

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use imgcache_store::{Cache, Key, Status};
use reqwest::header::{
    ACCEPT_RANGES, CONTENT_ENCODING, CONTENT_LENGTH, ETAG, HeaderMap, LAST_MODIFIED,
};
use serde::{Deserialize, Serialize};
use url::Url;

use crate::allow::AllowList;
use crate::error::{FetchError, Result};
use crate::source::BodyStream;
use crate::source::http::{HttpOptions, HttpSource, error_chain, header};

/// How to ask for the rest of one body (see the module docs): the same origin again, or,
/// for a body that came from somewhere else, a [`Continuation`].
#[derive(Clone)]
pub struct Resumable(Arc<Ctx>);

struct Ctx {
    /// Retry count, time budget and backoff of the resumes.
    opts: HttpOptions,
    /// Where the body came from, for messages.
    url: Url,
    how: How,
}

#[expect(
    clippy::large_enum_variant,
    reason = "one per download, behind an Arc: boxing would buy nothing"
)]
enum How {
    /// The same URL again, with `Range` and `If-Range: validator`.
    Origin {
        http: HttpSource,
        headers: HeaderMap,
        allow: Option<AllowList>,
        validator: String,
        total: Option<u64>,
    },
    /// Whatever the continuation finds (the server's fleet: another holder, or the origin
    /// under the fleet's lease).
    Elsewhere(Arc<dyn Continuation>),
}

/// Another way to get the rest of a body from an offset: for a body whose own source may be
/// gone for good (a fleet peer that died), where asking the same URL again is pointless.
/// Whatever it returns is read as the same image from `offset` on; the caller verifies the
/// whole image's checksum, so a continuation never needs to vouch for the bytes itself.
pub trait Continuation: Send + Sync + 'static {
    /// The rest from `offset`, or `Ok(Err(why))` when no source will give it.
    fn rest(&self, offset: u64) -> RestFuture<'_>;
}

/// What [`Continuation::rest`] returns.
pub type RestFuture<'a> =
    Pin<Box<dyn Future<Output = Result<std::result::Result<Rest, String>>> + Send + 'a>>;

/// A continuation's answer: a 206 whose `Content-Range` starts at the asked offset, and
/// whatever must live while it is read (a lease, say).
pub struct Rest {
    pub response: reqwest::Response,
    pub keep: Option<Box<dyn std::any::Any + Send + Sync>>,
    /// Leading bytes of `response` that come before the asked offset, passed over: an origin
    /// that ignores ranges answers with the whole (same) image.
    pub skip: u64,
}

/// `chunks` without their first `skip` bytes.
fn skipping(chunks: Chunks, skip: u64) -> Chunks {
    if skip == 0 {
        return chunks;
    }
    Box::pin(futures_util::stream::unfold(
        (chunks, skip),
        |(mut chunks, mut skip)| async move {
            loop {
                let mut c = match chunks.next().await? {
                    Ok(c) => c,
                    Err(e) => return Some((Err(e), (chunks, skip))),
                };
                if skip == 0 {
                    return Some((Ok(c), (chunks, 0)));
                }
                let k = skip.min(c.len() as u64);
                skip -= k;
                if (k as usize) < c.len() {
                    let _ = c.split_to(k as usize);
                    return Some((Ok(c), (chunks, skip)));
                }
            }
        },
    ))
}

impl std::fmt::Debug for Resumable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("Resumable");
        d.field("url", &crate::allow::redacted(&self.0.url));
        if let How::Origin {
            validator, total, ..
        } = &self.0.how
        {
            d.field("validator", validator).field("total", total);
        }
        d.finish_non_exhaustive()
    }
}

impl Resumable {
    /// For a 200 to `GET url` (with `headers`, no conditionals) that answered `resp`: `None`
    /// without a strong validator, with a content coding, or with `Accept-Ranges: none`.
    pub(crate) fn of(
        http: &HttpSource,
        url: &Url,
        headers: &HeaderMap,
        allow: Option<&AllowList>,
        resp: &HeaderMap,
    ) -> Option<Resumable> {
        if header(resp, &CONTENT_ENCODING).is_some_and(|v| !v.eq_ignore_ascii_case("identity")) {
            return None;
        }
        if header(resp, &ACCEPT_RANGES).is_some_and(|v| v.eq_ignore_ascii_case("none")) {
            return None;
        }
        let validator = header(resp, &ETAG)
            .filter(|e| e.starts_with('"'))
            .or_else(|| header(resp, &LAST_MODIFIED))?;
        Some(Resumable(Arc::new(Ctx {
            opts: http.options().clone(),
            url: url.clone(),
            how: How::Origin {
                http: http.clone(),
                headers: headers.clone(),
                allow: allow.cloned(),
                validator,
                total: header(resp, &CONTENT_LENGTH).and_then(|v| v.parse().ok()),
            },
        })))
    }

    /// Resumes a body from `url` through `continuation`, within `opts`' retries and budget.
    pub fn elsewhere(
        opts: &HttpOptions,
        url: &Url,
        continuation: Arc<dyn Continuation>,
    ) -> Resumable {
        Resumable(Arc::new(Ctx {
            opts: opts.clone(),
            url: url.clone(),
            how: How::Elsewhere(continuation),
        }))
    }

    /// The `If-Range` value: the strong ETag, else `Last-Modified`; `None` for a continuation
    /// (nothing to note for a resume after a crash).
    pub fn validator(&self) -> Option<&str> {
        match &self.0.how {
            How::Origin { validator, .. } => Some(validator),
            How::Elsewhere(_) => None,
        }
    }

    /// The whole body's length, when the origin said.
    pub fn total(&self) -> Option<u64> {
        match &self.0.how {
            How::Origin { total, .. } => *total,
            How::Elsewhere(_) => None,
        }
    }

    /// The bytes from `offset` on, as a body that resumes itself in turn; `Ok(Err(why))` when
    /// the origin will not give them (the image changed, or it does not serve ranges).
    pub async fn rest(&self, offset: u64) -> Result<std::result::Result<BodyStream, String>> {
        Ok(self.rest_response(offset).await?.map(|rest| {
            let chunks = skipping(chunks_of(rest.response), rest.skip);
            let mut body = body_of(self.0.url.clone(), chunks, offset);
            body.resume = Some(self.clone());
            body.keep = rest.keep;
            body.stream()
        }))
    }
}

/// `Content-Range: bytes START-END/TOTAL` (TOTAL may be `*`).
pub fn content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (span, total) = rest.split_once('/')?;
    let (s, e) = span.split_once('-')?;
    let (s, e): (u64, u64) = (s.trim().parse().ok()?, e.trim().parse().ok()?);
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    if e < s || total.is_some_and(|t| e >= t) {
        return None;
    }
    Some((s, e, total))
}

/// A body's chunks, a break as its reason.
type Chunks = Pin<Box<dyn Stream<Item = std::result::Result<Bytes, String>> + Send>>;

fn chunks_of(resp: reqwest::Response) -> Chunks {
    Box::pin(resp.bytes_stream().map(|r| r.map_err(|e| error_chain(&e))))
}

struct Body {
    inner: Chunks,
    url: Url,
    pos: u64,
    resume: Option<Resumable>,
    resumes: u32,
    since: Option<Instant>,
    done: bool,
    /// What the current source needs kept alive while it is read (see [`Rest::keep`]).
    keep: Option<Box<dyn std::any::Any + Send + Sync>>,
}

fn body_of(url: Url, inner: Chunks, pos: u64) -> Body {
    Body {
        inner,
        url,
        pos,
        resume: None,
        resumes: 0,
        since: None,
        done: false,
        keep: None,
    }
}

/// `resp`'s body (its first byte at `pos` of the image), resuming itself when `resume` allows
/// (see the module docs). A break that cannot be resumed is a [`FetchError::Origin`] (the
/// writer reports it as truncated) or a [`FetchError::Restart`].
pub(crate) fn resuming(
    url: Url,
    resp: reqwest::Response,
    pos: u64,
    resume: Option<Resumable>,
) -> BodyStream {
    let mut body = body_of(url, chunks_of(resp), pos);
    body.resume = resume;
    body.stream()
}

/// A body from `url` that already streams (its first byte at offset 0), resumed through
/// `resume` when it breaks: how a fleet peer's body goes on from another source. The body's
/// own error ends it only when `resume` cannot continue.
pub fn continuing(url: &Url, body: BodyStream, resume: Resumable) -> BodyStream {
    let inner: Chunks = Box::pin(body.map(|r| r.map_err(|e| e.to_string())));
    let mut body = body_of(url.clone(), inner, 0);
    body.resume = Some(resume);
    body.stream()
}

impl Body {
    fn stream(self) -> BodyStream {
        Box::pin(futures_util::stream::unfold(self, |mut b| async move {
            if b.done {
                return None;
            }
            loop {
                match b.inner.next().await {
                    None => return None,
                    Some(Ok(chunk)) => {
                        b.pos += chunk.len() as u64;
                        return Some((Ok(chunk), b));
                    }
                    Some(Err(e)) => match b.resume_after(e).await {
                        Ok(()) => continue,
                        Err(err) => {
                            b.done = true;
                            return Some((Err(err), b));
                        }
                    },
                }
            }
        }))
    }

    /// Asks for the rest after a break (`reason`), within the retry count and time budget.
    async fn resume_after(&mut self, reason: String) -> Result<()> {
        let Some(r) = self.resume.clone() else {
            return Err(FetchError::Origin {
                url: self.url.to_string(),
                reason,
            });
        };
        let opts = r.0.opts.clone();
        let since = *self.since.get_or_insert_with(Instant::now);
        let mut last = reason;
        loop {
            let spent = since.elapsed();
            if self.resumes >= opts.retries || spent >= opts.retry_budget {
                return Err(FetchError::Origin {
                    url: self.url.to_string(),
                    reason: format!(
                        "{last} (gave up after {} resume attempts in {})",
                        self.resumes,
                        humantime::format_duration(std::time::Duration::from_millis(
                            spent.as_millis() as u64
                        ))
                    ),
                });
            }
            let wait = (opts.backoff * 2u32.saturating_pow(self.resumes))
                .min(opts.retry_budget.saturating_sub(spent));
            tokio::time::sleep(wait).await;
            self.resumes += 1;
            tracing::warn!(url = %crate::allow::redacted(&self.url), offset = self.pos, attempt = self.resumes, reason = %last, "origin body broke; resuming with a range request");
            match r.rest_response(self.pos).await {
                Ok(Ok(rest)) => {
                    match rest.skip {
                        0 => {
                            tracing::info!(url = %crate::allow::redacted(&self.url), offset = self.pos, "download resumed")
                        }
                        skip => {
                            tracing::info!(url = %crate::allow::redacted(&self.url), offset = self.pos, skip, "download resumed: the origin sent the same image whole (no ranges); its first bytes are passed over")
                        }
                    }
                    self.inner = skipping(chunks_of(rest.response), rest.skip);
                    self.keep = rest.keep;
                    return Ok(());
                }
                Ok(Err(why)) => {
                    return Err(FetchError::Restart {
                        url: self.url.to_string(),
                        got: self.pos,
                        reason: why,
                    });
                }
                Err(e) if e.is_transient() => last = e.to_string(),
                Err(e) => return Err(e),
            }
        }
    }
}

impl Resumable {
    async fn rest_response(&self, offset: u64) -> Result<std::result::Result<Rest, String>> {
        let c = &self.0;
        match &c.how {
            How::Origin {
                http,
                headers,
                allow,
                validator,
                total,
            } => Ok(http
                .get_rest_or_whole(
                    &c.url,
                    headers,
                    allow.as_ref(),
                    offset,
                    Some(validator),
                    *total,
                )
                .await?
                .map(|(response, skip)| Rest {
                    response,
                    keep: None,
                    skip,
                })),
            How::Elsewhere(cont) => cont.rest(offset).await,
        }
    }
}

/// What a download's note beside its `incomplete/` file says.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Note {
    href: String,
    validator: String,
    total: Option<u64>,
    boot_id: String,
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Removes the note when dropped (the download ended, published or not).
pub(crate) struct NoteGuard(PathBuf);

impl Drop for NoteGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Writes the note of a resumable download of `href` into `key` (its writer holds the
/// permit). `None` when it cannot (the key is too long to name a note): no resume after a
/// crash then, nothing else changes.
pub(crate) fn write_note(cache: &Cache, key: &Key, href: &str, r: &Resumable) -> Option<NoteGuard> {
    let path = cache.resume_note_path(key)?;
    let note = Note {
        href: href.to_string(),
        validator: r.validator()?.to_string(),
        total: r.total(),
        boot_id: boot_id(),
    };
    let tmp = path.with_file_name(format!(".{}.tmp", std::process::id()));
    let json = serde_json::to_vec(&note).ok()?;
    let written = std::fs::write(&tmp, json).and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        tracing::warn!(path = %path.display(), error = %e, "could not write the resume note");
        return None;
    }
    Some(NoteGuard(path))
}

/// A dead writer's leftover of `key` that the download `r` of `href` can continue: its file,
/// open, and its length. Called with the key's permit held, before the new writer unlinks it.
pub(crate) fn leftover(
    cache: &Cache,
    key: &Key,
    href: &str,
    r: &Resumable,
) -> Option<(std::fs::File, u64)> {
    let note_path = cache.resume_note_path(key)?;
    let note: Note = serde_json::from_slice(&std::fs::read(&note_path).ok()?).ok()?;
    let wanted = Note {
        href: href.to_string(),
        validator: r.validator()?.to_string(),
        total: r.total(),
        boot_id: boot_id(),
    };
    if note != wanted {
        tracing::info!(%key, "a leftover download of another image version (or boot): starting over");
        return None;
    }
    let path = cache.get_image_filepath(key, Status::Incomplete);
    let file = std::fs::File::open(&path).ok()?;
    let len = file.metadata().ok()?.len();
    if len == 0 || r.total().is_some_and(|t| len >= t) {
        return None;
    }
    Some((file, len))
}

/// The first `limit` bytes of `file` as a stream of 1 MiB chunks.
pub(crate) fn file_prefix(file: std::fs::File, path: &Path, limit: u64) -> BodyStream {
    use tokio::io::AsyncReadExt;
    crate::admit::file_stream(tokio::fs::File::from_std(file).take(limit), path)
}

#[cfg(test)]
mod tests {
    use super::content_range;

    #[test]
    fn content_ranges() {
        assert_eq!(content_range("bytes 5-9/10"), Some((5, 9, Some(10))));
        assert_eq!(content_range("bytes 5-9/*"), Some((5, 9, None)));
        assert_eq!(content_range("bytes 5-10/10"), None);
        assert_eq!(content_range("bytes 9-5/10"), None);
        assert_eq!(content_range("bytes */10"), None);
        assert_eq!(content_range("5-9/10"), None);
    }
}
