//! What this worker knows of the main database, kept exact: the server-side state of
//! tokens (the user behind a JWT and whether its `jti` was revoked, the session behind an
//! opaque token, a capability), and what the read path asks for on every request (a
//! user's grant on an account, a payment).
//!
//! Every use first reads the main database's data version ([`DataVersion`]: one `pread` of
//! the WAL index). When anything was committed since the cache was last current, the
//! worker reads the change log (`sql/005_changes.sql`: what each commit changed that a
//! cache may hold, written by triggers in the same transaction) from the last position it
//! saw, and evicts exactly the entries those changes touch — a logout its session or JWT,
//! a disabled user everything that depends on them, a changed grant that grant and the
//! capabilities on its account, a revocation the capabilities on its account, a
//! cancellation that payment. A new payment, a login, a sweep evict nothing. So every such
//! change takes effect for the very next request in every worker, and a steady mixed load
//! keeps what did not change. A worker that fell behind the pruned log drops everything.
//!
//! On PostgreSQL, shared by several nodes, there is no shared-memory header to read: the
//! version is the change log's head (`changes_head`), which moves exactly when the log
//! does. Each worker holds a *cache lease* (`store::postgres::leases`): it renews it every
//! 200 ms and on every change notification, applying the log up to the head each time, and
//! while its last renewal was sent less than 900 ms ago it decides from memory without a
//! query. Writers of changes wait until every worker has applied them (or its lease has
//! lapsed), so "the very next request" stays exact on every node. When the lease has
//! lapsed (the database slow or cut off), each decision reads the head by a query sent
//! after the request began ([`HeadReads`]; decisions asking at the same moment share one
//! query, and a request's later decisions reuse it).
//!
//! When an entry must be read from the database, concurrent requests for the same key wait
//! for one read instead of each starting their own.
//!
//! Only positive results are cached: a client sending random tokens or ids gets a database
//! lookup each (behind the rate limiter) but cannot push real entries out.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Instant;

use tokio::sync::Notify;

use uuid::Uuid;

use crate::metrics::CacheMetrics;
use crate::store::postgres::{ChangeFeed, HeadReads, PgStore, RENEW_EVERY, TRUSTED_FOR};
use crate::store::{
    CapabilityState, Change, ChangesSince, DataVersion, Membership, Payment, SessionRow, Store,
    StoreError, Subject,
};

tokio::task_local! {
    /// When the request being served began (see [`serving`]).
    static REQUEST_STARTED: Instant;
}

/// Runs `work`, one request's way through the chain, as a request that began at
/// `started`: on PostgreSQL its decisions may share a read of the change log's head sent
/// after that moment, which is all "every request that starts after a change sees it"
/// asks for. Outside it, every decision reads a head sent after the decision began.
pub async fn serving<F: std::future::Future>(started: Instant, work: F) -> F::Output {
    REQUEST_STARTED.scope(started, work).await
}

/// How this worker learns what other processes (or nodes) changed.
enum Feed {
    /// SQLite: the WAL-index header, and the change log read on the watch's connection.
    Sqlite(Arc<Mutex<DataVersion>>),
    /// PostgreSQL: the worker's cache lease, the change log's head when the lease has
    /// lapsed (reads shared by concurrent callers), and the log, read through the store's
    /// pool.
    Postgres(PgStore, Arc<Lease>, Arc<HeadReads>),
}

/// A worker's cache lease on PostgreSQL (see `store::postgres::leases`).
struct Lease {
    /// This worker's row in `cache_leases`.
    holder: Uuid,
    /// The node's name, shown to operators in that row.
    node: String,
    /// Until when the cache may decide without a query (`None`: never renewed).
    trusted_until: Mutex<Option<Instant>>,
}

impl Lease {
    fn trusted(&self) -> bool {
        let until = *self
            .trusted_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        until.is_some_and(|until| Instant::now() < until)
    }

    fn trust_until(&self, until: Instant) {
        let mut trusted = self
            .trusted_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *trusted = Some(trusted.map_or(until, |before| before.max(until)));
    }
}

/// The tasks that keep a worker's lease on PostgreSQL: renewals, and the listener that
/// starts one at each change notification. Stopped, and the lease given up, when dropped.
struct Following {
    renewals: tokio::task::JoinHandle<()>,
    _notifications: ChangeFeed,
    store: PgStore,
    holder: Uuid,
}

