//! Conversion to raw with `qemu-img convert`, behind the native inspector.
//!
//! qemu-img is only ever run on an image the [`crate::formats`] inspector has passed, and always
//! told the format (`-f <detected>`), so it never probes one itself. It runs under resource
//! limits (address space and CPU time, set with `setrlimit` between fork and exec), reports
//! progress (`-p`, parsed from its `(NN.NN/100%)` lines), and is killed when the conversion is
//! abandoned: on its error, or when the future is dropped (a caller's error, a signal handled
//! by dropping the work). Its output is removed in every case but success, and is inspected
//! again: it must come out raw (or gpt).
//!
//! Raw (and gpt) images need no conversion, and ISO images are never converted: they are used
//! as they are.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::formats::{Detected, Format, FormatError, report_file};
use crate::progress::Progress;

/// How qemu-img is found and confined.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConvertOptions {
    /// The qemu-img binary: a path, or a name looked up in `PATH`.
    pub qemu_img: PathBuf,
    /// Address-space limit (`RLIMIT_AS`) in bytes; Ironic's default is 2 GiB.
    pub address_space: u64,
    /// CPU-time limit (`RLIMIT_CPU`) in seconds.
    pub cpu_seconds: u64,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            qemu_img: PathBuf::from("qemu-img"),
            address_space: 2 << 30,
            cpu_seconds: 3600,
        }
    }
}

#[derive(Debug, Error)]
pub enum ConvertError {
    #[error(
        "qemu-img not found (looked for {}): converting images to raw needs qemu-img \
         (Debian: qemu-utils), or point --qemu-img / IMGCACHE_QEMU_IMG at it",
        .path.display()
    )]
    QemuImgMissing { path: PathBuf },

    #[error("{format} images are used as they are, never converted")]
    NotConvertible { format: Format },

    #[error("qemu-img convert -f {format} {} failed ({status}): {stderr}", .src.display())]
    Failed {
        src: PathBuf,
        format: Format,
        status: String,
        stderr: String,
    },

    #[error("qemu-img convert of {} produced {detected}, not raw: refusing it", .src.display())]
    NotRaw { src: PathBuf, detected: Format },

    #[error("inspecting the converted image: {0}")]
    Inspect(#[from] FormatError),

    #[error("{op} {}: {source}", .path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Whether an image of this format is converted by `force_raw`: neither raw (or gpt) nor ISO.
pub fn needs_conversion(format: Format) -> bool {
    !format.is_raw() && format != Format::Iso
}

/// The bytes a conversion of this image writes (its virtual size; the image's own size when
/// the format does not say), or 0 when it is not converted. This is what `clean_up_caches`
/// must free before converting.
pub fn conversion_space(detected: &Detected) -> u64 {
    if needs_conversion(detected.format) {
        detected.virtual_size.unwrap_or(detected.image_size)
    } else {
        0
    }
}

/// Removes the output unless disarmed: every way out but success leaves nothing.
struct Partial<'a> {
    path: &'a Path,
    armed: bool,
}

impl Drop for Partial<'_> {
    fn drop(&mut self) {
        if self.armed
            && let Err(e) = std::fs::remove_file(self.path)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.path.display(), error = %e, "could not remove a partial conversion");
        }
    }
}

