//! Payments and idempotency keys in PostgreSQL.
//!
//! Creation is group-committed as on SQLite, and for the same reasons: a node's queue
//! takes every payment waiting and writes them in one transaction (one commit, one WAL
//! flush with `synchronous_commit=on`), in a fixed number of round trips however many
//! there are (two, each a pipeline of statements): take the cluster-wide payment lock,
//! read the newest payment and every idempotency key the batch names; decide each payment
//! in memory; insert the payments and the keys' answers (one statement each) and commit.
//! No payment is acknowledged before its COMMIT returned.
//!
//! The lock (`pg_advisory_xact_lock`) makes batches from all nodes commit one after the
//! other, which is what keeps SQLite's guarantees here: ids, `created_at` and `seq` follow
//! commit order across the cluster (so a listing paged by `seq` never skips a payment
//! committed later with a smaller number), and an idempotency key sent to two nodes at
//! once is decided by whichever batch commits first, the other replaying its answer.
//! Batching keeps the lock's cost to one hold per batch, not per payment.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio_postgres::types::Type;
use tokio_postgres::Row;
use uuid::Uuid;

use super::PgStore;
use crate::store::payments::next_stamp;
use crate::store::{
    into_page, CancelOutcome, EarlierUse, KeyedRequest, Page, Payment, PaymentCreation,
    PaymentStatus, StoreError, StoredResponse,
};
use crate::time::Clock;

/// The advisory lock payment batches take (a constant of paygate's own).
const PAYMENTS_LOCK: i64 = 0x7061_7967_6174_6502;

/// At most this many payments share one transaction.
const MAX_BATCH: usize = 256;

/// A statement parameter.
type Param = dyn tokio_postgres::types::ToSql + Sync;

/// What turns a created payment into the response its key will replay.
type Answer = fn(&Payment) -> Result<StoredResponse, StoreError>;

/// A payment waiting for the next batch.
struct Job {
    payment: Payment,
    created_by: i64,
    keyed: Option<KeyedRequest>,
    answer: Answer,
    done: oneshot::Sender<Result<PaymentCreation, StoreError>>,
}

/// The node's payment queue: a task that commits what waits, batch by batch.
pub(super) struct PaymentQueue {
    jobs: mpsc::UnboundedSender<Job>,
}

impl PaymentQueue {
    /// Starts the queue's task on the current runtime.
    pub(super) fn start(pool: deadpool_postgres::Pool, clock: Clock) -> PaymentQueue {
        let (jobs, mut waiting) = mpsc::unbounded_channel::<Job>();
        tokio::spawn(async move {
            while let Some(first) = waiting.recv().await {
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match waiting.try_recv() {
                        Ok(job) => batch.push(job),
                        Err(_) => break,
                    }
                }
                run_batch(&pool, &clock, batch).await;
            }
        });
        PaymentQueue { jobs }
    }
}

/// An error for each job of a batch that failed as a whole.
fn each(e: &StoreError) -> StoreError {
    match e {
        StoreError::Busy => StoreError::Busy,
        StoreError::Unreachable(m) => StoreError::Unreachable(m.clone()),
        other => StoreError::CommitFailed(other.to_string()),
    }
}

/// Commits `batch`; if the batch as a whole is refused (a statement failed), each payment
/// is tried alone, so that one bad payment fails alone.
async fn run_batch(pool: &deadpool_postgres::Pool, clock: &Clock, batch: Vec<Job>) {
    let single = batch.len() == 1;
    let (inputs, dones): (Vec<_>, Vec<_>) = batch
        .into_iter()
        .map(|job| {
            (
                (job.payment, job.created_by, job.keyed, job.answer),
                job.done,
            )
        })
        .unzip();
    match commit(pool, clock, &inputs).await {
        Ok(outcomes) => {
            for (done, outcome) in dones.into_iter().zip(outcomes) {
                let _ = done.send(outcome);
            }
        }
        Err(e) if single || !matches!(e, StoreError::Database(_)) => {
            for done in dones {
                let _ = done.send(Err(each(&e)));
            }
        }
        Err(_) => {
            for (input, done) in inputs.into_iter().zip(dones) {
                let outcome = match commit(pool, clock, std::slice::from_ref(&input)).await {
                    Ok(mut outcomes) => outcomes.pop().unwrap_or(Err(StoreError::TaskFailed)),
                    Err(e) => Err(each(&e)),
                };
                let _ = done.send(outcome);
            }
        }
    }
}

