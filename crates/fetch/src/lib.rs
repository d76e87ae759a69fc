//! imgcache's fetch layer: sources (http, file, Glance), checksums, and Ironic-style
//! provisioning (`fetch_image` by hard link, clean-up) on top of the store.

pub mod admit;
pub mod allow;
pub mod checksum;
pub mod convert;
pub mod download;
pub mod error;
pub mod href;
pub mod inspect_stream;
pub mod meta;
pub mod miss;
pub mod pipeline;
pub mod place;
pub mod progress;
pub mod provision;
pub mod resume;
pub mod source;
pub mod zstd;

pub use admit::{Admission, Admitted, EvictedHook, Hooks, RoomPolicy, StreamInfo};
/// The format inspector, a crate of its own; re-exported so `imgcache_fetch::formats::...`
/// and `crate::formats::...` paths keep working.
pub use imgcache_formats as formats;

pub use allow::{AllowList, BadPrefix, Refusal};
pub use checksum::ChecksumSpec;
pub use error::{FetchError, Result};
pub use href::{Href, cache_key};
pub use meta::{Freshness, ImageMeta};
pub use miss::{MissOrigin, MissSource, MissSources};
pub use place::Placement;
pub use progress::{Phase, Progress, Quiet};
pub use provision::{FetchOptions, FetchReport, ImageCache, Outcome, SourceConfig};
pub use source::http::HttpOptions;
