//! All persistent state, behind one narrow type: [`Store`].
//!
//! Filters and handlers call async methods with plain Rust types and never see SQLite, so a
//! second backend can replace this module without touching them. Underneath: rusqlite
//! (bundled SQLite) with an r2d2 pool, WAL journal, `synchronous=FULL` (a committed payment
//! survives power loss), `BEGIN IMMEDIATE` for every write transaction, and a busy handler
//! that retries quickly instead of SQLite's default 1–100 ms sleeps.
//!
//! SQLite calls block, so every method runs its work on tokio's blocking pool; nothing here
//! ever blocks the reactor.

mod accounts;
mod audit;
mod backend;
mod capabilities;
mod commits;
mod data_version;
mod idempotency;
mod migrate;
mod payments;
pub mod postgres;
mod ratelimit;
pub mod sealing;
mod sessions;
mod sweep;
mod totp;
mod users;

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use crate::time::Clock;

pub use accounts::{Account, MemberRemoval, MemberUpsert, Membership, Refusal};
pub use audit::{Checkpoint, Checkpoints, CHECKPOINTS_DB};
pub use backend::{PaymentAnswer, RateStore, Store};
pub use capabilities::{
    Capability, CapabilityInsert, CapabilityState, NewCapability, MAX_DERIVATION_DEPTH,
    MAX_PER_ROOT,
};
pub use data_version::{Change, ChangesSince, DataVersion};
pub use idempotency::{EarlierUse, KeyedRequest, StoredResponse};
pub use payments::{CancelOutcome, Payment, PaymentCreation, PaymentStatus};
pub use ratelimit::SqliteRateStore;
pub use sessions::{SessionRow, Subject};
pub use totp::TotpState;
pub use users::{NewUser, User, UserInsert};

/// File name of the main database inside the data directory.
pub const MAIN_DB: &str = "paygate.db";

/// Why a storage call failed. Client mistakes never show up here: those are answered before
/// the store is asked, or reported as outcomes (e.g. [`UserInsert::UsernameTaken`]).
#[derive(Debug)]
pub enum StoreError {
    /// Every connection stayed busy past the pool timeout, or SQLite's lock stayed taken past
    /// the busy handler's patience: overload, worth a retry.
    Busy,
    /// SQLite reported an error.
    Sqlite(rusqlite::Error),
    /// The blocking task running the query panicked or was cancelled.
    TaskFailed,
    /// A group commit failed (the batch's writes did not happen); the cause is for the log.
    CommitFailed(String),
    /// The data directory or database cannot be used; the message says how to fix it.
    Startup(String),
    /// A row holds a value paygate never writes (hand-edited or corrupt database).
    Corrupt(String),
    /// The database server could not be reached, or the connection broke: fail fast, and
    /// retry later. The message is for the log.
    Unreachable(String),
    /// The database server refused a statement (a bug, or a schema changed by hand).
    Database(String),
}

impl StoreError {
    /// The same error for another caller (one answer shared by several): the kinds that
    /// decide the HTTP answer kept, the rest as their message.
    pub fn duplicate(&self) -> StoreError {
        match self {
            StoreError::Busy => StoreError::Busy,
            StoreError::TaskFailed => StoreError::TaskFailed,
            StoreError::CommitFailed(m) => StoreError::CommitFailed(m.clone()),
            StoreError::Startup(m) => StoreError::Startup(m.clone()),
            StoreError::Corrupt(m) => StoreError::Corrupt(m.clone()),
            StoreError::Unreachable(m) => StoreError::Unreachable(m.clone()),
            StoreError::Database(m) => StoreError::Database(m.clone()),
            StoreError::Sqlite(e) => StoreError::Database(e.to_string()),
        }
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Busy => f.write_str("database busy"),
            StoreError::Sqlite(e) => write!(f, "SQLite: {e}"),
            StoreError::TaskFailed => f.write_str("database task failed"),
            StoreError::CommitFailed(cause) => write!(f, "commit failed: {cause}"),
            StoreError::Startup(msg) => f.write_str(msg),
            StoreError::Corrupt(msg) => write!(f, "corrupt row: {msg}"),
            StoreError::Unreachable(msg) => write!(f, "database unreachable: {msg}"),
            StoreError::Database(msg) => write!(f, "database error: {msg}"),
        }
    }
}

