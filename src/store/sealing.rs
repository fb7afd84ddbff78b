//! TOTP secrets sealed at rest: AES-256-GCM (ring) under a key kept in `totp.key` in the
//! data directory (mode 0600), never in the database — so a copy of `paygate.db` alone (a
//! backup, a replica) reveals no second factor.
//!
//! A sealed secret is `0x01 ‖ key id (4 bytes) ‖ nonce (12) ‖ ciphertext ‖ tag (16)`, with
//! the user's id as associated data: a sealed secret moved to another user's row does not
//! open. Plain secrets (20 bytes, as paygate generates them) left by earlier versions are
//! sealed at start ([`seal_plain_secrets`]). `paygate keys rotate-totp` adds a new key,
//! re-seals every secret under it and keeps the key before it in the file for one more
//! rotation (a worker may have sealed with it a moment before); workers read the file again
//! when it changes.
//!
//! On a shared database the rotation takes two steps, because every node must hold a key
//! before anything is sealed under it ([`stage`], then [`promote`]): a key marked `staged`
//! in the file opens secrets but seals nothing, until the re-sealing has made it current.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::SystemTime;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use rusqlite::{params, Connection, TransactionBehavior};

use super::StoreError;
use crate::secret_file::{read_private, write_private};

/// The key file inside the data directory.
pub const TOTP_KEY_FILE: &str = "totp.key";

const VERSION: u8 = 1;
/// Bytes before the ciphertext: version, key id, nonce.
const HEADER: usize = 1 + 4 + NONCE_LEN;
/// A secret as paygate generates it (160 bits), stored plain before sealing existed.
const PLAIN_LEN: usize = 20;

/// The keys of `totp.key`: the one that seals first, then the ones that only open.
struct Keyring {
    keys: Vec<(u32, [u8; 32])>,
    /// A key staged for a cluster's rotation (it opens, it does not seal yet).
    staged: Option<u32>,
    /// The file's modification time when read: a change means a rotation happened.
    read_at: Option<SystemTime>,
}

/// The sealing keys of one data directory, re-read when the file changes.
pub struct TotpKeys {
    path: PathBuf,
    ring: Mutex<Keyring>,
}

fn fail(what: impl Into<String>) -> StoreError {
    StoreError::Startup(what.into())
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn random<const N: usize>() -> Result<[u8; N], StoreError> {
    let mut out = [0u8; N];
    SystemRandom::new()
        .fill(&mut out)
        .map_err(|_| StoreError::Corrupt("the system random generator failed".into()))?;
    Ok(out)
}

/// The keys of a file, the one that seals first, and the staged one.
type Parsed = (Vec<(u32, [u8; 32])>, Option<u32>);

fn parse(path: &Path, text: &str) -> Result<Parsed, StoreError> {
    let bad = || {
        fail(format!(
            "{} is damaged (expected lines of `<8 hex digits> <base64url key>`, one of them \
             perhaps followed by ` staged`); restore it from a backup: without it no enrolled \
             user can log in",
            path.display()
        ))
    };
    let mut keys = Vec::new();
    let mut staged = None;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let mut fields = line.split_whitespace();
        let (Some(id), Some(key)) = (fields.next(), fields.next()) else {
            return Err(bad());
        };
        let id = u32::from_str_radix(id, 16).map_err(|_| bad())?;
        match fields.next() {
            None => {}
            Some("staged") if staged.is_none() => staged = Some(id),
            Some(_) => return Err(bad()),
        }
        let mut bytes = [0u8; 32];
        match URL_SAFE_NO_PAD.decode_slice(key, &mut bytes) {
            Ok(32) => keys.push((id, bytes)),
            _ => return Err(bad()),
        }
    }
    // The staged key goes last: the first key is the one that seals.
    keys.sort_by_key(|(id, _)| Some(*id) == staged);
    if keys.is_empty() || staged.is_some() && keys.len() == 1 {
        return Err(bad());
    }
    Ok((keys, staged))
}

fn render(keys: &[(u32, [u8; 32])], staged: Option<u32>) -> String {
    keys.iter()
        .map(|(id, key)| {
            let mark = if Some(*id) == staged { " staged" } else { "" };
            format!("{id:08x} {}{mark}\n", URL_SAFE_NO_PAD.encode(key))
        })
        .collect()
}

