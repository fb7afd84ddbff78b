//! Authentication: find out who the request claims to be and whether it proved it.
//!
//! This stage only *labels* the request with an [`Identity`]; it never rejects. A failed
//! attempt stays visible to later stages (so it can be recorded), and access control alone
//! decides whether the route needs an identity at all.
//!
//! Three kinds of credentials, all ending in the same [`Principal`]:
//! - HTTP Basic (RFC 7617, UTF-8): the password is checked against the user's Argon2id
//!   hash. An unknown, malformed or disabled username is checked against a dummy hash
//!   instead, so every failure costs the same time. A user with TOTP enrolled must also send
//!   a current, unused code in `X-TOTP`.
//! - A Bearer JWT: signature and claims verified without I/O, then the user and the `jti`'s
//!   revocation looked up through the exact per-worker token cache.
//! - A Bearer opaque token: looked up by its SHA-256 through the same cache.
//!
//! Why a credential failed is kept in the [`Identity`] for the audit log; the client is only
//! ever told that it failed.

use std::borrow::Cow;

use base64::Engine as _;
use http::{header, HeaderMap, HeaderName};

use crate::app::App;
use crate::cache::StateCache;
use crate::domain::{Role, Username};
use crate::store::CapabilityState;
use crate::tokens::jwt::{self, Claims, JwtRejection};
use crate::tokens::{capability, opaque, totp, Tokens};

/// The header carrying a TOTP code next to Basic credentials.
pub const X_TOTP: HeaderName = HeaderName::from_static("x-totp");

/// How the identity was proven.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    Basic,
    BearerJwt,
    BearerOpaque,
    /// A capability token (Bearer header or `access_token` query parameter).
    Capability,
}

impl AuthMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Basic => "basic",
            AuthMethod::BearerJwt => "bearer-jwt",
            AuthMethod::BearerOpaque => "bearer-opaque",
            AuthMethod::Capability => "capability",
        }
    }

    fn is_bearer(self) -> bool {
        matches!(
            self,
            AuthMethod::BearerJwt | AuthMethod::BearerOpaque | AuthMethod::Capability
        )
    }
}

/// The token a request was authenticated with, so that logout can end it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenRef {
    /// A JWT's id and expiry (Unix seconds).
    Jwt { jti: String, exp: i64 },
    /// An opaque token's hash.
    Session([u8; 32]),
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
    /// The bearer token used, if any.
    pub token: Option<TokenRef>,
}

impl Principal {
    /// Whether the user proved a second factor (a TOTP code) for this identity.
    pub fn has_second_factor(&self) -> bool {
        self.amr.contains(&"otp")
    }
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
    /// Basic credentials whose username is not a valid username (so it names nobody, and
    /// may be a password typed into the wrong field: it is not recorded).
    MalformedUsername,
    /// The password was right, but the user has TOTP enrolled and sent no code.
    SecondFactorRequired,
    /// The TOTP code matches none of the current steps.
    BadSecondFactor,
    /// `X-TOTP` is not six digits (the password is not checked).
    MalformedSecondFactor,
    /// The TOTP code was right but its step was already used.
    ReplayedSecondFactor,
    /// A JWT failed verification.
    BadJwt(JwtRejection),
    /// A JWT whose `jti` was revoked by logout.
    RevokedToken,
    /// A Bearer value that is neither a JWT nor an opaque token.
    MalformedToken,
    /// An opaque token that names no session (never issued, logged out, or swept).
    UnknownSession,
    /// An opaque token past its expiry.
    ExpiredSession,
    /// A valid JWT for a user that does not exist.
    UnknownSubject,
    /// A capability token that names no capability.
    UnknownCapability,
    /// A capability that was revoked (itself or one it was derived from).
    RevokedCapability,
    /// A capability past its expiry.
    ExpiredCapability,
    /// A capability whose minter no longer holds any grant on its account.
    MinterLeft,
    /// The database could not be asked; the request is not authenticated (fail closed).
    Unavailable,
    /// The password was not checked: the worker's hashing queue is full.
    PasswordChecksBusy,
}

