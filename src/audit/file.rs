//! One audit file open for appending: how a batch of sealed lines reaches the disk.
//!
//! A batch is one `write` of whole lines at the end of the file, then one `fdatasync`. The
//! file holds exactly its records, so whoever reads it (`jq`, `tail -F`, a log shipper)
//! sees complete JSON lines and nothing else; a file written by an earlier version may
//! still end in preallocated zeros, which readers and the verifier skip.
//!
//! What the lines say and when a batch is written is the writer's business, not this
//! file's.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::Path;
use std::time::{Duration, Instant};

/// An audit file open for appending.
pub struct AuditFile {
    file: File,
    /// Bytes of records in the file, all durable.
    size: u64,
}

impl AuditFile {
    /// Opens `path` for appending after `size` bytes of records. `create` makes a new file
    /// and fails if it exists. Whatever follows the records (zeros an earlier version
    /// preallocated) is cut off, so that the file ends with its last record.
    pub fn open(path: &Path, create: bool, size: u64) -> io::Result<AuditFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(create)
            .mode(0o600)
            .open(path)?;
        let mut file = AuditFile { file, size };
        if !create && file.file.metadata()?.len() != size {
            file.cut_to_records()?;
        }
        Ok(file)
    }

    /// Bytes of records in the file.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends `lines` and makes them durable (write, then `fdatasync`); returns how long
    /// the sync took. On an error nothing counts as written: the file may hold part of the
    /// lines after its records until [`AuditFile::cut_to_records`] removes them.
    pub fn append_durably(&mut self, lines: &[u8]) -> io::Result<Duration> {
        self.file.write_all_at(lines, self.size)?;
        let syncing = Instant::now();
        self.file.sync_data()?;
        let synced = syncing.elapsed();
        self.size += lines.len() as u64;
        Ok(synced)
    }

    /// Cuts the file back to its records, dropping whatever a failed write left, and syncs
    /// it: before rotating, and to repair.
    pub fn cut_to_records(&mut self) -> io::Result<()> {
        self.file.set_len(self.size)?;
        self.file.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a reader of the file sees, at any time: exactly the records.
    fn records(path: &Path) -> Vec<u8> {
        std::fs::read(path).unwrap()
    }

    #[test]
    fn the_file_holds_exactly_the_appended_lines_across_blocks_and_reopening() {
        let dir = std::env::temp_dir().join(format!("paygate-audit-file-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("000001.jsonl");
        let mut file = AuditFile::open(&path, true, 0).unwrap();
        let mut expected = Vec::new();
        // Lines of awkward lengths, so batches start and end anywhere in a block.
        for (i, len) in [1usize, 4095, 4097, 10, 70_000, 3, 2_000_000, 9]
            .into_iter()
            .enumerate()
        {
            let line: Vec<u8> = (0..len).map(|j| b'a' + ((i + j) % 26) as u8).collect();
            file.append_durably(&line).unwrap();
            expected.extend_from_slice(&line);
            assert_eq!(file.size(), expected.len() as u64);
            assert_eq!(records(&path), expected);
        }
        drop(file);
        // Continue after a restart.
        let mut file = AuditFile::open(&path, false, expected.len() as u64).unwrap();
        file.append_durably(b"after restart").unwrap();
        expected.extend_from_slice(b"after restart");
        assert_eq!(records(&path), expected);
        // A failed write's leftovers are cut off.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"{\"half"))
            .unwrap();
        file.cut_to_records().unwrap();
        assert_eq!(records(&path), expected);
        file.append_durably(b"!").unwrap();
        expected.push(b'!');
        assert_eq!(records(&path), expected);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_file_an_earlier_version_preallocated_loses_its_zeros_when_reopened() {
        let dir = std::env::temp_dir().join(format!("paygate-audit-file-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("000001.jsonl");
        let mut old = b"{\"seq\":1}\n".to_vec();
        let records_len = old.len() as u64;
        old.resize(1 << 20, 0);
        std::fs::write(&path, &old).unwrap();
        let mut file = AuditFile::open(&path, false, records_len).unwrap();
        assert_eq!(records(&path), b"{\"seq\":1}\n");
        file.append_durably(b"{\"seq\":2}\n").unwrap();
        assert_eq!(records(&path), b"{\"seq\":1}\n{\"seq\":2}\n");
        let _ = std::fs::remove_dir_all(dir);
    }
}
