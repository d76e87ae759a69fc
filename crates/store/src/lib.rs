//! imgcache's store: a crash-safe cache directory of disk images.
//!
//! An image becomes visible only by fsync + atomic rename; a write that fails leaves at most a
//! file in `incomplete/` or `invalid/`. Per-image records live behind the [`Driver`] trait
//! (SQLite by default, or extended attributes); everything else — layout, locks, queue,
//! eviction — is shared, in [`Cache`].

pub mod cache;
pub mod driver;
pub mod error;
pub mod fsck;
pub mod integrity;
pub mod key;
pub mod key_lock;
pub mod layout;
pub mod lock;
pub mod off_thread;
pub mod policy;
pub mod queue;
pub mod reader;
pub mod record;
pub mod registry;
pub mod room;
pub mod sqlite;
pub mod verify;
pub mod writer;
pub mod xattr;

pub use cache::{Cache, Deleted};
pub use driver::{Driver, DriverKind};
pub use error::{KeyError, Result, StoreError};
pub use fsck::{FsckOptions, FsckProgress, FsckReport};
pub use integrity::{Algorithm, Hasher, Integrity};
pub use key::Key;
pub use key_lock::{
    Acquired, Done, Elsewhere, FailKind, Failure, Flight, Followed, Follower, KeyLocks, Outcome,
    Permit, Phase, Reporter, Stall, Streaming,
};
pub use layout::{Layout, Status};
pub use lock::FileLock;
pub use off_thread::off_thread;
pub use policy::{CleanReport, EvictPolicy, PruneReport};
pub use reader::CacheReader;
pub use record::{LruEntry, Record, Timestamp};
pub use registry::{CacheSpec, CleanUpReport, Registry};
pub use room::{Reservation, Room};
pub use verify::VerifyOutcome;
pub use writer::{CacheWriter, WriteOptions};
