//! The HMAC keys that sign and verify JWTs, kept in `jwt-keys.json` in the data directory
//! (mode 0600, refused if anyone else may read it).
//!
//! The newest key is the current one and signs every new token; older keys are *retired*:
//! they still verify the tokens they signed until those have expired, and `keys prune`
//! deletes them after that. Each key has a random `kid` that tokens name in their header.
//!
//! The file is only ever replaced whole (write a temporary file, fsync, rename, fsync the
//! directory), so a reader sees the old set or the new one, never half of either. A running
//! worker notices a replaced file within a second ([`Keyring::refresh`], polled by
//! the server) and at once when a token names a `kid` it does not know.
//!
//! Nodes sharing a PostgreSQL database share one key set instead: the `jwt_keys` table,
//! each secret sealed under the sealing key every node holds ([`Keyring::open_shared`]).
//! A node reads the table again on the same poll and for an unknown `kid`, so a token
//! issued by any node verifies on every node, and a rotation on one reaches all within
//! the poll interval.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use crate::secret_file::{read_private, write_private};
use crate::store::postgres::{JwtKeyRow, PgStore};
use crate::store::StoreError;

/// File name of the key set inside the data directory.
pub const KEYS_FILE: &str = "jwt-keys.json";
/// Bytes per key: 256 bits, the HMAC-SHA256 block-size-independent recommendation.
const KEY_BYTES: usize = 32;
/// Seconds a retired key is kept beyond the longest token it can have signed: the JWT
/// leeway, plus time for every worker to notice the rotation.
pub const PRUNE_MARGIN_S: i64 = 120;

/// A key file that cannot be used; the message names the file and what to do.
#[derive(Debug)]
pub struct KeyError(pub String);

impl std::fmt::Display for KeyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for KeyError {}

/// One key as the file stores it.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyRecord {
    kid: String,
    /// base64url, no padding.
    secret: String,
    /// Unix seconds.
    created_at: i64,
    /// Unix seconds when a newer key became current; `None` for the current key.
    retired_at: Option<i64>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFileBody {
    keys: Vec<KeyRecord>,
}

/// One signing key.
#[derive(Clone)]
pub struct SigningKey {
    pub kid: String,
    secret: [u8; KEY_BYTES],
    /// The secret prepared for ring's HMAC.
    pub key: hmac::Key,
    pub created_at: i64,
    pub retired_at: Option<i64>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .field("created_at", &self.created_at)
            .field("retired_at", &self.retired_at)
            .finish()
    }
}

impl SigningKey {
    fn new(rng: &SystemRandom, now_s: i64) -> Result<SigningKey, KeyError> {
        let failed = |_| KeyError("the system random generator failed".into());
        let mut secret = [0u8; KEY_BYTES];
        rng.fill(&mut secret).map_err(failed)?;
        let mut kid = [0u8; 9];
        rng.fill(&mut kid).map_err(failed)?;
        Ok(SigningKey::from_parts(
            URL_SAFE_NO_PAD.encode(kid),
            secret,
            now_s,
            None,
        ))
    }

    fn from_parts(
        kid: String,
        secret: [u8; KEY_BYTES],
        created_at: i64,
        retired_at: Option<i64>,
    ) -> SigningKey {
        SigningKey {
            key: hmac::Key::new(hmac::HMAC_SHA256, &secret),
            kid,
            secret,
            created_at,
            retired_at,
        }
    }
}

/// Every key a worker knows; the last one is current.
#[derive(Debug, Clone)]
pub struct KeySet {
    keys: Vec<SigningKey>,
}

impl KeySet {
    /// A set with one fresh key.
    pub fn generate(rng: &SystemRandom, now_s: i64) -> Result<KeySet, KeyError> {
        Ok(KeySet {
            keys: vec![SigningKey::new(rng, now_s)?],
        })
    }

    /// The key that signs new tokens.
    pub fn current(&self) -> &SigningKey {
        // Every constructor guarantees at least one key.
        &self.keys[self.keys.len() - 1]
    }

    /// The key named by a token's `kid`. Only an equality lookup: the `kid` never becomes a
    /// path, a query or anything else.
    pub fn find(&self, kid: &str) -> Option<&SigningKey> {
        self.keys.iter().find(|k| k.kid == kid)
    }

