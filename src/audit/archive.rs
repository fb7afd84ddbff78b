//! Shipping sealed audit segments to S3-compatible storage, and signed digests of them,
//! off the request path.
//!
//! A worker's archiver looks at its chain's directory every few seconds. Every file but
//! the newest is sealed (`writer` never writes one again); each sealed file not yet
//! archived is uploaded create-only (`If-None-Match: *`) under
//! `PREFIX/NODE/INSTANCE/NNNNNN.jsonl`, with its SHA-256 for the service to check and
//! Object Lock retention in COMPLIANCE mode. An upload is confirmed when the service
//! created the object, or when the object already there has the same SHA-256 (uploaded
//! before a crash); then a line describing the segment is appended to `archived.jsonl` in
//! the chain's directory and synced. An object that is there with other content is never
//! overwritten: the archiver says so loudly and keeps the local copy.
//!
//! Digests: when the chain's archive starts, and then every `--audit-digest-interval`
//! (with traffic or without), the archiver writes a digest
//! (`PREFIX/NODE/INSTANCE/digests/NNNNNN.json`, see [`super::digest`]) listing the segments
//! archived since the last one, naming the last one's key and signature, signed with the
//! node's Ed25519 key. Each interval starts where the last one ended, also across
//! restarts, so the chain of digests has no gap in time. A digest is composed once and
//! kept in `digest.next` until its upload is confirmed, so a crash or an outage never
//! makes two digests follow the same one; confirmed digests are recorded in
//! `digests.jsonl`.
//!
//! Local copies: a sealed file is deleted once it is archived, listed in a confirmed
//! digest, and `--audit-local-retention` has passed since its upload. `archived.jsonl`
//! keeps what the deleted files held (their last record and chain value), so the chain
//! still verifies from the files that remain.
//!
//! While the service is unreachable or refuses, nothing is lost: the backlog stays on the
//! local disk, retries back off from 5 s to 5 min, `/metrics` shows the backlog and the
//! last successful upload, and the operational log warns when the trouble starts and every
//! 10 minutes while it lasts.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{json, Value};

use super::digest::{Digest, Segment};
use super::record::unhex;
use super::signing::SigningKey;
use super::writer::{file_name, log_files, Head};
use crate::metrics::AuditMetrics;
use crate::s3::{Bucket, Put};
use crate::time::{format_rfc3339_millis, now_millis};

/// How often a worker looks for sealed segments to ship.
pub const ARCHIVE_EVERY: Duration = Duration::from_secs(5);
/// The longest wait between attempts while the archive fails.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// How often a lasting failure is logged again.
const WARN_EVERY: Duration = Duration::from_secs(600);
/// The record of archived segments, in the chain's directory.
pub const ARCHIVED_FILE: &str = "archived.jsonl";
/// The record of confirmed digests, in the chain's directory.
pub const DIGESTS_FILE: &str = "digests.jsonl";
/// The digest being uploaded, kept until its upload is confirmed.
const NEXT_DIGEST_FILE: &str = "digest.next";
/// Where a chain's digests are, under its key prefix.
pub const DIGESTS_DIR: &str = "digests";

/// Where a worker's segments go.
pub struct ArchiveTarget {
    pub bucket: Bucket,
    /// The key prefix, without a trailing slash (may be empty).
    pub prefix: String,
    /// The node's name in object keys.
    pub node: String,
    /// How long each segment and digest is retained (COMPLIANCE), in days; 0 sends no
    /// retention (a bucket without Object Lock, or one whose default retention applies).
    pub retention_days: u64,
    /// How long each digest covers.
    pub digest_interval: Duration,
    /// How long a local copy is kept once archived and listed in a digest.
    pub local_retention: Duration,
}

/// A worker's archiver.
pub struct Archiver {
    target: ArchiveTarget,
    /// The chain's directory, and its name.
    dir: PathBuf,
    instance: String,
    signing: SigningKey,
    metrics: Arc<AuditMetrics>,
    state: tokio::sync::Mutex<State>,
}

