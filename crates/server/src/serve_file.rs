//! Sending image bytes from a file through user space: a published image (a hit) or the
//! growing `incomplete/` file of a fill (a reader following the download), on connections
//! that cannot use `sendfile` (TLS, HTTP/2). [`Cursor`] says which bytes may go out when, for
//! this path and the `sendfile` one alike.
//!
//! Memory is bounded per response: one chunk read at a time, handed to hyper as `Bytes` with
//! no further copy. Reads first try `preadv2(RWF_NOWAIT)` on the runtime thread — a page-cache
//! hit costs one memcpy and no thread hop — and only go to the blocking pool when the data is
//! not cached (the read would wait for the disk).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::watch;

use imgcache_store::{Done, Outcome, Phase};

use crate::relay::{Followers, Position};

/// Bytes per read (and per body frame).
pub const CHUNK: usize = 512 << 10;

/// Following a fill: the phase watch, the bytes written (fresher than the watch, which only
/// wakes readers every [`imgcache_store::key_lock::NOTIFY_STEP`]) and the image's total size if known.
pub struct Follow {
    pub phase: watch::Receiver<Phase>,
    pub written: Arc<AtomicU64>,
    pub total: Option<u64>,
    /// The fill's followers (this response among them, at `position`): should the fill
    /// outgrow the cache, its relay carries this response on ([`crate::relay`]).
    pub followers: Arc<Followers>,
    pub position: Position,
}

/// What a [`Cursor`] lets out next: a piece of its file, or bytes relayed from the origin
/// after a fill outgrew the cache (not in any file).
pub enum Piece {
    File { offset: u64, len: usize },
    Relayed(Bytes),
}

/// Longest a reader that has sent everything written so far waits before it looks at the
/// written count again (a slow origin may take long to write the next NOTIFY_STEP).
const POLL: Duration = Duration::from_millis(10);

/// Where a response is in its file, and how far it may read: the whole range at once for a
/// published image, or up to what the writer has written (and verified, for the last byte)
/// while following a fill. Shared by the user-space body here and the `sendfile` body.
pub struct Cursor {
    pos: u64,
    /// Exclusive end; `None` while following a fill of unknown size.
    end: Option<u64>,
    follow: Option<Follow>,
}

impl Cursor {
    pub fn new(start: u64, end: Option<u64>, follow: Option<Follow>) -> Cursor {
        Cursor {
            pos: start,
            end,
            follow,
        }
    }

    /// The next piece that may be sent now, at most `max` bytes: `(offset, len)`, waiting for
    /// the writer when nothing is readable yet. `None` once the range is complete; an error
    /// when the followed fill failed. The caller reports what it sent with [`Cursor::advance`].
    pub async fn next(&mut self, max: usize) -> Option<io::Result<Piece>> {
        loop {
            // A response whose bytes have all gone out ends cleanly, even if the fill fails
            // later (its publishing, after the bytes were verified).
            if self.end.is_some_and(|e| self.pos >= e) {
                return None;
            }
            if let Some(relay) = self.relay()
                && self.pos >= relay.from
            {
                let max = self
                    .end
                    .map_or(max, |e| (e - self.pos).min(max as u64) as usize);
                return match relay.read(self.pos, max).await {
                    Ok(Some(b)) => Some(Ok(Piece::Relayed(b))),
                    Ok(None) => match self.end {
                        Some(e) if e > self.pos => Some(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("the range ends at {e}, past the image's {} bytes", self.pos),
                        ))),
                        _ => None,
                    },
                    Err(e) => Some(Err(e)),
                };
            }
            let limit = match self.readable() {
                Ok(l) => l,
                Err(e) => return Some(Err(e)),
            };
            if self.end.is_some_and(|e| self.pos >= e) {
                return None;
            }
            // Never past the response's own end: a range ending before the bytes written.
            let limit = self.end.map_or(limit, |e| limit.min(e));
            if limit > self.pos {
                let n = (limit - self.pos).min(max as u64) as usize;
                return Some(Ok(Piece::File {
                    offset: self.pos,
                    len: n,
                }));
            }
            // Nothing readable yet: wait for the writer (or the relay).
            if let Some(relay) = self.relay() {
                // Bounded: a change just before this subscribed is seen on the next look.
                let _ = tokio::time::timeout(POLL, relay.changed()).await;
                continue;
            }
            match &mut self.follow {
                Some(f) => match tokio::time::timeout(POLL, f.phase.changed()).await {
                    Ok(Ok(())) | Err(_) => {}
                    Ok(Err(_)) => return Some(Err(io::Error::other("download vanished"))),
                },
                None => return None,
            }
        }
    }

    pub fn advance(&mut self, n: usize) {
        self.pos += n as u64;
        if let Some(f) = &self.follow {
            f.position.set(self.pos);
        }
    }

    /// The fill's relay, once it ended handing its body back.
    fn relay(&self) -> Option<Arc<crate::relay::Relay>> {
        let f = self.follow.as_ref()?;
        if !matches!(*f.phase.borrow(), Phase::Ended(Outcome::Passthrough)) {
            return None;
        }
        f.followers.relay().cloned()
    }

    /// How far the file may be read now.
    fn readable(&mut self) -> io::Result<u64> {
        let Some(f) = &mut self.follow else {
            return Ok(self.end.unwrap_or(0));
        };
        let phase = f.phase.borrow_and_update().clone();
        match phase {
            Phase::Ended(Outcome::Done(Done::Written { size, .. })) | Phase::Verified { size } => {
                match self.end {
                    None => self.end = Some(size),
                    // A range asked for before the size was known reaches past the image.
                    Some(end) if end > size => {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("the range ends at {end}, past the image's {size} bytes"),
                        ));
                    }
                    Some(_) => {}
                }
                Ok(size)
            }
            Phase::Streaming { written } => {
                let written = written.max(f.written.load(Ordering::Acquire));
                // A response that ends with the image's last byte holds that byte back until
                // the image is verified: a failed download must reach it as an error.
                let ends_with_image = match (f.total, self.end) {
                    (Some(t), Some(e)) => e >= t,
                    _ => true,
                };
                Ok(match (ends_with_image, f.total) {
                    (false, _) => written,
                    (true, Some(t)) => written.min(t.saturating_sub(1)),
                    (true, None) => written.saturating_sub(1),
                })
            }
            Phase::Ended(Outcome::Failed(failure)) => Err(io::Error::other(format!(
                "origin download failed: {failure}"
            ))),
            Phase::Ended(o @ Outcome::TimedOut { .. }) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                o.error().map(|e| e.to_string()).unwrap_or_default(),
            )),
            // Outgrew the cache: the file's bytes, then the relay's.
            Phase::Ended(Outcome::Passthrough) if f.followers.relay().is_some() => {
                let limit = f.followers.relay().map_or(0, |r| r.file_limit());
                Ok(self.end.map_or(limit, |e| limit.min(e)))
            }
            Phase::Starting
            | Phase::Ended(Outcome::Passthrough)
            | Phase::Ended(Outcome::Done(Done::Held { .. })) => {
                Err(io::Error::other("download is not streaming"))
            }
        }
    }
}

