//! Payments: create (optionally under an Idempotency-Key), list newest first, read, cancel.
//!
//! Every query is scoped by account id as well as payment id, so a payment can only ever
//! be reached through the account it belongs to.

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use uuid::Uuid;

use super::accounts::parse_uuid;
use super::idempotency::{self, EarlierUse, KeyedRequest, StoredResponse};
use super::{into_page, Page, SqliteStore, StoreError};

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
    /// The payment (and the answer under its key, if any) is durable; here is the answer.
    Created(StoredResponse),
    /// The Idempotency-Key was used before; nothing was written.
    Earlier(EarlierUse),
}

/// The id and time of a payment about to be inserted, taken inside the write transaction
/// from the newest payment: `created_at` never goes back and ids only grow, in the order
/// payments commit (which is the order lists show), across every worker — the write lock
/// serialises their transactions.
fn stamp(conn: &Connection, now: i64) -> Result<(Uuid, i64), StoreError> {
    let newest: Option<(String, i64)> = conn
        .prepare_cached("SELECT id, created_at FROM payments ORDER BY seq DESC LIMIT 1")?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let newest = newest
        .map(|(id, at)| Ok::<_, StoreError>((parse_uuid(&id)?, at)))
        .transpose()?;
    Ok(next_stamp(newest, now))
}

/// The id and `created_at` of the payment committed after `newest` (id and time): never
/// earlier, and an id greater than its, so that ids and times follow commit order.
pub(in crate::store) fn next_stamp(newest: Option<(Uuid, i64)>, now: i64) -> (Uuid, i64) {
    let (last_id, last_at) = match newest {
        Some((id, at)) => (Some(id), at),
        None => (None, i64::MIN),
    };
    let created_at = now.max(last_at);
    let mut id = uuid_v7_at(created_at);
    if let Some(last) = last_id.filter(|last| id <= *last) {
        // Same millisecond as the newest payment: one more than its id, in the random bits
        // (version and variant bits stay; an overflow into them takes the next ms).
        let next = Uuid::from_u128(last.as_u128() + 1);
        id = if next.get_version_num() == 7 && next.get_variant() == uuid::Variant::RFC4122 {
            next
        } else {
            uuid_v7_at(created_at + 1)
        };
    }
    (id, created_at)
}

fn uuid_v7_at(ms: i64) -> Uuid {
    let ms = u64::try_from(ms).unwrap_or(0);
    let at = uuid::Timestamp::from_unix(
        uuid::NoContext,
        ms / 1000,
        u32::try_from(ms % 1000).unwrap_or(0) * 1_000_000,
    );
    Uuid::new_v7(at)
}

impl SqliteStore {
    /// Inserts `payment` (its `id` and `created_at` are assigned here, in commit order)
    /// and, when it was made under an Idempotency-Key, the answer `answer` renders for it —
    /// in one transaction, so either both are durable or neither is, and only if the key
    /// was free. Goes through the group-commit thread: concurrent payments share one commit
    /// (one fsync); the answer comes once that commit has returned.
    pub async fn create_payment(
        &self,
        mut payment: Payment,
        created_by: i64,
        keyed: Option<KeyedRequest>,
        answer: fn(&Payment) -> Result<StoredResponse, StoreError>,
    ) -> Result<PaymentCreation, StoreError> {
        let clock = self.clock.clone();
        self.commits
            .write(move |conn| {
                let now = clock.now_millis();
                if let Some(keyed) = &keyed {
                    if let Some(earlier) = idempotency::earlier_use(conn, keyed, now)? {
                        return Ok(PaymentCreation::Earlier(earlier));
                    }
                }
                (payment.id, payment.created_at) = stamp(conn, now)?;
                let response = answer(&payment)?;
                if let Some(keyed) = &keyed {
                    idempotency::store_answer(conn, keyed, &response, now)?;
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
                Ok(PaymentCreation::Created(response))
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
        let clock = self.clock.clone();
        self.run(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let changed = tx.execute(
                "UPDATE payments SET status = 'cancelled', cancelled_at = ?1
                 WHERE account_id = ?2 AND id = ?3 AND status = 'pending'",
                params![clock.now_millis(), account.to_string(), id.to_string()],
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