impl std::error::Error for StoreError {}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
                StoreError::Busy
            }
            _ => StoreError::Sqlite(e),
        }
    }
}

/// SQLite's busy handler: called while another connection holds the write lock. SQLite's
/// default sleeps 1–100 ms between attempts, which lets one writer starve another for
/// seconds; write transactions here last microseconds, so poll often and give up after about
/// five seconds (the caller then answers 503).
fn retry_busy(attempt: i32) -> bool {
    let pause_us = match attempt {
        0..=9 => 50,
        10..=99 => 500,
        _ => 2000,
    };
    std::thread::sleep(Duration::from_micros(pause_us));
    attempt < 2600
}

/// How hard a database syncs its commits.
#[derive(Debug, Clone, Copy)]
enum Durability {
    /// `synchronous=FULL`: a commit survives power loss. For payments.
    Full,
    /// `synchronous=NORMAL`: a commit survives a process crash; power loss may undo the
    /// last few. For rate-limit buckets, where that only forgives a few requests.
    Normal,
}

/// Per-connection settings, applied to every pooled connection.
fn configure(conn: &mut Connection, durability: Durability) -> rusqlite::Result<()> {
    conn.busy_handler(Some(retry_busy))?;
    conn.execute_batch(match durability {
        Durability::Full => "PRAGMA foreign_keys = ON; PRAGMA synchronous = FULL;",
        Durability::Normal => "PRAGMA foreign_keys = ON; PRAGMA synchronous = NORMAL;",
    })
}

/// Makes sure a database file (and its `-wal` and `-shm` files, which SQLite creates with
/// the database's mode) is private: created 0600 before SQLite sees it, refused when an
/// existing one is open to group or others.
pub(crate) fn private_database(path: &Path) -> Result<(), StoreError> {
    crate::secret_file::create_private_file(path).map_err(|e| {
        StoreError::Startup(format!("cannot create database {}: {e}", path.display()))
    })?;
    for suffix in ["", "-wal", "-shm"] {
        let file = PathBuf::from(format!("{}{suffix}", path.display()));
        crate::secret_file::refuse_shared(&file, "a database").map_err(StoreError::Startup)?;
    }
    Ok(())
}

/// Creates the database if needed, switches it to WAL mode and applies its migrations.
/// [`StoreError::Busy`] when another process holds a lock this needs.
fn prepare_database(
    path: &Path,
    display: &str,
    durability: Durability,
    migrations: migrate::Migrations,
) -> Result<(), StoreError> {
    let failed = |e: rusqlite::Error| match StoreError::from(e) {
        StoreError::Busy => StoreError::Busy,
        other => StoreError::Startup(format!("cannot open database {display}: {other}")),
    };
    private_database(path)?;
    let mut conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(failed)?;
    configure(&mut conn, durability).map_err(failed)?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(failed)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Startup(format!(
            "cannot open database {display}: journal_mode is {mode}, WAL is required"
        )));
    }
    migrate::migrate(&mut conn, display, migrations)
}

/// Opens pooled connections to one database file, each configured by [`configure`]. (Three
/// methods of r2d2's trait are all a pool of SQLite connections needs.)
#[derive(Debug)]
struct Connector {
    path: PathBuf,
    durability: Durability,
}

impl r2d2::ManageConnection for Connector {
    type Connection = Connection;
    type Error = rusqlite::Error;

    fn connect(&self) -> rusqlite::Result<Connection> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let mut conn = Connection::open_with_flags(&self.path, flags)?;
        configure(&mut conn, self.durability)?;
        Ok(conn)
    }

    /// Checked before each checkout: an empty batch, which fails on a connection SQLite
    /// can no longer use.
    fn is_valid(&self, conn: &mut Connection) -> rusqlite::Result<()> {
        conn.execute_batch("")
    }

    fn has_broken(&self, _: &mut Connection) -> bool {
        false
    }
}

