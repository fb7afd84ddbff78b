//! Several real `paygate serve` processes, each with its own data directory and port, on
//! one PostgreSQL database: what one node does, the others honour at once.
//!
//! Needs `PAYGATE_TEST_DATABASE` (see `tests/postgres.rs`; `bash scripts/pg.sh run cargo
//! test` provides it). Each test works in a database of its own.

mod common;

use common::{base32_decode, fresh_database, serve, signal, wait_exit, Client, Creds, TempDir};
use serde_json::json;

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

impl Drop for Node {
    /// A test that failed half-way leaves no server running (it would hold the test
    /// runner's output open).
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
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
    let database = fresh_database("n").await;
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

/// A user with an account, logged in on node `a`: their bearer token and the account's
/// payments path, read once on node `b` so that `b` holds the token in its cache.
/// Two nodes on a fresh database (unlimited, so that the tests' logins are never refused),
/// and alice with an account whose payments list is at the path returned.
async fn two_nodes_with_alice() -> (String, Vec<Node>, Creds, String) {
    let database = fresh_database("n").await;
    let nodes = cluster(
        &database,
        2,
        &["--password-check-limit", "none", "--rate-limit", "none"],
    );
    let a = &nodes[0].client;
    let alice = a.register("alice").await;
    let path = format!("/accounts/{}/payments", a.account(&alice, "EUR").await);
    (database, nodes, alice, path)
}

async fn logged_in_and_cached(a: &Client, b: &Client, alice: &Creds, path: &str) -> String {
    let token = a.login(alice).await;
    assert_eq!(b.get(path).bearer(&token).send().await.status, 200);
    assert_eq!(b.get(path).bearer(&token).send().await.status, 200);
    token
}

#[tokio::test]
async fn with_change_notifications_cut_a_logout_is_still_refused_everywhere_at_once() {
    let (database, nodes, alice, path) = two_nodes_with_alice().await;
    let (a, b) = (&nodes[0].client, &nodes[1].client);

    // Every node's listening connection cut again and again while the logouts happen:
    // nodes learn of changes only by renewing their leases.
    let (db, connection) = tokio_postgres::connect(&database, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let cut = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let cutting = tokio::spawn({
        let cut = cut.clone();
        async move {
            loop {
                let ended = db
                    .query(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                          WHERE application_name = 'paygate-changes'",
                        &[],
                    )
                    .await
                    .unwrap();
                cut.fetch_add(ended.len() as u64, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    });
    for _ in 0..5 {
        let token = logged_in_and_cached(a, b, &alice, &path).await;
        assert_eq!(
            a.delete("/sessions").bearer(&token).send().await.status,
            204
        );
        assert_eq!(b.get(&path).bearer(&token).send().await.status, 401);
        assert_eq!(a.get(&path).bearer(&token).send().await.status, 401);
    }
    cutting.abort();
    assert!(
        cut.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "no listening connection was cut"
    );
    for node in nodes {
        node.stop();
    }
}

#[tokio::test]
async fn a_node_paused_through_a_logout_refuses_the_token_when_it_resumes() {
    let (database, nodes, alice, path) = two_nodes_with_alice().await;
    let (a, b) = (&nodes[0].client, &nodes[1].client);
    let token = logged_in_and_cached(a, b, &alice, &path).await;

    // Node b cannot apply the logout while stopped: node a answers once b's lease has
    // lapsed, and b, resumed, must not decide from what it held before.
    signal(&nodes[1].child, "STOP");
    let logout = a.delete("/sessions").bearer(&token).send().await;
    signal(&nodes[1].child, "CONT");
    assert_eq!(logout.status, 204);
    assert_eq!(b.get(&path).bearer(&token).send().await.status, 401);

    // A node that stops cleanly gives its lease up (its row is gone), so writers stop
    // waiting for it at once; and logouts keep working.
    let token = logged_in_and_cached(a, b, &alice, &path).await;
    let mut nodes = nodes;
    nodes.pop().unwrap().stop();
    let (db, connection) = tokio_postgres::connect(&database, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let leases: i64 = db
        .query_one("SELECT count(*) FROM cache_leases", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(leases, 1, "the stopped node's lease is still there");
    let a = &nodes[0].client;
    assert_eq!(
        a.delete("/sessions").bearer(&token).send().await.status,
        204
    );
    assert_eq!(a.get(&path).bearer(&token).send().await.status, 401);
    nodes.pop().unwrap().stop();
}

#[tokio::test]
async fn a_rate_limit_holds_across_all_nodes_together() {
    let database = fresh_database("n").await;
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

/// A PostgreSQL cluster of this test's own (it is stopped and started), removed on drop.
struct OwnCluster {
    dir: String,
    url: String,
}

impl OwnCluster {
    fn start() -> OwnCluster {
        OwnCluster::from_script(&["start"])
    }

    /// A synchronous streaming standby of this cluster (`pg.sh standby`).
    fn standby(&self) -> OwnCluster {
        OwnCluster::from_script(&["standby", &self.dir])
    }

    /// The cluster `pg.sh ARGS` started, from the lines it printed.
    fn from_script(args: &[&str]) -> OwnCluster {
        let out = pg_script(args);
        let field = |name: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} in {out}"))
                .to_owned()
        };
        OwnCluster {
            dir: field("PG_DIR="),
            url: field("PAYGATE_TEST_DATABASE="),
        }
    }

    /// `host:port` of its server.
    fn host_port(&self) -> String {
        let (_, rest) = self.url.split_once('@').unwrap();
        rest.split_once('/').unwrap().0.to_owned()
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        pg_script(&["stop", &self.dir]);
    }
}

/// Runs `scripts/pg.sh` with `args`; its standard output.
fn pg_script(args: &[&str]) -> String {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/pg.sh");
    let output = std::process::Command::new("bash")
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "pg.sh {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test]
async fn while_the_database_is_down_a_node_answers_503_and_recovers_with_nothing_lost() {
    let cluster = OwnCluster::start();
    let nodes = self::cluster(&cluster.url, 1, &["--password-check-limit", "none"]);
    let a = &nodes[0].client;
    let status = a.get("/apiStatus").send().await;
    assert_eq!(status.status, 200);
    assert_eq!(status.json()["database"], "reachable");
    let alice = a.register("alice").await;
    let account = a.account(&alice, "EUR").await;
    let token = a.login(&alice).await;

    pg_script(&["down", &cluster.dir]);
    let status = a.get("/apiStatus").send().await;
    assert_eq!(status.status, 503, "{}", status.text());
    assert!(
        status.json()["type"]
            .as_str()
            .unwrap()
            .ends_with("database-unavailable"),
        "{}",
        status.text()
    );
    assert_eq!(status.header("retry-after"), Some("2"));
    // Requests that need the database fail fast with the same answer, never a 500.
    let payments = format!("/accounts/{account}/payments");
    let refused = a
        .post(&payments)
        .bearer(&token)
        .header("Idempotency-Key", "during-outage")
        .json(&json!({"payee": "ACME", "amount_minor": 100, "currency": "EUR"}))
        .send()
        .await;
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert_eq!(a.post("/sessions").basic(&alice).send().await.status, 503);

    pg_script(&["up", &cluster.dir]);
    // Back by itself: the pool reconnects on the next request.
    let mut back = false;
    for _ in 0..100 {
        if a.get("/apiStatus").send().await.status == 200 {
            back = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(back, "the node did not recover");
    // Nothing lost: the user, the account and the token are as they were.
    assert_eq!(a.get(&payments).bearer(&token).send().await.status, 200);
    let retried = a
        .post(&payments)
        .bearer(&token)
        .header("Idempotency-Key", "during-outage")
        .json(&json!({"payee": "ACME", "amount_minor": 100, "currency": "EUR"}))
        .send()
        .await;
    assert_eq!(retried.status, 201, "the refused payment was never made");
    for node in nodes {
        node.stop();
    }
}

/// The `kid` a JWT's header names.
fn kid_of(token: &str) -> String {
    use base64::Engine;
    let header = token.split('.').next().unwrap();
    let header = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .unwrap();
    let header: serde_json::Value = serde_json::from_slice(&header).unwrap();
    header["kid"].as_str().unwrap().to_owned()
}

/// Runs `paygate ARGS` in `dir` (its data directory `./data`) with `stdin`.
fn paygate_in(dir: &TempDir, args: &[&str], stdin: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = common::paygate_command(dir)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[tokio::test]
async fn the_command_line_changes_users_and_keys_for_every_node() {
    let database = fresh_database("n").await;
    let nodes = cluster(
        &database,
        2,
        &["--password-check-limit", "none", "--rate-limit", "none"],
    );
    let (a, b) = (&nodes[0].client, &nodes[1].client);
    // An operator's shell on the first node: its data directory, the shared database.
    let password = database
        .split_once("://")
        .and_then(|(_, rest)| rest.split_once('@'))
        .and_then(|(user, _)| user.split_once(':'))
        .map(|(_, password)| password)
        .expect("a password in the test database URL");
    let on_node = |args: &[&str], stdin: &str| {
        let mut all = args.to_vec();
        all.extend_from_slice(&["--database", &database]);
        let out = paygate_in(&nodes[0]._dir, &all, stdin);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "paygate {args:?}: {stdout}{stderr}");
        assert!(
            !stderr.contains(password),
            "the database password in {stderr}"
        );
        stdout
    };
    let alice = a.register("alice").await;
    let alice_token = a.login(&alice).await;

    // A global admin, created from the command line, acts on every node.
    let created = on_node(
        &["user", "add", "root.admin", "--role", "admin"],
        "admin passphrase 1\n",
    );
    assert!(
        created.contains("created user root.admin with role admin"),
        "{created}"
    );
    assert_eq!(
        b.get("/users/root.admin")
            .bearer(&alice_token)
            .send()
            .await
            .status,
        404
    );
    let admin = b
        .login(&Creds::new("root.admin", "admin passphrase 1"))
        .await;
    assert_eq!(
        b.get("/users/alice").bearer(&admin).send().await.status,
        200
    );

    // `keys rotate` on one machine: every node signs with the new key within a second,
    // and tokens signed by the old one still verify.
    let old_kid = kid_of(&admin);
    let rotated = on_node(&["keys", "rotate"], "");
    assert!(rotated.contains("2 key(s) in the database"), "{rotated}");
    let mut new_kid = None;
    for _ in 0..50 {
        let kid = kid_of(&b.login(&alice).await);
        if kid != old_kid {
            new_kid = Some(kid);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let new_kid = new_kid.expect("node b never switched to the rotated key");
    assert!(rotated.contains(&new_kid), "{rotated}");
    assert_eq!(
        a.get("/users/alice").bearer(&admin).send().await.status,
        200
    );
    let exported: serde_json::Value =
        serde_json::from_str(&on_node(&["keys", "export"], "")).unwrap();
    let kids: Vec<&str> = exported["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert_eq!(
        kids,
        [new_kid.as_str(), old_kid.as_str()],
        "current key first"
    );
    let pruned = on_node(&["keys", "prune"], "");
    assert!(pruned.contains("no key to prune"), "{pruned}");

    // `user disable` from the command line: refused on both nodes at once.
    on_node(&["user", "disable", "alice"], "");
    for node in [a, b] {
        let refused = node.get("/users/me").bearer(&alice_token).send().await;
        assert_eq!(refused.status, 401, "{}", refused.text());
    }

    // A machine without the nodes' sealing key cannot add a key they could not open.
    let elsewhere = TempDir::new("elsewhere");
    let args = ["keys", "rotate", "--database", &database];
    let refused = paygate_in(&elsewhere, &args, "");
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("no sealing key"), "{stderr}");
    // Nor one with a sealing key of its own.
    paygate::store::ensure_data_dir(&elsewhere.0.join("data")).unwrap();
    paygate::store::sealing::TotpKeys::load_or_create(&elsewhere.0.join("data")).unwrap();
    let refused = paygate_in(&elsewhere, &args, "");
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("does not hold"), "{stderr}");
    let exported = on_node(&["keys", "export"], "");
    assert_eq!(exported.matches("\"kid\"").count(), 2, "nothing was added");

    for node in nodes {
        node.stop();
    }
}

/// The TOTP code of `secret` for the step `offset` steps from now.
fn totp_code(secret: &[u8], offset: i64) -> String {
    use paygate::tokens::totp::{hotp, step_at};
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    format!("{:06}", hotp(secret, (step_at(now) + offset) as u64, 6))
}

/// The sealing key ids each enrolled user's secret and each JWT signing key is sealed
/// under, in the database (a sealed value starts with a version byte and the key id).
async fn sealed_under(database: &str) -> Vec<u32> {
    let (db, connection) = tokio_postgres::connect(database, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let rows = db
        .query(
            "SELECT totp_secret FROM users WHERE totp_secret IS NOT NULL
             UNION ALL SELECT sealed FROM jwt_keys",
            &[],
        )
        .await
        .unwrap();
    let mut ids: Vec<u32> = rows
        .iter()
        .map(|r| {
            let blob: Vec<u8> = r.get(0);
            u32::from_be_bytes([blob[1], blob[2], blob[3], blob[4]])
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

#[tokio::test]
async fn the_sealing_key_of_a_cluster_is_replaced_in_two_steps() {
    let database = fresh_database("n").await;
    let nodes = cluster(
        &database,
        2,
        &["--password-check-limit", "none", "--rate-limit", "none"],
    );
    let (a, b) = (&nodes[0].client, &nodes[1].client);
    let key_file = |n: usize| nodes[n]._dir.0.join("data/totp.key");
    let rotate = || {
        let out = paygate_in(
            &nodes[0]._dir,
            &["keys", "rotate-totp", "--database", &database],
            "",
        );
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };

    // Alice enrols TOTP on node a.
    let alice = a.register("alice").await;
    let token = a.login(&alice).await;
    let enrolled = a.post("/users/me/totp").bearer(&token).send().await;
    assert_eq!(enrolled.status, 200, "{}", enrolled.text());
    let secret = base32_decode(enrolled.json()["secret"].as_str().unwrap());
    let confirmed = a
        .post("/users/me/totp/confirm")
        .bearer(&token)
        .json(&json!({"code": totp_code(&secret, -1)}))
        .send()
        .await;
    assert_eq!(confirmed.status, 204, "{}", confirmed.text());
    let before = sealed_under(&database).await;
    assert_eq!(before.len(), 1, "one key seals everything: {before:?}");

    // Step 1 stages a new key in this node's file; nothing in the database changes.
    let (ok, staged) = rotate();
    assert!(ok, "{staged}");
    assert!(staged.contains("staged"), "{staged}");
    assert!(std::fs::read_to_string(key_file(0))
        .unwrap()
        .contains(" staged"));
    assert_eq!(sealed_under(&database).await, before);

    // Step 2 refuses while a running node lacks the staged key, and names it.
    let (ok, refused) = rotate();
    assert!(!ok, "{refused}");
    assert!(
        refused.contains("does not hold the staged key"),
        "{refused}"
    );
    assert_eq!(sealed_under(&database).await, before);

    // The operator copies the file to node b; once b has read it, step 2 re-seals
    // everything under the new key.
    std::fs::copy(key_file(0), key_file(1)).unwrap();
    let mut done = String::new();
    for _ in 0..50 {
        let (ok, text) = rotate();
        done = text;
        if ok {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(done.contains("re-sealed"), "{done}");
    let after = sealed_under(&database).await;
    assert_eq!(after.len(), 1, "{after:?}");
    assert_ne!(after, before);
    assert!(done.contains(&format!("{:08x}", after[0])), "{done}");
    let file = std::fs::read_to_string(key_file(0)).unwrap();
    assert!(file.starts_with(&format!("{:08x} ", after[0])), "{file}");
    assert!(!file.contains("staged"), "{file}");

    // Both nodes open what was re-sealed: alice logs in with a code on b (which still has
    // the staged copy of the file), and JWTs signed by the re-sealed key verify on both.
    let login = b
        .post("/sessions")
        .basic(&alice)
        .header("x-totp", &totp_code(&secret, 0))
        .send()
        .await;
    assert_eq!(login.status, 201, "{}", login.text());
    let token = login.json()["token"].as_str().unwrap().to_owned();
    for node in [a, b] {
        assert_eq!(
            node.get("/users/me").bearer(&token).send().await.status,
            200
        );
    }
    // The next rotation waits until the promoted file reached every node.
    let (ok, refused) = rotate();
    assert!(!ok, "{refused}");
    assert!(refused.contains("seals with key"), "{refused}");
    std::fs::copy(key_file(0), key_file(1)).unwrap();

    for node in nodes {
        node.stop();
    }
}

/// What one writer saw: each Idempotency-Key it sent with the payment id acknowledged for
/// it, and how many attempts were refused (503, or no connection) on the way.
type Acknowledged = (Vec<(String, String)>, usize);

/// Sends `count` payments with keys `{name}-{i}`, each retried with the same key (on the
/// other node) until it is acknowledged: a client that never gives up on a payment. Any
/// answer but 201 and 503 fails the test.
async fn keep_paying(
    nodes: [Client; 2],
    token: String,
    path: String,
    name: String,
    count: usize,
    acks: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> Acknowledged {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    let mut acknowledged = Vec::new();
    let mut refused = 0;
    for i in 0..count {
        let key = format!("{name}-{i}");
        for attempt in 0.. {
            assert!(
                std::time::Instant::now() < deadline,
                "{key} never acknowledged"
            );
            let answer = nodes[attempt % 2]
                .post(&path)
                .bearer(&token)
                .header("Idempotency-Key", &key)
                .json(&json!({"payee": "ACME", "amount_minor": 100 + i, "currency": "EUR"}))
                .try_send()
                .await;
            match answer {
                Some(r) if r.status == 201 => {
                    acknowledged.push((key, r.json()["id"].as_str().unwrap().to_owned()));
                    acks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    break;
                }
                Some(r) if r.status == 503 => {
                    assert!(r.header("retry-after").is_some());
                }
                Some(r) => panic!("{key}: {} {}", r.status, r.text()),
                None => {}
            }
            refused += 1;
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    (acknowledged, refused)
}

/// Four clients paying through two nodes without pause ([`keep_paying`]), 40 payments
/// each, while a test breaks something.
struct Load {
    acks: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    writers: Vec<tokio::task::JoinHandle<Acknowledged>>,
}

impl Load {
    const PAYMENTS: usize = 160;

    fn start(clients: &[Client; 2], token: &str, path: &str) -> Load {
        let acks = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let writers = (0..4)
            .map(|w| {
                tokio::spawn(keep_paying(
                    [clients[w % 2].clone(), clients[(w + 1) % 2].clone()],
                    token.to_owned(),
                    path.to_owned(),
                    format!("w{w}"),
                    Self::PAYMENTS / 4,
                    acks.clone(),
                ))
            })
            .collect();
        Load { acks, writers }
    }

    /// Returns once `n` payments were acknowledged.
    async fn reached(&self, n: usize) {
        while self.acks.load(std::sync::atomic::Ordering::SeqCst) < n {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// Every payment acknowledged (key and id), once all were; the outage must have been
    /// seen (some attempt refused) while payments were still under way.
    async fn finish(self) -> Vec<(String, String)> {
        let under_way = self.acks.load(std::sync::atomic::Ordering::SeqCst);
        assert!(
            under_way < Self::PAYMENTS,
            "the load was over before the outage"
        );
        let mut acknowledged = Vec::new();
        let mut refused = 0;
        for writer in self.writers {
            let (acks, refusals) = writer.await.unwrap();
            acknowledged.extend(acks);
            refused += refusals;
        }
        assert_eq!(acknowledged.len(), Self::PAYMENTS);
        assert!(
            refused > 0,
            "no payment was refused: the outage went unseen"
        );
        acknowledged
    }
}

/// The database at `url` holds every acknowledged payment, and one payment per key.
async fn assert_stored_once(url: &str, acknowledged: &[(String, String)]) {
    let (db, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let stored: std::collections::HashSet<String> = db
        .query("SELECT id::text FROM payments", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        stored.len(),
        acknowledged.len(),
        "one payment per Idempotency-Key"
    );
    for (key, id) in acknowledged {
        assert!(
            stored.contains(id),
            "acknowledged payment {id} ({key}) lost"
        );
    }
}

#[tokio::test]
async fn a_primary_lost_under_load_fails_over_to_its_synchronous_standby_losing_nothing() {
    let primary = OwnCluster::start();
    let standby = primary.standby();
    let (_, tail) = primary.url.split_once('@').unwrap();
    let (_, database) = tail.split_once('/').unwrap();
    let (head, _) = primary.url.split_once('@').unwrap();
    let both = format!(
        "{head}@{},{}/{database}?target_session_attrs=read-write",
        primary.host_port(),
        standby.host_port()
    );
    let nodes = cluster(
        &both,
        2,
        &[
            "--password-check-limit",
            "none",
            "--rate-limit",
            "GET /apiStatus 5/hour burst=5 key=ip",
        ],
    );
    let clients = [nodes[0].client.clone(), nodes[1].client.clone()];
    let alice = clients[0].register("alice").await;
    let account = clients[0].account(&alice, "EUR").await;
    let token = clients[1].login(&alice).await;
    let path = format!("/accounts/{account}/payments");

    // Three of the five requests the rate limit allows, before the failover.
    for _ in 0..3 {
        assert_eq!(clients[0].get("/apiStatus").send().await.status, 200);
    }

    // Four clients paying without pause; the primary's machine is lost mid-way.
    let load = Load::start(&clients, &token, &path);
    load.reached(40).await;
    pg_script(&["kill", &primary.dir]);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    pg_script(&["promote", &standby.dir]);
    let acknowledged = load.finish().await;
    // On the new primary: every acknowledged payment, and one payment per key.
    assert_stored_once(&standby.url, &acknowledged).await;
    // Every answer replays on either node, now served by the new primary.
    for (key, id) in acknowledged.iter().step_by(20) {
        let i: usize = key.rsplit_once('-').unwrap().1.parse().unwrap();
        for client in &clients {
            let replay = client
                .post(&path)
                .bearer(&token)
                .header("Idempotency-Key", key)
                .json(&json!({"payee": "ACME", "amount_minor": 100 + i, "currency": "EUR"}))
                .send()
                .await;
            assert_eq!(replay.status, 201, "{key}: {}", replay.text());
            assert_eq!(replay.json()["id"], id.as_str(), "{key}");
        }
    }
    // The rate limit still holds: two of its five requests were left.
    let mut admitted = 0;
    for n in 0..4 {
        let r = clients[n % 2].get("/apiStatus").send().await;
        match r.status.as_u16() {
            200 => admitted += 1,
            429 => {}
            other => panic!("{other}: {}", r.text()),
        }
    }
    assert!(admitted <= 2, "{admitted} admitted after the failover");
    for node in nodes {
        node.stop();
    }
}

#[tokio::test]
async fn a_node_killed_and_the_database_restarted_under_load_lose_nothing_acknowledged() {
    let cluster = OwnCluster::start();
    let mut nodes = self::cluster(
        &cluster.url,
        2,
        &["--password-check-limit", "none", "--rate-limit", "none"],
    );
    let clients = [nodes[0].client.clone(), nodes[1].client.clone()];
    let alice = clients[0].register("alice").await;
    let account = clients[0].account(&alice, "EUR").await;
    let token = clients[1].login(&alice).await;
    let path = format!("/accounts/{account}/payments");
    let load = Load::start(&clients, &token, &path);
    // A node lost mid-payment (kill -9): its clients go on with the other node.
    load.reached(30).await;
    signal(&nodes[0].child, "KILL");
    let _ = nodes[0].child.wait();
    // Then the database restarts under the surviving node's load.
    load.reached(70).await;
    pg_script(&["down", &cluster.dir]);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    pg_script(&["up", &cluster.dir]);
    let acknowledged = load.finish().await;
    assert_stored_once(&cluster.url, &acknowledged).await;
    nodes.remove(1).stop();
}

#[tokio::test]
async fn a_single_machine_moves_to_postgres_with_everything_it_held() {
    let database = fresh_database("m").await;
    let dir = TempDir::new("single");
    let options = ["--password-check-limit", "none", "--rate-limit", "none"];
    // A single machine on SQLite, with some history.
    let (mut child, addr) = serve(&dir, &options);
    let single = Client::new(addr, &dir.0.join("certs/server.crt"));
    let alice = single.register("alice").await;
    let bob = single.register("bob").await;
    let token = single.login(&alice).await;
    let gone = single.login(&alice).await;
    let bob_token = single.login(&bob).await;
    let account = single.account(&alice, "EUR").await;
    let path = format!("/accounts/{account}/payments");
    let body = json!({"payee": "ACME", "amount_minor": 1250, "currency": "EUR"});
    let paid = single
        .post(&path)
        .bearer(&token)
        .header("Idempotency-Key", "invoice-1")
        .json(&body)
        .send()
        .await;
    assert_eq!(paid.status, 201);
    let payment = paid.json()["id"].as_str().unwrap().to_owned();
    let granted = single
        .post(&format!("/accounts/{account}/members"))
        .bearer(&token)
        .json(&json!({"username": "bob", "perms": "r"}))
        .send()
        .await;
    assert!(granted.status == 200 || granted.status == 201);
    let minted = single
        .post(&format!("{path}/{payment}/capabilities"))
        .bearer(&token)
        .json(&json!({"perms": "r", "expires_in": 3600}))
        .send()
        .await;
    assert_eq!(minted.status, 201, "{}", minted.text());
    let link = minted.json()["token"].as_str().unwrap().to_owned();
    assert_eq!(
        single.delete("/sessions").bearer(&gone).send().await.status,
        204
    );
    signal(&child, "TERM");
    assert!(wait_exit(&mut child).success());

    // The move.
    let to = ["migrate-store", "--from", "sqlite:data", "--to", &database];
    let moved = paygate_in(&dir, &to, "");
    let stdout = String::from_utf8_lossy(&moved.stdout);
    assert!(
        moved.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&moved.stderr)
    );
    assert!(stdout.contains("every count matches"), "{stdout}");
    for (table, rows) in [
        ("users", 2),
        ("payments", 1),
        ("capabilities", 1),
        ("jwt_keys", 1),
    ] {
        assert!(
            stdout
                .lines()
                .any(|l| l.split_whitespace().take(2).eq([table, &rows.to_string()])),
            "{table}: {stdout}"
        );
    }
    // Into a database that holds data: refused, nothing touched.
    let again = paygate_in(&dir, &to, "");
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds"));

    // The same data directory (its sealing key, its audit log) now a node on PostgreSQL.
    let mut args = vec!["--database", database.as_str()];
    args.extend_from_slice(&options);
    let (child, addr) = serve(&dir, &args);
    let node = Node {
        child,
        client: Client::new(addr, &dir.0.join("certs/server.crt")),
        _dir: TempDir::new("unused"),
    };
    let c = &node.client;
    // Tokens issued before the move verify; the one logged out stays logged out.
    assert_eq!(c.get(&path).bearer(&token).send().await.status, 200);
    assert_eq!(c.get(&path).bearer(&gone).send().await.status, 401);
    // The grant and the capability link still work.
    assert_eq!(c.get(&path).bearer(&bob_token).send().await.status, 200);
    let by_link = c
        .get(&format!("{path}/{payment}"))
        .bearer(&link)
        .send()
        .await;
    assert_eq!(by_link.status, 200, "{}", by_link.text());
    // The Idempotency-Key replays the payment made before the move.
    let replay = c
        .post(&path)
        .bearer(&token)
        .header("Idempotency-Key", "invoice-1")
        .json(&body)
        .send()
        .await;
    assert_eq!(replay.status, 201);
    assert_eq!(replay.json()["id"], payment.as_str());
    // New payments list after the old ones; passwords work.
    let fresh = c.login(&alice).await;
    let second = c
        .post(&path)
        .bearer(&fresh)
        .header("Idempotency-Key", "invoice-2")
        .json(&body)
        .send()
        .await;
    assert_eq!(second.status, 201);
    let listed = c.get(&path).bearer(&fresh).send().await.json();
    let ids: Vec<&str> = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [second.json()["id"].as_str().unwrap(), payment.as_str()]
    );
    node.stop();
}
