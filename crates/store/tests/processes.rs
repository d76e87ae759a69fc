//! Locks that hold across OS processes. Each scenario re-executes this test binary as its
//! children (`current_exe() --exact <test> --nocapture`), with `IMGCACHE_TEST_ROLE` telling the
//! child which part to play; no helper binaries. Children talk to the parent through lines on
//! stdout starting with `@@ `; start gates are flocks the parent holds until every child is ready.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use common::{key, pattern, read_image, sha256, tempdir};
use imgcache_store::lock::Mode;
use imgcache_store::record::now;
use imgcache_store::{Cache, DriverKind, FileLock, Integrity, StoreError};

const ROLE: &str = "IMGCACHE_TEST_ROLE";
const DIR: &str = "IMGCACHE_TEST_DIR";
const DRIVER: &str = "IMGCACHE_TEST_DRIVER";
const ID: &str = "IMGCACHE_TEST_ID";

/// How long the parent waits for any one message or exit before failing the test.
const PATIENCE: Duration = Duration::from_secs(120);

// ---- parent/child plumbing ----------------------------------------------------------------

struct Role {
    name: String,
    dir: PathBuf,
    kind: DriverKind,
    id: u64,
}

/// In a child process: the role it was started for.
fn role() -> Option<Role> {
    let name = std::env::var(ROLE).ok()?;
    let var = |v: &str| std::env::var(v).unwrap_or_else(|_| panic!("child without {v}"));
    Some(Role {
        name,
        dir: var(DIR).into(),
        kind: var(DRIVER).parse().unwrap(),
        id: var(ID).parse().unwrap(),
    })
}

/// A line for the parent.
fn say(msg: impl AsRef<str>) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "@@ {}", msg.as_ref()).unwrap();
    out.flush().unwrap();
}

struct Kid {
    id: u64,
    role: String,
    proc: Child,
    stdout: std::thread::JoinHandle<Vec<String>>,
    stderr: std::thread::JoinHandle<String>,
}

/// Messages from all children: (child id, message after `@@ `).
type Inbox = mpsc::Receiver<(u64, String)>;

