//! Reading credentials from a request: the `Authorization` header (Basic or Bearer), the
//! `X-TOTP` header beside Basic, and the `access_token` query parameter for capabilities.
//!
//! Parsing is done once per request, before rate limiting, which keys on the username a
//! verified JWT names. Nothing here looks anything up; [`super::identify`] finishes the
//! check.

use std::borrow::Cow;

use base64::Engine as _;
use http::{header, HeaderMap, HeaderName};

use crate::cache::StateCache;
use crate::domain::Username;
use crate::tokens::jwt::{Claims, JwtRejection};
use crate::tokens::{capability, opaque, totp, Tokens};

/// The header carrying a TOTP code next to Basic credentials.
pub const X_TOTP: HeaderName = HeaderName::from_static("x-totp");

/// Basic credentials decoded from the header (RFC 7617), with the TOTP code sent beside
/// them, if any.
#[derive(PartialEq, Eq)]
pub struct BasicCredentials {
    pub(super) username: String,
    pub(super) password: String,
    pub(super) totp: Option<String>,
}

impl std::fmt::Debug for BasicCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password or the code, not even in a debug log.
        f.debug_struct("BasicCredentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// Decodes `Basic <base64(user:password)>`; the scheme name is case-insensitive.
fn parse_basic(value: &[u8]) -> Option<BasicCredentials> {
    let value = std::str::from_utf8(value).ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (username, password) = decoded.split_once(':')?;
    Some(BasicCredentials {
        username: username.to_owned(),
        password: password.to_owned(),
        totp: None,
    })
}

/// What the `Authorization` header offers, parsed once per request: rate limiting reads the
/// claimed username from it, authentication finishes checking it.
#[derive(Debug)]
pub enum Credentials {
    /// No `Authorization` header.
    None,
    Basic(BasicCredentials),
    /// A JWT whose signature and claims verified (revocation and user not yet checked).
    Jwt(Claims),
    /// A JWT that failed verification. For an unknown `kid` the token is kept: a key
    /// rotation may not have reached this worker yet, so it is checked again after a
    /// re-read of the keys.
    BadJwt {
        rejection: JwtRejection,
        retry: Option<String>,
    },
    /// The hash of something shaped like an opaque token.
    Opaque([u8; 32]),
    /// The hash of a capability token.
    Capability([u8; 32]),
    /// A Bearer value that is neither.
    MalformedBearer,
    /// A scheme paygate does not accept.
    Unsupported,
    /// A Basic header that does not decode to `user:password` in UTF-8.
    MalformedBasic,
    /// Basic credentials for this username with an `X-TOTP` header that is not a code.
    MalformedTotp(String),
}

/// The value of the `access_token` query parameter, if present (RFC 6750 section 2.3).
fn access_token(query: Option<&str>) -> Option<&str> {
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix("access_token="))
}

fn has_scheme(value: &[u8], scheme: &[u8]) -> bool {
    value.len() > scheme.len()
        && value[..scheme.len()].eq_ignore_ascii_case(scheme)
        && value[scheme.len()] == b' '
}

impl Credentials {
    /// Parses the request's `Authorization` (and `X-TOTP`) headers, or without them an
    /// `access_token` query parameter (which may carry a capability token only: session
    /// tokens do not belong in URLs). A JWT is verified here (pure computation, about a
    /// microsecond), so the username rate limiting keys on is one the token's signature
    /// vouches for.
    pub fn read(
        headers: &HeaderMap,
        query: Option<&str>,
        tokens: &Tokens,
        now_s: i64,
    ) -> Credentials {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return match access_token(query) {
                None => Credentials::None,
                Some(token) => capability::parse(token)
                    .map_or(Credentials::MalformedBearer, Credentials::Capability),
            };
        };
        let value = value.as_bytes();
        if has_scheme(value, b"basic") {
            return match parse_basic(value) {
                Some(mut basic) => match headers.get(X_TOTP).map(|v| v.as_bytes()) {
                    None => Credentials::Basic(basic),
                    Some(code) if totp::is_well_formed(code) => {
                        basic.totp = String::from_utf8(code.to_vec()).ok();
                        Credentials::Basic(basic)
                    }
                    Some(_) => Credentials::MalformedTotp(basic.username),
                },
                None => Credentials::MalformedBasic,
            };
        }
        if !has_scheme(value, b"bearer") {
            return Credentials::Unsupported;
        }
        let Ok(token) = std::str::from_utf8(&value[7..]) else {
            return Credentials::MalformedBearer;
        };
        let token = token.trim_matches(' ');
        if token.starts_with(capability::PREFIX) {
            return capability::parse(token)
                .map_or(Credentials::MalformedBearer, Credentials::Capability);
        }
        if token.contains('.') {
            return match tokens.verify_jwt(token, now_s) {
                Ok(claims) => Credentials::Jwt(claims),
                Err(rejection) => Credentials::BadJwt {
                    rejection,
                    retry: (rejection == JwtRejection::UnknownKey).then(|| token.to_owned()),
                },
            };
        }
        opaque::parse(token).map_or(Credentials::MalformedBearer, Credentials::Opaque)
    }

    /// The username `key=user` rate limits count against: only one this request has
    /// already proved — a verified JWT's subject, or the user of an opaque token this
    /// worker has seen. A username that Basic credentials merely claim is not proof (anyone
    /// can claim alice), so those requests count against their client address: nobody can
    /// spend another user's bucket by naming them.
    pub fn rate_limit_user<'a>(&'a self, cache: &StateCache) -> Option<Cow<'a, str>> {
        match self {
            Credentials::Jwt(claims) => Some(Cow::Borrowed(&claims.sub)),
            Credentials::Opaque(hash) => cache.session_user_hint(hash).map(Cow::Owned),
            _ => None,
        }
    }

    /// The well-formed username whose password this request tries, if any: the one whose
    /// password-guess budget it spends.
    pub fn password_user(&self) -> Option<&str> {
        match self {
            Credentials::Basic(basic) if Username::parse("username", &basic.username).is_ok() => {
                Some(&basic.username)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(s: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(s)
        )
    }

    #[test]
    fn basic_credentials_per_rfc_7617() {
        let parsed = parse_basic(encode("alice:pass:with:colons").as_bytes()).unwrap();
        assert_eq!(parsed.username, "alice");
        assert_eq!(parsed.password, "pass:with:colons");
        let parsed = parse_basic(encode("jürgen:pässwörd").as_bytes()).unwrap();
        assert_eq!(parsed.password, "pässwörd", "UTF-8 is decoded");
        let lower = encode("a:b").replace("Basic", "bAsIc");
        assert!(
            parse_basic(lower.as_bytes()).is_some(),
            "scheme is case-insensitive"
        );
    }

    #[test]
    fn malformed_basic_is_rejected() {
        assert!(parse_basic(b"Basic").is_none());
        assert!(parse_basic(b"Basic !!!notbase64").is_none());
        assert!(parse_basic(encode("no-colon").as_bytes()).is_none());
        let latin1 = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(b"j\xfcrgen:x")
        );
        assert!(parse_basic(latin1.as_bytes()).is_none(), "not UTF-8");
        assert!(parse_basic(b"Bearer abc").is_none());
    }
}
