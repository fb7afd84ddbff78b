//! The PostgreSQL backend's foundation: reading `--database`, the connection pool (TLS by
//! rustls on ring) and the schema migrations under `sql/postgres/`.
//!
//! tokio-postgres is async end to end: queries run on the worker's runtime, pipelined on
//! one connection when a request makes several, with no blocking pool in between.

mod accounts;
mod capabilities;
mod changes;
mod import;
mod jwt_keys;
mod leases;
mod payments;
mod ratelimit;
mod store;
pub mod tls;
pub mod url;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres_rustls::MakeRustlsConnect;

pub use changes::HeadReads;
pub use import::{import_sqlite, Copied};
pub use jwt_keys::JwtKeyRow;
pub use leases::{ChangeFeed, RENEW_EVERY, TRUSTED_FOR};
pub use ratelimit::PgRateStore;
pub use store::PgStore;
pub use url::{is_postgres, DatabaseUrl, Verify};

use super::StoreError;

/// `(version, name, sql)`, in order. Never edit a released migration; add a new one.
pub const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "postgres/001_init.sql",
        include_str!("../../../sql/postgres/001_init.sql"),
    ),
    (
        2,
        "postgres/002_cache_leases.sql",
        include_str!("../../../sql/postgres/002_cache_leases.sql"),
    ),
    (
        3,
        "postgres/003_sealing_keys_held.sql",
        include_str!("../../../sql/postgres/003_sealing_keys_held.sql"),
    ),
    (
        4,
        "postgres/004_payments_checked_per_batch.sql",
        include_str!("../../../sql/postgres/004_payments_checked_per_batch.sql"),
    ),
];

/// The advisory lock nodes take to migrate one at a time (any constant of paygate's own).
const MIGRATION_LOCK: i64 = 0x7061_7967_6174_6501;

/// A pool of up to `size` connections to `url`. Connects once, so that a wrong address,
/// password or certificate is reported at start, and brings the schema up to date.
pub async fn open_pool(url: &DatabaseUrl, size: usize) -> Result<Pool, StoreError> {
    let shown = url.describe();
    let tls = tls::client_config(&url.verify).map_err(StoreError::Startup)?;
    let manager = Manager::from_config(
        url.config.clone(),
        MakeRustlsConnect::new(tls),
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let pool = Pool::builder(manager)
        .max_size(size.max(1))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .create_timeout(Some(std::time::Duration::from_secs(5)))
        .wait_timeout(Some(std::time::Duration::from_secs(5)))
        .build()
        .map_err(|e| StoreError::Startup(format!("database {shown}: {e}")))?;
    let mut client = pool.get().await.map_err(|e| {
        let cause = match &e {
            deadpool_postgres::PoolError::Backend(e) => error_text(e),
            other => other.to_string(),
        };
        StoreError::Startup(format!("cannot connect to {shown}: {cause}"))
    })?;
    migrate(&mut client, &shown).await?;
    if url.unverified_remote() {
        log::warn!(
            "database {shown}: the server's certificate is not checked against its name; \
             use sslmode=verify-full with sslrootcert= so that nobody else can answer"
        );
    }
    Ok(pool)
}

/// Applies the migrations the database lacks, in one transaction under an advisory lock,
/// so that nodes starting together apply each exactly once. A database that records a
/// version this binary does not know was written by a newer paygate: refused.
pub async fn migrate(client: &mut tokio_postgres::Client, shown: &str) -> Result<(), StoreError> {
    let failed = |what: &str, e: tokio_postgres::Error| {
        StoreError::Startup(format!("database {shown}: {what}: {}", error_text(&e)))
    };
    let tx = client
        .transaction()
        .await
        .map_err(|e| failed("cannot start a transaction", e))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(|e| failed("cannot take the migration lock", e))?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version    bigint PRIMARY KEY,
             name       text   NOT NULL,
             applied_at bigint NOT NULL
         )",
    )
    .await
    .map_err(|e| failed("cannot create schema_migrations", e))?;
    let current: i64 = tx
        .query_one(
            "SELECT coalesce(max(version), 0)::bigint FROM schema_migrations",
            &[],
        )
        .await
        .map_err(|e| failed("cannot read schema_migrations", e))?
        .get(0);
    let latest = MIGRATIONS.last().map_or(0, |m| m.0);
    if current > latest {
        return Err(StoreError::Startup(format!(
            "database {shown} has schema version {current}, but this paygate only knows \
             versions up to {latest}: it was written by a newer paygate. Run that version, \
             or restore a backup."
        )));
    }
    for (version, name, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
        tx.batch_execute(sql)
            .await
            .map_err(|e| failed(&format!("migration {name} failed"), e))?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
            &[version, name, &crate::time::now_millis()],
        )
        .await
        .map_err(|e| failed("cannot record a migration", e))?;
        log::info!("database {shown}: applied migration {name}");
    }
    tx.commit()
        .await
        .map_err(|e| failed("cannot commit the migrations", e))
}

/// A database error with the server's own message when there is one (tokio-postgres's
/// `Display` says only "db error") and the causes under it (a TLS handshake's reason).
pub fn error_text(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} ({})", db.message(), db.code().code());
    }
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
}
