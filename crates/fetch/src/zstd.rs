//! zstd-compressed downloads, decompressed on the fly (as Ironic does).
//!
//! A body whose first bytes are the zstd magic `28 B5 2F FD` is an image compressed for
//! transfer: it is decompressed as it streams, before inspection and caching, so the cache
//! holds (and inspects) the image itself. Memory stays bounded: one input chunk, one output
//! buffer of [`OUT_CHUNK`] bytes and the decoder's window (libzstd refuses frames whose window
//! is larger than 128 MiB).
//!
//! The checksum and the length a source gives are of the bytes as downloaded, the compressed
//! ones, so [`decompress`] counts and hashes its *input* and checks both when the stream ends;
//! the caller must not check the decompressed bytes against them.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use futures_util::StreamExt;
use imgcache_store::{Algorithm, Hasher, Integrity};
use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};

use crate::error::{FetchError, Result};
use crate::source::BodyStream;

/// The first bytes of a zstd frame.
pub const ZSTD_MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];

/// The most bytes one decompressed chunk holds.
pub const OUT_CHUNK: usize = 1 << 20;

/// Reads from `body` until its first four bytes are known (or it ends), and gives it back
/// whole, with whether it starts with the zstd magic. Nothing is lost or reordered.
pub async fn sniff(mut body: BodyStream) -> Result<(BodyStream, bool)> {
    let mut head: Vec<Bytes> = Vec::new();
    let mut have = 0usize;
    while have < ZSTD_MAGIC.len() {
        match body.next().await {
            Some(Ok(c)) => {
                have += c.len();
                head.push(c);
            }
            Some(Err(e)) => return Err(e),
            None => break,
        }
    }
    let mut first = Vec::with_capacity(ZSTD_MAGIC.len());
    for c in &head {
        first.extend_from_slice(&c[..c.len().min(ZSTD_MAGIC.len() - first.len())]);
        if first.len() == ZSTD_MAGIC.len() {
            break;
        }
    }
    let compressed = first == ZSTD_MAGIC;
    let front = futures_util::stream::iter(head.into_iter().map(Ok));
    Ok((Box::pin(front.chain(body)), compressed))
}

/// What the compressed stream must be, checked when it ends.
#[derive(Clone, Debug, Default)]
pub struct Expect {
    /// The size the origin announced (Content-Length): of the compressed bytes.
    pub len: Option<u64>,
    /// The checksum the source vouches for: of the compressed bytes.
    pub checksum: Option<Integrity>,
}

/// The checksum of the compressed bytes, known once the stream has ended successfully.
#[derive(Clone, Debug, Default)]
pub struct InputDigest(Arc<OnceLock<Integrity>>);

impl InputDigest {
    pub fn get(&self) -> Option<&Integrity> {
        self.0.get()
    }
}

struct State {
    inner: BodyStream,
    decoder: Decoder<'static>,
    input: Bytes,
    pos: usize,
    /// The last step filled the output buffer: the decoder may hold more output.
    pending: bool,
    /// The decoder's last step ended a frame (and nothing was fed since).
    frame_done: bool,
    hasher: Option<Hasher>,
    got: u64,
    expect: Expect,
    origin: String,
    digest: InputDigest,
    done: bool,
}

impl State {
    fn fail(&self, reason: impl ToString) -> FetchError {
        FetchError::Decompress {
            href: self.origin.clone(),
            reason: reason.to_string(),
        }
    }

    /// One decoder step on the pending input; `Some(chunk)` when it produced bytes.
    fn step(&mut self) -> Result<Option<Bytes>> {
        let mut out = vec![0u8; OUT_CHUNK];
        let mut inb = InBuffer::around(&self.input[self.pos..]);
        let mut outb = OutBuffer::around(&mut out[..]);
        let hint = self
            .decoder
            .run(&mut inb, &mut outb)
            .map_err(|e| self.fail(e))?;
        let (read, written) = (inb.pos(), outb.pos());
        self.pos += read;
        self.pending = written == OUT_CHUNK;
        // A step that did nothing (a flush after the frame's last bytes) says nothing new: the
        // decoder then hints at the next frame's header.
        if read > 0 || written > 0 {
            self.frame_done = hint == 0;
        }
        if written == 0 {
            return Ok(None);
        }
        out.truncate(written);
        Ok(Some(Bytes::from(out)))
    }

