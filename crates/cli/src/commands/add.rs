//! `add KEY FILE`: a local file into the cache, through the admission pipeline like any
//! download.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use imgcache_fetch::formats::{Format, Policy};
use imgcache_fetch::pipeline::ImageOptions;
use imgcache_fetch::{ImageCache, Progress};
use imgcache_store::{CacheSpec, Integrity, Record};
use serde::Serialize;

use super::{Ctx, parse_key};
use crate::cli::AddArgs;
use crate::config::format_size_exact;
use crate::output::{self, RecordJson};
use crate::progress::PhaseBar;

#[derive(Serialize)]
struct Added {
    /// "added", or "already_cached" when the key was cached before (or by a concurrent writer).
    status: &'static str,
    record: RecordJson,
}

pub fn add(ctx: &Ctx, args: AddArgs) -> Result<()> {
    let key = parse_key(&args.key)?;
    let src_name = args.file.display().to_string();
    let meta = std::fs::metadata(&args.file).with_context(|| format!("cannot read {src_name}"))?;
    if meta.is_dir() {
        bail!("cannot read {src_name}: it is a directory");
    }
    std::fs::File::open(&args.file).with_context(|| format!("cannot read {src_name}"))?;
    let cache = ctx.open()?;
    // The admission pipeline, as for any download: every format is permitted (the operator
    // chose the file), unsafe images are refused, the checksum verified, nothing published
    // on failure. Waits for another writer of this key; two `add`s of one key publish once.
    let images = ImageCache::new(
        CacheSpec {
            name: "add".into(),
            cache: cache.clone(),
            max_size: ctx.settings.max_size,
            ttl: std::time::Duration::MAX,
            priority: imgcache_store::registry::PRIORITY_INSTANCE,
        },
        &ctx.sources(crate::config::default_revalidate_interval("fetch"))?,
    )?
    .with_images(ImageOptions {
        policy: Policy {
            permitted: Format::ALL.to_vec(),
        },
        zstd: false,
        ..ImageOptions::default()
    });
    let progress: Arc<dyn Progress> = Arc::new(PhaseBar::new(args.quiet, ctx.json));
    let record = super::provision::runtime()?.block_on(images.add_file(
        &key,
        &args.file,
        args.checksum.clone(),
        Some(progress),
    ))?;

    match record {
        Some(rec) => report(ctx, "added", &rec),
        None => {
            let rec = cache
                .get_record(&key)?
                .with_context(|| format!("{key} was cached by another writer and then removed"))?;
            check_existing(&rec, args.checksum.as_ref())?;
            report(ctx, "already_cached", &rec)
        }
    }
}

/// An already cached image must not silently stand in for different bytes.
fn check_existing(rec: &Record, expected: Option<&Integrity>) -> Result<()> {
    if let (Some(expected), Some(have)) = (expected, rec.checksum.as_ref())
        && expected.algorithm == have.algorithm
        && expected != have
    {
        bail!(
            "{} is already cached with checksum {have}, not {expected}; \
             delete it first to replace it",
            rec.image_id
        );
    }
    Ok(())
}

fn report(ctx: &Ctx, status: &'static str, rec: &Record) -> Result<()> {
    if ctx.json {
        return output::json(&Added {
            status,
            record: RecordJson::from(rec),
        });
    }
    let head = if status == "added" {
        format!("added {}", rec.image_id)
    } else {
        format!("{} is already cached; nothing written", rec.image_id)
    };
    output::text(format!(
        "{head}\n{}",
        output::pairs(&[
            ("size", format_size_exact(rec.size)),
            (
                "checksum",
                rec.checksum
                    .as_ref()
                    .map_or("-".into(), ToString::to_string),
            ),
            ("last modified", output::time(rec.last_modified)),
        ])
    ))
}
