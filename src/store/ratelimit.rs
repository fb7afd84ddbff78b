//! `ratelimit.db`: the token buckets every process on a data directory shares.
//!
//! One row per bucket that is not full, holding the instant it will be full again. Every
//! change is one tiny `BEGIN IMMEDIATE` transaction (read the row, apply the bucket
//! arithmetic, write it back), so processes never see a half-applied decision. The limiter
//! calls this rarely — per lease of several tokens, not per request — and on the blocking
//! pool.

use std::path::Path;

use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::{params, OptionalExtension, TransactionBehavior};

use super::{ensure_writable_dir, migrate, open_pool, Durability, StoreError};
use crate::ratelimit::bucket::TokenBucket;

/// File name of the rate-limit database inside the data directory.
pub const RATELIMIT_DB: &str = "ratelimit.db";

/// Shared bucket storage; cheap to clone.
#[derive(Clone)]
pub struct RateStore {
    pool: r2d2::Pool<SqliteConnectionManager>,
}

impl RateStore {
    pub fn open(data_dir: &Path) -> Result<RateStore, StoreError> {
        ensure_writable_dir(data_dir)?;
        let pool = open_pool(
            &data_dir.join(RATELIMIT_DB),
            Durability::Normal,
            migrate::RATELIMIT,
            4,
        )?;
        Ok(RateStore { pool })
    }

    /// Applies `change` to the bucket `(rule, key)` atomically and returns its result.
    ///
    /// When the bucket has no row (it is full) and `overflow_key` is given, the change is
    /// applied to the bucket `(rule, overflow_key)` instead: that is how the number of rows
    /// stays bounded while the table is at its cap.
    pub fn update<T>(
        &self,
        rule: &str,
        key: &str,
        overflow_key: Option<&str>,
        change: impl FnOnce(&mut TokenBucket) -> T,
    ) -> Result<T, StoreError> {
        let mut conn = self.pool.get().map_err(|_| StoreError::Busy)?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let read = |key: &str| {
            tx.prepare_cached("SELECT full_at FROM buckets WHERE rule = ?1 AND key = ?2")?
                .query_row(params![rule, key], |r| r.get::<_, i64>(0))
                .optional()
        };
        let (key, full_at) = match (read(key)?, overflow_key) {
            (Some(full_at), _) => (key, Some(full_at)),
            (None, Some(overflow)) => (overflow, read(overflow)?),
            (None, None) => (key, None),
        };
        let mut bucket = full_at.map_or(TokenBucket::FULL, |full_at| TokenBucket { full_at });
        let result = change(&mut bucket);
        if Some(bucket.full_at) != full_at {
            tx.prepare_cached(
                "INSERT INTO buckets (rule, key, full_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (rule, key) DO UPDATE SET full_at = excluded.full_at",
            )?
            .execute(params![rule, key, bucket.full_at])?;
        }
        tx.commit()?;
        Ok(result)
    }

    /// Deletes the rows of full buckets (indistinguishable from no row) and returns how many
    /// rows remain.
    pub fn sweep(&self, now_ns: i64) -> Result<u64, StoreError> {
        let mut conn = self.pool.get().map_err(|_| StoreError::Busy)?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute("DELETE FROM buckets WHERE full_at <= ?1", [now_ns])?;
        let remaining: i64 = tx.query_row("SELECT count(*) FROM buckets", [], |r| r.get(0))?;
        tx.commit()?;
        Ok(u64::try_from(remaining).unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratelimit::bucket::{Limit, Take};
    use std::time::{Duration, Instant};

    fn temp_dir() -> std::path::PathBuf {
        std::env::temp_dir().join(format!("paygate-rate-{}", uuid::Uuid::new_v4()))
    }

    const L: Limit = Limit {
        burst: 2,
        interval_ns: 1_000_000_000,
    };

    #[test]
    fn buckets_persist_across_handles_and_overflow_is_shared() {
        let dir = temp_dir();
        let now = 1_000_000_000_000;
        let store = RateStore::open(&dir).unwrap();
        for _ in 0..2 {
            assert!(matches!(
                store.update("r", "k", None, |b| b.take(L, now, 0)).unwrap(),
                Take::Granted { .. }
            ));
        }
        drop(store);
        let store = RateStore::open(&dir).unwrap();
        let again = store.update("r", "k", None, |b| b.take(L, now, 0)).unwrap();
        assert!(
            matches!(again, Take::Denied { .. }),
            "a reopened store remembers"
        );
        // A new key under overflow draws from the shared overflow bucket, adding no row.
        for key in ["a", "b"] {
            store
                .update("r", key, Some("overflow"), |b| b.take(L, now, 0))
                .unwrap();
        }
        let third = store
            .update("r", "c", Some("overflow"), |b| b.take(L, now, 0))
            .unwrap();
        assert!(matches!(third, Take::Denied { .. }));
        assert_eq!(store.sweep(now).unwrap(), 2, "rows: k and overflow");
        assert_eq!(
            store.sweep(now + 10_000_000_000).unwrap(),
            0,
            "full buckets are swept"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Two connections (as two processes would have) hammer one bucket: the fast busy
    /// handler keeps every wait short, and no update is lost.
    #[test]
    fn two_writers_on_one_bucket_wait_briefly_and_lose_nothing() {
        let dir = temp_dir();
        let big = Limit {
            burst: 1_000_000,
            interval_ns: 1_000_000_000,
        };
        let now = 1_000_000_000_000;
        RateStore::open(&dir).unwrap();
        let workers: Vec<_> = (0..2)
            .map(|_| {
                let store = RateStore::open(&dir).unwrap();
                std::thread::spawn(move || {
                    let mut worst = Duration::ZERO;
                    let mut taken = 0u32;
                    for _ in 0..2000 {
                        let started = Instant::now();
                        taken += store
                            .update("r", "hot", None, |b| b.take_up_to(big, now, 1))
                            .unwrap();
                        worst = worst.max(started.elapsed());
                    }
                    (taken, worst)
                })
            })
            .collect();
        let results: Vec<(u32, Duration)> =
            workers.into_iter().map(|w| w.join().unwrap()).collect();
        let store = RateStore::open(&dir).unwrap();
        let left = store
            .update("r", "hot", None, |b| b.whole_tokens(big, now))
            .unwrap();
        assert_eq!(results.iter().map(|r| r.0).sum::<u32>(), 4000);
        assert_eq!(
            left,
            1_000_000 - 4000,
            "every take was recorded exactly once"
        );
        let worst = results.iter().map(|r| r.1).max().unwrap();
        // SQLite's default handler sleeps up to 100 ms per retry and can stall for seconds;
        // ours polls every 50–2000 µs. A loose bound, for noisy machines.
        assert!(worst < Duration::from_millis(500), "worst wait {worst:?}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