type Input = (Payment, i64, Option<KeyedRequest>, Answer);

/// An idempotency key's row, as the batch found it or wrote it.
struct KeyRow {
    hash: Vec<u8>,
    lease_expires_at: Option<i64>,
    answer: Option<StoredResponse>,
}

/// What an earlier use of a key means for this request (`idempotency::earlier_use`).
fn earlier(row: &KeyRow, keyed: &KeyedRequest, now: i64) -> Option<EarlierUse> {
    if row.hash != keyed.request_hash {
        return Some(EarlierUse::Mismatch);
    }
    if let Some(answer) = &row.answer {
        return Some(EarlierUse::Replay(answer.clone()));
    }
    match row.lease_expires_at {
        Some(expires) if expires > now => Some(EarlierUse::InFlight),
        // An older version's claim whose holder died before committing: free again.
        _ => None,
    }
}

/// One transaction for all of `inputs`; each one's outcome, in order. `Err` means nothing
/// was committed.
async fn commit(
    pool: &deadpool_postgres::Pool,
    clock: &Clock,
    inputs: &[Input],
) -> Result<Vec<Result<PaymentCreation, StoreError>>, StoreError> {
    let client = pool.get().await?;
    let outcome = commit_on(&client, clock, inputs).await;
    if outcome.is_err() {
        // Whatever was begun ends here; a broken connection is dropped by the pool.
        let _ = client.batch_execute("ROLLBACK").await;
    }
    outcome
}

/// The statements of a batch, prepared once per connection and planned once: their plans
/// do not depend on the values (each is an index lookup or an append), and planning them
/// for each batch cost as much as running them. Left to choose, PostgreSQL plans a
/// statement taking an array afresh at every execution, because knowing the array's length
/// makes the estimate cheaper (the existence check, [`EXISTING`], cost 85 µs per batch so).
const BEGIN: &str = "BEGIN; SET LOCAL plan_cache_mode = force_generic_plan";
const LOCK: &str = "SELECT pg_advisory_xact_lock($1)";
const NEWEST: &str = "SELECT id, created_at FROM payments ORDER BY seq DESC LIMIT 1";
/// The batch's keys, one primary-key lookup each. The subquery is `LATERAL` and kept apart
/// (`OFFSET 0`), so the plan is a loop over the batch's keys with an index scan inside,
/// whatever the table's size: prepared once per connection, never planned again. The same
/// lookup written as a join was planned, while the table was small, as a hash join over
/// the whole table (every batch read every key: 27k keys cost a payment 430 µs of the
/// server's CPU), and planning it afresh for each batch instead cost more than running it.
const KEYS: &str = "SELECT k.user_id, k.key, k.request_hash, k.lease_expires_at, k.status,
        k.response_body, k.location
 FROM unnest($1::bigint[], $2::text[]) AS wanted (user_id, key)
 CROSS JOIN LATERAL (SELECT * FROM idempotency_keys k
                     WHERE k.user_id = wanted.user_id AND k.key = wanted.key
                     OFFSET 0) k";
/// Which of the batch's accounts and users exist: what foreign keys on `payments` and
/// `idempotency_keys` would check row by row, once per batch (migration 004). Neither is
/// ever deleted, so what exists here still does at the commit.
const EXISTING: &str = "SELECT ARRAY(SELECT id FROM accounts WHERE id = ANY($1::uuid[])),
        ARRAY(SELECT id FROM users WHERE id = ANY($2::bigint[]))";
/// Claims older versions left behind (see [`earlier`]); rare, so planned when it runs.
const DELETE_KEYS: &str = "DELETE FROM idempotency_keys k
 USING unnest($1::bigint[], $2::text[]) AS gone (user_id, key)
 WHERE k.user_id = gone.user_id AND k.key = gone.key";
const INSERT_PAYMENTS: &str = "INSERT INTO payments (id, account_id, payee, amount_minor,
        currency, reference, status, created_by, created_at)
 SELECT id, account_id, payee, amount_minor, currency, reference, status, created_by,
        created_at
 FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::bigint[], $5::text[], $6::text[],
             $7::text[], $8::bigint[], $9::bigint[])
      WITH ORDINALITY AS p (id, account_id, payee, amount_minor, currency, reference,
                            status, created_by, created_at, n)
 ORDER BY n";