/// A segment in the archive, and when its upload was confirmed (Unix ms).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Archived {
    segment: Segment,
    at_ms: i64,
}

/// The last confirmed digest of the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LastDigest {
    number: u32,
    key: String,
    signature: String,
    end_ms: i64,
    /// The newest file number listed in it or before it.
    through: u32,
}

/// A composed digest, stored until its upload is confirmed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NextDigest {
    last: LastDigest,
    body: String,
}

struct State {
    /// File number → what was archived.
    archived: BTreeMap<u32, Archived>,
    digest: Option<LastDigest>,
    next: Option<NextDigest>,
    /// While failing: since when, when to try next, the current back-off, last warning.
    failing: Option<Failing>,
}

struct Failing {
    since: Instant,
    next_try: Instant,
    backoff: Duration,
    warned: Instant,
}

impl Archiver {
    /// The archiver of `instance`'s chain in `data_dir`, reading what was archived and
    /// digested before. Blocking.
    pub fn open(
        target: ArchiveTarget,
        data_dir: &Path,
        instance: &str,
        metrics: Arc<AuditMetrics>,
    ) -> Result<Archiver, String> {
        let dir = data_dir.join(super::AUDIT_DIR).join(instance);
        let archived = read_archived(&dir.join(ARCHIVED_FILE))?;
        let digest = read_lines(&dir.join(DIGESTS_FILE))?
            .iter()
            .filter_map(LastDigest::from_json)
            .next_back();
        let next = read_next(&dir.join(NEXT_DIGEST_FILE))?;
        Ok(Archiver {
            target,
            dir,
            instance: instance.to_owned(),
            signing: SigningKey::load_or_create(data_dir)?,
            metrics,
            state: tokio::sync::Mutex::new(State {
                archived,
                digest,
                next,
                failing: None,
            }),
        })
    }

    /// The key prefix of this chain's objects.
    fn chain_prefix(&self) -> String {
        let path = format!("{}/{}", self.target.node, self.instance);
        if self.target.prefix.is_empty() {
            path
        } else {
            format!("{}/{path}", self.target.prefix)
        }
    }

    /// The object key of the `number`th file.
    fn key(&self, number: u32) -> String {
        format!("{}/{}", self.chain_prefix(), file_name(number))
    }

    /// The object key of the `number`th digest.
    fn digest_key(&self, number: u32) -> String {
        format!("{}/{DIGESTS_DIR}/{number:06}.json", self.chain_prefix())
    }

    fn retain_until(&self) -> Option<i64> {
        (self.target.retention_days > 0)
            .then(|| now_millis() + (self.target.retention_days as i64) * 86_400_000)
    }

    /// Ships every sealed segment not archived yet, oldest first, then the digest when
    /// one is due, then deletes local copies whose retention has passed — unless a failure
    /// asked to wait. Never fails: trouble is logged and counted, and the next round tries
    /// again.
    pub async fn ship(&self) {
        let mut state = self.state.lock().await;
        if state
            .failing
            .as_ref()
            .is_some_and(|f| Instant::now() < f.next_try)
        {
            return;
        }
        match self.ship_segments(&mut state).await {
            Ok(()) => {
                if let Err((what, why)) = self.ship_digest(&mut state).await {
                    self.failed(&mut state, &what, &why);
                }
                self.delete_old_copies(&state).await;
            }
            Err((what, why)) => self.failed(&mut state, &what, &why),
        }
        let dir = self.dir.clone();
        if let Ok(Ok(files)) = tokio::task::spawn_blocking(move || log_files(&dir)).await {
            let left: Vec<(u32, PathBuf)> = sealed(files)
                .into_iter()
                .filter(|(n, _)| !state.archived.contains_key(n))
                .collect();
            self.count_backlog(&left);
        }
    }

