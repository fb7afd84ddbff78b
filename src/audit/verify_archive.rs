//! `paygate audit verify --archive`: checking an audit archive with public keys only (and,
//! when given, the nodes' audit keys), as an auditor does.
//!
//! For every chain (`PREFIX/NODE/INSTANCE/`) in the archive:
//! - every digest (`digests/NNNNNN.json`) must be signed by a trusted key for that chain,
//!   and the digests must be numbered without a hole, each naming the one before it (key
//!   and signature) and starting where it ended;
//! - every segment a digest lists must be in the archive with the listed SHA-256 and size;
//! - the digests must list the segments without a hole, from file 1 to the newest listed,
//!   and their records must follow each other;
//! - with an audit key, every record of every listed segment must verify, the chain
//!   running across segments from the genesis (acknowledged breaks are reported).
//!
//! Whatever is wrong is named, all of it, not just the first: a deleted, replaced or added
//! object, a digest missing from the chain, a segment missing from the digests. Segments
//! archived after a chain's newest digest are not covered by any signature yet; they are
//! listed as such, not counted as damage (an auditor checks again after the next digest).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ring::hmac;

use super::archive::DIGESTS_DIR;
use super::digest::{chain_breaks, Digest, Segment};
use super::record::{line_seq, verify_line, GENESIS};
use super::verify::{verify_sealed, AcknowledgedBreak};
use super::writer::file_name;
use crate::s3::Bucket;

/// What was found about one chain.
#[derive(Debug)]
pub struct ChainReport {
    /// `NODE/INSTANCE`.
    pub chain: String,
    pub digests: usize,
    /// The time the verified digests cover, first start to last end.
    pub covered: Option<(String, String)>,
    /// Segments listed in the digests.
    pub segments: usize,
    /// The last record the listed segments hold.
    pub last_seq: u64,
    /// Records verified with an audit key; `None` when no key was given or not every
    /// listed segment could be read intact.
    pub records_checked: Option<u64>,
    pub breaks: Vec<AcknowledgedBreak>,
    /// Segment keys archived after the newest digest, not covered by a signature yet.
    pub pending: Vec<String>,
}

/// What `verify_archive` found.
#[derive(Debug, Default)]
pub struct ArchiveReport {
    pub chains: Vec<ChainReport>,
    /// Everything wrong, each naming its object.
    pub problems: Vec<String>,
}

/// The objects of one chain, by number.
#[derive(Default)]
struct Objects {
    segments: BTreeMap<u32, String>,
    digests: BTreeMap<u32, String>,
}

/// `NNNNNN` followed by `suffix`, as a number.
fn numbered(name: &str, suffix: &str) -> Option<u32> {
    name.strip_suffix(suffix)
        .filter(|stem| stem.len() == 6 && stem.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|stem| stem.parse().ok())
}

/// A digest, read and verified, under its key.
type Verified = (u32, String, Digest, String);

/// Verifies the archive under `prefix` in `bucket` with the `trusted` public keys, and
/// the records with whichever of `audit_keys` verifies each chain. With `save`, every
/// segment that matches its digest is written to `save/NODE/INSTANCE/NNNNNN.jsonl`.
/// Fails only when the archive cannot be read at all.
pub async fn verify_archive(
    bucket: &Bucket,
    prefix: &str,
    trusted: &[String],
    audit_keys: &[hmac::Key],
    save: Option<&Path>,
) -> Result<ArchiveReport, String> {
    let base = if prefix.is_empty() {
        String::new()
    } else {
        format!("{prefix}/")
    };
    let listed = bucket
        .list(&base)
        .await
        .map_err(|e| format!("cannot list s3://{}/{base}: {e}", bucket.name()))?;
    let mut report = ArchiveReport::default();
    let mut chains: BTreeMap<String, Objects> = BTreeMap::new();
    for object in listed {
        let rest = &object.key[base.len()..];
        let parts: Vec<&str> = rest.split('/').collect();
        let chain_of = |node: &str, instance: &str| {
            (super::valid_instance(node) && super::valid_instance(instance))
                .then(|| format!("{node}/{instance}"))
        };
        match parts.as_slice() {
            [node, instance, file] => {
                if let (Some(chain), Some(n)) = (chain_of(node, instance), numbered(file, ".jsonl"))
                {
                    chains
                        .entry(chain)
                        .or_default()
                        .segments
                        .insert(n, object.key);
                    continue;
                }
            }
            [node, instance, dir, file] if *dir == DIGESTS_DIR => {
                if let (Some(chain), Some(n)) = (chain_of(node, instance), numbered(file, ".json"))
                {
                    chains
                        .entry(chain)
                        .or_default()
                        .digests
                        .insert(n, object.key);
                    continue;
                }
            }
            _ => {}
        }
        report.problems.push(format!(
            "{}: added: not a segment or digest of any chain",
            object.key
        ));
    }
    for (chain, objects) in chains {
        let prefix = format!("{base}{chain}/");
        let found = verify_chain(bucket, &chain, &prefix, &objects, trusted, audit_keys, save)
            .await
            .map_err(|e| format!("cannot read the archive: {e}"))?;
        report.problems.extend(found.1);
        report.chains.push(found.0);
    }
    Ok(report)
}

