//! Disk-image format inspection: what an image is, read from its bytes, and whether it is safe
//! to hand to qemu-img.
//!
//! A disk image is untrusted input: a qcow2 header naming a backing file or an external data
//! file, or a VMDK descriptor naming another extent file, makes qemu read host files
//! (CVE-2022-47951, CVE-2024-32498). The [`Inspector`] reads the headers itself, in one pass over
//! a stream fed in chunks of any size, with memory bounded by [`MAX_BUFFERED`], and refuses such
//! images with a [`FormatError`] that names the reason. The rules are those of
//! `shared/FORMAT-SAFETY.md` (OpenStack's format inspector, checked against qemu-img 10), with
//! a few deliberate differences from oslo.utils' inspector, each on the safe side or taken from
//! Ironic's policy layer:
//!
//! - A file that carries a format's magic but whose header is then truncated, malformed or
//!   points outside the file (qcow2 L1/refcount tables past EOF, a VHDX metadata region that
//!   overlaps the headers, a VMDK descriptor not at sector 1) is refused, not read as raw.
//! - iso + gpt (a bootable hybrid ISO) is an ISO, as Ironic decides; oslo's CLI alone calls it
//!   ambiguous.
//! - A region computed from another must lie after it, so the answer never depends on how the
//!   stream is cut into chunks (the tests feed 1-, 7-, 4096-byte and whole-file chunks).
//! - Glance's `ami` is accepted like `raw`; `gpt` is permitted whenever `raw` is.
//!
//! The checks that need the whole image (a stream-optimized VMDK's footer, LUKS's virtual size)
//! are made in [`Inspector::finish`]; a declared format that the content rules out stops
//! [`Inspector::feed`] at once, so a download can be abandoned early.
//!
//! ```no_run
//! use imgcache_formats::{Format, Inspector, Policy};
//! # fn chunks() -> Vec<Vec<u8>> { vec![] }
//! let mut inspector = Inspector::new(Some(Format::Qcow2));
//! for chunk in chunks() {
//!     inspector.feed(&chunk)?; // fails early on a declared-format mismatch
//! }
//! let detected = inspector.finish()?; // fails on any safety verdict
//! Policy::default().check(&detected, None)?; // permitted formats
//! # Ok::<(), imgcache_formats::FormatError>(())
//! ```

mod error;
mod inspector;
mod iso;
mod luks;
mod partition;
mod qcow;
mod region;
mod vdi;
mod vhd;
mod vmdk;

use std::fmt;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::str::FromStr;

use serde::{Serialize, Serializer};

pub use error::FormatError;
pub use inspector::{Inspector, MAX_BUFFERED};
pub use iso::IsoFacts;
pub use luks::LuksFacts;
pub use partition::{Partition, PartitionFacts};
pub use qcow::{QcowFacts, QedFacts};
pub use vdi::VdiFacts;
pub use vhd::{VhdxFacts, VpcFacts};
pub use vmdk::VmdkFacts;

/// A format the inspector recognises, by its qemu-img driver name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Format {
    Raw,
    Qcow2,
    /// VHD, which qemu-img calls `vpc`.
    Vpc,
    Vhdx,
    Vmdk,
    Vdi,
    Qed,
    Iso,
    Luks,
    /// A raw image that starts with an MBR or GPT partition table.
    Gpt,
}

impl Format {
    pub const ALL: [Format; 10] = [
        Format::Raw,
        Format::Qcow2,
        Format::Vpc,
        Format::Vhdx,
        Format::Vmdk,
        Format::Vdi,
        Format::Qed,
        Format::Iso,
        Format::Luks,
        Format::Gpt,
    ];

