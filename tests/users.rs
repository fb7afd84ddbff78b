//! Registration and HTTP Basic authentication, as a client and as an attacker would use them.

mod common;

use std::time::Instant;

use common::{Creds, TestServer};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_creates_a_user_once() {
    let server = TestServer::start().await;
    let response = server
        .client
        .post("/users")
        .json(&json!({"username": "alice", "password": "correct horse battery"}))
        .send()
        .await;
    assert_eq!(response.status, 201, "{}", response.text());
    assert_eq!(response.header("location"), Some("/users/alice"));
    let body = response.json();
    assert_eq!(body["username"], "alice");
    assert!(body.get("password").is_none() && body.get("password_hash").is_none());

    let again = server
        .client
        .post("/users")
        .json(&json!({"username": "alice", "password": "another good passphrase"}))
        .send()
        .await;
    let problem = again.assert_problem(409);
    assert_eq!(
        problem["type"],
        "tag:paygate.dev,2026:problem:username-taken"
    );

    // The user can read their own record with the password they chose.
    let me = server
        .client
        .get("/users/alice")
        .basic(&Creds::new("alice", "correct horse battery"))
        .send()
        .await;
    assert_eq!(me.status, 200);
    assert_eq!(me.json()["username"], "alice");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_rules_are_enforced_field_by_field() {
    let server = TestServer::start().await;
    let cases = [
        ("ab", "a good long passphrase", "username"),
        ("Alice", "a good long passphrase", "username"),
        ("al ice", "a good long passphrase", "username"),
        (&*"x".repeat(33), "a good long passphrase", "username"),
        ("bob", "short", "password"),
        ("bobby", &*"p".repeat(257), "password"),
        ("bobby", "password1", "password"),
        ("bobby", "qwertyuiop", "password"),
        ("bobby123", "BOBBY123", "password"),
    ];
    for (username, password, field) in cases {
        let response = server
            .client
            .post("/users")
            .json(&json!({"username": username, "password": password}))
            .send()
            .await;
        let problem = response.assert_problem(422);
        assert_eq!(problem["field"], field, "{username}/{password}: {problem}");
    }
    // Passwords are taken exactly as sent: spaces and any Unicode count.
    let exact = server
        .client
        .post("/users")
        .json(&json!({"username": "unicode", "password": "  pässwörd ☃ with spaces  "}))
        .send()
        .await;
    assert_eq!(exact.status, 201, "{}", exact.text());
    let login = |password: &str| {
        server
            .client
            .get("/users/unicode")
            .basic(&Creds::new("unicode", password))
            .send()
    };
    assert_eq!(login("  pässwörd ☃ with spaces  ").await.status, 200);
    assert_eq!(login("pässwörd ☃ with spaces").await.status, 401);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_and_unknown_user_look_the_same() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;

    let mut bodies = Vec::new();
    let mut timings = Vec::new();
    for creds in [
        Creds::new("alice", "wrong password here"),
        Creds::new("nobody", "wrong password here"),
    ] {
        // The fastest of five attempts: robust against a noisy neighbour.
        let mut fastest = std::time::Duration::MAX;
        let mut response = None;
        for _ in 0..5 {
            let started = Instant::now();
            response = Some(server.client.get("/accounts").basic(&creds).send().await);
            fastest = fastest.min(started.elapsed());
        }
        timings.push(fastest);
        let response = response.unwrap();
        let mut problem = response.assert_problem(401);
        assert_eq!(
            response.header("www-authenticate"),
            Some(r#"Basic realm="paygate", charset="UTF-8""#)
        );
        problem.as_object_mut().unwrap().remove("request_id");
        bodies.push(problem);
    }
    assert_eq!(
        bodies[0], bodies[1],
        "same answer for unknown user and wrong password"
    );
    // Both pay for one Argon2id verification (~16 ms); an unknown user must not answer
    // in a fraction of that. (A loose bound: timing on shared machines is noisy.)
    let (wrong, unknown) = (timings[0], timings[1]);
    assert!(
        unknown * 3 > wrong,
        "unknown user {unknown:?} vs wrong password {wrong:?}"
    );

    assert_eq!(
        server
            .client
            .get("/accounts")
            .basic(&alice)
            .send()
            .await
            .status,
        200
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_and_malformed_credentials_get_a_basic_challenge() {
    let server = TestServer::start().await;
    server.register("carol").await;
    let cases = [
        None,
        Some("Basic"),
        Some("Basic !!!!"),
        Some("Basic Y2Fyb2w="), // "carol" without a colon
        Some("Digest username=carol"),
    ];
    for authorization in cases {
        let mut request = server.client.get("/accounts");
        if let Some(value) = authorization {
            request = request.header("authorization", value);
        }
        let response = request.send().await;
        response.assert_problem(401);
        assert_eq!(
            response.header("www-authenticate"),
            Some(r#"Basic realm="paygate", charset="UTF-8""#),
            "{authorization:?}"
        );
    }
    // A bad Bearer token is answered in Bearer terms (RFC 6750).
    let response = server
        .client
        .get("/accounts")
        .header("authorization", "Bearer abc.def.ghi")
        .send()
        .await;
    response.assert_problem(401);
    assert_eq!(
        response.header("www-authenticate"),
        Some(r#"Bearer error="invalid_token""#)
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_cannot_read_each_other() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    server.register("bob").await;
    let response = server.client.get("/users/bob").basic(&alice).send().await;
    response.assert_problem(404);
    let response = server
        .client
        .get("/users/nobody")
        .basic(&alice)
        .send()
        .await;
    response.assert_problem(404);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_disable_stops_requests_whose_password_check_is_still_queued() {
    // A queue long enough for the whole flood: this is about what waits in it.
    let server = TestServer::start_with(&[("password-queue", "1000")]).await;
    let bob = server.register("bob").await;
    let account = server.account(&bob, "EUR").await;
    let admin = server.staff(
        "root.admin",
        "admin passphrase 1",
        paygate::domain::Role::Admin,
    );
    // The admin acts with a token: their requests never wait for a hashing slot.
    let admin = server.login(&admin).await;
    // Fill the Argon2 queue with wrong passwords for names nobody has.
    let mut flood = Vec::new();
    for i in 0..300 {
        let client = server.client.clone();
        flood.push(tokio::spawn(async move {
            let stranger = Creds::new(&format!("stranger{i}"), "wrong password");
            client.get("/users/me").basic(&stranger).send().await.status
        }));
    }
    // Bob's payment and bob's login queue behind them...
    let pay = {
        let (client, bob) = (server.client.clone(), bob.clone());
        let path = format!("/accounts/{account}/payments");
        tokio::spawn(async move {
            client
                .post(&path)
                .basic(&bob)
                .json(&json!({"payee": "ACME", "amount_minor": 5, "currency": "EUR"}))
                .send()
                .await
        })
    };
    let login = {
        let (client, bob) = (server.client.clone(), bob.clone());
        tokio::spawn(async move { client.post("/sessions").basic(&bob).send().await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    // ...when an admin disables him.
    let disabled = server
        .client
        .post("/users/bob/disable")
        .bearer(&admin)
        .send()
        .await;
    assert_eq!(disabled.status, 204, "{}", disabled.text());
    assert!(
        !pay.is_finished() && !login.is_finished(),
        "bob's requests were answered before the disable: the flood was too short"
    );
    let pay = pay.await.unwrap();
    pay.assert_problem(401);
    login.await.unwrap().assert_problem(401);
    for request in flood {
        assert_eq!(request.await.unwrap(), 401);
    }
    // No payment was made.
    let account = account.parse().unwrap();
    let payments = server
        .app()
        .store
        .payments(account, 10, None)
        .await
        .unwrap();
    assert!(payments.items.is_empty());
    server.shutdown().await;
}