    /// Uploads the sealed segments not archived yet; on failure, which object and why.
    async fn ship_segments(&self, state: &mut State) -> Result<(), (String, String)> {
        let dir = self.dir.clone();
        let files = match tokio::task::spawn_blocking(move || log_files(&dir)).await {
            Ok(Ok(files)) => files,
            Ok(Err(e)) => return Err((self.dir.display().to_string(), e.to_string())),
            Err(e) => return Err((self.dir.display().to_string(), e.to_string())),
        };
        let pending: Vec<(u32, PathBuf)> = sealed(files)
            .into_iter()
            .filter(|(n, _)| !state.archived.contains_key(n))
            .collect();
        self.count_backlog(&pending);
        for (number, path) in pending {
            let segment = self
                .ship_one(number, &path)
                .await
                .map_err(|why| (self.key(number), why))?;
            let archived = Archived {
                segment,
                at_ms: now_millis(),
            };
            let line = archived_line(number, &archived);
            self.append(ARCHIVED_FILE, line)
                .await
                .map_err(|why| (ARCHIVED_FILE.to_owned(), why))?;
            log::info!(
                "audit archive: stored {} ({} bytes)",
                archived.segment.key,
                archived.segment.size
            );
            self.metrics.archive_uploaded(archived.at_ms);
            state.archived.insert(number, archived);
            self.recovered(state);
        }
        Ok(())
    }

    /// Appends `line` to `name` in the chain's directory, synced.
    async fn append(&self, name: &str, line: String) -> Result<(), String> {
        let path = self.dir.join(name);
        tokio::task::spawn_blocking(move || append_synced(&path, &line))
            .await
            .map_err(|e| e.to_string())?
    }