struct Reader {
    file: Arc<File>,
    cursor: Cursor,
    served: Counter,
}

/// A body of `file`'s bytes `start..end` (`end` `None`: until a followed fill completes).
pub fn body(
    file: Arc<File>,
    start: u64,
    end: Option<u64>,
    follow: Option<Follow>,
    served: Counter,
) -> Body {
    let reader = Reader {
        file,
        cursor: Cursor::new(start, end, follow),
        served,
    };
    let stream = futures_util::stream::unfold(Some(reader), |state| async move {
        let mut r = state?;
        match r.next_chunk().await {
            Some(Ok(b)) => Some((Ok(b), Some(r))),
            Some(Err(e)) => Some((Err(e), None)),
            None => None,
        }
    });
    Body::from_stream(stream)
}

impl Reader {
    async fn next_chunk(&mut self) -> Option<io::Result<Bytes>> {
        let (pos, n) = match self.cursor.next(CHUNK).await? {
            Ok(Piece::File { offset, len }) => (offset, len),
            Ok(Piece::Relayed(b)) => {
                self.cursor.advance(b.len());
                self.served.inc_by(b.len() as u64);
                return Some(Ok(b));
            }
            Err(e) => return Some(Err(e)),
        };
        Some(match read_at(&self.file, pos, n).await {
            Ok(b) if b.is_empty() => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "image file is shorter than its record",
            )),
            Ok(b) => {
                self.cursor.advance(b.len());
                self.served.inc_by(b.len() as u64);
                Ok(b)
            }
            Err(e) => Err(e),
        })
    }
}

/// Reads up to `n` bytes at `pos`.
async fn read_at(file: &Arc<File>, pos: u64, n: usize) -> io::Result<Bytes> {
    let mut buf = vec![0u8; n];
    {
        let mut iov = [io::IoSliceMut::new(&mut buf)];
        match rustix::io::preadv2(&**file, &mut iov, pos, rustix::io::ReadWriteFlags::NOWAIT) {
            Ok(got) if got > 0 => {
                buf.truncate(got);
                return Ok(Bytes::from(buf));
            }
            // 0 (EOF or nothing cached), EAGAIN (would block on the disk), EOPNOTSUPP: go
            // to the blocking pool.
            _ => {}
        }
    }
    let file = file.clone();
    tokio::task::spawn_blocking(move || {
        let got = file.read_at(&mut buf, pos)?;
        buf.truncate(got);
        Ok(Bytes::from(buf))
    })
    .await
    .map_err(io::Error::other)?
}
