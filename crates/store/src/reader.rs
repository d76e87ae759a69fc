//! Reading a published image. The reader holds a shared flock on the image file for as long as
//! it is open; prune and clean skip any file they cannot lock exclusively.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::record::Record;

#[derive(Debug)]
pub struct CacheReader {
    file: File,
    record: Record,
    path: PathBuf,
}

impl CacheReader {
    pub(crate) fn new(file: File, record: Record, path: PathBuf) -> Self {
        CacheReader { file, record, path }
    }

    /// The record as of this open (the hit is already counted).
    pub fn record(&self) -> &Record {
        &self.record
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file, e.g. for `sendfile` or `copy_file_range`.
    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn into_file(self) -> File {
        self.file
    }
}

impl Read for CacheReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }
}

impl Seek for CacheReader {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.file.seek(pos)
    }
}
