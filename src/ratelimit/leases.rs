//! The per-process fast path: tokens leased from the shared bucket and spent from memory,
//! and refusals remembered until the next token (see the module documentation of
//! `ratelimit` for why this never over-admits).

use std::net::IpAddr;

use super::rules::Rule;
use super::{ip_key, BucketKey, Limiter, Verdict, MAX_LOCAL_KEYS};
use crate::store::StoreError;
use crate::token_bucket::{Limit, TokenBucket, NS_PER_SEC};

/// A lease of tokens taken from the shared bucket.
#[derive(Debug, Clone, Copy)]
pub(super) struct Lease {
    /// The holder stops spending at this instant; the store stops holding the tokens back.
    expires_at: i64,
    size: u32,
    used: u32,
}

impl Lease {
    /// Unspent tokens this process may still use at `now`.
    pub(super) fn usable(&self, now: i64) -> u32 {
        if now < self.expires_at {
            self.size - self.used
        } else {
            0
        }
    }
}

#[derive(Debug, Default)]
pub(super) struct Local {
    lease: Option<Lease>,
    /// Refuse locally until then: the shared bucket has no token before.
    refused_until: i64,
    /// Whole tokens the shared bucket held at our last visit, for `RateLimit: r=`.
    shared_left: u32,
}

impl Local {
    /// Whether the entry still decides something: a live lease, or a refusal not yet over.
    pub(super) fn is_live(&self, now: i64) -> bool {
        self.refused_until > now || self.lease.is_some_and(|l| l.usable(now) > 0)
    }
}

/// Index into the local map: rule position and key.
pub(super) type LocalKey = (usize, BucketKey);

/// How long a lease lives (and holds its tokens back from other processes).
pub(super) const LEASE_TTL_NS: i64 = NS_PER_SEC;
/// Keys are spread over this many refresh locks.
pub(super) const REFRESH_STRIPES: usize = 64;

/// How many tokens one lease takes: an eighth of the burst (so one process can only hold a
/// small part of a bucket) and no more than refills during the lease's life; at least one.
pub(super) fn lease_size(limit: Limit) -> u32 {
    let refill = u32::try_from(LEASE_TTL_NS / limit.interval_ns).unwrap_or(u32::MAX);
    refill.min(limit.burst / 8).max(1)
}

/// Holds back what other processes' live leases hold: the bucket may not contain more than
/// the burst less those tokens. Persisting this floor is what keeps "tokens in the bucket +
/// tokens in leases ≤ burst" true when the bucket has refilled while leases were out.
pub(super) fn hold_back(bucket: &mut TokenBucket, limit: Limit, held_by_others: u32, now: i64) {
    let floor = i128::from(now) + i128::from(limit.interval_ns) * i128::from(held_by_others);
    let floor = i64::try_from(floor).unwrap_or(i64::MAX);
    bucket.full_at = bucket.full_at.max(floor);
}

impl Limiter {
    /// Answers from this process's memory alone, when it can.
    fn decide_locally(&self, key: &LocalKey, rule: &Rule, now: i64) -> Option<Verdict> {
        let mut map = self.local();
        let entry = map.get_mut(key)?;
        if let Some(lease) = entry.lease.as_mut() {
            let usable = lease.usable(now);
            if usable > 0 {
                lease.used += 1;
                let remaining = usable - 1 + entry.shared_left;
                // Seconds until the tokens not left would have refilled.
                let missing = rule.limit.burst.saturating_sub(remaining);
                let reset = i64::from(missing).saturating_mul(rule.limit.interval_ns);
                return Some(Verdict::Admit(Some(self.quota(rule, remaining, reset))));
            }
        }
        (now < entry.refused_until).then(|| self.refuse(rule, entry.refused_until - now))
    }

    pub(super) async fn check_leased(
        &self,
        index: usize,
        rule: &Rule,
        key: BucketKey,
    ) -> Result<Verdict, StoreError> {
        let limit = rule.limit;
        let local_key = (index, key);
        if let Some(verdict) = self.decide_locally(&local_key, rule, self.clock.now_ns()) {
            return Ok(verdict);
        }
        // One refresh per key at a time; whoever waited here may find a fresh lease.
        let stripe = std::hash::BuildHasher::hash_one(&self.stripe_hasher, &local_key);
        let _refreshing = self.refresh_locks[(stripe % REFRESH_STRIPES as u64) as usize]
            .lock()
            .await;
        if let Some(verdict) = self.decide_locally(&local_key, rule, self.clock.now_ns()) {
            return Ok(verdict);
        }
        let size = lease_size(limit);
        let now = self.clock.now_ns();
        let (granted, bucket) = self
            .step(
                rule.name.to_string(),
                local_key.1.to_string(),
                move |b, held_by_others| {
                    hold_back(b, limit, held_by_others, now);
                    let granted = b.take_up_to(limit, now, size);
                    (granted, (granted, *b))
                },
            )
            .await?;
        let mut map = self.local();
        if map.len() >= MAX_LOCAL_KEYS && !map.contains_key(&local_key) {
            map.retain(|_, e| e.is_live(now));
            if map.len() >= MAX_LOCAL_KEYS {
                map.clear();
            }
        }
        let entry = map.entry(local_key).or_default();
        entry.shared_left = bucket.whole_tokens(limit, now);
        if granted == 0 {
            let retry = bucket.wait_for_token(limit, now);
            entry.refused_until = now.saturating_add(retry);
            return Ok(self.refuse(rule, retry));
        }
        entry.refused_until = 0;
        entry.lease = Some(Lease {
            expires_at: now.saturating_add(LEASE_TTL_NS),
            size: granted,
            used: 1,
        });
        let remaining = granted - 1 + entry.shared_left;
        Ok(Verdict::Admit(Some(self.quota(
            rule,
            remaining,
            bucket.time_to_full(now),
        ))))
    }

    /// Charges one password check to the client's address (before any hashing): refused
    /// while that address has spent its budget, whatever usernames it tries.
    pub async fn check_password_budget(&self, client: IpAddr) -> Result<Verdict, StoreError> {
        match &self.password_checks {
            None => Ok(Verdict::Admit(None)),
            // Its own slot in the local map: after every rule's.
            Some(rule) => {
                self.check_leased(self.rules.len(), rule, ip_key(client))
                    .await
            }
        }
    }
}
