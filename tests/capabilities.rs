//! Capabilities against a real server: minting, use by header and by URL, scope limited to
//! one payment and its permissions, no escalation when minting or deriving, tampering,
//! expiry, revocation (derived ones included, across workers), a disabled minter, the
//! auditor and admin roles, and tokens kept out of the audit log.

mod common;

use common::{Creds, TestResponse, TestServer};
use serde_json::{json, Value};

struct World {
    server: TestServer,
    alice: Creds,
    bob: Creds,
    account: String,
    payment: String,
    other_payment: String,
}

async fn world() -> World {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let account = server.account(&alice, "EUR").await;
    let pay = |amount: i64| {
        let (client, alice, account) = (server.client.clone(), alice.clone(), account.clone());
        async move {
            let response = client
                .post(&format!("/accounts/{account}/payments"))
                .basic(&alice)
                .json(&json!({"payee": "ACME-Ltd", "amount_minor": amount, "currency": "EUR"}))
                .send()
                .await;
            assert_eq!(response.status, 201, "{}", response.text());
            response.json()["id"].as_str().unwrap().to_owned()
        }
    };
    let payment = pay(100).await;
    let other_payment = pay(200).await;
    World {
        server,
        alice,
        bob,
        account,
        payment,
        other_payment,
    }
}

impl World {
    async fn mint(&self, creds: &Creds, perms: &str, expires_in: u64) -> TestResponse {
        self.server
            .client
            .post(&format!(
                "/accounts/{}/payments/{}/capabilities",
                self.account, self.payment
            ))
            .basic(creds)
            .json(&json!({"perms": perms, "expires_in": expires_in}))
            .send()
            .await
    }

    async fn minted(&self, perms: &str) -> Value {
        let response = self.mint(&self.alice, perms, 600).await;
        assert_eq!(response.status, 201, "{}", response.text());
        response.json()
    }

    fn payment_path(&self, payment: &str) -> String {
        format!("/accounts/{}/payments/{payment}", self.account)
    }

    async fn read_with(&self, token: &str, payment: &str) -> TestResponse {
        self.server
            .client
            .get(&self.payment_path(payment))
            .bearer(token)
            .send()
            .await
    }

    async fn derive(&self, token: &str, perms: &str, expires_in: Option<u64>) -> TestResponse {
        let mut body = json!({"token": token, "perms": perms});
        if let Some(seconds) = expires_in {
            body["expires_in"] = json!(seconds);
        }
        self.server
            .client
            .post("/capabilities/derive")
            .json(&body)
            .send()
            .await
    }
}

