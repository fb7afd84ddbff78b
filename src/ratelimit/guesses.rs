//! The password-guess budget: every password (or TOTP code) check first reserves one token
//! from the username's bucket, shared by every process on the data directory, and gives it
//! back when the secret was right — so only failures spend the budget, from any address.
//!
//! # Reservations in flight, counted across processes
//!
//! A reservation is held while its check runs. How many a username has in flight is
//! recorded in `ratelimit.db` as this process's lease on the username's guess bucket (the
//! lease's size is the count), so every process sees the others' checks. A new
//! reservation waits — instead of spending a token or being refused — while
//! [`GUESS_CONCURRENCY`] checks for that username are in flight anywhere, and while the
//! bucket is empty but some check in flight may still give its token back. So any number
//! of parallel requests with the right password, on any number of workers, queue and never
//! spend the budget; only a bucket emptied by failures refuses. A wait lasts at most
//! [`MAX_QUEUE_WAIT`]; after that (a worker died holding reservations, whose lease lapses
//! only after [`RESERVATION_TTL_NS`], or a machine so loaded that checks take seconds) the
//! request takes a token if there is one or is refused.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use http::HeaderValue;

use super::{ceil_secs, Limiter, Quota, Refusal, Verdict, GUESS_POLICY, OVERFLOW_KEY};
use crate::store::{RateStore, StoreError};
use crate::time::Clock;
use crate::token_bucket::{Limit, Take, TokenBucket, NS_PER_SEC};

/// Password checks per username that may hold a reservation at once, across every process.
pub const GUESS_CONCURRENCY: u32 = 4;

/// How long a reservation counts as in flight if its process never settles it (it died).
pub const RESERVATION_TTL_NS: i64 = 30 * NS_PER_SEC;

/// Longest a reservation waits for checks in flight before it is decided on the budget
/// alone.
pub const MAX_QUEUE_WAIT: Duration = Duration::from_secs(10);

/// The budget of one process.
pub struct GuessBudget {
    limit: Limit,
    policy: HeaderValue,
    store: RateStore,
    /// This process's name on its leases in `ratelimit.db`.
    holder: String,
    clock: Clock,
    /// The limiter's overflow flag: new keys share one bucket while the table is full.
    overflow: Arc<AtomicBool>,
    /// Reservations in flight in this process, by bucket key. Changed only inside a
    /// database step (which SQLite serialises), so the lease written is always the count.
    in_flight: Arc<Mutex<HashMap<String, u32>>>,
    /// How long a reservation waits for checks in flight, in milliseconds
    /// ([`MAX_QUEUE_WAIT`]; tests on a loaded machine set more: it is a real-time limit).
    patience_ms: std::sync::atomic::AtomicU64,
}

/// A reserved guess. Settle it with [`GuessTicket::refund`] (the secret was right) or
/// [`GuessTicket::release`] (it was not); dropped unsettled, it is released in the
/// background.
#[derive(Debug)]
pub struct GuessTicket {
    key: String,
    budget: Option<Arc<GuessBudget>>,
}

impl std::fmt::Debug for GuessBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuessBudget")
            .field("limit", &self.limit)
            .finish()
    }
}

impl GuessTicket {
    /// Gives the reserved token back: the secret was right.
    pub async fn refund(self) -> Result<(), StoreError> {
        self.settle(true).await
    }

    /// Ends the reservation without giving the token back: the secret was wrong.
    pub async fn release(self) -> Result<(), StoreError> {
        self.settle(false).await
    }

    /// Settles with the budget that issued the ticket (its process's count).
    async fn settle(mut self, refund: bool) -> Result<(), StoreError> {
        match self.budget.take() {
            Some(budget) => budget.settle(std::mem::take(&mut self.key), refund).await,
            None => Ok(()),
        }
    }
}

impl Drop for GuessTicket {
    fn drop(&mut self) {
        if let Some(budget) = self.budget.take() {
            let key = std::mem::take(&mut self.key);
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    if let Err(e) = budget.settle(key, false).await {
                        log::warn!("could not release a password-check reservation: {e}");
                    }
                });
            }
        }
    }
}

/// What one reservation attempt found.
enum Attempt {
    Granted,
    /// Checks in flight may free a slot or give a token back: try again shortly.
    Wait,
    Refused {
        retry_ns: i64,
    },
}

impl GuessBudget {
    pub fn new(
        limit: Limit,
        policy: HeaderValue,
        store: RateStore,
        holder: String,
        clock: Clock,
        overflow: Arc<AtomicBool>,
    ) -> GuessBudget {
        GuessBudget {
            limit,
            policy,
            store,
            holder,
            clock,
            overflow,
            in_flight: Arc::default(),
            patience_ms: std::sync::atomic::AtomicU64::new(
                u64::try_from(MAX_QUEUE_WAIT.as_millis()).unwrap_or(u64::MAX),
            ),
        }
    }

    /// Sets how long reservations wait for checks in flight (see [`MAX_QUEUE_WAIT`]).
    pub fn set_patience(&self, patience: Duration) {
        let ms = u64::try_from(patience.as_millis()).unwrap_or(u64::MAX);
        self.patience_ms.store(ms, Ordering::Relaxed);
    }

    fn in_flight(&self) -> MutexGuard<'_, HashMap<String, u32>> {
        self.in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The `RateLimit` state to report with a refusal.
    pub fn quota(&self, remaining: u32, reset_ns: i64) -> Quota {
        Quota {
            policy: self.policy.clone(),
            name: Arc::from(GUESS_POLICY),
            remaining,
            reset_s: ceil_secs(reset_ns),
        }
    }