const INSERT_KEYS: &str = "INSERT INTO idempotency_keys
   (user_id, key, request_hash, status, response_body, location, created_at)
 SELECT * FROM unnest($1::bigint[], $2::text[], $3::bytea[], $4::integer[], $5::text[],
                      $6::text[], $7::bigint[])";

/// The batch in two round trips, each a pipeline: BEGIN, the lock, the newest payment and
/// the batch's keys; then the writes and COMMIT (a third, rare, clears claims an older
/// version left behind). The node waits for the server twice per batch whatever its size
/// (statements are prepared once per connection, and planned once), and holds the
/// cluster-wide lock for one round trip plus the commit. A statement that fails aborts the
/// transaction, so the COMMIT sent behind it rolls back, and the batch is reported failed.
async fn commit_on(
    client: &deadpool_postgres::Client,
    clock: &Clock,
    inputs: &[Input],
) -> Result<Vec<Result<PaymentCreation, StoreError>>, StoreError> {
    let (lock, newest_payment, batch_keys, existing, insert_payments, insert_keys) = tokio::try_join!(
        client.prepare_cached(LOCK),
        client.prepare_cached(NEWEST),
        client.prepare_cached(KEYS),
        client.prepare_cached(EXISTING),
        client.prepare_cached(INSERT_PAYMENTS),
        client.prepare_cached(INSERT_KEYS),
    )?;
    let (users, keys): (Vec<i64>, Vec<String>) = inputs
        .iter()
        .filter_map(|(_, _, keyed, _)| keyed.as_ref().map(|k| (k.user, k.key.clone())))
        .unzip();
    let wanted: [&Param; 2] = [&users, &keys];
    let named = References::named(inputs);
    let names: [&Param; 2] = [&named.accounts, &named.users];
    let (_, _, newest, found, existing) = tokio::try_join!(
        client.batch_execute(BEGIN),
        client.execute(&lock, &[&PAYMENTS_LOCK]),
        client.query_opt(&newest_payment, &[]),
        client.query(&batch_keys, &wanted),
        client.query_one(&existing, &names),
    )?;
    let existing = References {
        accounts: existing.try_get(0)?,
        users: existing.try_get(1)?,
    };
    let now = clock.now_millis();
    let mut newest: Option<(Uuid, i64)> = newest
        .map(|r| Ok::<_, StoreError>((r.try_get(0)?, r.try_get(1)?)))
        .transpose()?;
    let mut known: HashMap<(i64, String), KeyRow> = HashMap::new();
    for r in &found {
        known.insert((r.try_get(0)?, r.try_get(1)?), key_row(r)?);
    }

    let mut outcomes = Vec::with_capacity(inputs.len());
    let mut rows = PaymentRows::default();
    let mut stale: (Vec<i64>, Vec<String>) = (Vec::new(), Vec::new());
    for (payment, created_by, keyed, answer) in inputs {
        if let Some(keyed) = keyed {
            let id = (keyed.user, keyed.key.clone());
            if let Some(row) = known.get(&id) {
                if let Some(use_) = earlier(row, keyed, now) {
                    outcomes.push(Ok(PaymentCreation::Earlier(use_)));
                    continue;
                }
                stale.0.push(keyed.user);
                stale.1.push(keyed.key.clone());
            }
        }
        if let Some(missing) = existing.missing(payment, *created_by, keyed.as_ref()) {
            outcomes.push(Err(StoreError::Database(missing)));
            continue;
        }
        let mut payment = payment.clone();
        (payment.id, payment.created_at) = next_stamp(newest, now);
        let response = match answer(&payment) {
            Ok(response) => response,
            Err(e) => {
                outcomes.push(Err(e));
                continue;
            }
        };
        newest = Some((payment.id, payment.created_at));
        rows.push(&payment, *created_by);
        if let Some(keyed) = keyed {
            rows.push_key(keyed, &response, now);
            known.insert(
                (keyed.user, keyed.key.clone()),
                KeyRow {
                    hash: keyed.request_hash.to_vec(),
                    lease_expires_at: None,
                    answer: Some(response.clone()),
                },
            );
        }
        outcomes.push(Ok(PaymentCreation::Created(response)));
    }

    if !stale.0.is_empty() {
        let gone = [
            (&stale.0 as &Param, Type::INT8_ARRAY),
            (&stale.1, Type::TEXT_ARRAY),
        ];
        client.execute_typed(DELETE_KEYS, &gone).await?;
    }
    // The inserts run even with nothing to write (on empty arrays they change nothing):
    // one pipeline shape for every batch.
    let payments: [&Param; 9] = [
        &rows.ids,
        &rows.accounts,
        &rows.payees,
        &rows.amounts,
        &rows.currencies,
        &rows.references,
        &rows.statuses,
        &rows.created_by,
        &rows.created_at,
    ];
    let answers: [&Param; 7] = [
        &rows.key_users,
        &rows.keys,
        &rows.hashes,
        &rows.statuses_http,
        &rows.bodies,
        &rows.locations,
        &rows.key_times,
    ];
    tokio::try_join!(
        client.execute(&insert_payments, &payments),
        client.execute(&insert_keys, &answers),
        client.batch_execute("COMMIT"),
    )?;
    Ok(outcomes)
}

