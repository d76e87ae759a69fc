//! What `imgcache serve` runs with (built by the CLI from file, env and flags).

use std::path::PathBuf;
use std::time::Duration;

use imgcache_fetch::{HttpOptions, SourceConfig};
use imgcache_store::DriverKind;

#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// `HOST:PORT` to listen on: an IP address (`[::1]:9292` for IPv6) or a host name, which
    /// is resolved when the server binds (the first address that binds is used).
    pub listen: String,
    pub cache_dir: PathBuf,
    pub driver: DriverKind,
    /// Hard limit on the cache's size: downloads evict LRU images first; an image that cannot
    /// fit is streamed to the client without being cached.
    pub max_size: u64,
    pub stall_time: Duration,
    /// Sources (http options, allowed file dirs, the upstream Glance and its token).
    pub sources: SourceConfig,
    /// `X-Auth-Token` value that grants the cache-management API.
    pub admin_token: Option<String>,
    /// `/v1/fetch?href=` only serves hrefs under one of these URL prefixes (no open proxy),
    /// compared on parsed URLs: scheme, host and port exact, the path on a segment boundary
    /// (see [`imgcache_fetch::AllowList`]); every redirect hop is checked the same way. Kept
    /// as configured; the server parses them at start, and a prefix that does not parse is
    /// an error.
    pub allow_href_prefixes: Vec<String>,
    /// How long an upstream "this token may see this image" answer is reused.
    pub auth_cache_ttl: Duration,
    pub prune_interval: Duration,
    pub clean_interval: Duration,
    /// How often the scrubber re-hashes every cached image against its recorded checksum
    /// (at low priority; a mismatch goes to `invalid/`). `None`: never (the default).
    pub scrub_interval: Option<Duration>,
    /// How long in-flight responses may run after SIGTERM before they are cut.
    pub shutdown_grace: Duration,
    /// A client must send its request headers within this (slowloris protection).
    pub header_read_timeout: Duration,
    /// TLS certificate chain and key (PEM); plain HTTP when unset.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Formats an image may have at all (every format by default: Glance accepted it);
    /// unsafe images are refused whatever this says.
    pub permitted_formats: Vec<imgcache_fetch::formats::Format>,
    /// Fleet mode: the shared index, this node's URL and the peers' token. `None`: a single
    /// node, nothing changes.
    pub fleet: Option<crate::fleet_node::FleetSettings>,
    /// One access-log line per request (tracing target `imgcache::access`, info level).
    pub access_log: bool,
}

impl ServerConfig {
    /// Defaults for a cache at `cache_dir`: every value an operator can set is the settings
    /// table's default ([`imgcache_settings::SETTINGS`], the one the CLI resolves to when
    /// nothing is configured; a test in the CLI holds the two equal). What the table has no
    /// row for: no TLS, every format (unsafe images are refused whatever this says), a
    /// single node.
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        use imgcache_settings::{default_bool, default_count, default_duration, default_string};
        let driver = default_string("driver");
        ServerConfig {
            listen: default_string("listen").to_owned(),
            cache_dir: cache_dir.into(),
            driver: driver
                .parse()
                .unwrap_or_else(|e| panic!("SETTINGS: the default of driver {driver:?}: {e}")),
            max_size: imgcache_settings::default_size("max_size"),
            stall_time: default_duration("stall_time"),
            sources: SourceConfig {
                http: HttpOptions {
                    attempt_timeout: default_duration("origin_attempt_timeout"),
                    retries: default_count("origin_retries"),
                    retry_budget: default_duration("origin_retry_budget"),
                    insecure: default_bool("insecure"),
                    ..HttpOptions::default()
                },
                revalidate_interval: imgcache_settings::default_duration_for(
                    "revalidate_interval",
                    "serve",
                ),
                ..SourceConfig::default()
            },
            admin_token: None,
            allow_href_prefixes: Vec::new(),
            auth_cache_ttl: default_duration("auth_cache_ttl"),
            prune_interval: default_duration("prune_interval"),
            clean_interval: default_duration("clean_interval"),
            scrub_interval: None,
            shutdown_grace: default_duration("shutdown_grace"),
            header_read_timeout: default_duration("header_read_timeout"),
            tls_cert: None,
            tls_key: None,
            permitted_formats: imgcache_fetch::formats::Format::ALL.to_vec(),
            fleet: None,
            access_log: default_bool("access_log"),
        }
    }
}
