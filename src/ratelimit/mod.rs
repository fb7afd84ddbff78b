//! The rate limiter: token buckets per (rule, key), shared by every process on a data
//! directory through `ratelimit.db`, with a per-process fast path that never over-admits.
//!
//! # Leases: how a hot key avoids a database write per request
//!
//! A process takes up to `lease_size` tokens (an eighth of the burst, at most one second
//! of refill) from the shared bucket in one transaction, records the lease in
//! `ratelimit.db` for one second, and spends the tokens from memory. While a lease is live,
//! its tokens are held back from the bucket's capacity for every other process: tokens in
//! the bucket plus tokens in live leases never exceed the burst, so processes together
//! never admit more than burst + refill, however leases and refills interleave. A lease
//! ends when its holder comes back for the next one or when it expires; the holder never
//! spends an expired lease.
//!
//! The price is under-admission: tokens held by one process are unavailable to the others
//! until used or returned, and the unspent tokens of a lease that expires (its holder went
//! quiet or died) are lost — at most `lease_size − 1` per process per key per second.
//! Rules whose burst is below 16 lease one token at a time and are exact.
//!
//! Only one lease refresh per key runs at a time in a process; concurrent requests for
//! that key wait for it and then spend from the new lease.
//!
//! # Refusals without the database
//!
//! When the shared bucket has no token, the process remembers when the next one will be
//! refilled and refuses that key locally until then. (Tokens can reappear sooner only when
//! another process returns an unspent lease; the local refusal then under-admits briefly.)
//! A flood against an empty bucket costs one transaction per refill interval per process,
//! not one per request.
//!
//! # Bounds
//!
//! The per-process map of leases and refusals holds at most [`MAX_LOCAL_KEYS`] entries;
//! beyond that, entries without a live lease or refusal are dropped, and if that is not
//! enough, all of them (forgetting leases under-admits, forgetting refusals costs a
//! database visit; neither over-admits). In the database, a full bucket has no row: rows of
//! buckets that have refilled are swept every [`SWEEP_EVERY`], so a key occupies a row only
//! for one window after its last request. If the table still grows past [`MAX_ROWS`] (a
//! spray of addresses), new keys share one overflow bucket per rule until sweeping brings
//! it back under the cap. IPv6 clients are keyed by their /64, which is what one
//! subscriber is usually given.

mod delay;
mod guesses;
mod leases;
mod quota;
pub mod rules;
mod sweep;

use guesses::GuessBudget;
pub use guesses::{GuessTicket, GUESS_CONCURRENCY};
use leases::{Local, LocalKey, LEASE_TTL_NS, REFRESH_STRIPES};
pub use quota::Quota;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use http::Method;
use tokio::sync::Semaphore;

use crate::store::{RateStore, StoreError};
use crate::time::Clock;
use crate::token_bucket::{Limit, TokenBucket, NS_PER_SEC};
use rules::{KeyKind, Rule};

/// Entries in a process's local map at most.
pub const MAX_LOCAL_KEYS: usize = 100_000;
/// Rows in `ratelimit.db` before new keys share an overflow bucket.
pub const MAX_ROWS: u64 = 200_000;
/// How often full buckets are swept from the database.
pub const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// Requests that may wait (`delay=`) at once per process; more are refused at once.
pub const MAX_WAITERS: usize = 1024;
/// Policy name of the per-username password-guess budget.
pub const GUESS_POLICY: &str = "password-guesses";
/// Default password-guess budget: 10 failures per 15 minutes per username.
pub const DEFAULT_GUESS_LIMIT: &str = "10/15min burst=10";
/// Policy name of the per-address password-check budget.
pub const PASSWORD_CHECK_POLICY: &str = "password-checks";
/// Default password-check budget per client address: 30 at once, then one every 2 s.
pub const DEFAULT_PASSWORD_CHECK_LIMIT: &str = "60/min burst=30";

/// The per-address password-check budget as a rule: `RATE/UNIT burst=N`, keyed by the
/// client address, named [`PASSWORD_CHECK_POLICY`].
pub fn password_check_rule(limit: &str) -> Result<Rule, rules::RuleError> {
    let mut rule = rules::parse_rule(&format!("* / {} key=ip", limit.trim()))?;
    let window = ceil_secs(i64::try_from(rule.limit.window_ns()).unwrap_or(i64::MAX));
    rule.name = Arc::from(PASSWORD_CHECK_POLICY);
    rule.policy = rules::policy_header(PASSWORD_CHECK_POLICY, rule.limit.burst, window);
    rule.delay = None;
    Ok(rule)
}
const OVERFLOW_KEY: &str = "overflow";

