//! What a client is told about its budget: the `RateLimit-Policy` and `RateLimit` header
//! fields (draft-ietf-httpapi-ratelimit-headers), built by hand on every admitted response.

use std::sync::Arc;

use http::HeaderValue;

use crate::decimal::push_decimal;

/// A policy's state as reported to the client in `RateLimit`/`RateLimit-Policy`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quota {
    /// The `RateLimit-Policy` field, e.g. `"post-users";q=5;w=3600`.
    pub policy: HeaderValue,
    /// The policy name.
    pub name: Arc<str>,
    /// Whole tokens left (approximate by at most one lease on multi-process setups).
    pub remaining: u32,
    /// Seconds until the bucket is full again, or until the next token when refused.
    pub reset_s: u64,
}

impl Quota {
    /// The `RateLimit` field value, `"name";r=<remaining>;t=<seconds>` — built by hand, as
    /// it is on every admitted response.
    pub fn header(&self) -> HeaderValue {
        let mut out = Vec::with_capacity(self.name.len() + 32);
        out.push(b'"');
        out.extend_from_slice(self.name.as_bytes());
        out.extend_from_slice(b"\";r=");
        push_decimal(&mut out, u64::from(self.remaining));
        out.extend_from_slice(b";t=");
        push_decimal(&mut out, self.reset_s);
        // Names are [a-z0-9-] and the rest is digits and punctuation: always valid.
        HeaderValue::from_maybe_shared(bytes::Bytes::from(out))
            .unwrap_or_else(|_| HeaderValue::from_static("\"policy\""))
    }
}
