//! The storage seam: one [`Store`] for filters, handlers and the cache, over two backends
//! that answer every operation alike (the conformance suite, `tests/store_conformance.rs`,
//! runs the same tests against both).
//!
//! An enum rather than a trait object: the set of backends is closed and known when paygate
//! is built, a call costs a `match` instead of a boxed future per operation (a trait with
//! `async fn` is not object-safe without boxing), nothing outside `store` grows a type
//! parameter, and a method one backend lacks is a compile error in [`delegate!`]'s list,
//! not a run-time surprise.

use std::path::Path;

use uuid::Uuid;

use super::postgres::{PgRateStore, PgStore};
use super::{
    Account, CancelOutcome, Capability, CapabilityInsert, CapabilityState, KeyedRequest,
    MemberRemoval, MemberUpsert, Membership, NewCapability, NewUser, Page, Payment,
    PaymentCreation, SessionRow, SqliteRateStore, SqliteStore, StoreError, StoredResponse, Subject,
    TotpState, User, UserInsert,
};
use crate::domain::{Currency, Perms};
use crate::time::Clock;
use crate::token_bucket::TokenBucket;

/// What turns a created payment into the response its idempotency key replays.
pub type PaymentAnswer = fn(&Payment) -> Result<StoredResponse, StoreError>;

/// The store every part of the server shares; cheap to clone.
#[derive(Clone)]
pub enum Store {
    /// SQLite files in the data directory: one machine (the default).
    Sqlite(SqliteStore),
    /// A PostgreSQL database several nodes share.
    Postgres(PgStore),
}

impl Store {
    /// Opens (creating if needed) the SQLite databases in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        SqliteStore::open(data_dir).map(Store::Sqlite)
    }

    /// [`Store::open`] reading the time from `clock`.
    pub fn open_with_clock(data_dir: &Path, clock: Clock) -> Result<Store, StoreError> {
        SqliteStore::open_with_clock(data_dir, clock).map(Store::Sqlite)
    }

    /// The SQLite store, for what only a single machine has (its files, the commit
    /// thread's counters, tools that work on the files directly).
    pub fn sqlite(&self) -> Option<&SqliteStore> {
        match self {
            Store::Sqlite(store) => Some(store),
            Store::Postgres(_) => None,
        }
    }
}

/// Each operation, answered by whichever backend this store is.
macro_rules! delegate {
    ($(fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty;)*) => {
        impl Store {
            $(
                pub async fn $name(&self, $($arg: $ty),*) -> Result<$ret, StoreError> {
                    match self {
                        Store::Sqlite(store) => store.$name($($arg),*).await,
                        Store::Postgres(store) => store.$name($($arg),*).await,
                    }
                }
            )*
        }
    };
}

delegate! {
    fn create_user(new: NewUser) -> UserInsert;
    fn disable_user(username: String) -> bool;
    fn user_by_name(username: String) -> Option<User>;
    fn create_session(token_hash: [u8; 32], user_id: i64, amr: String, expires_at: i64) -> ();
    fn end_session(token_hash: [u8; 32]) -> bool;
    fn session(token_hash: [u8; 32]) -> Option<SessionRow>;
    fn revoke_jti(jti: String, expires_at: i64) -> ();
    fn jwt_subject(username: String, jti: String) -> Option<(Subject, bool)>;
    fn subject(user_id: i64) -> Option<Subject>;
    fn totp_state(user_id: i64) -> TotpState;
    fn set_pending_totp(user_id: i64, secret: Vec<u8>) -> ();
    fn confirm_totp(user_id: i64, secret: Vec<u8>, step: i64) -> bool;
    fn use_totp_step(user_id: i64, step: i64) -> bool;
    fn create_account(owner: i64, name: String, currency: Currency) -> Account;
    fn memberships(user: i64, every_account: bool, limit: usize, before: Option<i64>) -> Page<Membership>;
    fn membership(user: i64, account: Uuid) -> Option<Membership>;
    fn account(account: Uuid) -> Option<Account>;
    fn upsert_member(account: Uuid, username: String, perms: Perms, granted_by: i64) -> MemberUpsert;
    fn remove_member(account: Uuid, username: String, removed_by: i64) -> MemberRemoval;
    fn create_payment(payment: Payment, created_by: i64, keyed: Option<KeyedRequest>, answer: PaymentAnswer) -> PaymentCreation;
    fn payments(account: Uuid, limit: usize, before: Option<i64>) -> Page<Payment>;
    fn payment(account: Uuid, id: Uuid) -> Option<Payment>;
    fn payment_exists(account: Uuid, payment: Uuid) -> bool;
    fn cancel_payment(account: Uuid, id: Uuid) -> CancelOutcome;
    fn create_capability(new: NewCapability) -> CapabilityInsert;
    fn capability_by_hash(token_hash: [u8; 32]) -> Option<CapabilityState>;
    fn capability(id: Uuid) -> Option<Capability>;
    fn revoke_capability(id: Uuid) -> usize;
    fn live_capabilities(account: Uuid, limit: usize, before: Option<i64>) -> Page<Capability>;
    fn sweep_expired() -> usize;
    fn sweep_idempotency_keys() -> usize;
}

/// Rate-limit buckets and leases, shared by every process (SQLite: of this machine;
/// PostgreSQL: of every node); cheap to clone.
#[derive(Clone)]
pub enum RateStore {
    /// `ratelimit.db` in the data directory.
    Sqlite(SqliteRateStore),
    /// The shared database's `buckets` and `leases`.
    Postgres(PgRateStore),
}

impl RateStore {
    /// Opens (creating if needed) `ratelimit.db` in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<RateStore, StoreError> {
        SqliteRateStore::open(data_dir).map(RateStore::Sqlite)
    }

    /// One atomic step on bucket `key` of `rule` (see [`SqliteRateStore::step`]): on SQLite
    /// on the blocking pool, on PostgreSQL on this runtime.
    #[allow(clippy::too_many_arguments)] // each argument is one named part of the step
    pub async fn step<T: Send + 'static>(
        &self,
        rule: String,
        key: String,
        overflow_key: Option<&'static str>,
        holder: String,
        now: i64,
        expires_at: i64,
        change: impl FnOnce(&mut TokenBucket, u32) -> (u32, T) + Send + 'static,
    ) -> Result<T, StoreError> {
        match self {
            RateStore::Sqlite(store) => {
                let store = store.clone();
                tokio::task::spawn_blocking(move || {
                    store.step(&rule, &key, overflow_key, &holder, now, expires_at, change)
                })
                .await
                .map_err(|_| StoreError::TaskFailed)?
            }
            RateStore::Postgres(store) => {
                store
                    .step(&rule, &key, overflow_key, &holder, now, expires_at, change)
                    .await
            }
        }
    }

    /// Deletes full buckets and expired leases; how many buckets remain.
    pub async fn sweep(&self, now_ns: i64) -> Result<u64, StoreError> {
        match self {
            RateStore::Sqlite(store) => {
                let store = store.clone();
                tokio::task::spawn_blocking(move || store.sweep(now_ns))
                    .await
                    .map_err(|_| StoreError::TaskFailed)?
            }
            RateStore::Postgres(store) => store.sweep(now_ns).await,
        }
    }
}
