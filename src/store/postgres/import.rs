//! `paygate migrate-store`: a single machine's SQLite data copied into a new PostgreSQL
//! database, the upgrade path from one machine to several nodes. Everything goes in one
//! transaction (all or nothing), every table keeps its ids and listing positions (so
//! tokens, links and page cursors stay valid), and the copy is verified by counting every
//! table on both sides.
//!
//! Copied: users (with their sealed TOTP state), accounts, grants, payments,
//! idempotency keys (their answers replay after the move), sessions, revoked JWT ids,
//! capabilities, and the JWT signing keys of `jwt-keys.json` (sealed under the same
//! sealing key, so tokens issued before the move keep verifying). Not copied: rate-limit
//! buckets (they refill) and the change log (nodes start from its head).

use std::path::Path;

use rusqlite::types::ValueRef;
use tokio_postgres::types::ToSql;

use super::{open_pool, DatabaseUrl, JwtKeyRow};
use crate::store::sealing::TotpKeys;
use crate::store::{SqliteStore, StoreError};

/// How a column's SQLite value becomes its PostgreSQL one.
#[derive(Clone, Copy)]
enum Kind {
    Int,
    Int32,
    Bool,
    Text,
    Bytes,
    Uuid,
}

use Kind::{Bool, Bytes, Int, Int32, Text, Uuid};

/// A table to copy: its columns, and the order that inserts parents before children.
struct Table {
    name: &'static str,
    columns: &'static [(&'static str, Kind)],
    /// SQLite's expression for each column, where it differs from the name.
    select: Option<&'static str>,
    order: &'static str,
    /// Whether PostgreSQL generates a column of it (`OVERRIDING SYSTEM VALUE` keeps ours).
    identity: bool,
}

/// In an order that satisfies every foreign key.
const TABLES: &[Table] = &[
    Table {
        name: "users",
        columns: &[
            ("id", Int),
            ("username", Text),
            ("password_hash", Text),
            ("role", Text),
            ("disabled", Bool),
            ("created_at", Int),
            ("totp_secret", Bytes),
            ("totp_pending", Bytes),
            ("totp_last_step", Int),
        ],
        select: None,
        order: "id",
        identity: false,
    },
    Table {
        name: "accounts",
        columns: &[
            ("seq", Int),
            ("id", Uuid),
            ("name", Text),
            ("currency", Text),
            ("created_by", Int),
            ("created_at", Int),
        ],
        select: None,
        order: "seq",
        identity: true,
    },
    Table {
        name: "account_members",
        columns: &[
            ("user_id", Int),
            ("account_id", Uuid),
            ("perms", Text),
            ("granted_by", Int),
            ("granted_at", Int),
        ],
        select: None,
        order: "granted_at, user_id, account_id",
        identity: false,
    },
    Table {
        name: "payments",
        columns: &[
            ("seq", Int),
            ("id", Uuid),
            ("account_id", Uuid),
            ("payee", Text),
            ("amount_minor", Int),
            ("currency", Text),
            ("reference", Text),
            ("status", Text),
            ("created_by", Int),
            ("created_at", Int),
            ("cancelled_at", Int),
        ],
        select: None,
        order: "seq",
        identity: true,
    },
    Table {
        name: "idempotency_keys",
        columns: &[
            ("user_id", Int),
            ("key", Text),
            ("request_hash", Bytes),
            ("lease", Text),
            ("lease_expires_at", Int),
            ("status", Int32),
            ("response_body", Text),
            ("location", Text),
            ("created_at", Int),
        ],
        select: None,
        order: "created_at, user_id, key",
        identity: false,
    },
    Table {
        name: "sessions",
        columns: &[
            ("token_hash", Bytes),
            ("user_id", Int),
            ("amr", Text),
            ("created_at", Int),
            ("expires_at", Int),
        ],
        select: None,
        order: "created_at, token_hash",
        identity: false,
    },
    Table {
        name: "revoked_tokens",
        columns: &[("jti", Text), ("expires_at", Int)],
        select: None,
        order: "jti",
        identity: false,
    },
    Table {
        name: "capabilities",
        columns: &[
            ("seq", Int),
            ("id", Uuid),
            ("token_hash", Bytes),
            ("account_id", Uuid),
            ("payment_id", Uuid),
            ("perms", Text),
            ("minted_by", Int),
            ("parent_id", Uuid),
            ("root_id", Uuid),
            ("depth", Int32),
            ("created_at", Int),
            ("expires_at", Int),
            ("revoked_at", Int),
        ],
        // The listing position is SQLite's rowid; parents (smaller depth) first.
        select: Some(
            "rowid, id, token_hash, account_id, payment_id, perms, minted_by, parent_id, \
             root_id, depth, created_at, expires_at, revoked_at",
        ),
        order: "depth, rowid",
        identity: true,
    },
];