    pub fn all(&self) -> &[SigningKey] {
        &self.keys
    }

    /// This set with a new current key; the old current key is retired now.
    pub fn rotated(&self, rng: &SystemRandom, now_s: i64) -> Result<KeySet, KeyError> {
        let mut keys = self.keys.clone();
        for key in &mut keys {
            key.retired_at.get_or_insert(now_s);
        }
        keys.push(SigningKey::new(rng, now_s)?);
        Ok(KeySet { keys })
    }

    /// This set without the retired keys whose tokens have all expired (`max_ttl_s` is the
    /// longest lifetime a token can have), and the kids removed.
    pub fn pruned(&self, now_s: i64, max_ttl_s: i64) -> (KeySet, Vec<String>) {
        let (kept, removed): (Vec<SigningKey>, Vec<SigningKey>) =
            self.keys.iter().cloned().partition(|k| match k.retired_at {
                None => true,
                Some(retired) => retired + max_ttl_s + PRUNE_MARGIN_S > now_s,
            });
        let removed = removed.into_iter().map(|k| k.kid).collect();
        (KeySet { keys: kept }, removed)
    }

    /// The keys as a JSON Web Key Set (RFC 7517), current key first. Secret material.
    pub fn jwks(&self) -> serde_json::Value {
        let keys: Vec<serde_json::Value> = self
            .keys
            .iter()
            .rev()
            .map(|k| {
                serde_json::json!({
                    "kty": "oct",
                    "kid": k.kid,
                    "alg": "HS256",
                    "use": "sig",
                    "k": URL_SAFE_NO_PAD.encode(k.secret),
                })
            })
            .collect();
        serde_json::json!({ "keys": keys })
    }

    fn to_json(&self) -> Vec<u8> {
        let body = KeyFileBody {
            keys: self
                .keys
                .iter()
                .map(|k| KeyRecord {
                    kid: k.kid.clone(),
                    secret: URL_SAFE_NO_PAD.encode(k.secret),
                    created_at: k.created_at,
                    retired_at: k.retired_at,
                })
                .collect(),
        };
        // Strings and integers always serialise.
        let mut bytes = serde_json::to_vec_pretty(&body).unwrap_or_default();
        bytes.push(b'\n');
        bytes
    }

    fn from_json(bytes: &[u8], path: &Path) -> Result<KeySet, KeyError> {
        let bad = |why: String| {
            KeyError(format!(
                "{} is not a valid key file: {why}; restore it from a backup, or delete it to \
                 start over with a new key (every token issued so far stops working)",
                path.display()
            ))
        };
        let body: KeyFileBody = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        let mut keys = Vec::with_capacity(body.keys.len());
        for record in body.keys {
            let mut secret = [0u8; KEY_BYTES];
            match URL_SAFE_NO_PAD.decode_slice(&record.secret, &mut secret) {
                Ok(KEY_BYTES) => {}
                _ => return Err(bad(format!("key {} is not 32 bytes", record.kid))),
            }
            if record.kid.is_empty() || keys.iter().any(|k: &SigningKey| k.kid == record.kid) {
                return Err(bad(format!("kid {:?} is empty or repeated", record.kid)));
            }
            keys.push(SigningKey::from_parts(
                record.kid,
                secret,
                record.created_at,
                record.retired_at,
            ));
        }
        match keys.split_last() {
            None => Err(bad("it holds no key".into())),
            Some((current, older)) => {
                if current.retired_at.is_some() || older.iter().any(|k| k.retired_at.is_none()) {
                    Err(bad("only the last key may be unretired".into()))
                } else {
                    Ok(KeySet { keys })
                }
            }
        }
    }
}

/// Reads the key set, refusing a file that other users can read.
pub fn load(path: &Path) -> Result<KeySet, KeyError> {
    let bytes = read_private(path).map_err(KeyError)?;
    KeySet::from_json(&bytes, path)
}