/// A pool of connections to one database file.
type Pool = r2d2::Pool<Connector>;

/// Opens (creating if needed) one database file in WAL mode, applies its migrations, and
/// returns a pool of configured connections.
fn open_pool(
    path: &Path,
    durability: Durability,
    migrations: migrate::Migrations,
    max_size: u32,
) -> Result<Pool, StoreError> {
    let display = path.display().to_string();
    // Several processes starting together on a new data directory race to create the file,
    // switch it to WAL and migrate it; the losers see "database is locked" in places no
    // busy handler covers. Retry for a few seconds before calling it a failure.
    let mut attempt = 0;
    loop {
        match prepare_database(path, &display, durability, migrations) {
            Err(StoreError::Busy) if attempt < 100 => {
                attempt += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(StoreError::Busy) => {
                return Err(StoreError::Startup(format!(
                    "cannot open database {display}: it stayed locked by another process"
                )))
            }
            other => break other?,
        }
    }

    let manager = Connector {
        path: path.to_owned(),
        durability,
    };
    r2d2::Pool::builder()
        .max_size(max_size)
        .min_idle(Some(1))
        .connection_timeout(Duration::from_secs(5))
        .build(manager)
        .map_err(|e| StoreError::Startup(format!("cannot open database {display}: {e}")))
}

/// The handle every part of the server shares; cheap to clone.
#[derive(Clone)]
pub struct SqliteStore {
    pool: Pool,
    /// The group-commit thread for payment creation (see `commits`).
    commits: std::sync::Arc<commits::CommitQueue>,
    /// The keys TOTP secrets are sealed under (see `sealing`).
    totp_keys: std::sync::Arc<sealing::TotpKeys>,
    /// What "now" is for expiry checks and timestamps (the worker's one clock).
    clock: Clock,
}

impl SqliteStore {
    /// Opens (creating if needed) the databases in `data_dir` and applies migrations.
    /// Fails with a message naming the path when the directory is unusable or the database
    /// was written by a newer paygate.
    pub fn open(data_dir: &Path) -> Result<SqliteStore, StoreError> {
        Self::open_with_clock(data_dir, Clock::system())
    }

    /// [`Store::open`] reading the time from `clock`.
    pub fn open_with_clock(data_dir: &Path, clock: Clock) -> Result<SqliteStore, StoreError> {
        ensure_data_dir(data_dir)?;
        let path = data_dir.join(MAIN_DB);
        let pool = open_pool(&path, Durability::Full, migrate::MAIN, 8)?;
        let writer = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .and_then(|mut conn| configure(&mut conn, Durability::Full).map(|()| conn))
        .map_err(|e| {
            StoreError::Startup(format!("cannot open database {}: {e}", path.display()))
        })?;
        writer.set_prepared_statement_cache_capacity(16);
        let commits = std::sync::Arc::new(commits::CommitQueue::start(writer)?);
        let totp_keys = std::sync::Arc::new(sealing::TotpKeys::load_or_create(data_dir)?);
        let mut conn = pool.get().map_err(|_| StoreError::Busy)?;
        let sealed = sealing::seal_plain_secrets(&mut conn, &totp_keys)?;
        if sealed > 0 {
            log::info!("sealed the TOTP secrets of {sealed} user(s) under totp.key");
        }
        drop(conn);
        Ok(SqliteStore {
            pool,
            commits,
            totp_keys,
            clock,
        })
    }

    /// Runs `work` with a pooled connection on the blocking pool.
    async fn run<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let pool = self.pool.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = pool.get().map_err(|_| StoreError::Busy)?;
            work(&mut conn)
        })
        .await
        .map_err(|_| StoreError::TaskFailed)?
    }

    /// Runs `work` on the calling thread, for command-line tools that are not async.
    pub fn run_blocking<T>(
        &self,
        work: impl FnOnce(&mut Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.pool.get().map_err(|_| StoreError::Busy)?;
        work(&mut conn)
    }
}