/// The identity columns whose sequences must continue after the copied values.
const SEQUENCES: &[(&str, &str)] = &[
    ("users", "id"),
    ("accounts", "seq"),
    ("payments", "seq"),
    ("capabilities", "seq"),
];

type Value = Box<dyn ToSql + Sync + Send>;

/// One SQLite value as the PostgreSQL type of its column.
fn convert(
    table: &str,
    column: &str,
    kind: Kind,
    value: ValueRef<'_>,
) -> Result<Value, StoreError> {
    let wrong = || {
        StoreError::Corrupt(format!(
            "{table}.{column} holds a {:?} where paygate writes another type",
            value.data_type()
        ))
    };
    Ok(match (kind, value) {
        (Int, ValueRef::Null) => Box::new(None::<i64>),
        (Int32, ValueRef::Null) => Box::new(None::<i32>),
        (Text, ValueRef::Null) => Box::new(None::<String>),
        (Bytes, ValueRef::Null) => Box::new(None::<Vec<u8>>),
        (Uuid, ValueRef::Null) => Box::new(None::<uuid::Uuid>),
        (Int, ValueRef::Integer(v)) => Box::new(Some(v)),
        (Int32, ValueRef::Integer(v)) => Box::new(Some(i32::try_from(v).map_err(|_| wrong())?)),
        (Bool, ValueRef::Integer(v)) => Box::new(v != 0),
        (Text, ValueRef::Text(v)) => Box::new(Some(
            std::str::from_utf8(v).map_err(|_| wrong())?.to_owned(),
        )),
        (Uuid, ValueRef::Text(v)) => Box::new(Some(
            std::str::from_utf8(v)
                .ok()
                .and_then(|s| uuid::Uuid::parse_str(s).ok())
                .ok_or_else(wrong)?,
        )),
        (Bytes, ValueRef::Blob(v)) => Box::new(Some(v.to_vec())),
        _ => return Err(wrong()),
    })
}

/// Every row of `table` in SQLite, converted.
fn read_table(conn: &rusqlite::Connection, table: &Table) -> Result<Vec<Vec<Value>>, StoreError> {
    let names: Vec<&str> = table.columns.iter().map(|(name, _)| *name).collect();
    let select = table.select.map_or_else(|| names.join(", "), str::to_owned);
    let mut statement = conn.prepare(&format!(
        "SELECT {select} FROM {} ORDER BY {}",
        table.name, table.order
    ))?;
    let mut rows = statement.query([])?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let mut values = Vec::with_capacity(table.columns.len());
        for (i, (name, kind)) in table.columns.iter().enumerate() {
            values.push(convert(table.name, name, *kind, row.get_ref(i)?)?);
        }
        out.push(values);
    }
    Ok(out)
}

/// How many rows a table holds on each side after the copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copied {
    pub table: &'static str,
    pub sqlite: i64,
    pub postgres: i64,
}