fn spawn(
    test: &str,
    role: &str,
    id: u64,
    dir: &Path,
    kind: DriverKind,
    tx: &mpsc::Sender<(u64, String)>,
) -> Kid {
    let mut proc = Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(ROLE, role)
        .env(DIR, dir)
        .env(DRIVER, kind.name())
        .env(ID, id.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("re-execute the test binary");
    let out = proc.stdout.take().unwrap();
    let tx = tx.clone();
    let stdout = std::thread::spawn(move || {
        let mut all = Vec::new();
        for line in BufReader::new(out).lines() {
            let line = line.unwrap();
            // Not always at the start: the harness prints "test <name> ... " with no newline.
            if let Some(at) = line.find("@@ ") {
                let _ = tx.send((id, line[at + 3..].to_string()));
            }
            all.push(line);
        }
        all
    });
    let mut err = proc.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    Kid {
        id,
        role: role.to_string(),
        proc,
        stdout,
        stderr,
    }
}

/// Waits for `n` messages starting with `prefix` (one per child), failing on anything that
/// looks like a child's error report. Returns them by child id.
fn expect_from(inbox: &Inbox, prefix: &str, n: usize) -> BTreeMap<u64, String> {
    let mut got = BTreeMap::new();
    while got.len() < n {
        let (id, msg) = inbox
            .recv_timeout(PATIENCE)
            .unwrap_or_else(|_| panic!("no {prefix:?} message from a child within {PATIENCE:?}"));
        assert!(!msg.starts_with("ERROR"), "child {id}: {msg}");
        if let Some(rest) = msg.strip_prefix(prefix) {
            got.insert(id, rest.trim().to_string());
        }
    }
    got
}

/// Waits for a child to exit (killing it after `PATIENCE`) and fails the test, with the
/// child's output, unless it exited successfully.
fn finish(mut kid: Kid) -> Vec<String> {
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(s) = kid.proc.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = kid.proc.kill();
            let _ = kid.proc.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = kid.stdout.join().unwrap();
    let err = kid.stderr.join().unwrap();
    match status {
        Some(s) if s.success() => out,
        other => panic!(
            "child {} ({}) {}:\n--- stdout\n{}\n--- stderr\n{}",
            kid.id,
            kid.role,
            match other {
                Some(s) => format!("failed: {s}"),
                None => format!("did not finish within {PATIENCE:?} and was killed"),
            },
            out.join("\n"),
            err
        ),
    }
}

macro_rules! both_drivers {
    ($scenario:ident) => {
        mod $scenario {
            #[test]
            fn sqlite() {
                super::$scenario(
                    concat!(stringify!($scenario), "::sqlite"),
                    imgcache_store::DriverKind::Sqlite,
                )
            }
            #[test]
            fn xattr() {
                super::$scenario(
                    concat!(stringify!($scenario), "::xattr"),
                    imgcache_store::DriverKind::Xattr,
                )
            }
        }
    };
}

// ---- (a) two processes write the same key at once ------------------------------------------

const RACE_KEY: &str = "contended-image";
const RACE_SIZE: usize = 4 * 1024 * 1024;
const RACE_CHUNK: usize = 128 * 1024;

fn race_bytes(id: u64) -> Vec<u8> {
    pattern(1000 + id, RACE_SIZE)
}

/// Both children open a writer for the same key as soon as the start gate opens. The first to
/// get the key lock writes slowly; the other blocks in `open_for_write` meanwhile and, when the
/// winner commits, gets `None` and reads the winner's image.
fn same_key_writers(test: &str, kind: DriverKind) {
    if let Some(r) = role() {
        return same_key_writer_child(r);
    }
    let tmp = tempdir();
    let dir = tmp.path().join("cache");
    let cache = Cache::open(&dir, kind).unwrap();
    let start_gate = FileLock::acquire(&tmp.path().join("start.gate"), Mode::Exclusive).unwrap();
    let write_gate = FileLock::acquire(&tmp.path().join("write.gate"), Mode::Exclusive).unwrap();
    let (tx, inbox) = mpsc::channel();
    let kids: Vec<Kid> = (0..2)
        .map(|id| spawn(test, "writer", id, &dir, kind, &tx))
        .collect();
    drop(tx);

    expect_from(&inbox, "READY", 2);
    drop(start_gate);
    // One child holds the writer, the other is about to block on the key lock: hold the winner
    // back until both have called `open_for_write`, so the two really overlap.
    let mut calling = 0;
    let mut opened = None;
    while calling < 2 || opened.is_none() {
        let (id, msg) = inbox
            .recv_timeout(PATIENCE)
            .expect("children reach open_for_write");
        assert!(!msg.starts_with("ERROR"), "child {id}: {msg}");
        if msg.starts_with("CALLING") {
            calling += 1;
        } else if msg.starts_with("OPENED") {
            assert!(
                opened.replace(id).is_none(),
                "two writers hold the same key"
            );
        }
    }
    let winner = opened.unwrap();
    // The lock is visible across processes.
    assert!(cache.is_being_cached(&key(RACE_KEY)).unwrap());
    assert!(!cache.is_cached(&key(RACE_KEY)).unwrap());
    drop(write_gate);

    let results = expect_from(&inbox, "RESULT", 2);
    for kid in kids {
        finish(kid);
    }

    let loser = 1 - winner;
    let expected = sha256(&race_bytes(winner));
    let win: Vec<&str> = results[&winner].split_whitespace().collect();
    let lose: Vec<&str> = results[&loser].split_whitespace().collect();
    assert_eq!(win[0], "published", "winner {winner}: {win:?}");
    assert_eq!(lose[0], "none", "loser {loser}: {lose:?}");
    assert_eq!(win[1], expected.to_string(), "winner's recorded checksum");
    assert_eq!(lose[1], expected.to_string(), "what the loser read back");
    let loser_called: f64 = lose[2].parse().unwrap();
    let winner_committed: f64 = win[2].parse().unwrap();
    assert!(
        loser_called < winner_committed,
        "the loser must have been waiting while the winner wrote"
    );

    // The published image is the winner's, whole.
    let (rec, bytes) = read_image(&cache, RACE_KEY).unwrap();
    assert_eq!(bytes.len(), RACE_SIZE);
    assert!(
        bytes == race_bytes(winner),
        "published bytes are not the winner's"
    );
    assert_eq!(rec.checksum, Some(expected));
    assert_eq!(rec.hits, 2, "the loser's read and ours");
    assert_eq!(cache.get_cached_images().unwrap().len(), 1);
    assert_eq!(cache.get_cache_size().unwrap(), RACE_SIZE as u64);
    assert!(common::file_names(&cache.layout().incomplete_dir()).is_empty());
    assert!(common::file_names(&cache.layout().invalid_dir()).is_empty());
}

fn same_key_writer_child(r: Role) {
    let cache = Cache::open(&r.dir, r.kind).unwrap();
    let gates = r.dir.parent().unwrap();
    say("READY");
    drop(FileLock::acquire(&gates.join("start.gate"), Mode::Shared).unwrap());
    let k = key(RACE_KEY);
    let called = now();
    say("CALLING");
    match cache.open_for_write(&k).unwrap() {
        Some(mut w) => {
            say("OPENED");
            drop(FileLock::acquire(&gates.join("write.gate"), Mode::Shared).unwrap());
            for chunk in race_bytes(r.id).chunks(RACE_CHUNK) {
                w.write_all(chunk).unwrap();
                // Pacing, not synchronisation: a slow download keeps the other writer waiting.
                std::thread::sleep(Duration::from_millis(5));
            }
            let rec = w.commit().unwrap();
            say(format!(
                "RESULT published {} {}",
                rec.checksum.unwrap(),
                now()
            ));
        }
        None => {
            let (rec, bytes) = read_image(&cache, RACE_KEY).expect("the winner's image");
            assert_eq!(rec.size, bytes.len() as u64);
            say(format!("RESULT none {} {called}", sha256(&bytes)));
        }
    }
}

both_drivers!(same_key_writers);

// ---- (b) prune races readers ----------------------------------------------------------------

const KEYS: u64 = 8;
const MAX_SIZE: u64 = 160 * 1024;
const MAX_ROUNDS: u64 = 400;
const PRUNE_TIME: Duration = Duration::from_secs(6);
const READ_TIME: Duration = Duration::from_secs(60);
const READER_THREADS: usize = 4;

fn race_key(i: u64) -> String {
    format!("img-{i}")
}

/// One process publishes eight images over and over and prunes the cache to the size of
/// about three after every round (and cleans now and then); another process's threads read
/// the same keys in a loop. No reader may see an error or short or wrong bytes.
fn prune_races_readers(test: &str, kind: DriverKind) {
    if let Some(r) = role() {
        match r.name.as_str() {
            "pruner" => return pruner_child(r),
            "reader" => return reader_child(r),
            other => panic!("unknown role {other}"),
        }
    }
    let tmp = tempdir();
    let dir = tmp.path().join("cache");
    let cache = Cache::open(&dir, kind).unwrap();
    let gate = FileLock::acquire(&tmp.path().join("start.gate"), Mode::Exclusive).unwrap();
    let (tx, inbox) = mpsc::channel();
    let pruner = spawn(test, "pruner", 0, &dir, kind, &tx);
    let reader = spawn(test, "reader", 1, &dir, kind, &tx);
    drop(tx);
    expect_from(&inbox, "READY", 2);
    drop(gate);

    let p = expect_from(&inbox, "PRUNER", 1);
    finish(pruner);
    std::fs::write(tmp.path().join("stop"), b"").unwrap();
    let r = expect_from(&inbox, "READER", 1);
    finish(reader);

    let stats = |s: &str| -> BTreeMap<String, u64> {
        s.split_whitespace()
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap();
                (k.to_string(), v.parse().unwrap())
            })
            .collect()
    };
    let p = stats(&p[&0]);
    let r = stats(&r[&1]);
    eprintln!("{test}: pruner {p:?}, readers {r:?}");
    assert_eq!(r["errors"], 0);
    assert!(
        r["hits"] > 0,
        "the readers never hit: the race was not exercised"
    );
    assert!(
        p["evicted"] > 0,
        "prune never evicted: the race was not exercised"
    );
    assert!(p["published"] > KEYS);

    // The cache is consistent afterwards: every record has its file, whole.
    let recs = cache.get_cached_images().unwrap();
    assert_eq!(
        cache.get_cache_size().unwrap(),
        recs.iter().map(|r| r.size).sum::<u64>()
    );
    for rec in recs {
        let (got, bytes) = read_image(&cache, &rec.image_id).unwrap();
        assert_eq!(bytes.len() as u64, rec.size);
        assert_eq!(got.checksum, Some(sha256(&bytes)));
    }
}

