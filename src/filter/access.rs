//! Access control: the one place that decides whether an identified request may do what its
//! route asks.
//!
//! Identity-based rules: a route may be public, need any authenticated user, need the user
//! it names (or a global admin/auditor), or need a permission on an account. Account checks
//! are object-level: without a grant on that account the answer is 404, so nobody learns
//! that someone else's account exists; with a grant that lacks the permission, 403.
//! Missing or failed credentials on a protected route are 401: with a Basic challenge, or
//! `Bearer error="invalid_token"` when a token was offered, or a request for the TOTP code
//! when only that is missing. When the user store could not be asked, 503.

use std::net::IpAddr;

use crate::app::App;
use crate::domain::{Perm, Perms, Role};
use crate::http::{ApiError, Challenge};
use crate::identity::{AuthFailure, AuthMethod, CapabilityUse, Grant, Identity, Principal};
use crate::routes::Requirement;
use crate::store::Membership;

/// Decides, or answers 401/403/404.
/// `client` is the request's address: the metrics route is open to local scrapers.
pub async fn authorize(
    app: &App,
    identity: Identity,
    requirement: Requirement,
    client: IpAddr,
) -> Result<Grant, ApiError> {
    let requirement = match requirement {
        Requirement::AdminOrLoopback if client.is_loopback() => Requirement::Public,
        requirement => requirement,
    };
    if requirement == Requirement::Public {
        return Ok(Grant::Anyone);
    }
    // One read of the database's change counter for this decision: the user's state and
    // their grant are both as of that moment.
    let (principal, version) = match identity {
        Identity::Authenticated(principal) => {
            let version = app.cache.version_now().await?;
            (still_enabled(app, principal, version).await?, version)
        }
        // A capability is worth exactly what it names, nothing a user would add on top.
        Identity::Capability(capability) => return capability_grant(capability, &requirement),
        other => return Err(unauthenticated(&other)),
    };
    match requirement {
        Requirement::Public | Requirement::Authenticated => Ok(Grant::User(principal)),
        Requirement::Password if principal.method == AuthMethod::Basic => {
            Ok(Grant::User(principal))
        }
        // A token cannot log in again: that would extend a session forever.
        Requirement::Password => Err(ApiError::Unauthenticated(Challenge::Basic)),
        Requirement::Token if principal.token.is_some() => Ok(Grant::User(principal)),
        Requirement::Token => Err(ApiError::Unauthenticated(Challenge::BearerRequired)),
        // The loopback half of AdminOrLoopback is decided by the chain, which knows the client.
        Requirement::Admin | Requirement::AdminOrLoopback => {
            if principal.role == Some(Role::Admin) {
                Ok(Grant::User(principal))
            } else {
                Err(ApiError::Forbidden("this needs the admin role".into()))
            }
        }
        Requirement::Member(account) => {
            match app.store.membership(principal.user_id, account).await? {
                Some(membership) => Ok(Grant::Account(principal, membership)),
                None => Err(ApiError::NotFound("no such account".into())),
            }
        }
        Requirement::Payment(account, _, perm) => {
            account_grant(app, principal, account, perm, version).await
        }
        Requirement::Staff => {
            if matches!(principal.role, Some(Role::Admin | Role::Auditor)) {
                Ok(Grant::User(principal))
            } else {
                Err(ApiError::Forbidden(
                    "this needs the admin or auditor role".into(),
                ))
            }
        }
        Requirement::SelfOrStaff(name) => {
            let staff = matches!(principal.role, Some(Role::Admin | Role::Auditor));
            if principal.username == name || staff {
                Ok(Grant::User(principal))
            } else {
                Err(ApiError::NotFound("no such user".into()))
            }
        }
        Requirement::Account(account, perm) => {
            account_grant(app, principal, account, perm, version).await
        }
    }
}

/// The principal, unless the user was disabled (or deleted) after authentication looked —
/// while their password check waited for a hashing slot, or their audit record for its
/// sync. Asked through the exact cache, so it costs a memory lookup unless something was
/// committed meanwhile; a disable thus stops every request that has not passed this point.
async fn still_enabled(
    app: &App,
    principal: Principal,
    version: i64,
) -> Result<Principal, ApiError> {
    if app
        .cache
        .user_enabled_at(&app.store, principal.user_id, version)
        .await?
    {
        return Ok(principal);
    }
    Err(unauthenticated(&Identity::Failed {
        method: Some(principal.method),
        claimed: Some(principal.username),
        reason: AuthFailure::Disabled,
    }))
}

/// A user's permission on an account: their grant, or — for reading — the auditor role,
/// which reads every account and changes nothing.
async fn account_grant(
    app: &App,
    principal: Principal,
    account: uuid::Uuid,
    perm: Perm,
    version: i64,
) -> Result<Grant, ApiError> {
    let membership = match app
        .cache
        .membership_at(&app.store, principal.user_id, account, version)
        .await?
    {
        Some(membership) => membership,
        None if principal.role == Some(Role::Auditor) => match app.store.account(account).await? {
            Some(account) => Membership {
                account,
                perms: Perms::READ_ONLY,
            },
            None => return Err(ApiError::NotFound("no such account".into())),
        },
        None => return Err(ApiError::NotFound("no such account".into())),
    };
    if !membership.perms.contains(perm) {
        return Err(ApiError::Forbidden(format!(
            "this needs the '{}' permission on the account; you hold '{}'",
            perm.letter(),
            membership.perms
        )));
    }
    Ok(Grant::Account(principal, membership))
}

/// What a capability may do: the one payment it names, with the permissions it carries.
fn capability_grant(
    capability: CapabilityUse,
    requirement: &Requirement,
) -> Result<Grant, ApiError> {
    match requirement {
        Requirement::Payment(account, payment, perm)
            if *account == capability.account && *payment == capability.payment =>
        {
            if capability.perms.contains(*perm) {
                Ok(Grant::Capability(capability))
            } else {
                Err(ApiError::Forbidden(format!(
                    "this capability does not carry the '{}' permission",
                    perm.letter()
                )))
            }
        }
        _ => Err(ApiError::Forbidden(
            "a capability grants access to its one payment only".into(),
        )),
    }
}

/// The 401 (or 503) for a request without a proven identity.
fn unauthenticated(identity: &Identity) -> ApiError {
    match identity {
        Identity::Failed {
            reason: AuthFailure::Unavailable,
            ..
        } => ApiError::Unavailable,
        Identity::Failed {
            reason: AuthFailure::PasswordChecksBusy,
            ..
        } => ApiError::PasswordChecksBusy,
        Identity::Failed {
            reason: AuthFailure::MalformedSecondFactor,
            ..
        } => ApiError::BadRequest(
            "X-TOTP must be the 6-digit code the authenticator app shows".into(),
        ),
        Identity::Failed { reason, .. } if reason.is_second_factor() => {
            ApiError::Unauthenticated(Challenge::SecondFactor)
        }
        failed if failed.tried_bearer() => ApiError::Unauthenticated(Challenge::InvalidToken),
        _ => ApiError::Unauthenticated(Challenge::Basic),
    }
}
