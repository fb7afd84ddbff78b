//! Capabilities: mint one for a payment (`POST /accounts/{id}/payments/{pid}/capabilities`),
//! derive a weaker one from a token (`POST /capabilities/derive`, no identity needed),
//! revoke one and everything derived from it (`DELETE /capabilities/{id}`), and list an
//! account's live ones (`GET /accounts/{id}/capabilities`, paged, never with tokens).
//!
//! Derivation is bounded: at most [`MAX_DERIVATION_DEPTH`] levels below the minted
//! capability and [`MAX_PER_ROOT`] unexpired capabilities per minted one, and it has a rate
//! limit of its own in the defaults. A child is inserted only in the same transaction that
//! finds its parent and every ancestor unrevoked, so it can never outlive a revocation.
//!
//! A capability acts on one payment, so it can carry `r` (read it) and `d` (cancel it), and
//! only what its minter holds — at minting, and again at every use: a minter who loses a
//! permission (or the account) takes it from every capability they minted and every one
//! derived from those. Tokens are random (`pgc_` + 32 bytes base64url) and stored
//! as SHA-256, like sessions: revocation is a row update that every worker sees at its next
//! request (the token cache is stamped with the database's data version).

use http::{Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{ListBody, Pagination};
use crate::app::App;
use crate::domain::{whole_number, Invalid, Perm, Perms};
use crate::http::{json, read_json, response_with, ApiError, Body, Challenge, RequestBody};
use crate::identity::{capability_use, Principal};
use crate::store::{
    Capability, CapabilityInsert, Membership, NewCapability, MAX_DERIVATION_DEPTH, MAX_PER_ROOT,
};
use crate::time::format_rfc3339_millis;
use crate::tokens::capability;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Mint {
    perms: String,
    #[serde(deserialize_with = "whole_number::deserialize")]
    expires_in: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Derive {
    token: String,
    perms: String,
    #[serde(default, deserialize_with = "whole_number::deserialize_option")]
    expires_in: Option<u64>,
}

/// A capability as its minter sees it once: with the token and a shareable URL.
#[derive(Serialize)]
struct Minted {
    id: String,
    token: String,
    url: String,
    perms: String,
    expires_at: String,
}

/// A capability as the list shows it: never the token.
#[derive(Serialize)]
struct Listed {
    id: String,
    payment_id: String,
    perms: String,
    parent_id: Option<String>,
    created_at: String,
    expires_at: String,
}

impl From<Capability> for Listed {
    fn from(c: Capability) -> Self {
        Listed {
            id: c.id.to_string(),
            payment_id: c.payment_id.to_string(),
            perms: c.perms.to_string(),
            parent_id: c.parent_id.map(|p| p.to_string()),
            created_at: format_rfc3339_millis(c.created_at),
            expires_at: format_rfc3339_millis(c.expires_at),
        }
    }
}

/// Validates requested permissions: letters of `rwda`, only those that act on one payment.
fn capability_perms(raw: &str) -> Result<Perms, ApiError> {
    let perms = Perms::parse("perms", raw)?;
    if !perms.is_subset_of(Perms::ON_ONE_PAYMENT) {
        return Err(Invalid::new(
            "perms",
            "a capability acts on one payment: only 'r' (read) and 'd' (cancel) apply",
        )
        .into());
    }
    Ok(perms)
}

/// The expiry `seconds` from now, within `--capability-max-ttl`.
fn expires_in(app: &App, seconds: u64) -> Result<i64, ApiError> {
    let max = app.config.capability_max_ttl_s;
    if !(1..=max).contains(&seconds) {
        return Err(Invalid::new("expires_in", format!("must be from 1 to {max} seconds")).into());
    }
    Ok(app.clock.now_millis() + i64::try_from(seconds).unwrap_or(0) * 1000)
}

async fn store_new(app: &App, new: NewCapability) -> Result<(Capability, String), ApiError> {
    let (token, token_hash) = capability::generate(&ring::rand::SystemRandom::new())
        .map_err(|_| ApiError::Internal("the system random generator failed".into()))?;
    match app
        .store
        .create_capability(NewCapability { token_hash, ..new })
        .await?
    {
        CapabilityInsert::Created(stored) => Ok((stored, token)),
        // Revoked (or expired) between the check above and this insert.
        CapabilityInsert::ParentUnusable => Err(ApiError::Unauthenticated(Challenge::InvalidToken)),
        CapabilityInsert::TooDeep => Err(ApiError::Forbidden(format!(
            "capabilities derive at most {MAX_DERIVATION_DEPTH} levels deep from the one \
             minted; derive from one nearer to it"
        ))),
        CapabilityInsert::TooMany => Err(ApiError::Forbidden(format!(
            "a minted capability and those derived from it count at most {MAX_PER_ROOT} \
             unexpired capabilities together"
        ))),
    }
}

fn minted(capability: &Capability, token: String) -> Result<Response<Body>, ApiError> {
    json(
        StatusCode::CREATED,
        &Minted {
            id: capability.id.to_string(),
            url: format!(
                "/accounts/{}/payments/{}?access_token={token}",
                capability.account_id, capability.payment_id
            ),
            token,
            perms: capability.perms.to_string(),
            expires_at: format_rfc3339_millis(capability.expires_at),
        },
    )
}

pub async fn mint(
    app: &App,
    principal: &Principal,
    membership: &Membership,
    payment: Uuid,
    request: Request<impl RequestBody>,
) -> Result<Response<Body>, ApiError> {
    let body: Mint = read_json(request, app.config.max_body, app.config.client_timeout).await?;
    let perms = capability_perms(&body.perms)?;
    let expires_at = expires_in(app, body.expires_in)?;
    if !perms.is_subset_of(membership.perms) {
        return Err(ApiError::Forbidden(format!(
            "you hold '{}' on this account and cannot delegate '{perms}'",
            membership.perms
        )));
    }
    let account = membership.account.id;
    if !app.store.payment_exists(account, payment).await? {
        return Err(ApiError::NotFound("no such payment".into()));
    }
    let (stored, token) = store_new(
        app,
        NewCapability {
            token_hash: [0; 32],
            account_id: account,
            payment_id: payment,
            perms,
            minted_by: principal.user_id,
            parent_id: None,
            expires_at,
        },
    )
    .await?;
    minted(&stored, token)
}

pub async fn derive(
    app: &App,
    request: Request<impl RequestBody>,
) -> Result<Response<Body>, ApiError> {
    let body: Derive = read_json(request, app.config.max_body, app.config.client_timeout).await?;
    let perms = capability_perms(&body.perms)?;
    let invalid = || ApiError::Unauthenticated(Challenge::InvalidToken);
    let hash = capability::parse(&body.token).ok_or_else(invalid)?;
    let parent = app
        .cache
        .capability(&app.store, hash)
        .await?
        .ok_or_else(invalid)?;
    // The parent as it would authenticate now: not revoked (nor any of its ancestors),
    // not expired, its minter enabled, and worth no more than the minter still holds.
    let usable = capability_use(&parent, app.clock.now_millis()).map_err(|_| invalid())?;
    let parent = parent.capability;
    if !perms.is_subset_of(usable.perms) {
        return Err(ApiError::Forbidden(format!(
            "this capability carries '{}' and cannot grant '{perms}'",
            usable.perms
        )));
    }
    // Never longer than the capability it comes from.
    let expires_at = match body.expires_in {
        None => parent.expires_at,
        Some(seconds) => expires_in(app, seconds)?.min(parent.expires_at),
    };
    let (stored, token) = store_new(
        app,
        NewCapability {
            token_hash: [0; 32],
            account_id: parent.account_id,
            payment_id: parent.payment_id,
            perms,
            minted_by: parent.minted_by,
            parent_id: Some(parent.id),
            expires_at,
        },
    )
    .await?;
    minted(&stored, token)
}

pub async fn revoke(
    app: &App,
    principal: &Principal,
    id: Uuid,
) -> Result<Response<Body>, ApiError> {
    let not_found = || ApiError::NotFound("no such capability".into());
    let capability = app.store.capability(id).await?.ok_or_else(not_found)?;
    let allowed = capability.minted_by == principal.user_id
        || app
            .store
            .membership(principal.user_id, capability.account_id)
            .await?
            .is_some_and(|m| m.perms.contains(Perm::Admin));
    if !allowed {
        return Err(not_found());
    }
    app.store.revoke_capability(id).await?;
    Ok(response_with(StatusCode::NO_CONTENT, Vec::new()))
}

pub async fn list(
    app: &App,
    account: Uuid,
    query: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    let page = Pagination::parse(query)?;
    let live = app
        .store
        .live_capabilities(account, page.limit, page.before)
        .await?;
    let items: Vec<Listed> = live.items.into_iter().map(Listed::from).collect();
    json(StatusCode::OK, &ListBody::new(items, live.next_seq))
}
