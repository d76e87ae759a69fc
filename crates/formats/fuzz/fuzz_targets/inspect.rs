//! Fuzz the format inspector: any bytes, cut into chunks of a size the input picks, must not
//! panic, must stay within the memory bound, and must give the answer a single chunk gives.
//!
//! Run: `cargo +nightly fuzz run inspect` in crates/formats/fuzz (seed corpus: any images).
#![no_main]

use imgcache_formats::{Detected, FormatError, Inspector, MAX_BUFFERED};
use libfuzzer_sys::fuzz_target;

fn run(data: &[u8], chunk: usize) -> Result<Detected, FormatError> {
    let mut inspector = Inspector::new(None);
    for c in data.chunks(chunk.max(1)) {
        inspector.feed(c)?;
        assert!(inspector.buffered() <= MAX_BUFFERED);
    }
    inspector.finish_report()
}

fn outcome(r: &Result<Detected, FormatError>) -> String {
    match r {
        Ok(d) => format!("{} {:?} {}", d.format, d.virtual_size, d.safe),
        Err(e) => e.to_string(),
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&pick, data)) = input.split_first() else {
        return;
    };
    let chunk = match pick {
        0 => data.len(),
        n => usize::from(n) * usize::from(n),
    };
    let chunked = run(data, chunk);
    let whole = run(data, data.len());
    assert_eq!(outcome(&chunked), outcome(&whole));
});
