//! Format handling in `fetch_image`: inspection while downloading, zstd, the declared and
//! permitted formats, and `force_raw` conversion with qemu-img — on real images made with
//! qemu-img at test time, compared with qemu-img's own output.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use imgcache_fetch::ImageMeta;
use imgcache_fetch::convert::{ConvertError, ConvertOptions};
use imgcache_fetch::formats::{DiskFormat, Format, FormatError, Policy};
use imgcache_fetch::pipeline::ImageOptions;
use imgcache_fetch::{
    ChecksumSpec, FetchError, FetchOptions, ImageCache, Outcome, Phase, Progress,
};
use imgcache_store::{Algorithm, Integrity, Status};
use imgcache_testkit::faults::{ALWAYS, Fault, FaultOrigin, File};

use imgcache_testkit::qemu_img;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A 4 MiB raw disk: 2 MiB of data, a hole, then 512 KiB of data at the end.
fn raw_disk(dir: &Path) -> PathBuf {
    let path = dir.join("disk.raw");
    let mut v = vec![0u8; 4 * MIB];
    v[..2 * MIB].copy_from_slice(&image_bytes(2 * MIB, 11));
    v[3 * MIB + MIB / 2..].copy_from_slice(&image_bytes(MIB / 2, 12));
    std::fs::write(&path, v).unwrap();
    path
}

/// `raw` converted to `format` by qemu-img.
fn image(dir: &Path, raw: &Path, format: &str, opts: &[&str]) -> PathBuf {
    let path = dir.join(format!("disk.{format}"));
    let mut args = vec!["convert", "-q", "-f", "raw", "-O", format];
    args.extend_from_slice(opts);
    args.extend([s(raw), s(&path)]);
    qemu_img(&args);
    path
}

/// What `qemu-img convert -f <format> -O raw` itself makes of `src`.
fn qemu_raw(dir: &Path, src: &Path, format: &str) -> Vec<u8> {
    let out = dir.join(format!("{format}.expected.raw"));
    qemu_img(&["convert", "-q", "-f", format, "-O", "raw", s(src), s(&out)]);
    std::fs::read(out).unwrap()
}

fn permissive() -> ImageOptions {
    ImageOptions {
        policy: Policy {
            permitted: vec![
                Format::Raw,
                Format::Gpt,
                Format::Qcow2,
                Format::Vmdk,
                Format::Vpc,
                Format::Vhdx,
                Format::Vdi,
                Format::Iso,
            ],
        },
        ..ImageOptions::default()
    }
}

/// A cache whose image options are `images`.
fn env_with(images: ImageOptions) -> Env {
    let mut env = Env::new();
    env.ic = ImageCache::new(env.spec.clone(), &sources())
        .unwrap()
        .with_images(images);
    env
}

fn raw_opts() -> FetchOptions {
    FetchOptions {
        force_raw: true,
        ..FetchOptions::default()
    }
}

/// Records what is reported: (phase, total announced, units advanced) per phase.
#[derive(Default)]
struct Recorder(Mutex<Vec<(Phase, Option<u64>, u64)>>);

impl Progress for Recorder {
    fn start(&self, phase: Phase, total: Option<u64>) {
        self.0.lock().unwrap().push((phase, total, 0));
    }
    fn advance(&self, bytes: u64) {
        if let Some(last) = self.0.lock().unwrap().last_mut() {
            last.2 += bytes;
        }
    }
}

