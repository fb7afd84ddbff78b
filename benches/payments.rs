//! Criterion benches for durable payment creation. Run with `cargo bench --bench payments`.
//!
//! - `payments_durable/group_commit/N`: N concurrent payments, each under its own
//!   Idempotency-Key, through the store's commit thread (one transaction and one WAL fsync
//!   per batch, `synchronous=FULL`); throughput is payments per second.
//! - `payments_durable/commit_per_payment`: the baseline without group commit — the same
//!   two inserts (payment and stored answer) in a transaction of their own per payment, on
//!   the same database.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use paygate::domain::{Currency, Username};
use paygate::passwords::hash_blocking;
use paygate::store::{
    KeyedRequest, NewUser, Payment, PaymentCreation, PaymentStatus, SqliteStore, StoreError,
    StoredResponse, UserInsert,
};

fn payment(account: uuid::Uuid) -> Payment {
    Payment {
        id: uuid::Uuid::now_v7(),
        account_id: account,
        payee: "ACME".into(),
        amount_minor: 100,
        currency: "EUR".into(),
        reference: "bench".into(),
        status: PaymentStatus::Pending,
        created_by: "bench".into(),
        created_at: paygate::time::now_millis(),
        cancelled_at: None,
    }
}

fn keyed(user: i64, n: u64) -> KeyedRequest {
    KeyedRequest {
        user,
        key: format!("bench-{n}"),
        request_hash: [7; 32],
    }
}

/// The answer stored under each key (about the size of a real one).
fn answer(_: &Payment) -> Result<StoredResponse, StoreError> {
    Ok(StoredResponse {
        status: 201,
        body: r#"{"id":"0190f3a2-7c1e-7d2a-9b4e-1a2b3c4d5e6f","status":"pending"}"#.into(),
        location: Some("/accounts/a/payments/p".into()),
    })
}

fn bench_payments(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = std::env::temp_dir().join(format!("paygate-bench-pay-{}", uuid::Uuid::new_v4()));
    let store = Arc::new(SqliteStore::open(&dir).expect("store"));
    let new = NewUser {
        username: Username::parse("username", "bench").expect("name"),
        password_hash: hash_blocking("bench password 1").expect("hash"),
        role: None,
    };
    let UserInsert::Created(user) = store.create_user_blocking(&new).expect("user") else {
        panic!("fresh store")
    };
    let account = runtime.block_on(async {
        let currency = Currency::parse("currency", "EUR").expect("EUR");
        store
            .create_account(user.id, "Bench".into(), currency)
            .await
            .expect("account")
            .id
    });
    let keys = Arc::new(AtomicU64::new(0));

    let mut group = c.benchmark_group("payments_durable");
    group.sample_size(20);
    for payments in [1u64, 16, 64] {
        group.throughput(Throughput::Elements(payments));
        group.bench_function(BenchmarkId::new("group_commit", payments), |b| {
            b.iter(|| {
                runtime.block_on(async {
                    let mut tasks = Vec::with_capacity(payments as usize);
                    for _ in 0..payments {
                        let (store, keys) = (store.clone(), keys.clone());
                        tasks.push(tokio::spawn(async move {
                            let n = keys.fetch_add(1, Ordering::Relaxed);
                            store
                                .create_payment(
                                    payment(account),
                                    user.id,
                                    Some(keyed(user.id, n)),
                                    answer,
                                )
                                .await
                        }));
                    }
                    for task in tasks {
                        let created = task.await.expect("task").expect("durable");
                        assert!(matches!(created, PaymentCreation::Created(_)));
                    }
                })
            })
        });
    }
    group.throughput(Throughput::Elements(1));
    group.bench_function("commit_per_payment", |b| {
        b.iter(|| {
            let n = keys.fetch_add(1, Ordering::Relaxed);
            let (p, k) = (payment(account), keyed(user.id, n));
            let response = answer(&p).expect("answer");
            store
                .run_blocking(|conn| {
                    let tx =
                        conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                    tx.execute(
                        "INSERT INTO idempotency_keys
                           (user_id, key, request_hash, status, response_body, location, created_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                        rusqlite::params![
                            k.user,
                            k.key,
                            &k.request_hash[..],
                            response.status,
                            response.body,
                            response.location,
                            p.created_at
                        ],
                    )?;
                    tx.execute(
                        "INSERT INTO payments (id, account_id, payee, amount_minor, currency,
                                               reference, status, created_by, created_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                        rusqlite::params![
                            p.id.to_string(),
                            p.account_id.to_string(),
                            p.payee,
                            p.amount_minor,
                            p.currency,
                            p.reference,
                            p.status.as_str(),
                            user.id,
                            p.created_at
                        ],
                    )?;
                    tx.commit()?;
                    Ok(())
                })
                .expect("committed")
        })
    });
    group.finish();
    drop(store);
    let _ = std::fs::remove_dir_all(dir);
}

criterion_group!(benches, bench_payments);
criterion_main!(benches);
