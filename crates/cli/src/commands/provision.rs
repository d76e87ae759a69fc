//! Provisioning (Ironic's side): `fetch`, `cleanup`, `caches`.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use imgcache_fetch::convert::ConvertOptions;
use imgcache_fetch::formats::DiskFormat;
use imgcache_fetch::pipeline::ImageOptions;
use imgcache_fetch::{ChecksumSpec, FetchOptions, ImageCache};
use imgcache_store::registry::{PRIORITY_INSTANCE, free_space};
use imgcache_store::{Cache, CacheSpec, Registry};
use serde::Serialize;

use super::Ctx;
use crate::cli::FetchArgs;
use crate::config::{format_duration, format_size};
use crate::output;
use crate::progress::PhaseBar;

/// The cache `--cache-dir` names, as a provisioning cache.
const DEFAULT_NAME: &str = "default";

/// Every provisioning cache: the `[caches.NAME]` tables and the `--cache-dir` one.
fn registry(ctx: &Ctx) -> Result<Registry> {
    let s = &ctx.settings;
    let mut reg = Registry::new();
    reg.register(CacheSpec {
        name: DEFAULT_NAME.into(),
        cache: ctx.open()?,
        max_size: s.max_size,
        ttl: s.ttl,
        priority: PRIORITY_INSTANCE,
    });
    for c in &s.caches {
        let cache = Cache::open(&c.dir, c.driver).with_context(|| format!("cache {:?}", c.name))?;
        reg.register(CacheSpec {
            name: c.name.clone(),
            cache,
            max_size: c.max_size,
            ttl: c.ttl,
            priority: c.priority,
        });
    }
    Ok(reg)
}

fn pick<'a>(reg: &'a Registry, name: Option<&str>) -> Result<&'a CacheSpec> {
    let name = name.unwrap_or(DEFAULT_NAME);
    match reg.get(name) {
        Some(c) => Ok(c),
        None => {
            let known: Vec<_> = reg.caches().iter().map(|c| c.name.as_str()).collect();
            bail!("no cache named {name:?} (configured: {})", known.join(", "))
        }
    }
}

pub(super) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

pub fn fetch(ctx: &Ctx, args: FetchArgs) -> Result<()> {
    let reg = Arc::new(registry(ctx)?);
    let spec = pick(&reg, args.cache.as_deref())?.clone();
    let sources = ctx.sources(crate::config::default_revalidate_interval("fetch"))?;
    let checksum = args
        .checksum
        .as_deref()
        .map(str::parse::<ChecksumSpec>)
        .transpose()?;
    let disk_format = args
        .format
        .as_deref()
        .map(str::parse::<DiskFormat>)
        .transpose()?;
    let opts = FetchOptions {
        force_raw: args.raw,
        checksum,
        progress: Some(Arc::new(PhaseBar::new(args.quiet, ctx.json))),
        disk_format,
    };
    let images = ImageCache::new(spec, &sources)?
        .with_registry(reg)
        .with_images(image_options(&args)?);
    let rt = runtime()?;
    let report = rt.block_on(async {
        // Fleet mode: this fetch is a node of the fleet while it runs (see `join_fleet`).
        let member = join_fleet(ctx, &images).await?;
        let images = match &member {
            Some(m) => images.with_fleet(m.clone()),
            None => images,
        };
        // A signal drops the fetch: its download or conversion stops (qemu-img is killed) and
        // leaves nothing in incomplete/.
        let r = tokio::select! {
            r = images.fetch_image(&args.href, &args.dest, &opts) => r.map_err(anyhow::Error::from),
            sig = interrupted() => Err(anyhow::anyhow!("interrupted by {sig}: nothing was published")),
        };
        if let Some(m) = &member {
            m.leave().await;
        }
        r
    })?;
    if ctx.json {
        return output::json(&report);
    }
    output::text(format!(
        "{} {} -> {} ({})\n{}",
        match report.outcome {
            imgcache_fetch::Outcome::Hit => "hit",
            imgcache_fetch::Outcome::Revalidated => "revalidated",
            imgcache_fetch::Outcome::Downloaded => "downloaded",
        },
        args.href,
        report.dest.display(),
        match report.placement {
            imgcache_fetch::Placement::AlreadyInPlace => "already in place",
            imgcache_fetch::Placement::HardLinked => "hard link",
            imgcache_fetch::Placement::Copied => "copy",
        },
        output::pairs(&[
            ("key", report.key.clone()),
            ("master", report.master.display().to_string()),
            ("size", format_size(report.size)),
            (
                "checksum",
                report
                    .checksum
                    .as_ref()
                    .map_or("-".into(), ToString::to_string),
            ),
        ])
    ))
}

