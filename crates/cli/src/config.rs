//! Configuration: a TOML file, overridden by `IMGCACHE_*` environment variables, overridden by
//! command-line flags. Each source is a [`Layer`] of optional values; [`Settings::resolve`]
//! stacks them over the defaults.
//!
//! Which settings there are, their variables and defaults are [`imgcache_settings::SETTINGS`];
//! values are read by that crate's parsers: sizes are human sizes with binary units (`10G` =
//! 10 GiB, see [`parse_size`]); durations are humantime durations (`24h`, `7d`, `90s`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use imgcache_store::DriverKind;
use serde::Deserialize;

pub use crate::settings::ENV_CONFIG;
use crate::settings::setting;
use imgcache_settings::{
    KIB, default_bool, default_count, default_duration, default_size, default_string,
    nonzero_count, parse_bool, parse_count, parse_duration, parse_interval, parse_listen,
    parse_nonzero_count, parse_size,
};

/// Within this time of its last validation an http(s) master is used without asking the
/// origin; `cmd`'s default (`imgcache fetch` asks on every call, as Ironic's `fetch_image`
/// does; `imgcache serve` serves hits and checks them in the background at most every 60 s).
pub fn default_revalidate_interval(cmd: &str) -> Duration {
    imgcache_settings::default_duration_for("revalidate_interval", cmd)
}

/// Cache directory when running as root.
pub fn root_cache_dir() -> PathBuf {
    PathBuf::from(default_string("cache_dir"))
}

/// A `[caches.NAME]` table: one named provisioning cache (Ironic's master dirs).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheTable {
    pub dir: PathBuf,
    pub max_size: Option<SizeValue>,
    pub ttl: Option<String>,
    pub priority: Option<u32>,
    pub driver: Option<String>,
}

/// A named cache as resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedCache {
    pub name: String,
    pub dir: PathBuf,
    pub max_size: u64,
    pub ttl: Duration,
    pub priority: u32,
    pub driver: DriverKind,
}

/// `max_size = 1073741824` and `max_size = "1G"` both work.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum SizeValue {
    Bytes(u64),
    Human(String),
}

impl SizeValue {
    fn bytes(&self) -> Result<u64> {
        match self {
            SizeValue::Bytes(b) => Ok(*b),
            SizeValue::Human(s) => Ok(parse_size(s)?),
        }
    }
}

/// One source of configuration; `None` means "this source does not say".
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Layer {
    pub cache_dir: Option<PathBuf>,
    pub driver: Option<DriverKind>,
    pub max_size: Option<u64>,
    pub stall_time: Option<Duration>,
    pub ttl: Option<Duration>,
    pub glance_url: Option<String>,
    pub glance_token: Option<String>,
    pub allow_file_dirs: Option<Vec<PathBuf>>,
    pub revalidate_interval: Option<Duration>,
    pub ca_bundle: Option<PathBuf>,
    pub insecure: Option<bool>,
    pub origin_attempt_timeout: Option<Duration>,
    pub origin_retries: Option<u32>,
    pub origin_retry_budget: Option<Duration>,
    pub listen: Option<String>,
    pub admin_token: Option<String>,
    pub allow_href_prefixes: Option<Vec<String>>,
    pub fleet_db: Option<String>,
    pub node_url: Option<String>,
    pub fleet_token: Option<String>,
    pub heartbeat_timeout: Option<Duration>,
    pub peer_fanout: Option<u32>,
    pub scrub_interval: Option<Duration>,
    pub access_log: Option<bool>,
    pub prune_interval: Option<Duration>,
    pub clean_interval: Option<Duration>,
    pub shutdown_grace: Option<Duration>,
    pub header_read_timeout: Option<Duration>,
    pub auth_cache_ttl: Option<Duration>,
    /// `[caches.NAME]` tables (file only).
    pub caches: Option<BTreeMap<String, CacheTable>>,
}

