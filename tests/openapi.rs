//! The OpenAPI description as served, and one regression test for each disagreement that
//! Schemathesis (`scripts/contract.sh`) found between it and the server — so each stays
//! fixed without running the fuzzer.

mod common;

use common::{Creds, TestServer};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_description_is_served_to_anyone() {
    let server = TestServer::start().await;
    let response = server.client.get("/openapi.yaml").send().await;
    assert_eq!(response.status, 200);
    assert_eq!(response.header("content-type"), Some("application/yaml"));
    assert_eq!(response.text(), include_str!("../openapi.yaml"));
    assert!(response.header("x-request-id").is_some());
    assert_eq!(response.header("cache-control"), Some("no-store"));
    server
        .client
        .delete("/openapi.yaml")
        .send()
        .await
        .assert_problem(405);
    server.shutdown().await;
}

/// Found: a made-up cursor that fits the described form was 400. The form is now exact —
/// 11 base64url characters of a sequence number — and every value of it pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_cursor_of_the_described_form_pages_and_no_other_does() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let account = server.account(&alice, "EUR").await;
    let payments = format!("/accounts/{account}/payments");
    for n in 1..=3 {
        let created = server
            .client
            .post(&payments)
            .basic(&alice)
            .json(&json!({"payee": "ACME", "amount_minor": n, "currency": "EUR"}))
            .send()
            .await;
        assert_eq!(created.status, 201, "{}", created.text());
    }
    let token = server.login(&alice).await;
    let page = |query: String| {
        let request = server
            .client
            .get(&format!("{payments}?{query}"))
            .bearer(&token);
        async move { request.send().await }
    };
    let first = page("limit=2".into()).await.json();
    let cursor = first["next_cursor"].as_str().unwrap().to_owned();
    assert_eq!(cursor.len(), 11);
    let second = page(format!("limit=2&cursor={cursor}")).await.json();
    assert_eq!(second["items"].as_array().unwrap().len(), 1);
    assert_eq!(second["items"][0]["amount_minor"], 1);

    // Made up, but of the form: below sequence 0 there is nothing; below 2^63-1, everything.
    let none = page("cursor=AAAAAAAAAAA".into()).await;
    assert_eq!(none.status, 200);
    assert_eq!(none.json()["items"], json!([]));
    let all = page("cursor=f_________8".into()).await;
    assert_eq!(all.status, 200, "{}", all.text());
    assert_eq!(all.json()["items"].as_array().unwrap().len(), 3);
    // Not of the form: too short, too long, 2^63 and above, trailing bits set.
    for bad in [
        "XY",
        "AAAAAAAAAAAA",
        "gAAAAAAAAAA",
        "AAAAAAAAAAB",
        "AAAAAAAAAA%3D",
    ] {
        page(format!("cursor={bad}")).await.assert_problem(400);
    }
    server.shutdown().await;
}

/// Found: `{"username": <yourself>}` was a 422 for a schema-valid body. It is a refusal of
/// permission, so it is a 403, and the grant stays as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn granting_yourself_is_forbidden() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let account = server.account(&alice, "EUR").await;
    let problem = server
        .client
        .post(&format!("/accounts/{account}/members"))
        .basic(&alice)
        .json(&json!({"username": "alice", "perms": "r"}))
        .send()
        .await
        .assert_problem(403);
    assert!(problem["detail"].as_str().unwrap().contains("your own"));
    let fetched = server
        .client
        .get(&format!("/accounts/{account}"))
        .basic(&alice)
        .send()
        .await;
    assert_eq!(fetched.json()["perms"], "rwda");
    server.shutdown().await;
}

