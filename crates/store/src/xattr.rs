//! xattr driver: each image's record lives in `user.imgcache.*` extended attributes of the
//! image file itself, so record and file are published by the same rename.
//!
//! Glance's xattr driver trusts the file's atime for LRU, which `relatime`/`noatime` mounts do
//! not keep; here `last_accessed` is an attribute the store writes on every hit. Listing and LRU
//! scan the directory (there is no index), which is this driver's cost; SQLite is the default.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::path::PathBuf;

use rustix::fs::XattrFlags;
use rustix::io::Errno;

use crate::driver::Driver;
use crate::error::{IoContext, Result, StoreError};
use crate::integrity::Integrity;
use crate::key::Key;
use crate::layout::{Layout, Status, key_files};
use crate::lock::{FileLock, Mode};
use crate::record::{LruEntry, Record, Timestamp};

const CHECKSUM: &str = "user.imgcache.checksum";
const HITS: &str = "user.imgcache.hits";
const LAST_MODIFIED: &str = "user.imgcache.last_modified";
const LAST_ACCESSED: &str = "user.imgcache.last_accessed";
const PROPS: &str = "user.imgcache.props";

pub struct XattrDriver {
    layout: Layout,
}

impl XattrDriver {
    /// Checks that the cache directory's filesystem takes user xattrs (tmpfs before Linux 6.6,
    /// some NFS and overlay setups do not) and fails with a bad driver configuration if not.
    pub fn open(layout: Layout) -> Result<Self> {
        let probe = layout
            .incomplete_dir()
            .join(format!(".xattr-probe-{}", std::process::id()));
        let file = File::create(&probe).ctx("create", &probe)?;
        let res = rustix::fs::fsetxattr(&file, "user.imgcache.probe", b"1", XattrFlags::empty());
        let _ = std::fs::remove_file(&probe);
        match res {
            Ok(()) => Ok(XattrDriver { layout }),
            Err(e) => Err(StoreError::BadDriverConfiguration {
                driver: "xattr",
                reason: format!(
                    "the filesystem of {} does not take user extended attributes ({e}); \
                     use the sqlite driver or a filesystem with user_xattr",
                    layout.root().display()
                ),
            }),
        }
    }

    fn path(&self, key: &Key) -> PathBuf {
        self.layout.path(key, Status::Active)
    }

    /// Serialises read-modify-write of attributes (hit counts) across threads and processes.
    fn rmw_lock(&self) -> Result<FileLock> {
        FileLock::acquire(
            &self.layout.locks_dir().join(".xattr-rmw.lock"),
            Mode::Exclusive,
        )
    }

    fn read(&self, key: &Key, file: &File) -> Result<Option<Record>> {
        let path = self.path(key);
        let attr = |name| get_attr(file, name).ctx("read xattr", &path);
        // last_modified is written at publish: no such attribute, not a record of ours.
        let Some(last_modified) = attr(LAST_MODIFIED)?.and_then(|v| v.parse().ok()) else {
            return Ok(None);
        };
        let size = file.metadata().ctx("stat", &path)?.len();
        Ok(Some(Record {
            image_id: key.to_string(),
            size,
            checksum: attr(CHECKSUM)?.and_then(|c| c.parse::<Integrity>().ok()),
            hits: attr(HITS)?.and_then(|v| v.parse().ok()).unwrap_or(0),
            last_modified,
            last_accessed: attr(LAST_ACCESSED)?
                .and_then(|v| v.parse().ok())
                .unwrap_or(last_modified),
            props: attr(PROPS)?
                .and_then(|p| serde_json::from_str(&p).ok())
                .unwrap_or_default(),
        }))
    }

    fn open_active(&self, key: &Key) -> Result<Option<File>> {
        let path = self.path(key);
        match File::open(&path) {
            Ok(f) => Ok(Some(f)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::io("open", &path, e)),
        }
    }

    fn records(&self) -> Result<Vec<Record>> {
        let mut out = Vec::new();
        for (key, _) in key_files(self.layout.root())? {
            if let Some(f) = self.open_active(&key)?
                && let Some(r) = self.read(&key, &f)?
            {
                out.push(r);
            }
        }
        Ok(out)
    }
}

