//! `imgcache inspect FILE`: real images made with qemu-img; exit 0 and the report when safe,
//! exit 1 with the reason as one line on stderr when refused.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use imgcache_testkit::qemu_img;

fn imgcache(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_imgcache"))
        .args(args)
        .env_remove("IMGCACHE_CONFIG")
        .output()
        .unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn dir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

fn qcow2(dir: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let p = dir.join(name);
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend_from_slice(extra);
    args.push(s(&p));
    if !extra.contains(&"-b") {
        args.push("64M");
    }
    qemu_img(&args);
    p
}

#[test]
fn a_safe_image_reports_its_format_size_and_verdicts() {
    let d = dir();
    let img = qcow2(d.path(), "ok.qcow2", &[]);
    let out = imgcache(&["inspect", s(&img), "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["format"], "qcow2");
    assert_eq!(v["virtual_size"], 64 << 20);
    assert_eq!(v["image_size"], std::fs::metadata(&img).unwrap().len());
    assert_eq!(v["safe"], true);
    assert_eq!(v["conversion_space"], 64 << 20);
    assert_eq!(v["facts"]["qcow2"]["version"], 3);
    assert_eq!(v["facts"]["qcow2"]["cluster_size"], 65536);
    let checks = v["checks"].as_array().unwrap();
    let names: Vec<_> = checks.iter().map(|c| c["name"].as_str().unwrap()).collect();
    for n in ["backing_file", "data_file", "unknown_features"] {
        assert!(names.contains(&n), "{names:?}");
    }
    assert!(checks.iter().all(|c| c["passed"] == true));

    // Text: the same facts, for people.
    let out = imgcache(&["inspect", s(&img), "--format", "qcow2"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "qcow2",
        "64.0 MiB",
        "ok    backing_file",
        "declared",
        "cluster_size: 65536",
    ] {
        assert!(text.contains(needle), "{needle:?} not in:\n{text}");
    }
}

#[test]
fn an_unsafe_image_exits_1_with_the_reason_on_one_line() {
    let d = dir();
    let base = d.path().join("base.raw");
    qemu_img(&["create", "-q", "-f", "raw", s(&base), "16M"]);
    let img = qcow2(d.path(), "backed.qcow2", &["-b", s(&base), "-F", "raw"]);
    let out = imgcache(&["inspect", s(&img), "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["format"], "qcow2");
    assert_eq!(v["safe"], false);
    let failed: Vec<_> = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["passed"] == false)
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["reason"], "backing_file");
    // Under --json the reason on stderr is one JSON object too.
    let err: Value = serde_json::from_slice(&out.stderr).unwrap();
    assert_eq!(err["exit_code"], 1, "{err}");
    let msg = err["error"].as_str().unwrap();
    assert!(msg.contains("backing file"), "{msg}");
    assert!(msg.contains(s(&base)), "{msg}");

    // A declared format the content contradicts.
    let ok = qcow2(d.path(), "ok.qcow2", &[]);
    let out = imgcache(&["inspect", s(&ok), "--format", "raw"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("declared as raw"), "{err}");

    // An unreadable file is a one-line error too.
    let out = imgcache(&["inspect", s(&d.path().join("missing.img"))]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8(out.stderr).unwrap().lines().count(), 1);
}

/// `fetch --raw` converts with qemu-img: DEST holds what `qemu-img convert -O raw` makes; a
/// declared `--format` the content contradicts is refused with one line.
#[test]
fn fetch_raw_converts_and_format_is_enforced() {
    let d = dir();
    let raw = d.path().join("src.raw");
    let mut bytes = vec![0u8; 3 << 20];
    for (i, b) in bytes.iter_mut().enumerate().take(1 << 20) {
        *b = (i * 31 % 251) as u8;
    }
    std::fs::write(&raw, &bytes).unwrap();
    let img = d.path().join("img.qcow2");
    qemu_img(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "qcow2",
        s(&raw),
        s(&img),
    ]);
    let cache = d.path().join("cache");
    let href = format!("file://{}", img.display());
    let dest = d.path().join("disk.raw");
    let base = [
        "--cache-dir",
        s(&cache),
        "fetch",
        "-q",
        "--allow-file-dir",
        s(d.path()),
    ];
    let mut args = base.to_vec();
    args.extend(["--format", "raw", &href, s(&dest)]);
    let out = imgcache(&args);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("declared as raw but its content is qcow2"),
        "{err}"
    );
    assert!(!dest.exists());

    let mut args = base.to_vec();
    args.extend(["--raw", "--json", &href, s(&dest)]);
    let out = imgcache(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["key"].as_str().unwrap().ends_with(".converted"), "{v}");
    assert_eq!(std::fs::read(&dest).unwrap(), bytes);

    // The qemu-img used is configurable; a missing one is named.
    let dest2 = d.path().join("disk2.raw");
    let other = d.path().join("other.qcow2");
    std::fs::copy(&img, &other).unwrap();
    let href2 = format!("file://{}", other.display());
    let mut args = base.to_vec();
    args.extend([
        "--raw",
        "--qemu-img",
        "/nonexistent/qemu-img",
        &href2,
        s(&dest2),
    ]);
    let out = imgcache(&args);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("qemu-img not found"), "{err}");
    assert!(!dest2.exists());
}