fn no_leftovers(env: &Env) {
    let stray: Vec<_> = std::fs::read_dir(env.cache().layout().incomplete_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(stray.is_empty(), "incomplete/ not empty: {stray:?}");
}

/// qcow2, vmdk, vpc, vhdx and vdi all come out as the bytes `qemu-img convert -O raw` makes,
/// published under the `.converted` key with what they were converted from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_raw_converts_each_format_like_qemu_img() {
    let origin = FaultOrigin::start();
    let env = env_with(permissive());
    let work = tempfile::tempdir().unwrap();
    let raw = raw_disk(work.path());
    for (format, opts) in [
        ("qcow2", &[][..]),
        ("vmdk", &[][..]),
        ("vpc", &[][..]),
        ("vhdx", &[][..]),
        ("vdi", &[][..]),
    ] {
        let img = image(work.path(), &raw, format, opts);
        let expected = qemu_raw(work.path(), &img, format);
        let path = format!("/disk.{format}");
        origin.put(&path, File::bare(std::fs::read(&img).unwrap()));
        let href = origin.at(&path);
        let progress = Arc::new(Recorder::default());
        let opts = FetchOptions {
            progress: Some(progress.clone()),
            ..raw_opts()
        };
        let dest = env.dest(format);
        let r = env.ic.fetch_image(&href, &dest, &opts).await.unwrap();
        assert_eq!(r.outcome, Outcome::Downloaded, "{format}");
        let key = key_of(&href, true);
        assert_eq!(r.key, key.as_str());
        assert_linked(&env.master(&key), &dest, &expected);
        let rec = env.cache().get_record(&key).unwrap().unwrap();
        assert_eq!(rec.size, expected.len() as u64, "{format}");
        assert_eq!(
            rec.checksum,
            Some(Integrity::of(Algorithm::Sha256, &expected)),
            "{format}: the record holds the raw bytes' checksum"
        );
        assert_eq!(
            ImageMeta::from_props(&rec.props).source_format.as_deref(),
            Some(format)
        );
        assert_eq!(
            ImageMeta::from_props(&rec.props).format.as_deref(),
            Some("raw")
        );
        assert!(
            ImageMeta::from_props(&rec.props).source_checksum.is_some(),
            "{format}"
        );
        // The conversion reported its progress in bytes of the virtual size, up to 100%.
        let phases = progress.0.lock().unwrap().clone();
        let conversion = phases.last().unwrap();
        assert_eq!(conversion.0, Phase::Convert, "{format}: {phases:?}");
        assert_eq!(
            conversion.1,
            Some(expected.len() as u64),
            "{format}: {phases:?}"
        );
        assert_eq!(conversion.2, expected.len() as u64, "{format}: {phases:?}");
        assert_eq!(phases[0].0, Phase::Download, "{format}: {phases:?}");
        no_leftovers(&env);
        assert!(!env.cache().is_cached(&key_of(&href, false)).unwrap());
    }
    // A second fetch is a hit on the converted master: no download, no conversion.
    let href = origin.at("/disk.qcow2");
    let r = env
        .ic
        .fetch_image(&href, &env.dest("again"), &raw_opts())
        .await
        .unwrap();
    assert_eq!(r.outcome, Outcome::Hit);
    assert_eq!(origin.counts("/disk.qcow2").total(), 1);
}

/// Raw and ISO images are used as they are, even with force_raw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_and_iso_are_never_converted() {
    let origin = FaultOrigin::start();
    let env = Env::new();
    let work = tempfile::tempdir().unwrap();
    let raw = std::fs::read(raw_disk(work.path())).unwrap();
    let root = work.path().join("isoroot");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(root.join("hello.txt"), image_bytes(100_000, 5)).unwrap();
    let iso_path = work.path().join("disk.iso");
    let out = Command::new("genisoimage")
        .args(["-quiet", "-o"])
        .arg(&iso_path)
        .arg(&root)
        .output()
        .expect("genisoimage (CI installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let iso = std::fs::read(&iso_path).unwrap();
    for (name, bytes, format) in [("raw", raw, "raw"), ("iso", iso, "iso")] {
        let path = format!("/disk.{name}");
        origin.put(&path, File::bare(bytes.clone()));
        let href = origin.at(&path);
        let dest = env.dest(name);
        env.ic.fetch_image(&href, &dest, &raw_opts()).await.unwrap();
        let key = key_of(&href, true);
        assert_linked(&env.master(&key), &dest, &bytes);
        let rec = env.cache().get_record(&key).unwrap().unwrap();
        assert_eq!(
            ImageMeta::from_props(&rec.props).format.as_deref(),
            Some(format)
        );
        assert!(
            ImageMeta::from_props(&rec.props).source_format.is_none(),
            "{name} was converted"
        );
        assert_eq!(rec.checksum, Some(Integrity::of(Algorithm::Sha256, &bytes)));
    }
}