impl AuthFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthFailure::MalformedBasic => "malformed basic credentials",
            AuthFailure::UnsupportedScheme => "unsupported authorization scheme",
            AuthFailure::BadCredentials => "unknown user or wrong password",
            AuthFailure::MalformedUsername => "malformed username",
            AuthFailure::Disabled => "user disabled",
            AuthFailure::SecondFactorRequired => "totp code required",
            AuthFailure::BadSecondFactor => "wrong totp code",
            AuthFailure::MalformedSecondFactor => "malformed totp code",
            AuthFailure::ReplayedSecondFactor => "totp code already used",
            AuthFailure::BadJwt(rejection) => rejection.as_str(),
            AuthFailure::RevokedToken => "token revoked",
            AuthFailure::MalformedToken => "malformed bearer token",
            AuthFailure::UnknownSession => "unknown session",
            AuthFailure::ExpiredSession => "session expired",
            AuthFailure::UnknownSubject => "token for an unknown user",
            AuthFailure::UnknownCapability => "unknown capability",
            AuthFailure::RevokedCapability => "capability revoked",
            AuthFailure::ExpiredCapability => "capability expired",
            AuthFailure::MinterLeft => "capability minter lost access",
            AuthFailure::Unavailable => "user store unavailable",
            AuthFailure::PasswordChecksBusy => "password checks busy",
        }
    }

    /// Whether the password was right and only the second factor is missing or wrong.
    pub fn is_second_factor(self) -> bool {
        matches!(
            self,
            AuthFailure::SecondFactorRequired
                | AuthFailure::BadSecondFactor
                | AuthFailure::ReplayedSecondFactor
        )
    }
}

/// What a valid capability lets its bearer do: exactly these permissions on exactly this
/// payment, whoever the bearer is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapabilityUse {
    pub id: uuid::Uuid,
    pub account: uuid::Uuid,
    pub payment: uuid::Uuid,
    pub perms: crate::domain::Perms,
    /// The capability's expiry (Unix milliseconds): a derived one may not outlive it.
    pub expires_at: i64,
}

/// The label this stage puts on a request.
#[derive(Debug, Clone)]
pub enum Identity {
    /// No `Authorization` header.
    Anonymous,
    Authenticated(Principal),
    /// A valid capability: no user, a grant on one payment.
    Capability(CapabilityUse),
    /// Credentials were offered but proved nothing.
    Failed {
        /// How the request tried to authenticate, when the scheme was one of ours.
        method: Option<AuthMethod>,
        /// The username the request claimed, when it named one.
        claimed: Option<String>,
        reason: AuthFailure,
    },
}

impl Identity {
    /// Whether the request tried a Bearer token (and so deserves a Bearer challenge).
    pub fn tried_bearer(&self) -> bool {
        match self {
            Identity::Failed { method, .. } => method.is_some_and(AuthMethod::is_bearer),
            Identity::Authenticated(p) => p.method.is_bearer(),
            Identity::Capability(_) => true,
            Identity::Anonymous => false,
        }
    }
}

