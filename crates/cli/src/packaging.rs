//! The generated files under `packaging/`: the example configuration (from the settings table,
//! [`imgcache_settings::SETTINGS`]), the man pages and the shell completions (from the clap
//! command, [`crate::cli::command`]). They are committed, so a package build needs nothing but
//! the tree (`cargo deb` ships them as they are); `packaging_files_are_up_to_date` regenerates
//! them in memory and fails when a committed one differs. To rewrite them:
//!
//! ```text
//! UPDATE_PACKAGING=1 cargo test -p imgcache --bin imgcache packaging
//! ```
//!
//! Test-only: the generators (`clap_mangen`, `clap_complete`) are dev-dependencies, so the
//! binary carries none of this.

use std::path::{Path, PathBuf};

use imgcache_settings::{ENV_CONFIG, SETTINGS, SettingDef};

/// The command that rewrites the generated files.
pub const UPDATE_COMMAND: &str =
    "UPDATE_PACKAGING=1 cargo test -p imgcache --bin imgcache packaging";

/// Where the generated files live, relative to the repository root.
const DIR: &str = "packaging";

/// Comment lines are wrapped to this width.
const WIDTH: usize = 96;

/// Whether a row's example line is its default (else an example of a value it has no default
/// for, or a default that depends on the command).
fn shows_default(d: &SettingDef) -> bool {
    d.default_value().is_some() && !d.default.contains("`: `")
}

/// `text` as `# ` comment lines of at most [`WIDTH`] columns, continuation lines indented by
/// `indent` spaces.
fn comment(text: &str, indent: usize) -> String {
    let mut out = String::new();
    let mut line = String::from("#");
    let mut empty = true;
    for word in text.split_whitespace() {
        if !empty && line.len() + 1 + word.len() > WIDTH {
            out.push_str(&line);
            out.push('\n');
            line = format!("#{}", " ".repeat(indent));
        }
        line.push(' ');
        line.push_str(word);
        empty = false;
    }
    out.push_str(&line);
    out.push('\n');
    out
}

/// `packaging/imgcache.toml`: every key of the settings table, commented out, with its doc,
/// environment variables, flags and default; then a commented `[caches.NAME]` table.
pub fn example_config() -> String {
    use imgcache_store::registry;
    let mut s = String::new();
    for para in [
        "imgcache configuration file (TOML).".to_string(),
        format!(
            "Every command reads the file named by --config or {ENV_CONFIG}; the packaged systemd \
             unit runs `imgcache serve --config /etc/imgcache/imgcache.toml` as the user imgcache \
             with XDG_CACHE_HOME=/var/cache, so the cache directory defaults to \
             /var/cache/imgcache there (the unit's CacheDirectory)."
        ),
        "Every key is listed below, commented out, at its default (or, where there is none, with \
         an example value marked so). Precedence: defaults < this file < environment variables \
         (empty means unset) < flags. Sizes take binary units (10G = 10 GiB); durations take \
         humantime units (90s, 24h, 7d)."
            .to_string(),
    ] {
        s.push_str(&comment(&para, 0));
        s.push_str("#\n");
    }
    s.push_str(&comment(
        "Generated from the settings table (crates/settings/src/lib.rs) by the command below; a \
         test fails when the two disagree:",
        0,
    ));
    s.push_str(&format!("#   {UPDATE_COMMAND}\n"));
    for d in SETTINGS {
        s.push('\n');
        s.push_str(&comment(&format!("{}.", d.doc.trim_end_matches('.')), 0));
        let mut env = d.env.join(", else ");
        if let Some(sep) = d.list {
            env.push_str(&format!(" {}", sep.readme().replace('`', "")));
        }
        let mut facts = format!("Environment: {env}.");
        if let Some(flag) = d.flag {
            facts.push_str(&format!(" Flag: {}.", flag.replace('`', "")));
        }
        facts.push_str(&format!(" Default: {}.", d.default.replace('`', "")));
        s.push_str(&comment(&facts, 2));
        if shows_default(d) {
            s.push_str(&format!("#{} = {}\n", d.toml, d.example));
        } else {
            s.push_str(&format!("#{} = {}  # an example\n", d.toml, d.example));
        }
    }
    let max = registry::DEFAULT_MAX_SIZE;
    assert_eq!(max % (1 << 30), 0, "DEFAULT_MAX_SIZE is whole GiB");
    let caches = format!(
        "Named provisioning caches (Ironic's master directories: `imgcache fetch --cache NAME`, \
         `imgcache cleanup`, `imgcache caches`), one [caches.NAME] table each: dir (required), \
         max_size (default {}G), ttl (default {}), priority (default {}; higher is cleaned up \
         last), driver (default {}).",
        max >> 30,
        crate::config::format_duration(registry::DEFAULT_TTL),
        registry::PRIORITY_INSTANCE,
        imgcache_store::DriverKind::default().name(),
    );
    s.push('\n');
    s.push_str(&comment(&caches, 0));
    s.push_str(&format!(
        "#[caches.instance]\n\
         #dir = \"/var/lib/ironic/master_images\"\n\
         #max_size = \"{}G\"\n\
         #ttl = \"{}\"\n\
         #priority = {}\n\
         #driver = \"{}\"\n",
        max >> 30,
        crate::config::format_duration(registry::DEFAULT_TTL),
        registry::PRIORITY_INSTANCE,
        imgcache_store::DriverKind::default().name(),
    ));
    s
}