/// A qcow2 naming a backing file is refused from its header, while it downloads: the origin
/// never finishes sending it, and the partial file holds only the first part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsafe_image_is_refused_before_it_is_downloaded() {
    let origin = FaultOrigin::start();
    let env = Env::new();
    let work = tempfile::tempdir().unwrap();
    let base = work.path().join("base.raw");
    qemu_img(&["create", "-q", "-f", "raw", s(&base), "16M"]);
    let backed = work.path().join("backed.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        s(&base),
        "-F",
        "raw",
        s(&backed),
    ]);
    // Padded to 32 MiB, sent 64 KiB every 10 ms: about 5 s for the whole body.
    let mut bytes = std::fs::read(&backed).unwrap();
    let total = 32 * MIB;
    bytes.extend_from_slice(&image_bytes(total - bytes.len(), 9));
    origin.put("/backed.qcow2", File::bare(bytes));
    let pace = Fault::Paced {
        step: 64 * 1024,
        pause: Duration::from_millis(10),
    };
    origin.fail("/backed.qcow2", pace, ALWAYS);
    let href = origin.at("/backed.qcow2");
    let dest = env.dest("backed");
    let started = Instant::now();
    let err = expect_err(
        env.ic
            .fetch_image(&href, &dest, &FetchOptions::default())
            .await,
    );
    let took = started.elapsed();
    match &err {
        FetchError::Image {
            source: FormatError::BackingFile { name, .. },
            ..
        } => assert_eq!(name.as_deref(), Some(s(&base))),
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("backing file"), "{err}");
    assert!(took < Duration::from_secs(3), "refused after {took:?}");
    let key = key_of(&href, false);
    assert_failed_cleanly(&env, &key, &dest);
    let partial = invalid_len(&env, &key).unwrap_or(0);
    assert!(partial < total as u64 / 4, "{partial} bytes written");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        origin.body_end("/backed.qcow2").is_none(),
        "the whole body was sent"
    );
}

