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
//!
//! The header parsing is in `credentials`; the password and second-factor check in
//! `basic`; the identity types in [`crate::identity`].

mod basic;
mod credentials;

pub use credentials::{BasicCredentials, Credentials, X_TOTP};

use crate::app::App;
use crate::domain::Username;
use crate::identity::{capability_use, AuthFailure, AuthMethod, Identity, Principal, TokenRef};
use crate::tokens::jwt::{self, Claims, JwtRejection};

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
        Credentials::Basic(basic) => basic::verify(app, basic).await,
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
    match capability_use(&state, app.clock.now_millis()) {
        Ok(capability) => Identity::Capability(capability),
        Err(reason) => failed(reason),
    }
}

/// A token named a `kid` this worker does not know: re-read the keys (at most once a
/// second) and verify again.
async fn reverify_after_key_reload(app: &App, token: String) -> Result<Claims, JwtRejection> {
    if !app.tokens.keyring.refresh_for_unknown_kid().await {
        return Err(JwtRejection::UnknownKey);
    }
    app.tokens.verify_jwt(&token, app.clock.now_s())
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
    if row.expires_at <= app.clock.now_millis() {
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
