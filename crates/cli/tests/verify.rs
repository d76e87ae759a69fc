//! `imgcache verify` and the server's background scrub: a byte flipped in a published image is
//! found, reported with both digests, moved to `invalid/`, and never served again.

mod common;
mod support;

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use imgcache_testkit::{digest::sha256_hex, image_bytes};
use support::{http, imgcache, list, tempdir, wait_key};

/// Flips one byte of `path` in place (same inode, so xattr records stay attached).
fn flip_byte(path: &Path, at: u64) {
    let mut bytes = [0u8; 1];
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    std::io::Read::read_exact(&mut f, &mut bytes).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&[bytes[0] ^ 0x01]).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn verify_finds_a_flipped_byte_on_both_drivers() {
    for driver in ["sqlite", "xattr"] {
        let dir = tempdir();
        let cache = dir.path().join("cache");
        let (a, b) = (image_bytes(3 << 20, 1), image_bytes(1 << 20, 2));
        std::fs::write(dir.path().join("a.img"), &a).unwrap();
        std::fs::write(dir.path().join("b.img"), &b).unwrap();
        for (k, f) in [("a", "a.img"), ("b", "b.img")] {
            let out = imgcache(&cache)
                .args(["--driver", driver, "add", k])
                .arg(dir.path().join(f))
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
        }
        let ok = imgcache(&cache)
            .args(["--driver", driver, "verify"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&ok.stdout);
        assert!(ok.status.success(), "{driver}: {ok:?}");
        assert!(text.contains("verified 2 images: 2 ok"), "{text}");

        flip_byte(&cache.join("a"), 12345);
        let out = imgcache(&cache)
            .args(["--driver", driver, "verify", "--json"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{driver}: {out:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["mismatches"], 1, "{v}");
        assert_eq!(v["ok"], 1, "{v}");
        let a_row = v["images"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["image_id"] == "a")
            .unwrap();
        assert_eq!(a_row["status"], "mismatch", "{a_row}");
        assert_eq!(
            a_row["expected"],
            format!("sha256:{}", sha256_hex(&a)),
            "{a_row}"
        );
        assert_ne!(a_row["actual"], a_row["expected"], "{a_row}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("recorded checksum"));
        assert!(
            cache.join("invalid/a").is_file(),
            "{driver}: not in invalid/"
        );
        assert!(!cache.join("a").exists(), "{driver}: still published");
        let ids: Vec<String> = list(&cache).into_iter().map(|r| r.0).collect();
        assert_eq!(ids, ["b"], "{driver}");
        // Verifying again: all good now; a named key that is gone is an error.
        let again = imgcache(&cache)
            .args(["--driver", driver, "verify"])
            .output()
            .unwrap();
        assert!(again.status.success(), "{again:?}");
        let gone = imgcache(&cache)
            .args(["--driver", driver, "verify", "a"])
            .output()
            .unwrap();
        assert_eq!(gone.status.code(), Some(1), "{gone:?}");
        println!("verify[{driver}]: 2 images, 1 flipped byte found, exit 1, moved to invalid/");
    }
}

/// `/v1/fetch` through `imgcache serve`; returns the body of a complete 200.
fn fetch_via(addr: &str, href: &str) -> Vec<u8> {
    let r = http(
        addr,
        "GET",
        &format!("/v1/fetch?href={href}"),
        &[],
        Duration::from_secs(30),
    )
    .unwrap();
    assert!(r.status == 200 && r.complete, "{} {}", r.status, r.head);
    r.body
}

#[test]
fn a_corrupted_image_is_not_served_after_verify_or_scrub() {
    let dir = tempdir();
    let root = dir.path().join("origin");
    std::fs::create_dir_all(root.join("images")).unwrap();
    let bytes = image_bytes(2 << 20, 9);
    std::fs::write(root.join("images/a.img"), &bytes).unwrap();
    std::fs::write(root.join("images/b.img"), &bytes[..1 << 20]).unwrap();
    let origin = imgcache_testkit::origin::Origin::start(&root);
    let cache = dir.path().join("cache");
    let prefix = format!("{}/images", origin.url);
    let server = common::serve(
        &cache,
        "http",
        &["--allow-href-prefix", &prefix, "--scrub-interval", "1s"],
    );
    let href_a = format!("{prefix}/a.img");
    assert_eq!(fetch_via(&server.addr, &href_a), bytes);
    let key_a = wait_key(&cache, &href_a).unwrap();

    // `imgcache verify` in another process while the server runs.
    flip_byte(&cache.join(&key_a), 100);
    let out = imgcache(&cache).args(["verify"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("MISMATCH"));
    assert!(cache.join("invalid").join(&key_a).is_file());
    // Not served from the cache any more: the origin is asked again, the bytes are right.
    assert_eq!(fetch_via(&server.addr, &href_a), bytes);
    assert_eq!(origin.data_requests("/images/a.img"), 2);

    // The background scrub finds the next flip by itself and counts it.
    let href_b = format!("{prefix}/b.img");
    assert_eq!(fetch_via(&server.addr, &href_b), &bytes[..1 << 20]);
    let key_b = wait_key(&cache, &href_b).unwrap();
    flip_byte(&cache.join(&key_b), 7);
    let t0 = Instant::now();
    let mismatches = loop {
        let m = http(&server.addr, "GET", "/metrics", &[], Duration::from_secs(5)).unwrap();
        let text = String::from_utf8_lossy(&m.body).to_string();
        let n = text
            .lines()
            .find_map(|l| l.strip_prefix("imgcache_scrub_mismatches_total "))
            .map(|v| v.trim().parse::<u64>().unwrap())
            .unwrap_or(0);
        if n >= 1 || t0.elapsed() > Duration::from_secs(30) {
            break n;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(mismatches, 1, "the scrubber found no mismatch within 30 s");
    assert!(cache.join("invalid").join(&key_b).is_file());
    assert_eq!(fetch_via(&server.addr, &href_b), &bytes[..1 << 20]);
    assert_eq!(origin.data_requests("/images/b.img"), 2);
    println!(
        "scrub: mismatch found {:.1}s after the flip, counted in imgcache_scrub_mismatches_total, re-fetched from the origin",
        t0.elapsed().as_secs_f64()
    );
}
