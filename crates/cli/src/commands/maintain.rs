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
