//! What the crates' tests share, so that no test file carries its own copy: deterministic
//! image bytes, and images made by the machine's real qemu-img. Dev-only: no crate depends on
//! it outside `[dev-dependencies]`, and it depends on no other workspace crate (any crate's
//! tests may use it).
//!
//! [`glance`] is a fake Keystone-protected Glance v2, [`origin`] a plain HTTP file origin and
//! [`faults`] an origin that misbehaves on purpose (resets, short bodies, stalls, ...),
//! each served by its own runtime or threads (usable from sync and async tests). [`http`] is
//! the client side (a reqwest client, a raw GET), [`cmd`] finds and runs programs, [`digest`]
//! gives hex digests and encodings.

mod background;
pub mod clients;
pub mod cmd;
pub mod faults;
pub mod glance;
pub mod http;
pub mod origin;
pub mod postgres;

/// HTTP dates, for tests whose crate has no date dependency of its own.
pub use httpdate;

use std::path::Path;
use std::process::Command;

use bytes::Bytes;

/// Deterministic pseudo-random bytes (xorshift): distinct per seed, incompressible-looking,
/// detected as a raw image.
pub fn image_bytes(len: usize, seed: u64) -> Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    Bytes::from(v)
}

/// Runs the machine's `qemu-img` (10; never Debian's qemu-utils) and panics with its stderr
/// if it fails.
pub fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img (the machine's qemu-img 10)");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Unsafe images a cache must refuse, made by qemu-img in `dir`; each returns the image's
/// path (other files it names are beside it).
pub mod bad_images {
    use super::*;

    fn s(p: &Path) -> &str {
        p.to_str().expect("utf-8 path")
    }

    /// A qcow2 naming a backing file (`base.raw`, written here).
    pub fn qcow2_backing_file(dir: &Path) -> std::path::PathBuf {
        let (base, img) = (dir.join("base.raw"), dir.join("backing.qcow2"));
        std::fs::write(&base, image_bytes(1 << 20, 7)).unwrap();
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            s(&base),
            "-F",
            "raw",
            s(&img),
        ]);
        img
    }

    /// A qcow2 whose data lives in an external data file.
    pub fn qcow2_data_file(dir: &Path) -> std::path::PathBuf {
        let img = dir.join("datafile.qcow2");
        let opt = format!("data_file={}", s(&dir.join("ext.raw")));
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", &opt, s(&img), "1M"]);
        img
    }

    /// A monolithicFlat VMDK: a descriptor whose extent names a file.
    pub fn vmdk_flat_extent(dir: &Path) -> std::path::PathBuf {
        let img = dir.join("flat.vmdk");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "subformat=monolithicFlat",
            s(&img),
            "1M",
        ]);
        img
    }

    /// A plain, safe image of `format` (e.g. qcow2 bytes to declare as raw, or a VDI).
    pub fn plain(dir: &Path, format: &str) -> std::path::PathBuf {
        let img = dir.join(format!("plain.{format}"));
        qemu_img(&["create", "-q", "-f", format, s(&img), "1M"]);
        img
    }
}

/// A file's bytes; panics naming the file when it cannot be read.
pub fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Hex digests and encodings, for tests whose crate has no hash dependency of its own.
pub mod digest {
    use base64::Engine as _;
    use sha2::Digest as _;

    /// Standard base64 (with padding).
    pub fn base64(data: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(data)
    }

    /// The bytes a hex string spells; panics on bad hex.
    pub fn from_hex(hex: &str) -> Vec<u8> {
        hex::decode(hex).unwrap_or_else(|e| panic!("hex {hex:?}: {e}"))
    }

    pub fn md5_hex(data: &[u8]) -> String {
        hex::encode(md5::Md5::digest(data))
    }
    pub fn sha256_hex(data: &[u8]) -> String {
        hex::encode(sha2::Sha256::digest(data))
    }
    pub fn sha512_hex(data: &[u8]) -> String {
        hex::encode(sha2::Sha512::digest(data))
    }

    /// md5 of a file, read 1 MiB at a time (for files too big to hold).
    pub fn md5_file(path: &std::path::Path) -> String {
        use std::io::Read;
        let mut f = std::fs::File::open(path).expect("open");
        let mut h = md5::Md5::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).expect("read");
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        hex::encode(h.finalize())
    }
}
