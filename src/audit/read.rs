//! Reading recent records back, for `GET /audit`: newest first across every instance's
//! chain, optionally only those at or after a time. Files are read newest first and the
//! reading stops as soon as enough records (or records older than `since`) were found, so a
//! request costs about the size of the files it needs, never the whole history.

use std::path::Path;

use serde_json::Value;

use super::writer::log_files;

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
            let bytes = std::fs::read(&path)?;
            for line in bytes.split(|&b| b == b'\n').rev() {
                let Ok(record) = serde_json::from_slice::<Value>(line) else {
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
