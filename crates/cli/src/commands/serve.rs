//! `imgcache serve`: the caching image server, until SIGTERM or SIGINT. Under systemd
//! (`Type=notify`, see packaging/systemd/imgcache.service) it reports readiness and stopping
//! through `NOTIFY_SOCKET`.

use anyhow::{Context, Result};
use imgcache_server::ServerConfig;

use super::Ctx;
use crate::cli::ServeArgs;

pub fn serve(ctx: &Ctx, args: ServeArgs) -> Result<()> {
    let config = server_config(ctx, args)?;
    startup_check(ctx)?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Blocking calls are short (record lookups behind one SQLite connection, preads of
        // uncached pages); long work has threads of its own (download writers, hashers).
        // Tokio's default of 512 let 200 connections grow the pool to ~230 idle-then-busy
        // threads (each with its stack and malloc arena) for no throughput.
        .max_blocking_threads(imgcache_server::MAX_BLOCKING_THREADS)
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

/// The server's configuration from the resolved settings and `serve`'s own flags (TLS files,
/// formats). Everything the settings table has comes from `ctx.settings`; what they leave
/// unset is [`ServerConfig::new`]'s, which is the table's too.
fn server_config(ctx: &Ctx, args: ServeArgs) -> Result<ServerConfig> {
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
    config.prune_interval = s.prune_interval;
    config.clean_interval = s.clean_interval;
    config.shutdown_grace = s.shutdown_grace;
    config.header_read_timeout = s.header_read_timeout;
    config.auth_cache_ttl = s.auth_cache_ttl;
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
        let mut fleet = imgcache_server::fleet_node::FleetSettings::new(
            imgcache_fleet::FleetConfig::new(db.clone(), node_url),
            token,
        );
        fleet.index.heartbeat_timeout = s.heartbeat_timeout;
        fleet.peer_fanout = usize::try_from(s.peer_fanout).context("peer_fanout")?;
        config.fleet = Some(fleet);
    }
    Ok(config)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Host, Layer, Settings};
    use clap::Parser;

    fn args(extra: &[&str]) -> ServeArgs {
        let argv = ["imgcache", "serve"].iter().chain(extra).copied();
        match crate::cli::Cli::try_parse_from(argv).unwrap().command {
            crate::cli::Command::Serve(a) => a,
            _ => unreachable!(),
        }
    }

    /// `ServerConfig::new` and `Settings::resolve` with nothing configured agree on every
    /// field they share: both take their defaults from the settings table, so an unconfigured
    /// `imgcache serve` runs with what the server crate documents as its defaults.
    #[test]
    fn server_defaults_are_the_resolved_defaults() {
        let host = Host {
            is_root: true,
            xdg_cache_home: None,
            home: None,
        };
        let resolve = |file: Layer| {
            Settings::resolve(file, Layer::default(), Layer::default(), &host).unwrap()
        };
        let settings = resolve(Layer::default());
        let ctx = Ctx {
            settings: settings.clone(),
            json: false,
        };
        let ours = server_config(&ctx, args(&[])).unwrap();
        let new = ServerConfig::new(&settings.cache_dir);
        assert_eq!(ours.listen, new.listen);
        assert_eq!(ours.cache_dir, new.cache_dir);
        assert_eq!(ours.driver, new.driver);
        assert_eq!(ours.max_size, new.max_size);
        assert_eq!(ours.stall_time, new.stall_time);
        assert_eq!(ours.admin_token, new.admin_token);
        assert_eq!(ours.allow_href_prefixes, new.allow_href_prefixes);
        assert_eq!(ours.auth_cache_ttl, new.auth_cache_ttl);
        assert_eq!(ours.prune_interval, new.prune_interval);
        assert_eq!(ours.clean_interval, new.clean_interval);
        assert_eq!(ours.scrub_interval, new.scrub_interval);
        assert_eq!(ours.shutdown_grace, new.shutdown_grace);
        assert_eq!(ours.header_read_timeout, new.header_read_timeout);
        assert_eq!(ours.access_log, new.access_log);
        assert_eq!(ours.permitted_formats, new.permitted_formats);
        assert!(ours.fleet.is_none() && new.fleet.is_none());
        let (a, b) = (&ours.sources, &new.sources);
        assert_eq!(a.revalidate_interval, b.revalidate_interval);
        assert_eq!(a.allowed_file_dirs, b.allowed_file_dirs);
        assert_eq!(a.glance_url, b.glance_url);
        assert_eq!(a.glance_token, b.glance_token);
        assert_eq!(a.http.attempt_timeout, b.http.attempt_timeout);
        assert_eq!(a.http.retries, b.http.retries);
        assert_eq!(a.http.retry_budget, b.http.retry_budget);
        assert_eq!(a.http.insecure, b.http.insecure);
        assert_eq!(a.http.ca_bundle, b.http.ca_bundle);

        // Fleet mode: the fleet crate's and the server's fleet defaults are the table's too.
        let settings = resolve(
            Layer::from_toml("fleet_db = \"postgresql://db/x\"\nfleet_token = \"t\"").unwrap(),
        );
        let ctx = Ctx {
            settings,
            json: false,
        };
        let ours = server_config(&ctx, args(&[])).unwrap().fleet.unwrap();
        let new = imgcache_server::fleet_node::FleetSettings::new(
            imgcache_fleet::FleetConfig::new("postgresql://db/x", "http://127.0.0.1:9292"),
            "t",
        );
        assert_eq!(ours.index.db_url, new.index.db_url);
        assert_eq!(ours.index.node_url, new.index.node_url);
        assert_eq!(ours.index.heartbeat_timeout, new.index.heartbeat_timeout);
        assert_eq!(ours.index.lease_ttl, new.index.lease_ttl);
        assert_eq!(ours.index.call_timeout, new.index.call_timeout);
        assert_eq!(ours.token, new.token);
        assert_eq!(ours.peer_fanout, new.peer_fanout);
    }

    /// What the settings say reaches the server's configuration.
    #[test]
    fn settings_reach_the_server_config() {
        let host = Host {
            is_root: true,
            xdg_cache_home: None,
            home: None,
        };
        let file = Layer::from_toml(
            "fleet_db = \"postgresql://db/x\"\nfleet_token = \"t\"\npeer_fanout = 2\n\
             prune_interval = \"5m\"\nclean_interval = \"1h\"\nauth_cache_ttl = \"0s\"",
        )
        .unwrap();
        let cli = crate::cli::Cli::try_parse_from([
            "imgcache",
            "serve",
            "--shutdown-grace",
            "1s",
            "--header-read-timeout",
            "2s",
        ])
        .unwrap();
        let settings = Settings::resolve(file, Layer::default(), cli.flag_layer(), &host).unwrap();
        let crate::cli::Command::Serve(a) = cli.command else {
            unreachable!()
        };
        let ctx = Ctx {
            settings,
            json: false,
        };
        let c = server_config(&ctx, a).unwrap();
        assert_eq!(c.fleet.unwrap().peer_fanout, 2);
        assert_eq!(c.prune_interval, std::time::Duration::from_secs(300));
        assert_eq!(c.clean_interval, std::time::Duration::from_secs(3600));
        assert_eq!(c.auth_cache_ttl, std::time::Duration::ZERO);
        assert_eq!(c.shutdown_grace, std::time::Duration::from_secs(1));
        assert_eq!(c.header_read_timeout, std::time::Duration::from_secs(2));
    }
}
