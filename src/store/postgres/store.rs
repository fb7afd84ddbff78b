//! The PostgreSQL store: the same operations, answers and guarantees as the SQLite one,
//! run on the worker's runtime through the pool. Checked against the SQLite store by the
//! conformance suite (`tests/store_conformance.rs`).
//!
//! Users, sessions, revocations and TOTP state here; accounts and grants in `accounts`,
//! payments and idempotency keys in `payments`.

use std::sync::Arc;

use deadpool_postgres::{Pool, PoolError};
use tokio_postgres::error::SqlState;
use tokio_postgres::Row;

use super::{error_text, open_pool, DatabaseUrl};
use crate::domain::Role;
use crate::store::sealing::TotpKeys;
use crate::store::users::role_of;
use crate::store::{NewUser, SessionRow, StoreError, Subject, TotpState, User, UserInsert};
use crate::time::Clock;

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        let Some(db) = e.as_db_error() else {
            // No answer from the server: the connection is closed, timed out or broken.
            return StoreError::Unreachable(error_text(&e));
        };
        let code = db.code();
        let class = &code.code()[..2];
        if *code == SqlState::T_R_SERIALIZATION_FAILURE
            || *code == SqlState::T_R_DEADLOCK_DETECTED
            || *code == SqlState::LOCK_NOT_AVAILABLE
            || *code == SqlState::TOO_MANY_CONNECTIONS
        {
            StoreError::Busy
        } else if matches!(class, "08" | "57" | "53")
            || *code == SqlState::READ_ONLY_SQL_TRANSACTION
        {
            // Connection exceptions, operator intervention (shutdown, a standby being
            // promoted), insufficient resources, or a primary that became a standby.
            StoreError::Unreachable(error_text(&e))
        } else {
            StoreError::Database(error_text(&e))
        }
    }
}

impl From<PoolError> for StoreError {
    fn from(e: PoolError) -> Self {
        match e {
            PoolError::Backend(e) => e.into(),
            // Every connection in use and none freed in time: overload, worth a retry.
            PoolError::Timeout(deadpool_postgres::TimeoutType::Wait) => StoreError::Busy,
            // A new connection (or the check of an old one) got no answer in time: the
            // server is down, starting, or cut off.
            PoolError::Timeout(_) => {
                StoreError::Unreachable("the database did not answer in time".into())
            }
            other => StoreError::Unreachable(other.to_string()),
        }
    }
}

/// Users, sessions, revocations and TOTP state in PostgreSQL; cheap to clone.
#[derive(Clone)]
pub struct PgStore {
    pub(super) pool: Pool,
    /// The keys TOTP secrets are sealed under: never stored in the database.
    pub(super) totp_keys: Arc<TotpKeys>,
    pub(super) clock: Clock,
    /// The node's group-commit queue for payment creation.
    pub(super) payments: super::payments::Queue,
    /// Where the database is, for connections outside the pool (change notifications).
    pub(super) url: Arc<DatabaseUrl>,
}

fn subject(row: &Row, first: usize) -> Result<Subject, StoreError> {
    let user_id: i64 = row.try_get(first)?;
    let role: Option<String> = row.try_get(first + 2)?;
    Ok(Subject {
        user_id,
        username: row.try_get(first + 1)?,
        role: role_of(user_id, role.as_deref())?,
        disabled: row.try_get(first + 3)?,
    })
}

impl PgStore {
    /// Connects to `url` with up to `pool_size` connections and brings the schema up to date.
    pub async fn open(
        url: &DatabaseUrl,
        pool_size: usize,
        totp_keys: Arc<TotpKeys>,
        clock: Clock,
    ) -> Result<PgStore, StoreError> {
        let pool = open_pool(url, pool_size).await?;
        let payments = Arc::new(super::payments::PaymentQueue::start(
            pool.clone(),
            clock.clone(),
        ));
        Ok(PgStore {
            pool,
            totp_keys,
            clock,
            payments,
            url: Arc::new(url.clone()),
        })
    }