fn pruner_child(r: Role) {
    let cache = Cache::open(&r.dir, r.kind).unwrap();
    say("READY");
    drop(FileLock::acquire(&r.dir.parent().unwrap().join("start.gate"), Mode::Shared).unwrap());
    let started = Instant::now();
    let (mut published, mut evicted, mut skipped, mut rounds) = (0u64, 0u64, 0u64, 0u64);
    while rounds < MAX_ROUNDS && started.elapsed() < PRUNE_TIME {
        for i in 0..KEYS {
            let Some(mut w) = cache.open_for_write(&key(&race_key(i))).unwrap() else {
                continue;
            };
            // Every version of every key has its own bytes and its own size.
            let size = 16 * 1024 * (1 + (i + rounds) % 4) as usize + rounds as usize;
            w.write_all(&pattern(rounds * KEYS + i, size)).unwrap();
            w.commit().unwrap();
            published += 1;
        }
        let report = cache.prune(MAX_SIZE).unwrap();
        evicted += report.evicted.len() as u64;
        skipped += report.skipped_in_use.len() as u64;
        if rounds % 16 == 15 {
            cache.clean(Duration::from_secs(3600)).unwrap();
        }
        rounds += 1;
    }
    say(format!(
        "PRUNER rounds={rounds} published={published} evicted={evicted} skipped_in_use={skipped}"
    ));
}

