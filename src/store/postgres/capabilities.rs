//! Capabilities in PostgreSQL, and the sweep of what expired: the rules of
//! `store::capabilities` and `store::sweep`. Deriving locks the tree's root row, so that
//! two nodes deriving from one tree at once cannot both take its last free place.

use tokio_postgres::Row;
use uuid::Uuid;

use super::PgStore;
use crate::store::accounts::parse_perms;
use crate::store::sweep::CHANGES_KEPT;
use crate::store::{
    into_page, Capability, CapabilityInsert, CapabilityState, NewCapability, Page, StoreError,
    MAX_DERIVATION_DEPTH, MAX_PER_ROOT,
};

const COLUMNS: &str = "c.id, c.account_id, c.payment_id, c.perms, c.minted_by, c.parent_id, \
                       c.created_at, c.expires_at, c.revoked_at";

fn capability(row: &Row) -> Result<Capability, StoreError> {
    let perms: String = row.try_get(3)?;
    Ok(Capability {
        id: row.try_get(0)?,
        account_id: row.try_get(1)?,
        payment_id: row.try_get(2)?,
        perms: parse_perms(&perms)?,
        minted_by: row.try_get(4)?,
        parent_id: row.try_get(5)?,
        created_at: row.try_get(6)?,
        expires_at: row.try_get(7)?,
        revoked_at: row.try_get(8)?,
    })
}