/// Loads the key set of `data_dir`, creating it with one new key on first start. Several
/// processes starting together agree on one file: only the first creation wins.
pub fn load_or_create(data_dir: &Path, now_s: i64) -> Result<KeySet, KeyError> {
    let path = data_dir.join(KEYS_FILE);
    if path.exists() {
        return load(&path);
    }
    let set = KeySet::generate(&SystemRandom::new(), now_s)?;
    match write_private(&path, &set.to_json(), false) {
        Ok(()) => {
            log::info!(
                "created JWT signing key {} in {}",
                set.current().kid,
                path.display()
            );
            Ok(set)
        }
        // Another process created it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => load(&path),
        Err(e) => Err(KeyError(format!("cannot create {}: {e}", path.display()))),
    }
}

/// Replaces the key set of `data_dir` with `change(current set)`, under a lock so two
/// operators rotating at once cannot lose a key. Returns the new set and `change`'s result.
pub fn update<T>(
    data_dir: &Path,
    now_s: i64,
    change: impl FnOnce(&KeySet) -> Result<(KeySet, T), KeyError>,
) -> Result<(KeySet, T), KeyError> {
    let lock_path = data_dir.join("jwt-keys.lock");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(|e| KeyError(format!("cannot open {}: {e}", lock_path.display())))?;
    lock.lock()
        .map_err(|e| KeyError(format!("cannot lock {}: {e}", lock_path.display())))?;
    let current = load_or_create(data_dir, now_s)?;
    let (next, result) = change(&current)?;
    let path = data_dir.join(KEYS_FILE);
    write_private(&path, &next.to_json(), true)
        .map_err(|e| KeyError(format!("cannot write {}: {e}", path.display())))?;
    Ok((next, result))
}

/// What identifies one version of the key file on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    inode: u64,
    len: u64,
    modified: Option<SystemTime>,
}

fn stamp(path: &Path) -> std::io::Result<FileStamp> {
    let meta = fs::metadata(path)?;
    Ok(FileStamp {
        inode: meta.ino(),
        len: meta.len(),
        modified: meta.modified().ok(),
    })
}

impl KeySet {
    /// The set a shared database holds (oldest first, as [`PgStore::jwt_keys`] lists it).
    pub fn from_rows(rows: Vec<JwtKeyRow>) -> Result<KeySet, KeyError> {
        if rows.is_empty() {
            return Err(KeyError("the database holds no JWT signing key".into()));
        }
        let keys = rows
            .into_iter()
            .map(|row| {
                let secret: [u8; KEY_BYTES] = row.secret.as_slice().try_into().map_err(|_| {
                    KeyError(format!(
                        "JWT signing key {} is not {KEY_BYTES} bytes",
                        row.kid
                    ))
                })?;
                Ok(SigningKey::from_parts(
                    row.kid,
                    secret,
                    row.created_at,
                    row.retired_at,
                ))
            })
            .collect::<Result<Vec<_>, KeyError>>()?;
        let mut set = KeySet { keys };
        // The current key last, whatever the times say.
        set.keys
            .sort_by_key(|k| (k.retired_at.is_none(), k.created_at));
        Ok(set)
    }

    /// The keys as rows for a shared database (the inverse of [`KeySet::from_rows`]).
    pub fn rows(&self) -> Vec<JwtKeyRow> {
        self.keys
            .iter()
            .map(|k| JwtKeyRow {
                kid: k.kid.clone(),
                secret: k.secret.to_vec(),
                created_at: k.created_at,
                retired_at: k.retired_at,
            })
            .collect()
    }

    /// What tells two sets apart: each key's kid and whether it is retired.
    fn shape(&self) -> Vec<(&str, Option<i64>)> {
        self.keys
            .iter()
            .map(|k| (k.kid.as_str(), k.retired_at))
            .collect()
    }
}

/// `keys rotate` on a shared database: a new current key, which every node picks up within
/// a second; the set after. The keys there must open with `store`'s sealing key first, so
/// that a node with another sealing key cannot add a key nobody else can read.
pub async fn rotate_shared(store: &PgStore, now_s: i64) -> Result<KeySet, KeyError> {
    let failed = |e: StoreError| KeyError(format!("JWT signing keys: {e}"));
    store.jwt_keys().await.map_err(failed)?;
    let fresh = KeySet::generate(&SystemRandom::new(), now_s)?;
    let key = fresh.current();
    store
        .rotate_jwt_key(&key.kid, &key.secret, now_s)
        .await
        .map_err(failed)?;
    KeySet::from_rows(store.jwt_keys().await.map_err(failed)?)
}

