//! qemu's own formats: qcow2 (versions 2 and 3) and QED (always refused).
//!
//! qcow2 header, big-endian: magic `QFI\xfb` (0), version u32 (4), backing_file_offset u64 (8),
//! backing_file_size u32 (16), cluster_bits u32 (20), size u64 (24), crypt_method u32 (32),
//! l1_size u32 (36), l1_table_offset u64 (40), refcount_table_offset u64 (48),
//! refcount_table_clusters u32 (56), nb_snapshots u32 (60), snapshots_offset u64 (64); version 3
//! adds incompatible_features u64 (72), compatible_features u64 (80), autoclear_features u64
//! (88), refcount_order u32 (96), header_length u32 (100).

use serde::Serialize;

use crate::inspector::{Claim, Found, HeaderProbe, Probe};
use crate::region::{Region, be_u32, be_u64, le_u32, le_u64, magic};
use crate::{Check, Facts, Format, FormatError};

const QCOW2_MAGIC: &[u8] = b"QFI\xfb";
/// Version 3's minimum header; version 2's is 72 bytes.
const QCOW2_HEADER: usize = 104;
/// qemu refuses longer backing file names.
const BACKING_NAME_MAX: u32 = 1023;
/// qemu's cluster size limits: 512 bytes to 2 MiB.
const CLUSTER_BITS: std::ops::RangeInclusive<u32> = 9..=21;
const MAX_CLUSTER: u64 = 1 << 21;

const INCOMPATIBLE: [&str; 5] = [
    "dirty",
    "corrupt",
    "external_data_file",
    "compression_type",
    "extended_l2",
];

/// What a qcow2 header says.
#[derive(Debug, Clone, Serialize)]
pub struct QcowFacts {
    pub version: u32,
    pub cluster_size: u64,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    /// The backing file name, when it could be read (at most 1023 bytes).
    pub backing_file: Option<String>,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub nb_snapshots: u32,
    /// The raw incompatible-features field (version 3), and the names of its known bits.
    pub incompatible_features: u64,
    pub incompatible_feature_names: Vec<&'static str>,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub header_length: u32,
}

pub(crate) struct Qcow2 {
    header: Region,
    backing: Option<Region>,
}

impl Qcow2 {
    pub(crate) fn new() -> Self {
        Qcow2 {
            header: Region::new(0, QCOW2_HEADER),
            backing: None,
        }
    }

    fn refuse(&self, what: &'static str, value: u64, limit: u64) -> FormatError {
        FormatError::OutOfBounds {
            format: Format::Qcow2,
            what,
            value,
            limit,
        }
    }
}

impl Probe for Qcow2 {
    fn format(&self) -> Format {
        Format::Qcow2
    }

    fn feed(&mut self, pos: u64, chunk: &[u8]) -> Result<(), FormatError> {
        self.header.capture(pos, chunk);
        let h = self.header.data();
        if self.backing.is_none() && h.len() >= 20 && self.claim() == Claim::Yes {
            let (offset, len) = (be_u64(h, 8), be_u32(h, 16));
            // Only read the name when it lies after the fields that point at it, so it is
            // still ahead in the stream whatever the chunking.
            // It lies in the first cluster (2 MiB at most), so reading it costs little.
            if (20..MAX_CLUSTER).contains(&offset) && len > 0 && len <= BACKING_NAME_MAX {
                self.backing = Some(Region::new(offset, len as usize));
            }
        }
        if let Some(b) = &mut self.backing {
            b.capture(pos, chunk);
        }
        Ok(())
    }

    fn claim(&self) -> Claim {
        match magic(self.header.data(), QCOW2_MAGIC) {
            None => Claim::Undecided,
            Some(false) => Claim::No,
            Some(true) => Claim::Yes,
        }
    }

    fn wants(&self) -> Option<u64> {
        if self.claim() == Claim::No {
            return None;
        }
        self.header
            .wants()
            .or_else(|| self.backing.as_ref().and_then(Region::wants))
    }

