//! Password hashing and checking with Argon2id, at a bounded concurrency.
//!
//! One hash costs about 16 ms of CPU (m = 19456 KiB, t = 2, p = 1, the OWASP minimum), so an
//! unbounded burst of logins would occupy every core and starve all other requests. At most
//! one hash per core runs at a time; the rest wait for a permit without holding a thread.
//! Hashing runs on the blocking pool, never on the reactor. The wait is bounded too: at
//! most `queue` checks wait at once, and one more is refused at once ([`QueueFull`]) rather
//! than made to wait seconds behind the others.
//!
//! Checking a password for a user that does not exist verifies against a dummy hash made
//! with the same parameters, so an unknown username costs the same time as a wrong password.

use std::sync::{Arc, Mutex};

use argon2::password_hash::{Output, PasswordHash, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use ring::rand::{SecureRandom, SystemRandom};
use tokio::sync::Semaphore;

/// Argon2id memory cost in KiB.
pub const M_COST: u32 = 19_456;
/// Argon2id passes.
pub const T_COST: u32 = 2;
/// Argon2id lanes.
pub const P_COST: u32 = 1;
/// Bytes of hash output stored in the PHC string.
const OUTPUT_LEN: usize = 32;

/// Argon2's working memory (`M_COST` KiB). Reused from hash to hash while hashes queue up,
/// and released when the last one in flight ends (see [`Passwords`]).
type Memory = Vec<Block>;

/// A working memory is reserved at least this large (only `M_COST` KiB of it is ever
/// touched, so only that much becomes resident). glibc serves an allocation above 32 MiB —
/// its largest dynamic mmap threshold — with a mapping of its own and unmaps it when freed,
/// so a released memory really leaves the process. A ~19 MiB block instead raises the
/// threshold when freed, later copies come from the heaps of whichever threads ran the
/// hashes, and resident memory stayed at hundreds of MiB after a login burst.
const RESERVE_BYTES: usize = 33 << 20;

fn fit(memory: &mut Memory, blocks: usize) -> &mut [Block] {
    if memory.len() < blocks {
        if memory.capacity() < blocks {
            let reserve = blocks.max(RESERVE_BYTES / std::mem::size_of::<Block>());
            *memory = Vec::with_capacity(reserve);
        }
        memory.resize(blocks, Block::default());
    }
    &mut memory[..blocks]
}

/// Hashes `password` with a fresh salt into a PHC string, using `memory`.
fn hash_with(memory: &mut Memory, password: &str) -> Result<String, PasswordError> {
    let fail = |e: &dyn std::fmt::Display| PasswordError(e.to_string());
    let mut salt = [0u8; 16];
    SystemRandom::new()
        .fill(&mut salt)
        .map_err(|_| PasswordError("the system random generator failed".into()))?;
    let params = Params::new(M_COST, T_COST, P_COST, Some(OUTPUT_LEN)).map_err(|e| fail(&e))?;
    let blocks = params.block_count();
    let mut out = [0u8; OUTPUT_LEN];
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password_into_with_memory(password.as_bytes(), &salt, &mut out, fit(memory, blocks))
        .map_err(|e| fail(&e))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| fail(&e))?;
    let output = Output::new(&out).map_err(|e| fail(&e))?;
    Ok(format!(
        "$argon2id$v=19$m={M_COST},t={T_COST},p={P_COST}${}${output}",
        salt.as_str()
    ))
}

/// Checks `password` against a PHC string, using `memory`; the comparison is constant-time.
fn verify_with(memory: &mut Memory, phc: &str, password: &str) -> bool {
    let checked = (|| {
        let hash = PasswordHash::new(phc).ok()?;
        if hash.algorithm.as_str() != "argon2id" {
            return None;
        }
        let version = hash
            .version
            .map_or(Some(Version::V0x13), |v| Version::try_from(v).ok())?;
        let params = Params::try_from(&hash).ok()?;
        let mut salt = [0u8; 64];
        let salt = hash.salt?.decode_b64(&mut salt).ok()?;
        let expected = hash.hash?;
        let mut out = vec![0u8; expected.len()];
        let blocks = params.block_count();
        Argon2::new(Algorithm::Argon2id, version, params)
            .hash_password_into_with_memory(
                password.as_bytes(),
                salt,
                &mut out,
                fit(memory, blocks),
            )
            .ok()?;
        Some(Output::new(&out).ok()? == expected)
    })();
    checked.unwrap_or_else(|| {
        log::warn!("a stored password hash is not a usable Argon2id PHC string");
        false
    })
}

/// Hashes on the calling thread; for the command line and for the dummy hash.
pub fn hash_blocking(password: &str) -> Result<String, PasswordError> {
    hash_with(&mut Memory::new(), password)
}

/// Hashing failed (random generator or parameters); not a client mistake.
#[derive(Debug)]
pub struct PasswordError(pub String);

impl std::fmt::Display for PasswordError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "password hashing failed: {}", self.0)
    }
}

impl std::error::Error for PasswordError {}

/// The hashing queue is full: the check was not made (answer 503, retry shortly).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFull;

/// Shared by all requests of a worker.
#[derive(Clone)]
pub struct Passwords {
    /// Places for hashes running or waiting: one per core plus the queue's length. A
    /// request that finds none is refused instead of waiting.
    places: Arc<Semaphore>,
    /// One permit per core: the most hashes that run at once.
    permits: Arc<Semaphore>,
    /// Working memories, one per permit at most (a hash holds a permit while it uses one).
    /// Kept only while hashes queue: an idle worker holds none (~19 MiB each).
    memories: Arc<Mutex<Vec<Memory>>>,
    /// The number of permits.
    cores: usize,
    /// Verified against when the user does not exist, to take the same time.
    dummy_hash: Arc<str>,
}

