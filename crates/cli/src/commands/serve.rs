//! `imgcache serve`: the caching image server, until SIGTERM or SIGINT.

use anyhow::{Context, Result};
use imgcache_server::ServerConfig;

use super::Ctx;
use crate::cli::ServeArgs;

pub fn serve(ctx: &Ctx, args: ServeArgs) -> Result<()> {
    let s = &ctx.settings;
    let mut config = ServerConfig::new(&s.cache_dir);
    config.listen = s.listen;
    config.driver = s.driver;
    config.max_size = s.max_size;
    config.stall_time = s.stall_time;
    config.sources = ctx.sources(crate::config::default_revalidate_interval("serve"))?;
    config.admin_token = s.admin_token.clone();
    config.allow_href_prefixes = s.allow_href_prefixes.clone();
    config.scrub_interval = s.scrub_interval;
    config.access_log = s.access_log;
    config.shutdown_grace = args.shutdown_grace;
    config.header_read_timeout = args.header_read_timeout;
    config.auth_cache_ttl = args.auth_cache_ttl;
    config.tls_cert = args.tls_cert;
    config.tls_key = args.tls_key;
    if let Some(policy) = args.formats.policy()? {
        config.permitted_formats = policy.permitted;
    }
    if let Some(db) = &s.fleet_db {
        let Some(token) = s.fleet_token.clone().filter(|t| !t.is_empty()) else {
            anyhow::bail!("fleet mode (fleet_db) needs a fleet_token, the secret peers present");
        };
        let node_url = s
            .node_url
            .clone()
            .unwrap_or_else(|| format!("http://{}", s.listen));
        let mut index = imgcache_fleet::FleetConfig::new(db.clone(), node_url);
        index.heartbeat_timeout = s.heartbeat_timeout;
        config.fleet = Some(imgcache_server::fleet_node::FleetSettings {
            index,
            token,
            peer_fanout: 4,
        });
    }

    startup_check(ctx)?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("listen on {}", config.listen))?;
        let addr = listener.local_addr()?;
        let scheme = if config.tls_cert.is_some() {
            "https"
        } else {
            "http"
        };
        // One line on stdout, for scripts and tests that asked for port 0.
        println!("imgcache: serving on {scheme}://{addr}");
        imgcache_server::run_on(listener, config, signal()).await
    })
}

/// Resolves on the first SIGTERM or SIGINT.
async fn signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGTERM");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
    }
}

/// The quick, read-only part of `fsck` (no hashing, nothing changed), logged: one line per
/// kind of problem, as a warning, and the server starts anyway. A directory whose records are
/// gone is refused here, before anything listens.
fn startup_check(ctx: &Ctx) -> Result<()> {
    let cache = ctx.open()?;
    let r = cache.fsck(&imgcache_store::FsckOptions {
        quick: true,
        stall_time: ctx.settings.stall_time,
        ..imgcache_store::FsckOptions::default()
    })?;
    let names = |v: Vec<String>| -> String {
        const SHOWN: usize = 10;
        let more = v.len().saturating_sub(SHOWN);
        let mut s = v.into_iter().take(SHOWN).collect::<Vec<_>>().join(", ");
        if more > 0 {
            s += &format!(" and {more} more");
        }
        s
    };
    let kinds = [
        ("records without files", r.records_without_files.clone()),
        (
            "files without records (left alone, not served)",
            r.files_without_records
                .iter()
                .map(|o| o.image_id.clone())
                .collect(),
        ),
        (
            "stale incomplete writes",
            r.stale_incomplete
                .iter()
                .map(|k| format!("incomplete/{k}"))
                .collect(),
        ),
        (
            "unused lock files",
            r.stale_locks
                .iter()
                .map(|k| format!("locks/{k}.lock"))
                .collect(),
        ),
    ];
    tracing::info!(
        images = r.images,
        driver = r.driver,
        "startup check: {} with a record",
        crate::output::count(r.images, "image", "images")
    );
    for (what, keys) in kinds {
        if !keys.is_empty() {
            let n = keys.len();
            tracing::warn!(
                count = n,
                "startup check: {n} {what}: {}; `imgcache fsck --repair` repairs them",
                names(keys)
            );
        }
    }
    if r.problems() == 0 {
        tracing::info!("startup check: clean");
    }
    Ok(())
}
