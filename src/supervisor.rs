//! `paygate serve --workers N`: a small supervisor that runs N worker processes (this same
//! binary, re-executed with `--workers 1 --supervised --instance i`) on one port.
//!
//! Each worker binds the address itself with `SO_REUSEPORT`, so the kernel spreads
//! connections among them and a dying worker costs only the connections it held. The
//! supervisor restarts a worker that exits unexpectedly, after a back-off that doubles
//! from 100 ms to 5 s; a worker that crashes 5 times within a minute makes it give up
//! loudly (stop the others, exit 1). Commands travel on each worker's stdin — `reload`
//! (SIGHUP), `stop` (SIGTERM/SIGINT) — so no signal has to be sent to another process; a
//! worker whose stdin ends (the supervisor died) drains and stops too.

use std::collections::VecDeque;
use std::io::Write as _;
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::signal::unix::{signal, SignalKind};

type Failure = Box<dyn std::error::Error>;

/// Crashes of one worker within [`CRASH_WINDOW`] that make the supervisor give up.
const CRASH_LIMIT: usize = 5;
const CRASH_WINDOW: Duration = Duration::from_secs(60);

struct Worker {
    instance: u32,
    process: Option<(Child, ChildStdin)>,
    crashes: VecDeque<Instant>,
    restart_at: Option<Instant>,
}

impl Worker {
    fn send(&mut self, command: &str) {
        if let Some((child, stdin)) = &mut self.process {
            if let Err(e) = writeln!(stdin, "{command}") {
                log::warn!(
                    "worker {} (pid {}): cannot send {command}: {e}",
                    self.instance,
                    child.id()
                );
            }
        }
    }
}

/// Creates (or migrates) the databases and keys of the data directory before any worker
/// starts, so the workers only open what exists.
fn prepare_data_dir(data_dir: &std::path::Path) -> Result<(), Failure> {
    crate::store::Store::open(data_dir)?;
    crate::store::RateStore::open(data_dir)?;
    crate::tokens::keys::load_or_create(data_dir, crate::time::now_millis() / 1000)?;
    crate::audit::load_or_create_key(data_dir)?;
    let audit_dir = data_dir.join(crate::audit::AUDIT_DIR);
    std::fs::create_dir_all(&audit_dir)?;
    crate::store::Checkpoints::open(&audit_dir)?;
    Ok(())
}

/// The address the workers share: a port of 0 is resolved once, here, so that every worker
/// binds the same one.
fn shared_address(listen: SocketAddr) -> Result<SocketAddr, Failure> {
    if listen.port() != 0 {
        return Ok(listen);
    }
    let probe = std::net::TcpListener::bind(listen)?;
    Ok(probe.local_addr()?)
}

fn spawn(
    args: &[String],
    listen: SocketAddr,
    instance: u32,
) -> std::io::Result<(Child, ChildStdin)> {
    let mut child = Command::new(std::env::current_exe()?)
        .arg("serve")
        .args(args)
        .args(["--workers", "1", "--supervised"])
        .arg("--listen")
        .arg(listen.to_string())
        .arg("--instance")
        .arg(instance.to_string())
        .stdin(Stdio::piped())
        .spawn()?;
    let stdin = child
        .stdin
        .take()
        .ok_or_else(|| std::io::Error::other("no stdin pipe"))?;
    log::info!("started worker {instance} (pid {})", child.id());
    Ok((child, stdin))
}

/// Runs `workers` workers with the `serve` arguments `args` until SIGTERM/SIGINT.
pub fn run(args: Vec<String>, config: &crate::config::ServeConfig) -> Result<(), Failure> {
    let (workers, shutdown_timeout) = (config.workers, config.shutdown_timeout);
    // Once, here: workers starting together must not all generate a certificate, create
    // the databases and keys at the same moment.
    crate::tls::ensure_certificate(&config.tls)?;
    prepare_data_dir(&config.data_dir)?;
    let listen = shared_address(config.listen)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut hangup = signal(SignalKind::hangup())?;
        let mut pool: Vec<Worker> = Vec::new();
        for instance in 1..=workers {
            pool.push(Worker {
                instance,
                process: Some(spawn(&args, listen, instance)?),
                crashes: VecDeque::new(),
                restart_at: None,
            });
        }
        log::info!("supervising {workers} workers on https://{listen}");
        let mut ticks = tokio::time::interval(Duration::from_millis(100));
        let outcome: Result<(), Failure> = loop {
            tokio::select! {
                _ = terminate.recv() => break Ok(()),
                _ = interrupt.recv() => break Ok(()),
                _ = hangup.recv() => {
                    log::info!("SIGHUP: asking every worker to reload");
                    pool.iter_mut().for_each(|w| w.send("reload"));
                }
                _ = ticks.tick() => {
                    if let Err(e) = watch(&mut pool, &args, listen) {
                        break Err(e);
                    }
                }
            }
        };
        stop_all(&mut pool, shutdown_timeout + Duration::from_secs(5));
        outcome
    })
}

/// Notices exited workers and restarts them when their back-off has passed.
fn watch(pool: &mut [Worker], args: &[String], listen: SocketAddr) -> Result<(), Failure> {
    let now = Instant::now();
    for worker in pool.iter_mut() {
        if let Some((child, _)) = &mut worker.process {
            let Some(status) = child.try_wait()? else {
                continue;
            };
            log::error!(
                "worker {} (pid {}) exited unexpectedly ({status}); restarting it",
                worker.instance,
                child.id()
            );
            worker.process = None;
            worker.crashes.push_back(now);
            while worker
                .crashes
                .front()
                .is_some_and(|t| now.duration_since(*t) > CRASH_WINDOW)
            {
                worker.crashes.pop_front();
            }
            if worker.crashes.len() >= CRASH_LIMIT {
                return Err(format!(
                    "worker {} crashed {CRASH_LIMIT} times within {} s; giving up (see its \
                     log lines above)",
                    worker.instance,
                    CRASH_WINDOW.as_secs()
                )
                .into());
            }
            let exponent = u32::try_from(worker.crashes.len() - 1).unwrap_or(0);
            let back_off =
                Duration::from_millis(100 * 2u64.pow(exponent)).min(Duration::from_secs(5));
            worker.restart_at = Some(now + back_off);
        }
        if worker.restart_at.is_some_and(|at| at <= now) {
            worker.restart_at = None;
            worker.process = Some(spawn(args, listen, worker.instance)?);
        }
    }
    Ok(())
}

/// Asks every worker to drain and waits for them, killing any still running at `deadline`.
fn stop_all(pool: &mut [Worker], deadline: Duration) {
    log::info!("stopping {} workers", pool.len());
    for worker in pool.iter_mut() {
        worker.send("stop");
    }
    let until = Instant::now() + deadline;
    for worker in pool.iter_mut() {
        let Some((mut child, stdin)) = worker.process.take() else {
            continue;
        };
        drop(stdin);
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    if !status.success() {
                        log::warn!("worker {} stopped with {status}", worker.instance);
                    }
                    break;
                }
                Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(20)),
                _ => {
                    log::error!(
                        "worker {} did not stop in time; killing it",
                        worker.instance
                    );
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
            }
        }
    }
    log::info!("all workers stopped");
}
