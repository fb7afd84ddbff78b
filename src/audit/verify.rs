//! `paygate audit verify`: checks every chain of an audit directory, record by record, and
//! against the checkpoints kept outside the files.
//!
//! Detected: an edited line (its chain value no longer matches), a deleted, inserted or
//! reordered line (the chain and the sequence numbers break), a missing file, a torn last
//! line, and a tail cut off (the files hold fewer records than the checkpoint, or another
//! record where the checkpoint's chain value was).

use std::fmt;
use std::path::{Path, PathBuf};

use ring::hmac;

use super::record::{unseal, verifies, GENESIS};
use super::writer::{file_name, log_files};
use crate::store::Checkpoints;

/// A verified audit directory.
#[derive(Debug, PartialEq, Eq)]
pub struct Report {
    pub records: u64,
    pub files: usize,
    pub chains: usize,
}

/// The first problem found.
#[derive(Debug, PartialEq, Eq)]
pub struct Broken {
    pub file: PathBuf,
    /// 1-based line number; 0 when the problem is the file as a whole.
    pub line: u64,
    pub why: String,
}

impl fmt::Display for Broken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.why)
        } else {
            write!(f, "{}:{}: {}", self.file.display(), self.line, self.why)
        }
    }
}

fn broken(file: &Path, line: u64, why: impl Into<String>) -> Broken {
    Broken {
        file: file.to_owned(),
        line,
        why: why.into(),
    }
}

/// Verifies every chain in `audit_dir` with `key`.
pub fn verify_dir(audit_dir: &Path, key: &hmac::Key) -> Result<Report, Broken> {
    let instances = super::instance_dirs(audit_dir)
        .map_err(|e| broken(audit_dir, 0, format!("cannot list: {e}")))?;
    let checkpoints = Checkpoints::open_existing(audit_dir)
        .map_err(|e| broken(audit_dir, 0, format!("cannot open the checkpoints: {e}")))?;
    let mut report = Report {
        records: 0,
        files: 0,
        chains: 0,
    };
    let mut seen = Vec::new();
    for (instance, dir) in &instances {
        let checkpoint = match &checkpoints {
            None => None,
            Some(c) => c
                .load(instance)
                .map_err(|e| broken(audit_dir, 0, format!("cannot read the checkpoints: {e}")))?,
        };
        let (records, files) = verify_chain(dir, key, checkpoint)?;
        if files > 0 {
            report.chains += 1;
        }
        report.records += records;
        report.files += files;
        seen.push(instance.clone());
    }
    if let Some(checkpoints) = &checkpoints {
        let known = checkpoints
            .instances()
            .map_err(|e| broken(audit_dir, 0, format!("cannot read the checkpoints: {e}")))?;
        if let Some(missing) = known.iter().find(|i| !seen.contains(i)) {
            return Err(broken(
                &audit_dir.join(missing),
                0,
                "the checkpoints know this chain, but its directory is gone",
            ));
        }
    }
    Ok(report)
}

/// Verifies one instance's chain; returns its record and file counts.
fn verify_chain(
    dir: &Path,
    key: &hmac::Key,
    checkpoint: Option<crate::store::Checkpoint>,
) -> Result<(u64, usize), Broken> {
    let files = log_files(dir).map_err(|e| broken(dir, 0, format!("cannot list: {e}")))?;
    let mut prev = GENESIS;
    let mut seq = 0u64;
    let mut at_checkpoint: Option<[u8; 32]> = None;
    for (index, (number, path)) in files.iter().enumerate() {
        let expected_number = u32::try_from(index + 1).unwrap_or(u32::MAX);
        if *number != expected_number {
            return Err(broken(
                path,
                0,
                format!(
                    "file {} is missing: the chain jumps from file {} to {}",
                    file_name(expected_number),
                    expected_number - 1,
                    number
                ),
            ));
        }
        let bytes =
            std::fs::read(path).map_err(|e| broken(path, 0, format!("cannot read: {e}")))?;
        let mut lines = bytes.split(|&b| b == b'\n').peekable();
        let mut line_no = 0u64;
        while let Some(line) = lines.next() {
            if lines.peek().is_none() {
                // What follows the last newline must be nothing — or, in the file being
                // written, zeros preallocated for the next records.
                let preallocated = index + 1 == files.len() && line.iter().all(|&b| b == 0);
                if !line.is_empty() && !preallocated {
                    return Err(broken(
                        path,
                        line_no + 1,
                        "torn last line (left by a crash): start paygate once to set it \
                         aside, then verify again",
                    ));
                }
                break;
            }
            line_no += 1;
            let Some(unsealed) = unseal(line) else {
                return Err(broken(
                    path,
                    line_no,
                    "not an audit record (no chain value)",
                ));
            };
            let found_seq = serde_json::from_slice::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("seq").and_then(serde_json::Value::as_u64));
            let expected = seq + 1;
            if !verifies(key, &prev, &unsealed) {
                let why = match found_seq {
                    Some(s) if s != expected => format!(
                        "chain broken: record {expected} was expected here but this is record \
                         {s} (a line was deleted, inserted or moved)"
                    ),
                    _ => "chain broken: this line was edited, or the line before it was \
                          deleted, inserted or moved"
                        .to_owned(),
                };
                return Err(broken(path, line_no, why));
            }
            if found_seq != Some(expected) {
                return Err(broken(
                    path,
                    line_no,
                    format!("record number {found_seq:?} where {expected} was expected"),
                ));
            }
            seq = expected;
            prev = unsealed.chain;
            if checkpoint.as_ref().is_some_and(|c| c.records == seq) {
                at_checkpoint = Some(prev);
            }
        }
    }
    if let Some(checkpoint) = checkpoint {
        let last = files
            .last()
            .map_or_else(|| dir.to_owned(), |(_, p)| p.clone());
        if checkpoint.records > seq {
            return Err(broken(
                &last,
                0,
                format!(
                    "tail cut off: the checkpoint says {} records were made durable, the files \
                     hold {seq}",
                    checkpoint.records
                ),
            ));
        }
        if at_checkpoint != Some(checkpoint.head) {
            return Err(broken(
                &last,
                0,
                format!(
                    "record {} does not carry the chain value the checkpoint recorded: the \
                     chain was rewritten",
                    checkpoint.records
                ),
            ));
        }
    }
    Ok((seq, files.len()))
}