/// A declared format (the caller's) that the content contradicts, and a format outside the
/// permitted list, are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_and_permitted_formats_are_enforced() {
    let origin = FaultOrigin::start();
    let env = Env::new();
    let work = tempfile::tempdir().unwrap();
    let raw = raw_disk(work.path());
    let qcow = std::fs::read(image(work.path(), &raw, "qcow2", &[])).unwrap();
    origin.put("/q", File::bare(qcow.clone()));
    let href = origin.at("/q");
    let opts = FetchOptions {
        disk_format: Some(DiskFormat::Image(Format::Raw)),
        ..FetchOptions::default()
    };
    let err = expect_err(env.ic.fetch_image(&href, &env.dest("q"), &opts).await);
    assert!(
        matches!(
            err,
            FetchError::Image {
                source: FormatError::FormatMismatch { .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert_failed_cleanly(&env, &key_of(&href, false), &env.dest("q"));
    // Declared right, it passes.
    let opts = FetchOptions {
        disk_format: Some(DiskFormat::Image(Format::Qcow2)),
        ..FetchOptions::default()
    };
    env.ic
        .fetch_image(&href, &env.dest("q2"), &opts)
        .await
        .unwrap();
    assert_linked(&env.master(&key_of(&href, false)), &env.dest("q2"), &qcow);

    // vmdk is not in the default permitted list.
    let vmdk = std::fs::read(image(work.path(), &raw, "vmdk", &[])).unwrap();
    origin.put("/v", File::bare(vmdk));
    let href = origin.at("/v");
    let err = expect_err(env.ic.fetch_image(&href, &env.dest("v"), &raw_opts()).await);
    assert!(
        matches!(
            err,
            FetchError::Image {
                source: FormatError::NotPermitted {
                    format: Format::Vmdk,
                    ..
                },
                ..
            }
        ),
        "{err:?}"
    );
    assert_failed_cleanly(&env, &key_of(&href, true), &env.dest("v"));
}

/// A zstd-compressed qcow2 is decompressed on the way in, inspected and cached as the qcow2
/// (or converted); the checksum the source gives is of the compressed bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zstd_downloads_are_decompressed_and_checked_as_sent() {
    let origin = FaultOrigin::start();
    let env = Env::new();
    let work = tempfile::tempdir().unwrap();
    let raw = raw_disk(work.path());
    let qcow_path = image(work.path(), &raw, "qcow2", &[]);
    let qcow = std::fs::read(&qcow_path).unwrap();
    let expected_raw = qemu_raw(work.path(), &qcow_path, "qcow2");
    let packed = zstd::bulk::compress(&qcow, 3).unwrap();
    assert_eq!(&packed[..4], &[0x28, 0xB5, 0x2F, 0xFD]);
    let sent = Integrity::of(Algorithm::Sha256, &packed);
    origin.put("/disk.qcow2.zst", File::bare(packed.clone()));
    let href = origin.at("/disk.qcow2.zst");
    let with_checksum = |force_raw: bool, c: &Integrity| FetchOptions {
        force_raw,
        checksum: Some(c.to_string().parse::<ChecksumSpec>().unwrap()),
        ..FetchOptions::default()
    };

    // A checksum of the decompressed bytes is not the one of what was sent.
    let wrong = Integrity::of(Algorithm::Sha256, &qcow);
    let err = expect_err(
        env.ic
            .fetch_image(&href, &env.dest("wrong"), &with_checksum(false, &wrong))
            .await,
    );
    assert!(matches!(err, FetchError::Checksum { .. }), "{err:?}");
    assert_failed_cleanly(&env, &key_of(&href, false), &env.dest("wrong"));

    let dest = env.dest("qcow");
    env.ic
        .fetch_image(&href, &dest, &with_checksum(false, &sent))
        .await
        .unwrap();
    let key = key_of(&href, false);
    assert_linked(&env.master(&key), &dest, &qcow);
    let rec = env.cache().get_record(&key).unwrap().unwrap();
    assert_eq!(
        ImageMeta::from_props(&rec.props).format.as_deref(),
        Some("qcow2")
    );
    assert_eq!(
        ImageMeta::from_props(&rec.props).source_checksum,
        Some(sent.clone()),
        "the compressed bytes' checksum is kept"
    );

    let dest = env.dest("raw");
    env.ic
        .fetch_image(&href, &dest, &with_checksum(true, &sent))
        .await
        .unwrap();
    assert_linked(&env.master(&key_of(&href, true)), &dest, &expected_raw);
    no_leftovers(&env);

    // Configured off, the compressed bytes are cached as they are (and read as raw).
    let off = env_with(ImageOptions {
        zstd: false,
        ..ImageOptions::default()
    });
    let dest = off.dest("packed");
    off.ic
        .fetch_image(&href, &dest, &with_checksum(false, &sent))
        .await
        .unwrap();
    assert_linked(&off.master(&key_of(&href, false)), &dest, &packed);
}

/// A qcow2 that passes the inspector but that qemu-img cannot read (an L1 entry pointing at
/// an unaligned offset): the conversion fails with qemu-img's reason, and nothing is left in
/// incomplete/ or published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_conversion_leaves_nothing() {
    let origin = FaultOrigin::start();
    let env = Env::new();
    let work = tempfile::tempdir().unwrap();
    let raw = raw_disk(work.path());
    let mut qcow = std::fs::read(image(work.path(), &raw, "qcow2", &[])).unwrap();
    let l1 = u64::from_be_bytes(qcow[40..48].try_into().unwrap()) as usize;
    qcow[l1..l1 + 8].copy_from_slice(&(0x8000_0000_0001_2345u64).to_be_bytes());
    origin.put("/corrupt.qcow2", File::bare(Bytes::from(qcow)));
    let href = origin.at("/corrupt.qcow2");
    let dest = env.dest("corrupt");
    let err = expect_err(env.ic.fetch_image(&href, &dest, &raw_opts()).await);
    match &err {
        FetchError::Convert(ConvertError::Failed { format, stderr, .. }) => {
            assert_eq!(*format, Format::Qcow2);
            assert!(!stderr.is_empty());
        }
        other => panic!("{other:?}"),
    }
    assert!(
        err.to_string().contains("qemu-img convert -f qcow2"),
        "{err}"
    );
    assert_failed_cleanly(&env, &key_of(&href, true), &dest);
}

/// A stand-in for qemu-img that records its limits and pid, reports 5% and hangs.
fn fake_qemu_img(dir: &Path) -> PathBuf {
    let path = dir.join("qemu-img");
    let script = format!(
        "#!/bin/sh\nulimit -v > {d}/as\nulimit -t > {d}/cpu\nfor a; do last=$a; done\n: > \"$last\"\n\
         printf '    (5.00/100%%)\\r'\necho $$ > {d}/pid\nexec sleep 30\n",
        d = dir.display()
    );
    std::fs::write(&path, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Dropping the fetch mid-conversion (a caller giving up, a signal) kills qemu-img and removes
/// its output; qemu-img ran under the configured address-space and CPU limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_conversion_kills_qemu_img_and_leaves_nothing() {
    let origin = FaultOrigin::start();
    let work = tempfile::tempdir().unwrap();
    let fake = fake_qemu_img(work.path());
    let env = env_with(ImageOptions {
        convert: ConvertOptions {
            qemu_img: fake,
            address_space: 1536 << 20,
            cpu_seconds: 77,
        },
        ..ImageOptions::default()
    });
    let raw = raw_disk(work.path());
    let qcow = std::fs::read(image(work.path(), &raw, "qcow2", &[])).unwrap();
    origin.put("/q", File::bare(qcow));
    let href = origin.at("/q");
    let key = key_of(&href, true);
    let dest = env.dest("q");
    let env = Arc::new(env);
    let task = {
        let (env, href, dest) = (env.clone(), href.clone(), dest.clone());
        tokio::spawn(async move { env.ic.fetch_image(&href, &dest, &raw_opts()).await })
    };
    let pid_file = work.path().join("pid");
    assert!(
        wait_until(Duration::from_secs(10), || pid_file.exists()
            && std::fs::read_to_string(&pid_file)
                .is_ok_and(|s| s.ends_with('\n'))),
        "the conversion never started"
    );
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let scratch = env
        .cache()
        .layout()
        .incomplete_dir()
        .join(format!("{key}.part"));
    assert!(
        scratch.exists(),
        "qemu-img writes beside the entry in incomplete/"
    );
    assert!(alive(pid));
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    assert!(
        wait_until(Duration::from_secs(5), || !alive(pid)),
        "qemu-img still running"
    );
    assert!(!scratch.exists());
    assert_failed_cleanly(&env, &key, &dest);
    assert_eq!(
        std::fs::read_to_string(work.path().join("as"))
            .unwrap()
            .trim(),
        (1536 * 1024).to_string()
    );
    assert_eq!(
        std::fs::read_to_string(work.path().join("cpu"))
            .unwrap()
            .trim(),
        "77"
    );
}

/// Without qemu-img, a conversion fails saying so; nothing is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_qemu_img_is_a_clear_error() {
    let origin = FaultOrigin::start();
    let env = env_with(ImageOptions {
        convert: ConvertOptions {
            qemu_img: "/nonexistent/bin/qemu-img".into(),
            ..ConvertOptions::default()
        },
        ..ImageOptions::default()
    });
    let work = tempfile::tempdir().unwrap();
    let raw = raw_disk(work.path());
    let qcow = std::fs::read(image(work.path(), &raw, "qcow2", &[])).unwrap();
    origin.put("/q", File::bare(qcow));
    let href = origin.at("/q");
    let dest = env.dest("q");
    let err = expect_err(env.ic.fetch_image(&href, &dest, &raw_opts()).await);
    assert!(
        matches!(
            err,
            FetchError::Convert(ConvertError::QemuImgMissing { .. })
        ),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains("qemu-img not found"), "{msg}");
    assert!(msg.contains("/nonexistent/bin/qemu-img"), "{msg}");
    assert_failed_cleanly(&env, &key_of(&href, true), &dest);
    // Not needed without force_raw: the qcow2 is cached as it is.
    env.ic
        .fetch_image(&href, &env.dest("as-is"), &FetchOptions::default())
        .await
        .unwrap();
    assert!(
        env.cache()
            .get_image_filepath(&key_of(&href, false), Status::Active)
            .exists()
    );
}
