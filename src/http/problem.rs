//! Every way a request can fail, as one enum, and the one function that turns a failure into
//! an HTTP status and an `application/problem+json` body (RFC 9457).
//!
//! Client mistakes get a precise 4xx with a `detail` that says what to fix. Anything else is
//! logged with its cause and answered with a bare 500 or 503: internals never reach a client.

use http::{header, HeaderValue, Method, StatusCode};
use std::borrow::Cow;

use serde::Serialize;
use uuid::Uuid;

use super::response::{with_standard_headers, Body};
use crate::domain::Invalid;
use crate::ratelimit::{Quota, Refusal};
use crate::store::StoreError;

/// The `WWW-Authenticate` challenge sent with a 401.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Challenge {
    /// No usable credentials: ask for HTTP Basic (or a Bearer token).
    Basic,
    /// A Bearer token was offered and is not valid (RFC 6750 `invalid_token`). Why is for
    /// the audit log only.
    InvalidToken,
    /// The operation needs a Bearer token (logout) and none was offered.
    BearerRequired,
    /// The password was right; a current TOTP code is missing, wrong or already used.
    SecondFactor,
}

/// The kinds of 409 a client can meet, each with its own problem type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conflict {
    UsernameTaken,
    /// Another request with the same Idempotency-Key is still being processed.
    IdempotencyInFlight,
    /// TOTP confirmation without an enrolment awaiting it.
    NoTotpEnrolment,
    /// Only pending payments can be cancelled.
    PaymentNotPending,
    /// The account's last holder of `a` cannot be removed.
    LastManager,
}

/// A failed request.
#[derive(Debug)]
pub enum ApiError {
    /// 400: the request is malformed (not JSON, unknown field, wrong type, bad query).
    BadRequest(String),
    /// 422: a well-formed value breaks a rule.
    Invalid(Invalid),
    /// 401: no identity, or the credentials did not prove one.
    Unauthenticated(Challenge),
    /// 403: the identity is known but not allowed to do this.
    Forbidden(String),
    /// 403: allowed only with a second factor (a token whose `amr` includes `otp`).
    SecondFactorRequired(String),
    /// 404: no such resource — or one the caller may not know exists.
    NotFound(String),
    /// 405, with the methods the resource does allow.
    MethodNotAllowed(&'static [Method]),
    /// 408: the client was too slow sending its request body.
    BodyTimeout,
    /// 409.
    Conflict(Conflict, String),
    /// 413: the body is larger than the limit (in bytes).
    PayloadTooLarge(usize),
    /// 415: the body is not declared as JSON.
    UnsupportedMediaType,
    /// 422: an Idempotency-Key reused for a different request.
    IdempotencyMismatch,
    /// 429: a rate limit refused the request.
    RateLimited { quota: Quota, retry_after_s: u64 },
    /// 503: temporarily overloaded (database busy); retry shortly.
    Unavailable,
    /// 503: the audit log cannot be written, so nothing is done.
    AuditUnavailable,
    /// 503: too many password checks wait for a hashing slot; this one was not made.
    PasswordChecksBusy,
    /// 503: the shared database cannot be reached (or the connection broke); the string
    /// is for the log only. Nothing was decided from stale state.
    DatabaseUnavailable(String),
    /// 500: a bug or an environment failure; the string is for the log only.
    Internal(String),
}

impl From<Invalid> for ApiError {
    fn from(invalid: Invalid) -> Self {
        ApiError::Invalid(invalid)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Busy => ApiError::Unavailable,
            StoreError::Unreachable(cause) => ApiError::DatabaseUnavailable(cause),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::Limited {
                quota,
                retry_after_s,
            } => ApiError::RateLimited {
                quota,
                retry_after_s,
            },
            // Refuse rather than go unlimited; an unreachable database answers as it does
            // everywhere, anything else is logged here.
            Refusal::Undecided(StoreError::Unreachable(cause)) => {
                ApiError::DatabaseUnavailable(cause)
            }
            Refusal::Undecided(e) => {
                log::error!("rate limiter unavailable, refusing requests: {e}");
                ApiError::Unavailable
            }
        }
    }
}

/// Members some problems add to the standard ones.
#[derive(Debug, Default, Serialize)]
struct Extra<'a> {
    /// The request field that broke a rule (422).
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
    /// The rate-limit policies that refused the request (429).
    #[serde(rename = "violated-policies", skip_serializing_if = "Option::is_none")]
    violated_policies: Option<[&'a str; 1]>,
}

/// An RFC 9457 problem document.
#[derive(Serialize)]
struct ProblemBody<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    title: &'a str,
    status: u16,
    detail: &'a str,
    request_id: &'a str,
    #[serde(flatten)]
    extra: Extra<'a>,
}

/// Problem type URIs for problems a client may want to tell apart; plain statuses use
/// `about:blank` as RFC 9457 recommends.
const TYPE_BASE: &str = "tag:paygate.dev,2026:problem:";

