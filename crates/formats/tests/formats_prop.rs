//! Property tests for the format inspector over random and mutated headers: it never panics,
//! never holds more than `MAX_BUFFERED` bytes, and gives the same answer however the stream is
//! cut into chunks.

use imgcache_formats::{Detected, Format, FormatError, Inspector, MAX_BUFFERED};
use proptest::prelude::*;

fn put(buf: &mut Vec<u8>, at: usize, bytes: &[u8]) {
    if buf.len() < at + bytes.len() {
        buf.resize(at + bytes.len(), 0);
    }
    buf[at..at + bytes.len()].copy_from_slice(bytes);
}

fn guid(a: u32, b: u16, c: u16, d: [u8; 8]) -> Vec<u8> {
    let mut g = a.to_le_bytes().to_vec();
    g.extend(b.to_le_bytes());
    g.extend(c.to_le_bytes());
    g.extend(d);
    g
}

/// A well-formed start of each format, for mutations to break.
fn template(kind: u8) -> Vec<u8> {
    let mut b = Vec::new();
    match kind % 11 {
        0 => {
            put(&mut b, 0, b"QFI\xfb");
            put(&mut b, 4, &3u32.to_be_bytes());
            put(&mut b, 8, &200u64.to_be_bytes());
            put(&mut b, 16, &8u32.to_be_bytes());
            put(&mut b, 20, &16u32.to_be_bytes());
            put(&mut b, 24, &(1u64 << 30).to_be_bytes());
            put(&mut b, 36, &1u32.to_be_bytes());
            put(&mut b, 40, &0x30000u64.to_be_bytes());
            put(&mut b, 48, &0x10000u64.to_be_bytes());
            put(&mut b, 100, &104u32.to_be_bytes());
            put(&mut b, 200, b"base.raw");
            put(&mut b, 0x30008, &[0]);
        }
        1 => {
            put(&mut b, 0, b"KDMV");
            put(&mut b, 4, &1u32.to_le_bytes());
            put(&mut b, 12, &16384u64.to_le_bytes());
            put(&mut b, 20, &128u64.to_le_bytes());
            put(&mut b, 28, &1u64.to_le_bytes());
            put(&mut b, 36, &4u64.to_le_bytes());
            put(&mut b, 56, &u64::MAX.to_le_bytes());
            put(
                &mut b,
                512,
                b"# Disk DescriptorFile\nversion=1\ncreateType=\"streamOptimized\"\nRW 16384 SPARSE \"x.vmdk\"\nddb.adapterType = \"ide\"\n",
            );
            let header = b[..512].to_vec();
            let mut marker = vec![0u8; 512];
            marker[12] = 3;
            b.resize(4096, 0);
            b.extend(marker);
            b.extend(header);
            b.extend([0u8; 512]);
        }
        2 => {
            b.extend_from_slice(
                b"# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicFlat\"\nRW 16 FLAT \"f.vmdk\" 0\n",
            );
        }
        3 => {
            put(&mut b, 0, b"vhdxfile");
            let t = 196608;
            put(&mut b, t, b"regi");
            put(&mut b, t + 8, &1u32.to_le_bytes());
            let meta = guid(
                0x8B7C_A206,
                0x4790,
                0x4B9A,
                [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E],
            );
            put(&mut b, t + 16, &meta);
            put(&mut b, t + 32, &0x40000u64.to_le_bytes());
            put(&mut b, t + 40, &0x10000u32.to_le_bytes());
            let m = 0x40000;
            put(&mut b, m, b"metadata");
            put(&mut b, m + 10, &1u16.to_le_bytes());
            let vds = guid(
                0x2FA5_4224,
                0xCD1B,
                0x4876,
                [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8],
            );
            put(&mut b, m + 32, &vds);
            put(&mut b, m + 48, &0x10000u32.to_le_bytes());
            put(&mut b, m + 52, &8u32.to_le_bytes());
            put(&mut b, m + 0x10000, &(1u64 << 30).to_le_bytes());
        }
        4 => {
            put(&mut b, 0, b"conectix");
            put(&mut b, 40, &(1u64 << 24).to_be_bytes());
            put(&mut b, 60, &3u32.to_be_bytes());
            b.resize(512, 0);
        }
        5 => {
            put(&mut b, 0x40, &0xBEDA_107Fu32.to_le_bytes());
            put(&mut b, 0x170, &(1u64 << 24).to_le_bytes());
            b.resize(512, 0);
        }
        6 => {
            put(&mut b, 32768, &[1]);
            put(&mut b, 32769, b"CD001");
            put(&mut b, 32768 + 80, &20u32.to_le_bytes());
            put(&mut b, 32768 + 128, &2048u16.to_le_bytes());
            b.resize(40960, 0);
        }
        7 => {
            put(&mut b, 446, &[0x00, 0x00, 0x02, 0x00, 0xEE]);
            put(&mut b, 446 + 8, &1u32.to_le_bytes());
            put(&mut b, 510, &[0x55, 0xAA]);
            put(&mut b, 512, b"EFI PART");
        }
        8 => {
            put(&mut b, 0, b"LUKS\xba\xbe");
            put(&mut b, 6, &1u16.to_be_bytes());
            put(&mut b, 8, b"aes");
            put(&mut b, 104, &8u32.to_be_bytes());
            b.resize(8192, 0);
        }
        9 => {
            put(&mut b, 0, b"QED\0");
            put(&mut b, 48, &(1u64 << 24).to_le_bytes());
            b.resize(512, 0);
        }
        _ => {}
    }
    b
}

