//! Keeping the cache in bounds: `prune` and `clean`.

use anyhow::Result;
use serde::Serialize;

use super::Ctx;
use crate::config::{format_duration, format_size};
use crate::output;

#[derive(Serialize)]
struct Evicted {
    image_id: String,
    size: u64,
}

#[derive(Serialize)]
struct Pruned {
    max_size: u64,
    evicted: Vec<Evicted>,
    bytes_freed: u64,
    /// Images that would have gone but are open for reading or hard-linked elsewhere.
    skipped_in_use: Vec<String>,
    size_after: u64,
}

pub fn prune(ctx: &Ctx) -> Result<()> {
    let cache = ctx.open()?;
    let max_size = ctx.settings.max_size;
    let rep = cache.prune(max_size)?;
    let r = Pruned {
        max_size,
        evicted: rep
            .evicted
            .into_iter()
            .map(|(image_id, size)| Evicted { image_id, size })
            .collect(),
        bytes_freed: rep.bytes_freed,
        skipped_in_use: rep.skipped_in_use,
        size_after: rep.size_after,
    };
    if ctx.json {
        return output::json(&r);
    }
    let mut s = String::new();
    for e in &r.evicted {
        s += &format!("evicted {} ({})\n", e.image_id, format_size(e.size));
    }
    for k in &r.skipped_in_use {
        s += &format!("kept {k}: open for reading or hard-linked elsewhere\n");
    }
    s += &format!(
        "pruned to max size {}: {} evicted, {} freed, cache now {}\n",
        format_size(r.max_size),
        output::count(r.evicted.len(), "image", "images"),
        format_size(r.bytes_freed),
        format_size(r.size_after),
    );
    if r.size_after > r.max_size {
        s += "the cache is still over max size: the remaining images are in use\n";
    }
    output::text(s)
}

#[derive(Serialize)]
struct Cleaned {
    stall_time_seconds: u64,
    stalled: Vec<String>,
    invalid: Vec<String>,
    dangling_records: Vec<String>,
    /// Files in the cache directory with no record: not the store's, left alone.
    foreign_files: Vec<String>,
    stale_locks: u64,
}

pub fn clean(ctx: &Ctx) -> Result<()> {
    let cache = ctx.open()?;
    let rep = cache.clean(ctx.settings.stall_time)?;
    let r = Cleaned {
        stall_time_seconds: ctx.settings.stall_time.as_secs(),
        stalled: rep.stalled,
        invalid: rep.invalid,
        dangling_records: rep.dangling_records,
        foreign_files: rep.foreign_files,
        stale_locks: rep.stale_locks,
    };
    if ctx.json {
        return output::json(&r);
    }
    let stall = format_duration(ctx.settings.stall_time);
    output::text(output::pairs(&[
        (
            "stalled writes removed",
            format!("{} (older than {stall})", output::list_or_none(&r.stalled)),
        ),
        ("invalid files removed", output::list_or_none(&r.invalid)),
        (
            "records without a file dropped",
            output::list_or_none(&r.dangling_records),
        ),
        ("unused lock files removed", r.stale_locks.to_string()),
        (
            "foreign files left alone",
            output::list_or_none(&r.foreign_files),
        ),
    ]))
}

/// The format inspector's verdict as fsck's check of a file it would adopt: an image the one
/// door would refuse (a qcow2 with a backing file, ...) is moved aside, not adopted.
fn safe_image(path: &std::path::Path) -> std::result::Result<(), String> {
    let detected = imgcache_formats::report_file(path, None).map_err(|e| e.to_string())?;
    match detected.refusal() {
        Some(e) => Err(e.to_string()),
        None => Ok(()),
    }
}

