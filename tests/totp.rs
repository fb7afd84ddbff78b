//! TOTP second factor against a real server: enrolment and confirmation, codes required at
//! login, each code accepted once, wrong codes spending the guess budget, step-up for large
//! payments.

mod common;

use std::time::Duration;

use common::{base32_decode, Creds, TestServer};
use serde_json::json;

use paygate::tokens::totp::{hotp, step_at, STEP_S};

/// The code for the step `offset` steps from the server's now.
fn code(server: &TestServer, secret: &[u8], offset: i64) -> String {
    let step = u64::try_from(step_at(server.clock().now_s()) + offset).unwrap();
    format!("{:06}", hotp(secret, step, 6))
}

/// Moves the server's clock to the start of the next step when fewer than `needed` seconds
/// remain in the current one, so a test's codes are not split across a step boundary.
fn fresh_step(server: &TestServer, needed: i64) {
    let left = STEP_S - server.clock().now_s().rem_euclid(STEP_S);
    if left < needed {
        server
            .clock()
            .advance(Duration::from_secs(u64::try_from(left).unwrap()));
    }
}

async fn login_with_code(server: &TestServer, creds: &Creds, code: &str) -> common::TestResponse {
    server
        .client
        .post("/sessions")
        .basic(creds)
        .header("x-totp", code)
        .send()
        .await
}

/// Registers `name`, enrols and confirms TOTP (with the previous step's code, so the
/// current and next steps stay usable), and returns the secret.
async fn enrolled(server: &TestServer, name: &str) -> (Creds, Vec<u8>) {
    let creds = server.register(name).await;
    let token = server.login(&creds).await;
    let response = server
        .client
        .post("/users/me/totp")
        .bearer(&token)
        .send()
        .await;
    assert_eq!(response.status, 200, "{}", response.text());
    let body = response.json();
    let secret_text = body["secret"].as_str().unwrap();
    assert_eq!(secret_text.len(), 32, "160 bits in base32");
    assert_eq!(
        body["otpauth_uri"],
        format!("otpauth://totp/paygate:{name}?secret={secret_text}&issuer=paygate")
    );
    let secret = base32_decode(secret_text);
    assert_eq!(secret.len(), 20);
    let response = server
        .client
        .post("/users/me/totp/confirm")
        .bearer(&token)
        .json(&json!({"code": code(server, &secret, -1)}))
        .send()
        .await;
    assert_eq!(response.status, 204, "{}", response.text());
    (creds, secret)
}

#[tokio::test]
async fn an_enrolled_user_needs_a_fresh_code_to_log_in() {
    let server = TestServer::start().await;
    fresh_step(&server, 10);
    let (alice, secret) = enrolled(&server, "alice").await;

    // Password alone: 401 asking for the code, for login and for plain Basic calls.
    let response = server.client.post("/sessions").basic(&alice).send().await;
    let body = response.assert_problem(401);
    assert_eq!(
        body["type"],
        "tag:paygate.dev,2026:problem:second-factor-required"
    );
    assert!(body["detail"].as_str().unwrap().contains("X-TOTP"));
    let response = server.client.get("/accounts").basic(&alice).send().await;
    response.assert_problem(401);

    // A wrong code, then the right one.
    let wrong = if code(&server, &secret, 0) == "000000" {
        "000001"
    } else {
        "000000"
    };
    login_with_code(&server, &alice, wrong)
        .await
        .assert_problem(401);
    let current = code(&server, &secret, 0);
    let response = login_with_code(&server, &alice, &current).await;
    assert_eq!(response.status, 201, "{}", response.text());
    assert_eq!(response.json()["amr"], json!(["pwd", "otp"]));
    let token = response.json()["token"].as_str().unwrap().to_owned();
    let me = server.client.get("/users/me").bearer(&token).send().await;
    assert_eq!(me.status, 200);

    // The same code again: replayed, refused — in another worker too.
    login_with_code(&server, &alice, &current)
        .await
        .assert_problem(401);
    let sibling = server.sibling().await;
    login_with_code(&sibling, &alice, &current)
        .await
        .assert_problem(401);
    // The next step's code works once; after it, the older current code is refused too.
    let next = code(&server, &secret, 1);
    assert_eq!(login_with_code(&sibling, &alice, &next).await.status, 201);
    login_with_code(&server, &alice, &next)
        .await
        .assert_problem(401);
}

