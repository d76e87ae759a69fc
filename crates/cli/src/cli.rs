//! The command line, as clap derive types. Parsing only; the work is in `commands`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use imgcache_store::{DriverKind, Integrity};

use crate::config::Layer;
use crate::settings;

/// imgcache: a crash-safe disk cache for VM images.
///
/// Configuration comes from a TOML file (--config), then IMGCACHE_* environment variables
/// (empty means unset), then flags, each overriding the one before; `imgcache --help` lists
/// every setting under --config. Sizes take binary units (10G = 10 GiB); durations take
/// humantime units (90s, 24h, 7d).
#[derive(Debug, Parser)]
#[command(name = "imgcache", version, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Cache directory
    #[arg(long, global = true, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,

    /// TOML configuration file (its help is built from the settings table, see `command`)
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Metadata driver
    #[arg(long, global = true, value_enum)]
    pub driver: Option<DriverArg>,

    /// Print machine-readable JSON instead of text
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DriverArg {
    /// Records in an embedded SQLite database in the cache directory (needs nothing installed)
    Sqlite,
    /// Records in user.imgcache.* extended attributes of the image files
    Xattr,
}

impl From<DriverArg> for DriverKind {
    fn from(d: DriverArg) -> Self {
        match d {
            DriverArg::Sqlite => DriverKind::Sqlite,
            DriverArg::Xattr => DriverKind::Xattr,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List cached images (ordered by image id)
    List {
        /// List the queued image ids instead, oldest first
        #[arg(long)]
        queued: bool,
    },
    /// Publish a local file into the cache under KEY (sha256 computed while copying)
    Add(AddArgs),
    /// Queue KEY for prefetching
    Queue {
        /// Image key ([A-Za-z0-9._-], 1-255 chars, not starting with '.')
        key: String,
    },
    /// Delete KEY from the cache and from the queue
    Delete {
        /// Image key
        key: String,
    },
    /// Delete every cached image and/or queued entry
    Clear {
        /// What to clear
        #[arg(long, value_enum, default_value_t = ClearTarget::All)]
        target: ClearTarget,
    },
    /// Evict least recently accessed images until the cache fits in max size
    Prune {
        /// Size to prune to, e.g. 10G, 512M, 0
        #[arg(long, value_name = "SIZE", value_parser = size_parser)]
        max_size: Option<u64>,
    },
    /// Remove stalled incomplete writes, invalid files and records whose file vanished
    Clean {
        /// Age after which an unfinished write counts as stalled, e.g. 24h, 30m
        #[arg(long, value_name = "DURATION", value_parser = duration_parser)]
        stall_time: Option<Duration>,
    },
    /// Check the cache directory's files against its records; --repair fixes what disagrees
    ///
    /// Reports records without files, files without records, stale incomplete writes (older
    /// than the stall time, writer gone), lock files of keys with nothing left, a driver
    /// marker that disagrees with where the records are, and a missing, empty or unreadable
    /// database in a directory that holds images. With --repair: records without files are
    /// removed; files without records are adopted with a freshly computed sha256 and their
    /// size, or moved aside into invalid/ when they cannot be read or are unsafe images; stale
    /// writes and lock files are removed; the marker is rewritten; an unreadable database is
    /// moved aside into invalid/ and rebuilt from the files.
    ///
    /// Exit status: 0 clean (or, with --repair, every problem repaired); 1 problems found
    /// (without --repair), or some left unrepaired; 2 usage error; 8 the check could not run
    /// (the reason as one line on stderr).
    Fsck(FsckArgs),
    /// Show the cache's driver, location, size and counts
    Stats,
    /// Re-hash cached images (all, or the given keys) against their recorded checksums; a
    /// mismatch is moved to invalid/ and its record dropped (exit 1 when any mismatched)
    Verify {
        /// Image keys to verify (default: every cached image)
        keys: Vec<String>,
        /// No progress bar (it is only shown when stderr is a terminal anyway)
        #[arg(short, long)]
        quiet: bool,
    },
    /// Inspect a disk image file: its format (read from its bytes, never its name), virtual
    /// size, header facts and every safety verdict; exits 1 when the image would be refused
    Inspect {
        /// The image file
        file: PathBuf,
        /// The format the image is declared as (raw, qcow2, vmdk, vhd, vhdx, vdi, iso, luks,
        /// ami, aki, ari); the content must match it
        #[arg(long, value_name = "FMT")]
        format: Option<String>,
    },
    /// Fetch an image (http(s) URL, file:// path or Glance id) into DEST through the cache:
    /// downloaded once, verified, then hard-linked (copied across filesystems)
    Fetch(FetchArgs),
    /// Clean up provisioning caches: leftovers, masters past their TTL, then least recently
    /// used ones until each fits its size (all caches unless --cache is given)
    Cleanup {
        /// Only this named cache ([caches.NAME] in the config; "default" is --cache-dir)
        #[arg(long)]
        cache: Option<String>,
        /// Stop once this many bytes are reclaimed (e.g. 5G)
        #[arg(long, value_parser = size_parser)]
        amount: Option<u64>,
    },
    /// List the provisioning caches: directory, priority, limits, size and free space
    Caches,
    /// Read the fleet index: live nodes, or who holds an image (fleet mode)
    Fleet(FleetArgs),
    /// Run the caching image server: Glance's image download and cache-management API,
    /// one origin download per image with every client streamed while it runs
    Serve(ServeArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub formats: FormatArgs,
    /// Address to listen on, HOST:PORT: an IP ([::1]:9292 for IPv6) or a host name, resolved
    #[arg(long, value_name = "HOST:PORT", value_parser = listen_parser)]
    pub listen: Option<String>,
    /// Upstream Glance endpoint
    #[arg(long, value_name = "URL")]
    pub glance_url: Option<String>,
    /// X-Auth-Token that grants the cache-management API
    #[arg(long, value_name = "SECRET")]
    pub admin_token: Option<String>,
    #[command(flatten)]
    pub fleet: FleetFlags,
    /// /v1/fetch serves only hrefs under the URL PREFIX (scheme, host, port exact; path on a segment boundary; every redirect re-checked) (repeatable)
    #[arg(long = "allow-href-prefix", value_name = "PREFIX")]
    pub allow_href_prefix: Vec<String>,
    /// Hard limit on the cache's size, e.g. 10G
    #[arg(long, value_name = "SIZE", value_parser = size_parser)]
    pub max_size: Option<u64>,
    /// Directory file:// hrefs may read from (repeatable; none by default)
    #[arg(long, value_name = "DIR")]
    pub allow_file_dir: Vec<PathBuf>,
    /// After SIGTERM/SIGINT, how long in-flight responses may run before they are cut
    #[arg(long, value_name = "DURATION", value_parser = duration_parser)]
    pub shutdown_grace: Option<Duration>,
    /// A client must send its request headers within this (slowloris protection)
    #[arg(long, value_name = "DURATION", value_parser = interval_parser)]
    pub header_read_timeout: Option<Duration>,
    /// How long an upstream "this token may read this image" answer is reused
    #[arg(long, value_name = "DURATION", value_parser = duration_parser)]
    pub auth_cache_ttl: Option<Duration>,
    /// TLS certificate chain (PEM); serves HTTPS with --tls-key
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM)
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Log format on stderr
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Re-hash every cached image against its recorded checksum this often, in the
    /// background at low priority (a mismatch goes to invalid/), e.g. 24h
    #[arg(long, value_name = "DURATION", value_parser = duration_parser)]
    pub scrub_interval: Option<Duration>,
}

/// `--fleet-db`, defined once for every command that reads or joins the fleet.
#[derive(Debug, Args)]
pub struct FleetDbFlag {
    /// Fleet mode: the shared PostgreSQL index, e.g. postgresql://user@host:5432/imgcache;
    /// a miss fills from a live holder, else under the fleet's one origin lease
    #[arg(long, value_name = "URL")]
    pub fleet_db: Option<String>,
}

/// The flags of a fleet member (`serve` and `fetch`), defined once.
#[derive(Debug, Args)]
pub struct FleetFlags {
    #[command(flatten)]
    pub db: FleetDbFlag,
    /// Fleet mode: how peers and clients reach this node (for fetch: the URL of a `serve` on
    /// the same cache, which serves its images to peers)
    #[arg(long, value_name = "URL")]
    pub node_url: Option<String>,
    /// Fleet mode: the token peers present to each other
    #[arg(long, value_name = "SECRET")]
    pub fleet_token: Option<String>,
}

impl FleetFlags {
    /// Puts the flags given into the command line's layer of settings.
    fn apply(&self, layer: &mut Layer) {
        layer.fleet_db = self.db.fleet_db.clone();
        layer.node_url = self.node_url.clone();
        layer.fleet_token = self.fleet_token.clone();
    }
}

#[derive(Debug, Args)]
pub struct FleetArgs {
    #[command(flatten)]
    pub db: FleetDbFlag,
    #[command(subcommand)]
    pub what: FleetCommand,
}

#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// Live nodes: URL, heartbeat age, what each holds and is filling
    Nodes,
    /// The live nodes holding or filling an image (Glance's cache-nodes-list, with states)
    Holders {
        /// Image key (a Glance image id)
        id: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The formats an image may have at all: one flag for `fetch` and `serve`.
#[derive(Debug, Args)]
pub struct FormatArgs {
    /// Image formats accepted at all, comma-separated [default: fetch raw,gpt,qcow2,iso;
    /// serve: every format the inspector knows (unsafe images are refused either way)]
    #[arg(long, value_name = "FMT,...", value_delimiter = ',')]
    pub permitted_formats: Vec<String>,
}

impl FormatArgs {
    /// The policy the flag asks for; `None` when it is not given.
    pub fn policy(&self) -> anyhow::Result<Option<imgcache_fetch::formats::Policy>> {
        if self.permitted_formats.is_empty() {
            return Ok(None);
        }
        let permitted = self
            .permitted_formats
            .iter()
            .map(|f| f.parse::<imgcache_fetch::formats::Format>())
            .collect::<Result<_, _>>()?;
        Ok(Some(imgcache_fetch::formats::Policy { permitted }))
    }
}

#[derive(Debug, Args)]
pub struct FetchArgs {
    /// Image href: http(s)://..., file:///path, a Glance image UUID or glance://UUID
    pub href: String,
    /// Destination file (its directory must exist); replaced atomically
    pub dest: PathBuf,
    /// Fetch as raw (keyed KEY.converted, as Ironic's force_raw): images in another format
    /// are converted with qemu-img (raw and ISO images are used as they are)
    #[arg(long)]
    pub raw: bool,
    /// The format the image is declared as (raw, qcow2, vmdk, vhd, vhdx, vdi, iso, ami, aki,
    /// ari): the content must match it [default: Glance's disk_format for image ids]
    #[arg(long, value_name = "FMT")]
    pub format: Option<String>,
    #[command(flatten)]
    pub formats: FormatArgs,
    /// Cache zstd-compressed downloads as they are instead of decompressing them
    #[arg(long)]
    pub no_zstd: bool,
    /// The qemu-img used for --raw conversions
    #[arg(
        long,
        value_name = "PATH",
        env = "IMGCACHE_QEMU_IMG",
        default_value = "qemu-img"
    )]
    pub qemu_img: PathBuf,
    /// Expected checksum ALGO:HEX (md5, sha256, sha512) or the URL of a SHA256SUMS-style file
    #[arg(long, value_name = "ALGO:HEX|URL")]
    pub checksum: Option<String>,
    /// Named cache to fetch through ([caches.NAME]); default: --cache-dir
    #[arg(long)]
    pub cache: Option<String>,
    /// Glance endpoint for image ids
    #[arg(long, value_name = "URL")]
    pub glance_url: Option<String>,
    /// Directory file:// hrefs may read from (repeatable; none by default)
    #[arg(long, value_name = "DIR")]
    pub allow_file_dir: Vec<PathBuf>,
    /// Use an http(s) master without asking the origin within this time of its last check
    /// (0s: one conditional request on every call, as Ironic does)
    #[arg(long, value_parser = duration_parser)]
    pub revalidate_interval: Option<Duration>,
    /// Extra CA certificates (PEM) to trust
    #[arg(long, value_name = "FILE")]
    pub ca_bundle: Option<PathBuf>,
    /// Accept any TLS certificate (labs only)
    #[arg(long)]
    pub insecure: bool,
    #[command(flatten)]
    pub fleet: FleetFlags,
    /// No progress bar (it is only shown when stderr is a terminal anyway)
    #[arg(short, long)]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct FsckArgs {
    /// Repair what is found (without it, nothing is changed)
    #[arg(long)]
    pub repair: bool,
    /// Age after which an unfinished write counts as stalled, e.g. 24h, 30m
    #[arg(long, value_name = "DURATION", value_parser = duration_parser)]
    pub stall_time: Option<Duration>,
    /// No progress bar while hashing (it is only shown when stderr is a terminal anyway)
    #[arg(short, long)]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct AddArgs {
    /// Image key ([A-Za-z0-9._-], 1-255 chars, not starting with '.')
    pub key: String,
    /// Local file to publish
    pub file: PathBuf,
    /// Expected checksum, ALGO:HEX with ALGO md5, sha256 or sha512; a mismatch publishes nothing
    #[arg(long, value_name = "ALGO:HEX", value_parser = checksum_parser)]
    pub checksum: Option<Integrity>,
    /// No progress bar (it is only shown when stderr is a terminal anyway)
    #[arg(short, long)]
    pub quiet: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ClearTarget {
    Cache,
    Queue,
    All,
}

/// The clap command, each setting's flags annotated from [`crate::settings::SETTINGS`]
/// (`[env: ...] [config: ...] [default: ...]`) and `--config`'s help listing every key.
pub fn command() -> clap::Command {
    use clap::CommandFactory;
    let mut cmd = Cli::command().mut_arg("config", |a| {
        a.help(settings::config_help())
            .long_help(settings::config_long_help())
    });
    for def in settings::SETTINGS {
        for (sub, long) in def.flags() {
            let annotate = |c: clap::Command| -> clap::Command {
                let id = c
                    .get_arguments()
                    .find(|a| a.get_long() == Some(long))
                    .unwrap_or_else(|| {
                        panic!(
                            "SETTINGS: {}: no flag --{long} on {}",
                            def.toml,
                            c.get_name()
                        )
                    })
                    .get_id()
                    .clone();
                c.mut_arg(id, |a| {
                    let suffix = def.help_suffix();
                    let help = match a.get_help() {
                        Some(h) => format!("{h} {suffix}"),
                        None => suffix.clone(),
                    };
                    let long_help = a.get_long_help().map(|h| format!("{h} {suffix}"));
                    let a = a.help(help);
                    match long_help {
                        Some(h) => a.long_help(h),
                        None => a,
                    }
                })
            };
            cmd = match sub {
                None => annotate(cmd),
                Some(sub) => cmd.mut_subcommand(sub, annotate),
            };
        }
    }
    cmd
}

/// Parses the process's arguments with [`command`]; usage errors exit 2, --help 0.
pub fn parse() -> Cli {
    use clap::FromArgMatches;
    let mut matches = command().get_matches();
    Cli::from_arg_matches_mut(&mut matches).unwrap_or_else(|e| e.format(&mut command()).exit())
}

fn size_parser(s: &str) -> Result<u64, String> {
    imgcache_settings::parse_size(s).map_err(|e| e.to_string())
}

fn listen_parser(s: &str) -> Result<String, String> {
    imgcache_settings::parse_listen(s).map_err(|e| e.to_string())
}

fn duration_parser(s: &str) -> Result<Duration, String> {
    imgcache_settings::parse_duration(s).map_err(|e| e.to_string())
}

fn interval_parser(s: &str) -> Result<Duration, String> {
    imgcache_settings::parse_interval(s).map_err(|e| e.to_string())
}

fn checksum_parser(s: &str) -> Result<Integrity, String> {
    s.parse::<Integrity>().map_err(|e| e.to_string())
}

impl Cli {
    /// The configuration the flags give (flag or, via clap, its environment variable).
    pub fn flag_layer(&self) -> Layer {
        let (max_size, stall_time) = match &self.command {
            Command::Prune { max_size } => (*max_size, None),
            Command::Clean { stall_time } => (None, *stall_time),
            Command::Fsck(a) => (None, a.stall_time),
            Command::Serve(a) => (a.max_size, None),
            _ => (None, None),
        };
        let mut layer = Layer {
            cache_dir: self.global.cache_dir.clone(),
            driver: self.global.driver.map(Into::into),
            max_size,
            stall_time,
            ..Layer::default()
        };
        if let Command::Fetch(f) = &self.command {
            layer.glance_url = f.glance_url.clone();
            if !f.allow_file_dir.is_empty() {
                layer.allow_file_dirs = Some(f.allow_file_dir.clone());
            }
            layer.revalidate_interval = f.revalidate_interval;
            layer.ca_bundle = f.ca_bundle.clone();
            layer.insecure = f.insecure.then_some(true);
            f.fleet.apply(&mut layer);
        }
        if let Command::Fleet(a) = &self.command {
            layer.fleet_db = a.db.fleet_db.clone();
        }
        if let Command::Serve(a) = &self.command {
            layer.listen = a.listen.clone();
            layer.glance_url = a.glance_url.clone();
            layer.admin_token = a.admin_token.clone();
            a.fleet.apply(&mut layer);
            if !a.allow_href_prefix.is_empty() {
                layer.allow_href_prefixes = Some(a.allow_href_prefix.clone());
            }
            if !a.allow_file_dir.is_empty() {
                layer.allow_file_dirs = Some(a.allow_file_dir.clone());
            }
            layer.scrub_interval = a.scrub_interval;
            layer.shutdown_grace = a.shutdown_grace;
            layer.header_read_timeout = a.header_read_timeout;
            layer.auth_cache_ttl = a.auth_cache_ttl;
        }
        layer
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
        // Also: every flag SETTINGS names exists (command() panics otherwise).
        command().debug_assert();
    }

    #[test]
    fn help_is_annotated_from_the_settings_table() {
        let mut cmd = command();
        let help = cmd.render_long_help().to_string();
        for def in settings::SETTINGS {
            let entry = format!("{} ({})", def.toml, def.name.replace('`', ""));
            assert!(help.contains(&entry), "{entry} missing:\n{help}");
            for env in def.env {
                assert!(help.contains(env), "{env} missing:\n{help}");
            }
        }
        assert!(help.contains("[caches.NAME]"), "{help}");
        let short = cmd.render_help().to_string();
        for def in settings::SETTINGS {
            assert!(
                short.contains(def.toml),
                "{} missing from -h:\n{short}",
                def.toml
            );
        }
        let mut prune = command();
        let prune = prune
            .find_subcommand_mut("prune")
            .unwrap()
            .render_help()
            .to_string();
        assert!(
            prune.contains(
                "[env: IMGCACHE_MAX_SIZE] [config: max_size] [default: 10G (Glance's default)]"
            ),
            "{prune}"
        );
    }

    #[test]
    fn flags_become_a_layer() {
        let cli = Cli::try_parse_from([
            "imgcache",
            "prune",
            "--max-size",
            "1G",
            "--cache-dir",
            "/c",
            "--driver",
            "xattr",
        ])
        .unwrap();
        let l = cli.flag_layer();
        assert_eq!(l.max_size, Some(1 << 30));
        assert_eq!(l.cache_dir, Some("/c".into()));
        assert_eq!(l.driver, Some(DriverKind::Xattr));
        assert!(Cli::try_parse_from(["imgcache", "prune", "--max-size", "10Q"]).is_err());
        assert!(Cli::try_parse_from(["imgcache", "add", "k", "f", "--checksum", "x"]).is_err());
    }
}
