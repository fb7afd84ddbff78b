//! Criterion benches for the filter chain, in process (no sockets, no TLS): what each stage
//! costs a request. Run with `cargo bench --bench chain`.
//!
//! - `route/resolve`: parsing a payment path into a route.
//! - `credentials/basic_parse`: reading Basic credentials from the headers (base64, UTF-8,
//!   the username's syntax) — not checking the password.
//! - `access/account_grant`: access control for a payment read by an authenticated user:
//!   the grant from the per-worker cache (one WAL-index read) and the permission check.
//! - `chain/public`: `GET /apiStatus` through the whole chain (no credentials), no
//!   rate-limit rule; `chain/public_limited`: the same under a generous rule (the limiter's
//!   cost on an admitted request); `chain/refused_429`: the same under an exhausted rule.
//! - `chain/anonymous_401`: a protected route without credentials, refused by access control.
//! - `chain/jwt_read` and `chain/opaque_read`: the same payment read with a Bearer JWT and
//!   with an opaque session token (token state, the account grant and the payment from the
//!   per-worker cache).
//! - `chain/basic_read`: an authenticated payment read with HTTP Basic — dominated by one
//!   Argon2id verification, the figure that session tokens exist to avoid.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::SocketAddr;

use base64::Engine as _;
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{Method, Request};
use http_body_util::Full;

use paygate::app::App;
use paygate::config::{ServeConfig, Sources};
use paygate::domain::{Currency, Username};
use paygate::passwords::hash_blocking;
use paygate::store::{NewUser, Payment, PaymentStatus, UserInsert};

fn request(path: &str, authorization: Option<&str>) -> Request<Full<Bytes>> {
    let mut builder = Request::builder().method(Method::GET).uri(path);
    if let Some(value) = authorization {
        builder = builder.header("authorization", value);
    }
    builder
        .body(Full::new(Bytes::new()))
        .expect("valid request")
}

/// A server state on a fresh data directory with the given rate-limit rules.
fn app_with(rules: &[&str]) -> (App, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("paygate-bench-{}", uuid::Uuid::new_v4()));
    let mut options = BTreeMap::new();
    options.insert("data-dir", vec![dir.display().to_string()]);
    options.insert("rate-limit", rules.iter().map(|r| r.to_string()).collect());
    // The bench sends Basic requests from one address at full speed: its per-address
    // password-check budget would refuse them after the first 30.
    options.insert("password-check-limit", vec!["none".to_owned()]);
    let no_env = |_: &str| None;
    let config = ServeConfig::resolve(&Sources::new(&options, &no_env)).expect("config");
    (
        App::open(config, paygate::time::Clock::system()).expect("app"),
        dir,
    )
}

