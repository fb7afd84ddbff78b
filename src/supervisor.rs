//! `paygate serve --workers N`: a small supervisor that runs N worker processes (this same
//! binary, re-executed with `--workers 1 --supervised --instance i`) on one port.
//!
//! Each worker binds the address itself with `SO_REUSEPORT`, so the kernel spreads
//! connections among them and a dying worker costs only the connections it held. The
//! supervisor restarts a worker that exits unexpectedly, after a back-off that doubles
//! from 100 ms to 5 s; a worker that crashes 5 times within a minute makes it give up
//! loudly (stop the others, exit 1). Commands travel on each worker's stdin — `reload`
//! (SIGHUP), `stop` (SIGTERM/SIGINT) — so no signal has to be sent to another process; a
//! worker whose stdin ends (the supervisor died) drains and stops too. A worker reports
//! `ready` on its stdout once it listens.
//!
//! SIGUSR2 rolls the workers over, one at a time: start a fresh worker (the binary now at
//! the path this one was started from), wait until it listens, then drain one old worker.
//! The port is never without a listener, so clients that retry on a closed idle connection
//! see no failure. A fresh worker that exits or is not listening within [`READY_TIMEOUT`]
//! stops the rollout; the workers not yet replaced keep serving.
//!
//! Worker instances (the names of their audit chains) are numbers from 1 to N + 1: a
//! rollout's extra worker takes the free one, so audit directories never multiply. With
//! `--instance NAME` the supervisor's workers are `NAME-1` … `NAME-<N+1>`, so two
//! supervisors can share one data directory on purpose, each with its own chains.

use std::collections::VecDeque;
use std::io::{BufRead as _, Write as _};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

type Failure = Box<dyn std::error::Error>;

/// Crashes of one worker within [`CRASH_WINDOW`] that make the supervisor give up.
const CRASH_LIMIT: usize = 5;
const CRASH_WINDOW: Duration = Duration::from_secs(60);
/// How long a rollout waits for a fresh worker to listen before it gives up.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// One running worker process.
struct Process {
    child: Child,
    /// Where commands go; closing it asks the worker to stop.
    stdin: ChildStdin,
    /// It said `ready`: its listener is bound and serving.
    ready: bool,
}

/// A worker slot: one instance number, restarted in place when its process crashes.
struct Worker {
    instance: u32,
    process: Option<Process>,
    /// Start times of recent crashes, for the back-off and the crash-loop limit.
    crashes: VecDeque<Instant>,
    restart_at: Option<Instant>,
    /// Asked to drain by a rollout: its exit is expected and ends the slot.
    retiring: bool,
}

impl Worker {
    fn send(&mut self, command: &str) {
        if let Some(process) = &mut self.process {
            if let Err(e) = writeln!(process.stdin, "{command}") {
                log::warn!(
                    "worker {} (pid {}): cannot send {command}: {e}",
                    self.instance,
                    process.child.id()
                );
            }
        }
    }
}

/// Where a rollout stands.
enum Rollout {
    Idle,
    /// `queue`: instances still to replace, in order; `step`: the replacement under way.
    Replacing {
        queue: VecDeque<u32>,
        step: Option<Step>,
    },
}

enum Step {
    /// `fresh` was started at `since` to take over from `old`.
    Starting {
        fresh: u32,
        old: u32,
        since: Instant,
    },
    /// `old` was asked to drain; the next replacement waits until it has exited.
    Draining { old: u32 },
}

/// How the supervisor starts a worker: the same binary and `serve` arguments every time.
struct Launcher {
    /// Resolved once at start: `/proc/self/exe` names a replaced binary "… (deleted)", while
    /// this path finds the new one that a rollout is meant to start.
    exe: PathBuf,
    args: Vec<String>,
    listen: SocketAddr,
    /// The supervisor's own `--instance`, which prefixes its workers' names.
    prefix: Option<String>,
    /// Lines the workers print on stdout, with the instance that printed them.
    lines: mpsc::UnboundedSender<(u32, String)>,
}

impl Launcher {
    /// The audit instance of worker number `instance`.
    fn name(&self, instance: u32) -> String {
        match &self.prefix {
            Some(prefix) => format!("{prefix}-{instance}"),
            None => instance.to_string(),
        }
    }

    fn spawn(&self, instance: u32) -> std::io::Result<Process> {
        let mut child = Command::new(&self.exe)
            .arg("serve")
            .args(&self.args)
            .args(["--workers", "1", "--supervised"])
            .arg("--listen")
            .arg(self.listen.to_string())
            .arg("--instance")
            .arg(self.name(instance))
            // Readiness is the supervisor's to report: a worker telling systemd on its own
            // would claim the whole service is up.
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(std::io::Error::other("no pipes to the worker"));
        };
        let lines = self.lines.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if lines.send((instance, line)).is_err() {
                    break;
                }
            }
        });
        // "started worker <its audit instance> (pid N)": the tests read this line.
        log::info!(
            "started worker {} (pid {})",
            self.name(instance),
            child.id()
        );
        Ok(Process {
            child,
            stdin,
            ready: false,
        })
    }
}

