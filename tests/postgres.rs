//! The PostgreSQL backend's foundation against a real PostgreSQL server: connection
//! strings, TLS as `sslmode` asks, migrations applied once by nodes starting together, and
//! the change log's numbering.
//!
//! Needs `PAYGATE_TEST_DATABASE` (a URL of a role that may create databases) and
//! `PAYGATE_TEST_DATABASE_CA`, which `bash scripts/pg.sh run cargo test` sets for a
//! throwaway cluster it starts and removes (the README's test command). Each test works in
//! a database of its own.

use std::time::Duration;

mod common;

use common::fresh_database;
use paygate::store::postgres::{self, DatabaseUrl};
use paygate::store::StoreError;
use tokio_postgres::NoTls;

/// The test cluster's URL, or a failure that says how to get one.
fn base_url() -> String {
    std::env::var("PAYGATE_TEST_DATABASE").expect(
        "PAYGATE_TEST_DATABASE is not set: run the tests as `bash scripts/pg.sh run cargo test`, \
         which starts a throwaway PostgreSQL for them",
    )
}

fn ca_file() -> String {
    std::env::var("PAYGATE_TEST_DATABASE_CA")
        .expect("PAYGATE_TEST_DATABASE_CA is not set: run the tests through scripts/pg.sh")
}

/// A plain connection for looking at what paygate wrote.
async fn inspect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

fn parse(url: &str) -> DatabaseUrl {
    DatabaseUrl::parse(url).unwrap()
}

#[tokio::test]
async fn nodes_starting_together_apply_each_migration_once() {
    let url = fresh_database("t").await;
    let nodes = [parse(&url), parse(&url), parse(&url)];
    let (a, b, c) = tokio::join!(
        postgres::open_pool(&nodes[0], 2),
        postgres::open_pool(&nodes[1], 2),
        postgres::open_pool(&nodes[2], 2),
    );
    for pool in [a, b, c] {
        pool.unwrap();
    }
    let db = inspect(&url).await;
    let applied: Vec<i64> = db
        .query(
            "SELECT version FROM schema_migrations ORDER BY version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let known: Vec<i64> = postgres::MIGRATIONS.iter().map(|m| m.0).collect();
    assert_eq!(applied, known);
    // And a restart finds nothing to do.
    postgres::open_pool(&parse(&url), 1).await.unwrap();
    let count: i64 = db
        .query_one("SELECT count(*) FROM schema_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, known.len() as i64);
}

#[tokio::test]
async fn a_database_written_by_a_newer_paygate_is_refused() {
    let url = fresh_database("t").await;
    postgres::open_pool(&parse(&url), 1).await.unwrap();
    inspect(&url)
        .await
        .execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (999, 'future', 0)",
            &[],
        )
        .await
        .unwrap();
    let Err(StoreError::Startup(message)) = postgres::open_pool(&parse(&url), 1).await else {
        panic!("a newer schema must be refused")
    };
    assert!(message.contains("newer paygate"), "{message}");
    let password = base_url()
        .split_once("paygate:")
        .and_then(|(_, rest)| rest.split_once('@'))
        .map(|(pw, _)| pw.to_owned())
        .unwrap();
    assert!(!message.contains(&password), "{message}");
}

#[tokio::test]
async fn a_wrong_password_or_an_unreachable_server_fails_at_start_without_the_password() {
    let url = fresh_database("t").await;
    let wrong = "wrong-Pa55word-xyz";
    let (before, after) = url.split_once('@').unwrap();
    let (user, _) = before.rsplit_once(':').unwrap();
    let bad = format!("{user}:{wrong}@{after}");
    let Err(StoreError::Startup(message)) = postgres::open_pool(&parse(&bad), 1).await else {
        panic!("a wrong password must fail")
    };
    assert!(
        message.contains("password authentication failed"),
        "{message}"
    );
    assert!(!message.contains(wrong), "{message}");

    // Nothing listens on port 1: refused at once, the message names the server.
    let nowhere = format!("postgres://paygate:{wrong}@127.0.0.1:1/paygate");
    let Err(StoreError::Startup(message)) = postgres::open_pool(&parse(&nowhere), 1).await else {
        panic!("an unreachable server must fail")
    };
    assert!(message.contains("127.0.0.1:1"), "{message}");
    assert!(!message.contains(wrong), "{message}");
}

/// Whether the pool's connection to `url` is encrypted, as the server sees it.
async fn encrypted(url: &str) -> Result<bool, StoreError> {
    let pool = postgres::open_pool(&parse(url), 1).await?;
    let client = pool.get().await.unwrap();
    Ok(client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0))
}

