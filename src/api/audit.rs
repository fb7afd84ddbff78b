//! `GET /audit?since=…&limit=…`: recent audit records, newest first, for the admin and
//! auditor roles. (The read itself is audited like every request.)

use http::{Response, StatusCode};

use super::{parse_limit, ListBody};
use crate::app::App;
use crate::audit::AUDIT_DIR;
use crate::http::{json, ApiError, Body};
use crate::time::{format_rfc3339_millis, parse_rfc3339};

const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

/// Audit reads running at once in this worker; more wait their turn. Each holds about a
/// 64 KiB block and the records it returns (at most [`MAX_LIMIT`]), so two bound the
/// memory reads can take whatever the log's size.
static READS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

pub async fn recent(app: &App, query: Option<&str>) -> Result<Response<Body>, ApiError> {
    let mut limit = DEFAULT_LIMIT;
    let mut since = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        match name {
            "limit" => limit = parse_limit(value, MAX_LIMIT)?,
            "since" => {
                let millis = percent_decoded(value)
                    .as_deref()
                    .and_then(parse_rfc3339)
                    .ok_or_else(|| {
                        ApiError::BadRequest(
                            "since must be an RFC 3339 time like 2026-11-29T12:00:00Z".into(),
                        )
                    })?;
                since = Some(format_rfc3339_millis(millis));
            }
            _ => {}
        }
    }
    let dir = app.config.data_dir.join(AUDIT_DIR);
    // The semaphore is never closed, so acquiring cannot fail.
    let _turn = READS
        .acquire()
        .await
        .map_err(|_| ApiError::Internal("the audit read limit was closed".into()))?;
    let records = tokio::task::spawn_blocking(move || {
        crate::audit::read::recent(&dir, since.as_deref(), limit)
    })
    .await
    .map_err(|_| ApiError::Internal("reading the audit log panicked".into()))?
    .map_err(|e| ApiError::Internal(format!("reading the audit log: {e}")))?;
    json(StatusCode::OK, &ListBody::new(records, None))
}

/// A query value with its `%XX` escapes decoded (`:` and `+` in a time usually arrive
/// escaped); `None` when an escape is broken or the result is not UTF-8.
fn percent_decoded(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_decoded() {
        assert_eq!(
            percent_decoded("2026-11-29T12%3A00%3A00%2B01%3a00").as_deref(),
            Some("2026-11-29T12:00:00+01:00")
        );
        assert_eq!(percent_decoded("plain").as_deref(), Some("plain"));
        for broken in ["%", "%4", "%zz", "%ff"] {
            assert_eq!(percent_decoded(broken), None, "{broken}");
        }
    }
}
