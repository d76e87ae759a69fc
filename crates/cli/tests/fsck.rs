//! Nothing owned deleted or forgotten, through the real binary: `delete` of a file without a
//! record, a cache directory whose records are gone, `fsck [--repair] [--json]` and its exit
//! codes, and `serve`'s startup check.

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

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
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_imgcache"));
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("IMGCACHE_") {
                c.env_remove(&k);
            }
        }
        c.stdin(Stdio::null())
            .arg("--cache-dir")
            .arg(self.cache())
            .arg("--driver")
            .arg(self.driver)
            .args(args);
        c
    }
    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "imgcache {args:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
    /// Publishes `len` bytes under `key` with `add`.
    fn add(&self, key: &str, len: usize) -> Vec<u8> {
        let data = imgcache_testkit::image_bytes(len, key.len() as u64).to_vec();
        let src = self.dir.path().join(format!("{key}.src"));
        fs::write(&src, &data).unwrap();
        self.ok(&["add", key, src.to_str().unwrap(), "-q"]);
        data
    }
    fn ids(&self) -> Vec<String> {
        let v: Value = serde_json::from_str(&self.ok(&["--json", "list"])).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| r["image_id"].as_str().unwrap().to_string())
            .collect()
    }
}

/// Exited with `code`, one line on stderr containing `needle`; returns that line.
fn one_line_error(out: &Output, code: i32, needle: &str) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "one line expected: {err:?}");
    assert!(
        err.starts_with("imgcache: ") && err.contains(needle),
        "{needle:?} not in {err:?}"
    );
    err
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn remove_db(cache: &Path) {
    for f in [
        ".imgcache.sqlite",
        ".imgcache.sqlite-wal",
        ".imgcache.sqlite-shm",
    ] {
        let _ = fs::remove_file(cache.join(f));
    }
}

#[test]
fn delete_refuses_a_file_without_a_record_and_leaves_it_alone() {
    for driver in DRIVERS {
        let env = Env::new(driver);
        env.add("mine", 1000);
        let f = env.cache().join("f");
        fs::write(&f, b"x\n").unwrap();
        let out = env.run(&["delete", "f"]);
        let err = one_line_error(
            &out,
            1,
            &format!(
                "{} is not a cached image (no record): left alone; `imgcache fsck --repair` adopts or moves aside files without records",
                f.display()
            ),
        );
        assert!(stdout(&out).is_empty(), "{driver}: {err}");
        assert_eq!(fs::read(&f).unwrap(), b"x\n", "{driver}");
        // Queued too: the queue entry stays, as the whole delete was refused.
        env.ok(&["queue", "f"]);
        one_line_error(&env.run(&["delete", "f"]), 1, "no record");
        assert_eq!(env.ok(&["list", "--queued"]).trim(), "f");

        assert_eq!(env.ok(&["delete", "mine"]).trim(), "deleted mine");
        assert!(!env.cache().join("mine").exists());
        // clear leaves it alone too.
        env.ok(&["clear"]);
        assert_eq!(fs::read(&f).unwrap(), b"x\n");
        one_line_error(
            &env.run(&["delete", "gone"]),
            1,
            "gone is neither cached nor queued",
        );
    }
}

#[test]
fn delete_of_a_record_whose_file_went_says_so() {
    let env = Env::new("sqlite");
    env.add("a", 100);
    fs::remove_file(env.cache().join("a")).unwrap();
    assert_eq!(
        env.ok(&["delete", "a"]).trim(),
        "removed the record of a (its file had already gone)"
    );
    assert!(env.ids().is_empty());
}