/// The limiter's verdict on one request.
#[derive(Debug)]
pub enum Verdict {
    /// Go ahead; `quota` is the matched rule's state (None when no rule matched).
    Admit(Option<Quota>),
    /// Refused; retry after `retry_after_s` seconds (≥ 1).
    Refuse { quota: Quota, retry_after_s: u64 },
}

/// Why a request or a guess was not admitted.
#[derive(Debug)]
pub enum Refusal {
    /// A budget is spent (429); retry after `retry_after_s` seconds (≥ 1).
    Limited { quota: Quota, retry_after_s: u64 },
    /// The limiter's database failed, so it cannot decide: refuse rather than go
    /// unlimited (503).
    Undecided(StoreError),
}

impl From<StoreError> for Refusal {
    fn from(e: StoreError) -> Self {
        Refusal::Undecided(e)
    }
}

impl Verdict {
    /// The admitted quota, or why the request was refused.
    pub fn admitted(self) -> Result<Option<Quota>, Refusal> {
        match self {
            Verdict::Admit(quota) => Ok(quota),
            Verdict::Refuse {
                quota,
                retry_after_s,
            } => Err(Refusal::Limited {
                quota,
                retry_after_s,
            }),
        }
    }
}

/// The rate limiter of one process.
pub struct Limiter {
    rules: Vec<Rule>,
    /// The per-username password-guess budget; `None` when disabled.
    guesses: Option<Arc<GuessBudget>>,
    /// The per-address password-check budget; `None` when disabled.
    password_checks: Option<Rule>,
    store: RateStore,
    clock: Clock,
    /// This process's name on its leases in `ratelimit.db` (random per start).
    holder: String,
    local: Mutex<HashMap<LocalKey, Local>>,
    /// One lease refresh per key at a time: keys are spread over these locks.
    refresh_locks: Vec<tokio::sync::Mutex<()>>,
    waiters: Arc<Semaphore>,
    /// Spreads keys over the refresh locks; randomly keyed per process, so nobody can pick
    /// keys that share a victim's lock.
    stripe_hasher: std::collections::hash_map::RandomState,
    /// Set by the sweeper when the table holds more than [`MAX_ROWS`] rows.
    overflow: Arc<AtomicBool>,
}

fn ceil_secs(ns: i64) -> u64 {
    u64::try_from((i128::from(ns.max(0)) + i128::from(NS_PER_SEC) - 1) / i128::from(NS_PER_SEC))
        .unwrap_or(u64::MAX)
}

/// Whose bucket a request draws from, within one rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BucketKey {
    /// A client address: IPv4 as is, IPv6 reduced to its /64.
    Ip(IpAddr),
    User(String),
    Global,
}

impl std::fmt::Display for BucketKey {
    /// The key as stored in `ratelimit.db`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BucketKey::Ip(IpAddr::V6(v6)) => write!(f, "ip:{v6}/64"),
            BucketKey::Ip(ip) => write!(f, "ip:{ip}"),
            BucketKey::User(user) => write!(f, "user:{user}"),
            BucketKey::Global => f.write_str("global"),
        }
    }
}

/// The bucket key for an address: IPv4 as is, IPv6 by its /64.
pub fn ip_key(ip: IpAddr) -> BucketKey {
    match crate::client_ip::canonical(ip) {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & (u128::MAX << 64);
            BucketKey::Ip(IpAddr::V6(prefix.into()))
        }
        v4 => BucketKey::Ip(v4),
    }
}

impl Limiter {
    pub fn new(
        rules: Vec<Rule>,
        guess_limit: Option<Limit>,
        password_checks: Option<Rule>,
        store: RateStore,
        clock: Clock,
    ) -> Self {
        let holder = uuid::Uuid::new_v4().to_string();
        let overflow = Arc::new(AtomicBool::new(false));
        let guesses = guess_limit.map(|limit| {
            let window = ceil_secs(i64::try_from(limit.window_ns()).unwrap_or(i64::MAX));
            Arc::new(GuessBudget::new(
                limit,
                rules::policy_header(GUESS_POLICY, limit.burst, window),
                store.clone(),
                holder.clone(),
                clock.clone(),
                overflow.clone(),
            ))
        });
        Limiter {
            rules,
            guesses,
            password_checks,
            store,
            clock,
            holder,
            local: Mutex::new(HashMap::new()),
            refresh_locks: (0..REFRESH_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            waiters: Arc::new(Semaphore::new(MAX_WAITERS)),
            stripe_hasher: std::collections::hash_map::RandomState::new(),
            overflow,
        }
    }

    fn local(&self) -> MutexGuard<'_, HashMap<LocalKey, Local>> {
        // A panic while holding this lock cannot leave the map inconsistent (every update
        // is a plain field write), so a poisoned lock is still safe to use.
        self.local.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn overflow_key(&self) -> Option<&'static str> {
        self.overflow
            .load(Ordering::Relaxed)
            .then_some(OVERFLOW_KEY)
    }

