//! Every imgcache configuration setting, stated once: its TOML key, environment variables,
//! flags, default and doc, in [`SETTINGS`]. The CLI's parsing takes variable names, list
//! separators and defaults from here, the flags' help is annotated from here, README.md's
//! configuration table is checked against it by a test (in the `imgcache` crate), and the
//! server and fleet crates take their defaults from it through the typed accessors
//! ([`default_duration`], [`default_size`], ...), so no default is written twice.
//!
//! The value parsers ([`parse_size`], [`parse_duration`], ...) are here too: the table's
//! defaults are parsed by the same code as the operator's values, and every row's default is
//! checked by this crate's tests, so a bad one never ships (the accessors panic on a table
//! bug, naming the key).
//!
//! `[caches.NAME]` tables are not rows: they are tables of their own, documented under the
//! README's table.

use std::time::Duration;

mod parse;

pub use parse::{
    GIB, InvalidValue, KIB, MIB, Result, nonzero_count, parse_bool, parse_count, parse_duration,
    parse_interval, parse_listen, parse_nonzero_count, parse_size,
};

/// One setting the configuration file accepts.
#[derive(Debug)]
pub struct SettingDef {
    /// The human name, as in the README table's first column.
    pub name: &'static str,
    /// The key in the TOML file.
    pub toml: &'static str,
    /// What its values are, so its default can be checked and read typed.
    pub kind: Kind,
    /// The environment variables read for it, in order: the first one set (non-empty) wins.
    pub env: &'static [&'static str],
    /// The flags, as the README shows them: `` `CMD --flag` `` or `` `--flag` `` for global
    /// ones, comma-separated, optionally followed by a note in parentheses.
    pub flag: Option<&'static str>,
    /// The default, as the README shows it. Its first `code span` is the value the code
    /// uses (parsed like the setting's values); a per-command default is written
    /// `` `CMD`: `VALUE` ``. A default starting `none` (or without a code span) means unset.
    pub default: &'static str,
    /// A list: how the environment variable separates its items.
    pub list: Option<ListSep>,
    /// One line for `--help`.
    pub doc: &'static str,
    /// The value packaging/imgcache.toml shows for it (commented out), as TOML: the default
    /// where the code has one, else an example. A test parses each one (the `imgcache`
    /// crate's packaging generator).
    pub example: &'static str,
}

/// What a setting's values are (of a list: its items), and so which parser reads them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A path, taken as written.
    Path,
    /// A string taken as written, or checked by its user (a URL, a token, a driver name).
    Text,
    /// [`parse_size`].
    Size,
    /// [`parse_duration`].
    Duration,
    /// [`parse_interval`]: a duration of more than zero.
    Interval,
    /// [`parse_count`].
    Count,
    /// [`parse_nonzero_count`].
    NonZeroCount,
    /// [`parse_bool`].
    Bool,
    /// [`parse_listen`].
    Listen,
}

impl Kind {
    /// Checks `v` as this kind's parser does.
    pub fn check(self, v: &str) -> Result<()> {
        match self {
            Kind::Path | Kind::Text => Ok(()),
            Kind::Size => parse_size(v).map(drop),
            Kind::Duration => parse_duration(v).map(drop),
            Kind::Interval => parse_interval(v).map(drop),
            Kind::Count => parse_count(v).map(drop),
            Kind::NonZeroCount => parse_nonzero_count(v).map(drop),
            Kind::Bool => parse_bool(v).map(drop),
            Kind::Listen => parse_listen(v).map(drop),
        }
    }
}

/// How a list setting's environment variable separates its items.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListSep {
    /// `:`, like `PATH`.
    Colon,
    /// Spaces, tabs or newlines.
    Whitespace,
}

impl ListSep {
    pub fn split(self, v: &str) -> Vec<&str> {
        match self {
            ListSep::Colon => v.split(':').filter(|p| !p.is_empty()).collect(),
            ListSep::Whitespace => v.split_whitespace().collect(),
        }
    }

    /// As the README's Environment column says it.
    pub fn readme(self) -> &'static str {
        match self {
            ListSep::Colon => "(`:`-separated)",
            ListSep::Whitespace => "(whitespace-separated)",
        }
    }
}

/// The variable naming the configuration file (the file cannot name itself, so it is not a row).
pub const ENV_CONFIG: &str = "IMGCACHE_CONFIG";

