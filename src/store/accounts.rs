//! Accounts and their members: who holds which permissions on which account.

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use uuid::Uuid;

use super::{into_page, Page, SqliteStore, StoreError};
use crate::domain::{Currency, Perm, Perms};

/// An account as clients see it.
#[derive(Debug, Clone)]
pub struct Account {
    pub id: Uuid,
    pub name: String,
    pub currency: String,
    pub created_at: i64,
}

/// An account together with the caller's permissions on it.
#[derive(Debug, Clone)]
pub struct Membership {
    pub account: Account,
    pub perms: Perms,
}

/// The accounts a user holds a grant on, newest first: a range over the user's own rows of
/// `account_members` (its primary key starts with `user_id`), each joined to its account by
/// primary key. Public for the test that checks its query plan.
pub const MEMBER_ACCOUNTS: &str = "SELECT a.seq, a.id, a.name, a.currency, a.created_at, m.perms
     FROM account_members m JOIN accounts a ON a.id = m.account_id
     WHERE m.user_id = ?1 AND a.seq < ?2
     ORDER BY a.seq DESC LIMIT ?3";

/// Result of granting permissions to a user.
#[derive(Debug)]
pub enum MemberUpsert {
    /// The user had no grant on the account before.
    Created,
    /// The user's permissions were replaced.
    Updated,
    /// No user has that name.
    UnknownUser,
    /// The granter may not: see [`Refusal`].
    Refused(Refusal),
}

/// Result of removing a member.
#[derive(Debug)]
pub enum MemberRemoval {
    Removed,
    /// No user of that name holds a grant on the account.
    NotMember,
    /// The remover may not: see [`Refusal`].
    Refused(Refusal),
    /// The member is the account's last holder of `a`: removing them would leave nobody
    /// able to manage it.
    LastManager,
}

/// Why a member may not grant or remove, decided inside the transaction that would have
/// made the change (so two managers racing cannot together do what neither may alone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The acting member no longer holds `a` on the account (their grant changed since
    /// access control looked), holding these permissions (empty: no grant).
    NotManager(Perms),
    /// The new grant includes permissions the granter does not hold.
    BeyondOwn { own: Perms, asked: Perms },
    /// The member's current grant includes permissions the actor does not hold: nobody
    /// demotes or removes someone more privileged.
    MorePrivileged { own: Perms, theirs: Perms },
}

/// The actor's own permissions, read in the transaction, required to include `a`.
fn manager_perms(
    conn: &Connection,
    actor: i64,
    account: &str,
) -> Result<Result<Perms, Refusal>, StoreError> {
    let perms = member_perms(conn, actor, account)?.unwrap_or(Perms::NONE);
    Ok(if perms.contains(Perm::Admin) {
        Ok(perms)
    } else {
        Err(Refusal::NotManager(perms))
    })
}

fn member_perms(conn: &Connection, user: i64, account: &str) -> Result<Option<Perms>, StoreError> {
    conn.prepare_cached("SELECT perms FROM account_members WHERE user_id = ?1 AND account_id = ?2")?
        .query_row(params![user, account], |r| r.get::<_, String>(0))
        .optional()?
        .map(|p| parse_perms(&p))
        .transpose()
}

pub(super) fn parse_uuid(raw: &str) -> Result<Uuid, StoreError> {
    Uuid::parse_str(raw).map_err(|_| StoreError::Corrupt(format!("bad uuid {raw:?}")))
}

pub(in crate::store) fn parse_perms(raw: &str) -> Result<Perms, StoreError> {
    Perms::parse("perms", raw).map_err(|_| StoreError::Corrupt(format!("bad perms {raw:?}")))
}