/// The IANA-registered problem type for rate limiting (a full URI, not a slug).
const QUOTA_EXCEEDED: &str = "https://iana.org/assignments/http-problem-types#quota-exceeded";

impl ApiError {
    /// The status code and problem fields, without the request id.
    fn parts(&self) -> (StatusCode, &'static str, String, Extra<'_>) {
        use ApiError::*;
        let none = Extra::default();
        match self {
            BadRequest(detail) => (
                StatusCode::BAD_REQUEST,
                "malformed-request",
                detail.clone(),
                none,
            ),
            Invalid(invalid) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid-field",
                invalid.to_string(),
                Extra {
                    field: Some(invalid.field),
                    ..Extra::default()
                },
            ),
            Unauthenticated(challenge) => {
                let (slug, detail) = match challenge {
                    Challenge::Basic => ("", "valid credentials are required for this resource"),
                    Challenge::InvalidToken => (
                        "invalid-token",
                        "the bearer token is not valid; log in again with POST /sessions",
                    ),
                    Challenge::BearerRequired => (
                        "",
                        "this needs the bearer token to act on, from POST /sessions",
                    ),
                    Challenge::SecondFactor => (
                        "second-factor-required",
                        "this account uses two-factor authentication: send a current, unused \
                         code from the authenticator app in the X-TOTP header",
                    ),
                };
                (StatusCode::UNAUTHORIZED, slug, detail.into(), none)
            }
            Forbidden(detail) => (StatusCode::FORBIDDEN, "", detail.clone(), none),
            SecondFactorRequired(detail) => (
                StatusCode::FORBIDDEN,
                "second-factor-required",
                detail.clone(),
                none,
            ),
            NotFound(detail) => (StatusCode::NOT_FOUND, "", detail.clone(), none),
            MethodNotAllowed(allowed) => (
                StatusCode::METHOD_NOT_ALLOWED,
                "",
                format!("this resource allows {}", allow_list(allowed)),
                none,
            ),
            BodyTimeout => (
                StatusCode::REQUEST_TIMEOUT,
                "",
                "the request body was not received in time".into(),
                none,
            ),
            Conflict(kind, detail) => {
                let slug = match kind {
                    self::Conflict::UsernameTaken => "username-taken",
                    self::Conflict::IdempotencyInFlight => "idempotency-key-in-flight",
                    self::Conflict::NoTotpEnrolment => "no-totp-enrolment",
                    self::Conflict::PaymentNotPending => "payment-not-pending",
                    self::Conflict::LastManager => "last-manager",
                };
                (StatusCode::CONFLICT, slug, detail.clone(), none)
            }
            PayloadTooLarge(limit) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "",
                format!("the request body is larger than {limit} bytes"),
                none,
            ),
            UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "",
                "the request body must be sent as Content-Type: application/json".into(),
                none,
            ),
            IdempotencyMismatch => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency-key-reused",
                "this Idempotency-Key was already used for a different request".into(),
                none,
            ),
            RateLimited {
                quota,
                retry_after_s,
            } => (
                StatusCode::TOO_MANY_REQUESTS,
                QUOTA_EXCEEDED,
                format!(
                    "rate limit \"{}\" exceeded; retry in {retry_after_s} s",
                    quota.name
                ),
                Extra {
                    violated_policies: Some([&*quota.name]),
                    ..Extra::default()
                },
            ),
            Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "",
                "the server is busy; retry shortly".into(),
                none,
            ),
            PasswordChecksBusy => (
                StatusCode::SERVICE_UNAVAILABLE,
                "password-checks-busy",
                "too many password checks are waiting; retry shortly, or log in once and use \
                 the token"
                    .into(),
                none,
            ),
            DatabaseUnavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "database-unavailable",
                "the database cannot be reached, so nothing was decided; retry shortly".into(),
                none,
            ),
            AuditUnavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "audit-unavailable",
                "the request could not be recorded in the audit log, so nothing was done; \
                 retry shortly"
                    .into(),
                none,
            ),
            Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "",
                "the server could not complete the request".into(),
                none,
            ),
        }
    }

    /// Why the request was refused, for the audit log: a category, a field name or a
    /// sentence the server wrote — never a value the client sent (a malformed body's parser
    /// message could quote a password).
    pub fn audit_reason(&self) -> Cow<'static, str> {
        use ApiError::*;
        match self {
            BadRequest(_) => "malformed request".into(),
            Invalid(invalid) => format!("invalid {}", invalid.field).into(),
            Unauthenticated(_) => "not authenticated".into(),
            Forbidden(detail) => Cow::Owned(detail.clone()),
            SecondFactorRequired(_) => "second factor required".into(),
            NotFound(_) => "not found".into(),
            MethodNotAllowed(_) => "method not allowed".into(),
            BodyTimeout => "body too slow".into(),
            Conflict(..) | IdempotencyMismatch => Cow::Borrowed(self.parts().1),
            PayloadTooLarge(_) => "body too large".into(),
            UnsupportedMediaType => "not json".into(),
            RateLimited { .. } => "rate limited".into(),
            Unavailable => "unavailable".into(),
            AuditUnavailable => "audit log unavailable".into(),
            DatabaseUnavailable(_) => "database unavailable".into(),
            PasswordChecksBusy => "password checks busy".into(),
            Internal(_) => "internal error".into(),
        }
    }

    /// The status this error answers with.
    pub fn status(&self) -> StatusCode {
        self.parts().0
    }

    /// The problem+json response, carrying `request_id`.
    pub fn into_response(self, request_id: Uuid) -> http::Response<Body> {
        match &self {
            ApiError::Internal(cause) => {
                log::error!(request_id:% = request_id; "request failed: {cause}")
            }
            ApiError::DatabaseUnavailable(cause) => {
                log::warn!(request_id:% = request_id; "database unreachable: {cause}")
            }
            _ => {}
        }
        let (status, slug, detail, extra) = self.parts();
        let problem_type = if slug.is_empty() {
            Cow::Borrowed("about:blank")
        } else if slug.starts_with("https:") {
            Cow::Borrowed(slug)
        } else {
            Cow::Owned(format!("{TYPE_BASE}{slug}"))
        };
        let mut id = Uuid::encode_buffer();
        let body = ProblemBody {
            kind: &problem_type,
            title: status.canonical_reason().unwrap_or("Error"),
            status: status.as_u16(),
            detail: &detail,
            request_id: request_id.hyphenated().encode_lower(&mut id),
            extra,
        };
        // Serialising borrowed strings and integers into a Vec cannot fail.
        let body = serde_json::to_vec(&body).unwrap_or_default();
        let mut response = super::response::response_with(status, body);
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        match self {
            ApiError::Unauthenticated(challenge) => {
                let basic = HeaderValue::from_static(r#"Basic realm="paygate", charset="UTF-8""#);
                let bearer = HeaderValue::from_static(r#"Bearer realm="paygate""#);
                match challenge {
                    Challenge::Basic => {
                        headers.insert(header::WWW_AUTHENTICATE, basic);
                        headers.append(header::WWW_AUTHENTICATE, bearer);
                    }
                    Challenge::InvalidToken => {
                        headers.insert(
                            header::WWW_AUTHENTICATE,
                            HeaderValue::from_static(r#"Bearer error="invalid_token""#),
                        );
                    }
                    Challenge::BearerRequired => {
                        headers.insert(header::WWW_AUTHENTICATE, bearer);
                    }
                    Challenge::SecondFactor => {
                        headers.insert(header::WWW_AUTHENTICATE, basic);
                    }
                }
            }
            ApiError::MethodNotAllowed(allowed) => {
                if let Ok(value) = HeaderValue::from_str(&allow_list(allowed)) {
                    headers.insert(header::ALLOW, value);
                }
            }
            ApiError::Unavailable | ApiError::AuditUnavailable | ApiError::PasswordChecksBusy => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ApiError::DatabaseUnavailable(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
            }
            ApiError::RateLimited {
                quota,
                retry_after_s,
            } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s));
                super::response::insert_quota(headers, &quota);
            }
            ApiError::BodyTimeout | ApiError::PayloadTooLarge(_) => {
                // The rest of the body may still be in flight; do not read it.
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        with_standard_headers(response, request_id)
    }
}

fn allow_list(methods: &[Method]) -> String {
    methods
        .iter()
        .map(Method::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body_json(response: http::Response<Body>) -> serde_json::Value {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn problems_follow_rfc_9457_and_carry_the_request_id() {
        let id = Uuid::new_v4();
        let response = ApiError::Invalid(Invalid::new("payee", "too long")).into_response(id);
        assert_eq!(response.status(), 422);
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        assert_eq!(response.headers()["x-request-id"], id.to_string().as_str());
        let body = body_json(response).await;
        assert_eq!(body["type"], "tag:paygate.dev,2026:problem:invalid-field");
        assert_eq!(body["status"], 422);
        assert_eq!(body["field"], "payee");
        assert_eq!(body["request_id"], id.to_string());
    }

    #[tokio::test]
    async fn internal_errors_hide_their_cause() {
        let response =
            ApiError::Internal("disk on fire at /secret/path".into()).into_response(Uuid::new_v4());
        assert_eq!(response.status(), 500);
        let body = body_json(response).await;
        assert!(!body.to_string().contains("secret"));
    }

    #[test]
    fn challenges_and_allow_headers() {
        let response = ApiError::Unauthenticated(Challenge::Basic).into_response(Uuid::nil());
        assert_eq!(
            response.headers()["www-authenticate"],
            r#"Basic realm="paygate", charset="UTF-8""#
        );
        let response =
            ApiError::MethodNotAllowed(&[Method::GET, Method::POST]).into_response(Uuid::nil());
        assert_eq!(response.headers()["allow"], "GET, POST");
    }
}
