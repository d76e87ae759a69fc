//! Runs the real `imgcache` binary against temporary cache directories, on both drivers.
//!
//! Temp dirs live under CARGO_TARGET_TMPDIR (the target dir's filesystem), which on the CI
//! machines is ext4 with user xattrs, so the xattr runs are never skipped.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use imgcache_store::{Algorithm, Integrity};
use serde_json::Value;
use tempfile::TempDir;

const DRIVERS: [&str; 2] = ["sqlite", "xattr"];

struct Env {
    dir: TempDir,
    driver: &'static str,
}

impl Env {
    fn new(driver: &'static str) -> Env {
        Env {
            dir: tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap(),
            driver,
        }
    }

    fn cache(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A file of `len` pseudo-random bytes (xorshift: fast, and no two blocks alike).
    fn image(&self, name: &str, len: usize) -> PathBuf {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ len as u64 ^ name.len() as u64;
        let mut bytes = Vec::with_capacity(len + 8);
        while bytes.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            bytes.extend_from_slice(&x.to_le_bytes());
        }
        bytes.truncate(len);
        let p = self.path(name);
        fs::write(&p, bytes).unwrap();
        p
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = bare();
        c.arg("--cache-dir")
            .arg(self.cache())
            .arg("--driver")
            .arg(self.driver)
            .args(args);
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Runs and expects success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "imgcache {args:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        let s = self.ok(&a);
        serde_json::from_str(&s).unwrap_or_else(|e| panic!("{args:?}: {e}: {s}"))
    }
}

/// The binary with no IMGCACHE_* settings inherited from the environment.
fn bare() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_imgcache"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("IMGCACHE_") {
            c.env_remove(&k);
        }
    }
    c.env_remove("RUST_BACKTRACE").stdin(Stdio::null());
    c
}

/// Failed with `code`, and said why in exactly one line on stderr, without panicking. A
/// phase that ran before the failure may have said how far it got, on a line of its own
/// (`imgcache: download: ...`, stderr not being a terminal): that line is not the error.
fn assert_one_line_error(out: &Output, code: i32, needle: &str) -> String {
    let all = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "stderr: {all}");
    let err: String = all
        .lines()
        .filter(|l| !l.starts_with("imgcache: download: "))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(!err.contains("panicked"), "{err}");
    assert!(!err.contains("backtrace"), "{err}");
    assert_eq!(err.lines().count(), 1, "one line expected: {err:?}");
    assert!(err.starts_with("imgcache: "), "{err}");
    assert!(err.contains(needle), "{needle:?} not in {err:?}");
    err
}

fn sha256(path: &Path) -> String {
    Integrity::of(Algorithm::Sha256, &fs::read(path).unwrap()).to_string()
}

fn ids(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| r["image_id"].as_str().unwrap().to_string())
        .collect()
}

