//! Capabilities: minted and derived rows, lookup by token hash for authentication, and
//! revocation of a capability together with everything derived from it.

use rusqlite::{params, OptionalExtension, TransactionBehavior};
use uuid::Uuid;

use super::accounts::{parse_perms, parse_uuid};
use super::{into_page, Page, SqliteStore, StoreError};
use crate::domain::Perms;

/// A capability as stored (never its token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability {
    pub id: Uuid,
    pub account_id: Uuid,
    pub payment_id: Uuid,
    pub perms: Perms,
    pub minted_by: i64,
    pub parent_id: Option<Uuid>,
    /// Unix milliseconds.
    pub created_at: i64,
    pub expires_at: i64,
    pub revoked_at: Option<i64>,
}

/// A capability as authentication sees it: the row, and what it depends on now — its
/// ancestors (revoking one revokes it) and its minter (a capability is never worth more
/// than the minter still holds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapabilityState {
    pub capability: Capability,
    /// Its minter (or the minter of any capability it was derived from) is disabled.
    pub minter_disabled: bool,
    /// A capability it was derived from, at any depth, is revoked.
    pub ancestor_revoked: bool,
    /// The minter's current grant on the capability's account; `None` when they have
    /// none any more. (A derived capability keeps its root's minter.)
    pub minter_perms: Option<Perms>,
}

/// A capability to store.
#[derive(Debug, Clone)]
pub struct NewCapability {
    pub token_hash: [u8; 32],
    pub account_id: Uuid,
    pub payment_id: Uuid,
    pub perms: Perms,
    pub minted_by: i64,
    pub parent_id: Option<Uuid>,
    pub expires_at: i64,
}

const COLUMNS: &str = "c.id, c.account_id, c.payment_id, c.perms, c.minted_by, c.parent_id, \
                       c.created_at, c.expires_at, c.revoked_at";

fn read(row: &rusqlite::Row<'_>) -> rusqlite::Result<[Option<String>; 3]> {
    Ok([row.get(0)?, row.get(1)?, row.get(2)?])
}

fn capability(row: &rusqlite::Row<'_>) -> Result<Capability, StoreError> {
    let [id, account, payment] = read(row)?;
    let text =
        |v: Option<String>| v.ok_or_else(|| StoreError::Corrupt("null capability id".into()));
    Ok(Capability {
        id: parse_uuid(&text(id)?)?,
        account_id: parse_uuid(&text(account)?)?,
        payment_id: parse_uuid(&text(payment)?)?,
        perms: parse_perms(&row.get::<_, String>(3)?)?,
        minted_by: row.get(4)?,
        parent_id: row
            .get::<_, Option<String>>(5)?
            .map(|p| parse_uuid(&p))
            .transpose()?,
        created_at: row.get(6)?,
        expires_at: row.get(7)?,
        revoked_at: row.get(8)?,
    })
}

/// How deep a derivation tree may grow: a minted capability is depth 0, and the longest
/// chain of derivations below it is this many. Keeps every use (which checks the whole
/// ancestry) and every revocation (which walks the whole tree) cheap.
pub const MAX_DERIVATION_DEPTH: i64 = 8;

/// How many unexpired capabilities one minted capability and everything derived from it
/// may count together (revoked ones included: revoking does not make room).
pub const MAX_PER_ROOT: i64 = 100;

/// Result of storing a capability.
#[derive(Debug)]
pub enum CapabilityInsert {
    Created(Capability),
    /// The parent is revoked (itself or an ancestor), expired, or gone: nothing derives
    /// from it any more. Decided in the transaction that would insert the child, so a
    /// revocation and a derivation never interleave.
    ParentUnusable,
    /// The derivation tree is [`MAX_DERIVATION_DEPTH`] deep at the parent.
    TooDeep,
    /// The tree already holds [`MAX_PER_ROOT`] unexpired capabilities.
    TooMany,
}

