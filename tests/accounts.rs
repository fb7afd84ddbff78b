//! Accounts, members and identity-based access control: every check an attacker would
//! probe — other users' accounts, missing permissions, self-promotion.

mod common;

use common::TestServer;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_creator_gets_every_permission_and_sees_the_account() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let response = server
        .client
        .post("/accounts")
        .basic(&alice)
        .json(&json!({"name": "Operating", "currency": "EUR"}))
        .send()
        .await;
    assert_eq!(response.status, 201, "{}", response.text());
    let account = response.json();
    let id = account["id"].as_str().unwrap();
    assert_eq!(
        response.header("location"),
        Some(&*format!("/accounts/{id}"))
    );
    assert_eq!(account["perms"], "rwda");
    assert_eq!(account["currency"], "EUR");

    let fetched = server
        .client
        .get(&format!("/accounts/{id}"))
        .basic(&alice)
        .send()
        .await;
    assert_eq!(fetched.status, 200);
    assert_eq!(fetched.json()["name"], "Operating");

    let list = server
        .client
        .get("/accounts")
        .basic(&alice)
        .send()
        .await
        .json();
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    assert_eq!(list["items"][0]["id"], id);
    assert_eq!(list["next_cursor"], serde_json::Value::Null);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_fields_are_validated() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    for (body, field) in [
        (json!({"name": "", "currency": "EUR"}), "name"),
        (json!({"name": "x".repeat(65), "currency": "EUR"}), "name"),
        (json!({"name": "a\nb", "currency": "EUR"}), "name"),
        (
            json!({"name": "Savings \u{202e}", "currency": "EUR"}),
            "name",
        ),
        (
            json!({"name": "Sav\u{200d}ings", "currency": "EUR"}),
            "name",
        ),
        (json!({"name": "a\u{2029}b", "currency": "EUR"}), "name"),
        (json!({"name": "ok", "currency": "eur"}), "currency"),
        (json!({"name": "ok", "currency": "XXX"}), "currency"),
        (json!({"name": "ok", "currency": "EURO"}), "currency"),
    ] {
        let response = server
            .client
            .post("/accounts")
            .basic(&alice)
            .json(&body)
            .send()
            .await;
        assert_eq!(response.assert_problem(422)["field"], field, "{body}");
    }
    let response = server
        .client
        .post("/accounts")
        .basic(&alice)
        .json(&json!({"name": "ok", "currency": 978}))
        .send()
        .await;
    response.assert_problem(400);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_users_accounts_do_not_exist_for_them() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let mallory = server.register("mallory").await;
    let account = server.account(&alice, "EUR").await;

    for path in [
        format!("/accounts/{account}"),
        format!("/accounts/{account}/payments"),
        format!("/accounts/{account}/payments/{}", uuid::Uuid::now_v7()),
    ] {
        let response = server.client.get(&path).basic(&mallory).send().await;
        let problem = response.assert_problem(404);
        // Indistinguishable from an account that does not exist at all.
        let missing = path.replace(&account, &uuid::Uuid::now_v7().to_string());
        let other = server.client.get(&missing).basic(&mallory).send().await;
        let other_problem = other.assert_problem(404);
        assert_eq!(problem["detail"], other_problem["detail"], "{path}");
    }
    let grant = server
        .client
        .post(&format!("/accounts/{account}/members"))
        .basic(&mallory)
        .json(&json!({"username": "mallory", "perms": "rwda"}))
        .send()
        .await;
    grant.assert_problem(404);
    let pay = server
        .client
        .post(&format!("/accounts/{account}/payments"))
        .basic(&mallory)
        .json(&json!({"payee": "mallory", "amount_minor": 100, "currency": "EUR"}))
        .send()
        .await;
    pay.assert_problem(404);
    let list = server
        .client
        .get("/accounts")
        .basic(&mallory)
        .send()
        .await
        .json();
    assert_eq!(list["items"], json!([]));
    // Without credentials the same paths ask for them rather than saying anything.
    let anonymous = server
        .client
        .get(&format!("/accounts/{account}"))
        .send()
        .await;
    anonymous.assert_problem(401);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_get_exactly_the_permissions_granted() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let account = server.account(&alice, "EUR").await;
    let members = format!("/accounts/{account}/members");
    let payments = format!("/accounts/{account}/payments");

    let grant = server
        .client
        .post(&members)
        .basic(&alice)
        .json(&json!({"username": "bob", "perms": "r"}))
        .send()
        .await;
    assert_eq!(grant.status, 201, "{}", grant.text());
    assert_eq!(
        grant.json(),
        json!({"account_id": account, "username": "bob", "perms": "r"})
    );

    // Read-only bob can list, but not pay, cancel or manage members.
    assert_eq!(
        server.client.get(&payments).basic(&bob).send().await.status,
        200
    );
    let list = server
        .client
        .get("/accounts")
        .basic(&bob)
        .send()
        .await
        .json();
    assert_eq!(list["items"][0]["perms"], "r");
    let pay = server
        .client
        .post(&payments)
        .basic(&bob)
        .json(&json!({"payee": "bob", "amount_minor": 1, "currency": "EUR"}))
        .send()
        .await;
    let problem = pay.assert_problem(403);
    assert!(
        problem["detail"].as_str().unwrap().contains("'w'"),
        "{problem}"
    );
    let promote = server
        .client
        .post(&members)
        .basic(&bob)
        .json(&json!({"username": "bob", "perms": "rwda"}))
        .send()
        .await;
    promote.assert_problem(403);

    // Re-granting replaces the permissions (200, not 201).
    let upgrade = server
        .client
        .post(&members)
        .basic(&alice)
        .json(&json!({"username": "bob", "perms": "wr"}))
        .send()
        .await;
    assert_eq!(upgrade.status, 200);
    assert_eq!(upgrade.json()["perms"], "rw");
    let pay = server
        .client
        .post(&payments)
        .basic(&bob)
        .json(&json!({"payee": "bob", "amount_minor": 1, "currency": "EUR"}))
        .send()
        .await;
    assert_eq!(pay.status, 201, "{}", pay.text());
    let pid = pay.json()["id"].as_str().unwrap().to_owned();
    let cancel = server
        .client
        .delete(&format!("{payments}/{pid}"))
        .basic(&bob)
        .send()
        .await;
    cancel.assert_problem(403);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_are_validated() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    server.register("bob").await;
    let account = server.account(&alice, "USD").await;
    let members = format!("/accounts/{account}/members");
    for (body, field) in [
        (json!({"username": "bob", "perms": ""}), "perms"),
        (json!({"username": "bob", "perms": "rx"}), "perms"),
        (json!({"username": "bob", "perms": "rr"}), "perms"),
        (json!({"username": "nobody", "perms": "r"}), "username"),
        (json!({"username": "B O B", "perms": "r"}), "username"),
    ] {
        let response = server
            .client
            .post(&members)
            .basic(&alice)
            .json(&body)
            .send()
            .await;
        assert_eq!(response.assert_problem(422)["field"], field, "{body}");
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_lists_paginate_newest_first() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let mut created = Vec::new();
    for _ in 0..5 {
        created.push(server.account(&alice, "GBP").await);
    }
    created.reverse();
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/accounts?limit=2&cursor={c}"),
            None => "/accounts?limit=2".to_owned(),
        };
        let page = server.client.get(&path).basic(&alice).send().await.json();
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= 2);
        seen.extend(items.iter().map(|a| a["id"].as_str().unwrap().to_owned()));
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, created);
    let bad = server
        .client
        .get("/accounts?limit=101")
        .basic(&alice)
        .send()
        .await;
    bad.assert_problem(400);
    let bad = server
        .client
        .get("/accounts?cursor=garbage!")
        .basic(&alice)
        .send()
        .await;
    bad.assert_problem(400);
    server.shutdown().await;
}

