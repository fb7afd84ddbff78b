//! Accounts and grants in PostgreSQL: the rules of `store::accounts`, with the account's
//! row locked for the length of a grant change, so that concurrent changes on one account
//! (on any node) are decided one after the other as SQLite's single writer decides them.

use tokio_postgres::Transaction;
use uuid::Uuid;

use super::PgStore;
use crate::domain::{Currency, Perm, Perms};
use crate::store::accounts::parse_perms;
use crate::store::{
    into_page, Account, MemberRemoval, MemberUpsert, Membership, Page, Refusal, StoreError,
};

/// `user`'s permissions on `account`, if they hold a grant.
async fn member_perms(
    tx: &Transaction<'_>,
    user: i64,
    account: Uuid,
) -> Result<Option<Perms>, StoreError> {
    let row = tx
        .query_opt(
            "SELECT perms FROM account_members WHERE user_id = $1 AND account_id = $2",
            &[&user, &account],
        )
        .await?;
    row.map(|r| parse_perms(&r.try_get::<_, String>(0)?))
        .transpose()
}

/// Locks `account` for a grant change and returns the actor's permissions if they may
/// manage it.
async fn lock_as_manager(
    tx: &Transaction<'_>,
    actor: i64,
    account: Uuid,
) -> Result<Result<Perms, Refusal>, StoreError> {
    tx.query_opt(
        "SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE",
        &[&account],
    )
    .await?;
    let perms = member_perms(tx, actor, account)
        .await?
        .unwrap_or(Perms::NONE);
    Ok(if perms.contains(Perm::Admin) {
        Ok(perms)
    } else {
        Err(Refusal::NotManager(perms))
    })
}

async fn user_id(tx: &Transaction<'_>, username: &str) -> Result<Option<i64>, StoreError> {
    let row = tx
        .query_opt("SELECT id FROM users WHERE username = $1", &[&username])
        .await?;
    Ok(row.map(|r| r.try_get(0)).transpose()?)
}

