//! Writing an image into the cache: bytes go to `incomplete/<key>` and become visible only by
//! fsync + atomic rename in [`CacheWriter::commit`]. A writer dropped without committing (or one
//! whose commit fails) moves its partial file to `invalid/`, or removes it when the disk is full.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::thread::JoinHandle;

use bytes::Bytes;

use crate::cache::Cache;
use crate::error::{IoContext, Result, StoreError};
use crate::integrity::{Algorithm, Hasher, Integrity};
use crate::key::Key;
use crate::layout::Status;
use crate::lock::{FileLock, Mode};
use crate::reader::CacheReader;
use crate::record::{Record, now};

#[derive(Clone, Debug)]
pub struct WriteOptions {
    /// Checksum the bytes must have; a mismatch fails the commit and moves the file to `invalid/`.
    pub expected: Option<Integrity>,
    /// Size the bytes must have (a truncated download fails here even without a checksum).
    pub expected_size: Option<u64>,
    /// Algorithm recorded when no `expected` checksum is given.
    pub algorithm: Algorithm,
    /// Replace an already published image (a stale master) instead of returning `None`.
    pub replace: bool,
    /// Wait for another writer of the same key; when false, fail at once with `Busy`.
    pub wait: bool,
    /// Properties recorded with the image.
    pub props: BTreeMap<String, String>,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            expected: None,
            expected_size: None,
            algorithm: Algorithm::Sha256,
            replace: false,
            wait: true,
            props: BTreeMap::new(),
        }
    }
}

#[derive(Debug)]
pub struct CacheWriter {
    cache: Cache,
    key: Key,
    path: PathBuf,
    file: Option<File>,
    hasher: Option<Digest>,
    written: u64,
    opts: WriteOptions,
    disk_full: bool,
    /// The first failed write: bytes were lost, so this writer must never publish.
    write_error: Option<io::Error>,
    /// The entry is a hard link to a source file: on failure, unlink it, never keep it.
    linked: bool,
    // Held until commit or abort: one writer per key across threads and processes.
    _lock: FileLock,
}

impl std::fmt::Debug for Hasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hasher")
    }
}

/// Batches of chunks queued for the hasher thread of [`CacheWriter::write_batch`]: with the
/// caller's own queue, this bounds the memory a download holds (depth × batch size).
const HASH_DEPTH: usize = 4;

/// Where the checksum of the bytes written is computed.
#[derive(Debug)]
enum Digest {
    /// On the writing thread, as bytes are written ([`Write`]).
    Inline(Hasher),
    /// On a thread of its own, fed refcounted chunks ([`CacheWriter::write_bytes`]), so that
    /// hashing and writing run in parallel.
    Thread {
        tx: SyncSender<Vec<Bytes>>,
        handle: JoinHandle<Hasher>,
    },
}

impl Digest {
    /// Moves the hashing to its own thread (the state hashed so far goes with it).
    fn threaded(self) -> io::Result<Digest> {
        let mut hasher = match self {
            Digest::Inline(h) => h,
            t @ Digest::Thread { .. } => return Ok(t),
        };
        let (tx, rx) = sync_channel::<Vec<Bytes>>(HASH_DEPTH);
        let handle = std::thread::Builder::new()
            .name("imgcache-hash".into())
            .spawn(move || {
                // Ends when the writer drops its sender (commit, or the writer dropped).
                while let Ok(batch) = rx.recv() {
                    for chunk in &batch {
                        hasher.update(chunk);
                    }
                }
                hasher
            })?;
        Ok(Digest::Thread { tx, handle })
    }

    /// The hasher with every byte sent so far hashed (joins the thread).
    fn into_hasher(self) -> io::Result<Hasher> {
        match self {
            Digest::Inline(h) => Ok(h),
            Digest::Thread { tx, handle } => {
                drop(tx);
                handle
                    .join()
                    .map_err(|_| io::Error::other("the hasher thread panicked"))
            }
        }
    }
}

