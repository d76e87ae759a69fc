//! What `fetch_image` does to an image's bytes between the source and the cache:
//! zstd decompression and inspection while downloading ([`prepare`]), then, on the complete
//! file, inspection again, the declared and permitted formats, and conversion to raw for
//! `force_raw` ([`finish`]).

use imgcache_store::off_thread;
use std::io;
use std::path::Path;
use std::sync::Arc;

use imgcache_store::{CacheReader, CacheWriter, Integrity, Record, Registry, StoreError};

use crate::convert::{ConvertOptions, conversion_space, convert_to_raw, needs_conversion};
use crate::error::{FetchError, Result};
use crate::formats::{DiskFormat, FormatError, Policy, report_file};
use crate::inspect_stream::{self, InspectOptions, Verdict};
use crate::progress::Progress;
use crate::source::BodyStream;
use crate::zstd::{self, InputDigest, ZSTD_MAGIC};

use crate::meta::{FORMAT as PROP_FORMAT, SOURCE_CHECKSUM as PROP_SOURCE_CHECKSUM};
use crate::meta::{SOURCE_FORMAT as PROP_SOURCE_FORMAT, VIRTUAL_SIZE as PROP_VIRTUAL_SIZE};

/// How images are checked and transformed; part of [`crate::SourceConfig`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageOptions {
    /// The formats accepted at all (default raw, gpt, qcow2, iso).
    pub policy: Policy,
    /// Decompress a zstd-compressed download before inspecting and caching it (default on).
    pub zstd: bool,
    /// How qemu-img is found and confined for `force_raw` conversions.
    pub convert: ConvertOptions,
}

impl Default for ImageOptions {
    fn default() -> Self {
        ImageOptions {
            policy: Policy::default(),
            zstd: true,
            convert: ConvertOptions::default(),
        }
    }
}

/// The declared format: the caller's (`--format`) if given, else the origin's (Glance's
/// `disk_format`). A name the inspector does not know is refused.
pub fn declared(
    given: Option<DiskFormat>,
    origin: Option<&str>,
    href: &str,
) -> Result<Option<DiskFormat>> {
    if given.is_some() {
        return Ok(given);
    }
    origin
        .filter(|s| !s.is_empty())
        .map(str::parse::<DiskFormat>)
        .transpose()
        .map_err(|source| FetchError::Image {
            href: href.to_string(),
            source,
        })
}

/// A body ready for the cache writer.
pub struct Prepared {
    pub body: BodyStream,
    /// Set when the body was zstd: it is decompressed, and the length and checksum the source
    /// gave were checked against the compressed bytes by the stream itself, so the writer must
    /// not check them against what it writes. Holds the compressed bytes' digest at the end.
    pub compressed: Option<InputDigest>,
    /// What the inspector saw, once the stream has ended.
    pub verdict: Verdict,
}

/// Puts the zstd decoder (when the body starts with its magic and `images.zstd`) and the
/// inspector in front of `body`. `size` and `checksum` are what the source announced.
pub async fn prepare(
    body: BodyStream,
    size: Option<u64>,
    checksum: Option<Integrity>,
    declared: Option<DiskFormat>,
    images: &ImageOptions,
    origin: &str,
) -> Result<Prepared> {
    let (body, compressed) = if images.zstd {
        let (body, is_zstd) = zstd::sniff(body).await?;
        if is_zstd {
            let expect = zstd::Expect {
                len: size,
                checksum,
            };
            let (body, digest) = zstd::decompress(body, expect, origin)?;
            (body, Some(digest))
        } else {
            (body, None)
        }
    } else {
        (body, None)
    };
    let opts = InspectOptions {
        declared,
        policy: images.policy.clone(),
        size_hint: if compressed.is_some() { None } else { size },
    };
    let (body, verdict) = inspect_stream::inspect(body, opts, origin);
    Ok(Prepared {
        body,
        compressed,
        verdict,
    })
}

/// Called once a download's bytes have passed every check (size, checksum, formats), before
/// the fsync, record and rename that publish them (which may still fail). Not called when the
/// bytes published are not the bytes downloaded (decompressed or converted at the end).
pub type VerifiedHook = Box<dyn FnOnce(&Record) + Send>;

/// What [`finish`] needs besides the writer.
pub struct Finish<'a> {
    pub href: &'a str,
    pub declared: Option<DiskFormat>,
    pub force_raw: bool,
    pub images: &'a ImageOptions,
    pub progress: &'a dyn Progress,
    /// Frees the space a conversion needs across the caches on this filesystem.
    pub registry: Option<&'a Arc<Registry>>,
    /// The body was already decompressed on the way in ([`Prepared::compressed`]).
    pub decompressed: bool,
    /// The checksum of the bytes as the source sent them, when they differ from the bytes
    /// written (a zstd download): recorded as [`PROP_SOURCE_CHECKSUM`].
    pub source_checksum: Option<Integrity>,
    /// Told when the bytes are verified, ahead of publishing (see [`VerifiedHook`]).
    pub on_verified: Option<VerifiedHook>,
}