fn aead_key(key: &[u8; 32]) -> Result<LessSafeKey, StoreError> {
    UnboundKey::new(&AES_256_GCM, key)
        .map(LessSafeKey::new)
        .map_err(|_| StoreError::Corrupt("an unusable TOTP sealing key".into()))
}

fn aad(user_id: i64) -> Vec<u8> {
    let mut out = Vec::with_capacity(23);
    out.extend_from_slice(b"paygate totp v1");
    out.extend_from_slice(&user_id.to_be_bytes());
    out
}

/// What a sealed JWT signing key is bound to: its `kid` (a sealed key moved to another
/// `kid`'s row does not open), apart from every TOTP secret.
fn jwt_aad(kid: &str) -> Vec<u8> {
    let mut out = b"paygate jwt-key v1 ".to_vec();
    out.extend_from_slice(kid.as_bytes());
    out
}

/// A user's id with their stored active and pending secrets.
type TotpRow = (i64, Option<Vec<u8>>, Option<Vec<u8>>);

/// Whether a stored value is sealed (anything but a plain 20-byte secret).
pub fn is_sealed(blob: &[u8]) -> bool {
    blob.len() != PLAIN_LEN
}

impl TotpKeys {
    /// Reads the keys of `data_dir`, creating the first one when there is no file.
    pub fn load_or_create(data_dir: &Path) -> Result<TotpKeys, StoreError> {
        let path = data_dir.join(TOTP_KEY_FILE);
        if !path.exists() {
            let first = [new_key()?];
            match write_private(&path, render(&first, None).as_bytes(), false) {
                Ok(()) => log::info!("created the TOTP sealing key {}", path.display()),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(fail(format!("cannot create {}: {e}", path.display()))),
            }
        }
        TotpKeys::load(data_dir)
    }

    /// Reads the keys of `data_dir`, which must have them: for commands that seal what
    /// running nodes must open, where a fresh key would lock them out.
    pub fn load(data_dir: &Path) -> Result<TotpKeys, StoreError> {
        let path = data_dir.join(TOTP_KEY_FILE);
        if !path.exists() {
            return Err(fail(format!(
                "no sealing key at {}: run this where a node keeps its data directory \
                 (--data-dir), or copy that node's {TOTP_KEY_FILE} here (mode 0600)",
                path.display()
            )));
        }
        let keys = TotpKeys {
            path,
            ring: Mutex::new(Keyring {
                keys: Vec::new(),
                staged: None,
                read_at: None,
            }),
        };
        keys.reload()?;
        Ok(keys)
    }

    fn reload(&self) -> Result<(), StoreError> {
        let read_at = modified(&self.path);
        let text = read_private(&self.path).map_err(fail)?;
        let text = String::from_utf8(text).map_err(|_| fail("totp.key is not text"))?;
        let (keys, staged) = parse(&self.path, &text)?;
        *self.ring.lock().unwrap_or_else(PoisonError::into_inner) = Keyring {
            keys,
            staged,
            read_at,
        };
        Ok(())
    }

    /// Re-reads the file if it changed since it was read (a rotation).
    fn refresh(&self) -> Result<(), StoreError> {
        let read_at = self
            .ring
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .read_at;
        if modified(&self.path) != read_at {
            self.reload()?;
        }
        Ok(())
    }

    fn key(&self, id: Option<u32>) -> Option<(u32, [u8; 32])> {
        let ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        match id {
            None => ring.keys.first().copied(),
            Some(id) => ring.keys.iter().find(|(k, _)| *k == id).copied(),
        }
    }