impl SqliteStore {
    /// Stores a new capability: a minted one, or one derived from `new.parent_id` — then
    /// only while the parent and all its ancestors are unrevoked and unexpired, and within
    /// the tree's depth and size limits, all checked in the inserting transaction.
    pub async fn create_capability(
        &self,
        new: NewCapability,
    ) -> Result<CapabilityInsert, StoreError> {
        let clock = self.clock.clone();
        self.run(move |conn| {
            let id = Uuid::new_v4();
            let now = clock.now_millis();
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let (root, depth) = match new.parent_id {
                None => (id, 0),
                Some(parent) => {
                    let found = tx
                        .prepare_cached(
                            "SELECT p.root_id, p.depth,
                                    p.revoked_at IS NULL AND p.expires_at > ?2
                                    AND NOT EXISTS (
                                        WITH RECURSIVE ancestors(id, parent_id, revoked_at) AS (
                                            SELECT a.id, a.parent_id, a.revoked_at
                                              FROM capabilities a WHERE a.id = p.parent_id
                                            UNION ALL
                                            SELECT a.id, a.parent_id, a.revoked_at
                                              FROM capabilities a
                                              JOIN ancestors ON a.id = ancestors.parent_id)
                                        SELECT 1 FROM ancestors WHERE revoked_at IS NOT NULL)
                               FROM capabilities p WHERE p.id = ?1",
                        )?
                        .query_row(params![parent.to_string(), now], |r| {
                            Ok((
                                r.get::<_, Option<String>>(0)?,
                                r.get::<_, i64>(1)?,
                                r.get::<_, bool>(2)?,
                            ))
                        })
                        .optional()?;
                    let Some((root, depth, usable)) = found else {
                        return Ok(CapabilityInsert::ParentUnusable);
                    };
                    if !usable {
                        return Ok(CapabilityInsert::ParentUnusable);
                    }
                    if depth >= MAX_DERIVATION_DEPTH {
                        return Ok(CapabilityInsert::TooDeep);
                    }
                    let root = match root {
                        Some(root) => parse_uuid(&root)?,
                        None => parent,
                    };
                    let in_tree: i64 = tx
                        .prepare_cached(
                            "SELECT count(*) FROM capabilities
                              WHERE root_id = ?1 AND expires_at > ?2",
                        )?
                        .query_row(params![root.to_string(), now], |r| r.get(0))?;
                    if in_tree >= MAX_PER_ROOT {
                        return Ok(CapabilityInsert::TooMany);
                    }
                    (root, depth + 1)
                }
            };
            tx.prepare_cached(
                "INSERT INTO capabilities (id, token_hash, account_id, payment_id, perms,
                                           minted_by, parent_id, created_at, expires_at,
                                           root_id, depth)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            )?
            .execute(params![
                id.to_string(),
                new.token_hash,
                new.account_id.to_string(),
                new.payment_id.to_string(),
                new.perms.to_string(),
                new.minted_by,
                new.parent_id.map(|p| p.to_string()),
                now,
                new.expires_at,
                root.to_string(),
                depth
            ])?;
            tx.commit()?;
            Ok(CapabilityInsert::Created(Capability {
                id,
                account_id: new.account_id,
                payment_id: new.payment_id,
                perms: new.perms,
                minted_by: new.minted_by,
                parent_id: new.parent_id,
                created_at: now,
                expires_at: new.expires_at,
                revoked_at: None,
            }))
        })
        .await
    }

    /// The capability a token hash names, with the state of its minters.
    pub async fn capability_by_hash(
        &self,
        token_hash: [u8; 32],
    ) -> Result<Option<CapabilityState>, StoreError> {
        self.run(move |conn| {
            let sql = format!(
                "SELECT {COLUMNS},
                        EXISTS (WITH RECURSIVE chain(id, parent_id, minted_by) AS (
                                    SELECT id, parent_id, minted_by FROM capabilities
                                     WHERE id = c.id
                                    UNION ALL
                                    SELECT p.id, p.parent_id, p.minted_by
                                      FROM capabilities p JOIN chain ON p.id = chain.parent_id)
                                SELECT 1 FROM chain JOIN users u ON u.id = chain.minted_by
                                 WHERE u.disabled = 1),
                        EXISTS (WITH RECURSIVE ancestors(id, parent_id, revoked_at) AS (
                                    SELECT p.id, p.parent_id, p.revoked_at FROM capabilities p
                                     WHERE p.id = c.parent_id
                                    UNION ALL
                                    SELECT p.id, p.parent_id, p.revoked_at
                                      FROM capabilities p JOIN ancestors a ON p.id = a.parent_id)
                                SELECT 1 FROM ancestors WHERE revoked_at IS NOT NULL),
                        (SELECT m.perms FROM account_members m
                          WHERE m.user_id = c.minted_by AND m.account_id = c.account_id)
                   FROM capabilities c WHERE c.token_hash = ?1"
            );
            let mut statement = conn.prepare_cached(&sql)?;
            let mut rows = statement.query([token_hash])?;
            let Some(row) = rows.next()? else {
                return Ok(None);
            };
            Ok(Some(CapabilityState {
                capability: capability(row)?,
                minter_disabled: row.get(9)?,
                ancestor_revoked: row.get(10)?,
                minter_perms: row
                    .get::<_, Option<String>>(11)?
                    .map(|p| parse_perms(&p))
                    .transpose()?,
            }))
        })
        .await
    }

    /// A capability by id.
    pub async fn capability(&self, id: Uuid) -> Result<Option<Capability>, StoreError> {
        self.run(move |conn| {
            let sql = format!("SELECT {COLUMNS} FROM capabilities c WHERE c.id = ?1");
            let mut statement = conn.prepare_cached(&sql)?;
            let mut rows = statement.query([id.to_string()])?;
            rows.next()?.map(capability).transpose()
        })
        .await
    }

    /// Revokes a capability and every capability derived from it, in one transaction;
    /// returns how many were revoked now.
    pub async fn revoke_capability(&self, id: Uuid) -> Result<usize, StoreError> {
        let clock = self.clock.clone();
        self.run(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let revoked = tx.execute(
                "WITH RECURSIVE tree(id) AS (
                     SELECT id FROM capabilities WHERE id = ?1
                     UNION ALL
                     SELECT c.id FROM capabilities c JOIN tree ON c.parent_id = tree.id)
                 UPDATE capabilities SET revoked_at = ?2
                  WHERE id IN (SELECT id FROM tree) AND revoked_at IS NULL",
                params![id.to_string(), clock.now_millis()],
            )?;
            tx.commit()?;
            Ok(revoked)
        })
        .await
    }

    /// The capabilities of an account that are neither expired nor revoked, newest first,
    /// `limit` at a time, starting below the position `before`. Positions are rowids (never
    /// renumbered: paygate does not VACUUM).
    pub async fn live_capabilities(
        &self,
        account: Uuid,
        limit: usize,
        before: Option<i64>,
    ) -> Result<Page<Capability>, StoreError> {
        let clock = self.clock.clone();
        self.run(move |conn| {
            let sql = format!(
                "SELECT {COLUMNS}, c.rowid FROM capabilities c
                  WHERE c.account_id = ?1 AND c.expires_at > ?2 AND c.revoked_at IS NULL
                    AND c.rowid < ?3
                  ORDER BY c.rowid DESC LIMIT ?4"
            );
            let mut statement = conn.prepare_cached(&sql)?;
            let mut rows = statement.query(params![
                account.to_string(),
                clock.now_millis(),
                before.unwrap_or(i64::MAX),
                limit as i64 + 1
            ])?;
            let mut out = Vec::new();
            while let Some(row) = rows.next()? {
                out.push((row.get::<_, i64>(9)?, capability(row)?));
            }
            Ok(into_page(out, limit))
        })
        .await
    }

    /// Whether a payment belongs to an account.
    pub async fn payment_exists(&self, account: Uuid, payment: Uuid) -> Result<bool, StoreError> {
        self.run(move |conn| {
            Ok(conn
                .prepare_cached("SELECT 1 FROM payments WHERE account_id = ?1 AND id = ?2")?
                .query_row(
                    params![account.to_string(), payment.to_string()],
                    |_| Ok(()),
                )
                .optional()?
                .is_some())
        })
        .await
    }
}
