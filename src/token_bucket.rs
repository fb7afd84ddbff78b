//! Token-bucket arithmetic, with nothing else: no storage, no locking, no clock reading.
//!
//! A bucket holds at most `burst` tokens and gains one every `interval` (the refill rate is
//! `1 / interval`). It is stored as a single instant, `full_at`: the time at which the
//! bucket will be full again (the "theoretical arrival time" of the generic cell rate
//! algorithm). From it, the tokens available at `now` are
//!
//! ```text
//! debt      = max(0, full_at - now)            time still needed to refill completely
//! available = (burst * interval - debt) / interval
//! ```
//!
//! so refill after idle, fractional tokens and the capacity cap all follow from one
//! subtraction, a very long gap simply clamps the debt to zero, and a clock that steps
//! backwards only makes the debt look larger (fewer tokens, never more). All arithmetic is
//! in integer nanoseconds (i128 inside, so nothing overflows); the wait for the next token
//! is exact.

/// Nanoseconds per second.
pub const NS_PER_SEC: i64 = 1_000_000_000;

/// A bucket's shape: capacity and refill interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// Capacity in tokens (≥ 1).
    pub burst: u32,
    /// Time to gain one token, in nanoseconds (≥ 1).
    pub interval_ns: i64,
}

impl Limit {
    /// `tokens` per `period_ns`, at most `burst` at once. The interval is rounded up, so a
    /// rate that does not divide evenly refills a hair slower, never faster.
    pub fn new(tokens: u32, period_ns: i64, burst: u32) -> Self {
        let tokens = i64::from(tokens.max(1));
        Limit {
            burst: burst.max(1),
            interval_ns: ((period_ns + tokens - 1) / tokens).max(1),
        }
    }

    /// Time to refill an empty bucket completely.
    pub fn window_ns(&self) -> i128 {
        i128::from(self.interval_ns) * i128::from(self.burst)
    }
}

/// Result of asking a bucket for tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// Granted; the caller must wait `wait_ns` first (0 unless it accepted a delay).
    Granted { wait_ns: i64 },
    /// Refused; a token will be available after `retry_ns`.
    Denied { retry_ns: i64 },
}

/// The bucket state: when it will be full again, in nanoseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenBucket {
    pub full_at: i64,
}

fn clamp_i64(v: i128) -> i64 {
    v.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
}

impl TokenBucket {
    /// A full bucket.
    pub const FULL: TokenBucket = TokenBucket { full_at: i64::MIN };

    fn debt(&self, now: i64) -> i128 {
        (i128::from(self.full_at) - i128::from(now)).max(0)
    }

    /// Tokens available at `now`, fractions included (never more than `burst`).
    pub fn available(&self, limit: Limit, now: i64) -> f64 {
        let spare = limit.window_ns() - self.debt(now);
        spare as f64 / limit.interval_ns as f64
    }

    /// Whole tokens available at `now`.
    pub fn whole_tokens(&self, limit: Limit, now: i64) -> u32 {
        let spare = (limit.window_ns() - self.debt(now)).max(0);
        u32::try_from(spare / i128::from(limit.interval_ns)).unwrap_or(u32::MAX)
    }

    /// Exact time until one more whole token is available (0 if one is available now).
    pub fn wait_for_token(&self, limit: Limit, now: i64) -> i64 {
        clamp_i64(self.debt(now) + i128::from(limit.interval_ns) - limit.window_ns()).max(0)
    }

    /// Time until the bucket is full again.
    pub fn time_to_full(&self, now: i64) -> i64 {
        clamp_i64(self.debt(now))
    }

    /// Takes one token. With `max_wait_ns` > 0 a token that becomes available within that
    /// time is reserved now and the caller told how long to wait for it.
    pub fn take(&mut self, limit: Limit, now: i64, max_wait_ns: i64) -> Take {
        let wait = self.wait_for_token(limit, now);
        if wait > max_wait_ns.max(0) {
            return Take::Denied { retry_ns: wait };
        }
        let start = i128::from(self.full_at).max(i128::from(now));
        self.full_at = clamp_i64(start + i128::from(limit.interval_ns));
        Take::Granted { wait_ns: wait }
    }

    /// Takes as many whole tokens as are available now, up to `max`; returns how many.
    pub fn take_up_to(&mut self, limit: Limit, now: i64, max: u32) -> u32 {
        let n = self.whole_tokens(limit, now).min(max);
        if n > 0 {
            let start = i128::from(self.full_at).max(i128::from(now));
            self.full_at = clamp_i64(start + i128::from(limit.interval_ns) * i128::from(n));
        }
        n
    }

