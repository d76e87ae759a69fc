//! Zero-copy hits: on plain-TCP HTTP/1.x connections a cache hit's body goes from the page
//! cache to the socket with `sendfile(2)`, never through user space, while hyper keeps doing
//! everything else (request parsing, the response head, keep-alive, pipelining, timeouts,
//! graceful shutdown).
//!
//! How, without forking hyper: the connection's IO is a [`SendfileStream`] (a `TcpStream`
//! wrapper) that shares a queue of [`Span`]s with the requests of that connection, reached by
//! the [`Sendfile`] handle the serve loop puts in each HTTP/1 request's extensions. A hit's
//! body ([`body`]) does not read the file: for each piece of the range it pushes a span (file,
//! offset, length) onto the queue and yields a *placeholder* frame of the same length, a
//! `Bytes` pointing into a reserved, never-touched zeroed region. hyper counts those bytes
//! against `Content-Length` as usual and hands them to the IO in order (its queued write
//! strategy passes body buffers through as their own iovecs, never copied: the serve loop sets
//! `writev(true)` so that strategy is guaranteed). [`SendfileStream`] recognises a placeholder by its
//! address and, instead of writing its (zero) bytes, `sendfile`s the front span's bytes.
//! The response head goes out with `MSG_MORE` so it shares a segment with the first body bytes.
//!
//! Each span holds the image file (`Arc<File>`) and with it the reader's shared flock, so the
//! evictor cannot remove the file until the last byte has been handed to the socket, even after
//! hyper has dropped the body.
//!
//! Readers following a fill use it too: their spans never reach past what the writer has
//! written (see [`Cursor`]), so `sendfile` never meets the end of the growing file. TLS and
//! HTTP/2 connections never get the handle and keep the user-space path
//! ([`crate::serve_file`]).
//!
//! `sendfile` of data that is not in the page cache blocks the runtime thread on the disk, as
//! nginx's default `sendfile on` does; a hit is normally warm.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, LazyLock, Mutex};
use std::task::{Context, Poll, ready};

use axum::body::Body;
use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

use crate::serve_file::{Cursor, Piece};

/// Bytes per placeholder frame (and most bytes one `sendfile` call is asked for).
pub const SPAN: usize = 8 << 20;

/// The reserved region placeholders point into. Allocated zeroed (calloc: untouched pages,
/// no resident memory) and never read or written; only its addresses matter.
static PLACEHOLDER: LazyLock<&'static [u8]> =
    LazyLock::new(|| Box::leak(vec![0u8; SPAN].into_boxed_slice()));

fn is_placeholder(buf: &[u8]) -> bool {
    let region = PLACEHOLDER.as_ptr_range();
    !buf.is_empty() && region.contains(&buf.as_ptr())
}

/// A piece of a file still to be sent, in the order hyper will write it.
struct Span {
    file: Arc<File>,
    offset: u64,
    len: usize,
}

type Queue = Arc<Mutex<VecDeque<Span>>>;

/// The per-connection handle that lets a response's body send from a file; present in the
/// extensions of requests on plain-TCP HTTP/1 connections only.
#[derive(Clone)]
pub struct Sendfile {
    queue: Queue,
}

/// A body of the bytes of `file` that `cursor` lets out (a published image's range, or a
/// growing `incomplete/` file as its fill writes it), sent with `sendfile` by the
/// connection's [`SendfileStream`]. `served` and `zero_copy` count the bytes as they are
/// queued. A followed fill that fails ends the body with an error, which cuts the connection.
pub fn body(
    conn: Sendfile,
    file: Arc<File>,
    cursor: Cursor,
    served: Counter,
    zero_copy: Counter,
) -> Body {
    let region: &'static [u8] = &PLACEHOLDER;
    let stream = futures_util::stream::unfold(Some(cursor), move |state| {
        let conn = conn.clone();
        let file = file.clone();
        let served = served.clone();
        let zero_copy = zero_copy.clone();
        async move {
            let mut cursor = state?;
            // At the end, the file (and its flock) lives on in the queued spans.
            let (offset, len) = match cursor.next(SPAN).await? {
                Ok(Piece::File { offset, len }) => (offset, len),
                // Not in a file: written as they are, after the spans queued before them.
                Ok(Piece::Relayed(b)) => {
                    cursor.advance(b.len());
                    served.inc_by(b.len() as u64);
                    return Some((Ok(b), Some(cursor)));
                }
                Err(e) => return Some((Err(e), None)),
            };
            conn.queue
                .lock()
                .expect("sendfile queue")
                .push_back(Span { file, offset, len });
            cursor.advance(len);
            served.inc_by(len as u64);
            zero_copy.inc_by(len as u64);
            Some((Ok(Bytes::from_static(&region[..len])), Some(cursor)))
        }
    });
    Body::from_stream(stream)
}