/// Creates the data directory if needed and proves it is writable, so a permission problem
/// is reported at start with the path, not as an obscure SQLite error on the first write.
pub fn ensure_data_dir(dir: &Path) -> Result<(), StoreError> {
    crate::secret_file::create_private_dir(dir).map_err(|e| {
        StoreError::Startup(format!(
            "cannot create data directory {}: {e}; create it or choose another with --data-dir",
            dir.display()
        ))
    })?;
    // It holds password hashes, TOTP secrets and keys: nobody else may even list it.
    crate::secret_file::refuse_shared(dir, "the data directory").map_err(StoreError::Startup)?;
    let probe: PathBuf = dir.join(format!(".write-probe-{}", std::process::id()));
    fs::write(&probe, b"")
        .and_then(|()| fs::remove_file(&probe))
        .map_err(|e| {
            StoreError::Startup(format!(
                "data directory {} is not writable: {e}; fix its permissions or choose another \
                 with --data-dir",
                dir.display()
            ))
        })
}

/// A page of a list, newest first, and the cursor for the next page.
#[derive(Debug)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// The `seq` of the last item when more items follow.
    pub next_seq: Option<i64>,
}

/// Turns `limit + 1` rows into a page: the extra row only says whether more follow.
pub(in crate::store) fn into_page<T>(mut rows: Vec<(i64, T)>, limit: usize) -> Page<T> {
    let more = rows.len() > limit;
    rows.truncate(limit);
    let next_seq = if more {
        rows.last().map(|(seq, _)| *seq)
    } else {
        None
    };
    Page {
        items: rows.into_iter().map(|(_, item)| item).collect(),
        next_seq,
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    /// A store in a fresh temporary directory.
    pub fn temp_store() -> (SqliteStore, PathBuf) {
        let dir = std::env::temp_dir().join(format!("paygate-store-{}", uuid::Uuid::new_v4()));
        (SqliteStore::open(&dir).unwrap(), dir)
    }

    /// Creates the user `name` (with a dummy hash) and returns its id.
    pub fn user(store: &SqliteStore, name: &str) -> i64 {
        let new = NewUser {
            username: crate::domain::Username::parse("username", name).unwrap(),
            password_hash: "$argon2id$dummy".into(),
            role: None,
        };
        match store.create_user_blocking(&new).unwrap() {
            UserInsert::Created(user) => user.id,
            UserInsert::UsernameTaken => unreachable!("{name} is taken"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_in_wal_mode_with_full_sync_and_reopens() {
        let (store, dir) = test_support::temp_store();
        let (mode, sync, fk): (String, i64, i64) = store
            .run_blocking(|c| {
                Ok(c.query_row(
                    "SELECT (SELECT journal_mode FROM pragma_journal_mode),
                            (SELECT synchronous FROM pragma_synchronous),
                            (SELECT foreign_keys FROM pragma_foreign_keys)",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )?)
            })
            .unwrap();
        assert_eq!((mode.as_str(), sync, fk), ("wal", 2, 1));
        drop(store);
        SqliteStore::open(&dir).unwrap();
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_unusable_data_directory_is_refused_with_its_path() {
        let file = std::env::temp_dir().join(format!("paygate-notadir-{}", uuid::Uuid::new_v4()));
        fs::write(&file, b"").unwrap();
        let err = SqliteStore::open(&file)
            .err()
            .expect("a file is not a directory");
        assert!(
            err.to_string().contains(&file.display().to_string()),
            "{err}"
        );
        fs::remove_file(file).unwrap();
    }

    #[test]
    fn pages_carry_a_cursor_only_when_more_follow() {
        let page = into_page(vec![(3, 'c'), (2, 'b'), (1, 'a')], 2);
        assert_eq!(page.items, vec!['c', 'b']);
        assert_eq!(page.next_seq, Some(2));
        let page = into_page(vec![(3, 'c')], 2);
        assert_eq!(page.next_seq, None);
    }
}
