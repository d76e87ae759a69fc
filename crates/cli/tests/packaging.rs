//! The files under packaging/ that are not generated (the generated ones are checked by the
//! binary's unit tests, `packaging::tests`): the systemd unit passes `systemd-analyze verify`
//! with no warning, and it agrees with the .deb's layout (crates/cli/Cargo.toml's
//! `[package.metadata.deb]`). packaging/check-deb.sh verifies the unit again as installed.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn unit_text() -> String {
    std::fs::read_to_string(repo().join("packaging/systemd/imgcache.service")).unwrap()
}

/// `systemd-analyze verify` of `unit` (a copy of the unit as `imgcache.service` in a fresh
/// directory) with the man pages of packaging/man on `MANPATH` (verify runs `man` for each
/// `Documentation=man:` page): everything it prints, and whether it exited 0. It warns on
/// stderr and still exits 0 for much (an unknown key, say), so callers require no output.
fn verify(unit: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let man1 = dir.path().join("man/man1");
    std::fs::create_dir_all(&man1).unwrap();
    for page in std::fs::read_dir(repo().join("packaging/man")).unwrap() {
        let page = page.unwrap().path();
        std::fs::copy(&page, man1.join(page.file_name().unwrap())).unwrap();
    }
    let path = dir.path().join("imgcache.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .env("MANPATH", dir.path().join("man"))
        .env("SYSTEMD_LOG_COLOR", "0")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap_or_else(|e| {
            panic!("systemd-analyze (Debian's systemd package; .ci/run installs it): {e}")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The unit as shipped, but running this build's binary (verify checks that `ExecStart=`'s
/// program exists and is executable; the real /usr/bin/imgcache is there only once the .deb
/// is installed, where packaging/check-deb.sh verifies the installed unit as it is).
#[test]
fn systemd_unit_verifies_without_a_warning() {
    let unit = unit_text();
    let exec = "ExecStart=/usr/bin/imgcache ";
    assert!(unit.contains(exec), "{unit}");
    let local = unit.replace(
        exec,
        &format!("ExecStart={} ", env!("CARGO_BIN_EXE_imgcache")),
    );
    let (ok, out) = verify(&local);
    assert!(
        ok && out.trim().is_empty(),
        "systemd-analyze verify packaging/systemd/imgcache.service:\n{out}"
    );
    // The check is not blind: a misspelt key is a warning it prints.
    let (_, out) = verify(&local.replace("\nType=notify\n", "\nTyp=notify\n"));
    assert!(
        out.contains("Typ"),
        "no warning for a misspelt key: {out:?}"
    );
}

/// One line `KEY=VALUE` of the unit (the first).
fn directive<'a>(unit: &'a str, key: &str) -> Option<&'a str> {
    unit.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

/// What the issue asks of the unit, and that its paths are the ones the .deb installs.
#[test]
fn systemd_unit_is_hardened_and_matches_the_package() {
    let unit = unit_text();
    for (key, want) in [
        ("Type", "notify"),
        ("User", "imgcache"),
        ("CacheDirectory", "imgcache"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("NoNewPrivileges", "yes"),
        ("Restart", "on-failure"),
    ] {
        assert_eq!(directive(&unit, key), Some(want), "{key}=");
    }
    assert!(directive(&unit, "DynamicUser").is_none());

    let manifest: toml::Table =
        toml::from_str(&std::fs::read_to_string(repo().join("crates/cli/Cargo.toml")).unwrap())
            .unwrap();
    let deb = &manifest["package"]["metadata"]["deb"];
    let assets: Vec<(String, String)> = deb["assets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let a = a.as_array().unwrap();
            (
                a[0].as_str().unwrap().to_string(),
                a[1].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let dest_of = |src: &str| {
        assets
            .iter()
            .find(|(s, _)| s == src)
            .map(|(_, d)| d.clone())
            .unwrap_or_else(|| panic!("{src} is not an asset of the .deb: {assets:?}"))
    };
    let exec = directive(&unit, "ExecStart").unwrap();
    let mut words = exec.split_whitespace();
    let program = words.next().unwrap();
    assert_eq!(
        Path::new(program),
        Path::new("/")
            .join(dest_of("target/release/imgcache"))
            .join("imgcache"),
        "ExecStart runs the packaged binary"
    );
    let args: Vec<&str> = words.collect();
    assert_eq!(args[..2], ["serve", "--config"]);
    assert_eq!(
        Path::new(args[2]),
        Path::new("/").join(dest_of("../../packaging/imgcache.toml")),
        "ExecStart reads the packaged config"
    );
    let units = deb["systemd-units"]["unit-scripts"].as_str().unwrap();
    assert_eq!(
        repo()
            .join("crates/cli")
            .join(units)
            .canonicalize()
            .unwrap(),
        repo().join("packaging/systemd").canonicalize().unwrap()
    );
}
