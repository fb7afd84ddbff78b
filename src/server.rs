//! The network side of a worker: accept TCP connections, terminate TLS, serve HTTP/1.1 and
//! HTTP/2 with hyper, and drain gracefully on shutdown.
//!
//! Every phase a client controls has a deadline (`--client-timeout`): the TLS handshake,
//! any time without a request in flight (before the first request — covering HTTP version
//! detection and the HTTP/2 preface — and between requests, for HTTP/1.1 and HTTP/2 alike),
//! each request's headers (hyper's header read timeout) and each request body. Concurrent connections are capped; beyond the cap,
//! connections wait in the kernel's backlog rather than costing memory here.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

use crate::app::App;
use crate::config::ServeConfig;
use crate::filter;
use crate::time::Clock;

/// Most concurrent HTTP/2 streams per connection.
const H2_MAX_STREAMS: u32 = 64;
/// Largest request head (request line and headers) accepted.
const MAX_HEADER_BYTES: usize = 16 * 1024;
/// How often answered Idempotency-Keys past their retention are deleted.
const SWEEP_INTERVAL: Duration = Duration::from_secs(3600);
/// How often expired sessions, revocations and capabilities are deleted.
const SESSION_SWEEP_INTERVAL: Duration = Duration::from_secs(600);
/// How often the JWT key file is looked at for a rotation.
const KEY_WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// Start-up failed; the message says what to fix.
#[derive(Debug)]
pub struct StartError(pub String);

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartError {}

/// A running server.
pub struct Running {
    local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    app: Arc<App>,
    certificate: Arc<crate::tls::CertificateStore>,
}

impl Running {
    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// SIGHUP: re-reads the TLS certificate and key (new connections use them; on any
    /// error the old pair stays and the error is returned) and the JWT signing keys.
    pub async fn reload(&self) -> Result<(), String> {
        self.app.tokens.keyring.refresh().await;
        let certificate = self.certificate.clone();
        tokio::task::spawn_blocking(move || certificate.reload().map_err(|e| e.to_string()))
            .await
            .map_err(|e| format!("reloading failed: {e}"))?
    }

    /// The state the server's requests share (for tests that inspect or inject faults).
    pub fn app(&self) -> Arc<App> {
        self.app.clone()
    }

    /// Stops accepting, lets in-flight requests finish within the shutdown timeout, and
    /// returns once the server has stopped.
    pub async fn shutdown(self) {
        // The receiver lives in the accept loop until it ends; a send error means it already
        // ended, which is what we want.
        let _ = self.stop.send(true);
        if let Err(e) = self.task.await {
            log::error!("the server task ended abnormally: {e}");
        }
    }
}

/// Opens the data directory and the listener, loads TLS, and starts serving.
pub async fn start(config: ServeConfig) -> Result<Running, StartError> {
    start_with_clock(config, Clock::system()).await
}

/// [`start`] with the clock the server's decisions read (tests advance theirs).
pub async fn start_with_clock(config: ServeConfig, clock: Clock) -> Result<Running, StartError> {
    crate::tls::ensure_certificate(&config.tls).map_err(|e| StartError(e.to_string()))?;
    let (tls, certificate) =
        crate::tls::server_config(&config.tls).map_err(|e| StartError(e.to_string()))?;
    let listen = config.listen;
    let data_dir = config.data_dir.clone();
    let app = App::start(config, clock)
        .await
        .map_err(|e| StartError(e.to_string()))?;
    // Before binding: a port shared with another deployment would split its clients.
    let claim =
        tokio::task::spawn_blocking(move || crate::deployment::Claim::take(listen, &data_dir))
            .await
            .map_err(|e| StartError(format!("claiming {listen} failed: {e}")))?
            .map_err(StartError)?;
    let listener =
        bind(listen).map_err(|e| StartError(format!("cannot listen on {listen}: {e}")))?;
    let local_addr = listener
        .local_addr()
        .map_err(|e| StartError(format!("cannot read the listening address: {e}")))?;

    crate::logging::set_worker(app.metrics.instance());
    let app = Arc::new(app);
    let (stop, stopped) = watch::channel(false);
    let acceptor = TlsAcceptor::from(tls);
    let task = tokio::spawn(serve(listener, acceptor, app.clone(), claim, stopped));
    log::info!("paygate listening on https://{local_addr}");
    Ok(Running {
        local_addr,
        stop,
        task,
        app,
        certificate,
    })
}

