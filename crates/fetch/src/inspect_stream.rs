//! Inspection while downloading: every chunk passes through the format [`Inspector`] on its way
//! to the cache, so an unsafe image is refused before the whole file is written.
//!
//! Two verdicts:
//! - **Early**, as soon as no format needs any more leading bytes (the header regions have all
//!   gone by, typically within the first few hundred KiB): the header bytes seen so far are
//!   replayed into a second inspector that is told the stream ends at the announced size, and a
//!   refusal that the headers alone decide (a backing file, a data file, unknown features, QED,
//!   a VMDK descriptor or extent, MBR sanity, LUKS version, several formats, a declared or
//!   permitted format mismatch) fails the stream at once. Verdicts that depend on the real end
//!   of the stream (sizes and offsets past the end, a stream-optimized VMDK's footer) wait.
//! - **Final**, when the stream ends: the full verdict and the [`Policy`].
//!
//! A declared format that the content rules out fails the stream at the first chunk that shows
//! it ([`Inspector::feed`]).

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::StreamExt;

use crate::error::{FetchError, Result};
use crate::formats::{Detected, DiskFormat, FormatError, Inspector, Policy};
use crate::source::BodyStream;

/// The most leading bytes kept for the early verdict. Header regions lie well within it for
/// every format (a VMDK descriptor, the largest, ends by 1 MiB + 512); past it, only the final
/// verdict is given.
pub const PREFIX_LIMIT: usize = 4 << 20;

/// What the stream is checked against.
#[derive(Clone, Debug, Default)]
pub struct InspectOptions {
    /// The format the source declared (Glance's `disk_format`) or the caller expects.
    pub declared: Option<DiskFormat>,
    pub policy: Policy,
    /// The stream's announced length (Content-Length), if any: lets the early verdict check
    /// offsets against the real end.
    pub size_hint: Option<u64>,
}

/// The final verdict, once the stream has ended and passed.
#[derive(Clone, Debug, Default)]
pub struct Verdict(Arc<Mutex<Option<Detected>>>);

impl Verdict {
    pub fn get(&self) -> Option<Detected> {
        self.0.lock().expect("verdict lock").clone()
    }
}

struct State {
    inner: BodyStream,
    inspector: Option<Inspector>,
    /// Leading bytes for the early verdict; `None` once it was given or abandoned.
    prefix: Option<Vec<u8>>,
    opts: InspectOptions,
    origin: String,
    verdict: Verdict,
    done: bool,
}

impl State {
    fn refuse(&mut self, source: FormatError) -> Option<Result<Bytes>> {
        self.done = true;
        Some(Err(FetchError::Image {
            href: self.origin.clone(),
            source,
        }))
    }

    async fn next(&mut self) -> Option<Result<Bytes>> {
        if self.done {
            return None;
        }
        match self.inner.next().await {
            Some(Ok(chunk)) => {
                let inspector = self.inspector.as_mut().expect("inspector until the end");
                if let Err(e) = inspector.feed(&chunk) {
                    return self.refuse(e);
                }
                if let Some(prefix) = &mut self.prefix {
                    let room = PREFIX_LIMIT - prefix.len();
                    prefix.extend_from_slice(&chunk[..chunk.len().min(room)]);
                    if inspector.wants().is_none() {
                        let prefix = self.prefix.take().expect("prefix");
                        if let Some(e) = early_refusal(&prefix, &self.opts) {
                            return self.refuse(e);
                        }
                    } else if prefix.len() == PREFIX_LIMIT {
                        self.prefix = None; // headers beyond the limit: the final verdict decides
                    }
                }
                Some(Ok(chunk))
            }
            Some(Err(e)) => {
                self.done = true;
                Some(Err(e))
            }
            None => {
                self.done = true;
                let inspector = self.inspector.take().expect("inspector until the end");
                let result = inspector
                    .finish_report()
                    .and_then(|d| self.opts.policy.check(&d, self.opts.declared).map(|()| d));
                match result {
                    Ok(d) => {
                        *self.verdict.0.lock().expect("verdict lock") = Some(d);
                        None
                    }
                    Err(e) => self.refuse(e),
                }
            }
        }
    }
}

/// Whether a refusal found by replaying the headers alone stands, whatever the rest of the
/// stream holds.
fn decided_by_headers(e: &FormatError) -> bool {
    !matches!(
        e,
        FormatError::Truncated { .. }
            | FormatError::OutOfBounds { .. }
            | FormatError::Malformed { .. }
            | FormatError::VmdkFooter { .. }
            | FormatError::Io { .. }
    )
}

/// The refusal the header bytes in `prefix` already decide, if any.
pub fn early_refusal(prefix: &[u8], opts: &InspectOptions) -> Option<FormatError> {
    let mut replay = Inspector::new(opts.declared.and_then(DiskFormat::expected));
    if let Err(e) = replay.feed(prefix) {
        return decided_by_headers(&e).then_some(e);
    }
    if replay.wants().is_some() {
        return None; // a header region lies past the prefix kept: inconclusive
    }
    // Pretend the stream ends where it was announced to (or far away): the verdicts that
    // depend on the end are not used here.
    let end = opts.size_hint.unwrap_or(1 << 62).max(prefix.len() as u64);
    replay.skip_to(end);
    let detected = match replay.finish_report() {
        Ok(d) => d,
        Err(e) => return decided_by_headers(&e).then_some(e),
    };
    if let Some(e) = detected
        .checks
        .iter()
        .filter_map(|c| c.result.as_ref().err())
        .find(|e| decided_by_headers(e))
    {
        return Some(e.clone());
    }
    if let Some(declared) = opts.declared
        && !declared.accepts(detected.format)
    {
        return Some(FormatError::FormatMismatch {
            declared,
            detected: Some(detected.format),
        });
    }
    if !opts.policy.permits(detected.format) {
        return Some(FormatError::NotPermitted {
            format: detected.format,
            permitted: opts.policy.permitted.clone(),
        });
    }
    None
}

