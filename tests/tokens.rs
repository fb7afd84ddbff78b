//! Token authentication against a real server: login and logout with both token kinds,
//! every way a crafted JWT must be refused, key rotation and pruning, interoperability
//! with a standard JWT library, and disabled users.

mod common;

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use common::{paygate_command, TempDir, TestResponse, TestServer};
use ring::hmac;
use serde_json::{json, Value};

use paygate::tokens::keys::{self, KeySet, KEYS_FILE};

fn now_s() -> i64 {
    paygate::time::now_millis() / 1000
}

fn key_set(server: &TestServer) -> KeySet {
    keys::load(&server.data_dir().join(KEYS_FILE)).unwrap()
}

/// Signs arbitrary header and claims JSON with the server's current key.
fn forge(server: &TestServer, header: &str, claims: &str) -> String {
    let keys = key_set(server);
    forge_with(&keys.current().key, header, claims)
}

fn forge_with(key: &hmac::Key, header: &str, claims: &str) -> String {
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let tag = hmac::sign(key, input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
}

fn claims_for(user: &str) -> Value {
    let now = now_s();
    json!({
        "iss": "paygate", "aud": "paygate-api", "sub": user,
        "iat": now, "nbf": now, "exp": now + 600,
        "jti": uuid::Uuid::new_v4().to_string(), "amr": ["pwd"],
    })
}

fn header_for(server: &TestServer) -> String {
    let kid = key_set(server).current().kid.clone();
    json!({"alg": "HS256", "typ": "JWT", "kid": kid}).to_string()
}

async fn me(server: &TestServer, token: &str) -> TestResponse {
    server.client.get("/users/me").bearer(token).send().await
}

/// Asserts a 401 that tells the client only that its token is not valid.
fn assert_invalid_token(response: &TestResponse, case: &str) {
    assert_eq!(response.status, 401, "{case}: {}", response.text());
    assert_eq!(
        response.header("www-authenticate"),
        Some(r#"Bearer error="invalid_token""#),
        "{case}"
    );
    let body = response.assert_problem(401);
    assert_eq!(
        body["type"], "tag:paygate.dev,2026:problem:invalid-token",
        "{case}"
    );
    // The reason is for the audit log, not for the client.
    let detail = body["detail"].as_str().unwrap();
    for leak in ["signature", "expired", "kid", "alg", "iss", "aud", "crit"] {
        assert!(!detail.contains(leak), "{case}: detail says {detail:?}");
    }
}

#[tokio::test]
async fn jwt_login_use_and_logout() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let response = server.client.post("/sessions").basic(&alice).send().await;
    assert_eq!(response.status, 201, "{}", response.text());
    let body = response.json();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["amr"], json!(["pwd"]));
    let token = body["token"].as_str().unwrap().to_owned();
    assert_eq!(token.split('.').count(), 3, "a JWT by default");
    assert!(body["expires_at"].as_str().unwrap().ends_with('Z'));

    // The claims are what the design promises.
    let payload = URL_SAFE_NO_PAD
        .decode(token.split('.').nth(1).unwrap())
        .unwrap();
    let claims: Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(claims["iss"], "paygate");
    assert_eq!(claims["aud"], "paygate-api");
    assert_eq!(claims["sub"], "alice");
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        3600
    );
    assert!(claims["jti"].is_string() && claims["nbf"].is_i64());

    let response = me(&server, &token).await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.json()["username"], "alice");

    // Every login is a new token; ending one leaves the other.
    let second = server.login(&alice).await;
    assert_ne!(second, token);
    let response = server
        .client
        .delete("/sessions")
        .bearer(&token)
        .send()
        .await;
    assert_eq!(response.status, 204, "{}", response.text());
    assert_invalid_token(&me(&server, &token).await, "after logout");
    let again = server
        .client
        .delete("/sessions")
        .bearer(&token)
        .send()
        .await;
    assert_invalid_token(&again, "second logout");
    assert_eq!(me(&server, &second).await.status, 200);

    // Logout needs a token; login needs a password, not a token.
    let response = server.client.delete("/sessions").basic(&alice).send().await;
    response.assert_problem(401);
    assert_eq!(
        response.header("www-authenticate"),
        Some(r#"Bearer realm="paygate""#)
    );
    let response = server.client.post("/sessions").bearer(&second).send().await;
    response.assert_problem(401);
    let response = server.client.post("/sessions").send().await;
    response.assert_problem(401);
}

