//! What this worker knows of the main database, kept exact: the server-side state of
//! tokens (the user behind a JWT and whether its `jti` was revoked, the session behind an
//! opaque token, a capability), and what the read path asks for on every request (a
//! user's grant on an account, a payment).
//!
//! Every entry is stamped with the main database's data version ([`DataVersion`]: the WAL
//! index header, the same change signal as `PRAGMA data_version`) as read before the entry
//! was fetched. Each use first reads the current version (one `pread` of the WAL index, no
//! disk I/O, no lock); if anything was committed since — a logout,
//! a disabled user, a new payment, by any worker — the cache is dropped and refilled from
//! the database on demand. So a logout, a disabled user, a revoked grant or a cancelled
//! payment takes effect for the very next request in every worker, and a steady read load
//! never touches the database (nor hands work to another thread).
//!
//! Only positive results are cached: a client sending random tokens or ids gets a database
//! lookup each (behind the rate limiter) but cannot push real entries out.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use uuid::Uuid;

use crate::store::{
    CapabilityState, DataVersion, Membership, Payment, SessionRow, Store, StoreError, Subject,
};

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
    map: HashMap<Key, Entry>,
}

pub struct StateCache {
    watch: Arc<Mutex<DataVersion>>,
    entries: Mutex<Entries>,
}

impl StateCache {
    /// Opens the version watch on the main database of `data_dir`. Blocking.
    pub fn open(data_dir: &Path) -> Result<StateCache, StoreError> {
        Ok(StateCache {
            watch: Arc::new(Mutex::new(DataVersion::open(data_dir)?)),
            entries: Mutex::new(Entries {
                version: i64::MIN,
                map: HashMap::new(),
            }),
        })
    }

    /// The database's change counter now. Read inline when the watch connection is free
    /// (it is a shared-memory read); when another task holds it, on the blocking pool
    /// rather than wait on the reactor.
    async fn version(&self) -> Result<i64, StoreError> {
        if let Ok(mut watch) = self.watch.try_lock() {
            return watch.read();
        }
        let watch = self.watch.clone();
        tokio::task::spawn_blocking(move || {
            watch.lock().unwrap_or_else(PoisonError::into_inner).read()
        })
        .await
        .map_err(|_| StoreError::TaskFailed)?
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The entry for `key` if it is current as of `version`.
    fn get(&self, version: i64, key: &Key) -> Option<Entry> {
        let mut entries = self.lock();
        if version > entries.version {
            entries.map.clear();
            entries.version = version;
        }
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
    /// decision (access control's) share one read of the change counter.
    async fn cached_at<T: Clone>(
        &self,
        version: i64,
        key: Key,
        from_entry: fn(Entry) -> Option<T>,
        into_entry: fn(T) -> Entry,
        fetch: impl std::future::Future<Output = Result<Option<T>, StoreError>>,
    ) -> Result<Option<T>, StoreError> {
        if let Some(hit) = self.get(version, &key).and_then(from_entry) {
            return Ok(Some(hit));
        }
        let found = fetch.await?;
        if let Some(value) = &found {
            self.put(version, key, into_entry(value.clone()));
        }
        Ok(found)
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
        {
            let mut entries = self.lock();
            if version > entries.version {
                entries.map.clear();
                entries.version = version;
            }
            if version == entries.version {
                if let Some(Entry::User(user)) = entries.map.get(&key) {
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
    use crate::store::test_support::temp_store;
    use crate::store::{NewUser, UserInsert};

    #[tokio::test]
    async fn a_commit_by_another_connection_is_seen_by_the_next_lookup() {
        let (store, dir) = temp_store();
        let new = NewUser {
            username: Username::parse("username", "alice").unwrap(),
            password_hash: "$argon2id$dummy".into(),
            role: None,
        };
        let UserInsert::Created(alice) = store.create_user_blocking(&new).unwrap() else {
            unreachable!()
        };
        let cache = StateCache::open(&dir).unwrap();
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
        let (store, dir) = temp_store();
        let cache = StateCache::open(&dir).unwrap();
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
        cache.get(version + 1, &Key::Session([0; 32]));
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
        assert!(cache.lock().map.is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
