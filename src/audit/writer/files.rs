//! An instance's files: their names, finding them in order, and opening the newest for
//! appending after the chain was checked — with a torn last line (a crash mid-write) moved
//! aside and cut off.

use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use ring::hmac;

use super::Head;
use crate::audit::file::AuditFile;
use crate::audit::record::checkpoint_mac;
use crate::audit::verify::check_before_append;
use crate::secret_file::sync_dir;
use crate::store::{Checkpoint, Checkpoints};

/// File name of the `n`th file of an instance.
pub fn file_name(n: u32) -> String {
    format!("{n:06}.jsonl")
}

/// The numbered log files of an instance directory, in order.
pub fn log_files(dir: &Path) -> std::io::Result<Vec<(u32, PathBuf)>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if let Some(n) = name
            .strip_suffix(".jsonl")
            .filter(|stem| stem.len() == 6)
            .and_then(|stem| stem.parse::<u32>().ok())
        {
            files.push((n, path));
        }
    }
    files.sort();
    Ok(files)
}

/// What [`open_instance`] found and prepared.
pub(super) struct Opened {
    pub(super) file: AuditFile,
    pub(super) number: u32,
    pub(super) head: Head,
    /// How old the file's first record is (`None`: the file is empty), by its `time`.
    pub(super) first_record_age: Option<std::time::Duration>,
}

/// Opens the newest file of an instance directory for appending, creating the first one
/// (and the chain's first checkpoint) if there is none — but only after the chain checks
/// out against its checkpoint ([`check_before_append`]): a worker never appends to a
/// chain that does not verify. A torn last line after the checkpointed records (left by a
/// crash mid-write) is moved to `<file>.<ms>.torn` and cut off, so the chain continues
/// from the last whole record; zeros after it (space an earlier version preallocated) are
/// cut off, so the file ends with its last record.
pub(super) fn open_instance(
    dir: &Path,
    instance: &str,
    key: &hmac::Key,
    checkpoints: &Checkpoints,
) -> Result<Opened, String> {
    let fail = |what: &str, e: &dyn std::fmt::Display| format!("{what} in {}: {e}", dir.display());
    let files = log_files(dir).map_err(|e| fail("cannot list the audit files", &e))?;
    let checkpoint = checkpoints
        .load(instance)
        .map_err(|e| fail("cannot read the audit checkpoint", &e))?;
    let fresh = checkpoint.is_none();
    let point = check_before_append(dir, instance, &files, key, checkpoint).map_err(|b| {
        format!(
            "the audit chain of instance {instance} does not verify up to its checkpoint, \
             so this worker will not append to it: {b}. Nothing was changed. Run `paygate \
             audit verify` to see the whole log; then restore the audit directory from a \
             backup, or, once the damage is understood, stop every worker on this data \
             directory and run `paygate audit seal --reason TEXT`, which continues in a new \
             chain segment whose first record states the break"
        )
    })?;
    let Some(last) = point.last else {
        // A new chain: its first checkpoint is durable before its first file exists, so
        // files without a checkpoint always mean a checkpoint store that was lost.
        if fresh {
            save_checkpoint(checkpoints, instance, key, point.head, true)
                .map_err(|e| fail("cannot record the audit chain's first checkpoint", &e))?;
        }
        let path = dir.join(file_name(1));
        let file = AuditFile::open(&path, true, 0)
            .map_err(|e| fail("cannot create the first audit file", &e))?;
        sync_dir(dir).map_err(|e| fail("cannot sync", &e))?;
        return Ok(Opened {
            file,
            number: 1,
            head: point.head,
            first_record_age: None,
        });
    };
    if last.torn.is_some() {
        // Keep what was written, without the preallocated zeros after it.
        let tail = &last.bytes[last.good..];
        let written = tail.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        let torn = last
            .path
            .with_extension(format!("jsonl.{}.torn", crate::time::now_millis()));
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&torn)
            .and_then(|mut file| {
                file.write_all(&tail[..written])?;
                file.sync_all()
            })
            .and_then(|()| OpenOptions::new().write(true).open(&last.path))
            .and_then(|file| {
                file.set_len(last.good as u64)?;
                file.sync_all()
            })
            .and_then(|()| sync_dir(dir))
            .map_err(|e| fail("cannot set a torn audit tail aside", &e))?;
        log::warn!(
            "audit file {} ended in a torn record ({written} bytes, left by a crash after the \
             last checkpointed record); moved it to {} and continued the chain from the last \
             whole record",
            last.path.display(),
            torn.display()
        );
    }
    let file = AuditFile::open(&last.path, false, last.good as u64)
        .map_err(|e| fail("cannot open the audit file", &e))?;
    Ok(Opened {
        file,
        number: last.number,
        head: point.head,
        first_record_age: first_record_age(&last.bytes[..last.good]),
    })
}

/// Saves `head` as the checkpoint of `instance`, with its MAC.
pub(crate) fn save_checkpoint(
    checkpoints: &Checkpoints,
    instance: &str,
    key: &hmac::Key,
    head: Head,
    durably: bool,
) -> Result<(), crate::store::StoreError> {
    let checkpoint = Checkpoint {
        records: head.seq,
        head: head.chain,
        mac: Some(checkpoint_mac(key, instance, head.seq, &head.chain)),
    };
    if durably {
        checkpoints.save_durably(instance, &checkpoint)
    } else {
        checkpoints.save(instance, &checkpoint)
    }
}

/// How long ago the first record of `records` (a file's content) was written, by its
/// `time`; `None` for an empty file. A first line without a readable time counts as new:
/// the file is then sealed one interval after this start at the latest.
fn first_record_age(records: &[u8]) -> Option<std::time::Duration> {
    let line = records
        .split(|&b| b == b'\n')
        .next()
        .filter(|l| !l.is_empty())?;
    let millis = serde_json::from_slice::<serde_json::Value>(line)
        .ok()
        .and_then(|record| crate::time::parse_rfc3339(record["time"].as_str()?));
    let age = millis.map_or(0, |at| crate::time::now_millis().saturating_sub(at));
    Some(std::time::Duration::from_millis(
        u64::try_from(age).unwrap_or(0),
    ))
}
