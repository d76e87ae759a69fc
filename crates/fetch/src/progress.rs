//! Progress reporting, so the CLI can draw a bar without the library knowing about terminals.

pub trait Progress: Send + Sync {
    /// A transfer starts; `total` when the origin said how big it is.
    fn start(&self, _total: Option<u64>) {}
    fn advance(&self, _bytes: u64) {}
    fn finish(&self) {}
}

/// Reports nothing.
pub struct Quiet;

impl Progress for Quiet {}
