//! Accounts (`POST/GET /accounts`, `GET /accounts/{id}`) and their members
//! (`POST /accounts/{id}/members`, `DELETE /accounts/{id}/members/{username}`).
//!
//! Who may change a grant: a member holding `a`, granting only permissions they hold
//! themselves, over a grant whose permissions are all within their own (nobody demotes or
//! removes someone more privileged), never their own grant by `POST`, and never so that
//! the account is left without a holder of `a`. The store decides these inside the
//! transaction that makes the change.

use crate::http::RequestBody;
use http::{Request, Response, StatusCode};
use serde::{Deserialize, Serialize};

use super::users::set_location;
use super::{ListBody, Pagination};
use crate::app::App;
use crate::domain::{check_text, Currency, Invalid, Perms, Username};
use crate::http::{json, read_json, response_with, ApiError, Body, Conflict};
use crate::identity::Principal;
use crate::store::{MemberRemoval, MemberUpsert, Membership, Refusal};
use crate::time::format_rfc3339_millis;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewAccount {
    name: String,
    currency: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewGrant {
    username: String,
    perms: String,
}

/// An account, with the caller's permissions on it.
#[derive(Serialize)]
struct AccountBody {
    id: String,
    name: String,
    currency: String,
    created_at: String,
    perms: String,
}

impl From<&Membership> for AccountBody {
    fn from(m: &Membership) -> Self {
        AccountBody {
            id: m.account.id.to_string(),
            name: m.account.name.clone(),
            currency: m.account.currency.clone(),
            created_at: format_rfc3339_millis(m.account.created_at),
            perms: m.perms.to_string(),
        }
    }
}

#[derive(Serialize)]
struct MemberBody {
    account_id: String,
    username: String,
    perms: String,
}

pub async fn create(
    app: &App,
    principal: &Principal,
    request: Request<impl RequestBody>,
) -> Result<Response<Body>, ApiError> {
    let body: NewAccount =
        read_json(request, app.config.max_body, app.config.client_timeout).await?;
    let name = check_text("name", &body.name, 1, 64)?;
    let currency = Currency::parse("currency", &body.currency)?;
    let account = app
        .store
        .create_account(principal.user_id, name, currency)
        .await?;
    let location = format!("/accounts/{}", account.id);
    let membership = Membership {
        account,
        perms: Perms::ALL,
    };
    let mut response = json(StatusCode::CREATED, &AccountBody::from(&membership))?;
    set_location(&mut response, &location);
    Ok(response)
}

pub async fn list(
    app: &App,
    principal: &Principal,
    query: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    let page = Pagination::parse(query)?;
    // Auditors read every account.
    let every_account = principal.role == Some(crate::domain::Role::Auditor);
    let found = app
        .store
        .memberships(principal.user_id, every_account, page.limit, page.before)
        .await?;
    let items = found.items.iter().map(AccountBody::from).collect();
    json(StatusCode::OK, &ListBody::new(items, found.next_seq))
}

pub fn get(membership: &Membership) -> Result<Response<Body>, ApiError> {
    json(StatusCode::OK, &AccountBody::from(membership))
}

/// Sets a user's permissions on the account (replacing any earlier grant). Members cannot
/// change their own grant, so nobody can raise their own rights or lock the account out of
/// its last manager by accident; see the module doc for the rest of the rules.
pub async fn grant_member(
    app: &App,
    principal: &Principal,
    membership: &Membership,
    request: Request<impl RequestBody>,
) -> Result<Response<Body>, ApiError> {
    let body: NewGrant = read_json(request, app.config.max_body, app.config.client_timeout).await?;
    let username = Username::parse("username", &body.username)?;
    let perms = Perms::parse("perms", &body.perms)?;
    if username.as_str() == principal.username {
        return Err(ApiError::Forbidden(
            "you cannot change your own permissions; another member with 'a' can".into(),
        ));
    }
    let account = membership.account.id;
    let status = match app
        .store
        .upsert_member(
            account,
            username.as_str().to_owned(),
            perms,
            principal.user_id,
        )
        .await?
    {
        MemberUpsert::UnknownUser => {
            return Err(Invalid::new("username", "no user has this name").into())
        }
        MemberUpsert::Refused(refusal) => return Err(refused(refusal, "change")),
        MemberUpsert::Created => StatusCode::CREATED,
        MemberUpsert::Updated => StatusCode::OK,
    };
    json(
        status,
        &MemberBody {
            account_id: account.to_string(),
            username: username.as_str().to_owned(),
            perms: perms.to_string(),
        },
    )
}

/// Removes a member's grant: 204, or 404 when the user holds none on this account.
pub async fn remove_member(
    app: &App,
    principal: &Principal,
    membership: &Membership,
    username: &str,
) -> Result<Response<Body>, ApiError> {
    let not_member = || ApiError::NotFound("no such member of this account".into());
    let username = Username::parse("username", username).map_err(|_| not_member())?;
    match app
        .store
        .remove_member(
            membership.account.id,
            username.as_str().to_owned(),
            principal.user_id,
        )
        .await?
    {
        MemberRemoval::Removed => Ok(response_with(StatusCode::NO_CONTENT, Vec::new())),
        MemberRemoval::NotMember => Err(not_member()),
        MemberRemoval::Refused(refusal) => Err(refused(refusal, "remove")),
        MemberRemoval::LastManager => Err(ApiError::Conflict(
            Conflict::LastManager,
            format!(
                "{username} is the last member holding 'a' on this account; grant 'a' to \
                 another member first"
            ),
        )),
    }
}

/// Permissions as a reader should see them ("nothing" for none).
fn shown(perms: Perms) -> String {
    if perms.is_empty() {
        "nothing".to_owned()
    } else {
        format!("'{perms}'")
    }
}

fn refused(refusal: Refusal, verb: &str) -> ApiError {
    ApiError::Forbidden(match refusal {
        Refusal::NotManager(own) => format!(
            "this needs the 'a' permission on the account; you hold {}",
            shown(own)
        ),
        Refusal::BeyondOwn { own, asked } => format!(
            "you hold {} on this account and cannot grant '{asked}'",
            shown(own)
        ),
        Refusal::MorePrivileged { own, theirs } => format!(
            "this member holds '{theirs}', beyond your {}: you cannot {verb} their grant",
            shown(own)
        ),
    })
}