    /// Composes the digest when one is due (the first at once, then one per interval) and
    /// uploads the composed one until it is confirmed.
    async fn ship_digest(&self, state: &mut State) -> Result<(), (String, String)> {
        if state.next.is_none() {
            let now = now_millis();
            let interval = self.target.digest_interval.as_millis() as i64;
            let due = match &state.digest {
                None => true,
                Some(last) => now >= last.end_ms + interval,
            };
            if !due {
                return Ok(());
            }
            let next = self.compose(state, now);
            let path = self.dir.join(NEXT_DIGEST_FILE);
            let text = next.to_json().to_string();
            let written = tokio::task::spawn_blocking(move || {
                crate::secret_file::write_private(&path, text.as_bytes(), true)
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
            written.map_err(|why| (NEXT_DIGEST_FILE.to_owned(), why))?;
            state.next = Some(next);
        }
        let Some(next) = state.next.clone() else {
            return Ok(());
        };
        let key = next.last.key.clone();
        let body = Bytes::from(next.body.clone().into_bytes());
        let fail = |why: String| (key.clone(), why);
        let put = self
            .target
            .bucket
            .put_new(&key, body.clone(), self.retain_until())
            .await
            .map_err(|e| fail(e.to_string()))?;
        if matches!(put, Put::Exists) {
            let there = self
                .target
                .bucket
                .get(&key)
                .await
                .map_err(|e| fail(e.to_string()))?;
            if there.as_ref() != Some(&body) {
                log::error!(
                    "audit archive: {key} already holds another digest; it is not overwritten — \
                     investigate (another node with the same name and instance, or tampering)"
                );
                return Err(fail("the archive holds another digest at this key".into()));
            }
        }
        let line = format!("{}\n", next.last.to_json());
        self.append(DIGESTS_FILE, line)
            .await
            .map_err(|why| (DIGESTS_FILE.to_owned(), why))?;
        let path = self.dir.join(NEXT_DIGEST_FILE);
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_file(path)).await;
        log::info!(
            "audit archive: signed digest {key} ({} segment(s))",
            next.last.through
                - state
                    .digest
                    .as_ref()
                    .map_or(next.last.through, |d| d.through)
        );
        self.metrics.archive_digested(now_millis());
        state.digest = Some(next.last);
        state.next = None;
        self.recovered(state);
        Ok(())
    }

    /// The digest of the segments archived since the last one, up to `now`.
    fn compose(&self, state: &State, now: i64) -> NextDigest {
        let (number, start, previous, through) = match &state.digest {
            None => (1, now, None, 0),
            Some(last) => (
                last.number + 1,
                last.end_ms,
                Some((last.key.clone(), last.signature.clone())),
                last.through,
            ),
        };
        let listed: Vec<(&u32, &Archived)> = state.archived.range(through + 1..).collect();
        let through = listed.last().map_or(through, |(n, _)| **n);
        let digest = Digest {
            node: format!("{}/{}", self.target.node, self.instance),
            start: format_rfc3339_millis(start),
            end: format_rfc3339_millis(now),
            segments: listed.iter().map(|(_, a)| a.segment.clone()).collect(),
            previous,
            public_key: self.signing.public_key(),
        };
        let body = digest.sign(&self.signing);
        let signature = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v["signature"].as_str().map(str::to_owned))
            .unwrap_or_default();
        NextDigest {
            last: LastDigest {
                number,
                key: self.digest_key(number),
                signature,
                end_ms: now,
                through,
            },
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }

    /// Deletes the local copies that are archived, listed in a confirmed digest, and older
    /// than the local retention since their upload. The newest file is never touched.
    async fn delete_old_copies(&self, state: &State) {
        let Some(through) = state.digest.as_ref().map(|d| d.through) else {
            return;
        };
        let retention = self.target.local_retention.as_millis() as i64;
        let now = now_millis();
        let old: Vec<u32> = state
            .archived
            .range(..=through)
            .filter(|(_, a)| a.at_ms + retention <= now)
            .map(|(n, _)| *n)
            .collect();
        if old.is_empty() {
            return;
        }
        let dir = self.dir.clone();
        let removed = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u32>> {
            let mut removed = Vec::new();
            for (number, path) in sealed(log_files(&dir)?) {
                if old.contains(&number) {
                    std::fs::remove_file(&path)?;
                    removed.push(number);
                }
            }
            if !removed.is_empty() {
                crate::secret_file::sync_dir(&dir)?;
            }
            Ok(removed)
        })
        .await;
        match removed {
            Ok(Ok(removed)) => {
                for number in removed {
                    log::info!(
                        "audit archive: deleted the local copy of {} (archived as {}, local \
                         retention passed)",
                        file_name(number),
                        self.key(number)
                    );
                }
            }
            Ok(Err(e)) => log::warn!(
                "audit archive: cannot delete old local copies in {}: {e}",
                self.dir.display()
            ),
            Err(_) => {}
        }
    }

    /// Counts a failure, backs off, and warns when it starts and then every 10 minutes.
    fn failed(&self, state: &mut State, what: &str, why: &str) {
        self.metrics.archive_failed();
        let hint = if why.contains("400 InvalidRequest") && self.target.retention_days > 0 {
            " — if the bucket was created without Object Lock, it refuses retention: create \
             it with Object Lock, or set --audit-archive-retention 0"
        } else {
            ""
        };
        let now = Instant::now();
        let failing = state.failing.get_or_insert(Failing {
            since: now,
            next_try: now,
            backoff: ARCHIVE_EVERY / 2,
            warned: now,
        });
        failing.backoff = (failing.backoff * 2).min(MAX_BACKOFF);
        failing.next_try = now + failing.backoff;
        let first = failing.since == now;
        if first || now.duration_since(failing.warned) >= WARN_EVERY {
            failing.warned = now;
            log::warn!(
                "audit archive: {what} not stored ({why}{hint}); the segments wait on local \
                 disk, next try in {} s",
                failing.backoff.as_secs()
            );
        }
    }

