//! The `imgcache` command line. Wiring only: parse, configure, run one command, report errors
//! as one line on stderr.

mod cli;
mod commands;
mod config;
mod error;
mod output;
#[cfg(test)]
mod packaging;
mod progress;
mod settings;

use std::process::ExitCode;

use anyhow::Result;

use crate::cli::Cli;
use crate::commands::Ctx;
use crate::config::{Host, Layer, Settings};

fn main() -> ExitCode {
    tune_malloc();
    error::install_panic_hook();
    // Usage errors: clap prints them and exits with 2; --help and --version exit 0.
    let cli = cli::parse();
    init_tracing(&cli);
    let json = error_as_json(&cli);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if error::is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            let code = match e.downcast_ref::<error::Exit>() {
                Some(error::Exit(code)) => *code,
                None => 1,
            };
            error::report(&e, code, json);
            ExitCode::from(code)
        }
    }
}

/// Under `--json` (or `serve --log-format json`), the final error is a JSON object too.
fn error_as_json(cli: &Cli) -> bool {
    cli.global.json
        || matches!(&cli.command, cli::Command::Serve(a) if matches!(a.log_format, cli::LogFormat::Json))
}

fn run(cli: Cli) -> Result<()> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    let config_file = cli
        .global
        .config
        .clone()
        .or_else(|| var(config::ENV_CONFIG).map(Into::into));
    let file = match &config_file {
        Some(path) => Layer::from_file(path)?,
        None => Layer::default(),
    };
    let env = Layer::from_env(|name| var(name).map(|v| v.to_string_lossy().into_owned()))?;
    let settings = Settings::resolve(file, env, cli.flag_layer(), &Host::current())?;
    tracing::debug!(?settings, "configuration");
    let ctx = Ctx {
        settings,
        json: cli.global.json,
    };
    commands::run(&ctx, cli.command)
}

/// Logs go to stderr, filtered by `IMGCACHE_LOG` (tracing's env-filter syntax), warnings by
/// default. The store's per-file warnings during `clean` are left out by default: `clean`
/// reports those files itself (and likewise the admission's refusals: the error line says it). `serve` logs at info by default, with timestamps, as text or
/// (`--log-format json`) one JSON object per line.
fn init_tracing(cli: &Cli) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    // Colour only for a person at a terminal: a file, a pipe or journald gets plain text.
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    if let cli::Command::Serve(args) = &cli.command {
        let filter =
            EnvFilter::try_from_env("IMGCACHE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
        let b = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(ansi)
            .with_writer(std::io::stderr);
        let _ = match args.log_format {
            cli::LogFormat::Json => b.json().try_init(),
            cli::LogFormat::Text => b.try_init(),
        };
        return;
    }
    // The admission's "download refused/failed" warnings are left out too: the command's
    // own error line says the same.
    let filter = EnvFilter::try_from_env("IMGCACHE_LOG").unwrap_or_else(|_| {
        EnvFilter::new("warn,imgcache_store::policy=error,imgcache_fetch::admit=error")
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .without_time()
        .with_target(false)
        .try_init();
}

/// glibc's malloc, tuned for streaming images. A download's chunks (~400 KiB each, a bounded
/// number in flight between the network, the writer and the hasher) are freed on other
/// threads than the ones that allocated them; with glibc's defaults each freed arena top above
/// its dynamic trim threshold (about 2 chunks) went back to the kernel and was faulted in and
/// zeroed again for the next chunk: about 12% of a cold miss's time (bench/serve.sh). A fixed
/// mmap threshold keeps chunks on the heaps, and a trim threshold above that bounded working
/// set keeps it mapped; peaks above it are still returned. mimalloc was as fast but held twice
/// the memory (55 MiB against 28 MiB peak RSS for one client's 1 GiB miss).
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it runs before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
}