#[tokio::test]
async fn enrolment_rules() {
    let server = TestServer::start().await;
    fresh_step(&server, 10);
    let bob = server.register("bob").await;
    let token = server.login(&bob).await;

    // Confirming before enrolling, and with wrong codes.
    let confirm = |code: String| {
        server
            .client
            .post("/users/me/totp/confirm")
            .bearer(&token)
            .json(&json!({ "code": code }))
            .send()
    };
    confirm("123456".into()).await.assert_problem(409);
    let response = server
        .client
        .post("/users/me/totp")
        .bearer(&token)
        .send()
        .await;
    let secret = base32_decode(response.json()["secret"].as_str().unwrap());
    let body = confirm("12345".into()).await.assert_problem(422);
    assert_eq!(body["field"], "code");
    // Not enrolled until confirmed: the password alone still logs in.
    assert_eq!(
        server
            .client
            .post("/sessions")
            .basic(&bob)
            .send()
            .await
            .status,
        201
    );
    assert_eq!(confirm(code(&server, &secret, 0)).await.status, 204);
    confirm(code(&server, &secret, 0)).await.assert_problem(409);

    // Replacing an active secret needs a token that proved a code.
    let pwd_only = server
        .client
        .post("/users/me/totp")
        .bearer(&token)
        .send()
        .await;
    let body = pwd_only.assert_problem(403);
    assert_eq!(
        body["type"],
        "tag:paygate.dev,2026:problem:second-factor-required"
    );
    let with_otp = login_with_code(&server, &bob, &code(&server, &secret, 1)).await;
    let otp_token = with_otp.json()["token"].as_str().unwrap().to_owned();
    let response = server
        .client
        .post("/users/me/totp")
        .bearer(&otp_token)
        .send()
        .await;
    assert_eq!(response.status, 200);
    // Anonymous callers get a 401, never an enrolment.
    server
        .client
        .post("/users/me/totp")
        .send()
        .await
        .assert_problem(401);
}

#[tokio::test]
async fn wrong_codes_spend_the_guess_budget() {
    let server = TestServer::start_with(&[("guess-limit", "3/hour burst=3")]).await;
    fresh_step(&server, 10);
    let (carol, secret) = enrolled(&server, "carol").await;
    let right = code(&server, &secret, 0);
    let wrong = if right == "111111" {
        "222222"
    } else {
        "111111"
    };
    for _ in 0..3 {
        login_with_code(&server, &carol, wrong)
            .await
            .assert_problem(401);
    }
    // The budget is spent: even the right password and code wait.
    let response = login_with_code(&server, &carol, &right).await;
    response.assert_problem(429);
    assert!(response.header("retry-after").is_some());
}

#[tokio::test]
async fn large_payments_need_a_second_factor() {
    let server = TestServer::start_with(&[("step-up-amount", "100000")]).await;
    fresh_step(&server, 10);
    let (dave, secret) = enrolled(&server, "dave").await;
    let response = login_with_code(&server, &dave, &code(&server, &secret, 0)).await;
    let otp_token = response.json()["token"].as_str().unwrap().to_owned();
    let response = server
        .client
        .post("/accounts")
        .bearer(&otp_token)
        .json(&json!({"name": "Operating", "currency": "EUR"}))
        .send()
        .await;
    assert_eq!(response.status, 201, "{}", response.text());
    let account = response.json()["id"].as_str().unwrap().to_owned();

    // erin has no TOTP: her tokens (opaque ones here) only say "pwd".
    let erin = server.register("erin").await;
    let grant = server
        .client
        .post(&format!("/accounts/{account}/members"))
        .bearer(&otp_token)
        .json(&json!({"username": "erin", "perms": "rw"}))
        .send()
        .await;
    assert_eq!(grant.status, 201, "{}", grant.text());
    let opaque_worker = server.sibling_with(&[("token-format", "opaque")]).await;
    let pwd_only = opaque_worker.login(&erin).await;

    let pay = |token: String, amount: i64| {
        let path = format!("/accounts/{account}/payments");
        let client = server.client.clone();
        async move {
            client
                .post(&path)
                .bearer(&token)
                .json(&json!({"payee": "ACME-Ltd", "amount_minor": amount, "currency": "EUR"}))
                .send()
                .await
        }
    };
    assert_eq!(
        pay(pwd_only.clone(), 100_000).await.status,
        201,
        "at the limit"
    );
    let body = pay(pwd_only, 100_001).await.assert_problem(403);
    assert_eq!(
        body["type"],
        "tag:paygate.dev,2026:problem:second-factor-required"
    );
    assert_eq!(
        body["detail"],
        "payments above 100000 (minor units) need a second factor: log in with a TOTP code \
         (X-TOTP) and use that token"
    );
    let response = pay(otp_token, 100_001).await;
    assert_eq!(response.status, 201, "{}", response.text());
    assert_eq!(response.json()["amount_minor"], 100_001);
}

