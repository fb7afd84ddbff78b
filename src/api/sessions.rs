//! `POST /sessions` (log in: Basic credentials, plus `X-TOTP` when enrolled, buy a Bearer
//! token) and `DELETE /sessions` (log out: the token stops working at once, everywhere).

use http::{Response, StatusCode};
use serde::Serialize;

use crate::app::App;
use crate::http::{json, response_with, ApiError, Body};
use crate::identity::{Principal, TokenRef};
use crate::time::format_rfc3339_millis;
use crate::tokens::IssueError;

#[derive(Serialize)]
struct LoginBody {
    token: String,
    token_type: &'static str,
    expires_at: String,
    /// How the user proved themselves; `otp` in it allows step-up operations.
    amr: &'static [&'static str],
}

pub async fn login(app: &App, principal: &Principal) -> Result<Response<Body>, ApiError> {
    let issued = app
        .tokens
        .issue(
            &app.store,
            principal.user_id,
            &principal.username,
            principal.amr,
            app.clock.now_millis(),
        )
        .await
        .map_err(|e| match e {
            IssueError::Store(e) => ApiError::from(e),
            IssueError::Random => ApiError::Internal("the system random generator failed".into()),
        })?;
    json(
        StatusCode::CREATED,
        &LoginBody {
            token: issued.token,
            token_type: "Bearer",
            expires_at: format_rfc3339_millis(issued.expires_at),
            amr: principal.amr,
        },
    )
}

pub async fn logout(app: &App, principal: &Principal) -> Result<Response<Body>, ApiError> {
    match &principal.token {
        // Kept as long as a verifier could still accept the token: until its `exp`.
        Some(TokenRef::Jwt { jti, exp }) => app.store.revoke_jti(jti.clone(), *exp).await?,
        Some(TokenRef::Session(hash)) => {
            app.store.end_session(*hash).await?;
        }
        None => return Err(ApiError::Internal("logout granted without a token".into())),
    }
    Ok(response_with(StatusCode::NO_CONTENT, Vec::new()))
}