/// Accounts and users: those a batch names, or those of them that exist.
struct References {
    accounts: Vec<Uuid>,
    users: Vec<i64>,
}

impl References {
    /// Every account and user `inputs` name, each once.
    fn named(inputs: &[Input]) -> References {
        let mut named = References {
            accounts: Vec::new(),
            users: Vec::new(),
        };
        for (payment, created_by, keyed, _) in inputs {
            named.accounts.push(payment.account_id);
            named.users.push(*created_by);
            named.users.extend(keyed.as_ref().map(|k| k.user));
        }
        named.users.sort_unstable();
        named.users.dedup();
        named.accounts.sort_unstable();
        named.accounts.dedup();
        named
    }

    /// What a payment names that does not exist, said as the foreign key would.
    fn missing(
        &self,
        payment: &Payment,
        created_by: i64,
        keyed: Option<&KeyedRequest>,
    ) -> Option<String> {
        if !self.accounts.contains(&payment.account_id) {
            return Some(format!("no account {}", payment.account_id));
        }
        [Some(created_by), keyed.map(|k| k.user)]
            .into_iter()
            .flatten()
            .find(|user| !self.users.contains(user))
            .map(|user| format!("no user {user}"))
    }
}

fn key_row(r: &Row) -> Result<KeyRow, StoreError> {
    let status: Option<i32> = r.try_get(4)?;
    let body: Option<String> = r.try_get(5)?;
    let answer = match (status, body) {
        (Some(status), Some(body)) => Some(StoredResponse {
            status: u16::try_from(status)
                .map_err(|_| StoreError::Corrupt(format!("idempotency status {status}")))?,
            body,
            location: r.try_get(6)?,
        }),
        _ => None,
    };
    Ok(KeyRow {
        hash: r.try_get(2)?,
        lease_expires_at: r.try_get(3)?,
        answer,
    })
}

/// The batch's new rows, column by column (for `unnest`).
#[derive(Default)]
struct PaymentRows {
    ids: Vec<Uuid>,
    accounts: Vec<Uuid>,
    payees: Vec<String>,
    amounts: Vec<i64>,
    currencies: Vec<String>,
    references: Vec<String>,
    statuses: Vec<&'static str>,
    created_by: Vec<i64>,
    created_at: Vec<i64>,
    key_users: Vec<i64>,
    keys: Vec<String>,
    hashes: Vec<Vec<u8>>,
    statuses_http: Vec<i32>,
    bodies: Vec<String>,
    locations: Vec<Option<String>>,
    key_times: Vec<i64>,
}

impl PaymentRows {
    fn push(&mut self, payment: &Payment, created_by: i64) {
        self.ids.push(payment.id);
        self.accounts.push(payment.account_id);
        self.payees.push(payment.payee.clone());
        self.amounts.push(payment.amount_minor);
        self.currencies.push(payment.currency.clone());
        self.references.push(payment.reference.clone());
        self.statuses.push(payment.status.as_str());
        self.created_by.push(created_by);
        self.created_at.push(payment.created_at);
    }

    fn push_key(&mut self, keyed: &KeyedRequest, response: &StoredResponse, now: i64) {
        self.key_users.push(keyed.user);
        self.keys.push(keyed.key.clone());
        self.hashes.push(keyed.request_hash.to_vec());
        self.statuses_http.push(i32::from(response.status));
        self.bodies.push(response.body.clone());
        self.locations.push(response.location.clone());
        self.key_times.push(now);
    }
}