    /// Runs one [`RateStore::step`] for this process.
    async fn step<T: Send + 'static>(
        &self,
        rule: String,
        key: String,
        change: impl FnOnce(&mut TokenBucket, u32) -> (u32, T) + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.store.clone();
        let overflow = self.overflow_key();
        let holder = self.holder.clone();
        let now = self.clock.now_ns();
        let expires_at = now.saturating_add(LEASE_TTL_NS);
        store
            .step(rule, key, overflow, holder, now, expires_at, change)
            .await
    }

    /// Decides a request. `claimed_user` is the username the request claims (unverified).
    pub async fn check(
        &self,
        method: &Method,
        path: &str,
        client: IpAddr,
        claimed_user: Option<&str>,
    ) -> Result<Verdict, StoreError> {
        let Some((index, rule)) = rules::first_match(&self.rules, method, path) else {
            return Ok(Verdict::Admit(None));
        };
        let key = match (rule.key, claimed_user) {
            (KeyKind::Global, _) => BucketKey::Global,
            (KeyKind::User, Some(user)) => BucketKey::User(user.to_owned()),
            (KeyKind::Ip | KeyKind::User, _) => ip_key(client),
        };
        match rule.delay {
            None => self.check_leased(index, rule, key).await,
            Some(delay) => self.check_with_delay(rule, key, delay).await,
        }
    }

    fn quota(&self, rule: &Rule, remaining: u32, reset_ns: i64) -> Quota {
        Quota {
            policy: rule.policy.clone(),
            name: rule.name.clone(),
            remaining,
            reset_s: ceil_secs(reset_ns),
        }
    }

    fn refuse(&self, rule: &Rule, retry_ns: i64) -> Verdict {
        let retry_after_s = ceil_secs(retry_ns).max(1);
        Verdict::Refuse {
            quota: Quota {
                reset_s: retry_after_s,
                ..self.quota(rule, 0, 0)
            },
            retry_after_s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::leases::lease_size;
    use super::*;

    const T0: i64 = 1_800_000_000 * NS_PER_SEC;

    struct Fixture {
        dir: std::path::PathBuf,
        clock: Clock,
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn fixture() -> Fixture {
        Fixture {
            dir: std::env::temp_dir().join(format!("paygate-limiter-{}", uuid::Uuid::new_v4())),
            clock: Clock::manual(T0),
        }
    }

    fn limiter(f: &Fixture, rules: &[&str]) -> Limiter {
        let texts: Vec<String> = rules.iter().map(|s| (*s).to_owned()).collect();
        let (tokens, period) = rules::parse_rate("3/min").unwrap();
        Limiter::new(
            rules::parse_rules(&texts).unwrap(),
            Some(Limit::new(tokens, period, 3)),
            Some(password_check_rule("2/min burst=2").unwrap()),
            RateStore::open(&f.dir).unwrap(),
            f.clock.clone(),
        )
    }

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));

    async fn admitted(l: &Limiter, path: &str, user: Option<&str>) -> bool {
        matches!(
            l.check(&Method::GET, path, IP, user).await.unwrap(),
            Verdict::Admit(_)
        )
    }

    /// Counts admissions of `n` requests, across any number of limiters (processes).
    async fn admissions(limiters: &[&Limiter], n: usize) -> usize {
        let mut count = 0;
        for i in 0..n {
            if admitted(limiters[i % limiters.len()], "/x", None).await {
                count += 1;
            }
        }
        count
    }

    #[test]
    fn leases_are_an_eighth_of_the_burst_and_at_most_a_second_of_refill() {
        let size = |rule: &str| lease_size(rules::parse_rule(rule).unwrap().limit);
        assert_eq!(
            size("* / 100/s burst=200 key=ip"),
            25,
            "an eighth of the burst"
        );
        assert_eq!(size("* / 10/s burst=200 key=ip"), 10, "a second of refill");
        assert_eq!(size("* / 5/min burst=5 key=ip"), 1);
        assert_eq!(size("* / 1000000/s burst=1000000 key=ip"), 125_000);
    }

    #[tokio::test]
    async fn several_processes_never_admit_more_than_burst_plus_refill() {
        let f = fixture();
        let rule = "* / 80/s burst=64 key=ip"; // lease size 8
        let (a, b, c) = (
            limiter(&f, &[rule]),
            limiter(&f, &[rule]),
            limiter(&f, &[rule]),
        );
        assert_eq!(
            admissions(&[&a, &b, &c], 300).await,
            64,
            "exactly the burst at one instant"
        );
        // 62.5 ms later five tokens have refilled: no more than five get through.
        f.clock.advance_ns(62_500_000);
        assert_eq!(admissions(&[&a, &b, &c], 100).await, 5);
        // After a long idle the bucket is full again and the old leases have expired.
        f.clock.advance_ns(3600 * NS_PER_SEC);
        assert_eq!(admissions(&[&a, &b], 1).await, 1);
        f.clock.advance_ns(NS_PER_SEC / 100);
        assert!(admissions(&[&a, &b, &c], 300).await <= 64);
    }

    #[tokio::test]
    async fn refill_cannot_stack_on_tokens_held_in_leases() {
        let f = fixture();
        let rule = "* / 80/s burst=64 key=ip";
        let (a, b) = (limiter(&f, &[rule]), limiter(&f, &[rule]));
        // a leases 8 tokens and spends one.
        assert!(admitted(&a, "/x", None).await);
        // 0.8 s later the shared bucket has refilled those 8 tokens, but a still holds 7:
        // b can have 56, not 64 ...
        f.clock.advance_ns(800_000_000);
        assert_eq!(admissions(&[&b], 100).await, 56);
        // ... and a spends its 7: 64 in all, never 71.
        assert_eq!(admissions(&[&a], 100).await, 7);
    }

    #[tokio::test]
    async fn an_expired_lease_is_neither_spent_nor_handed_out_twice() {
        let f = fixture();
        let rule = "* / 2/s burst=16 key=ip"; // lease size 2
        let (a, b) = (limiter(&f, &[rule]), limiter(&f, &[rule]));
        assert!(admitted(&a, "/x", None).await); // a holds 1 unspent
        assert_eq!(admissions(&[&b], 100).await, 14);
        // 2 s later a's lease has expired and 4 tokens have refilled: exactly those 4 pass.
        f.clock.advance_ns(2 * NS_PER_SEC);
        assert_eq!(admissions(&[&a, &b], 100).await, 4);
    }

    #[tokio::test]
    async fn refusals_are_local_until_the_next_token() {
        let f = fixture();
        let l = limiter(&f, &["* / 2/min burst=2 key=ip"]);
        assert!(admitted(&l, "/x", None).await);
        assert!(admitted(&l, "/x", None).await);
        let Verdict::Refuse {
            quota,
            retry_after_s,
        } = l.check(&Method::GET, "/x", IP, None).await.unwrap()
        else {
            panic!("third request refused")
        };
        assert_eq!(retry_after_s, 30, "2 per minute: one token every 30 s");
        assert_eq!(quota.header(), "\"any\";r=0;t=30");
        assert_eq!(quota.policy, "\"any\";q=2;w=60");
        // The refusal is remembered: even with the store gone, the answer is the same.
        let dir = f.dir.clone();
        std::fs::remove_dir_all(&dir).unwrap();
        f.clock.advance_ns(10 * NS_PER_SEC);
        let Verdict::Refuse { retry_after_s, .. } =
            l.check(&Method::GET, "/x", IP, None).await.unwrap()
        else {
            panic!("still refused")
        };
        assert_eq!(retry_after_s, 20);
    }

    #[tokio::test]
    async fn admitted_requests_report_tokens_left_and_time_to_refill() {
        let f = fixture();
        let l = limiter(&f, &["* / 10/s burst=16 key=ip"]); // lease size 2
        let quota = |v: Verdict| match v {
            Verdict::Admit(Some(q)) => (q.remaining, q.reset_s),
            other => panic!("admitted expected, got {other:?}"),
        };
        let check = || l.check(&Method::GET, "/x", IP, None);
        assert_eq!(quota(check().await.unwrap()), (15, 1), "from the database");
        assert_eq!(quota(check().await.unwrap()), (14, 1), "from the lease");
        for _ in 0..12 {
            check().await.unwrap();
        }
        // Two tokens left: 14 missing take 1.4 s to refill, reported as 2 s.
        assert_eq!(quota(check().await.unwrap()), (1, 2));
    }

    #[tokio::test]
    async fn keys_and_rules_are_isolated() {
        let f = fixture();
        let l = limiter(
            &f,
            &[
                "GET /a 1/min burst=1 key=user",
                "GET /b 1/min burst=1 key=global",
            ],
        );
        assert!(admitted(&l, "/a", Some("alice")).await);
        assert!(!admitted(&l, "/a", Some("alice")).await);
        assert!(
            admitted(&l, "/a", Some("bob")).await,
            "another user has their own bucket"
        );
        assert!(
            admitted(&l, "/a", None).await,
            "no user: the address is the key"
        );
        assert!(
            admitted(&l, "/b", Some("alice")).await,
            "another rule has its own bucket"
        );
        assert!(
            !admitted(&l, "/b", Some("carol")).await,
            "global: one bucket for everybody"
        );
        assert!(
            admitted(&l, "/c", None).await,
            "no rule matches: not limited"
        );
    }

    #[tokio::test]
    async fn ipv6_clients_share_their_64() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        assert_eq!(ip_key(a), ip_key(b));
        assert_ne!(ip_key(a), ip_key("2001:db8:1:3::1".parse().unwrap()));
        assert_eq!(
            ip_key("::ffff:192.0.2.1".parse().unwrap()).to_string(),
            "ip:192.0.2.1"
        );
        assert_eq!(ip_key(a).to_string(), "ip:2001:db8:1:2::/64");
    }

    #[tokio::test]
    async fn guesses_are_reserved_refunded_on_success_and_refused_when_spent() {
        let f = fixture();
        let l = limiter(&f, &[]);
        // A success returns its token: any number of correct logins leave the budget intact.
        for _ in 0..5 {
            let ticket = l.reserve_guess("alice").await.unwrap().unwrap();
            l.refund_guess(ticket).await.unwrap();
        }
        // Three failures spend the budget of 3 per minute.
        for _ in 0..3 {
            l.reserve_guess("alice").await.unwrap();
        }
        let Err(Refusal::Limited {
            quota,
            retry_after_s,
        }) = l.reserve_guess("alice").await
        else {
            panic!("budget spent")
        };
        assert_eq!((&*quota.name, retry_after_s), (GUESS_POLICY, 20));
        assert!(l.reserve_guess("bob").await.is_ok(), "per username");
        f.clock.advance_ns(20 * NS_PER_SEC);
        assert!(l.reserve_guess("alice").await.is_ok(), "refilled one");
    }

    #[tokio::test]
    async fn parallel_checks_for_one_user_queue_instead_of_spending_the_budget() {
        let f = fixture();
        let budget = || Some(Limit::new(10, 60 * NS_PER_SEC, 10));
        // Two processes on one data directory.
        // Waiters never give up here: on a loaded machine, forty checks can take seconds.
        let process = || {
            Arc::new(
                Limiter::new(
                    Vec::new(),
                    budget(),
                    None,
                    RateStore::open(&f.dir).unwrap(),
                    f.clock.clone(),
                )
                .with_guess_patience(Duration::from_secs(600)),
            )
        };
        let (one, two) = (process(), process());
        let reserve =
            |l: Arc<Limiter>| async move { l.reserve_guess("carol").await.unwrap().unwrap() };
        // Four checks in flight across both processes fill the username's slots.
        let mut held = Vec::new();
        for l in [&one, &two, &one, &two] {
            held.push(reserve(l.clone()).await);
        }
        for l in [&one, &two] {
            let next = tokio::time::timeout(Duration::from_millis(100), reserve(l.clone())).await;
            assert!(
                next.is_err(),
                "a fifth concurrent check waits, in either process"
            );
        }
        // Right passwords give their tokens back: correct parallel checks, however many,
        // never exhaust the budget.
        for ticket in held.drain(..) {
            one.refund_guess(ticket).await.unwrap();
        }
        let mut waves = Vec::new();
        for i in 0..40 {
            let l = if i % 2 == 0 { one.clone() } else { two.clone() };
            waves.push(tokio::spawn(async move {
                let ticket = reserve(l.clone()).await;
                l.refund_guess(ticket).await.unwrap();
            }));
        }
        for wave in waves {
            wave.await.unwrap();
        }
        // Ten failures do.
        for _ in 0..10 {
            let ticket = reserve(one.clone()).await;
            one.release_guess(ticket).await.unwrap();
        }
        assert!(matches!(
            two.reserve_guess("carol").await,
            Err(Refusal::Limited { .. })
        ));
    }

    #[tokio::test]
    async fn sweeping_forgets_only_full_buckets() {
        let f = fixture();
        let l = limiter(&f, &["* / 1/s burst=1 key=user"]);
        for user in ["a", "b", "c"] {
            assert!(admitted(&l, "/x", Some(user)).await);
        }
        assert_eq!(l.sweep().await.unwrap(), 3);
        f.clock.advance_ns(2 * NS_PER_SEC);
        assert_eq!(l.sweep().await.unwrap(), 0);
        assert!(l.local().is_empty());
    }
}