    /// The ids of the keys held, the one that seals first, as lowercase hex separated by
    /// spaces: what a process reports with its lease. The file is read again if it
    /// changed; while it cannot be read (a copy half-written), the keys read before stand.
    pub fn held(&self) -> String {
        if let Err(e) = self.refresh() {
            log::warn!("{e}; the sealing keys read before stay in use");
        }
        let ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        ring.keys
            .iter()
            .map(|(id, _)| format!("{id:08x}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Every key held, the one that seals first.
    fn all(&self) -> Vec<(u32, [u8; 32])> {
        self.ring
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys
            .clone()
    }

    /// The key staged for a cluster's rotation, if any.
    pub fn staged(&self) -> Option<u32> {
        self.ring
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .staged
    }

    /// The id of the key that seals.
    pub fn current(&self) -> Option<u32> {
        self.key(None).map(|(id, _)| id)
    }

    /// Seals `secret` for user `user_id` under the current key.
    pub fn seal(&self, user_id: i64, secret: &[u8]) -> Result<Vec<u8>, StoreError> {
        self.seal_with(&aad(user_id), secret)
    }

    /// Opens what [`TotpKeys::seal`] made for `user_id`.
    pub fn unseal(&self, user_id: i64, blob: &[u8]) -> Result<Vec<u8>, StoreError> {
        self.unseal_with(
            &aad(user_id),
            blob,
            &format!("TOTP secret of user {user_id}"),
        )
    }

    /// Seals the secret of the JWT signing key `kid` (kept in a shared database).
    pub fn seal_jwt_key(&self, kid: &str, secret: &[u8]) -> Result<Vec<u8>, StoreError> {
        self.seal_with(&jwt_aad(kid), secret)
    }

    /// Re-seals a stored TOTP value of `user_id` under key `id` (which must be held).
    pub fn reseal(&self, id: u32, user_id: i64, stored: &[u8]) -> Result<Vec<u8>, StoreError> {
        self.refresh()?;
        let plain = self.open_stored(user_id, stored)?;
        self.seal_under(Some(id), &aad(user_id), &plain)
    }

    /// Re-seals a sealed JWT signing key `kid` under key `id` (which must be held).
    pub fn reseal_jwt_key(&self, id: u32, kid: &str, sealed: &[u8]) -> Result<Vec<u8>, StoreError> {
        let plain = self.unseal_jwt_key(kid, sealed)?;
        self.seal_under(Some(id), &jwt_aad(kid), &plain)
    }

    /// Opens what [`TotpKeys::seal_jwt_key`] made for `kid`.
    pub fn unseal_jwt_key(&self, kid: &str, blob: &[u8]) -> Result<Vec<u8>, StoreError> {
        self.unseal_with(&jwt_aad(kid), blob, &format!("JWT signing key {kid}"))
    }

    fn seal_with(&self, aad: &[u8], secret: &[u8]) -> Result<Vec<u8>, StoreError> {
        self.refresh()?;
        self.seal_under(None, aad, secret)
    }

    /// Seals under key `id`, or the current key.
    fn seal_under(
        &self,
        id: Option<u32>,
        aad: &[u8],
        secret: &[u8],
    ) -> Result<Vec<u8>, StoreError> {
        let (id, key) = self
            .key(id)
            .ok_or_else(|| StoreError::Corrupt("no such TOTP sealing key".into()))?;
        let nonce: [u8; NONCE_LEN] = random()?;
        let mut out = Vec::with_capacity(HEADER + secret.len() + 16);
        out.push(VERSION);
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(&nonce);
        let mut body = secret.to_vec();
        aead_key(&key)?
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut body,
            )
            .map_err(|_| StoreError::Corrupt("sealing a secret failed".into()))?;
        out.extend_from_slice(&body);
        Ok(out)
    }

    fn unseal_with(&self, aad: &[u8], blob: &[u8], what: &str) -> Result<Vec<u8>, StoreError> {
        let corrupt = |why: &str| StoreError::Corrupt(format!("{what}: {why}"));
        if blob.len() < HEADER + 16 || blob[0] != VERSION {
            return Err(corrupt("not a sealed secret"));
        }
        let id = u32::from_be_bytes([blob[1], blob[2], blob[3], blob[4]]);
        let key = match self.key(Some(id)) {
            Some((_, key)) => key,
            None => {
                // Sealed under a key this worker has not read yet (a rotation).
                self.reload()?;
                self.key(Some(id)).map(|(_, key)| key).ok_or_else(|| {
                    corrupt(&format!(
                        "sealed under key {id:08x}, which {} does not hold (restore it from \
                         a backup)",
                        self.path.display()
                    ))
                })?
            }
        };
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&blob[5..HEADER]);
        let mut body = blob[HEADER..].to_vec();
        let plain = aead_key(&key)?
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut body,
            )
            .map_err(|_| corrupt("does not open (edited, or moved from another row)"))?;
        Ok(plain.to_vec())
    }

    /// A stored value as a secret: unsealed, or (left by an earlier version, until the
    /// start-up pass seals it) as it is.
    pub fn open_stored(&self, user_id: i64, stored: &[u8]) -> Result<Vec<u8>, StoreError> {
        if is_sealed(stored) {
            self.unseal(user_id, stored)
        } else {
            Ok(stored.to_vec())
        }
    }
}

