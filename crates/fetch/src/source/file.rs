//! `file://` origins: local paths, only under directories the operator allowed (none by
//! default), so an href cannot read `/etc/shadow` through the cache.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::{OriginMeta, Response, Validators};
use crate::error::{FetchError, Result};

#[derive(Clone, Debug, Default)]
pub struct FileSource {
    allowed: Vec<PathBuf>,
}

impl FileSource {
    /// `allowed` directories are canonicalised now; ones that do not exist are dropped with a
    /// warning (they cannot contain anything).
    pub fn new(allowed: &[PathBuf]) -> Self {
        let allowed = allowed
            .iter()
            .filter_map(|d| match d.canonicalize() {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!(dir = %d.display(), error = %e, "allowed file directory ignored");
                    None
                }
            })
            .collect();
        FileSource { allowed }
    }

    /// Checks the path (after resolving symlinks and `..`) is under an allowed directory.
    pub fn resolve(&self, path: &Path) -> Result<PathBuf> {
        let real = path.canonicalize().map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound && self.permits(path) {
                FetchError::io("open", path, e)
            } else {
                // Do not reveal whether a file outside the allowed dirs exists.
                FetchError::FileNotAllowed {
                    path: path.to_path_buf(),
                }
            }
        })?;
        if !self.permits(&real) {
            return Err(FetchError::FileNotAllowed {
                path: path.to_path_buf(),
            });
        }
        Ok(real)
    }

    fn permits(&self, p: &Path) -> bool {
        self.allowed.iter().any(|d| p.starts_with(d))
    }

    /// The file, or `NotModified` when its mtime and size match what the held copy came from.
    pub fn get(&self, path: &Path, held: Option<&Validators>) -> Result<Response> {
        let real = self.resolve(path)?;
        let meta = std::fs::metadata(&real).map_err(|e| FetchError::io("stat", &real, e))?;
        if !meta.is_file() {
            return Err(FetchError::BadHref {
                href: path.display().to_string(),
                reason: "not a regular file".into(),
            });
        }
        let mtime_ns = i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec());
        if held.is_some_and(|v| v.mtime_ns == Some(mtime_ns)) {
            return Ok(Response::NotModified);
        }
        Ok(Response::LocalFile {
            meta: OriginMeta {
                size: Some(meta.len()),
                validators: Validators {
                    mtime_ns: Some(mtime_ns),
                    ..Validators::default()
                },
                ..OriginMeta::default()
            },
            path: real,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_allowed_dirs_are_readable() {
        let allowed = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        std::fs::write(allowed.path().join("a.img"), b"x").unwrap();
        std::fs::write(other.path().join("b.img"), b"y").unwrap();
        let src = FileSource::new(&[allowed.path().to_path_buf()]);
        assert!(src.resolve(&allowed.path().join("a.img")).is_ok());
        for bad in [
            other.path().join("b.img"),
            allowed
                .path()
                .join("../")
                .join(other.path().file_name().unwrap())
                .join("b.img"),
            PathBuf::from("/etc/shadow"),
        ] {
            assert!(
                matches!(src.resolve(&bad), Err(FetchError::FileNotAllowed { .. })),
                "{bad:?}"
            );
        }
        // A symlink inside the allowed dir pointing outside is refused too.
        std::os::unix::fs::symlink("/etc/hostname", allowed.path().join("link")).unwrap();
        assert!(matches!(
            src.resolve(&allowed.path().join("link")),
            Err(FetchError::FileNotAllowed { .. })
        ));
        // Nothing is allowed by default.
        assert!(
            FileSource::default()
                .resolve(&allowed.path().join("a.img"))
                .is_err()
        );
    }
}
