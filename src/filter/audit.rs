//! The audit stage: after authentication, before access control. The `request` record —
//! who (or who claimed to be), how they authenticated and with what result, what they ask —
//! is on disk (group-committed, fdatasync'd) before anything may change; if it cannot be
//! written, the request ends here with 503. The `response` record follows with the status,
//! the reason for a refusal, and the time taken.
//!
//! Nothing secret is written: no password, token, `Authorization` value or TOTP code is
//! ever handed to this stage, and secret query parameters are replaced by `REDACTED`.

use std::borrow::Cow;
use std::net::IpAddr;
use std::time::Instant;

use http::Method;
use uuid::Uuid;

use crate::app::App;
use crate::audit::record::{RequestRecord, ResponseRecord};
use crate::domain::Username;
use crate::http::ApiError;
use crate::identity::Identity;
use crate::routes::Route;
use crate::time::with_rfc3339_millis;

/// Query parameters whose values are never written anywhere.
const SECRET_PARAMETERS: &[&str] = &["access_token", "token", "password", "code", "secret"];
/// Longest path (with query) recorded; longer ones are cut and marked.
const MAX_PATH: usize = 2048;
/// Longest method recorded (the standard ones have at most 7 letters; a client may send
/// any token); longer ones are cut and marked.
const MAX_METHOD: usize = 16;

// What a client controls in a `request` record, and its bound: `claimed` (a valid
// username, 3–32 bytes, or null), `path` (MAX_PATH bytes and a marker), `method`
// (MAX_METHOD bytes and a marker), `client_ip` (an address). Everything else is paygate's
// own: ids, times, names from the database, fixed words.

/// The method as recorded: at most [`MAX_METHOD`] bytes (methods are ASCII tokens).
fn recorded_method(method: &Method) -> Cow<'_, str> {
    let name = method.as_str();
    match name.get(..MAX_METHOD) {
        Some(cut) if name.len() > MAX_METHOD => Cow::Owned(format!("{cut}…[truncated]")),
        _ => Cow::Borrowed(name),
    }
}

/// A request whose `request` record is durable; closes it with a `response` record.
pub struct Audited {
    request_id: Uuid,
    started: Instant,
}

/// The path and query as recorded: secret parameter values replaced, length bounded.
pub fn redacted_path(path: &str, query: Option<&str>) -> String {
    let mut out = String::with_capacity(path.len() + query.map_or(0, |q| q.len() + 1));
    out.push_str(path);
    if let Some(query) = query {
        out.push('?');
        for (i, pair) in query.split('&').enumerate() {
            if i > 0 {
                out.push('&');
            }
            let name = pair.split_once('=').map_or(pair, |(name, _)| name);
            if SECRET_PARAMETERS
                .iter()
                .any(|secret| name.eq_ignore_ascii_case(secret))
            {
                out.push_str(name);
                out.push_str("=REDACTED");
            } else {
                out.push_str(pair);
            }
        }
    }
    if out.len() > MAX_PATH {
        let mut cut = MAX_PATH;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push_str("…[truncated]");
    }
    out
}

/// What the request would do: `C`reate, `R`ead, `U`pdate or `D`elete.
fn operation(method: &Method, route: &Route) -> &'static str {
    match route {
        // Setting a grant or confirming an enrolment changes an existing thing.
        Route::GrantMember(_) | Route::ConfirmTotp => "U",
        _ => match *method {
            Method::GET | Method::HEAD | Method::OPTIONS => "R",
            Method::POST => "C",
            Method::DELETE => "D",
            _ => "U",
        },
    }
}

/// Writes the `request` record and waits until it is durable.
#[allow(clippy::too_many_arguments)]
pub async fn record_request(
    app: &App,
    request_id: Uuid,
    started: Instant,
    client: IpAddr,
    method: &Method,
    path: &str,
    query: Option<&str>,
    route: &Route,
    identity: &Identity,
) -> Result<Audited, ApiError> {
    let id_of_request = request_id;
    let mut id = Uuid::encode_buffer();
    let request_id = request_id.hyphenated().encode_lower(&mut id);
    let path = redacted_path(path, query);
    let recorded_method = recorded_method(method);
    let mut capability_id = Uuid::encode_buffer();
    let capability = match identity {
        Identity::Capability(c) => Some(&*c.id.hyphenated().encode_lower(&mut capability_id)),
        _ => None,
    };
    let (principal, claimed, auth, auth_result, auth_reason) = match identity {
        Identity::Anonymous => (None, None, "none", None, None),
        Identity::Capability(_) => (None, None, "capability", Some("ok"), None),
        Identity::Authenticated(p) => (
            Some(p.username.as_str()),
            None,
            p.method.as_str(),
            Some("ok"),
            None,
        ),
        // Only a well-formed username is recorded as claimed: anything else could be a
        // secret typed into the wrong field, and is unbounded.
        Identity::Failed {
            method,
            claimed,
            reason,
        } => (
            None,
            claimed
                .as_deref()
                .filter(|name| Username::parse("username", name).is_ok()),
            method.map_or("none", |m| m.as_str()),
            Some("failed"),
            Some(reason.as_str()),
        ),
    };
    let durable = with_rfc3339_millis(app.clock.now_millis(), |time| {
        app.audit.append_durably(&RequestRecord {
            time,
            phase: "request",
            request_id,
            worker: &app.audit.instance,
            pid: app.audit.pid,
            client_ip: client,
            principal,
            claimed,
            auth,
            auth_result,
            auth_reason,
            capability,
            method: &recorded_method,
            path: &path,
            op: operation(method, route),
        })
    });
    match durable.await {
        Ok(()) => Ok(Audited {
            request_id: id_of_request,
            started,
        }),
        Err(_) => Err(ApiError::AuditUnavailable),
    }
}

impl Audited {
    /// Queues the `response` record (it goes out with the next group commit; the response
    /// does not wait for it).
    pub fn record_response(self, app: &App, status: u16, reason: Option<Cow<'_, str>>) {
        let mut id = Uuid::encode_buffer();
        let request_id = self.request_id.hyphenated().encode_lower(&mut id);
        let duration_us = u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX);
        with_rfc3339_millis(app.clock.now_millis(), |time| {
            app.audit.append(&ResponseRecord {
                time,
                phase: "response",
                request_id,
                worker: &app.audit.instance,
                pid: app.audit.pid,
                status,
                reason: reason.as_deref(),
                duration_us,
            })
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_query_parameters_are_redacted() {
        assert_eq!(redacted_path("/a", None), "/a");
        assert_eq!(
            redacted_path("/a", Some("limit=5&access_token=abc.def&Token=x&cursor=y")),
            "/a?limit=5&access_token=REDACTED&Token=REDACTED&cursor=y"
        );
        assert_eq!(
            redacted_path("/a", Some("access_token")),
            "/a?access_token=REDACTED"
        );
        let long_method = Method::from_bytes(&[b'X'; 300]).unwrap();
        assert_eq!(
            recorded_method(&long_method),
            format!("{}…[truncated]", "X".repeat(16))
        );
        assert_eq!(recorded_method(&Method::OPTIONS), "OPTIONS");
        let long = "x".repeat(5000);
        let cut = redacted_path(&format!("/{long}"), None);
        assert!(cut.len() < MAX_PATH + 20 && cut.ends_with("[truncated]"));
    }
}
