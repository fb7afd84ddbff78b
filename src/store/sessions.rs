//! Login state: opaque sessions (stored as hashes) and revoked JWT ids, and the user a
//! token speaks for. (TOTP state is `totp`; deleting what expired is `sweep`.)

use rusqlite::{params, OptionalExtension};

use super::{SqliteStore, StoreError};
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

impl SqliteStore {
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
}

#[cfg(test)]
mod tests {
    use crate::store::test_support::{temp_store, user};

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
}
