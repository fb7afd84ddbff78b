//! Whether the main database changed since a worker last asked: the stamp its exact cache
//! keys on, read once per access decision.
//!
//! Normally it reads the WAL-index header at the start of `paygate.db-shm` — two copies of
//! a 48-byte header that every commit rewrites (frame count, change counter, salts and
//! checksum; <https://www.sqlite.org/walformat.html>, section 2.1): when the header differs
//! from the one seen last, the answer is a new generation. A commit updates the header
//! before it returns, so a request that starts after another worker's commit sees the
//! change. Two copies that differ (a commit in progress) count as a change too. This is
//! what `PRAGMA data_version` decides, without its cost: the pragma opens a read
//! transaction, and its POSIX lock calls (`fcntl`) were ~7 % of a worker's time under a
//! read load.
//!
//! That layout is SQLite's, not a published interface. The header's version field is
//! checked at open: a SQLite whose WAL index is not the one described above (version
//! 3007000, initialised) makes this fall back to `PRAGMA data_version`, which is slower
//! but exact, and says so in the log. Token revocation depends on this answer, so a layout
//! paygate does not know is never guessed at.
//!
//! The read-only connection it holds keeps the WAL index in existence and initialised
//! (SQLite removes `-shm` only when no connection anywhere has the database open), and
//! serves the pragma in the fallback: it never writes, so every commit is another
//! connection's, which is what the pragma counts.

use std::path::Path;

use rusqlite::{Connection, OpenFlags};

use super::{StoreError, MAIN_DB};

/// Size of one copy of the WAL-index header.
const WAL_HEADER: usize = 48;

/// How long a blocking read waits for a lock SQLite holds (readers of a WAL database
/// wait only during recovery or a log restart, which take milliseconds).
const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(5);

/// The WAL-index format this reader knows (`iVersion` in SQLite's `WalIndexHdr`).
const WAL_INDEX_VERSION: u32 = 3_007_000;

/// How the generation is read.
enum Source {
    /// The `-shm` header, with the copy seen last.
    WalIndex {
        shm: std::fs::File,
        last: [u8; WAL_HEADER],
    },
    /// `PRAGMA data_version`, with the value seen last.
    Pragma { last: i64 },
}

/// How a worker learns that the main database changed.
pub struct DataVersion {
    conn: Connection,
    source: Source,
    /// How many different states this watch has seen: the version the cache keys on.
    generation: i64,
}

/// Whether a WAL-index header is laid out as this reader expects: the version it knows
/// (stored in native byte order) and the "initialised" flag set.
fn known_layout(header: &[u8]) -> bool {
    header.len() >= WAL_HEADER && header[..4] == WAL_INDEX_VERSION.to_ne_bytes() && header[12] == 1
}

impl DataVersion {
    /// Watches the main database in `data_dir`, through the WAL index when its layout is
    /// the known one.
    pub fn open(data_dir: &Path) -> Result<DataVersion, StoreError> {
        Self::open_with(data_dir, true)
    }

    /// Watches through `PRAGMA data_version` only (what an unknown layout falls back to).
    pub fn open_with_pragma(data_dir: &Path) -> Result<DataVersion, StoreError> {
        Self::open_with(data_dir, false)
    }