pub const SETTINGS: &[SettingDef] = &[
    SettingDef {
        name: "cache directory",
        toml: "cache_dir",
        kind: Kind::Path,
        env: &["IMGCACHE_CACHE_DIR"],
        flag: Some("`--cache-dir`"),
        default: "`/var/cache/imgcache` as root, else `$XDG_CACHE_HOME/imgcache` or `~/.cache/imgcache`",
        list: None,
        doc: "Cache directory",
        example: r#""/var/cache/imgcache""#,
    },
    SettingDef {
        name: "metadata driver",
        toml: "driver",
        kind: Kind::Text,
        env: &["IMGCACHE_DRIVER"],
        flag: Some("`--driver`"),
        default: "`sqlite`",
        list: None,
        doc: "Metadata driver: sqlite or xattr",
        example: r#""sqlite""#,
    },
    SettingDef {
        name: "max size",
        toml: "max_size",
        kind: Kind::Size,
        env: &["IMGCACHE_MAX_SIZE"],
        flag: Some("`prune --max-size`, `serve --max-size`"),
        default: "`10G` (Glance's default)",
        list: None,
        doc: "Size the cache is pruned to (serve: its hard limit), e.g. 10G, 512M",
        example: r#""10G""#,
    },
    SettingDef {
        name: "stall time",
        toml: "stall_time",
        kind: Kind::Duration,
        env: &["IMGCACHE_STALL_TIME"],
        flag: Some("`clean --stall-time`, `fsck --stall-time`"),
        default: "`24h` (Glance's default)",
        list: None,
        doc: "Age after which an unfinished write counts as stalled, e.g. 24h, 30m",
        example: r#""24h""#,
    },
    SettingDef {
        name: "master TTL (`fetch`, `cleanup`)",
        toml: "ttl",
        kind: Kind::Duration,
        env: &["IMGCACHE_TTL"],
        flag: None,
        default: "`7d` (Ironic's default)",
        list: None,
        doc: "Provisioning masters unused for this long are cleaned up",
        example: r#""7d""#,
    },
    SettingDef {
        name: "Glance endpoint",
        toml: "glance_url",
        kind: Kind::Text,
        env: &["IMGCACHE_GLANCE_URL"],
        flag: Some("`fetch --glance-url`, `serve --glance-url`"),
        default: "none",
        list: None,
        doc: "Glance endpoint for image ids (serve: the upstream Glance)",
        example: r#""http://glance.example:9292""#,
    },
    SettingDef {
        name: "Glance token",
        toml: "glance_token",
        kind: Kind::Text,
        env: &["IMGCACHE_GLANCE_TOKEN", "OS_AUTH_TOKEN"],
        flag: None,
        default: "none",
        list: None,
        doc: "X-Auth-Token sent to Glance",
        example: r#""TOKEN""#,
    },
    SettingDef {
        name: "directories `file://` may read",
        toml: "allow_file_dirs",
        kind: Kind::Path,
        env: &["IMGCACHE_ALLOW_FILE_DIRS"],
        flag: Some("`fetch --allow-file-dir`, `serve --allow-file-dir` (repeatable)"),
        default: "none: `file://` is refused",
        list: Some(ListSep::Colon),
        doc: "Directories file:// hrefs may read from",
        example: r#"["/srv/images"]"#,
    },
    SettingDef {
        name: "revalidation interval",
        toml: "revalidate_interval",
        kind: Kind::Duration,
        env: &["IMGCACHE_REVALIDATE_INTERVAL"],
        flag: Some("`fetch --revalidate-interval`"),
        default: "`fetch`: `0s` (ask on every call); `serve`: `60s`",
        list: None,
        doc: "Use an http(s) master without asking the origin within this time of its last check",
        example: r#""60s""#,
    },
    SettingDef {
        name: "extra CA certificates (PEM)",
        toml: "ca_bundle",
        kind: Kind::Path,
        env: &["IMGCACHE_CA_BUNDLE"],
        flag: Some("`fetch --ca-bundle`"),
        default: "system roots only",
        list: None,
        doc: "Extra CA certificates (PEM) to trust",
        example: r#""/etc/imgcache/ca.pem""#,
    },
    SettingDef {
        name: "origin attempt timeout",
        toml: "origin_attempt_timeout",
        kind: Kind::Duration,
        env: &["IMGCACHE_ORIGIN_ATTEMPT_TIMEOUT"],
        flag: None,
        default: "`30s`",
        list: None,
        doc: "Budget of one origin request: connecting plus the response headers, its retries included",
        example: r#""30s""#,
    },
    SettingDef {
        name: "origin retries",
        toml: "origin_retries",
        kind: Kind::Count,
        env: &["IMGCACHE_ORIGIN_RETRIES"],
        flag: None,
        default: "`3`",
        list: None,
        doc: "Retries of an origin request after a connection error or 5xx, and resumes of a broken body",
        example: "3",
    },
    SettingDef {
        name: "origin retry budget",
        toml: "origin_retry_budget",
        kind: Kind::Duration,
        env: &["IMGCACHE_ORIGIN_RETRY_BUDGET"],
        flag: None,
        default: "`5m`",
        list: None,
        doc: "Total time a download may spend resuming its body after it first broke",
        example: r#""5m""#,
    },
    SettingDef {
        name: "accept any TLS certificate",
        toml: "insecure",
        kind: Kind::Bool,
        env: &["IMGCACHE_INSECURE"],
        flag: Some("`fetch --insecure`"),
        default: "`false`",
        list: None,
        doc: "Accept any TLS certificate (labs only)",
        example: "false",
    },
    SettingDef {
        name: "listen address (`serve`)",
        toml: "listen",
        kind: Kind::Listen,
        env: &["IMGCACHE_LISTEN"],
        flag: Some("`serve --listen`"),
        default: "`127.0.0.1:9292`",
        list: None,
        doc: "Address imgcache serve listens on, HOST:PORT: an IP ([::1]:9292 for IPv6) or a \
              host name, resolved at start",
        example: r#""127.0.0.1:9292""#,
    },
    SettingDef {
        name: "admin token (`serve`)",
        toml: "admin_token",
        kind: Kind::Text,
        env: &["IMGCACHE_ADMIN_TOKEN"],
        flag: Some("`serve --admin-token`"),
        default: "none",
        list: None,
        doc: "X-Auth-Token that grants the cache-management API",
        example: r#""SECRET""#,
    },
    SettingDef {
        name: "href prefixes `/v1/fetch` may serve (`serve`)",
        toml: "allow_href_prefixes",
        kind: Kind::Text,
        env: &["IMGCACHE_ALLOW_HREF_PREFIXES"],
        flag: Some("`serve --allow-href-prefix` (repeatable)"),
        default: "none: `/v1/fetch` refuses every href",
        list: Some(ListSep::Whitespace),
        doc: "URL prefixes /v1/fetch serves hrefs under (scheme, host, port exact; path on a \
              segment boundary; every redirect re-checked)",
        example: r#"["https://images.example/"]"#,
    },
    SettingDef {
        name: "fleet database (`serve`, `fetch`, `fleet`)",
        toml: "fleet_db",
        kind: Kind::Text,
        env: &["IMGCACHE_FLEET_DB"],
        flag: Some("`serve --fleet-db`, `fleet --fleet-db`, `fetch --fleet-db`"),
        default: "none: a single node",
        list: None,
        doc: "Fleet mode: the PostgreSQL index shared by the nodes, postgresql://USER@HOST:PORT/DB",
        example: r#""postgresql://imgcache@db.example:5432/imgcache""#,
    },
    SettingDef {
        name: "node URL (`serve`, `fetch`, fleet mode)",
        toml: "node_url",
        kind: Kind::Text,
        env: &["IMGCACHE_NODE_URL"],
        flag: Some("`serve --node-url`, `fetch --node-url`"),
        default: "none: `http://` and the listen address (`fetch`: the `serve` on its cache directory, by its marker)",
        list: None,
        doc: "How peers and clients reach this node (Glance's worker_self_reference_url)",
        example: r#""http://node1.example:9292""#,
    },
    SettingDef {
        name: "fleet token (`serve`, `fetch`, fleet mode)",
        toml: "fleet_token",
        kind: Kind::Text,
        env: &["IMGCACHE_FLEET_TOKEN"],
        flag: Some("`serve --fleet-token`, `fetch --fleet-token`"),
        default: "none: required with a fleet database",
        list: None,
        doc: "The secret peers present to each other's peer endpoint",
        example: r#""SECRET""#,
    },
    SettingDef {
        name: "heartbeat timeout (fleet mode)",
        toml: "heartbeat_timeout",
        kind: Kind::Duration,
        env: &["IMGCACHE_HEARTBEAT_TIMEOUT"],
        flag: None,
        default: "`60s`",
        list: None,
        doc: "A node silent this long is dropped from the fleet's answers",
        example: r#""60s""#,
    },
    SettingDef {
        name: "peer fan-out (`serve`, fleet mode)",
        toml: "peer_fanout",
        kind: Kind::NonZeroCount,
        env: &["IMGCACHE_PEER_FANOUT"],
        flag: None,
        default: "`4`",
        list: None,
        doc: "Fleet mode: how many peers one node serves at once; further askers are sent to \
              another holder (at least 1)",
        example: "4",
    },
    SettingDef {
        name: "background verify interval (`serve`)",
        toml: "scrub_interval",
        kind: Kind::Duration,
        env: &["IMGCACHE_SCRUB_INTERVAL"],
        flag: Some("`serve --scrub-interval`"),
        default: "none: no background verify",
        list: None,
        doc: "How often serve re-hashes every cached image against its recorded checksum, at \
              low priority (a mismatch goes to invalid/); off unless set",
        example: r#""24h""#,
    },
    SettingDef {
        name: "access log (`serve`)",
        toml: "access_log",
        kind: Kind::Bool,
        env: &["IMGCACHE_ACCESS_LOG"],
        flag: None,
        default: "`true`",
        list: None,
        doc: "One log line per request (target imgcache::access, at info level), text or JSON \
              as --log-format says; false turns it off",
        example: "true",
    },
    SettingDef {
        name: "prune interval (`serve`)",
        toml: "prune_interval",
        kind: Kind::Interval,
        env: &["IMGCACHE_PRUNE_INTERVAL"],
        flag: None,
        default: "`60s`",
        list: None,
        doc: "How often serve evicts least recently used images down to max size (also after \
              each download); more than 0s",
        example: r#""60s""#,
    },
    SettingDef {
        name: "clean interval (`serve`)",
        toml: "clean_interval",
        kind: Kind::Interval,
        env: &["IMGCACHE_CLEAN_INTERVAL"],
        flag: None,
        default: "`10m`",
        list: None,
        doc: "How often serve removes stalled incomplete writes, invalid files and records \
              whose file vanished; more than 0s",
        example: r#""10m""#,
    },
    SettingDef {
        name: "shutdown grace (`serve`)",
        toml: "shutdown_grace",
        kind: Kind::Duration,
        env: &["IMGCACHE_SHUTDOWN_GRACE"],
        flag: Some("`serve --shutdown-grace`"),
        default: "`30s`",
        list: None,
        doc: "After SIGTERM/SIGINT, how long in-flight responses may run before they are cut",
        example: r#""30s""#,
    },
    SettingDef {
        name: "header read timeout (`serve`)",
        toml: "header_read_timeout",
        kind: Kind::Interval,
        env: &["IMGCACHE_HEADER_READ_TIMEOUT"],
        flag: Some("`serve --header-read-timeout`"),
        default: "`10s`",
        list: None,
        doc: "A client must send its request headers within this (slowloris protection); more \
              than 0s",
        example: r#""10s""#,
    },
    SettingDef {
        name: "upstream authorization cache TTL (`serve`)",
        toml: "auth_cache_ttl",
        kind: Kind::Duration,
        env: &["IMGCACHE_AUTH_CACHE_TTL"],
        flag: Some("`serve --auth-cache-ttl`"),
        default: "`60s`",
        list: None,
        doc: "How long an upstream \"this token may read this image\" answer is reused (0s: \
              ask on every request)",
        example: r#""60s""#,
    },
];

