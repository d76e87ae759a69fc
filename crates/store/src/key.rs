//! Cache keys. A key becomes a file name, so it is validated before any path is built from it.

use std::fmt;

use crate::error::KeyError;

/// Longest key accepted: the usual file-name limit (ext4, xfs) is 255 bytes.
pub const MAX_KEY_LEN: usize = 255;

/// Names of the store's own directories, which a key must not shadow.
pub const RESERVED: &[&str] = &["incomplete", "invalid", "queue", "locks"];

/// A validated cache key: `[A-Za-z0-9._-]`, 1–255 bytes, not starting with `.`, not a reserved name.
///
/// Keys starting with `.` are refused so that `.`/`..` can never be keys and so that the store's
/// own files (`.imgcache.sqlite`, `.global.lock`) can never collide with an image.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key(String);

impl Key {
    pub fn new(raw: impl AsRef<str>) -> Result<Self, KeyError> {
        let raw = raw.as_ref();
        if raw.is_empty() {
            return Err(KeyError::Empty);
        }
        if raw.len() > MAX_KEY_LEN {
            return Err(KeyError::TooLong(raw.len()));
        }
        if let Some(c) = raw
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(KeyError::BadChar(c));
        }
        if raw.starts_with('.') {
            return Err(KeyError::LeadingDot);
        }
        if RESERVED.contains(&raw) {
            return Err(KeyError::Reserved(raw.to_string()));
        }
        Ok(Key(raw.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({:?})", self.0)
    }
}

impl std::str::FromStr for Key {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Key::new(s)
    }
}

impl AsRef<str> for Key {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_uuids_and_converted_suffix() {
        for ok in [
            "6a2b5b54-2d8c-4d6a-9f4e-0c1b2c3d4e5f",
            "6a2b5b54-2d8c-4d6a-9f4e-0c1b2c3d4e5f.converted",
            "a",
            "A_b-c.d",
            &"x".repeat(255),
        ] {
            assert_eq!(Key::new(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn refuses_traversal_and_junk() {
        assert_eq!(Key::new(""), Err(KeyError::Empty));
        assert_eq!(Key::new("x".repeat(300)), Err(KeyError::TooLong(300)));
        assert_eq!(Key::new("../x"), Err(KeyError::BadChar('/')));
        assert_eq!(Key::new(".."), Err(KeyError::LeadingDot));
        assert_eq!(Key::new(".hidden"), Err(KeyError::LeadingDot));
        assert_eq!(Key::new("a\0b"), Err(KeyError::BadChar('\0')));
        assert_eq!(Key::new("a b"), Err(KeyError::BadChar(' ')));
        assert_eq!(Key::new("é"), Err(KeyError::BadChar('é')));
        assert_eq!(Key::new("%2e%2e"), Err(KeyError::BadChar('%')));
        assert_eq!(
            Key::new("incomplete"),
            Err(KeyError::Reserved("incomplete".into()))
        );
    }
}
