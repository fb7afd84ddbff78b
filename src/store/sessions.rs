//! Login state: opaque sessions (stored as hashes), revoked JWT ids and TOTP secrets. (The
//! change counter that lets a worker cache it exactly is `data_version`.)

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::{Store, StoreError};
use crate::domain::Role;

/// The user a token speaks for, as the database has them now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    pub user_id: i64,
    pub username: String,
    pub role: Option<Role>,
    pub disabled: bool,
}

/// A stored opaque session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRow {
    pub subject: Subject,
    /// Space-separated `amr` values.
    pub amr: String,
    /// Unix milliseconds.
    pub expires_at: i64,
}

/// A user's TOTP enrolment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TotpState {
    pub active: Option<Vec<u8>>,
    pub pending: Option<Vec<u8>>,
    pub last_step: Option<i64>,
}

fn subject(row: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<(Subject, Option<String>)> {
    Ok((
        Subject {
            user_id: row.get(first)?,
            username: row.get(first + 1)?,
            role: None,
            disabled: row.get(first + 3)?,
        },
        row.get(first + 2)?,
    ))
}

fn with_role((mut subject, role): (Subject, Option<String>)) -> Result<Subject, StoreError> {
    subject.role = super::users::role_of(subject.user_id, role.as_deref())?;
    Ok(subject)
}

impl Store {
    /// Stores a new opaque session.
    pub async fn create_session(
        &self,
        token_hash: [u8; 32],
        user_id: i64,
        amr: String,
        expires_at: i64,
    ) -> Result<(), StoreError> {
        let clock = self.clock.clone();
        self.run(move |conn| {
            conn.prepare_cached(
                "INSERT INTO sessions (token_hash, user_id, amr, created_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![
                token_hash,
                user_id,
                amr,
                clock.now_millis(),
                expires_at
            ])?;
            Ok(())
        })
        .await
    }

    /// Ends an opaque session; false if it did not exist (any more).
    pub async fn end_session(&self, token_hash: [u8; 32]) -> Result<bool, StoreError> {
        self.run(move |conn| {
            Ok(conn
                .prepare_cached("DELETE FROM sessions WHERE token_hash = ?1")?
                .execute([token_hash])?
                > 0)
        })
        .await
    }

    /// The session a token hash names, with its user.
    pub async fn session(&self, token_hash: [u8; 32]) -> Result<Option<SessionRow>, StoreError> {
        self.run(move |conn| {
            let row = conn
                .prepare_cached(
                    "SELECT u.id, u.username, u.role, u.disabled, s.amr, s.expires_at
                     FROM sessions s JOIN users u ON u.id = s.user_id
                     WHERE s.token_hash = ?1",
                )?
                .query_row([token_hash], |r| {
                    Ok((subject(r, 0)?, r.get::<_, String>(4)?, r.get::<_, i64>(5)?))
                })
                .optional()?;
            row.map(|(s, amr, expires_at)| {
                Ok(SessionRow {
                    subject: with_role(s)?,
                    amr,
                    expires_at,
                })
            })
            .transpose()
        })
        .await
    }

    /// Revokes a JWT id until `expires_at` (Unix seconds).
    pub async fn revoke_jti(&self, jti: String, expires_at: i64) -> Result<(), StoreError> {
        self.run(move |conn| {
            conn.prepare_cached(
                "INSERT INTO revoked_tokens (jti, expires_at) VALUES (?1, ?2)
                 ON CONFLICT (jti) DO NOTHING",
            )?
            .execute(params![jti, expires_at])?;
            Ok(())
        })
        .await
    }

    /// The user a JWT names, and whether its `jti` was revoked; `None` for no such user.
    pub async fn jwt_subject(
        &self,
        username: String,
        jti: String,
    ) -> Result<Option<(Subject, bool)>, StoreError> {
        self.run(move |conn| {
            let row = conn
                .prepare_cached(
                    "SELECT id, username, role, disabled,
                            EXISTS (SELECT 1 FROM revoked_tokens WHERE jti = ?2)
                     FROM users WHERE username = ?1",
                )?
                .query_row(params![username, jti], |r| {
                    Ok((subject(r, 0)?, r.get::<_, bool>(4)?))
                })
                .optional()?;
            row.map(|(s, revoked)| Ok((with_role(s)?, revoked)))
                .transpose()
        })
        .await
    }

    /// The user with id `user_id` as authentication sees them (for access control's last
    /// look at whether they were disabled meanwhile).
    pub async fn subject(&self, user_id: i64) -> Result<Option<Subject>, StoreError> {
        self.run(move |conn| {
            let row = conn
                .prepare_cached("SELECT id, username, role, disabled FROM users WHERE id = ?1")?
                .query_row([user_id], |r| subject(r, 0))
                .optional()?;
            row.map(with_role).transpose()
        })
        .await
    }

    /// Deletes expired sessions, JWT revocations and capabilities; returns how many rows
    /// went. (A capability's descendants never outlive it, so one statement removes whole
    /// expired trees and the parent references stay intact.)
    pub async fn sweep_sessions(&self) -> Result<usize, StoreError> {
        let clock = self.clock.clone();
        self.run(move |conn| {
            let now_ms = clock.now_millis();
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let sessions = tx.execute("DELETE FROM sessions WHERE expires_at <= ?1", [now_ms])?;
            let revoked = tx.execute(
                "DELETE FROM revoked_tokens WHERE expires_at <= ?1",
                [now_ms / 1000],
            )?;
            let capabilities =
                tx.execute("DELETE FROM capabilities WHERE expires_at <= ?1", [now_ms])?;
            tx.commit()?;
            Ok(sessions + revoked + capabilities)
        })
        .await
    }

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
    use super::*;
    use crate::domain::Username;
    use crate::store::test_support::temp_store;
    use crate::store::{NewUser, UserInsert};

    fn user(store: &Store, name: &str) -> i64 {
        let new = NewUser {
            username: Username::parse("username", name).unwrap(),
            password_hash: "$argon2id$dummy".into(),
            role: None,
        };
        match store.create_user_blocking(&new).unwrap() {
            UserInsert::Created(u) => u.id,
            UserInsert::UsernameTaken => unreachable!(),
        }
    }

    #[tokio::test]
    async fn sessions_revocations_and_disabling() {
        let (store, dir) = temp_store();
        let alice = user(&store, "alice");
        let far = crate::time::now_millis() + 3_600_000;
        store
            .create_session([1; 32], alice, "pwd".into(), far)
            .await
            .unwrap();
        let row = store.session([1; 32]).await.unwrap().unwrap();
        assert_eq!(row.subject.username, "alice");
        assert!(store.session([2; 32]).await.unwrap().is_none());

        let (subject, revoked) = store
            .jwt_subject("alice".into(), "j1".into())
            .await
            .unwrap()
            .unwrap();
        assert!(!revoked && !subject.disabled);
        store.revoke_jti("j1".into(), i64::MAX).await.unwrap();
        store.revoke_jti("j1".into(), i64::MAX).await.unwrap();
        let (_, revoked) = store
            .jwt_subject("alice".into(), "j1".into())
            .await
            .unwrap()
            .unwrap();
        assert!(revoked);

        assert!(store.disable_user_blocking("alice").unwrap());
        assert!(!store.disable_user_blocking("nobody").unwrap());
        assert!(store.session([1; 32]).await.unwrap().is_none());
        let (subject, _) = store
            .jwt_subject("alice".into(), "j2".into())
            .await
            .unwrap()
            .unwrap();
        assert!(subject.disabled);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn the_sweeper_removes_only_what_expired() {
        let (store, dir) = temp_store();
        let alice = user(&store, "alice");
        let now = crate::time::now_millis();
        store
            .create_session([1; 32], alice, "pwd".into(), now - 1)
            .await
            .unwrap();
        store
            .create_session([2; 32], alice, "pwd".into(), now + 60_000)
            .await
            .unwrap();
        store
            .revoke_jti("old".into(), now / 1000 - 1)
            .await
            .unwrap();
        store
            .revoke_jti("new".into(), now / 1000 + 60)
            .await
            .unwrap();
        assert_eq!(store.sweep_sessions().await.unwrap(), 2);
        assert!(store.session([2; 32]).await.unwrap().is_some());
        std::fs::remove_dir_all(dir).unwrap();
    }

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
