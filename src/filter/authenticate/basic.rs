//! Checking HTTP Basic credentials: the password against the user's Argon2id hash (a
//! dummy hash for unknown names, so every failure costs the same time), then the TOTP code
//! when the user has enrolled a second factor.

use super::BasicCredentials;
use crate::app::App;
use crate::domain::Username;
use crate::identity::{AuthFailure, AuthMethod, Identity, Principal};
use crate::tokens::totp;

/// Labels a request that sent Basic credentials.
pub(super) async fn verify(app: &App, credentials: BasicCredentials) -> Identity {
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
            let now_s = app.clock.now_s();
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