const fn str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// The row for a TOML key, if there is one.
pub const fn find(toml: &str) -> Option<&'static SettingDef> {
    let mut i = 0;
    while i < SETTINGS.len() {
        if str_eq(SETTINGS[i].toml, toml) {
            return Some(&SETTINGS[i]);
        }
        i += 1;
    }
    None
}

/// The row for a TOML key. In a `const` a missing key fails the build; at run time it panics
/// (keys are literals at their call sites, so a test reaches every call).
pub const fn setting(toml: &str) -> &'static SettingDef {
    match find(toml) {
        Some(d) => d,
        None => panic!("no such setting in SETTINGS"),
    }
}

/// A setting's primary environment variable.
pub const fn env_of(toml: &str) -> &'static str {
    setting(toml).env[0]
}

/// The `code spans` of a README-style string, in order.
pub fn code_spans(s: &str) -> Vec<&str> {
    s.split('`').skip(1).step_by(2).collect()
}

impl SettingDef {
    /// The value the code uses by default (the default's first code span); `None` when unset.
    pub fn default_value(&self) -> Option<&'static str> {
        if self.default.starts_with("none") {
            return None;
        }
        code_spans(self.default).first().copied()
    }

    /// A per-command default: the code span after `` `CMD`: ``.
    pub fn default_for(&self, cmd: &str) -> Option<&'static str> {
        let spans = code_spans(self.default);
        let at = spans.iter().position(|s| *s == cmd)?;
        spans.get(at + 1).copied()
    }

    /// The commands this setting has a default of its own for (`` `CMD`: `VALUE` ``).
    pub fn per_command_defaults(&self) -> Vec<(&'static str, &'static str)> {
        let spans = code_spans(self.default);
        let mut out = Vec::new();
        for (i, s) in spans.iter().enumerate() {
            let marker = format!("`{s}`: `");
            if self.default.contains(&marker)
                && let Some(v) = spans.get(i + 1)
            {
                out.push((*s, *v));
            }
        }
        out
    }

    /// The flags: (subcommand or `None` for a global flag, long name without `--`).
    pub fn flags(&self) -> Vec<(Option<&'static str>, &'static str)> {
        code_spans(self.flag.unwrap_or_default())
            .into_iter()
            .map(|f| match f.split_once(' ') {
                Some((cmd, long)) => (Some(cmd), long.trim_start_matches("--")),
                None => (None, f.trim_start_matches("--")),
            })
            .collect()
    }

    /// `IMGCACHE_X`, or `IMGCACHE_X, else Y` (with the list separator when a list).
    pub fn env_help(&self) -> String {
        let mut s = self.env.join(", else ");
        if let Some(sep) = self.list {
            s = format!("{s} {}", sep.readme().replace('`', ""));
        }
        s
    }

    /// What a flag's help says about where else the setting comes from.
    pub fn help_suffix(&self) -> String {
        let mut s = format!("[env: {}] [config: {}]", self.env_help(), self.toml);
        if self.default != "none" {
            s.push_str(&format!(" [default: {}]", self.default.replace('`', "")));
        }
        s
    }

    /// The row as README.md's configuration table has it, cell by cell.
    pub fn readme_row(&self) -> [String; 5] {
        let list = |note: &str| match self.list {
            Some(sep) if note.is_empty() => format!(" {}", sep.readme()),
            Some(_) => format!(" {note}"),
            None => String::new(),
        };
        let env: Vec<String> = self.env.iter().map(|e| format!("`{e}`")).collect();
        [
            self.name.to_string(),
            format!("`{}`{}", self.toml, list("(list)")),
            format!("{}{}", env.join(", else "), list("")),
            self.flag.unwrap_or_default().to_string(),
            self.default.to_string(),
        ]
    }
}

