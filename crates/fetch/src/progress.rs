//! Progress reporting, so the CLI can draw a bar without the library knowing about terminals.

/// What a fetch is doing. A fetch runs one or more phases in turn (the download, then a
/// conversion to raw); each starts afresh with its own total.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// The image's bytes arriving (from an origin, a peer or a local file), hashed, inspected
    /// and written as they come: its total is the image's size in bytes.
    Download,
    /// `qemu-img convert` to raw: its total is the virtual size (the raw file's size), and
    /// qemu-img's percentage is reported as that share of it.
    Convert,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Download => "download",
            Phase::Convert => "convert",
        }
    }
}

pub trait Progress: Send + Sync {
    /// A phase starts; `total` when it is known (the origin sent its size).
    fn start(&self, _phase: Phase, _total: Option<u64>) {}
    fn advance(&self, _done: u64) {}
    /// The phase ended (whether it succeeded or not).
    fn finish(&self) {}
}

/// Reports nothing.
pub struct Quiet;

impl Progress for Quiet {}