/// A plain TCP connection whose writes of placeholder buffers become `sendfile` calls.
pub struct SendfileStream {
    tcp: TcpStream,
    queue: Queue,
}

impl SendfileStream {
    pub fn new(tcp: TcpStream) -> Self {
        SendfileStream {
            tcp,
            queue: Queue::default(),
        }
    }

    /// The handle for this connection's requests.
    pub fn handle(&self) -> Sendfile {
        Sendfile {
            queue: self.queue.clone(),
        }
    }

    /// Sends (part of) the front span, which the placeholder `want` bytes stand for.
    fn poll_sendfile(&self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.tcp.poll_write_ready(cx))?;
            match self.try_sendfile(want) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }

    /// One non-blocking `sendfile` of the front span (at most `want` bytes).
    fn try_sendfile(&self, want: usize) -> io::Result<usize> {
        let mut queue = self.queue.lock().expect("sendfile queue");
        let Some(span) = queue.front_mut() else {
            return Err(io::Error::other(
                "sendfile: placeholder without a queued span",
            ));
        };
        if span.len != want {
            // hyper always writes a placeholder whole, in order; anything else would send the
            // wrong bytes, so end the connection instead.
            return Err(io::Error::other(format!(
                "sendfile: placeholder of {want} bytes for a span of {}",
                span.len
            )));
        }
        let mut offset = span.offset;
        let file = span.file.clone();
        let sent = self.tcp.try_io(Interest::WRITABLE, || {
            rustix::fs::sendfile(&self.tcp, &*file, Some(&mut offset), want)
                .map_err(io::Error::from)
        })?;
        if sent == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "image file is shorter than its record",
            ));
        }
        span.offset += sent as u64;
        span.len -= sent;
        if span.len == 0 {
            queue.pop_front(); // drops this span's hold on the file (and its flock)
        }
        Ok(sent)
    }

    /// Writes ordinary bytes (a response head), flagged `MSG_MORE` when body bytes follow.
    fn poll_send(
        &self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
        more: bool,
    ) -> Poll<io::Result<usize>> {
        let flags = if more {
            rustix::net::SendFlags::MORE | rustix::net::SendFlags::NOSIGNAL
        } else {
            rustix::net::SendFlags::NOSIGNAL
        };
        loop {
            ready!(self.tcp.poll_write_ready(cx))?;
            let r = self.tcp.try_io(Interest::WRITABLE, || {
                rustix::net::sendmsg(
                    &self.tcp,
                    bufs,
                    &mut rustix::net::SendAncillaryBuffer::default(),
                    flags,
                )
                .map_err(io::Error::from)
            });
            match r {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }
}

impl AsyncRead for SendfileStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for SendfileStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let bufs: Vec<IoSlice<'_>> = bufs.iter().filter(|b| !b.is_empty()).copied().collect();
        let Some(first) = bufs.iter().position(|b| is_placeholder(b)) else {
            return Pin::new(&mut this.tcp).poll_write_vectored(cx, &bufs);
        };
        if first == 0 {
            return this.poll_sendfile(cx, bufs[0].len());
        }
        // Ordinary bytes (the head) first; then, if they all went, as much of the file as the
        // socket takes now.
        let head = &bufs[..first];
        let head_len: usize = head.iter().map(|b| b.len()).sum();
        let n = ready!(this.poll_send(cx, head, true))?;
        if n < head_len {
            return Poll::Ready(Ok(n));
        }
        match this.try_sendfile(bufs[first].len()) {
            Ok(sent) => Poll::Ready(Ok(n + sent)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Poll::Ready(Ok(n)),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}