/// `key`'s row, which must be of one of `kinds`; panics naming the key otherwise (a bug in
/// the caller or the table, which the tests reach).
fn row_of(key: &str, kinds: &[Kind]) -> &'static SettingDef {
    let d = find(key).unwrap_or_else(|| panic!("SETTINGS: no setting {key:?}"));
    assert!(
        kinds.contains(&d.kind),
        "SETTINGS: {key} is a {:?} setting, read as one of {kinds:?}",
        d.kind
    );
    d
}

/// `key`'s default value, parsed; panics naming the key when it has none or it does not parse.
fn parsed_default<T>(key: &str, kinds: &[Kind], parse: fn(&str) -> Result<T>) -> T {
    let v = row_of(key, kinds)
        .default_value()
        .unwrap_or_else(|| panic!("SETTINGS: {key} has no default value"));
    parse(v).unwrap_or_else(|e| panic!("SETTINGS: the default of {key}: {e}"))
}

/// A size setting's default, in bytes.
pub fn default_size(key: &str) -> u64 {
    parsed_default(key, &[Kind::Size], parse_size)
}

/// A duration setting's default.
pub fn default_duration(key: &str) -> Duration {
    parsed_default(key, &[Kind::Duration, Kind::Interval], parse_duration)
}

/// A duration setting's default for command `cmd` (`` `CMD`: `VALUE` `` in the table).
pub fn default_duration_for(key: &str, cmd: &str) -> Duration {
    let v = row_of(key, &[Kind::Duration, Kind::Interval])
        .default_for(cmd)
        .unwrap_or_else(|| panic!("SETTINGS: {key} has no default for {cmd}"));
    parse_duration(v).unwrap_or_else(|e| panic!("SETTINGS: the default of {key} for {cmd}: {e}"))
}