/// Copies the SQLite data of `data_dir`, and `jwt_keys` (its signing keys, sealed here
/// under its sealing key), into the new database at `url` and counts both sides; an error
/// when the target already holds data, or when a count differs. Nothing may write to
/// `data_dir` meanwhile (stop its server first).
pub async fn import_sqlite(
    data_dir: &Path,
    jwt_keys: &[JwtKeyRow],
    url: &DatabaseUrl,
) -> Result<Vec<Copied>, StoreError> {
    let main = data_dir.join(crate::store::MAIN_DB);
    if !main.is_file() {
        return Err(StoreError::Startup(format!(
            "no paygate database at {}: --from names the data directory of a single \
             machine (its --data-dir)",
            main.display()
        )));
    }
    // Opening the store brings its schema up to date and seals any TOTP secret an older
    // version left in plaintext, so that none reaches PostgreSQL.
    SqliteStore::open(data_dir)?;
    let sealing = TotpKeys::load(data_dir)?;
    let mut source =
        rusqlite::Connection::open_with_flags(&main, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    // One snapshot of every table.
    let snapshot = source.transaction()?;
    let mut tables = Vec::with_capacity(TABLES.len());
    for table in TABLES {
        tables.push((table, read_table(&snapshot, table)?));
    }
    let mut counts = Vec::with_capacity(TABLES.len() + 1);
    for table in TABLES {
        let n: i64 =
            snapshot.query_row(&format!("SELECT count(*) FROM {}", table.name), [], |r| {
                r.get(0)
            })?;
        counts.push((table.name, n));
    }
    drop(snapshot);

    let pool = open_pool(url, 1).await?;
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let holds: i64 = tx
        .query_one(
            "SELECT (SELECT count(*) FROM users) + (SELECT count(*) FROM accounts)
                  + (SELECT count(*) FROM payments) + (SELECT count(*) FROM jwt_keys)",
            &[],
        )
        .await?
        .try_get(0)?;
    if holds > 0 {
        return Err(StoreError::Startup(format!(
            "the database {} already holds users, accounts, payments or signing keys: \
             migrate-store copies into a new, empty database, before any node starts on it",
            url.describe()
        )));
    }
    for (table, rows) in &tables {
        let names: Vec<&str> = table.columns.iter().map(|(name, _)| *name).collect();
        let placeholders: Vec<String> = (1..=names.len()).map(|i| format!("${i}")).collect();
        let statement = tx
            .prepare(&format!(
                "INSERT INTO {} ({}) {} VALUES ({})",
                table.name,
                names.join(", "),
                if table.identity {
                    "OVERRIDING SYSTEM VALUE"
                } else {
                    ""
                },
                placeholders.join(", ")
            ))
            .await?;
        for row in rows {
            let params: Vec<&(dyn ToSql + Sync)> = row
                .iter()
                .map(|v| v.as_ref() as &(dyn ToSql + Sync))
                .collect();
            tx.execute(&statement, &params).await?;
        }
    }
    for (table, column) in SEQUENCES {
        tx.execute(
            &format!(
                "SELECT setval(pg_get_serial_sequence('{table}', '{column}'),
                               coalesce((SELECT max({column}) FROM {table}), 0) + 1, false)"
            ),
            &[],
        )
        .await?;
    }
    for key in jwt_keys {
        tx.execute(
            "INSERT INTO jwt_keys (kid, sealed, created_at, retired_at) VALUES ($1, $2, $3, $4)",
            &[
                &key.kid,
                &sealing.seal_jwt_key(&key.kid, &key.secret)?,
                &key.created_at,
                &key.retired_at,
            ],
        )
        .await?;
    }
    // Counted before the commit: a copy that does not add up is rolled back.
    let mut copied = Vec::with_capacity(counts.len() + 1);
    let jwt_count = i64::try_from(jwt_keys.len()).unwrap_or(i64::MAX);
    for (table, sqlite) in counts.into_iter().chain([("jwt_keys", jwt_count)]) {
        let postgres: i64 = tx
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await?
            .try_get(0)?;
        copied.push(Copied {
            table,
            sqlite,
            postgres,
        });
    }
    if let Some(wrong) = copied.iter().find(|c| c.sqlite != c.postgres) {
        return Err(StoreError::Database(format!(
            "{}: {} rows in SQLite but {} in PostgreSQL; nothing was copied",
            wrong.table, wrong.sqlite, wrong.postgres
        )));
    }
    tx.commit().await?;
    Ok(copied)
}