impl CacheWriter {
    pub(crate) fn create(
        cache: Cache,
        key: Key,
        lock: FileLock,
        opts: WriteOptions,
    ) -> Result<Self> {
        let path = cache.get_image_filepath(&key, Status::Incomplete);
        // We hold the key lock, so a file already here is a leftover of a dead writer. It is
        // unlinked, not truncated: a process following this download (a server tailing
        // `incomplete/<key>` while another process writes it) may have opened the leftover,
        // and must never see its bytes become the new image's; a new inode is only ever the
        // new image, and what it followed is not what gets published.
        // Its resume note (if any) goes with it: whoever resumes a leftover has read both
        // before opening this writer, and writes the note of its own download after.
        let note = cache.resume_note_path(&key);
        for p in std::iter::once(&path).chain(note.as_ref()) {
            match fs::remove_file(p) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(StoreError::io("remove leftover", p, e));
                }
                _ => {}
            }
        }
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .ctx("create", &path)?;
        let algorithm = opts
            .expected
            .as_ref()
            .map_or(opts.algorithm, |e| e.algorithm);
        let mut w = CacheWriter {
            cache,
            key,
            path,
            file: Some(file),
            hasher: Some(Digest::Inline(Hasher::new(algorithm))),
            written: 0,
            opts,
            disk_full: false,
            write_error: None,
            linked: false,
            _lock: lock,
        };
        if let Some(size) = w.opts.expected_size {
            w.preallocate(size)?;
        }
        Ok(w)
    }

    /// Reserves the blocks up front so a full disk fails now, not after gigabytes were fetched.
    fn preallocate(&mut self, size: u64) -> Result<()> {
        let file = self.file.as_ref().expect("open until commit");
        match rustix::fs::fallocate(file, rustix::fs::FallocateFlags::KEEP_SIZE, 0, size) {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::NOSPC) | Err(rustix::io::Errno::DQUOT) => {
                self.disk_full = true;
                Err(StoreError::DiskFull {
                    path: self.path.clone(),
                })
            }
            // Filesystems without fallocate just skip the reservation.
            Err(_) => Ok(()),
        }
    }

    pub fn key(&self) -> &Key {
        &self.key
    }

    /// The file being written, in `incomplete/` (readers following a download tail it).
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    /// Fills the entry with a hard link to `src` instead of a copy of its bytes, then hashes it
    /// (the checksum is still verified at commit). `Ok(false)` when `src` is on another
    /// filesystem, so the caller copies instead. Only valid before anything was written.
    pub fn fill_by_link(&mut self, src: &Path) -> Result<bool> {
        assert_eq!(
            self.written, 0,
            "fill_by_link on a writer that already has bytes"
        );
        // Dot-named: never mistaken for a key's incomplete file.
        let tmp = self.cache.layout().incomplete_dir().join(format!(
            ".link-{}-{}",
            std::process::id(),
            self.key
        ));
        let _ = fs::remove_file(&tmp);
        if let Err(e) = fs::hard_link(src, &tmp) {
            if e.raw_os_error() == Some(rustix::io::Errno::XDEV.raw_os_error()) {
                return Ok(false);
            }
            return Err(StoreError::io("hard link", src, e));
        }
        if let Err(e) = fs::rename(&tmp, &self.path) {
            let _ = fs::remove_file(&tmp);
            return Err(StoreError::io("rename", &self.path, e));
        }
        let mut file = File::open(&self.path).ctx("open", &self.path)?;
        self.hash_inline().ctx("hash", &self.path)?;
        let Some(Digest::Inline(hasher)) = self.hasher.as_mut() else {
            unreachable!("hashing inline")
        };
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = io::Read::read(&mut file, &mut buf).ctx("read", &self.path)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            self.written += n as u64;
        }
        self.file = Some(file);
        self.linked = true;
        Ok(true)
    }

    /// Records a property with the image (set before [`CacheWriter::commit`]).
    pub fn set_prop(&mut self, name: &str, value: &str) {
        self.opts.props.insert(name.to_string(), value.to_string());
    }

    /// A scratch file beside the entry in `incomplete/`, for a tool that writes a new version of
    /// the bytes (a format conversion) before [`CacheWriter::replace_with`]. It is named like a
    /// key (`<key>.part`), so the cleaner reclaims it as a stalled write if the process dies.
    pub fn scratch_path(&self) -> PathBuf {
        let name = format!("{}.part", self.key);
        let dir = self.cache.layout().incomplete_dir();
        if Key::new(&name).is_ok() {
            dir.join(name)
        } else {
            dir.join(format!(".part-{}-{}", std::process::id(), self.key))
        }
    }

    /// Checks the bytes written so far against the expected size and checksum (as
    /// [`CacheWriter::commit`] would), then replaces them with the file at `path`, which is
    /// moved into place and hashed anew: the entry will publish `path`'s bytes, with their own
    /// checksum and no expectation left. Returns the checksum of the bytes replaced (what the
    /// source vouched for). On error nothing is replaced; dropping the writer then discards the
    /// entry as usual. `path` must be on the cache's filesystem (see
    /// [`CacheWriter::scratch_path`]).
    pub fn replace_with(&mut self, path: &Path) -> Result<Integrity> {
        let result = self.try_replace_with(path);
        if result.is_err() && self.write_error.is_none() {
            // The entry's bytes are unverified or half replaced: it must never publish.
            self.write_error = Some(io::Error::other("replacing the entry's bytes failed"));
        }
        result
    }

    fn try_replace_with(&mut self, path: &Path) -> Result<Integrity> {
        let algorithm = self.algorithm();
        let input = self.verify()?;
        // The old bytes are verified: from here the entry is `path`'s. A rename over a name
        // linked to a source file only drops that name; the source is untouched.
        fs::rename(path, &self.path).ctx("rename", path)?;
        self.linked = false;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .ctx("open", &self.path)?;
        let mut hasher = Hasher::new(algorithm);
        let mut buf = vec![0u8; 1 << 20];
        let mut written = 0u64;
        loop {
            let n = io::Read::read(&mut file, &mut buf).ctx("read", &self.path)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            written += n as u64;
        }
        self.file = Some(file);
        self.hasher = Some(Digest::Inline(hasher));
        self.written = written;
        self.opts.expected = None;
        self.opts.expected_size = None;
        Ok(input)
    }

    /// Checks size and checksum, fsyncs, records the image and renames it into place.
    /// On any failure the partial file goes to `invalid/` (or is removed if the disk is full)
    /// and nothing is published.
    pub fn commit(self) -> Result<Record> {
        self.commit_notify(|_| {})
    }

    /// [`CacheWriter::commit`], calling `verified` with the record to be published as soon as
    /// the bytes have passed the size and checksum checks, before the fsync, record and rename
    /// that publish them (which may still fail: then nothing is published, as with `commit`).
    /// A server uses it to release a verified download to its clients without waiting for the
    /// disk.
    pub fn commit_notify(self, verified: impl FnOnce(&Record)) -> Result<Record> {
        self.commit_open_notify(verified)
            .map(|r| r.record().clone())
    }

    /// [`CacheWriter::commit_notify`] that hands back the published image already open for
    /// reading: its shared flock is taken before the rename, so no prune or clean-up can evict
    /// it between publishing and the caller's use (a hard link into a deploy, a response).
    /// The open does not count as a hit.
    pub fn commit_open_notify(mut self, verified: impl FnOnce(&Record)) -> Result<CacheReader> {
        match self.try_commit(verified) {
            Ok(reader) => Ok(reader),
            Err(e) => {
                self.disk_full |= e.is_disk_full();
                self.discard();
                Err(e)
            }
        }
    }

    fn try_commit(&mut self, verified: impl FnOnce(&Record)) -> Result<CacheReader> {
        // A failed write (ENOSPC, EIO, ...) left a short file or a hole: publishing it would
        // record the checksum of the wrong bytes. ENOSPC/EDQUOT come back as `DiskFull`.
        let actual = self.verify()?;
        let file = self.file.as_ref().expect("open until commit");
        let at = now();
        let record = Record {
            image_id: self.key.to_string(),
            size: self.written,
            checksum: Some(actual),
            hits: 0,
            last_modified: at,
            last_accessed: at,
            props: std::mem::take(&mut self.opts.props),
        };
        verified(&record);
        // Crash safety is unchanged: the bytes are on disk before the rename publishes them.
        self.cache.driver().stage(&record, file)?;
        file.sync_all().ctx("fsync", &self.path)?;
        let dest = self.cache.get_image_filepath(&self.key, Status::Active);
        // The reader handed back: locked shared before the rename, so the image is in use from
        // the instant it is published.
        let held = File::open(&self.path).ctx("open", &self.path)?;
        crate::lock::lock_file(&held, Mode::Shared, true).ctx("lock", &self.path)?;
        let _g = self.cache.global_lock(Mode::Shared)?;
        // Never rename over a file the store has no record of: it is not ours to replace.
        self.cache.check_not_foreign(&self.key)?;
        // Record first, then rename: a crash between the two leaves a record with no file,
        // which `clean` drops; never a published file the store does not know it owns.
        self.cache.driver().insert(&record, file)?;
        if let Err(e) = fs::rename(&self.path, &dest) {
            let _ = self.cache.driver().remove(&self.key);
            return Err(StoreError::io("publish (rename)", &dest, e));
        }
        self.file = None;
        if self.linked
            && let Err(e) = fs::remove_file(&self.path)
            && e.kind() != io::ErrorKind::NotFound
        {
            // Re-publishing a source linked in before (same inode as the master): rename(2)
            // between two links of one inode does nothing and leaves the incomplete name.
            tracing::warn!(path = %self.path.display(), error = %e, "could not remove the staged link");
        }
        sync_dir(self.cache.root())?;
        Ok(CacheReader::new(held, record, dest))
    }

    /// Gives up: the partial file goes to `invalid/`, nothing is recorded.
    pub fn abort(mut self) {
        self.discard();
    }

    fn discard(&mut self) {
        let Some(file) = self.file.take() else { return };
        drop(file);
        let result = if self.disk_full || self.written == 0 || self.linked {
            fs::remove_file(&self.path)
        } else {
            let to = self.cache.get_image_filepath(&self.key, Status::Invalid);
            fs::rename(&self.path, &to).or_else(|_| fs::remove_file(&self.path))
        };
        if let Err(e) = result
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.path.display(), error = %e, "could not discard partial write");
        }
    }
}

