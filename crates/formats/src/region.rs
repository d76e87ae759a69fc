//! Byte regions a format watches in the stream, and the little-endian/big-endian readers.
//!
//! A [`Region`] captures `len` bytes at an absolute `offset`, across any number of chunks, and
//! never holds more than `len` bytes. A region computed from another one must start at or after
//! the end of the region it was computed from: then it is created before the stream reaches it,
//! whatever the chunk sizes, and the answer cannot depend on how the stream was cut.
//! An [`EndRegion`] keeps the last `len` bytes of the stream.

/// `len` bytes at `offset`, filled as the stream passes.
#[derive(Debug)]
pub(crate) struct Region {
    offset: u64,
    len: usize,
    data: Vec<u8>,
}

impl Region {
    pub(crate) fn new(offset: u64, len: usize) -> Self {
        Region {
            offset,
            len,
            data: Vec::new(),
        }
    }

    /// Takes what this region needs from `chunk`, which starts at absolute position `pos`.
    pub(crate) fn capture(&mut self, pos: u64, chunk: &[u8]) {
        if self.is_complete() {
            return;
        }
        let next = self.offset.saturating_add(self.data.len() as u64);
        let end = pos.saturating_add(chunk.len() as u64);
        if next < pos || next >= end {
            return;
        }
        if self.data.capacity() == 0 {
            self.data.reserve_exact(self.len);
        }
        let from = (next - pos) as usize;
        let take = (self.len - self.data.len()).min(chunk.len() - from);
        self.data.extend_from_slice(&chunk[from..from + take]);
    }

    pub(crate) fn is_complete(&self) -> bool {
        self.data.len() == self.len
    }

    /// The absolute offset of the next byte this region still needs.
    pub(crate) fn wants(&self) -> Option<u64> {
        (!self.is_complete()).then(|| self.offset.saturating_add(self.data.len() as u64))
    }

    pub(crate) fn data(&self) -> &[u8] {
        &self.data
    }

    pub(crate) fn offset(&self) -> u64 {
        self.offset
    }

    /// The absolute offset just past the region.
    pub(crate) fn end(&self) -> u64 {
        self.offset.saturating_add(self.len as u64)
    }

    pub(crate) fn buffered(&self) -> usize {
        self.data.capacity()
    }
}

/// The last `len` bytes of the stream.
#[derive(Debug)]
pub(crate) struct EndRegion {
    len: usize,
    data: Vec<u8>,
}

impl EndRegion {
    pub(crate) fn new(len: usize) -> Self {
        EndRegion {
            len,
            data: Vec::new(),
        }
    }

    pub(crate) fn capture(&mut self, chunk: &[u8]) {
        if self.data.capacity() == 0 {
            self.data.reserve_exact(self.len);
        }
        let chunk = &chunk[chunk.len().saturating_sub(self.len)..];
        let excess = (self.data.len() + chunk.len()).saturating_sub(self.len);
        self.data.drain(..excess);
        self.data.extend_from_slice(chunk);
    }

    /// Forgets what it holds: the stream has a gap, the next bytes are not contiguous.
    pub(crate) fn reset(&mut self) {
        self.data.clear();
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn data(&self) -> &[u8] {
        &self.data
    }

    pub(crate) fn buffered(&self) -> usize {
        self.data.capacity()
    }
}

/// Whether `data` (a prefix of the bytes at the magic's place) carries `magic`: `Some(true)` when
/// all of it is there, `Some(false)` at the first differing byte, `None` while too short to tell.
pub(crate) fn magic(data: &[u8], magic: &[u8]) -> Option<bool> {
    let n = data.len().min(magic.len());
    if data[..n] != magic[..n] {
        Some(false)
    } else if n == magic.len() {
        Some(true)
    } else {
        None
    }
}

// Fixed-width readers. Callers check the length first (regions are parsed only once they hold
// the bytes read), so an out-of-range read is a bug and panics loudly in tests and fuzzing.
pub(crate) fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes(b[at..at + 2].try_into().expect("2 bytes"))
}
pub(crate) fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
pub(crate) fn be_u64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
pub(crate) fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().expect("2 bytes"))
}
pub(crate) fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
pub(crate) fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// ASCII text from a fixed-width field, cut at the first NUL, trailing blanks removed, non-ASCII
/// bytes replaced.
pub(crate) fn ascii_field(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    b[..end]
        .iter()
        .map(|&c| {
            if c.is_ascii_graphic() || c == b' ' {
                c as char
            } else {
                '?'
            }
        })
        .collect::<String>()
        .trim_end()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_spans_chunks_and_stops_at_its_length() {
        let mut r = Region::new(3, 4);
        r.capture(0, b"ab");
        assert_eq!(r.wants(), Some(3));
        r.capture(2, b"cde");
        assert_eq!(r.data(), b"de");
        r.capture(5, b"fghij");
        assert!(r.is_complete());
        assert_eq!(r.data(), b"defg");
        assert_eq!(r.buffered(), 4);
    }

    #[test]
    fn region_created_late_misses_its_bytes() {
        let mut r = Region::new(1, 2);
        r.capture(4, b"xyz");
        assert_eq!(r.wants(), Some(1));
        assert!(r.data().is_empty());
    }

    #[test]
    fn end_region_keeps_the_tail() {
        let mut e = EndRegion::new(3);
        for c in b"abcdefg".chunks(2) {
            e.capture(c);
        }
        assert_eq!(e.data(), b"efg");
        e.capture(b"0123456789");
        assert_eq!(e.data(), b"789");
        assert!(e.buffered() <= 6);
    }

    #[test]
    fn magic_prefixes() {
        assert_eq!(magic(b"QF", b"QFI\xfb"), None);
        assert_eq!(magic(b"QX", b"QFI\xfb"), Some(false));
        assert_eq!(magic(b"QFI\xfbxx", b"QFI\xfb"), Some(true));
    }
}
