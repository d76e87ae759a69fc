//! Store benchmarks (criterion), for both metadata drivers. See `bench/README.md` at the
//! repository root for how to run them and what each figure means.
//!
//! Groups (each with a `sqlite` and an `xattr` function):
//! - `publish_10k_4KiB`: 10,000 × (open_for_write + write 4 KiB + commit) into a fresh, empty
//!   cache per iteration (fresh keys, so every publish is a real one). The figure is for all
//!   10,000; divide by 10,000 for one publish (criterion's throughput line gives it as elem/s).
//! - `get_cached_images_100k`: `get_cached_images()` over 100,000 records.
//! - `get_least_recently_accessed_100k`: `get_least_recently_accessed()` over 100,000 records.
//! - `prune_10k_of_100k`: `prune()` evicting the 10,000 least recently accessed of 100,000
//!   1-byte images. The xattr driver has no LRU index: its prune takes one snapshot of the
//!   LRU order (one scan of the directory) and evicts in that order.
//! - `open_for_read_hit_4KiB`: open_for_read (counts the hit, updates last_accessed) + read the
//!   record's hit count + read 4 KiB + close, single thread, cycling over 1,000 cached images.
//!
//! The 100k-record fixtures are populated once per driver through the public `Driver::insert`
//! on 1-byte files written straight into the cache directory (a full publish costs ~3 fsyncs,
//! which would make 100k of them take minutes), then reused: the read-only benches share the
//! directory, and each prune iteration restores only what the previous one evicted (the evicted
//! files are copied back from a spare copy with `cp -a`, which keeps xattrs; SQLite's database
//! and WAL are copied back from a pristine copy).

use std::fs::{self, File};
use std::hint::black_box;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, Throughput, criterion_group};
use imgcache_store::{Algorithm, Cache, DriverKind, Integrity, Key, Record};
use tempfile::TempDir;

const DRIVERS: [DriverKind; 2] = [DriverKind::Sqlite, DriverKind::Xattr];

const PUBLISH_COUNT: usize = 10_000;
const PUBLISH_SIZE: usize = 4096;
const BIG: usize = 100_000;
const BIG_EVICT: usize = 10_000;
const READ_KEYS: usize = 1_000;

/// Where every directory of this run lives: under `target/` (ext4 with user xattrs here), not
/// necessarily `/tmp`, which may be a tmpfs without them.
fn run_root() -> &'static Path {
    static ROOT: OnceLock<TempDir> = OnceLock::new();
    ROOT.get_or_init(|| {
        let base = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../target")))
            .join("bench-tmp");
        fs::create_dir_all(&base).expect("create bench-tmp");
        tempfile::Builder::new()
            .prefix("store-")
            .tempdir_in(&base)
            .expect("create run dir")
    })
    .path()
}

fn fresh_dir(tag: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(tag)
        .tempdir_in(run_root())
        .expect("create temp dir")
}

/// Glance-like image ids (36 chars, uuid-shaped); sorted order is index order.
fn key(prefix: u32, i: usize) -> Key {
    Key::new(format!("{prefix:08x}-0000-4000-8000-{i:012}")).expect("valid key")
}

// ---- publish ------------------------------------------------------------------------------

