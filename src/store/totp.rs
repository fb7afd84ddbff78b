//! A user's TOTP enrolment in the database: the pending and active secrets (sealed at rest,
//! see `sealing`) and the last step used, which makes each code single-use.

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::{SqliteStore, StoreError};

/// A user's TOTP enrolment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TotpState {
    pub active: Option<Vec<u8>>,
    pub pending: Option<Vec<u8>>,
    pub last_step: Option<i64>,
}

impl SqliteStore {
    /// A user's TOTP enrolment (secrets unsealed).
    pub async fn totp_state(&self, user_id: i64) -> Result<TotpState, StoreError> {
        let keys = self.totp_keys.clone();
        self.run(move |conn| {
            let stored = totp_state(conn, user_id)?;
            let open =
                |value: Option<Vec<u8>>| value.map(|v| keys.open_stored(user_id, &v)).transpose();
            Ok(TotpState {
                active: open(stored.active)?,
                pending: open(stored.pending)?,
                last_step: stored.last_step,
            })
        })
        .await
    }

    /// Sets the secret awaiting confirmation (replacing any earlier unconfirmed one),
    /// sealed.
    pub async fn set_pending_totp(&self, user_id: i64, secret: Vec<u8>) -> Result<(), StoreError> {
        let keys = self.totp_keys.clone();
        self.run(move |conn| {
            let sealed = keys.seal(user_id, &secret)?;
            conn.execute(
                "UPDATE users SET totp_pending = ?2 WHERE id = ?1",
                params![user_id, sealed],
            )?;
            Ok(())
        })
        .await
    }

    /// Makes `secret` the active one if it is still the pending secret, recording `step` as
    /// used. False when another enrolment replaced it meanwhile.
    pub async fn confirm_totp(
        &self,
        user_id: i64,
        secret: Vec<u8>,
        step: i64,
    ) -> Result<bool, StoreError> {
        let keys = self.totp_keys.clone();
        self.run(move |conn| {
            // Sealed values differ even for one secret (random nonces): compare what they
            // hold, in the transaction that moves the pending secret into place.
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let pending: Option<Vec<u8>> = tx
                .query_row(
                    "SELECT totp_pending FROM users WHERE id = ?1",
                    [user_id],
                    |r| r.get(0),
                )
                .optional()?
                .flatten();
            let still_pending = match pending {
                Some(stored) => keys.open_stored(user_id, &stored)? == secret,
                None => false,
            };
            if !still_pending {
                return Ok(false);
            }
            tx.execute(
                "UPDATE users SET totp_secret = totp_pending, totp_pending = NULL,
                                  totp_last_step = ?2
                 WHERE id = ?1",
                params![user_id, step],
            )?;
            tx.commit()?;
            Ok(true)
        })
        .await
    }

    /// Records that a code for `step` was used, unless that step (or a later one) already
    /// was: the compare-and-set that makes every code single-use across all workers.
    pub async fn use_totp_step(&self, user_id: i64, step: i64) -> Result<bool, StoreError> {
        self.run(move |conn| {
            Ok(conn
                .prepare_cached(
                    "UPDATE users SET totp_last_step = ?2
                     WHERE id = ?1 AND totp_secret IS NOT NULL
                       AND coalesce(totp_last_step, -1) < ?2",
                )?
                .execute(params![user_id, step])?
                > 0)
        })
        .await
    }
}

fn totp_state(conn: &Connection, user_id: i64) -> Result<TotpState, StoreError> {
    Ok(conn
        .query_row(
            "SELECT totp_secret, totp_pending, totp_last_step FROM users WHERE id = ?1",
            [user_id],
            |r| {
                Ok(TotpState {
                    active: r.get(0)?,
                    pending: r.get(1)?,
                    last_step: r.get(2)?,
                })
            },
        )
        .optional()?
        .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use crate::store::test_support::{temp_store, user};

    #[tokio::test]
    async fn a_totp_step_is_used_once_and_confirmation_needs_the_pending_secret() {
        let (store, dir) = temp_store();
        let alice = user(&store, "alice");
        assert!(
            !store.use_totp_step(alice, 10).await.unwrap(),
            "not enrolled"
        );
        store.set_pending_totp(alice, vec![1; 20]).await.unwrap();
        assert!(!store.confirm_totp(alice, vec![2; 20], 10).await.unwrap());
        assert!(store.confirm_totp(alice, vec![1; 20], 10).await.unwrap());
        let state = store.totp_state(alice).await.unwrap();
        assert_eq!(state.active, Some(vec![1; 20]));
        assert_eq!((state.pending, state.last_step), (None, Some(10)));
        assert!(!store.use_totp_step(alice, 10).await.unwrap(), "replay");
        assert!(!store.use_totp_step(alice, 9).await.unwrap(), "older step");
        assert!(store.use_totp_step(alice, 11).await.unwrap());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