    fn recovered(&self, state: &mut State) {
        if let Some(failing) = state.failing.take() {
            log::info!(
                "audit archive: reachable again after {} s",
                failing.since.elapsed().as_secs()
            );
        }
    }

    fn count_backlog(&self, pending: &[(u32, PathBuf)]) {
        let bytes = pending
            .iter()
            .filter_map(|(_, path)| std::fs::metadata(path).ok())
            .map(|m| m.len())
            .sum();
        self.metrics.archive_backlog(pending.len() as u64, bytes);
    }

    /// Uploads one sealed segment; returns what was archived, or why not.
    async fn ship_one(&self, number: u32, path: &Path) -> Result<Segment, String> {
        let key = self.key(number);
        let read_path = path.to_owned();
        let bytes = tokio::task::spawn_blocking(move || std::fs::read(read_path))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let segment = Segment::of(&key, &bytes)?;
        let bytes = Bytes::from(bytes);
        match self
            .target
            .bucket
            .put_new(&key, bytes, self.retain_until())
            .await
        {
            Ok(Put::Created { .. }) => Ok(segment),
            Ok(Put::Exists) => {
                // Stored before a crash, or something else is there: compare.
                let there = self
                    .target
                    .bucket
                    .get(&key)
                    .await
                    .map_err(|e| e.to_string())?
                    .unwrap_or_default();
                let there = Segment::of(&key, &there).ok();
                if there.as_ref().map(|s| &s.sha256) == Some(&segment.sha256) {
                    Ok(segment)
                } else {
                    log::error!(
                        "audit archive: {key} already holds other content than the local \
                         segment {}; it is not overwritten and the local file is kept — \
                         investigate (another node with the same name and instance, or \
                         tampering)",
                        path.display()
                    );
                    Err("the archive holds other content at this key".into())
                }
            }
            Err(e) => Err(e.to_string()),
        }
    }
}

/// Every file but the newest: the sealed ones.
fn sealed(mut files: Vec<(u32, PathBuf)>) -> Vec<(u32, PathBuf)> {
    files.pop();
    files
}

impl LastDigest {
    fn to_json(&self) -> Value {
        json!({
            "number": self.number,
            "key": self.key,
            "signature": self.signature,
            "end": format_rfc3339_millis(self.end_ms),
            "end_ms": self.end_ms,
            "through": self.through,
        })
    }

    fn from_json(value: &Value) -> Option<LastDigest> {
        Some(LastDigest {
            number: u32::try_from(value["number"].as_u64()?).ok()?,
            key: value["key"].as_str()?.to_owned(),
            signature: value["signature"].as_str()?.to_owned(),
            end_ms: value["end_ms"].as_i64()?,
            through: u32::try_from(value["through"].as_u64()?).ok()?,
        })
    }
}

impl NextDigest {
    fn to_json(&self) -> Value {
        let mut value = self.last.to_json();
        value["body"] = self.body.clone().into();
        value
    }
}

/// The digest `digest.next` holds, if any.
fn read_next(path: &Path) -> Result<Option<NextDigest>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let value: Value = serde_json::from_str(&text).map_err(|_| {
        format!(
            "{} is damaged; move it aside (the digest it held was never confirmed) and start \
             again",
            path.display()
        )
    })?;
    let last = LastDigest::from_json(&value);
    match (last, value["body"].as_str()) {
        (Some(last), Some(body)) => Ok(Some(NextDigest {
            last,
            body: body.to_owned(),
        })),
        _ => Err(format!("{} is not a composed digest", path.display())),
    }
}

/// The line `archived.jsonl` holds for one segment: its figures as a digest lists them,
/// with the file's name and when it was archived.
fn archived_line(number: u32, archived: &Archived) -> String {
    let mut line = archived.segment.to_json();
    line["file"] = file_name(number).into();
    line["archived_at"] = format_rfc3339_millis(archived.at_ms).into();
    line["archived_ms"] = archived.at_ms.into();
    format!("{line}\n")
}

