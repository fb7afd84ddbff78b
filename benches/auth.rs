//! Criterion benches for authentication, stage by stage. Run with `cargo bench --bench auth`.
//!
//! - `jwt/verify`: a paygate JWT checked end to end without I/O — size, shape, base64url,
//!   strict header, HMAC-SHA256 (ring, constant time), claims.
//! - `jwt/sign`: issuing one at login.
//! - `jwt/hostile/…`: the worst Bearer values of up to 8 KiB an attacker can send, which
//!   are checked before the rate limiter (an 8 KiB header segment; a header of many
//!   members; a valid header with an 8 KiB payload, whose signature must be computed; a
//!   token of 8 KiB of dots and letters). Each should cost a small multiple of `jwt/verify`.
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
    let UserInsert::Created(user) = runtime
        .block_on(store.create_user(new.clone()))
        .expect("user")
    else {
        panic!("fresh store")
    };
    let now = paygate::time::now_millis() / 1000;
    let issued = tokens.sign_jwt("bench", &["pwd"], now);
    let keys = tokens.keyring.keys();

    c.bench_function("jwt/verify", |b| {
        b.iter(|| jwt::verify(black_box(&issued.token), &keys, now, 3600).expect("valid"))
    });
    let b64 = |bytes: &[u8]| {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    };
    let kid = issued
        .token
        .split('.')
        .next()
        .map(|h| {
            use base64::Engine as _;
            let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(h)
                .expect("our header");
            serde_json::from_slice::<serde_json::Value>(&json).expect("json")["kid"]
                .as_str()
                .expect("kid")
                .to_owned()
        })
        .expect("header");
    let fill = |prefix: String| {
        let mut token = prefix;
        while token.len() < 8 * 1024 - 1 {
            token.push('A');
        }
        token
    };
    // An 8 KiB header segment of many one-letter members, then a tiny rest.
    let mut members = String::from("{");
    let mut n = 0u32;
    while members.len() < 6000 {
        members.push_str(&format!("\"{}\":0,", n));
        n += 1;
    }
    members.push_str("\"alg\":\"HS256\"}");
    let huge_header = format!("{}.e30.AAAA", b64(members.as_bytes()));
    // A header of as many members as fit the header limit (refused past the member cap).
    let mut small = String::from("{\"alg\":\"HS256\",\"typ\":\"JWT\"");
    let mut i = 0u32;
    while b64(small.as_bytes()).len() < jwt::MAX_HEADER_BYTES - 12 {
        small.push_str(&format!(",\"{i}\":0"));
        i += 1;
    }
    small.push('}');
    let many_members = format!("{}.e30.AAAA", b64(small.as_bytes()));
    // A header that passes, and an 8 KiB payload: the signature is computed over it all.
    let header = b64(format!("{{\"alg\":\"HS256\",\"typ\":\"JWT\",\"kid\":\"{kid}\"}}").as_bytes());
    let big_payload = {
        let mut t = fill(format!("{header}."));
        t.truncate(8 * 1024 - 44);
        // Base64url of length ≡ 0 mod 4 decodes; the signature is 43 characters.
        while (t.len() - header.len() - 1) % 4 != 0 {
            t.pop();
        }
        format!("{t}.{}", "A".repeat(43))
    };
    let dots = fill(String::from("a.b.")).replace('A', ".");
    let mut hostile = c.benchmark_group("jwt/hostile");
    for (name, token) in [
        ("header_8KiB", &huge_header),
        ("header_many_members", &many_members),
        ("payload_8KiB", &big_payload),
        ("dots_8KiB", &dots),
    ] {
        assert!(token.len() <= 8 * 1024, "{name}: {}", token.len());
        assert!(
            jwt::verify(token, &keys, now, 3600).is_err(),
            "{name} must be refused"
        );
        hostile.bench_function(name, |b| {
            b.iter(|| jwt::verify(black_box(token), &keys, now, 3600))
        });
    }
    hostile.finish();
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
    let cache = StateCache::open(&dir, Default::default()).expect("cache");
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

    let passwords = Passwords::new(64).expect("passwords");
    let phc = new.password_hash.clone();
    let mut slow = c.benchmark_group("basic");
    slow.sample_size(20);
    slow.bench_function("argon2id_verify", |b| {
        b.iter(|| {
            assert_eq!(
                runtime.block_on(passwords.verify(Some(phc.clone()), "bench password 1".into())),
                Ok(true)
            )
        })
    });
    slow.finish();
    let _ = std::fs::remove_dir_all(dir);
}

criterion_group!(benches, bench_auth);
criterion_main!(benches);
