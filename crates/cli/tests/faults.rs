//! Fault injection: every fault of the test kit's [`FaultOrigin`] through `imgcache fetch` and
//! through `imgcache serve`'s `/v1/fetch`. For each: a clear error or a transparent recovery
//! (exact bytes), never wrong bytes published or served as complete; `list` agrees with the
//! files; what is left in `incomplete/` and `invalid/` is the fault's own key and `clean`
//! reclaims it. Resume is being built: a fault it will recover may end in a clear error for
//! now, which is allowed ("error or exact bytes"); the table printed says which each got.

mod common;
mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use imgcache_testkit::digest::sha256_hex;
use imgcache_testkit::faults::{Fault, FaultOrigin};
use imgcache_testkit::image_bytes;
use support::{disagreements, files, http, imgcache, list, published_files, tempdir};

const SIZE: usize = 4 << 20;

/// What a fault may end as.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    /// Exact bytes, no error.
    Exact,
    /// A clear error.
    Error,
    /// Either (a fault resume will recover).
    Either,
}

struct Case {
    name: &'static str,
    fault: Fault,
    times: usize,
    /// `Content-MD5` from the origin (serve's checksum) and `--checksum` for fetch.
    checksum: bool,
    fetch: Expect,
    serve: Expect,
}

fn cases(origin_url: &str) -> Vec<Case> {
    let other = image_bytes(SIZE, 99);
    let c = |name, fault, times, checksum, fetch, serve| Case {
        name,
        fault,
        times,
        checksum,
        fetch,
        serve,
    };
    use Expect::*;
    vec![
        c("reset", Fault::ResetAfter(1 << 20), 1, true, Either, Either),
        c(
            "short-body",
            Fault::ShortBody(1 << 20),
            1,
            true,
            Either,
            Either,
        ),
        c(
            "too-long-body",
            Fault::TooLongBody(4096),
            1,
            true,
            Either,
            Either,
        ),
        c(
            "length-short",
            Fault::LengthShort(4096),
            1,
            true,
            Error,
            Error,
        ),
        c(
            "stall-before-headers",
            Fault::StallBeforeHeaders(Duration::from_secs(3)),
            1,
            true,
            Exact,
            Exact,
        ),
        c(
            "stall-mid-body",
            Fault::StallMidBody {
                after: 1 << 20,
                pause: Duration::from_secs(3),
            },
            1,
            true,
            Exact,
            Exact,
        ),
        c("5xx-twice", Fault::Status(503), 2, true, Exact, Either),
        c(
            "5xx-always",
            Fault::Status(503),
            usize::MAX,
            true,
            Error,
            Error,
        ),
        c(
            "corrupt-byte",
            Fault::CorruptByte(12345),
            1,
            true,
            Error,
            Error,
        ),
        c(
            "redirect-allowed",
            Fault::Redirect("/images/target".into()),
            usize::MAX,
            true,
            Exact,
            Exact,
        ),
        c(
            "redirect-userinfo",
            Fault::Redirect(format!(
                "http://user:pw@{}/images/target",
                origin_url.trim_start_matches("http://")
            )),
            usize::MAX,
            true,
            Error,
            Error,
        ),
        c(
            "redirect-outside-prefix",
            Fault::Redirect("/private/target".into()),
            usize::MAX,
            true,
            Exact, // fetch has no prefix list
            Error,
        ),
        c(
            "redirect-file-scheme",
            Fault::Redirect("file:///etc/passwd".into()),
            usize::MAX,
            false,
            Error,
            Error,
        ),
        c(
            "endless-body",
            Fault::Endless { cap: 48 << 20 },
            usize::MAX,
            false,
            Error,
            Error,
        ),
        c(
            "changed-between-attempts",
            Fault::ChangedAfter {
                cut_after: 1 << 20,
                then: other,
                then_etag: None,
            },
            1,
            false,
            Either,
            Either,
        ),
    ]
}

/// The bytes a case's path should end as (a changed file: the new one).
fn expected(origin: &FaultOrigin, path: &str) -> Bytes {
    origin.body(path).unwrap()
}

fn setup(origin: &FaultOrigin, case: &Case, body: &Bytes) -> String {
    let path = format!("/images/{}", case.name);
    origin.add_with(
        &path,
        body.clone(),
        case.fault.clone(),
        case.times,
        case.checksum,
    );
    path
}