/// Seals the TOTP secrets an earlier version stored plain, in one transaction; returns how
/// many. Run at start (by every process: the first one does the work).
pub fn seal_plain_secrets(conn: &mut Connection, keys: &TotpKeys) -> Result<usize, StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let rows: Vec<TotpRow> = tx
        .prepare(
            "SELECT id, totp_secret, totp_pending FROM users
              WHERE length(totp_secret) = ?1 OR length(totp_pending) = ?1",
        )?
        .query_map([PLAIN_LEN as i64], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?
        .collect::<Result<_, _>>()?;
    let seal = |id: i64, value: Option<Vec<u8>>| -> Result<Option<Vec<u8>>, StoreError> {
        value
            .map(|v| {
                if is_sealed(&v) {
                    Ok(v)
                } else {
                    keys.seal(id, &v)
                }
            })
            .transpose()
    };
    for (id, active, pending) in &rows {
        tx.execute(
            "UPDATE users SET totp_secret = ?2, totp_pending = ?3 WHERE id = ?1",
            params![id, seal(*id, active.clone())?, seal(*id, pending.clone())?],
        )?;
    }
    // Every sealed secret must open with the keys at hand: a lost or wrong totp.key is a
    // refusal to start, not enrolled users who cannot log in.
    let active: Vec<(i64, Vec<u8>)> = tx
        .prepare("SELECT id, totp_secret FROM users WHERE totp_secret IS NOT NULL")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    for (id, stored) in &active {
        if let Err(e) = keys.open_stored(*id, stored) {
            return Err(fail(format!(
                "{e}; {} does not open the TOTP secrets in the database: restore the key \
                 file that belongs to this database",
                keys.path.display()
            )));
        }
    }
    tx.commit()?;
    Ok(rows.len())
}

/// `paygate keys rotate-totp`: a new current key, every secret re-sealed under it, and the
/// key before it kept for one more rotation. Returns the new key's id and how many secrets
/// were re-sealed.
pub fn rotate(data_dir: &Path, conn: &mut Connection) -> Result<(u32, usize), StoreError> {
    let keys = TotpKeys::load_or_create(data_dir)?;
    let old = keys.all();
    let new = new_key()?;
    // First the file with every key (so whatever happens next, each secret opens), then
    // the re-sealing, then the file without the keys before the previous one.
    let mut all = vec![new];
    all.extend(old.iter().copied());
    write_keys(data_dir, &all, None)?;
    keys.reload()?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let rows: Vec<TotpRow> = tx
        .prepare(
            "SELECT id, totp_secret, totp_pending FROM users
              WHERE totp_secret IS NOT NULL OR totp_pending IS NOT NULL",
        )?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    let reseal = |id: i64, value: &Option<Vec<u8>>| -> Result<Option<Vec<u8>>, StoreError> {
        value
            .as_ref()
            .map(|v| {
                keys.open_stored(id, v)
                    .and_then(|plain| keys.seal(id, &plain))
            })
            .transpose()
    };
    for (id, active, pending) in &rows {
        tx.execute(
            "UPDATE users SET totp_secret = ?2, totp_pending = ?3 WHERE id = ?1",
            params![id, reseal(*id, active)?, reseal(*id, pending)?],
        )?;
    }
    tx.commit()?;
    let keep: Vec<(u32, [u8; 32])> = all.into_iter().take(2).collect();
    write_keys(data_dir, &keep, None)?;
    Ok((new.0, rows.len()))
}

/// Step 1 of a cluster's rotation: a new key added to `data_dir`'s file as `staged` (it
/// opens secrets, it seals nothing), or the one already staged. Returns its id.
pub fn stage(data_dir: &Path) -> Result<u32, StoreError> {
    let keys = TotpKeys::load(data_dir)?;
    if let Some(id) = keys.staged() {
        return Ok(id);
    }
    let mut all = keys.all();
    let new = new_key()?;
    all.push(new);
    write_keys(data_dir, &all, Some(new.0))?;
    Ok(new.0)
}

