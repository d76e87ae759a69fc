//! VirtualBox VDI: a 512-byte little-endian header with its signature at 0x40.

use serde::Serialize;

use crate::inspector::{Found, HeaderProbe};
use crate::region::{Region, le_u32, le_u64};
use crate::{Check, Facts, Format, FormatError};

const SIGNATURE_AT: usize = 0x40;
const SIGNATURE: [u8; 4] = 0xBEDA_107Fu32.to_le_bytes();
/// Up to the disk size at 0x170.
const HEADER: usize = 0x178;

/// What a VDI header says.
#[derive(Debug, Clone, Serialize)]
pub struct VdiFacts {
    pub version: u32,
    /// 1 dynamic, 2 static, 3 undo, 4 differencing.
    pub image_type: u32,
    pub header_size: u32,
}

pub(crate) struct Vdi {
    header: Region,
}

impl Vdi {
    pub(crate) fn new() -> Self {
        Vdi {
            header: Region::new(0, HEADER),
        }
    }
}

impl HeaderProbe for Vdi {
    const FORMAT: Format = Format::Vdi;
    const SIGNATURE_AT: usize = SIGNATURE_AT;
    const SIGNATURE: &'static [u8] = &SIGNATURE;

    fn header(&self) -> &Region {
        &self.header
    }

    fn header_mut(&mut self) -> &mut Region {
        &mut self.header
    }

    fn found(&self, size: u64) -> Result<Found, FormatError> {
        let h = self.header.data();
        if !self.header.is_complete() {
            return Err(FormatError::Truncated {
                format: Format::Vdi,
                needed: HEADER as u64,
                size,
            });
        }
        Ok(Found {
            virtual_size: Some(le_u64(h, 0x170)),
            facts: Facts::Vdi(VdiFacts {
                version: le_u32(h, 0x44),
                image_type: le_u32(h, 0x4c),
                header_size: le_u32(h, 0x48),
            }),
            checks: vec![Check::new("null", Ok(()))],
        })
    }
}