    fn finish(&mut self, size: u64) -> Result<Option<Found>, FormatError> {
        if self.claim() != Claim::Yes {
            return Ok(None);
        }
        let h = self.header.data();
        let truncated = |needed: usize| FormatError::Truncated {
            format: Format::Qcow2,
            needed: needed as u64,
            size,
        };
        if h.len() < 8 {
            return Err(truncated(8));
        }
        let version = be_u32(h, 4);
        // Other versions are refused by the unknown-features verdict; read them as version 2.
        let needed = if version == 3 { QCOW2_HEADER } else { 72 };
        if h.len() < needed {
            return Err(truncated(needed));
        }
        let cluster_bits = be_u32(h, 20);
        if !CLUSTER_BITS.contains(&cluster_bits) {
            return Err(self.refuse("cluster_bits", cluster_bits.into(), 21));
        }
        let cluster_size = 1u64 << cluster_bits;
        let virtual_size = be_u64(h, 24);
        if virtual_size > i64::MAX as u64 {
            return Err(self.refuse("virtual size", virtual_size, i64::MAX as u64));
        }
        let l1_size = be_u32(h, 36);
        let l1_table_offset = be_u64(h, 40);
        let l1_end = l1_table_offset.saturating_add(u64::from(l1_size) * 8);
        if l1_size > 0 && l1_end > size {
            return Err(self.refuse("L1 table end", l1_end, size));
        }
        let refcount_table_offset = be_u64(h, 48);
        if refcount_table_offset >= size {
            return Err(self.refuse("refcount table offset", refcount_table_offset, size));
        }
        let (incompatible, compatible, autoclear, header_length) = if version == 3 {
            (be_u64(h, 72), be_u64(h, 80), be_u64(h, 88), be_u32(h, 100))
        } else {
            (0, 0, 0, 72)
        };
        if version == 3 && !(QCOW2_HEADER as u64..=cluster_size).contains(&u64::from(header_length))
        {
            return Err(self.refuse("header length", header_length.into(), cluster_size));
        }

        let backing_file_offset = be_u64(h, 8);
        let backing_file_size = be_u32(h, 16);
        let backing_file = self
            .backing
            .as_ref()
            .filter(|r| r.is_complete())
            .map(|r| String::from_utf8_lossy(r.data()).into_owned());

        let checks = vec![
            Check::new(
                "backing_file",
                if backing_file_offset == 0 {
                    Ok(())
                } else {
                    Err(FormatError::BackingFile {
                        offset: backing_file_offset,
                        name: backing_file.clone(),
                    })
                },
            ),
            // Byte 79 is the low byte of the incompatible features in version 3. The check
            // runs on version 2 too (as the reference inspector does), to err on the safe side.
            Check::new(
                "data_file",
                if h.get(79).copied().unwrap_or(0) & 0x04 == 0 {
                    Ok(())
                } else {
                    Err(FormatError::DataFile)
                },
            ),
            Check::new(
                "unknown_features",
                match version {
                    2 => Ok(()),
                    3 if h[72..79].iter().all(|&b| b == 0) && h[79] & 0xF0 == 0 => Ok(()),
                    3 => Err(FormatError::UnknownFeatures {
                        detail: format!(
                            "incompatible feature bits {incompatible:#x} (only bits 0-3 are known)"
                        ),
                    }),
                    v => Err(FormatError::UnknownFeatures {
                        detail: format!("qcow2 version {v} (only 2 and 3 are supported)"),
                    }),
                },
            ),
        ];
        let facts = QcowFacts {
            version,
            cluster_size,
            backing_file_offset,
            backing_file_size,
            backing_file,
            crypt_method: be_u32(h, 32),
            l1_size,
            l1_table_offset,
            refcount_table_offset,
            nb_snapshots: be_u32(h, 60),
            incompatible_features: incompatible,
            incompatible_feature_names: INCOMPATIBLE
                .iter()
                .enumerate()
                .filter(|(bit, _)| incompatible & (1 << bit) != 0)
                .map(|(_, name)| *name)
                .collect(),
            compatible_features: compatible,
            autoclear_features: autoclear,
            header_length,
        };
        Ok(Some(Found {
            virtual_size: Some(virtual_size),
            facts: Facts::Qcow2(facts),
            checks,
        }))
    }

    fn buffered(&self) -> usize {
        self.header.buffered() + self.backing.as_ref().map_or(0, Region::buffered)
    }
}

const QED_MAGIC: &[u8] = b"QED\0";
/// Header fields up to the backing file name size (little-endian).
const QED_HEADER: usize = 64;

/// What a QED header says (it is refused whatever it says).
#[derive(Debug, Clone, Serialize)]
pub struct QedFacts {
    pub cluster_size: Option<u32>,
    pub features: Option<u64>,
    pub backing_file_offset: Option<u32>,
}

pub(crate) struct Qed {
    header: Region,
}

impl Qed {
    pub(crate) fn new() -> Self {
        Qed {
            header: Region::new(0, QED_HEADER),
        }
    }
}

impl HeaderProbe for Qed {
    const FORMAT: Format = Format::Qed;
    const SIGNATURE_AT: usize = 0;
    const SIGNATURE: &'static [u8] = QED_MAGIC;

    fn header(&self) -> &Region {
        &self.header
    }

    fn header_mut(&mut self) -> &mut Region {
        &mut self.header
    }

    fn found(&self, _size: u64) -> Result<Found, FormatError> {
        // Refused whatever follows the magic; read what is there for the report.
        let h = self.header.data();
        let at = |end: usize| h.len() >= end;
        Ok(Found {
            virtual_size: at(56).then(|| le_u64(h, 48)),
            facts: Facts::Qed(QedFacts {
                cluster_size: at(8).then(|| le_u32(h, 4)),
                features: at(24).then(|| le_u64(h, 16)),
                backing_file_offset: at(60).then(|| le_u32(h, 56)),
            }),
            checks: vec![Check::new("banned", Err(FormatError::QedRefused))],
        })
    }
}