impl Layer {
    /// `upper`'s values win where it has them.
    fn overlay(self, upper: Layer) -> Layer {
        Layer {
            cache_dir: upper.cache_dir.or(self.cache_dir),
            driver: upper.driver.or(self.driver),
            max_size: upper.max_size.or(self.max_size),
            stall_time: upper.stall_time.or(self.stall_time),
            ttl: upper.ttl.or(self.ttl),
            glance_url: upper.glance_url.or(self.glance_url),
            glance_token: upper.glance_token.or(self.glance_token),
            allow_file_dirs: upper.allow_file_dirs.or(self.allow_file_dirs),
            revalidate_interval: upper.revalidate_interval.or(self.revalidate_interval),
            ca_bundle: upper.ca_bundle.or(self.ca_bundle),
            insecure: upper.insecure.or(self.insecure),
            origin_attempt_timeout: upper.origin_attempt_timeout.or(self.origin_attempt_timeout),
            origin_retries: upper.origin_retries.or(self.origin_retries),
            origin_retry_budget: upper.origin_retry_budget.or(self.origin_retry_budget),
            listen: upper.listen.or(self.listen),
            admin_token: upper.admin_token.or(self.admin_token),
            allow_href_prefixes: upper.allow_href_prefixes.or(self.allow_href_prefixes),
            fleet_db: upper.fleet_db.or(self.fleet_db),
            node_url: upper.node_url.or(self.node_url),
            fleet_token: upper.fleet_token.or(self.fleet_token),
            heartbeat_timeout: upper.heartbeat_timeout.or(self.heartbeat_timeout),
            peer_fanout: upper.peer_fanout.or(self.peer_fanout),
            scrub_interval: upper.scrub_interval.or(self.scrub_interval),
            access_log: upper.access_log.or(self.access_log),
            prune_interval: upper.prune_interval.or(self.prune_interval),
            clean_interval: upper.clean_interval.or(self.clean_interval),
            shutdown_grace: upper.shutdown_grace.or(self.shutdown_grace),
            header_read_timeout: upper.header_read_timeout.or(self.header_read_timeout),
            auth_cache_ttl: upper.auth_cache_ttl.or(self.auth_cache_ttl),
            caches: upper.caches.or(self.caches),
        }
    }