/// The stored TOTP secret of `user`, as the database holds it.
fn stored_secret(data: &std::path::Path, user: &str) -> Vec<u8> {
    let db = rusqlite::Connection::open(data.join("paygate.db")).unwrap();
    db.query_row(
        "SELECT totp_secret FROM users WHERE username = ?1",
        [user],
        |r| r.get(0),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_sealed_at_rest_rotated_and_sealed_when_found_plain() {
    // SQLite's file and `keys rotate-totp`, which is for a single machine.
    let server = TestServer::start_on_sqlite().await;
    fresh_step(&server, 20);
    let data = server.data_dir();
    let (alice, secret) = enrolled(&server, "alice").await;
    // A copy of the database alone holds no secret: sealed, bound to the user.
    let sealed = stored_secret(&data, "alice");
    assert_ne!(sealed.len(), 20);
    assert!(!sealed.windows(secret.len()).any(|w| w == secret.as_slice()));

    // Rotation: a new key, every secret re-sealed; logins go on.
    let server = server
        .restart_with(|| {
            let out = common::paygate_command(&common::TempDir::new("rotate"))
                .args(["keys", "rotate-totp", "--data-dir"])
                .arg(&data)
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            let said = String::from_utf8_lossy(&out.stdout);
            assert!(said.contains("1 user(s) re-sealed"), "{said}");
        })
        .await;
    let resealed = stored_secret(&data, "alice");
    assert_ne!(resealed, sealed);
    let keys = std::fs::read_to_string(data.join("totp.key")).unwrap();
    assert_eq!(keys.lines().count(), 2, "the new key and the one before it");
    let response = login_with_code(&server, &alice, &code(&server, &secret, 0)).await;
    assert_eq!(response.status, 201, "{}", response.text());

    // A secret stored plain (by a paygate from before sealing) is sealed at the next start.
    let (bob, bob_secret) = enrolled(&server, "bob").await;
    let server = server
        .restart_with(|| {
            let db = rusqlite::Connection::open(data.join("paygate.db")).unwrap();
            db.execute(
                "UPDATE users SET totp_secret = ?1 WHERE username = 'bob'",
                [&bob_secret],
            )
            .unwrap();
        })
        .await;
    let now_sealed = stored_secret(&data, "bob");
    assert_ne!(now_sealed.len(), 20);
    let response = login_with_code(&server, &bob, &code(&server, &bob_secret, 0)).await;
    assert_eq!(response.status, 201, "{}", response.text());

    // With another data directory's key, nothing starts: the secrets would not open.
    let _kept = server.stop().await;
    let elsewhere = common::TempDir::new("other-key");
    paygate::secret_file::create_private_dir(&elsewhere.0).unwrap();
    paygate::store::sealing::TotpKeys::load_or_create(&elsewhere.0).unwrap();
    std::fs::copy(elsewhere.0.join("totp.key"), data.join("totp.key")).unwrap();
    let out = common::paygate_command(&elsewhere)
        .args(["user", "disable", "nobody", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("does not open the TOTP secrets"), "{said}");
}
