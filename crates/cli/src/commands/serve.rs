//! `imgcache serve`: the caching image server, until SIGTERM or SIGINT. Under systemd
//! (`Type=notify`, see packaging/systemd/imgcache.service) it reports readiness and stopping
//! through `NOTIFY_SOCKET`.

use anyhow::{Context, Result};
use imgcache_server::ServerConfig;

use super::Ctx;
use crate::cli::ServeArgs;

pub fn serve(ctx: &Ctx, args: ServeArgs) -> Result<()> {
    let s = &ctx.settings;
    let mut config = ServerConfig::new(&s.cache_dir);
    config.listen = s.listen.clone();
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
        // TLS files, the cache, the socket (a host name resolved) and the fleet: all of it
        // before anything says "serving".
        let server = imgcache_server::Server::bind(config).await?;
        let stop = signal()?;
        let addr = server.local_addr()?;
        let scheme = if server.is_tls() { "https" } else { "http" };
        // One line on stdout, for scripts and tests that asked for port 0.
        println!("imgcache: serving on {scheme}://{addr}");
        notify(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&format!("serving on {scheme}://{addr}")),
        ]);
        let t0 = std::time::Instant::now();
        let res = server
            .serve(async {
                stop.await;
                notify(&[sd_notify::NotifyState::Stopping]);
            })
            .await;
        // The last line: how it ended, so a log reader knows the stop was clean (or not).
        let uptime_s = t0.elapsed().as_secs();
        match &res {
            Ok(()) => tracing::info!(uptime_s, "stopped"),
            Err(e) => tracing::error!(uptime_s, error = %e, "stopped on an error"),
        }
        res
    })
}

/// Tells systemd (`Type=notify`) how the service is doing: `READY=1` once it serves,
/// `STOPPING=1` when it begins to stop. Nothing when `NOTIFY_SOCKET` is unset (not run by
/// systemd); a failure to send is logged, never fatal.
fn notify(states: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "sd_notify: cannot reach NOTIFY_SOCKET");
    }
}

/// A future that resolves on the first SIGTERM or SIGINT. The handlers are installed here,
/// before "serving" is announced, so a signal sent the moment the service is ready (systemd
/// stopping a unit it just started) is a clean shutdown, not the default action's kill.
fn signal() -> Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("watching SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("watching SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
    })
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
