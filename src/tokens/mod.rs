//! Bearer tokens: what `POST /sessions` issues and what authentication accepts.
//!
//! Two kinds, both always accepted; `--token-format` picks the one login issues:
//! - JWTs ([`jwt`]), signed with the keys in [`keys`]: verified without the database. Only
//!   the user's state and the `jti`'s revocation are looked up, through the exact
//!   per-worker [`crate::cache`].
//! - Opaque tokens ([`opaque`]): random, stored as SHA-256 in the `sessions` table.
//!
//! TOTP codes ([`totp`]) are the second factor that can go into a token's `amr`.

pub mod capability;
pub mod jwt;
pub mod keys;
pub mod opaque;
pub mod totp;

use std::path::Path;
use std::sync::Arc;

use ring::rand::SystemRandom;
use uuid::Uuid;

use crate::store::{Store, StoreError};
use jwt::{Audience, Claims, JwtRejection};
use keys::Keyring;

/// The longest lifetime `--token-ttl` may set, in seconds (one day).
pub const MAX_TOKEN_TTL_S: u64 = 86_400;

/// What login issues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenFormat {
    Opaque,
    Jwt,
}

impl TokenFormat {
    pub fn parse(raw: &str) -> Option<TokenFormat> {
        match raw {
            "opaque" => Some(TokenFormat::Opaque),
            "jwt" => Some(TokenFormat::Jwt),
            _ => None,
        }
    }
}

/// A token handed to a client.
#[derive(Debug)]
pub struct Issued {
    pub token: String,
    /// Unix milliseconds.
    pub expires_at: i64,
}

/// A token could not be issued.
#[derive(Debug)]
pub enum IssueError {
    Store(StoreError),
    /// The system random generator failed.
    Random,
}

/// Issuing and checking tokens, one per worker.
pub struct Tokens {
    /// Shared with the task that polls the key file.
    pub keyring: Arc<Keyring>,
    pub format: TokenFormat,
    /// Lifetime of issued tokens, and the longest lifetime a JWT may claim.
    pub ttl_s: i64,
    rng: SystemRandom,
}

impl Tokens {
    /// Loads (or creates) the signing keys. Blocking.
    pub fn open(
        data_dir: &Path,
        format: TokenFormat,
        ttl_s: i64,
    ) -> Result<Tokens, Box<dyn std::error::Error + Send + Sync>> {
        Ok(Tokens::with_keyring(
            Arc::new(Keyring::open(data_dir)?),
            format,
            ttl_s,
        ))
    }

    /// Issues and checks tokens with `keyring` (a node's view of a shared key set).
    pub fn with_keyring(keyring: Arc<Keyring>, format: TokenFormat, ttl_s: i64) -> Tokens {
        Tokens {
            keyring,
            format,
            ttl_s,
            rng: SystemRandom::new(),
        }
    }

    /// A signed JWT for `username`, valid from `now_s` for the configured lifetime.
    pub fn sign_jwt(&self, username: &str, amr: &[&str], now_s: i64) -> Issued {
        let claims = Claims {
            iss: jwt::ISSUER.to_owned(),
            aud: Audience::One(jwt::AUDIENCE.to_owned()),
            sub: username.to_owned(),
            iat: now_s,
            nbf: now_s,
            exp: now_s + self.ttl_s,
            jti: Uuid::new_v4().to_string(),
            amr: amr.iter().map(|a| (*a).to_owned()).collect(),
        };
        let keys = self.keyring.keys();
        Issued {
            token: jwt::sign(keys.current(), &claims),
            expires_at: claims.exp * 1000,
        }
    }

    /// A new token of the configured kind for a user who just proved who they are.
    pub async fn issue(
        &self,
        store: &Store,
        user_id: i64,
        username: &str,
        amr: &[&str],
        now_ms: i64,
    ) -> Result<Issued, IssueError> {
        match self.format {
            TokenFormat::Jwt => Ok(self.sign_jwt(username, amr, now_ms / 1000)),
            TokenFormat::Opaque => {
                let (token, hash) = opaque::generate(&self.rng).map_err(|_| IssueError::Random)?;
                let expires_at = now_ms + self.ttl_s * 1000;
                store
                    .create_session(hash, user_id, amr.join(" "), expires_at)
                    .await
                    .map_err(IssueError::Store)?;
                Ok(Issued { token, expires_at })
            }
        }
    }

    /// Verifies a JWT against the keys this worker holds (no I/O).
    pub fn verify_jwt(&self, token: &str, now_s: i64) -> Result<Claims, JwtRejection> {
        jwt::verify(token, &self.keyring.keys(), now_s, self.ttl_s)
    }
}
