//! The key lock ([`KeyLocks`]): one write per key in a process (the others follow it), the
//! key's flock across processes (another process's writer is followed through its growing
//! file), and an explicit outcome for every flight, bounded when the other writer hangs.
//!
//! "Another process" is a second `Cache` handle on the same directory: its flock is taken
//! through a file description of its own, so it conflicts exactly as another process's would.

mod common;

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use common::{key, pattern, sha256, tempdir};
use imgcache_store::{
    Acquired, Cache, Done, DriverKind, FailKind, Followed, KeyLocks, Outcome, Phase, StoreError,
    Streaming, WriteOptions,
};

const BOUND: Duration = Duration::from_secs(5);

fn read_all(file: &std::fs::File, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, 0).unwrap();
    buf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_acquirers_in_a_process_one_writes_one_follows() {
    let dir = tempdir();
    let cache = Cache::open(dir.path(), DriverKind::Sqlite).unwrap();
    let locks: KeyLocks = KeyLocks::new(cache.clone(), BOUND);
    let k = key("img");
    let data = pattern(1, 3 << 20);

    let Acquired::Write(mut permit) = locks.acquire(&k).unwrap() else {
        panic!("the first acquirer writes");
    };
    let Acquired::Follow(follower) = locks.acquire(&k).unwrap() else {
        panic!("the second acquirer follows the first");
    };
    assert_eq!(locks.in_flight(), 1);
    assert!(
        cache.is_being_cached(&k).unwrap(),
        "the permit holds the key's flock"
    );
    let mut phases = follower.flight().subscribe();

    let reporter = permit.reporter();
    let opts = WriteOptions {
        expected: Some(sha256(&data)),
        ..WriteOptions::default()
    };
    let mut w = cache
        .open_for_write_locked(&k, permit.take_lock().unwrap(), opts)
        .unwrap();
    reporter.streaming(Streaming {
        file: std::sync::Arc::new(std::fs::File::open(w.path()).unwrap()),
        size: Some(data.len() as u64),
        checksum: Some(sha256(&data)),
    });
    w.write_all(&data[..1 << 20]).unwrap();
    reporter.written(1 << 20);
    // The follower is woken for the first bytes, and reads them from the flight's file.
    let written = phases
        .wait_for(|p| matches!(p, Phase::Streaming { written } if *written > 0))
        .await
        .map(|p| p.clone())
        .unwrap();
    assert!(matches!(written, Phase::Streaming { written: n } if n == 1 << 20));
    let info = follower.flight().info().expect("streaming info");
    assert_eq!(read_all(&info.file, 1 << 20), data[..1 << 20]);

    w.write_all(&data[1 << 20..]).unwrap();
    reporter.written(data.len() as u64);
    let reader = w
        .commit_open_notify(|rec| reporter.verified(rec.size))
        .unwrap();
    permit.finish(Outcome::Done(Done::written(reader)));

    match follower.ended().await {
        Outcome::Done(Done::Written { size, file }) => {
            assert_eq!(size, data.len() as u64);
            assert!(read_all(&file, size) == data, "the bytes it followed");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(locks.in_flight(), 0, "an ended flight leaves the map");
    // The next acquirer has the key to itself again.
    assert!(matches!(locks.acquire(&k).unwrap(), Acquired::Write(_)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permit_dropped_without_an_outcome_fails_its_followers() {
    let dir = tempdir();
    let cache = Cache::open(dir.path(), DriverKind::Sqlite).unwrap();
    let locks: KeyLocks = KeyLocks::new(cache.clone(), BOUND);
    let k = key("img");
    let Acquired::Write(permit) = locks.acquire(&k).unwrap() else {
        panic!("write");
    };
    let Acquired::Follow(follower) = locks.acquire(&k).unwrap() else {
        panic!("follow");
    };
    let waiting = tokio::spawn(async move { follower.ended().await });
    drop(permit);
    match waiting.await.unwrap() {
        Outcome::Failed(f) => {
            assert_eq!(f.kind, FailKind::WriterGone);
            assert!(f.reason.contains("went away"), "{f}");
        }
        other => panic!("{other:?}"),
    }
    assert!(!cache.is_being_cached(&k).unwrap(), "the flock is released");
    assert_eq!(locks.in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_process_writer_is_followed_to_done() {
    let dir = tempdir();
    let cache = Cache::open(dir.path(), DriverKind::Sqlite).unwrap();
    let other = Cache::open(dir.path(), DriverKind::Sqlite).unwrap();
    let locks: KeyLocks = KeyLocks::new(cache.clone(), BOUND);
    let k = key("img");
    let data = pattern(2, 2 << 20);

    let mut w = other
        .open_for_write(&k)
        .unwrap()
        .expect("the other writer's flock");
    w.write_all(&data[..1 << 20]).unwrap();
    w.flush().unwrap();

    let Acquired::Elsewhere(mut elsewhere) = locks.acquire(&k).unwrap() else {
        panic!("the flock is held elsewhere");
    };
    let Acquired::Follow(follower) = locks.acquire(&k).unwrap() else {
        panic!("this process's later acquirers follow the one flight");
    };
    let driver = tokio::spawn(async move {
        match elsewhere.follow().await {
            Followed::Ended(o) => o,
            Followed::Write(_) => panic!("the other writer wrote"),
        }
    });
    // The other writer's bytes reach this process's follower while it writes.
    let mut phases = follower.flight().subscribe();
    phases
        .wait_for(|p| matches!(p, Phase::Streaming { written } if *written > 0))
        .await
        .unwrap();
    let info = follower.flight().info().expect("the followed file");
    assert_eq!(info.size, None, "another process's size is not known");
    let n = follower
        .flight()
        .written()
        .load(std::sync::atomic::Ordering::Acquire);
    assert_eq!(read_all(&info.file, n), data[..n as usize]);

    w.write_all(&data[1 << 20..]).unwrap();
    w.commit().unwrap();
    let outcome = driver.await.unwrap();
    assert!(matches!(outcome, Outcome::Done(Done::Written { .. })));
    match follower.ended().await {
        Outcome::Done(Done::Written { size, file }) => {
            assert_eq!(size, data.len() as u64);
            assert!(read_all(&file, size) == data);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(locks.in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_process_that_fails_fails_the_followers() {
    let dir = tempdir();
    let cache = Cache::open(dir.path(), DriverKind::Sqlite).unwrap();
    let other = Cache::open(dir.path(), DriverKind::Sqlite).unwrap();
    let locks: KeyLocks = KeyLocks::new(cache.clone(), BOUND);
    let k = key("img");
    let mut w = other.open_for_write(&k).unwrap().unwrap();
    w.write_all(&pattern(3, 1 << 20)).unwrap();
    w.flush().unwrap();
    let Acquired::Elsewhere(mut elsewhere) = locks.acquire(&k).unwrap() else {
        panic!("elsewhere");
    };
    let follower = match locks.acquire(&k).unwrap() {
        Acquired::Follow(f) => f,
        _ => panic!("follow"),
    };
    let driver = tokio::spawn(async move {
        match elsewhere.follow().await {
            Followed::Ended(o) => o,
            Followed::Write(_) => panic!("it had written"),
        }
    });
    follower
        .flight()
        .subscribe()
        .wait_for(|p| matches!(p, Phase::Streaming { .. }))
        .await
        .unwrap();
    drop(w); // a failed write: to invalid/, nothing published
    driver.await.unwrap();
    match follower.ended().await {
        Outcome::Failed(f) => assert_eq!(f.kind, FailKind::Origin, "{f}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flock_given_back_unwritten_becomes_a_permit() {
    let dir = tempdir();
    let cache = Cache::open(dir.path(), DriverKind::Sqlite).unwrap();
    let other = Cache::open(dir.path(), DriverKind::Sqlite).unwrap();
    let locks: KeyLocks = KeyLocks::new(cache.clone(), BOUND);
    let k = key("img");
    let held = other.lock_key(&k).unwrap();
    let Acquired::Elsewhere(mut elsewhere) = locks.acquire(&k).unwrap() else {
        panic!("elsewhere");
    };
    drop(held); // the other process decided not to write
    match elsewhere.follow().await {
        Followed::Write(permit) => assert_eq!(permit.key(), &k),
        Followed::Ended(o) => panic!("{o:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_that_makes_no_progress_times_out_within_the_bound() {
    let dir = tempdir();
    let cache = Cache::open(dir.path(), DriverKind::Sqlite).unwrap();
    let other = Cache::open(dir.path(), DriverKind::Sqlite).unwrap();
    let bound = Duration::from_millis(300);
    let locks: KeyLocks = KeyLocks::new(cache.clone(), bound);
    let k = key("img");
    // Writes a little, then hangs: never writes again, never lets go.
    let mut w = other.open_for_write(&k).unwrap().unwrap();
    w.write_all(&pattern(4, 64 << 10)).unwrap();
    w.flush().unwrap();
    let Acquired::Elsewhere(mut elsewhere) = locks.acquire(&k).unwrap() else {
        panic!("elsewhere");
    };
    let follower = match locks.acquire(&k).unwrap() {
        Acquired::Follow(f) => f,
        _ => panic!("follow"),
    };
    let started = Instant::now();
    let outcome = match elsewhere.follow().await {
        Followed::Ended(o) => o,
        Followed::Write(_) => panic!("the flock is still held"),
    };
    let took = started.elapsed();
    assert!(took >= bound, "gave up after {took:?}, before the bound");
    assert!(took < bound * 4, "gave up after {took:?}");
    let Outcome::TimedOut { .. } = &outcome else {
        panic!("{outcome:?}");
    };
    let err = outcome.error().expect("an error to report");
    assert!(matches!(err, StoreError::WriterStalled { .. }), "{err:?}");
    assert!(err.to_string().contains("made no progress"), "{err}");
    assert!(matches!(follower.ended().await, Outcome::TimedOut { .. }));
    drop(w);
}
