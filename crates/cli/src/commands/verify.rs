//! `imgcache verify [KEY...]`: re-hash cached images against their recorded checksums.

use anyhow::{Result, anyhow};
use imgcache_store::{Key, VerifyOutcome};
use serde::Serialize;

use super::Ctx;
use crate::output;

#[derive(Serialize)]
struct Checked {
    image_id: String,
    #[serde(flatten)]
    outcome: VerifyOutcome,
}

#[derive(Serialize)]
struct Verified {
    images: Vec<Checked>,
    checked: usize,
    ok: usize,
    mismatches: usize,
    no_checksum: usize,
    not_cached: usize,
}

pub fn verify(ctx: &Ctx, keys: &[String], quiet: bool) -> Result<()> {
    let cache = ctx.open()?;
    // The given keys (validated before any path is built), else every cached image.
    let targets: Vec<(Key, Option<u64>)> = if keys.is_empty() {
        cache
            .get_cached_images()?
            .into_iter()
            .map(|r| Ok((Key::new(&r.image_id)?, Some(r.size))))
            .collect::<Result<_>>()?
    } else {
        keys.iter()
            .map(|k| {
                let key = super::parse_key(k)?;
                let size = cache.get_image_size(&key)?;
                Ok((key, size))
            })
            .collect::<Result<_>>()?
    };
    let total: u64 = targets.iter().filter_map(|(_, s)| *s).sum();
    let bar = crate::progress::PhaseBar::new(quiet, ctx.json);
    bar.begin("verify", Some(total));
    let mut images = Vec::new();
    for (key, _) in &targets {
        let outcome = cache.verify(key, &mut |n| bar.inc(n))?;
        images.push(Checked {
            image_id: key.to_string(),
            outcome,
        });
    }
    bar.end();
    let count = |f: fn(&VerifyOutcome) -> bool| images.iter().filter(|c| f(&c.outcome)).count();
    let r = Verified {
        checked: images.len(),
        ok: count(|o| matches!(o, VerifyOutcome::Ok { .. })),
        mismatches: count(VerifyOutcome::is_mismatch),
        no_checksum: count(|o| matches!(o, VerifyOutcome::NoChecksum { .. })),
        not_cached: count(|o| matches!(o, VerifyOutcome::NotCached | VerifyOutcome::Replaced)),
        images,
    };
    if ctx.json {
        output::json(&r)?;
    } else {
        let mut s = String::new();
        for c in &r.images {
            let line = match &c.outcome {
                VerifyOutcome::Ok { checksum, .. } => format!("ok {}: {checksum}", c.image_id),
                VerifyOutcome::Mismatch {
                    expected,
                    expected_size,
                    actual,
                    actual_size,
                    moved_to,
                } => format!(
                    "MISMATCH {}: recorded {expected} ({expected_size} bytes), found {actual} \
                     ({actual_size} bytes); moved to {}",
                    c.image_id,
                    moved_to.display()
                ),
                VerifyOutcome::NoChecksum { .. } => {
                    format!("skipped {}: no recorded checksum", c.image_id)
                }
                VerifyOutcome::NotCached => format!("skipped {}: not cached", c.image_id),
                VerifyOutcome::Replaced => {
                    format!("skipped {}: replaced while it was verified", c.image_id)
                }
            };
            s += &line;
            s.push('\n');
        }
        s += &format!(
            "verified {}: {} ok, {} mismatched, {} without checksum, {} not cached\n",
            output::count(r.checked, "image", "images"),
            r.ok,
            r.mismatches,
            r.no_checksum,
            r.not_cached
        );
        output::text(s)?;
    }
    if r.mismatches > 0 {
        return Err(anyhow!(
            "{} not matching {} recorded checksum (moved to invalid/)",
            output::count(r.mismatches, "image", "images"),
            if r.mismatches == 1 { "its" } else { "their" }
        ));
    }
    if !keys.is_empty() && r.not_cached > 0 {
        let missing: Vec<&str> = r
            .images
            .iter()
            .filter(|c| matches!(c.outcome, VerifyOutcome::NotCached))
            .map(|c| c.image_id.as_str())
            .collect();
        if !missing.is_empty() {
            return Err(anyhow!("not cached: {}", missing.join(", ")));
        }
    }
    Ok(())
}
