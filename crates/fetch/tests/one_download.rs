//! One download per key, whatever the number of callers: 16 threads of this process (each
//! with its own `ImageCache` and store handle) and 4 separate processes fetch one href into 20
//! dests at once from a slow origin. The origin must see exactly one GET.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use imgcache_fetch::{FetchOptions, ImageCache, Outcome};
use imgcache_testkit::faults::{ALWAYS, Counts, Fault, FaultOrigin, File};

const TEST_NAME: &str = "sixteen_threads_and_four_processes_download_once";
const ROLE: &str = "IMGCACHE_FETCH_TEST_CHILD";
const THREADS: usize = 16;
const PROCESSES: usize = 4;

fn unix_nanos(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).unwrap().as_nanos()
}

/// One caller: its own store handle and ImageCache, a fetch into `dest`.
fn fetch_once(cache_dir: &Path, href: &str, dest: &Path) -> (Outcome, SystemTime) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ic = ImageCache::new(spec_at(cache_dir, "instance", 50), &sources()).unwrap();
    let started = SystemTime::now();
    let r = rt
        .block_on(ic.fetch_image(href, dest, &FetchOptions::default()))
        .unwrap_or_else(|e| panic!("fetch into {}: {e}", dest.display()));
    (r.outcome, started)
}

/// The child process role: fetch, then report the outcome and start time on stdout.
fn child() {
    let get = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} not set"));
    let (outcome, started) = fetch_once(
        Path::new(&get("CHILD_CACHE")),
        &get("CHILD_HREF"),
        Path::new(&get("CHILD_DEST")),
    );
    println!("\nCHILD_RESULT {outcome:?} {}", unix_nanos(started));
}

#[test]
fn sixteen_threads_and_four_processes_download_once() {
    if std::env::var_os(ROLE).is_some() {
        return child();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let origin = FaultOrigin::start();
    // 4 MiB at 32 KiB per 15 ms: about two seconds, so every caller arrives mid-download.
    let body = image_bytes(4 * MIB, 50);
    origin.put("/shared.img", File::bare(body.clone()).etag(Some("s1")));
    let pace = Fault::Paced {
        step: 32 * 1024,
        pause: Duration::from_millis(15),
    };
    origin.fail("/shared.img", pace, ALWAYS);
    let href = origin.at("/shared.img");
    let tmp = tempfile::tempdir().unwrap();
    let cache_dir = tmp.path().join("cache");
    let dests = tmp.path().join("dests");
    std::fs::create_dir_all(&dests).unwrap();
    // Create the cache (and its database) once, so the callers race on the download only.
    drop(spec_at(&cache_dir, "instance", 50));

    let exe = std::env::current_exe().unwrap();
    let mut children = Vec::new();
    for i in 0..PROCESSES {
        let child = Command::new(&exe)
            .args(["--exact", TEST_NAME, "--nocapture", "--test-threads=1"])
            .env(ROLE, "1")
            .env("CHILD_CACHE", &cache_dir)
            .env("CHILD_HREF", &href)
            .env("CHILD_DEST", dests.join(format!("proc-{i}")))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        children.push(child);
    }

    let barrier = Arc::new(Barrier::new(THREADS));
    let threads: Vec<_> = (0..THREADS)
        .map(|i| {
            let barrier = barrier.clone();
            let cache_dir = cache_dir.clone();
            let href = href.clone();
            let dest = dests.join(format!("thread-{i}"));
            std::thread::spawn(move || {
                barrier.wait();
                fetch_once(&cache_dir, &href, &dest)
            })
        })
        .collect();
    let mut results: Vec<(Outcome, SystemTime)> = threads
        .into_iter()
        .map(|t| t.join().expect("fetch thread panicked"))
        .collect();

    // Bounded wait for the processes.
    let deadline = Instant::now() + Duration::from_secs(60);
    for mut child in children {
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("child process did not finish within 60 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut out = String::new();
        let mut err = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert!(status.success(), "child failed: {status}\n{out}\n{err}");
        // libtest's "test NAME ... " shares the line: look for the marker anywhere.
        let line = out
            .lines()
            .find_map(|l| l.split_once("CHILD_RESULT ").map(|(_, r)| r.trim()))
            .unwrap_or_else(|| panic!("no result from child:\n{out}\n{err}"));
        let (outcome, nanos) = line.split_once(' ').unwrap();
        let outcome = match outcome {
            "Downloaded" => Outcome::Downloaded,
            "Hit" => Outcome::Hit,
            "Revalidated" => Outcome::Revalidated,
            o => panic!("outcome {o}"),
        };
        let started = UNIX_EPOCH + Duration::from_nanos(nanos.parse::<u64>().unwrap());
        results.push((outcome, started));
    }

    // Exactly one GET reached the origin, and exactly one caller downloaded.
    assert_eq!(
        origin.counts("/shared.img"),
        Counts {
            get: 1,
            conditional: 0,
            not_modified: 0
        }
    );
    assert_eq!(origin.all_requests(), 1);
    let downloaded = results
        .iter()
        .filter(|(o, _)| *o == Outcome::Downloaded)
        .count();
    assert_eq!(downloaded, 1, "{results:?}");
    assert!(
        results
            .iter()
            .all(|(o, _)| matches!(o, Outcome::Downloaded | Outcome::Hit)),
        "{results:?}"
    );

    // The callers really overlapped: every one had started before the body finished.
    let done_ago = origin.body_end("/shared.img").expect("body sent").elapsed();
    let done_at = SystemTime::now() - done_ago;
    for (i, (_, started)) in results.iter().enumerate() {
        assert!(
            *started < done_at,
            "caller {i} started {:?} after the download finished",
            started.duration_since(done_at).unwrap_or_default()
        );
    }

    // All 20 dests are hard links of the one master, with the exact bytes.
    let key = key_of(&href, false);
    let master = cache_dir.join(key.as_str());
    let dest_paths: Vec<PathBuf> = std::fs::read_dir(&dests)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(dest_paths.len(), THREADS + PROCESSES, "{dest_paths:?}");
    for d in &dest_paths {
        assert_linked(&master, d, &body);
    }
    assert_eq!(inode(&master).2, (THREADS + PROCESSES + 1) as u64);
    let incomplete: Vec<_> = std::fs::read_dir(cache_dir.join("incomplete"))
        .unwrap()
        .collect();
    assert!(incomplete.is_empty());
    drop(rt);
}