fn publish(c: &mut Criterion) {
    let mut g = c.benchmark_group("publish_10k_4KiB");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(40))
        .throughput(Throughput::Elements(PUBLISH_COUNT as u64));
    let data = vec![0x5au8; PUBLISH_SIZE];
    let keys: Vec<Key> = (0..PUBLISH_COUNT).map(|i| key(1, i)).collect();
    for kind in DRIVERS {
        g.bench_function(kind.name(), |b| {
            b.iter_batched(
                // A fresh, empty cache each iteration: every publish is a real one.
                || {
                    let dir = fresh_dir("publish-");
                    let cache = Cache::open(dir.path(), kind).expect("open cache");
                    (dir, cache)
                },
                |(dir, cache)| {
                    for k in &keys {
                        let mut w = cache
                            .open_for_write(k)
                            .expect("open_for_write")
                            .expect("not cached yet");
                        w.write_all(&data).expect("write");
                        black_box(w.commit().expect("commit"));
                    }
                    (dir, cache) // removed after the timing stops
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

// ---- 100k-record fixtures -----------------------------------------------------------------

struct Fixture {
    kind: DriverKind,
    /// The cache directory the benches use.
    work: PathBuf,
    /// Copies (with xattrs) of the `evict` least recently accessed files, to restore after a prune.
    spare: PathBuf,
    /// A directory holding a copy of the pristine SQLite database and WAL (sqlite driver only).
    master_db: Option<PathBuf>,
    n: usize,
    evict: usize,
    _dir: TempDir,
}

fn big_fixture(kind: DriverKind) -> &'static Fixture {
    static F: [OnceLock<Fixture>; 2] = [OnceLock::new(), OnceLock::new()];
    F[kind as usize].get_or_init(|| Fixture::build(kind, BIG, BIG_EVICT))
}

impl Fixture {
    /// `n` published 1-byte images whose LRU order is their index order.
    fn build(kind: DriverKind, n: usize, evict: usize) -> Fixture {
        let started = Instant::now();
        let dir = fresh_dir(&format!("fixture-{}-{n}-", kind.name()));
        let work = dir.path().join("cache");
        let spare = dir.path().join("spare");
        fs::create_dir_all(&spare).unwrap();
        let cache = Cache::open(&work, kind).expect("open cache");
        let checksum = Integrity::of(Algorithm::Sha256, b"x");
        let base = 1_700_000_000.0;
        // A few threads: SQLite commits each record with synchronous=FULL (latency-bound).
        let threads = 4;
        std::thread::scope(|s| {
            for t in 0..threads {
                let (cache, checksum, work) = (&cache, &checksum, &work);
                s.spawn(move || {
                    for i in (t..n).step_by(threads) {
                        let k = key(2, i);
                        let path = work.join(k.as_str());
                        let mut f = File::create(&path).expect("create");
                        f.write_all(b"x").expect("write");
                        let at = base + i as f64 * 0.001;
                        let rec = Record {
                            image_id: k.to_string(),
                            size: 1,
                            checksum: Some(checksum.clone()),
                            hits: 0,
                            last_modified: at,
                            last_accessed: at,
                            props: Default::default(),
                        };
                        // stage (xattr writes its attributes) + insert (SQLite's row), as a
                        // publish does.
                        cache.driver().stage(&rec, &f).expect("stage");
                        cache.driver().insert(&rec, &f).expect("insert");
                    }
                });
            }
        });
        assert_eq!(cache.get_cache_size().unwrap(), n as u64);
        drop(cache); // closes SQLite (it may keep its WAL: copied below with the database)
        let files: Vec<PathBuf> = (0..evict).map(|i| work.join(key(2, i).as_str())).collect();
        cp_a(&files, &spare);
        let master_db = (kind == DriverKind::Sqlite).then(|| {
            let m = dir.path().join("master");
            fs::create_dir_all(&m).unwrap();
            copy_db(&work, &m);
            m
        });
        eprintln!(
            "fixture: {} records for {} in {:.1?}",
            n,
            kind.name(),
            started.elapsed()
        );
        Fixture {
            kind,
            work,
            spare,
            master_db,
            n,
            evict,
            _dir: dir,
        }
    }

    fn open(&self) -> Cache {
        Cache::open(&self.work, self.kind).expect("open cache")
    }

    /// Brings the directory back to its pristine state after a prune (no Cache may be open).
    fn restore(&self) {
        let files: Vec<PathBuf> = fs::read_dir(&self.spare)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        cp_a(&files, &self.work);
        if let Some(master) = &self.master_db {
            copy_db(master, &self.work);
        }
    }
}

/// Copies the SQLite database and its WAL, if any, from one directory to another, with no
/// connection open on either. The wal-index (`-shm`) is not copied: SQLite rebuilds it.
fn copy_db(from: &Path, to: &Path) {
    for ext in ["", "-wal", "-shm"] {
        let name = format!(".imgcache.sqlite{ext}");
        let _ = fs::remove_file(to.join(&name));
        if ext != "-shm" && from.join(&name).exists() {
            fs::copy(from.join(&name), to.join(&name)).expect("copy database");
        }
    }
}

/// `cp -a` (keeps xattrs and times) of `files` into `dest`, in chunks to stay under ARG_MAX.
fn cp_a(files: &[PathBuf], dest: &Path) {
    for chunk in files.chunks(2000) {
        let st = Command::new("cp")
            .arg("-a")
            .arg("--target-directory")
            .arg(dest)
            .args(chunk)
            .status()
            .expect("run cp");
        assert!(st.success(), "cp -a failed");
    }
}

// ---- reads over 100k records --------------------------------------------------------------

fn list_and_lru(c: &mut Criterion) {
    {
        let mut g = c.benchmark_group("get_cached_images_100k");
        g.sample_size(10).warm_up_time(Duration::from_secs(1));
        for kind in DRIVERS {
            g.measurement_time(Duration::from_secs(match kind {
                DriverKind::Sqlite => 5,
                DriverKind::Xattr => 20,
            }));
            // Fixtures are built inside the closure, so a filtered run skips them.
            g.bench_function(kind.name(), |b| {
                let fx = big_fixture(kind);
                let cache = fx.open();
                b.iter(|| {
                    let v = cache.get_cached_images().expect("list");
                    assert_eq!(v.len(), fx.n);
                    v
                })
            });
        }
        g.finish();
    }
    {
        let mut g = c.benchmark_group("get_least_recently_accessed_100k");
        g.sample_size(10).warm_up_time(Duration::from_secs(1));
        for kind in DRIVERS {
            g.measurement_time(Duration::from_secs(match kind {
                DriverKind::Sqlite => 3,
                DriverKind::Xattr => 20,
            }));
            g.bench_function(kind.name(), |b| {
                let fx = big_fixture(kind);
                let cache = fx.open();
                b.iter(|| {
                    let (id, size) = cache
                        .get_least_recently_accessed()
                        .expect("lru")
                        .expect("not empty");
                    assert_eq!(size, 1);
                    id
                })
            });
        }
        g.finish();
    }
}

// ---- prune --------------------------------------------------------------------------------

fn bench_prune(b: &mut criterion::Bencher<'_>, fx: &Fixture) {
    let max = (fx.n - fx.evict) as u64; // 1-byte images: exactly `evict` of them must go
    b.iter_batched(
        || {
            fx.restore();
            fx.open()
        },
        |cache| {
            let report = cache.prune(max).expect("prune");
            assert_eq!(report.evicted.len(), fx.evict);
            (cache, report) // closed after the timing stops
        },
        BatchSize::PerIteration,
    );
    // Leave the directory pristine for whatever runs next.
    fx.restore();
}

fn prune(c: &mut Criterion) {
    let mut g = c.benchmark_group("prune_10k_of_100k");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(10));
    for kind in [DriverKind::Sqlite, DriverKind::Xattr] {
        // xattr has no LRU index: its prune walks one snapshot of the directory (one scan of
        // the 100k files) and then evicts in that order.
        g.bench_function(kind.name(), |b| bench_prune(b, big_fixture(kind)));
    }
    g.finish();
}

// ---- open_for_read hit path ---------------------------------------------------------------

fn open_for_read(c: &mut Criterion) {
    let mut g = c.benchmark_group("open_for_read_hit_4KiB");
    g.sample_size(50)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    let data = vec![0xa5u8; PUBLISH_SIZE];
    for kind in DRIVERS {
        let keys: Vec<Key> = (0..READ_KEYS).map(|i| key(3, i)).collect();
        let mut state: Option<(TempDir, Cache)> = None;
        let mut buf = vec![0u8; PUBLISH_SIZE];
        let mut next = 0;
        g.bench_function(kind.name(), |b| {
            let (_, cache) = state.get_or_insert_with(|| {
                let dir = fresh_dir(&format!("read-{}-", kind.name()));
                let cache = Cache::open(dir.path(), kind).expect("open cache");
                for k in &keys {
                    let mut w = cache.open_for_write(k).unwrap().unwrap();
                    w.write_all(&data).unwrap();
                    w.commit().unwrap();
                }
                (dir, cache)
            });
            b.iter(|| {
                let k = &keys[next % READ_KEYS];
                next += 1;
                let mut r = cache.open_for_read(k).expect("open").expect("a hit");
                black_box(r.record().hits);
                r.read_exact(&mut buf).expect("read");
                black_box(&buf);
            })
        });
        drop(state);
    }
    g.finish();
}

criterion_group!(benches, publish, list_and_lru, prune, open_for_read);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    // The fixtures live in statics (never dropped): remove this run's directory ourselves.
    let _ = fs::remove_dir_all(run_root());
}