fn every_subcommand(driver: &'static str) {
    let env = Env::new(driver);
    let img = env.image("a.img", 300_000);
    let img_s = img.to_str().unwrap();
    let sum = sha256(&img);

    // add: text, then JSON with a verified checksum.
    let out = env.ok(&["add", "alpha", img_s]);
    assert!(out.starts_with("added alpha\n"), "{out}");
    assert!(out.contains(&sum), "{out}");
    let v = env.json(&["add", "beta", img_s, "--checksum", &sum, "--quiet"]);
    assert_eq!(v["status"], "added");
    assert_eq!(v["record"]["size"], 300_000);
    assert_eq!(v["record"]["checksum"], sum.as_str());
    assert_eq!(
        fs::read(env.cache().join("beta")).unwrap(),
        fs::read(&img).unwrap()
    );

    // Adding again is not an error, and says so.
    let out = env.ok(&["add", "alpha", img_s]);
    assert!(out.contains("alpha is already cached"), "{out}");
    assert_eq!(
        env.json(&["add", "alpha", img_s])["status"],
        "already_cached"
    );

    // list: a table, and JSON ordered by image id.
    let table = env.ok(&["list"]);
    assert!(table.contains("alpha") && table.contains("beta"), "{table}");
    assert!(table.contains("Image ID"), "{table}");
    assert_eq!(ids(&env.json(&["list"])), ["alpha", "beta"]);

    // queue
    assert_eq!(env.json(&["queue", "gamma"])["status"], "queued");
    assert_eq!(env.json(&["queue", "gamma"])["status"], "already_queued");
    assert_eq!(env.json(&["queue", "alpha"])["status"], "already_cached");
    assert!(env.ok(&["queue", "delta"]).contains("queued delta"));
    assert_eq!(
        env.json(&["list", "--queued"]),
        serde_json::json!(["gamma", "delta"])
    );

    // stats
    let s = env.json(&["stats"]);
    assert_eq!(s["driver"], driver);
    assert_eq!(s["size"], 600_000);
    assert_eq!(s["entries"], 2);
    assert_eq!(s["queued"], 2);
    assert_eq!(s["incomplete"], 0);
    assert_eq!(s["invalid"], 0);
    assert_eq!(s["max_size"], 10u64 << 30);
    assert_eq!(s["stall_time_seconds"], 86_400);
    assert_eq!(s["cache_dir"], env.cache().to_str().unwrap());
    assert!(
        env.ok(&["stats"])
            .contains(&format!("driver      {driver}"))
    );

    // prune: to 400 KB evicts one (the least recently accessed: alpha), to 0 evicts the rest.
    let p = env.json(&["prune", "--max-size", "400K"]);
    assert_eq!(p["evicted"][0]["image_id"], "alpha");
    assert_eq!(p["bytes_freed"], 300_000);
    assert_eq!(p["size_after"], 300_000);
    let out = env.ok(&["prune", "--max-size", "0"]);
    assert!(out.contains("evicted beta"), "{out}");
    assert_eq!(env.json(&["list"]), serde_json::json!([]));
    assert!(env.ok(&["list"]).contains("no cached images"));

    // clean: a stalled write and an invalid file go, a foreign file stays.
    env.ok(&["add", "alpha", img_s]);
    fs::write(env.cache().join("incomplete").join("stalled"), b"partial").unwrap();
    fs::write(env.cache().join("invalid").join("broken"), b"bad").unwrap();
    fs::write(env.cache().join("foreign.img"), b"not ours").unwrap();
    let c = env.json(&["clean", "--stall-time", "0s"]);
    assert_eq!(c["stalled"], serde_json::json!(["stalled"]));
    assert_eq!(c["invalid"], serde_json::json!(["broken"]));
    assert_eq!(c["foreign_files"], serde_json::json!(["foreign.img"]));
    assert!(env.cache().join("foreign.img").exists());
    assert!(env.cache().join("alpha").exists());
    let out = env.ok(&["clean"]);
    assert!(
        out.contains("foreign files left alone        foreign.img"),
        "{out}"
    );

    // delete: from cache and queue; twice is an error.
    let d = env.json(&["delete", "alpha"]);
    assert_eq!(
        d,
        serde_json::json!({"image_id": "alpha", "cached": true, "record_only": false, "queued": false})
    );
    assert!(
        env.ok(&["delete", "gamma"])
            .contains("removed gamma from the queue")
    );
    assert_one_line_error(
        &env.run(&["delete", "alpha"]),
        1,
        "neither cached nor queued",
    );

    // clear: counts, per target.
    env.ok(&["add", "alpha", img_s]);
    env.ok(&["add", "beta", img_s]);
    env.ok(&["queue", "gamma"]);
    assert_eq!(
        env.json(&["clear", "--target", "queue"]),
        serde_json::json!({"cached_deleted": 0, "queued_deleted": 2})
    );
    env.ok(&["queue", "gamma"]);
    let out = env.ok(&["clear"]);
    assert_eq!(out, "deleted 2 cached images and 1 queued image\n");
    assert_eq!(
        env.json(&["clear", "--target", "cache"]),
        serde_json::json!({"cached_deleted": 0, "queued_deleted": 0})
    );
}

#[test]
fn every_subcommand_sqlite() {
    every_subcommand("sqlite");
}

#[test]
fn every_subcommand_xattr() {
    every_subcommand("xattr");
}

