//! Payments and Idempotency-Key: creation, validation, listing, cancellation, replays,
//! mismatches and concurrent duplicates.

mod common;

use common::{Creds, TestServer};
use serde_json::{json, Value};

struct Fixture {
    server: TestServer,
    alice: Creds,
    account: String,
}

impl Fixture {
    async fn new() -> Self {
        let server = TestServer::start().await;
        let alice = server.register("alice").await;
        let account = server.account(&alice, "EUR").await;
        Fixture {
            server,
            alice,
            account,
        }
    }

    fn payments(&self) -> String {
        format!("/accounts/{}/payments", self.account)
    }

    async fn pay(&self, body: &Value, key: Option<&str>) -> common::TestResponse {
        let mut request = self
            .server
            .client
            .post(&self.payments())
            .basic(&self.alice)
            .json(body);
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        request.send().await
    }

    async fn count(&self) -> usize {
        let list = self
            .server
            .client
            .get(&format!("{}?limit=100", self.payments()))
            .basic(&self.alice)
            .send()
            .await
            .json();
        list["items"].as_array().unwrap().len()
    }
}

fn payment(amount: i64) -> Value {
    json!({"payee": "ACME-Ltd", "amount_minor": amount, "currency": "EUR", "reference": "Invoice 42"})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_read_list_and_cancel() {
    let f = Fixture::new().await;
    let created = f.pay(&payment(1250), None).await;
    assert_eq!(created.status, 201, "{}", created.text());
    let body = created.json();
    let id = body["id"].as_str().unwrap();
    assert_eq!(
        created.header("location"),
        Some(&*format!("{}/{id}", f.payments()))
    );
    assert_eq!(body["status"], "pending");
    assert_eq!(body["amount_minor"], 1250);
    assert_eq!(body["created_by"], "alice");
    assert_eq!(body["account_id"], f.account);

    let read = f
        .server
        .client
        .get(&format!("{}/{id}", f.payments()))
        .basic(&f.alice)
        .send()
        .await;
    assert_eq!(read.status, 200);
    assert_eq!(read.json(), body);

    let cancel = f
        .server
        .client
        .delete(&format!("{}/{id}", f.payments()))
        .basic(&f.alice)
        .send()
        .await;
    assert_eq!(cancel.status, 200, "{}", cancel.text());
    assert_eq!(cancel.json()["status"], "cancelled");
    assert!(cancel.json()["cancelled_at"].is_string());
    let again = f
        .server
        .client
        .delete(&format!("{}/{id}", f.payments()))
        .basic(&f.alice)
        .send()
        .await;
    let problem = again.assert_problem(409);
    assert_eq!(
        problem["type"],
        "tag:paygate.dev,2026:problem:payment-not-pending"
    );

    let missing = format!("{}/{}", f.payments(), uuid::Uuid::now_v7());
    f.server
        .client
        .get(&missing)
        .basic(&f.alice)
        .send()
        .await
        .assert_problem(404);
    f.server
        .client
        .delete(&missing)
        .basic(&f.alice)
        .send()
        .await
        .assert_problem(404);
    f.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_is_only_reachable_through_its_own_account() {
    let f = Fixture::new().await;
    let other_account = f.server.account(&f.alice, "EUR").await;
    let id = f.pay(&payment(5), None).await.json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // alice holds both accounts, but the payment belongs to one of them only.
    let wrong = format!("/accounts/{other_account}/payments/{id}");
    f.server
        .client
        .get(&wrong)
        .basic(&f.alice)
        .send()
        .await
        .assert_problem(404);
    f.server
        .client
        .delete(&wrong)
        .basic(&f.alice)
        .send()
        .await
        .assert_problem(404);
    f.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_invalid_field_is_a_clear_problem() {
    let f = Fixture::new().await;
    let invalid = [
        (
            json!({"payee": "ACME", "amount_minor": 0, "currency": "EUR"}),
            "amount_minor",
        ),
        (
            json!({"payee": "ACME", "amount_minor": -5, "currency": "EUR"}),
            "amount_minor",
        ),
        (
            json!({"payee": "ACME", "amount_minor": 1_000_000_000_001i64, "currency": "EUR"}),
            "amount_minor",
        ),
        (
            json!({"payee": "", "amount_minor": 1, "currency": "EUR"}),
            "payee",
        ),
        (
            json!({"payee": "A C M E", "amount_minor": 1, "currency": "EUR"}),
            "payee",
        ),
        (
            json!({"payee": "p".repeat(65), "amount_minor": 1, "currency": "EUR"}),
            "payee",
        ),
        (
            json!({"payee": "ACME", "amount_minor": 1, "currency": "USD"}),
            "currency",
        ),
        (
            json!({"payee": "ACME", "amount_minor": 1, "currency": "EUR", "reference": "r".repeat(141)}),
            "reference",
        ),
        (
            json!({"payee": "ACME", "amount_minor": 1, "currency": "EUR", "reference": "a\u{0007}b"}),
            "reference",
        ),
        // Invisible and reordering characters: what a reader sees would not be what was
        // stored (right-to-left override, line separator, zero-width space).
        (
            json!({"payee": "ACME", "amount_minor": 1, "currency": "EUR", "reference": "invoice \u{202e}gpj.exe"}),
            "reference",
        ),
        (
            json!({"payee": "ACME", "amount_minor": 1, "currency": "EUR", "reference": "one\u{2028}two"}),
            "reference",
        ),
        (
            json!({"payee": "ACME", "amount_minor": 1, "currency": "EUR", "reference": "pay\u{200b}ment"}),
            "reference",
        ),
    ];
    for (body, field) in invalid {
        let problem = f.pay(&body, None).await.assert_problem(422);
        assert_eq!(problem["field"], field, "{body}");
    }
    let malformed = [
        json!({"payee": "ACME", "amount_minor": 12.5, "currency": "EUR"}),
        json!({"payee": "ACME", "amount_minor": "100", "currency": "EUR"}),
        json!({"payee": "ACME", "amount_minor": 1e30, "currency": "EUR"}),
        json!({"payee": "ACME", "currency": "EUR"}),
        json!({"payee": "ACME", "amount_minor": 1, "currency": "EUR", "status": "cancelled"}),
    ];
    for body in malformed {
        f.pay(&body, None).await.assert_problem(400);
    }
    f.pay(&payment(1), Some("")).await.assert_problem(422);
    f.pay(&payment(1), Some(&"k".repeat(256)))
        .await
        .assert_problem(422);
    assert_eq!(f.count().await, 0, "nothing was created by a bad request");
    f.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_are_newest_first_with_cursors() {
    let f = Fixture::new().await;
    let mut ids = Vec::new();
    for amount in 1..=7 {
        ids.push(
            f.pay(&payment(amount), None).await.json()["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    ids.reverse();
    let mut seen = Vec::new();
    let mut path = format!("{}?limit=3", f.payments());
    loop {
        let page = f
            .server
            .client
            .get(&path)
            .basic(&f.alice)
            .send()
            .await
            .json();
        seen.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["id"].as_str().unwrap().to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("{}?limit=3&cursor={cursor}", f.payments()),
            None => break,
        }
    }
    assert_eq!(seen, ids);
    f.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_retry_replays_instead_of_paying_twice() {
    let f = Fixture::new().await;
    let first = f.pay(&payment(999), Some("order-77")).await;
    assert_eq!(first.status, 201, "{}", first.text());
    assert!(first.header("idempotency-replayed").is_none());

    let retry = f.pay(&payment(999), Some("order-77")).await;
    assert_eq!(retry.status, 201);
    assert_eq!(retry.header("idempotency-replayed"), Some("true"));
    assert_eq!(
        retry.json(),
        first.json(),
        "the stored answer, byte for byte"
    );
    assert_eq!(retry.header("location"), first.header("location"));
    assert_ne!(retry.header("x-request-id"), first.header("x-request-id"));

    let different = f.pay(&payment(1000), Some("order-77")).await;
    let problem = different.assert_problem(422);
    assert_eq!(
        problem["type"],
        "tag:paygate.dev,2026:problem:idempotency-key-reused"
    );
    assert_eq!(f.count().await, 1);

    // Keys belong to the user: bob may use the same key on his own account.
    let bob = f.server.register("bob").await;
    let bobs = f.server.account(&bob, "EUR").await;
    let response = f
        .server
        .client
        .post(&format!("/accounts/{bobs}/payments"))
        .basic(&bob)
        .header("idempotency-key", "order-77")
        .json(&payment(999))
        .send()
        .await;
    assert_eq!(response.status, 201);
    assert!(response.header("idempotency-replayed").is_none());
    f.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_create_exactly_one_payment() {
    let f = Fixture::new().await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let client = f.server.client.clone();
        let (path, alice) = (f.payments(), f.alice.clone());
        tasks.push(tokio::spawn(async move {
            client
                .post(&path)
                .basic(&alice)
                .header("idempotency-key", "same-key")
                .json(&payment(500))
                .send()
                .await
        }));
    }
    let mut fresh = 0;
    let mut ids = std::collections::BTreeSet::new();
    for task in tasks {
        let response = task.await.unwrap();
        match response.status.as_u16() {
            201 => {
                if response.header("idempotency-replayed").is_none() {
                    fresh += 1;
                }
                ids.insert(response.json()["id"].as_str().unwrap().to_owned());
            }
            // The key is taken in the payment's own transaction, so a racing duplicate
            // waits for it and replays: nobody is told "still in flight".
            other => panic!("unexpected {other}: {}", response.text()),
        }
    }
    assert_eq!(fresh, 1, "exactly one request created the payment");
    assert_eq!(ids.len(), 1, "every 201 describes the same payment");
    assert_eq!(f.count().await, 1);
    f.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payments_and_idempotency_records_survive_a_restart() {
    let f = Fixture::new().await;
    let created = f.pay(&payment(42), Some("survives")).await.json();
    let Fixture {
        server,
        alice,
        account,
    } = f;
    let server = server.restart().await;
    let replay = server
        .client
        .post(&format!("/accounts/{account}/payments"))
        .basic(&alice)
        .header("idempotency-key", "survives")
        .json(&payment(42))
        .send()
        .await;
    assert_eq!(replay.header("idempotency-replayed"), Some("true"));
    assert_eq!(replay.json(), created);
    server.shutdown().await;
}

/// Group commit acknowledges a payment only once its batch is durable: after `kill -9` in
/// the middle of a stream of concurrent payments, every payment that was answered 201 is
/// there after a restart, with its Idempotency-Key answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_loses_no_acknowledged_payment() {
    let dir = common::TempDir::new("payments-kill");
    let (mut child, addr) = common::serve(&dir, &["--rate-limit", "none"]);
    let client = common::Client::new(addr, &dir.0.join("certs/server.crt"));
    let alice = client.register("alice").await;
    let account = client.account(&alice, "EUR").await;
    let token = client.login(&alice).await;
    let mut tasks = Vec::new();
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for writer in 0..8 {
        let (client, token) = (client.clone(), token.clone());
        let path = format!("/accounts/{account}/payments");
        let answered = answered.clone();
        tasks.push(tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            for n in 0..2000 {
                let key = format!("w{writer}-{n}");
                let request = client
                    .post(&path)
                    .bearer(&token)
                    .header("idempotency-key", &key)
                    .json(&payment(n + 1));
                let sent =
                    tokio::time::timeout(std::time::Duration::from_secs(2), request.try_send());
                match sent.await {
                    Ok(Some(r)) if r.status == 201 => {
                        answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        acknowledged.push((key, r.json()["id"].as_str().unwrap().to_owned()))
                    }
                    Ok(Some(r)) => panic!("{}: {}", r.status, r.text()),
                    _ => break,
                }
            }
            acknowledged
        }));
    }
    // Kill once enough payments were acknowledged, however long that takes on a busy
    // machine: the writers keep going, so the kill lands mid-batch as likely as not.
    while answered.load(std::sync::atomic::Ordering::SeqCst) < 80
        && !tasks.iter().all(|t| t.is_finished())
    {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let mut acknowledged = Vec::new();
    for task in tasks {
        acknowledged.extend(task.await.unwrap());
    }
    assert!(
        acknowledged.len() > 50,
        "only {} answered",
        acknowledged.len()
    );
    eprintln!(
        "{} payments acknowledged before the kill",
        acknowledged.len()
    );

    let (mut child, addr) = common::serve(&dir, &["--rate-limit", "none"]);
    let client = common::Client::new(addr, &dir.0.join("certs/server.crt"));
    let path = format!("/accounts/{account}/payments");
    for (_, id) in &acknowledged {
        let read = client
            .get(&format!("{path}/{id}"))
            .bearer(&token)
            .send()
            .await;
        assert_eq!(read.status, 200, "payment {id} was acknowledged, then lost");
    }
    // And each key replays its payment rather than paying again (a sample: every 25th).
    for (n, (key, id)) in acknowledged.iter().enumerate().step_by(25) {
        let amount = key.rsplit('-').next().unwrap().parse::<i64>().unwrap() + 1;
        let replay = client
            .post(&path)
            .bearer(&token)
            .header("idempotency-key", key)
            .json(&payment(amount))
            .send()
            .await;
        assert_eq!(replay.status, 201, "{n}: {}", replay.text());
        assert_eq!(replay.header("idempotency-replayed"), Some("true"));
        assert_eq!(replay.json()["id"], id.as_str());
    }
    common::signal(&child, "TERM");
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn newest_first_is_commit_order_and_times_and_ids_follow_it() {
    let f = Fixture::new().await;
    // Two workers' commit threads on one database, twelve writers between them.
    let sibling = f.server.sibling().await;
    let token = f.server.login(&f.alice).await;
    let mut writers = Vec::new();
    for w in 0..12 {
        let client = if w % 2 == 0 {
            f.server.client.clone()
        } else {
            sibling.client.clone()
        };
        let (path, token) = (f.payments(), token.clone());
        writers.push(tokio::spawn(async move {
            for i in 0..25 {
                let created = client
                    .post(&path)
                    .bearer(&token)
                    .json(&payment(w * 100 + i + 1))
                    .send()
                    .await;
                assert_eq!(created.status, 201, "{}", created.text());
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    // Walk the list: each payment is no newer, and has a smaller id, than the one before.
    let mut listed: Vec<(String, String)> = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            None => format!("{}?limit=100", f.payments()),
            Some(c) => format!("{}?limit=100&cursor={c}", f.payments()),
        };
        let page = f
            .server
            .client
            .get(&path)
            .bearer(&token)
            .send()
            .await
            .json();
        for item in page["items"].as_array().unwrap() {
            listed.push((
                item["created_at"].as_str().unwrap().to_owned(),
                item["id"].as_str().unwrap().to_owned(),
            ));
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(listed.len(), 300);
    for pair in listed.windows(2) {
        let (newer, older) = (&pair[0], &pair[1]);
        assert!(
            newer.0 >= older.0,
            "created_at out of order: {newer:?} before {older:?}"
        );
        assert!(
            newer.1 > older.1,
            "ids out of order: {newer:?} before {older:?}"
        );
    }
    sibling.shutdown().await;
    f.server.shutdown().await;
}