/// Basic credentials decoded from the header (RFC 7617), with the TOTP code sent beside
/// them, if any.
#[derive(PartialEq, Eq)]
pub struct BasicCredentials {
    username: String,
    password: String,
    totp: Option<String>,
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

/// Labels the request. Never fails: when the database cannot be asked, the request is
/// labelled as failed (fail closed) with [`AuthFailure::Unavailable`].
pub async fn identify(app: &App, credentials: Credentials) -> Identity {
    let failed = |method, reason| Identity::Failed {
        method,
        claimed: None,
        reason,
    };
    match credentials {
        Credentials::None => Identity::Anonymous,
        Credentials::Unsupported => failed(None, AuthFailure::UnsupportedScheme),
        Credentials::MalformedBasic => failed(Some(AuthMethod::Basic), AuthFailure::MalformedBasic),
        Credentials::MalformedTotp(username) => Identity::Failed {
            method: Some(AuthMethod::Basic),
            claimed: Username::parse("username", &username)
                .is_ok()
                .then_some(username),
            reason: AuthFailure::MalformedSecondFactor,
        },
        Credentials::MalformedBearer => {
            failed(Some(AuthMethod::BearerOpaque), AuthFailure::MalformedToken)
        }
        Credentials::Basic(basic) => verify_basic(app, basic).await,
        Credentials::Jwt(claims) => resolve_jwt(app, claims).await,
        Credentials::BadJwt {
            retry: Some(token), ..
        } => match reverify_after_key_reload(app, token).await {
            Ok(claims) => resolve_jwt(app, claims).await,
            Err(rejection) => failed(Some(AuthMethod::BearerJwt), AuthFailure::BadJwt(rejection)),
        },
        Credentials::BadJwt { rejection, .. } => {
            failed(Some(AuthMethod::BearerJwt), AuthFailure::BadJwt(rejection))
        }
        Credentials::Opaque(hash) => resolve_session(app, hash).await,
        Credentials::Capability(hash) => resolve_capability(app, hash).await,
    }
}

async fn resolve_capability(app: &App, hash: [u8; 32]) -> Identity {
    let failed = |reason| Identity::Failed {
        method: Some(AuthMethod::Capability),
        claimed: None,
        reason,
    };
    let state = match app.cache.capability(&app.store, hash).await {
        Err(e) => {
            log::error!("looking up a capability failed: {e}");
            return failed(AuthFailure::Unavailable);
        }
        Ok(None) => return failed(AuthFailure::UnknownCapability),
        Ok(Some(state)) => state,
    };
    match capability_use(&state, crate::time::now_millis()) {
        Ok(capability) => Identity::Capability(capability),
        Err(reason) => failed(reason),
    }
}

/// What a capability is worth now: refused when it, or any capability it was derived from,
/// is revoked, when it expired, or when its minter is disabled or holds no grant on the
/// account any more; otherwise its own permissions within what the minter holds today.
pub fn capability_use(state: &CapabilityState, now_ms: i64) -> Result<CapabilityUse, AuthFailure> {
    let capability = &state.capability;
    if capability.revoked_at.is_some() || state.ancestor_revoked {
        return Err(AuthFailure::RevokedCapability);
    }
    if capability.expires_at <= now_ms {
        return Err(AuthFailure::ExpiredCapability);
    }
    if state.minter_disabled {
        return Err(AuthFailure::Disabled);
    }
    let Some(minter_perms) = state.minter_perms else {
        return Err(AuthFailure::MinterLeft);
    };
    Ok(CapabilityUse {
        id: capability.id,
        account: capability.account_id,
        payment: capability.payment_id,
        perms: capability.perms.intersection(minter_perms),
        expires_at: capability.expires_at,
    })
}

/// A token named a `kid` this worker does not know: re-read the key file (at most once a
/// second) and verify again.
async fn reverify_after_key_reload(app: &App, token: String) -> Result<Claims, JwtRejection> {
    let keyring = app.tokens.keyring.clone();
    let reloaded = tokio::task::spawn_blocking(move || keyring.reload_for_unknown_kid()).await;
    if !reloaded.unwrap_or(false) {
        return Err(JwtRejection::UnknownKey);
    }
    app.tokens
        .verify_jwt(&token, crate::time::now_millis() / 1000)
}

async fn resolve_jwt(app: &App, claims: Claims) -> Identity {
    let failed = |claimed: &str, reason| Identity::Failed {
        method: Some(AuthMethod::BearerJwt),
        claimed: Some(claimed.to_owned()),
        reason,
    };
    let found = app
        .cache
        .jwt_subject(&app.store, &claims.sub, &claims.jti)
        .await;
    match found {
        Err(e) => {
            log::error!("looking up a token's user failed: {e}");
            failed(&claims.sub, AuthFailure::Unavailable)
        }
        Ok(None) => failed(&claims.sub, AuthFailure::UnknownSubject),
        Ok(Some((_, true))) => failed(&claims.sub, AuthFailure::RevokedToken),
        Ok(Some((subject, _))) if subject.disabled => failed(&claims.sub, AuthFailure::Disabled),
        Ok(Some((subject, false))) => Identity::Authenticated(Principal {
            user_id: subject.user_id,
            username: subject.username,
            role: subject.role,
            method: AuthMethod::BearerJwt,
            // Verification refused every other amr, so the fallback is never used.
            amr: jwt::amr_from(&claims.amr).unwrap_or(&["pwd"]),
            token: Some(TokenRef::Jwt {
                jti: claims.jti,
                exp: claims.exp,
            }),
        }),
    }
}

/// The `amr` values of a stored session.
fn session_amr(stored: &str) -> Option<&'static [&'static str]> {
    match stored {
        "pwd" => Some(&["pwd"]),
        "pwd otp" => Some(&["pwd", "otp"]),
        _ => None,
    }
}

