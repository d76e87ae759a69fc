//! A raw image that starts with a partition table: an MBR, or the protective MBR of a GPT.
//! qemu-img sees raw bytes; the check is that the table is sane.

use serde::Serialize;

use crate::inspector::{Claim, Found, Probe};
use crate::region::{Region, le_u16, le_u32};
use crate::{Check, Facts, Format, FormatError};

const SECTOR: usize = 512;
const SIGNATURE: u16 = 0xAA55;
const ENTRIES_AT: usize = 446;
const PROTECTIVE: u8 = 0xEE;

/// One MBR partition entry in use.
#[derive(Debug, Clone, Serialize)]
pub struct Partition {
    pub index: u8,
    pub boot: u8,
    pub kind: u8,
    pub start_chs: [u8; 3],
    pub lba_start: u32,
    pub lba_count: u32,
}

/// What the MBR says.
#[derive(Debug, Clone, Serialize)]
pub struct PartitionFacts {
    /// `gpt` when the MBR is protective (type 0xEE), else `mbr`.
    pub table: &'static str,
    pub partitions: Vec<Partition>,
}

pub(crate) struct Gpt {
    mbr: Region,
}

impl Gpt {
    pub(crate) fn new() -> Self {
        Gpt {
            mbr: Region::new(0, SECTOR),
        }
    }

    fn matches(&self) -> bool {
        let b = self.mbr.data();
        // A FAT boot sector carries the same signature: two FATs on a fixed disk is FAT.
        let fat = b[0x10] == 2 && b[0x15] == 0xF8;
        le_u16(b, 510) == SIGNATURE && !fat
    }
}

fn entries(b: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    (0..4u8).map(move |i| {
        let at = ENTRIES_AT + 16 * i as usize;
        (i, &b[at..at + 16])
    })
}

/// Boot flags 0x00 or 0x80; a protective entry starts at CHS (0,2,0) and LBA 1 and is then the
/// only partition, at index 0; at least one partition exists.
fn check_table(b: &[u8]) -> Result<(), FormatError> {
    let bad = |reason: String| Err(FormatError::MbrSanity { reason });
    let mut used = Vec::new();
    let mut protective = false;
    for (i, e) in entries(b) {
        if e[0] != 0x00 && e[0] != 0x80 {
            return bad(format!("entry {i} has boot flag {:#04x}", e[0]));
        }
        if e[4] != 0 {
            used.push(i);
        }
        if e[4] == PROTECTIVE {
            protective = true;
            if e[1..4] != [0x00, 0x02, 0x00] {
                return bad(format!("protective entry {i} does not start at CHS 0/2/0"));
            }
            if le_u32(e, 8) != 1 {
                return bad(format!("protective entry {i} does not start at LBA 1"));
            }
        }
    }
    if protective && used != [0] {
        return bad("a protective GPT entry must be the only partition, at index 0".into());
    }
    if used.is_empty() {
        return bad("no partition defined".into());
    }
    Ok(())
}

impl Probe for Gpt {
    fn format(&self) -> Format {
        Format::Gpt
    }

    fn feed(&mut self, pos: u64, chunk: &[u8]) -> Result<(), FormatError> {
        self.mbr.capture(pos, chunk);
        Ok(())
    }

    fn claim(&self) -> Claim {
        if !self.mbr.is_complete() {
            Claim::Undecided
        } else if self.matches() {
            Claim::Yes
        } else {
            Claim::No
        }
    }

    fn wants(&self) -> Option<u64> {
        self.mbr.wants()
    }

    fn finish(&mut self, size: u64) -> Result<Option<Found>, FormatError> {
        if self.claim() != Claim::Yes {
            return Ok(None);
        }
        let b = self.mbr.data();
        let partitions: Vec<Partition> = entries(b)
            .filter(|(_, e)| e[4] != 0)
            .map(|(index, e)| Partition {
                index,
                boot: e[0],
                kind: e[4],
                start_chs: [e[1], e[2], e[3]],
                lba_start: le_u32(e, 8),
                lba_count: le_u32(e, 12),
            })
            .collect();
        Ok(Some(Found {
            virtual_size: Some(size),
            facts: Facts::Gpt(PartitionFacts {
                table: if partitions.iter().any(|p| p.kind == PROTECTIVE) {
                    "gpt"
                } else {
                    "mbr"
                },
                partitions,
            }),
            checks: vec![Check::new("mbr", check_table(b))],
        }))
    }

    fn buffered(&self) -> usize {
        self.mbr.buffered()
    }
}
