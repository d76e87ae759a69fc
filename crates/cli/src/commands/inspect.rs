//! Read-only commands: `list` and `stats`.

use anyhow::Result;
use serde::Serialize;

use super::Ctx;
use crate::config::{format_duration, format_size_exact};
use crate::output::{self, RecordJson};

pub fn list(ctx: &Ctx, queued: bool) -> Result<()> {
    let cache = ctx.open()?;
    if queued {
        let ids = cache.get_queued_images()?;
        return if ctx.json {
            output::json(&ids)
        } else if ids.is_empty() {
            output::text("no queued images")
        } else {
            output::text(ids.join("\n"))
        };
    }
    let records = cache.get_cached_images()?;
    if ctx.json {
        let rows: Vec<RecordJson> = records.iter().map(RecordJson::from).collect();
        return output::json(&rows);
    }
    if records.is_empty() {
        return output::text(format!("no cached images in {}", cache.root().display()));
    }
    output::text(output::records_table(&records))
}

#[derive(Serialize)]
struct Stats {
    driver: String,
    cache_dir: String,
    size: u64,
    entries: usize,
    queued: usize,
    incomplete: usize,
    invalid: usize,
    max_size: u64,
    stall_time_seconds: u64,
}

pub fn stats(ctx: &Ctx) -> Result<()> {
    let cache = ctx.open()?;
    let layout = cache.layout();
    let s = Stats {
        driver: cache.driver_kind().to_string(),
        cache_dir: cache.root().display().to_string(),
        size: cache.get_cache_size()?,
        entries: cache.get_cached_images()?.len(),
        queued: cache.get_queued_images()?.len(),
        incomplete: cache.get_cache_files(&layout.incomplete_dir())?.len(),
        invalid: cache.get_cache_files(&layout.invalid_dir())?.len(),
        max_size: ctx.settings.max_size,
        stall_time_seconds: ctx.settings.stall_time.as_secs(),
    };
    if ctx.json {
        return output::json(&s);
    }
    let used = if s.max_size == 0 {
        String::new()
    } else {
        format!(
            " ({:.1}% of max size)",
            s.size as f64 * 100.0 / s.max_size as f64
        )
    };
    output::text(output::pairs(&[
        ("driver", s.driver),
        ("cache dir", s.cache_dir),
        ("size", format!("{}{used}", format_size_exact(s.size))),
        ("entries", s.entries.to_string()),
        ("queued", s.queued.to_string()),
        ("incomplete", s.incomplete.to_string()),
        ("invalid", s.invalid.to_string()),
        ("max size", format_size_exact(s.max_size)),
        ("stall time", format_duration(ctx.settings.stall_time)),
    ]))
}