/// The man pages: `imgcache.1` and one `imgcache-CMD.1` per subcommand, as `clap_mangen`
/// renders them from [`crate::cli::command`] (no date in them, so they are reproducible).
pub fn man_pages() -> Vec<(String, Vec<u8>)> {
    fn walk(cmd: &clap::Command, out: &mut Vec<(String, Vec<u8>)>) {
        let man = clap_mangen::Man::new(cmd.clone()).manual("imgcache manual");
        let mut page = Vec::new();
        man.render(&mut page).expect("render a man page");
        out.push((man.get_filename(), page));
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            walk(sub, out);
        }
    }
    let mut cmd = crate::cli::command().disable_help_subcommand(true);
    cmd.build();
    let mut out = Vec::new();
    walk(&cmd, &mut out);
    out
}

/// bash, zsh and fish completions, as `clap_complete` renders them.
pub fn completions() -> Vec<(String, Vec<u8>)> {
    use clap_complete::Shell;
    [
        (Shell::Bash, "imgcache.bash"),
        (Shell::Zsh, "_imgcache"),
        (Shell::Fish, "imgcache.fish"),
    ]
    .into_iter()
    .map(|(shell, name)| {
        let mut buf = Vec::new();
        clap_complete::generate(shell, &mut crate::cli::command(), "imgcache", &mut buf);
        (name.to_string(), buf)
    })
    .collect()
}

/// Every generated file: its path relative to the repository root, and its bytes.
pub fn generated() -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(DIR);
    let mut out = vec![(dir.join("imgcache.toml"), example_config().into_bytes())];
    for (name, page) in man_pages() {
        out.push((dir.join("man").join(name), page));
    }
    for (name, script) in completions() {
        out.push((dir.join("completions").join(name), script));
    }
    out
}