    fn open_with(data_dir: &Path, wal_index: bool) -> Result<DataVersion, StoreError> {
        let path = data_dir.join(MAIN_DB);
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        // A first read maps (and if needed recovers) the WAL index.
        let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Startup(format!(
                "{} is not in WAL mode ({mode})",
                path.display()
            )));
        }
        conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| {
            r.get::<_, i64>(0)
        })?;
        // Reads on a runtime thread must not wait for a lock; the ones that may wait say so.
        conn.busy_timeout(std::time::Duration::ZERO)?;
        let source = if wal_index {
            Self::wal_index(data_dir)?
        } else {
            None
        };
        let source = source.unwrap_or(Source::Pragma { last: i64::MIN });
        let mut watch = DataVersion {
            conn,
            source,
            generation: 0,
        };
        watch.read()?;
        Ok(watch)
    }

    /// The `-shm` file, if its header has the known layout.
    fn wal_index(data_dir: &Path) -> Result<Option<Source>, StoreError> {
        use std::os::unix::fs::FileExt as _;
        let shm_path = data_dir.join(format!("{MAIN_DB}-shm"));
        let shm = std::fs::File::open(&shm_path)
            .map_err(|e| StoreError::Startup(format!("cannot open {}: {e}", shm_path.display())))?;
        let mut header = [0u8; WAL_HEADER];
        shm.read_exact_at(&mut header, 0)
            .map_err(|e| StoreError::Startup(format!("reading {}: {e}", shm_path.display())))?;
        if !known_layout(&header) {
            log::warn!(
                "{}: WAL-index layout not the one paygate reads directly (version {}); \
                 using PRAGMA data_version instead (slower, exact)",
                shm_path.display(),
                u32::from_ne_bytes([header[0], header[1], header[2], header[3]])
            );
            return Ok(None);
        }
        Ok(Some(Source::WalIndex {
            shm,
            last: [0; WAL_HEADER],
        }))
    }

    /// Whether this watch reads the WAL index (false: the pragma fallback).
    pub fn reads_wal_index(&self) -> bool {
        matches!(self.source, Source::WalIndex { .. })
    }

    /// The current generation: it moves whenever the database may have changed.
    pub fn read(&mut self) -> Result<i64, StoreError> {
        match &mut self.source {
            Source::WalIndex { shm, last } => {
                use std::os::unix::fs::FileExt as _;
                let mut both = [0u8; 2 * WAL_HEADER];
                shm.read_exact_at(&mut both, 0)
                    .map_err(|e| StoreError::Corrupt(format!("reading the WAL index: {e}")))?;
                let (first, second) = both.split_at(WAL_HEADER);
                if first != second {
                    // Mid-commit: a new generation now, and another once the header settles.
                    *last = [0; WAL_HEADER];
                    self.generation += 1;
                } else if first != *last {
                    last.copy_from_slice(first);
                    self.generation += 1;
                }
            }
            Source::Pragma { last } => {
                let pragma = || -> Result<i64, StoreError> {
                    Ok(self
                        .conn
                        .prepare_cached("PRAGMA data_version")?
                        .query_row([], |r| r.get(0))?)
                };
                let now = match pragma() {
                    Err(StoreError::Busy) => {
                        self.conn.busy_timeout(LOCK_PATIENCE)?;
                        let now = pragma();
                        self.conn.busy_timeout(std::time::Duration::ZERO)?;
                        now?
                    }
                    now => now?,
                };
                if now != *last {
                    *last = now;
                    self.generation += 1;
                }
            }
        }
        Ok(self.generation)
    }
}

/// One entry of the change log (`sql/005_changes.sql`): what a commit changed that a
/// worker may hold in its cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A user was disabled, renamed or given another role.
    User(i64),
    /// An opaque session ended (its token's hash).
    Session([u8; 32]),
    /// A JWT id was revoked.
    Jwt(String),
    /// A user's grant on an account was given, changed or removed.
    Membership { user: i64, account: uuid::Uuid },
    /// A capability on this account was revoked.
    Capability { account: uuid::Uuid },
    /// A payment was cancelled.
    Payment {
        account: uuid::Uuid,
        payment: uuid::Uuid,
    },
    /// A kind this paygate does not know (a newer one wrote it): anything may have changed.
    Unknown,
}

impl Change {
    /// A row of the change log (an unknown kind or a malformed key: [`Change::Unknown`]).
    pub(in crate::store) fn parse(kind: &str, key: &str) -> Change {
        let pair = || key.split_once(' ');
        let parsed = match kind {
            "user" => key.parse().ok().map(Change::User),
            "session" => decode_hex(key).map(Change::Session),
            "jwt" => Some(Change::Jwt(key.to_owned())),
            "membership" => pair().and_then(|(user, account)| {
                Some(Change::Membership {
                    user: user.parse().ok()?,
                    account: account.parse().ok()?,
                })
            }),
            "capability" => key
                .parse()
                .ok()
                .map(|account| Change::Capability { account }),
            "payment" => pair().and_then(|(account, payment)| {
                Some(Change::Payment {
                    account: account.parse().ok()?,
                    payment: payment.parse().ok()?,
                })
            }),
            _ => None,
        };
        parsed.unwrap_or(Change::Unknown)
    }
}

