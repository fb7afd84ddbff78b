//! Rules with `delay=`: a request over the limit waits for its token (up to the delay, and
//! only while a waiter slot is free) instead of being refused at once.

use std::time::Duration;

use super::leases::hold_back;
use super::rules::Rule;
use super::{BucketKey, Limiter, Verdict};
use crate::store::StoreError;
use crate::token_bucket::Take;

impl Limiter {
    pub(super) async fn check_with_delay(
        &self,
        rule: &Rule,
        key: BucketKey,
        delay: Duration,
    ) -> Result<Verdict, StoreError> {
        let limit = rule.limit;
        let now = self.clock.now_ns();
        // Waiting is bounded: without a waiter slot, an over-limit request is refused at once.
        let permit = self.waiters.clone().try_acquire_owned().ok();
        let max_wait = if permit.is_some() {
            i64::try_from(delay.as_nanos()).unwrap_or(i64::MAX)
        } else {
            0
        };
        let (take, bucket) = self
            .step(
                rule.name.to_string(),
                key.to_string(),
                move |b, held_by_others| {
                    hold_back(b, limit, held_by_others, now);
                    (0, (b.take(limit, now, max_wait), *b))
                },
            )
            .await?;
        match take {
            Take::Denied { retry_ns } => Ok(self.refuse(rule, retry_ns)),
            Take::Granted { wait_ns } => {
                if wait_ns > 0 {
                    tokio::time::sleep(Duration::from_nanos(u64::try_from(wait_ns).unwrap_or(0)))
                        .await;
                }
                drop(permit);
                let remaining = bucket.whole_tokens(limit, now.saturating_add(wait_ns));
                Ok(Verdict::Admit(Some(self.quota(
                    rule,
                    remaining,
                    bucket.time_to_full(now),
                ))))
            }
        }
    }
}