/// The repository root (this crate is `crates/cli`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Host, Layer, Settings};
    use std::collections::BTreeSet;

    #[test]
    fn packaging_files_are_up_to_date() {
        let root = repo_root();
        let update = std::env::var("UPDATE_PACKAGING").is_ok_and(|v| v == "1");
        let files = generated();
        let mut stale = Vec::new();
        for (rel, want) in &files {
            let path = root.join(rel);
            if std::fs::read(&path).ok().as_deref() == Some(want.as_slice()) {
                continue;
            }
            if update {
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(&path, want).unwrap();
                eprintln!("wrote {}", rel.display());
            } else {
                stale.push(format!("{} differs or is missing", rel.display()));
            }
        }
        // Pages or scripts of commands that are gone.
        let ours: BTreeSet<&PathBuf> = files.iter().map(|(p, _)| p).collect();
        for sub in ["man", "completions"] {
            let rel_dir = Path::new(DIR).join(sub);
            let Ok(entries) = std::fs::read_dir(root.join(&rel_dir)) else {
                continue;
            };
            for e in entries.flatten() {
                let rel = rel_dir.join(e.file_name());
                if ours.contains(&rel) {
                    continue;
                }
                if update {
                    std::fs::remove_file(root.join(&rel)).unwrap();
                    eprintln!("removed {}", rel.display());
                } else {
                    stale.push(format!("{} is not generated any more", rel.display()));
                }
            }
        }
        assert!(
            stale.is_empty(),
            "the generated packaging files are out of date:\n  {}\nregenerate them with `{UPDATE_COMMAND}` \
             and commit the result",
            stale.join("\n  ")
        );
    }

    fn root_host() -> Host {
        Host {
            is_root: true,
            xdg_cache_home: None,
            home: None,
        }
    }

    fn resolve(layer: Layer) -> Settings {
        Settings::resolve(layer, Layer::default(), Layer::default(), &root_host()).unwrap()
    }

    /// The commented-out TOML lines (`#key = ...`, `#[table]`) uncommented; comments dropped.
    fn uncommented(text: &str) -> String {
        text.lines()
            .filter_map(|l| {
                let rest = l.strip_prefix('#')?;
                (!rest.is_empty() && !rest.starts_with([' ', '#'])).then_some(rest)
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// packaging/imgcache.toml through the real parser: as shipped (all commented out) it
    /// changes nothing; uncommented it parses, every default line means the default, and
    /// every example line takes effect. The text is the generated one, which
    /// `packaging_files_are_up_to_date` holds the committed file to (reading the file here
    /// would race that test's rewrite under `UPDATE_PACKAGING=1`).
    #[test]
    fn example_config_parses_to_the_defaults() {
        let path = Path::new(DIR).join("imgcache.toml");
        let text = example_config();
        assert_eq!(
            Layer::from_toml(&text).unwrap(),
            Layer::default(),
            "the shipped file sets nothing"
        );
        if std::env::var_os("UPDATE_PACKAGING").is_none() {
            // The committed file, through the file reader too.
            let committed = repo_root().join(&path);
            assert_eq!(Layer::from_file(&committed).unwrap(), Layer::default());
        }
        let all = uncommented(&text);
        let layer = Layer::from_toml(&all).unwrap_or_else(|e| panic!("{e:#}\n{all}"));
        let s = resolve(layer);
        assert_eq!(s.caches.len(), 1, "the [caches.instance] example");
        assert_eq!(
            s.caches[0].max_size,
            imgcache_store::registry::DEFAULT_MAX_SIZE
        );

        let defaults = resolve(Layer::default());
        let keys: Vec<&str> = all
            .lines()
            .filter_map(|l| l.split_once(" = ").map(|(k, _)| k))
            .collect();
        for d in SETTINGS {
            assert!(
                keys.contains(&d.toml),
                "{} is not in {}",
                d.toml,
                path.display()
            );
            let line = format!("{} = {}", d.toml, d.example);
            let one = resolve(Layer::from_toml(&line).unwrap_or_else(|e| panic!("{line}: {e:#}")));
            if shows_default(d) {
                assert_eq!(one, defaults, "`{line}` is not the default ({})", d.default);
            } else {
                assert_ne!(one, defaults, "`{line}` changes nothing");
            }
        }
    }

    #[test]
    fn man_pages_and_completions_cover_every_command() {
        let pages = man_pages();
        let names: Vec<&str> = pages.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names[0], "imgcache.1");
        for sub in crate::cli::command().get_subcommands() {
            let page = format!("imgcache-{}.1", sub.get_name());
            assert!(names.contains(&page.as_str()), "{page} missing: {names:?}");
        }
        let top = String::from_utf8(pages[0].1.clone()).unwrap();
        assert!(top.contains("IMGCACHE_CONFIG"), "{top}");
        let serve = &pages
            .iter()
            .find(|(n, _)| n == "imgcache-serve.1")
            .unwrap()
            .1;
        let serve = String::from_utf8_lossy(serve);
        assert!(serve.contains("IMGCACHE_LISTEN"), "{serve}");
        for (name, script) in completions() {
            let script = String::from_utf8(script).unwrap();
            assert!(
                script.contains("serve") && script.contains("allow-href-prefix"),
                "{name}"
            );
        }
    }

    #[test]
    fn comments_wrap() {
        let c = comment(&"word ".repeat(40), 2);
        for l in c.lines() {
            assert!(l.len() <= WIDTH, "{l:?}");
        }
        assert!(c.lines().nth(1).unwrap().starts_with("#   word"), "{c}");
        assert_eq!(comment("one line.", 0), "# one line.\n");
    }
}
