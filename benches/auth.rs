//! Criterion benches for authentication, stage by stage. Run with `cargo bench --bench auth`.
//!
//! - `jwt/verify`: a paygate JWT checked end to end without I/O — size, shape, base64url,
//!   strict header, HMAC-SHA256 (ring, constant time), claims.
//! - `jwt/sign`: issuing one at login.
//! - `opaque/parse`: turning a Bearer value into the SHA-256 the database is keyed by.
//! - `token_cache/session_hit` and `token_cache/jwt_subject_hit`: resolving a token's
//!   server-side state from the per-worker cache, including the `PRAGMA data_version` read
//!   that proves the cache current (what every token request pays once the token is known).
//! - `token_cache/session_miss`: the same after another connection committed (the cache is
//!   dropped and the session read from SQLite through the blocking pool).
//! - `basic/argon2id_verify`: checking one password (m=19456 KiB, t=2, p=1).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use ring::rand::SystemRandom;

use paygate::cache::StateCache;
use paygate::domain::Username;
use paygate::passwords::{hash_blocking, Passwords};
use paygate::store::{NewUser, Store, UserInsert};
use paygate::tokens::{jwt, opaque, TokenFormat, Tokens};

fn bench_auth(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = std::env::temp_dir().join(format!("paygate-bench-auth-{}", uuid::Uuid::new_v4()));
    let store = Store::open(&dir).expect("store");
    let tokens = Tokens::open(&dir, TokenFormat::Jwt, 3600).expect("tokens");
    let new = NewUser {
        username: Username::parse("username", "bench").expect("name"),
        password_hash: hash_blocking("bench password 1").expect("hash"),
        role: None,
    };
    let UserInsert::Created(user) = store.create_user_blocking(&new).expect("user") else {
        panic!("fresh store")
    };
    let now = paygate::time::now_millis() / 1000;
    let issued = tokens.sign_jwt("bench", &["pwd"], now);
    let keys = tokens.keyring.keys();

    c.bench_function("jwt/verify", |b| {
        b.iter(|| jwt::verify(black_box(&issued.token), &keys, now, 3600).expect("valid"))
    });
    c.bench_function("jwt/sign", |b| {
        b.iter(|| tokens.sign_jwt(black_box("bench"), &["pwd"], now))
    });

    let (opaque_token, hash) = opaque::generate(&SystemRandom::new()).expect("random");
    c.bench_function("opaque/parse", |b| {
        b.iter(|| opaque::parse(black_box(&opaque_token)).expect("ours"))
    });
    runtime
        .block_on(store.create_session(hash, user.id, "pwd".into(), i64::MAX))
        .expect("session");
    let cache = StateCache::open(&dir).expect("cache");
    let claims = jwt::verify(&issued.token, &keys, now, 3600).expect("valid");
    c.bench_function("token_cache/session_hit", |b| {
        b.iter(|| {
            runtime
                .block_on(cache.session(&store, black_box(hash)))
                .expect("lookup")
                .expect("found")
        })
    });
    c.bench_function("token_cache/jwt_subject_hit", |b| {
        b.iter(|| {
            runtime
                .block_on(cache.jwt_subject(&store, &claims.sub, &claims.jti))
                .expect("lookup")
                .expect("found")
        })
    });
    c.bench_function("token_cache/session_miss", |b| {
        b.iter(|| {
            runtime.block_on(async {
                // Any commit elsewhere invalidates the cache.
                let jti = uuid::Uuid::new_v4().to_string();
                store.revoke_jti(jti, 0).await.expect("write");
                cache
                    .session(&store, black_box(hash))
                    .await
                    .expect("lookup")
                    .expect("found")
            })
        })
    });

    let passwords = Passwords::new().expect("passwords");
    let phc = new.password_hash.clone();
    let mut slow = c.benchmark_group("basic");
    slow.sample_size(20);
    slow.bench_function("argon2id_verify", |b| {
        b.iter(|| {
            assert!(runtime.block_on(passwords.verify(Some(phc.clone()), "bench password 1".into())))
        })
    });
    slow.finish();
    let _ = std::fs::remove_dir_all(dir);
}

criterion_group!(benches, bench_auth);
criterion_main!(benches);
