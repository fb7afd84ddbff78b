//! TOTP enrolment: `POST /users/me/totp` makes a fresh secret that waits for confirmation;
//! `POST /users/me/totp/confirm {code}` proves the authenticator app has it and turns it on.
//! From then on logging in needs a code.
//!
//! Replacing an active secret needs a token obtained with a code (`amr` includes `otp`):
//! someone who only stole the password must not be able to move the second factor to their
//! own phone. Wrong confirmation codes spend the user's password-guess budget.

use http::{Request, Response, StatusCode};
use serde::{Deserialize, Serialize};

use crate::app::App;
use crate::domain::Invalid;
use crate::http::{json, read_json, response_with, ApiError, Body, Conflict, RequestBody};
use crate::identity::Principal;
use crate::tokens::totp;

#[derive(Serialize)]
struct Enrolment {
    /// Base32, as authenticator apps take it.
    secret: String,
    otpauth_uri: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Confirmation {
    code: String,
}

pub async fn enrol(app: &App, principal: &Principal) -> Result<Response<Body>, ApiError> {
    let state = app.store.totp_state(principal.user_id).await?;
    if state.active.is_some() && !principal.has_second_factor() {
        return Err(ApiError::SecondFactorRequired(
            "TOTP is already on for this account; to replace the secret, log in with a TOTP \
             code and use that token"
                .into(),
        ));
    }
    let secret = totp::new_secret(&ring::rand::SystemRandom::new())
        .map_err(|_| ApiError::Internal("the system random generator failed".into()))?;
    app.store
        .set_pending_totp(principal.user_id, secret.to_vec())
        .await?;
    json(
        StatusCode::OK,
        &Enrolment {
            secret: totp::base32(&secret),
            otpauth_uri: totp::otpauth_uri(&principal.username, &secret),
        },
    )
}

pub async fn confirm(
    app: &App,
    principal: &Principal,
    request: Request<impl RequestBody>,
) -> Result<Response<Body>, ApiError> {
    let body: Confirmation =
        read_json(request, app.config.max_body, app.config.client_timeout).await?;
    let state = app.store.totp_state(principal.user_id).await?;
    let Some(pending) = state.pending else {
        return Err(ApiError::Conflict(
            Conflict::NoTotpEnrolment,
            "no TOTP secret awaits confirmation; POST /users/me/totp first".into(),
        ));
    };
    let guess = app.limiter.reserve_guess(&principal.username).await?;
    let now_s = app.clock.now_s();
    let Some(step) = totp::matching_step(&pending, &body.code, now_s) else {
        return Err(Invalid::new(
            "code",
            "does not match the secret: enter the current 6-digit code from the authenticator app",
        )
        .into());
    };
    if !app
        .store
        .confirm_totp(principal.user_id, pending, step)
        .await?
    {
        return Err(ApiError::Conflict(
            Conflict::NoTotpEnrolment,
            "a newer enrolment replaced this secret; confirm the newest one".into(),
        ));
    }
    app.limiter.give_back_guess(guess).await;
    Ok(response_with(StatusCode::NO_CONTENT, Vec::new()))
}
