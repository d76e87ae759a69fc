//! The streaming core: every format's probe sees the stream side by side, in one pass.

use crate::region::{Region, magic};
use crate::{Check, Detected, DiskFormat, Facts, Format, FormatError};
use crate::{iso, luks, partition, qcow, vdi, vhd, vmdk};

/// The most bytes an [`Inspector`] ever holds, whatever it is fed: the largest set of regions
/// the formats watch at once (a VMDK descriptor of at most 1 MiB is the biggest), with headroom.
pub const MAX_BUFFERED: usize = 1536 * 1024;

/// What a probe has decided so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Claim {
    /// Not enough bytes yet.
    Undecided,
    /// Not this format.
    No,
    /// This format's signature is there: from now on its errors are the answer.
    Yes,
}

/// A format found, with what its header says and its verdicts.
pub(crate) struct Found {
    pub virtual_size: Option<u64>,
    pub facts: Facts,
    pub checks: Vec<Check>,
}

/// One format's view of the stream.
pub(crate) trait Probe: Send {
    fn format(&self) -> Format;
    /// `chunk` starts at absolute position `pos`. An `Err` is final: the probe claimed the
    /// stream and found it broken.
    fn feed(&mut self, pos: u64, chunk: &[u8]) -> Result<(), FormatError>;
    fn claim(&self) -> Claim;
    /// The absolute offset of the next leading byte this probe still needs, if any.
    fn wants(&self) -> Option<u64>;
    /// How many bytes at the end of the stream this probe keeps.
    fn tail(&self) -> usize {
        0
    }
    /// The stream jumps ahead: bytes held at the end are no longer the latest.
    fn gap(&mut self) {}
    /// The stream ended after `size` bytes. `Ok(None)`: not this format.
    fn finish(&mut self, size: u64) -> Result<Option<Found>, FormatError>;
    fn buffered(&self) -> usize;
}

/// A format identified by a signature in one fixed header region, which is all it reads
/// (qed, luks, vdi, vpc). These get their [`Probe`] from the blanket impl below, so each
/// writes only what it knows: where the header and signature are, and what the header says.
pub(crate) trait HeaderProbe: Send {
    const FORMAT: Format;
    /// Where the signature starts inside the header, and its bytes.
    const SIGNATURE_AT: usize;
    const SIGNATURE: &'static [u8];
    fn header(&self) -> &Region;
    fn header_mut(&mut self) -> &mut Region;
    /// Called once the signature matched; `size` is the stream's length.
    fn found(&self, size: u64) -> Result<Found, FormatError>;
}

impl<T: HeaderProbe> Probe for T {
    fn format(&self) -> Format {
        T::FORMAT
    }

    fn feed(&mut self, pos: u64, chunk: &[u8]) -> Result<(), FormatError> {
        self.header_mut().capture(pos, chunk);
        Ok(())
    }

    fn claim(&self) -> Claim {
        let h = self.header().data();
        if h.len() <= T::SIGNATURE_AT {
            return Claim::Undecided;
        }
        match magic(&h[T::SIGNATURE_AT..], T::SIGNATURE) {
            None => Claim::Undecided,
            Some(false) => Claim::No,
            Some(true) => Claim::Yes,
        }
    }

    fn wants(&self) -> Option<u64> {
        (self.claim() != Claim::No)
            .then(|| self.header().wants())
            .flatten()
    }

    fn finish(&mut self, size: u64) -> Result<Option<Found>, FormatError> {
        if self.claim() != Claim::Yes {
            return Ok(None);
        }
        self.found(size).map(Some)
    }

    fn buffered(&self) -> usize {
        self.header().buffered()
    }
}

struct Slot {
    probe: Box<dyn Probe>,
    error: Option<FormatError>,
}

/// A single-pass, chunk-fed format inspector.
///
/// Every format watches its own byte regions; the inspector hands each chunk to the formats
/// that still need bytes from it. Feed it the whole stream (chunks of any size, the answer
/// does not depend on them), then call [`Inspector::finish`].
pub struct Inspector {
    expected: Option<Format>,
    pos: u64,
    slots: Vec<Slot>,
    stopped: Option<FormatError>,
    /// No format wants any more bytes: feeding only counts them.
    idle: bool,
}

impl Inspector {
    /// `expected`: the format the source declared, if any (see [`DiskFormat::expected`]).
    /// When given, feeding stops with an error as soon as that format's probe knows the
    /// content is not in it, and the probe's own errors are the answer.
    pub fn new(expected: Option<Format>) -> Self {
        let probes: Vec<Box<dyn Probe>> = vec![
            Box::new(qcow::Qcow2::new()),
            Box::new(qcow::Qed::new()),
            Box::new(vhd::Vpc::new()),
            Box::new(vhd::Vhdx::new()),
            Box::new(vmdk::Vmdk::new()),
            Box::new(vdi::Vdi::new()),
            Box::new(iso::Iso::new()),
            Box::new(partition::Gpt::new()),
            Box::new(luks::Luks::new()),
        ];
        Inspector {
            expected,
            pos: 0,
            slots: probes
                .into_iter()
                .map(|probe| Slot { probe, error: None })
                .collect(),
            stopped: None,
            idle: false,
        }
    }

