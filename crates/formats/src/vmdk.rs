//! VMware's VMDK: a sparse extent (`KDMV` header, embedded descriptor, and for stream-optimized
//! images a footer), or a bare text descriptor.
//!
//! Sparse header, little-endian: magic `KDMV` (0), version u32 (4), flags u32 (8), capacity u64
//! in sectors (12), grain size u64 (20), descriptor offset u64 in sectors (28), descriptor size
//! u64 in sectors (36), GTEs per GT u32 (44), redundant GD offset u64 (48), GD offset u64 (56).

use serde::Serialize;

use crate::inspector::{Claim, Found, Probe};
use crate::region::{EndRegion, Region, le_u32, le_u64, magic};
use crate::{Check, Facts, Format, FormatError};

const MAGIC: &[u8] = b"KDMV";
const SECTOR: u64 = 512;
const HEADER: usize = 512;
/// The embedded descriptor must start right after the header (qemu's rule too).
const DESCRIPTOR_OFFSET: u64 = 512;
/// qemu reads at most this much descriptor.
const DESCRIPTOR_MAX: usize = (1 << 20) - 1;
/// A grain-directory offset saying "see the footer".
const GD_AT_END: u64 = u64::MAX;
/// Footer marker, footer (a copy of the header), end-of-stream marker.
const FOOTER: usize = 1536;
const ALLOWED_TYPES: [&str; 2] = ["monolithicsparse", "streamoptimized"];

/// What a VMDK says.
#[derive(Debug, Clone, Serialize)]
pub struct VmdkFacts {
    /// `sparse` (KDMV header with an embedded descriptor) or `descriptor` (a text file).
    pub kind: &'static str,
    /// Sparse header version.
    pub version: Option<u32>,
    /// From the descriptor, lower-cased.
    pub create_type: Option<String>,
    /// The descriptor's extent lines, lower-cased.
    pub extents: Vec<String>,
    pub capacity_sectors: Option<u64>,
    pub grain_sectors: Option<u64>,
    /// A footer follows (stream-optimized) and was checked.
    pub footer: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Undecided,
    Sparse,
    /// A text descriptor from offset 0; `done` once the text ended.
    Text {
        done: bool,
    },
    NotVmdk,
}

pub(crate) struct Vmdk {
    mode: Mode,
    header: Region,
    descriptor: Option<Region>,
    footer: Option<EndRegion>,
    /// A text descriptor file, read until NUL, a non-text byte or the size limit.
    text: Vec<u8>,
}

struct SparseHeader {
    version: u32,
    capacity: u64,
    grain: u64,
    desc_sector: u64,
    desc_sectors: u64,
    gd_offset: u64,
}

impl SparseHeader {
    fn parse(b: &[u8]) -> Self {
        SparseHeader {
            version: le_u32(b, 4),
            capacity: le_u64(b, 12),
            grain: le_u64(b, 20),
            desc_sector: le_u64(b, 28),
            desc_sectors: le_u64(b, 36),
            gd_offset: le_u64(b, 56),
        }
    }
}

fn is_text(b: u8) -> bool {
    matches!(b, b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | 0x20..=0x7e)
}

impl Vmdk {
    pub(crate) fn new() -> Self {
        Vmdk {
            mode: Mode::Undecided,
            header: Region::new(0, HEADER),
            descriptor: None,
            footer: None,
            text: Vec::new(),
        }
    }

    fn start_sparse(&mut self) -> Result<(), FormatError> {
        let h = SparseHeader::parse(self.header.data());
        if !(1..=3).contains(&h.version) {
            return Err(FormatError::malformed(
                Format::Vmdk,
                format!("sparse header version {} (1, 2 or 3 supported)", h.version),
            ));
        }
        if h.desc_sector.checked_mul(SECTOR) != Some(DESCRIPTOR_OFFSET) {
            return Err(FormatError::malformed(
                Format::Vmdk,
                format!(
                    "embedded descriptor at sector {} (must be sector 1)",
                    h.desc_sector
                ),
            ));
        }
        let len = h
            .desc_sectors
            .saturating_mul(SECTOR)
            .min(DESCRIPTOR_MAX as u64) as usize;
        self.descriptor = Some(Region::new(DESCRIPTOR_OFFSET, len));
        if h.gd_offset == GD_AT_END {
            self.footer = Some(EndRegion::new(FOOTER));
        }
        Ok(())
    }