/// `POST /accounts/{id}/members` as `who`.
async fn grant(
    server: &TestServer,
    account: &str,
    who: &common::Creds,
    username: &str,
    perms: &str,
) -> common::TestResponse {
    server
        .client
        .post(&format!("/accounts/{account}/members"))
        .basic(who)
        .json(&json!({ "username": username, "perms": perms }))
        .send()
        .await
}

/// `DELETE /accounts/{id}/members/{username}` as `who`.
async fn remove(
    server: &TestServer,
    account: &str,
    who: &common::Creds,
    username: &str,
) -> common::TestResponse {
    server
        .client
        .delete(&format!("/accounts/{account}/members/{username}"))
        .basic(who)
        .send()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manager_grants_only_what_they_hold_and_never_over_someone_stronger() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let erin = server.register("erin").await;
    let frank = server.register("frank").await;
    let account = server.account(&alice, "EUR").await;
    assert_eq!(
        grant(&server, &account, &alice, "erin", "a").await.status,
        201
    );

    // Erin holds only 'a': she cannot hand out 'rwda' to an accomplice...
    let problem = grant(&server, &account, &erin, "frank", "rwda")
        .await
        .assert_problem(403);
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("cannot grant 'rwda'"),
        "{problem}"
    );
    // ...nor demote the account's creator, who holds more than she does (even to what
    // she holds herself)...
    let problem = grant(&server, &account, &erin, "alice", "a")
        .await
        .assert_problem(403);
    assert!(
        problem["detail"].as_str().unwrap().contains("holds 'rwda'"),
        "{problem}"
    );
    // ...nor remove her.
    remove(&server, &account, &erin, "alice")
        .await
        .assert_problem(403);
    // What she holds, she may pass on; and she may change a grant within her own.
    assert_eq!(
        grant(&server, &account, &erin, "frank", "a").await.status,
        201
    );
    // So nothing came back round to her: frank holds only 'a' too.
    grant(&server, &account, &frank, "erin", "rwda")
        .await
        .assert_problem(403);
    let pay = server
        .client
        .post(&format!("/accounts/{account}/payments"))
        .basic(&erin)
        .json(&json!({"payee": "erin", "amount_minor": 1, "currency": "EUR"}))
        .send()
        .await;
    pay.assert_problem(403);
    // Alice's grant is untouched.
    let listed = server
        .client
        .get("/accounts")
        .basic(&alice)
        .send()
        .await
        .json();
    assert_eq!(listed["items"][0]["perms"], "rwda");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_member_loses_access_at_once_in_every_worker() {
    let server = TestServer::start().await;
    let other_worker = server.sibling().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let account = server.account(&alice, "EUR").await;
    let payments = format!("/accounts/{account}/payments");
    assert_eq!(
        grant(&server, &account, &alice, "bob", "r").await.status,
        201
    );
    let token = other_worker.login(&bob).await;
    // Bob reads through the other worker (which now caches his grant).
    for _ in 0..2 {
        let read = other_worker
            .client
            .get(&payments)
            .bearer(&token)
            .send()
            .await;
        assert_eq!(read.status, 200);
    }

    // The ways that did not work before stay errors, with reasons.
    grant(&server, &account, &alice, "bob", "")
        .await
        .assert_problem(422);
    let whole = server
        .client
        .delete(&format!("/accounts/{account}/members"))
        .basic(&alice)
        .send()
        .await;
    whole.assert_problem(405);
    remove(&server, &account, &alice, "nobody")
        .await
        .assert_problem(404);
    remove(&server, &account, &alice, "B%20O%20B")
        .await
        .assert_problem(404);
    // Bob, without 'a', cannot remove anyone.
    remove(&server, &account, &bob, "alice")
        .await
        .assert_problem(403);

    let removed = remove(&server, &account, &alice, "bob").await;
    assert_eq!(removed.status, 204, "{}", removed.text());
    // Gone, on the other worker too, on the very next request: the account does not
    // exist for him any more.
    other_worker
        .client
        .get(&payments)
        .bearer(&token)
        .send()
        .await
        .assert_problem(404);
    let listed = other_worker
        .client
        .get("/accounts")
        .bearer(&token)
        .send()
        .await
        .json();
    assert_eq!(listed["items"], json!([]));
    // A second removal finds no member.
    remove(&server, &account, &alice, "bob")
        .await
        .assert_problem(404);

    // The last holder of 'a' stays: alice cannot leave while nobody else manages it.
    let last = remove(&server, &account, &alice, "alice").await;
    let problem = last.assert_problem(409);
    assert_eq!(problem["type"], "tag:paygate.dev,2026:problem:last-manager");
    // With a second manager she may leave, and the account goes on.
    assert_eq!(
        grant(&server, &account, &alice, "bob", "rwda").await.status,
        201
    );
    assert_eq!(remove(&server, &account, &alice, "alice").await.status, 204);
    let read = server.client.get(&payments).basic(&bob).send().await;
    assert_eq!(read.status, 200);
    server
        .client
        .get(&payments)
        .basic(&alice)
        .send()
        .await
        .assert_problem(404);
    // Now bob is the last manager.
    remove(&server, &account, &bob, "bob")
        .await
        .assert_problem(409);

    // The removal is in the audit log, as a delete of that member.
    let data = server.data_dir();
    other_worker.shutdown().await;
    let _kept = server.stop().await;
    let text = common::audit_text(&data);
    let member = format!("\"path\":\"/accounts/{account}/members/bob\",\"op\":\"D\"");
    assert!(text.contains(&member), "no removal record");
}