impl Drop for Following {
    fn drop(&mut self) {
        self.renewals.abort();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (store, holder) = (self.store.clone(), self.holder);
            runtime.spawn(async move { store.end_lease(holder).await });
        }
    }
}

/// Entries kept at most; the cache empties itself when full (it refills in one lookup per
/// active token).
const MAX_ENTRIES: usize = 16_384;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Jwt {
        sub: String,
        jti: String,
    },
    Session([u8; 32]),
    Capability([u8; 32]),
    /// A user by id.
    User(i64),
    /// A user's grant on an account.
    Membership {
        user: i64,
        account: Uuid,
    },
    Payment {
        account: Uuid,
        payment: Uuid,
    },
}

#[derive(Debug, Clone)]
enum Entry {
    /// The user a JWT names, and whether its `jti` is revoked.
    Jwt((Subject, bool)),
    Session(SessionRow),
    Capability(CapabilityState),
    User(Subject),
    Membership(Membership),
    Payment(Payment),
}

struct Entries {
    /// The data version every entry is current for.
    version: i64,
    /// The change-log position read up to.
    seen: i64,
    map: HashMap<Key, Entry>,
}

/// Evicts from `map` what `change` touches; returns how many entries went.
fn evict(map: &mut HashMap<Key, Entry>, change: &Change) -> usize {
    let before = map.len();
    match change {
        Change::Session(hash) => {
            map.remove(&Key::Session(*hash));
        }
        Change::Jwt(jti) => map.retain(|k, _| !matches!(k, Key::Jwt { jti: j, .. } if j == jti)),
        // Everything that carries the user's state: their record, their tokens, their
        // grants, and every capability (a disabled minter disables what they minted).
        Change::User(id) => map.retain(|k, e| match (k, e) {
            (Key::User(user), _) | (Key::Membership { user, .. }, _) => user != id,
            (_, Entry::Jwt((subject, _))) => subject.user_id != *id,
            (_, Entry::Session(row)) => row.subject.user_id != *id,
            (_, Entry::Capability(_)) => false,
            _ => true,
        }),
        // The grant, and what capabilities on the account are worth (their minter's grant).
        Change::Membership { user, account } => map.retain(|k, e| match (k, e) {
            (Key::Membership { user: u, account: a }, _) => !(u == user && a == account),
            (_, Entry::Capability(state)) => state.capability.account_id != *account,
            _ => true,
        }),
        // A revocation reaches the capability's whole tree: every capability on the account.
        Change::Capability { account } => map.retain(|_, e| {
            !matches!(e, Entry::Capability(state) if state.capability.account_id == *account)
        }),
        Change::Payment { account, payment } => {
            map.remove(&Key::Payment {
                account: *account,
                payment: *payment,
            });
        }
        Change::Unknown => map.clear(),
    }
    before - map.len()
}

/// A worker's exact cache; what it holds is shared with the tasks that keep its lease.
pub struct StateCache {
    inner: Arc<Inner>,
    _following: Option<Following>,
}

impl std::ops::Deref for StateCache {
    type Target = Inner;

    fn deref(&self) -> &Inner {
        &self.inner
    }
}

/// What a [`StateCache`] holds.
pub struct Inner {
    feed: Feed,
    entries: Mutex<Entries>,
    /// One catch-up with the change log at a time; the others wait for it.
    catching_up: tokio::sync::Mutex<()>,
    /// A turn per key being read from the database: concurrent misses share one read.
    fetching: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>,
    /// Hits, reads and evictions, for `GET /metrics`.
    counters: Arc<CacheMetrics>,
}

impl StateCache {
    /// Opens the version watch on the main database of `data_dir`. Blocking.
    pub fn open(data_dir: &Path, counters: Arc<CacheMetrics>) -> Result<StateCache, StoreError> {
        let watch = DataVersion::open(data_dir)?;
        let seen = watch.newest_change()?;
        Ok(Self::with_feed(
            Feed::Sqlite(Arc::new(Mutex::new(watch))),
            seen,
            counters,
        ))
    }

