//! LUKS encrypted images: only version 1 (the one qemu reads) is accepted.
//!
//! Header, big-endian: magic `LUKS\xba\xbe` (0), version u16 (6), cipher name [32] (8), cipher
//! mode [32] (40), hash spec [32] (72), payload offset u32 in sectors (104), key bytes u32 (108).

use serde::Serialize;

use crate::inspector::{Found, HeaderProbe};
use crate::region::{Region, ascii_field, be_u16, be_u32};
use crate::{Check, Facts, Format, FormatError};

const MAGIC: &[u8] = b"LUKS\xba\xbe";
const HEADER: usize = 112;

/// What a LUKS header says.
#[derive(Debug, Clone, Serialize)]
pub struct LuksFacts {
    pub version: u16,
    pub cipher: Option<String>,
    pub cipher_mode: Option<String>,
    pub hash: Option<String>,
    pub payload_offset_sectors: Option<u32>,
    pub key_bytes: Option<u32>,
}

pub(crate) struct Luks {
    header: Region,
}

impl Luks {
    pub(crate) fn new() -> Self {
        Luks {
            header: Region::new(0, HEADER),
        }
    }
}

impl HeaderProbe for Luks {
    const FORMAT: Format = Format::Luks;
    const SIGNATURE_AT: usize = 0;
    const SIGNATURE: &'static [u8] = MAGIC;

    fn header(&self) -> &Region {
        &self.header
    }

    fn header_mut(&mut self) -> &mut Region {
        &mut self.header
    }

    fn found(&self, size: u64) -> Result<Found, FormatError> {
        let h = self.header.data();
        let truncated = |needed: usize| FormatError::Truncated {
            format: Format::Luks,
            needed: needed as u64,
            size,
        };
        if h.len() < 8 {
            return Err(truncated(8));
        }
        let version = be_u16(h, 6);
        if version != 1 {
            // Another layout: nothing more to read from it.
            return Ok(Found {
                virtual_size: None,
                facts: Facts::Luks(LuksFacts {
                    version,
                    cipher: None,
                    cipher_mode: None,
                    hash: None,
                    payload_offset_sectors: None,
                    key_bytes: None,
                }),
                checks: vec![Check::new(
                    "version",
                    Err(FormatError::LuksVersion { version }),
                )],
            });
        }
        if !self.header.is_complete() {
            return Err(truncated(HEADER));
        }
        let payload = be_u32(h, 104);
        let payload_bytes = u64::from(payload) * 512;
        if payload_bytes > size {
            return Err(FormatError::OutOfBounds {
                format: Format::Luks,
                what: "payload offset",
                value: payload_bytes,
                limit: size,
            });
        }
        Ok(Found {
            virtual_size: Some(size - payload_bytes),
            facts: Facts::Luks(LuksFacts {
                version,
                cipher: Some(ascii_field(&h[8..40])),
                cipher_mode: Some(ascii_field(&h[40..72])),
                hash: Some(ascii_field(&h[72..104])),
                payload_offset_sectors: Some(payload),
                key_bytes: Some(be_u32(h, 108)),
            }),
            checks: vec![Check::new("version", Ok(()))],
        })
    }
}