/// Verifies one chain's objects; returns what was found and what is wrong.
async fn verify_chain(
    bucket: &Bucket,
    chain: &str,
    prefix: &str,
    objects: &Objects,
    trusted: &[String],
    audit_keys: &[hmac::Key],
    save: Option<&Path>,
) -> Result<(ChainReport, Vec<String>), String> {
    let mut problems = Vec::new();
    let digests = read_digests(bucket, chain, prefix, objects, trusted, &mut problems).await?;

    // The segments the digests list, by number.
    let mut listed: BTreeMap<u32, (Segment, String)> = BTreeMap::new();
    for (_, digest_key, digest, _) in &digests {
        for segment in &digest.segments {
            let number = segment
                .key
                .strip_prefix(prefix)
                .and_then(|file| numbered(file, ".jsonl"));
            let Some(number) = number else {
                problems.push(format!(
                    "{digest_key}: lists {}, which is not a segment of chain {chain}",
                    segment.key
                ));
                continue;
            };
            if let Some((_, first)) = listed.insert(number, (segment.clone(), digest_key.clone())) {
                problems.push(format!(
                    "{}: listed twice, in {first} and {digest_key}",
                    segment.key
                ));
            }
        }
    }
    let newest_listed = listed.keys().next_back().copied().unwrap_or(0);
    for (number, key) in objects.segments.range(..=newest_listed) {
        if !listed.contains_key(number) {
            problems.push(format!(
                "{key}: in the archive but in no digest (added, or left out of the digests)"
            ));
        }
    }
    for number in 1..=newest_listed {
        if !listed.contains_key(&number) && !objects.segments.contains_key(&number) {
            problems.push(format!(
                "{prefix}{}: a segment missing from the digests: no digest lists it and it \
                 is not in the archive",
                file_name(number)
            ));
        }
    }
    let pending: Vec<String> = objects
        .segments
        .range(newest_listed + 1..)
        .map(|(_, key)| key.clone())
        .collect();

    // Every listed segment: there, with the listed content.
    let mut intact: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
    for (number, (segment, digest_key)) in &listed {
        let there = match objects.segments.contains_key(number) {
            true => bucket
                .get(&segment.key)
                .await
                .map_err(|e| format!("{}: {e}", segment.key))?,
            false => None,
        };
        let Some(bytes) = there else {
            problems.push(format!(
                "{}: deleted: listed in {digest_key} but not in the archive",
                segment.key
            ));
            continue;
        };
        let sha256 = hex(ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref());
        if sha256 != segment.sha256 || bytes.len() as u64 != segment.size {
            problems.push(format!(
                "{}: replaced: {} bytes with SHA-256 {sha256}, but {digest_key} lists {} bytes \
                 with SHA-256 {}",
                segment.key,
                bytes.len(),
                segment.size,
                segment.sha256
            ));
            continue;
        }
        intact.insert(*number, bytes.to_vec());
    }
    // The records of consecutive segments follow each other (a segment opening with an
    // acknowledged break continues from the record the break names).
    // Where a file number is not listed, that is said above.
    let mut expected = (1, 1);
    for (number, (segment, _)) in &listed {
        let opens_with_break = intact
            .get(number)
            .is_some_and(|bytes| first_line_is_break(bytes));
        let (expected_number, expected_first) = expected;
        if *number == expected_number && segment.first_seq != expected_first && !opens_with_break {
            problems.push(format!(
                "{}: starts at record {} where record {expected_first} was expected: records \
                 are missing from the archive",
                segment.key, segment.first_seq
            ));
        }
        expected = (number + 1, segment.last_seq + 1);
    }

    if let Some(save) = save {
        let dir = save.join(chain);
        let failed = |e: std::io::Error| format!("cannot save to {}: {e}", dir.display());
        std::fs::create_dir_all(&dir).map_err(failed)?;
        for (number, bytes) in &intact {
            std::fs::write(dir.join(file_name(*number)), bytes).map_err(failed)?;
        }
    }
    let complete = !intact.is_empty() && intact.len() as u32 == newest_listed;
    let mut records_checked = None;
    let mut breaks = Vec::new();
    if complete && !audit_keys.is_empty() {
        match check_records(chain, prefix, &intact, audit_keys, save) {
            Ok((records, found)) => {
                records_checked = Some(records);
                breaks = found;
            }
            Err(problem) => problems.push(problem),
        }
    }
    let covered = match (digests.first(), digests.last()) {
        (Some(first), Some(last)) => Some((first.2.start.clone(), last.2.end.clone())),
        _ => None,
    };
    let report = ChainReport {
        chain: chain.to_owned(),
        digests: digests.len(),
        covered,
        segments: listed.len(),
        last_seq: listed.values().last().map_or(0, |(s, _)| s.last_seq),
        records_checked,
        breaks,
        pending,
    };
    Ok((report, problems))
}

