//! Which URLs may be fetched: an allow-list of URL prefixes, compared on parsed URLs.
//!
//! A raw `starts_with` on the href string is not a boundary: with the prefix
//! `http://h:8080`, `http://h:8080@internal/x` (userinfo), `http://h:80801/x` (another port)
//! and, with `http://h/images`, `http://h/images2/x` (another path) would all pass. Here a
//! prefix is parsed once ([`AllowList::new`]) and a URL is permitted when its scheme and host
//! are the prefix's, its port is the prefix's (default ports made explicit:
//! `http://h` is `http://h:80`), and its path is the prefix's path or below it on a segment
//! boundary: `/images` permits `/images` and `/images/a`, not `/images2`; `/images/` permits
//! `/images/a`. The URL is the one `url::Url` parsed, so `..` and `%2e%2e` are already
//! resolved. A URL carrying userinfo (`user:password@`) is refused whatever the list says.
//!
//! The same check applies to every redirect hop (`source::http`).

use std::fmt;

use url::{Host, Url};

/// Why a URL is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The URL carries a username or a password (`user:password@host`).
    Userinfo,
    /// The URL is under none of the allowed prefixes (or none is allowed).
    NotAllowed,
    /// The path holds an encoded `/` or `\` (`%2F`, `%5C`): an origin that decodes it before
    /// resolving `..` could serve a path outside the prefix.
    EncodedSeparator,
    /// A redirect to a scheme other than http or https.
    Scheme(String),
    /// A redirect whose `Location` is not a URL.
    Unparsable(String),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Userinfo => f.write_str("the URL carries userinfo (user:password@), refused"),
            Refusal::NotAllowed => f.write_str("not under an allowed href prefix"),
            Refusal::EncodedSeparator => {
                f.write_str("the path holds an encoded separator (%2F or %5C), refused")
            }
            Refusal::Scheme(s) => write!(f, "scheme {s:?} is not http or https"),
            Refusal::Unparsable(e) => write!(f, "the Location is not a valid URL: {e}"),
        }
    }
}

impl std::error::Error for Refusal {}

/// A prefix that does not parse as an allowed-href prefix.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("allowed href prefix {prefix:?}: {reason}")]
pub struct BadPrefix {
    pub prefix: String,
    pub reason: String,
}

/// One parsed prefix.
#[derive(Clone, Debug)]
struct Prefix {
    /// As configured, for messages.
    raw: String,
    scheme: String,
    host: Option<Host<String>>,
    port: Option<u16>,
    /// The normalised path (`/` at least).
    path: String,
}

impl Prefix {
    fn parse(raw: &str) -> Result<Prefix, BadPrefix> {
        let bad = |reason: &str| BadPrefix {
            prefix: raw.to_string(),
            reason: reason.to_string(),
        };
        let url = Url::parse(raw.trim()).map_err(|e| bad(&e.to_string()))?;
        match url.scheme() {
            "http" | "https" if url.host().is_some() => {}
            "http" | "https" => return Err(bad("no host")),
            "file" => {}
            other => {
                return Err(bad(&format!("scheme {other:?} is not http, https or file")));
            }
        }
        if has_userinfo(&url) {
            return Err(bad("a prefix cannot carry userinfo (user:password@)"));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(bad("a prefix cannot have a query or a fragment"));
        }
        if has_encoded_separator(url.path()) {
            return Err(bad("a prefix cannot hold an encoded separator (%2F, %5C)"));
        }
        Ok(Prefix {
            raw: raw.to_string(),
            scheme: url.scheme().to_string(),
            host: url.host().map(|h| h.to_owned()),
            port: url.port_or_known_default(),
            path: url.path().to_string(),
        })
    }

    fn permits(&self, url: &Url) -> bool {
        url.scheme() == self.scheme
            && match (url.host(), &self.host) {
                (Some(got), Some(want)) => got == *want,
                (None, None) => true,
                _ => false,
            }
            && url.port_or_known_default() == self.port
            && path_under(&self.path, url.path())
    }
}

/// `path` is `prefix` or below it, on a segment boundary.
fn path_under(prefix: &str, path: &str) -> bool {
    if prefix.ends_with('/') {
        path.starts_with(prefix)
    } else {
        path.strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    }
}

fn has_userinfo(url: &Url) -> bool {
    !url.username().is_empty() || url.password().is_some()
}

fn has_encoded_separator(path: &str) -> bool {
    let p = path.to_ascii_lowercase();
    p.contains("%2f") || p.contains("%5c")
}

/// Refuses a URL carrying userinfo: with or without an allow-list, credentials in an href
/// are never sent (and `http://allowed@elsewhere/` is a classic prefix bypass).
pub fn check_userinfo(url: &Url) -> Result<(), Refusal> {
    if has_userinfo(url) {
        Err(Refusal::Userinfo)
    } else {
        Ok(())
    }
}