/// Fleet mode (`fleet_db` set): joins the fleet as a transient node, `fetch://HOST/PID`, so
/// this fetch may fill from a live holder and may hold the fleet's origin lease (a lease's
/// holder must be a live, heartbeating node). What it fills and publishes is read through the
/// live `serve` on the same cache directory (its marker, else `node_url`), if there is one
/// ([`FetchMember`]). A fleet database that does not answer (every call is bounded) leaves
/// the fetch to the origin alone.
async fn join_fleet(
    ctx: &Ctx,
    images: &ImageCache,
) -> Result<Option<Arc<imgcache_fleet::source::FetchMember>>> {
    use imgcache_fleet::source::FetchMember;
    let s = &ctx.settings;
    let Some(db) = &s.fleet_db else {
        return Ok(None);
    };
    let Some(token) = s.fleet_token.clone().filter(|t| !t.is_empty()) else {
        bail!("fleet mode (fleet_db) needs a fleet_token, the secret peers present");
    };
    let http = images.http_source()?;
    let me = format!("fetch://{}/{}", hostname(), std::process::id());
    let mut cfg = imgcache_fleet::FleetConfig::new(db.clone(), me.clone());
    cfg.heartbeat_timeout = s.heartbeat_timeout;
    let root = images.cache().root();
    match FetchMember::join(cfg, token, &http, root, s.node_url.as_deref()).await {
        Ok(m) => {
            tracing::debug!(node = me, "joined the fleet");
            Ok(Some(m))
        }
        Err(e) => {
            tracing::warn!(error = %e, "fleet index unavailable: fetching from the origin");
            Ok(None)
        }
    }
}

/// This host's name, for a transient node id.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// The format policy, zstd and qemu-img settings from the fetch flags.
fn image_options(args: &FetchArgs) -> Result<ImageOptions> {
    let mut images = ImageOptions {
        zstd: !args.no_zstd,
        convert: ConvertOptions {
            qemu_img: args.qemu_img.clone(),
            ..ConvertOptions::default()
        },
        ..ImageOptions::default()
    };
    if let Some(policy) = args.formats.policy()? {
        images.policy = policy;
    }
    Ok(images)
}

/// Resolves on SIGINT or SIGTERM, naming it.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

#[derive(Serialize)]
struct CleanedUp {
    cache: String,
    evicted: Vec<(String, u64)>,
    bytes_freed: u64,
    skipped_in_use: Vec<String>,
    leftovers: Vec<String>,
    size_after: u64,
    still_needed: u64,
}

pub fn cleanup(ctx: &Ctx, name: Option<&str>, amount: Option<u64>) -> Result<()> {
    let reg = registry(ctx)?;
    let specs: Vec<&CacheSpec> = match name {
        Some(n) => vec![pick(&reg, Some(n))?],
        None => reg.caches().iter().collect(),
    };
    let mut out = Vec::new();
    for spec in specs {
        let r = spec.clean_up(amount)?;
        out.push(CleanedUp {
            cache: spec.name.clone(),
            evicted: r.evicted.evicted,
            bytes_freed: r.evicted.bytes_freed,
            skipped_in_use: r.evicted.skipped_in_use,
            leftovers: r.leftovers,
            size_after: r.evicted.size_after,
            still_needed: r.evicted.still_needed,
        });
    }
    if ctx.json {
        return output::json(&out);
    }
    let mut text = String::new();
    for c in &out {
        for (k, size) in &c.evicted {
            text += &format!("{}: evicted {k} ({})\n", c.cache, format_size(*size));
        }
        for k in &c.skipped_in_use {
            text += &format!("{}: kept {k}: in use (open or hard-linked)\n", c.cache);
        }
        for k in &c.leftovers {
            text += &format!("{}: removed leftover {k}\n", c.cache);
        }
        text += &format!(
            "{}: {} evicted, {} freed, now {}{}\n",
            c.cache,
            output::count(c.evicted.len(), "image", "images"),
            format_size(c.bytes_freed),
            format_size(c.size_after),
            if c.still_needed > 0 {
                format!(
                    ", {} of the amount could not be reclaimed",
                    format_size(c.still_needed)
                )
            } else {
                String::new()
            }
        );
    }
    output::text(text)
}

#[derive(Serialize)]
struct CacheRow {
    name: String,
    dir: String,
    driver: String,
    priority: u32,
    max_size: u64,
    ttl_seconds: u64,
    size: u64,
    entries: usize,
    free: u64,
}

pub fn caches(ctx: &Ctx) -> Result<()> {
    let reg = registry(ctx)?;
    let mut rows = Vec::new();
    for c in reg.caches() {
        rows.push(CacheRow {
            name: c.name.clone(),
            dir: c.cache.root().display().to_string(),
            driver: c.cache.driver_kind().to_string(),
            priority: c.priority,
            max_size: c.max_size,
            ttl_seconds: c.ttl.as_secs(),
            size: c.cache.get_cache_size()?,
            entries: c.cache.get_cached_images()?.len(),
            free: free_space(c.cache.root())?,
        });
    }
    if ctx.json {
        return output::json(&rows);
    }
    let mut t = comfy_table::Table::new();
    t.load_style(comfy_table::presets::UTF8_FULL_CONDENSED.with_rounded_corners());
    t.set_header([
        "Name", "Priority", "Dir", "Driver", "Size", "Max", "TTL", "Images", "Free",
    ]);
    for r in &rows {
        t.add_row([
            r.name.clone(),
            r.priority.to_string(),
            r.dir.clone(),
            r.driver.clone(),
            format_size(r.size),
            format_size(r.max_size),
            format_duration(std::time::Duration::from_secs(r.ttl_seconds)),
            r.entries.to_string(),
            format_size(r.free),
        ]);
    }
    output::text(format!("{t}\n"))
}
