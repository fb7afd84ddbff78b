//! Test harness: a real paygate on `127.0.0.1:0` over real TLS, and a small HTTPS client
//! that trusts the server's freshly generated certificate and speaks HTTP/1.1 or HTTP/2.

#![allow(dead_code)] // each test binary uses a different part of the harness

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use paygate::config::{ServeConfig, Sources, TlsFiles};
use paygate::server::Running;

/// A fresh temporary directory, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("paygate-{tag}-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub dir: TempDir,
    options: BTreeMap<&'static str, Vec<String>>,
    running: Option<Running>,
    pub client: Client,
    /// The server's clock: real time, which a test moves forward to make things expire.
    clock: paygate::time::Clock,
}

impl TestServer {
    /// Starts a server with default settings and a 2 s client timeout.
    pub async fn start() -> Self {
        Self::start_with(&[("client-timeout", "2")]).await
    }

    /// Starts a server with extra `serve` options (flag name → value), on the backend
    /// the run asks for (see [`on_postgres`]).
    pub async fn start_with(extra: &[(&'static str, &str)]) -> Self {
        Self::start_on(extra, on_postgres()).await
    }

    /// Starts a server on SQLite whatever the run asks for: for tests of what SQLite's
    /// files and the data directory hold (their PostgreSQL counterparts are in
    /// `tests/postgres.rs` and `tests/store_conformance.rs`).
    pub async fn start_on_sqlite() -> Self {
        Self::start_on_sqlite_with(&[("client-timeout", "2")]).await
    }

    /// [`TestServer::start_on_sqlite`] with extra `serve` options.
    pub async fn start_on_sqlite_with(extra: &[(&'static str, &str)]) -> Self {
        Self::start_on(extra, false).await
    }

    async fn start_on(extra: &[(&'static str, &str)], postgres: bool) -> Self {
        let dir = TempDir::new("it");
        let files = TlsFiles {
            cert: dir.0.join("server.crt"),
            key: dir.0.join("server.key"),
            are_defaults: false,
        };
        paygate::tls::write_dev_certificate(&files, false).unwrap();
        let mut options: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
        options.insert("listen", vec!["127.0.0.1:0".into()]);
        options.insert("data-dir", vec![dir.0.join("data").display().to_string()]);
        options.insert("tls-cert", vec![files.cert.display().to_string()]);
        options.insert("tls-key", vec![files.key.display().to_string()]);
        // Tests that are not about rate limiting should not trip over the default rules.
        if !extra.iter().any(|(name, _)| *name == "rate-limit") {
            options.insert("rate-limit", vec!["none".into()]);
        }
        if !extra
            .iter()
            .any(|(name, _)| *name == "password-check-limit")
        {
            options.insert("password-check-limit", vec!["none".into()]);
        }
        // Every test client connects from 127.0.0.1: only the test of the per-client cap
        // should meet it.
        if !extra
            .iter()
            .any(|(name, _)| *name == "max-connections-per-client")
        {
            options.insert("max-connections-per-client", vec!["1000".into()]);
        }
        for (name, value) in extra {
            options.entry(name).or_default().push(value.to_string());
        }
        if postgres && !options.contains_key("database") {
            options.insert("database", vec![fresh_database("it").await]);
        }
        Self::launch(dir, options).await
    }

    async fn launch(dir: TempDir, options: BTreeMap<&'static str, Vec<String>>) -> Self {
        Self::launch_with_clock(dir, options, paygate::time::Clock::advanceable()).await
    }

    async fn launch_with_clock(
        dir: TempDir,
        options: BTreeMap<&'static str, Vec<String>>,
        clock: paygate::time::Clock,
    ) -> Self {
        let no_env = |_: &str| None;
        let config = ServeConfig::resolve(&Sources::new(&options, &no_env)).unwrap();
        let running = paygate::server::start_with_clock(config, clock.clone())
            .await
            .unwrap();
        let addr = running.local_addr();
        let client = Client::new(addr, &dir.0.join("server.crt"));
        TestServer {
            addr,
            dir,
            options,
            running: Some(running),
            client,
            clock,
        }
    }

    /// Stops the server and starts a new one on the same data directory and options.
    pub async fn restart(self) -> Self {
        self.restart_with(|| {}).await
    }

    /// Stops the server, runs `between` (e.g. to damage a file), and starts it again.
    pub async fn restart_with(mut self, between: impl FnOnce()) -> Self {
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
        between();
        let dir = TempDir(std::mem::take(&mut self.dir.0));
        let options = std::mem::take(&mut self.options);
        Self::launch_with_clock(dir, options, self.clock.clone()).await
    }

    /// Another server on the same data directory and options, as a second worker would
    /// be: its own caches and connections, the same databases and keys.
    pub async fn sibling(&self) -> TestServer {
        self.sibling_with(&[]).await
    }

    /// A sibling with some options replaced.
    pub async fn sibling_with(&self, replace: &[(&'static str, &str)]) -> TestServer {
        let dir = TempDir::new("sibling");
        std::fs::copy(self.dir.0.join("server.crt"), dir.0.join("server.crt")).unwrap();
        let mut options = self.options.clone();
        options.insert("listen", vec!["127.0.0.1:0".into()]);
        for (name, value) in replace {
            options.insert(name, vec![value.to_string()]);
        }
        Self::launch_with_clock(dir, options, self.clock.clone()).await
    }

    /// The server's clock (siblings and restarts share it): advance it to make sessions,
    /// tokens, capabilities and TOTP steps expire without waiting.
    pub fn clock(&self) -> &paygate::time::Clock {
        &self.clock
    }

    /// The running server itself.
    pub fn running(&self) -> &Running {
        self.running.as_ref().expect("running")
    }

    /// The running server's shared state.
    pub fn app(&self) -> Arc<paygate::app::App> {
        self.running.as_ref().expect("running").app()
    }

    /// The options that point a `paygate` command at this server's data: its data
    /// directory, and its database when it runs on PostgreSQL.
    pub fn store_args(&self) -> Vec<String> {
        let mut args = vec![
            "--data-dir".to_owned(),
            self.data_dir().display().to_string(),
        ];
        if let Some(url) = self.options.get("database") {
            args.extend(["--database".to_owned(), url[0].clone()]);
        }
        args
    }

    /// The server's SQLite database, to look at what it stored; `None` on PostgreSQL.
    pub fn sqlite(&self) -> Option<rusqlite::Connection> {
        if self.options.contains_key("database") {
            return None;
        }
        Some(rusqlite::Connection::open(self.data_dir().join("paygate.db")).unwrap())
    }

    /// The data directory the server uses.
    pub fn data_dir(&self) -> PathBuf {
        PathBuf::from(&self.options["data-dir"][0])
    }

    /// Logs in with Basic credentials and returns the Bearer token.
    pub async fn login(&self, creds: &Creds) -> String {
        self.client.login(creds).await
    }

    /// Shuts down and hands over the directory (data included), which lives as long as
    /// the returned value.
    pub async fn stop(mut self) -> TempDir {
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
        TempDir(std::mem::take(&mut self.dir.0))
    }

    pub async fn shutdown(mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
    }

    /// Registers a user over the API and returns its credentials.
    pub async fn register(&self, username: &str) -> Creds {
        self.client.register(username).await
    }

    /// Creates an account for `owner` and returns its id.
    pub async fn account(&self, owner: &Creds, currency: &str) -> String {
        self.client.account(owner, currency).await
    }

    /// Creates a user with a global role, as an operator would (`paygate user add --role`).
    pub fn staff(&self, username: &str, password: &str, role: paygate::domain::Role) -> Creds {
        let creds = Creds::new(username, password);
        let new = paygate::store::NewUser {
            username: paygate::domain::Username::parse("username", &creds.user).unwrap(),
            password_hash: paygate::passwords::hash_blocking(&creds.password).unwrap(),
            role: Some(role),
        };
        match self.options.get("database") {
            None => {
                paygate::store::SqliteStore::open(&self.data_dir())
                    .unwrap()
                    .create_user_blocking(&new)
                    .unwrap();
            }
            // The test's runtime is busy running this test: a connection of its own, on a
            // runtime of its own.
            Some(url) => {
                let url = paygate::store::postgres::DatabaseUrl::parse(&url[0]).unwrap();
                let keys = paygate::store::sealing::TotpKeys::load(&self.data_dir()).unwrap();
                std::thread::scope(|scope| {
                    scope.spawn(|| {
                        let runtime = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .unwrap();
                        runtime.block_on(async {
                            let store = paygate::store::postgres::PgStore::open(
                                &url,
                                1,
                                Arc::new(keys),
                                paygate::time::Clock::system(),
                            )
                            .await
                            .unwrap();
                            store.create_user(new).await.unwrap();
                        });
                    });
                });
            }
        }
        creds
    }
}

#[derive(Clone, Debug)]
pub struct Creds {
    pub user: String,
    pub password: String,
}

impl Creds {
    pub fn new(user: &str, password: &str) -> Self {
        Creds {
            user: user.into(),
            password: password.into(),
        }
    }

    pub fn header(&self) -> String {
        let raw = format!("{}:{}", self.user, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

/// An HTTPS client trusting only the test server's certificate.
#[derive(Clone)]
pub struct Client {
    pub addr: SocketAddr,
    roots: Arc<rustls::RootCertStore>,
    /// The local address connections come from (all of 127.0.0.0/8 is loopback), when
    /// a test needs a second client address.
    source: Option<std::net::IpAddr>,
}

impl Client {
    pub fn new(addr: SocketAddr, cert: &std::path::Path) -> Self {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(cert).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        Client {
            addr,
            roots: Arc::new(roots),
            source: None,
        }
    }

    /// The same client, connecting from `source` (e.g. 127.0.0.2).
    pub fn connecting_from(mut self, source: std::net::IpAddr) -> Self {
        self.source = Some(source);
        self
    }

    /// Opens a TLS connection offering the given ALPN protocols and TLS versions.
    pub async fn connect_with(
        &self,
        alpn: &[&[u8]],
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(self.roots.clone())
        .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let tcp = match self.source {
            None => TcpStream::connect(self.addr).await?,
            Some(source) => {
                let socket = tokio::net::TcpSocket::new_v4()?;
                socket.bind(SocketAddr::new(source, 0))?;
                socket.connect(self.addr).await?
            }
        };
        TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
    }

    pub async fn connect(&self) -> TlsStream<TcpStream> {
        self.connect_with(&[b"http/1.1"], rustls::DEFAULT_VERSIONS)
            .await
            .unwrap()
    }

    /// Registers a user over the API and returns its credentials.
    pub async fn register(&self, username: &str) -> Creds {
        let creds = Creds::new(username, &format!("{username}-Pass-phrase-9"));
        let response = self
            .post("/users")
            .json(&serde_json::json!({"username": creds.user, "password": creds.password}))
            .send()
            .await;
        assert_eq!(response.status, 201, "{}", response.text());
        creds
    }

    /// Logs in with Basic credentials and returns the Bearer token.
    pub async fn login(&self, creds: &Creds) -> String {
        let response = self.post("/sessions").basic(creds).send().await;
        assert_eq!(response.status, 201, "{}", response.text());
        response.json()["token"].as_str().unwrap().to_owned()
    }

    /// Creates an account for `owner` and returns its id.
    pub async fn account(&self, owner: &Creds, currency: &str) -> String {
        let response = self
            .post("/accounts")
            .basic(owner)
            .json(&serde_json::json!({"name": "Operating", "currency": currency}))
            .send()
            .await;
        assert_eq!(response.status, 201, "{}", response.text());
        response.json()["id"].as_str().unwrap().to_owned()
    }

    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        RequestBuilder {
            client: self.clone(),
            method,
            path: path.into(),
            headers: Vec::new(),
            body: Bytes::new(),
            http2: false,
        }
    }

    pub fn get(&self, path: &str) -> RequestBuilder {
        self.request(Method::GET, path)
    }

    pub fn post(&self, path: &str) -> RequestBuilder {
        self.request(Method::POST, path)
    }

    pub fn delete(&self, path: &str) -> RequestBuilder {
        self.request(Method::DELETE, path)
    }
}

pub struct RequestBuilder {
    client: Client,
    method: Method,
    path: String,
    headers: Vec<(String, String)>,
    body: Bytes,
    http2: bool,
}

impl RequestBuilder {
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn bearer(self, token: &str) -> Self {
        self.header("authorization", &format!("Bearer {token}"))
    }

    pub fn basic(self, creds: &Creds) -> Self {
        let value = creds.header();
        self.header("authorization", &value)
    }

    pub fn json(self, value: &Value) -> Self {
        self.raw_body("application/json", value.to_string())
    }

    pub fn raw_body(mut self, content_type: &str, body: impl Into<Bytes>) -> Self {
        if !content_type.is_empty() {
            self.headers
                .push(("content-type".into(), content_type.into()));
        }
        self.body = body.into();
        self
    }

    pub fn http2(mut self) -> Self {
        self.http2 = true;
        self
    }

    /// Sends this HTTP/1.1 request on `connection` (opening it first if it is closed); one
    /// attempt, `Err` when no response came back.
    pub async fn send_on(self, connection: &mut KeepAlive) -> Result<TestResponse, String> {
        if connection.sender.as_ref().is_none_or(|s| s.is_closed()) {
            connection.sender = None;
            let tls = self
                .client
                .connect_with(&[b"http/1.1"], rustls::DEFAULT_VERSIONS)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|e| format!("handshake: {e}"))?;
            tokio::spawn(conn);
            connection.sender = Some(sender);
        }
        let sender = connection.sender.as_mut().ok_or("no connection")?;
        let mut request = Request::builder()
            .method(self.method)
            .uri(self.path)
            .header("host", format!("localhost:{}", self.client.addr.port()));
        for (name, value) in &self.headers {
            request = request.header(name.as_str(), value.as_str());
        }
        let request = request
            .body(Full::new(self.body))
            .map_err(|e| e.to_string())?;
        let outcome = async {
            let response = sender.send_request(request).await?;
            let (parts, body) = response.into_parts();
            let body = body.collect().await?.to_bytes();
            Ok::<_, hyper::Error>(TestResponse {
                status: parts.status,
                version: parts.version,
                headers: parts.headers,
                body,
            })
        };
        match outcome.await {
            Ok(response) => Ok(response),
            Err(e) => {
                connection.sender = None;
                Err(format!("request: {e}"))
            }
        }
    }

    pub async fn send(self) -> TestResponse {
        self.exchange(true).await.expect("a response")
    }

    /// Like `send`, but `None` when the server is gone (connection refused or closed).
    pub async fn try_send(self) -> Option<TestResponse> {
        self.exchange(false).await
    }

    async fn exchange(self, must: bool) -> Option<TestResponse> {
        let alpn: &[&[u8]] = if self.http2 { &[b"h2"] } else { &[b"http/1.1"] };
        let tls = match self
            .client
            .connect_with(alpn, rustls::DEFAULT_VERSIONS)
            .await
        {
            Ok(tls) => tls,
            Err(e) if !must => {
                let _ = e;
                return None;
            }
            Err(e) => panic!("TLS connection: {e}"),
        };
        let mut request = Request::builder().method(self.method).uri(format!(
            "https://localhost:{}{}",
            self.client.addr.port(),
            self.path
        ));
        if !self.http2 {
            request = request.header("host", format!("localhost:{}", self.client.addr.port()));
        }
        for (name, value) in &self.headers {
            request = request.header(name.as_str(), value.as_str());
        }
        let request = request.body(Full::new(self.body)).unwrap();
        let io = TokioIo::new(tls);
        let response = if self.http2 {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .unwrap();
            tokio::spawn(conn);
            sender.send_request(request).await
        } else {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            sender.send_request(request).await
        };
        let response = match response {
            Ok(response) => response,
            Err(e) if !must => {
                let _ = e;
                return None;
            }
            Err(e) => panic!("request failed: {e}"),
        };
        let status = response.status();
        let version = response.version();
        let headers = response.headers().clone();
        let body = match response.into_body().collect().await {
            Ok(body) => body.to_bytes(),
            Err(_) if !must => return None,
            Err(e) => panic!("reading the body: {e}"),
        };
        Some(TestResponse {
            status,
            version,
            headers,
            body,
        })
    }
}

/// An HTTP/1.1 connection kept alive across requests ([`RequestBuilder::send_on`]),
/// reopened when the server has closed it.
#[derive(Default)]
pub struct KeepAlive {
    sender: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
}

#[derive(Debug)]
pub struct TestResponse {
    pub status: StatusCode,
    pub version: http::Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl TestResponse {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts the status and that the body is a problem+json document with that status.
    pub fn assert_problem(&self, status: u16) -> Value {
        assert_eq!(self.status, status, "{}", self.text());
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json"),
            "{}",
            self.text()
        );
        let body = self.json();
        assert_eq!(body["status"], status);
        assert_eq!(
            body["request_id"].as_str(),
            self.header("x-request-id"),
            "problem carries the request id"
        );
        assert!(body["title"].is_string() && body["detail"].is_string());
        body
    }
}

/// `paygate` run in `dir`, with no `PAYGATE_*` variables inherited from the test's
/// environment.
pub fn paygate_command(dir: &TempDir) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_paygate"));
    command.current_dir(&dir.0).env_remove("RUST_LOG");
    for (name, _) in std::env::vars() {
        if name.starts_with("PAYGATE_") {
            command.env_remove(name);
        }
    }
    command
}

/// Starts `paygate serve` in `dir` on an ephemeral port and returns it with the address it
/// logged. The caller owns the child and waits for it after signalling it.
#[allow(clippy::zombie_processes)]
pub fn serve(dir: &TempDir, extra: &[&str]) -> (std::process::Child, SocketAddr) {
    let (child, addr, _) = serve_logging(dir, extra, "info");
    (child, addr)
}

/// What a server process writes to its operational log (stderr), collected as it arrives
/// by a reader thread. Lock it to look at what arrived so far; [`ServerLog::complete`]
/// waits for the reader to reach the end (the process exited) and returns all of it.
pub struct ServerLog {
    text: Arc<std::sync::Mutex<String>>,
    reader: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::ops::Deref for ServerLog {
    type Target = std::sync::Mutex<String>;

    fn deref(&self) -> &Self::Target {
        &self.text
    }
}

impl ServerLog {
    /// Everything the process wrote, once its stderr has closed (call after it exited).
    pub fn complete(&self) -> String {
        if let Some(reader) = self.reader.lock().unwrap().take() {
            reader.join().unwrap();
        }
        self.text.lock().unwrap().clone()
    }
}

/// Like [`serve`] at log level `level`, also returning everything the server writes to its
/// operational log (stderr), as it arrives.
#[allow(clippy::zombie_processes)]
pub fn serve_logging(
    dir: &TempDir,
    extra: &[&str],
    level: &str,
) -> (std::process::Child, SocketAddr, ServerLog) {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let mut child = paygate_command(dir)
        .args(["serve", "--listen", "127.0.0.1:0"])
        // One process unless a test asks for more: signals and logs then concern it alone.
        .args(if extra.contains(&"--workers") {
            &[][..]
        } else {
            &["--workers", "1"][..]
        })
        .args(extra)
        .env("RUST_LOG", level)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let text = Arc::new(std::sync::Mutex::new(String::new()));
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    while let Some(line) = lines.next() {
        let line = line.unwrap();
        {
            let mut log = text.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
        if let Some(addr) = line.split("listening on https://").nth(1) {
            // Keep draining stderr so the server never blocks on a full pipe.
            let keep = text.clone();
            let reader = std::thread::spawn(move || {
                for line in lines.map_while(Result::ok) {
                    let mut log = keep.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
            });
            let log = ServerLog {
                text,
                reader: std::sync::Mutex::new(Some(reader)),
            };
            // In JSON lines the address is followed by the rest of the object.
            let end = addr
                .find(|c: char| !(c.is_ascii_hexdigit() || ".:[]".contains(c)))
                .unwrap_or(addr.len());
            return (child, addr[..end].parse().unwrap(), log);
        }
    }
    panic!("server exited before listening:\n{}", text.lock().unwrap());
}

/// Sends a signal (`TERM`, `INT`, ...) to a child process.
/// Waits (up to `secs`) until the shared log holds `needle` at least `count` times.
pub async fn wait_for_log(log: &std::sync::Mutex<String>, needle: &str, count: usize, secs: u64) {
    for _ in 0..secs * 20 {
        if log.lock().unwrap().matches(needle).count() >= count {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!(
        "no {needle:?} (x{count}) in the log:\n{}",
        log.lock().unwrap()
    );
}

/// Runs `paygate audit verify` on the data directory in `dir`, asserts it passes, and
/// returns what it printed.
pub fn verify_audit(dir: &TempDir) -> String {
    let output = paygate_command(dir)
        .args(["audit", "verify"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

pub fn signal(child: &std::process::Child, name: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Waits up to 20 s for a child to exit.
pub fn wait_exit(child: &mut std::process::Child) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(std::time::Instant::now() < deadline, "server did not exit");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Every audit file under the data directory `data`, concatenated (order of instances and
/// files).
pub fn audit_text(data: &std::path::Path) -> String {
    let audit = data.join(paygate::audit::AUDIT_DIR);
    let mut text = String::new();
    for (_, dir) in paygate::audit::instance_dirs(&audit).unwrap() {
        for (_, file) in paygate::audit::writer::log_files(&dir).unwrap() {
            text.push_str(&std::fs::read_to_string(file).unwrap());
        }
    }
    text
}

/// A server process that a failing test must not leave running (it, or its workers, would
/// hold the test harness's pipes open and hang the run): SIGTERM on drop, then wait.
pub struct StopOnDrop(pub std::process::Child);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            signal(&self.0, "TERM");
            let _ = self.0.wait();
        }
    }
}

/// A new, empty database on the PostgreSQL cluster `PAYGATE_TEST_DATABASE` names (a role
/// that may create databases; `bash scripts/pg.sh run cargo test` provides one), named
/// `{tag}_<random>`; its URL.
/// Whether the tests that speak to one server run it on PostgreSQL
/// (`PAYGATE_TEST_BACKEND=postgres`, with `PAYGATE_TEST_DATABASE` as for the PostgreSQL
/// tests) rather than SQLite in its data directory.
pub fn on_postgres() -> bool {
    match std::env::var("PAYGATE_TEST_BACKEND").as_deref() {
        Ok("postgres") => true,
        Ok("sqlite") | Err(_) => false,
        Ok(other) => panic!("PAYGATE_TEST_BACKEND={other}: expected sqlite or postgres"),
    }
}

pub async fn fresh_database(tag: &str) -> String {
    let base = std::env::var("PAYGATE_TEST_DATABASE").expect(
        "PAYGATE_TEST_DATABASE is not set: run the tests as `bash scripts/pg.sh run cargo test`, \
         which starts a throwaway PostgreSQL for them",
    );
    let (client, connection) = tokio_postgres::connect(&base, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let name = format!("{tag}_{}", uuid::Uuid::new_v4().simple());
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let (prefix, _) = base.rsplit_once('/').unwrap();
    format!("{prefix}/{name}")
}

/// Decodes base32 (RFC 4648, upper case, no padding), as TOTP secrets are shown.
pub fn base32_decode(text: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let (mut buffer, mut bits, mut out) = (0u32, 0, Vec::new());
    for c in text.bytes() {
        let value = ALPHABET.iter().position(|&a| a == c).unwrap() as u32;
        buffer = (buffer << 5) | value;
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push((buffer >> bits) as u8);
        }
    }
    out
}

/// A port free on 127.0.0.1 for a server the test starts to listen on, outside the kernel's ephemeral
/// range: one picked by binding port 0 lies inside it, where any outgoing connection made
/// before the server binds it (the suite makes many) can take it.
pub fn free_port() -> u16 {
    let (low, high) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| {
            let mut bounds = range.split_whitespace().map(str::parse::<u32>);
            Some((bounds.next()?.ok()?, bounds.next()?.ok()?))
        })
        .unwrap_or((32768, 60999));
    let candidates: Vec<u16> = (10000..=u16::MAX)
        .filter(|&port| !(low..=high).contains(&u32::from(port)))
        .collect();
    // Start somewhere different in every run, so that parallel runs do not race for one.
    let seed = std::process::id() as usize
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos() as usize;
    (0..candidates.len())
        .map(|i| candidates[(seed + i * 7919) % candidates.len()])
        .find(|&port| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok())
        .unwrap_or_else(|| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        })
}