/// Step 2's end: the staged key becomes the one that seals, the key that sealed before it
/// is kept (nodes that have not read the new file yet still seal with it), older ones go.
pub fn promote(data_dir: &Path) -> Result<u32, StoreError> {
    let keys = TotpKeys::load(data_dir)?;
    let staged = keys
        .staged()
        .ok_or_else(|| fail("no staged sealing key to promote"))?;
    let ring = keys.ring.lock().unwrap_or_else(PoisonError::into_inner);
    let new = ring.keys.iter().find(|(id, _)| *id == staged).copied();
    let previous = ring.keys.first().copied();
    drop(ring);
    let kept: Vec<(u32, [u8; 32])> = new.into_iter().chain(previous).collect();
    write_keys(data_dir, &kept, None)?;
    Ok(staged)
}

/// A new key with a random id.
fn new_key() -> Result<(u32, [u8; 32]), StoreError> {
    Ok((u32::from_be_bytes(random()?), random()?))
}

fn write_keys(
    data_dir: &Path,
    keys: &[(u32, [u8; 32])],
    staged: Option<u32>,
) -> Result<(), StoreError> {
    let path = keys_path(data_dir);
    write_private(&path, render(keys, staged).as_bytes(), true)
        .map_err(|e| fail(format!("cannot write {}: {e}", path.display())))
}

fn keys_path(data_dir: &Path) -> PathBuf {
    data_dir.join(TOTP_KEY_FILE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_secrets_open_only_for_their_user_and_key() {
        let dir = std::env::temp_dir().join(format!("paygate-seal-{}", uuid::Uuid::new_v4()));
        crate::secret_file::create_private_dir(&dir).unwrap();
        let keys = TotpKeys::load_or_create(&dir).unwrap();
        let secret = [7u8; 20];
        let sealed = keys.seal(42, &secret).unwrap();
        assert!(is_sealed(&sealed));
        assert!(!sealed.windows(20).any(|w| w == secret));
        assert_eq!(keys.unseal(42, &sealed).unwrap(), secret);
        assert!(keys.unseal(43, &sealed).is_err(), "another user's row");
        let mut edited = sealed.clone();
        *edited.last_mut().unwrap() ^= 1;
        assert!(keys.unseal(42, &edited).is_err());
        // Another data directory's key cannot open it.
        let other = std::env::temp_dir().join(format!("paygate-seal-{}", uuid::Uuid::new_v4()));
        crate::secret_file::create_private_dir(&other).unwrap();
        assert!(TotpKeys::load_or_create(&other)
            .unwrap()
            .unseal(42, &sealed)
            .is_err());
        let _ = std::fs::remove_dir_all(dir);
        let _ = std::fs::remove_dir_all(other);
    }

    #[test]
    fn a_staged_key_opens_but_seals_nothing_until_promoted() {
        let dir = std::env::temp_dir().join(format!("paygate-seal-{}", uuid::Uuid::new_v4()));
        crate::secret_file::create_private_dir(&dir).unwrap();
        let keys = TotpKeys::load_or_create(&dir).unwrap();
        let current = keys.current().unwrap();
        let sealed_before = keys.seal(1, &[1; 20]).unwrap();
        let key_of = |blob: &[u8]| u32::from_be_bytes([blob[1], blob[2], blob[3], blob[4]]);

        let staged = stage(&dir).unwrap();
        assert_eq!(stage(&dir).unwrap(), staged, "staging twice stages one key");
        let keys = TotpKeys::load(&dir).unwrap();
        assert_eq!(
            (keys.current(), keys.staged()),
            (Some(current), Some(staged))
        );
        assert_eq!(keys.held(), format!("{current:08x} {staged:08x}"));
        // New secrets are still sealed under the current key ...
        assert_eq!(key_of(&keys.seal(2, &[2; 20]).unwrap()), current);
        // ... and re-sealing under the staged one makes secrets every holder opens.
        let resealed = keys.reseal(staged, 1, &sealed_before).unwrap();
        assert_eq!(key_of(&resealed), staged);
        assert_eq!(keys.unseal(1, &resealed).unwrap(), [1; 20]);

        assert_eq!(promote(&dir).unwrap(), staged);
        let keys = TotpKeys::load(&dir).unwrap();
        assert_eq!((keys.current(), keys.staged()), (Some(staged), None));
        assert_eq!(keys.held(), format!("{staged:08x} {current:08x}"));
        assert_eq!(
            keys.unseal(1, &sealed_before).unwrap(),
            [1; 20],
            "the previous key is kept"
        );
        assert!(promote(&dir).is_err(), "nothing staged");
        let _ = std::fs::remove_dir_all(dir);
    }
}
