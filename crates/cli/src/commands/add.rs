//! `add KEY FILE`: stream a local file into the cache through `open_for_write` and commit.

use std::fs::File;
use std::io::{self, Read, Write};

use anyhow::{Context, Result, bail};
use imgcache_store::{Integrity, Record, WriteOptions};
use serde::Serialize;

use super::{Ctx, parse_key};
use crate::cli::AddArgs;
use crate::config::format_size_exact;
use crate::output::{self, RecordJson};

const CHUNK: usize = 1 << 20;

#[derive(Serialize)]
struct Added {
    /// "added", or "already_cached" when the key was cached before (or by a concurrent writer).
    status: &'static str,
    record: RecordJson,
}

pub fn add(ctx: &Ctx, args: AddArgs) -> Result<()> {
    let key = parse_key(&args.key)?;
    let src_name = args.file.display().to_string();
    let mut src = File::open(&args.file).with_context(|| format!("cannot read {src_name}"))?;
    let meta = src
        .metadata()
        .with_context(|| format!("cannot read {src_name}"))?;
    if meta.is_dir() {
        bail!("cannot read {src_name}: it is a directory");
    }
    let cache = ctx.open()?;

    let opts = WriteOptions {
        expected: args.checksum.clone(),
        // A regular file's length is known: preallocate (a full disk fails at once) and catch
        // a file that changes size while it is copied.
        expected_size: meta.is_file().then_some(meta.len()),
        ..WriteOptions::default()
    };
    // open_for_write waits for any other writer of this key and returns None if, by then, the
    // image is cached: two `add`s of one key publish once.
    let record = match cache.open_for_write_with(&key, opts)? {
        None => None,
        Some(mut writer) => {
            let bar = output::progress_bar(args.quiet, meta.is_file().then_some(meta.len()));
            let mut buf = vec![0u8; CHUNK];
            loop {
                let n = match src.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e).with_context(|| format!("reading {src_name}")),
                };
                writer
                    .write_all(&buf[..n])
                    .with_context(|| format!("writing {}", writer.path().display()))?;
                bar.inc(n as u64);
            }
            bar.finish_and_clear();
            Some(writer.commit()?)
        }
    };

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
