//! The state every request of a worker shares, and how it is opened at start.

use crate::audit::AuditLog;
use crate::cache::StateCache;
use crate::config::ServeConfig;
use crate::metrics::Metrics;
use crate::passwords::Passwords;
use crate::ratelimit::Limiter;
use crate::store::postgres::PgStore;
use crate::store::sealing::TotpKeys;
use crate::store::{RateStore, Store};
use crate::time::Clock;
use crate::tokens::keys::Keyring;
use crate::tokens::Tokens;

/// Shared, read-mostly state; one per worker, behind an `Arc`.
pub struct App {
    pub config: ServeConfig,
    pub store: Store,
    pub passwords: Passwords,
    pub limiter: Limiter,
    pub tokens: Tokens,
    pub audit: AuditLog,
    /// Ships this worker's sealed audit segments, when an archive is configured.
    pub archive: Option<crate::audit::archive::Archiver>,
    /// What this worker knows of paygate.db (token state, grants, payments), kept exact.
    pub cache: StateCache,
    /// This worker's counters, for `GET /metrics`.
    pub metrics: Metrics,
    /// What time it is, for every decision that depends on it: one clock, so tests move it
    /// instead of sleeping.
    pub clock: Clock,
}

impl App {
    /// Opens the store `config` names — the shared PostgreSQL database, or SQLite in the
    /// data directory — and everything else a worker needs.
    pub async fn start(
        config: ServeConfig,
        clock: Clock,
    ) -> Result<App, Box<dyn std::error::Error + Send + Sync>> {
        if config.database.is_none() {
            return tokio::task::spawn_blocking(move || App::open(config, clock)).await?;
        }
        App::open_shared(config, clock).await
    }

    /// A node of several on one PostgreSQL database: users, tokens' state, grants, payments,
    /// rate limits and JWT keys in the database; the audit log, the TLS files and the
    /// sealing key (`totp.key`, the same on every node) in the data directory.
    async fn open_shared(
        config: ServeConfig,
        clock: Clock,
    ) -> Result<App, Box<dyn std::error::Error + Send + Sync>> {
        let url = config
            .database
            .clone()
            .ok_or("no database to share was configured")?;
        let local = config.clone();
        let (sealing, passwords, audit) = tokio::task::spawn_blocking(move || {
            crate::store::ensure_data_dir(&local.data_dir)?;
            let sealing = TotpKeys::load_or_create(&local.data_dir)?;
            let passwords = Passwords::new(local.password_queue)?;
            let audit = AuditLog::open(
                &local.data_dir,
                local.instance.as_deref(),
                local.audit_rotation,
                local.audit,
            )?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((sealing, passwords, audit))
        })
        .await??;
        let store = PgStore::open(
            &url,
            config.database_pool_size,
            std::sync::Arc::new(sealing),
            clock.clone(),
        )
        .await?;
        log::info!("storage: PostgreSQL at {}", url.describe());
        let keyring = Keyring::open_shared(store.clone(), clock.now_s()).await?;
        let tokens = Tokens::with_keyring(
            std::sync::Arc::new(keyring),
            config.token_format,
            config.token_ttl_s,
        );
        let limiter = Limiter::new(
            config.rate_limits.clone(),
            config.guess_limit,
            config.password_check_limit.clone(),
            RateStore::Postgres(store.rate_store()),
            clock.clone(),
        );
        let metrics = Metrics::new(&audit.instance);
        let cache =
            StateCache::over_postgres(store.clone(), &lease_name(&audit.instance), metrics.cache())
                .await?;
        let archive = match &config.audit_archive {
            Some(settings) => audit.archiver(&config.data_dir, archive_target(settings)?)?,
            None => None,
        };
        Ok(App {
            clock,
            cache,
            metrics,
            config,
            store: Store::Postgres(store),
            passwords,
            limiter,
            tokens,
            archive,
            audit,
        })
    }

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
            config.audit_rotation,
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
        let archive = match &config.audit_archive {
            Some(settings) => audit.archiver(&config.data_dir, archive_target(settings)?)?,
            None => None,
        };
        Ok(App {
            clock,
            cache,
            metrics,
            config,
            store,
            passwords,
            limiter,
            tokens,
            archive,
            audit,
        })
    }
}

/// How a worker names itself in the shared database's lease rows (which operators read in
/// `keys rotate-totp`'s answers): the host and its audit instance.
fn lease_name(instance: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}/{instance}", host.trim())
}

/// Where `settings` say the audit segments go.
fn archive_target(
    settings: &crate::config::ArchiveSettings,
) -> Result<crate::audit::archive::ArchiveTarget, String> {
    Ok(crate::audit::archive::ArchiveTarget {
        bucket: settings.bucket()?,
        prefix: settings.prefix.clone(),
        node: settings.node.clone(),
        retention_days: settings.retention_days,
        digest_interval: std::time::Duration::from_secs(settings.digest_interval_s),
        local_retention: std::time::Duration::from_secs(settings.local_retention_days * 86_400),
    })
}
