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
use crate::filter::authenticate::{AuthFailure, AuthMethod, Identity};
use crate::http::{insert_quota, ApiError, Body};
use crate::ratelimit::{GuessTicket, Quota, Verdict};
use crate::store::StoreError;

/// What the stage let through, carried to the end of the chain.
#[derive(Debug)]
pub struct Admission {
    /// The matched rule's state, reported in `RateLimit` headers.
    quota: Option<Quota>,
    /// A password guess reserved for the claimed username.
    guess: Option<GuessTicket>,
}

fn refused(verdict: Verdict) -> ApiError {
    match verdict {
        Verdict::Refuse {
            quota,
            retry_after_s,
        } => ApiError::RateLimited {
            quota,
            retry_after_s,
        },
        Verdict::Admit(_) => ApiError::Internal("a granted verdict reported as refusal".into()),
    }
}

/// The limiter cannot decide (its database failed): refuse rather than go unlimited.
fn undecided(e: StoreError) -> ApiError {
    log::error!("rate limiter unavailable, refusing requests: {e}");
    ApiError::Unavailable
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
    let quota = match app
        .limiter
        .check(method, path, client, user)
        .await
        .map_err(undecided)?
    {
        Verdict::Admit(quota) => quota,
        refusal => return Err(refused(refusal)),
    };
    // A password will be hashed: that costs the client's address too, whatever username
    // it names, so fresh usernames buy no fresh hashing.
    if password_user.is_some() {
        if let refusal @ Verdict::Refuse { .. } = app
            .limiter
            .check_password_budget(client)
            .await
            .map_err(undecided)?
        {
            return Err(refused(refusal));
        }
    }
    let guess = match password_user {
        Some(username) => reserve_guess(app, username).await?,
        None => None,
    };
    Ok(Admission { quota, guess })
}

/// Reserves one guess from `username`'s budget before a secret of theirs is checked (a
/// password here, a TOTP code by the enrolment handler); refused with 429 while it is spent.
pub async fn reserve_guess(app: &App, username: &str) -> Result<Option<GuessTicket>, ApiError> {
    match app
        .limiter
        .reserve_guess(username)
        .await
        .map_err(undecided)?
    {
        Ok(ticket) => Ok(ticket),
        Err(refusal) => Err(refused(refusal)),
    }
}

/// Gives back a reserved guess: the secret was right.
pub async fn refund_guess(app: &App, ticket: Option<GuessTicket>) {
    if let Some(ticket) = ticket {
        if let Err(e) = app.limiter.refund_guess(ticket).await {
            // Failing to refund only makes the budget stricter.
            log::warn!("could not refund a password-guess token: {e}");
        }
    }
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
            refund_guess(app, self.guess.take()).await;
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
