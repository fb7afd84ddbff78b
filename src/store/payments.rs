//! Payments: create (optionally under an Idempotency-Key), list newest first, read, cancel.
//!
//! Every query is scoped by account id as well as payment id, so a payment can only ever
//! be reached through the account it belongs to.

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use uuid::Uuid;

use super::idempotency::{self, EarlierUse, KeyedAnswer};
use super::{into_page, Page, Store, StoreError};

/// Where a payment is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentStatus {
    Pending,
    Cancelled,
}

impl PaymentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            PaymentStatus::Pending => "pending",
            PaymentStatus::Cancelled => "cancelled",
        }
    }
}

/// A payment as clients see it.
#[derive(Debug, Clone)]
pub struct Payment {
    pub id: Uuid,
    pub account_id: Uuid,
    pub payee: String,
    pub amount_minor: i64,
    pub currency: String,
    pub reference: String,
    pub status: PaymentStatus,
    /// Username of the creator.
    pub created_by: String,
    pub created_at: i64,
    pub cancelled_at: Option<i64>,
}

/// Result of cancelling.
#[derive(Debug)]
pub enum CancelOutcome {
    Cancelled(Payment),
    /// The payment exists but is not pending any more.
    NotPending(Payment),
    NotFound,
}

/// Columns read for every payment, in the order [`read_payment`] expects.
const COLUMNS: &str = "p.seq, p.id, p.account_id, p.payee, p.amount_minor, p.currency,
     p.reference, p.status, u.username, p.created_at, p.cancelled_at";

fn read_payment(r: &rusqlite::Row<'_>) -> rusqlite::Result<(i64, Result<Payment, StoreError>)> {
    let id: String = r.get(1)?;
    let account: String = r.get(2)?;
    let status: String = r.get(7)?;
    let partial = Payment {
        id: Uuid::nil(),
        account_id: Uuid::nil(),
        payee: r.get(3)?,
        amount_minor: r.get(4)?,
        currency: r.get(5)?,
        reference: r.get(6)?,
        status: PaymentStatus::Pending,
        created_by: r.get(8)?,
        created_at: r.get(9)?,
        cancelled_at: r.get(10)?,
    };
    let complete = (|| {
        Ok(Payment {
            id: Uuid::parse_str(&id)
                .map_err(|_| StoreError::Corrupt(format!("payment id {id:?}")))?,
            account_id: Uuid::parse_str(&account)
                .map_err(|_| StoreError::Corrupt(format!("account id {account:?}")))?,
            status: match status.as_str() {
                "pending" => PaymentStatus::Pending,
                "cancelled" => PaymentStatus::Cancelled,
                other => return Err(StoreError::Corrupt(format!("payment status {other:?}"))),
            },
            ..partial
        })
    })();
    Ok((r.get(0)?, complete))
}

fn one(conn: &Connection, account: Uuid, id: Uuid) -> Result<Option<Payment>, StoreError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM payments p JOIN users u ON u.id = p.created_by
         WHERE p.account_id = ?1 AND p.id = ?2"
    );
    conn.prepare_cached(&sql)?
        .query_row(params![account.to_string(), id.to_string()], read_payment)
        .optional()?
        .map(|(_, payment)| payment)
        .transpose()
}

/// Result of creating a payment.
#[derive(Debug)]
pub enum PaymentCreation {
    /// The payment (and the answer under its key, if any) is durable.
    Created,
    /// The Idempotency-Key was used before; nothing was written.
    Earlier(EarlierUse),
}

impl Store {
    /// Inserts `payment` and, when it was made under an Idempotency-Key, the answer stored
    /// under the key — in one transaction, so either both are durable or neither is, and
    /// only if the key was free. Goes through the group-commit thread: concurrent payments
    /// share one commit (one fsync); the answer comes once that commit has returned.
    pub async fn create_payment(
        &self,
        payment: Payment,
        created_by: i64,
        keyed: Option<KeyedAnswer>,
    ) -> Result<PaymentCreation, StoreError> {
        self.commits
            .write(move |conn| {
                if let Some(keyed) = &keyed {
                    let now = crate::time::now_millis();
                    if let Some(earlier) = idempotency::take_key(conn, keyed, now)? {
                        return Ok(PaymentCreation::Earlier(earlier));
                    }
                }
                conn.prepare_cached(
                    "INSERT INTO payments (id, account_id, payee, amount_minor, currency,
                                           reference, status, created_by, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )?
                .execute(params![
                    payment.id.to_string(),
                    payment.account_id.to_string(),
                    payment.payee,
                    payment.amount_minor,
                    payment.currency,
                    payment.reference,
                    payment.status.as_str(),
                    created_by,
                    payment.created_at
                ])?;
                Ok(PaymentCreation::Created)
            })
            .await
    }

    /// How many payments the group-commit thread committed, in how many transactions.
    pub fn commit_batching(&self) -> (u64, u64) {
        self.commits.batching()
    }

    /// Payments of `account`, newest first, `limit` at a time, after sequence `before`.
    pub async fn payments(
        &self,
        account: Uuid,
        limit: usize,
        before: Option<i64>,
    ) -> Result<Page<Payment>, StoreError> {
        self.run(move |conn| {
            let sql = format!(
                "SELECT {COLUMNS} FROM payments p JOIN users u ON u.id = p.created_by
                 WHERE p.account_id = ?1 AND p.seq < ?2 ORDER BY p.seq DESC LIMIT ?3"
            );
            let rows = conn
                .prepare_cached(&sql)?
                .query_map(
                    params![
                        account.to_string(),
                        before.unwrap_or(i64::MAX),
                        limit as i64 + 1
                    ],
                    read_payment,
                )?
                .map(|row| {
                    let (seq, payment) = row?;
                    Ok((seq, payment?))
                })
                .collect::<Result<Vec<_>, StoreError>>()?;
            Ok(into_page(rows, limit))
        })
        .await
    }

    /// One payment of `account`.
    pub async fn payment(&self, account: Uuid, id: Uuid) -> Result<Option<Payment>, StoreError> {
        self.run(move |conn| one(conn, account, id)).await
    }

    /// Cancels a pending payment of `account`.
    pub async fn cancel_payment(
        &self,
        account: Uuid,
        id: Uuid,
    ) -> Result<CancelOutcome, StoreError> {
        self.run(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let changed = tx.execute(
                "UPDATE payments SET status = 'cancelled', cancelled_at = ?1
                 WHERE account_id = ?2 AND id = ?3 AND status = 'pending'",
                params![
                    crate::time::now_millis(),
                    account.to_string(),
                    id.to_string()
                ],
            )?;
            let outcome = match (changed, one(&tx, account, id)?) {
                (_, None) => CancelOutcome::NotFound,
                (1, Some(payment)) => CancelOutcome::Cancelled(payment),
                (_, Some(payment)) => CancelOutcome::NotPending(payment),
            };
            tx.commit()?;
            Ok(outcome)
        })
        .await
    }
}