    /// Whether the database answers: one round trip on a pooled connection.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.client().await?.simple_query("").await?;
        Ok(())
    }

    /// The rate-limit store on this store's pool.
    pub fn rate_store(&self) -> super::PgRateStore {
        super::PgRateStore::from_pool(self.pool.clone())
    }

    pub(super) async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        Ok(self.pool.get().await?)
    }

    pub async fn create_user(&self, new: NewUser) -> Result<UserInsert, StoreError> {
        let now = self.clock.now_millis();
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "INSERT INTO users (username, password_hash, role, created_at)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (username) DO NOTHING RETURNING id",
            )
            .await?;
        let row = client
            .query_opt(
                &statement,
                &[
                    &new.username.as_str(),
                    &new.password_hash,
                    &new.role.map(Role::as_str),
                    &now,
                ],
            )
            .await?;
        let Some(row) = row else {
            return Ok(UserInsert::UsernameTaken);
        };
        Ok(UserInsert::Created(User {
            id: row.try_get(0)?,
            username: new.username.as_str().to_owned(),
            password_hash: new.password_hash,
            role: new.role,
            disabled: false,
            created_at: now,
            totp_secret: None,
        }))
    }

    /// Disables `username` and ends their sessions, in one transaction.
    pub async fn disable_user(&self, username: String) -> Result<bool, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let Some(row) = tx
            .query_opt(
                "UPDATE users SET disabled = true WHERE username = $1 RETURNING id",
                &[&username],
            )
            .await?
        else {
            return Ok(false);
        };
        let id: i64 = row.try_get(0)?;
        tx.execute("DELETE FROM sessions WHERE user_id = $1", &[&id])
            .await?;
        tx.commit().await?;
        drop(client);
        self.applied_everywhere().await;
        Ok(true)
    }

    pub async fn user_by_name(&self, username: String) -> Result<Option<User>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT id, username, password_hash, role, disabled, created_at, totp_secret
                 FROM users WHERE username = $1",
            )
            .await?;
        let Some(row) = client.query_opt(&statement, &[&username]).await? else {
            return Ok(None);
        };
        let id: i64 = row.try_get(0)?;
        let role: Option<String> = row.try_get(3)?;
        let stored: Option<Vec<u8>> = row.try_get(6)?;
        Ok(Some(User {
            id,
            username: row.try_get(1)?,
            password_hash: row.try_get(2)?,
            role: role_of(id, role.as_deref())?,
            disabled: row.try_get(4)?,
            created_at: row.try_get(5)?,
            totp_secret: stored
                .map(|s| self.totp_keys.open_stored(id, &s))
                .transpose()?,
        }))
    }

    pub async fn create_session(
        &self,
        token_hash: [u8; 32],
        user_id: i64,
        amr: String,
        expires_at: i64,
    ) -> Result<(), StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "INSERT INTO sessions (token_hash, user_id, amr, created_at, expires_at)
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .await?;
        client
            .execute(
                &statement,
                &[
                    &&token_hash[..],
                    &user_id,
                    &amr,
                    &self.clock.now_millis(),
                    &expires_at,
                ],
            )
            .await?;
        Ok(())
    }

    pub async fn end_session(&self, token_hash: [u8; 32]) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached("DELETE FROM sessions WHERE token_hash = $1")
            .await?;
        let ended = client.execute(&statement, &[&&token_hash[..]]).await? > 0;
        drop(client);
        if ended {
            self.applied_everywhere().await;
        }
        Ok(ended)
    }

    pub async fn session(&self, token_hash: [u8; 32]) -> Result<Option<SessionRow>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT u.id, u.username, u.role, u.disabled, s.amr, s.expires_at
                 FROM sessions s JOIN users u ON u.id = s.user_id
                 WHERE s.token_hash = $1",
            )
            .await?;
        let Some(row) = client.query_opt(&statement, &[&&token_hash[..]]).await? else {
            return Ok(None);
        };
        Ok(Some(SessionRow {
            subject: subject(&row, 0)?,
            amr: row.try_get(4)?,
            expires_at: row.try_get(5)?,
        }))
    }

    pub async fn revoke_jti(&self, jti: String, expires_at: i64) -> Result<(), StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "INSERT INTO revoked_tokens (jti, expires_at) VALUES ($1, $2)
                 ON CONFLICT (jti) DO NOTHING",
            )
            .await?;
        client.execute(&statement, &[&jti, &expires_at]).await?;
        drop(client);
        self.applied_everywhere().await;
        Ok(())
    }

    pub async fn jwt_subject(
        &self,
        username: String,
        jti: String,
    ) -> Result<Option<(Subject, bool)>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT id, username, role, disabled,
                        EXISTS (SELECT 1 FROM revoked_tokens WHERE jti = $2)
                 FROM users WHERE username = $1",
            )
            .await?;
        let Some(row) = client.query_opt(&statement, &[&username, &jti]).await? else {
            return Ok(None);
        };
        Ok(Some((subject(&row, 0)?, row.try_get(4)?)))
    }

    pub async fn subject(&self, user_id: i64) -> Result<Option<Subject>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached("SELECT id, username, role, disabled FROM users WHERE id = $1")
            .await?;
        client
            .query_opt(&statement, &[&user_id])
            .await?
            .map(|row| subject(&row, 0))
            .transpose()
    }

    pub async fn totp_state(&self, user_id: i64) -> Result<TotpState, StoreError> {
        let client = self.client().await?;
        let Some(row) = client
            .query_opt(
                "SELECT totp_secret, totp_pending, totp_last_step FROM users WHERE id = $1",
                &[&user_id],
            )
            .await?
        else {
            return Ok(TotpState::default());
        };
        let open = |value: Option<Vec<u8>>| {
            value
                .map(|v| self.totp_keys.open_stored(user_id, &v))
                .transpose()
        };
        Ok(TotpState {
            active: open(row.try_get(0)?)?,
            pending: open(row.try_get(1)?)?,
            last_step: row.try_get(2)?,
        })
    }

    pub async fn set_pending_totp(&self, user_id: i64, secret: Vec<u8>) -> Result<(), StoreError> {
        let sealed = self.totp_keys.seal(user_id, &secret)?;
        let client = self.client().await?;
        client
            .execute(
                "UPDATE users SET totp_pending = $2 WHERE id = $1",
                &[&user_id, &sealed],
            )
            .await?;
        Ok(())
    }

    /// Moves the pending secret into place if it is still `secret`, recording `step` as
    /// used; `false` if another enrolment replaced it meanwhile.
    pub async fn confirm_totp(
        &self,
        user_id: i64,
        secret: Vec<u8>,
        step: i64,
    ) -> Result<bool, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // The row lock keeps a concurrent enrolment from slipping in between the check
        // and the move (sealed values differ even for one secret: compare what they hold).
        let pending: Option<Vec<u8>> = match tx
            .query_opt(
                "SELECT totp_pending FROM users WHERE id = $1 FOR UPDATE",
                &[&user_id],
            )
            .await?
        {
            Some(row) => row.try_get(0)?,
            None => None,
        };
        let still_pending = match pending {
            Some(stored) => self.totp_keys.open_stored(user_id, &stored)? == secret,
            None => false,
        };
        if !still_pending {
            return Ok(false);
        }
        tx.execute(
            "UPDATE users SET totp_secret = totp_pending, totp_pending = NULL,
                              totp_last_step = $2
             WHERE id = $1",
            &[&user_id, &step],
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Records `step` as used if it is newer than the last one: a code is accepted once,
    /// across every node.
    pub async fn use_totp_step(&self, user_id: i64, step: i64) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "UPDATE users SET totp_last_step = $2
                 WHERE id = $1 AND totp_secret IS NOT NULL
                   AND coalesce(totp_last_step, -1) < $2",
            )
            .await?;
        Ok(client.execute(&statement, &[&user_id, &step]).await? > 0)
    }
}