    /// Reserves one guess for `username`, waiting while checks in flight may make room.
    pub async fn reserve(
        self: &Arc<Self>,
        username: &str,
    ) -> Result<Result<GuessTicket, Verdict>, StoreError> {
        let key = format!("user:{username}");
        let cap = GUESS_CONCURRENCY.min(self.limit.burst).max(1);
        let limit = self.limit;
        let started = Instant::now();
        loop {
            let patience = Duration::from_millis(self.patience_ms.load(Ordering::Relaxed));
            let patient = started.elapsed() < patience;
            // This process alone fills the cap: wait without asking the database.
            let local = self.in_flight().get(&key).copied().unwrap_or(0);
            let attempt = if patient && local >= cap {
                Attempt::Wait
            } else {
                let now = self.clock.now_ns();
                self.step(key.clone(), move |bucket, others, mine| {
                    let in_flight = others.saturating_add(*mine);
                    if patient && in_flight >= cap {
                        return Attempt::Wait;
                    }
                    match bucket.take(limit, now, 0) {
                        Take::Granted { .. } => {
                            *mine += 1;
                            Attempt::Granted
                        }
                        Take::Denied { .. } if patient && in_flight > 0 => Attempt::Wait,
                        Take::Denied { retry_ns } => Attempt::Refused { retry_ns },
                    }
                })
                .await?
            };
            match attempt {
                Attempt::Granted => {
                    return Ok(Ok(GuessTicket {
                        key,
                        budget: Some(self.clone()),
                    }))
                }
                Attempt::Refused { retry_ns } => {
                    return Ok(Err(Verdict::Refuse {
                        quota: self.quota(0, retry_ns),
                        retry_after_s: ceil_secs(retry_ns).max(1),
                    }))
                }
                Attempt::Wait => {
                    // A check takes about 16 ms of one core; poll at about that pace, with
                    // jitter so that waiters spread out.
                    let jitter = u64::from(uuid::Uuid::new_v4().as_bytes()[0] % 16);
                    tokio::time::sleep(Duration::from_millis(8 + jitter)).await;
                }
            }
        }
    }

    async fn settle(&self, key: String, refund: bool) -> Result<(), StoreError> {
        let limit = self.limit;
        self.step(key, move |bucket, _, mine| {
            if refund {
                bucket.refund(limit, 1);
            }
            *mine = mine.saturating_sub(1);
        })
        .await
    }

    /// One step on the username's guess bucket, on the blocking pool: `change` sees the
    /// bucket, the reservations other processes have in flight, and this process's count
    /// (which it may change); the lease recorded is that count.
    async fn step<T: Send + 'static>(
        &self,
        key: String,
        change: impl FnOnce(&mut TokenBucket, u32, &mut u32) -> T + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.store.clone();
        let holder = self.holder.clone();
        let overflow = self
            .overflow
            .load(Ordering::Relaxed)
            .then_some(OVERFLOW_KEY);
        let in_flight = self.in_flight.clone();
        let now = self.clock.now_ns();
        let expires_at = now.saturating_add(RESERVATION_TTL_NS);
        store
            .step(
                GUESS_POLICY.to_owned(),
                key.clone(),
                overflow,
                holder,
                now,
                expires_at,
                move |bucket, others| {
                    let mut counts = in_flight.lock().unwrap_or_else(PoisonError::into_inner);
                    let mine = counts.entry(key.clone()).or_default();
                    let result = change(bucket, others, mine);
                    let hold = *mine;
                    if hold == 0 {
                        counts.remove(&key);
                    }
                    (hold, result)
                },
            )
            .await
    }
}

impl Limiter {
    /// The same limiter whose password-guess reservations wait up to `patience` for checks
    /// in flight (tests on a loaded machine).
    pub fn with_guess_patience(self, patience: Duration) -> Self {
        if let Some(budget) = &self.guesses {
            budget.set_patience(patience);
        }
        self
    }

    /// Reserves one password guess for `username` before its password is checked (see
    /// `guesses`): waits while checks for that username are in flight, and is refused only
    /// when its budget was spent by failures, so no hash is computed then. `None` when the
    /// guess budget is disabled.
    pub async fn reserve_guess(&self, username: &str) -> Result<Option<GuessTicket>, Refusal> {
        match &self.guesses {
            None => Ok(None),
            Some(budget) => match budget.reserve(username).await? {
                Ok(ticket) => Ok(Some(ticket)),
                Err(verdict) => verdict.admitted().map(|_| None),
            },
        }
    }

    /// Gives a reserved guess back, if one was reserved: the secret was right. A failure is
    /// logged only, as it just leaves the budget stricter.
    pub async fn give_back_guess(&self, ticket: Option<GuessTicket>) {
        if let Some(ticket) = ticket {
            if let Err(e) = self.refund_guess(ticket).await {
                log::warn!("could not refund a password-guess token: {e}");
            }
        }
    }

    /// Gives a reserved guess back: the password was right. (This returns the one token the
    /// check reserved; it never refills the budget beyond that.)
    pub async fn refund_guess(&self, ticket: GuessTicket) -> Result<(), StoreError> {
        ticket.refund().await
    }

    /// Ends a reservation without a refund: the password was wrong.
    pub async fn release_guess(&self, ticket: GuessTicket) -> Result<(), StoreError> {
        ticket.release().await
    }
}
