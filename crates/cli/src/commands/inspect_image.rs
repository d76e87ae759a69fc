//! `imgcache inspect FILE`: what a disk image is, read from its bytes, and every safety verdict.
//!
//! Exit status 0 when the image is safe, 1 when it is refused (the reason on stderr as one
//! line, after the report on stdout).

use std::path::Path;

use anyhow::{Result, anyhow};
use imgcache_fetch::convert::conversion_space;
use imgcache_formats::{Detected, DiskFormat, report_file};
use serde::Serialize;
use serde_json::Value;

use super::Ctx;
use crate::config::format_size;
use crate::output;

#[derive(Serialize)]
struct Report<'a> {
    file: &'a Path,
    declared: Option<DiskFormat>,
    #[serde(flatten)]
    detected: &'a Detected,
    /// Bytes a conversion to raw would write (0 when the format is used as it is).
    conversion_space: u64,
}

#[derive(Serialize)]
struct Unreadable<'a> {
    file: &'a Path,
    declared: Option<DiskFormat>,
    format: Option<&'static str>,
    safe: bool,
    reason: &'static str,
    message: String,
}

pub fn inspect(ctx: &Ctx, file: &Path, format: Option<&str>) -> Result<()> {
    let declared = format.map(str::parse::<DiskFormat>).transpose()?;
    let detected = match report_file(file, declared.and_then(DiskFormat::expected)) {
        Ok(d) => d,
        Err(e) => {
            // No single format can be told (ambiguous or truncated headers, a declared format
            // the content rules out) or the file cannot be read: refused, with the reason.
            if ctx.json {
                output::json(&Unreadable {
                    file,
                    declared,
                    format: None,
                    safe: false,
                    reason: e.reason(),
                    message: e.to_string(),
                })?;
            } else {
                output::text(output::pairs(&[
                    ("file", file.display().to_string()),
                    ("format", "-".into()),
                    ("safe", format!("no ({})", e.reason())),
                ]))?;
            }
            return Err(anyhow!("{}: {e}", file.display()));
        }
    };
    let report = Report {
        file,
        declared,
        detected: &detected,
        conversion_space: conversion_space(&detected),
    };
    if ctx.json {
        output::json(&report)?;
    } else {
        output::text(text(&report))?;
    }
    match detected.refusal() {
        Some(e) => Err(anyhow!("{}: {e}", file.display())),
        None => Ok(()),
    }
}

fn text(r: &Report<'_>) -> String {
    let d = r.detected;
    let size = |n: u64| format!("{} ({n} bytes)", format_size(n));
    let mut rows = vec![
        ("file", r.file.display().to_string()),
        ("format", d.format.to_string()),
        ("virtual size", d.virtual_size.map_or("-".into(), size)),
        ("image size", size(d.image_size)),
        ("safe", if d.safe { "yes" } else { "no" }.into()),
    ];
    if let Some(declared) = r.declared {
        rows.insert(2, ("declared", declared.to_string()));
    }
    let mut out = output::pairs(&rows);
    let facts = fact_lines(&serde_json::to_value(&d.facts).unwrap_or(Value::Null));
    if !facts.is_empty() {
        out += "facts:\n";
        for (k, v) in facts {
            out += &format!("  {k}: {v}\n");
        }
    }
    out += "checks:\n";
    if d.checks.is_empty() {
        out += "  (none for this format)\n";
    }
    for c in &d.checks {
        match &c.result {
            Ok(()) => out += &format!("  ok    {}\n", c.name),
            Err(e) => out += &format!("  FAIL  {}: {e}\n", c.name),
        }
    }
    out
}

/// The facts object's fields as `key: value` lines (the enum's tag is the format, shown above).
fn fact_lines(v: &Value) -> Vec<(String, String)> {
    let inner = match v {
        Value::Object(m) if m.len() == 1 => m.values().next().cloned().unwrap_or(Value::Null),
        other => other.clone(),
    };
    match inner {
        Value::Object(m) => m
            .into_iter()
            .map(|(k, v)| {
                let shown = match v {
                    Value::String(s) => s,
                    Value::Null => "-".into(),
                    other => other.to_string(),
                };
                (k, shown)
            })
            .collect(),
        _ => Vec::new(),
    }
}