#[test]
fn a_cache_whose_database_is_gone_is_refused_and_fsck_repair_rebuilds_it() {
    let env = Env::new("sqlite");
    let data: Vec<Vec<u8>> = ["a", "b", "c"].iter().map(|k| env.add(k, 50_000)).collect();
    let db = env.cache().join(".imgcache.sqlite");
    for (state, damage) in [
        ("missing", None),
        ("empty (0 bytes)", Some(Vec::new())),
        (
            "unreadable (file is not a database)",
            Some(vec![0x5a; 8192]),
        ),
    ] {
        remove_db(&env.cache());
        if let Some(bytes) = &damage {
            fs::write(&db, bytes).unwrap();
        }
        for args in [
            &["list"][..],
            &["stats"],
            &["prune"],
            &["clean"],
            &["delete", "a"],
        ] {
            one_line_error(
                &env.run(args),
                1,
                &format!(
                    "metadata database {} is {state}, but the cache directory holds 3 image file(s): refusing to start an empty one and forget them; run `imgcache fsck --repair` to rebuild the records from the files",
                    db.display()
                ),
            );
        }
        assert_eq!(
            fs::read(&db).ok(),
            damage,
            "{state}: the database was touched"
        );
        for (k, d) in ["a", "b", "c"].iter().zip(&data) {
            assert_eq!(&fs::read(env.cache().join(k)).unwrap(), d, "{state}: {k}");
        }
        // fsck reports it and exits 1, changing nothing.
        let out = env.run(&["fsck"]);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = stdout(&out);
        assert!(
            text.contains(&format!("database {} is {state}", db.display())),
            "{text}"
        );
        assert!(
            text.contains("file without a record: a (48.8 KiB): repair adopts it"),
            "{text}"
        );
        assert!(
            text.contains("4 problems found; `imgcache fsck --repair` repairs them"),
            "{text}"
        );
        assert_eq!(fs::read(&db).ok(), damage);
    }

    // Repaired: the records rebuilt from the files, with their sha256 and size.
    let out = env.run(&["fsck", "--repair"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = stdout(&out);
    assert!(text.contains("moved aside to"), "{text}");
    assert!(text.contains("4 problems found, all repaired"), "{text}");
    let moved: Vec<_> = fs::read_dir(env.cache().join("invalid"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        moved
            .iter()
            .any(|n| n.starts_with(".imgcache.sqlite.unreadable-")),
        "{moved:?}"
    );
    assert_eq!(env.ids(), ["a", "b", "c"]);
    let list: Value = serde_json::from_str(&env.ok(&["--json", "list"])).unwrap();
    for (rec, d) in list.as_array().unwrap().iter().zip(&data) {
        assert_eq!(rec["size"], d.len());
        assert_eq!(
            rec["checksum"],
            format!("sha256:{}", imgcache_testkit::digest::sha256_hex(d))
        );
    }
    let out = env.run(&["fsck"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("clean: no problems found"));
}

#[test]
fn a_new_directory_still_initialises() {
    let env = Env::new("sqlite");
    assert!(env.ok(&["list"]).contains("no cached images"));
    let out = env.run(&["fsck"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        stdout(&out).contains("clean: no problems found"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn fsck_json_and_exit_codes() {
    for driver in DRIVERS {
        let env = Env::new(driver);
        env.add("good", 1000);
        env.add("gone", 1000);
        fs::remove_file(env.cache().join("gone")).unwrap();
        fs::write(env.cache().join("foreign"), b"adopt me").unwrap();
        let unsafe_img = imgcache_testkit::bad_images::qcow2_backing_file(env.dir.path());
        fs::copy(&unsafe_img, env.cache().join("backed")).unwrap();

        let out = env.run(&["--json", "fsck"]);
        assert_eq!(out.status.code(), Some(1), "{driver}");
        let r: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(r["repaired"], false);
        assert_eq!(r["driver"], driver);
        if driver == "sqlite" {
            assert_eq!(r["records_without_files"], serde_json::json!(["gone"]));
        }
        let orphans = r["files_without_records"].as_array().unwrap();
        assert_eq!(orphans[0]["image_id"], "backed");
        assert_eq!(orphans[0]["action"], "move_aside");
        assert!(
            orphans[0]["reason"]
                .as_str()
                .unwrap()
                .contains("backing file"),
            "{r}"
        );
        assert_eq!(orphans[1]["image_id"], "foreign");
        assert_eq!(orphans[1]["action"], "adopt");
        assert_eq!(r["stale_locks"], serde_json::json!(["gone"]));

        let out = env.run(&["--json", "fsck", "--repair"]);
        assert_eq!(out.status.code(), Some(0), "{driver}");
        let r: Value = serde_json::from_slice(&out.stdout).unwrap();
        let orphans = r["files_without_records"].as_array().unwrap();
        assert_eq!(orphans[0]["action"], "moved_aside");
        assert_eq!(orphans[1]["action"], "adopted");
        assert_eq!(
            orphans[1]["checksum"],
            format!(
                "sha256:{}",
                imgcache_testkit::digest::sha256_hex(b"adopt me")
            )
        );
        assert!(env.cache().join("invalid/backed").exists());
        assert!(!env.cache().join("backed").exists());
        assert_eq!(env.ids(), ["foreign", "good"], "{driver}");
        assert_eq!(env.run(&["fsck"]).status.code(), Some(0), "{driver}");
    }
}

#[test]
fn fsck_help_states_the_exit_codes() {
    let env = Env::new("sqlite");
    let help = env.ok(&["fsck", "--help"]);
    for needle in [
        "Exit status: 0 clean",
        "1 problems found",
        "8 the check could not run",
        "--repair",
        "--stall-time",
        "[env: IMGCACHE_STALL_TIME]",
    ] {
        assert!(help.contains(needle), "{needle:?} not in {help}");
    }
    // An unusable directory: exit 8, one line.
    let file = env.dir.path().join("plain-file");
    fs::write(&file, b"x").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_imgcache"))
        .args(["--cache-dir", file.to_str().unwrap(), "fsck"])
        .output()
        .unwrap();
    one_line_error(&out, 8, "is not a directory");
}

/// Starts `serve` on port 0 and returns its stderr once it is listening (then stops it).
fn serve_startup_log(env: &Env) -> Result<String, Output> {
    let mut child = env
        .cmd(&["serve", "--listen", "127.0.0.1:0"])
        .env("IMGCACHE_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    if !line.starts_with("imgcache: serving on http://") {
        return Err(child.wait_with_output().unwrap());
    }
    // Listening: the startup check ran before it; the server kept running.
    assert!(child.try_wait().unwrap().is_none(), "serve exited");
    child.kill().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    child.wait().unwrap();
    Ok(err)
}

#[test]
fn serve_logs_its_startup_check_and_keeps_running() {
    let env = Env::new("sqlite");
    env.add("good", 1000);
    env.add("gone", 1000);
    fs::remove_file(env.cache().join("gone")).unwrap();
    fs::write(env.cache().join("foreign"), b"y").unwrap();
    let log = serve_startup_log(&env).unwrap_or_else(|o| panic!("serve failed: {o:?}"));
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("startup check"))
        .collect();
    let has = |level: &str, text: &str| lines.iter().any(|l| l.contains(level) && l.contains(text));
    assert!(has("INFO", "startup check: 1 image with a record"), "{log}");
    assert!(
        has("WARN", "startup check: 1 records without files: gone"),
        "{log}"
    );
    assert!(
        has(
            "WARN",
            "startup check: 1 files without records (left alone, not served): foreign"
        ),
        "{log}"
    );
    assert!(
        has(
            "WARN",
            "startup check: 1 unused lock files: locks/gone.lock"
        ),
        "{log}"
    );
    // Read-only: nothing was repaired.
    assert!(env.cache().join("foreign").exists());
    assert!(env.cache().join("locks/gone.lock").exists());
    let out = env.run(&["fsck"]);
    assert_eq!(out.status.code(), Some(1));

    // A clean cache says so.
    let clean = Env::new("sqlite");
    clean.add("a", 10);
    let log = serve_startup_log(&clean).unwrap();
    assert!(log.contains("startup check: clean"), "{log}");
    assert!(!log.contains("WARN"), "{log}");
}

#[test]
fn serve_refuses_a_cache_whose_database_is_gone() {
    let env = Env::new("sqlite");
    env.add("a", 1000);
    remove_db(&env.cache());
    let out = serve_startup_log(&env).expect_err("serve started on a cache with lost records");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("run `imgcache fsck --repair`"), "{err}");
    assert!(!env.cache().join(".imgcache.sqlite").exists());
}
