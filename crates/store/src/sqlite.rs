//! SQLite driver: records in `<root>/.imgcache.sqlite` (WAL).
//!
//! Hits (the hot path) commit with `synchronous=NORMAL`: no fsync, so a power loss can lose the
//! last few hit counts and access times, nothing else. A publish's record commits with
//! `synchronous=FULL` before the rename that publishes the file, so a published file always has
//! a durable record. The running total of bytes is kept by triggers, so `total_size` is one row
//! read instead of a SUM over the table.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Row, params};

use crate::driver::Driver;
use crate::error::{Result, StoreError};
use crate::integrity::Integrity;
use crate::key::Key;
use crate::record::{LruEntry, Record, Timestamp};

/// Schema migrations, applied in order; `PRAGMA user_version` holds how many have run.
const MIGRATIONS: &[&str] = &[
    // 1: images, the LRU index, running totals kept by triggers.
    r#"
    CREATE TABLE images (
        image_id      TEXT PRIMARY KEY NOT NULL,
        size          INTEGER NOT NULL,
        checksum      TEXT,
        hits          INTEGER NOT NULL DEFAULT 0,
        last_modified REAL NOT NULL,
        last_accessed REAL NOT NULL,
        props         TEXT NOT NULL DEFAULT '{}'
    ) WITHOUT ROWID;
    CREATE INDEX images_lru ON images (last_accessed, image_id);
    CREATE TABLE totals (
        id      INTEGER PRIMARY KEY CHECK (id = 0),
        bytes   INTEGER NOT NULL,
        entries INTEGER NOT NULL
    );
    INSERT INTO totals (id, bytes, entries) VALUES (0, 0, 0);
    CREATE TRIGGER images_ins AFTER INSERT ON images BEGIN
        UPDATE totals SET bytes = bytes + NEW.size, entries = entries + 1 WHERE id = 0;
    END;
    CREATE TRIGGER images_del AFTER DELETE ON images BEGIN
        UPDATE totals SET bytes = bytes - OLD.size, entries = entries - 1 WHERE id = 0;
    END;
    CREATE TRIGGER images_upd AFTER UPDATE OF size ON images BEGIN
        UPDATE totals SET bytes = bytes - OLD.size + NEW.size WHERE id = 0;
    END;
    "#,
];

pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

#[derive(Clone, Debug)]
pub struct SqliteOptions {
    /// How long to wait for another process's write transaction before failing.
    pub busy_timeout: Duration,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            busy_timeout: Duration::from_secs(10),
        }
    }
}

pub struct SqliteDriver {
    path: PathBuf,
    conn: Mutex<Connection>,
}

const COLUMNS: &str = "image_id, size, checksum, hits, last_modified, last_accessed, props";

impl SqliteDriver {
    /// Opens (creating and migrating) the database. Any failure here — a corrupt file, a file
    /// that is not SQLite, a lock held too long — is a bad driver configuration naming the path.
    pub fn open(path: &Path, opts: &SqliteOptions) -> Result<Self> {
        let bad = |reason: String| StoreError::BadDriverConfiguration {
            driver: "sqlite",
            reason: format!("{}: {reason}", path.display()),
        };
        let mut conn = Connection::open(path).map_err(|e| bad(e.to_string()))?;
        conn.busy_timeout(opts.busy_timeout)
            .map_err(|e| bad(e.to_string()))?;
        // journal_mode is the first statement that reads the file: corruption shows here.
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(|e| bad(e.to_string()))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(bad(format!("cannot switch to WAL journal (got {mode})")));
        }
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(|e| bad(e.to_string()))?;
        // Short-lived CLI processes (one per deploy) would otherwise checkpoint and delete the
        // WAL on every exit, and the next one recreate it: four fsyncs for one hit. The WAL is
        // checkpointed by size (wal_autocheckpoint) instead.
        conn.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
            true,
        )
        .map_err(|e| bad(e.to_string()))?;
        migrate(&mut conn, path)?;
        // A cheap integrity probe: a damaged page in the table or index fails here, not later.
        let check: String = conn
            .query_row("PRAGMA quick_check(1)", [], |r| r.get(0))
            .map_err(|e| bad(e.to_string()))?;
        if check != "ok" {
            return Err(bad(format!("integrity check failed: {check}")));
        }
        Ok(SqliteDriver {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the connection leaves it usable (SQLite rolled back).
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn db<T>(&self, r: rusqlite::Result<T>) -> Result<T> {
        r.map_err(|source| StoreError::Database {
            path: self.path.clone(),
            source,
        })
    }
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<()> {
    let db = |source| StoreError::Database {
        path: path.to_path_buf(),
        source,
    };
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(|e| StoreError::BadDriverConfiguration {
            driver: "sqlite",
            reason: format!("{}: {e}", path.display()),
        })?;
    let version: i64 = tx
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(db)?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            path: path.to_path_buf(),
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.execute_batch(sql).map_err(db)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)
            .map_err(db)?;
    }
    tx.commit().map_err(db)
}