    /// Presents the next chunk. Errs (and keeps erring) once the expected format is ruled out.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<(), FormatError> {
        if let Some(e) = &self.stopped {
            return Err(e.clone());
        }
        let end = self.pos.saturating_add(chunk.len() as u64);
        if self.idle {
            self.pos = end;
            return Ok(());
        }
        for slot in &mut self.slots {
            if slot.error.is_some() || slot.probe.claim() == Claim::No {
                continue;
            }
            let needed = slot.probe.tail() > 0 || slot.probe.wants().is_some_and(|w| w < end);
            if needed && let Err(e) = slot.probe.feed(self.pos, chunk) {
                slot.error = Some(e);
            }
        }
        self.pos = end;
        self.idle = self.wants().is_none() && self.tail() == 0;
        self.check_expected()
    }

    fn check_expected(&mut self) -> Result<(), FormatError> {
        let Some(expected) = self.expected else {
            return Ok(());
        };
        let Some(slot) = self.slots.iter().find(|s| s.probe.format() == expected) else {
            return Ok(()); // raw: decided at the end
        };
        let stop = if let Some(e) = &slot.error {
            e.clone()
        } else if slot.probe.claim() == Claim::No {
            FormatError::FormatMismatch {
                declared: DiskFormat::Image(expected),
                detected: None,
            }
        } else {
            return Ok(());
        };
        self.stopped = Some(stop.clone());
        Err(stop)
    }

    /// The bytes fed so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The next leading byte any format still needs; `None` once only the end matters.
    pub fn wants(&self) -> Option<u64> {
        self.live().filter_map(|s| s.probe.wants()).min()
    }

    /// How many bytes at the end of the stream some format still checks.
    pub fn tail(&self) -> usize {
        self.live().map(|s| s.probe.tail()).max().unwrap_or(0)
    }

    /// Skips ahead to `pos` without data (for a seekable file). Only bytes no format wants may
    /// be skipped: `pos` is clamped to [`Inspector::wants`]. The caller then feeds the rest of
    /// the stream (at least [`Inspector::tail`] bytes of it).
    pub fn skip_to(&mut self, pos: u64) {
        let pos = pos.min(self.wants().unwrap_or(u64::MAX));
        if pos > self.pos {
            self.pos = pos;
            for slot in &mut self.slots {
                slot.probe.gap();
            }
        }
    }

    /// The bytes all formats hold right now; never more than [`MAX_BUFFERED`].
    pub fn buffered(&self) -> usize {
        self.slots.iter().map(|s| s.probe.buffered()).sum()
    }

    fn live(&self) -> impl Iterator<Item = &Slot> {
        self.slots
            .iter()
            .filter(|s| s.error.is_none() && s.probe.claim() != Claim::No)
    }

    /// Ends the stream and refuses the image on any failed verdict (including a mismatch with
    /// the expected format).
    pub fn finish(self) -> Result<Detected, FormatError> {
        let detected = self.finish_report()?;
        detected.ensure_safe()?;
        Ok(detected)
    }

    /// Ends the stream and reports what was found with every verdict, failed ones included.
    /// Errs only when no single format can be told.
    pub fn finish_report(mut self) -> Result<Detected, FormatError> {
        if let Some(e) = self.stopped.take() {
            return Err(e);
        }
        let size = self.pos;
        let mut found: Vec<(Format, Found)> = Vec::new();
        let mut errors: Vec<(Format, FormatError)> = Vec::new();
        for slot in &mut self.slots {
            let format = slot.probe.format();
            if let Some(e) = slot.error.take() {
                errors.push((format, e));
                continue;
            }
            match slot.probe.finish(size) {
                Ok(Some(f)) => found.push((format, f)),
                Ok(None) => {}
                Err(e) => errors.push((format, e)),
            }
        }
        if let Some(expected) = self.expected
            && let Some(i) = errors.iter().position(|(f, _)| *f == expected)
        {
            return Err(errors.swap_remove(i).1);
        }
        let mut formats: Vec<Format> = found
            .iter()
            .map(|(f, _)| *f)
            .chain(errors.iter().map(|(f, _)| *f))
            .collect();
        formats.sort();
        // A bootable hybrid ISO carries an MBR too: it is an ISO.
        if formats == [Format::Iso, Format::Gpt] {
            found.retain(|(f, _)| *f != Format::Gpt);
            formats.retain(|f| *f != Format::Gpt);
        }
        if formats.len() > 1 {
            return Err(FormatError::MultipleFormats { formats });
        }
        if let Some((_, e)) = errors.pop() {
            return Err(e);
        }
        let (format, found) = found.pop().unwrap_or((
            Format::Raw,
            Found {
                virtual_size: Some(size),
                facts: Facts::Raw,
                checks: Vec::new(),
            },
        ));
        let mut checks = found.checks;
        if let Some(expected) = self.expected {
            let declared = DiskFormat::Image(expected);
            checks.push(Check::new(
                "declared_format",
                if declared.accepts(format) {
                    Ok(())
                } else {
                    Err(FormatError::FormatMismatch {
                        declared,
                        detected: Some(format),
                    })
                },
            ));
        }
        Ok(Detected {
            format,
            virtual_size: found.virtual_size,
            image_size: size,
            facts: found.facts,
            safe: checks.iter().all(Check::passed),
            checks,
        })
    }
}

impl std::fmt::Debug for Inspector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inspector")
            .field("expected", &self.expected)
            .field("pos", &self.pos)
            .field("buffered", &self.buffered())
            .finish_non_exhaustive()
    }
}