/// Leftovers in `incomplete/` and `invalid/`, and whether `clean --stall-time 0s` took them.
fn leftovers(cache: &Path) -> (usize, bool) {
    let n = files(&cache.join("incomplete")).len() + files(&cache.join("invalid")).len();
    let out = imgcache(cache)
        .args(["clean", "--stall-time", "0s"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let after = files(&cache.join("incomplete")).len() + files(&cache.join("invalid")).len();
    (n, after == 0)
}

struct Row {
    name: &'static str,
    entrance: &'static str,
    outcome: String,
    leftovers: usize,
    ms: u128,
}

fn judge(expect: Expect, ok: bool, name: &str, entrance: &str, detail: &str) {
    match expect {
        Expect::Exact => assert!(
            ok,
            "{name} via {entrance}: expected exact bytes, got {detail}"
        ),
        Expect::Error => assert!(
            !ok,
            "{name} via {entrance}: expected an error, got exact bytes"
        ),
        Expect::Either => {}
    }
}

/// Runs `cmd` for at most `limit`; `None` when it had to be killed.
fn run_bounded(mut cmd: Command, limit: Duration) -> Option<std::process::Output> {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let t0 = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    loop {
        if let Ok(out) = rx.try_recv() {
            return out.ok();
        }
        if t0.elapsed() > limit {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            let _ = rx.recv();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn every_fault_through_fetch_and_serve() {
    let origin = FaultOrigin::start();
    let target = image_bytes(SIZE, 7);
    origin.add("/images/target", target.clone(), Fault::None);
    origin.add("/private/target", target.clone(), Fault::None);
    let dir = tempdir();
    let mut rows = Vec::new();

    // ---- imgcache fetch: a fresh cache per fault ----
    for case in cases(&origin.url) {
        let body = if case.name.starts_with("redirect") {
            target.clone()
        } else {
            image_bytes(SIZE, case.name.len() as u64)
        };
        let path = setup(&origin, &case, &body);
        let cache = dir.path().join(format!("fetch-{}", case.name));
        let dest = dir.path().join(format!("dest-{}", case.name));
        let want = if case.name.starts_with("redirect") {
            target.clone()
        } else {
            expected(&origin, &path)
        };
        let mut cmd = imgcache(&cache);
        cmd.arg("fetch")
            .arg(format!("{}{path}", origin.url))
            .arg(&dest)
            .arg("-q");
        if case.checksum {
            cmd.arg("--checksum")
                .arg(format!("sha256:{}", sha256_hex(&want)));
        }
        let t0 = Instant::now();
        let out = run_bounded(cmd, Duration::from_secs(120))
            .unwrap_or_else(|| panic!("{}: fetch did not end within 120 s", case.name));
        let ms = t0.elapsed().as_millis();
        let got = std::fs::read(&dest).ok();
        let ok = out.status.success();
        // A file that changed between attempts may end as either version, whole: never a mix.
        let now = expected(&origin, &path);
        let outcome = if ok {
            assert!(
                got.as_deref() == Some(&want[..])
                    || (!case.name.starts_with("redirect") && got.as_deref() == Some(&now[..])),
                "{}: fetch exited 0 with wrong bytes at DEST",
                case.name
            );
            "exact bytes".to_string()
        } else {
            let err = String::from_utf8_lossy(&out.stderr);
            let line = err
                .lines()
                .find(|l| l.starts_with("imgcache: "))
                .unwrap_or_else(|| panic!("{}: no clear error line: {err}", case.name));
            assert!(got.is_none(), "{}: DEST written on failure", case.name);
            format!("error: {}", line.chars().take(90).collect::<String>())
        };
        // Nothing wrong published: every record's file has exactly the right bytes.
        assert!(
            disagreements(&cache).is_empty(),
            "{}: {:?}",
            case.name,
            disagreements(&cache)
        );
        for f in published_files(&cache) {
            let published = std::fs::read(cache.join(&f)).unwrap();
            assert!(
                published == want[..]
                    || (!case.name.starts_with("redirect") && published == now[..]),
                "{}: a wrong image is published as {f}",
                case.name
            );
        }
        assert_eq!(list(&cache).len(), usize::from(ok), "{}", case.name);
        let (left, reclaimed) = leftovers(&cache);
        assert!(reclaimed, "{}: clean left something behind", case.name);
        judge(case.fetch, ok, case.name, "fetch", &outcome);
        rows.push(Row {
            name: case.name,
            entrance: "fetch",
            outcome,
            leftovers: left,
            ms,
        });
    }

    // ---- imgcache serve /v1/fetch: one server, a fresh origin path per fault ----
    let cache = dir.path().join("serve");
    let prefix = format!("{}/s/images", origin.url);
    let server = common::serve(
        &cache,
        "http",
        &["--allow-href-prefix", &prefix, "--max-size", "32M"],
    );
    origin.add("/s/images/target", target.clone(), Fault::None);
    origin.add("/s/private/target", target.clone(), Fault::None);
    for case in cases(&origin.url) {
        let body = image_bytes(SIZE, case.name.len() as u64 + 1000);
        let path = format!("/s/images/{}", case.name);
        let fault = match &case.fault {
            Fault::Redirect(to) => Fault::Redirect(
                to.replace("/images/", "/s/images/")
                    .replace("/private/", "/s/private/"),
            ),
            f => f.clone(),
        };
        let body = if case.name.starts_with("redirect") {
            target.clone()
        } else {
            body
        };
        origin.add_with(&path, body, fault, case.times, case.checksum);
        let want = if case.name.starts_with("redirect") {
            target.clone()
        } else {
            expected(&origin, &path)
        };
        let href = format!("{}{path}", origin.url);
        let t0 = Instant::now();
        let r = http(
            &server.addr,
            "GET",
            &format!("/v1/fetch?href={href}"),
            &[],
            Duration::from_secs(90),
        );
        let ms = t0.elapsed().as_millis();
        // A file that changed between attempts may be served as either version, whole.
        let now = if case.name.starts_with("redirect") {
            want.clone()
        } else {
            expected(&origin, &path)
        };
        let (ok, outcome) = match &r {
            Err(e) => (false, format!("error: no response ({e})")),
            Ok(r) if r.status == 200 && r.complete => {
                assert!(
                    r.body == want[..] || r.body == now[..],
                    "{}: serve sent a complete 200 with wrong bytes",
                    case.name
                );
                (true, "exact bytes".into())
            }
            Ok(r) if r.status == 200 => (
                false,
                format!(
                    "error: 200 cut after {} of {} bytes",
                    r.body.len(),
                    want.len()
                ),
            ),
            Ok(r) => (
                false,
                format!(
                    "error: {} {}",
                    r.status,
                    String::from_utf8_lossy(&r.body)
                        .chars()
                        .take(70)
                        .collect::<String>()
                ),
            ),
        };
        // Let a fill that outlived its client finish, then nothing wrong is published.
        std::thread::sleep(Duration::from_millis(300));
        let rec = list(&cache)
            .into_iter()
            .find(|r| r.2.as_deref() == Some(&href));
        if let Some((id, _, _)) = &rec {
            let published = std::fs::read(cache.join(id)).unwrap();
            assert!(
                published == want[..] || published == now[..],
                "{}: serve published wrong bytes",
                case.name
            );
        }
        judge(case.serve, ok, case.name, "serve", &outcome);
        rows.push(Row {
            name: case.name,
            entrance: "serve",
            outcome,
            leftovers: files(&cache.join("incomplete")).len() + files(&cache.join("invalid")).len(),
            ms,
        });
    }
    assert!(
        disagreements(&cache).is_empty(),
        "{:?}",
        disagreements(&cache)
    );
    drop(server);

    let faults = rows.len() / 2;
    println!("\nfault injection: {faults} faults x 2 entrances");
    println!(
        "{:<26} {:<6} {:>7} {:>5}  outcome",
        "fault", "via", "ms", "left"
    );
    for r in &rows {
        println!(
            "{:<26} {:<6} {:>7} {:>5}  {}",
            r.name, r.entrance, r.ms, r.leftovers, r.outcome
        );
    }
    let exact = rows.iter().filter(|r| r.outcome == "exact bytes").count();
    println!(
        "faults tried: {faults}; runs: {}; exact bytes: {exact}; clear errors: {}; wrong bytes: 0",
        rows.len(),
        rows.len() - exact
    );
}