const COLUMNS: &str = "p.seq, p.id, p.account_id, p.payee, p.amount_minor, p.currency,
     p.reference, p.status, u.username, p.created_at, p.cancelled_at";

fn read_payment(r: &Row) -> Result<(i64, Payment), StoreError> {
    let status: String = r.try_get(7)?;
    Ok((
        r.try_get(0)?,
        Payment {
            id: r.try_get(1)?,
            account_id: r.try_get(2)?,
            payee: r.try_get(3)?,
            amount_minor: r.try_get(4)?,
            currency: r.try_get(5)?,
            reference: r.try_get(6)?,
            status: match status.as_str() {
                "pending" => PaymentStatus::Pending,
                "cancelled" => PaymentStatus::Cancelled,
                other => return Err(StoreError::Corrupt(format!("payment status {other:?}"))),
            },
            created_by: r.try_get(8)?,
            created_at: r.try_get(9)?,
            cancelled_at: r.try_get(10)?,
        },
    ))
}

impl PgStore {
    /// Creates `payment` (its id and `created_at` assigned in commit order), or answers
    /// with what an earlier use of its idempotency key decided. Acknowledged only once
    /// its batch's COMMIT returned.
    pub async fn create_payment(
        &self,
        payment: Payment,
        created_by: i64,
        keyed: Option<KeyedRequest>,
        answer: Answer,
    ) -> Result<PaymentCreation, StoreError> {
        let (done, outcome) = oneshot::channel();
        self.payments
            .jobs
            .send(Job {
                payment,
                created_by,
                keyed,
                answer,
                done,
            })
            .map_err(|_| StoreError::TaskFailed)?;
        outcome.await.map_err(|_| StoreError::TaskFailed)?
    }

    /// `account`'s payments, newest first, `limit` at a time before `before`.
    pub async fn payments(
        &self,
        account: Uuid,
        limit: usize,
        before: Option<i64>,
    ) -> Result<Page<Payment>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM payments p JOIN users u ON u.id = p.created_by
                 WHERE p.account_id = $1 AND p.seq < $2 ORDER BY p.seq DESC LIMIT $3"
            ))
            .await?;
        let rows = client
            .query(
                &statement,
                &[&account, &before.unwrap_or(i64::MAX), &(limit as i64 + 1)],
            )
            .await?
            .iter()
            .map(read_payment)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(into_page(rows, limit))
    }

    pub async fn payment(&self, account: Uuid, id: Uuid) -> Result<Option<Payment>, StoreError> {
        let client = self.client().await?;
        one(&client, account, id).await
    }

    pub async fn payment_exists(&self, account: Uuid, payment: Uuid) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached("SELECT 1 FROM payments WHERE account_id = $1 AND id = $2")
            .await?;
        Ok(client
            .query_opt(&statement, &[&account, &payment])
            .await?
            .is_some())
    }

    /// Cancels a pending payment; says why not otherwise.
    pub async fn cancel_payment(
        &self,
        account: Uuid,
        id: Uuid,
    ) -> Result<CancelOutcome, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let changed = tx
            .execute(
                "UPDATE payments SET status = 'cancelled', cancelled_at = $1
                 WHERE account_id = $2 AND id = $3 AND status = 'pending'",
                &[&self.clock.now_millis(), &account, &id],
            )
            .await?;
        let outcome = match (changed, one(&tx, account, id).await?) {
            (_, None) => CancelOutcome::NotFound,
            (1, Some(payment)) => CancelOutcome::Cancelled(payment),
            (_, Some(payment)) => CancelOutcome::NotPending(payment),
        };
        tx.commit().await?;
        drop(client);
        if matches!(outcome, CancelOutcome::Cancelled(_)) {
            self.applied_everywhere().await;
        }
        Ok(outcome)
    }
}

/// One payment of one account.
async fn one(
    client: &impl deadpool_postgres::GenericClient,
    account: Uuid,
    id: Uuid,
) -> Result<Option<Payment>, StoreError> {
    let row = client
        .query_opt(
            &format!(
                "SELECT {COLUMNS} FROM payments p JOIN users u ON u.id = p.created_by
                 WHERE p.account_id = $1 AND p.id = $2"
            ),
            &[&account, &id],
        )
        .await?;
    row.map(|r| read_payment(&r).map(|(_, payment)| payment))
        .transpose()
}

/// Keeps the queue's sender alive as long as any clone of the store.
pub(super) type Queue = Arc<PaymentQueue>;
