//! Rate limiting, the first stage: refuse floods before they cost Argon2, audit writes or
//! database work. A refusal costs one in-memory lookup (or, at most once per refill
//! interval per key, one small write to `ratelimit.db`).
//!
//! Three budgets apply: the first matching rule's bucket for the request, and — when the
//! request carries a password (HTTP Basic) to be hashed — the client address's
//! password-check budget (so one address cannot make paygate hash without limit by naming
//! a fresh username each time) and the claimed username's password-guess budget, shared
//! across all addresses. A guess is reserved before the password is checked and
//! given back if the password was right, so only failures spend it. Wrong TOTP codes spend
//! the same budget.

use std::net::IpAddr;

use http::{Method, Response};

use crate::app::App;
use crate::http::{insert_quota, ApiError, Body};
use crate::identity::{AuthFailure, AuthMethod, Identity};
use crate::ratelimit::{GuessTicket, Quota, Refusal};

/// What the stage let through, carried to the end of the chain.
#[derive(Debug)]
pub struct Admission {
    /// The matched rule's state, reported in `RateLimit` headers.
    quota: Option<Quota>,
    /// A password guess reserved for the claimed username.
    guess: Option<GuessTicket>,
}

/// Admits the request or refuses it with 429 (or 503 when the limiter cannot decide).
/// `user` is the username `key=user` rules count against; `password_user` the username
/// whose password the request tries, which spends that user's guess budget.
pub async fn admit(
    app: &App,
    client: IpAddr,
    method: &Method,
    path: &str,
    user: Option<&str>,
    password_user: Option<&str>,
) -> Result<Admission, ApiError> {
    let quota = app
        .limiter
        .check(method, path, client, user)
        .await
        .map_err(Refusal::from)?
        .admitted()?;
    // A password will be hashed: that costs the client's address too, whatever username
    // it names, so fresh usernames buy no fresh hashing.
    if password_user.is_some() {
        app.limiter
            .check_password_budget(client)
            .await
            .map_err(Refusal::from)?
            .admitted()?;
    }
    let guess = match password_user {
        Some(username) => app.limiter.reserve_guess(username).await?,
        None => None,
    };
    Ok(Admission { quota, guess })
}

impl Admission {
    /// After authentication: a password that proved right gives its reserved guess back —
    /// also when only the TOTP code was missing, but not when a code was wrong or replayed.
    pub async fn settle(&mut self, app: &App, identity: &Identity) {
        // A check refused for a full queue was no guess either: its token goes back too.
        let proved_password = match identity {
            Identity::Authenticated(p) => p.method == AuthMethod::Basic,
            Identity::Failed { reason, .. } => matches!(
                reason,
                AuthFailure::SecondFactorRequired | AuthFailure::PasswordChecksBusy
            ),
            Identity::Anonymous | Identity::Capability(_) => false,
        };
        if proved_password {
            app.limiter.give_back_guess(self.guess.take()).await;
        } else if let Some(ticket) = self.guess.take() {
            // The check is over: its reservation stops counting as in flight now, not when
            // the request ends.
            if let Err(e) = app.limiter.release_guess(ticket).await {
                log::warn!("could not release a password-check reservation: {e}");
            }
        }
    }

    /// Adds the matched rule's `RateLimit-Policy` and `RateLimit` headers.
    pub fn decorate(&self, response: &mut Response<Body>) {
        if let Some(quota) = &self.quota {
            insert_quota(response.headers_mut(), quota);
        }
    }
}