/// Found: `"amount_minor": 1145.0` — a whole number to JSON and JSON Schema — was 400. Whole
/// numbers are now read exactly in any notation; a fraction is still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_numbers_are_accepted_in_any_notation_and_fractions_are_not() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let account = server.account(&alice, "EUR").await;
    let payments = format!("/accounts/{account}/payments");
    let create = |amount: &str| {
        let body = format!(r#"{{"payee":"ACME","amount_minor":{amount},"currency":"EUR"}}"#);
        server
            .client
            .post(&payments)
            .basic(&alice)
            .raw_body("application/json", body)
            .send()
    };
    for (written, value) in [
        ("1145.0", 1145i64),
        ("1.25e3", 1250),
        ("1e12", 1_000_000_000_000),
    ] {
        let response = create(written).await;
        assert_eq!(response.status, 201, "{written}: {}", response.text());
        assert_eq!(response.json()["amount_minor"], value, "{written}");
    }
    for fraction in ["12.5", "1000000000000.00001", "1e-2"] {
        create(fraction).await.assert_problem(400);
    }
    // Out of the allowed range, however written: 422 as before.
    create("1.0e13").await.assert_problem(422);
    create("0.0").await.assert_problem(422);
    let listed = server
        .client
        .get(&payments)
        .basic(&alice)
        .send()
        .await
        .json();
    assert_eq!(listed["items"].as_array().unwrap().len(), 3);

    // Capability lifetimes too.
    let payment = listed["items"][0]["id"].as_str().unwrap().to_owned();
    let minted = server
        .client
        .post(&format!("{payments}/{payment}/capabilities"))
        .basic(&alice)
        .raw_body("application/json", r#"{"perms":"r","expires_in":6.0e1}"#)
        .send()
        .await;
    assert_eq!(minted.status, 201, "{}", minted.text());
    server
        .client
        .post(&format!("{payments}/{payment}/capabilities"))
        .basic(&alice)
        .raw_body("application/json", r#"{"perms":"r","expires_in":60.5}"#)
        .send()
        .await
        .assert_problem(400);
    server.shutdown().await;
}

/// Found: `X-TOTP: ` (empty) beside valid Basic credentials logged in, although the header
/// is described as six digits. A malformed code is now a 400 before the password is checked,
/// for users with and without TOTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_totp_header_is_refused_before_the_password_is_checked() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let wrong = Creds::new("alice", "not alice's password");
    for code in ["", "12345", "1234567", "12345a", "１２３４５６"] {
        for creds in [&alice, &wrong] {
            let problem = server
                .client
                .post("/sessions")
                .basic(creds)
                .header("x-totp", code)
                .send()
                .await
                .assert_problem(400);
            assert!(problem["detail"].as_str().unwrap().contains("X-TOTP"));
        }
    }
    // No password was checked, so no guess was spent: the budget (10) still allows a login.
    let token = server.login(&alice).await;
    assert!(!token.is_empty());
    server.shutdown().await;
}

/// Found: `since=2006-06-16T16:51:28-21:38`, a valid RFC 3339 date-time, was 400. Any
/// offset is now accepted and means the same instant as its UTC form.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_since_takes_any_rfc3339_offset() {
    let server = TestServer::start().await;
    let auditor = server.staff(
        "carol.audit",
        "auditor passphrase 1",
        paygate::domain::Role::Auditor,
    );
    let token = server.login(&auditor).await;
    let read = |since: &str| {
        let request = server
            .client
            .get(&format!("/audit?since={since}&limit=1000"))
            .bearer(&token);
        async move { request.send().await }
    };
    let utc = read("2000-01-01T00:00:00Z").await.json();
    let count = utc["items"].as_array().unwrap().len();
    assert!(count > 0);
    // 2000-01-01T05:30:00+05:30 is the same instant (":" and "+" percent-encoded).
    let offset = read("2000-01-01T05%3A30%3A00%2B05%3A30").await;
    assert_eq!(offset.status, 200, "{}", offset.text());
    assert!(offset.json()["items"].as_array().unwrap().len() >= count);
    // Far in the future with a negative offset: nothing yet.
    let future = read("2999-01-01T00:00:00.123456-21:38").await;
    assert_eq!(future.status, 200, "{}", future.text());
    assert_eq!(future.json()["items"], json!([]));
    for bad in [
        "yesterday",
        "2026-11-29T12:00:00+0100",
        "2026-02-30T00:00:00Z",
    ] {
        read(bad).await.assert_problem(400);
    }
    server.shutdown().await;
}
