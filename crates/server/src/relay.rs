//! Carrying a fill's followers on when it outgrows the cache mid-way.
//!
//! A download of unannounced length that grows past the room admission can make stops
//! caching, and admission hands its body back ([`imgcache_fetch::Admitted::Passthrough`],
//! `written` bytes already in the fill's file). Its followers have sent part of the image
//! from that file. The relay carries them on without a cut: bytes below `from` still come
//! from the file (open, though no longer linked), the rest from one reading of the handed-back
//! body, checked against the origin's checksum as it passes and shared by every follower
//! through a bounded window.
//!
//! Memory is bounded: the window holds at most [`WINDOW`] bytes beyond the slowest follower,
//! and the origin is read no faster than that follower takes them. The relay stops reading
//! the origin once no follower is left. Clients that arrive after the fill ended make their
//! own uncached request, as for any image too big for the cache.
//!
//! Hand-written because no crate offers a fan-out with a replay window sized to its slowest
//! reader (`tokio::sync::broadcast` drops messages for laggards instead of holding the sender).

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use bytes::{Buf, Bytes};
use futures_util::{Stream, StreamExt};
use tokio::sync::{Notify, watch};

/// Most bytes the relay holds beyond its slowest follower.
pub const WINDOW: u64 = 16 << 20;

/// A position that has gone away (its response ended).
const GONE: u64 = u64::MAX;

/// The responses following one fill, and its relay once it has one.
#[derive(Default)]
pub struct Followers {
    /// How far each live following response has sent.
    positions: Mutex<Vec<Weak<AtomicU64>>>,
    /// Woken when a follower moves on or goes away (the relay's only waiter).
    moved: Arc<Notify>,
    relay: OnceLock<Arc<Relay>>,
}

/// One following response's place, registered with its fill's [`Followers`].
pub struct Position {
    pos: Arc<AtomicU64>,
    moved: Arc<Notify>,
}

impl Position {
    pub fn set(&self, pos: u64) {
        self.pos.store(pos, Ordering::Release);
        self.moved.notify_one();
    }
}

impl Drop for Position {
    fn drop(&mut self) {
        // Marked gone before the wake-up: the relay may look before the `Arc` is dropped.
        self.pos.store(GONE, Ordering::Release);
        self.moved.notify_one();
    }
}

impl Followers {
    /// Registers a response that starts following at `start`.
    pub fn register(&self, start: u64) -> Position {
        let pos = Arc::new(AtomicU64::new(start));
        let mut all = self.positions.lock().expect("poisoned");
        all.retain(|w| w.strong_count() > 0);
        all.push(Arc::downgrade(&pos));
        Position {
            pos,
            moved: self.moved.clone(),
        }
    }

    /// The relay, once the fill handed its body back.
    pub fn relay(&self) -> Option<&Arc<Relay>> {
        self.relay.get()
    }

    /// The position of the slowest live follower; `None` when none is left.
    fn slowest(&self) -> Option<u64> {
        let all = self.positions.lock().expect("poisoned");
        all.iter()
            .filter_map(Weak::upgrade)
            .map(|p| p.load(Ordering::Acquire))
            .filter(|&p| p != GONE)
            .min()
    }

    /// Starts relaying `body` (the whole image from byte 0, already checked as it passes) to
    /// the followers, of which the first `from` bytes are in the fill's file. `false` when
    /// no follower is left to relay to (the body is dropped).
    pub fn start<S>(self: &Arc<Self>, from: u64, body: S) -> bool
    where
        S: Stream<Item = io::Result<Bytes>> + Send + 'static,
    {
        if self.slowest().is_none() {
            return false;
        }
        let relay = Arc::new(Relay {
            from,
            window: Mutex::new(Window {
                base: from,
                end: from,
                chunks: VecDeque::new(),
                done: None,
            }),
            grew: watch::Sender::new(()),
        });
        if self.relay.set(relay.clone()).is_err() {
            return false;
        }
        tokio::spawn(pump(self.clone(), relay, body));
        true
    }
}

/// The shared window over the handed-back body, past `from`.
pub struct Relay {
    /// Bytes of the image in the fill's file: the relay carries on from here.
    pub from: u64,
    window: Mutex<Window>,
    /// Woken when the window grows or the body ends.
    grew: watch::Sender<()>,
}

struct Window {
    /// Offset of the first byte held.
    base: u64,
    /// Offset after the last byte held.
    end: u64,
    chunks: VecDeque<Bytes>,
    /// How the body ended: cleanly (verified) or with this error.
    done: Option<Result<(), String>>,
}

impl Relay {
    /// How far a follower may send from the file: all of it once the relay has a byte past
    /// it or has ended cleanly; else one byte short, so that a body that ends right there
    /// and fails its check still reaches the client as an error.
    pub fn file_limit(&self) -> u64 {
        let w = self.window.lock().expect("poisoned");
        if w.end > self.from || matches!(w.done, Some(Ok(()))) {
            self.from
        } else {
            self.from.saturating_sub(1)
        }
    }

    /// Waits until the relay has more to say than it had when this was called.
    pub async fn changed(&self) {
        let mut rx = self.grew.subscribe();
        let _ = rx.changed().await;
    }

