//! `paygate audit seal --reason TEXT`: how an operator continues a damaged audit log on
//! purpose.
//!
//! A worker refuses to append to a chain that does not verify up to its checkpoint. Once
//! the operator has looked at the damage (and kept a copy), sealing starts a new file for
//! each damaged chain whose first record — `"phase":"break"` — chains from the last record
//! that still verifies and states what verification found, the reason given and when. The
//! damaged files are left exactly as they are, as evidence; the checkpoint moves to the
//! break record (durably, with its MAC), and workers start again. From then on
//! `paygate audit verify` names every such break and exits 3, never plain OK.
//!
//! It takes each chain's instance lock, so it cannot run beside a worker writing that
//! chain.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use super::record::{body_of, push_hex, seal, BreakRecord};
use super::verify::{check_before_append, last_good_record, whole_chain_reaches};
use super::writer::{file_name, log_files, save_checkpoint, Head};
use super::{instance_dirs, load_key, lock_instance, AUDIT_DIR, KEY_FILE};
use crate::secret_file::sync_dir;
use crate::store::Checkpoints;
use crate::time::{format_rfc3339_millis, now_millis};

/// What sealing did to one chain.
#[derive(Debug)]
pub enum Sealed {
    /// The chain verifies up to its checkpoint; nothing was written.
    Intact { instance: String },
    /// The checkpoint was written before checkpoints carried a MAC, and the whole chain
    /// verifies against it: it now carries one. No break was needed.
    Authenticated { instance: String, records: u64 },
    /// A break record now starts `file`.
    Sealed {
        instance: String,
        file: PathBuf,
        /// What verification had found.
        found: String,
        /// The last record that verified, which the break record follows.
        after_seq: u64,
    },
}

/// Seals every damaged chain of `data_dir` (or only `only`), giving `reason`. Blocking.
pub fn seal_damaged(
    data_dir: &Path,
    only: Option<&str>,
    reason: &str,
) -> Result<Vec<Sealed>, String> {
    let reason = crate::domain::check_text("reason", reason.trim(), 1, 500)
        .map_err(|e| format!("--reason {e}"))?;
    let key = load_key(&data_dir.join(KEY_FILE))?;
    let audit_dir = data_dir.join(AUDIT_DIR);
    let instances = instance_dirs(&audit_dir)
        .map_err(|e| format!("cannot list {}: {e}", audit_dir.display()))?;
    let chosen: Vec<_> = instances
        .into_iter()
        .filter(|(name, _)| only.is_none_or(|only| only == name))
        .collect();
    if let (Some(only), true) = (only, chosen.is_empty()) {
        return Err(format!(
            "{} holds no audit chain named {only}",
            audit_dir.display()
        ));
    }
    // Created if it was deleted: sealing is how a log whose checkpoints were lost goes on.
    let checkpoints = Checkpoints::open(&audit_dir).map_err(|e| {
        format!(
            "cannot open the checkpoints in {}: {e}",
            audit_dir.display()
        )
    })?;
    let mut outcomes = Vec::new();
    for (instance, dir) in chosen {
        let Some(_lock) = lock_instance(&audit_dir, &instance)? else {
            return Err(format!(
                "audit chain {instance} is in use by a running paygate worker; stop every \
                 worker on {} first",
                data_dir.display()
            ));
        };
        let files = log_files(&dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
        let checkpoint = checkpoints
            .load(&instance)
            .map_err(|e| format!("cannot read the checkpoint of {instance}: {e}"))?;
        let found = match check_before_append(&dir, &instance, &files, &key, checkpoint.clone()) {
            Ok(_) => {
                outcomes.push(Sealed::Intact { instance });
                continue;
            }
            Err(found) => found.to_string(),
        };
        // An upgrade from a paygate whose checkpoints had no MAC: when the whole chain
        // verifies against the checkpoint as it is, authenticate it instead of a break.
        if let Some(legacy) = checkpoint.filter(|c| c.mac.is_none()) {
            if whole_chain_reaches(&files, &key, &legacy) {
                let head = Head {
                    seq: legacy.records,
                    chain: legacy.head,
                };
                save_checkpoint(&checkpoints, &instance, &key, head, true)
                    .map_err(|e| format!("cannot save the checkpoint of {instance}: {e}"))?;
                outcomes.push(Sealed::Authenticated {
                    instance,
                    records: legacy.records,
                });
                continue;
            }
        }
        let after = last_good_record(&files, &key)
            .map_err(|b| format!("cannot seal chain {instance}: {b}"))?;
        let number = files.last().map_or(1, |(n, _)| n + 1);
        let file = dir.join(file_name(number));
        let chain = write_break(&file, &instance, &key, after, &found, &reason)
            .map_err(|e| format!("cannot write {}: {e}", file.display()))?;
        save_checkpoint(
            &checkpoints,
            &instance,
            &key,
            Head {
                seq: after.seq + 1,
                chain,
            },
            true,
        )
        .map_err(|e| format!("cannot save the checkpoint of {instance}: {e}"))?;
        outcomes.push(Sealed::Sealed {
            instance,
            file,
            found,
            after_seq: after.seq,
        });
    }
    Ok(outcomes)
}

/// Writes the break record as the only line of a new file, durably; returns its chain
/// value.
fn write_break(
    file: &Path,
    instance: &str,
    key: &ring::hmac::Key,
    after: Head,
    found: &str,
    reason: &str,
) -> std::io::Result<[u8; 32]> {
    let mut after_chain = Vec::with_capacity(64);
    push_hex(&after.chain, &mut after_chain);
    let after_chain = String::from_utf8_lossy(&after_chain).into_owned();
    let time = format_rfc3339_millis(now_millis());
    let body = body_of(&BreakRecord {
        time: &time,
        phase: "break",
        worker: instance,
        found,
        reason,
        after_seq: after.seq,
        after_chain: &after_chain,
    });
    let mut line = Vec::with_capacity(body.len() + 100);
    let chain = seal(key, &after.chain, after.seq + 1, &body, &mut line);
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(file)?;
    out.write_all(&line)?;
    out.sync_all()?;
    if let Some(dir) = file.parent() {
        sync_dir(dir)?;
    }
    Ok(chain)
}
