//! One module per command group. Each command opens the cache, does one thing, and prints a
//! text or JSON result; errors bubble up to `main` as `anyhow::Error`.

mod add;
mod fleet;
mod inspect;
mod inspect_image;
mod maintain;
mod manage;
mod provision;
mod serve;
mod verify;

use std::time::Duration;

use anyhow::{Context, Result};
use imgcache_store::{Cache, Key};

use crate::cli::Command;
use crate::config::Settings;

/// What every command gets.
pub struct Ctx {
    pub settings: Settings,
    pub json: bool,
}

impl Ctx {
    /// How the sources are reached (fetch and serve share it); `revalidate_default` is the
    /// command's revalidation interval when none is configured.
    pub fn sources(&self, revalidate_default: Duration) -> Result<imgcache_fetch::SourceConfig> {
        let s = &self.settings;
        let glance_url = s
            .glance_url
            .as_deref()
            .map(url::Url::parse)
            .transpose()
            .context("glance url")?;
        Ok(imgcache_fetch::SourceConfig {
            http: imgcache_fetch::HttpOptions {
                ca_bundle: s.ca_bundle.clone(),
                insecure: s.insecure,
                attempt_timeout: s.origin_attempt_timeout,
                retries: s.origin_retries,
                retry_budget: s.origin_retry_budget,
                ..imgcache_fetch::HttpOptions::default()
            },
            allowed_file_dirs: s.allow_file_dirs.clone(),
            glance_url,
            glance_token: s.glance_token.clone(),
            revalidate_interval: s.revalidate_interval.unwrap_or(revalidate_default),
            // `fetch` has no prefix list; `serve` builds one from `allow_href_prefixes`.
            allow: None,
        })
    }

    /// Opens the cache directory with the configured driver (the seed's `configure`).
    pub fn open(&self) -> Result<Cache> {
        Ok(Cache::open(&self.settings.cache_dir, self.settings.driver)?)
    }
}

/// Validates a key from the command line before any path is built from it.
pub fn parse_key(raw: &str) -> Result<Key> {
    Key::new(raw).with_context(|| format!("{raw:?}"))
}

pub fn run(ctx: &Ctx, command: Command) -> Result<()> {
    match command {
        Command::List { queued } => inspect::list(ctx, queued),
        Command::Stats => inspect::stats(ctx),
        Command::Add(args) => add::add(ctx, args),
        Command::Inspect { file, format } => inspect_image::inspect(ctx, &file, format.as_deref()),
        Command::Queue { key } => manage::queue(ctx, &key),
        Command::Delete { key } => manage::delete(ctx, &key),
        Command::Clear { target } => manage::clear(ctx, target),
        Command::Prune { .. } => maintain::prune(ctx),
        Command::Clean { .. } => maintain::clean(ctx),
        Command::Fsck(args) => maintain::fsck(ctx, &args),
        Command::Fetch(args) => provision::fetch(ctx, args),
        Command::Cleanup { cache, amount } => provision::cleanup(ctx, cache.as_deref(), amount),
        Command::Caches => provision::caches(ctx),
        Command::Verify { keys, quiet } => verify::verify(ctx, &keys, quiet),
        Command::Fleet(args) => fleet::fleet(ctx, args.what),
        Command::Serve(args) => serve::serve(ctx, args),
    }
}