/// Finishes a complete download: decompresses a zstd file that came in as is (a `file://`
/// source), inspects the file again, checks the declared and permitted formats, converts it
/// to raw when `force_raw` asks and the format needs it, and commits, handing back the
/// published image open for reading. On any error the writer
/// is dropped (its file goes to `invalid/`) and nothing is published.
pub async fn finish(mut writer: CacheWriter, f: Finish<'_>) -> Result<CacheReader> {
    let href = f.href.to_string();
    let path = writer.path().to_path_buf();
    let mut on_verified = f.on_verified;
    if f.images.zstd && !f.decompressed && starts_with_zstd(&path)? {
        // The bytes published will not be the bytes downloaded: no early word.
        on_verified = None;
        writer = off_thread(move || decompress_file(writer))
            .await
            .map_err(|e| checksum_error(&href, e))?;
    }
    let expected = f.declared.and_then(DiskFormat::expected);
    let p = path.clone();
    let detected = off_thread(move || Ok::<_, FetchError>(report_file(&p, expected)))
        .await?
        .map_err(|e| image_error(&href, e))?;
    f.images
        .policy
        .check(&detected, f.declared)
        .map_err(|source| FetchError::Image {
            href: href.clone(),
            source,
        })?;
    if f.force_raw && needs_conversion(detected.format) {
        if let Some(registry) = f.registry {
            let (registry, root) = (registry.clone(), cache_root(&path));
            let need = conversion_space(&detected);
            off_thread(move || registry.clean_up_caches(&root, need)).await?;
        }
        let scratch = writer.scratch_path();
        let _ = std::fs::remove_file(&scratch); // a leftover of a dead conversion
        let converted = convert_to_raw(
            &path,
            &scratch,
            detected.format,
            detected.virtual_size,
            &f.images.convert,
            f.progress,
        )
        .await?;
        let source_format = detected.format;
        let sent = f.source_checksum;
        return off_thread(move || {
            let source = writer.replace_with(&scratch);
            let _ = std::fs::remove_file(&scratch);
            let source = sent.unwrap_or(source?);
            writer.set_prop(PROP_SOURCE_FORMAT, source_format.name());
            writer.set_prop(PROP_SOURCE_CHECKSUM, &source.to_string());
            writer.set_prop(PROP_FORMAT, converted.format.name());
            if let Some(v) = converted.virtual_size {
                writer.set_prop(PROP_VIRTUAL_SIZE, &v.to_string());
            }
            writer.commit_open_notify(|_| {})
        })
        .await
        .map_err(|e| checksum_error(&href, e));
    }
    writer.set_prop(PROP_FORMAT, detected.format.name());
    if let Some(v) = detected.virtual_size {
        writer.set_prop(PROP_VIRTUAL_SIZE, &v.to_string());
    }
    if let Some(sent) = &f.source_checksum {
        writer.set_prop(PROP_SOURCE_CHECKSUM, &sent.to_string());
        writer.set_prop(PROP_SOURCE_FORMAT, "zstd");
    }
    off_thread(move || {
        writer.commit_open_notify(|rec| {
            if let Some(hook) = on_verified {
                hook(rec);
            }
        })
    })
    .await
    .map_err(|e| checksum_error(&href, e))
}

/// The cache root of a file in its `incomplete/` directory.
fn cache_root(incomplete_file: &Path) -> std::path::PathBuf {
    incomplete_file
        .parent()
        .and_then(Path::parent)
        .unwrap_or(Path::new("."))
        .to_path_buf()
}

fn starts_with_zstd(path: &Path) -> Result<bool> {
    use std::io::Read;
    let mut head = [0u8; 4];
    let mut f = std::fs::File::open(path).map_err(|e| FetchError::io("open", path, e))?;
    match f.read_exact(&mut head) {
        Ok(()) => Ok(head == ZSTD_MAGIC),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(FetchError::io("read", path, e)),
    }
}

/// Replaces a zstd file's bytes with their decompression (the checksum the source gave is
/// checked against the compressed bytes first).
fn decompress_file(mut writer: CacheWriter) -> Result<CacheWriter> {
    let scratch = writer.scratch_path();
    let src = writer.path().to_path_buf();
    let result = (|| -> Result<()> {
        let input = std::fs::File::open(&src).map_err(|e| FetchError::io("open", &src, e))?;
        let output =
            std::fs::File::create(&scratch).map_err(|e| FetchError::io("create", &scratch, e))?;
        let mut decoder = ::zstd::stream::read::Decoder::new(input)
            .map_err(|e| FetchError::io("decompress", &src, e))?;
        let mut output = io::BufWriter::with_capacity(1 << 20, output);
        io::copy(&mut decoder, &mut output).map_err(|e| FetchError::Decompress {
            href: src.display().to_string(),
            reason: e.to_string(),
        })?;
        io::Write::flush(&mut output).map_err(|e| FetchError::io("write", &scratch, e))?;
        let source = writer.replace_with(&scratch)?;
        writer.set_prop(PROP_SOURCE_CHECKSUM, &source.to_string());
        writer.set_prop(PROP_SOURCE_FORMAT, "zstd");
        Ok(())
    })();
    let _ = std::fs::remove_file(&scratch);
    result.map(|()| writer)
}

fn image_error(href: &str, e: FormatError) -> FetchError {
    FetchError::Image {
        href: href.to_string(),
        source: e,
    }
}

fn checksum_error(href: &str, e: impl Into<FetchError>) -> FetchError {
    match e.into() {
        FetchError::Store(StoreError::ChecksumMismatch {
            expected, actual, ..
        }) => FetchError::Checksum {
            href: href.to_string(),
            expected,
            actual,
        },
        other => other,
    }
}