impl Passwords {
    /// Prepares the hasher, with room for `queue` checks waiting; computes the dummy hash
    /// once (one hash's time).
    pub fn new(queue: usize) -> Result<Self, PasswordError> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Ok(Passwords {
            places: Arc::new(Semaphore::new(cores.saturating_add(queue))),
            permits: Arc::new(Semaphore::new(cores)),
            memories: Arc::new(Mutex::new(Vec::with_capacity(cores))),
            cores,
            dummy_hash: hash_blocking("paygate dummy password for unknown users")?.into(),
        })
    }

    /// Runs `work` on the blocking pool with a hashing permit and a working memory.
    async fn with_permit<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Memory) -> T + Send + 'static,
    ) -> Result<Option<T>, QueueFull> {
        // A place in the queue, or a refusal now.
        let Ok(_place) = self.places.clone().try_acquire_owned() else {
            return Err(QueueFull);
        };
        // The semaphore is never closed, so acquiring only fails if it were; treat as failure.
        let Ok(_permit) = self.permits.acquire().await else {
            return Ok(None);
        };
        let (memories, permits, cores) = (self.memories.clone(), self.permits.clone(), self.cores);
        Ok(tokio::task::spawn_blocking(move || {
            // A panic while this lock is held cannot leave the list inconsistent.
            let lock = || memories.lock().unwrap_or_else(|p| p.into_inner());
            let mut memory = lock().pop().unwrap_or_default();
            let result = work(&mut memory);
            // Every other permit free: no hash runs or waits, so keep nothing. (Waiting
            // hashes would have taken the free permits.)
            if permits.available_permits() + 1 < cores {
                lock().push(memory);
            } else {
                lock().clear();
            }
            result
        })
        .await
        .ok())
    }

    /// Hashes a new password; `Err(QueueFull)` when too many hashes wait already.
    pub async fn hash(&self, password: String) -> Result<Result<String, PasswordError>, QueueFull> {
        Ok(self
            .with_permit(move |memory| hash_with(memory, &password))
            .await?
            .unwrap_or_else(|| Err(PasswordError("hashing task failed".into()))))
    }

    /// Checks `password` against `phc`, or against the dummy hash when there is no user, so
    /// both cases take the same time. `Ok(true)` only for a real match; `Err(QueueFull)`
    /// when too many checks wait already (nothing was checked).
    pub async fn verify(&self, phc: Option<String>, password: String) -> Result<bool, QueueFull> {
        let known = phc.is_some();
        let phc = phc.unwrap_or_else(|| self.dummy_hash.to_string());
        let matched = self
            .with_permit(move |memory| verify_with(memory, &phc, &password))
            .await?
            .unwrap_or(false);
        Ok(known && matched)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phc_strings_interoperate_with_the_argon2_crate() {
        use argon2::password_hash::{PasswordHasher, PasswordVerifier};
        let ours = hash_blocking("interop passphrase").unwrap();
        let parsed = PasswordHash::new(&ours).unwrap();
        assert!(Argon2::default()
            .verify_password(b"interop passphrase", &parsed)
            .is_ok());
        assert!(Argon2::default()
            .verify_password(b"interop passphrasE", &parsed)
            .is_err());

        let params = Params::new(M_COST, T_COST, P_COST, None).unwrap();
        let theirs = Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
            .hash_password(
                b"their passphrase",
                &SaltString::encode_b64(&[7u8; 16]).unwrap(),
            )
            .unwrap()
            .to_string();
        let mut memory = Memory::new();
        assert!(verify_with(&mut memory, &theirs, "their passphrase"));
        assert!(!verify_with(&mut memory, &theirs, "their passphrasE"));
        // Other Argon2 variants are not accepted.
        let argon2i = theirs.replace("$argon2id$", "$argon2i$");
        assert!(!verify_with(&mut memory, &argon2i, "their passphrase"));
    }

    #[tokio::test]
    async fn hashes_verify_and_unknown_users_never_match() {
        let passwords = Passwords::new(4).unwrap();
        let phc = passwords
            .hash("s3cret-horse".into())
            .await
            .unwrap()
            .unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        let check =
            |phc: Option<String>, password: &str| passwords.verify(phc, password.to_owned());
        assert_eq!(check(Some(phc.clone()), "s3cret-horse").await, Ok(true));
        assert_eq!(check(Some(phc), "s3cret-horsE").await, Ok(false));
        // Even the dummy password does not log in a user that does not exist.
        let dummy = "paygate dummy password for unknown users";
        assert_eq!(check(None, dummy).await, Ok(false));
        assert_eq!(check(Some("not a phc".into()), "x").await, Ok(false));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_refuses_at_once_instead_of_waiting() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let passwords = Passwords::new(2).unwrap();
        // Every core busy and two waiting: the next check is refused without waiting.
        let mut running = Vec::new();
        for _ in 0..cores + 2 {
            let passwords = passwords.clone();
            running.push(tokio::spawn(async move {
                passwords.verify(None, "x".into()).await
            }));
        }
        // Until the places are taken (they are taken before any hashing starts).
        while passwords.places.available_permits() > 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(passwords.verify(None, "x".into()).await, Err(QueueFull));
        for check in running {
            assert_eq!(check.await.unwrap(), Ok(false));
        }
        // Room again once they are done.
        assert_eq!(passwords.verify(None, "x".into()).await, Ok(false));
    }
}
