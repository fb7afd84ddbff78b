//! Checking audit chains, record by record and against the checkpoints kept outside the
//! files: `paygate audit verify` over a whole audit directory ([`verify_dir`]), and the
//! check a worker runs before it appends to its own chain ([`check_before_append`]).
//!
//! Detected: an edited line (its chain value no longer matches), a deleted, inserted or
//! reordered line (the chain and the sequence numbers break), a missing file, a torn last
//! line, a tail cut off (the files hold fewer records than the checkpoint, or another
//! record where the checkpoint's chain value was), a checkpoint moved without the audit key
//! (its MAC), and a checkpoint store that is missing while files exist.
//!
//! A chain may hold acknowledged breaks: `paygate audit seal` starts a new file whose first
//! record (`"phase":"break"`) chains from the last record that still verified and states
//! what was found and why the operator continued. Verification accepts damage *after* that
//! record and before the break, reports every break by name, and never calls such a log
//! plainly OK. Damage anywhere else is still an error.

use std::collections::HashMap;
use std::fmt;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};

use ring::hmac;
use serde_json::Value;

use super::record::{checkpoint_authentic, line_seq, unhex, verify_line, GENESIS};
use super::writer::{file_name, log_files, Head};
use crate::store::{Checkpoint, Checkpoints};

/// A verified audit directory.
#[derive(Debug, PartialEq, Eq)]
pub struct Report {
    pub records: u64,
    pub files: usize,
    pub chains: usize,
    /// Breaks an operator acknowledged with `paygate audit seal`, in chain order.
    pub breaks: Vec<AcknowledgedBreak>,
}

/// A break in a chain that `paygate audit seal` recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcknowledgedBreak {
    /// The file whose first record is the break record.
    pub file: PathBuf,
    /// When it was sealed (RFC 3339).
    pub time: String,
    /// What verification had found.
    pub found: String,
    /// The operator's reason.
    pub reason: String,
    /// The last record that verified before it.
    pub after_seq: u64,
}

impl fmt::Display for AcknowledgedBreak {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: sealed at {} after record {}; found: {}; reason given: {:?}",
            self.file.display(),
            self.time,
            self.after_seq,
            self.found,
            self.reason
        )
    }
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

