//! Schema migrations: the numbered files in `sql/`, embedded in the binary and applied in
//! order at start, each recorded in `schema_migrations`.
//!
//! Migrations run inside one `BEGIN IMMEDIATE` transaction, so processes starting together
//! on one data directory apply each migration exactly once. A database that records a
//! version this binary does not know was written by a newer paygate: refuse to touch it.

use rusqlite::{Connection, TransactionBehavior};

use super::StoreError;

/// `(version, name, sql)`, in order. Never edit a released migration; add a new one.
pub type Migrations = &'static [(i64, &'static str, &'static str)];

/// The main database: users, accounts, payments.
pub const MAIN: Migrations = &[
    (1, "001_init.sql", include_str!("../../sql/001_init.sql")),
    (
        2,
        "002_sessions_totp.sql",
        include_str!("../../sql/002_sessions_totp.sql"),
    ),
    (
        3,
        "003_capabilities.sql",
        include_str!("../../sql/003_capabilities.sql"),
    ),
    (
        4,
        "004_capability_roots.sql",
        include_str!("../../sql/004_capability_roots.sql"),
    ),
    (
        5,
        "005_changes.sql",
        include_str!("../../sql/005_changes.sql"),
    ),
];

/// The rate-limit database, kept apart so its frequent small writes never contend with
/// payments for SQLite's single write lock.
pub const RATELIMIT: Migrations = &[(
    1,
    "ratelimit_001_buckets.sql",
    include_str!("../../sql/ratelimit_001_buckets.sql"),
)];

/// The audit checkpoints (`audit/checkpoints.db`).
pub const AUDIT: Migrations = &[
    (
        1,
        "audit_001_checkpoints.sql",
        include_str!("../../sql/audit_001_checkpoints.sql"),
    ),
    (
        2,
        "audit_002_checkpoint_mac.sql",
        include_str!("../../sql/audit_002_checkpoint_mac.sql"),
    ),
];

/// The schema version this binary writes.
pub fn latest_version(migrations: Migrations) -> i64 {
    migrations.last().map_or(0, |m| m.0)
}

/// Brings the database up to the latest version of `migrations`.
pub fn migrate(
    conn: &mut Connection,
    db_name: &str,
    migrations: Migrations,
) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version    INTEGER PRIMARY KEY,
             name       TEXT    NOT NULL,
             applied_at INTEGER NOT NULL
         ) STRICT;",
    )?;
    let current: i64 = tx.query_row(
        "SELECT coalesce(max(version), 0) FROM schema_migrations",
        [],
        |r| r.get(0),
    )?;
    let latest = latest_version(migrations);
    if current > latest {
        return Err(StoreError::Startup(format!(
            "{db_name} has schema version {current}, but this paygate only knows versions up to \
             {latest}: it was written by a newer paygate. Run that version, or restore a backup."
        )));
    }
    for (version, name, sql) in migrations.iter().filter(|m| m.0 > current) {
        tx.execute_batch(sql)
            .map_err(|e| StoreError::Startup(format!("migration {name} failed: {e}")))?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?1, ?2, ?3)",
            rusqlite::params![version, name, crate::time::now_millis()],
        )?;
        log::info!("{db_name}: applied migration {name}");
    }
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_in_order_and_apply_once() {
        for migrations in [MAIN, RATELIMIT, AUDIT] {
            for (i, (version, name, _)) in migrations.iter().enumerate() {
                assert_eq!(*version, i as i64 + 1);
                assert!(name.contains(&format!("{version:03}_")), "{name}");
            }
            let mut conn = Connection::open_in_memory().unwrap();
            migrate(&mut conn, "test", migrations).unwrap();
            migrate(&mut conn, "test", migrations).unwrap();
            let applied: i64 = conn
                .query_row("SELECT count(*) FROM schema_migrations", [], |r| r.get(0))
                .unwrap();
            assert_eq!(applied, latest_version(migrations));
        }
    }

    #[test]
    fn a_newer_database_is_refused() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn, "test", MAIN).unwrap();
        conn.execute(
            "INSERT INTO schema_migrations VALUES (?1, 'future.sql', 0)",
            [latest_version(MAIN) + 1],
        )
        .unwrap();
        let err = migrate(&mut conn, "paygate.db", MAIN).unwrap_err();
        assert!(err.to_string().contains("newer paygate"), "{err}");
    }
}
