//! Microsoft's formats: VHD (qemu's `vpc`) and VHDX.

use serde::Serialize;

use crate::inspector::{Claim, Found, HeaderProbe, Probe};
use crate::region::{Region, ascii_field, be_u32, be_u64, le_u16, le_u32, le_u64, magic};
use crate::{Check, Facts, Format, FormatError};

const VPC_MAGIC: &[u8] = b"conectix";
/// The (copy of the) footer at the start of a dynamic VHD.
const VPC_FOOTER: usize = 512;
/// Fields read: up to the disk type at 60..64.
const VPC_NEEDED: usize = 64;

/// What a VHD footer says.
#[derive(Debug, Clone, Serialize)]
pub struct VpcFacts {
    /// 2 fixed, 3 dynamic, 4 differencing.
    pub disk_type: u32,
    pub creator_app: String,
    pub data_offset: u64,
}

pub(crate) struct Vpc {
    footer: Region,
}

impl Vpc {
    pub(crate) fn new() -> Self {
        Vpc {
            footer: Region::new(0, VPC_FOOTER),
        }
    }
}

impl HeaderProbe for Vpc {
    const FORMAT: Format = Format::Vpc;
    const SIGNATURE_AT: usize = 0;
    const SIGNATURE: &'static [u8] = VPC_MAGIC;

    fn header(&self) -> &Region {
        &self.footer
    }

    fn header_mut(&mut self) -> &mut Region {
        &mut self.footer
    }

    fn found(&self, size: u64) -> Result<Found, FormatError> {
        let f = self.footer.data();
        if f.len() < VPC_NEEDED {
            return Err(FormatError::Truncated {
                format: Format::Vpc,
                needed: VPC_NEEDED as u64,
                size,
            });
        }
        Ok(Found {
            virtual_size: Some(be_u64(f, 40)),
            facts: Facts::Vpc(VpcFacts {
                disk_type: be_u32(f, 60),
                creator_app: ascii_field(&f[28..32]),
                data_offset: be_u64(f, 16),
            }),
            checks: vec![Check::new("null", Ok(()))],
        })
    }
}

const VHDX_MAGIC: &[u8] = b"vhdxfile";
/// The first region table, 64 KiB at 192 KiB.
const REGION_TABLE: u64 = 192 * 1024;
const TABLE_SIZE: usize = 64 * 1024;
/// Fewer than this many region entries, and metadata items.
const MAX_ENTRIES: u64 = 2048;
const METADATA_GUID: [u8; 16] = guid(
    0x8B7C_A206,
    0x4790,
    0x4B9A,
    [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E],
);
const VIRTUAL_DISK_SIZE_GUID: [u8; 16] = guid(
    0x2FA5_4224,
    0xCD1B,
    0x4876,
    [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8],
);

/// A Microsoft GUID as stored on disk: the first three groups little-endian.
const fn guid(a: u32, b: u16, c: u16, d: [u8; 8]) -> [u8; 16] {
    let a = a.to_le_bytes();
    let b = b.to_le_bytes();
    let c = c.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5], d[6],
        d[7],
    ]
}

/// What a VHDX header says.
#[derive(Debug, Clone, Serialize)]
pub struct VhdxFacts {
    pub region_entries: u32,
    pub metadata_offset: u64,
    pub metadata_items: u16,
}

pub(crate) struct Vhdx {
    ident: Region,
    regions: Region,
    metadata: Option<Region>,
    metadata_items: u16,
    size_item: Option<Region>,
    /// The size, when the item lay inside the metadata table already read.
    size_inline: Option<u64>,
}

impl Vhdx {
    pub(crate) fn new() -> Self {
        Vhdx {
            ident: Region::new(0, VHDX_MAGIC.len()),
            regions: Region::new(REGION_TABLE, TABLE_SIZE),
            metadata: None,
            metadata_items: 0,
            size_item: None,
            size_inline: None,
        }
    }

    fn malformed(reason: impl Into<String>) -> FormatError {
        FormatError::malformed(Format::Vhdx, reason)
    }

    /// The region table is complete: find the metadata region.
    fn parse_regions(&self) -> Result<Region, FormatError> {
        let t = self.regions.data();
        if &t[0..4] != b"regi" {
            return Err(Self::malformed("region table signature \"regi\" missing"));
        }
        let count = u64::from(le_u32(t, 8));
        if count >= MAX_ENTRIES {
            return Err(FormatError::OutOfBounds {
                format: Format::Vhdx,
                what: "region entry count",
                value: count,
                limit: MAX_ENTRIES - 1,
            });
        }
        let entry = (0..count as usize)
            .map(|i| &t[16 + 32 * i..16 + 32 * (i + 1)])
            .find(|e| e[..16] == METADATA_GUID)
            .ok_or_else(|| Self::malformed("no metadata region"))?;
        let offset = le_u64(entry, 16);
        if offset < self.regions.end() {
            return Err(Self::malformed(format!(
                "metadata region at {offset} overlaps the headers"
            )));
        }
        Ok(Region::new(offset, TABLE_SIZE))
    }