fn get_attr(file: &File, name: &str) -> io::Result<Option<String>> {
    let mut buf = vec![0u8; 256];
    loop {
        match rustix::fs::fgetxattr(file, name, &mut buf[..]) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(Some(String::from_utf8_lossy(&buf).into_owned()));
            }
            Err(Errno::NODATA) => return Ok(None),
            Err(Errno::RANGE) => {
                let need = rustix::fs::fgetxattr_query(file, name)?;
                buf.resize(need.max(buf.len() * 2), 0);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Whether an open file carries an xattr record of ours (its publish-time attribute).
pub(crate) fn has_record(file: &File) -> bool {
    get_attr(file, LAST_MODIFIED).ok().flatten().is_some()
}

fn set_attr(file: &File, name: &str, value: &str) -> io::Result<()> {
    rustix::fs::fsetxattr(file, name, value.as_bytes(), XattrFlags::empty()).map_err(Into::into)
}

impl Driver for XattrDriver {
    fn name(&self) -> &'static str {
        "xattr"
    }

    fn stage(&self, rec: &Record, staged: &File) -> Result<()> {
        let path = self
            .layout
            .path(&Key::new(&rec.image_id)?, Status::Incomplete);
        let props = serde_json::to_string(&rec.props).expect("string map serialises");
        let checksum = rec.checksum.as_ref().map(|c| c.to_string());
        (|| {
            if let Some(c) = &checksum {
                set_attr(staged, CHECKSUM, c)?;
            }
            set_attr(staged, HITS, &rec.hits.to_string())?;
            set_attr(staged, LAST_ACCESSED, &rec.last_accessed.to_string())?;
            set_attr(staged, PROPS, &props)?;
            // Last: its presence is what makes the file a record of ours.
            set_attr(staged, LAST_MODIFIED, &rec.last_modified.to_string())
        })()
        .ctx("write xattrs", path)
    }

    fn insert(&self, _rec: &Record, _staged: &File) -> Result<()> {
        Ok(()) // written by `stage`, published by the rename
    }

    fn get(&self, key: &Key) -> Result<Option<Record>> {
        match self.open_active(key)? {
            Some(f) => self.read(key, &f),
            None => Ok(None),
        }
    }

    fn list(&self) -> Result<Vec<Record>> {
        self.records()
    }

    fn remove(&self, _key: &Key) -> Result<bool> {
        // The record went with the file.
        Ok(false)
    }

    fn record_hit(&self, key: &Key, file: &File, at: Timestamp) -> Result<Option<Record>> {
        let _g = self.rmw_lock()?;
        let Some(mut rec) = self.read(key, file)? else {
            return Ok(None);
        };
        rec.hits += 1;
        rec.last_accessed = at;
        (|| {
            set_attr(file, HITS, &rec.hits.to_string())?;
            set_attr(file, LAST_ACCESSED, &at.to_string())
        })()
        .ctx("write xattrs", self.path(key))?;
        Ok(Some(rec))
    }

    fn lru_page_size(&self) -> usize {
        usize::MAX
    }

    fn lru_page(&self, after: Option<&LruEntry>, limit: usize) -> Result<Vec<LruEntry>> {
        let mut all: Vec<LruEntry> = self
            .records()?
            .into_iter()
            .map(|r| LruEntry {
                image_id: r.image_id,
                size: r.size,
                last_accessed: r.last_accessed,
            })
            .filter(|e| match after {
                None => true,
                Some(a) => {
                    (e.last_accessed, e.image_id.as_str()) > (a.last_accessed, a.image_id.as_str())
                }
            })
            .collect();
        let order = |a: &LruEntry, b: &LruEntry| {
            a.last_accessed
                .total_cmp(&b.last_accessed)
                .then_with(|| a.image_id.cmp(&b.image_id))
        };
        if limit == 1 {
            // get_least_recently_accessed: a minimum, not a sort.
            return Ok(all.into_iter().min_by(order).into_iter().collect());
        }
        all.sort_by(order);
        all.truncate(limit);
        Ok(all)
    }

    fn total_size(&self) -> Result<u64> {
        Ok(self.records()?.iter().map(|r| r.size).sum())
    }

    fn set_prop(&self, key: &Key, file: &File, name: &str, value: &str) -> Result<()> {
        let _g = self.rmw_lock()?;
        let path = self.path(key);
        let mut props: BTreeMap<String, String> = get_attr(file, PROPS)
            .ctx("read xattr", &path)?
            .and_then(|p| serde_json::from_str(&p).ok())
            .unwrap_or_default();
        props.insert(name.to_string(), value.to_string());
        let json = serde_json::to_string(&props).expect("string map serialises");
        set_attr(file, PROPS, &json).ctx("write xattr", &path)
    }
}