    /// Up to `max` bytes at `pos` (at or past `from`), waiting for them; `Ok(None)` at the
    /// image's verified end.
    pub async fn read(&self, pos: u64, max: usize) -> io::Result<Option<Bytes>> {
        let mut rx = self.grew.subscribe();
        loop {
            {
                let w = self.window.lock().expect("poisoned");
                if pos < w.base {
                    return Err(io::Error::other(
                        "a follower fell behind the relay's window",
                    ));
                }
                let mut at = w.base;
                for c in &w.chunks {
                    let next = at + c.len() as u64;
                    if pos < next {
                        let s = (pos - at) as usize;
                        let n = (c.len() - s).min(max);
                        return Ok(Some(c.slice(s..s + n)));
                    }
                    at = next;
                }
                match &w.done {
                    Some(Ok(())) => return Ok(None),
                    Some(Err(e)) => return Err(io::Error::other(e.clone())),
                    None => {}
                }
            }
            if rx.changed().await.is_err() {
                return Err(io::Error::other("the relay went away"));
            }
        }
    }

    /// Drops the chunks every follower is past; the bytes still held.
    fn trim(&self, slowest: u64) -> u64 {
        let mut w = self.window.lock().expect("poisoned");
        while let Some(c) = w.chunks.front() {
            let len = c.len() as u64;
            if w.base + len > slowest {
                break;
            }
            w.base += len;
            w.chunks.pop_front();
        }
        w.end - w.base
    }

    fn push(&self, b: Bytes) {
        let mut w = self.window.lock().expect("poisoned");
        w.end += b.len() as u64;
        w.chunks.push_back(b);
        drop(w);
        self.grew.send_replace(());
    }

    fn finish(&self, how: Result<(), String>) {
        self.window.lock().expect("poisoned").done = Some(how);
        self.grew.send_replace(());
    }
}

/// Reads the body into the window, no faster than the slowest follower takes it.
async fn pump<S>(followers: Arc<Followers>, relay: Arc<Relay>, body: S)
where
    S: Stream<Item = io::Result<Bytes>> + Send + 'static,
{
    let mut body = std::pin::pin!(body);
    // The bytes below `from` are the file's: passed over (the check still hashed them).
    let mut skip = relay.from;
    loop {
        loop {
            let moved = followers.moved.notified();
            let Some(slowest) = followers.slowest() else {
                tracing::debug!("relay: no follower left; the origin is not read further");
                return;
            };
            if relay.trim(slowest) < WINDOW {
                break;
            }
            moved.await;
        }
        match body.next().await {
            Some(Ok(mut b)) => {
                let k = skip.min(b.len() as u64) as usize;
                b.advance(k);
                skip -= k as u64;
                if !b.is_empty() {
                    relay.push(b);
                }
            }
            Some(Err(e)) => return relay.finish(Err(e.to_string())),
            None if skip > 0 => {
                return relay.finish(Err(
                    "the handed-back body is shorter than the bytes already written".into(),
                ));
            }
            None => return relay.finish(Ok(())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(data: &'static [u8], size: usize) -> Vec<io::Result<Bytes>> {
        data.chunks(size)
            .map(|c| Ok(Bytes::from_static(c)))
            .collect()
    }

    #[tokio::test]
    async fn relays_the_rest_past_the_file_to_every_follower() {
        let f = Arc::new(Followers::default());
        let (a, b) = (f.register(0), f.register(3));
        static DATA: &[u8] = b"0123456789abcdef";
        assert!(f.start(4, futures_util::stream::iter(chunks(DATA, 3))));
        let relay = f.relay().unwrap().clone();
        let mut got = Vec::new();
        let mut pos = 4;
        while let Some(b) = relay.read(pos, 5).await.unwrap() {
            pos += b.len() as u64;
            got.extend_from_slice(&b);
            a.set(pos);
        }
        assert_eq!(got, &DATA[4..]);
        assert_eq!(relay.file_limit(), 4);
        drop(b);
    }

    #[tokio::test]
    async fn a_failed_body_reaches_followers_as_an_error() {
        let f = Arc::new(Followers::default());
        let _a = f.register(0);
        let body = futures_util::stream::iter(vec![
            Ok(Bytes::from_static(b"abcdef")),
            Err(io::Error::other("checksum mismatch")),
        ]);
        assert!(f.start(2, body));
        let relay = f.relay().unwrap().clone();
        assert_eq!(&relay.read(2, 100).await.unwrap().unwrap()[..], b"cdef");
        let e = relay.read(6, 100).await.unwrap_err();
        assert!(e.to_string().contains("checksum mismatch"), "{e}");
    }

    #[tokio::test]
    async fn without_followers_nothing_is_relayed() {
        let f = Arc::new(Followers::default());
        drop(f.register(0));
        let body = futures_util::stream::iter(chunks(b"abc", 1));
        assert!(!f.start(1, body));
    }

    #[tokio::test]
    async fn the_window_waits_for_the_slowest_follower() {
        let f = Arc::new(Followers::default());
        let slow = f.register(0);
        let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(1);
        let body = tokio_stream_from(rx);
        assert!(f.start(0, body));
        let relay = f.relay().unwrap().clone();
        let chunk = Bytes::from(vec![7u8; 1 << 20]);
        // The pump takes chunks until the window is full, then stops reading.
        let mut sent = 0u64;
        while tokio::time::timeout(
            std::time::Duration::from_millis(200),
            tx.send(Ok(chunk.clone())),
        )
        .await
        .is_ok()
        {
            sent += chunk.len() as u64;
            assert!(
                sent <= WINDOW + 3 * chunk.len() as u64,
                "the window grew past its bound"
            );
        }
        assert!(sent >= WINDOW, "the relay stopped early, at {sent}");
        // The slow follower moves on: the pump reads again.
        slow.set(WINDOW);
        tx.send(Ok(chunk.clone())).await.unwrap();
        drop(tx);
        assert_eq!(relay.read(WINDOW, 10).await.unwrap().unwrap().len(), 10);
    }

    fn tokio_stream_from(
        mut rx: tokio::sync::mpsc::Receiver<io::Result<Bytes>>,
    ) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
        futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }
}
