//! Where the expected checksum of a download comes from: given inline (`sha256:HEX`), or the
//! URL of a checksum file (`SHA256SUMS` style, or BSD `SHA256 (name) = HEX`) matched by the
//! image's file name.

use imgcache_store::{Algorithm, Integrity};
use reqwest::header::HeaderMap;
use url::Url;

use crate::error::{FetchError, Result};
use crate::source::http::HttpSource;

#[derive(Clone, Debug, PartialEq)]
pub enum ChecksumSpec {
    Inline(Integrity),
    File(Url),
}

impl std::str::FromStr for ChecksumSpec {
    type Err = FetchError;
    fn from_str(s: &str) -> Result<Self> {
        if s.starts_with("http://") || s.starts_with("https://") {
            let url = Url::parse(s).map_err(|e| FetchError::BadHref {
                href: s.to_string(),
                reason: e.to_string(),
            })?;
            return Ok(ChecksumSpec::File(url));
        }
        Ok(ChecksumSpec::Inline(s.parse().map_err(FetchError::Store)?))
    }
}

impl ChecksumSpec {
    /// The expected checksum of the image named `file_name`.
    pub async fn resolve(&self, http: &HttpSource, file_name: &str) -> Result<Integrity> {
        match self {
            ChecksumSpec::Inline(i) => Ok(i.clone()),
            ChecksumSpec::File(url) => {
                let body = http.get_small(url, &HeaderMap::new(), 4 << 20).await?;
                let text = String::from_utf8_lossy(&body);
                find_in_sums(&text, file_name).ok_or_else(|| FetchError::ChecksumNotListed {
                    url: url.to_string(),
                    name: file_name.to_string(),
                })
            }
        }
    }
}

/// The algorithm a bare hex digest of this length belongs to.
fn algorithm_for(hex: &str) -> Option<Algorithm> {
    match hex.len() {
        32 => Some(Algorithm::Md5),
        64 => Some(Algorithm::Sha256),
        128 => Some(Algorithm::Sha512),
        _ => None,
    }
}

/// Finds `name`'s digest in a checksum file. GNU lines are `HEX  name` or `HEX *name`
/// (binary mode); BSD lines are `ALGO (name) = HEX`. Paths in the file match on their last part.
pub fn find_in_sums(text: &str, name: &str) -> Option<Integrity> {
    let matches = |listed: &str| listed == name || listed.rsplit('/').next() == Some(name);
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some((left, hex)) = line.rsplit_once(") = ") {
            if let Some((algo, listed)) = left.split_once(" (")
                && matches(listed)
                && let Ok(a) = algo.parse::<Algorithm>()
            {
                return Integrity::new(a, hex.trim()).ok();
            }
            continue;
        }
        let Some((hex, listed)) = line.split_once(char::is_whitespace) else {
            continue;
        };
        let listed = listed.trim_start().trim_start_matches('*');
        if matches(listed)
            && let Some(a) = algorithm_for(hex)
        {
            return Integrity::new(a, hex).ok();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    #[test]
    fn gnu_and_bsd_styles() {
        let gnu = format!(
            "# comment\n{}  other.img\n{SHA} *focal.img\n",
            "0".repeat(64)
        );
        assert_eq!(find_in_sums(&gnu, "focal.img").unwrap().hex(), SHA);
        let bsd = format!("SHA256 (images/focal.img) = {SHA}\n");
        assert_eq!(find_in_sums(&bsd, "focal.img").unwrap().hex(), SHA);
        assert!(find_in_sums(&gnu, "missing.img").is_none());
        let md5 = "900150983cd24fb0d6963f7d28e17f72  a.iso\n";
        assert_eq!(
            find_in_sums(md5, "a.iso").unwrap().algorithm,
            Algorithm::Md5
        );
    }

    #[test]
    fn spec_parsing() {
        assert!(matches!(
            format!("sha256:{SHA}").parse::<ChecksumSpec>().unwrap(),
            ChecksumSpec::Inline(_)
        ));
        assert!(matches!(
            "https://x/SHA256SUMS".parse::<ChecksumSpec>().unwrap(),
            ChecksumSpec::File(_)
        ));
        assert!("sha1:abc".parse::<ChecksumSpec>().is_err());
    }
}
