//! Criterion benches for one rate-limit decision: `cargo bench --bench ratelimit`.
//!
//! - `bucket/take`: the token-bucket arithmetic alone (no store, no lock).
//! - `limiter/hot_key`: the same key again and again — served from a local lease, with a
//!   `ratelimit.db` transaction once per lease (32 tokens).
//! - `limiter/fresh_key`: a key never seen before — a `ratelimit.db` transaction each time.
//! - `limiter/refused_local`: a key whose bucket is empty — refused from memory.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{criterion_group, criterion_main, Criterion};
use http::Method;

use paygate::ratelimit::rules::parse_rules;
use paygate::ratelimit::{Limiter, Verdict};
use paygate::store::RateStore;
use paygate::time::Clock;
use paygate::token_bucket::{Limit, TokenBucket};

fn bench_limiter(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = std::env::temp_dir().join(format!("paygate-bench-rl-{}", uuid::Uuid::new_v4()));
    let rules = parse_rules(&[
        "GET /empty 1/day burst=1 key=ip".to_owned(),
        "* / 1000000/s burst=1000000 key=user".to_owned(),
    ])
    .expect("rules");
    let limiter = Limiter::new(
        rules,
        Some(Limit::new(10, 900_000_000_000, 10)),
        None,
        RateStore::open(&dir).expect("store"),
        Clock::system(),
    );
    let ip = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    let check = |path: &str, user: Option<&str>| {
        runtime
            .block_on(limiter.check(&Method::GET, path, ip, user))
            .expect("decision")
    };
    // Empty the bucket of the refusal bench.
    check("/empty", None);
    assert!(matches!(check("/empty", None), Verdict::Refuse { .. }));

    let limit = Limit::new(100, 1_000_000_000, 200);
    let mut bucket = TokenBucket::FULL;
    let mut now = 1_800_000_000_000_000_000i64;
    c.bench_function("bucket/take", |b| {
        b.iter(|| {
            now += 10_000_000;
            black_box(bucket.take(limit, black_box(now), 0))
        })
    });
    c.bench_function("limiter/hot_key", |b| {
        b.iter(|| black_box(check("/accounts", Some("hot"))))
    });
    let mut n = 0u64;
    c.bench_function("limiter/fresh_key", |b| {
        b.iter(|| {
            n += 1;
            let user = format!("user{n}");
            black_box(check("/accounts", Some(&user)))
        })
    });
    c.bench_function("limiter/refused_local", |b| {
        b.iter(|| black_box(check("/empty", None)))
    });
    let _ = std::fs::remove_dir_all(dir);
}

criterion_group!(benches, bench_limiter);
criterion_main!(benches);
