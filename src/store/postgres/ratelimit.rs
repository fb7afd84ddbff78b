//! Rate-limit buckets and the leases nodes hold on them, in PostgreSQL: the same step as
//! `store::ratelimit::RateStore::step`, so that the proof in `src/ratelimit/mod.rs` (tokens
//! in the bucket plus tokens in live leases never exceed the burst) holds across nodes.
//!
//! Each step is one transaction that first takes a transaction-scoped advisory lock on
//! its bucket's name: steps on one bucket, from any node, run one after the other, also
//! for a bucket that has no row yet (a row lock could not hold what does not exist, and
//! two nodes inserting a new bucket at once would each spend its whole burst). When the
//! key has no bucket and an overflow bucket stands in for new keys, that one is locked
//! too, always after the key's own (no step holds an overflow lock and waits for
//! another), so the locks cannot deadlock.

use deadpool_postgres::Pool;
use tokio_postgres::Transaction;

use super::{open_pool, DatabaseUrl};
use crate::store::ratelimit::decide;
use crate::store::StoreError;
use crate::token_bucket::TokenBucket;

/// Buckets and leases in PostgreSQL, shared by every node; cheap to clone.
#[derive(Clone)]
pub struct PgRateStore {
    pool: Pool,
}

/// Locks bucket `key` of `rule` until the transaction ends.
async fn lock(tx: &Transaction<'_>, rule: &str, key: &str) -> Result<(), StoreError> {
    tx.execute(
        // The two-key form: a lock space apart from the single-key locks of migrations and
        // payments. Two names that hash alike only wait for each other, never share tokens.
        "SELECT pg_advisory_xact_lock(hashtext($1), hashtext($2))",
        &[&rule, &key],
    )
    .await?;
    Ok(())
}

async fn full_at(tx: &Transaction<'_>, rule: &str, key: &str) -> Result<Option<i64>, StoreError> {
    let row = tx
        .query_opt(
            "SELECT full_at FROM buckets WHERE rule = $1 AND key = $2",
            &[&rule, &key],
        )
        .await?;
    Ok(row.map(|r| r.try_get(0)).transpose()?)
}

impl PgRateStore {
    /// Works through `pool` (a store's).
    pub fn from_pool(pool: Pool) -> PgRateStore {
        PgRateStore { pool }
    }

    /// Connects with up to `pool_size` connections (the schema is the main migrations').
    pub async fn open(url: &DatabaseUrl, pool_size: usize) -> Result<PgRateStore, StoreError> {
        Ok(PgRateStore {
            pool: open_pool(url, pool_size).await?,
        })
    }

    /// Reads the bucket `key` of `rule` (or the overflow bucket standing in for a key that
    /// has none) and the leases others hold on it, lets `change` spend from it and say how
    /// many tokens `holder` keeps leased until `expires_at`, and stores both, atomically.
    #[allow(clippy::too_many_arguments)] // each argument is one named part of the step
    pub async fn step<T>(
        &self,
        rule: &str,
        key: &str,
        overflow_key: Option<&str>,
        holder: &str,
        now: i64,
        expires_at: i64,
        change: impl FnOnce(&mut TokenBucket, u32) -> (u32, T),
    ) -> Result<T, StoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        lock(&tx, rule, key).await?;
        let (key, full_at) = match (full_at(&tx, rule, key).await?, overflow_key) {
            (Some(full_at), _) => (key, Some(full_at)),
            (None, Some(overflow)) => {
                lock(&tx, rule, overflow).await?;
                (overflow, full_at(&tx, rule, overflow).await?)
            }
            (None, None) => (key, None),
        };
        let leases: Vec<(String, i64, i64)> = tx
            .query(
                "SELECT holder, tokens, expires_at FROM leases WHERE rule = $1 AND key = $2",
                &[&rule, &key],
            )
            .await?
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
            .collect::<Result<_, StoreError>>()?;
        let (bucket, hold, result) = decide(full_at, &leases, holder, now, change);
        if Some(bucket.full_at) != full_at {
            tx.execute(
                "INSERT INTO buckets (rule, key, full_at) VALUES ($1, $2, $3)
                 ON CONFLICT (rule, key) DO UPDATE SET full_at = excluded.full_at",
                &[&rule, &key, &bucket.full_at],
            )
            .await?;
        }
        if hold > 0 {
            tx.execute(
                "INSERT INTO leases (rule, key, holder, tokens, expires_at)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (rule, key, holder) DO UPDATE SET
                     tokens = excluded.tokens, expires_at = excluded.expires_at",
                &[&rule, &key, &holder, &i64::from(hold), &expires_at],
            )
            .await?;
        } else if leases.iter().any(|l| l.0 == holder) {
            tx.execute(
                "DELETE FROM leases WHERE rule = $1 AND key = $2 AND holder = $3",
                &[&rule, &key, &holder],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(result)
    }

    /// Deletes full buckets and expired leases; how many buckets remain.
    pub async fn sweep(&self, now_ns: i64) -> Result<u64, StoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute("DELETE FROM buckets WHERE full_at <= $1", &[&now_ns])
            .await?;
        tx.execute("DELETE FROM leases WHERE expires_at <= $1", &[&now_ns])
            .await?;
        let remaining: i64 = tx
            .query_one("SELECT count(*) FROM buckets", &[])
            .await?
            .try_get(0)?;
        tx.commit().await?;
        Ok(u64::try_from(remaining).unwrap_or(0))
    }
}