/// A count setting's default.
pub fn default_count(key: &str) -> u32 {
    parsed_default(key, &[Kind::Count, Kind::NonZeroCount], parse_count)
}

/// A boolean setting's default.
pub fn default_bool(key: &str) -> bool {
    parsed_default(key, &[Kind::Bool], parse_bool)
}

/// A string, path or address setting's default, as written (an address checked as
/// [`parse_listen`] checks it).
pub fn default_string(key: &str) -> &'static str {
    let d = row_of(key, &[Kind::Text, Kind::Path, Kind::Listen]);
    let v = d
        .default_value()
        .unwrap_or_else(|| panic!("SETTINGS: {key} has no default value"));
    d.kind
        .check(v)
        .unwrap_or_else(|e| panic!("SETTINGS: the default of {key}: {e}"));
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// Every default the table gives, plain or per command, parses as its row's kind: the
    /// accessors never panic on a row that ships.
    #[test]
    fn every_default_parses() {
        for d in SETTINGS {
            let per_command = d.per_command_defaults();
            let values: Vec<&str> = if per_command.is_empty() {
                d.default_value().into_iter().collect()
            } else {
                per_command.iter().map(|(_, v)| *v).collect()
            };
            for v in values {
                d.kind
                    .check(v)
                    .unwrap_or_else(|e| panic!("SETTINGS: the default of {}: {e}", d.toml));
            }
        }
    }

    #[test]
    fn keys_and_variables_are_unique_and_well_formed() {
        let keys: BTreeSet<&str> = SETTINGS.iter().map(|d| d.toml).collect();
        assert_eq!(
            keys.len(),
            SETTINGS.len(),
            "a TOML key is in SETTINGS twice"
        );
        let envs: Vec<&str> = SETTINGS
            .iter()
            .flat_map(|d| d.env.iter().copied())
            .collect();
        let unique: BTreeSet<&str> = envs.iter().copied().collect();
        assert_eq!(envs.len(), unique.len(), "a variable is in SETTINGS twice");
        for d in SETTINGS {
            assert_eq!(
                d.env[0],
                format!("IMGCACHE_{}", d.toml.to_ascii_uppercase()),
                "{}: the primary variable is IMGCACHE_ and the key",
                d.toml
            );
            assert!(
                !d.doc.ends_with('.'),
                "{}: the doc is one line, no period",
                d.toml
            );
        }
    }

    #[test]
    fn typed_defaults() {
        assert_eq!(default_size("max_size"), 10 * GIB);
        assert_eq!(default_duration("stall_time"), Duration::from_secs(86_400));
        assert_eq!(default_duration("clean_interval"), Duration::from_secs(600));
        assert_eq!(
            default_duration_for("revalidate_interval", "fetch"),
            Duration::ZERO
        );
        assert_eq!(
            default_duration_for("revalidate_interval", "serve"),
            Duration::from_secs(60)
        );
        assert_eq!(default_count("peer_fanout"), 4);
        assert_eq!(default_count("origin_retries"), 3);
        assert!(default_bool("access_log"));
        assert_eq!(default_string("listen"), "127.0.0.1:9292");
        assert_eq!(default_string("cache_dir"), "/var/cache/imgcache");
        assert_eq!(
            setting("revalidate_interval").per_command_defaults(),
            [("fetch", "0s"), ("serve", "60s")]
        );
    }

    #[test]
    #[should_panic(expected = "SETTINGS: max_size is a Size setting")]
    fn a_mistyped_read_names_the_key() {
        default_duration("max_size");
    }

    #[test]
    #[should_panic(expected = "SETTINGS: glance_url has no default value")]
    fn a_missing_default_names_the_key() {
        default_string("glance_url");
    }
}
