//! Commands that change what is cached or queued: `queue`, `delete`, `clear`.

use anyhow::{Result, bail};
use serde::Serialize;

use super::{Ctx, parse_key};
use crate::cli::ClearTarget;
use crate::output;

#[derive(Serialize)]
struct Queued {
    image_id: String,
    queued: bool,
    /// queued, already_queued, already_cached or being_cached.
    status: &'static str,
}

pub fn queue(ctx: &Ctx, raw: &str) -> Result<()> {
    let key = parse_key(raw)?;
    let cache = ctx.open()?;
    let status = if cache.queue_image(&key)? {
        "queued"
    } else if cache.is_cached(&key)? {
        "already_cached"
    } else if cache.is_queued(&key)? {
        "already_queued"
    } else {
        "being_cached"
    };
    let r = Queued {
        image_id: key.to_string(),
        queued: status == "queued",
        status,
    };
    if ctx.json {
        return output::json(&r);
    }
    output::text(match status {
        "queued" => format!("queued {key}"),
        "already_cached" => format!("{key} is already cached; not queued"),
        "already_queued" => format!("{key} is already queued"),
        _ => format!("{key} is being cached right now; not queued"),
    })
}

#[derive(Serialize)]
struct Deleted {
    image_id: String,
    /// The image's file and record were removed.
    cached: bool,
    /// Only a record was there (its file had gone); it was removed.
    record_only: bool,
    queued: bool,
}

/// Removes the image from the cache and from the queue, as Glance's `DELETE /v2/cache/{id}` does.
pub fn delete(ctx: &Ctx, raw: &str) -> Result<()> {
    let key = parse_key(raw)?;
    let cache = ctx.open()?;
    // A file without a record fails here, before the queue is touched: nothing is changed.
    let what = cache.delete_image(&key)?;
    let r = Deleted {
        image_id: key.to_string(),
        cached: what == imgcache_store::Deleted::Image,
        record_only: what == imgcache_store::Deleted::RecordOnly,
        queued: cache.delete_queued_image(&key)?,
    };
    if what == imgcache_store::Deleted::Nothing && !r.queued {
        bail!("{key} is neither cached nor queued");
    }
    if ctx.json {
        return output::json(&r);
    }
    let mut line = match what {
        imgcache_store::Deleted::Image => format!("deleted {key}"),
        imgcache_store::Deleted::RecordOnly => {
            format!("removed the record of {key} (its file had already gone)")
        }
        imgcache_store::Deleted::Nothing => format!("removed {key} from the queue"),
    };
    if r.queued && what != imgcache_store::Deleted::Nothing {
        line += " and removed it from the queue";
    }
    output::text(line)
}

#[derive(Serialize)]
struct Cleared {
    cached_deleted: u64,
    queued_deleted: u64,
}

pub fn clear(ctx: &Ctx, target: ClearTarget) -> Result<()> {
    let cache = ctx.open()?;
    let r = Cleared {
        cached_deleted: match target {
            ClearTarget::Cache | ClearTarget::All => cache.delete_all_cached_images()?,
            ClearTarget::Queue => 0,
        },
        queued_deleted: match target {
            ClearTarget::Queue | ClearTarget::All => cache.delete_all_queued_images()?,
            ClearTarget::Cache => 0,
        },
    };
    if ctx.json {
        return output::json(&r);
    }
    let mut parts = Vec::new();
    if target != ClearTarget::Queue {
        parts.push(output::count(
            r.cached_deleted as usize,
            "cached image",
            "cached images",
        ));
    }
    if target != ClearTarget::Cache {
        parts.push(output::count(
            r.queued_deleted as usize,
            "queued image",
            "queued images",
        ));
    }
    output::text(format!("deleted {}", parts.join(" and ")))
}
