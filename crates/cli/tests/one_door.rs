//! One door: every way an image enters the cache refuses every bad image the same way.
//!
//! Entrances (the real binary): a `GET /v2/images/{id}/file` miss, a `GET /v1/fetch` miss,
//! a `PUT /v2/cache/{id}` prefetch, a background revalidation that would replace a cached
//! `/v1/fetch` hit, `imgcache fetch` and `imgcache fetch --raw`. Bad images: a qcow2 with a
//! backing file, a qcow2 with a data file, a VMDK with a flat extent, qcow2 bytes declared
//! `raw` by Glance's `disk_format`, a checksum mismatch, a truncated body, and a format
//! outside the permitted ones. For each pair: it is refused, nothing is published, nothing
//! is served afterwards, and (for the server's entrances) the refusal is counted in
//! `/metrics` under its reason.
//!
//! A plain URL carries no declared format, so "qcow2 declared raw" applies to the Glance
//! entrances only; the table says so rather than skipping silently.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use imgcache_testkit::faults::{ALWAYS, Fault, FaultOrigin, File};
use imgcache_testkit::glance::{FakeGlance, MEMBER_TOKEN, Seed};

/// The clients' and the service's Glance token (public images are a member's to read).
const TOKEN: &str = MEMBER_TOKEN;
/// imgcache's own admin token (the cache API), never sent to Glance.
const ADMIN: &str = "admin-secret";

/// An image and what its origin says of it.
#[derive(Clone)]
struct Obj {
    body: Bytes,
    disk_format: String,
    /// The origin vouches for other bytes: Glance's `checksum`/`os_hash_value` are not the
    /// data's, a plain file's bytes are corrupted under its `Content-MD5`.
    wrong_checksum: bool,
    /// The body is cut (the connection reset) after this many bytes.
    cut_at: Option<u64>,
}

// ---- The images ----------------------------------------------------------------------------

fn read(p: &Path) -> Bytes {
    Bytes::from(std::fs::read(p).unwrap())
}

/// A safe raw image: pseudo-random bytes.
fn raw_image(len: usize, seed: u64) -> Bytes {
    imgcache_testkit::image_bytes(len, seed)
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Bad {
    BackingFile,
    DataFile,
    VmdkFlatExtent,
    Qcow2DeclaredRaw,
    ChecksumMismatch,
    Truncated,
    NotPermitted,
}

impl Bad {
    const ALL: [Bad; 7] = [
        Bad::BackingFile,
        Bad::DataFile,
        Bad::VmdkFlatExtent,
        Bad::Qcow2DeclaredRaw,
        Bad::ChecksumMismatch,
        Bad::Truncated,
        Bad::NotPermitted,
    ];

    /// The `reason` label of `imgcache_refused_images_total` it must be counted under.
    fn reason(self) -> &'static str {
        match self {
            Bad::ChecksumMismatch => "checksum",
            Bad::Truncated => "truncated",
            _ => "unsafe_image",
        }
    }
}

/// The bytes and what the origin says of them.
fn bad_object(bad: Bad, dir: &Path) -> Obj {
    let good = raw_image(1 << 20, 7);
    let obj = |body: Bytes, fmt: &str| Obj {
        body,
        disk_format: fmt.into(),
        wrong_checksum: false,
        cut_at: None,
    };
    use imgcache_testkit::bad_images as u;
    match bad {
        Bad::BackingFile => obj(read(&u::qcow2_backing_file(dir)), "qcow2"),
        Bad::DataFile => obj(read(&u::qcow2_data_file(dir)), "qcow2"),
        Bad::VmdkFlatExtent => obj(read(&u::vmdk_flat_extent(dir)), "vmdk"),
        Bad::Qcow2DeclaredRaw => obj(read(&u::plain(dir, "qcow2")), "raw"),
        Bad::ChecksumMismatch => Obj {
            wrong_checksum: true,
            ..obj(good, "raw")
        },
        Bad::Truncated => Obj {
            cut_at: Some(300 << 10),
            ..obj(good, "raw")
        },
        Bad::NotPermitted => obj(read(&u::plain(dir, "vdi")), "vdi"),
    }
}

// ---- The entrances -------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum Entrance {
    GlanceMiss,
    FetchMiss,
    Prefetch,
    Revalidation,
    CliFetch,
    CliFetchRaw,
}