/// Creates (or migrates) the databases and keys of the data directory before any worker
/// starts, so the workers only open what exists. With a shared PostgreSQL database
/// (`shared`), only what stays per node: the sealing key and the audit log's files (each
/// worker connects, and the first one migrates the database).
fn prepare_data_dir(data_dir: &std::path::Path, shared: bool) -> Result<(), Failure> {
    if shared {
        crate::store::ensure_data_dir(data_dir)?;
        crate::store::sealing::TotpKeys::load_or_create(data_dir)?;
    } else {
        crate::store::Store::open(data_dir)?;
        crate::store::RateStore::open(data_dir)?;
        crate::tokens::keys::load_or_create(data_dir, crate::time::now_millis() / 1000)?;
    }
    crate::audit::load_or_create_key(data_dir)?;
    let audit_dir = data_dir.join(crate::audit::AUDIT_DIR);
    crate::secret_file::create_private_dir(&audit_dir)?;
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

/// `args` without `--instance NAME` (or `--instance=NAME`): each worker gets its own.
fn without_instance(args: Vec<String>) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len());
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        if arg == "--instance" {
            args.next();
        } else if !arg.starts_with("--instance=") {
            out.push(arg);
        }
    }
    out
}

/// Runs `workers` workers with the `serve` arguments `args` until SIGTERM/SIGINT.
pub fn run(args: Vec<String>, config: &crate::config::ServeConfig) -> Result<(), Failure> {
    let (workers, shutdown_timeout) = (config.workers, config.shutdown_timeout);
    if let Some(prefix) = &config.instance {
        // Workers are named `<prefix>-<n>`, and a name has at most 64 characters.
        if prefix.len() > 56 {
            return Err(format!(
                "--instance `{prefix}` is too long for a supervisor: its workers are named \
                 `{prefix}-1` and so on, at most 64 characters; use at most 56"
            )
            .into());
        }
    }
    // Once, here: workers starting together must not all generate a certificate, create
    // the databases and keys at the same moment.
    crate::tls::ensure_certificate(&config.tls)?;
    prepare_data_dir(&config.data_dir, config.database.is_some())?;
    let listen = shared_address(config.listen)?;
    let exe = std::env::current_exe()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let stop = crate::signals::stop()?;
        tokio::pin!(stop);
        let mut hangup = signal(SignalKind::hangup())?;
        let mut roll = signal(SignalKind::user_defined2())?;
        let (lines, mut said) = mpsc::unbounded_channel();
        let launcher = Launcher {
            exe,
            args: without_instance(args),
            listen,
            prefix: config.instance.clone(),
            lines,
        };
        let mut pool: Vec<Worker> = Vec::new();
        for instance in 1..=workers {
            pool.push(Worker {
                instance,
                process: Some(launcher.spawn(instance)?),
                crashes: VecDeque::new(),
                restart_at: None,
                retiring: false,
            });
        }
        log::info!("supervising {workers} workers on https://{listen}");
        let mut announced = false;
        let mut rollout = Rollout::Idle;
        let mut ticks = tokio::time::interval(Duration::from_millis(100));
        let outcome: Result<(), Failure> = loop {
            tokio::select! {
                () = &mut stop => break Ok(()),
                _ = hangup.recv() => {
                    log::info!("SIGHUP: asking every worker to reload");
                    pool.iter_mut().for_each(|w| w.send("reload"));
                }
                _ = roll.recv() => rollout = begin_rollout(rollout, &pool),
                Some((instance, line)) = said.recv() => {
                    if line.trim() == "ready" {
                        if let Some(worker) = pool.iter_mut().find(|w| w.instance == instance) {
                            if let Some(process) = &mut worker.process {
                                process.ready = true;
                            }
                        }
                        if !announced && pool.iter().all(|w| w.process.as_ref().is_some_and(|p| p.ready)) {
                            announced = true;
                            log::info!("all {workers} workers are listening on https://{listen}");
                            crate::systemd::notify(&format!(
                                "READY=1\nSTATUS={workers} workers listening on https://{listen}"
                            ));
                        }
                    } else {
                        log::warn!("worker {instance} said {line:?}");
                    }
                }
                _ = ticks.tick() => {
                    if let Err(e) = watch(&mut pool, &launcher, &mut rollout) {
                        break Err(e);
                    }
                    if let Err(e) = advance_rollout(&mut rollout, &mut pool, &launcher, workers) {
                        log::error!("rollout stopped: {e}; the workers not yet replaced keep serving");
                        rollout = Rollout::Idle;
                    }
                }
            }
        };
        crate::systemd::notify("STOPPING=1");
        stop_all(&mut pool, shutdown_timeout + Duration::from_secs(5));
        outcome
    })
}

