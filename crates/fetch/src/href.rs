//! Image references (hrefs) and the cache keys they map to.
//!
//! Keys match Ironic's master files so an existing Ironic master dir can be adopted: a Glance
//! image id keys by itself, any other href by `uuid5(NAMESPACE_URL, href)`, and `.converted`
//! is appended when the image is fetched with `force_raw`.

use std::fmt;
use std::path::PathBuf;

use imgcache_store::Key;
use url::Url;
use uuid::Uuid;

use crate::error::FetchError;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Href {
    /// `http://` or `https://`.
    Http(Url),
    /// `file://` — a local path (still subject to the allowed-directories check).
    File(PathBuf),
    /// A Glance v2 image id, given bare or as `glance://<uuid>`.
    Glance(Uuid),
}

impl Href {
    pub fn parse(raw: &str) -> Result<Href, FetchError> {
        let raw = raw.trim();
        if let Ok(id) = Uuid::parse_str(raw)
            && raw.len() == 36
        {
            return Ok(Href::Glance(id));
        }
        let url = Url::parse(raw).map_err(|e| FetchError::BadHref {
            href: raw.to_string(),
            reason: e.to_string(),
        })?;
        match url.scheme() {
            "http" | "https" => Ok(Href::Http(url)),
            "file" => {
                let path = url.to_file_path().map_err(|_| FetchError::BadHref {
                    href: raw.to_string(),
                    reason: "not a local absolute path".into(),
                })?;
                Ok(Href::File(path))
            }
            "glance" => {
                let id = url.host_str().unwrap_or_default();
                Uuid::parse_str(id)
                    .map(Href::Glance)
                    .map_err(|_| FetchError::BadHref {
                        href: raw.to_string(),
                        reason: "glance:// must be followed by an image UUID".into(),
                    })
            }
            other => Err(FetchError::UnsupportedScheme {
                href: raw.to_string(),
                scheme: other.to_string(),
            }),
        }
    }

    /// The string Ironic feeds to uuid5 (the href as given, for URLs).
    fn key_base(&self, raw: &str) -> String {
        match self {
            Href::Glance(id) => id.hyphenated().to_string(),
            _ => Uuid::new_v5(&Uuid::NAMESPACE_URL, raw.trim().as_bytes())
                .hyphenated()
                .to_string(),
        }
    }
}

/// The cache key for `raw` (the href exactly as the caller gave it: Ironic hashes the string).
pub fn cache_key(href: &Href, raw: &str, force_raw: bool) -> Key {
    let mut k = href.key_base(raw);
    if force_raw {
        k.push_str(".converted");
    }
    Key::new(k).expect("uuid-based keys are valid")
}

impl fmt::Display for Href {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Href::Http(u) => write!(f, "{u}"),
            Href::File(p) => write!(f, "file://{}", p.display()),
            Href::Glance(id) => write!(f, "glance://{id}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_python_uuid5() {
        // Vectors from: python3 -c "import uuid; print(uuid.uuid5(uuid.NAMESPACE_URL, HREF))"
        for (raw, want) in [
            (
                "http://example.com/a.img",
                "228b2cb6-b996-570e-ae23-8cb5ec66d0a6",
            ),
            (
                "https://images.example.org/ubuntu-24.04.qcow2?x=1&y=%20z",
                "db9d0ffe-0ede-5857-83ce-4981c4266ac5",
            ),
        ] {
            let h = Href::parse(raw).unwrap();
            assert_eq!(cache_key(&h, raw, false).as_str(), want);
            assert_eq!(
                cache_key(&h, raw, true).as_str(),
                format!("{want}.converted")
            );
        }
    }

    #[test]
    fn glance_ids_key_by_themselves() {
        let id = "6a2b5b54-2d8c-4d6a-9f4e-0c1b2c3d4e5f";
        for raw in [id.to_string(), format!("glance://{id}")] {
            let h = Href::parse(&raw).unwrap();
            assert_eq!(cache_key(&h, &raw, false).as_str(), id);
            assert_eq!(
                cache_key(&h, &raw, true).as_str(),
                format!("{id}.converted")
            );
        }
    }

    #[test]
    fn bad_hrefs() {
        assert!(matches!(
            Href::parse("ftp://x/y"),
            Err(FetchError::UnsupportedScheme { .. })
        ));
        assert!(matches!(
            Href::parse("not a url"),
            Err(FetchError::BadHref { .. })
        ));
        assert!(matches!(
            Href::parse("glance://nope"),
            Err(FetchError::BadHref { .. })
        ));
        assert_eq!(
            Href::parse("file:///srv/img/a.qcow2").unwrap(),
            Href::File("/srv/img/a.qcow2".into())
        );
    }
}