impl PgStore {
    /// Stores a new capability, derived from `new.parent_id` if given: the parent must be
    /// live (not expired, neither it nor an ancestor revoked), the tree not deeper than
    /// [`MAX_DERIVATION_DEPTH`] nor holding [`MAX_PER_ROOT`] live capabilities.
    pub async fn create_capability(
        &self,
        new: NewCapability,
    ) -> Result<CapabilityInsert, StoreError> {
        let id = Uuid::new_v4();
        let now = self.clock.now_millis();
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let (root, depth) = match new.parent_id {
            None => (id, 0),
            Some(parent) => {
                let found = tx
                    .query_opt(
                        "SELECT p.root_id, p.depth,
                                p.revoked_at IS NULL AND p.expires_at > $2
                                AND NOT EXISTS (
                                    WITH RECURSIVE ancestors(id, parent_id, revoked_at) AS (
                                        SELECT a.id, a.parent_id, a.revoked_at
                                          FROM capabilities a WHERE a.id = p.parent_id
                                        UNION ALL
                                        SELECT a.id, a.parent_id, a.revoked_at
                                          FROM capabilities a
                                          JOIN ancestors ON a.id = ancestors.parent_id)
                                    SELECT 1 FROM ancestors WHERE revoked_at IS NOT NULL)
                           FROM capabilities p WHERE p.id = $1",
                        &[&parent, &now],
                    )
                    .await?;
                let Some(found) = found else {
                    return Ok(CapabilityInsert::ParentUnusable);
                };
                let (root, depth, usable): (Option<Uuid>, i32, bool) =
                    (found.try_get(0)?, found.try_get(1)?, found.try_get(2)?);
                if !usable {
                    return Ok(CapabilityInsert::ParentUnusable);
                }
                if i64::from(depth) >= MAX_DERIVATION_DEPTH {
                    return Ok(CapabilityInsert::TooDeep);
                }
                let root = root.unwrap_or(parent);
                // One derivation per tree at a time, on every node: the count below stays
                // true until this transaction ends.
                tx.query_opt(
                    "SELECT 1 FROM capabilities WHERE id = $1 FOR UPDATE",
                    &[&root],
                )
                .await?;
                let in_tree: i64 = tx
                    .query_one(
                        "SELECT count(*) FROM capabilities WHERE root_id = $1 AND expires_at > $2",
                        &[&root, &now],
                    )
                    .await?
                    .try_get(0)?;
                if in_tree >= MAX_PER_ROOT {
                    return Ok(CapabilityInsert::TooMany);
                }
                (root, depth + 1)
            }
        };
        tx.execute(
            "INSERT INTO capabilities (id, token_hash, account_id, payment_id, perms, minted_by,
                                       parent_id, created_at, expires_at, root_id, depth)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            &[
                &id,
                &&new.token_hash[..],
                &new.account_id,
                &new.payment_id,
                &new.perms.to_string(),
                &new.minted_by,
                &new.parent_id,
                &now,
                &new.expires_at,
                &root,
                &depth,
            ],
        )
        .await?;
        tx.commit().await?;
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
    }

    /// The capability whose token hashes to `token_hash`, with what decides whether it
    /// still works: a disabled minter anywhere up its chain, a revoked ancestor, and the
    /// minter's own grant on the account now.
    pub async fn capability_by_hash(
        &self,
        token_hash: [u8; 32],
    ) -> Result<Option<CapabilityState>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(&format!(
                "SELECT {COLUMNS},
                        EXISTS (WITH RECURSIVE chain(id, parent_id, minted_by) AS (
                                    SELECT id, parent_id, minted_by FROM capabilities
                                     WHERE id = c.id
                                    UNION ALL
                                    SELECT p.id, p.parent_id, p.minted_by
                                      FROM capabilities p JOIN chain ON p.id = chain.parent_id)
                                SELECT 1 FROM chain JOIN users u ON u.id = chain.minted_by
                                 WHERE u.disabled),
                        EXISTS (WITH RECURSIVE ancestors(id, parent_id, revoked_at) AS (
                                    SELECT p.id, p.parent_id, p.revoked_at FROM capabilities p
                                     WHERE p.id = c.parent_id
                                    UNION ALL
                                    SELECT p.id, p.parent_id, p.revoked_at
                                      FROM capabilities p JOIN ancestors a ON p.id = a.parent_id)
                                SELECT 1 FROM ancestors WHERE revoked_at IS NOT NULL),
                        (SELECT m.perms FROM account_members m
                          WHERE m.user_id = c.minted_by AND m.account_id = c.account_id)
                   FROM capabilities c WHERE c.token_hash = $1"
            ))
            .await?;
        let Some(row) = client.query_opt(&statement, &[&&token_hash[..]]).await? else {
            return Ok(None);
        };
        let minter_perms: Option<String> = row.try_get(11)?;
        Ok(Some(CapabilityState {
            capability: capability(&row)?,
            minter_disabled: row.try_get(9)?,
            ancestor_revoked: row.try_get(10)?,
            minter_perms: minter_perms.map(|p| parse_perms(&p)).transpose()?,
        }))
    }

    pub async fn capability(&self, id: Uuid) -> Result<Option<Capability>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM capabilities c WHERE c.id = $1"
            ))
            .await?;
        client
            .query_opt(&statement, &[&id])
            .await?
            .map(|row| capability(&row))
            .transpose()
    }

    /// Revokes a capability and everything derived from it; how many were live.
    pub async fn revoke_capability(&self, id: Uuid) -> Result<usize, StoreError> {
        let client = self.client().await?;
        let revoked = client
            .execute(
                "WITH RECURSIVE tree(id) AS (
                     SELECT id FROM capabilities WHERE id = $1
                     UNION ALL
                     SELECT c.id FROM capabilities c JOIN tree ON c.parent_id = tree.id)
                 UPDATE capabilities SET revoked_at = $2
                  WHERE id IN (SELECT id FROM tree) AND revoked_at IS NULL",
                &[&id, &self.clock.now_millis()],
            )
            .await?;
        drop(client);
        if revoked > 0 {
            self.applied_everywhere().await;
        }
        Ok(revoked as usize)
    }

    /// The account's capabilities neither expired nor revoked, newest first.
    pub async fn live_capabilities(
        &self,
        account: Uuid,
        limit: usize,
        before: Option<i64>,
    ) -> Result<Page<Capability>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(&format!(
                "SELECT {COLUMNS}, c.seq FROM capabilities c
                  WHERE c.account_id = $1 AND c.expires_at > $2 AND c.revoked_at IS NULL
                    AND c.seq < $3
                  ORDER BY c.seq DESC LIMIT $4"
            ))
            .await?;
        let rows = client
            .query(
                &statement,
                &[
                    &account,
                    &self.clock.now_millis(),
                    &before.unwrap_or(i64::MAX),
                    &(limit as i64 + 1),
                ],
            )
            .await?
            .iter()
            .map(|row| Ok((row.try_get::<_, i64>(9)?, capability(row)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(into_page(rows, limit))
    }

    /// Deletes expired sessions, revocations and capabilities, and keeps the change log to
    /// its newest [`CHANGES_KEPT`] rows; how many expired rows went.
    pub async fn sweep_expired(&self) -> Result<usize, StoreError> {
        let now_ms = self.clock.now_millis();
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let sessions = tx
            .execute("DELETE FROM sessions WHERE expires_at <= $1", &[&now_ms])
            .await?;
        let revoked = tx
            .execute(
                "DELETE FROM revoked_tokens WHERE expires_at <= $1",
                &[&(now_ms / 1000)],
            )
            .await?;
        let capabilities = tx
            .execute(
                "DELETE FROM capabilities WHERE expires_at <= $1",
                &[&now_ms],
            )
            .await?;
        tx.execute(
            "DELETE FROM changes WHERE seq <= (SELECT seq FROM changes_head) - $1",
            &[&CHANGES_KEPT],
        )
        .await?;
        tx.commit().await?;
        drop(client);
        self.sweep_dead_leases().await?;
        Ok((sessions + revoked + capabilities) as usize)
    }

    /// Deletes idempotency keys older than their retention.
    pub async fn sweep_idempotency_keys(&self) -> Result<usize, StoreError> {
        let now = self.clock.now_millis();
        let client = self.client().await?;
        let deleted = client
            .execute(
                "DELETE FROM idempotency_keys WHERE created_at < $1
                 AND (status IS NOT NULL OR lease_expires_at < $2)",
                &[&(now - crate::store::idempotency::RETENTION_MS), &now],
            )
            .await?;
        Ok(deleted as usize)
    }
}
