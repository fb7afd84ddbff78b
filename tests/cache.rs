//! The per-worker cache against two real worker processes on one data directory: every
//! kind of change made through one worker takes effect on the very next request to the
//! other, and a change the other's entries do not depend on evicts nothing (seen through
//! its cache counters in `/metrics`, not through timing).

mod common;

use common::{paygate_command, serve, signal, wait_exit, Client, TempDir};
use serde_json::{json, Value};

/// A worker process of its own name on the shared data directory.
struct Worker {
    child: std::process::Child,
    client: Client,
    name: &'static str,
}

impl Worker {
    fn start(dir: &TempDir, name: &'static str, format: &str) -> Worker {
        let (child, addr) = serve(
            dir,
            &[
                "--instance",
                name,
                "--rate-limit",
                "none",
                "--password-check-limit",
                "none",
                "--token-format",
                format,
            ],
        );
        let client = Client::new(addr, &dir.0.join("certs/server.crt"));
        Worker {
            child,
            client,
            name,
        }
    }

    /// This worker's cache counter `family{result|reason=label}`, from its own `/metrics`.
    async fn counter(&self, family: &str, label: &str) -> f64 {
        let text = self.client.get("/metrics").send().await.text();
        let instance = format!("worker=\"{}\"", self.name);
        text.lines()
            .filter(|l| l.starts_with(family) && l.contains(&instance) && l.contains(label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    async fn fetched(&self) -> f64 {
        self.counter("paygate_cache_lookups_total", "result=\"fetched\"")
            .await
    }

    fn stop(mut self) {
        signal(&self.child, "TERM");
        assert!(wait_exit(&mut self.child).success());
    }
}

async fn read(worker: &Worker, token: &str, path: &str) -> (u16, Value) {
    let response = worker.client.get(path).bearer(token).send().await;
    let body = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
    (response.status.as_u16(), body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_change_reaches_the_other_worker_and_unrelated_ones_evict_nothing() {
    let dir = TempDir::new("cache-two-workers");
    let a = Worker::start(&dir, "a", "jwt");
    let b = Worker::start(&dir, "b", "jwt");
    let alice = a.client.register("alice").await;
    let bob = a.client.register("bob").await;
    let account = a.client.account(&alice, "EUR").await;
    let pay = || async {
        let response = a
            .client
            .post(&format!("/accounts/{account}/payments"))
            .basic(&alice)
            .json(&json!({"payee": "ACME", "amount_minor": 100, "currency": "EUR"}))
            .send()
            .await;
        assert_eq!(response.status, 201, "{}", response.text());
        response.json()["id"].as_str().unwrap().to_owned()
    };
    let payment = pay().await;
    let path = format!("/accounts/{account}/payments/{payment}");
    let grant = a
        .client
        .post(&format!("/accounts/{account}/members"))
        .basic(&alice)
        .json(&json!({"username": "bob", "perms": "r"}))
        .send()
        .await;
    assert_eq!(grant.status, 201);
    let alice_token = a.client.login(&alice).await;
    let bob_token = b.client.login(&bob).await;

    // Worker b learns both users, their grants and the payment.
    for token in [&alice_token, &bob_token] {
        assert_eq!(read(&b, token, &path).await.0, 200);
    }
    let warm = b.fetched().await;
    assert!(warm > 0.0);

    // Unrelated commits through worker a: a new payment, a new account, a login.
    pay().await;
    a.client.account(&alice, "USD").await;
    a.client.login(&alice).await;
    for token in [&alice_token, &bob_token] {
        assert_eq!(read(&b, token, &path).await.0, 200);
    }
    assert_eq!(b.fetched().await, warm, "b read nothing again");
    assert!(
        b.counter("paygate_cache_lookups_total", "result=\"hit\"")
            .await
            > 0.0
    );

    // A cancellation through a: the next read on b sees it.
    let cancelled = a.client.delete(&path).basic(&alice).send().await;
    assert_eq!(cancelled.status, 200);
    let (status, body) = read(&b, &alice_token, &path).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("cancelled")));

    // A capability minted through a works on b until it is revoked through a.
    let minted = a
        .client
        .post(&format!("{path}/capabilities"))
        .bearer(&alice_token)
        .json(&json!({"perms": "r", "expires_in": 600}))
        .send()
        .await;
    assert_eq!(minted.status, 201, "{}", minted.text());
    let capability = minted.json();
    let cap_token = capability["token"].as_str().unwrap().to_owned();
    assert_eq!(read(&b, &cap_token, &path).await.0, 200);
    let revoked = a
        .client
        .delete(&format!(
            "/capabilities/{}",
            capability["id"].as_str().unwrap()
        ))
        .bearer(&alice_token)
        .send()
        .await;
    assert_eq!(revoked.status, 204);
    assert_eq!(read(&b, &cap_token, &path).await.0, 401);

    // A grant taken away through a: bob's next read on b finds no account.
    let removed = a
        .client
        .delete(&format!("/accounts/{account}/members/bob"))
        .basic(&alice)
        .send()
        .await;
    assert_eq!(removed.status, 204);
    assert_eq!(read(&b, &bob_token, &path).await.0, 404);

    // A JWT logged out through a: refused by b.
    let out = a
        .client
        .delete("/sessions")
        .bearer(&alice_token)
        .send()
        .await;
    assert_eq!(out.status, 204);
    assert_eq!(read(&b, &alice_token, "/users/me").await.0, 401);

    // Bob disabled by the operator's command (a third process): b refuses his token.
    assert_eq!(read(&b, &bob_token, "/users/me").await.0, 200);
    let disabled = paygate_command(&dir)
        .args(["user", "disable", "bob"])
        .output()
        .unwrap();
    assert!(disabled.status.success(), "{disabled:?}");
    assert_eq!(read(&b, &bob_token, "/users/me").await.0, 401);
    assert!(
        b.counter("paygate_cache_evictions_total", "reason=\"change\"")
            .await
            > 0.0
    );

    a.stop();
    b.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_opaque_session_ended_through_one_worker_ends_on_the_other() {
    let dir = TempDir::new("cache-sessions");
    let a = Worker::start(&dir, "a", "opaque");
    let b = Worker::start(&dir, "b", "opaque");
    let alice = a.client.register("alice").await;
    let carol = a.client.register("carol").await;
    let alice_token = a.client.login(&alice).await;
    let carol_token = a.client.login(&carol).await;
    for token in [&alice_token, &carol_token] {
        assert_eq!(read(&b, token, "/users/me").await.0, 200);
    }
    let warm = b.fetched().await;
    let out = a
        .client
        .delete("/sessions")
        .bearer(&alice_token)
        .send()
        .await;
    assert_eq!(out.status, 204);
    assert_eq!(read(&b, &alice_token, "/users/me").await.0, 401);
    // Carol's session is untouched, and still served from b's memory.
    assert_eq!(read(&b, &carol_token, "/users/me").await.0, 200);
    assert_eq!(
        b.fetched().await,
        warm + 1.0,
        "only alice's session was read again"
    );
    a.stop();
    b.stop();
}
