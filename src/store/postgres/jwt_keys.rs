//! JWT signing keys in PostgreSQL, sealed under the nodes' sealing key (see
//! `sql/postgres/001_init.sql`): the key set `tokens::keys` keeps in `jwt-keys.json` on a
//! single machine, shared here by every node.

use super::PgStore;
use crate::store::StoreError;

/// The advisory lock key-set changes take, so that nodes starting together create one
/// first key and rotations on two nodes at once both succeed, one after the other (a
/// constant of paygate's own).
const KEYS_LOCK: i64 = 0x7061_7967_6174_6503;

/// One signing key, unsealed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtKeyRow {
    pub kid: String,
    pub secret: Vec<u8>,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds when a newer key became current; `None` for the current key.
    pub retired_at: Option<i64>,
}

impl PgStore {
    /// Every key, oldest first, unsealed. A key that does not open (another sealing key,
    /// or an edited row) is an error naming it: nodes must hold the same sealing key.
    pub async fn jwt_keys(&self) -> Result<Vec<JwtKeyRow>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT kid, sealed, created_at, retired_at FROM jwt_keys
                 ORDER BY created_at, kid",
            )
            .await?;
        client
            .query(&statement, &[])
            .await?
            .iter()
            .map(|r| {
                let kid: String = r.try_get(0)?;
                let sealed: Vec<u8> = r.try_get(1)?;
                Ok(JwtKeyRow {
                    secret: self.totp_keys.unseal_jwt_key(&kid, &sealed)?,
                    kid,
                    created_at: r.try_get(2)?,
                    retired_at: r.try_get(3)?,
                })
            })
            .collect()
    }

    /// Stores `kid` as the first key unless there is one already (nodes starting together
    /// create one between them); whether this call created it.
    pub async fn ensure_jwt_key(
        &self,
        kid: &str,
        secret: &[u8],
        now_s: i64,
    ) -> Result<bool, StoreError> {
        let sealed = self.totp_keys.seal_jwt_key(kid, secret)?;
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&KEYS_LOCK])
            .await?;
        let inserted = tx
            .execute(
                "INSERT INTO jwt_keys (kid, sealed, created_at)
                 SELECT $1, $2, $3 WHERE NOT EXISTS (SELECT 1 FROM jwt_keys)",
                &[&kid, &sealed, &now_s],
            )
            .await?;
        tx.commit().await?;
        Ok(inserted == 1)
    }

    /// Makes `kid` the current key and retires the one before it, in one transaction.
    pub async fn rotate_jwt_key(
        &self,
        kid: &str,
        secret: &[u8],
        now_s: i64,
    ) -> Result<(), StoreError> {
        let sealed = self.totp_keys.seal_jwt_key(kid, secret)?;
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&KEYS_LOCK])
            .await?;
        tx.execute(
            "UPDATE jwt_keys SET retired_at = $1 WHERE retired_at IS NULL",
            &[&now_s],
        )
        .await?;
        tx.execute(
            "INSERT INTO jwt_keys (kid, sealed, created_at) VALUES ($1, $2, $3)",
            &[&kid, &sealed, &now_s],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Re-seals every TOTP secret (active and pending) and every JWT signing key under the
    /// sealing key `id`, in one transaction; returns how many users and keys. Something
    /// that does not open stops it with nothing changed.
    pub async fn reseal_all(&self, id: u32) -> Result<(usize, usize), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&KEYS_LOCK])
            .await?;
        let users = tx
            .query(
                "SELECT id, totp_secret, totp_pending FROM users
                  WHERE totp_secret IS NOT NULL OR totp_pending IS NOT NULL
                  FOR UPDATE",
                &[],
            )
            .await?;
        for row in &users {
            let user: i64 = row.try_get(0)?;
            let reseal = |column: usize| -> Result<Option<Vec<u8>>, StoreError> {
                let stored: Option<Vec<u8>> = row.try_get(column)?;
                stored
                    .map(|v| self.totp_keys.reseal(id, user, &v))
                    .transpose()
            };
            let (active, pending) = (reseal(1)?, reseal(2)?);
            tx.execute(
                "UPDATE users SET totp_secret = $2, totp_pending = $3 WHERE id = $1",
                &[&user, &active, &pending],
            )
            .await?;
        }
        let keys = tx
            .query("SELECT kid, sealed FROM jwt_keys FOR UPDATE", &[])
            .await?;
        for row in &keys {
            let kid: String = row.try_get(0)?;
            let sealed: Vec<u8> = row.try_get(1)?;
            let resealed = self.totp_keys.reseal_jwt_key(id, &kid, &sealed)?;
            tx.execute(
                "UPDATE jwt_keys SET sealed = $2 WHERE kid = $1",
                &[&kid, &resealed],
            )
            .await?;
        }
        tx.commit().await?;
        Ok((users.len(), keys.len()))
    }

    /// Deletes keys retired before `retired_before` (Unix seconds); the kids deleted.
    pub async fn prune_jwt_keys(&self, retired_before: i64) -> Result<Vec<String>, StoreError> {
        let client = self.client().await?;
        client
            .query(
                "DELETE FROM jwt_keys WHERE retired_at < $1 RETURNING kid",
                &[&retired_before],
            )
            .await?
            .iter()
            .map(|r| Ok(r.try_get(0)?))
            .collect()
    }
}