#[tokio::test]
async fn opaque_tokens_are_stored_only_as_hashes() {
    // What SQLite's file holds (tests/store_conformance.rs covers both backends' rows).
    let server = TestServer::start_on_sqlite_with(&[("token-format", "opaque")]).await;
    let alice = server.register("alice").await;
    let token = server.login(&alice).await;
    assert_eq!(token.len(), 43);
    assert!(!token.contains('.'));
    assert_eq!(me(&server, &token).await.status, 200);

    let db = rusqlite::Connection::open(server.data_dir().join("paygate.db")).unwrap();
    let raw = URL_SAFE_NO_PAD.decode(&token).unwrap();
    let hash = ring::digest::digest(&ring::digest::SHA256, &raw);
    let (count, amr): (i64, String) = db
        .query_row(
            "SELECT count(*), max(amr) FROM sessions WHERE token_hash = ?1",
            [hash.as_ref()],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((count, amr.as_str()), (1, "pwd"));
    let dump: String = db
        .query_row(
            "SELECT group_concat(hex(token_hash) || amr || expires_at) FROM sessions",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(!dump.contains(&token));

    // JWTs are accepted too, whatever login issues.
    let jwt = forge(
        &server,
        &header_for(&server),
        &claims_for("alice").to_string(),
    );
    assert_eq!(me(&server, &jwt).await.status, 200);

    let response = server
        .client
        .delete("/sessions")
        .bearer(&token)
        .send()
        .await;
    assert_eq!(response.status, 204);
    assert_invalid_token(&me(&server, &token).await, "logged out opaque token");
    let count: i64 = db
        .query_row("SELECT count(*) FROM sessions", [], |r| r.get(0))
        .unwrap();
    assert_eq!(count, 0, "logout deletes the row");

    // Garbage of the right length, and of the wrong one.
    let random = URL_SAFE_NO_PAD.encode([7u8; 32]);
    assert_invalid_token(&me(&server, &random).await, "unknown opaque token");
    assert_invalid_token(&me(&server, "short").await, "malformed bearer value");
}

#[tokio::test]
async fn logout_takes_effect_at_once_in_every_worker() {
    for format in ["jwt", "opaque"] {
        let a = TestServer::start_with(&[("token-format", format)]).await;
        let b = a.sibling().await;
        let alice = a.register("alice").await;
        let token = a.login(&alice).await;
        // Both workers have seen (and cached) the token.
        assert_eq!(me(&a, &token).await.status, 200);
        assert_eq!(me(&b, &token).await.status, 200, "{format}");
        let response = a.client.delete("/sessions").bearer(&token).send().await;
        assert_eq!(response.status, 204);
        assert_invalid_token(&me(&b, &token).await, format);
        assert_invalid_token(&me(&a, &token).await, format);
    }
}

#[tokio::test]
async fn crafted_tokens_are_refused() {
    // Signs with the key file of the data directory (SQLite's key store).
    let server = TestServer::start_on_sqlite().await;
    let alice = server.register("alice").await;
    let good = server.login(&alice).await;
    assert_eq!(me(&server, &good).await.status, 200);
    let keys = key_set(&server);
    let kid = keys.current().kid.clone();
    let header = header_for(&server);
    let claims = claims_for("alice");
    let with = |change: &dyn Fn(&mut Value)| {
        let mut c = claims.clone();
        change(&mut c);
        c.to_string()
    };
    let (input, _) = good.rsplit_once('.').unwrap();
    let b64 = |s: &str| URL_SAFE_NO_PAD.encode(s);
    let wrong_key = hmac::Key::new(hmac::HMAC_SHA256, b"a key that is not the server's...");
    let hs512 = {
        let key = hmac::Key::new(
            hmac::HMAC_SHA512,
            &URL_SAFE_NO_PAD
                .decode(keys.jwks()["keys"][0]["k"].as_str().unwrap())
                .unwrap(),
        );
        let h = json!({"alg": "HS512", "typ": "JWT", "kid": kid}).to_string();
        forge_with(&key, &h, &claims.to_string())
    };
    let tampered = {
        let genuine = forge(&server, &header, &claims.to_string());
        let parts: Vec<&str> = genuine.split('.').collect();
        let admin = b64(&with(&|c| c["sub"] = json!("admin")));
        format!("{}.{admin}.{}", parts[0], parts[2])
    };
    let padded = {
        let token = forge(&server, &header, &claims.to_string());
        let (h, rest) = token.split_once('.').unwrap();
        let pad = "=".repeat((4 - h.len() % 4) % 4).max("=".to_owned());
        format!("{h}{pad}.{rest}")
    };
    let cases: Vec<(&str, String)> = vec![
        (
            "alg none, no signature",
            format!(
                "{}.{}.",
                b64(&json!({"alg": "none", "typ": "JWT", "kid": kid}).to_string()),
                b64(&claims.to_string())
            ),
        ),
        (
            "alg None, signed",
            forge(
                &server,
                &json!({"alg": "None", "typ": "JWT", "kid": kid}).to_string(),
                &claims.to_string(),
            ),
        ),
        ("stripped signature", format!("{input}.")),
        ("two segments", input.to_owned()),
        (
            "wrong key",
            forge_with(&wrong_key, &header, &claims.to_string()),
        ),
        ("tampered claim", tampered),
        (
            "expired",
            forge(
                &server,
                &header,
                &with(&|c| {
                    let past = now_s() - 3600;
                    c["iat"] = json!(past);
                    c["nbf"] = json!(past);
                    c["exp"] = json!(past + 600);
                }),
            ),
        ),
        (
            "not yet valid",
            forge(
                &server,
                &header,
                &with(&|c| {
                    let later = now_s() + 600;
                    c["nbf"] = json!(later);
                    c["exp"] = json!(later + 600);
                }),
            ),
        ),
        (
            "issued in the future",
            forge(
                &server,
                &header,
                &with(&|c| {
                    let later = now_s() + 600;
                    c["iat"] = json!(later);
                    c["exp"] = json!(later + 600);
                }),
            ),
        ),
        (
            "lifetime beyond the maximum",
            forge(
                &server,
                &header,
                &with(&|c| c["exp"] = json!(now_s() + 3601)),
            ),
        ),
        (
            "wrong iss",
            forge(&server, &header, &with(&|c| c["iss"] = json!("mallory"))),
        ),
        (
            "wrong aud",
            forge(
                &server,
                &header,
                &with(&|c| c["aud"] = json!("another-api")),
            ),
        ),
        (
            "unknown kid",
            forge(
                &server,
                &json!({"alg": "HS256", "typ": "JWT", "kid": "no-such-key"}).to_string(),
                &claims.to_string(),
            ),
        ),
        ("other algorithm (HS512)", hs512),
        (
            "crit header",
            forge(
                &server,
                &json!({"alg": "HS256", "typ": "JWT", "kid": kid, "crit": ["exp"]}).to_string(),
                &claims.to_string(),
            ),
        ),
        ("padded base64", padded),
        (
            "duplicate claim",
            forge(
                &server,
                &header,
                &claims.to_string().replacen('{', r#"{"sub":"admin","#, 1),
            ),
        ),
        (
            "duplicate header member",
            forge(
                &server,
                &format!(r#"{{"alg":"none","alg":"HS256","typ":"JWT","kid":"{kid}"}}"#),
                &claims.to_string(),
            ),
        ),
        (
            "oversized",
            forge(
                &server,
                &header,
                &with(&|c| c["pad"] = json!("x".repeat(9000))),
            ),
        ),
        (
            "unknown user",
            forge(&server, &header, &with(&|c| c["sub"] = json!("nobody"))),
        ),
    ];
    for (case, token) in cases {
        assert_invalid_token(&me(&server, &token).await, case);
    }
    // The same requests on a public route are served: authentication never rejects.
    let response = server
        .client
        .get("/apiStatus")
        .bearer("not.a.token")
        .send()
        .await;
    assert_eq!(response.status, 200);
    // And a correct token made the same way is accepted, so the refusals above are the
    // crafted defects, not the crafting.
    let correct = forge(&server, &header, &claims.to_string());
    assert_eq!(me(&server, &correct).await.status, 200);
}

fn run_keys(server: &TestServer, args: &[&str]) -> String {
    let dir = TempDir::new("keys-cli");
    let output = paygate_command(&dir)
        .arg("keys")
        .args(args)
        .args(server.store_args())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn kid_of(token: &str) -> String {
    let header = URL_SAFE_NO_PAD
        .decode(token.split('.').next().unwrap())
        .unwrap();
    serde_json::from_slice::<Value>(&header).unwrap()["kid"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn rotation_keeps_old_tokens_until_their_key_is_pruned() {
    // The key file of the data directory; on PostgreSQL, tests/cluster.rs rotates.
    let server = TestServer::start_on_sqlite().await;
    let alice = server.register("alice").await;
    let old = server.login(&alice).await;
    let old_kid = kid_of(&old);

    let out = run_keys(&server, &["rotate"]);
    assert!(out.contains("new current signing key"), "{out}");
    let new_kid = key_set(&server).current().kid.clone();
    assert_ne!(new_kid, old_kid);

    // The running server switches to the new key without a restart: its key watcher
    // re-reads the file within a second; here the reload SIGHUP triggers does it now.
    server.running().reload().await.unwrap();
    let fresh = server.login(&alice).await;
    assert_eq!(kid_of(&fresh), new_kid);
    assert_eq!(
        me(&server, &old).await.status,
        200,
        "old key still verifies"
    );
    assert_eq!(me(&server, &fresh).await.status, 200);

    // Not prunable yet: its tokens may still be alive.
    let out = run_keys(&server, &["prune"]);
    assert!(out.contains("no key to prune"), "{out}");
    // Pretend the rotation happened long ago.
    let path = server.data_dir().join(KEYS_FILE);
    let mut file: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    file["keys"][0]["retired_at"] = json!(now_s() - 3600 - 300);
    std::fs::write(&path, serde_json::to_vec(&file).unwrap()).unwrap();
    let out = run_keys(&server, &["prune"]);
    assert!(out.contains(&old_kid), "{out}");
    assert!(key_set(&server).find(&old_kid).is_none());

    server.running().reload().await.unwrap();
    assert_invalid_token(&me(&server, &old).await, "token of a pruned key");
    assert_eq!(me(&server, &fresh).await.status, 200);
}

#[tokio::test]
async fn tokens_interoperate_with_a_standard_jwt_library() {
    use jsonwebtoken::jwk::JwkSet;
    use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};

    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let token = server.login(&alice).await;
    let jwks: JwkSet = serde_json::from_str(&run_keys(&server, &["export"])).unwrap();
    let kid = kid_of(&token);
    let jwk = jwks
        .find(&kid)
        .expect("the exported set has the signing key");

    // paygate → library.
    let mut validation = Validation::new(Algorithm::HS256);
    validation.set_issuer(&["paygate"]);
    validation.set_audience(&["paygate-api"]);
    let decoded =
        jsonwebtoken::decode::<Value>(&token, &DecodingKey::from_jwk(jwk).unwrap(), &validation)
            .unwrap();
    assert_eq!(decoded.claims["sub"], "alice");
    assert_eq!(decoded.header.kid.as_deref(), Some(kid.as_str()));

    // library → paygate.
    let secret = match &jwk.algorithm {
        jsonwebtoken::jwk::AlgorithmParameters::OctetKey(oct) => {
            URL_SAFE_NO_PAD.decode(&oct.value).unwrap()
        }
        other => panic!("expected an oct key, got {other:?}"),
    };
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(kid);
    let made = jsonwebtoken::encode(
        &header,
        &claims_for("alice"),
        &EncodingKey::from_secret(&secret),
    )
    .unwrap();
    let response = me(&server, &made).await;
    assert_eq!(response.status, 200, "{}", response.text());
}

#[tokio::test]
async fn disabling_a_user_ends_every_kind_of_credential_at_once() {
    let jwt_server = TestServer::start().await;
    let opaque_server = jwt_server.sibling_with(&[("token-format", "opaque")]).await;
    let alice = jwt_server.register("alice").await;
    let jwt = jwt_server.login(&alice).await;
    let opaque = opaque_server.login(&alice).await;
    assert_eq!(me(&jwt_server, &jwt).await.status, 200);
    assert_eq!(me(&opaque_server, &opaque).await.status, 200);

    let dir = TempDir::new("disable-cli");
    let status = paygate_command(&dir)
        .args(["user", "disable", "alice"])
        .args(jwt_server.store_args())
        .status()
        .unwrap();
    assert!(status.success());

    assert_invalid_token(&me(&jwt_server, &jwt).await, "disabled user's JWT");
    assert_invalid_token(
        &me(&opaque_server, &opaque).await,
        "disabled user's session",
    );
    assert_invalid_token(&me(&jwt_server, &opaque).await, "session in another worker");
    let response = jwt_server
        .client
        .post("/sessions")
        .basic(&alice)
        .send()
        .await;
    response.assert_problem(401);
}

#[tokio::test]
async fn key_user_rate_limits_count_a_tokens_subject() {
    let server =
        TestServer::start_with(&[("rate-limit", "GET /users 1/hour burst=2 key=user")]).await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let (a, b) = (server.login(&alice).await, server.login(&bob).await);
    assert_eq!(me(&server, &a).await.status, 200);
    assert_eq!(me(&server, &a).await.status, 200);
    me(&server, &a).await.assert_problem(429);
    // Same address, other user: their own bucket.
    assert_eq!(me(&server, &b).await.status, 200);
}

/// Sessions and JWTs end when their time is up, by the server's clock: the test moves it
/// to one second before and one second after the token's lifetime.
#[tokio::test]
async fn tokens_expire_when_their_lifetime_has_passed() {
    for format in ["jwt", "opaque"] {
        let server =
            TestServer::start_with(&[("token-format", format), ("token-ttl", "600")]).await;
        let alice = server.register("alice").await;
        let token = server.login(&alice).await;
        assert_eq!(me(&server, &token).await.status, 200, "{format}");
        server.clock().advance(Duration::from_secs(598));
        assert_eq!(
            me(&server, &token).await.status,
            200,
            "{format}: still valid"
        );
        server.clock().advance(Duration::from_secs(3));
        assert_invalid_token(&me(&server, &token).await, format);
        // A new login starts a new lifetime.
        let fresh = server.login(&alice).await;
        assert_eq!(me(&server, &fresh).await.status, 200, "{format}");
    }
}