impl PgStore {
    /// Creates an account with `owner` as its first manager (every permission).
    pub async fn create_account(
        &self,
        owner: i64,
        name: String,
        currency: Currency,
    ) -> Result<Account, StoreError> {
        let account = Account {
            id: Uuid::now_v7(),
            name,
            currency: currency.as_str().to_owned(),
            created_at: self.clock.now_millis(),
        };
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "INSERT INTO accounts (id, name, currency, created_by, created_at)
             VALUES ($1, $2, $3, $4, $5)",
            &[
                &account.id,
                &account.name,
                &account.currency,
                &owner,
                &account.created_at,
            ],
        )
        .await?;
        tx.execute(
            "INSERT INTO account_members (user_id, account_id, perms, granted_by, granted_at)
             VALUES ($1, $2, $3, $1, $4)",
            &[
                &owner,
                &account.id,
                &Perms::ALL.to_string(),
                &account.created_at,
            ],
        )
        .await?;
        tx.commit().await?;
        Ok(account)
    }

    /// The accounts `user` holds a grant on (or, with `every_account`, all accounts with
    /// their grant or read access), newest first, `limit` at a time before `before`.
    pub async fn memberships(
        &self,
        user: i64,
        every_account: bool,
        limit: usize,
        before: Option<i64>,
    ) -> Result<Page<Membership>, StoreError> {
        let sql = if every_account {
            "SELECT a.seq, a.id, a.name, a.currency, a.created_at, coalesce(m.perms, 'r')
             FROM accounts a
             LEFT JOIN account_members m ON m.account_id = a.id AND m.user_id = $1
             WHERE a.seq < $2
             ORDER BY a.seq DESC LIMIT $3"
        } else {
            "SELECT a.seq, a.id, a.name, a.currency, a.created_at, m.perms
             FROM account_members m JOIN accounts a ON a.id = m.account_id
             WHERE m.user_id = $1 AND a.seq < $2
             ORDER BY a.seq DESC LIMIT $3"
        };
        let client = self.client().await?;
        let statement = client.prepare_cached(sql).await?;
        let rows = client
            .query(
                &statement,
                &[&user, &before.unwrap_or(i64::MAX), &(limit as i64 + 1)],
            )
            .await?;
        let rows = rows
            .iter()
            .map(|r| {
                let perms: String = r.try_get(5)?;
                Ok((
                    r.try_get(0)?,
                    Membership {
                        account: Account {
                            id: r.try_get(1)?,
                            name: r.try_get(2)?,
                            currency: r.try_get(3)?,
                            created_at: r.try_get(4)?,
                        },
                        perms: parse_perms(&perms)?,
                    },
                ))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(into_page(rows, limit))
    }

    /// `user`'s grant on `account`, with the account.
    pub async fn membership(
        &self,
        user: i64,
        account: Uuid,
    ) -> Result<Option<Membership>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT a.name, a.currency, a.created_at, m.perms
                 FROM account_members m JOIN accounts a ON a.id = m.account_id
                 WHERE m.user_id = $1 AND m.account_id = $2",
            )
            .await?;
        let Some(r) = client.query_opt(&statement, &[&user, &account]).await? else {
            return Ok(None);
        };
        let perms: String = r.try_get(3)?;
        Ok(Some(Membership {
            account: Account {
                id: account,
                name: r.try_get(0)?,
                currency: r.try_get(1)?,
                created_at: r.try_get(2)?,
            },
            perms: parse_perms(&perms)?,
        }))
    }

    pub async fn account(&self, account: Uuid) -> Result<Option<Account>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached("SELECT name, currency, created_at FROM accounts WHERE id = $1")
            .await?;
        let Some(r) = client.query_opt(&statement, &[&account]).await? else {
            return Ok(None);
        };
        Ok(Some(Account {
            id: account,
            name: r.try_get(0)?,
            currency: r.try_get(1)?,
            created_at: r.try_get(2)?,
        }))
    }

    /// Gives `username` `perms` on `account`, or changes their grant, if `granted_by`
    /// manages it and holds at least those permissions and at least the grant's current
    /// ones.
    pub async fn upsert_member(
        &self,
        account: Uuid,
        username: String,
        perms: Perms,
        granted_by: i64,
    ) -> Result<MemberUpsert, StoreError> {
        let now = self.clock.now_millis();
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let own = match lock_as_manager(&tx, granted_by, account).await? {
            Ok(own) => own,
            Err(refusal) => return Ok(MemberUpsert::Refused(refusal)),
        };
        if !perms.is_subset_of(own) {
            return Ok(MemberUpsert::Refused(Refusal::BeyondOwn {
                own,
                asked: perms,
            }));
        }
        let Some(user) = user_id(&tx, &username).await? else {
            return Ok(MemberUpsert::UnknownUser);
        };
        let existing = member_perms(&tx, user, account).await?;
        if let Some(theirs) = existing.filter(|theirs| !theirs.is_subset_of(own)) {
            return Ok(MemberUpsert::Refused(Refusal::MorePrivileged {
                own,
                theirs,
            }));
        }
        tx.execute(
            "INSERT INTO account_members (user_id, account_id, perms, granted_by, granted_at)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (user_id, account_id) DO UPDATE SET
                 perms = excluded.perms,
                 granted_by = excluded.granted_by,
                 granted_at = excluded.granted_at",
            &[&user, &account, &perms.to_string(), &granted_by, &now],
        )
        .await?;
        tx.commit().await?;
        drop(client);
        self.applied_everywhere().await;
        Ok(if existing.is_some() {
            MemberUpsert::Updated
        } else {
            MemberUpsert::Created
        })
    }

    /// Takes `username`'s grant on `account` away, if `removed_by` manages it, holds at
    /// least the grant's permissions, and it is not the account's last manager.
    pub async fn remove_member(
        &self,
        account: Uuid,
        username: String,
        removed_by: i64,
    ) -> Result<MemberRemoval, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let own = match lock_as_manager(&tx, removed_by, account).await? {
            Ok(own) => own,
            Err(refusal) => return Ok(MemberRemoval::Refused(refusal)),
        };
        let Some(user) = user_id(&tx, &username).await? else {
            return Ok(MemberRemoval::NotMember);
        };
        let Some(theirs) = member_perms(&tx, user, account).await? else {
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
                .query_one(
                    "SELECT count(*) FROM account_members
                      WHERE account_id = $1 AND user_id != $2 AND strpos(perms, 'a') > 0",
                    &[&account, &user],
                )
                .await?
                .try_get(0)?;
            if other_managers == 0 {
                return Ok(MemberRemoval::LastManager);
            }
        }
        tx.execute(
            "DELETE FROM account_members WHERE user_id = $1 AND account_id = $2",
            &[&user, &account],
        )
        .await?;
        tx.commit().await?;
        drop(client);
        self.applied_everywhere().await;
        Ok(MemberRemoval::Removed)
    }
}
