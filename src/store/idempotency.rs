//! Idempotency-Key records: the answer to the first request with a key is stored in the same
//! transaction as the payment it created, so a retry — even after a crash — replays that
//! answer instead of paying twice. The key is looked up, and taken, inside that transaction:
//! concurrent requests with one key are serialised by the write lock, and every one after
//! the first finds the answer.
//!
//! Rows without an answer are written only by paygate versions before 0.2, which claimed a
//! key (a lease) before committing the payment; during a rolling upgrade such a claim may
//! still be live. A live lease is respected (409, still in flight); one that lapsed (its
//! 30 s passed: the holder died) is taken over.

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::{SqliteStore, StoreError};

/// How long answered keys are kept (at least; the sweeper runs periodically).
pub const RETENTION_MS: i64 = 24 * 3600 * 1000;

/// A stored answer to replay.
#[derive(Debug, Clone)]
pub struct StoredResponse {
    pub status: u16,
    pub body: String,
    pub location: Option<String>,
}

/// A request under an Idempotency-Key.
#[derive(Debug, Clone)]
pub struct KeyedRequest {
    pub user: i64,
    pub key: String,
    /// SHA-256 of the validated request the key is bound to.
    pub request_hash: [u8; 32],
}

/// What an earlier use of the key decides for this request.
#[derive(Debug)]
pub enum EarlierUse {
    /// The key was answered for the same request: replay this.
    Replay(StoredResponse),
    /// An older version's request holds the key right now.
    InFlight,
    /// The key was used for a different request.
    Mismatch,
}

/// Inside the caller's write transaction: what an earlier use of the key decides, if there
/// was one; `None` when the key is free (an older version's lapsed claim is cleared), and
/// the caller goes ahead and then stores its answer with [`store_answer`].
pub(super) fn earlier_use(
    conn: &Connection,
    keyed: &KeyedRequest,
    now: i64,
) -> Result<Option<EarlierUse>, StoreError> {
    let existing = conn
        .prepare_cached(
            "SELECT request_hash, lease_expires_at, status, response_body, location
             FROM idempotency_keys WHERE user_id = ?1 AND key = ?2",
        )?
        .query_row(params![keyed.user, keyed.key], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, Option<i64>>(1)?,
                r.get::<_, Option<u16>>(2)?,
                r.get::<_, Option<String>>(3)?,
                r.get::<_, Option<String>>(4)?,
            ))
        })
        .optional()?;
    match existing {
        None => {}
        Some((hash, _, _, _, _)) if hash != keyed.request_hash => {
            return Ok(Some(EarlierUse::Mismatch))
        }
        Some((_, _, Some(status), Some(body), location)) => {
            return Ok(Some(EarlierUse::Replay(StoredResponse {
                status,
                body,
                location,
            })))
        }
        Some((_, Some(expires), _, _, _)) if expires > now => {
            return Ok(Some(EarlierUse::InFlight))
        }
        Some(_) => {
            // An older version's claim whose holder died before committing anything.
            conn.prepare_cached("DELETE FROM idempotency_keys WHERE user_id = ?1 AND key = ?2")?
                .execute(params![keyed.user, keyed.key])?;
        }
    }
    Ok(None)
}

/// Inside the same transaction: stores `response` as the answer under the key.
pub(super) fn store_answer(
    conn: &Connection,
    keyed: &KeyedRequest,
    response: &StoredResponse,
    now: i64,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO idempotency_keys
           (user_id, key, request_hash, status, response_body, location, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        keyed.user,
        keyed.key,
        &keyed.request_hash[..],
        response.status,
        response.body,
        response.location,
        now
    ])?;
    Ok(())
}

impl SqliteStore {
    /// Deletes keys older than the retention period; returns how many.
    pub async fn sweep_idempotency_keys(&self) -> Result<usize, StoreError> {
        let clock = self.clock.clone();
        self.run(move |conn| {
            let now = clock.now_millis();
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
    fn first_use_stores_the_answer_later_ones_replay_or_mismatch() {
        let (store, dir) = temp_store();
        let keyed = |hash: [u8; 32]| KeyedRequest {
            user: 1,
            key: "k".into(),
            request_hash: hash,
        };
        // What a payment's transaction does with a key: decide, or store its answer.
        let take = |k: &KeyedRequest, body: &str, now| {
            let response = StoredResponse {
                status: 201,
                body: body.into(),
                location: Some("/x".into()),
            };
            store.run_blocking(|c| {
                let tx = c.transaction()?;
                let earlier = earlier_use(&tx, k, now)?;
                if earlier.is_none() {
                    store_answer(&tx, k, &response, now)?;
                }
                tx.commit()?;
                Ok(earlier)
            })
        };
        store
            .run_blocking(|c| {
                c.execute_batch(
                    "INSERT INTO users (id, username, password_hash, created_at)
                     VALUES (1, 'u1', 'x', 0);
                     INSERT INTO idempotency_keys (user_id, key, request_hash, lease,
                                                   lease_expires_at, created_at)
                     VALUES (1, 'old', x'0101010101010101010101010101010101010101010101010101010101010101', 'l', 100, 0);",
                )?;
                Ok(())
            })
            .unwrap();
        assert!(take(&keyed([1; 32]), "first", 0).unwrap().is_none());
        let Some(EarlierUse::Replay(stored)) = take(&keyed([1; 32]), "second", 1).unwrap() else {
            panic!("the same request replays")
        };
        assert_eq!(stored.body, "first");
        assert_eq!(stored.location.as_deref(), Some("/x"));
        assert!(matches!(
            take(&keyed([2; 32]), "other", 1).unwrap(),
            Some(EarlierUse::Mismatch)
        ));
        // An older version's live claim is respected; a lapsed one is taken over.
        let old = KeyedRequest {
            key: "old".into(),
            ..keyed([1; 32])
        };
        assert!(matches!(
            take(&old, "new", 99).unwrap(),
            Some(EarlierUse::InFlight)
        ));
        assert!(take(&old, "new", 101).unwrap().is_none());
        let Some(EarlierUse::Replay(stored)) = take(&old, "newer", 102).unwrap() else {
            panic!("taken over and answered")
        };
        assert_eq!(stored.body, "new");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
