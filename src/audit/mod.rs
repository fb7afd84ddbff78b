//! The audit log: an append-only, fsync'd, HMAC-chained record of every request that gets
//! past rate limiting — written before access control runs, so a crash cannot hide an
//! attempt.
//!
//! Layout under the data directory:
//!
//! ```text
//! audit.key                  the chain's HMAC key (0600), apart from the log
//! audit/checkpoints.db       per instance: records made durable, last chain value
//! audit/<instance>/000001.jsonl, 000002.jsonl, …   one chain per writer instance
//! ```
//!
//! Each worker process writes its own chain (its *instance*: `--instance`, or the first
//! free number), under an exclusive lock on the instance directory. One chain per process
//! means no lock shared between processes on the request path, group commit within each
//! process, and a chain whose order is simply the order of that file. `paygate audit
//! verify` checks every chain.
//!
//! - [`record`]: the line format and the chain.
//! - [`writer`]: group commit, rotation, torn-tail recovery, failure handling.
//! - `file`: one file's durable appends, the file holding exactly its records.
//! - [`verify`]: checking a whole audit directory, and a chain before a worker appends.
//! - [`seal`]: continuing a damaged log on purpose, with a record of the break.
//! - [`read`]: recent records for `GET /audit`.

pub mod archive;
pub mod digest;
mod file;
pub mod read;
pub mod record;
pub mod seal;
pub mod signing;
pub mod verify;
pub mod verify_archive;
pub mod writer;

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

use crate::metrics::AuditMetrics;
use crate::secret_file::{read_private, sync_dir, write_private};
use record::Record;
use writer::AuditWriter;
pub use writer::{AuditUnavailable, Durable};

/// The audit directory inside the data directory.
pub const AUDIT_DIR: &str = "audit";
/// The audit key file inside the data directory (not inside the audit directory).
pub const KEY_FILE: &str = "audit.key";
/// Default size at which a file is rotated.
pub const DEFAULT_ROTATE_BYTES: u64 = 64 * 1024 * 1024;
/// Default age at which a file holding records is rotated, however small.
pub const DEFAULT_ROTATE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(3600);

/// When the file being written is sealed and the chain continues in the next: when a batch
/// would take it past `bytes`, or once its first record is `interval` old (checked even
/// while no request comes, so a quiet node seals its segments too). An empty file is never
/// sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    pub bytes: u64,
    pub interval: std::time::Duration,
}

impl Default for Rotation {
    fn default() -> Rotation {
        Rotation {
            bytes: DEFAULT_ROTATE_BYTES,
            interval: DEFAULT_ROTATE_INTERVAL,
        }
    }
}

/// Reads the audit key.
pub fn load_key(path: &Path) -> Result<hmac::Key, String> {
    let text = read_private(path)?;
    let mut secret = [0u8; 32];
    match URL_SAFE_NO_PAD.decode_slice(text.trim_ascii(), &mut secret) {
        Ok(32) => Ok(hmac::Key::new(hmac::HMAC_SHA256, &secret)),
        _ => Err(format!(
            "{} does not hold a 32-byte base64url key; restore it from a backup (without it \
             the existing audit chains cannot be verified)",
            path.display()
        )),
    }
}

/// Reads the audit key of `data_dir`, creating a random one on first start.
pub fn load_or_create_key(data_dir: &Path) -> Result<hmac::Key, String> {
    let path = data_dir.join(KEY_FILE);
    if !path.exists() {
        let mut secret = [0u8; 32];
        SystemRandom::new()
            .fill(&mut secret)
            .map_err(|_| "the system random generator failed".to_owned())?;
        let text = format!("{}\n", URL_SAFE_NO_PAD.encode(secret));
        match write_private(&path, text.as_bytes(), false) {
            Ok(()) => log::info!("created the audit key {}", path.display()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("cannot create {}: {e}", path.display())),
        }
    }
    load_key(&path)
}

