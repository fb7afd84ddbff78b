//! The state every request of a worker shares, and how it is opened at start.

use crate::audit::AuditLog;
use crate::cache::StateCache;
use crate::config::ServeConfig;
use crate::metrics::Metrics;
use crate::passwords::Passwords;
use crate::ratelimit::Limiter;
use crate::store::{RateStore, Store};
use crate::time::Clock;
use crate::tokens::Tokens;

/// Shared, read-mostly state; one per worker, behind an `Arc`.
pub struct App {
    pub config: ServeConfig,
    pub store: Store,
    pub passwords: Passwords,
    pub limiter: Limiter,
    pub tokens: Tokens,
    pub audit: AuditLog,
    /// What this worker knows of paygate.db (token state, grants, payments), kept exact.
    pub cache: StateCache,
    /// This worker's counters, for `GET /metrics`.
    pub metrics: Metrics,
    /// What time it is, for every decision that depends on it: one clock, so tests move it
    /// instead of sleeping.
    pub clock: Clock,
}

impl App {
    /// Opens the databases in the data directory and prepares password hashing. Blocking
    /// (file I/O and one Argon2id hash): call it from a blocking context.
    pub fn open(
        config: ServeConfig,
        clock: Clock,
    ) -> Result<App, Box<dyn std::error::Error + Send + Sync>> {
        let store = Store::open_with_clock(&config.data_dir, clock.clone())?;
        let rates = RateStore::open(&config.data_dir)?;
        let passwords = Passwords::new(config.password_queue)?;
        let tokens = Tokens::open(&config.data_dir, config.token_format, config.token_ttl_s)?;
        let audit = AuditLog::open(
            &config.data_dir,
            config.instance.as_deref(),
            config.audit_rotate_bytes,
            config.audit,
        )?;
        let limiter = Limiter::new(
            config.rate_limits.clone(),
            config.guess_limit,
            config.password_check_limit.clone(),
            rates,
            clock.clone(),
        );
        let metrics = Metrics::new(&audit.instance);
        let cache = StateCache::open(&config.data_dir, metrics.cache())?;
        Ok(App {
            clock,
            cache,
            metrics,
            config,
            store,
            passwords,
            limiter,
            tokens,
            audit,
        })
    }
}