#[tokio::test]
async fn tls_checks_what_sslmode_asks() {
    let url = fresh_database("t").await;
    let ca = ca_file();
    assert!(!encrypted(&format!("{url}?sslmode=disable")).await.unwrap());
    assert!(encrypted(&format!("{url}?sslmode=require")).await.unwrap());
    assert!(
        encrypted(&url).await.unwrap(),
        "prefer uses TLS when offered"
    );
    assert!(
        encrypted(&format!("{url}?sslmode=verify-full&sslrootcert={ca}"))
            .await
            .unwrap()
    );

    // The server's certificate names 127.0.0.1 only: by another name, verify-full refuses
    // and verify-ca (which checks the signer, not the name) connects.
    let by_name = url.replace("@127.0.0.1:", "@localhost:");
    let Err(StoreError::Startup(message)) =
        encrypted(&format!("{by_name}?sslmode=verify-full&sslrootcert={ca}")).await
    else {
        panic!("a certificate for another name must be refused")
    };
    assert!(message.contains("certificate"), "{message}");
    assert!(
        encrypted(&format!("{by_name}?sslmode=verify-ca&sslrootcert={ca}"))
            .await
            .unwrap()
    );

    // Signed by a CA the client does not trust: refused, whatever the name.
    let other_ca =
        std::env::temp_dir().join(format!("paygate-other-ca-{}.pem", uuid::Uuid::new_v4()));
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    std::fs::write(&other_ca, params.self_signed(&key).unwrap().pem()).unwrap();
    for mode in ["verify-ca", "verify-full"] {
        let Err(StoreError::Startup(message)) = encrypted(&format!(
            "{url}?sslmode={mode}&sslrootcert={}",
            other_ca.display()
        ))
        .await
        else {
            panic!("{mode}: a server signed by an untrusted CA must be refused")
        };
        assert!(message.contains("certificate"), "{mode}: {message}");
    }
    std::fs::remove_file(other_ca).unwrap();

    // A root certificate file that does not exist is named at start.
    let Err(StoreError::Startup(message)) = encrypted(&format!(
        "{url}?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem"
    ))
    .await
    else {
        panic!("a missing sslrootcert must be refused")
    };
    assert!(message.contains("/nonexistent/ca.pem"), "{message}");
}

/// Connects with a task that forwards the connection's notifications.
async fn listener(
    url: &str,
) -> (
    tokio_postgres::Client,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let (client, mut connection) = tokio_postgres::connect(url, NoTls).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            if let Ok(tokio_postgres::AsyncMessage::Notification(n)) = message {
                let _ = tx.send(n.payload().to_owned());
            }
        }
    });
    (client, rx)
}