/// The URL prefixes hrefs must be under (see the module docs). Empty prefixes are ignored;
/// an empty list permits nothing.
#[derive(Clone, Debug, Default)]
pub struct AllowList {
    prefixes: Vec<Prefix>,
}

impl AllowList {
    /// Parses every prefix; the first that does not parse is the error.
    pub fn new<I, S>(prefixes: I) -> Result<AllowList, BadPrefix>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let prefixes = prefixes
            .into_iter()
            .filter(|p| !p.as_ref().trim().is_empty())
            .map(|p| Prefix::parse(p.as_ref()))
            .collect::<Result<_, _>>()?;
        Ok(AllowList { prefixes })
    }

    /// Whether `url` may be fetched: no userinfo, no encoded separator in its path, and
    /// under one of the prefixes.
    pub fn permits(&self, url: &Url) -> Result<(), Refusal> {
        check_userinfo(url)?;
        if has_encoded_separator(url.path()) {
            return Err(Refusal::EncodedSeparator);
        }
        if self.prefixes.iter().any(|p| p.permits(url)) {
            Ok(())
        } else {
            Err(Refusal::NotAllowed)
        }
    }

    /// The prefixes as configured.
    pub fn prefixes(&self) -> impl Iterator<Item = &str> {
        self.prefixes.iter().map(|p| p.raw.as_str())
    }

    pub fn is_empty(&self) -> bool {
        self.prefixes.is_empty()
    }
}

