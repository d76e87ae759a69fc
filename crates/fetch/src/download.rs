//! Streaming a body into a cache writer with bounded memory.
//!
//! The network side runs on the async runtime; writing runs on a blocking thread and hashing
//! on a thread of the writer's own ([`CacheWriter::write_batch`]: the refcounted chunks are
//! shared, not copied), so a chunk is written while the one before it is hashed (sha256 at
//! ~1.8 GB/s would stall the runtime's I/O otherwise, and in series with the writes halve the
//! rate). Chunks cross between the threads in batches of those the network had ready (fewer
//! thread wake-ups), through channels a few batches deep, so memory stays bounded whatever
//! the image size.

use bytes::Bytes;
use futures_util::StreamExt;
use imgcache_store::CacheWriter;

use crate::error::{FetchError, Result};
use crate::progress::Progress;
use crate::source::BodyStream;

/// Batches queued for the writer thread.
const DEPTH: usize = 4;
/// Most chunks in one batch: those the body had ready at once (`ready_chunks` never waits to
/// fill a batch), handed to the writer and the hasher in one go.
const BATCH: usize = 4;

/// Called from the writer thread with the total bytes written (and so readable from the
/// `incomplete/` file by other file descriptors) after each chunk.
pub type WrittenHook = std::sync::Arc<dyn Fn(u64) + Send + Sync>;

/// Writes `body` into `writer`, checking it against `expected_len` as it goes. On success the
/// writer comes back for the caller to commit; on failure it has been dropped (its partial file
/// moved to `invalid/`).
pub async fn stream_into(
    writer: CacheWriter,
    body: BodyStream,
    expected_len: Option<u64>,
    origin: &str,
    progress: &dyn Progress,
) -> Result<CacheWriter> {
    stream_into_reporting(writer, body, expected_len, origin, progress, None).await
}

/// [`stream_into`], also reporting the bytes *written* (not merely received) through `written`,
/// so readers following the download know how far they may read the growing file.
pub async fn stream_into_reporting(
    mut writer: CacheWriter,
    body: BodyStream,
    expected_len: Option<u64>,
    origin: &str,
    progress: &dyn Progress,
    written: Option<WrittenHook>,
) -> Result<CacheWriter> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Bytes>>(DEPTH);
    // The writer runs on a thread of its own for the whole download, not on tokio's blocking
    // pool: that pool is kept small and for short calls (a record lookup, a pread), so that
    // many long downloads can never starve the hits' calls behind them.
    let (done_tx, sink) = tokio::sync::oneshot::channel::<(CacheWriter, Option<FetchError>)>();
    let path = writer.path().to_path_buf();
    // The hooks may spawn tasks (the server's eviction notices): the thread runs in this
    // runtime's context.
    let runtime = tokio::runtime::Handle::current();
    std::thread::Builder::new()
        .name("imgcache-writer".into())
        .spawn(move || {
            let _runtime = runtime.enter();
            let mut end = None;
            while let Some(batch) = rx.blocking_recv() {
                if let Err(e) = writer.write_batch(batch) {
                    let path = writer.path().to_path_buf();
                    end = Some(FetchError::io("write", path, e));
                    break;
                }
                if let Some(hook) = &written {
                    hook(writer.bytes_written());
                }
            }
            let _ = done_tx.send((writer, end));
        })
        .map_err(|e| FetchError::io("start the writer thread for", path, e))?;

    let mut got: u64 = 0;
    let mut failure = None;
    progress.start(crate::progress::Phase::Download, expected_len);
    let mut body = body.ready_chunks(BATCH);
    'body: while let Some(items) = body.next().await {
        let mut batch = Vec::with_capacity(items.len());
        for chunk in items {
            let chunk = match chunk {
                Ok(c) => c,
                // The origin's connection broke mid-body: a truncated image.
                Err(FetchError::Origin { url, reason }) => {
                    failure = Some(FetchError::Truncated {
                        url,
                        got,
                        expected: expected_len,
                        reason,
                    });
                    break;
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            };
            got += chunk.len() as u64;
            if let Some(expected) = expected_len
                && got > expected
            {
                failure = Some(FetchError::Length {
                    url: origin.to_string(),
                    expected,
                    got,
                });
                break;
            }
            progress.advance(chunk.len() as u64);
            batch.push(chunk);
        }
        // A send error means the writer thread stopped on an error: it reports it below.
        if tx.send(batch).await.is_err() || failure.is_some() {
            break 'body;
        }
    }
    drop(tx);
    let (writer, write_err) = sink
        .await
        .map_err(|_| FetchError::Config("the writer thread ended without its writer".into()))?;
    progress.finish();
    if let Some(e) = write_err.or(failure) {
        drop(writer); // moves the partial file to invalid/ (or removes it when the disk is full)
        return Err(e);
    }
    if let Some(expected) = expected_len
        && got < expected
    {
        return Err(FetchError::Length {
            url: origin.to_string(),
            expected,
            got,
        });
    }
    Ok(writer)
}
