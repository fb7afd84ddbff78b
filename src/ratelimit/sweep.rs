//! Keeping `ratelimit.db` and the local map small: full buckets are deleted, entries
//! without a live lease or refusal forgotten, and the overflow flag set past [`MAX_ROWS`].

use std::sync::atomic::Ordering;

use super::{Limiter, MAX_ROWS};
use crate::store::StoreError;

impl Limiter {
    /// Deletes full buckets and updates the overflow flag; returns the rows left.
    pub async fn sweep(&self) -> Result<u64, StoreError> {
        let store = self.store.clone();
        let now = self.clock.now_ns();
        let rows = store.sweep(now).await?;
        let overflowing = rows > MAX_ROWS;
        if overflowing != self.overflow.swap(overflowing, Ordering::Relaxed) {
            if overflowing {
                log::warn!("rate-limit table holds {rows} buckets (cap {MAX_ROWS}): new keys share an overflow bucket per rule");
            } else {
                log::info!("rate-limit table back under its cap ({rows} buckets)");
            }
        }
        let mut map = self.local();
        map.retain(|_, entry| entry.is_live(now));
        Ok(rows)
    }
}
