//! ISO 9660 / UDF: a volume descriptor at 32 KiB (after the 16-sector system area).

use serde::Serialize;

use crate::inspector::{Claim, Found, Probe};
use crate::region::{Region, ascii_field, le_u16, le_u32};
use crate::{Check, Facts, Format, FormatError};

const DESCRIPTOR_AT: u64 = 32 * 1024;
/// Up to the logical block size at 128..130.
const NEEDED: usize = 130;
const IDENTIFIERS: [&[u8]; 3] = [b"CD001", b"NSR02", b"NSR03"];

/// What the first volume descriptor says.
#[derive(Debug, Clone, Serialize)]
pub struct IsoFacts {
    /// `CD001` (ISO 9660) or `NSR02`/`NSR03` (UDF).
    pub standard: String,
    /// 1 for a primary volume descriptor.
    pub descriptor_type: u8,
    pub volume_id: String,
    pub block_size: Option<u16>,
    pub volume_blocks: Option<u32>,
}

pub(crate) struct Iso {
    descriptor: Region,
}

impl Iso {
    pub(crate) fn new() -> Self {
        Iso {
            descriptor: Region::new(DESCRIPTOR_AT, NEEDED),
        }
    }
}

impl Probe for Iso {
    fn format(&self) -> Format {
        Format::Iso
    }

    fn feed(&mut self, pos: u64, chunk: &[u8]) -> Result<(), FormatError> {
        self.descriptor.capture(pos, chunk);
        Ok(())
    }

    fn claim(&self) -> Claim {
        let d = self.descriptor.data();
        if d.len() < 6 {
            return Claim::Undecided;
        }
        if IDENTIFIERS.contains(&&d[1..6]) {
            Claim::Yes
        } else {
            Claim::No
        }
    }

    fn wants(&self) -> Option<u64> {
        (self.claim() != Claim::No)
            .then(|| self.descriptor.wants())
            .flatten()
    }

    fn finish(&mut self, size: u64) -> Result<Option<Found>, FormatError> {
        if self.claim() != Claim::Yes {
            return Ok(None);
        }
        if !self.descriptor.is_complete() {
            return Err(FormatError::Truncated {
                format: Format::Iso,
                needed: self.descriptor.end(),
                size,
            });
        }
        let d = self.descriptor.data();
        let primary = d[0] == 1;
        let block_size = primary.then(|| le_u16(d, 128));
        let volume_blocks = primary.then(|| le_u32(d, 80));
        Ok(Some(Found {
            virtual_size: block_size
                .zip(volume_blocks)
                .map(|(b, n)| u64::from(b) * u64::from(n)),
            facts: Facts::Iso(IsoFacts {
                standard: ascii_field(&d[1..6]),
                descriptor_type: d[0],
                volume_id: ascii_field(&d[40..72]),
                block_size,
                volume_blocks,
            }),
            checks: vec![Check::new("null", Ok(()))],
        }))
    }

    fn buffered(&self) -> usize {
        self.descriptor.buffered()
    }
}
