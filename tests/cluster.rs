//! Several real `paygate serve` processes, each with its own data directory and port, on
//! one PostgreSQL database: what one node does, the others honour at once.
//!
//! Needs `PAYGATE_TEST_DATABASE` (see `tests/postgres.rs`; `bash scripts/pg.sh run cargo
//! test` provides it). Each test works in a database of its own.

mod common;

use common::{serve, signal, wait_exit, Client, Creds, TempDir};
use serde_json::json;
use tokio_postgres::NoTls;

/// A new, empty database on the test cluster; its URL.
async fn fresh_database() -> String {
    let base = std::env::var("PAYGATE_TEST_DATABASE").expect(
        "PAYGATE_TEST_DATABASE is not set: run the tests as `bash scripts/pg.sh run cargo test`",
    );
    let (client, connection) = tokio_postgres::connect(&base, NoTls).await.unwrap();
    tokio::spawn(connection);
    let name = format!("n_{}", uuid::Uuid::new_v4().simple());
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let (prefix, _) = base.rsplit_once('/').unwrap();
    format!("{prefix}/{name}")
}

/// One node: a process, its directory and a client that trusts its certificate.
struct Node {
    child: std::process::Child,
    client: Client,
    _dir: TempDir,
}

impl Node {
    fn stop(mut self) {
        signal(&self.child, "TERM");
        assert!(wait_exit(&mut self.child).success());
    }
}

/// Starts `count` nodes on `database` with `extra` options. The first creates the sealing
/// key; the others get a copy before they start, as an operator would distribute it.
fn cluster(database: &str, count: usize, extra: &[&str]) -> Vec<Node> {
    let mut nodes: Vec<Node> = Vec::new();
    for n in 0..count {
        let dir = TempDir::new(&format!("node{n}"));
        if let Some(first) = nodes.first() {
            let data = dir.0.join("data");
            std::fs::create_dir_all(&data).unwrap();
            std::fs::set_permissions(&data, std::os::unix::fs::PermissionsExt::from_mode(0o700))
                .unwrap();
            std::fs::copy(first._dir.0.join("data/totp.key"), data.join("totp.key")).unwrap();
        }
        let mut args = vec!["--database", database, "--instance", "n"];
        args.extend_from_slice(extra);
        let (child, addr) = serve(&dir, &args);
        let client = Client::new(addr, &dir.0.join("certs/server.crt"));
        nodes.push(Node {
            child,
            client,
            _dir: dir,
        });
    }
    nodes
}

#[tokio::test]
async fn three_nodes_keep_every_guarantee_together() {
    let database = fresh_database().await;
    let nodes = cluster(
        &database,
        3,
        &["--password-check-limit", "none", "--rate-limit", "none"],
    );
    let (a, b, c) = (&nodes[0].client, &nodes[1].client, &nodes[2].client);

    // Registered on one node, logged in on another, the token honoured on the third.
    let alice = a.register("alice").await;
    let token = b.login(&alice).await;
    let account = c.account(&alice, "EUR").await;
    assert_eq!(
        a.get(&format!("/accounts/{account}"))
            .bearer(&token)
            .send()
            .await
            .status,
        200
    );

    // A grant given on one node works on another; taken away on a third, gone at once.
    let bob: Creds = b.register("bob").await;
    let bob_token = a.login(&bob).await;
    let grant = c
        .post(&format!("/accounts/{account}/members"))
        .bearer(&token)
        .json(&json!({"username": "bob", "perms": "rw"}))
        .send()
        .await;
    assert!(
        grant.status == 200 || grant.status == 201,
        "{}",
        grant.text()
    );
    let path = format!("/accounts/{account}/payments");
    assert_eq!(b.get(&path).bearer(&bob_token).send().await.status, 200);
    let removed = a
        .delete(&format!("/accounts/{account}/members/bob"))
        .bearer(&token)
        .send()
        .await;
    assert_eq!(removed.status, 204, "{}", removed.text());
    assert_eq!(c.get(&path).bearer(&bob_token).send().await.status, 404);

    // One Idempotency-Key sent to two nodes at once: one payment, the same answer twice.
    let pay = |client: &Client| {
        client
            .post(&path)
            .bearer(&token)
            .header("Idempotency-Key", "same-key")
            .json(&json!({"payee": "ACME", "amount_minor": 100, "currency": "EUR"}))
            .send()
    };
    let (first, second) = tokio::join!(pay(a), pay(b));
    assert_eq!(first.status, 201, "{}", first.text());
    assert_eq!(second.status, 201, "{}", second.text());
    assert_eq!(first.text(), second.text());
    let listed = c.get(&path).bearer(&token).send().await.json();
    assert_eq!(listed["items"].as_array().unwrap().len(), 1);

    // A logout on one node: the token is refused by the others' very next request.
    assert_eq!(
        a.delete("/sessions").bearer(&token).send().await.status,
        204
    );
    assert_eq!(b.get(&path).bearer(&token).send().await.status, 401);
    assert_eq!(c.get(&path).bearer(&token).send().await.status, 401);

    for node in nodes {
        node.stop();
    }
}

#[tokio::test]
async fn a_rate_limit_holds_across_all_nodes_together() {
    let database = fresh_database().await;
    let nodes = cluster(
        &database,
        3,
        &[
            "--password-check-limit",
            "none",
            "--rate-limit",
            "GET /apiStatus 6/hour burst=6 key=ip",
        ],
    );
    let mut admitted = 0;
    let mut refused = 0;
    for round in 0..5 {
        for node in &nodes {
            let response = node.client.get("/apiStatus").send().await;
            match response.status.as_u16() {
                200 => admitted += 1,
                429 => {
                    refused += 1;
                    assert!(response.header("retry-after").is_some(), "round {round}");
                }
                other => panic!("{other}: {}", response.text()),
            }
        }
    }
    // Fifteen asked, six in the shared bucket: never more, whichever node asked.
    assert!(admitted <= 6, "{admitted} admitted");
    assert!(admitted >= 1);
    assert_eq!(admitted + refused, 15);
    for node in nodes {
        node.stop();
    }
}