/// Binds the listening socket with `SO_REUSEPORT`, so several worker processes can listen
/// on the same address and the kernel spreads new connections among them; a worker that
/// restarts never closes the port for the others.
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// The HTTP builders: one per ALPN outcome, so a client that negotiated a protocol is held
/// to it and no bytes are spent guessing.
struct Protocols {
    auto: auto::Builder<TokioExecutor>,
    http1: auto::Builder<TokioExecutor>,
    http2: auto::Builder<TokioExecutor>,
}

impl Protocols {
    fn new(config: &ServeConfig) -> Self {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(config.client_timeout)
            .max_buf_size(MAX_HEADER_BYTES.max(8192) * 2);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(H2_MAX_STREAMS)
            .max_header_list_size(MAX_HEADER_BYTES as u32)
            .max_pending_accept_reset_streams(Some(20))
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(config.client_timeout);
        Protocols {
            http1: builder.clone().http1_only(),
            http2: builder.clone().http2_only(),
            auto: builder,
        }
    }

    fn for_alpn(&self, alpn: Option<&[u8]>) -> &auto::Builder<TokioExecutor> {
        match alpn {
            Some(b"h2") => &self.http2,
            Some(b"http/1.1") => &self.http1,
            _ => &self.auto,
        }
    }
}

async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    app: Arc<App>,
    claim: Option<Arc<crate::deployment::Claim>>,
    mut stopped: watch::Receiver<bool>,
) {
    let protocols = Arc::new(Protocols::new(&app.config));
    let slots = Arc::new(Semaphore::new(app.config.max_connections));
    let per_client = Arc::new(ClientConnections::new(
        app.config.max_connections_per_client,
    ));
    let graceful = GracefulShutdown::new();
    // The worker's own tasks, each ended and awaited at shutdown.
    let mut background = JoinSet::new();
    if let Some(claim) = claim {
        background.spawn(claim.keep());
    }
    every(
        &mut background,
        &app,
        SWEEP_INTERVAL,
        sweep_idempotency_keys,
    );
    every(
        &mut background,
        &app,
        crate::ratelimit::SWEEP_EVERY,
        sweep_rate_limits,
    );
    every(&mut background, &app, SESSION_SWEEP_INTERVAL, sweep_expired);
    every(
        &mut background,
        &app,
        KEY_WATCH_INTERVAL,
        watch_signing_keys,
    );
    every(
        &mut background,
        &app,
        crate::metrics::SNAPSHOT_EVERY,
        publish_metrics,
    );
    let archiving = match app.archive.is_some() {
        true => match ArchiveThread::start(app.clone()) {
            Ok(thread) => Some(thread),
            Err(e) => {
                log::error!("cannot start the audit archive's thread: {e}; nothing is shipped");
                None
            }
        },
        false => None,
    };
    // One task per client connection; finished ones are collected as the loop goes.
    let mut connections = JoinSet::new();

    loop {
        while connections.try_join_next().is_some() {}
        // Wait for a free connection slot before accepting, so excess clients queue in the
        // kernel backlog. The semaphore is never closed, so acquiring cannot fail.
        let permit = tokio::select! {
            _ = stopped.changed() => break,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let (tcp, peer) = tokio::select! {
            _ = stopped.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Typically EMFILE/ENFILE: back off briefly instead of spinning.
                    log::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // One address may not hold every slot: past its share, its new connections are
        // closed at once (a proxy the operator trusts speaks for many clients: exempt).
        let proxied = app
            .config
            .trusted_proxies
            .iter()
            .any(|c| c.contains(peer.ip()));
        let held = if proxied {
            None
        } else {
            match per_client.hold(peer.ip()) {
                Some(held) => Some(held),
                None => {
                    log::debug!("connection from {peer} closed: its address holds its share");
                    app.metrics.connection_refused();
                    continue;
                }
            }
        };
        let watcher = graceful.watcher();
        let (acceptor, app, protocols) = (acceptor.clone(), app.clone(), protocols.clone());
        connections.spawn(async move {
            if let Err(e) = serve_connection(tcp, peer, acceptor, app, protocols, watcher).await {
                log::debug!("connection from {peer}: {e}");
            }
            drop(held);
            drop(permit);
        });
    }

    drop(listener);
    if let Some(archiving) = archiving {
        archiving.stop().await;
    }
    background.abort_all();
    while let Some(ended) = background.join_next().await {
        if let Err(e) = ended {
            if e.is_panic() {
                log::error!("a background task panicked: {e}");
            }
        }
    }
    let timeout = app.config.shutdown_timeout;
    log::info!(
        "stopped accepting; draining {} connection(s) for up to {}s",
        graceful.count(),
        timeout.as_secs()
    );
    match tokio::time::timeout(timeout, graceful.shutdown()).await {
        Ok(()) => log::info!("all connections drained"),
        Err(_) => log::warn!(
            "shutdown timeout of {}s passed with requests still in flight; closing them",
            timeout.as_secs()
        ),
    }
    // Past the deadline, connection tasks still running (a TLS handshake, a slow body) are
    // ended here, and awaited: no request can reach the audit log once it is closed.
    connections.abort_all();
    while connections.join_next().await.is_some() {}
    // No request is served any more: writers on other nodes need not wait for this one.
    app.cache.end_lease().await;
    // Every record queued by the drained requests is written and synced before exit.
    let flushing = app.clone();
    let flushed = tokio::task::spawn_blocking(move || {
        crate::metrics::remove_snapshot(&flushing.config.data_dir, flushing.metrics.instance());
        flushing.audit.close()
    })
    .await;
    match flushed {
        Ok(()) => log::info!("audit log flushed"),
        Err(e) => log::error!("closing the audit log failed: {e}"),
    }
}

/// The audit archive's work (see `audit::archive`) on a thread and runtime of its own:
/// reading, hashing and uploading segments of megabytes never holds up a request on the
/// worker's runtime (on the same runtime they added milliseconds to its p99 latency).
struct ArchiveThread {
    stop: Arc<tokio::sync::Notify>,
    thread: std::thread::JoinHandle<()>,
}

impl ArchiveThread {
    fn start(app: Arc<App>) -> std::io::Result<ArchiveThread> {
        let stop = Arc::new(tokio::sync::Notify::new());
        let stopping = stop.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread = std::thread::Builder::new()
            .name("paygate-archive".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let Some(archive) = &app.archive else {
                        return;
                    };
                    let mut ticks = tokio::time::interval(crate::audit::archive::ARCHIVE_EVERY);
                    loop {
                        tokio::select! {
                            () = stopping.notified() => return,
                            _ = ticks.tick() => {}
                        }
                        tokio::select! {
                            () = stopping.notified() => return,
                            () = archive.ship() => {}
                        }
                    }
                });
            })?;
        Ok(ArchiveThread { stop, thread })
    }

    /// Ends the archive's work (an upload under way is abandoned: its segment is shipped
    /// again at the next start, which create-only uploads make harmless) and waits for it.
    async fn stop(self) {
        self.stop.notify_one();
        let thread = self.thread;
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
}

