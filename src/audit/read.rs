//! Reading recent records back, for `GET /audit`: newest first across every instance's
//! chain, optionally only those at or after a time.
//!
//! Files are read backwards from their end in blocks of [`BLOCK`], newest file first, and
//! reading stops as soon as enough records (or records older than `since`) were found. So a
//! request holds in memory about one block plus the records it returns — never a whole
//! file, however large — and reads about the bytes it returns. How many reads run at once
//! is the caller's to bound.

use std::fs::File;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::Path;

use serde_json::Value;

use super::writer::log_files;

/// Bytes read from a file at a time.
const BLOCK: usize = 64 * 1024;

/// Longest line kept: records are bounded far below this, so a longer "line" is damage
/// and is skipped rather than buffered.
const MAX_LINE: usize = 1024 * 1024;

/// Up to `limit` records with `time >= since` (an RFC 3339 string as records carry it),
/// newest first. Blocking.
pub fn recent(audit_dir: &Path, since: Option<&str>, limit: usize) -> std::io::Result<Vec<Value>> {
    let mut found: Vec<Value> = Vec::new();
    let instances = match super::instance_dirs(audit_dir) {
        Ok(instances) => instances,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(e),
    };
    for (_, dir) in instances {
        let mut taken = 0;
        'files: for (_, path) in log_files(&dir)?.into_iter().rev() {
            let mut lines = match LinesBackwards::open(&path) {
                Ok(lines) => lines,
                // Deleted since it was listed: archived, and past the local retention.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            while let Some(line) = lines.next_line()? {
                let Ok(record) = serde_json::from_slice::<Value>(&line) else {
                    continue;
                };
                let time = record["time"].as_str().unwrap_or_default();
                // Times are fixed-width UTC, so text order is time order.
                if since.is_some_and(|since| time < since) || taken == limit {
                    break 'files;
                }
                found.push(record);
                taken += 1;
            }
        }
    }
    found.sort_by(|a, b| {
        let key = |v: &Value| {
            (
                v["time"].as_str().unwrap_or_default().to_owned(),
                v["seq"].as_u64(),
            )
        };
        key(b).cmp(&key(a))
    });
    found.truncate(limit);
    Ok(found)
}

/// A file's lines from the last to the first, read a block at a time.
struct LinesBackwards {
    file: File,
    /// Bytes of the file not yet read: everything before this offset.
    unread: u64,
    /// Bytes read but not yet returned; the last line is at the end.
    pending: Vec<u8>,
}

impl LinesBackwards {
    fn open(path: &Path) -> std::io::Result<LinesBackwards> {
        let file = File::open(path)?;
        let unread = file.metadata()?.len();
        Ok(LinesBackwards {
            file,
            unread,
            pending: Vec::new(),
        })
    }

    /// The previous line (without its newline), or `None` at the start of the file.
    fn next_line(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        loop {
            // A newline before the end of what is pending ends the last whole line there.
            let end = self.pending.len();
            let search_to = end.saturating_sub(1);
            if let Some(at) = self.pending[..search_to].iter().rposition(|&b| b == b'\n') {
                let line = self.pending[at + 1..].to_vec();
                self.pending.truncate(at + 1);
                return Ok(Some(trim_newline(line)));
            }
            if self.unread == 0 {
                if self.pending.is_empty() {
                    return Ok(None);
                }
                let line = std::mem::take(&mut self.pending);
                return Ok(Some(trim_newline(line)));
            }
            if self.pending.len() > MAX_LINE {
                // No record is this long: drop it and go on before it.
                self.pending.clear();
                continue;
            }
            let step = u64::try_from(BLOCK).unwrap_or(u64::MAX).min(self.unread);
            self.unread -= step;
            self.file.seek(SeekFrom::Start(self.unread))?;
            let mut block = vec![0u8; usize::try_from(step).unwrap_or(BLOCK)];
            self.file.read_exact(&mut block)?;
            block.extend_from_slice(&self.pending);
            self.pending = block;
        }
    }
}

/// A line without its newline and without zeros after the last record (preallocated by an
/// earlier version, or sectors a crash never wrote).
fn trim_newline(mut line: Vec<u8>) -> Vec<u8> {
    while matches!(line.last(), Some(b'\n' | 0)) {
        line.pop();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_come_back_last_first_across_block_boundaries() {
        let dir = std::env::temp_dir().join(format!("paygate-read-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("000001.jsonl");
        // Lines of awkward lengths, one longer than a block, and preallocated zeros after.
        let lines: Vec<String> = [10, BLOCK - 1, 3, BLOCK * 2 + 7, 1, 500]
            .iter()
            .enumerate()
            .map(|(i, len)| format!("{i}{}", "x".repeat(*len)))
            .collect();
        let mut bytes = lines.join("\n").into_bytes();
        bytes.push(b'\n');
        bytes.extend_from_slice(&[0; 4096]);
        std::fs::write(&path, &bytes).unwrap();
        let mut reader = LinesBackwards::open(&path).unwrap();
        let mut back = Vec::new();
        while let Some(line) = reader.next_line().unwrap() {
            if !line.is_empty() {
                back.push(String::from_utf8(line).unwrap());
            }
        }
        back.reverse();
        assert_eq!(back, lines);
        let _ = std::fs::remove_dir_all(dir);
    }
}
