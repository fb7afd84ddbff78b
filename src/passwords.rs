//! Password hashing and checking with Argon2id, at a bounded concurrency.
//!
//! One hash costs about 16 ms of CPU (m = 19456 KiB, t = 2, p = 1, the OWASP minimum), so an
//! unbounded burst of logins would occupy every core and starve all other requests. At most
//! one hash per core runs at a time; the rest wait for a permit without holding a thread.
//! Hashing runs on the blocking pool, never on the reactor.
//!
//! Checking a password for a user that does not exist verifies against a dummy hash made
//! with the same parameters, so an unknown username costs the same time as a wrong password.

use std::sync::Arc;

use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use ring::rand::{SecureRandom, SystemRandom};
use tokio::sync::Semaphore;

/// Argon2id memory cost in KiB.
pub const M_COST: u32 = 19_456;
/// Argon2id passes.
pub const T_COST: u32 = 2;
/// Argon2id lanes.
pub const P_COST: u32 = 1;

fn argon2() -> Argon2<'static> {
    // The constants above are valid Argon2 parameters; `Params::new` only rejects values
    // outside the algorithm's ranges, so this cannot fail.
    let params = Params::new(M_COST, T_COST, P_COST, None).expect("valid Argon2 parameters");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// Hashes on the calling thread; for the command line and for the dummy hash.
pub fn hash_blocking(password: &str) -> Result<String, PasswordError> {
    let mut salt = [0u8; 16];
    SystemRandom::new()
        .fill(&mut salt)
        .map_err(|_| PasswordError("the system random generator failed".into()))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| PasswordError(e.to_string()))?;
    argon2()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| PasswordError(e.to_string()))
}

fn verify_blocking(phc: &str, password: &str) -> bool {
    match PasswordHash::new(phc) {
        // Verification uses the parameters recorded in the PHC string.
        Ok(hash) => argon2().verify_password(password.as_bytes(), &hash).is_ok(),
        Err(_) => {
            log::warn!("a stored password hash is not a valid PHC string");
            false
        }
    }
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

/// Shared by all requests of a worker.
#[derive(Clone)]
pub struct Passwords {
    /// One permit per core: the most hashes that run at once.
    permits: Arc<Semaphore>,
    /// Verified against when the user does not exist, to take the same time.
    dummy_hash: Arc<str>,
}

impl Passwords {
    /// Prepares the hasher; computes the dummy hash once (one hash's time).
    pub fn new() -> Result<Self, PasswordError> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Ok(Passwords {
            permits: Arc::new(Semaphore::new(cores)),
            dummy_hash: hash_blocking("paygate dummy password for unknown users")?.into(),
        })
    }

    async fn with_permit<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        // The semaphore is never closed, so acquiring only fails if it were; treat as failure.
        let _permit = self.permits.acquire().await.ok()?;
        tokio::task::spawn_blocking(work).await.ok()
    }

    /// Hashes a new password.
    pub async fn hash(&self, password: String) -> Result<String, PasswordError> {
        self.with_permit(move || hash_blocking(&password))
            .await
            .unwrap_or_else(|| Err(PasswordError("hashing task failed".into())))
    }

    /// Checks `password` against `phc`, or against the dummy hash when there is no user, so
    /// both cases take the same time. Returns true only for a real match.
    pub async fn verify(&self, phc: Option<String>, password: String) -> bool {
        let known = phc.is_some();
        let phc = phc.unwrap_or_else(|| self.dummy_hash.to_string());
        let matched = self
            .with_permit(move || verify_blocking(&phc, &password))
            .await
            .unwrap_or(false);
        known && matched
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_verify_and_unknown_users_never_match() {
        let passwords = Passwords::new().unwrap();
        let phc = passwords.hash("s3cret-horse".into()).await.unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert!(
            passwords
                .verify(Some(phc.clone()), "s3cret-horse".into())
                .await
        );
        assert!(!passwords.verify(Some(phc), "s3cret-horsE".into()).await);
        // Even the dummy password does not log in a user that does not exist.
        let dummy = "paygate dummy password for unknown users".to_string();
        assert!(!passwords.verify(None, dummy).await);
        assert!(!passwords.verify(Some("not a phc".into()), "x".into()).await);
    }
}