impl Entrance {
    const ALL: [Entrance; 6] = [
        Entrance::GlanceMiss,
        Entrance::FetchMiss,
        Entrance::Prefetch,
        Entrance::Revalidation,
        Entrance::CliFetch,
        Entrance::CliFetchRaw,
    ];
    /// Served by `imgcache serve` (counted in its `/metrics`).
    fn server(self) -> bool {
        !matches!(self, Entrance::CliFetch | Entrance::CliFetchRaw)
    }
    /// The image is named by a plain URL (no declared format).
    fn plain_url(self) -> bool {
        matches!(self, Entrance::FetchMiss | Entrance::Revalidation)
    }
}

fn curl(args: &[&str]) -> (i32, Vec<u8>) {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "30"])
        .args(args)
        .output()
        .unwrap();
    (out.status.code().unwrap_or(-1), out.stdout)
}

/// `imgcache_refused_images_total{reason}` as the server reports it now.
fn refused(addr: &str, reason: &str) -> u64 {
    let (_, text) = curl(&[&format!("http://{addr}/metrics")]);
    let want = format!("imgcache_refused_images_total{{reason=\"{reason}\"}} ");
    String::from_utf8_lossy(&text)
        .lines()
        .find_map(|l| l.strip_prefix(&want))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// Waits (polling the server's own counter, with a deadline) for a refusal to be counted.
fn refused_reaches(addr: &str, reason: &str, at_least: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n = refused(addr, reason);
        if n >= at_least || Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The keys with a record, per `imgcache list --json` on `cache`.
fn listed(cache: &Path) -> Vec<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_imgcache"))
        .arg("--cache-dir")
        .arg(cache)
        .args(["--json", "list"])
        .output()
        .unwrap();
    assert!(out.status.success(), "list: {out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| r["image_id"].as_str().unwrap().to_string())
        .collect()
}

fn uuid_for(n: usize) -> String {
    format!("00000000-0000-4000-8000-{n:012}")
}

struct World {
    /// A Keystone-protected Glance.
    glance: FakeGlance,
    /// A plain file server, its files under `/files/`.
    files: FaultOrigin,
    serve_cache: PathBuf,
    addr: String,
    fetch_cache: PathBuf,
    scratch: PathBuf,
}

impl World {
    /// `obj` as the Glance image `id`.
    fn glance_image(&self, id: &str, obj: &Obj) {
        let mut seed = Seed::new(id, obj.body.to_vec())
            .id(id)
            .disk_format(&obj.disk_format);
        if obj.wrong_checksum {
            seed = seed.wrong_checksums();
        }
        if let Some(n) = obj.cut_at {
            seed = seed.die_after(n);
        }
        self.glance.seed(seed);
    }

    /// `obj` as the file `/files/{name}`, with its `Content-MD5`, replacing what was there.
    fn plain_file(&self, name: &str, obj: &Obj) {
        let path = format!("/files/{name}");
        self.files
            .put(&path, File::new(obj.body.clone()).content_md5(true));
        if obj.wrong_checksum {
            let middle = obj.body.len() as u64 / 2;
            self.files.fail(&path, Fault::CorruptByte(middle), ALWAYS);
        }
        if let Some(n) = obj.cut_at {
            self.files.fail(&path, Fault::ResetAfter(n), ALWAYS);
        }
    }

    /// Drives one entrance with one bad image; `n` makes its names unique.
    fn case(&self, entrance: Entrance, bad: Bad, n: usize) {
        let label = format!("{entrance:?} × {bad:?}");
        let dir = self.scratch.join(format!("case{n}"));
        std::fs::create_dir_all(&dir).unwrap();
        let obj = bad_object(bad, &dir);
        let id = uuid_for(n);
        let name = format!("img{n}.img");
        let file_url = self.files.at(&format!("/files/{name}"));
        let reason = bad.reason();
        let before = refused(&self.addr, reason);
        let serve_key = |href: &str| {
            if entrance.plain_url() {
                uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, href.as_bytes()).to_string()
            } else {
                id.clone()
            }
        };
        match entrance {
            Entrance::GlanceMiss | Entrance::FetchMiss => {
                if entrance.plain_url() {
                    self.plain_file(&name, &obj);
                } else {
                    self.glance_image(&id, &obj);
                }
                let url = match entrance {
                    Entrance::GlanceMiss => format!("http://{}/v2/images/{id}/file", self.addr),
                    _ => format!("http://{}/v1/fetch?href={file_url}", self.addr),
                };
                let token = format!("X-Auth-Token: {TOKEN}");
                for attempt in ["miss", "again"] {
                    let (rc, body) = curl(&["-f", "-H", &token, &url]);
                    assert!(
                        rc != 0 && body != obj.body,
                        "{label}: {attempt}: served (curl {rc}, {} bytes)",
                        body.len()
                    );
                }
            }
            Entrance::Prefetch => {
                self.glance_image(&id, &obj);
                let (rc, _) = curl(&[
                    "-f",
                    "-X",
                    "PUT",
                    "-H",
                    &format!("X-Auth-Token: {ADMIN}"),
                    &format!("http://{}/v2/cache/{id}", self.addr),
                ]);
                assert_eq!(rc, 0, "{label}: queueing");
                assert!(
                    refused_reaches(&self.addr, reason, before + 1) > before,
                    "{label}: the prefetcher's refusal was not counted"
                );
                let (rc, body) = curl(&[
                    "-f",
                    "-H",
                    &format!("X-Auth-Token: {TOKEN}"),
                    &format!("http://{}/v2/images/{id}/file", self.addr),
                ]);
                assert!(
                    rc != 0 && body != obj.body,
                    "{label}: served after the prefetch"
                );
            }
            Entrance::Revalidation => {
                let good = raw_image(1 << 20, 1000 + n as u64);
                let good_obj = Obj {
                    body: good.clone(),
                    disk_format: "raw".into(),
                    wrong_checksum: false,
                    cut_at: None,
                };
                self.plain_file(&name, &good_obj);
                let url = format!("http://{}/v1/fetch?href={file_url}", self.addr);
                let (rc, body) = curl(&["-f", &url]);
                assert_eq!((rc, body.len()), (0, good.len()), "{label}: the good copy");
                assert!(body == good, "{label}: the good copy's bytes");
                // The origin changes to the bad image: the next hit is served from the cache
                // and revalidated in the background, which must refuse the new bytes.
                self.plain_file(&name, &obj);
                let (rc, body) = curl(&["-f", &url]);
                assert!(rc == 0 && body == good, "{label}: the hit is the good copy");
                assert!(
                    refused_reaches(&self.addr, reason, before + 1) > before,
                    "{label}: the revalidation's refusal was not counted"
                );
                let (rc, body) = curl(&["-f", &url]);
                assert!(
                    rc == 0 && body == good,
                    "{label}: still the good copy afterwards"
                );
                let published = std::fs::read(self.serve_cache.join(serve_key(&file_url))).unwrap();
                assert!(
                    published == good,
                    "{label}: the published file is the good copy"
                );
                return;
            }
            Entrance::CliFetch | Entrance::CliFetchRaw => {
                self.glance_image(&id, &obj);
                let dest = dir.join("dest.img");
                let mut cmd = Command::new(env!("CARGO_BIN_EXE_imgcache"));
                cmd.env_clear()
                    .env("PATH", std::env::var("PATH").unwrap_or_default())
                    .env("IMGCACHE_GLANCE_TOKEN", TOKEN)
                    .arg("--cache-dir")
                    .arg(&self.fetch_cache)
                    .args(["fetch", "-q", &format!("glance://{id}")])
                    .arg(&dest)
                    .args(["--glance-url", &self.glance.url]);
                if entrance == Entrance::CliFetchRaw {
                    cmd.arg("--raw");
                }
                let out = cmd.output().unwrap();
                let stderr = String::from_utf8_lossy(&out.stderr);
                assert_eq!(
                    out.status.code(),
                    Some(1),
                    "{label}: exit code; stderr {stderr}"
                );
                assert!(
                    stderr.starts_with("imgcache: "),
                    "{label}: one-line error: {stderr}"
                );
                assert!(!dest.exists(), "{label}: dest was written");
                let keys = listed(&self.fetch_cache);
                assert!(
                    !keys.iter().any(|k| k.starts_with(&id)),
                    "{label}: published {keys:?}"
                );
                return;
            }
        }
        // The server's entrances: nothing published, the refusal counted.
        let key = serve_key(&file_url);
        assert!(
            !listed(&self.serve_cache).contains(&key),
            "{label}: a record was published"
        );
        assert!(
            !self.serve_cache.join(&key).exists(),
            "{label}: a file was published"
        );
        assert!(
            refused_reaches(&self.addr, reason, before + 1) > before,
            "{label}: refusal not counted under {reason}"
        );
    }
}

#[test]
fn every_entrance_refuses_every_bad_image() {
    let glance =
        FakeGlance::start().unwrap_or_else(|e| panic!("the fake Glance cannot start: {e}"));
    let files = FaultOrigin::start();
    // As the file server this test had: `Range` ignored, so a cut body is not completed by
    // resumes.
    files.no_ranges();
    let tmp = tempfile::tempdir().unwrap();
    let serve_cache = tmp.path().join("serve");
    let fetch_cache = tmp.path().join("fetch");
    let scratch = tmp.path().join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let prefix = files.at("/files/");
    let server = common::serve_env(
        &serve_cache,
        "http",
        &[
            "--glance-url",
            &glance.url,
            "--admin-token",
            ADMIN,
            "--allow-href-prefix",
            &prefix,
            "--permitted-formats",
            "raw,gpt,qcow2,iso",
        ],
        // Every /v1/fetch hit is revalidated (in the background); the prefetcher has no
        // client, so it downloads with the service token.
        &[
            ("IMGCACHE_REVALIDATE_INTERVAL", "0s"),
            ("IMGCACHE_GLANCE_TOKEN", TOKEN),
        ],
    );
    let world = World {
        glance,
        files,
        serve_cache,
        addr: server.addr.clone(),
        fetch_cache,
        scratch,
    };
    let mut n = 0;
    let mut tried = Vec::new();
    for entrance in Entrance::ALL {
        for bad in Bad::ALL {
            n += 1;
            if bad == Bad::Qcow2DeclaredRaw && entrance.plain_url() {
                // Nothing declares a plain URL's format: qcow2 bytes are a qcow2 image.
                tried.push(format!(
                    "{entrance:?} × {bad:?}: n/a (a plain URL declares no format)"
                ));
                continue;
            }
            world.case(entrance, bad, n);
            tried.push(format!(
                "{entrance:?} × {bad:?}: refused{}",
                if entrance.server() {
                    ", counted"
                } else {
                    " (exit 1, no dest, no record)"
                }
            ));
        }
    }
    // The whole table, for the record.
    for line in &tried {
        eprintln!("one door: {line}");
    }
    let refusals = tried.iter().filter(|l| l.contains("refused")).count();
    assert_eq!(refusals, 6 * 7 - 2, "every applicable pair was tried");
    eprintln!("one door: {refusals} refusals over {} pairs", tried.len());
}

/// Hit paths open the master before deciding from it and link it while it is open: a fetch
/// racing an eviction links a whole master or downloads again, and never fails.
#[test]
fn fetch_racing_prune_never_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let body = raw_image(1 << 20, 99);
    let origin = imgcache_testkit::origin::Origin::temp();
    origin.put("/race.img", &body);
    let url = origin.at("/race.img");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let imgcache = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_imgcache"))
            .arg("--cache-dir")
            .arg(&cache)
            .args(args)
            .output()
            .unwrap()
    };
    // Prime the cache so the prune loop has something to evict from the start.
    let first = imgcache(&["fetch", "-q", &url, tmp.path().join("d0").to_str().unwrap()]);
    assert!(first.status.success(), "{first:?}");
    let prunes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let pruner = {
        let (stop, prunes, cache) = (stop.clone(), prunes.clone(), cache.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                let out = Command::new(env!("CARGO_BIN_EXE_imgcache"))
                    .arg("--cache-dir")
                    .arg(&cache)
                    .args(["prune", "--max-size", "0"])
                    .output()
                    .unwrap();
                assert!(out.status.success(), "prune: {out:?}");
                prunes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        })
    };
    let failures = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..4)
        .map(|t| {
            let (cache, url, failures, dir) = (
                cache.clone(),
                url.clone(),
                failures.clone(),
                tmp.path().to_path_buf(),
            );
            let body = body.clone();
            std::thread::spawn(move || {
                for i in 0..75 {
                    let dest = dir.join(format!("d{t}-{i}"));
                    let out = Command::new(env!("CARGO_BIN_EXE_imgcache"))
                        .arg("--cache-dir")
                        .arg(&cache)
                        .args(["fetch", "-q", &url])
                        .arg(&dest)
                        .output()
                        .unwrap();
                    let exact = std::fs::read(&dest).is_ok_and(|b| b == body);
                    if !out.status.success() || !exact {
                        failures.lock().unwrap().push(format!(
                            "{}: exact {exact}: {}",
                            dest.display(),
                            String::from_utf8_lossy(&out.stderr)
                        ));
                    }
                    // The deploy is done with it: the master is evictable again.
                    let _ = std::fs::remove_file(&dest);
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Release);
    pruner.join().unwrap();
    let failures = failures.lock().unwrap();
    eprintln!(
        "fetch racing prune: 300 fetches, {} prunes alongside, {} failures",
        prunes.load(std::sync::atomic::Ordering::Relaxed),
        failures.len()
    );
    assert!(
        prunes.load(std::sync::atomic::Ordering::Relaxed) >= 10,
        "the race ran"
    );
    assert!(failures.is_empty(), "{failures:#?}");
}