    /// Takes text bytes from the start of the stream while they last.
    fn take_text(&mut self, pos: u64, chunk: &[u8]) {
        let next = self.text.len() as u64;
        if next < pos || next >= pos + chunk.len() as u64 {
            return;
        }
        let from = (next - pos) as usize;
        for &b in &chunk[from..] {
            if b == 0 || self.text.len() == DESCRIPTOR_MAX {
                self.mode = Mode::Text { done: true };
                return;
            }
            if !is_text(b) {
                self.mode = Mode::NotVmdk;
                self.text = Vec::new();
                return;
            }
            if self.text.capacity() == 0 {
                self.text.reserve_exact(4096);
            }
            self.text.push(b);
        }
    }

    fn text_create_type(&self) -> Option<String> {
        create_type(&String::from_utf8_lossy(&self.text).to_ascii_lowercase())
    }

    fn footer_check(&self, header: &[u8], footer: &[u8]) -> Result<(), FormatError> {
        let bad = |reason| Err(FormatError::VmdkFooter { reason });
        if footer.len() < FOOTER {
            return bad("the image is too short to hold a footer");
        }
        let copy = &footer[512..1024];
        let (h, f) = (SparseHeader::parse(header), SparseHeader::parse(copy));
        if copy[..4] != header[..4] {
            return bad("footer signature differs from the header's");
        }
        if h.version != f.version {
            return bad("footer version differs from the header's");
        }
        if (h.desc_sector, h.desc_sectors) != (f.desc_sector, f.desc_sectors) {
            return bad("footer names a different descriptor than the header");
        }
        if f.gd_offset == GD_AT_END {
            return bad("footer points at another footer");
        }
        let marker = &footer[..512];
        if le_u32(marker, 8) != 0 || le_u32(marker, 12) != 3 || marker[16..].iter().any(|&b| b != 0)
        {
            return bad("footer marker is invalid");
        }
        if footer[1024..].iter().any(|&b| b != 0) {
            return bad("end-of-stream marker is invalid");
        }
        Ok(())
    }
}

/// `createType="…"` from a lower-cased descriptor; `None` when missing or 64 characters or
/// longer.
fn create_type(text: &str) -> Option<String> {
    const KEY: &str = "createtype=\"";
    let start = text.find(KEY)? + KEY.len();
    let len = text[start..].find('"')?;
    (len < 64).then(|| text[start..start + len].to_string())
}

/// The descriptor check: create type, every line understood, extents naming no path.
fn check_descriptor(
    text: &str,
    create_type: Option<&str>,
) -> (Result<(), FormatError>, Vec<String>) {
    let mut extents = Vec::new();
    if !create_type.is_some_and(|t| ALLOWED_TYPES.contains(&t)) {
        return (
            Err(FormatError::VmdkCreateType {
                found: create_type.map(str::to_string),
            }),
            extents,
        );
    }
    for line in text.split('\n').map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with("ddb") {
            continue;
        }
        if line
            .split('=')
            .next()
            .is_some_and(|k| line.contains('=') && !k.contains(' '))
        {
            continue;
        }
        if ["rw", "rdonly", "noaccess"].contains(&line.split(' ').next().unwrap_or("")) {
            extents.push(line.to_string());
            continue;
        }
        return (
            Err(FormatError::VmdkDescriptorLine {
                line: line.to_string(),
            }),
            extents,
        );
    }
    if let Some(line) = extents.iter().find(|l| l.contains('/')) {
        return (
            Err(FormatError::VmdkExtentPath { line: line.clone() }),
            extents,
        );
    }
    if extents.is_empty() {
        return (Err(FormatError::VmdkNoExtent), extents);
    }
    (Ok(()), extents)
}

impl Probe for Vmdk {
    fn format(&self) -> Format {
        Format::Vmdk
    }