#[tokio::test]
async fn the_change_log_numbers_changes_consecutively_in_commit_order() {
    let url = fresh_database("t").await;
    postgres::open_pool(&parse(&url), 1).await.unwrap();
    let (watcher, mut notified) = listener(&url).await;
    watcher
        .batch_execute("LISTEN paygate_changes")
        .await
        .unwrap();
    let mut a = inspect(&url).await;
    let b = inspect(&url).await;
    a.batch_execute(
        "INSERT INTO users (username, password_hash, created_at) VALUES ('alice', 'x', 0), ('bob', 'x', 0);
         INSERT INTO sessions (token_hash, user_id, amr, created_at, expires_at)
           VALUES ('\\x0101010101010101010101010101010101010101010101010101010101010101', 1, 'pwd', 0, 1);",
    )
    .await
    .unwrap();
    let log = |rows: Vec<tokio_postgres::Row>| -> Vec<(i64, String, String)> {
        rows.iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect()
    };
    assert!(
        log(b
            .query("SELECT seq, kind, key FROM changes", &[])
            .await
            .unwrap())
        .is_empty(),
        "new rows log nothing"
    );

    // A rolled-back change gives its number back.
    let tx = a.transaction().await.unwrap();
    tx.execute(
        "UPDATE users SET disabled = true WHERE username = 'bob'",
        &[],
    )
    .await
    .unwrap();
    tx.rollback().await.unwrap();

    // A change waits for the one before it to end, so numbers follow commit order.
    let tx = a.transaction().await.unwrap();
    tx.execute(
        "UPDATE users SET disabled = true WHERE username = 'alice'",
        &[],
    )
    .await
    .unwrap();
    let second = tokio::spawn(async move {
        b.execute(
            "INSERT INTO revoked_tokens (jti, expires_at) VALUES ('j-1', 1)",
            &[],
        )
        .await
        .unwrap();
        b
    });
    // Until the first commits, the second is blocked on the change log's head.
    let observer = inspect(&url).await;
    for attempt in 0.. {
        assert!(
            attempt < 3000,
            "the second change never waited for the first"
        );
        let waiting: i64 = observer
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE datname = current_database() AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tx.commit().await.unwrap();
    let b = second.await.unwrap();
    a.execute("DELETE FROM sessions", &[]).await.unwrap();

    let rows = log(b
        .query("SELECT seq, kind, key FROM changes ORDER BY seq", &[])
        .await
        .unwrap());
    assert_eq!(
        rows,
        [
            (1, "user".into(), "1".into()),
            (2, "jwt".into(), "j-1".into()),
            (3, "session".into(), "01".repeat(32)),
        ]
    );
    let head: i64 = b
        .query_one("SELECT seq FROM changes_head", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(head, 3);
    // Each committed change was announced once, in order; the rolled-back one never.
    for expected in ["1", "2", "3"] {
        let got = tokio::time::timeout(Duration::from_secs(30), notified.recv())
            .await
            .expect("a notification for each committed change")
            .unwrap();
        assert_eq!(got, expected);
    }
}

#[tokio::test]
async fn rate_limit_steps_from_many_nodes_never_spend_more_than_the_burst() {
    use paygate::store::postgres::PgRateStore;
    use paygate::token_bucket::Limit;
    let url = fresh_database("t").await;
    let limit = Limit {
        burst: 20,
        interval_ns: 3_600_000_000_000,
    };
    let now = 1_000_000_000_000_i64;
    let mut nodes = Vec::new();
    for _ in 0..4 {
        nodes.push(PgRateStore::open(&parse(&url), 4).await.unwrap());
    }
    // Every node asks for up to 3 tokens at a time, 10 times, all at once: 120 asked, 20
    // in the bucket.
    let mut steps = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        for _ in 0..10 {
            let node = node.clone();
            steps.push(tokio::spawn(async move {
                node.step(
                    "r",
                    "k",
                    None,
                    &format!("node-{n}"),
                    now,
                    now + 1,
                    |bucket, _| {
                        let taken = bucket.take_up_to(limit, now, 3);
                        (taken, taken)
                    },
                )
                .await
                .unwrap()
            }));
        }
    }
    let mut granted = 0;
    for step in steps {
        granted += step.await.unwrap();
    }
    assert_eq!(granted, 20, "exactly the burst, across four nodes");

    // A key without a bucket draws from the overflow bucket when one stands in.
    let take_one = |node: &PgRateStore, key: &'static str| {
        let node = node.clone();
        async move {
            node.step(
                "r",
                key,
                Some("overflow"),
                "node-0",
                now,
                now,
                |bucket, _| (0, bucket.take_up_to(Limit { burst: 2, ..limit }, now, 1)),
            )
            .await
            .unwrap()
        }
    };
    assert_eq!(take_one(&nodes[0], "a").await, 1);
    assert_eq!(take_one(&nodes[1], "b").await, 1);
    assert_eq!(
        take_one(&nodes[2], "c").await,
        0,
        "the shared overflow bucket is spent"
    );
    let db = inspect(&url).await;
    let rows: i64 = db
        .query_one(
            "SELECT count(*) FROM buckets WHERE key IN ('a', 'b', 'c')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0, "new keys under overflow add no rows");

    // The sweep keeps buckets that are not full yet and drops expired leases.
    assert_eq!(nodes[0].sweep(now + 2).await.unwrap(), 2);
    let leases: i64 = db
        .query_one("SELECT count(*) FROM leases", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(leases, 0);
}

/// A store node on `url` whose sealing key is the one in `keys_dir`.
async fn node(url: &str, keys_dir: &std::path::Path) -> paygate::store::postgres::PgStore {
    use paygate::store::sealing::TotpKeys;
    let keys = std::sync::Arc::new(TotpKeys::load_or_create(keys_dir).unwrap());
    paygate::store::postgres::PgStore::open(&parse(url), 2, keys, paygate::time::Clock::system())
        .await
        .unwrap()
}

/// A user `alice` on `store` and an account of hers: their ids.
async fn alice_and_account(store: &paygate::store::postgres::PgStore) -> (i64, uuid::Uuid) {
    use paygate::domain::{Currency, Username};
    use paygate::store::{NewUser, UserInsert};
    let UserInsert::Created(alice) = store
        .create_user(NewUser {
            username: Username::parse("username", "alice").unwrap(),
            password_hash: "$argon2id$dummy".into(),
            role: None,
        })
        .await
        .unwrap()
    else {
        panic!("alice is new")
    };
    let account = store
        .create_account(alice.id, "Ops".into(), Currency::parse("c", "EUR").unwrap())
        .await
        .unwrap()
        .id;
    (alice.id, account)
}

#[tokio::test]
async fn jwt_signing_keys_are_shared_sealed_and_rotated_once_at_a_time() {
    let url = fresh_database("t").await;
    let keys_dir = std::env::temp_dir().join(format!("paygate-pg-keys-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&keys_dir).unwrap();
    let (a, b) = (node(&url, &keys_dir).await, node(&url, &keys_dir).await);
    let secret = [0x5Au8; 32];
    let (x, y) = tokio::join!(
        a.ensure_jwt_key("k1", &secret, 1000),
        b.ensure_jwt_key("k2", &[0x6B; 32], 1000)
    );
    assert_eq!(
        [x.unwrap(), y.unwrap()].iter().filter(|c| **c).count(),
        1,
        "one first key"
    );
    let first = b.jwt_keys().await.unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(
        first,
        a.jwt_keys().await.unwrap(),
        "every node holds the same set"
    );

    // What the database holds opens only with the sealing key.
    let db = inspect(&url).await;
    for row in db.query("SELECT sealed FROM jwt_keys", &[]).await.unwrap() {
        let sealed: Vec<u8> = row.get(0);
        assert!(
            !sealed.windows(8).any(|w| w == &first[0].secret[..8]),
            "never plain"
        );
    }

    // Rotations on two nodes at once: both happen, one after the other; one key current.
    let (x, y) = tokio::join!(
        a.rotate_jwt_key("k3", &[3; 32], 2000),
        b.rotate_jwt_key("k4", &[4; 32], 2000)
    );
    x.unwrap();
    y.unwrap();
    let keys = a.jwt_keys().await.unwrap();
    assert_eq!(keys.len(), 3);
    assert_eq!(keys.iter().filter(|k| k.retired_at.is_none()).count(), 1);
    assert_eq!(
        b.prune_jwt_keys(2001).await.unwrap().len(),
        2,
        "the retired ones"
    );

    // A node holding another sealing key cannot open them, and says which key.
    let other_dir = keys_dir.join("other");
    std::fs::create_dir_all(&other_dir).unwrap();
    let stranger = node(&url, &other_dir).await;
    let Err(StoreError::Corrupt(message)) = stranger.jwt_keys().await else {
        panic!("another sealing key must not open the keys")
    };
    assert!(message.contains("JWT signing key"), "{message}");
    std::fs::remove_dir_all(keys_dir).unwrap();
}

#[tokio::test]
async fn a_nodes_cache_sees_the_next_change_from_another_node_and_keeps_the_rest() {
    use paygate::cache::StateCache;
    use paygate::metrics::CacheMetrics;
    use paygate::store::{PaymentCreation, PaymentStatus, Store};
    use std::sync::atomic::Ordering;
    let url = fresh_database("t").await;
    let keys_dir = std::env::temp_dir().join(format!("paygate-pg-cache-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&keys_dir).unwrap();
    let a_store = node(&url, &keys_dir).await;
    let (alice, account) = alice_and_account(&a_store).await;
    let a = Store::Postgres(a_store);
    let b_store = node(&url, &keys_dir).await;
    let counters = std::sync::Arc::new(CacheMetrics::default());
    let cache = StateCache::over_postgres(b_store.clone(), "b", counters.clone())
        .await
        .unwrap();
    let b = Store::Postgres(b_store);

    let later = paygate::time::now_millis() + 3_600_000;
    a.create_session([1; 32], alice, "pwd".into(), later)
        .await
        .unwrap();

    // A change made on node a returns only once node b has applied the change log
    // (the new account's grant included), so what b reads next stays cached.
    a.revoke_jti("unrelated".into(), later / 1000)
        .await
        .unwrap();
    assert!(cache.session(&b, [1; 32]).await.unwrap().is_some());
    assert!(cache.session(&b, [1; 32]).await.unwrap().is_some());
    let fetched = counters.fetches.load(Ordering::Relaxed);
    assert_eq!(
        counters.hits.load(Ordering::Relaxed),
        1,
        "the second from memory"
    );

    // An unrelated commit on node a (a payment) evicts nothing on node b.
    let created = a
        .create_payment(
            paygate::store::Payment {
                id: uuid::Uuid::nil(),
                account_id: account,
                payee: "ACME".into(),
                amount_minor: 100,
                currency: "EUR".into(),
                reference: String::new(),
                status: PaymentStatus::Pending,
                created_by: String::new(),
                created_at: 0,
                cancelled_at: None,
            },
            alice,
            None,
            |_| {
                Ok(paygate::store::StoredResponse {
                    status: 201,
                    body: String::new(),
                    location: None,
                })
            },
        )
        .await
        .unwrap();
    assert!(matches!(created, PaymentCreation::Created(_)));
    assert!(cache.session(&b, [1; 32]).await.unwrap().is_some());
    assert_eq!(
        counters.fetches.load(Ordering::Relaxed),
        fetched,
        "still cached"
    );

    // A logout on node a: node b's very next lookup refuses the session.
    assert!(a.end_session([1; 32]).await.unwrap());
    assert!(cache.session(&b, [1; 32]).await.unwrap().is_none());
    std::fs::remove_dir_all(keys_dir).unwrap();
}

#[tokio::test]
async fn a_token_signed_on_one_node_verifies_on_another_and_a_rotation_reaches_it() {
    use paygate::tokens::jwt::JwtRejection;
    use paygate::tokens::keys::Keyring;
    use paygate::tokens::{TokenFormat, Tokens};
    use std::sync::Arc;
    let url = fresh_database("t").await;
    let keys_dir = std::env::temp_dir().join(format!("paygate-pg-ring-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&keys_dir).unwrap();
    let (a, b) = (node(&url, &keys_dir).await, node(&url, &keys_dir).await);
    let (ring_a, ring_b) = tokio::join!(
        Keyring::open_shared(a.clone(), 1000),
        Keyring::open_shared(b.clone(), 1000)
    );
    let (ring_a, ring_b) = (Arc::new(ring_a.unwrap()), Arc::new(ring_b.unwrap()));
    assert_eq!(ring_a.keys().all().len(), 1, "one first key between them");
    assert_eq!(ring_a.keys().current().kid, ring_b.keys().current().kid);
    assert!(!ring_b.refresh().await, "nothing changed");

    let tokens_a = Tokens::with_keyring(ring_a.clone(), TokenFormat::Jwt, 600);
    let tokens_b = Tokens::with_keyring(ring_b.clone(), TokenFormat::Jwt, 600);
    let now = paygate::time::now_millis() / 1000;
    let issued = tokens_a.sign_jwt("alice", &["pwd"], now);
    assert_eq!(
        tokens_b.verify_jwt(&issued.token, now).unwrap().sub,
        "alice"
    );

    // A rotation made on node a: its next token names a key node b does not hold yet, which
    // makes b read the table again.
    let before = ring_b.keys().current().kid.clone();
    a.rotate_jwt_key("rotated", &[9; 32], 2000).await.unwrap();
    assert!(ring_a.refresh().await);
    let rotated = tokens_a.sign_jwt("alice", &["pwd"], now);
    assert_eq!(
        tokens_b.verify_jwt(&rotated.token, now).unwrap_err(),
        JwtRejection::UnknownKey
    );
    assert!(ring_b.refresh_for_unknown_kid().await);
    assert_eq!(
        tokens_b.verify_jwt(&rotated.token, now).unwrap().sub,
        "alice"
    );
    assert!(
        tokens_b.verify_jwt(&issued.token, now).is_ok(),
        "the retired key still verifies"
    );
    let keys = ring_b.keys();
    assert_eq!(keys.current().kid, "rotated");
    assert_eq!(keys.find(&before).unwrap().retired_at, Some(2000));
    assert!(
        !ring_b.refresh_for_unknown_kid().await,
        "at most once a second"
    );
    std::fs::remove_dir_all(keys_dir).unwrap();
}

#[tokio::test]
async fn head_reads_are_shared_yet_never_older_than_the_moment_asked_for() {
    use paygate::store::postgres::HeadReads;
    use std::time::Instant;
    let url = fresh_database("t").await;
    let keys_dir = std::env::temp_dir().join(format!("paygate-pg-heads-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&keys_dir).unwrap();
    let writer = node(&url, &keys_dir).await;
    let heads = HeadReads::new(node(&url, &keys_dir).await);
    let db = inspect(&url).await;
    // A change: a user disabled moves the head.
    let change = || async {
        db.execute(
            "INSERT INTO users (username, password_hash, created_at) VALUES ($1, 'x', 0)",
            &[&uuid::Uuid::new_v4().simple().to_string()],
        )
        .await
        .unwrap();
        db.execute("UPDATE users SET disabled = true WHERE NOT disabled", &[])
            .await
            .unwrap();
        writer.newest_change().await.unwrap()
    };

    // Every caller sees every change committed before it asked.
    let first = change().await;
    assert_eq!(heads.newest(None).await.unwrap(), first);
    let second = change().await;
    assert!(second > first);
    assert_eq!(heads.newest(None).await.unwrap(), second);

    // Callers asking together share queries: far fewer than one each.
    let before = heads.queries();
    let asked: Vec<_> = (0..200)
        .map(|_| {
            let heads = heads.clone();
            tokio::spawn(async move { heads.newest(None).await.unwrap() })
        })
        .collect();
    for answer in asked {
        assert_eq!(answer.await.unwrap(), second);
    }
    let sent = heads.queries() - before;
    assert!((1..200).contains(&sent), "{sent} queries for 200 callers");

    // A request that began before a change may reuse a head read after it began; one
    // that begins after the change may not.
    let began = Instant::now();
    assert_eq!(heads.newest(Some(began)).await.unwrap(), second);
    let third = change().await;
    let before = heads.queries();
    assert_eq!(heads.newest(Some(began)).await.unwrap(), second);
    assert_eq!(heads.queries(), before, "reused, no query");
    assert_eq!(heads.newest(Some(Instant::now())).await.unwrap(), third);
    assert_eq!(heads.newest(None).await.unwrap(), third);
}

#[tokio::test]
async fn a_claim_an_older_version_left_on_a_key_is_taken_over_once_it_has_expired() {
    use paygate::store::{
        EarlierUse, KeyedRequest, Payment, PaymentCreation, PaymentStatus, StoredResponse,
    };
    let url = fresh_database("t").await;
    let keys_dir = std::env::temp_dir().join(format!("paygate-pg-claim-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&keys_dir).unwrap();
    let store = node(&url, &keys_dir).await;
    let (alice, account) = alice_and_account(&store).await;

    // Claims as a version before batched creation wrote them: a lease, no answer yet. One
    // lease ran out long ago (its holder died), one is live.
    let now = paygate::time::now_millis();
    let db = inspect(&url).await;
    for (key, expires) in [("dead", now - 60_000), ("live", now + 60_000)] {
        db.execute(
            "INSERT INTO idempotency_keys (user_id, key, request_hash, lease, lease_expires_at,
                                           created_at)
             VALUES ($1, $2, $3, 'older', $4, $5)",
            &[&alice, &key, &vec![7u8; 32], &expires, &(now - 120_000)],
        )
        .await
        .unwrap();
    }
    let create = |key: &'static str, hash: u8| {
        store.create_payment(
            Payment {
                id: uuid::Uuid::nil(),
                account_id: account,
                payee: "ACME".into(),
                amount_minor: 100,
                currency: "EUR".into(),
                reference: key.into(),
                status: PaymentStatus::Pending,
                created_by: String::new(),
                created_at: 0,
                cancelled_at: None,
            },
            alice,
            Some(KeyedRequest {
                user: alice,
                key: key.into(),
                request_hash: [hash; 32],
            }),
            |p: &Payment| {
                Ok(StoredResponse {
                    status: 201,
                    body: p.id.to_string(),
                    location: None,
                })
            },
        )
    };

    // In one batch: the expired claim is taken over, the live one is in flight, and a
    // different request under the dead key is refused once the first has answered it.
    let (dead, live, other) = tokio::join!(create("dead", 7), create("live", 7), create("dead", 8));
    let PaymentCreation::Created(answer) = dead.unwrap() else {
        panic!("an expired claim binds nobody")
    };
    assert!(matches!(
        live.unwrap(),
        PaymentCreation::Earlier(EarlierUse::InFlight)
    ));
    assert!(matches!(
        other.unwrap(),
        PaymentCreation::Earlier(EarlierUse::Mismatch)
    ));
    let row = db
        .query_one(
            "SELECT response_body, lease FROM idempotency_keys WHERE key = 'dead'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<String>>(0), Some(answer.body.clone()));
    assert_eq!(row.get::<_, Option<String>>(1), None, "the claim is gone");
    let PaymentCreation::Earlier(EarlierUse::Replay(replayed)) = create("dead", 7).await.unwrap()
    else {
        panic!("the answer replays")
    };
    assert_eq!(replayed.body, answer.body);
    let payments: i64 = db
        .query_one("SELECT count(*) FROM payments", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(payments, 1);
    std::fs::remove_dir_all(keys_dir).unwrap();
}