    /// Gives back `n` tokens that were taken but not used. The capacity cap still holds:
    /// a bucket can never hold more than `burst`.
    pub fn refund(&mut self, limit: Limit, n: u32) {
        self.full_at =
            clamp_i64(i128::from(self.full_at) - i128::from(limit.interval_ns) * i128::from(n));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = NS_PER_SEC;
    /// 1 token per second, 3 at most.
    const L: Limit = Limit {
        burst: 3,
        interval_ns: S,
    };
    const T0: i64 = 1_700_000_000 * S;

    fn granted(take: Take) -> bool {
        matches!(take, Take::Granted { wait_ns: 0 })
    }

    #[test]
    fn a_fresh_bucket_allows_the_burst_then_refuses() {
        let mut b = TokenBucket::FULL;
        for _ in 0..3 {
            assert!(granted(b.take(L, T0, 0)));
        }
        assert_eq!(b.take(L, T0, 0), Take::Denied { retry_ns: S });
    }

    #[test]
    fn refill_after_idle_and_fractional_tokens() {
        let mut b = TokenBucket::FULL;
        for _ in 0..3 {
            b.take(L, T0, 0);
        }
        assert_eq!(b.available(L, T0), 0.0);
        assert_eq!(
            b.available(L, T0 + S / 2),
            0.5,
            "half a token after half an interval"
        );
        assert_eq!(b.whole_tokens(L, T0 + S / 2), 0);
        assert_eq!(b.take(L, T0 + S / 2, 0), Take::Denied { retry_ns: S / 2 });
        assert_eq!(b.available(L, T0 + 2 * S + S / 4), 2.25);
        assert!(granted(b.take(L, T0 + 2 * S, 0)));
        assert!(granted(b.take(L, T0 + 2 * S, 0)));
        assert!(!granted(b.take(L, T0 + 2 * S, 0)));
    }

    #[test]
    fn capacity_caps_and_very_long_gaps_do_not_overflow() {
        let mut b = TokenBucket::FULL;
        b.take(L, T0, 0);
        assert_eq!(b.available(L, T0 + 3600 * S), 3.0, "never more than burst");
        assert_eq!(b.available(L, i64::MAX), 3.0);
        assert_eq!(TokenBucket::FULL.available(L, i64::MIN), 3.0);
        let mut far = TokenBucket { full_at: i64::MAX };
        assert!(matches!(far.take(L, 0, 0), Take::Denied { .. }));
        // A huge window (burst 1e6 at one per day) stays exact in i128.
        let daily = Limit::new(1, 86_400 * S, 1_000_000);
        assert_eq!(TokenBucket::FULL.whole_tokens(daily, T0), 1_000_000);
    }

    #[test]
    fn a_clock_stepping_backwards_never_adds_tokens() {
        let mut b = TokenBucket::FULL;
        for _ in 0..3 {
            b.take(L, T0, 0);
        }
        // The clock jumps back 10 s: the bucket looks emptier, not fuller.
        assert_eq!(b.available(L, T0 - 10 * S), -10.0);
        assert_eq!(b.take(L, T0 - 10 * S, 0), Take::Denied { retry_ns: 11 * S });
        // Once time catches up, refill resumes as if nothing happened.
        assert!(granted(b.take(L, T0 + S, 0)));
    }

    #[test]
    fn the_wait_for_the_next_token_is_exact() {
        let limit = Limit::new(5, 60 * S, 5); // 5/min: one every 12 s
        assert_eq!(limit.interval_ns, 12 * S);
        let mut b = TokenBucket::FULL;
        for _ in 0..5 {
            b.take(limit, T0, 0);
        }
        assert_eq!(b.wait_for_token(limit, T0), 12 * S);
        assert_eq!(b.wait_for_token(limit, T0 + 7 * S + 1), 5 * S - 1);
        assert_eq!(b.wait_for_token(limit, T0 + 12 * S), 0);
        assert_eq!(b.time_to_full(T0), 60 * S);
        // Uneven rates round the interval up: 3 per second refill every 333333334 ns.
        assert_eq!(Limit::new(3, S, 1).interval_ns, 333_333_334);
    }

    #[test]
    fn delays_reserve_a_future_token() {
        let mut b = TokenBucket::FULL;
        for _ in 0..3 {
            b.take(L, T0, 0);
        }
        assert_eq!(
            b.take(L, T0, S / 2),
            Take::Denied { retry_ns: S },
            "too far off"
        );
        assert_eq!(b.take(L, T0, S), Take::Granted { wait_ns: S });
        // That token is spoken for: the next one is two intervals away.
        assert_eq!(b.wait_for_token(L, T0), 2 * S);
    }

    #[test]
    fn leases_take_what_is_there_and_refunds_respect_the_cap() {
        let mut b = TokenBucket::FULL;
        assert_eq!(b.take_up_to(L, T0, 2), 2);
        assert_eq!(b.take_up_to(L, T0, 2), 1);
        assert_eq!(b.take_up_to(L, T0, 2), 0);
        b.refund(L, 2);
        assert_eq!(b.whole_tokens(L, T0), 2);
        b.refund(L, 100);
        assert_eq!(b.available(L, T0), 3.0, "refunds never exceed the capacity");
    }
}
