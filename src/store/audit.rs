//! Audit checkpoints: `checkpoints.db` in the audit directory, one row per writer instance,
//! updated after every group commit. What a row means, and its MAC, are the audit layer's
//! business; this file only keeps the rows. Not in `paygate.db`: a write there after every audit
//! batch would make every worker's token cache (keyed on that file's data version) go
//! stale on every request.

use std::path::Path;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use super::{configure, migrate, Durability, StoreError};

/// File name of the checkpoint database inside the audit directory.
pub const CHECKPOINTS_DB: &str = "checkpoints.db";

/// One instance's checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub records: u64,
    pub head: [u8; 32],
    /// The audit layer's authentication of the row (HMAC under the audit key); `None` in
    /// rows written before checkpoints carried one.
    pub mac: Option<[u8; 32]>,
}

/// A connection to the checkpoint database (owned by one writer thread, or by `verify`).
pub struct Checkpoints {
    conn: Connection,
}

impl Checkpoints {
    /// Opens (creating if needed) the checkpoint database of `audit_dir`.
    pub fn open(audit_dir: &Path) -> Result<Checkpoints, StoreError> {
        let path = audit_dir.join(CHECKPOINTS_DB);
        super::private_database(&path)?;
        let mut conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        // NORMAL: a checkpoint may lag the log after a power cut (never lead it), which
        // verification accepts; it costs no fsync per batch.
        configure(&mut conn, Durability::Normal)?;
        conn.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))?;
        migrate::migrate(&mut conn, &path.display().to_string(), migrate::AUDIT)?;
        Ok(Checkpoints { conn })
    }

    /// Opens an existing checkpoint database read-only (for `audit verify`); `None` when
    /// there is none.
    pub fn open_existing(audit_dir: &Path) -> Result<Option<Checkpoints>, StoreError> {
        let path = audit_dir.join(CHECKPOINTS_DB);
        if !path.exists() {
            return Ok(None);
        }
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        Ok(Some(Checkpoints { conn }))
    }

    pub fn save(&self, instance: &str, checkpoint: &Checkpoint) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "INSERT INTO checkpoints (instance, records, head, updated_at, mac)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (instance)
                 DO UPDATE SET records = ?2, head = ?3, updated_at = ?4, mac = ?5",
            )?
            .execute(params![
                instance,
                i64::try_from(checkpoint.records).unwrap_or(i64::MAX),
                checkpoint.head,
                crate::time::now_millis(),
                checkpoint.mac
            ])?;
        Ok(())
    }

    /// Saves a checkpoint so that it survives a power cut (`synchronous=FULL` for this
    /// one commit): for the rare checkpoints the log's integrity leans on — the first one
    /// of a new chain, and one after a seal.
    pub fn save_durably(&self, instance: &str, checkpoint: &Checkpoint) -> Result<(), StoreError> {
        self.conn.execute_batch("PRAGMA synchronous = FULL")?;
        let saved = self.save(instance, checkpoint);
        self.conn.execute_batch("PRAGMA synchronous = NORMAL")?;
        saved
    }

    pub fn load(&self, instance: &str) -> Result<Option<Checkpoint>, StoreError> {
        let row = self
            .conn
            .query_row(
                "SELECT records, head, mac FROM checkpoints WHERE instance = ?1",
                [instance],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, Vec<u8>>(1)?,
                        r.get::<_, Option<Vec<u8>>>(2)?,
                    ))
                },
            )
            .optional()?;
        row.map(|(records, head, mac)| {
            let corrupt = || StoreError::Corrupt(format!("checkpoint of {instance}"));
            let head: [u8; 32] = head.try_into().map_err(|_| corrupt())?;
            let mac = mac
                .map(|m| <[u8; 32]>::try_from(m).map_err(|_| corrupt()))
                .transpose()?;
            Ok(Checkpoint {
                records: u64::try_from(records).unwrap_or(0),
                head,
                mac,
            })
        })
        .transpose()
    }

    /// Every instance that has a checkpoint.
    pub fn instances(&self) -> Result<Vec<String>, StoreError> {
        let mut statement = self
            .conn
            .prepare("SELECT instance FROM checkpoints ORDER BY instance")?;
        let rows = statement.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}