    /// Parses a TOML configuration file's text. Unknown keys are an error naming the key.
    pub fn from_toml(text: &str) -> Result<Layer> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            cache_dir: Option<PathBuf>,
            driver: Option<String>,
            max_size: Option<SizeValue>,
            stall_time: Option<String>,
            ttl: Option<String>,
            glance_url: Option<String>,
            glance_token: Option<String>,
            allow_file_dirs: Option<Vec<PathBuf>>,
            revalidate_interval: Option<String>,
            ca_bundle: Option<PathBuf>,
            insecure: Option<bool>,
            origin_attempt_timeout: Option<String>,
            origin_retries: Option<u32>,
            origin_retry_budget: Option<String>,
            listen: Option<String>,
            admin_token: Option<String>,
            allow_href_prefixes: Option<Vec<String>>,
            fleet_db: Option<String>,
            node_url: Option<String>,
            fleet_token: Option<String>,
            heartbeat_timeout: Option<String>,
            peer_fanout: Option<u32>,
            scrub_interval: Option<String>,
            access_log: Option<bool>,
            prune_interval: Option<String>,
            clean_interval: Option<String>,
            shutdown_grace: Option<String>,
            header_read_timeout: Option<String>,
            auth_cache_ttl: Option<String>,
            caches: Option<BTreeMap<String, CacheTable>>,
        }
        let f: File = toml::from_str(text).map_err(|e| anyhow!(one_line(&e.to_string())))?;
        Ok(Layer {
            cache_dir: f.cache_dir,
            driver: f
                .driver
                .map(|d| parse_driver(&d).context("driver"))
                .transpose()?,
            max_size: f
                .max_size
                .map(|v| v.bytes())
                .transpose()
                .context("max_size")?,
            stall_time: f
                .stall_time
                .map(|s| parse_duration(&s))
                .transpose()
                .context("stall_time")?,
            ttl: f
                .ttl
                .map(|s| parse_duration(&s))
                .transpose()
                .context("ttl")?,
            glance_url: f.glance_url,
            glance_token: f.glance_token,
            allow_file_dirs: f.allow_file_dirs,
            revalidate_interval: f
                .revalidate_interval
                .map(|s| parse_duration(&s))
                .transpose()
                .context("revalidate_interval")?,
            ca_bundle: f.ca_bundle,
            insecure: f.insecure,
            origin_attempt_timeout: f
                .origin_attempt_timeout
                .map(|s| parse_duration(&s))
                .transpose()
                .context("origin_attempt_timeout")?,
            origin_retries: f.origin_retries,
            origin_retry_budget: f
                .origin_retry_budget
                .map(|s| parse_duration(&s))
                .transpose()
                .context("origin_retry_budget")?,
            listen: f
                .listen
                .map(|s| parse_listen(&s))
                .transpose()
                .context("listen")?,
            admin_token: f.admin_token,
            allow_href_prefixes: f.allow_href_prefixes,
            fleet_db: f.fleet_db,
            node_url: f.node_url,
            fleet_token: f.fleet_token,
            heartbeat_timeout: f
                .heartbeat_timeout
                .map(|s| parse_duration(&s))
                .transpose()
                .context("heartbeat_timeout")?,
            peer_fanout: f
                .peer_fanout
                .map(nonzero_count)
                .transpose()
                .context("peer_fanout")?,
            scrub_interval: f
                .scrub_interval
                .map(|s| parse_duration(&s))
                .transpose()
                .context("scrub_interval")?,
            access_log: f.access_log,
            prune_interval: f
                .prune_interval
                .map(|s| parse_interval(&s))
                .transpose()
                .context("prune_interval")?,
            clean_interval: f
                .clean_interval
                .map(|s| parse_interval(&s))
                .transpose()
                .context("clean_interval")?,
            shutdown_grace: f
                .shutdown_grace
                .map(|s| parse_duration(&s))
                .transpose()
                .context("shutdown_grace")?,
            header_read_timeout: f
                .header_read_timeout
                .map(|s| parse_interval(&s))
                .transpose()
                .context("header_read_timeout")?,
            auth_cache_ttl: f
                .auth_cache_ttl
                .map(|s| parse_duration(&s))
                .transpose()
                .context("auth_cache_ttl")?,
            caches: f.caches,
        })
    }

    /// Reads a configuration file.
    pub fn from_file(path: &Path) -> Result<Layer> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("config file {}", path.display()))?;
        Layer::from_toml(&text).with_context(|| format!("config file {}", path.display()))
    }

    /// The environment variables [`crate::settings::SETTINGS`] names, read through `get` (so
    /// tests need not touch the process env). Empty values count as unset; of a setting's
    /// variables the first one set wins. A bad value is an error naming its variable.
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Layer> {
        let get = &get;
        let string = |key: &str| env_value(get, key, |v| anyhow::Ok(v.to_owned()));
        let list = |key: &str| {
            let sep = setting(key)
                .list
                .unwrap_or_else(|| panic!("SETTINGS: {key} is not a list"));
            env_value(get, key, |v| {
                anyhow::Ok(
                    sep.split(v)
                        .into_iter()
                        .map(str::to_owned)
                        .collect::<Vec<_>>(),
                )
            })
        };
        Ok(Layer {
            cache_dir: env_value(get, "cache_dir", |v| anyhow::Ok(PathBuf::from(v)))?,
            driver: env_value(get, "driver", parse_driver)?,
            max_size: env_value(get, "max_size", parse_size)?,
            stall_time: env_value(get, "stall_time", parse_duration)?,
            ttl: env_value(get, "ttl", parse_duration)?,
            glance_url: string("glance_url")?,
            glance_token: string("glance_token")?,
            allow_file_dirs: list("allow_file_dirs")?
                .map(|v| v.into_iter().map(PathBuf::from).collect()),
            revalidate_interval: env_value(get, "revalidate_interval", parse_duration)?,
            ca_bundle: env_value(get, "ca_bundle", |v| anyhow::Ok(PathBuf::from(v)))?,
            insecure: env_value(get, "insecure", parse_bool)?,
            origin_attempt_timeout: env_value(get, "origin_attempt_timeout", parse_duration)?,
            origin_retries: env_value(get, "origin_retries", parse_count)?,
            origin_retry_budget: env_value(get, "origin_retry_budget", parse_duration)?,
            listen: env_value(get, "listen", parse_listen)?,
            admin_token: string("admin_token")?,
            allow_href_prefixes: list("allow_href_prefixes")?,
            fleet_db: string("fleet_db")?,
            node_url: string("node_url")?,
            fleet_token: string("fleet_token")?,
            heartbeat_timeout: env_value(get, "heartbeat_timeout", parse_duration)?,
            peer_fanout: env_value(get, "peer_fanout", parse_nonzero_count)?,
            scrub_interval: env_value(get, "scrub_interval", parse_duration)?,
            access_log: env_value(get, "access_log", parse_bool)?,
            prune_interval: env_value(get, "prune_interval", parse_interval)?,
            clean_interval: env_value(get, "clean_interval", parse_interval)?,
            shutdown_grace: env_value(get, "shutdown_grace", parse_duration)?,
            header_read_timeout: env_value(get, "header_read_timeout", parse_interval)?,
            auth_cache_ttl: env_value(get, "auth_cache_ttl", parse_duration)?,
            caches: None,
        })
    }
}

/// The value of the first of `key`'s variables that is set (non-empty), parsed.
fn env_value<T, E: Into<anyhow::Error>>(
    get: &dyn Fn(&str) -> Option<String>,
    key: &str,
    parse: impl Fn(&str) -> std::result::Result<T, E>,
) -> Result<Option<T>> {
    for name in setting(key).env {
        if let Some(v) = get(name).filter(|v| !v.is_empty()) {
            return parse(&v).map_err(Into::into).context(*name).map(Some);
        }
    }
    Ok(None)
}

