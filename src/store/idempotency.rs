//! Idempotency-Key records: the first request with a key claims it (a lease), and the answer
//! it gives is stored in the same transaction as the payment it created, so a retry — even
//! after a crash — replays that answer instead of paying twice.
//!
//! A lease that outlives its holder (the process died between claiming and committing) lapses
//! after [`LEASE_MS`]; until then a retry is told the request is still in flight (409).

use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};

use super::{Store, StoreError};

/// How long a claim protects a key from concurrent use before it is presumed abandoned.
pub const LEASE_MS: i64 = 30_000;

/// How long answered keys are kept (at least; the sweeper runs periodically).
pub const RETENTION_MS: i64 = 24 * 3600 * 1000;

/// A stored answer to replay.
#[derive(Debug, Clone)]
pub struct StoredResponse {
    pub status: u16,
    pub body: String,
    pub location: Option<String>,
}

/// What claiming a key found.
#[derive(Debug)]
pub enum IdempotencyClaim {
    /// The caller now holds the key and must complete or release it.
    Claimed,
    /// The key was already answered for the same request: replay this.
    Replay(StoredResponse),
    /// Another request with this key is being processed right now.
    InFlight,
    /// The key was used for a different request.
    Mismatch,
}

/// The answer to record when the payment commits.
#[derive(Debug, Clone)]
pub struct Completion {
    pub user: i64,
    pub key: String,
    pub lease: String,
    pub response: StoredResponse,
}

/// Records the answer under the caller's lease, inside the caller's transaction. Returns
/// false when the lease is no longer ours (it lapsed and another request took the key).
pub(super) fn complete(tx: &Transaction<'_>, done: &Completion) -> Result<bool, StoreError> {
    let updated = tx.execute(
        "UPDATE idempotency_keys
         SET status = ?1, response_body = ?2, location = ?3, lease = NULL, lease_expires_at = NULL
         WHERE user_id = ?4 AND key = ?5 AND lease = ?6",
        params![
            done.response.status,
            done.response.body,
            done.response.location,
            done.user,
            done.key,
            done.lease
        ],
    )?;
    Ok(updated == 1)
}

fn claim(
    conn: &mut Connection,
    user: i64,
    key: &str,
    request_hash: &[u8; 32],
    lease: &str,
    now: i64,
) -> Result<IdempotencyClaim, StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let existing = tx
        .query_row(
            "SELECT request_hash, lease_expires_at, status, response_body, location
             FROM idempotency_keys WHERE user_id = ?1 AND key = ?2",
            params![user, key],
            |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, Option<i64>>(1)?,
                    r.get::<_, Option<u16>>(2)?,
                    r.get::<_, Option<String>>(3)?,
                    r.get::<_, Option<String>>(4)?,
                ))
            },
        )
        .optional()?;
    let outcome = match existing {
        None => {
            tx.execute(
                "INSERT INTO idempotency_keys (user_id, key, request_hash, lease, lease_expires_at, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![user, key, &request_hash[..], lease, now + LEASE_MS, now],
            )?;
            IdempotencyClaim::Claimed
        }
        Some((hash, _, _, _, _)) if hash != request_hash => IdempotencyClaim::Mismatch,
        Some((_, _, Some(status), Some(body), location)) => {
            IdempotencyClaim::Replay(StoredResponse {
                status,
                body,
                location,
            })
        }
        Some((_, Some(expires), _, _, _)) if expires > now => IdempotencyClaim::InFlight,
        Some(_) => {
            // The previous holder never completed and its lease lapsed: it crashed or failed
            // before committing anything, so this request may try again.
            tx.execute(
                "UPDATE idempotency_keys SET lease = ?1, lease_expires_at = ?2
                 WHERE user_id = ?3 AND key = ?4",
                params![lease, now + LEASE_MS, user, key],
            )?;
            IdempotencyClaim::Claimed
        }
    };
    tx.commit()?;
    Ok(outcome)
}

impl Store {
    /// Claims `key` for a request whose content hashes to `request_hash`.
    pub async fn claim_idempotency_key(
        &self,
        user: i64,
        key: String,
        request_hash: [u8; 32],
        lease: String,
    ) -> Result<IdempotencyClaim, StoreError> {
        self.run(move |conn| {
            claim(
                conn,
                user,
                &key,
                &request_hash,
                &lease,
                crate::time::now_millis(),
            )
        })
        .await
    }

    /// Gives up a claim without an answer (the request failed before creating anything), so
    /// that a retry need not wait for the lease to lapse.
    pub async fn release_idempotency_key(
        &self,
        user: i64,
        key: String,
        lease: String,
    ) -> Result<(), StoreError> {
        self.run(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute(
                "DELETE FROM idempotency_keys WHERE user_id = ?1 AND key = ?2 AND lease = ?3
                 AND status IS NULL",
                params![user, key, lease],
            )?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Deletes keys older than the retention period; returns how many.
    pub async fn sweep_idempotency_keys(&self) -> Result<usize, StoreError> {
        self.run(|conn| {
            let now = crate::time::now_millis();
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let deleted = tx.execute(
                "DELETE FROM idempotency_keys WHERE created_at < ?1
                 AND (status IS NOT NULL OR lease_expires_at < ?2)",
                params![now - RETENTION_MS, now],
            )?;
            tx.commit()?;
            Ok(deleted)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_support::temp_store;

    #[test]
    fn claim_replay_mismatch_and_lapsed_leases() {
        let (store, dir) = temp_store();
        store
            .run_blocking(|c| {
                c.execute(
                    "INSERT INTO users (id, username, password_hash, created_at) VALUES (1, 'u1', 'x', 0)",
                    [],
                )?;
                Ok(())
            })
            .unwrap();
        let (h1, h2) = ([1u8; 32], [2u8; 32]);
        let claim_at = |lease: &str, hash: &[u8; 32], now| {
            store.run_blocking(|c| claim(c, 1, "k", hash, lease, now))
        };
        assert!(matches!(
            claim_at("a", &h1, 0).unwrap(),
            IdempotencyClaim::Claimed
        ));
        assert!(matches!(
            claim_at("b", &h1, 1).unwrap(),
            IdempotencyClaim::InFlight
        ));
        assert!(matches!(
            claim_at("b", &h2, 1).unwrap(),
            IdempotencyClaim::Mismatch
        ));
        // The holder vanished: after the lease lapses another request may take the key ...
        assert!(matches!(
            claim_at("b", &h1, LEASE_MS + 1).unwrap(),
            IdempotencyClaim::Claimed
        ));
        // ... and the old holder can no longer complete it.
        let completion = |lease: &str| Completion {
            user: 1,
            key: "k".into(),
            lease: lease.into(),
            response: StoredResponse {
                status: 201,
                body: "{}".into(),
                location: None,
            },
        };
        let done = |lease: &str| {
            store.run_blocking(|c| {
                let tx = c.transaction()?;
                let ok = complete(&tx, &completion(lease))?;
                tx.commit()?;
                Ok(ok)
            })
        };
        assert!(!done("a").unwrap());
        assert!(done("b").unwrap());
        let IdempotencyClaim::Replay(stored) = claim_at("c", &h1, LEASE_MS + 2).unwrap() else {
            panic!("answered keys replay")
        };
        assert_eq!((stored.status, stored.body.as_str()), (201, "{}"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