    /// The qemu-img name (what `qemu-img convert -f` takes).
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vpc => "vpc",
            Format::Vhdx => "vhdx",
            Format::Vmdk => "vmdk",
            Format::Vdi => "vdi",
            Format::Qed => "qed",
            Format::Iso => "iso",
            Format::Luks => "luks",
            Format::Gpt => "gpt",
        }
    }

    /// Raw bytes as far as qemu-img is concerned: nothing to convert.
    pub fn is_raw(self) -> bool {
        matches!(self, Format::Raw | Format::Gpt)
    }

    /// The driver name to give `qemu-img -f` for this format (`raw` for gpt and iso).
    pub fn qemu_driver(self) -> &'static str {
        match self {
            Format::Gpt | Format::Iso => "raw",
            f => f.name(),
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Format {
    type Err = FormatError;

    /// qemu-img names, plus `vhd` (Glance's name for vpc).
    fn from_str(s: &str) -> Result<Self, FormatError> {
        let lower = s.to_ascii_lowercase();
        if lower == "vhd" {
            return Ok(Format::Vpc);
        }
        Format::ALL
            .into_iter()
            .find(|f| f.name() == lower)
            .ok_or_else(|| FormatError::UnknownFormatName(s.to_string()))
    }
}

impl Serialize for Format {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// A format as a source declares it: Glance's `disk_format`, or `--format` from the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DiskFormat {
    Image(Format),
    /// Amazon kernel image: accepts any content.
    Aki,
    /// Amazon ramdisk image: accepts any content.
    Ari,
    /// Amazon machine image: a raw disk, accepts what `raw` accepts.
    Ami,
}

impl DiskFormat {
    /// The format to tell the [`Inspector`] to expect, if any.
    pub fn expected(self) -> Option<Format> {
        match self {
            DiskFormat::Image(f) => Some(f),
            DiskFormat::Ami => Some(Format::Raw),
            DiskFormat::Aki | DiskFormat::Ari => None,
        }
    }

    /// Whether content detected as `detected` is acceptable under this declaration: `raw` (and
    /// `ami`) accept raw or gpt, `aki`/`ari` accept anything, everything else must be equal.
    pub fn accepts(self, detected: Format) -> bool {
        match self {
            DiskFormat::Aki | DiskFormat::Ari => true,
            DiskFormat::Ami | DiskFormat::Image(Format::Raw) => detected.is_raw(),
            DiskFormat::Image(f) => f == detected,
        }
    }
}

impl From<Format> for DiskFormat {
    fn from(f: Format) -> Self {
        DiskFormat::Image(f)
    }
}

impl fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DiskFormat::Image(fmt) => fmt.name(),
            DiskFormat::Aki => "aki",
            DiskFormat::Ari => "ari",
            DiskFormat::Ami => "ami",
        })
    }
}

impl FromStr for DiskFormat {
    type Err = FormatError;

    fn from_str(s: &str) -> Result<Self, FormatError> {
        match s.to_ascii_lowercase().as_str() {
            "aki" => Ok(DiskFormat::Aki),
            "ari" => Ok(DiskFormat::Ari),
            "ami" => Ok(DiskFormat::Ami),
            _ => s.parse().map(DiskFormat::Image),
        }
    }
}

impl Serialize for DiskFormat {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// One safety verdict: a named check and its outcome.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    pub result: Result<(), FormatError>,
}

impl Check {
    pub(crate) fn new(name: &'static str, result: Result<(), FormatError>) -> Self {
        Check { name, result }
    }

    pub fn passed(&self) -> bool {
        self.result.is_ok()
    }
}

impl Serialize for Check {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Check", 4)?;
        st.serialize_field("name", self.name)?;
        st.serialize_field("passed", &self.passed())?;
        st.serialize_field("reason", &self.result.as_ref().err().map(|e| e.reason()))?;
        st.serialize_field(
            "message",
            &self.result.as_ref().err().map(|e| e.to_string()),
        )?;
        st.end()
    }
}

/// What the format's header says, beyond the format and the virtual size.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Facts {
    Raw,
    Qcow2(QcowFacts),
    Qed(QedFacts),
    Vpc(VpcFacts),
    Vhdx(VhdxFacts),
    Vmdk(VmdkFacts),
    Vdi(VdiFacts),
    Iso(IsoFacts),
    Luks(LuksFacts),
    Gpt(PartitionFacts),
}

