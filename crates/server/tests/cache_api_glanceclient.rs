//! python-glanceclient's `cache-*` commands against the server: the real `glance` command
//! (pip package python-glanceclient) with `--os-image-url` and `--os-auth-token`.
//!
//! Skipped, saying so, only when the `glance` command is not installed.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const ID_A: &str = "5b1c7f3e-2222-4f00-8a00-00000000000a";
const ID_B: &str = "5b1c7f3e-2222-4f00-8a00-00000000000b";

struct Out {
    status: std::process::ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs `glance ARGS` against the server, with a fresh HOME (no cached schemas) and no OS_*
/// variables from the environment, killed after 60 s.
fn glance(bin: &Path, home: &Path, base: &str, token: &str, args: &[&str]) -> Out {
    let mut cmd = Command::new(bin);
    imgcache_testkit::clients::client_env(&mut cmd, home);
    cmd.args(["--os-image-url", base, "--os-auth-token", token])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn glance");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("glance {args:?} did not finish in 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let o = Out {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    eprintln!("$ glance {}\n{}{}", args.join(" "), o.stdout, o.stderr);
    o
}

async fn run(bin: &Path, home: &Path, base: &str, token: &str, args: &[&str]) -> Out {
    let (bin, home, base, token) = (
        bin.to_path_buf(),
        home.to_path_buf(),
        base.to_string(),
        token.to_string(),
    );
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        glance(&bin, &home, &base, &token, &a)
    })
    .await
    .unwrap()
}

/// Rows of `glance cache-list`'s table as (id, state).
fn rows(table: &str) -> Vec<(String, String)> {
    table
        .lines()
        .filter(|l| l.starts_with('|'))
        .map(|l| l.split('|').map(str::trim).collect::<Vec<_>>())
        .filter(|cols| cols.len() > 3 && cols[1] != "ID")
        .map(|cols| (cols[1].to_string(), cols[2].to_string()))
        .collect()
}

fn ok(o: &Out) {
    assert!(
        o.status.success(),
        "glance failed: {}\n{}",
        o.stdout,
        o.stderr
    );
    // cache-queue/-delete/-clear report HTTP errors on stderr with exit status 0.
    let noise: Vec<&str> = o
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.contains("Warning") && !l.contains("warn"))
        .collect();
    assert!(noise.is_empty(), "glance reported errors: {}", o.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn glance_cache_commands() {
    let Some(bin) = imgcache_testkit::cmd::on_path("glance") else {
        eprintln!(
            "SKIPPED glance_cache_commands: the `glance` command is not installed \
             (pip install python-glanceclient)"
        );
        return;
    };
    let fake = fake_glance();
    fake.seed(image(ID_A, vec![3u8; 70_000]));
    fake.seed(image(ID_B, vec![4u8; 80_000]));
    let mut srv = Server::start_with(Some(&fake.url), service_token).await;
    let home = tempfile::tempdir().unwrap();
    let c = client();
    let v2 = ["--os-image-api-version", "2"];
    let with_v2 = |cmd: &[&'static str]| -> Vec<&'static str> {
        v2.iter().chain(cmd.iter()).copied().collect()
    };

    // Empty cache.
    let o = run(
        &bin,
        home.path(),
        &srv.base,
        ADMIN,
        &with_v2(&["cache-list"]),
    )
    .await;
    ok(&o);
    assert!(o.stdout.contains("Last Accessed (UTC)"), "{}", o.stdout);
    assert!(rows(&o.stdout).is_empty());

    // Queue A: the prefetcher fetches it.
    let o = run(
        &bin,
        home.path(),
        &srv.base,
        ADMIN,
        &with_v2(&["cache-queue", ID_A]),
    )
    .await;
    ok(&o);
    eventually("A to be cached", || async {
        cached_ids(&cache_state(&c, &srv).await) == [ID_A]
    })
    .await;
    assert_eq!(file_requests(&fake), 1);

    // B stays queued while the origin fails.
    fake.set_failing(true);
    let o = run(
        &bin,
        home.path(),
        &srv.base,
        ADMIN,
        &with_v2(&["cache-queue", ID_B]),
    )
    .await;
    ok(&o);
    let o = run(
        &bin,
        home.path(),
        &srv.base,
        ADMIN,
        &with_v2(&["cache-list"]),
    )
    .await;
    ok(&o);
    let mut r = rows(&o.stdout);
    r.sort();
    assert_eq!(
        r,
        [
            (ID_A.to_string(), "cached".to_string()),
            (ID_B.to_string(), "queued".to_string())
        ],
        "{}",
        o.stdout
    );

    // Without --os-image-api-version: the client negotiates through /versions.
    let o = run(&bin, home.path(), &srv.base, ADMIN, &["cache-list"]).await;
    ok(&o);
    assert_eq!(rows(&o.stdout).len(), 2, "{}", o.stdout);

    // Delete A from the cache.
    let o = run(
        &bin,
        home.path(),
        &srv.base,
        ADMIN,
        &with_v2(&["cache-delete", ID_A]),
    )
    .await;
    ok(&o);
    let s = cache_state(&c, &srv).await;
    assert!(cached_ids(&s).is_empty());
    assert_eq!(queued(&s), [ID_B]);

    // Clear the queue only, then everything.
    let o = run(
        &bin,
        home.path(),
        &srv.base,
        ADMIN,
        &with_v2(&["cache-clear", "--target", "queue"]),
    )
    .await;
    ok(&o);
    assert!(queued(&cache_state(&c, &srv).await).is_empty());
    seed(&srv.cache(), ID_B, &[4u8; 80_000]);
    let o = run(
        &bin,
        home.path(),
        &srv.base,
        ADMIN,
        &with_v2(&["cache-clear"]),
    )
    .await;
    ok(&o);
    let s = cache_state(&c, &srv).await;
    assert!(cached_ids(&s).is_empty() && queued(&s).is_empty(), "{s}");

    // A token upstream does not accept: 401, which glance reports as bad credentials.
    let o = run(
        &bin,
        home.path(),
        &srv.base,
        "unknown-token",
        &with_v2(&["cache-list"]),
    )
    .await;
    assert!(
        !o.status.success(),
        "cache-list with an unknown token succeeded: {}",
        o.stdout
    );
    assert!(
        o.stderr.contains("Invalid OpenStack Identity credentials"),
        "{}",
        o.stderr
    );
    // A valid token without the admin role: 403, "not permitted".
    let o = run(
        &bin,
        home.path(),
        &srv.base,
        MEMBER_TOKEN,
        &with_v2(&["cache-queue", ID_A]),
    )
    .await;
    assert!(o.stderr.contains("not permitted"), "{}", o.stderr);
    // An upstream admin may.
    let o = run(
        &bin,
        home.path(),
        &srv.base,
        ADMIN_TOKEN,
        &with_v2(&["cache-list"]),
    )
    .await;
    ok(&o);
    assert!(queued(&cache_state(&c, &srv).await).is_empty());
    srv.stop().await.unwrap();
}