fn reader_child(r: Role) {
    let cache = Cache::open(&r.dir, r.kind).unwrap();
    let stop = r.dir.parent().unwrap().join("stop");
    say("READY");
    drop(FileLock::acquire(&r.dir.parent().unwrap().join("start.gate"), Mode::Shared).unwrap());
    let started = Instant::now();
    let hits = Arc::new(AtomicU64::new(0));
    let misses = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let threads: Vec<_> = (0..READER_THREADS as u64)
        .map(|t| {
            let (cache, stop) = (cache.clone(), stop.clone());
            let (hits, misses) = (hits.clone(), misses.clone());
            let (failed, errors) = (failed.clone(), errors.clone());
            std::thread::spawn(move || {
                let mut n = t;
                while !failed.load(Ordering::Relaxed)
                    && started.elapsed() < READ_TIME
                    && n < 1_000_000
                    && !stop.exists()
                {
                    let k = race_key(n % KEYS);
                    n += 1;
                    match read_checked(&cache, &k) {
                        Ok(true) => hits.fetch_add(1, Ordering::Relaxed),
                        Ok(false) => misses.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            failed.store(true, Ordering::Relaxed);
                            errors.lock().unwrap().push(format!("{k}: {e}"));
                            break;
                        }
                    };
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let errors = errors.lock().unwrap();
    for e in errors.iter() {
        say(format!("ERROR {e}"));
    }
    say(format!(
        "READER hits={} misses={} errors={}",
        hits.load(Ordering::Relaxed),
        misses.load(Ordering::Relaxed),
        errors.len()
    ));
    assert!(errors.is_empty(), "{errors:?}");
}

/// One open_for_read + read to end. `Ok(false)` for a miss; an error for any failure, or for
/// bytes that are not exactly the record's size and checksum.
fn read_checked(cache: &Cache, k: &str) -> Result<bool, String> {
    let mut r = match cache.open_for_read(&key(k)) {
        Ok(Some(r)) => r,
        Ok(None) => return Ok(false),
        Err(e @ StoreError::Io { .. }) => return Err(format!("open_for_read: {e} ({e:?})")),
        Err(e) => return Err(format!("open_for_read: {e}")),
    };
    let mut bytes = Vec::new();
    r.read_to_end(&mut bytes)
        .map_err(|e| format!("read: {e}"))?;
    let rec = r.record();
    if bytes.len() as u64 != rec.size {
        return Err(format!(
            "short data: read {} bytes, record says {}",
            bytes.len(),
            rec.size
        ));
    }
    let want = rec.checksum.clone().ok_or("record without checksum")?;
    let got = Integrity::of(want.algorithm, &bytes);
    if got != want {
        return Err(format!("wrong data: checksum {got}, record says {want}"));
    }
    Ok(true)
}

both_drivers!(prune_races_readers);