    /// The cache of a worker of `node` on PostgreSQL, following the shared change log
    /// from its head; its lease is kept by tasks on the current runtime.
    pub async fn over_postgres(
        store: PgStore,
        node: &str,
        counters: Arc<CacheMetrics>,
    ) -> Result<StateCache, StoreError> {
        let seen = store.newest_change().await?;
        let heads = HeadReads::new(store.clone());
        let lease = Arc::new(Lease {
            holder: Uuid::new_v4(),
            node: node.to_owned(),
            trusted_until: Mutex::new(None),
        });
        let mut cache = Self::with_feed(
            Feed::Postgres(store.clone(), lease.clone(), heads),
            seen,
            counters,
        );
        // Registered and current before the first request.
        cache.renew().await?;
        let wake = Arc::new(Notify::new());
        cache._following = Some(Following {
            renewals: tokio::spawn(keep_lease(Arc::downgrade(&cache.inner), wake.clone())),
            _notifications: store.follow_changes(wake),
            store,
            holder: lease.holder,
        });
        Ok(cache)
    }

    /// Gives up this worker's lease on PostgreSQL, for a clean stop once no request is
    /// served any more: writers stop waiting for this worker at once, instead of until its
    /// row is 10 s old. From then on the cache decides nothing from memory (each decision
    /// reads the head, as when the lease lapses). Nothing to do on SQLite.
    pub async fn end_lease(&self) {
        let (Some(following), Feed::Postgres(_, lease, _)) = (&self._following, &self.feed) else {
            return;
        };
        following.renewals.abort();
        *lease
            .trusted_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
        if let Err(e) = following.store.end_lease(following.holder).await {
            log::warn!("could not end this worker's cache lease (it lapses in 10 s): {e}");
        }
    }

    fn with_feed(feed: Feed, seen: i64, counters: Arc<CacheMetrics>) -> StateCache {
        let inner = Inner {
            feed,
            entries: Mutex::new(Entries {
                version: i64::MIN,
                seen,
                map: HashMap::new(),
            }),
            catching_up: tokio::sync::Mutex::new(()),
            fetching: Mutex::new(HashMap::new()),
            counters,
        };
        StateCache {
            inner: Arc::new(inner),
            _following: None,
        }
    }
}

/// Renews the lease every [`RENEW_EVERY`], and at once when `wake` is notified (a change
/// was committed, or the listener reconnected), until the cache is gone.
async fn keep_lease(cache: Weak<Inner>, wake: Arc<Notify>) {
    let mut ticks = tokio::time::interval(RENEW_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = wake.notified() => {}
        }
        let Some(cache) = cache.upgrade() else {
            return;
        };
        match cache.renew().await {
            Ok(()) if failing => {
                log::info!("cache lease renewed: decisions are taken from memory again");
                failing = false;
            }
            Ok(()) => {}
            Err(e) if !failing => {
                log::warn!(
                    "cannot renew this worker's cache lease ({e}): each decision reads the \
                     change log's head until it can"
                );
                failing = true;
            }
            Err(_) => {}
        }
    }
}

impl Inner {
    /// One renewal of the lease: the head as of a statement sent now, the log applied up
    /// to it, the cache trusted until [`TRUSTED_FOR`] after the sending, and what was
    /// applied recorded for the writers waiting on it.
    async fn renew(&self) -> Result<(), StoreError> {
        let Feed::Postgres(store, lease, _) = &self.feed else {
            return Ok(());
        };
        let sent = Instant::now();
        let seen = self.lock().seen;
        let head = store.renew_lease(lease.holder, &lease.node, seen).await?;
        self.catch_up(head).await?;
        lease.trust_until(sent + TRUSTED_FOR);
        let applied = self.lock().seen;
        if applied > seen {
            store.record_applied(lease.holder, applied).await?;
        }
        Ok(())
    }

