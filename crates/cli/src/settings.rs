//! Every configuration setting, stated once: its TOML key, environment variables, flags,
//! default and doc. The parsing code in [`crate::config`] takes its variable names, list
//! separators and defaults from here, the flags' help is annotated from here (see
//! [`crate::cli::command`]), and README.md's configuration table is checked against it by a
//! test (`readme_table_is_the_settings_table` below).
//!
//! `[caches.NAME]` tables are not rows: they are tables of their own, documented under the
//! README's table.

/// One setting the configuration file accepts.
#[derive(Debug)]
pub struct SettingDef {
    /// The human name, as in the README table's first column.
    pub name: &'static str,
    /// The key in the TOML file.
    pub toml: &'static str,
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
    /// where the code has one, else an example. A test parses each one (see
    /// `crate::packaging`).
    #[cfg_attr(
        not(test),
        expect(dead_code, reason = "read by the packaging generator, in tests")
    )]
    pub example: &'static str,
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
    pub(crate) fn readme(self) -> &'static str {
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
        env: &["IMGCACHE_ALLOW_HREF_PREFIXES"],
        flag: Some("`serve --allow-href-prefix` (repeatable)"),
        default: "none: `/v1/fetch` refuses every href",
        list: Some(ListSep::Whitespace),
        doc: "URL prefixes /v1/fetch serves hrefs under (scheme, host, port exact; path on a \
              segment boundary; every redirect re-checked)",
        example: r#"["https://images.example/"]"#,
    },
    SettingDef {
        name: "fleet database (`serve`)",
        toml: "fleet_db",
        env: &["IMGCACHE_FLEET_DB"],
        flag: Some("`serve --fleet-db`"),
        default: "none: a single node",
        list: None,
        doc: "Fleet mode: the PostgreSQL index shared by the nodes, postgresql://USER@HOST:PORT/DB",
        example: r#""postgresql://imgcache@db.example:5432/imgcache""#,
    },
    SettingDef {
        name: "node URL (`serve`, fleet mode)",
        toml: "node_url",
        env: &["IMGCACHE_NODE_URL"],
        flag: Some("`serve --node-url`"),
        default: "none: `http://` and the listen address",
        list: None,
        doc: "How peers and clients reach this node (Glance's worker_self_reference_url)",
        example: r#""http://node1.example:9292""#,
    },
    SettingDef {
        name: "fleet token (`serve`, fleet mode)",
        toml: "fleet_token",
        env: &["IMGCACHE_FLEET_TOKEN"],
        flag: Some("`serve --fleet-token`"),
        default: "none: required with a fleet database",
        list: None,
        doc: "The secret peers present to each other's peer endpoint",
        example: r#""SECRET""#,
    },
    SettingDef {
        name: "heartbeat timeout (fleet mode)",
        toml: "heartbeat_timeout",
        env: &["IMGCACHE_HEARTBEAT_TIMEOUT"],
        flag: None,
        default: "`60s`",
        list: None,
        doc: "A node silent this long is dropped from the fleet's answers",
        example: r#""60s""#,
    },
    SettingDef {
        name: "background verify interval (`serve`)",
        toml: "scrub_interval",
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
        env: &["IMGCACHE_ACCESS_LOG"],
        flag: None,
        default: "`true`",
        list: None,
        doc: "One log line per request (target imgcache::access, at info level), text or JSON \
              as --log-format says; false turns it off",
        example: "true",
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

/// The row for a TOML key. In a `const` a missing key fails the build; at run time it panics
/// (keys are literals in this crate, so a test reaches every call).
pub const fn setting(toml: &str) -> &'static SettingDef {
    let mut i = 0;
    while i < SETTINGS.len() {
        if str_eq(SETTINGS[i].toml, toml) {
            return &SETTINGS[i];
        }
        i += 1;
    }
    panic!("no such setting in SETTINGS")
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
    fn env_help(&self) -> String {
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
    #[cfg(test)]
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

/// `--config`'s short help: every key.
pub fn config_help() -> String {
    let keys: Vec<&str> = SETTINGS.iter().map(|s| s.toml).collect();
    format!(
        "TOML configuration file (keys: {}, [caches.NAME]) [env: {ENV_CONFIG}]",
        keys.join(", ")
    )
}

/// `--config`'s long help: every key with its variable, default and doc.
pub fn config_long_help() -> String {
    let mut s = format!(
        "TOML configuration file [env: {ENV_CONFIG}]\n\n\
         Precedence: defaults < this file < environment (empty means unset) < flags. Keys:\n"
    );
    for d in SETTINGS {
        s.push_str(&format!(
            "\n  {} ({})\n      {}. {}\n",
            d.toml,
            d.name.replace('`', ""),
            d.doc,
            d.help_suffix()
                .replace(&format!(" [config: {}]", d.toml), "")
        ));
    }
    use imgcache_store::registry;
    s.push_str(&format!(
        "\n  [caches.NAME]\n      A named provisioning cache: dir, max_size (default {}), ttl \
         (default {}), priority (default {}), driver (default {})",
        crate::config::format_size(registry::DEFAULT_MAX_SIZE),
        crate::config::format_duration(registry::DEFAULT_TTL),
        registry::PRIORITY_INSTANCE,
        imgcache_store::DriverKind::default().name(),
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    const README: &str = include_str!("../../../README.md");

    /// The rows of README.md's configuration table, cell by cell (trimmed).
    fn readme_rows() -> Vec<Vec<String>> {
        let mut lines = README
            .lines()
            .skip_while(|l| !l.starts_with("## Configuration"))
            .skip_while(|l| !l.starts_with("| Setting |"));
        let header = lines
            .next()
            .expect("README: no `| Setting |` table under ## Configuration");
        assert_eq!(
            header, "| Setting | TOML key | Environment | Flag | Default |",
            "README table header"
        );
        assert!(
            lines.next().unwrap().starts_with("|---"),
            "README table separator"
        );
        lines
            .take_while(|l| l.starts_with('|'))
            .map(|l| {
                l.trim()
                    .trim_start_matches('|')
                    .trim_end_matches('|')
                    .split('|')
                    .map(|c| c.trim().to_string())
                    .collect()
            })
            .collect()
    }

    #[test]
    fn readme_table_is_the_settings_table() {
        let readme = readme_rows();
        let ours: Vec<Vec<String>> = SETTINGS.iter().map(|d| d.readme_row().to_vec()).collect();
        let render = |rows: &[Vec<String>]| {
            rows.iter()
                .map(|r| format!("| {} |", r.join(" | ")))
                .collect::<Vec<_>>()
                .join("\n")
        };
        for (i, (r, o)) in readme.iter().zip(&ours).enumerate() {
            assert_eq!(
                r,
                o,
                "README configuration table row {} differs from SETTINGS (crates/cli/src/settings.rs); \
                 the table SETTINGS gives is:\n{}",
                i + 1,
                render(&ours)
            );
        }
        assert_eq!(
            readme.len(),
            ours.len(),
            "README configuration table has {} rows, SETTINGS {}; the table SETTINGS gives is:\n{}",
            readme.len(),
            ours.len(),
            render(&ours)
        );
    }

    /// The keys the file parser accepts, from serde's own list (its unknown-field error).
    fn file_keys() -> BTreeSet<String> {
        let e = format!(
            "{:#}",
            crate::config::Layer::from_toml("no_such_key_ = 1").unwrap_err()
        );
        let expected = e
            .split_once("expected one of ")
            .unwrap_or_else(|| panic!("unexpected toml error: {e}"))
            .1;
        code_spans(expected)
            .into_iter()
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn every_file_key_has_a_row_and_every_row_a_file_key() {
        let mut ours: BTreeSet<String> = SETTINGS.iter().map(|d| d.toml.to_owned()).collect();
        // `[caches.NAME]` are tables, documented under the README table, not rows.
        ours.insert("caches".into());
        assert_eq!(
            file_keys(),
            ours,
            "the keys Layer::from_toml accepts (left) are not the SETTINGS rows (right): a key \
             needs a row in SETTINGS and in README.md's configuration table"
        );
        assert_eq!(
            ours.len(),
            SETTINGS.len() + 1,
            "a TOML key is in SETTINGS twice"
        );
        let envs: Vec<&str> = SETTINGS
            .iter()
            .flat_map(|d| d.env.iter().copied())
            .collect();
        let unique: BTreeSet<&str> = envs.iter().copied().collect();
        assert_eq!(
            envs.len(),
            unique.len(),
            "an environment variable is in SETTINGS twice"
        );
    }

    #[test]
    fn helpers() {
        assert_eq!(env_of("glance_token"), "IMGCACHE_GLANCE_TOKEN");
        let r = setting("revalidate_interval");
        assert_eq!(r.default_for("fetch"), Some("0s"));
        assert_eq!(r.default_for("serve"), Some("60s"));
        assert_eq!(setting("max_size").default_value(), Some("10G"));
        assert_eq!(setting("glance_url").default_value(), None);
        assert_eq!(setting("allow_file_dirs").default_value(), None);
        assert_eq!(
            setting("allow_file_dirs").flags(),
            [
                (Some("fetch"), "allow-file-dir"),
                (Some("serve"), "allow-file-dir")
            ]
        );
        assert_eq!(setting("cache_dir").flags(), [(None, "cache-dir")]);
        assert!(setting("ttl").flags().is_empty());
        assert_eq!(
            setting("glance_token").help_suffix(),
            "[env: IMGCACHE_GLANCE_TOKEN, else OS_AUTH_TOKEN] [config: glance_token]"
        );
    }
}
