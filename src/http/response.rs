//! Building responses: JSON bodies and the headers that every paygate answer carries.

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Response, StatusCode};
use http_body_util::Full;
use serde::Serialize;
use uuid::Uuid;

use super::ApiError;
use crate::ratelimit::Quota;

/// Adds the IETF `RateLimit-Policy` and `RateLimit` headers for `quota`.
pub fn insert_quota(headers: &mut http::HeaderMap, quota: &Quota) {
    headers.insert(
        HeaderName::from_static("ratelimit-policy"),
        quota.policy.clone(),
    );
    headers.insert(HeaderName::from_static("ratelimit"), quota.header());
}

/// Every response body is a complete buffer: paygate's answers are small JSON documents.
pub type Body = Full<Bytes>;

/// Security headers (listed in docs/guide.md), on every response, success or error.
const SECURITY_HEADERS: [(HeaderName, &str); 6] = [
    (
        header::STRICT_TRANSPORT_SECURITY,
        "max-age=63072000; includeSubDomains",
    ),
    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    (header::CACHE_CONTROL, "no-store"),
    (
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; frame-ancestors 'none'",
    ),
    (header::X_FRAME_OPTIONS, "DENY"),
    (header::REFERRER_POLICY, "no-referrer"),
];

/// Adds the security headers and `X-Request-Id`.
pub(super) fn with_standard_headers(
    mut response: Response<Body>,
    request_id: Uuid,
) -> Response<Body> {
    let headers = response.headers_mut();
    for (name, value) in SECURITY_HEADERS {
        headers.insert(name, HeaderValue::from_static(value));
    }
    // A hyphenated UUID is always a valid header value.
    if let Ok(value) = HeaderValue::from_str(&request_id.to_string()) {
        headers.insert(HeaderName::from_static("x-request-id"), value);
    }
    response
}

/// Headers a response ends up with at most: room for them is made once, up front.
const HEADER_CAPACITY: usize = 16;

/// An empty-headed response with room for every header paygate adds.
pub fn response_with(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Body::from(body.into()));
    *response.status_mut() = status;
    response.headers_mut().reserve(HEADER_CAPACITY);
    response
}

/// A JSON response with the given status.
pub fn json(status: StatusCode, value: &impl Serialize) -> Result<Response<Body>, ApiError> {
    let bytes = serde_json::to_vec(value)
        .map_err(|e| ApiError::Internal(format!("serialising a response: {e}")))?;
    let mut response = response_with(status, bytes);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

/// Turns a handler's result into the response sent: errors become problem+json, and every
/// response gets the standard headers.
pub fn finish(result: Result<Response<Body>, ApiError>, request_id: Uuid) -> Response<Body> {
    match result {
        Ok(response) => with_standard_headers(response, request_id),
        Err(error) => error.into_response(request_id),
    }
}
