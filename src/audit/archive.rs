//! Shipping sealed audit segments to S3-compatible storage, off the request path.
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
//! While the service is unreachable or refuses, nothing is lost: the backlog stays on the
//! local disk, retries back off from 5 s to 5 min, `/metrics` shows the backlog and the
//! last successful upload, and the operational log warns when the trouble starts and every
//! 10 minutes while it lasts. Local files are never deleted by the archiver.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::Value;

use super::digest::Segment;
use super::writer::{file_name, log_files};
use crate::metrics::AuditMetrics;
use crate::s3::{Bucket, Put};

/// How often a worker looks for sealed segments to ship.
pub const ARCHIVE_EVERY: Duration = Duration::from_secs(5);
/// The longest wait between attempts while the archive fails.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// How often a lasting failure is logged again.
const WARN_EVERY: Duration = Duration::from_secs(600);
/// The record of archived segments, in the chain's directory.
pub const ARCHIVED_FILE: &str = "archived.jsonl";

/// Where a worker's segments go.
pub struct ArchiveTarget {
    pub bucket: Bucket,
    /// The key prefix, without a trailing slash (may be empty).
    pub prefix: String,
    /// The node's name in object keys.
    pub node: String,
    /// How long each segment is retained (COMPLIANCE), in days.
    pub retention_days: u64,
}

/// A worker's archiver.
pub struct Archiver {
    target: ArchiveTarget,
    /// The chain's directory, and its name.
    dir: PathBuf,
    instance: String,
    metrics: Arc<AuditMetrics>,
    state: tokio::sync::Mutex<State>,
}

struct State {
    /// File number → what was archived.
    archived: HashMap<u32, Segment>,
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
    /// The archiver of the chain in `dir` (named `instance`), reading what was archived
    /// before. Blocking.
    pub fn open(
        target: ArchiveTarget,
        dir: &Path,
        instance: &str,
        metrics: Arc<AuditMetrics>,
    ) -> Result<Archiver, String> {
        let archived = read_archived(&dir.join(ARCHIVED_FILE))?;
        Ok(Archiver {
            target,
            dir: dir.to_owned(),
            instance: instance.to_owned(),
            metrics,
            state: tokio::sync::Mutex::new(State {
                archived,
                failing: None,
            }),
        })
    }

    /// The object key of the `number`th file.
    fn key(&self, number: u32) -> String {
        let path = format!(
            "{}/{}/{}",
            self.target.node,
            self.instance,
            file_name(number)
        );
        if self.target.prefix.is_empty() {
            path
        } else {
            format!("{}/{path}", self.target.prefix)
        }
    }

    /// Ships every sealed segment not archived yet, oldest first, unless a failure asked to
    /// wait. Never fails: trouble is logged and counted, and the next round tries again.
    pub async fn ship(&self) {
        let mut state = self.state.lock().await;
        if state
            .failing
            .as_ref()
            .is_some_and(|f| Instant::now() < f.next_try)
        {
            return;
        }
        let dir = self.dir.clone();
        let files = match tokio::task::spawn_blocking(move || log_files(&dir)).await {
            Ok(Ok(files)) => files,
            Ok(Err(e)) => {
                return log::warn!("audit archive: cannot list {}: {e}", self.dir.display())
            }
            Err(_) => return,
        };
        // Every file but the newest is sealed.
        let sealed: Vec<(u32, PathBuf)> = match files.split_last() {
            Some((_, sealed)) => sealed.to_vec(),
            None => Vec::new(),
        };
        let pending: Vec<(u32, PathBuf)> = sealed
            .into_iter()
            .filter(|(n, _)| !state.archived.contains_key(n))
            .collect();
        self.count_backlog(&pending);
        for (number, path) in pending {
            match self.ship_one(number, &path).await {
                Ok(segment) => {
                    let record = self.dir.join(ARCHIVED_FILE);
                    let line = archived_line(number, &segment);
                    let written =
                        tokio::task::spawn_blocking(move || append_synced(&record, &line)).await;
                    if let Ok(Err(e)) | Err(e) = written.map_err(|e| e.to_string()) {
                        log::warn!("audit archive: cannot record {}: {e}", segment.key);
                        return;
                    }
                    log::info!(
                        "audit archive: stored {} ({} bytes)",
                        segment.key,
                        segment.size
                    );
                    state.archived.insert(number, segment);
                    self.metrics.archive_uploaded(crate::time::now_millis());
                    if let Some(failing) = state.failing.take() {
                        log::info!(
                            "audit archive: reachable again after {} s",
                            failing.since.elapsed().as_secs()
                        );
                    }
                }
                Err(why) => {
                    self.metrics.archive_failed();
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
                            "audit archive: {} not stored ({why}); the segments wait on local \
                             disk, next try in {} s",
                            self.key(number),
                            failing.backoff.as_secs()
                        );
                    }
                    break;
                }
            }
        }
        let dir = self.dir.clone();
        if let Ok(Ok(files)) = tokio::task::spawn_blocking(move || log_files(&dir)).await {
            let left: Vec<(u32, PathBuf)> = files
                .split_last()
                .map(|(_, sealed)| sealed.to_vec())
                .unwrap_or_default()
                .into_iter()
                .filter(|(n, _)| !state.archived.contains_key(n))
                .collect();
            self.count_backlog(&left);
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
        let retain_until =
            crate::time::now_millis() + (self.target.retention_days as i64) * 86_400_000;
        let bytes = Bytes::from(bytes);
        match self
            .target
            .bucket
            .put_new(&key, bytes, Some(retain_until))
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

/// The line `archived.jsonl` holds for one segment: its figures as a digest lists them,
/// with the file's name and when it was archived.
fn archived_line(number: u32, segment: &Segment) -> String {
    let mut line = segment.to_json();
    line["file"] = file_name(number).into();
    line["archived_at"] = crate::time::format_rfc3339_millis(crate::time::now_millis()).into();
    format!("{line}\n")
}

/// What `archived.jsonl` says was archived, by file number. A torn last line (a crash
/// while appending) is ignored: that segment is shipped again, which the create-only
/// upload and the comparison make harmless.
fn read_archived(path: &Path) -> Result<HashMap<u32, Segment>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashMap::new()),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let mut archived = HashMap::new();
    for line in text.lines() {
        let Ok(value) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let number = value["file"]
            .as_str()
            .and_then(|f| f.strip_suffix(".jsonl"))
            .and_then(|n| n.parse::<u32>().ok());
        let segment = Segment::from_json(&value);
        if let (Some(number), Some(segment)) = (number, segment) {
            archived.insert(number, segment);
        }
    }
    Ok(archived)
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
        append_synced(&path, &archived_line(1, &segment)).unwrap();
        // A crash while appending the next line leaves half of it.
        append_synced(&path, "{\"file\":\"000002.jsonl\",\"key\":\"au").unwrap();
        let archived = read_archived(&path).unwrap();
        assert_eq!(archived.len(), 1);
        assert_eq!(archived[&1], segment);
        let _ = std::fs::remove_dir_all(dir);
    }
}