/// What the inspector found.
#[derive(Debug, Clone, Serialize)]
pub struct Detected {
    pub format: Format,
    /// The disk size the image presents, in bytes, where the format says it.
    pub virtual_size: Option<u64>,
    /// The bytes the inspector was fed (the image's size once the stream has ended).
    pub image_size: u64,
    pub facts: Facts,
    /// Every safety verdict, in the order they were checked.
    pub checks: Vec<Check>,
    /// Whether every check passed.
    pub safe: bool,
}

impl Detected {
    /// The first failed check, if any.
    pub fn refusal(&self) -> Option<&FormatError> {
        self.checks.iter().find_map(|c| c.result.as_ref().err())
    }

    /// `Err` with the first failed check's reason.
    pub fn ensure_safe(&self) -> Result<(), FormatError> {
        self.refusal().map_or(Ok(()), |e| Err(e.clone()))
    }
}

/// Which formats this cache accepts at all (Ironic's `permitted_image_formats`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub permitted: Vec<Format>,
}

impl Default for Policy {
    /// raw, gpt, qcow2 and iso.
    fn default() -> Self {
        Policy {
            permitted: vec![Format::Raw, Format::Gpt, Format::Qcow2, Format::Iso],
        }
    }
}

impl Policy {
    /// gpt counts as raw: it is permitted when either is.
    pub fn permits(&self, format: Format) -> bool {
        self.permitted.contains(&format)
            || (format == Format::Gpt && self.permitted.contains(&Format::Raw))
    }

    /// Every verdict, then the declared format, then the permitted list.
    pub fn check(
        &self,
        detected: &Detected,
        declared: Option<DiskFormat>,
    ) -> Result<(), FormatError> {
        detected.ensure_safe()?;
        if let Some(declared) = declared
            && !declared.accepts(detected.format)
        {
            return Err(FormatError::FormatMismatch {
                declared,
                detected: Some(detected.format),
            });
        }
        if !self.permits(detected.format) {
            return Err(FormatError::NotPermitted {
                format: detected.format,
                permitted: self.permitted.clone(),
            });
        }
        Ok(())
    }
}

/// Inspects a file and refuses it on any failed verdict or a mismatch with `expected`.
pub fn inspect_file(path: &Path, expected: Option<Format>) -> Result<Detected, FormatError> {
    let detected = report_file(path, expected)?;
    detected.ensure_safe()?;
    Ok(detected)
}

/// Inspects a file and reports every verdict, failed ones included (for `imgcache inspect`).
/// Errs only when no single format can be told (truncated or ambiguous headers, a mismatch
/// found before the end) or on I/O errors.
///
/// Reads only the bytes some format still needs: the headers, then the last bytes of the
/// file, so the time does not depend on the image's size.
pub fn report_file(path: &Path, expected: Option<Format>) -> Result<Detected, FormatError> {
    let mut file = std::fs::File::open(path).map_err(|e| FormatError::io("open", path, e))?;
    let size = file
        .metadata()
        .map_err(|e| FormatError::io("stat", path, e))?
        .len();
    let mut inspector = Inspector::new(expected);
    let mut buf = vec![0u8; 64 * 1024];
    let mut pos = 0u64;
    loop {
        // Jump over bytes no format looks at, keeping the tail some formats check.
        let target = inspector
            .wants()
            .unwrap_or(u64::MAX)
            .min(size.saturating_sub(inspector.tail() as u64));
        if target > pos {
            file.seek(SeekFrom::Start(target))
                .map_err(|e| FormatError::io("seek", path, e))?;
            inspector.skip_to(target);
            pos = target;
        }
        let n = file
            .read(&mut buf)
            .map_err(|e| FormatError::io("read", path, e))?;
        if n == 0 {
            break;
        }
        inspector.feed(&buf[..n])?;
        pos += n as u64;
    }
    inspector.finish_report()
}