/// Runs `job` every `period` (the first time at once) until the worker stops and aborts it.
/// A job reports its own failures; the next tick tries again.
fn every<F, Fut>(tasks: &mut JoinSet<()>, app: &Arc<App>, period: Duration, job: F)
where
    F: Fn(Arc<App>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let app = app.clone();
    tasks.spawn(async move {
        let mut ticks = tokio::time::interval(period);
        loop {
            ticks.tick().await;
            job(app.clone()).await;
        }
    });
}

/// Open connections per client address (IPv6 by /64, as rate limits count them), so that
/// one address cannot hold every connection slot of a worker.
struct ClientConnections {
    limit: usize,
    open: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
}

/// One connection counted for its address until dropped.
struct HeldConnection {
    owner: Arc<ClientConnections>,
    address: std::net::IpAddr,
}

impl ClientConnections {
    fn new(limit: usize) -> ClientConnections {
        ClientConnections {
            limit,
            open: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<std::net::IpAddr, usize>> {
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts a connection from `ip`, or `None` when its address holds its share already.
    fn hold(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<HeldConnection> {
        let address = match crate::ratelimit::ip_key(ip) {
            crate::ratelimit::BucketKey::Ip(address) => address,
            _ => ip,
        };
        let mut open = self.lock();
        let count = open.entry(address).or_default();
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(HeldConnection {
            owner: self.clone(),
            address,
        })
    }
}

impl Drop for HeldConnection {
    fn drop(&mut self) {
        let mut open = self.owner.lock();
        if let Some(count) = open.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.address);
            }
        }
    }
}

/// Serves one client connection through TLS and HTTP.
async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    app: Arc<App>,
    protocols: Arc<Protocols>,
    watcher: hyper_util::server::graceful::Watcher,
) -> io::Result<()> {
    tcp.set_nodelay(true)?;
    let counted = app.clone();
    let _open = counted.metrics.connection();
    let deadline = app.config.client_timeout;
    let tls = tokio::time::timeout(deadline, acceptor.accept(tcp))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
    let builder = protocols.for_alpn(tls.get_ref().1.alpn_protocol());

    // Tracks whether the connection is doing anything, so an idle one can be closed.
    let activity = Arc::new(Activity::new());
    let service = {
        let activity = activity.clone();
        service_fn(move |request| {
            let busy = activity.begin();
            let app = app.clone();
            async move {
                let response = filter::handle(&app, peer, request).await;
                drop(busy);
                Ok::<_, Infallible>(response)
            }
        })
    };
    let connection = watcher.watch(
        builder
            .serve_connection(TokioIo::new(tls), service)
            .into_owned(),
    );
    tokio::pin!(connection);
    // Idle deadline: no request in flight for `deadline` — before the first request (this
    // covers protocol detection and the HTTP/2 preface) and between requests (idle
    // keep-alive, for HTTP/2 as for HTTP/1.1) — closes the connection.
    let mut check_at = tokio::time::Instant::now() + deadline;
    loop {
        tokio::select! {
            served = &mut connection => return served.map_err(io::Error::other),
            () = tokio::time::sleep_until(check_at) => {}
        }
        match activity.idle_since() {
            Some(since) if since.elapsed() >= deadline => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "connection idle past the client timeout",
                ))
            }
            Some(since) => check_at = since + deadline,
            None => check_at = tokio::time::Instant::now() + deadline,
        }
    }
}

