//! Transport and HTTP behaviour every client relies on: TLS versions and ALPN, standard
//! headers on every response, problem+json for every error, body limits, slow clients.

mod common;

use std::time::{Duration, Instant};

use common::TestServer;
use http::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SECURITY_HEADERS: [(&str, &str); 6] = [
    (
        "strict-transport-security",
        "max-age=63072000; includeSubDomains",
    ),
    ("x-content-type-options", "nosniff"),
    ("cache-control", "no-store"),
    (
        "content-security-policy",
        "default-src 'none'; frame-ancestors 'none'",
    ),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
];

fn assert_standard_headers(response: &common::TestResponse) {
    for (name, value) in SECURITY_HEADERS {
        assert_eq!(response.header(name), Some(value), "{name}");
    }
    let id = response.header("x-request-id").expect("x-request-id");
    assert!(uuid::Uuid::parse_str(id).is_ok(), "{id}");
    assert!(response.header("server").is_none(), "no Server banner");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_status_over_http1_and_http2_with_standard_headers() {
    let server = TestServer::start().await;
    let h1 = server.client.get("/apiStatus").send().await;
    assert_eq!(h1.status, 200);
    assert_eq!(h1.version, http::Version::HTTP_11);
    assert_eq!(h1.json()["status"], "ok");
    assert_standard_headers(&h1);

    let h2 = server.client.get("/apiStatus").http2().send().await;
    assert_eq!(h2.status, 200);
    assert_eq!(h2.version, http::Version::HTTP_2);
    assert_standard_headers(&h2);
    assert_ne!(h1.header("x-request-id"), h2.header("x-request-id"));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_2_and_1_3_are_offered_with_alpn() {
    let server = TestServer::start().await;
    let tls12 = server
        .client
        .connect_with(&[b"h2", b"http/1.1"], &[&rustls::version::TLS12])
        .await
        .unwrap();
    let (_, session) = tls12.get_ref();
    assert_eq!(
        session.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    assert_eq!(session.alpn_protocol(), Some(&b"h2"[..]));
    let suite = format!("{:?}", session.negotiated_cipher_suite().unwrap().suite());
    assert!(
        suite.starts_with("TLS_ECDHE_") && (suite.contains("GCM") || suite.contains("CHACHA")),
        "{suite}"
    );

    let tls13 = server
        .client
        .connect_with(&[b"http/1.1"], &[&rustls::version::TLS13])
        .await
        .unwrap();
    let (_, session) = tls13.get_ref();
    assert_eq!(
        session.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(session.alpn_protocol(), Some(&b"http/1.1"[..]));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_and_methods_are_problems() {
    let server = TestServer::start().await;
    let response = server.client.get("/nowhere").send().await;
    response.assert_problem(404);
    assert_standard_headers(&response);

    let response = server.client.request(Method::PUT, "/accounts").send().await;
    response.assert_problem(405);
    assert_eq!(response.header("allow"), Some("GET, POST"));

    let response = server
        .client
        .get("/accounts/not-a-uuid/payments")
        .send()
        .await;
    response.assert_problem(404);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_must_be_json_of_the_right_shape_and_size() {
    let server = TestServer::start_with(&[("max-body", "1024"), ("client-timeout", "2")]).await;
    let post = |ct: &str, body: String| server.client.post("/users").raw_body(ct, body);

    post("", r#"{"username":"abc","password":"x"}"#.into())
        .send()
        .await
        .assert_problem(415);
    post("text/plain", "{}".into())
        .send()
        .await
        .assert_problem(415);
    post("application/x-www-form-urlencoded", "a=b".into())
        .send()
        .await
        .assert_problem(415);
    post("application/json", "{not json".into())
        .send()
        .await
        .assert_problem(400);
    post("application/json", "[]".into())
        .send()
        .await
        .assert_problem(400);
    post("application/json", r#"{"username":"abc"}"#.into())
        .send()
        .await
        .assert_problem(400);
    post(
        "application/json",
        r#"{"username":1,"password":"xxxxxxxxxxxx"}"#.into(),
    )
    .send()
    .await
    .assert_problem(400);
    let unknown = post(
        "application/json",
        r#"{"username":"abcd","password":"a fine password 1","admin":true}"#.into(),
    )
    .send()
    .await;
    let problem = unknown.assert_problem(400);
    assert!(
        problem["detail"].as_str().unwrap().contains("admin"),
        "{problem}"
    );

    let oversize = format!(r#"{{"username":"abcd","password":"{}"}}"#, "p".repeat(2000));
    post("application/json", oversize)
        .send()
        .await
        .assert_problem(413);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_chunked_body_is_refused_while_streaming() {
    let server = TestServer::start_with(&[("max-body", "1024"), ("client-timeout", "2")]).await;
    let mut tls = server.client.connect().await;
    let head = "POST /users HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
                transfer-encoding: chunked\r\n\r\n";
    tls.write_all(head.as_bytes()).await.unwrap();
    // 4 KiB in chunks, well past the 1 KiB limit, without ever finishing the body.
    for _ in 0..4 {
        tls.write_all(format!("400\r\n{}\r\n", "x".repeat(1024)).as_bytes())
            .await
            .unwrap();
    }
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_header_client_is_dropped_and_blocks_nobody() {
    let server = TestServer::start().await; // 2 s client timeout
    let mut slow = server.client.connect().await;
    slow.write_all(b"GET /apiStatus HTTP/1.1\r\nhost: local")
        .await
        .unwrap();
    let started = Instant::now();

    // Others are served while the slow client dawdles.
    for _ in 0..3 {
        assert_eq!(server.client.get("/apiStatus").send().await.status, 200);
    }

    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut rest)).await;
    assert!(
        read.is_ok(),
        "the server must close the connection by itself"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1000),
        "closed too early: {waited:?}"
    );
    assert!(
        !String::from_utf8_lossy(&rest).contains("200 OK"),
        "no answer to half a request"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_dropped_after_the_handshake() {
    let server = TestServer::start().await;
    for alpn in [&b"h2"[..], &b"http/1.1"[..]] {
        let mut silent = server
            .client
            .connect_with(&[alpn], rustls::DEFAULT_VERSIONS)
            .await
            .unwrap();
        let mut rest = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_secs(10), silent.read_to_end(&mut rest)).await;
        assert!(
            read.is_ok(),
            "{} connection left open",
            String::from_utf8_lossy(alpn)
        );
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_tls_handshake_is_dropped() {
    let server = TestServer::start().await;
    let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(&[0x16, 0x03, 0x01]).await.unwrap(); // the start of a ClientHello, then silence
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "handshake deadline must close the connection");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_wait_instead_of_being_served() {
    let server = TestServer::start_with(&[("max-connections", "1"), ("client-timeout", "2")]).await;
    // One idle TLS connection holds the only slot until the first-request deadline frees it.
    let _held = server.client.connect().await;
    let started = Instant::now();
    let response = server.client.get("/apiStatus").send().await;
    assert_eq!(response.status, 200);
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "the second connection must wait for a slot: {:?}",
        started.elapsed()
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_an_in_flight_request_finish() {
    let server = TestServer::start().await;
    let body = r#"{"username":"drain","password":"a long passphrase 7"}"#;
    let mut tls = server.client.connect().await;
    let head = format!(
        "POST /users HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n",
        body.len()
    );
    // Headers and half the body: the request is in flight, its handler waiting for the rest.
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.write_all(&body.as_bytes()[..10]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let shutdown = tokio::spawn(server.shutdown());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !shutdown.is_finished(),
        "shutdown waits for the in-flight request"
    );
    tls.write_all(&body.as_bytes()[10..]).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut answer))
        .await
        .expect("the answer arrives and the connection closes")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    tokio::time::timeout(Duration::from_secs(5), shutdown)
        .await
        .expect("shutdown completes once drained")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_are_closed_for_http1_and_http2() {
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let server = TestServer::start().await; // 2 s client timeout
                                            // HTTP/2: one request, then silence on an open connection.
    let tls = server
        .client
        .connect_with(&[b"h2"], rustls::DEFAULT_VERSIONS)
        .await
        .unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    let connection = tokio::spawn(connection);
    let uri = format!("https://localhost:{}/apiStatus", server.addr.port());
    let request = http::Request::get(uri)
        .body(Full::new(bytes::Bytes::new()))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.unwrap();
    let idle_from = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(10), connection).await;
    assert!(
        closed.is_ok(),
        "an idle HTTP/2 connection must be closed by the server"
    );
    assert!(
        idle_from.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        idle_from.elapsed()
    );

    // HTTP/1.1 keep-alive: the same.
    let mut tls = server.client.connect().await;
    tls.write_all(b"GET /apiStatus HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    let idle_from = Instant::now();
    let mut everything = Vec::new();
    let read =
        tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut everything)).await;
    assert!(
        read.is_ok(),
        "an idle HTTP/1.1 connection must be closed by the server"
    );
    assert!(String::from_utf8_lossy(&everything).starts_with("HTTP/1.1 200"));
    assert!(idle_from.elapsed() >= Duration::from_millis(1500));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_hold_every_connection_slot() {
    use tokio::io::AsyncReadExt as _;
    let server = TestServer::start_with(&[
        ("max-connections", "50"),
        ("max-connections-per-client", "10"),
        // Long enough that no held socket is closed by a timeout during the test.
        ("client-timeout", "60"),
    ])
    .await;
    // Bare TCP sockets from 127.0.0.1, more than every slot, never saying a word.
    let mut hogs = Vec::new();
    for _ in 0..60 {
        hogs.push(tokio::net::TcpStream::connect(server.addr).await.unwrap());
    }
    // The server keeps ten of them and closes the rest at once. (Polled until it has, on
    // however busy a machine; a kept socket just stays silent.)
    let mut open = vec![true; hogs.len()];
    let mut closed = 0;
    let give_up = Instant::now() + Duration::from_secs(60);
    while closed < 50 && Instant::now() < give_up {
        for (hog, still_open) in hogs.iter_mut().zip(open.iter_mut()) {
            let mut byte = [0u8; 1];
            if *still_open {
                if let Ok(Ok(0)) =
                    tokio::time::timeout(Duration::from_millis(20), hog.read(&mut byte)).await
                {
                    *still_open = false;
                    closed += 1;
                }
            }
        }
    }
    assert_eq!(
        closed,
        50,
        "the address was allowed {} connections",
        60 - closed
    );
    // Another address is served while the first one holds its share.
    let other = server
        .client
        .clone()
        .connecting_from("127.0.0.2".parse().unwrap());
    let response = other.get("/apiStatus").send().await;
    assert_eq!(response.status, 200);
    drop(hogs);
    server.shutdown().await;
}