async fn resolve_session(app: &App, hash: [u8; 32]) -> Identity {
    let failed = |claimed: Option<String>, reason| Identity::Failed {
        method: Some(AuthMethod::BearerOpaque),
        claimed,
        reason,
    };
    let row = match app.cache.session(&app.store, hash).await {
        Err(e) => {
            log::error!("looking up a session failed: {e}");
            return failed(None, AuthFailure::Unavailable);
        }
        Ok(None) => return failed(None, AuthFailure::UnknownSession),
        Ok(Some(row)) => row,
    };
    let claimed = Some(row.subject.username.clone());
    if row.expires_at <= crate::time::now_millis() {
        return failed(claimed, AuthFailure::ExpiredSession);
    }
    if row.subject.disabled {
        return failed(claimed, AuthFailure::Disabled);
    }
    let Some(amr) = session_amr(&row.amr) else {
        log::error!(
            "session of user {} has unknown amr {:?}",
            row.subject.user_id,
            row.amr
        );
        return failed(claimed, AuthFailure::Unavailable);
    };
    Identity::Authenticated(Principal {
        user_id: row.subject.user_id,
        username: row.subject.username,
        role: row.subject.role,
        method: AuthMethod::BearerOpaque,
        amr,
        token: Some(TokenRef::Session(hash)),
    })
}

async fn verify_basic(app: &App, credentials: BasicCredentials) -> Identity {
    let BasicCredentials {
        username,
        password,
        totp: code,
    } = credentials;
    // A name no user can have is refused before any hashing, and never recorded: it may
    // be a password typed into the username field.
    let Ok(name) = Username::parse("username", &username) else {
        return Identity::Failed {
            method: Some(AuthMethod::Basic),
            claimed: None,
            reason: AuthFailure::MalformedUsername,
        };
    };
    let mut lookup_failed = false;
    let user = match app.store.user_by_name(name.as_str().to_owned()).await {
        Ok(user) => user,
        Err(e) => {
            log::error!("looking up a user for authentication failed: {e}");
            lookup_failed = true;
            None
        }
    };
    let phc = user.as_ref().map(|u| u.password_hash.clone());
    let checked = app.passwords.verify(phc, password).await;
    let failed = |reason| Identity::Failed {
        method: Some(AuthMethod::Basic),
        claimed: Some(username.clone()),
        reason,
    };
    if lookup_failed {
        return failed(AuthFailure::Unavailable);
    }
    // Too many checks wait already: this one was not made.
    let Ok(matched) = checked else {
        return failed(AuthFailure::PasswordChecksBusy);
    };
    if user.is_none() || !matched {
        return failed(AuthFailure::BadCredentials);
    }
    // The check may have waited seconds for a hashing slot: what decides from here on
    // (disabled, second factor) is read again, so a disable meanwhile takes effect.
    let user = match app.store.user_by_name(name.as_str().to_owned()).await {
        Err(e) => {
            log::error!("reading a user after their password check failed: {e}");
            return failed(AuthFailure::Unavailable);
        }
        Ok(None) => return failed(AuthFailure::BadCredentials),
        Ok(Some(user)) if user.disabled => return failed(AuthFailure::Disabled),
        Ok(Some(user)) => user,
    };
    let amr: &'static [&'static str] = match &user.totp_secret {
        None => &["pwd"],
        Some(secret) => {
            let Some(code) = code else {
                return failed(AuthFailure::SecondFactorRequired);
            };
            let now_s = crate::time::now_millis() / 1000;
            let Some(step) = totp::matching_step(secret, &code, now_s) else {
                return failed(AuthFailure::BadSecondFactor);
            };
            match app.store.use_totp_step(user.id, step).await {
                Ok(true) => &["pwd", "otp"],
                Ok(false) => return failed(AuthFailure::ReplayedSecondFactor),
                Err(e) => {
                    log::error!("recording a used TOTP step failed: {e}");
                    return failed(AuthFailure::Unavailable);
                }
            }
        }
    };
    Identity::Authenticated(Principal {
        user_id: user.id,
        username: user.username,
        role: user.role,
        method: AuthMethod::Basic,
        amr,
        token: None,
    })
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