    /// The database's change counter now. Read inline when the watch connection is free
    /// (it is a shared-memory read); when another task holds it, on the blocking pool
    /// rather than wait on the reactor.
    async fn version(&self) -> Result<i64, StoreError> {
        let watch = match &self.feed {
            Feed::Sqlite(watch) => watch,
            Feed::Postgres(_, lease, _) if lease.trusted() => return Ok(self.lock().version),
            Feed::Postgres(_, _, heads) => {
                let since = REQUEST_STARTED.try_with(|started| *started).ok();
                return heads.newest(since).await;
            }
        };
        if let Ok(mut watch) = watch.try_lock() {
            return watch.read();
        }
        let watch = watch.clone();
        tokio::task::spawn_blocking(move || {
            watch.lock().unwrap_or_else(PoisonError::into_inner).read()
        })
        .await
        .map_err(|_| StoreError::TaskFailed)?
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Brings the cache up to `version`: reads the change log from the last position seen
    /// and evicts what it names (or everything, when the log was pruned past that
    /// position). The log is read after `version` was, so it holds every change up to it.
    async fn catch_up(&self, version: i64) -> Result<(), StoreError> {
        if self.lock().version >= version {
            return Ok(());
        }
        let _turn = self.catching_up.lock().await;
        let seen = {
            let entries = self.lock();
            if entries.version >= version {
                return Ok(());
            }
            entries.seen
        };
        let since = self.read_changes(seen).await?;
        let mut entries = self.lock();
        match since {
            ChangesSince::Changes(changes, last) => {
                let evicted: usize = changes.iter().map(|c| evict(&mut entries.map, c)).sum();
                self.counters
                    .evicted
                    .fetch_add(evicted as u64, Ordering::Relaxed);
                entries.seen = last;
            }
            ChangesSince::FellBehind(newest) => {
                log::info!("the change log was pruned past this worker's position: cache dropped");
                entries.map.clear();
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                entries.seen = newest;
            }
        }
        entries.version = entries.version.max(version);
        Ok(())
    }

    /// The change log after position `seen`. On SQLite inline when that needs no wait
    /// (every request of this worker waits for the catch-up anyway, and a hop to the
    /// blocking pool would cost them a thread's wake-up per commit), else on the blocking
    /// pool; on PostgreSQL through the store's pool.
    async fn read_changes(&self, seen: i64) -> Result<ChangesSince, StoreError> {
        let watch = match &self.feed {
            Feed::Sqlite(watch) => watch,
            Feed::Postgres(store, _, _) => return store.changes_since(seen).await,
        };
        let now = match watch.try_lock() {
            Ok(watch) => watch.changes_since_now(seen)?,
            Err(_) => None,
        };
        if let Some(since) = now {
            return Ok(since);
        }
        let watch = watch.clone();
        tokio::task::spawn_blocking(move || {
            watch
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .changes_since(seen)
        })
        .await
        .map_err(|_| StoreError::TaskFailed)?
    }

    /// The entry for `key` if it is current as of `version` (after [`Self::catch_up`]).
    fn get(&self, version: i64, key: &Key) -> Option<Entry> {
        let entries = self.lock();
        // An older version (a slow task) neither reads nor writes newer entries.
        if version != entries.version {
            return None;
        }
        entries.map.get(key).cloned()
    }

    /// Caches what was fetched after `version` was read: it is at least that current.
    fn put(&self, version: i64, key: Key, entry: Entry) {
        let mut entries = self.lock();
        if version != entries.version {
            return;
        }
        if entries.map.len() >= MAX_ENTRIES {
            entries.map.clear();
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
        entries.map.insert(key, entry);
    }

    /// `key`'s entry when it is current; otherwise `fetch`'s answer, cached when found.
    /// The version is read before `fetch` runs, so what is cached is at least that fresh.
    async fn cached<T: Clone>(
        &self,
        key: Key,
        from_entry: fn(Entry) -> Option<T>,
        into_entry: fn(T) -> Entry,
        fetch: impl std::future::Future<Output = Result<Option<T>, StoreError>>,
    ) -> Result<Option<T>, StoreError> {
        let version = self.version().await?;
        self.cached_at(version, key, from_entry, into_entry, fetch)
            .await
    }

    /// [`StateCache::cached`] as of a version the caller read: several lookups of one
    /// decision (access control's) share one read of the change counter. Concurrent misses
    /// for one key take turns: the first reads the database, the others find its answer.
    async fn cached_at<T: Clone>(
        &self,
        version: i64,
        key: Key,
        from_entry: fn(Entry) -> Option<T>,
        into_entry: fn(T) -> Entry,
        fetch: impl std::future::Future<Output = Result<Option<T>, StoreError>>,
    ) -> Result<Option<T>, StoreError> {
        self.catch_up(version).await?;
        if let Some(hit) = self.get(version, &key).and_then(from_entry) {
            self.counters.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(Some(hit));
        }
        let turn = self
            .fetching
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key.clone())
            .or_default()
            .clone();
        let found = {
            let _mine = turn.lock().await;
            if let Some(hit) = self.get(version, &key).and_then(from_entry) {
                self.counters.hits.fetch_add(1, Ordering::Relaxed);
                Ok(Some(hit))
            } else {
                self.counters.fetches.fetch_add(1, Ordering::Relaxed);
                let found = fetch.await;
                if let Ok(Some(value)) = &found {
                    self.put(version, key.clone(), into_entry(value.clone()));
                }
                found
            }
        };
        // The last one out removes the turn (the map holds one reference, each waiter one).
        let mut fetching = self.fetching.lock().unwrap_or_else(PoisonError::into_inner);
        if Arc::strong_count(&turn) == 2 {
            fetching.remove(&key);
        }
        found
    }

    /// The user a verified JWT names and whether its `jti` is revoked; `None` if no user
    /// has that name.
    pub async fn jwt_subject(
        &self,
        store: &Store,
        sub: &str,
        jti: &str,
    ) -> Result<Option<(Subject, bool)>, StoreError> {
        let key = Key::Jwt {
            sub: sub.to_owned(),
            jti: jti.to_owned(),
        };
        let from = |e| match e {
            Entry::Jwt(found) => Some(found),
            _ => None,
        };
        let fetch = store.jwt_subject(sub.to_owned(), jti.to_owned());
        self.cached(key, from, Entry::Jwt, fetch).await
    }

    /// The database's change counter now: the version one decision's lookups share (see
    /// the `_at` lookups).
    pub async fn version_now(&self) -> Result<i64, StoreError> {
        self.version().await
    }

    /// Whether the user with id `user_id` exists and is enabled, as of `version`. A hit
    /// copies nothing.
    pub async fn user_enabled_at(
        &self,
        store: &Store,
        user_id: i64,
        version: i64,
    ) -> Result<bool, StoreError> {
        let key = Key::User(user_id);
        self.catch_up(version).await?;
        {
            let entries = self.lock();
            if version == entries.version {
                if let Some(Entry::User(user)) = entries.map.get(&key) {
                    self.counters.hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(!user.disabled);
                }
            }
        }
        let from = |e| match e {
            Entry::User(found) => Some(found),
            _ => None,
        };
        let found = self
            .cached_at(version, key, from, Entry::User, store.subject(user_id))
            .await?;
        Ok(found.is_some_and(|user| !user.disabled))
    }

    /// The session an opaque token's hash names, if it exists.
    pub async fn session(
        &self,
        store: &Store,
        token_hash: [u8; 32],
    ) -> Result<Option<SessionRow>, StoreError> {
        let from = |e| match e {
            Entry::Session(row) => Some(row),
            _ => None,
        };
        let fetch = store.session(token_hash);
        self.cached(Key::Session(token_hash), from, Entry::Session, fetch)
            .await
    }

    /// The capability a token's hash names, if it exists (revoked or not).
    pub async fn capability(
        &self,
        store: &Store,
        token_hash: [u8; 32],
    ) -> Result<Option<CapabilityState>, StoreError> {
        let from = |e| match e {
            Entry::Capability(state) => Some(state),
            _ => None,
        };
        let fetch = store.capability_by_hash(token_hash);
        self.cached(Key::Capability(token_hash), from, Entry::Capability, fetch)
            .await
    }

    /// `user`'s grant on `account`, if there is one.
    pub async fn membership(
        &self,
        store: &Store,
        user: i64,
        account: Uuid,
    ) -> Result<Option<Membership>, StoreError> {
        let version = self.version().await?;
        self.membership_at(store, user, account, version).await
    }

    /// `user`'s grant on `account` as of `version`.
    pub async fn membership_at(
        &self,
        store: &Store,
        user: i64,
        account: Uuid,
        version: i64,
    ) -> Result<Option<Membership>, StoreError> {
        let from = |e| match e {
            Entry::Membership(found) => Some(found),
            _ => None,
        };
        let fetch = store.membership(user, account);
        self.cached_at(
            version,
            Key::Membership { user, account },
            from,
            Entry::Membership,
            fetch,
        )
        .await
    }

    /// The payment `payment` of `account`, if it exists.
    pub async fn payment(
        &self,
        store: &Store,
        account: Uuid,
        payment: Uuid,
    ) -> Result<Option<Payment>, StoreError> {
        let from = |e| match e {
            Entry::Payment(found) => Some(found),
            _ => None,
        };
        let fetch = store.payment(account, payment);
        self.cached(
            Key::Payment { account, payment },
            from,
            Entry::Payment,
            fetch,
        )
        .await
    }

    /// The username of a session this worker has seen, without asking the database or
    /// checking freshness: good enough to pick a rate-limit bucket, never to authenticate.
    pub fn session_user_hint(&self, token_hash: &[u8; 32]) -> Option<String> {
        match self.lock().map.get(&Key::Session(*token_hash)) {
            Some(Entry::Session(row)) => Some(row.subject.username.clone()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Username;
    use crate::store::test_support::{temp_store, user};
    use crate::store::{NewUser, UserInsert};

    #[tokio::test]
    async fn a_commit_by_another_connection_is_seen_by_the_next_lookup() {
        let (sqlite, dir) = temp_store();
        let store = Store::Sqlite(sqlite.clone());
        let new = NewUser {
            username: Username::parse("username", "alice").unwrap(),
            password_hash: "$argon2id$dummy".into(),
            role: None,
        };
        let UserInsert::Created(alice) = sqlite.create_user_blocking(&new).unwrap() else {
            unreachable!()
        };
        let cache = StateCache::open(&dir, Default::default()).unwrap();
        let far = crate::time::now_millis() + 60_000;
        store
            .create_session([7; 32], alice.id, "pwd".into(), far)
            .await
            .unwrap();
        assert!(cache.session(&store, [7; 32]).await.unwrap().is_some());
        assert_eq!(cache.session_user_hint(&[7; 32]).as_deref(), Some("alice"));
        let (_, revoked) = cache
            .jwt_subject(&store, "alice", "j")
            .await
            .unwrap()
            .unwrap();
        assert!(!revoked);

        // Logout of both kinds, through the pool (as another worker would).
        assert!(store.end_session([7; 32]).await.unwrap());
        store.revoke_jti("j".into(), i64::MAX).await.unwrap();
        assert!(cache.session(&store, [7; 32]).await.unwrap().is_none());
        let (_, revoked) = cache
            .jwt_subject(&store, "alice", "j")
            .await
            .unwrap()
            .unwrap();
        assert!(revoked);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn entries_are_served_from_memory_while_nothing_changes() {
        let (sqlite, dir) = temp_store();
        let store = Store::Sqlite(sqlite.clone());
        let cache = StateCache::open(&dir, Default::default()).unwrap();
        assert!(cache
            .jwt_subject(&store, "ghost", "j")
            .await
            .unwrap()
            .is_none());
        let version = cache.version().await.unwrap();
        let key = Key::Jwt {
            sub: "ghost".into(),
            jti: "j".into(),
        };
        let entry = Entry::Jwt((
            Subject {
                user_id: 1,
                username: "ghost".into(),
                role: None,
                disabled: false,
            },
            false,
        ));
        cache.put(version, key, entry);
        // Nothing was committed, so the entry answers without the database.
        assert!(cache
            .jwt_subject(&store, "ghost", "j")
            .await
            .unwrap()
            .is_some());
        // A stale stamp never writes into a newer cache.
        cache.catch_up(version + 1).await.unwrap();
        cache.put(
            version,
            Key::Session([1; 32]),
            Entry::Jwt((
                Subject {
                    user_id: 1,
                    username: "x".into(),
                    role: None,
                    disabled: false,
                },
                false,
            )),
        );
        assert!(!cache.lock().map.contains_key(&Key::Session([1; 32])));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_change_evicts_what_it_names_and_nothing_else() {
        let (sqlite, dir) = temp_store();
        let store = Store::Sqlite(sqlite.clone());
        let (alice, bob) = (user(&sqlite, "alice"), user(&sqlite, "bob"));
        let counters = Arc::new(CacheMetrics::default());
        let cache = StateCache::open(&dir, counters.clone()).unwrap();
        let far = crate::time::now_millis() + 60_000;
        for (hash, id) in [([1; 32], alice), ([2; 32], bob)] {
            store
                .create_session(hash, id, "pwd".into(), far)
                .await
                .unwrap();
            assert!(cache.session(&store, hash).await.unwrap().is_some());
        }
        let fetched = || counters.fetches.load(Ordering::Relaxed);
        assert_eq!(fetched(), 2);
        // Commits that change nothing cached: a new user, a new session.
        user(&sqlite, "carol");
        store
            .create_session([3; 32], bob, "pwd".into(), far)
            .await
            .unwrap();
        for hash in [[1; 32], [2; 32]] {
            assert!(cache.session(&store, hash).await.unwrap().is_some());
        }
        assert_eq!(fetched(), 2, "nothing was evicted");
        // Bob logs out: his session goes, alice's stays.
        assert!(store.end_session([2; 32]).await.unwrap());
        assert!(cache.session(&store, [2; 32]).await.unwrap().is_none());
        assert!(cache.session(&store, [1; 32]).await.unwrap().is_some());
        assert_eq!(fetched(), 3, "only bob's session was read again");
        // Alice is disabled: her session ends and her state is read again.
        assert!(store.disable_user("alice".into()).await.unwrap());
        assert!(cache.session(&store, [1; 32]).await.unwrap().is_none());
        assert_eq!(counters.evicted.load(Ordering::Relaxed), 2);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_worker_behind_the_pruned_change_log_drops_everything_and_stays_right() {
        let (sqlite, dir) = temp_store();
        let store = Store::Sqlite(sqlite.clone());
        let alice = user(&sqlite, "alice");
        let counters = Arc::new(CacheMetrics::default());
        let cache = StateCache::open(&dir, counters.clone()).unwrap();
        let far = crate::time::now_millis() + 60_000;
        store
            .create_session([1; 32], alice, "pwd".into(), far)
            .await
            .unwrap();
        assert!(cache.session(&store, [1; 32]).await.unwrap().is_some());
        // While this worker looks away: the session ends, and the log is pruned past it.
        assert!(store.end_session([1; 32]).await.unwrap());
        sqlite
            .run_blocking(|conn| {
                conn.execute_batch(
                    "UPDATE users SET role = 'auditor' WHERE id = 1;
                     DELETE FROM changes;",
                )?;
                Ok(())
            })
            .unwrap();
        assert!(cache.session(&store, [1; 32]).await.unwrap().is_none());
        assert_eq!(counters.dropped.load(Ordering::Relaxed), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn concurrent_misses_for_one_key_share_one_read() {
        let (sqlite, dir) = temp_store();
        let store = Store::Sqlite(sqlite.clone());
        let counters = Arc::new(CacheMetrics::default());
        let cache = StateCache::open(&dir, counters.clone()).unwrap();
        let version = cache.version().await.unwrap();
        let reads = std::sync::atomic::AtomicUsize::new(0);
        let subject = Subject {
            user_id: 1,
            username: "alice".into(),
            role: None,
            disabled: false,
        };
        let lookup = || {
            let fetch = async {
                reads.fetch_add(1, Ordering::SeqCst);
                // A read that takes a while: the other lookups queue behind it.
                for _ in 0..20 {
                    tokio::task::yield_now().await;
                }
                Ok(Some(subject.clone()))
            };
            let from = |e| match e {
                Entry::User(found) => Some(found),
                _ => None,
            };
            cache.cached_at(version, Key::User(1), from, Entry::User, fetch)
        };
        let answers = futures_join_all((0..16).map(|_| lookup())).await;
        assert!(answers.iter().all(|a| a.as_ref().unwrap().is_some()));
        assert_eq!(reads.load(Ordering::SeqCst), 1);
        assert_eq!(counters.fetches.load(Ordering::Relaxed), 1);
        assert_eq!(counters.hits.load(Ordering::Relaxed), 15);
        assert!(
            cache.fetching.lock().unwrap().is_empty(),
            "no turn left behind"
        );
        drop(store);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Polls every future to completion on this task (no extra dependency for join_all).
    async fn futures_join_all<F: std::future::Future>(
        futures: impl Iterator<Item = F>,
    ) -> Vec<F::Output> {
        let mut pending: Vec<_> = futures.map(Box::pin).collect();
        let mut done: Vec<Option<F::Output>> = (0..pending.len()).map(|_| None).collect();
        std::future::poll_fn(|cx| {
            let mut all = true;
            for (i, future) in pending.iter_mut().enumerate() {
                if done[i].is_none() {
                    match future.as_mut().poll(cx) {
                        std::task::Poll::Ready(out) => done[i] = Some(out),
                        std::task::Poll::Pending => all = false,
                    }
                }
            }
            if all {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
        .await;
        done.into_iter().map(|d| d.unwrap()).collect()
    }
}
