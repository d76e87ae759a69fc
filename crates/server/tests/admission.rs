//! Admission against the size limit and bounded waits, through the running server:
//! concurrent misses never together pass `max_size`, what cannot fit is streamed uncached and
//! evicts nothing, and a follower of a hung writer in another process gets a clear error.

mod common;

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;

const IDS: [&str; 8] = [
    "a0000000-0000-4000-8000-000000000001",
    "a0000000-0000-4000-8000-000000000002",
    "a0000000-0000-4000-8000-000000000003",
    "a0000000-0000-4000-8000-000000000004",
    "a0000000-0000-4000-8000-000000000005",
    "a0000000-0000-4000-8000-000000000006",
    "a0000000-0000-4000-8000-000000000007",
    "a0000000-0000-4000-8000-000000000008",
];

/// Bytes of image files in the cache directory: published ones and those being written.
fn bytes_on_disk(cache: &Path) -> u64 {
    let sum = |dir: &Path| -> u64 {
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| {
                        let n = e.file_name();
                        let n = n.to_string_lossy();
                        // Image files are named by their key; the database and markers are not.
                        n.len() == 36 && e.file_type().is_ok_and(|t| t.is_file())
                    })
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    };
    sum(cache) + sum(&cache.join("incomplete"))
}

async fn get(srv: &Server, id: &str) -> (u16, Vec<u8>) {
    let r = client()
        .get(srv.image_url(id))
        .header("x-auth-token", MEMBER_TOKEN)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (
        status,
        r.bytes().await.map(|b| b.to_vec()).unwrap_or_default(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_misses_never_pass_the_hard_limit() {
    let fake = fake_glance();
    let bodies: Vec<_> = (0..8).map(|i| image_bytes(16 * MIB, 100 + i)).collect();
    for (id, body) in IDS.iter().zip(&bodies) {
        // Slow enough that all eight downloads overlap.
        fake.seed(image(id, body.clone()).throttle(MIB, Duration::from_millis(20)));
    }
    let srv = Server::start_with(Some(&fake.url), |c| c.max_size = 40 * MIB as u64).await;
    let cache = srv.cache_dir();

    // The cache's size, sampled every 50 ms while the misses run.
    let done = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let samples = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (done, peak, samples, cache) =
            (done.clone(), peak.clone(), samples.clone(), cache.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Acquire) {
                peak.fetch_max(bytes_on_disk(&cache), Ordering::AcqRel);
                samples.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let srv = Arc::new(srv);
    let clients: Vec<_> = IDS
        .iter()
        .map(|id| {
            let (srv, id) = (srv.clone(), id.to_string());
            tokio::spawn(async move { get(&srv, &id).await })
        })
        .collect();
    for (i, c) in clients.into_iter().enumerate() {
        let (status, body) = c.await.unwrap();
        assert_eq!(status, 200, "{}", IDS[i]);
        assert!(
            body == bodies[i],
            "{}: exact bytes, cached or passed through",
            IDS[i]
        );
    }
    done.store(true, Ordering::Release);
    sampler.join().unwrap();
    let peak = peak.load(Ordering::Acquire);
    let cached = imgcache_store::Cache::open(&cache, imgcache_store::DriverKind::Sqlite)
        .unwrap()
        .get_cached_images()
        .unwrap();
    eprintln!(
        "hard limit: 8 misses of 16 MiB under 40 MiB: peak {:.1} MiB over {} samples, {} cached, {} passed through",
        peak as f64 / MIB as f64,
        samples.load(Ordering::Relaxed),
        cached.len(),
        8 - cached.len()
    );
    assert!(peak <= 40 * MIB as u64, "peak {peak} bytes");
    assert!(samples.load(Ordering::Relaxed) >= 5, "sampled while it ran");
    // Two fit at a time (3 × 16 MiB > 40 MiB); the rest were streamed uncached.
    assert!((1..=2).contains(&cached.len()), "{} cached", cached.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_that_can_never_fit_evicts_nothing() {
    let fake = fake_glance();
    let small: Vec<_> = (0..3).map(|i| image_bytes(8 * MIB, 200 + i)).collect();
    for (id, body) in IDS.iter().zip(&small) {
        fake.seed(image(id, body.clone()));
    }
    let huge = image_bytes(64 * MIB, 210);
    fake.seed(image(IDS[7], huge.clone()));
    let srv = Server::start_with(Some(&fake.url), |c| c.max_size = 32 * MIB as u64).await;
    for (id, body) in IDS.iter().zip(&small) {
        let (status, got) = get(&srv, id).await;
        assert!(status == 200 && got == *body, "{id}");
        srv.wait_published(id).await;
    }
    // 64 MiB under a 32 MiB limit: streamed to the client, nothing evicted for it.
    let (status, got) = get(&srv, IDS[7]).await;
    assert!(
        status == 200 && got == huge,
        "the huge image is passed through"
    );
    for id in &IDS[..3] {
        assert!(
            srv.published(id).exists(),
            "{id} was evicted for an image that cannot fit"
        );
    }
    assert!(!srv.published(IDS[7]).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_of_a_hung_writer_in_another_process_gives_up() {
    let fake = fake_glance();
    let body = image_bytes(4 * MIB, 300);
    fake.seed(image(IDS[0], body.clone()));
    let bound = Duration::from_secs(1);
    let srv = Server::start_with(Some(&fake.url), |c| c.sources.http.read_timeout = bound).await;
    // "Another process": a second store on the same directory holds the key and writes a
    // little, then hangs (never writes again, never lets go).
    let other =
        imgcache_store::Cache::open(srv.cache_dir(), imgcache_store::DriverKind::Sqlite).unwrap();
    let key = imgcache_store::Key::new(IDS[0]).unwrap();
    let mut w = other.open_for_write(&key).unwrap().expect("key lock");
    w.write_all(&body[..MIB]).unwrap();
    let started = Instant::now();
    let r = client()
        .get(srv.image_url(IDS[0]))
        .header("x-auth-token", MEMBER_TOKEN)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let outcome = r.bytes().await;
    let took = started.elapsed();
    // The follower streamed the first MiB (a 200 head) and was then cut, or got the error
    // before any byte; either way within the bound and a little.
    match status {
        200 => assert!(outcome.is_err(), "a stalled writer's follower must be cut"),
        504 => {
            let text = String::from_utf8_lossy(&outcome.unwrap()).into_owned();
            assert!(text.contains("made no progress"), "{text}");
        }
        other => panic!("status {other}"),
    }
    assert!(took >= bound, "gave up after {took:?}, before the bound");
    assert!(took < bound * 4, "gave up after {took:?}");
    eprintln!("hung writer: the follower gave up after {took:?} (bound {bound:?})");
    // The server's next request waits again (the writer still holds the key), and once the
    // writer is gone, it downloads the image itself.
    drop(w);
    let (status, got) = get(&srv, IDS[0]).await;
    assert!(status == 200 && got == body);
}

/// A download of unannounced length that outgrows the cache mid-way stops caching; every
/// client following it is carried on with the rest of the one origin answer (no cut, no second
/// request), and the disk never holds more than the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn followers_of_a_fill_that_outgrows_the_cache_are_streamed_the_rest() {
    use imgcache_testkit::faults::{Fault, FaultOrigin};
    let origin = FaultOrigin::start();
    let body = image_bytes(24 * MIB, 7);
    // Slow enough (about 4 s) for all three clients to join before it passes 8 MiB.
    let fault = Fault::ChunkedPaced {
        step: 256 << 10,
        pause: Duration::from_millis(40),
    };
    origin.add("/big.img", body.clone(), fault);
    let srv = Server::start_with(None, |c| {
        c.max_size = 8 * MIB as u64;
        c.allow_href_prefixes = vec![origin.at("/")];
    })
    .await;
    let url =
        reqwest::Url::parse_with_params(&srv.url("/v1/fetch"), &[("href", origin.at("/big.img"))])
            .unwrap();
    let cache = srv.cache_dir();
    let done = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (done, peak, cache) = (done.clone(), peak.clone(), cache.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Acquire) {
                peak.fetch_max(bytes_on_disk(&cache), Ordering::AcqRel);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let r = client().get(url).send().await.unwrap();
                let status = r.status().as_u16();
                (status, r.bytes().await.map_err(|e| e.to_string()))
            })
        })
        .collect();
    for (i, c) in clients.into_iter().enumerate() {
        let (status, got) = c.await.unwrap();
        assert_eq!(status, 200, "client {i}");
        let got = got.unwrap_or_else(|e| panic!("client {i} was cut: {e}"));
        assert!(
            got == body,
            "client {i}: {} bytes, not the image",
            got.len()
        );
    }
    done.store(true, Ordering::Release);
    sampler.join().unwrap();
    let gets = origin.gets("/big.img");
    let peak = peak.load(Ordering::Acquire);
    eprintln!(
        "outgrew the cache: 3 clients of a 24 MiB chunked image under 8 MiB: {gets} origin request(s), peak on disk {:.1} MiB",
        peak as f64 / MIB as f64
    );
    assert_eq!(gets, 1, "one origin answer carried every client");
    assert!(peak <= 8 * MIB as u64, "peak {peak} bytes on disk");
    let cached = imgcache_store::Cache::open(&cache, imgcache_store::DriverKind::Sqlite)
        .unwrap()
        .get_cached_images()
        .unwrap();
    assert!(cached.is_empty(), "nothing cached: {cached:?}");
}