impl SqliteStore {
    /// Creates an account; its creator gets every permission on it.
    pub async fn create_account(
        &self,
        owner: i64,
        name: String,
        currency: Currency,
    ) -> Result<Account, StoreError> {
        let clock = self.clock.clone();
        self.run(move |conn| {
            let account = Account {
                id: Uuid::now_v7(),
                name,
                currency: currency.as_str().to_owned(),
                created_at: clock.now_millis(),
            };
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute(
                "INSERT INTO accounts (id, name, currency, created_by, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    account.id.to_string(),
                    account.name,
                    account.currency,
                    owner,
                    account.created_at
                ],
            )?;
            tx.execute(
                "INSERT INTO account_members (user_id, account_id, perms, granted_by, granted_at)
                 VALUES (?1, ?2, ?3, ?1, ?4)",
                params![
                    owner,
                    account.id.to_string(),
                    Perms::ALL.to_string(),
                    account.created_at
                ],
            )?;
            tx.commit()?;
            Ok(account)
        })
        .await
    }

    /// The accounts `user` is a member of (with `every_account`: all accounts, read-only
    /// where they hold no grant — the auditor's view), newest first, `limit` at a time,
    /// starting after the account with sequence number `before`.
    pub async fn memberships(
        &self,
        user: i64,
        every_account: bool,
        limit: usize,
        before: Option<i64>,
    ) -> Result<Page<Membership>, StoreError> {
        self.run(move |conn| {
            // Two statements rather than one with `?4 OR m.user_id IS NOT NULL`: that one
            // made SQLite walk every account for every caller. A member's list is a range
            // over their own grants (the primary key starts with user_id); the auditor's
            // is a walk down the accounts' sequence, which is what it asks for.
            let sql = if every_account {
                "SELECT a.seq, a.id, a.name, a.currency, a.created_at, coalesce(m.perms, 'r')
                 FROM accounts a
                 LEFT JOIN account_members m ON m.account_id = a.id AND m.user_id = ?1
                 WHERE a.seq < ?2
                 ORDER BY a.seq DESC LIMIT ?3"
            } else {
                MEMBER_ACCOUNTS
            };
            let mut stmt = conn.prepare_cached(sql)?;
            let rows = stmt
                .query_map(
                    params![user, before.unwrap_or(i64::MAX), limit as i64 + 1],
                    |r| {
                        Ok((
                            r.get::<_, i64>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, String>(2)?,
                            r.get::<_, String>(3)?,
                            r.get::<_, i64>(4)?,
                            r.get::<_, String>(5)?,
                        ))
                    },
                )?
                .map(|row| {
                    let (seq, id, name, currency, created_at, perms) = row?;
                    let account = Account {
                        id: parse_uuid(&id)?,
                        name,
                        currency,
                        created_at,
                    };
                    Ok((
                        seq,
                        Membership {
                            account,
                            perms: parse_perms(&perms)?,
                        },
                    ))
                })
                .collect::<Result<Vec<_>, StoreError>>()?;
            Ok(into_page(rows, limit))
        })
        .await
    }

    /// The account and `user`'s permissions on it, or `None` when the account does not exist
    /// or the user holds no grant on it (the two are deliberately indistinguishable).
    pub async fn membership(
        &self,
        user: i64,
        account: Uuid,
    ) -> Result<Option<Membership>, StoreError> {
        self.run(move |conn| membership(conn, user, account)).await
    }

    /// An account by id, whoever asks (for the auditor role).
    pub async fn account(&self, account: Uuid) -> Result<Option<Account>, StoreError> {
        self.run(move |conn| {
            Ok(conn
                .prepare_cached("SELECT name, currency, created_at FROM accounts WHERE id = ?1")?
                .query_row([account.to_string()], |r| {
                    Ok(Account {
                        id: account,
                        name: r.get(0)?,
                        currency: r.get(1)?,
                        created_at: r.get(2)?,
                    })
                })
                .optional()?)
        })
        .await
    }

    /// Grants `perms` on `account` to the user called `username`, replacing any earlier
    /// grant, as the member `granted_by`: only permissions the granter holds, and only over
    /// a grant within the granter's own.
    pub async fn upsert_member(
        &self,
        account: Uuid,
        username: String,
        perms: Perms,
        granted_by: i64,
    ) -> Result<MemberUpsert, StoreError> {
        let clock = self.clock.clone();
        self.run(move |conn| {
            let account = account.to_string();
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let own = match manager_perms(&tx, granted_by, &account)? {
                Ok(own) => own,
                Err(refusal) => return Ok(MemberUpsert::Refused(refusal)),
            };
            if !perms.is_subset_of(own) {
                return Ok(MemberUpsert::Refused(Refusal::BeyondOwn {
                    own,
                    asked: perms,
                }));
            }
            let Some(user) = user_id(&tx, &username)? else {
                return Ok(MemberUpsert::UnknownUser);
            };
            let existing = member_perms(&tx, user, &account)?;
            if let Some(theirs) = existing.filter(|theirs| !theirs.is_subset_of(own)) {
                return Ok(MemberUpsert::Refused(Refusal::MorePrivileged {
                    own,
                    theirs,
                }));
            }
            tx.execute(
                "INSERT INTO account_members (user_id, account_id, perms, granted_by, granted_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (user_id, account_id) DO UPDATE SET
                     perms = excluded.perms,
                     granted_by = excluded.granted_by,
                     granted_at = excluded.granted_at",
                params![
                    user,
                    account,
                    perms.to_string(),
                    granted_by,
                    clock.now_millis()
                ],
            )?;
            tx.commit()?;
            Ok(if existing.is_some() {
                MemberUpsert::Updated
            } else {
                MemberUpsert::Created
            })
        })
        .await
    }

    /// Removes the grant of the user called `username` on `account`, as the member
    /// `removed_by`: only a grant within the remover's own permissions, and never the
    /// account's last holder of `a`. A member may remove themselves (leave) on those terms.
    pub async fn remove_member(
        &self,
        account: Uuid,
        username: String,
        removed_by: i64,
    ) -> Result<MemberRemoval, StoreError> {
        self.run(move |conn| {
            let account = account.to_string();
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let own = match manager_perms(&tx, removed_by, &account)? {
                Ok(own) => own,
                Err(refusal) => return Ok(MemberRemoval::Refused(refusal)),
            };
            let Some(user) = user_id(&tx, &username)? else {
                return Ok(MemberRemoval::NotMember);
            };
            let Some(theirs) = member_perms(&tx, user, &account)? else {
                return Ok(MemberRemoval::NotMember);
            };
            if !theirs.is_subset_of(own) {
                return Ok(MemberRemoval::Refused(Refusal::MorePrivileged {
                    own,
                    theirs,
                }));
            }
            if theirs.contains(Perm::Admin) {
                let other_managers: i64 = tx
                    .prepare_cached(
                        "SELECT count(*) FROM account_members
                          WHERE account_id = ?1 AND user_id != ?2 AND instr(perms, 'a') > 0",
                    )?
                    .query_row(params![account, user], |r| r.get(0))?;
                if other_managers == 0 {
                    return Ok(MemberRemoval::LastManager);
                }
            }
            tx.execute(
                "DELETE FROM account_members WHERE user_id = ?1 AND account_id = ?2",
                params![user, account],
            )?;
            tx.commit()?;
            Ok(MemberRemoval::Removed)
        })
        .await
    }
}