    fn feed(&mut self, pos: u64, chunk: &[u8]) -> Result<(), FormatError> {
        if self.mode == Mode::Undecided || self.mode == Mode::Sparse {
            self.header.capture(pos, chunk);
        }
        if self.mode == Mode::Undecided {
            match magic(self.header.data(), MAGIC) {
                Some(true) => self.mode = Mode::Sparse,
                Some(false) => {
                    // Not sparse: maybe a text descriptor. The header holds the stream's
                    // first bytes so far; start from them.
                    self.mode = Mode::Text { done: false };
                    let head = std::mem::replace(&mut self.header, Region::new(0, 0));
                    self.take_text(0, head.data());
                }
                None => {}
            }
        }
        match self.mode {
            Mode::Sparse => {
                if self.descriptor.is_none() && self.header.is_complete() {
                    self.start_sparse()?;
                }
                if let Some(d) = &mut self.descriptor {
                    d.capture(pos, chunk);
                }
                if let Some(f) = &mut self.footer {
                    f.capture(chunk);
                }
            }
            Mode::Text { done: false } => self.take_text(pos, chunk),
            _ => {}
        }
        if self.mode == (Mode::Text { done: true }) && self.text_create_type().is_none() {
            self.mode = Mode::NotVmdk;
            self.text = Vec::new();
        }
        Ok(())
    }

    fn claim(&self) -> Claim {
        match self.mode {
            Mode::Sparse => Claim::Yes,
            Mode::Text { done: true } => Claim::Yes,
            Mode::NotVmdk => Claim::No,
            _ => Claim::Undecided,
        }
    }

    fn wants(&self) -> Option<u64> {
        match self.mode {
            Mode::Undecided => self.header.wants(),
            Mode::Sparse => self
                .header
                .wants()
                .or_else(|| self.descriptor.as_ref().and_then(Region::wants)),
            Mode::Text { done: false } => Some(self.text.len() as u64),
            _ => None,
        }
    }

    fn tail(&self) -> usize {
        self.footer.as_ref().map_or(0, EndRegion::len)
    }

    fn gap(&mut self) {
        if let Some(f) = &mut self.footer {
            f.reset();
        }
    }

    fn finish(&mut self, size: u64) -> Result<Option<Found>, FormatError> {
        let (text, header) = match self.mode {
            Mode::Undecided | Mode::NotVmdk => return Ok(None),
            Mode::Text { .. } => {
                if self.text_create_type().is_none() {
                    return Ok(None);
                }
                (&self.text[..], None)
            }
            Mode::Sparse => {
                let truncated = |needed| FormatError::Truncated {
                    format: Format::Vmdk,
                    needed,
                    size,
                };
                if !self.header.is_complete() {
                    return Err(truncated(HEADER as u64));
                }
                let d = self.descriptor.as_ref().expect("descriptor region");
                if !d.is_complete() {
                    return Err(truncated(d.end()));
                }
                let d = d.data();
                let end = d.iter().position(|&b| b == 0).unwrap_or(d.len());
                (&d[..end], Some(SparseHeader::parse(self.header.data())))
            }
        };
        let mut checks = Vec::new();
        let (create_type, extents) = if text.is_ascii() {
            let text = String::from_utf8_lossy(text).to_ascii_lowercase();
            let create_type = create_type(&text);
            let (result, extents) = check_descriptor(&text, create_type.as_deref());
            checks.push(Check::new("descriptor", result));
            (create_type, extents)
        } else {
            checks.push(Check::new(
                "descriptor",
                Err(FormatError::VmdkDescriptorEncoding),
            ));
            (None, Vec::new())
        };
        if let Some(footer) = &self.footer {
            checks.push(Check::new(
                "footer",
                self.footer_check(self.header.data(), footer.data()),
            ));
        }
        let sparse = create_type
            .as_deref()
            .is_some_and(|t| ALLOWED_TYPES.contains(&t));
        Ok(Some(Found {
            virtual_size: header
                .as_ref()
                .filter(|_| sparse)
                .map(|h| h.capacity.saturating_mul(SECTOR)),
            facts: Facts::Vmdk(VmdkFacts {
                kind: if header.is_some() {
                    "sparse"
                } else {
                    "descriptor"
                },
                version: header.as_ref().map(|h| h.version),
                create_type,
                extents,
                capacity_sectors: header.as_ref().map(|h| h.capacity),
                grain_sectors: header.as_ref().map(|h| h.grain),
                footer: self.footer.is_some(),
            }),
            checks,
        }))
    }

    fn buffered(&self) -> usize {
        self.header.buffered()
            + self.descriptor.as_ref().map_or(0, Region::buffered)
            + self.footer.as_ref().map_or(0, EndRegion::buffered)
            + self.text.capacity()
    }
}
