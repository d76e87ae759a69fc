//! Until the format inspector lands (issue 4), `force_raw` can only accept images that are
//! already raw: this recognises the magic numbers of the formats it would have to convert.

use std::io::Read;
use std::path::Path;

use crate::error::{FetchError, Result};

/// The non-raw format whose magic starts the file, if any.
pub fn sniff_non_raw(path: &Path) -> Result<Option<&'static str>> {
    let mut head = [0u8; 8];
    let mut f = std::fs::File::open(path).map_err(|e| FetchError::io("open", path, e))?;
    let n = f
        .read(&mut head)
        .map_err(|e| FetchError::io("read", path, e))?;
    Ok(magic(&head[..n]))
}

fn magic(head: &[u8]) -> Option<&'static str> {
    const MAGICS: &[(&[u8], &str)] = &[
        (b"QFI\xfb", "qcow2"),
        (b"QED\0", "qed"),
        (b"KDMV", "vmdk"),
        (b"# Disk Descriptor", "vmdk"),
        (b"conectix", "vpc"),
        (b"vhdxfile", "vhdx"),
        (b"LUKS\xba\xbe", "luks"),
        (b"\x28\xb5\x2f\xfd", "zstd"),
    ];
    MAGICS
        .iter()
        .find(|(m, _)| head.starts_with(m))
        .map(|(_, name)| *name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_container_formats() {
        assert_eq!(magic(b"QFI\xfb\0\0\0\x03"), Some("qcow2"));
        assert_eq!(magic(b"conectix"), Some("vpc"));
        assert_eq!(magic(b"\0\0\0\0\0\0\0\0"), None);
        assert_eq!(magic(b""), None);
    }
}