fn outcome(r: &Result<Detected, FormatError>) -> String {
    match r {
        Ok(d) => format!("{} {:?} {}", d.format, d.virtual_size, d.safe),
        Err(e) => format!("error: {e}"),
    }
}

fn feed(data: &[u8], chunks: &[usize], expected: Option<Format>) -> Result<Detected, FormatError> {
    let mut inspector = Inspector::new(expected);
    let mut rest = data;
    let mut sizes = chunks.iter().cycle();
    while !rest.is_empty() {
        let n = (*sizes.next().unwrap()).clamp(1, rest.len());
        inspector.feed(&rest[..n])?;
        assert!(
            inspector.buffered() <= MAX_BUFFERED,
            "{} bytes buffered",
            inspector.buffered()
        );
        rest = &rest[n..];
    }
    inspector.finish_report()
}

/// Mutations: (position, byte), positions mostly within the headers.
fn mutations() -> impl Strategy<Value = Vec<(usize, u8)>> {
    prop::collection::vec(
        (
            prop_oneof![
                0usize..600,
                196608usize..196700,
                0x40000usize..0x40060,
                0usize..330_000
            ],
            any::<u8>(),
        ),
        0..12,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn formats_mutated_headers_never_panic_and_chunking_is_invisible(
        kind in any::<u8>(),
        muts in mutations(),
        random_prefix in prop::collection::vec(any::<u8>(), 0..700),
        cut in prop::option::of(0usize..400_000),
        chunks in prop::collection::vec(prop_oneof![1usize..8, 1usize..5000, 60_000usize..70_000], 1..6),
        expected in prop::option::of(prop::sample::select(Format::ALL.to_vec())),
    ) {
        let mut data = template(kind);
        if kind % 11 == 10 {
            data = random_prefix;
        }
        for (at, byte) in muts {
            if at < data.len() {
                data[at] = byte;
            }
        }
        if let Some(cut) = cut {
            data.truncate(cut);
        }
        let whole = feed(&data, &[data.len().max(1)], expected);
        let chunked = feed(&data, &chunks, expected);
        prop_assert_eq!(outcome(&whole), outcome(&chunked));
        if let Ok(d) = &whole {
            // Serializable whatever it found.
            serde_json::to_string(d).unwrap();
        }
    }

    #[test]
    fn formats_random_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..2048), chunk in 1usize..64) {
        let a = feed(&data, &[chunk], None);
        let b = feed(&data, &[data.len().max(1)], None);
        prop_assert_eq!(outcome(&a), outcome(&b));
    }
}

/// The largest regions at once: a sparse VMDK claiming a huge descriptor and a footer, and a
/// text descriptor that never ends.
#[test]
fn formats_buffering_is_bounded_on_hostile_sizes() {
    let mut sparse = template(1);
    sparse[36..44].copy_from_slice(&u64::MAX.to_le_bytes());
    sparse.resize(3 << 20, b'a');
    let mut text = b"createType=\"monolithicSparse\"\n".to_vec();
    text.resize(3 << 20, b'x');
    let mut vhdx = template(3);
    vhdx.resize(1 << 20, 0);
    for (data, least) in [(sparse, 1 << 20), (text, 1 << 20), (vhdx, 128 << 10)] {
        for chunk in [1 << 16, 4096] {
            let mut peak = 0;
            let mut inspector = Inspector::new(None);
            for c in data.chunks(chunk) {
                inspector.feed(c).ok();
                peak = peak.max(inspector.buffered());
            }
            assert!(peak <= MAX_BUFFERED, "{peak}");
            assert!(peak >= least, "the big regions were really held ({peak})");
            let _ = inspector.finish_report();
        }
    }
}
