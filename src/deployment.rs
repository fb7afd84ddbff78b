//! One deployment per listening address.
//!
//! Workers bind their address with `SO_REUSEPORT`, so the kernel lets any number of
//! processes of the same user share it — including a second paygate started by mistake on
//! another data directory, between which the kernel would then split clients (a user
//! registered on one would be unknown on the other). So a worker that listens on a given
//! port first claims the address for its data directory: it binds the abstract Unix socket
//! `@paygate-listen/<address>` (Linux, scoped like the port to the network namespace, gone
//! with its process) and answers every connection to it with its canonical data directory.
//! A worker that finds the name taken asks the holder: the same data directory — the
//! supervisor's other workers, a rolling restart, systemd instances — shares the port; any
//! other is refused with a message naming the address. Workers that are not the holder
//! try to take the name over every second, so it stays claimed while any worker of the
//! deployment lives.
//!
//! A port of 0 asks the kernel for a fresh port, which nobody else can be serving: no claim.

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::os::linux::net::SocketAddrExt as _;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The claim of one worker on its listening address; released with the process.
pub struct Claim {
    name: UnixAddr,
    identity: Arc<String>,
    /// Whether this process holds the name (and answers on it).
    holding: std::sync::atomic::AtomicBool,
}

/// What a worker is told when it asks who holds an address.
fn identity_of(data_dir: &Path) -> Result<String, String> {
    let canonical: PathBuf = data_dir
        .canonicalize()
        .map_err(|e| format!("cannot resolve {}: {e}", data_dir.display()))?;
    Ok(format!("paygate {}\n", canonical.display()))
}

fn name_for(listen: SocketAddr) -> Result<UnixAddr, String> {
    UnixAddr::from_abstract_name(format!("paygate-listen/{listen}").as_bytes())
        .map_err(|e| format!("cannot name the claim on {listen}: {e}"))
}

/// Answers every connection on `listener` with `identity`, for the life of the process.
fn answer(listener: UnixListener, identity: Arc<String>) {
    let spawned = std::thread::Builder::new()
        .name("paygate-claim".into())
        .spawn(move || {
            // A failed accept or a peer that went away needs no answer.
            for mut stream in listener.incoming().flatten() {
                let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
                let _ = stream.write_all(identity.as_bytes());
            }
        });
    if let Err(e) = spawned {
        log::warn!("cannot answer for the listening address: {e}");
    }
}

/// Asks the holder of `name` which data directory it serves.
fn ask(name: &UnixAddr) -> std::io::Result<String> {
    let stream = UnixStream::connect_addr(name)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut answer = String::new();
    stream.take(4096).read_to_string(&mut answer)?;
    Ok(answer)
}

impl Claim {
    /// Claims `listen` for `data_dir`, or refuses when another deployment serves it.
    /// `None` for a port of 0.
    pub fn take(listen: SocketAddr, data_dir: &Path) -> Result<Option<Arc<Claim>>, String> {
        if listen.port() == 0 {
            return Ok(None);
        }
        let claim = Arc::new(Claim {
            name: name_for(listen)?,
            identity: Arc::new(identity_of(data_dir)?),
            holding: std::sync::atomic::AtomicBool::new(false),
        });
        // A holder that exits between our bind and our question frees the name: try again.
        for _ in 0..20 {
            if claim.try_hold() {
                return Ok(Some(claim));
            }
            match ask(&claim.name) {
                Ok(theirs) if theirs == *claim.identity => return Ok(Some(claim)),
                Ok(theirs) => {
                    let theirs = theirs.trim().trim_start_matches("paygate ");
                    return Err(format!(
                        "{listen} is already served by another paygate, on the data directory \
                         {theirs}; this one ({}) would split its clients with it. Give this \
                         one another --listen address, or stop the other first",
                        claim.identity.trim().trim_start_matches("paygate ")
                    ));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        Err(format!(
            "cannot tell who serves {listen}: the claim on it neither binds nor answers"
        ))
    }

    /// Takes the name if it is free; true when this process holds it (now or already).
    fn try_hold(&self) -> bool {
        if self.holding.load(std::sync::atomic::Ordering::Relaxed) {
            return true;
        }
        match UnixListener::bind_addr(&self.name) {
            Ok(listener) => {
                self.holding
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                answer(listener, self.identity.clone());
                true
            }
            Err(_) => false,
        }
    }

    /// Keeps the claim alive: takes the name over when its holder (another worker of this
    /// deployment) exits. Runs until this process holds it.
    pub async fn keep(self: Arc<Self>) {
        // A bind is one system call: cheap enough for the reactor, once a second.
        while !self.try_hold() {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}
