//! Following a download that another process runs in the same cache directory (an
//! `imgcache fetch`, a second server, this server's own prefetcher): its key flock is held, and
//! instead of waiting for the end, this process's clients are streamed from that writer's
//! `incomplete/<key>` as it grows.
//!
//! Only the file is shared between the processes, so what it says is all there is to go by:
//! - its size is what has been written (writers preallocate with `KEEP_SIZE`, and only append);
//! - the writer is done when its key lock can be taken;
//! - it succeeded if the image is then published *with the inode followed* (a record, and the
//!   published name is that file). Anything else (moved to `invalid/`, never published, another
//!   inode) is a failure, and every reader is cut. Readers hold the last byte back until then
//!   (the size is unknown, see [`crate::serve_file::Cursor`]), so a client never gets a clean
//!   response that the other process did not verify.
//!
//! A writer's file is a new inode (a dead writer's leftover is unlinked, not truncated), so a
//! follower that opened a leftover never has it published: it fails, never serves it. A file
//! is followed once it has bytes; an empty one may still be replaced (a `file://` source is
//! hard-linked into place), and is looked at again.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use axum::http::StatusCode;
use imgcache_store::key_lock::POLL;
use imgcache_store::{FileLock, Stall, Status};

use crate::error::ApiError;
use crate::fill::{Fill, Phase, Streaming, blocking};
use crate::state::AppState;

pub enum Turn {
    /// The key's lock: this process downloads (or finds the image published).
    Ours(FileLock),
    /// Another process's download was followed to its end: the fill's final phase.
    Followed(Phase),
}

/// Takes `fill`'s key lock, following the other writer's file while it is held.
pub async fn lock_or_follow(state: &AppState, fill: &Arc<Fill>) -> Result<Turn, ApiError> {
    let cache = state.cache.clone();
    let key = fill.key.clone();
    let incomplete = cache.get_image_filepath(&key, Status::Incomplete);
    let mut cancel = state.fills.cancelled();
    // The file followed (and its inode), once it had bytes; the bytes seen so far.
    let mut followed: Option<(Arc<File>, u64)> = None;
    let mut seen = 0u64;
    let notified = AtomicU64::new(0);
    // A writer whose file stops growing for the origin read timeout is taken to be hung.
    let mut stall = Stall::new(&key, state.config.sources.http.read_timeout);
    loop {
        let (c, k) = (cache.clone(), key.clone());
        if let Some(lock) = blocking(move || c.try_lock_key(&k)).await? {
            let Some((file, ino)) = followed else {
                return Ok(Turn::Ours(lock));
            };
            let (c, k) = (cache.clone(), key.clone());
            let rec = blocking(move || c.get_record(&k)).await?;
            let published = cache.get_image_filepath(&key, Status::Active);
            let size = file.metadata().map(|m| m.len()).unwrap_or(0);
            drop(lock);
            return match rec {
                Some(rec) if inode(&published) == Some(ino) && rec.size == size => {
                    Ok(Turn::Followed(Phase::Done { size }))
                }
                _ => Err(ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "the download run by another process on this cache failed",
                )),
            };
        }
        match &followed {
            None => {
                // Not there yet (the other writer is asking its origin), or still empty.
                if let Ok(f) = File::open(&incomplete)
                    && let Ok(m) = f.metadata()
                    && m.len() > 0
                {
                    let file = Arc::new(f);
                    followed = Some((file.clone(), m.ino()));
                    tracing::info!(key = %key, "following a download run by another process");
                    // Only the file is shared: what the other process was told of the image
                    // (its validators) is not known here.
                    fill.start_streaming(Streaming {
                        file,
                        size: None,
                        checksum: None,
                        meta: Default::default(),
                    });
                    seen = m.len();
                    fill.report_written(seen, &notified);
                }
            }
            Some((file, ino)) => {
                let len = file.metadata().map(|m| m.len()).unwrap_or(0);
                // Writers only append, and only ever publish the inode they wrote.
                let replaced = inode(&incomplete).is_some_and(|i| i != *ino);
                if len < seen || replaced {
                    return Err(ApiError::new(
                        StatusCode::BAD_GATEWAY,
                        "the file written by another process changed under its readers",
                    ));
                }
                if len > seen {
                    seen = len;
                    fill.report_written(seen, &notified);
                }
            }
        }
        if let Err(e) = stall.observe(cache.incomplete_len(&key)) {
            return Err(ApiError::new(StatusCode::GATEWAY_TIMEOUT, e.to_string()));
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = cancel.wait_for(|c| *c) => {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the server is shutting down",
                ));
            }
        }
    }
}

fn inode(path: &Path) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.ino())
}
