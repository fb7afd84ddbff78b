//! Authentication: find out who the request claims to be and whether it proved it.
//!
//! This stage only *labels* the request with an [`Identity`]; it never rejects. A failed
//! attempt stays visible to later stages (so it can be recorded), and access control alone
//! decides whether the route needs an identity at all.
//!
//! HTTP Basic (RFC 7617, UTF-8): the password is checked against the user's Argon2id hash.
//! An unknown, malformed or disabled username is checked against a dummy hash instead, so
//! every failure costs the same time and says the same thing.

use base64::Engine as _;
use http::{header, HeaderMap};

use crate::app::App;
use crate::domain::{Role, Username};

/// How the identity was proven.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    Basic,
}

impl AuthMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Basic => "basic",
        }
    }
}

/// A proven identity.
#[derive(Debug, Clone)]
pub struct Principal {
    pub user_id: i64,
    pub username: String,
    pub role: Option<Role>,
    pub method: AuthMethod,
    /// Authentication methods references (RFC 8176): how the user proved themselves.
    pub amr: &'static [&'static str],
}

/// Why credentials did not prove an identity; for logs and audit, never for the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// The `Authorization` header is not a well-formed Basic credential.
    MalformedBasic,
    /// A scheme paygate does not accept.
    UnsupportedScheme,
    /// Unknown user or wrong password (deliberately not told apart).
    BadCredentials,
    /// The user exists but is disabled.
    Disabled,
}

impl AuthFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthFailure::MalformedBasic => "malformed basic credentials",
            AuthFailure::UnsupportedScheme => "unsupported authorization scheme",
            AuthFailure::BadCredentials => "unknown user or wrong password",
            AuthFailure::Disabled => "user disabled",
        }
    }
}

/// The label this stage puts on a request.
#[derive(Debug, Clone)]
pub enum Identity {
    /// No `Authorization` header.
    Anonymous,
    Authenticated(Principal),
    /// Credentials were offered but proved nothing.
    Failed {
        /// The username the request claimed, when it named one.
        claimed: Option<String>,
        reason: AuthFailure,
    },
}

/// Basic credentials decoded from the header (RFC 7617).
#[derive(Debug, PartialEq, Eq)]
pub struct BasicCredentials {
    username: String,
    password: String,
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
    })
}

/// What the `Authorization` header offers, parsed once per request: rate limiting reads the
/// claimed username from it, authentication verifies it.
#[derive(Debug)]
pub enum Credentials {
    /// No `Authorization` header.
    None,
    Basic(BasicCredentials),
    /// A scheme paygate does not accept.
    Unsupported,
    /// A Basic header that does not decode to `user:password` in UTF-8.
    Malformed,
}

impl Credentials {
    /// Parses the request's `Authorization` header.
    pub fn read(headers: &HeaderMap) -> Credentials {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Credentials::None;
        };
        if !is_basic(value.as_bytes()) {
            return Credentials::Unsupported;
        }
        parse_basic(value.as_bytes()).map_or(Credentials::Malformed, Credentials::Basic)
    }

    /// The username the request claims, if it is a well-formed username. Nothing is
    /// verified: this is what rate limiting keys on before authentication runs.
    pub fn claimed_username(&self) -> Option<&str> {
        match self {
            Credentials::Basic(basic) if Username::parse("username", &basic.username).is_ok() => {
                Some(&basic.username)
            }
            _ => None,
        }
    }
}

fn is_basic(value: &[u8]) -> bool {
    value.len() >= 6 && value[..6].eq_ignore_ascii_case(b"basic ")
}

/// Labels the request. Never fails: storage errors while looking up a user are logged and
/// the request is treated as unauthenticated (fail closed).
pub async fn identify(app: &App, credentials: Credentials) -> Identity {
    let failed = |reason| Identity::Failed {
        claimed: None,
        reason,
    };
    match credentials {
        Credentials::None => Identity::Anonymous,
        Credentials::Unsupported => failed(AuthFailure::UnsupportedScheme),
        Credentials::Malformed => failed(AuthFailure::MalformedBasic),
        Credentials::Basic(basic) => verify_basic(app, basic).await,
    }
}

async fn verify_basic(app: &App, credentials: BasicCredentials) -> Identity {
    let BasicCredentials { username, password } = credentials;
    let user = match Username::parse("username", &username) {
        Err(_) => None,
        Ok(name) => match app.store.user_by_name(name.as_str().to_owned()).await {
            Ok(user) => user,
            Err(e) => {
                log::error!("looking up a user for authentication failed: {e}");
                None
            }
        },
    };
    let phc = user.as_ref().map(|u| u.password_hash.clone());
    let matched = app.passwords.verify(phc, password).await;
    let claimed = Some(username);
    match user {
        Some(user) if matched && !user.disabled => Identity::Authenticated(Principal {
            user_id: user.id,
            username: user.username,
            role: user.role,
            method: AuthMethod::Basic,
            amr: &["pwd"],
        }),
        Some(user) if matched && user.disabled => Identity::Failed {
            claimed,
            reason: AuthFailure::Disabled,
        },
        _ => Identity::Failed {
            claimed,
            reason: AuthFailure::BadCredentials,
        },
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