    fn take_input(&mut self, chunk: Bytes) -> Result<()> {
        self.got += chunk.len() as u64;
        if let Some(expected) = self.expect.len
            && self.got > expected
        {
            return Err(FetchError::Length {
                url: self.origin.clone(),
                expected,
                got: self.got,
            });
        }
        if let Some(h) = &mut self.hasher {
            h.update(&chunk);
        }
        self.input = chunk;
        self.pos = 0;
        Ok(())
    }

    fn end(&mut self) -> Result<()> {
        if !self.frame_done {
            return Err(self.fail("the stream ends inside a frame (truncated download)"));
        }
        if let Some(expected) = self.expect.len
            && self.got != expected
        {
            return Err(FetchError::Length {
                url: self.origin.clone(),
                expected,
                got: self.got,
            });
        }
        let actual = self.hasher.take().expect("hashed until the end").finish();
        if let Some(expected) = &self.expect.checksum
            && *expected != actual
        {
            return Err(FetchError::Checksum {
                href: self.origin.clone(),
                expected: expected.clone(),
                actual,
            });
        }
        let _ = self.digest.0.set(actual);
        Ok(())
    }

    async fn next(&mut self) -> Option<Result<Bytes>> {
        loop {
            if self.done {
                return None;
            }
            if self.pos < self.input.len() || self.pending {
                match self.step() {
                    Ok(Some(chunk)) => return Some(Ok(chunk)),
                    Ok(None) => continue,
                    Err(e) => return self.finish_with(Err(e)),
                }
            }
            match self.inner.next().await {
                Some(Ok(chunk)) => {
                    if let Err(e) = self.take_input(chunk) {
                        return self.finish_with(Err(e));
                    }
                }
                Some(Err(e)) => return self.finish_with(Err(e)),
                None => {
                    let r = self.end();
                    self.done = true;
                    return r.err().map(Err);
                }
            }
        }
    }

    fn finish_with(&mut self, r: Result<Bytes>) -> Option<Result<Bytes>> {
        self.done = true;
        Some(r)
    }
}

