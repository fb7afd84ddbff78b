//! `GET /metrics`: Prometheus text with the counters an operator watches, open to local
//! scrapers and admins only, and one scrape shows every worker.

mod common;

use std::time::Duration;

use common::{Client, Creds, TempDir, TestServer};

/// The value of the sample whose line starts with `series` (name and labels).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn a_local_scrape_counts_requests_refusals_failures_and_audit_syncs() {
    let server =
        TestServer::start_with(&[("rate-limit", "GET /apiStatus 1/hour burst=3 key=ip")]).await;
    let alice = server.register("alice").await;
    for _ in 0..5 {
        server.client.get("/apiStatus").send().await;
    }
    let wrong = Creds::new("alice", "not her password");
    let refused = server.client.get("/users/me").basic(&wrong).send().await;
    assert_eq!(refused.status, 401);
    let forged = server
        .client
        .get("/users/me")
        .bearer("eyJhbGciOiJub25lIn0.e30.")
        .send()
        .await;
    assert_eq!(forged.status, 401);
    assert_eq!(
        server
            .client
            .get("/users/me")
            .basic(&alice)
            .send()
            .await
            .status,
        200
    );

    // From loopback, no credentials needed.
    let response = server.client.get("/metrics").send().await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(
        response.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let text = response.text();
    let instance = server.app().metrics.instance().to_owned();
    let series = |rest: &str| format!("{{worker=\"{instance}\"{rest}}}");
    let get = |name: &str, rest: &str| value(&text, &format!("{name}{}", series(rest)));
    assert_eq!(
        get(
            "paygate_requests_total",
            ",route=\"GET /apiStatus\",status=\"200\""
        ),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        get(
            "paygate_requests_total",
            ",route=\"GET /apiStatus\",status=\"429\""
        ),
        Some(2.0)
    );
    assert_eq!(
        get(
            "paygate_requests_total",
            ",route=\"GET /users/me\",status=\"401\""
        ),
        Some(2.0)
    );
    // Every answer is timed, by route and status class, whichever stage gave it.
    let durations = "paygate_http_server_request_duration_seconds";
    let apistatus = ",route=\"GET /apiStatus\",status_class";
    let count = format!("{durations}_count");
    assert_eq!(get(&count, &format!("{apistatus}=\"2xx\"")), Some(3.0));
    assert_eq!(get(&count, &format!("{apistatus}=\"4xx\"")), Some(2.0));
    let bucket = format!("{durations}_bucket");
    let all = format!("{apistatus}=\"2xx\",le=\"+Inf\"");
    assert_eq!(get(&bucket, &all), Some(3.0), "{text}");
    let sum = get(&format!("{durations}_sum"), &format!("{apistatus}=\"2xx\""));
    assert!(sum.is_some_and(|s| s > 0.0), "{text}");
    // Rules are named after their method and path (the RateLimit-Policy name).
    assert_eq!(
        get("paygate_rate_limited_total", ",rule=\"get-apistatus\""),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        get("paygate_auth_failures_total", ",method=\"basic\""),
        Some(1.0)
    );
    assert_eq!(
        get("paygate_auth_failures_total", ",method=\"bearer-jwt\""),
        Some(1.0),
        "{text}"
    );
    // Every request that passed the rate limit left two records (the scrape's response
    // record may still be on its way).
    let records = get("paygate_audit_records_total", "").unwrap();
    assert!(records >= 2.0 * 6.0, "{text}");
    let syncs = get("paygate_audit_fsync_seconds_count", "").unwrap();
    assert!(syncs >= 1.0 && syncs <= records, "{text}");
    assert_eq!(
        get("paygate_audit_fsync_seconds_bucket", ",le=\"+Inf\""),
        Some(syncs)
    );
    assert!(get("paygate_open_connections", "").unwrap() >= 1.0);
    let started = get("paygate_worker_start_time_seconds", "").unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(started <= now && started > now - 120.0, "{text}");
    // Each family is described once.
    assert_eq!(
        text.matches("# TYPE paygate_requests_total counter")
            .count(),
        1
    );
    assert_eq!(
        text.matches("# TYPE paygate_audit_fsync_seconds histogram")
            .count(),
        1
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_remote_scrape_needs_the_admin_role() {
    // Through a trusted proxy the client is the remote address it names, not loopback.
    let server = TestServer::start_with(&[("trusted-proxy", "127.0.0.1/32")]).await;
    let alice = server.register("alice").await;
    let admin = server.staff(
        "root.admin",
        "admin passphrase 1",
        paygate::domain::Role::Admin,
    );
    let scrape = || {
        server
            .client
            .get("/metrics")
            .header("x-forwarded-for", "203.0.113.9")
    };
    scrape().send().await.assert_problem(401);
    scrape().basic(&alice).send().await.assert_problem(403);
    let response = scrape().basic(&admin).send().await;
    assert_eq!(response.status, 200);
    assert!(response.text().contains("paygate_requests_total{"));
    server.shutdown().await;
}

#[tokio::test]
async fn an_unparsable_forwarded_hop_never_makes_the_client_local() {
    // A proxy on loopback forwards a hop it should not have: with a port, in brackets, or
    // garbage. The client is then unknown, not the proxy's loopback address.
    let server = TestServer::start_with(&[("trusted-proxy", "127.0.0.1/32")]).await;
    for hop in ["203.0.113.9:4444", "[::1]", "garbage", "100::7"] {
        let response = server
            .client
            .get("/metrics")
            .header("x-forwarded-for", hop)
            .send()
            .await;
        response.assert_problem(401);
    }
    // A well-formed loopback hop is still a local scraper.
    let local = server
        .client
        .get("/metrics")
        .header("x-forwarded-for", "127.0.0.1")
        .send()
        .await;
    assert_eq!(local.status, 200);
    // The audit log names the unknown client by its documented address.
    let data = server.data_dir();
    let _kept = server.stop().await;
    let log = common::audit_text(&data);
    assert!(log.contains("\"client_ip\":\"100::\""), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_scrape_shows_every_worker() {
    let dir = TempDir::new("metrics-workers");
    let (mut supervisor, addr, log) = common::serve_logging(&dir, &["--workers", "2"], "info");
    common::wait_for_log(&log, "all 2 workers are listening", 1, 10).await;
    let client = Client::new(addr, &dir.0.join("certs/server.crt"));
    // Each new connection may land on either worker; within a few snapshot periods, one
    // scrape carries both instances' series.
    let mut seen = String::new();
    for _ in 0..60 {
        client.get("/apiStatus").send().await;
        seen = client.get("/metrics").send().await.text();
        if seen.contains("paygate_worker_start_time_seconds{worker=\"1\"}")
            && seen.contains("paygate_worker_start_time_seconds{worker=\"2\"}")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        seen.contains("paygate_worker_start_time_seconds{worker=\"1\"}")
            && seen.contains("paygate_worker_start_time_seconds{worker=\"2\"}"),
        "{seen}"
    );
    assert_eq!(
        seen.matches("# TYPE paygate_requests_total counter")
            .count(),
        1
    );
    common::signal(&supervisor, "TERM");
    assert_eq!(common::wait_exit(&mut supervisor).code(), Some(0));
    // A clean stop takes each worker's snapshot with it.
    let left: Vec<_> = std::fs::read_dir(dir.0.join("data/metrics"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
