//! Who a request is: the label authentication puts on it, and what access control and the
//! handlers read.
//!
//! These types sit below both the filter chain and the handlers, so a handler that needs
//! the caller's [`Principal`] never reaches into the filter layer. Authentication
//! (`filter::authenticate`) produces an [`Identity`]; nothing here does I/O.

use crate::domain::Role;
use crate::store::{CapabilityState, Membership};
use crate::tokens::jwt::JwtRejection;

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

/// What access control established, handed to the handler.
#[derive(Debug)]
pub enum Grant {
    /// A public route; nobody needs to be known.
    Anyone,
    /// An authenticated user.
    User(Principal),
    /// An authenticated user with the needed permission on an account.
    Account(Principal, Membership),
    /// A capability for exactly the payment the route names, with the permission needed.
    Capability(CapabilityUse),
}