#[test]
fn list_json_has_glance_field_names() {
    for driver in DRIVERS {
        let env = Env::new(driver);
        let img = env.image("a.img", 1000);
        env.ok(&["add", "img-1", img.to_str().unwrap()]);
        let v = env.json(&["list"]);
        let rec = &v.as_array().unwrap()[0];
        let fields: BTreeSet<&str> = rec
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        assert_eq!(
            fields,
            BTreeSet::from([
                "image_id",
                "hits",
                "last_accessed",
                "last_modified",
                "size",
                "checksum",
                // Not Glance's: where the image came from (here the file `add` took).
                "href"
            ]),
        );
        assert_eq!(rec["href"], img.to_str().unwrap());
        assert_eq!(rec["image_id"], "img-1");
        assert_eq!(rec["hits"], 0);
        assert_eq!(rec["size"], 1000);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        for t in ["last_accessed", "last_modified"] {
            let secs = rec[t].as_f64().unwrap();
            assert!(
                (now - secs).abs() < 300.0,
                "{t} = {secs} is not epoch seconds"
            );
        }
    }
}

#[test]
fn checksum_mismatch_publishes_nothing() {
    for driver in DRIVERS {
        let env = Env::new(driver);
        let img = env.image("a.img", 5000);
        let wrong = format!("sha256:{}", "0".repeat(64));
        let out = env.run(&["add", "k", img.to_str().unwrap(), "--checksum", &wrong]);
        let err = assert_one_line_error(&out, 1, "checksum mismatch for file://");
        assert!(err.contains("a.img") && err.contains(&wrong), "{err}");
        assert_eq!(env.json(&["list"]), serde_json::json!([]));
        assert_eq!(env.json(&["stats"])["invalid"], 1);

        // A cached image does not stand in for different bytes.
        env.ok(&["add", "k", img.to_str().unwrap()]);
        let out = env.run(&["add", "k", img.to_str().unwrap(), "--checksum", &wrong]);
        assert_one_line_error(&out, 1, "already cached with checksum");
    }
}

#[test]
fn invalid_keys_are_one_line_errors() {
    for driver in DRIVERS {
        let env = Env::new(driver);
        let img = env.image("a.img", 10);
        let img = img.to_str().unwrap();
        let long = "x".repeat(300);
        for (args, needle) in [
            (vec!["add", "../x", img], "invalid key"),
            (vec!["add", "", img], "invalid key: it is empty"),
            (vec!["add", &long, img], "300 bytes long"),
            (vec!["queue", ".hidden"], "must not start with '.'"),
            (vec!["delete", "a/b"], "character '/' not allowed"),
            (vec!["queue", "incomplete"], "cache's own directories"),
        ] {
            assert_one_line_error(&env.run(&args), 1, needle);
        }
        assert!(!env.path("x").exists() && !env.cache().join("x").exists());
    }
}

/// Under `--json` the error is one JSON object on stderr, with the exit code; stdout holds
/// nothing a program could mistake for a result.
#[test]
fn json_errors_are_one_object() {
    let env = Env::new("sqlite");
    let missing = env.path("nope.img");
    for (args, code, needle) in [
        (
            vec!["--json", "delete", "a/b"],
            1,
            "character '/' not allowed",
        ),
        (
            vec!["--json", "add", "k", missing.to_str().unwrap()],
            1,
            "nope.img",
        ),
        (
            vec!["--json", "delete", "never-cached"],
            1,
            "neither cached nor queued",
        ),
    ] {
        let out = env.run(&args);
        assert_eq!(out.status.code(), Some(code), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}: stdout {:?}", out.stdout);
        let err: serde_json::Value = serde_json::from_slice(&out.stderr)
            .unwrap_or_else(|e| panic!("{args:?}: not one JSON object ({e}): {:?}", out.stderr));
        assert_eq!(err["exit_code"], code, "{args:?}");
        let msg = err["error"].as_str().unwrap();
        assert!(msg.contains(needle), "{args:?}: {msg}");
        assert!(!msg.starts_with("imgcache: "), "{msg}");
    }
}