/// 64 hex digits (as SQLite's `hex()` writes them) into 32 bytes.
fn decode_hex(text: &str) -> Option<[u8; 32]> {
    let bytes = text.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let digit = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

/// What the change log holds after a position.
#[derive(Debug, PartialEq, Eq)]
pub enum ChangesSince {
    /// Every change after the position, in order, and the position after the last.
    Changes(Vec<Change>, i64),
    /// Changes after the position were pruned already: the reader cannot know what changed.
    FellBehind(i64),
}

impl DataVersion {
    /// The change log's newest position: the last number it gave out, also when the rows
    /// were pruned since (0 before the first change).
    pub fn newest_change(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'changes'), 0)",
            )?
            .query_row([], |r| r.get(0))?)
    }

    /// The changes committed after position `seen`, waiting (up to [`LOCK_PATIENCE`]) if
    /// SQLite holds a lock a reader must wait for. Blocking.
    pub fn changes_since(&self, seen: i64) -> Result<ChangesSince, StoreError> {
        self.conn.busy_timeout(LOCK_PATIENCE)?;
        let since = self.read_changes(seen);
        self.conn.busy_timeout(std::time::Duration::ZERO)?;
        since
    }

    /// The changes committed after position `seen` if they can be read without waiting: a
    /// short read of pages already in memory, fit for a runtime thread. `None` when a lock
    /// is taken (WAL recovery, a checkpoint restarting the log): then the caller waits with
    /// [`DataVersion::changes_since`] elsewhere.
    pub fn changes_since_now(&self, seen: i64) -> Result<Option<ChangesSince>, StoreError> {
        match self.read_changes(seen) {
            Err(StoreError::Busy) => Ok(None),
            since => since.map(Some),
        }
    }

    fn read_changes(&self, seen: i64) -> Result<ChangesSince, StoreError> {
        let mut statement = self
            .conn
            .prepare_cached("SELECT seq, kind, key FROM changes WHERE seq > ?1 ORDER BY seq")?;
        let mut rows = statement.query([seen])?;
        let mut changes = Vec::new();
        let mut last = seen;
        while let Some(row) = rows.next()? {
            let seq: i64 = row.get(0)?;
            // Positions are consecutive (AUTOINCREMENT, and a rolled-back insert takes its
            // number back): a gap after `seen` is rows the sweeper pruned.
            if changes.is_empty() && seq != seen + 1 {
                drop(rows);
                return Ok(ChangesSince::FellBehind(self.newest_change()?));
            }
            let (kind, key): (String, String) = (row.get(1)?, row.get(2)?);
            changes.push(Change::parse(&kind, &key));
            last = seq;
        }
        drop(rows);
        // Nothing to read, yet numbers were given out after `seen`: pruned, all of them.
        if changes.is_empty() {
            let newest = self.newest_change()?;
            if newest > seen {
                return Ok(ChangesSince::FellBehind(newest));
            }
        }
        Ok(ChangesSince::Changes(changes, last))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Username;
    use crate::store::test_support::temp_store;
    use crate::store::NewUser;

    fn commit(store: &crate::store::SqliteStore, name: &str) {
        let new = NewUser {
            username: Username::parse("username", name).unwrap(),
            password_hash: "$argon2id$dummy".into(),
            role: None,
        };
        store.create_user_blocking(&new).unwrap();
    }

    #[test]
    fn data_version_moves_when_another_connection_commits_through_either_source() {
        let (store, dir) = temp_store();
        let mut fast = DataVersion::open(&dir).unwrap();
        let mut exact = DataVersion::open_with_pragma(&dir).unwrap();
        assert!(fast.reads_wal_index(), "this SQLite has the known layout");
        assert!(!exact.reads_wal_index());
        for (i, name) in ["bob", "carol"].into_iter().enumerate() {
            let (a, b) = (fast.read().unwrap(), exact.read().unwrap());
            assert_eq!(fast.read().unwrap(), a, "stable without writes ({i})");
            assert_eq!(exact.read().unwrap(), b, "stable without writes ({i})");
            commit(&store, name);
            assert_ne!(fast.read().unwrap(), a);
            assert_ne!(exact.read().unwrap(), b);
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn only_the_known_initialised_wal_index_layout_is_read_directly() {
        let (_store, dir) = temp_store();
        let mut header = [0u8; WAL_HEADER];
        std::os::unix::fs::FileExt::read_exact_at(
            &std::fs::File::open(dir.join("paygate.db-shm")).unwrap(),
            &mut header,
            0,
        )
        .unwrap();
        assert!(known_layout(&header));
        let mut newer = header;
        newer[..4].copy_from_slice(&3_007_001u32.to_ne_bytes());
        assert!(!known_layout(&newer), "another version");
        let mut uninitialised = header;
        uninitialised[12] = 0;
        assert!(!known_layout(&uninitialised));
        assert!(!known_layout(&header[..40]), "too short");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn every_change_a_cache_depends_on_is_logged_in_its_transaction() {
        let (store, dir) = temp_store();
        let watch = DataVersion::open(&dir).unwrap();
        let start = watch.newest_change().unwrap();
        commit(&store, "bob");
        assert_eq!(
            watch.changes_since(start).unwrap(),
            ChangesSince::Changes(vec![], start),
            "a new user changes nothing cached"
        );
        store
            .run_blocking(|conn| {
                conn.execute_batch(
                    "INSERT INTO sessions (token_hash, user_id, amr, created_at, expires_at)
                       VALUES (x'0101010101010101010101010101010101010101010101010101010101010101', 1, 'pwd', 0, 1);
                     DELETE FROM sessions;
                     INSERT INTO revoked_tokens (jti, expires_at) VALUES ('j-1', 1);
                     UPDATE users SET disabled = 1 WHERE id = 1;",
                )?;
                Ok(())
            })
            .unwrap();
        let ChangesSince::Changes(changes, last) = watch.changes_since(start).unwrap() else {
            panic!("nothing pruned")
        };
        assert_eq!(
            changes,
            [
                Change::Session([1; 32]),
                Change::Jwt("j-1".into()),
                Change::User(1)
            ]
        );
        assert_eq!(last, start + 3);
        assert_eq!(
            watch.changes_since(last).unwrap(),
            ChangesSince::Changes(vec![], last)
        );
        // Pruned past a reader's position: it is told it fell behind.
        store
            .run_blocking(|conn| {
                conn.execute("DELETE FROM changes WHERE seq <= ?1", [start + 2])?;
                Ok(())
            })
            .unwrap();
        assert_eq!(
            watch.changes_since(start).unwrap(),
            ChangesSince::FellBehind(last)
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_read_on_a_runtime_thread_never_waits_for_a_lock() {
        let (store, dir) = temp_store();
        let watch = DataVersion::open(&dir).unwrap();
        // SQLite's busy handler decides whether a read waits; zero means it answers "busy"
        // at once, which `changes_since_now` turns into `None`.
        let patience = |watch: &DataVersion| -> i64 {
            watch
                .conn
                .query_row("PRAGMA busy_timeout", [], |r| r.get(0))
                .unwrap()
        };
        assert_eq!(patience(&watch), 0, "reads answer instead of waiting");
        let start = watch.newest_change().unwrap();
        commit(&store, "bob");
        store
            .run_blocking(|conn| {
                conn.execute("UPDATE users SET disabled = 1 WHERE username = 'bob'", [])?;
                Ok(())
            })
            .unwrap();
        let inline = watch.changes_since_now(start).unwrap();
        assert!(
            matches!(&inline, Some(ChangesSince::Changes(c, _)) if c.len() == 1),
            "{inline:?}"
        );
        assert_eq!(Some(watch.changes_since(start).unwrap()), inline);
        assert_eq!(patience(&watch), 0, "the read that may wait restores it");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn unknown_or_malformed_changes_mean_anything_may_have_changed() {
        assert_eq!(Change::parse("user", "12"), Change::User(12));
        assert_eq!(Change::parse("user", "x"), Change::Unknown);
        assert_eq!(Change::parse("session", "AB"), Change::Unknown);
        assert_eq!(Change::parse("teleport", "1"), Change::Unknown);
        let account = uuid::Uuid::nil();
        assert_eq!(
            Change::parse("membership", &format!("3 {account}")),
            Change::Membership { user: 3, account }
        );
    }
}
