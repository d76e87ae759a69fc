//! Checking an image that streams past the cache (a passthrough: too big to cache) against
//! the origin's size and checksum while it passes.
//!
//! Nothing is written, so the only way to keep a corrupt image from looking whole is to hold
//! the last chunk back until every byte has been hashed: on a mismatch the body ends with an
//! error instead, and the client's connection is cut. Memory: one chunk.
//!
//! The hashing runs on the runtime thread, a chunk at a time (sha256 ~0.3 ms per 512 KiB):
//! passthrough is the rare path, and a thread per response would cost more than it saves.

use std::io;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use imgcache_fetch::source::BodyStream;
use imgcache_store::{Hasher, Integrity};
use prometheus_client::metrics::counter::Counter;

struct State {
    body: BodyStream,
    hasher: Option<(Hasher, Integrity)>,
    size: Option<u64>,
    got: u64,
    held: Option<Bytes>,
    failures: Counter,
}

/// `body`, with its last chunk released only once `size` and `expected` match.
pub fn verified(
    body: BodyStream,
    expected: Option<Integrity>,
    size: Option<u64>,
    failures: Counter,
) -> impl Stream<Item = io::Result<Bytes>> + Send {
    let state = State {
        body,
        hasher: expected.map(|e| (Hasher::new(e.algorithm), e)),
        size,
        got: 0,
        held: None,
        failures,
    };
    futures_util::stream::unfold(Some(state), |state| async move {
        let mut st = state?;
        loop {
            match st.body.next().await {
                Some(Ok(chunk)) => {
                    st.got += chunk.len() as u64;
                    if let Some((h, _)) = &mut st.hasher {
                        h.update(&chunk);
                    }
                    if let Some(prev) = st.held.replace(chunk) {
                        return Some((Ok(prev), Some(st)));
                    }
                }
                Some(Err(e)) => return Some((Err(io::Error::other(e)), None)),
                None => {
                    let last = st.held.take();
                    return match st.check() {
                        Ok(()) => last.map(|b| (Ok(b), None)),
                        Err(e) => {
                            st.failures.inc();
                            Some((Err(e), None))
                        }
                    };
                }
            }
        }
    })
}

impl State {
    fn check(&mut self) -> io::Result<()> {
        if let Some(size) = self.size
            && self.got != size
        {
            return Err(io::Error::other(format!(
                "origin sent {} bytes of {size}",
                self.got
            )));
        }
        if let Some((h, expected)) = self.hasher.take() {
            let actual = h.finish();
            if actual != expected {
                return Err(io::Error::other(format!(
                    "checksum mismatch: expected {expected}, origin sent {actual}"
                )));
            }
        }
        Ok(())
    }
}