/// The JSON lines of a record file (none when it does not exist). A torn last line (a
/// crash while appending) is left out.
fn read_lines(path: &Path) -> Result<Vec<Value>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    Ok(text
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .collect())
}

/// What `archived.jsonl` says was archived, by file number. A torn last line is ignored:
/// that segment is shipped again, which the create-only upload and the comparison make
/// harmless.
fn read_archived(path: &Path) -> Result<BTreeMap<u32, Archived>, String> {
    let mut archived = BTreeMap::new();
    for value in read_lines(path)? {
        let number = value["file"]
            .as_str()
            .and_then(|f| f.strip_suffix(".jsonl"))
            .and_then(|n| n.parse::<u32>().ok());
        let segment = Segment::from_json(&value);
        let at_ms = value["archived_ms"].as_i64().or_else(|| {
            value["archived_at"]
                .as_str()
                .and_then(crate::time::parse_rfc3339)
        });
        if let (Some(number), Some(segment), Some(at_ms)) = (number, segment, at_ms) {
            archived.insert(number, Archived { segment, at_ms });
        }
    }
    Ok(archived)
}

/// Where the chain in `dir` stood before its first local file, `first` (> 1), whose
/// predecessors were deleted after archiving: the last record `archived.jsonl` lists for
/// file `first - 1`. Refused unless every earlier file is listed there, so that a file
/// removed by hand is still found missing.
pub fn archived_head(dir: &Path, first: u32) -> Result<Head, String> {
    let archived = read_archived(&dir.join(ARCHIVED_FILE))?;
    if let Some(missing) = (1..first).find(|n| !archived.contains_key(n)) {
        return Err(format!(
            "file {} is missing and {ARCHIVED_FILE} does not list it as archived",
            file_name(missing)
        ));
    }
    let before = &archived[&(first - 1)].segment;
    let chain = unhex(before.chain_head.as_bytes()).ok_or_else(|| {
        format!(
            "{ARCHIVED_FILE} lists {} with a malformed chain value",
            file_name(first - 1)
        )
    })?;
    Ok(Head {
        seq: before.last_seq,
        chain,
    })
}

fn append_synced(path: &Path, line: &str) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let fail = |e: std::io::Error| format!("{}: {e}", path.display());
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .map_err(fail)?;
    file.write_all(line.as_bytes()).map_err(fail)?;
    file.sync_data().map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_of_archived_segments_survives_a_torn_last_line() {
        let dir = std::env::temp_dir().join(format!("paygate-archived-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(ARCHIVED_FILE);
        assert!(read_archived(&path).unwrap().is_empty());
        let segment = Segment {
            key: "audit/node-a/1/000001.jsonl".into(),
            size: 10,
            sha256: "ab".repeat(32),
            first_seq: 1,
            last_seq: 4,
            chain_head: "cd".repeat(32),
        };
        let archived = Archived {
            segment: segment.clone(),
            at_ms: 1_764_650_000_000,
        };
        append_synced(&path, &archived_line(1, &archived)).unwrap();
        // A crash while appending the next line leaves half of it.
        append_synced(&path, "{\"file\":\"000002.jsonl\",\"key\":\"au").unwrap();
        let archived = read_archived(&path).unwrap();
        assert_eq!(archived.len(), 1);
        assert_eq!(archived[&1].segment, segment);
        assert_eq!(archived[&1].at_ms, 1_764_650_000_000);
        // The chain's state before file 2 is what file 1 ended with; before file 3 it is
        // unknown (file 2 is not listed).
        let head = archived_head(&dir, 2).unwrap();
        assert_eq!((head.seq, head.chain), (4, [0xcd; 32]));
        assert!(archived_head(&dir, 3).unwrap_err().contains("000002.jsonl"));
        let _ = std::fs::remove_dir_all(dir);
    }
}