/// Where a worker's keys come from.
enum Source {
    /// `jwt-keys.json` in the data directory, with the file version `keys` was read from.
    File {
        path: PathBuf,
        stamp: Mutex<Option<FileStamp>>,
    },
    /// The `jwt_keys` table every node shares.
    Database(PgStore),
}

/// A worker's view of the key set: read by every request, replaced when its source changes.
pub struct Keyring {
    source: Source,
    keys: RwLock<Arc<KeySet>>,
    /// When an unknown `kid` last forced a re-read; such re-reads happen at most once a
    /// second, so tokens with made-up kids cannot turn into a flood of file reads.
    forced_at: Mutex<Option<Instant>>,
}

impl Keyring {
    /// Loads (or creates) the key set of `data_dir`. Blocking.
    pub fn open(data_dir: &Path) -> Result<Keyring, KeyError> {
        let path = data_dir.join(KEYS_FILE);
        let keys = load_or_create(data_dir, crate::time::now_millis() / 1000)?;
        Ok(Keyring {
            source: Source::File {
                stamp: Mutex::new(stamp(&path).ok()),
                path,
            },
            keys: RwLock::new(Arc::new(keys)),
            forced_at: Mutex::new(None),
        })
    }

    /// Loads the key set a shared database holds, creating the first key when there is
    /// none (nodes starting together create one between them).
    pub async fn open_shared(store: PgStore, now_s: i64) -> Result<Keyring, KeyError> {
        let failed = |e: StoreError| KeyError(format!("JWT signing keys: {e}"));
        let first = KeySet::generate(&SystemRandom::new(), now_s)?;
        let key = first.current();
        store
            .ensure_jwt_key(&key.kid, &key.secret, now_s)
            .await
            .map_err(failed)?;
        let keys = KeySet::from_rows(store.jwt_keys().await.map_err(failed)?)?;
        Ok(Keyring {
            source: Source::Database(store),
            keys: RwLock::new(Arc::new(keys)),
            forced_at: Mutex::new(None),
        })
    }

    /// Reads the source again if it changed (the file on this machine, the table on a
    /// shared database). A source that became unreadable or invalid is reported and the
    /// keys in memory stay in use. Returns whether new keys were loaded.
    pub async fn refresh(self: &Arc<Self>) -> bool {
        match &self.source {
            Source::File { .. } => {
                let keyring = self.clone();
                tokio::task::spawn_blocking(move || keyring.reload_if_changed())
                    .await
                    .unwrap_or(false)
            }
            Source::Database(store) => {
                let loaded = match store.jwt_keys().await {
                    Ok(rows) => KeySet::from_rows(rows),
                    Err(e) => Err(KeyError(format!("JWT signing keys: {e}"))),
                };
                match loaded {
                    Ok(set) if set.shape() != self.keys().shape() => {
                        log::info!(
                            "JWT keys reloaded from the database: current kid {}, {} key(s)",
                            set.current().kid,
                            set.all().len()
                        );
                        *self.keys.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(set);
                        true
                    }
                    Ok(_) => false,
                    Err(e) => {
                        log::error!("keeping the JWT keys in memory: {e}");
                        false
                    }
                }
            }
        }
    }

    /// Called when a token names a `kid` this worker does not know: reads the source again,
    /// at most once a second (tokens with made-up kids cannot turn into a flood of reads).
    /// Returns whether new keys were loaded.
    pub async fn refresh_for_unknown_kid(self: &Arc<Self>) -> bool {
        {
            let mut forced = self
                .forced_at
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if forced.is_some_and(|at| at.elapsed() < Duration::from_secs(1)) {
                return false;
            }
            *forced = Some(Instant::now());
        }
        self.refresh().await
    }