/// `url` for a message: its userinfo, if any, replaced by `redacted`.
pub fn redacted(url: &Url) -> String {
    if !has_userinfo(url) {
        return url.to_string();
    }
    let mut u = url.clone();
    let _ = u.set_password(None);
    let _ = u.set_username("redacted");
    u.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(prefixes: &[&str]) -> AllowList {
        AllowList::new(prefixes).unwrap()
    }

    fn check(l: &AllowList, href: &str) -> Result<(), Refusal> {
        l.permits(&Url::parse(href).unwrap())
    }

    #[test]
    fn port_without_trailing_slash_is_exact() {
        let l = list(&["http://127.0.0.1:8080"]);
        assert_eq!(check(&l, "http://127.0.0.1:8080/x"), Ok(()));
        assert_eq!(check(&l, "http://127.0.0.1:8080"), Ok(()));
        // A sibling port sharing the digits.
        assert_eq!(
            check(&l, "http://127.0.0.1:8081/x"),
            Err(Refusal::NotAllowed)
        );
        assert_eq!(
            check(&l, "http://127.0.0.1:808/x"),
            Err(Refusal::NotAllowed)
        );
        // `:80801` is no port at all: it does not even parse.
        assert!(Url::parse("http://127.0.0.1:80801/x").is_err());
        let l = list(&["http://127.0.0.1:4000"]);
        assert_eq!(
            check(&l, "http://127.0.0.1:40001/x"),
            Err(Refusal::NotAllowed)
        );
        // The default port.
        assert_eq!(check(&l, "http://127.0.0.1/x"), Err(Refusal::NotAllowed));
    }

    #[test]
    fn userinfo_is_refused_always() {
        let l = list(&["http://127.0.0.1:8080"]);
        for href in [
            "http://127.0.0.1:8080@internal/x",
            "http://user@127.0.0.1:8080/x",
            "http://user:pw@127.0.0.1:8080/x",
            "http://:pw@127.0.0.1:8080/x",
        ] {
            assert_eq!(check(&l, href), Err(Refusal::Userinfo), "{href}");
            let u = Url::parse(href).unwrap();
            assert_eq!(check_userinfo(&u), Err(Refusal::Userinfo), "{href}");
            assert!(!redacted(&u).contains("pw"), "{}", redacted(&u));
        }
        // Even an empty list refuses it for that reason, not another.
        assert_eq!(check(&list(&[]), "http://u:p@h/x"), Err(Refusal::Userinfo));
        assert_eq!(check_userinfo(&Url::parse("http://h/x").unwrap()), Ok(()));
    }

    #[test]
    fn path_on_a_segment_boundary() {
        let l = list(&["http://h/images"]);
        assert_eq!(check(&l, "http://h/images"), Ok(()));
        assert_eq!(check(&l, "http://h/images/"), Ok(()));
        assert_eq!(check(&l, "http://h/images/a/b.img"), Ok(()));
        assert_eq!(check(&l, "http://h/images2/x"), Err(Refusal::NotAllowed));
        assert_eq!(check(&l, "http://h/images.bak"), Err(Refusal::NotAllowed));
        assert_eq!(check(&l, "http://h/"), Err(Refusal::NotAllowed));
        assert_eq!(check(&l, "http://h/other"), Err(Refusal::NotAllowed));

        let l = list(&["http://h/images/"]);
        assert_eq!(check(&l, "http://h/images/a"), Ok(()));
        assert_eq!(check(&l, "http://h/images/"), Ok(()));
        assert_eq!(check(&l, "http://h/images2/a"), Err(Refusal::NotAllowed));
        assert_eq!(check(&l, "http://h/images"), Err(Refusal::NotAllowed));

        // A host-only prefix: every path.
        let l = list(&["http://h"]);
        assert_eq!(check(&l, "http://h/anything/at/all"), Ok(()));
        assert_eq!(check(&l, "http://h:80/x"), Ok(()));
    }

    #[test]
    fn dot_segments_are_resolved_first() {
        let l = list(&["http://h/images/"]);
        for href in [
            "http://h/images/../private/a",
            "http://h/images/%2e%2e/private/a",
            "http://h/images/.%2E/private/a",
            "http://h/images/a/../../private",
        ] {
            assert_eq!(check(&l, href), Err(Refusal::NotAllowed), "{href}");
        }
        assert_eq!(check(&l, "http://h/images/a/../b"), Ok(()));
        assert_eq!(check(&l, "http://h/x/../images/b"), Ok(()));
        // Encoded separators an origin might decode before resolving `..`.
        for href in [
            "http://h/images/..%2Fprivate/a",
            "http://h/images/..%2fprivate/a",
            "http://h/images/..%5Cprivate/a",
        ] {
            assert_eq!(check(&l, href), Err(Refusal::EncodedSeparator), "{href}");
        }
    }

    #[test]
    fn scheme_host_and_port_are_exact() {
        let l = list(&["https://Images.Example.org/v1"]);
        assert_eq!(check(&l, "https://images.example.org/v1/a"), Ok(()));
        assert_eq!(check(&l, "https://IMAGES.EXAMPLE.ORG:443/v1/a"), Ok(()));
        assert_eq!(
            check(&l, "http://images.example.org/v1/a"),
            Err(Refusal::NotAllowed)
        );
        assert_eq!(
            check(&l, "https://images.example.org:8443/v1/a"),
            Err(Refusal::NotAllowed)
        );
        assert_eq!(
            check(&l, "https://images.example.org.evil.com/v1/a"),
            Err(Refusal::NotAllowed)
        );
        assert_eq!(
            check(&l, "https://evil.com/images.example.org/v1/a"),
            Err(Refusal::NotAllowed)
        );
        assert_eq!(
            check(&l, "https://sub.images.example.org/v1/a"),
            Err(Refusal::NotAllowed)
        );
        // Hosts compare as parsed: an IPv4 in another notation is the same address.
        let l = list(&["http://127.0.0.1:8080/"]);
        assert_eq!(check(&l, "http://2130706433:8080/a"), Ok(()));
        assert_eq!(
            check(&l, "http://localhost:8080/a"),
            Err(Refusal::NotAllowed)
        );
        let l = list(&["http://[::1]:8080/"]);
        assert_eq!(check(&l, "http://[0:0::1]:8080/a"), Ok(()));
        assert_eq!(
            check(&l, "http://127.0.0.1:8080/a"),
            Err(Refusal::NotAllowed)
        );
    }

    #[test]
    fn several_prefixes_and_an_empty_list() {
        let l = list(&["http://a/x", "", "  ", "https://b/"]);
        assert_eq!(l.prefixes().count(), 2);
        assert_eq!(check(&l, "http://a/x/1"), Ok(()));
        assert_eq!(check(&l, "https://b/anything"), Ok(()));
        assert_eq!(check(&l, "http://b/anything"), Err(Refusal::NotAllowed));
        let none = list(&[]);
        assert!(none.is_empty());
        assert_eq!(check(&none, "http://a/x/1"), Err(Refusal::NotAllowed));
    }

    #[test]
    fn file_prefixes_compare_paths_on_segment_boundaries() {
        let l = list(&["file:///srv/images"]);
        assert_eq!(check(&l, "file:///srv/images/a.img"), Ok(()));
        assert_eq!(check(&l, "file://localhost/srv/images/a.img"), Ok(()));
        assert_eq!(
            check(&l, "file:///srv/images2/a.img"),
            Err(Refusal::NotAllowed)
        );
        assert_eq!(
            check(&l, "file:///srv/images/../secret"),
            Err(Refusal::NotAllowed)
        );
        assert_eq!(check(&l, "file:///etc/passwd"), Err(Refusal::NotAllowed));
        assert_eq!(check(&l, "http:///srv/images/a"), Err(Refusal::NotAllowed));
        let l = list(&["file:///srv/images/"]);
        assert_eq!(check(&l, "file:///srv/images/a.img"), Ok(()));
        assert_eq!(check(&l, "file:///srv/images"), Err(Refusal::NotAllowed));
    }

    #[test]
    fn bad_prefixes_are_errors_naming_them() {
        for bad in [
            "not a url",
            "/srv/images",
            "ftp://h/x",
            "http://u:p@h/x",
            "http://h/x?y=1",
            "http://h/x#f",
            "http://h:99999/x",
            "http://h/a%2Fb",
        ] {
            let e = AllowList::new(["http://ok/", bad]).unwrap_err();
            assert_eq!(e.prefix, bad);
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
    }
}