/// `imgcache fsck [--repair]`; exit status 0 clean or all repaired, 1 problems left, 8 could
/// not check (see `--help`).
pub fn fsck(ctx: &Ctx, args: &crate::cli::FsckArgs) -> Result<()> {
    use crate::error::Exit;
    let run = || -> Result<imgcache_store::FsckReport> {
        let (cache, prelude) = imgcache_store::Cache::open_for_fsck(
            &ctx.settings.cache_dir,
            ctx.settings.driver,
            args.repair,
        )?;
        let bar = crate::progress::PhaseBar::new(args.quiet, ctx.json);
        let mut report = cache.fsck(&imgcache_store::FsckOptions {
            repair: args.repair,
            quick: false,
            stall_time: ctx.settings.stall_time,
            validate: Some(&safe_image),
            progress: Some(&bar),
        })?;
        report.database = prelude.database;
        report.driver_marker = prelude.driver_marker;
        Ok(report)
    };
    let report = run().map_err(|e| e.context(Exit(8)))?;
    let left = fsck_left(&report);
    if ctx.json {
        output::json(&report)?;
    } else {
        output::text(fsck_text(ctx, &report, left))?;
    }
    if left > 0 {
        return Err(Exit(1).into());
    }
    Ok(())
}

/// Problems still there after this run: all of them without `--repair`.
fn fsck_left(r: &imgcache_store::FsckReport) -> usize {
    if !r.repaired {
        return r.problems();
    }
    r.files_without_records
        .iter()
        .filter(|o| o.action != "adopted" && o.action != "moved_aside")
        .count()
}

fn fsck_text(ctx: &Ctx, r: &imgcache_store::FsckReport, left: usize) -> String {
    let done = |did: &str, would: &str| -> String {
        if r.repaired {
            did.to_string()
        } else {
            format!("repair {would}")
        }
    };
    let mut s = format!(
        "fsck {} ({} driver): {} with a record\n",
        ctx.settings.cache_dir.display(),
        r.driver,
        output::count(r.images, "image", "images"),
    );
    if let Some(db) = &r.database {
        let what = match (&db.moved_to, r.repaired) {
            (Some(to), _) => format!(
                "moved aside to {}, a new one rebuilt from the files",
                to.display()
            ),
            (None, true) => "a new one rebuilt from the files".into(),
            (None, false) => "repair rebuilds it from the files".into(),
        };
        s += &format!("database {} is {}: {what}\n", db.path.display(), db.state);
    }
    if let Some(m) = &r.driver_marker {
        s += &format!(
            "driver marker says {}, the records are in {}: {}\n",
            m.found.as_deref().unwrap_or("nothing (no marker)"),
            m.records_in,
            done("rewritten", "rewrites it"),
        );
    }
    for k in &r.records_without_files {
        s += &format!(
            "record without a file: {k}: {}\n",
            done("removed", "removes it")
        );
    }
    for o in &r.files_without_records {
        let size = format_size(o.size);
        let why = o.reason.as_deref().unwrap_or("");
        s += &match o.action {
            "adopted" => format!(
                "file without a record: {} ({size}): adopted with {}\n",
                o.image_id,
                o.checksum.as_deref().unwrap_or("-")
            ),
            "moved_aside" => format!(
                "file without a record: {} ({size}): moved aside into invalid/: {why}\n",
                o.image_id
            ),
            "move_aside" => format!(
                "file without a record: {} ({size}): {why}: repair moves it aside into invalid/\n",
                o.image_id
            ),
            _ if !why.is_empty() => format!(
                "file without a record: {} ({size}): not adopted: {why}\n",
                o.image_id
            ),
            _ => format!(
                "file without a record: {} ({size}): repair adopts it (sha256 and size from the file)\n",
                o.image_id
            ),
        };
    }
    for k in &r.stale_incomplete {
        s += &format!(
            "stale incomplete write: incomplete/{k} (older than {}, no writer): {}\n",
            format_duration(ctx.settings.stall_time),
            done("removed", "removes it")
        );
    }
    for k in &r.stale_locks {
        s += &format!(
            "unused lock file: locks/{k}.lock: {}\n",
            done("removed", "removes it")
        );
    }
    let found = r.problems();
    s += &if found == 0 {
        "clean: no problems found\n".to_string()
    } else if r.repaired && left == 0 {
        format!(
            "{} found, all repaired\n",
            output::count(found, "problem", "problems")
        )
    } else if r.repaired {
        format!(
            "{} found, {left} left unrepaired\n",
            output::count(found, "problem", "problems")
        )
    } else {
        format!(
            "{} found; `imgcache fsck --repair` repairs them\n",
            output::count(found, "problem", "problems")
        )
    };
    s
}
