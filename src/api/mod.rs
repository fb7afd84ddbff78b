//! The payments API handlers, one module per resource, and [`dispatch`], which hands a
//! request that passed the filter chain to its handler.
//!
//! Handlers trust the [`Grant`] access control issued and never re-check permissions; they
//! validate input, call the store, and shape JSON.

mod accounts;
mod audit;
mod capabilities;
mod metrics;
mod openapi;
mod payments;
mod sessions;
mod status;
mod totp;
mod users;

use crate::http::RequestBody;
use base64::Engine as _;
use http::{Request, Response};

use crate::app::App;
use crate::http::{ApiError, Body};
use crate::identity::Grant;
use crate::routes::Route;

/// Runs the handler for `route`.
pub async fn dispatch(
    app: &App,
    route: Route,
    grant: Grant,
    request: Request<impl RequestBody>,
) -> Result<Response<Body>, ApiError> {
    match (route, grant) {
        (Route::Reject(error), _) => Err(error),
        (Route::ApiStatus, _) => status::get(app).await,
        (Route::Metrics, _) => metrics::get(app).await,
        (Route::OpenApi, _) => openapi::get(),
        (Route::CreateUser, _) => users::create(app, request).await,
        (Route::GetUser(name), Grant::User(_)) => users::get(app, name).await,
        (Route::ReadAudit, Grant::User(_)) => audit::recent(app, request.uri().query()).await,
        (Route::GetMe, Grant::User(principal)) => users::get(app, principal.username).await,
        (Route::Login, Grant::User(principal)) => sessions::login(app, &principal).await,
        (Route::Logout, Grant::User(principal)) => sessions::logout(app, &principal).await,
        (Route::EnrolTotp, Grant::User(principal)) => totp::enrol(app, &principal).await,
        (Route::ConfirmTotp, Grant::User(principal)) => {
            totp::confirm(app, &principal, request).await
        }
        (Route::CreateAccount, Grant::User(principal)) => {
            accounts::create(app, &principal, request).await
        }
        (Route::ListAccounts, Grant::User(principal)) => {
            accounts::list(app, &principal, request.uri().query()).await
        }
        (Route::GetAccount(_), Grant::Account(_, membership)) => accounts::get(&membership),
        (Route::GrantMember(_), Grant::Account(principal, membership)) => {
            accounts::grant_member(app, &principal, &membership, request).await
        }
        (Route::RemoveMember(_, username), Grant::Account(principal, membership)) => {
            accounts::remove_member(app, &principal, &membership, &username).await
        }
        (Route::ListPayments(account), Grant::Account(..)) => {
            payments::list(app, account, request.uri().query()).await
        }
        (Route::CreatePayment(_), Grant::Account(principal, membership)) => {
            payments::create(app, &principal, &membership, request).await
        }
        (Route::GetPayment(account, payment), Grant::Account(..) | Grant::Capability(_)) => {
            payments::get(app, account, payment).await
        }
        (Route::CancelPayment(account, payment), Grant::Account(..) | Grant::Capability(_)) => {
            payments::cancel(app, account, payment).await
        }
        (Route::MintCapability(_, payment), Grant::Account(principal, membership)) => {
            capabilities::mint(app, &principal, &membership, payment, request).await
        }
        (Route::DeriveCapability, _) => capabilities::derive(app, request).await,
        (Route::RevokeCapability(id), Grant::User(principal)) => {
            capabilities::revoke(app, &principal, id).await
        }
        (Route::ListCapabilities(account), Grant::Account(..)) => {
            capabilities::list(app, account, request.uri().query()).await
        }
        (Route::DisableUser(name), Grant::User(_)) => users::disable(app, name).await,
        (route, grant) => Err(ApiError::Internal(format!(
            "access control issued {grant:?} for {route:?}, which needs another grant"
        ))),
    }
}

/// `?limit=&cursor=` of a list request.
#[derive(Debug, PartialEq, Eq)]
struct Pagination {
    limit: usize,
    /// Sequence number to continue below.
    before: Option<i64>,
}

const DEFAULT_LIMIT: usize = 20;
const MAX_LIMIT: usize = 100;

impl Pagination {
    /// Parses the query string; other parameters are ignored.
    fn parse(query: Option<&str>) -> Result<Self, ApiError> {
        let mut page = Pagination {
            limit: DEFAULT_LIMIT,
            before: None,
        };
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            match name {
                "limit" => page.limit = parse_limit(value, MAX_LIMIT)?,
                "cursor" => page.before = Some(decode_cursor(value)?),
                _ => {}
            }
        }
        Ok(page)
    }
}

/// A `?limit=` value: a whole number from 1 to `max`.
fn parse_limit(value: &str, max: usize) -> Result<usize, ApiError> {
    value
        .parse()
        .ok()
        .filter(|n| (1..=max).contains(n))
        .ok_or_else(|| {
            ApiError::BadRequest(format!("limit must be a whole number from 1 to {max}"))
        })
}

/// Cursors are opaque to clients: base64url (no padding) of the last item's sequence number
/// as 8 big-endian bytes, so always 11 characters. Every such string below 2^63 is a cursor
/// (`openapi.yaml` describes exactly these), and a made-up one only pages from elsewhere.
fn encode_cursor(seq: i64) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(seq.to_be_bytes())
}

fn decode_cursor(raw: &str) -> Result<i64, ApiError> {
    let mut bytes = [0u8; 8];
    match base64::engine::general_purpose::URL_SAFE_NO_PAD.decode_slice(raw, &mut bytes) {
        Ok(8) => i64::try_from(u64::from_be_bytes(bytes)).map_err(|_| bad_cursor()),
        _ => Err(bad_cursor()),
    }
}

fn bad_cursor() -> ApiError {
    ApiError::BadRequest("cursor is not one this server issued".into())
}

/// The list shape every collection answers with.
#[derive(serde::Serialize)]
struct ListBody<T> {
    items: Vec<T>,
    next_cursor: Option<String>,
}

impl<T> ListBody<T> {
    fn new(items: Vec<T>, next_seq: Option<i64>) -> Self {
        ListBody {
            items,
            next_cursor: next_seq.map(encode_cursor),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pagination_defaults_bounds_and_cursors() {
        assert_eq!(
            Pagination::parse(None).unwrap(),
            Pagination {
                limit: 20,
                before: None
            }
        );
        let cursor = encode_cursor(42);
        let page = Pagination::parse(Some(&format!("limit=100&cursor={cursor}&x=1"))).unwrap();
        assert_eq!(
            page,
            Pagination {
                limit: 100,
                before: Some(42)
            }
        );
        assert_eq!(cursor.len(), 11);
        assert_eq!(decode_cursor(&encode_cursor(i64::MAX)).unwrap(), i64::MAX);
        assert_eq!(decode_cursor("AAAAAAAAAAA").unwrap(), 0);
        for bad in [
            "limit=0",
            "limit=101",
            "limit=ten",
            "limit=",
            "cursor=%%%",
            "cursor=LTE",
            "cursor=AAAAAAAAAAAA",
            "cursor=gAAAAAAAAAA",
            "cursor=AAAAAAAAAAB",
        ] {
            let err = Pagination::parse(Some(bad)).unwrap_err();
            assert_eq!(err.status(), 400, "{bad}");
        }
    }
}
