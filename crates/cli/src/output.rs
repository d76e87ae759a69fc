//! Output: tables and key/value lines for people, JSON for programs. Everything goes to stdout;
//! progress and errors go to stderr.

use std::io::{self, IsTerminal, Write};
use std::time::{Duration, UNIX_EPOCH};

use comfy_table::{Cell, CellAlignment, ContentArrangement, Table, presets};
use imgcache_store::{Record, Timestamp};
use serde::Serialize;

use crate::config::format_size;

/// A record with Glance's field names (times in epoch seconds, as Glance reports them), plus
/// the checksum as `algo:hex`.
#[derive(Debug, Serialize)]
pub struct RecordJson {
    pub image_id: String,
    pub hits: u64,
    pub last_accessed: Timestamp,
    pub last_modified: Timestamp,
    pub size: u64,
    pub checksum: Option<String>,
    /// The URL a `/v1/fetch` or `fetch` entry came from (its id is a uuid5 of it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub href: Option<String>,
}

impl From<&Record> for RecordJson {
    fn from(r: &Record) -> Self {
        RecordJson {
            image_id: r.image_id.clone(),
            hits: r.hits,
            last_accessed: r.last_accessed,
            last_modified: r.last_modified,
            size: r.size,
            checksum: r.checksum.as_ref().map(ToString::to_string),
            href: href(r),
        }
    }
}

/// The href an entry was fetched from, when it is not its id itself (a Glance image).
pub fn href(r: &Record) -> Option<String> {
    imgcache_fetch::ImageMeta::from_props(&r.props)
        .href
        .filter(|h| h != &r.image_id)
}

/// Prints a value as pretty JSON and a newline.
pub fn json<T: Serialize + ?Sized>(value: &T) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

/// Prints text as is.
pub fn text(s: impl AsRef<str>) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    out.write_all(s.as_ref().as_bytes())?;
    if !s.as_ref().ends_with('\n') {
        writeln!(out)?;
    }
    Ok(())
}

/// `label  value` lines with the values aligned.
pub fn pairs(rows: &[(&str, String)]) -> String {
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(k, v)| format!("{k:<width$}  {v}\n"))
        .collect()
}

/// Epoch seconds as RFC 3339 UTC, to the second.
pub fn time(t: Timestamp) -> String {
    if !t.is_finite() || t < 0.0 {
        return "-".into();
    }
    let at = UNIX_EPOCH + Duration::from_secs_f64(t);
    humantime::format_rfc3339_seconds(at).to_string()
}

/// A checksum shortened for a table cell: `sha256:0123456789ab…`.
fn short_checksum(c: &str) -> String {
    match c.split_once(':') {
        Some((algo, hex)) if hex.len() > 12 => format!("{algo}:{}…", &hex[..12]),
        _ => c.to_string(),
    }
}

pub fn records_table(records: &[Record]) -> String {
    let mut t = Table::new();
    t.load_style(presets::UTF8_FULL_CONDENSED.with_rounded_corners());
    if io::stdout().is_terminal() {
        t.set_content_arrangement(ContentArrangement::Dynamic);
    }
    t.set_header([
        "Image ID",
        "Size",
        "Hits",
        "Last accessed (UTC)",
        "Last modified (UTC)",
        "Checksum",
        "Href",
    ]);
    for r in records {
        t.add_row([
            Cell::new(&r.image_id),
            Cell::new(format_size(r.size)).set_alignment(CellAlignment::Right),
            Cell::new(r.hits).set_alignment(CellAlignment::Right),
            Cell::new(time(r.last_accessed)),
            Cell::new(time(r.last_modified)),
            Cell::new(
                r.checksum
                    .as_ref()
                    .map_or("-".to_string(), |c| short_checksum(&c.to_string())),
            ),
            Cell::new(href(r).unwrap_or_else(|| "-".into())),
        ]);
    }
    format!("{t}\n")
}

/// Comma-separated list, or `none`.
pub fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}

/// `1 image` / `2 images`.
pub fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers() {
        assert_eq!(time(0.0), "1970-01-01T00:00:00Z");
        assert_eq!(time(1_700_000_000.9), "2023-11-14T22:13:20Z");
        assert_eq!(time(f64::NAN), "-");
        assert_eq!(
            short_checksum("sha256:0123456789abcdef0123"),
            "sha256:0123456789ab…"
        );
        assert_eq!(count(1, "image", "images"), "1 image");
        assert_eq!(count(0, "image", "images"), "0 images");
        assert_eq!(
            pairs(&[("a", "1".into()), ("bbb", "2".into())]),
            "a    1\nbbb  2\n"
        );
        assert_eq!(list_or_none(&[]), "none");
    }
}