    /// The keys as of now.
    pub fn keys(&self) -> Arc<KeySet> {
        self.keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Re-reads the file if it changed since the last read. Blocking (one `stat`, and a read
    /// when it changed). A file that became unreadable or invalid is reported and the keys
    /// in memory stay in use.
    pub fn reload_if_changed(&self) -> bool {
        let Source::File { path, stamp: last } = &self.source else {
            return false;
        };
        let mut last = last.lock().unwrap_or_else(PoisonError::into_inner);
        let now = stamp(path).ok();
        if now.is_none() || now == *last {
            return false;
        }
        match load(path) {
            Ok(set) => {
                log::info!(
                    "JWT keys reloaded from {}: current kid {}, {} key(s)",
                    path.display(),
                    set.current().kid,
                    set.all().len()
                );
                *self.keys.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(set);
                *last = now;
                true
            }
            Err(e) => {
                log::error!("keeping the JWT keys in memory: {e}");
                *last = now;
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn temp_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("paygate-keys-{}", uuid::Uuid::new_v4()));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn first_start_creates_one_private_key_and_later_starts_reuse_it() {
        let dir = temp_dir();
        let first = load_or_create(&dir, 1000).unwrap();
        let mode = fs::metadata(dir.join(KEYS_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = load_or_create(&dir, 2000).unwrap();
        assert_eq!(first.current().kid, again.current().kid);
        assert_eq!(first.current().secret, again.current().secret);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_key_file_others_can_read_is_refused() {
        let dir = temp_dir();
        load_or_create(&dir, 0).unwrap();
        let path = dir.join(KEYS_FILE);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = load(&path).unwrap_err();
        assert!(err.0.contains("chmod 600"), "{err}");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn rotation_retires_and_pruning_waits_for_the_last_token_to_expire() {
        let rng = SystemRandom::new();
        let set = KeySet::generate(&rng, 0).unwrap();
        let first = set.current().kid.clone();
        let set = set.rotated(&rng, 100).unwrap();
        assert_ne!(set.current().kid, first);
        assert_eq!(set.find(&first).unwrap().retired_at, Some(100));
        assert!(set.current().retired_at.is_none());
        let ttl = 3600;
        let (kept, removed) = set.pruned(100 + ttl + PRUNE_MARGIN_S - 1, ttl);
        assert!(removed.is_empty() && kept.find(&first).is_some());
        let (kept, removed) = set.pruned(100 + ttl + PRUNE_MARGIN_S, ttl);
        assert_eq!(removed, vec![first.clone()]);
        assert!(kept.find(&first).is_none());
        assert_eq!(
            kept.current().kid,
            set.current().kid,
            "current never pruned"
        );
    }

    #[test]
    fn the_file_round_trips_and_damage_is_named() {
        let dir = temp_dir();
        let rng = SystemRandom::new();
        let set = KeySet::generate(&rng, 5).unwrap().rotated(&rng, 6).unwrap();
        let path = dir.join(KEYS_FILE);
        let parsed = KeySet::from_json(&set.to_json(), &path).unwrap();
        assert_eq!(parsed.all().len(), 2);
        assert_eq!(parsed.current().secret, set.current().secret);
        for damaged in [
            &br#"{"keys":[]}"#[..],
            br#"{"keys":[{"kid":"a","secret":"AAAA","created_at":0,"retired_at":null}]}"#,
            b"not json",
        ] {
            let err = KeySet::from_json(damaged, &path).unwrap_err();
            assert!(err.0.contains(KEYS_FILE), "{err}");
        }
        fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn update_replaces_the_file_and_a_keyring_notices() {
        let dir = temp_dir();
        let ring = Keyring::open(&dir).unwrap();
        let before = ring.keys().current().kid.clone();
        assert!(!ring.reload_if_changed(), "nothing changed yet");
        let (after, ()) = update(&dir, 10, |set| {
            Ok((set.rotated(&SystemRandom::new(), 10)?, ()))
        })
        .unwrap();
        assert!(ring.reload_if_changed());
        assert_eq!(ring.keys().current().kid, after.current().kid);
        assert!(
            ring.keys().find(&before).is_some(),
            "old key still verifies"
        );
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_jwks_export_has_every_key_current_first() {
        let rng = SystemRandom::new();
        let set = KeySet::generate(&rng, 0).unwrap().rotated(&rng, 1).unwrap();
        let jwks = set.jwks();
        let keys = jwks["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0]["kid"], set.current().kid.as_str());
        assert_eq!(keys[0]["kty"], "oct");
        assert_eq!(keys[0]["alg"], "HS256");
        let k = URL_SAFE_NO_PAD
            .decode(keys[0]["k"].as_str().unwrap())
            .unwrap();
        assert_eq!(k, set.current().secret);
    }
}
