//! Users: registration, lookup by name for authentication, disabling.

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::{SqliteStore, StoreError};
use crate::domain::{Role, Username};

/// A user as authentication needs it.
#[derive(Debug, Clone)]
pub struct User {
    pub id: i64,
    pub username: String,
    /// Argon2id PHC string.
    pub password_hash: String,
    pub role: Option<Role>,
    pub disabled: bool,
    pub created_at: i64,
    /// The confirmed TOTP secret; when set, logging in needs a code too.
    pub totp_secret: Option<Vec<u8>>,
}

/// A user to create; the password is already hashed.
#[derive(Debug, Clone)]
pub struct NewUser {
    pub username: Username,
    pub password_hash: String,
    pub role: Option<Role>,
}

/// Result of creating a user.
#[derive(Debug)]
pub enum UserInsert {
    Created(User),
    UsernameTaken,
}

fn row_to_user(row: &rusqlite::Row<'_>) -> rusqlite::Result<(User, Option<String>)> {
    Ok((
        User {
            id: row.get(0)?,
            username: row.get(1)?,
            password_hash: row.get(2)?,
            role: None,
            disabled: row.get(4)?,
            created_at: row.get(5)?,
            totp_secret: row.get(6)?,
        },
        row.get(3)?,
    ))
}

/// A stored role column as a [`Role`].
pub(in crate::store) fn role_of(
    user_id: i64,
    stored: Option<&str>,
) -> Result<Option<Role>, StoreError> {
    stored
        .map(|raw| {
            Role::parse(raw).ok_or_else(|| {
                StoreError::Corrupt(format!("user {user_id} has unknown role {raw:?}"))
            })
        })
        .transpose()
}

fn with_role((mut user, role): (User, Option<String>)) -> Result<User, StoreError> {
    user.role = role_of(user.id, role.as_deref())?;
    Ok(user)
}

pub(super) fn insert(
    conn: &mut Connection,
    new: &NewUser,
    now: i64,
) -> Result<UserInsert, StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let inserted = tx.execute(
        "INSERT INTO users (username, password_hash, role, created_at) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (username) DO NOTHING",
        params![
            new.username.as_str(),
            new.password_hash,
            new.role.map(Role::as_str),
            now
        ],
    )?;
    if inserted == 0 {
        return Ok(UserInsert::UsernameTaken);
    }
    let id = tx.last_insert_rowid();
    tx.commit()?;
    Ok(UserInsert::Created(User {
        id,
        username: new.username.as_str().to_owned(),
        password_hash: new.password_hash.clone(),
        role: new.role,
        disabled: false,
        created_at: now,
        totp_secret: None,
    }))
}

pub(super) fn by_name(conn: &Connection, username: &str) -> Result<Option<User>, StoreError> {
    let row = conn
        .prepare_cached(
            "SELECT id, username, password_hash, role, disabled, created_at, totp_secret
             FROM users WHERE username = ?1",
        )?
        .query_row([username], row_to_user)
        .optional()?;
    row.map(with_role).transpose()
}

/// Disables a user and ends their sessions, in one transaction. Their JWTs and the
/// capabilities they minted stop working too: both check the user when used. Returns false
/// when no user has the name.
fn disable(conn: &mut Connection, username: &str) -> Result<bool, StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let Some(id) = tx
        .query_row(
            "UPDATE users SET disabled = 1 WHERE username = ?1 RETURNING id",
            [username],
            |r| r.get::<_, i64>(0),
        )
        .optional()?
    else {
        return Ok(false);
    };
    tx.execute("DELETE FROM sessions WHERE user_id = ?1", [id])?;
    tx.commit()?;
    Ok(true)
}

impl SqliteStore {
    /// Creates a user unless the name is taken.
    pub async fn create_user(&self, new: NewUser) -> Result<UserInsert, StoreError> {
        let now = self.clock.now_millis();
        self.run(move |conn| insert(conn, &new, now)).await
    }

    /// Creates a user from a synchronous caller (the `user add` command).
    pub fn create_user_blocking(&self, new: &NewUser) -> Result<UserInsert, StoreError> {
        let now = self.clock.now_millis();
        self.run_blocking(|conn| insert(conn, new, now))
    }

    /// Disables a user (see [`disable`]).
    pub async fn disable_user(&self, username: String) -> Result<bool, StoreError> {
        self.run(move |conn| disable(conn, &username)).await
    }

    /// Disables a user from a synchronous caller (the `user disable` command).
    pub fn disable_user_blocking(&self, username: &str) -> Result<bool, StoreError> {
        self.run_blocking(|conn| disable(conn, username))
    }

    /// Finds a user by exact username (with their TOTP secret unsealed).
    pub async fn user_by_name(&self, username: String) -> Result<Option<User>, StoreError> {
        let keys = self.totp_keys.clone();
        self.run(move |conn| {
            by_name(conn, &username)?
                .map(|mut user| {
                    user.totp_secret = user
                        .totp_secret
                        .map(|stored| keys.open_stored(user.id, &stored))
                        .transpose()?;
                    Ok(user)
                })
                .transpose()
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_support::temp_store;

    #[test]
    fn usernames_are_unique_and_roles_round_trip() {
        let (store, dir) = temp_store();
        let new = NewUser {
            username: Username::parse("username", "carol").unwrap(),
            password_hash: "$argon2id$dummy".into(),
            role: Some(Role::Auditor),
        };
        let UserInsert::Created(user) = store.create_user_blocking(&new).unwrap() else {
            panic!("first insert creates")
        };
        assert!(matches!(
            store.create_user_blocking(&new).unwrap(),
            UserInsert::UsernameTaken
        ));
        let found = store
            .run_blocking(|c| by_name(c, "carol"))
            .unwrap()
            .unwrap();
        assert_eq!((found.id, found.role), (user.id, Some(Role::Auditor)));
        assert!(store
            .run_blocking(|c| by_name(c, "dave"))
            .unwrap()
            .is_none());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