/// What the process runs with.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub cache_dir: PathBuf,
    pub driver: DriverKind,
    pub max_size: u64,
    pub stall_time: Duration,
    /// Provisioning (fetch): masters unused for this long are cleaned up.
    pub ttl: Duration,
    pub glance_url: Option<String>,
    pub glance_token: Option<String>,
    pub allow_file_dirs: Vec<PathBuf>,
    /// `None`: each command's default (fetch: every call; serve: 60 s).
    pub revalidate_interval: Option<Duration>,
    pub ca_bundle: Option<PathBuf>,
    pub insecure: bool,
    /// One origin request's budget: connect plus response headers, retries included.
    pub origin_attempt_timeout: Duration,
    /// Retries of an origin request, and resumes of a broken body.
    pub origin_retries: u32,
    /// Total time a download may spend resuming after its body first broke.
    pub origin_retry_budget: Duration,
    /// `imgcache serve`: `HOST:PORT` to listen on (an IP, `[IPv6]` or a host name).
    pub listen: String,
    /// `imgcache serve`: the `X-Auth-Token` that grants the cache-management API.
    pub admin_token: Option<String>,
    /// `imgcache serve`: `/v1/fetch` serves only hrefs under one of these URL prefixes (see
    /// `imgcache_fetch::AllowList`).
    pub allow_href_prefixes: Vec<String>,
    /// Fleet mode (`serve`): the shared PostgreSQL index, how peers reach this node, the
    /// peers' token, and how long a silent node counts as alive.
    pub fleet_db: Option<String>,
    pub node_url: Option<String>,
    pub fleet_token: Option<String>,
    pub heartbeat_timeout: Duration,
    /// Fleet mode (`serve`): how many peers one node serves at once (at least 1).
    pub peer_fanout: u32,
    /// `imgcache serve`: how often the background verify (scrub) pass runs; `None`: never.
    pub scrub_interval: Option<Duration>,
    /// `imgcache serve`: one access-log line per request.
    pub access_log: bool,
    /// `imgcache serve`: how often the pruner and the cleaner run (more than zero).
    pub prune_interval: Duration,
    pub clean_interval: Duration,
    /// `imgcache serve`: how long in-flight responses may run after SIGTERM/SIGINT.
    pub shutdown_grace: Duration,
    /// `imgcache serve`: a client must send its request headers within this.
    pub header_read_timeout: Duration,
    /// `imgcache serve`: how long an upstream authorization answer is reused.
    pub auth_cache_ttl: Duration,
    /// Named provisioning caches, highest priority first.
    pub caches: Vec<NamedCache>,
}

/// Facts about the user the defaults depend on.
#[derive(Clone, Debug)]
pub struct Host {
    pub is_root: bool,
    pub xdg_cache_home: Option<PathBuf>,
    pub home: Option<PathBuf>,
}

impl Host {
    pub fn current() -> Host {
        let env_path = |name| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        Host {
            is_root: rustix::process::geteuid().is_root(),
            xdg_cache_home: env_path("XDG_CACHE_HOME").filter(|p| p.is_absolute()),
            home: env_path("HOME").or_else(std::env::home_dir),
        }
    }

    /// `/var/cache/imgcache` for root, else `$XDG_CACHE_HOME/imgcache` or `~/.cache/imgcache`.
    pub fn default_cache_dir(&self) -> Result<PathBuf> {
        if self.is_root {
            return Ok(root_cache_dir());
        }
        if let Some(x) = &self.xdg_cache_home {
            return Ok(x.join("imgcache"));
        }
        match &self.home {
            Some(h) => Ok(h.join(".cache").join("imgcache")),
            None => bail!(
                "no cache directory: HOME is not set; pass --cache-dir or set {}",
                crate::settings::env_of("cache_dir")
            ),
        }
    }
}

impl Settings {
    /// defaults < file < env < flags.
    pub fn resolve(file: Layer, env: Layer, flags: Layer, host: &Host) -> Result<Settings> {
        let l = file.overlay(env).overlay(flags);
        Ok(Settings {
            cache_dir: match l.cache_dir {
                Some(d) => d,
                None => host.default_cache_dir()?,
            },
            driver: match l.driver {
                Some(d) => d,
                None => parse_driver(default_string("driver"))
                    .unwrap_or_else(|e| panic!("SETTINGS: the default of driver: {e:#}")),
            },
            max_size: l.max_size.unwrap_or_else(|| default_size("max_size")),
            stall_time: l
                .stall_time
                .unwrap_or_else(|| default_duration("stall_time")),
            ttl: l.ttl.unwrap_or_else(|| default_duration("ttl")),
            glance_url: l.glance_url,
            glance_token: l.glance_token,
            allow_file_dirs: l.allow_file_dirs.unwrap_or_default(),
            revalidate_interval: l.revalidate_interval,
            ca_bundle: l.ca_bundle,
            insecure: l.insecure.unwrap_or_else(|| default_bool("insecure")),
            origin_attempt_timeout: l
                .origin_attempt_timeout
                .unwrap_or_else(|| default_duration("origin_attempt_timeout")),
            origin_retries: l
                .origin_retries
                .unwrap_or_else(|| default_count("origin_retries")),
            origin_retry_budget: l
                .origin_retry_budget
                .unwrap_or_else(|| default_duration("origin_retry_budget")),
            listen: l
                .listen
                .unwrap_or_else(|| default_string("listen").to_owned()),
            admin_token: l.admin_token,
            allow_href_prefixes: l.allow_href_prefixes.unwrap_or_default(),
            fleet_db: l.fleet_db,
            node_url: l.node_url,
            fleet_token: l.fleet_token,
            heartbeat_timeout: l
                .heartbeat_timeout
                .unwrap_or_else(|| default_duration("heartbeat_timeout")),
            peer_fanout: l
                .peer_fanout
                .unwrap_or_else(|| default_count("peer_fanout")),
            scrub_interval: l.scrub_interval.filter(|d| !d.is_zero()),
            access_log: l.access_log.unwrap_or_else(|| default_bool("access_log")),
            prune_interval: l
                .prune_interval
                .unwrap_or_else(|| default_duration("prune_interval")),
            clean_interval: l
                .clean_interval
                .unwrap_or_else(|| default_duration("clean_interval")),
            shutdown_grace: l
                .shutdown_grace
                .unwrap_or_else(|| default_duration("shutdown_grace")),
            header_read_timeout: l
                .header_read_timeout
                .unwrap_or_else(|| default_duration("header_read_timeout")),
            auth_cache_ttl: l
                .auth_cache_ttl
                .unwrap_or_else(|| default_duration("auth_cache_ttl")),
            caches: resolve_caches(l.caches.unwrap_or_default())?,
        })
    }
}