/// Whether `name` can name an instance (and so a directory): 1–64 of `A-Z a-z 0-9 . _ -`,
/// not starting with a dot.
pub fn valid_instance(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Creates `dir` if needed, syncing its parent so the new entry survives a crash.
fn create_dir_durably(dir: &Path) -> Result<(), String> {
    if dir.is_dir() {
        return Ok(());
    }
    crate::secret_file::create_private_dir(dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    if let Some(parent) = dir.parent() {
        sync_dir(parent).map_err(|e| format!("cannot sync {}: {e}", parent.display()))?;
    }
    Ok(())
}

/// Takes the exclusive lock of an instance directory; `Ok(None)` if another process holds
/// it.
fn lock_instance(audit_dir: &Path, instance: &str) -> Result<Option<File>, String> {
    let dir = audit_dir.join(instance);
    create_dir_durably(&dir)?;
    let path = dir.join(".lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(format!("cannot lock {}: {e}", path.display())),
    }
}

/// A worker's audit log.
pub struct AuditLog {
    /// This writer's instance name (its chain).
    pub instance: String,
    /// `<instance>` as records show it in `worker`.
    pub pid: u32,
    /// `None` when auditing was switched off (`--audit off`, for measurements only).
    writer: Option<AuditWriter>,
    /// Held for the life of the process: one writer per chain.
    _lock: Option<File>,
    /// Records and fsync latency, counted by the writer thread.
    metrics: Arc<AuditMetrics>,
}

impl AuditLog {
    /// Opens the audit log of `data_dir` for `instance` (or the first free instance
    /// number), recovering a torn tail, and starts its writer. Blocking.
    pub fn open(
        data_dir: &Path,
        instance: Option<&str>,
        rotation: Rotation,
        enabled: bool,
    ) -> Result<AuditLog, String> {
        let pid = std::process::id();
        if !enabled {
            log::warn!(
                "AUDIT LOG OFF (--audit off): requests are served without an audit record; \
                 use this only to measure the audit log's cost"
            );
            return Ok(AuditLog {
                instance: instance.unwrap_or("off").to_owned(),
                pid,
                writer: None,
                _lock: None,
                metrics: Arc::default(),
            });
        }
        create_dir_durably(data_dir)?;
        let key = load_or_create_key(data_dir)?;
        // Every node has its signing key from its first start, so that its public key can
        // be given to auditors before anything is archived.
        signing::SigningKey::load_or_create(data_dir)?;
        let audit_dir = data_dir.join(AUDIT_DIR);
        create_dir_durably(&audit_dir)?;
        let (instance, lock) = match instance {
            Some(name) => match lock_instance(&audit_dir, name)? {
                Some(lock) => (name.to_owned(), lock),
                None => {
                    return Err(format!(
                        "audit instance {name} is in use by another paygate process on {}; \
                         give every worker its own --instance",
                        data_dir.display()
                    ))
                }
            },
            None => first_free_instance(&audit_dir)?,
        };
        let dir = audit_dir.join(&instance);
        let metrics = Arc::new(AuditMetrics::default());
        let writer =
            AuditWriter::start(&audit_dir, &dir, &instance, key, rotation, metrics.clone())?;
        log::info!("audit log: {}", dir.display());
        Ok(AuditLog {
            instance,
            pid,
            writer: Some(writer),
            _lock: Some(lock),
            metrics,
        })
    }

    /// The writer's figures; `None` when auditing is off.
    pub fn metrics(&self) -> Option<&AuditMetrics> {
        self.writer.as_ref().map(|_| &*self.metrics)
    }

    /// The archiver of this worker's chain in `data_dir`, shipping to `target`; `None`
    /// when auditing is off. Blocking.
    pub fn archiver(
        &self,
        data_dir: &Path,
        target: archive::ArchiveTarget,
    ) -> Result<Option<archive::Archiver>, String> {
        if self.writer.is_none() {
            return Ok(None);
        }
        archive::Archiver::open(target, data_dir, &self.instance, self.metrics.clone()).map(Some)
    }

    /// Queues a record now; the future resolves once it is on disk (at once when auditing
    /// is off). The future does not borrow the record.
    pub fn append_durably(&self, record: &impl Record) -> Durable {
        match &self.writer {
            Some(writer) => writer.append_durably(record),
            None => Durable::ready(Ok(())),
        }
    }

    /// Queues a record; it is written with the next group commit.
    pub fn append(&self, record: &impl Record) {
        if let Some(writer) = &self.writer {
            writer.append(record);
        }
    }

    /// Makes writes fail until called with `false` (fault-injection tests).
    pub fn inject_fault(&self, failing: bool) {
        if let Some(writer) = &self.writer {
            writer.inject_fault(failing);
        }
    }

    /// Writes everything queued and stops the writer. Blocking; call at shutdown.
    pub fn close(&self) {
        if let Some(writer) = &self.writer {
            writer.close();
        }
    }
}

fn first_free_instance(audit_dir: &Path) -> Result<(String, File), String> {
    for n in 1..=1024u32 {
        let name = n.to_string();
        if let Some(lock) = lock_instance(audit_dir, &name)? {
            return Ok((name, lock));
        }
    }
    Err(format!(
        "every audit instance from 1 to 1024 in {} is in use",
        audit_dir.display()
    ))
}

/// The directories of every instance in an audit directory, by name.
pub fn instance_dirs(audit_dir: &Path) -> std::io::Result<Vec<(String, PathBuf)>> {
    let mut dirs = Vec::new();
    for entry in fs::read_dir(audit_dir)? {
        let entry = entry?;
        if !entry.file_type()?.is_dir() {
            continue;
        }
        if let Some(name) = entry.file_name().to_str().filter(|n| valid_instance(n)) {
            dirs.push((name.to_owned(), entry.path()));
        }
    }
    dirs.sort();
    Ok(dirs)
}