fn row_to_record(r: &Row<'_>) -> rusqlite::Result<Record> {
    let checksum: Option<String> = r.get(2)?;
    let props: String = r.get(6)?;
    Ok(Record {
        image_id: r.get(0)?,
        size: r.get::<_, i64>(1)? as u64,
        checksum: checksum.and_then(|c| c.parse::<Integrity>().ok()),
        hits: r.get::<_, i64>(3)? as u64,
        last_modified: r.get(4)?,
        last_accessed: r.get(5)?,
        props: serde_json::from_str::<BTreeMap<String, String>>(&props).unwrap_or_default(),
    })
}

impl Driver for SqliteDriver {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    fn insert(&self, rec: &Record, _staged: &File) -> Result<()> {
        let props = serde_json::to_string(&rec.props).expect("string map serialises");
        let conn = self.conn();
        // This commit must be durable before the file is renamed into place (see module docs).
        self.db(conn.pragma_update(None, "synchronous", "FULL"))?;
        // An upsert, not INSERT OR REPLACE: REPLACE would skip the delete trigger and skew totals.
        let r = conn.execute(
            &format!(
                "INSERT INTO images ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (image_id) DO UPDATE SET size = excluded.size,
                   checksum = excluded.checksum, hits = excluded.hits,
                   last_modified = excluded.last_modified,
                   last_accessed = excluded.last_accessed, props = excluded.props"
            ),
            params![
                rec.image_id,
                rec.size as i64,
                rec.checksum.as_ref().map(|c| c.to_string()),
                rec.hits as i64,
                rec.last_modified,
                rec.last_accessed,
                props
            ],
        );
        let restored = conn.pragma_update(None, "synchronous", "NORMAL");
        self.db(r)?;
        self.db(restored)
    }

    fn get(&self, key: &Key) -> Result<Option<Record>> {
        let r = self
            .conn()
            .prepare_cached(&format!("SELECT {COLUMNS} FROM images WHERE image_id = ?1"))
            .and_then(|mut s| s.query_row([key.as_str()], row_to_record).optional());
        self.db(r)
    }

    fn list(&self) -> Result<Vec<Record>> {
        let r = self
            .conn()
            .prepare_cached(&format!("SELECT {COLUMNS} FROM images ORDER BY image_id"))
            .and_then(|mut s| s.query_map([], row_to_record)?.collect());
        self.db(r)
    }

    fn remove(&self, key: &Key) -> Result<bool> {
        let r = self
            .conn()
            .execute("DELETE FROM images WHERE image_id = ?1", [key.as_str()]);
        self.db(r).map(|n| n > 0)
    }

    fn remove_many(&self, keys: &[Key]) -> Result<()> {
        // One transaction: one WAL commit for a whole eviction walk, not one per image.
        let mut conn = self.conn();
        let r = (|| {
            let tx = conn.transaction()?;
            {
                let mut stmt = tx.prepare_cached("DELETE FROM images WHERE image_id = ?1")?;
                for k in keys {
                    stmt.execute([k.as_str()])?;
                }
            }
            tx.commit()
        })();
        self.db(r)
    }

    fn record_hit(&self, key: &Key, _file: &File, at: Timestamp) -> Result<Option<Record>> {
        let r = self
            .conn()
            .prepare_cached(&format!(
                "UPDATE images SET hits = hits + 1, last_accessed = ?2 WHERE image_id = ?1
                 RETURNING {COLUMNS}"
            ))
            .and_then(|mut s| {
                s.query_row(params![key.as_str(), at], row_to_record)
                    .optional()
            });
        self.db(r)
    }

    fn lru_page(&self, after: Option<&LruEntry>, limit: usize) -> Result<Vec<LruEntry>> {
        let map = |r: &Row<'_>| {
            Ok(LruEntry {
                image_id: r.get(0)?,
                size: r.get::<_, i64>(1)? as u64,
                last_accessed: r.get(2)?,
            })
        };
        let conn = self.conn();
        let r = match after {
            None => conn
                .prepare_cached(
                    "SELECT image_id, size, last_accessed FROM images
                     ORDER BY last_accessed, image_id LIMIT ?1",
                )
                .and_then(|mut s| s.query_map([limit as i64], map)?.collect()),
            Some(a) => conn
                .prepare_cached(
                    "SELECT image_id, size, last_accessed FROM images
                     WHERE (last_accessed, image_id) > (?1, ?2)
                     ORDER BY last_accessed, image_id LIMIT ?3",
                )
                .and_then(|mut s| {
                    s.query_map(params![a.last_accessed, a.image_id, limit as i64], map)?
                        .collect()
                }),
        };
        self.db(r)
    }

    fn total_size(&self) -> Result<u64> {
        let r = self
            .conn()
            .query_row("SELECT bytes FROM totals WHERE id = 0", [], |r| {
                r.get::<_, i64>(0)
            });
        self.db(r).map(|b| b.max(0) as u64)
    }

    fn set_prop(&self, key: &Key, _file: &File, name: &str, value: &str) -> Result<()> {
        let r = self.conn().execute(
            "UPDATE images SET props = json_set(props, '$.' || json_quote(?2), ?3)
             WHERE image_id = ?1",
            params![key.as_str(), name, value],
        );
        self.db(r).map(|_| ())
    }
}