    /// The metadata table is complete: find the virtual disk size item.
    fn parse_metadata(&mut self) -> Result<(), FormatError> {
        let meta = self.metadata.as_ref().expect("metadata region");
        let t = meta.data();
        if &t[0..8] != b"metadata" {
            return Err(Self::malformed("metadata table signature missing"));
        }
        let count = le_u16(t, 10);
        if u64::from(count) >= MAX_ENTRIES {
            return Err(FormatError::OutOfBounds {
                format: Format::Vhdx,
                what: "metadata item count",
                value: count.into(),
                limit: MAX_ENTRIES - 1,
            });
        }
        self.metadata_items = count;
        let entry = (0..count as usize)
            .map(|i| &t[32 + 32 * i..32 + 32 * (i + 1)])
            .find(|e| e[..16] == VIRTUAL_DISK_SIZE_GUID)
            .ok_or_else(|| Self::malformed("no virtual disk size item"))?;
        let item = u64::from(le_u32(entry, 16));
        let len = le_u32(entry, 20).min(TABLE_SIZE as u32);
        if len < 8 {
            return Err(Self::malformed(format!(
                "virtual disk size item is {len} bytes"
            )));
        }
        if item + 8 <= TABLE_SIZE as u64 {
            self.size_inline = Some(le_u64(t, item as usize));
        } else if item >= TABLE_SIZE as u64 {
            self.size_item = Some(Region::new(meta.offset().saturating_add(item), 8));
        } else {
            return Err(Self::malformed(
                "virtual disk size item straddles the table",
            ));
        }
        Ok(())
    }

    fn pending(&self) -> [Option<&Region>; 4] {
        [
            Some(&self.ident),
            Some(&self.regions),
            self.metadata.as_ref(),
            self.size_item.as_ref(),
        ]
    }
}

impl Probe for Vhdx {
    fn format(&self) -> Format {
        Format::Vhdx
    }

    fn feed(&mut self, pos: u64, chunk: &[u8]) -> Result<(), FormatError> {
        self.ident.capture(pos, chunk);
        if self.claim() != Claim::Yes {
            return Ok(());
        }
        self.regions.capture(pos, chunk);
        if self.metadata.is_none() && self.regions.is_complete() {
            self.metadata = Some(self.parse_regions()?);
        }
        if let Some(m) = &mut self.metadata {
            m.capture(pos, chunk);
            if m.is_complete() && self.size_item.is_none() && self.size_inline.is_none() {
                self.parse_metadata()?;
            }
        }
        if let Some(s) = &mut self.size_item {
            s.capture(pos, chunk);
        }
        Ok(())
    }

    fn claim(&self) -> Claim {
        match magic(self.ident.data(), VHDX_MAGIC) {
            None => Claim::Undecided,
            Some(false) => Claim::No,
            Some(true) => Claim::Yes,
        }
    }

    fn wants(&self) -> Option<u64> {
        if self.claim() == Claim::No {
            return None;
        }
        self.pending().into_iter().flatten().find_map(Region::wants)
    }

    fn finish(&mut self, size: u64) -> Result<Option<Found>, FormatError> {
        if self.claim() != Claim::Yes {
            return Ok(None);
        }
        if let Some(needed) = self
            .pending()
            .into_iter()
            .flatten()
            .find(|r| !r.is_complete())
            .map(Region::end)
        {
            return Err(FormatError::Truncated {
                format: Format::Vhdx,
                needed,
                size,
            });
        }
        let virtual_size = self
            .size_inline
            .or_else(|| self.size_item.as_ref().map(|r| le_u64(r.data(), 0)));
        let t = self.regions.data();
        Ok(Some(Found {
            virtual_size,
            facts: Facts::Vhdx(VhdxFacts {
                region_entries: le_u32(t, 8),
                metadata_offset: self.metadata.as_ref().map_or(0, Region::offset),
                metadata_items: self.metadata_items,
            }),
            checks: vec![Check::new("null", Ok(()))],
        }))
    }

    fn buffered(&self) -> usize {
        self.pending()
            .into_iter()
            .flatten()
            .map(Region::buffered)
            .sum()
    }
}