/// Reads and verifies a chain's digests in number order, noting what is wrong with them
/// and with their chain; returns the ones whose signature verified.
async fn read_digests(
    bucket: &Bucket,
    chain: &str,
    prefix: &str,
    objects: &Objects,
    trusted: &[String],
    problems: &mut Vec<String>,
) -> Result<Vec<Verified>, String> {
    let mut digests: Vec<Verified> = Vec::new();
    for (number, key) in &objects.digests {
        let Some(bytes) = bucket.get(key).await.map_err(|e| format!("{key}: {e}"))? else {
            problems.push(format!("{key}: deleted while being verified"));
            continue;
        };
        match Digest::verify(&bytes, trusted) {
            Err(why) => problems.push(format!("{key}: replaced or forged: {why}")),
            Ok((digest, _)) if digest.node != chain => problems.push(format!(
                "{key}: a digest of chain {}, stored under {chain} (moved or copied)",
                digest.node
            )),
            Ok((digest, signature)) => digests.push((*number, key.clone(), digest, signature)),
        }
    }
    let newest = objects.digests.keys().next_back().copied().unwrap_or(0);
    for number in 1..newest {
        if !objects.digests.contains_key(&number) {
            problems.push(format!(
                "{prefix}{DIGESTS_DIR}/{number:06}.json: a digest missing from the chain \
                 (deleted: later digests exist)"
            ));
        }
    }
    if let Some((number, key, digest, _)) = digests.first() {
        if *number == 1 && digest.previous.is_some() {
            problems.push(format!("{key}: the first digest names a digest before it"));
        }
    }
    for pair in digests.windows(2) {
        let [(a, a_key, a_digest, a_signature), (b, b_key, b_digest, b_signature)] = pair else {
            continue;
        };
        if a + 1 != *b {
            // The digests between them are missing or were refused: said above.
            continue;
        }
        let both = [
            (a_key.clone(), a_digest.clone(), a_signature.clone()),
            (b_key.clone(), b_digest.clone(), b_signature.clone()),
        ];
        problems.extend(chain_breaks(&both));
    }
    Ok(digests)
}

/// Whether a segment opens with an acknowledged break record (`paygate audit seal`).
fn first_line_is_break(bytes: &[u8]) -> bool {
    let line = bytes.split(|&b| b == b'\n').next().unwrap_or_default();
    serde_json::from_slice::<serde_json::Value>(line)
        .ok()
        .is_some_and(|v| v["phase"] == "break")
}

/// Checks every record of a chain's intact segments (from file 1, none missing) with the
/// audit key that verifies its first record.
fn check_records(
    chain: &str,
    prefix: &str,
    intact: &BTreeMap<u32, Vec<u8>>,
    audit_keys: &[hmac::Key],
    save: Option<&Path>,
) -> Result<(u64, Vec<AcknowledgedBreak>), String> {
    let first = intact
        .values()
        .next()
        .and_then(|bytes| bytes.split(|&b| b == b'\n').next())
        .unwrap_or_default();
    let key = audit_keys
        .iter()
        .find(|key| verify_line(key, &GENESIS, first).is_some() && line_seq(first) == Some(1))
        .ok_or_else(|| {
            format!(
                "{prefix}{}: no audit key given verifies chain {chain}'s first record",
                file_name(1)
            )
        })?;
    // The walk reads files: the saved copies, or a scratch directory.
    let scratch;
    let dir: PathBuf = match save {
        Some(save) => save.join(chain),
        None => {
            scratch =
                Scratch::new().map_err(|e| format!("cannot make a scratch directory: {e}"))?;
            for (number, bytes) in intact {
                std::fs::write(scratch.0.join(file_name(*number)), bytes)
                    .map_err(|e| format!("cannot write a scratch copy: {e}"))?;
            }
            scratch.0.clone()
        }
    };
    let files: Vec<(u32, PathBuf)> = intact
        .keys()
        .map(|n| (*n, dir.join(file_name(*n))))
        .collect();
    verify_sealed(&files, key).map_err(|broken| {
        let name = broken
            .file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        match broken.line {
            0 => format!("{prefix}{name}: {}", broken.why),
            line => format!("{prefix}{name}: line {line}: {}", broken.why),
        }
    })
}

/// A private scratch directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> std::io::Result<Scratch> {
        let dir = std::env::temp_dir().join(format!("paygate-verify-{}", uuid::Uuid::new_v4()));
        crate::secret_file::create_private_dir(&dir)?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
