//! `GET /audit?since=…&limit=…`: recent audit records, newest first, for the admin and
//! auditor roles. (The read itself is audited like every request.)

use http::{Response, StatusCode};

use super::{parse_limit, ListBody};
use crate::app::App;
use crate::audit::AUDIT_DIR;
use crate::http::{json, ApiError, Body};
use crate::time::{format_rfc3339_millis, parse_rfc3339_utc};

const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

pub async fn recent(app: &App, query: Option<&str>) -> Result<Response<Body>, ApiError> {
    let mut limit = DEFAULT_LIMIT;
    let mut since = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        match name {
            "limit" => limit = parse_limit(value, MAX_LIMIT)?,
            "since" => {
                // `:` may arrive percent-encoded.
                let value = value.replace("%3A", ":").replace("%3a", ":");
                let millis = parse_rfc3339_utc(&value).ok_or_else(|| {
                    ApiError::BadRequest(
                        "since must be a UTC time like 2026-11-29T12:00:00Z".into(),
                    )
                })?;
                since = Some(format_rfc3339_millis(millis));
            }
            _ => {}
        }
    }
    let dir = app.config.data_dir.join(AUDIT_DIR);
    let records = tokio::task::spawn_blocking(move || {
        crate::audit::read::recent(&dir, since.as_deref(), limit)
    })
    .await
    .map_err(|_| ApiError::Internal("reading the audit log panicked".into()))?
    .map_err(|e| ApiError::Internal(format!("reading the audit log: {e}")))?;
    json(StatusCode::OK, &ListBody::new(records, None))
}