impl CacheWriter {
    /// Writes all of `chunk`, hashing it on a thread of its own (a refcounted clone of the
    /// chunk goes there, no copy) while this thread writes it: hashing and writing a large
    /// image then take the time of the slower of the two, not of both. At most a few chunks
    /// wait for the hasher (this call blocks when it falls behind), so memory stays bounded.
    /// May be mixed with [`Write`]; [`CacheWriter::commit`] joins the hasher.
    pub fn write_bytes(&mut self, chunk: Bytes) -> io::Result<()> {
        self.write_batch(vec![chunk])
    }

    /// [`CacheWriter::write_bytes`] for several chunks at once: one hand-over to the hasher
    /// thread for the lot. Handing over costs a thread wake-up each time either side waits,
    /// which at line rate is a real share of a download's CPU; batches of the chunks the
    /// network had ready cut that several-fold.
    pub fn write_batch(&mut self, mut chunks: Vec<Bytes>) -> io::Result<()> {
        chunks.retain(|c| !c.is_empty());
        if chunks.is_empty() {
            return Ok(());
        }
        if self.file.is_none() {
            return Err(io::Error::other("writer already closed"));
        }
        let digest = self.hasher.take().expect("hasher until commit");
        let digest = match digest.threaded() {
            Ok(d) => d,
            Err(e) => {
                // The hash state went with the thread that could not start: these bytes can
                // no longer be verified, so this writer must never publish.
                self.hasher = Some(Digest::Inline(Hasher::new(self.algorithm())));
                return Err(self.lose(e));
            }
        };
        let Digest::Thread { tx, .. } = self.hasher.insert(digest) else {
            unreachable!("threaded")
        };
        if tx.send(chunks.clone()).is_err() {
            return Err(self.lose(io::Error::other("the hasher thread stopped")));
        }
        for chunk in &chunks {
            let mut buf = &chunk[..];
            while !buf.is_empty() {
                match self.write_file(buf) {
                    Ok(0) => {
                        return Err(self.lose(io::Error::new(
                            io::ErrorKind::WriteZero,
                            "failed to write whole buffer",
                        )));
                    }
                    Ok(n) => buf = &buf[n..],
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    /// Writes to the file, counting what was written. A failure other than EINTR is kept
    /// (bytes were lost: this writer must never publish).
    fn write_file(&mut self, buf: &[u8]) -> io::Result<usize> {
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| io::Error::other("writer already closed"))?;
        match file.write(buf) {
            Ok(n) => {
                self.written += n as u64;
                Ok(n)
            }
            Err(e) => {
                let full =
                    [rustix::io::Errno::NOSPC, rustix::io::Errno::DQUOT].map(|c| c.raw_os_error());
                if matches!(e.raw_os_error(), Some(c) if full.contains(&c)) {
                    self.disk_full = true;
                }
                // EINTR loses nothing (the caller retries); anything else lost bytes.
                if self.write_error.is_none() && e.kind() != io::ErrorKind::Interrupted {
                    self.write_error = Some(match e.raw_os_error() {
                        Some(code) => io::Error::from_raw_os_error(code),
                        None => io::Error::new(e.kind(), e.to_string()),
                    });
                }
                Err(e)
            }
        }
    }

    /// Records `e` as a loss of bytes (the writer will not publish) and returns it.
    fn lose(&mut self, e: io::Error) -> io::Error {
        if self.write_error.is_none() {
            self.write_error = Some(io::Error::new(e.kind(), e.to_string()));
        }
        e
    }

    /// Brings the hashing back to this thread (joins the hasher thread if one runs).
    fn hash_inline(&mut self) -> io::Result<()> {
        let digest = self.hasher.take().expect("hasher until commit");
        match digest.into_hasher() {
            Ok(h) => {
                self.hasher = Some(Digest::Inline(h));
                Ok(())
            }
            Err(e) => {
                self.hasher = Some(Digest::Inline(Hasher::new(self.algorithm())));
                Err(self.lose(e))
            }
        }
    }

    /// The algorithm the bytes are hashed with.
    fn algorithm(&self) -> Algorithm {
        self.opts
            .expected
            .as_ref()
            .map_or(self.opts.algorithm, |e| e.algorithm)
    }

    /// The checksum of every byte written; the hasher is used up.
    /// The bytes written so far: no failed write, the expected size, the expected checksum.
    /// Returns their checksum (the hasher is consumed).
    fn verify(&mut self) -> Result<Integrity> {
        if let Some(e) = self.write_error.take() {
            return Err(StoreError::io("write", &self.path, e));
        }
        let actual = self.digest().ctx("hash", &self.path)?;
        if let Some(expected) = self.opts.expected_size
            && expected != self.written
        {
            return Err(StoreError::SizeMismatch {
                key: self.key.to_string(),
                expected,
                actual: self.written,
            });
        }
        if let Some(expected) = &self.opts.expected
            && *expected != actual
        {
            return Err(StoreError::ChecksumMismatch {
                key: self.key.to_string(),
                expected: expected.clone(),
                actual,
            });
        }
        Ok(actual)
    }

    fn digest(&mut self) -> io::Result<Integrity> {
        let digest = self.hasher.take().expect("hasher until commit");
        Ok(digest.into_hasher()?.finish())
    }
}

impl Write for CacheWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.write_file(buf)?;
        let sent = match self.hasher.as_mut() {
            Some(Digest::Inline(h)) => {
                h.update(&buf[..n]);
                true
            }
            Some(Digest::Thread { tx, .. }) => {
                tx.send(vec![Bytes::copy_from_slice(&buf[..n])]).is_ok()
            }
            None => true,
        };
        if !sent {
            return Err(self.lose(io::Error::other("the hasher thread stopped")));
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for CacheWriter {
    fn drop(&mut self) {
        self.discard();
    }
}

impl Cache {
    /// Where a download of `key` in progress keeps what resuming it after a crash needs
    /// (`incomplete/<key>.resume`, written by the fetch layer); `None` when that name is not
    /// a valid key (too long). The cleaner removes it with its leftover, after the stall time.
    pub fn resume_note_path(&self, key: &Key) -> Option<PathBuf> {
        let name = format!("{key}{RESUME_NOTE}");
        Key::new(&name).ok()?;
        Some(self.layout().incomplete_dir().join(name))
    }
}

/// The suffix of a download's resume note in `incomplete/`.
pub const RESUME_NOTE: &str = ".resume";

/// fsyncs a directory so a rename into it survives a crash.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx("fsync directory", dir)
}
