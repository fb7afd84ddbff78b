//! One worker process's life: start the server, say "ready", then obey signals and the
//! supervisor's commands until told to stop, and drain.
//!
//! A worker runs alone (`paygate serve`), under the supervisor (`--workers N`: commands
//! arrive one per line on stdin, "ready" goes out on stdout), or under systemd
//! (`paygate@N` units: `READY=1` and `STOPPING=1` over `$NOTIFY_SOCKET`). The command
//! loop is [`obey`], a function of its inputs, so tests drive it without signals.

use std::future::Future;
use std::io::{BufRead, Write as _};

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::config::ServeConfig;
use crate::server::Running;

type Failure = Box<dyn std::error::Error>;

/// Runs one worker until SIGTERM/SIGINT (or, supervised, the supervisor's `stop` or the
/// end of its stdin), then drains it. Builds the worker's runtime per `--worker-threads`.
pub fn run(config: ServeConfig) -> Result<(), Failure> {
    let supervised = config.supervised;
    let runtime = match config.worker_threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        threads => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(threads);
            builder
        }
    }
    .enable_all()
    .thread_name("paygate-worker")
    .build()?;
    runtime.block_on(async {
        // Handlers first: a signal that arrives as soon as the server says it is listening
        // must already mean "drain", not the default "die".
        let stop = crate::signals::stop()?;
        let mut hangup = signal(SignalKind::hangup())?;
        let (hung_up, hangups) = mpsc::unbounded_channel();
        let forward_hangups = async move {
            while hangup.recv().await.is_some() {
                if hung_up.send(()).is_err() {
                    break;
                }
            }
        };
        // SIGUSR2 rolls workers over, which only a supervisor can do; its default action
        // (terminate) would turn a mistaken rollout of a lone worker into an outage.
        let mut roll = signal(SignalKind::user_defined2())?;
        let running = crate::server::start(config).await?;
        crate::systemd::notify(&format!(
            "READY=1\nSTATUS=listening on https://{}",
            running.local_addr()
        ));
        if supervised {
            // The supervisor waits for this line before it drains an old worker (rollout).
            let mut out = std::io::stdout().lock();
            writeln!(out, "ready").and_then(|()| out.flush())?;
        }
        let rolls = async move {
            while roll.recv().await.is_some() {
                log::warn!(
                    "SIGUSR2 ignored: a rolling restart is done by the supervisor \
                     (`paygate serve --workers N`), or under systemd by restarting \
                     paygate@N units one at a time"
                );
            }
        };
        let inputs = Inputs {
            stop,
            commands: supervisor_commands(supervised),
            hangups,
        };
        // The signal forwarders never end on their own: the first branch decides.
        tokio::select! {
            () = obey(&running, inputs) => {}
            () = rolls => {}
            () = forward_hangups => {}
        }
        log::info!("stop signal received; shutting down");
        crate::systemd::notify("STOPPING=1");
        running.shutdown().await;
        Ok::<(), Failure>(())
    })?;
    log::info!("paygate stopped");
    Ok(())
}

/// What a running worker listens to.
pub struct Inputs<S> {
    /// Resolves when the worker must stop (SIGTERM/SIGINT).
    pub stop: S,
    /// The supervisor's commands, one per line (`reload`, `stop`); closed means stop.
    pub commands: mpsc::UnboundedReceiver<String>,
    /// One message per SIGHUP.
    pub hangups: mpsc::UnboundedReceiver<()>,
}

/// Serves until told to stop: reloads on `reload` or SIGHUP, returns on the stop signal,
/// on `stop`, or when the command channel closes (the supervisor is gone).
pub async fn obey<S: Future<Output = ()>>(running: &Running, inputs: Inputs<S>) {
    let Inputs {
        stop,
        mut commands,
        mut hangups,
    } = inputs;
    tokio::pin!(stop);
    loop {
        // In this order when several are ready: a stop wins, and a SIGHUP that arrived
        // before a command is served before it.
        tokio::select! {
            biased;
            () = &mut stop => return,
            Some(()) = hangups.recv() => match running.reload().await {
                Ok(()) => log::info!("SIGHUP: TLS certificate and signing keys reloaded"),
                Err(e) => log::error!("SIGHUP: {e}; the certificate in use stays"),
            },
            command = commands.recv() => match command.as_deref() {
                Some("reload") => match running.reload().await {
                    Ok(()) => log::info!("reloaded the TLS certificate and signing keys"),
                    Err(e) => log::error!("reload: {e}; the certificate in use stays"),
                },
                Some(other) if other != "stop" => log::warn!("unknown command {other:?}"),
                // `stop`, or stdin closed: the supervisor is stopping or gone.
                _ => return,
            },
        }
    }
}

/// Commands from the supervisor, one per stdin line, for a supervised worker. Unsupervised,
/// the channel never yields.
fn supervisor_commands(supervised: bool) -> mpsc::UnboundedReceiver<String> {
    let (send, receive) = mpsc::unbounded_channel();
    if supervised {
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                if send.send(line.trim().to_owned()).is_err() {
                    return;
                }
            }
            // End of input: dropping `send` closes the channel, which means stop.
        });
    } else {
        // Keep the sender alive for the life of the process: no command ever arrives.
        std::mem::forget(send);
    }
    receive
}
