//! The settings table, [`imgcache_settings::SETTINGS`] (crates/settings): every setting's
//! TOML key, environment variables, flags, default and doc, defined there once. The parsing
//! code in [`crate::config`] takes its variable names, list separators and defaults from it,
//! the flags' help is annotated from it (see [`crate::cli::command`]), `--config`'s help is
//! built from it here, and README.md's configuration table is checked against it by a test
//! (`readme_table_is_the_settings_table` below).

pub use imgcache_settings::{ENV_CONFIG, SETTINGS, env_of, setting};

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
    use imgcache_settings::code_spans;
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
                "README configuration table row {} differs from SETTINGS (crates/settings/src/lib.rs); \
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
        // Unique keys and variables: imgcache-settings' own tests.
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