/// Decompresses a zstd `body`, counting and hashing the compressed bytes: a length or
/// checksum that does not match `expect` fails the stream at its end (after the last
/// decompressed chunk, so a writer behind it never commits). The digest of the compressed bytes
/// (sha256 unless `expect.checksum` names another algorithm) is in the returned
/// [`InputDigest`] once the stream has ended well.
pub fn decompress(
    body: BodyStream,
    expect: Expect,
    origin: &str,
) -> Result<(BodyStream, InputDigest)> {
    let decoder = Decoder::new().map_err(|e| FetchError::Decompress {
        href: origin.to_string(),
        reason: e.to_string(),
    })?;
    let algorithm = expect
        .checksum
        .as_ref()
        .map_or(Algorithm::Sha256, |c| c.algorithm);
    let digest = InputDigest::default();
    let state = State {
        inner: body,
        decoder,
        input: Bytes::new(),
        pos: 0,
        pending: false,
        frame_done: false,
        hasher: Some(Hasher::new(algorithm)),
        got: 0,
        expect,
        origin: origin.to_string(),
        digest: digest.clone(),
        done: false,
    };
    let stream = futures_util::stream::unfold(state, |mut st| async move {
        let item = st.next().await?;
        Some((item, st))
    });
    Ok((Box::pin(stream), digest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(data: &[u8], size: usize) -> BodyStream {
        let v: Vec<Result<Bytes>> = data
            .chunks(size.max(1))
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        Box::pin(futures_util::stream::iter(v))
    }

    async fn collect(mut s: BodyStream) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(c) = s.next().await {
            let c = c?;
            assert!(c.len() <= OUT_CHUNK);
            out.extend_from_slice(&c);
        }
        Ok(out)
    }

    fn data() -> Vec<u8> {
        // Compressible but not trivial: 3 MiB, so output spans several chunks.
        (0..3 * 1024 * 1024u32)
            .map(|i| ((i / 7) ^ (i >> 11)) as u8)
            .collect()
    }

    #[tokio::test]
    async fn sniff_keeps_every_byte_whatever_the_chunking() {
        let plain = b"QFI\xfbrest of the image".to_vec();
        for size in [1, 2, 3, 5, 100] {
            let (s, z) = sniff(chunks(&plain, size)).await.unwrap();
            assert!(!z);
            assert_eq!(collect(s).await.unwrap(), plain);
        }
        let (s, z) = sniff(chunks(b"ab", 1)).await.unwrap();
        assert!(!z);
        assert_eq!(collect(s).await.unwrap(), b"ab");
        let packed = zstd::bulk::compress(&data(), 3).unwrap();
        for size in [1, 3, 4096] {
            let (_, z) = sniff(chunks(&packed, size)).await.unwrap();
            assert!(z);
        }
    }

    #[tokio::test]
    async fn decompresses_and_checks_the_compressed_bytes() {
        let plain = data();
        let mut packed = zstd::bulk::compress(&plain[..plain.len() / 2], 3).unwrap();
        // Two frames back to back decode as one stream.
        packed.extend(zstd::bulk::compress(&plain[plain.len() / 2..], 1).unwrap());
        let checksum = Integrity::of(Algorithm::Sha256, &packed);
        for size in [1000, 65536, packed.len()] {
            let expect = Expect {
                len: Some(packed.len() as u64),
                checksum: Some(checksum.clone()),
            };
            let (s, digest) = decompress(chunks(&packed, size), expect, "t").unwrap();
            assert_eq!(collect(s).await.unwrap(), plain);
            assert_eq!(digest.get(), Some(&checksum));
        }
        // A checksum of the decompressed bytes is not what the source vouches for.
        let expect = Expect {
            len: None,
            checksum: Some(Integrity::of(Algorithm::Sha256, &plain)),
        };
        let (s, digest) = decompress(chunks(&packed, 4096), expect, "t").unwrap();
        assert!(matches!(collect(s).await, Err(FetchError::Checksum { .. })));
        assert!(digest.get().is_none());
        // A wrong announced length.
        let expect = Expect {
            len: Some(packed.len() as u64 - 1),
            checksum: None,
        };
        let (s, _) = decompress(chunks(&packed, 4096), expect, "t").unwrap();
        assert!(matches!(collect(s).await, Err(FetchError::Length { .. })));
    }

    #[tokio::test]
    async fn truncated_and_corrupt_streams_fail() {
        let packed = zstd::bulk::compress(&data(), 3).unwrap();
        let cut = &packed[..packed.len() - 10];
        let (s, _) = decompress(chunks(cut, 4096), Expect::default(), "t").unwrap();
        let e = collect(s).await.unwrap_err();
        assert!(matches!(e, FetchError::Decompress { .. }), "{e}");
        assert!(e.to_string().contains("truncated"), "{e}");

        // A corrupt frame header (reserved bits set, window far too large).
        let mut bad = packed.clone();
        for b in &mut bad[4..12] {
            *b = 0xff;
        }
        let (s, _) = decompress(chunks(&bad, 4096), Expect::default(), "t").unwrap();
        assert!(collect(s).await.is_err());
    }

    /// A small input that expands enormously still comes out in bounded chunks.
    #[tokio::test]
    async fn a_bomb_streams_in_bounded_chunks() {
        let zeros = vec![0u8; 64 << 20];
        let packed = zstd::bulk::compress(&zeros, 19).unwrap();
        assert!(packed.len() < 64 * 1024);
        let (mut s, _) = decompress(chunks(&packed, packed.len()), Expect::default(), "t").unwrap();
        let mut total = 0usize;
        while let Some(c) = s.next().await {
            let c = c.unwrap_or_else(|e| panic!("after {total} bytes: {e}"));
            assert!(c.len() <= OUT_CHUNK);
            total += c.len();
        }
        assert_eq!(total, zeros.len());
    }
}