/// Verifies every chain in `audit_dir` with `key`, from its first record.
pub fn verify_dir(audit_dir: &Path, key: &hmac::Key) -> Result<Report, Broken> {
    let instances = super::instance_dirs(audit_dir)
        .map_err(|e| broken(audit_dir, 0, format!("cannot list: {e}")))?;
    let checkpoints = Checkpoints::open_existing(audit_dir)
        .map_err(|e| broken(audit_dir, 0, format!("cannot open the checkpoints: {e}")))?;
    let mut report = Report {
        records: 0,
        files: 0,
        chains: 0,
        breaks: Vec::new(),
    };
    let mut seen = Vec::new();
    for (instance, dir) in &instances {
        let files = log_files(dir).map_err(|e| broken(dir, 0, format!("cannot list: {e}")))?;
        seen.push(instance.clone());
        if files.is_empty() {
            continue;
        }
        let checkpoint = match &checkpoints {
            None => {
                return Err(broken(
                    &audit_dir.join(crate::store::CHECKPOINTS_DB),
                    0,
                    "the checkpoint store is missing while audit files exist: a cut tail \
                     could not be told from an intact one",
                ))
            }
            Some(c) => c
                .load(instance)
                .map_err(|e| broken(audit_dir, 0, format!("cannot read the checkpoints: {e}")))?,
        };
        let checkpoint = authentic_checkpoint(dir, instance, key, checkpoint)?;
        let start = base(&files)?;
        let walked = walk(&files, start, key, Some(checkpoint.records))?.intact()?;
        check_end(&files, &walked, &checkpoint)?;
        if let Some(torn) = &walked.last.torn {
            return Err(broken(
                &walked.last.path,
                torn.line,
                "torn last line (left by a crash): start paygate once to set it aside, then \
                 verify again",
            ));
        }
        report.chains += 1;
        report.records += walked.records;
        report.files += files.len();
        report.breaks.extend(walked.breaks);
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

/// The checkpoint of an instance that has files, refused when it is missing or not
/// authenticated by the audit key.
fn authentic_checkpoint(
    dir: &Path,
    instance: &str,
    key: &hmac::Key,
    checkpoint: Option<Checkpoint>,
) -> Result<Checkpoint, Broken> {
    let Some(checkpoint) = checkpoint else {
        return Err(broken(
            dir,
            0,
            "audit files exist but the checkpoint store has no checkpoint for this chain: a \
             cut tail could not be told from an intact one",
        ));
    };
    let authentic = checkpoint.mac.is_some_and(|mac| {
        checkpoint_authentic(key, instance, checkpoint.records, &checkpoint.head, &mac)
    });
    if !authentic {
        return Err(broken(
            dir,
            0,
            format!(
                "the checkpoint of this chain ({} records) is not authenticated by the audit \
                 key: it was changed by someone without the key, or written by a paygate \
                 older than checkpoint MACs (after such an upgrade, `paygate audit seal \
                 --reason upgrade` authenticates it if the whole chain verifies against it; \
                 if this paygate was not just upgraded, treat it as tampering)",
                checkpoint.records
            ),
        ));
    }
    Ok(checkpoint)
}

/// What the files hold against what the checkpoint says: never fewer records, and the
/// checkpoint's chain value at its position.
fn check_end(
    files: &[(u32, PathBuf)],
    walked: &Walked,
    checkpoint: &Checkpoint,
) -> Result<(), Broken> {
    let last = files
        .last()
        .map_or_else(PathBuf::new, |(_, path)| path.clone());
    if checkpoint.records > walked.head.seq {
        return Err(broken(
            &last,
            walked.last.lines + 1,
            format!(
                "tail cut off: the checkpoint says {} records were made durable, the files \
                 hold {} (records {} to {} are missing from here on)",
                checkpoint.records,
                walked.head.seq,
                walked.head.seq + 1,
                checkpoint.records
            ),
        ));
    }
    if walked.at_checkpoint != Some(checkpoint.head) {
        return Err(broken(
            &last,
            0,
            format!(
                "record {} does not carry the chain value the checkpoint recorded: the chain \
                 was rewritten",
                checkpoint.records
            ),
        ));
    }
    Ok(())
}

/// What a worker may append to: where the chain ends, and the newest file's state.
pub struct AppendPoint {
    pub head: Head,
    /// The newest file; `None` when the instance has none yet.
    pub last: Option<LastFile>,
}

/// Checks the chain of `instance` (in `dir`, its `files`) before a worker appends to it:
/// from the file that holds the checkpoint's record to the end, every record must verify,
/// the checkpoint must be authentic and the files must reach it. Only a torn last line
/// after the checkpointed records is allowed (the caller sets it aside).
///
/// The work is bounded by the files after the checkpoint (normally the newest file alone,
/// at most `--audit-rotate-bytes`), not by the log's history: older files were checked
/// when they were written and are checked whole by `paygate audit verify`; their link to
/// the newest file is checked here (its first record chains from their last).
pub fn check_before_append(
    dir: &Path,
    instance: &str,
    files: &[(u32, PathBuf)],
    key: &hmac::Key,
    checkpoint: Option<Checkpoint>,
) -> Result<AppendPoint, Broken> {
    let genesis = Head {
        seq: 0,
        chain: GENESIS,
    };
    if files.is_empty() {
        return match checkpoint {
            Some(c) if c.records > 0 => Err(broken(
                dir,
                0,
                format!(
                    "the checkpoint says {} records were made durable, but there is no audit \
                     file: the files were removed",
                    c.records
                ),
            )),
            _ => Ok(AppendPoint {
                head: genesis,
                last: None,
            }),
        };
    }
    let checkpoint = authentic_checkpoint(dir, instance, key, checkpoint)?;
    let start = start_near(files, checkpoint.records, base(files)?);
    let walked = walk(files, start, key, Some(checkpoint.records))?.intact()?;
    check_end(files, &walked, &checkpoint)?;
    Ok(AppendPoint {
        head: walked.head,
        last: Some(walked.last),
    })
}

/// Whether the whole chain, from its first record, verifies and reaches `checkpoint` (its
/// MAC aside): for authenticating a checkpoint written before checkpoints carried MACs.
pub fn whole_chain_reaches(
    files: &[(u32, PathBuf)],
    key: &hmac::Key,
    checkpoint: &Checkpoint,
) -> bool {
    if files.is_empty() {
        return checkpoint.records == 0;
    }
    let Ok(start) = base(files) else {
        return false;
    };
    match walk(files, start, key, Some(checkpoint.records)).and_then(Walked::intact) {
        Ok(walked) => walked.last.torn.is_none() && check_end(files, &walked, checkpoint).is_ok(),
        Err(_) => false,
    }
}

/// Verifies a chain's sealed segments as restored from the archive (from file 1, none
/// live): every record, the files' numbering and the chain across them, acknowledged
/// breaks. Returns the records and breaks, or the first damage.
pub fn verify_sealed(
    files: &[(u32, PathBuf)],
    key: &hmac::Key,
) -> Result<(u64, Vec<AcknowledgedBreak>), Broken> {
    let start = Start {
        index: 0,
        head: Head {
            seq: 0,
            chain: GENESIS,
        },
        first_number: 1,
    };
    let walked = walk(files, start, key, None)?.intact()?;
    if let Some(torn) = &walked.last.torn {
        return Err(broken(
            &walked.last.path,
            torn.line,
            "a torn last line in a sealed segment",
        ));
    }
    Ok((walked.records, walked.breaks))
}

/// The last record of a chain that verifies from its first record, stopping at the first
/// damage no acknowledged break follows (for `paygate audit seal`, which continues the
/// chain from there); `Err` when even that cannot be found (a forged break record).
pub fn last_good_record(files: &[(u32, PathBuf)], key: &hmac::Key) -> Result<Head, Broken> {
    let genesis = Head {
        seq: 0,
        chain: GENESIS,
    };
    if files.is_empty() {
        return Ok(genesis);
    }
    Ok(walk(files, base(files)?, key, None)?.head)
}

/// Where a walk starts: before the file at `index`, after the record `head`.
struct Start {
    index: usize,
    head: Head,
    /// The number the chain's first local file must have: 1, or the one after the last
    /// file deleted once archived.
    first_number: u32,
}

/// Where a chain's walk from its first local file starts: the genesis when that is file
/// 1; otherwise the end of the file before it, as `archived.jsonl` recorded it when that
/// file was archived (its local copy deleted after `--audit-local-retention`).
fn base(files: &[(u32, PathBuf)]) -> Result<Start, Broken> {
    let genesis = Start {
        index: 0,
        head: Head {
            seq: 0,
            chain: GENESIS,
        },
        first_number: 1,
    };
    let Some((first, path)) = files.first().filter(|(n, _)| *n > 1) else {
        return Ok(genesis);
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let head = super::archive::archived_head(dir, *first).map_err(|why| {
        broken(
            path,
            0,
            format!(
                "the chain's first local file is {}, but {why}",
                file_name(*first)
            ),
        )
    })?;
    Ok(Start {
        index: 0,
        head,
        first_number: *first,
    })
}

/// The newest file as a walk left it.
pub struct LastFile {
    pub number: u32,
    pub path: PathBuf,
    /// Its bytes as read.
    pub bytes: Vec<u8>,
    /// Bytes up to and including the last record that verified.
    pub good: usize,
    /// Lines that verified in it.
    pub lines: u64,
    /// A torn write after the last record: where it starts.
    pub torn: Option<Torn>,
}

/// What a crash mid-write left after the last whole record.
pub struct Torn {
    /// Its 1-based line number.
    pub line: u64,
}

/// What a walk found.
struct Walked {
    /// The last record that verified.
    head: Head,
    /// Records verified.
    records: u64,
    /// The chain value at the checkpoint's position, when the walk passed it.
    at_checkpoint: Option<[u8; 32]>,
    last: LastFile,
    breaks: Vec<AcknowledgedBreak>,
    /// Damage that no acknowledged break follows; `head` is then the last record before
    /// it that verified.
    damage: Option<Broken>,
}

impl Walked {
    /// The walk, or the damage it found.
    fn intact(mut self) -> Result<Walked, Broken> {
        match self.damage.take() {
            Some(damage) => Err(damage),
            None => Ok(self),
        }
    }
}

/// A break record's statements (trusted only once the record verifies).
struct BreakStatement {
    seq: u64,
    after: Head,
    time: String,
    found: String,
    reason: String,
}

/// The break record that `line` is, if it is one.
fn parse_break(line: &[u8]) -> Option<BreakStatement> {
    let value: Value = serde_json::from_slice(line).ok()?;
    if value.get("phase")?.as_str()? != "break" {
        return None;
    }
    let text = |name: &str| value.get(name)?.as_str().map(str::to_owned);
    Some(BreakStatement {
        seq: value.get("seq")?.as_u64()?,
        after: Head {
            seq: value.get("after_seq")?.as_u64()?,
            chain: unhex(text("after_chain")?.as_bytes())?,
        },
        time: text("time")?,
        found: text("found")?,
        reason: text("reason")?,
    })
}

/// The first line of a file (without its newline), if it has a whole one within 64 KiB.
fn first_line(path: &Path) -> Option<Vec<u8>> {
    let mut buffer = vec![0u8; 64 * 1024];
    let mut file = std::fs::File::open(path).ok()?;
    let mut filled = 0;
    while filled < buffer.len() {
        match file.read(&mut buffer[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(_) => return None,
        }
    }
    let end = buffer[..filled].iter().position(|&b| b == b'\n')?;
    buffer.truncate(end);
    Some(buffer)
}

/// The last record a closed file states (seq and chain value, not verified), if it ends
/// with a whole one.
fn last_record(path: &Path) -> Option<Head> {
    let mut file = std::fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    let from = len.saturating_sub(64 * 1024);
    file.seek(SeekFrom::Start(from)).ok()?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).ok()?;
    let body = bytes.strip_suffix(b"\n")?;
    let line = &body[body.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1)..];
    let unsealed = super::record::unseal(line)?;
    Some(Head {
        seq: line_seq(line)?,
        chain: unsealed.chain,
    })
}

/// The latest file whose records all come after the checkpoint's position (so a walk from
/// there passes it), with the chain state it starts from; the first file when no later one
/// can be used.
fn start_near(files: &[(u32, PathBuf)], checkpoint_records: u64, base: Start) -> Start {
    for index in (1..files.len()).rev() {
        let Some(first) = first_line(&files[index].1) else {
            continue;
        };
        let Some(seq) = line_seq(&first).filter(|&s| s > 0) else {
            continue;
        };
        if seq - 1 > checkpoint_records {
            continue;
        }
        if let Some(statement) = parse_break(&first) {
            return Start {
                index,
                head: statement.after,
                first_number: base.first_number,
            };
        }
        if let Some(head) = last_record(&files[index - 1].1).filter(|h| h.seq == seq - 1) {
            return Start {
                index,
                head,
                first_number: base.first_number,
            };
        }
    }
    base
}

/// Walks a chain from `start` to the end of its newest file, verifying every record,
/// accepting damage only where an acknowledged break follows it, and leaving a torn last
/// line in the newest file to the caller. `checkpoint` is the position whose chain value
/// the caller wants.
fn walk(
    files: &[(u32, PathBuf)],
    start: Start,
    key: &hmac::Key,
    checkpoint: Option<u64>,
) -> Result<Walked, Broken> {
    let mut head = start.head;
    let mut records = 0u64;
    // Chain values at the positions someone asks about: the checkpoint's, and the record
    // each break says it follows. Positions repeat across segments, so each segment keeps
    // its own.
    let mut wanted: Vec<u64> = checkpoint.into_iter().collect();
    let mut statements: HashMap<usize, BreakStatement> = HashMap::new();
    for (index, (_, path)) in files.iter().enumerate().skip(start.index) {
        if let Some(statement) = first_line(path).as_deref().and_then(parse_break) {
            wanted.push(statement.after.seq);
            statements.insert(index, statement);
        }
    }
    let mut seen: HashMap<u64, [u8; 32]> = HashMap::new();
    if wanted.contains(&head.seq) {
        seen.insert(head.seq, head.chain);
    }
    let mut at_checkpoint = None;
    let mut damage: Option<Broken> = None;
    let mut breaks = Vec::new();
    let mut last = None;
    for (index, (number, path)) in files.iter().enumerate().skip(start.index) {
        let newest = index + 1 == files.len();
        let expected_number = if index == 0 {
            start.first_number
        } else {
            files[index - 1].0.saturating_add(1)
        };
        if index == start.index && index > 0 {
            // The walk starts here: the file before it is not this walk's business.
        } else if *number != expected_number && damage.is_none() {
            damage = Some(broken(
                path,
                0,
                format!(
                    "file {} is missing: the chain jumps from file {} to {number}",
                    file_name(expected_number),
                    expected_number.saturating_sub(1),
                ),
            ));
        }
        let bytes =
            std::fs::read(path).map_err(|e| broken(path, 0, format!("cannot read: {e}")))?;
        let mut lines = 0u64;
        let mut good = 0usize;
        let mut torn = None;
        let mut offset = 0usize;
        if let Some(statement) = statements.remove(&index) {
            // A new segment: the break record must verify, chained from where it says the
            // last segment was intact, and that segment must really reach that record.
            let end = bytes
                .iter()
                .position(|&b| b == b'\n')
                .unwrap_or(bytes.len());
            let chain = verify_line(key, &statement.after.chain, &bytes[..end])
                .filter(|_| statement.seq == statement.after.seq + 1)
                .ok_or_else(|| {
                    broken(
                        path,
                        1,
                        "a break record that does not verify: it was forged or edited",
                    )
                })?;
            let reached = index == start.index
                || seen.get(&statement.after.seq) == Some(&statement.after.chain);
            if !reached {
                return Err(damage.take().unwrap_or_else(|| {
                    broken(
                        path,
                        1,
                        format!(
                            "the break record says the chain was intact up to record {}, but \
                             the files before it do not hold that record",
                            statement.after.seq
                        ),
                    )
                }));
            }
            breaks.push(AcknowledgedBreak {
                file: path.clone(),
                time: statement.time,
                found: statement.found,
                reason: statement.reason,
                after_seq: statement.after.seq,
            });
            damage = None;
            seen.clear();
            head = Head {
                seq: statement.seq,
                chain,
            };
            records += 1;
            lines = 1;
            offset = (end + 1).min(bytes.len());
            good = offset;
            if wanted.contains(&head.seq) {
                seen.insert(head.seq, head.chain);
            }
        }
        if damage.is_none() {
            while offset < bytes.len() {
                let Some(len) = bytes[offset..].iter().position(|&b| b == b'\n') else {
                    // What follows the last newline: nothing, zeros in the newest file
                    // (an earlier version's preallocation, or sectors a crash never
                    // wrote), or a torn write.
                    let rest = &bytes[offset..];
                    if rest.iter().all(|&b| b == 0) && newest {
                        break;
                    }
                    if newest {
                        torn = Some(Torn { line: lines + 1 });
                    } else {
                        damage = Some(broken(
                            path,
                            lines + 1,
                            "torn last line in a file that is not the newest",
                        ));
                    }
                    break;
                };
                let line = &bytes[offset..offset + len];
                let expected = head.seq + 1;
                match verify_line(key, &head.chain, line) {
                    Some(chain) if line_seq(line) == Some(expected) => {
                        head = Head {
                            seq: expected,
                            chain,
                        };
                        records += 1;
                        lines += 1;
                        offset += len + 1;
                        good = offset;
                        if wanted.contains(&expected) {
                            seen.insert(expected, chain);
                        }
                    }
                    verified => {
                        // In the newest file, a line with zeros in it (sectors a power cut
                        // never wrote) is a torn write, like a fragment without a newline.
                        let rest = &bytes[offset..];
                        let end = rest.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
                        if newest && verified.is_none() && rest[..end].contains(&0) {
                            torn = Some(Torn { line: lines + 1 });
                        } else {
                            damage = Some(line_damage(path, lines + 1, line, expected, verified));
                        }
                        break;
                    }
                }
            }
        }
        if newest {
            last = Some(LastFile {
                number: *number,
                path: path.clone(),
                bytes,
                good,
                lines,
                torn,
            });
        }
    }
    if let Some(position) = checkpoint {
        at_checkpoint = seen.get(&position).copied();
    }
    let last = last.ok_or_else(|| broken(Path::new("."), 0, "no audit file to walk"))?;
    Ok(Walked {
        head,
        records,
        at_checkpoint,
        last,
        breaks,
        damage,
    })
}

/// Why `line` (number `line_no`) does not continue the chain.
fn line_damage(
    path: &Path,
    line_no: u64,
    line: &[u8],
    expected: u64,
    verified: Option<[u8; 32]>,
) -> Broken {
    let found = line_seq(line);
    let why = match (verified, found) {
        (Some(_), _) => format!("record number {found:?} where {expected} was expected"),
        (None, _) if super::record::unseal(line).is_none() => {
            "not an audit record (no chain value)".to_owned()
        }
        (None, Some(s)) if s != expected => format!(
            "chain broken: record {expected} was expected here but this is record {s} (a line \
             was deleted, inserted or moved)"
        ),
        (None, _) => "chain broken: this line was edited, or the line before it was deleted, \
                      inserted or moved"
            .to_owned(),
    };
    broken(path, line_no, why)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::seal;

    fn key() -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, b"k")
    }

    /// A file of `n` records after `head`; returns its bytes and the new head.
    fn records(key: &hmac::Key, head: Head, n: u64) -> (Vec<u8>, Head) {
        let mut bytes = Vec::new();
        let mut head = head;
        for _ in 0..n {
            head.seq += 1;
            head.chain = seal(key, &head.chain, head.seq, br#"{"a":1}"#, &mut bytes);
        }
        (bytes, head)
    }

    fn dir_with(files: &[&[u8]]) -> (PathBuf, Vec<(u32, PathBuf)>) {
        let dir = std::env::temp_dir().join(format!("paygate-walk-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut list = Vec::new();
        for (i, bytes) in files.iter().enumerate() {
            let number = u32::try_from(i + 1).unwrap();
            let path = dir.join(file_name(number));
            std::fs::write(&path, bytes).unwrap();
            list.push((number, path));
        }
        (dir, list)
    }

    fn genesis() -> Start {
        Start {
            index: 0,
            head: Head {
                seq: 0,
                chain: GENESIS,
            },
            first_number: 1,
        }
    }

    #[test]
    fn torn_writes_are_told_from_damage() {
        let key = key();
        let (mut bytes, head) = records(&key, genesis().head, 3);
        let whole = bytes.len();
        // A fragment without a newline, then preallocated zeros: torn.
        bytes.extend_from_slice(br#"{"seq":4,"a":"#);
        bytes.extend_from_slice(&[0; 100]);
        let (dir, files) = dir_with(&[&bytes]);
        let walked = walk(&files, genesis(), &key, Some(3)).unwrap();
        assert_eq!(walked.head, head);
        assert_eq!(walked.last.good, whole);
        assert_eq!(walked.last.torn.as_ref().map(|t| t.line), Some(4));
        // A "line" with zeros in it (sectors never written): torn.
        bytes.truncate(whole);
        bytes.extend_from_slice(b"\0\0\0 tail of a record\n");
        std::fs::write(&files[0].1, &bytes).unwrap();
        assert!(walk(&files, genesis(), &key, None)
            .unwrap()
            .last
            .torn
            .is_some());
        // A whole line that does not verify, without zeros: damage, not a torn write.
        bytes.truncate(whole);
        bytes.extend_from_slice(b"{\"seq\":4,\"edited\":true}\n");
        std::fs::write(&files[0].1, &bytes).unwrap();
        let err = walk(&files, genesis(), &key, None).unwrap().damage.unwrap();
        assert_eq!(err.line, 4, "{err}");
        // Zeros alone after the last record are preallocated space.
        bytes.truncate(whole);
        bytes.extend_from_slice(&[0; 4096]);
        std::fs::write(&files[0].1, &bytes).unwrap();
        let walked = walk(&files, genesis(), &key, None).unwrap();
        assert!(walked.last.torn.is_none());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_walk_can_start_at_the_newest_file() {
        let key = key();
        let (first, head) = records(&key, genesis().head, 5);
        let (second, end) = records(&key, head, 4);
        let (dir, files) = dir_with(&[&first, &second]);
        // The checkpoint at record 7: the walk needs only the second file.
        let start = start_near(&files, 7, genesis());
        assert_eq!((start.index, start.head), (1, head));
        let walked = walk(&files, start, &key, Some(7)).unwrap();
        assert_eq!((walked.head, walked.records), (end, 4));
        assert!(walked.at_checkpoint.is_some());
        // A checkpoint inside the first file makes it walk both.
        assert_eq!(start_near(&files, 3, genesis()).index, 0);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_chain_continues_from_the_archived_record_of_its_deleted_files() {
        let key = key();
        let (first, head) = records(&key, genesis().head, 5);
        let (second, end) = records(&key, head, 4);
        let (dir, files) = dir_with(&[&first, &second]);
        std::fs::remove_file(&files[0].1).unwrap();
        let left = files[1..].to_vec();
        // Without a record of file 1 in the archive, it is missing.
        let err = base(&left).err().unwrap();
        assert!(err.why.contains("000001.jsonl is missing"), "{err}");
        let archived = |chain_head: [u8; 32]| {
            let hex: String = chain_head.iter().map(|b| format!("{b:02x}")).collect();
            let line = serde_json::json!({
                "file": "000001.jsonl", "key": "audit/n/1/000001.jsonl", "size": first.len(),
                "sha256": "00".repeat(32), "first_seq": 1, "last_seq": 5,
                "chain_head": hex, "archived_ms": 1,
            });
            let path = dir.join(super::super::archive::ARCHIVED_FILE);
            std::fs::write(path, format!("{line}\n")).unwrap();
        };
        archived(head.chain);
        let walked = walk(&left, base(&left).unwrap(), &key, Some(9))
            .unwrap()
            .intact()
            .unwrap();
        assert_eq!((walked.head, walked.records), (end, 4));
        // A record of file 1 that does not end where file 2 continues: the chain is broken.
        archived([7; 32]);
        let walked = walk(&left, base(&left).unwrap(), &key, Some(9)).unwrap();
        assert_eq!(walked.damage.unwrap().line, 1);
        let _ = std::fs::remove_dir_all(dir);
    }
}