fn token_of(minted: &Value) -> String {
    minted["token"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_capability_reads_its_payment_by_header_and_by_link() {
    let w = world().await;
    let minted = w.minted("r").await;
    let token = token_of(&minted);
    assert!(token.starts_with("pgc_"));
    assert_eq!(minted["perms"], "r");
    assert!(minted["expires_at"].as_str().unwrap().ends_with('Z'));
    let url = minted["url"].as_str().unwrap();
    assert_eq!(
        url,
        format!("{}?access_token={token}", w.payment_path(&w.payment))
    );

    // By header, by a shared link, and by bob, who has no grant on the account at all.
    let response = w.read_with(&token, &w.payment).await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.json()["id"], w.payment.as_str());
    let response = w.server.client.get(url).send().await;
    assert_eq!(response.status, 200, "{}", response.text());
    // With an Authorization header, the header is the credential and the link's token is
    // ignored: bob, who holds no grant, does not see the payment.
    let as_bob = w.server.client.get(url).basic(&w.bob).send().await;
    as_bob.assert_problem(404);
}

#[tokio::test]
async fn a_capability_is_worth_its_one_payment_and_its_permissions() {
    let w = world().await;
    let token = token_of(&w.minted("r").await);
    // Not another payment, not the list, not the account, not creating.
    w.read_with(&token, &w.other_payment)
        .await
        .assert_problem(403);
    let list = w
        .server
        .client
        .get(&format!("/accounts/{}/payments", w.account))
        .bearer(&token)
        .send()
        .await;
    list.assert_problem(403);
    let account = w
        .server
        .client
        .get(&format!("/accounts/{}", w.account))
        .bearer(&token)
        .send()
        .await;
    account.assert_problem(403);
    // Read-only: cancelling is refused, and the payment stays pending.
    let cancel = w
        .server
        .client
        .delete(&w.payment_path(&w.payment))
        .bearer(&token)
        .send()
        .await;
    cancel.assert_problem(403);
    let read = w.read_with(&token, &w.payment).await;
    assert_eq!(read.json()["status"], "pending");
    // A read-and-cancel capability can cancel.
    let rd = token_of(&w.minted("rd").await);
    let cancel = w
        .server
        .client
        .delete(&w.payment_path(&w.payment))
        .bearer(&rd)
        .send()
        .await;
    assert_eq!(cancel.status, 200, "{}", cancel.text());
}

#[tokio::test]
async fn nobody_delegates_more_than_they_hold() {
    let w = world().await;
    // bob reads only.
    let grant = w
        .server
        .client
        .post(&format!("/accounts/{}/members", w.account))
        .basic(&w.alice)
        .json(&json!({"username": "bob", "perms": "r"}))
        .send()
        .await;
    assert_eq!(grant.status, 201);
    w.mint(&w.bob, "rd", 60).await.assert_problem(403);
    assert_eq!(w.mint(&w.bob, "r", 60).await.status, 201);
    // Permissions that do not act on one payment, and lifetimes out of range.
    let body = w.mint(&w.alice, "rw", 60).await.assert_problem(422);
    assert_eq!(body["field"], "perms");
    let body = w.mint(&w.alice, "r", 86_401).await.assert_problem(422);
    assert_eq!(body["field"], "expires_in");
    w.mint(&w.alice, "r", 0).await.assert_problem(422);
    // A stranger to the account learns nothing.
    let carol = w.server.register("carol").await;
    w.mint(&carol, "r", 60).await.assert_problem(404);
    // Deriving: fewer permissions and an earlier end only.
    let parent = w.minted("r").await; // lives 600 s
    let r = token_of(&parent);
    w.derive(&r, "rd", None).await.assert_problem(403);
    let derived = w.derive(&r, "r", Some(86_400)).await;
    assert_eq!(derived.status, 201, "{}", derived.text());
    assert_eq!(
        derived.json()["expires_at"],
        parent["expires_at"],
        "a derived capability never outlives its parent"
    );
    let rd = token_of(&w.minted("rd").await);
    let weaker = w.derive(&rd, "r", Some(60)).await;
    let weaker = token_of(&weaker.json());
    assert_eq!(w.read_with(&weaker, &w.payment).await.status, 200);
    let cancel = w
        .server
        .client
        .delete(&w.payment_path(&w.payment))
        .bearer(&weaker)
        .send()
        .await;
    cancel.assert_problem(403);
}

#[tokio::test]
async fn tampered_unknown_and_expired_capabilities_are_refused() {
    let w = world().await;
    let token = token_of(&w.minted("r").await);
    let last = token.chars().last().unwrap();
    let flipped = format!(
        "{}{}",
        &token[..token.len() - 1],
        if last == 'A' { 'E' } else { 'A' }
    );
    let unknown = format!("pgc_{}", "A".repeat(43));
    for bad in [flipped.as_str(), unknown.as_str(), "pgc_", "pgc_!!!"] {
        let response = w.read_with(bad, &w.payment).await;
        response.assert_problem(401);
        assert_eq!(
            response.header("www-authenticate"),
            Some(r#"Bearer error="invalid_token""#),
            "{bad}"
        );
        let link = format!("{}?access_token={bad}", w.payment_path(&w.payment));
        w.server.client.get(&link).send().await.assert_problem(401);
    }
    w.derive(&unknown, "r", None).await.assert_problem(401);
    assert_eq!(w.derive(&token, "r", Some(30)).await.status, 201);
    // Expiry: a day later (the longest a capability may live), by the server's clock.
    assert_eq!(w.read_with(&token, &w.payment).await.status, 200);
    w.server
        .clock()
        .advance(std::time::Duration::from_secs(86_400));
    w.read_with(&token, &w.payment).await.assert_problem(401);
    w.derive(&token, "r", None).await.assert_problem(401);
    // The sweeper removes expired capabilities (derived ones with them).
    assert!(w.server.app().store.sweep_expired().await.unwrap() >= 2);
    if let Some(db) = w.server.sqlite() {
        let left: i64 = db
            .query_row("SELECT count(*) FROM capabilities", [], |r| r.get(0))
            .unwrap();
        assert_eq!(left, 0);
    }
    w.read_with(&token, &w.payment).await.assert_problem(401);
}

#[tokio::test]
async fn revoking_ends_a_capability_and_its_descendants_in_every_worker() {
    let w = world().await;
    let sibling = w.server.sibling().await;
    let minted = w.minted("rd").await;
    let (root, id) = (token_of(&minted), minted["id"].as_str().unwrap().to_owned());
    let child = token_of(&w.derive(&root, "r", None).await.json());
    let grandchild = token_of(&w.derive(&child, "r", Some(30)).await.json());
    let other = token_of(&w.minted("r").await);
    for token in [&root, &child, &grandchild, &other] {
        assert_eq!(w.read_with(token, &w.payment).await.status, 200);
        let in_sibling = sibling
            .client
            .get(&w.payment_path(&w.payment))
            .bearer(token)
            .send()
            .await;
        assert_eq!(in_sibling.status, 200);
    }
    // The live list shows them, without tokens.
    let list = w
        .server
        .client
        .get(&format!("/accounts/{}/capabilities", w.account))
        .basic(&w.alice)
        .send()
        .await;
    assert_eq!(list.status, 200);
    assert_eq!(list.json()["items"].as_array().unwrap().len(), 4);
    assert!(!list.text().contains(&root[4..]));
    // Someone else cannot revoke it (and is not told it exists).
    let bob_revokes = w
        .server
        .client
        .delete(&format!("/capabilities/{id}"))
        .basic(&w.bob)
        .send()
        .await;
    bob_revokes.assert_problem(404);
    let revoked = w
        .server
        .client
        .delete(&format!("/capabilities/{id}"))
        .basic(&w.alice)
        .send()
        .await;
    assert_eq!(revoked.status, 204, "{}", revoked.text());
    for token in [&root, &child, &grandchild] {
        w.read_with(token, &w.payment).await.assert_problem(401);
        sibling
            .client
            .get(&w.payment_path(&w.payment))
            .bearer(token)
            .send()
            .await
            .assert_problem(401);
    }
    w.derive(&root, "r", None).await.assert_problem(401);
    assert_eq!(w.read_with(&other, &w.payment).await.status, 200);
    let list = w
        .server
        .client
        .get(&format!("/accounts/{}/capabilities", w.account))
        .basic(&w.alice)
        .send()
        .await;
    assert_eq!(list.json()["items"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capability_is_never_worth_more_than_its_minter_holds_now() {
    let w = world().await;
    let sibling = w.server.sibling().await;
    let members = format!("/accounts/{}/members", w.account);
    let set_bob = |perms: &'static str| {
        let (client, alice, members) = (w.server.client.clone(), w.alice.clone(), members.clone());
        async move {
            let response = client
                .post(&members)
                .basic(&alice)
                .json(&json!({"username": "bob", "perms": perms}))
                .send()
                .await;
            assert!(
                response.status == 201 || response.status == 200,
                "{}",
                response.text()
            );
        }
    };
    set_bob("rd").await;
    // Bob mints an 'rd' capability for the payment, and derives one from it.
    let minted = w.mint(&w.bob, "rd", 600).await;
    assert_eq!(minted.status, 201, "{}", minted.text());
    let token = token_of(&minted.json());
    let child = token_of(&w.derive(&token, "rd", None).await.json());
    // Then bob is downgraded to 'r'.
    set_bob("r").await;
    let cancel = |token: String| {
        let (client, path) = (sibling.client.clone(), w.payment_path(&w.payment));
        async move { client.delete(&path).bearer(&token).send().await }
    };
    // Bob himself may not cancel; neither may his capabilities, in any worker.
    w.server
        .client
        .delete(&w.payment_path(&w.payment))
        .basic(&w.bob)
        .send()
        .await
        .assert_problem(403);
    for t in [&token, &child] {
        cancel(t.clone()).await.assert_problem(403);
        // Reading, which he still holds, works.
        assert_eq!(w.read_with(t, &w.payment).await.status, 200);
    }
    // Nor can an 'rd' capability be derived from them any more ('r' still can).
    w.derive(&token, "rd", None).await.assert_problem(403);
    assert_eq!(w.derive(&child, "r", None).await.status, 201);

    // Bob removed from the account: every capability of his stops.
    let removed = w
        .server
        .client
        .delete(&format!("{members}/bob"))
        .basic(&w.alice)
        .send()
        .await;
    assert_eq!(removed.status, 204, "{}", removed.text());
    for t in [&token, &child] {
        let refused = sibling
            .client
            .get(&w.payment_path(&w.payment))
            .bearer(t)
            .send()
            .await;
        refused.assert_problem(401);
    }
    w.derive(&child, "r", None).await.assert_problem(401);
    // The payment was never cancelled.
    let payment = w
        .server
        .client
        .get(&w.payment_path(&w.payment))
        .basic(&w.alice)
        .send()
        .await;
    assert_eq!(payment.json()["status"], "pending");
    sibling.shutdown().await;
}

#[tokio::test]
async fn admins_disable_users_and_auditors_only_read() {
    let w = world().await;
    let add = |name: &str, role| w.server.staff(name, &format!("{name} passphrase 1"), role);
    let root = add("root.admin", paygate::domain::Role::Admin);
    let auditor = add("eve.audit", paygate::domain::Role::Auditor);

    // The auditor lists and reads alice's account and payments, and changes nothing.
    let listed = w
        .server
        .client
        .get("/accounts")
        .basic(&auditor)
        .send()
        .await;
    assert_eq!(listed.json()["items"][0]["id"], w.account.as_str());
    assert_eq!(listed.json()["items"][0]["perms"], "r");
    let bob_lists = w.server.client.get("/accounts").basic(&w.bob).send().await;
    assert_eq!(bob_lists.json()["items"], json!([]));
    for path in [
        format!("/accounts/{}", w.account),
        format!("/accounts/{}/payments", w.account),
        w.payment_path(&w.payment),
    ] {
        let response = w.server.client.get(&path).basic(&auditor).send().await;
        assert_eq!(response.status, 200, "{path}: {}", response.text());
    }
    w.server
        .client
        .delete(&w.payment_path(&w.payment))
        .basic(&auditor)
        .send()
        .await
        .assert_problem(403);
    w.server
        .client
        .post(&format!("/accounts/{}/payments", w.account))
        .basic(&auditor)
        .json(&json!({"payee": "X", "amount_minor": 1, "currency": "EUR"}))
        .send()
        .await
        .assert_problem(403);
    w.mint(&auditor, "r", 60).await.assert_problem(404);

    // Disabling: only an admin may; then alice's token and capability die with her.
    let token = w.server.login(&w.alice).await;
    let capability = token_of(&w.minted("r").await);
    let disable = |creds: &Creds| {
        let client = w.server.client.clone();
        let creds = creds.clone();
        async move {
            client
                .post("/users/alice/disable")
                .basic(&creds)
                .send()
                .await
        }
    };
    disable(&w.bob).await.assert_problem(403);
    disable(&auditor).await.assert_problem(403);
    assert_eq!(disable(&root).await.status, 204);
    w.read_with(&capability, &w.payment)
        .await
        .assert_problem(401);
    w.server
        .client
        .get("/users/me")
        .bearer(&token)
        .send()
        .await
        .assert_problem(401);
    w.server
        .client
        .post("/users/nobody/disable")
        .basic(&root)
        .send()
        .await
        .assert_problem(404);
}

#[tokio::test]
async fn capability_use_is_audited_by_id_and_the_token_is_never_written() {
    let w = world().await;
    let minted = w.minted("r").await;
    let (token, id) = (token_of(&minted), minted["id"].as_str().unwrap().to_owned());
    let link = minted["url"].as_str().unwrap().to_owned();
    let read = w.server.client.get(&link).send().await;
    let request_id = read.header("x-request-id").unwrap().to_owned();
    w.derive(&token, "r", Some(10)).await;
    let audit = w.server.data_dir().join(paygate::audit::AUDIT_DIR);
    let _kept = w.server.stop().await;
    let mut log = String::new();
    for (_, dir) in paygate::audit::instance_dirs(&audit).unwrap() {
        for (_, file) in paygate::audit::writer::log_files(&dir).unwrap() {
            log.push_str(&std::fs::read_to_string(file).unwrap());
        }
    }
    assert!(
        !log.contains(&token[4..]),
        "a capability token reached the audit log"
    );
    let record: Value = log
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|r| r["request_id"] == request_id.as_str() && r["phase"] == "request")
        .unwrap();
    assert_eq!(record["auth"], "capability");
    assert_eq!(record["capability"], id.as_str());
    assert!(record["path"]
        .as_str()
        .unwrap()
        .ends_with("access_token=REDACTED"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_text_operational_log_even_at_debug_level() {
    let log = secrets_through_a_server_logging("text").await;
    assert!(log.contains("paygate stopped"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_json_operational_log_and_every_line_is_an_object() {
    let log = secrets_through_a_server_logging("json").await;
    let mut stopped = None;
    for line in log.lines() {
        let object: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        for key in ["time", "level", "target", "message"] {
            assert!(object[key].is_string(), "no {key} in {line}");
        }
        if object["message"] == "paygate stopped" {
            stopped = Some(object);
        }
    }
    // Once the process is a worker, its lines name it.
    let stopped = stopped.unwrap_or_else(|| panic!("no stop line in {log}"));
    assert_eq!(stopped["level"], "info");
    assert!(stopped["worker"].is_string(), "{stopped}");
}

/// Runs a server at debug level in `format` through logins, tokens, capabilities and a
/// forged token, and checks that none of their secrets is in its operational log, which it
/// returns.
async fn secrets_through_a_server_logging(format: &str) -> String {
    let dir = common::TempDir::new("oplog");
    let args = ["--rate-limit", "none", "--log-format", format];
    let (mut child, addr, log) = common::serve_logging(&dir, &args, "debug");
    let client = common::Client::new(addr, &dir.0.join("certs/server.crt"));
    let alice = client.register("alice").await;
    let account = client.account(&alice, "EUR").await;
    let payment = client
        .post(&format!("/accounts/{account}/payments"))
        .basic(&alice)
        .json(&json!({"payee": "ACME", "amount_minor": 5, "currency": "EUR"}))
        .send()
        .await
        .json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let minted = client
        .post(&format!(
            "/accounts/{account}/payments/{payment}/capabilities"
        ))
        .basic(&alice)
        .json(&json!({"perms": "r", "expires_in": 60}))
        .send()
        .await
        .json();
    let capability = token_of(&minted);
    let link = minted["url"].as_str().unwrap().to_owned();
    assert_eq!(client.get(&link).send().await.status, 200);
    let jwt = client.post("/sessions").basic(&alice).send().await.json()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    client.get("/users/me").bearer(&jwt).send().await;
    client
        .get("/users/me")
        .bearer(&format!("{jwt}x"))
        .send()
        .await;
    common::signal(&child, "TERM");
    child.wait().unwrap();
    let log = log.complete();
    for (kind, secret) in [
        ("password", alice.password.as_str()),
        ("Basic value", alice.header().trim_start_matches("Basic ")),
        ("capability token", &capability[4..]),
        ("JWT", jwt.as_str()),
    ] {
        assert!(!log.contains(secret), "{kind} found in the operational log");
    }
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_capability_derived_while_its_root_is_revoked_survives_the_revocation() {
    // Two real worker processes on one data directory: derivations and the revocation land
    // on either.
    let dir = common::TempDir::new("cap-race");
    let (supervisor, addr, log) =
        common::serve_logging(&dir, &["--workers", "2", "--rate-limit", "none"], "info");
    let mut supervisor = common::StopOnDrop(supervisor);
    common::wait_for_log(&log, "all 2 workers are listening", 1, 20).await;
    let client = common::Client::new(addr, &dir.0.join("certs/server.crt"));
    let alice = client.register("alice").await;
    let account = client.account(&alice, "EUR").await;
    let created = client
        .post(&format!("/accounts/{account}/payments"))
        .basic(&alice)
        .json(&json!({"payee": "ACME-Ltd", "amount_minor": 100, "currency": "EUR"}))
        .send()
        .await;
    let payment = created.json()["id"].as_str().unwrap().to_owned();
    let token = alice_token(&client, &alice).await;
    let minted = client
        .post(&format!(
            "/accounts/{account}/payments/{payment}/capabilities"
        ))
        .bearer(&token)
        .json(&json!({"perms": "rd", "expires_in": 600}))
        .send()
        .await;
    assert_eq!(minted.status, 201, "{}", minted.text());
    let root = token_of(&minted.json());
    let root_id = minted.json()["id"].as_str().unwrap().to_owned();

    // Eight derivers, deriving from the root and from what they derived, until told to
    // stop; the root is revoked after the first dozen children exist.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let derived = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut derivers = Vec::new();
    for _ in 0..8 {
        let (client, root, stop, derived) =
            (client.clone(), root.clone(), stop.clone(), derived.clone());
        derivers.push(tokio::spawn(async move {
            let mut children = Vec::new();
            let mut parent = root;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let response = client
                    .post("/capabilities/derive")
                    .json(&json!({"token": parent, "perms": "rd"}))
                    .send()
                    .await;
                if response.status == 201 {
                    let child = token_of(&response.json());
                    children.push(child.clone());
                    derived.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    // Deeper next time, while the tree allows it.
                    if children.len() % 3 == 0 {
                        parent = child;
                    }
                }
            }
            children
        }));
    }
    while derived.load(std::sync::atomic::Ordering::SeqCst) < 12 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let revoked = client
        .delete(&format!("/capabilities/{root_id}"))
        .bearer(&token)
        .send()
        .await;
    assert_eq!(revoked.status, 204, "{}", revoked.text());
    // Derivations already under way land after the revocation answered.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut children = Vec::new();
    for deriver in derivers {
        children.extend(deriver.await.unwrap());
    }
    assert!(children.len() >= 12);
    // Every child, whenever derived, is dead on every worker: reads, cancels, derivations.
    for child in &children {
        let path = format!("/accounts/{account}/payments/{payment}");
        client
            .get(&path)
            .bearer(child)
            .send()
            .await
            .assert_problem(401);
        client
            .delete(&path)
            .bearer(child)
            .send()
            .await
            .assert_problem(401);
        let again = client
            .post("/capabilities/derive")
            .json(&json!({"token": child, "perms": "r"}))
            .send()
            .await;
        again.assert_problem(401);
    }
    // None is listed as live, and the payment was never cancelled.
    let list = client
        .get(&format!("/accounts/{account}/capabilities?limit=100"))
        .bearer(&token)
        .send()
        .await;
    assert_eq!(list.json()["items"], json!([]), "{}", list.text());
    let read = client
        .get(&format!("/accounts/{account}/payments/{payment}"))
        .bearer(&token)
        .send()
        .await;
    assert_eq!(read.json()["status"], "pending");
    common::signal(&supervisor.0, "TERM");
    assert!(common::wait_exit(&mut supervisor.0).success());
}

async fn alice_token(client: &common::Client, alice: &Creds) -> String {
    client.login(alice).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn derivation_is_bounded_and_the_list_pages_through_every_live_capability() {
    let w = world().await;
    let root = token_of(&w.minted("r").await);
    // Depth: a chain of eight derivations below the minted one, and no ninth.
    let mut parent = root.clone();
    for _ in 0..8 {
        let child = w.derive(&parent, "r", None).await;
        assert_eq!(child.status, 201, "{}", child.text());
        parent = token_of(&child.json());
    }
    let problem = w.derive(&parent, "r", None).await.assert_problem(403);
    assert!(
        problem["detail"].as_str().unwrap().contains("8 levels"),
        "{problem}"
    );
    // Count: 100 unexpired capabilities per minted one (9 so far), then no more.
    for _ in 9..100 {
        assert_eq!(w.derive(&root, "r", None).await.status, 201);
    }
    let problem = w.derive(&root, "r", None).await.assert_problem(403);
    assert!(
        problem["detail"].as_str().unwrap().contains("100"),
        "{problem}"
    );
    // Another minted capability has a budget of its own.
    let other = w.minted("r").await;
    assert_eq!(w.derive(&token_of(&other), "r", None).await.status, 201);

    // 102 live capabilities: the list pages through all of them, newest first, without
    // repeating or skipping one.
    let mut seen = std::collections::HashSet::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            None => format!("/accounts/{}/capabilities?limit=30", w.account),
            Some(c) => format!("/accounts/{}/capabilities?limit=30&cursor={c}", w.account),
        };
        let page = w.server.client.get(&path).basic(&w.alice).send().await;
        assert_eq!(page.status, 200, "{}", page.text());
        let body = page.json();
        for item in body["items"].as_array().unwrap() {
            assert!(
                seen.insert(item["id"].as_str().unwrap().to_owned()),
                "repeated"
            );
        }
        pages += 1;
        match body["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 102);
    assert_eq!(pages, 4);
}