/// Named caches from `[caches.NAME]` tables, with Ironic's defaults (20 GiB, 7 days,
/// priority 50), highest priority first.
fn resolve_caches(tables: BTreeMap<String, CacheTable>) -> Result<Vec<NamedCache>> {
    let mut out = Vec::new();
    for (name, t) in tables {
        let ctx = || format!("caches.{name}");
        out.push(NamedCache {
            dir: t.dir.clone(),
            max_size: t
                .max_size
                .as_ref()
                .map(SizeValue::bytes)
                .transpose()
                .with_context(|| format!("{}.max_size", ctx()))?
                .unwrap_or(imgcache_store::registry::DEFAULT_MAX_SIZE),
            ttl: t
                .ttl
                .as_deref()
                .map(parse_duration)
                .transpose()
                .with_context(|| format!("{}.ttl", ctx()))?
                .unwrap_or(imgcache_store::registry::DEFAULT_TTL),
            priority: t
                .priority
                .unwrap_or(imgcache_store::registry::PRIORITY_INSTANCE),
            driver: t
                .driver
                .as_deref()
                .map(parse_driver)
                .transpose()
                .with_context(|| format!("{}.driver", ctx()))?
                .unwrap_or_default(),
            name,
        });
    }
    out.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.name.cmp(&b.name)));
    Ok(out)
}

fn parse_driver(s: &str) -> Result<DriverKind> {
    s.parse::<DriverKind>().map_err(|e| anyhow!(e))
}

/// Formats bytes for people: `64.0 MiB`, `512 B`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < KIB {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    format!("{v:.1} {}", UNITS[i])
}