#[test]
fn missing_file() {
    let env = Env::new("sqlite");
    let missing = env.path("nope.img");
    let out = env.run(&["add", "k", missing.to_str().unwrap()]);
    assert_one_line_error(&out, 1, "cannot read");
    let out = env.run(&["add", "k", env.dir.path().to_str().unwrap()]);
    assert_one_line_error(&out, 1, "is a directory");
}

#[test]
fn bad_sizes_and_durations_are_usage_errors() {
    let env = Env::new("sqlite");
    for (args, needle) in [
        (["prune", "--max-size", "10Q"], "invalid size \"10Q\""),
        (
            ["clean", "--stall-time", "soon"],
            "invalid duration \"soon\"",
        ),
    ] {
        let out = env.run(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(needle), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    // From the environment the same mistake is a configuration error.
    let out = env
        .cmd(&["stats"])
        .env("IMGCACHE_MAX_SIZE", "10Q")
        .output()
        .unwrap();
    assert_one_line_error(&out, 1, "IMGCACHE_MAX_SIZE: invalid size \"10Q\"");
}

#[test]
fn corrupt_sqlite_is_bad_driver_configuration() {
    let env = Env::new("sqlite");
    fs::create_dir_all(env.cache()).unwrap();
    fs::write(env.cache().join(".imgcache.sqlite"), vec![0x5a; 8192]).unwrap();
    for args in [&["list"][..], &["stats"], &["prune"]] {
        let err = assert_one_line_error(&env.run(args), 1, "bad driver configuration");
        assert!(err.contains(".imgcache.sqlite"), "{err}");
    }
}

#[test]
fn unusable_cache_dir() {
    let env = Env::new("sqlite");
    let file = env.image("plain-file", 10);
    let out = bare()
        .args(["--cache-dir", file.to_str().unwrap(), "list"])
        .output()
        .unwrap();
    assert_one_line_error(&out, 1, "is not a directory");
}

#[test]
fn config_file_env_and_flags() {
    let env = Env::new("sqlite");
    let conf = env.path("imgcache.toml");
    let from_file = env.path("from-file");
    fs::write(
        &conf,
        format!(
            "cache_dir = {:?}\nmax_size = \"1.5GiB\"\nstall_time = \"7d\"\n",
            from_file.to_str().unwrap()
        ),
    )
    .unwrap();
    let stats = |cmd: &mut Command| -> Value {
        let out = cmd.args(["stats", "--json"]).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let conf_s = conf.to_str().unwrap();

    // The file alone, by flag and by IMGCACHE_CONFIG.
    let s = stats(bare().args(["--config", conf_s]));
    assert_eq!(s["cache_dir"], from_file.to_str().unwrap());
    assert_eq!(s["max_size"], 3u64 << 29);
    assert_eq!(s["stall_time_seconds"], 7 * 86_400);
    assert_eq!(s["driver"], "sqlite");
    let s = stats(bare().env("IMGCACHE_CONFIG", conf_s));
    assert_eq!(s["cache_dir"], from_file.to_str().unwrap());

    // Environment beats the file.
    let from_env = env.path("from-env");
    let s = stats(
        bare()
            .args(["--config", conf_s])
            .env("IMGCACHE_CACHE_DIR", &from_env)
            .env("IMGCACHE_MAX_SIZE", "512M")
            .env("IMGCACHE_DRIVER", "xattr"),
    );
    assert_eq!(s["cache_dir"], from_env.to_str().unwrap());
    assert_eq!(s["max_size"], 512u64 << 20);
    assert_eq!(s["driver"], "xattr");
    assert_eq!(s["stall_time_seconds"], 7 * 86_400);

    // Flags beat the environment.
    let from_flag = env.path("from-flag");
    let s = stats(
        bare()
            .args(["--config", conf_s, "--driver", "sqlite", "--cache-dir"])
            .arg(&from_flag)
            .env("IMGCACHE_CACHE_DIR", &from_env)
            .env("IMGCACHE_DRIVER", "xattr"),
    );
    assert_eq!(s["cache_dir"], from_flag.to_str().unwrap());
    assert_eq!(s["driver"], "sqlite");

    // Prune's --max-size beats the file's max_size.
    let out = bare()
        .args(["--config", conf_s, "prune", "--max-size", "0", "--json"])
        .output()
        .unwrap();
    let p: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(p["max_size"], 0);
}

#[test]
fn unknown_config_key() {
    let env = Env::new("sqlite");
    let conf = env.path("bad.toml");
    fs::write(&conf, "cache_dir = \"/tmp/x\"\nmax_sise = \"10G\"\n").unwrap();
    let out = bare()
        .args(["--config", conf.to_str().unwrap(), "stats"])
        .output()
        .unwrap();
    let err = assert_one_line_error(&out, 1, "max_sise");
    assert!(err.contains("bad.toml"), "{err}");

    let out = bare()
        .args([
            "--config",
            env.path("absent.toml").to_str().unwrap(),
            "stats",
        ])
        .output()
        .unwrap();
    assert_one_line_error(&out, 1, "absent.toml");
}

#[test]
fn usage_errors_exit_2_and_help_exits_0() {
    let out = bare().args(["frobnicate"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = bare().args(["add", "only-key"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = bare()
        .args(["--driver", "postgres", "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    // From the environment, a bad driver is a configuration error; an empty one is unset.
    let env = Env::new("sqlite");
    let cache = env.cache();
    let out = bare()
        .args(["--cache-dir", cache.to_str().unwrap(), "stats"])
        .env("IMGCACHE_DRIVER", "postgres")
        .output()
        .unwrap();
    assert_one_line_error(&out, 1, "IMGCACHE_DRIVER: unknown driver \"postgres\"");
    let out = bare()
        .args(["--cache-dir", cache.to_str().unwrap(), "stats"])
        .env("IMGCACHE_DRIVER", "")
        .env("IMGCACHE_CONFIG", "")
        .env("IMGCACHE_MAX_SIZE", "")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = bare().args(["--help"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    for cmd in [
        "list", "add", "queue", "delete", "clear", "prune", "clean", "stats",
    ] {
        assert!(help.contains(cmd), "{cmd} missing from --help");
    }
}

/// Two `imgcache add` processes for one key, started together on a 64 MiB file: exactly one
/// publishes, the other waits on the key lock and reports the image already cached, and the
/// cached bytes are the file's.
#[test]
fn concurrent_adds_publish_once() {
    for driver in DRIVERS {
        let env = Env::new(driver);
        let img = env.image("big.img", 64 << 20);
        let img_s = img.to_str().unwrap();
        let children: Vec<_> = (0..2)
            .map(|_| {
                env.cmd(&["add", "same-key", img_s, "--json"])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let mut statuses: Vec<String> = children
            .into_iter()
            .map(|c| {
                let out = c.wait_with_output().unwrap();
                assert!(
                    out.status.success(),
                    "{driver}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let v: Value = serde_json::from_slice(&out.stdout).unwrap();
                assert_eq!(v["record"]["size"], 64 << 20);
                v["status"].as_str().unwrap().to_string()
            })
            .collect();
        statuses.sort();
        assert_eq!(statuses, ["added", "already_cached"], "{driver}");
        assert_eq!(
            sha256(&env.cache().join("same-key")),
            sha256(&img),
            "{driver}"
        );
        let s = env.json(&["stats"]);
        assert_eq!(s["entries"], 1);
        assert_eq!(s["incomplete"], 0);
        assert_eq!(s["invalid"], 0);
    }
}

/// `add` enters through the admission pipeline too: an unsafe image is refused, whatever the
/// operator's intent, and nothing is published.
#[test]
fn add_refuses_an_unsafe_image() {
    let env = Env::new(DRIVERS[0]);
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![0u8; 65536]).unwrap();
    let img = dir.path().join("backed.qcow2");
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&base)
        .arg(&img)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let out = env.run(&["add", "k", img.to_str().unwrap()]);
    assert_one_line_error(&out, 1, "backing file");
    assert_eq!(env.json(&["list"]), serde_json::json!([]));
}