/// Requests in flight on one connection, and since when it has had none.
struct Activity {
    state: std::sync::Mutex<(usize, tokio::time::Instant)>,
}

/// Marks one request in flight until dropped.
struct Busy(Arc<Activity>);

impl Activity {
    fn new() -> Self {
        Activity {
            state: std::sync::Mutex::new((0, tokio::time::Instant::now())),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (usize, tokio::time::Instant)> {
        // Plain counters: a panic cannot leave them inconsistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn begin(self: &Arc<Self>) -> Busy {
        self.lock().0 += 1;
        Busy(self.clone())
    }

    /// When the connection last became idle, or `None` while requests are in flight.
    fn idle_since(&self) -> Option<tokio::time::Instant> {
        let (in_flight, since) = *self.lock();
        (in_flight == 0).then_some(since)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.0 -= 1;
        state.1 = tokio::time::Instant::now();
    }
}

/// Writes this worker's metrics where its siblings' `GET /metrics` finds them.
async fn publish_metrics(app: Arc<App>) {
    let samples = app.metrics.snapshot(app.audit.metrics());
    let publishing = app.clone();
    let written = tokio::task::spawn_blocking(move || {
        let (dir, instance) = (&publishing.config.data_dir, publishing.metrics.instance());
        crate::metrics::write_snapshot(dir, instance, &samples)
    })
    .await;
    match written {
        Ok(Ok(())) => {}
        Ok(Err(e)) => log::warn!("publishing this worker's metrics failed: {e}"),
        Err(e) => log::warn!("publishing this worker's metrics failed: {e}"),
    }
}

/// Deletes rate-limit buckets that have refilled (see `ratelimit`'s bounds).
async fn sweep_rate_limits(app: Arc<App>) {
    if let Err(e) = app.limiter.sweep().await {
        log::warn!("sweeping rate-limit buckets failed: {e}");
    }
}

/// Deletes expired sessions, revocations and capabilities (they are refused by their
/// expiry anyway; this only keeps the tables small).
async fn sweep_expired(app: Arc<App>) {
    match app.store.sweep_expired().await {
        Ok(0) => {}
        Ok(n) => log::info!("deleted {n} expired session(s), revocation(s) and capabilities"),
        Err(e) => log::warn!("sweeping sessions failed: {e}"),
    }
}

/// Looks at the JWT keys' source (the key file, or the shared database's table), so
/// `paygate keys rotate` reaches every worker within [`KEY_WATCH_INTERVAL`] without a
/// restart.
async fn watch_signing_keys(app: Arc<App>) {
    app.tokens.keyring.refresh().await;
}

/// Deletes answered Idempotency-Keys past their retention.
async fn sweep_idempotency_keys(app: Arc<App>) {
    match app.store.sweep_idempotency_keys().await {
        Ok(0) => {}
        Ok(n) => log::info!("deleted {n} expired idempotency key(s)"),
        Err(e) => log::warn!("sweeping idempotency keys failed: {e}"),
    }
}
