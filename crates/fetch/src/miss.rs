//! Where a miss's bytes may come from besides the origin: the hook a fleet installs
//! ([`crate::ImageCache::with_fleet`]; `imgcache_fleet::source::FleetSource` implements it,
//! and `imgcache serve` calls the same source selection). This crate knows nothing of the
//! fleet: it asks the hook for a source under the key's permit, admits what it gets through
//! the one admission pipeline, and tells the hook what it published or refused.

use std::any::Any;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use imgcache_store::{Integrity, Key};

use crate::error::Result;
use crate::source::{OriginMeta, Response};

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What source selection needs of one miss's origin.
pub trait MissOrigin: Send + Sync + 'static {
    /// What the origin vouches for (a Glance image's record: its checksum, size and
    /// validators); `None` when it vouches for nothing (a plain URL) or does not answer.
    fn vouched(&self) -> BoxFuture<'_, Option<OriginMeta>>;
    /// The origin's bytes from `offset` on ([`crate::ImageCache::request_rest`]): how a fill
    /// whose peer died goes on. `Ok(Err(why))` when the origin will not give them.
    fn rest(
        &self,
        offset: u64,
        if_range: Option<String>,
    ) -> BoxFuture<'_, Result<std::result::Result<reqwest::Response, String>>>;
}

/// Where a miss's bytes come from.
pub enum MissSource {
    /// Another node's answer, to admit against `checksum` (the whole image is verified).
    Peer {
        response: Box<Response>,
        checksum: Integrity,
        node: String,
    },
    /// The origin; `keep` (the fleet's origin lease) lives until the download ends.
    Origin {
        keep: Option<Box<dyn Any + Send + Sync>>,
    },
}

/// The hook: source selection, and what it is told afterwards.
pub trait MissSources: Send + Sync + 'static {
    /// The source of `key`'s miss, asked under the key's permit.
    fn source<'a>(&'a self, key: &'a Key, origin: Arc<dyn MissOrigin>)
    -> BoxFuture<'a, MissSource>;
    /// This process started writing `key`'s bytes (to be verified against `checksum`), so
    /// that others may follow the fill. Called once per download, before the first byte.
    fn filling<'a>(
        &'a self,
        key: &'a Key,
        size: Option<u64>,
        checksum: Option<String>,
    ) -> BoxFuture<'a, ()>;
    /// `node` sent an image the admission refused (it is skipped for a while).
    fn refused(&self, node: &str);
    /// This process published `key` (awaited before the origin lease is given up, so a node
    /// that finds the lease free finds the holding).
    fn published<'a>(
        &'a self,
        key: &'a Key,
        size: u64,
        checksum: Option<String>,
    ) -> BoxFuture<'a, ()>;
}

/// A fill's announcement to the fleet ([`MissSources::filling`]), made as its bytes start to
/// flow (the admission's streaming hook) and awaited before the image is said published, so
/// that the "filling" holding never lands after the "published" one that ends it.
#[derive(Clone, Default)]
pub struct FillAnnouncement(Arc<std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>);

impl FillAnnouncement {
    /// The admission's streaming hook: announces `key`'s fill with the size and checksum
    /// the bytes will be verified against.
    pub fn hook(
        &self,
        sources: Arc<dyn MissSources>,
        key: Key,
    ) -> Box<dyn FnOnce(crate::admit::StreamInfo) + Send> {
        let slot = self.0.clone();
        Box::new(move |s| {
            let checksum = s.checksum.as_ref().map(ToString::to_string);
            let task = tokio::spawn(async move {
                sources.filling(&key, s.size, checksum).await;
            });
            *slot.lock().expect("poisoned") = Some(task);
        })
    }

    /// Waits for the announcement, if one was made.
    pub async fn done(&self) {
        let task = self.0.lock().expect("poisoned").take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}