/// Passes `body` through an [`Inspector`]: the stream fails with [`FetchError::Image`] as soon
/// as the image is known to be refused (see the module docs), and at its end unless the final
/// verdict and the policy pass; then [`Verdict::get`] has what was detected.
pub fn inspect(body: BodyStream, opts: InspectOptions, origin: &str) -> (BodyStream, Verdict) {
    let verdict = Verdict::default();
    let expected = opts.declared.and_then(DiskFormat::expected);
    let state = State {
        inner: body,
        inspector: Some(Inspector::new(expected)),
        prefix: Some(Vec::new()),
        opts,
        origin: origin.to_string(),
        verdict: verdict.clone(),
        done: false,
    };
    let stream = futures_util::stream::unfold(state, |mut st| async move {
        let item = st.next().await?;
        Some((item, st))
    });
    (Box::pin(stream), verdict)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::Format;

    fn chunks(data: Vec<u8>, size: usize) -> BodyStream {
        let v: Vec<Result<Bytes>> = data
            .chunks(size)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        Box::pin(futures_util::stream::iter(v))
    }

    /// A qcow2 v3 header for a 1 GiB disk with 64 KiB clusters, padded to `len` bytes.
    fn qcow2(len: usize, backing: bool) -> Vec<u8> {
        let mut h = vec![0u8; len];
        h[0..4].copy_from_slice(b"QFI\xfb");
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        if backing {
            h[8..16].copy_from_slice(&512u64.to_be_bytes());
            h[16..20].copy_from_slice(&8u32.to_be_bytes());
            h[512..520].copy_from_slice(b"/etc/pwd");
        }
        h[20..24].copy_from_slice(&16u32.to_be_bytes());
        h[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
        h[36..40].copy_from_slice(&2u32.to_be_bytes());
        h[40..48].copy_from_slice(&196608u64.to_be_bytes());
        h[48..56].copy_from_slice(&65536u64.to_be_bytes());
        h[56..60].copy_from_slice(&1u32.to_be_bytes());
        h[96..100].copy_from_slice(&4u32.to_be_bytes());
        h[100..104].copy_from_slice(&104u32.to_be_bytes());
        h
    }

    /// Returns how many bytes were handed on before the stream failed, and the error.
    async fn run(body: BodyStream, opts: InspectOptions) -> (usize, Result<Detected>) {
        let (mut s, verdict) = inspect(body, opts, "test");
        let mut passed = 0;
        while let Some(c) = s.next().await {
            match c {
                Ok(c) => passed += c.len(),
                Err(e) => return (passed, Err(e)),
            }
        }
        (
            passed,
            Ok(verdict.get().expect("verdict after a clean end")),
        )
    }

    #[tokio::test]
    async fn a_backing_file_is_refused_after_the_header() {
        let img = qcow2(8 << 20, true);
        let (passed, r) = run(chunks(img, 4096), InspectOptions::default()).await;
        match r {
            Err(FetchError::Image {
                source: FormatError::BackingFile { .. },
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
        // The ISO probe is the last to give up (its descriptor lies at 32 KiB).
        assert!(passed < 64 * 1024, "{passed} bytes passed");
    }

    #[tokio::test]
    async fn a_safe_image_passes_with_its_verdict() {
        let img = qcow2(1 << 20, false);
        let (passed, r) = run(chunks(img, 7000), InspectOptions::default()).await;
        let d = r.unwrap();
        assert_eq!(passed, 1 << 20);
        assert_eq!(d.format, Format::Qcow2);
        assert_eq!(d.virtual_size, Some(1 << 30));
        // Raw passes too, and reads as raw.
        let (_, r) = run(chunks(vec![7u8; 300_000], 65536), InspectOptions::default()).await;
        assert_eq!(r.unwrap().format, Format::Raw);
    }

    #[tokio::test]
    async fn declared_and_permitted_formats_are_checked_early() {
        let opts = InspectOptions {
            declared: Some(DiskFormat::Image(Format::Raw)),
            ..InspectOptions::default()
        };
        let (passed, r) = run(chunks(qcow2(8 << 20, false), 4096), opts).await;
        assert!(
            matches!(
                r,
                Err(FetchError::Image {
                    source: FormatError::FormatMismatch { .. },
                    ..
                })
            ),
            "{r:?}"
        );
        assert!(passed < 64 * 1024, "{passed}");

        let opts = InspectOptions {
            policy: Policy {
                permitted: vec![Format::Raw],
            },
            ..InspectOptions::default()
        };
        let (passed, r) = run(chunks(qcow2(8 << 20, false), 4096), opts).await;
        assert!(
            matches!(
                r,
                Err(FetchError::Image {
                    source: FormatError::NotPermitted { .. },
                    ..
                })
            ),
            "{r:?}"
        );
        assert!(passed < 64 * 1024, "{passed}");
    }

    /// Offsets past the end are decided at the end, not from a guess.
    #[tokio::test]
    async fn end_dependent_verdicts_wait_for_the_end() {
        // L1 table at 192 KiB: a 100 KiB file cannot hold it.
        let img = qcow2(100 * 1024, false);
        let (passed, r) = run(chunks(img, 4096), InspectOptions::default()).await;
        assert_eq!(passed, 100 * 1024);
        assert!(
            matches!(
                r,
                Err(FetchError::Image {
                    source: FormatError::OutOfBounds { .. },
                    ..
                })
            ),
            "{r:?}"
        );
    }
}
