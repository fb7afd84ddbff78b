//! Rate limiting against a real server: refusals and their headers, isolation, persistence
//! across restarts, one budget for several processes, trusted proxies, the password-guess
//! budget and throttling with `delay=`.

mod common;

use std::time::{Duration, Instant};

use common::{serve, signal, wait_exit, Client, Creds, TempDir, TestServer};

const QUOTA_EXCEEDED: &str = "https://iana.org/assignments/http-problem-types#quota-exceeded";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_burst_passes_then_429_with_retry_after_and_both_headers() {
    let server = TestServer::start_with(&[
        ("rate-limit", "GET /apiStatus 3/min burst=3 key=ip"),
        ("client-timeout", "2"),
    ])
    .await;
    for remaining in [2, 1, 0] {
        let ok = server.client.get("/apiStatus").send().await;
        assert_eq!(ok.status, 200);
        assert_eq!(
            ok.header("ratelimit-policy"),
            Some("\"get-apistatus\";q=3;w=60")
        );
        let state = ok.header("ratelimit").unwrap();
        assert!(
            state.starts_with(&format!("\"get-apistatus\";r={remaining};t=")),
            "{state}"
        );
    }
    let refused = server.client.get("/apiStatus").send().await;
    let problem = refused.assert_problem(429);
    assert_eq!(problem["type"], QUOTA_EXCEEDED);
    assert_eq!(
        problem["violated-policies"],
        serde_json::json!(["get-apistatus"])
    );
    // 3 per minute: the next token is 20 s away (rounded up to whole seconds, at least 1).
    let retry: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!((19..=20).contains(&retry), "Retry-After {retry}");
    assert_eq!(
        refused.header("ratelimit-policy"),
        Some("\"get-apistatus\";q=3;w=60")
    );
    assert_eq!(
        refused.header("ratelimit"),
        Some(&*format!("\"get-apistatus\";r=0;t={retry}"))
    );
    assert!(refused.header("x-request-id").is_some());
    // Other routes are not limited by this rule.
    assert_eq!(server.client.get("/nowhere").send().await.status, 404);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_and_users_have_separate_buckets() {
    let server = TestServer::start_with(&[
        ("rate-limit", "GET /accounts 2/min burst=2 key=user"),
        ("rate-limit", "* / 1000/s burst=1000 key=ip"),
        ("client-timeout", "2"),
    ])
    .await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let (alice, bob) = (server.login(&alice).await, server.login(&bob).await);
    for _ in 0..2 {
        let listed = server.client.get("/accounts").bearer(&alice).send().await;
        assert_eq!(listed.status, 200);
    }
    server
        .client
        .get("/accounts")
        .bearer(&alice)
        .send()
        .await
        .assert_problem(429);
    // Bob's bucket is his own, and alice's other routes fall under the other rule.
    let listed = server.client.get("/accounts").bearer(&bob).send().await;
    assert_eq!(listed.status, 200);
    let me = server
        .client
        .get("/users/alice")
        .bearer(&alice)
        .send()
        .await;
    assert_eq!(me.status, 200);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claiming_a_username_never_spends_that_users_bucket() {
    let server = TestServer::start_with(&[
        ("rate-limit", "* / 1/min burst=20 key=user"),
        ("guess-limit", "1000/min burst=1000"),
        ("client-timeout", "2"),
    ])
    .await;
    let alice = server.register("alice").await;
    let token = server.login(&alice).await;
    // Someone who knows alice's name floods with it, never with her password.
    let impostor = Creds::new("alice", "not-her-password");
    let mut refused = 0;
    for _ in 0..40 {
        let status = server
            .client
            .get("/apiStatus")
            .basic(&impostor)
            .send()
            .await
            .status;
        refused += usize::from(status == 429);
    }
    assert!(
        refused >= 19,
        "the flood was not limited by its address: {refused}"
    );
    // Alice's own token requests draw from her bucket, which the flood never touched.
    for _ in 0..19 {
        let mine = server.client.get("/users/me").bearer(&token).send().await;
        assert_eq!(mine.status, 200, "{}", mine.text());
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_an_empty_bucket_empty() {
    let server = TestServer::start_with(&[
        ("rate-limit", "GET /apiStatus 1/hour burst=2 key=ip"),
        ("client-timeout", "2"),
    ])
    .await;
    for _ in 0..2 {
        assert_eq!(server.client.get("/apiStatus").send().await.status, 200);
    }
    server
        .client
        .get("/apiStatus")
        .send()
        .await
        .assert_problem(429);
    let server = server.restart().await;
    let refused = server.client.get("/apiStatus").send().await;
    refused.assert_problem(429);
    let retry: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!(
        retry > 3500,
        "the refill clock kept running from before: {retry}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_on_one_data_directory_share_one_budget() {
    let dir = TempDir::new("rl-two-procs");
    let rule = ["--rate-limit", "GET /apiStatus 1/hour burst=20 key=global"];
    let (mut first, addr_a) = serve(&dir, &rule);
    let (mut second, addr_b) = serve(&dir, &rule);
    let cert = dir.0.join("certs/server.crt");
    let (a, b) = (Client::new(addr_a, &cert), Client::new(addr_b, &cert));
    let mut admitted = 0;
    for i in 0..60 {
        let client = if i % 2 == 0 { &a } else { &b };
        match client.get("/apiStatus").send().await.status.as_u16() {
            200 => admitted += 1,
            429 => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert!(
        admitted <= 20,
        "two processes together admitted {admitted} of a burst of 20"
    );
    assert!(
        admitted >= 18,
        "leases may under-admit by a little, not more: {admitted}"
    );
    for child in [&mut first, &mut second] {
        signal(child, "TERM");
        assert!(wait_exit(child).success());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_forwarded_for_counts_only_from_trusted_proxies() {
    let rule = ("rate-limit", "GET /apiStatus 1/hour burst=1 key=ip");
    // Not trusted: a forged header changes nothing.
    let server = TestServer::start_with(&[rule, ("client-timeout", "2")]).await;
    let get = |xff: &str| {
        server
            .client
            .get("/apiStatus")
            .header("x-forwarded-for", xff)
            .send()
    };
    assert_eq!(get("198.51.100.1").await.status, 200);
    assert_eq!(
        get("198.51.100.2").await.status,
        429,
        "same peer, same bucket"
    );
    server.shutdown().await;

    // Trusted: the first untrusted hop from the right is the client.
    let server = TestServer::start_with(&[
        rule,
        ("trusted-proxy", "127.0.0.1/32"),
        ("client-timeout", "2"),
    ])
    .await;
    let get = |xff: &str| {
        server
            .client
            .get("/apiStatus")
            .header("x-forwarded-for", xff)
            .send()
    };
    assert_eq!(get("198.51.100.1").await.status, 200);
    assert_eq!(get("198.51.100.2").await.status, 200, "another client");
    assert_eq!(
        get("203.0.113.7, 198.51.100.1").await.status,
        429,
        "the rightmost untrusted hop"
    );
    assert_eq!(
        get("198.51.100.2, 127.0.0.1").await.status,
        429,
        "trusted hops are skipped"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_password_guess_budget_holds_across_addresses() {
    let server = TestServer::start_with(&[
        ("guess-limit", "3/hour burst=3"),
        ("trusted-proxy", "127.0.0.1/32"),
        ("client-timeout", "2"),
    ])
    .await;
    let alice = server.register("alice").await;
    // Successful logins never spend the budget.
    for _ in 0..5 {
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
    }
    let wrong = Creds::new("alice", "not her password");
    for i in 0..3 {
        let response = server
            .client
            .get("/accounts")
            .basic(&wrong)
            .header("x-forwarded-for", &format!("198.51.100.{i}"))
            .send()
            .await;
        response.assert_problem(401);
    }
    // A fourth guess from yet another address is refused without checking the password ...
    let refused = server
        .client
        .get("/accounts")
        .basic(&wrong)
        .header("x-forwarded-for", "203.0.113.50")
        .send()
        .await;
    let problem = refused.assert_problem(429);
    assert_eq!(
        problem["violated-policies"],
        serde_json::json!(["password-guesses"])
    );
    assert!(refused.header("retry-after").is_some());
    // ... and so is the right password, until the budget refills.
    server
        .client
        .get("/accounts")
        .basic(&alice)
        .send()
        .await
        .assert_problem(429);
    // Other usernames are unaffected.
    let bob = server.register("bob").await;
    assert_eq!(
        server
            .client
            .get("/accounts")
            .basic(&bob)
            .send()
            .await
            .status,
        200
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_waits_for_the_token_then_admits() {
    let server = TestServer::start_with(&[
        ("rate-limit", "GET /apiStatus 1/s burst=1 key=ip delay=3000"),
        ("rate-limit", "GET /nowhere 1/min burst=1 key=ip delay=100"),
        ("client-timeout", "5"),
    ])
    .await;
    assert_eq!(server.client.get("/apiStatus").send().await.status, 200);
    let started = Instant::now();
    let waited = server.client.get("/apiStatus").send().await;
    assert_eq!(waited.status, 200, "admitted after waiting for its token");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
    // When the token is further away than the delay allows, the answer is 429 without
    // waiting for it: it names the whole wait (about a minute), which a request that had
    // waited 100 ms would not.
    assert_eq!(server.client.get("/nowhere").send().await.status, 404);
    let refused = server.client.get("/nowhere").send().await;
    refused.assert_problem(429);
    let retry: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!(retry >= 55, "Retry-After {retry}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn right_passwords_in_parallel_on_four_workers_never_spend_the_guess_budget() {
    let dir = TempDir::new("rl-guess-workers");
    // The default guess budget (10 per 15 minutes); no request limit in the way.
    let (supervisor, addr, log) = common::serve_logging(
        &dir,
        &[
            "--workers",
            "4",
            "--rate-limit",
            "none",
            "--password-check-limit",
            "none",
            "--max-connections-per-client",
            "1000",
        ],
        "info",
    );
    let mut supervisor = common::StopOnDrop(supervisor);
    common::wait_for_log(&log, "all 4 workers are listening", 1, 30).await;
    let client = Client::new(addr, &dir.0.join("certs/server.crt"));
    let carol = client.register("carol").await;
    let mut requests = Vec::new();
    for _ in 0..40 {
        let (client, carol) = (client.clone(), carol.clone());
        requests.push(tokio::spawn(async move {
            client
                .get("/users/me")
                .basic(&carol)
                .send()
                .await
                .status
                .as_u16()
        }));
    }
    let mut statuses = Vec::new();
    for request in requests {
        statuses.push(request.await.unwrap());
    }
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    // The budget is whole: ten wrong passwords still pass before the eleventh is refused.
    let wrong = Creds::new("carol", "not carol's password");
    for _ in 0..10 {
        client
            .get("/users/me")
            .basic(&wrong)
            .send()
            .await
            .assert_problem(401);
    }
    let refused = client.get("/users/me").basic(&carol).send().await;
    refused.assert_problem(429);
    signal(&supervisor.0, "TERM");
    assert!(wait_exit(&mut supervisor.0).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_address_cannot_make_paygate_hash_without_limit() {
    let server = TestServer::start_with(&[
        ("password-check-limit", "10/hour burst=10"),
        ("client-timeout", "5"),
    ])
    .await;
    let alice = server.register("alice").await;
    let token = server.login(&alice).await;
    // Fresh usernames, each with a fresh guess budget: the address's budget still ends it.
    let mut statuses = Vec::new();
    for i in 0..16 {
        let stranger = Creds::new(&format!("stranger{i}"), "some password");
        let response = server
            .client
            .get("/apiStatus")
            .basic(&stranger)
            .send()
            .await;
        if response.status == 429 {
            let body = response.assert_problem(429);
            assert_eq!(
                body["violated-policies"],
                serde_json::json!(["password-checks"])
            );
            assert!(response.header("retry-after").is_some());
        }
        statuses.push(response.status.as_u16());
    }
    // Login above was the first check; nine more passed, then every one was refused.
    assert_eq!(
        statuses.iter().filter(|&&s| s == 200).count(),
        9,
        "{statuses:?}"
    );
    assert!(statuses[9..].iter().all(|&s| s == 429), "{statuses:?}");
    // A token needs no password check: unaffected.
    let me = server.client.get("/users/me").bearer(&token).send().await;
    assert_eq!(me.status, 200);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_hashing_queue_answers_503_at_once() {
    let server = TestServer::start_with(&[("password-queue", "1")]).await;
    let alice = server.register("alice").await;
    let mut requests = Vec::new();
    for _ in 0..24 {
        let (client, alice) = (server.client.clone(), alice.clone());
        requests.push(tokio::spawn(async move {
            client.get("/users/me").basic(&alice).send().await
        }));
    }
    let (mut ok, mut busy) = (0, 0);
    for request in requests {
        let response = request.await.unwrap();
        match response.status.as_u16() {
            200 => ok += 1,
            503 => {
                let body = response.assert_problem(503);
                assert_eq!(
                    body["type"],
                    "tag:paygate.dev,2026:problem:password-checks-busy"
                );
                assert_eq!(response.header("retry-after"), Some("1"));
                busy += 1;
            }
            other => panic!("unexpected {other}: {}", response.text()),
        }
    }
    assert!(ok >= 1 && busy >= 1, "{ok} answered, {busy} refused");
    // Refusals spent none of alice's guess budget (10): she still logs in, many times.
    for _ in 0..12 {
        let me = server.client.get("/users/me").basic(&alice).send().await;
        assert_eq!(me.status, 200, "{}", me.text());
    }
    server.shutdown().await;
}