/// Converts `src` (an image the inspector detected as `format`) into a raw file at `dst`,
/// which must not exist yet. `virtual_size` scales the progress reported (bytes of the
/// output); without it progress is in hundredths of a percent.
///
/// Cancel-safe: dropping the future kills qemu-img and removes `dst`.
pub async fn convert_to_raw(
    src: &Path,
    dst: &Path,
    format: Format,
    virtual_size: Option<u64>,
    opts: &ConvertOptions,
    progress: &dyn Progress,
) -> Result<Detected, ConvertError> {
    if !needs_conversion(format) {
        return Err(ConvertError::NotConvertible { format });
    }
    let mut cmd = tokio::process::Command::new(&opts.qemu_img);
    cmd.arg("convert")
        .args(["-f", format.qemu_driver(), "-O", "raw", "-p"])
        .arg(src)
        .arg(dst)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let (address_space, cpu) = (opts.address_space, opts.cpu_seconds);
    // SAFETY: the closure runs between fork and exec; it only makes two setrlimit system calls
    // (no allocation, no locks), which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            use rustix::process::{Resource, Rlimit, setrlimit};
            let limit = |v: u64| Rlimit {
                current: Some(v),
                maximum: Some(v),
            };
            setrlimit(Resource::As, limit(address_space))?;
            setrlimit(Resource::Cpu, limit(cpu))?;
            Ok(())
        });
    }
    let mut partial = Partial {
        path: dst,
        armed: true,
    };
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            partial.armed = false;
            return Err(ConvertError::QemuImgMissing {
                path: opts.qemu_img.clone(),
            });
        }
        Err(e) => {
            partial.armed = false;
            return Err(ConvertError::Io {
                op: "run",
                path: opts.qemu_img.clone(),
                source: e,
            });
        }
    };
    let stdout = child.stdout.take().expect("piped stdout");
    let stderr = child.stderr.take().expect("piped stderr");
    // Without a virtual size (none of the convertible formats lacks one) there is no total
    // to take qemu-img's percentage of: the phase is reported, its progress is not.
    progress.start(crate::progress::Phase::Convert, virtual_size);
    let total = virtual_size.unwrap_or(0);
    let (_, stderr, status) = tokio::join!(
        report_progress(stdout, total, progress),
        read_capped(stderr, 8 * 1024),
        child.wait()
    );
    progress.finish();
    let status = status.map_err(|e| ConvertError::Io {
        op: "wait for",
        path: opts.qemu_img.clone(),
        source: e,
    })?;
    if !status.success() {
        return Err(ConvertError::Failed {
            src: src.to_path_buf(),
            format,
            status: describe(status),
            stderr: stderr.split_whitespace().collect::<Vec<_>>().join(" "),
        });
    }
    let out = dst.to_path_buf();
    let detected = tokio::task::spawn_blocking(move || report_file(&out, None))
        .await
        .map_err(|e| ConvertError::Io {
            op: "inspect",
            path: dst.to_path_buf(),
            source: io::Error::other(e.to_string()),
        })??;
    if !detected.format.is_raw() {
        return Err(ConvertError::NotRaw {
            src: src.to_path_buf(),
            detected: detected.format,
        });
    }
    partial.armed = false;
    Ok(detected)
}

fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(9)) => "killed (SIGKILL): out of its resource limits?".into(),
        (None, Some(24)) => "killed: CPU time limit exceeded (SIGXCPU)".into(),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        (None, None) => status.to_string(),
    }
}

/// Reads qemu-img's `-p` output (`    (12.34/100%)\r`) and reports it as a share of `total`.
async fn report_progress(mut out: impl AsyncRead + Unpin, total: u64, progress: &dyn Progress) {
    let mut buf = [0u8; 512];
    let mut line = Vec::new();
    let mut reported = 0u64;
    loop {
        let n = match out.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        for &b in &buf[..n] {
            if b == b'\r' || b == b'\n' {
                if let Some(pct) = parse_percent(&line) {
                    let at = ((pct / 100.0) * total as f64) as u64;
                    let at = at.min(total);
                    if at > reported {
                        progress.advance(at - reported);
                        reported = at;
                    }
                }
                line.clear();
            } else if line.len() < 128 {
                line.push(b);
            }
        }
    }
}

/// `(12.34/100%)` → 12.34.
pub fn parse_percent(line: &[u8]) -> Option<f64> {
    let s = std::str::from_utf8(line).ok()?.trim();
    let inner = s.strip_prefix('(')?.strip_suffix("/100%)")?;
    let pct: f64 = inner.parse().ok()?;
    (0.0..=100.0).contains(&pct).then_some(pct)
}

/// The first `cap` bytes of a stream, draining the rest (so the writer never blocks).
async fn read_capped(mut r: impl AsyncRead + Unpin, cap: usize) -> String {
    let mut kept = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = cap.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
    String::from_utf8_lossy(&kept).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_img_progress() {
        assert_eq!(parse_percent(b"    (12.34/100%)"), Some(12.34));
        assert_eq!(parse_percent(b"(100.00/100%)"), Some(100.0));
        assert_eq!(parse_percent(b"(0.00/100%)"), Some(0.0));
        assert_eq!(parse_percent(b"(101.00/100%)"), None);
        assert_eq!(parse_percent(b"garbage"), None);
        assert_eq!(parse_percent(b""), None);
    }

    #[test]
    fn raw_gpt_and_iso_are_never_converted() {
        for f in [Format::Raw, Format::Gpt, Format::Iso] {
            assert!(!needs_conversion(f), "{f}");
        }
        for f in [
            Format::Qcow2,
            Format::Vmdk,
            Format::Vpc,
            Format::Vhdx,
            Format::Vdi,
        ] {
            assert!(needs_conversion(f), "{f}");
        }
    }
}
