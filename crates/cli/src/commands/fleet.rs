//! `imgcache fleet nodes` and `imgcache fleet holders ID`: the fleet index as the CLI reads it,
//! the same answers `GET /v2/cache/nodes/{id}` and the status page give. The command reads
//! the index without joining it: it is no node and never appears as one.

use anyhow::{Context, Result, bail};
use imgcache_fleet::{Fleet, FleetConfig, HoldingState};
use serde::Serialize;

use super::Ctx;
use crate::cli::FleetCommand;
use crate::config::format_size;
use crate::output;

pub fn fleet(ctx: &Ctx, what: FleetCommand) -> Result<()> {
    let s = &ctx.settings;
    let Some(db) = s.fleet_db.clone() else {
        bail!(
            "fleet mode is off: no fleet database (pass --fleet-db URL or set {})",
            crate::settings::env_of("fleet_db")
        );
    };
    let mut cfg = FleetConfig::new(db, String::new());
    cfg.heartbeat_timeout = s.heartbeat_timeout;
    // A command may wait longer than a request: it runs once, by hand or from a script.
    cfg.call_timeout = std::time::Duration::from_secs(5);
    super::provision::runtime()?.block_on(async move {
        let fleet = Fleet::observe(cfg)
            .await
            .context("reading the fleet database")?;
        match what {
            FleetCommand::Nodes => nodes(ctx, &fleet).await,
            FleetCommand::Holders { id } => holders(ctx, &fleet, &id).await,
        }
    })
}

#[derive(Serialize)]
struct NodeJson {
    url: String,
    heartbeat_age_seconds: f64,
    published: u64,
    published_bytes: u64,
    filling: u64,
}

async fn nodes(ctx: &Ctx, fleet: &Fleet) -> Result<()> {
    let rows: Vec<NodeJson> = fleet
        .node_holdings()
        .await?
        .into_iter()
        .map(|n| NodeJson {
            url: n.node.url,
            heartbeat_age_seconds: n.node.heartbeat_age,
            published: n.published,
            published_bytes: n.published_bytes,
            filling: n.filling,
        })
        .collect();
    if ctx.json {
        return output::json(&rows);
    }
    if rows.is_empty() {
        return output::text("no live nodes");
    }
    let lines: Vec<String> = rows
        .iter()
        .map(|n| {
            format!(
                "{}  heartbeat {:.1}s ago  holds {} ({})  filling {}",
                n.url,
                n.heartbeat_age_seconds,
                output::count(n.published as usize, "image", "images"),
                format_size(n.published_bytes),
                n.filling
            )
        })
        .collect();
    output::text(lines.join("\n"))
}

#[derive(Serialize)]
struct HolderJson {
    node: String,
    state: &'static str,
    bytes: u64,
    size: Option<u64>,
    checksum: Option<String>,
}

async fn holders(ctx: &Ctx, fleet: &Fleet, id: &str) -> Result<()> {
    let key = super::parse_key(id)?;
    let rows: Vec<HolderJson> = fleet
        .holders(key.as_str())
        .await?
        .into_iter()
        .map(|h| HolderJson {
            node: h.node,
            state: match h.state {
                HoldingState::Published => "published",
                HoldingState::Filling => "filling",
            },
            bytes: h.bytes,
            size: h.size,
            checksum: h.checksum,
        })
        .collect();
    if ctx.json {
        return output::json(&rows);
    }
    if rows.is_empty() {
        return output::text(format!("no live node holds {key}"));
    }
    let lines: Vec<String> = rows
        .iter()
        .map(|h| match (h.state, h.size) {
            ("filling", Some(size)) => format!(
                "{}  filling  {} of {}",
                h.node,
                format_size(h.bytes),
                format_size(size)
            ),
            ("filling", None) => format!("{}  filling  {}", h.node, format_size(h.bytes)),
            _ => format!(
                "{}  published  {}  {}",
                h.node,
                format_size(h.bytes),
                h.checksum.as_deref().unwrap_or("-")
            ),
        })
        .collect();
    output::text(lines.join("\n"))
}