fn bench_chain(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    // The chain's own cost: no rule matches, so the limiter answers from a rule scan alone.
    let (app, dir) = app_with(&["none"]);
    let (limited, limited_dir) = app_with(&["* / 1000000/s burst=1000000 key=ip"]);
    let (flooded, flooded_dir) = app_with(&["* / 1/day burst=1 key=ip"]);
    let new = NewUser {
        username: Username::parse("username", "bench").expect("name"),
        password_hash: hash_blocking("bench password 1").expect("hash"),
        role: None,
    };
    let UserInsert::Created(user) = app
        .store
        .sqlite()
        .expect("SQLite")
        .create_user_blocking(&new)
        .expect("user")
    else {
        panic!("fresh store")
    };
    let (account, payment) = runtime.block_on(async {
        let currency = Currency::parse("currency", "EUR").expect("EUR");
        let account = app
            .store
            .create_account(user.id, "Bench".into(), currency)
            .await
            .expect("account");
        let payment = Payment {
            id: uuid::Uuid::now_v7(),
            account_id: account.id,
            payee: "ACME".into(),
            amount_minor: 100,
            currency: "EUR".into(),
            reference: String::new(),
            status: PaymentStatus::Pending,
            created_by: "bench".into(),
            created_at: paygate::time::now_millis(),
            cancelled_at: None,
        };
        let created = app
            .store
            .create_payment(payment, user.id, None, |p| {
                Ok(paygate::store::StoredResponse {
                    status: 201,
                    body: p.id.to_string(),
                    location: None,
                })
            })
            .await
            .expect("payment");
        let paygate::store::PaymentCreation::Created(answer) = created else {
            panic!("no key, so no earlier use")
        };
        let id = uuid::Uuid::parse_str(&answer.body).expect("the payment's id");
        (account.id, id)
    });
    let peer = SocketAddr::from(([127, 0, 0, 1], 40000));
    let payment_path = format!("/accounts/{account}/payments/{payment}");
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("bench:bench password 1")
    );

    let jwt = format!(
        "Bearer {}",
        app.tokens
            .sign_jwt("bench", &["pwd"], paygate::time::now_millis() / 1000)
            .token
    );
    let (opaque, hash) =
        paygate::tokens::opaque::generate(&ring::rand::SystemRandom::new()).expect("random");
    runtime
        .block_on(
            app.store
                .create_session(hash, user.id, "pwd".into(), i64::MAX),
        )
        .expect("session");
    let opaque = format!("Bearer {opaque}");

    c.bench_function("route/resolve", |b| {
        b.iter(|| paygate::routes::resolve(&Method::GET, black_box(&payment_path)))
    });
    let basic_headers = request(&payment_path, Some(&basic)).headers().clone();
    c.bench_function("credentials/basic_parse", |b| {
        b.iter(|| {
            paygate::filter::authenticate::Credentials::read(
                black_box(&basic_headers),
                None,
                &app.tokens,
                paygate::time::now_millis() / 1000,
            )
        })
    });
    let principal = paygate::identity::Principal {
        user_id: user.id,
        username: "bench".into(),
        role: None,
        method: paygate::identity::AuthMethod::BearerJwt,
        amr: &["pwd"],
        token: None,
    };
    c.bench_function("access/account_grant", |b| {
        b.iter(|| {
            let identity = paygate::identity::Identity::Authenticated(principal.clone());
            let requirement = paygate::routes::Requirement::Payment(
                account,
                payment,
                paygate::domain::Perm::Read,
            );
            let grant = runtime.block_on(paygate::filter::access::authorize(
                &app,
                identity,
                requirement,
                std::net::IpAddr::from([192, 0, 2, 1]),
            ));
            assert!(grant.is_ok());
        })
    });
    c.bench_function("chain/public", |b| {
        b.iter(|| {
            runtime.block_on(paygate::filter::handle(
                &app,
                peer,
                request("/apiStatus", None),
            ))
        })
    });
    c.bench_function("chain/public_limited", |b| {
        b.iter(|| {
            runtime.block_on(paygate::filter::handle(
                &limited,
                peer,
                request("/apiStatus", None),
            ))
        })
    });
    c.bench_function("chain/refused_429", |b| {
        b.iter(|| {
            runtime.block_on(paygate::filter::handle(
                &flooded,
                peer,
                request("/apiStatus", None),
            ))
        })
    });
    c.bench_function("chain/anonymous_401", |b| {
        b.iter(|| {
            runtime.block_on(paygate::filter::handle(
                &app,
                peer,
                request(&payment_path, None),
            ))
        })
    });
    for (name, authorization) in [("chain/jwt_read", &jwt), ("chain/opaque_read", &opaque)] {
        c.bench_function(name, |b| {
            b.iter(|| {
                let response = runtime.block_on(paygate::filter::handle(
                    &app,
                    peer,
                    request(&payment_path, Some(authorization)),
                ));
                assert_eq!(response.status(), 200);
            })
        });
    }
    let mut slow = c.benchmark_group("chain_argon2");
    slow.sample_size(20);
    slow.bench_function("basic_read", |b| {
        b.iter(|| {
            let response = runtime.block_on(paygate::filter::handle(
                &app,
                peer,
                request(&payment_path, Some(&basic)),
            ));
            assert_eq!(response.status(), 200);
        })
    });
    slow.finish();
    for dir in [dir, limited_dir, flooded_dir] {
        let _ = std::fs::remove_dir_all(dir);
    }
}

criterion_group!(benches, bench_chain);
criterion_main!(benches);
