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
    config.shutdown_grace = args.shutdown_grace;
    config.header_read_timeout = args.header_read_timeout;
    config.auth_cache_ttl = args.auth_cache_ttl;
    config.tls_cert = args.tls_cert;
    config.tls_key = args.tls_key;
    if let Some(policy) = args.formats.policy()? {
        config.permitted_formats = policy.permitted;
    }

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