/// SIGUSR2: queue every current worker for replacement (unless a rollout is running).
fn begin_rollout(rollout: Rollout, pool: &[Worker]) -> Rollout {
    if let Rollout::Replacing { .. } = rollout {
        log::warn!("SIGUSR2: a rollout is already running; ignored");
        return rollout;
    }
    let queue: VecDeque<u32> = pool
        .iter()
        .filter(|w| w.process.is_some() && !w.retiring)
        .map(|w| w.instance)
        .collect();
    log::info!(
        "SIGUSR2: rolling over {} workers, one at a time",
        queue.len()
    );
    Rollout::Replacing { queue, step: None }
}

/// Moves a rollout one step on, if the step it waits for has happened.
fn advance_rollout(
    rollout: &mut Rollout,
    pool: &mut Vec<Worker>,
    launcher: &Launcher,
    workers: u32,
) -> Result<(), String> {
    let Rollout::Replacing { queue, step } = rollout else {
        return Ok(());
    };
    match step {
        None => {
            // The next old worker that still runs (a crashed one restarted already runs
            // the new binary, but replacing it too is harmless and simpler to reason about).
            let Some(old) = queue.pop_front() else {
                log::info!("rollout complete: every worker was replaced");
                *rollout = Rollout::Idle;
                return Ok(());
            };
            if !pool
                .iter()
                .any(|w| w.instance == old && w.process.is_some())
            {
                return Ok(());
            }
            let Some(fresh) = (1..=workers + 1).find(|i| pool.iter().all(|w| w.instance != *i))
            else {
                return Err("no free worker instance".into());
            };
            let process = launcher
                .spawn(fresh)
                .map_err(|e| format!("cannot start worker {fresh}: {e}"))?;
            pool.push(Worker {
                instance: fresh,
                process: Some(process),
                crashes: VecDeque::new(),
                restart_at: None,
                retiring: false,
            });
            *step = Some(Step::Starting {
                fresh,
                old,
                since: Instant::now(),
            });
        }
        Some(Step::Starting { fresh, old, since }) => {
            let (fresh, old) = (*fresh, *old);
            let Some(index) = pool.iter().position(|w| w.instance == fresh) else {
                return Err(format!("worker {fresh} is gone"));
            };
            let ready = match &pool[index].process {
                Some(process) => process.ready,
                None => {
                    // It exited before listening: the new binary or configuration is bad.
                    pool.remove(index);
                    return Err(format!(
                        "the new worker {fresh} exited before it was listening"
                    ));
                }
            };
            if !ready {
                if since.elapsed() > READY_TIMEOUT {
                    let mut worker = pool.remove(index);
                    if let Some(mut process) = worker.process.take() {
                        let _ = process.child.kill();
                        let _ = process.child.wait();
                    }
                    return Err(format!(
                        "the new worker {fresh} was not listening within {} s",
                        READY_TIMEOUT.as_secs()
                    ));
                }
                return Ok(());
            }
            match pool
                .iter_mut()
                .find(|w| w.instance == old && w.process.is_some())
            {
                Some(worker) => {
                    log::info!("worker {fresh} is listening; draining worker {old}");
                    worker.retiring = true;
                    worker.send("stop");
                    *step = Some(Step::Draining { old });
                }
                // The old one crashed meanwhile; its slot would restart it: retire the slot.
                None => {
                    pool.retain(|w| w.instance != old);
                    *step = None;
                }
            }
        }
        Some(Step::Draining { old }) => {
            if pool.iter().all(|w| w.instance != *old) {
                *step = None;
            }
        }
    }
    Ok(())
}

/// Notices exited workers: a retiring one leaves the pool, any other is restarted when its
/// back-off has passed.
fn watch(
    pool: &mut Vec<Worker>,
    launcher: &Launcher,
    rollout: &mut Rollout,
) -> Result<(), Failure> {
    let now = Instant::now();
    let starting = match rollout {
        Rollout::Replacing {
            step: Some(Step::Starting { fresh, .. }),
            ..
        } => Some(*fresh),
        _ => None,
    };
    let mut drained = Vec::new();
    for worker in pool.iter_mut() {
        if let Some(process) = &mut worker.process {
            let Some(status) = process.child.try_wait()? else {
                continue;
            };
            let pid = process.child.id();
            worker.process = None;
            if worker.retiring {
                log::info!(
                    "worker {} (pid {pid}) drained and stopped ({status})",
                    worker.instance
                );
                drained.push(worker.instance);
                continue;
            }
            if starting == Some(worker.instance) {
                // The rollout decides about a fresh worker that dies before listening.
                log::error!(
                    "new worker {} (pid {pid}) exited ({status})",
                    worker.instance
                );
                continue;
            }
            log::error!(
                "worker {} (pid {pid}) exited unexpectedly ({status}); restarting it",
                worker.instance
            );
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
            worker.process = Some(launcher.spawn(worker.instance)?);
        }
    }
    pool.retain(|w| !drained.contains(&w.instance));
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
        let Some(Process {
            mut child, stdin, ..
        }) = worker.process.take()
        else {
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