/// A duration for people, in the unit it was most likely given in: `24h`, `7d`, `90s`.
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    if d.subsec_nanos() != 0 || s == 0 {
        return humantime::format_duration(d).to_string();
    }
    match s {
        s if s % 86_400 == 0 && s / 86_400 != 1 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// Bytes for people with the exact count when it is not obvious: `64.0 MiB (67108864 bytes)`.
pub fn format_size_exact(bytes: u64) -> String {
    if bytes < KIB {
        format_size(bytes)
    } else {
        format!("{} ({bytes} bytes)", format_size(bytes))
    }
}

/// toml's errors span several lines (a source excerpt with a caret); keep the message only.
fn one_line(msg: &str) -> String {
    let lines: Vec<&str> = msg.lines().map(str::trim).collect();
    // toml: "TOML parse error at line 2, column 1\n  |\n2 | foo = 1\n  | ^^^\nunknown field `foo`, ..."
    let position = lines.first().copied().unwrap_or_default();
    let detail = lines
        .iter()
        .rev()
        .find(|l| !l.is_empty() && !l.contains('|'))
        .copied()
        .unwrap_or_default();
    if detail.is_empty() || detail == position {
        position.to_string()
    } else {
        format!(
            "{}: {detail}",
            position.trim_start_matches("TOML parse error at ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::env_of;
    use imgcache_settings::{GIB, MIB};

    const ENV_CACHE_DIR: &str = env_of("cache_dir");
    const ENV_DRIVER: &str = env_of("driver");
    const ENV_MAX_SIZE: &str = env_of("max_size");
    const ENV_STALL_TIME: &str = env_of("stall_time");
    const ENV_ALLOW_FILE_DIRS: &str = env_of("allow_file_dirs");
    const ENV_ALLOW_HREF_PREFIXES: &str = env_of("allow_href_prefixes");
    const ENV_INSECURE: &str = env_of("insecure");
    const ENV_GLANCE_TOKEN: &str = env_of("glance_token");
    const ENV_OS_AUTH_TOKEN: &str = setting("glance_token").env[1];

    fn host() -> Host {
        Host {
            is_root: false,
            xdg_cache_home: None,
            home: Some("/home/u".into()),
        }
    }

    #[test]
    fn formats_durations() {
        assert_eq!(format_duration(Duration::from_secs(86_400)), "24h");
        assert_eq!(format_duration(Duration::from_secs(7 * 86_400)), "7d");
        assert_eq!(format_duration(Duration::from_secs(90)), "90s");
        assert_eq!(format_duration(Duration::from_secs(1800)), "30m");
        assert_eq!(format_duration(Duration::ZERO), "0s");
    }

    #[test]
    fn formats_sizes() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(1023), "1023 B");
        assert_eq!(format_size(64 * MIB), "64.0 MiB");
        assert_eq!(format_size(10 * GIB), "10.0 GiB");
    }

    #[test]
    fn toml_file() {
        let l = Layer::from_toml(
            r#"
            cache_dir = "/srv/cache"
            driver = "xattr"
            max_size = "20G"
            stall_time = "7d"
            "#,
        )
        .unwrap();
        assert_eq!(
            l,
            Layer {
                cache_dir: Some("/srv/cache".into()),
                driver: Some(DriverKind::Xattr),
                max_size: Some(20 * GIB),
                stall_time: Some(Duration::from_secs(7 * 86400)),
                ..Layer::default()
            }
        );
        assert_eq!(
            Layer::from_toml("max_size = 4096").unwrap().max_size,
            Some(4096)
        );
        assert_eq!(Layer::from_toml("").unwrap(), Layer::default());
    }

    #[test]
    fn provisioning_keys_and_named_caches() {
        let l = Layer::from_toml(
            r#"
            ttl = "3d"
            glance_url = "http://glance:9292"
            allow_file_dirs = ["/srv/images"]
            revalidate_interval = "5m"
            [caches.iso]
            dir = "/var/lib/ironic/iso"
            priority = 75
            [caches.instance]
            dir = "/var/lib/ironic/master"
            max_size = "40G"
            ttl = "1d"
            "#,
        )
        .unwrap();
        let s = Settings::resolve(l, Layer::default(), Layer::default(), &host()).unwrap();
        assert_eq!(s.ttl, Duration::from_secs(3 * 86400));
        assert_eq!(s.glance_url.as_deref(), Some("http://glance:9292"));
        assert_eq!(s.allow_file_dirs, vec![PathBuf::from("/srv/images")]);
        assert_eq!(s.revalidate_interval, Some(Duration::from_secs(300)));
        let names: Vec<_> = s.caches.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["iso", "instance"], "highest priority first");
        assert_eq!(s.caches[0].max_size, 20 * GIB, "Ironic's default size");
        assert_eq!(s.caches[0].ttl, Duration::from_secs(7 * 86400));
        assert_eq!(s.caches[1].max_size, 40 * GIB);
        assert_eq!(s.caches[1].priority, 50);
        let e = format!(
            "{:#}",
            Layer::from_toml("[caches.x]\ndir = \"/x\"\nttl = \"soon\"")
                .and_then(|l| Settings::resolve(l, Layer::default(), Layer::default(), &host()))
                .unwrap_err()
        );
        assert!(e.starts_with("caches.x.ttl: invalid duration"), "{e}");
        let e = format!(
            "{:#}",
            Layer::from_toml("[caches.x]\ndri = \"/x\"").unwrap_err()
        );
        assert!(e.contains("dri"), "{e}");
        let env = Layer::from_env(|k| match k {
            ENV_ALLOW_FILE_DIRS => Some("/a:/b".into()),
            ENV_OS_AUTH_TOKEN => Some("tok".into()),
            ENV_INSECURE => Some("yes".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(env.allow_file_dirs, Some(vec!["/a".into(), "/b".into()]));
        assert_eq!(env.glance_token.as_deref(), Some("tok"));
        assert_eq!(env.insecure, Some(true));
    }

    #[test]
    fn toml_errors_name_the_key() {
        let e = format!(
            "{:#}",
            Layer::from_toml("cache_dir = \"/x\"\nmax_sise = \"1G\"\n").unwrap_err()
        );
        assert!(e.contains("max_sise"), "{e}");
        assert!(!e.contains('\n'), "{e}");
        let e = format!("{:#}", Layer::from_toml("max_size = \"10Q\"").unwrap_err());
        assert!(e.starts_with("max_size: invalid size \"10Q\""), "{e}");
        let e = format!(
            "{:#}",
            Layer::from_toml("driver = \"postgres\"").unwrap_err()
        );
        assert!(e.starts_with("driver: unknown driver"), "{e}");
        let e = format!(
            "{:#}",
            Layer::from_toml("stall_time = \"later\"").unwrap_err()
        );
        assert!(e.starts_with("stall_time: invalid duration"), "{e}");
        let e = format!("{:#}", Layer::from_toml("cache_dir = ").unwrap_err());
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn env_layer() {
        let env = |k: &str| match k {
            ENV_CACHE_DIR => Some("/env/cache".to_string()),
            ENV_DRIVER => Some("xattr".to_string()),
            ENV_MAX_SIZE => Some("1G".to_string()),
            ENV_STALL_TIME => Some("".to_string()),
            _ => None,
        };
        let l = Layer::from_env(env).unwrap();
        assert_eq!(l.cache_dir, Some("/env/cache".into()));
        assert_eq!(l.driver, Some(DriverKind::Xattr));
        assert_eq!(l.max_size, Some(GIB));
        assert_eq!(l.stall_time, None, "empty counts as unset");
        let e = format!(
            "{:#}",
            Layer::from_env(|k| (k == ENV_MAX_SIZE).then(|| "lots".into())).unwrap_err()
        );
        assert!(e.starts_with("IMGCACHE_MAX_SIZE: invalid size"), "{e}");
        let l = Layer::from_env(|k| match k {
            ENV_GLANCE_TOKEN => Some("mine".into()),
            ENV_OS_AUTH_TOKEN => Some("keystone's".into()),
            ENV_ALLOW_HREF_PREFIXES => Some(" http://a/ \n https://b/x ".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(
            l.glance_token.as_deref(),
            Some("mine"),
            "the primary variable wins"
        );
        assert_eq!(
            l.allow_href_prefixes,
            Some(vec!["http://a/".into(), "https://b/x".into()])
        );
    }

    #[test]
    fn defaults_come_from_the_settings_table() {
        assert_eq!(default_revalidate_interval("fetch"), Duration::ZERO);
        assert_eq!(
            default_revalidate_interval("serve"),
            Duration::from_secs(60)
        );
        assert_eq!(root_cache_dir(), PathBuf::from("/var/cache/imgcache"));
        // Every other default value in the table parses (Settings::resolve uses them).
        let s = Settings::resolve(
            Layer::default(),
            Layer::default(),
            Layer::default(),
            &host(),
        )
        .unwrap();
        assert_eq!(s.driver, DriverKind::default());
        assert!(!s.insecure);
    }

    #[test]
    fn precedence_flags_over_env_over_file_over_defaults() {
        let file = Layer {
            cache_dir: Some("/file".into()),
            driver: Some(DriverKind::Xattr),
            max_size: Some(1),
            stall_time: Some(Duration::from_secs(1)),
            ..Layer::default()
        };
        let env = Layer {
            cache_dir: Some("/env".into()),
            max_size: Some(2),
            ..Layer::default()
        };
        let flags = Layer {
            cache_dir: Some("/flag".into()),
            ..Layer::default()
        };
        let s = Settings::resolve(file.clone(), env.clone(), flags, &host()).unwrap();
        assert_eq!(s.cache_dir, PathBuf::from("/flag"));
        assert_eq!(s.max_size, 2, "env beats file");
        assert_eq!(s.driver, DriverKind::Xattr, "file beats default");
        assert_eq!(s.stall_time, Duration::from_secs(1));

        let s = Settings::resolve(file, env, Layer::default(), &host()).unwrap();
        assert_eq!(s.cache_dir, PathBuf::from("/env"));

        let s = Settings::resolve(
            Layer::default(),
            Layer::default(),
            Layer::default(),
            &host(),
        )
        .unwrap();
        assert_eq!(
            s,
            Settings {
                cache_dir: "/home/u/.cache/imgcache".into(),
                driver: DriverKind::Sqlite,
                max_size: 10 * GIB,
                stall_time: Duration::from_secs(86400),
                ttl: Duration::from_secs(7 * 86400),
                glance_url: None,
                glance_token: None,
                allow_file_dirs: vec![],
                revalidate_interval: None,
                ca_bundle: None,
                insecure: false,
                origin_attempt_timeout: Duration::from_secs(30),
                origin_retries: 3,
                origin_retry_budget: Duration::from_secs(300),
                listen: "127.0.0.1:9292".into(),
                admin_token: None,
                allow_href_prefixes: vec![],
                fleet_db: None,
                node_url: None,
                fleet_token: None,
                heartbeat_timeout: Duration::from_secs(60),
                peer_fanout: 4,
                scrub_interval: None,
                access_log: true,
                prune_interval: Duration::from_secs(60),
                clean_interval: Duration::from_secs(600),
                shutdown_grace: Duration::from_secs(30),
                header_read_timeout: Duration::from_secs(10),
                auth_cache_ttl: Duration::from_secs(60),
                caches: vec![],
            }
        );
    }

    /// The fleet and serve tuning keys: read from the file, the environment and (where the
    /// table gives one) a flag, each over the one before; zero where it means nothing is
    /// refused, naming the key or variable.
    #[test]
    fn serve_tuning_keys_from_file_env_and_flags() {
        let file = Layer::from_toml(
            r#"
            peer_fanout = 2
            prune_interval = "5m"
            clean_interval = "1h"
            shutdown_grace = "0s"
            header_read_timeout = "3s"
            auth_cache_ttl = "2m"
            "#,
        )
        .unwrap();
        assert_eq!(
            file,
            Layer {
                peer_fanout: Some(2),
                prune_interval: Some(Duration::from_secs(300)),
                clean_interval: Some(Duration::from_secs(3600)),
                shutdown_grace: Some(Duration::ZERO),
                header_read_timeout: Some(Duration::from_secs(3)),
                auth_cache_ttl: Some(Duration::from_secs(120)),
                ..Layer::default()
            }
        );
        let s =
            Settings::resolve(file.clone(), Layer::default(), Layer::default(), &host()).unwrap();
        assert_eq!(s.peer_fanout, 2);
        assert_eq!(s.prune_interval, Duration::from_secs(300));
        assert_eq!(s.clean_interval, Duration::from_secs(3600));
        assert_eq!(s.shutdown_grace, Duration::ZERO);
        assert_eq!(s.header_read_timeout, Duration::from_secs(3));
        assert_eq!(s.auth_cache_ttl, Duration::from_secs(120));

        let env = Layer::from_env(|k| {
            let v = match k {
                k if k == env_of("peer_fanout") => "8",
                k if k == env_of("prune_interval") => "90s",
                k if k == env_of("clean_interval") => "20m",
                k if k == env_of("shutdown_grace") => "45s",
                k if k == env_of("header_read_timeout") => "4s",
                k if k == env_of("auth_cache_ttl") => "0s",
                _ => return None,
            };
            Some(v.to_owned())
        })
        .unwrap();
        assert_eq!(env.peer_fanout, Some(8));
        assert_eq!(env.prune_interval, Some(Duration::from_secs(90)));
        assert_eq!(env.clean_interval, Some(Duration::from_secs(1200)));
        assert_eq!(env.shutdown_grace, Some(Duration::from_secs(45)));
        assert_eq!(env.header_read_timeout, Some(Duration::from_secs(4)));
        assert_eq!(env.auth_cache_ttl, Some(Duration::ZERO));

        use clap::Parser;
        let flags = crate::cli::Cli::try_parse_from([
            "imgcache",
            "serve",
            "--shutdown-grace",
            "5s",
            "--header-read-timeout",
            "2s",
            "--auth-cache-ttl",
            "1m",
        ])
        .unwrap()
        .flag_layer();
        assert_eq!(flags.shutdown_grace, Some(Duration::from_secs(5)));
        assert_eq!(flags.header_read_timeout, Some(Duration::from_secs(2)));
        assert_eq!(flags.auth_cache_ttl, Some(Duration::from_secs(60)));

        let s = Settings::resolve(file, env, flags, &host()).unwrap();
        assert_eq!(s.peer_fanout, 8, "env beats file");
        assert_eq!(s.clean_interval, Duration::from_secs(1200));
        assert_eq!(s.shutdown_grace, Duration::from_secs(5), "flag beats env");
        assert_eq!(s.header_read_timeout, Duration::from_secs(2));
        assert_eq!(s.auth_cache_ttl, Duration::from_secs(60));

        // Zero: refused where it means nothing, with the key or variable named.
        let e = format!("{:#}", Layer::from_toml("peer_fanout = 0").unwrap_err());
        assert!(
            e.starts_with("peer_fanout: 0 is not a count of at least 1"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            Layer::from_env(|k| (k == env_of("peer_fanout")).then(|| "0".into())).unwrap_err()
        );
        assert!(
            e.starts_with("IMGCACHE_PEER_FANOUT: 0 is not a count of at least 1"),
            "{e}"
        );
        for key in ["prune_interval", "clean_interval", "header_read_timeout"] {
            let e = format!(
                "{:#}",
                Layer::from_toml(&format!("{key} = \"0s\"")).unwrap_err()
            );
            assert!(e.starts_with(&format!("{key}: invalid interval")), "{e}");
        }
        assert!(
            crate::cli::Cli::try_parse_from(["imgcache", "serve", "--header-read-timeout", "0s"])
                .is_err()
        );
    }

    #[test]
    fn default_cache_dir() {
        let mut h = host();
        assert_eq!(
            h.default_cache_dir().unwrap(),
            PathBuf::from("/home/u/.cache/imgcache")
        );
        h.xdg_cache_home = Some("/xdg".into());
        assert_eq!(
            h.default_cache_dir().unwrap(),
            PathBuf::from("/xdg/imgcache")
        );
        h.is_root = true;
        assert_eq!(
            h.default_cache_dir().unwrap(),
            PathBuf::from("/var/cache/imgcache")
        );
        let nobody = Host {
            is_root: false,
            xdg_cache_home: None,
            home: None,
        };
        assert!(nobody.default_cache_dir().is_err());
    }
}