fn user_id(conn: &Connection, username: &str) -> Result<Option<i64>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT id FROM users WHERE username = ?1")?
        .query_row([username], |r| r.get(0))
        .optional()?)
}

fn membership(
    conn: &Connection,
    user: i64,
    account: Uuid,
) -> Result<Option<Membership>, StoreError> {
    let row = conn
        .prepare_cached(
            "SELECT a.name, a.currency, a.created_at, m.perms
             FROM account_members m JOIN accounts a ON a.id = m.account_id
             WHERE m.user_id = ?1 AND m.account_id = ?2",
        )?
        .query_row(params![user, account.to_string()], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, String>(3)?,
            ))
        })
        .optional()?;
    row.map(|(name, currency, created_at, perms)| {
        Ok(Membership {
            account: Account {
                id: account,
                name,
                currency,
                created_at,
            },
            perms: parse_perms(&perms)?,
        })
    })
    .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plan SQLite picks for `sql`, one line per step.
    fn plan(conn: &Connection, sql: &str) -> String {
        let mut statement = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let rows = statement
            .query_map(params![1, i64::MAX, 21], |r| r.get::<_, String>(3))
            .unwrap();
        rows.map(Result::unwrap).collect::<Vec<_>>().join("\n")
    }

    #[test]
    fn a_members_account_list_is_a_range_over_their_own_grants() {
        let mut conn = Connection::open_in_memory().unwrap();
        super::super::migrate::migrate(&mut conn, "test", super::super::migrate::MAIN).unwrap();
        // Many other accounts, so the planner's statistics look like a busy server's.
        conn.execute_batch(
            "INSERT INTO users (id, username, password_hash, created_at)
                  VALUES (1, 'alice', 'x', 0), (2, 'bob', 'x', 0);
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 5000)
             INSERT INTO accounts (id, name, currency, created_by, created_at)
                  SELECT 'acc-' || i, 'n', 'EUR', 2, i FROM n;
             INSERT INTO account_members (user_id, account_id, perms, granted_by, granted_at)
                  SELECT 2, id, 'rwda', 2, 0 FROM accounts;
             ANALYZE;",
        )
        .unwrap();
        let plan = plan(&conn, MEMBER_ACCOUNTS);
        assert!(
            plan.contains("SEARCH m USING PRIMARY KEY (user_id=?)"),
            "{plan}"
        );
        assert!(!plan.contains("SCAN"), "a full scan in:\n{plan}");
    }
}
