//! Payments of an account: list, create (with `Idempotency-Key`), read, cancel.
//!
//! Creating under an Idempotency-Key: the key, the payment and the answer to replay are
//! committed in one transaction (shared with other payments by group commit). A retry with
//! the same key and the same request gets the stored answer (`Idempotency-Replayed: true`),
//! even while racing the first; the same key with a different request is 422. Requests that
//! fail validation take nothing.

use crate::http::RequestBody;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use ring::digest;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::users::set_location;
use super::{ListBody, Pagination};
use crate::app::App;
use crate::domain::{
    check_amount, check_idempotency_key, check_payee, check_text, whole_number, Invalid,
};
use crate::http::{json, read_json, response_with, ApiError, Body, Conflict};
use crate::identity::Principal;
use crate::store::{
    CancelOutcome, EarlierUse, KeyedRequest, Membership, Payment, PaymentCreation, PaymentStatus,
    StoreError, StoredResponse,
};
use crate::time::format_rfc3339_millis;

const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
const IDEMPOTENCY_REPLAYED: HeaderName = HeaderName::from_static("idempotency-replayed");

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewPayment {
    payee: String,
    #[serde(deserialize_with = "whole_number::deserialize")]
    amount_minor: i64,
    currency: String,
    #[serde(default)]
    reference: String,
}

/// A validated payment request; its canonical JSON is what an Idempotency-Key is bound to.
#[derive(Serialize)]
struct PaymentRequest {
    account_id: String,
    payee: String,
    amount_minor: i64,
    currency: String,
    reference: String,
}

#[derive(Serialize)]
struct PaymentBody {
    id: String,
    account_id: String,
    payee: String,
    amount_minor: i64,
    currency: String,
    reference: String,
    status: &'static str,
    created_by: String,
    created_at: String,
    cancelled_at: Option<String>,
}

impl From<&Payment> for PaymentBody {
    fn from(p: &Payment) -> Self {
        PaymentBody {
            id: p.id.to_string(),
            account_id: p.account_id.to_string(),
            payee: p.payee.clone(),
            amount_minor: p.amount_minor,
            currency: p.currency.clone(),
            reference: p.reference.clone(),
            status: p.status.as_str(),
            created_by: p.created_by.clone(),
            created_at: format_rfc3339_millis(p.created_at),
            cancelled_at: p.cancelled_at.map(format_rfc3339_millis),
        }
    }
}

fn location(payment: &Payment) -> String {
    format!("/accounts/{}/payments/{}", payment.account_id, payment.id)
}

pub async fn list(
    app: &App,
    account: Uuid,
    query: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    let page = Pagination::parse(query)?;
    let found = app.store.payments(account, page.limit, page.before).await?;
    let items = found.items.iter().map(PaymentBody::from).collect();
    json(StatusCode::OK, &ListBody::new(items, found.next_seq))
}

pub async fn get(app: &App, account: Uuid, payment: Uuid) -> Result<Response<Body>, ApiError> {
    match app.cache.payment(&app.store, account, payment).await? {
        Some(payment) => json(StatusCode::OK, &PaymentBody::from(&payment)),
        None => Err(ApiError::NotFound("no such payment".into())),
    }
}

pub async fn cancel(app: &App, account: Uuid, payment: Uuid) -> Result<Response<Body>, ApiError> {
    match app.store.cancel_payment(account, payment).await? {
        CancelOutcome::Cancelled(payment) => json(StatusCode::OK, &PaymentBody::from(&payment)),
        CancelOutcome::NotPending(payment) => Err(ApiError::Conflict(
            Conflict::PaymentNotPending,
            format!(
                "the payment is {}; only pending payments can be cancelled",
                payment.status.as_str()
            ),
        )),
        CancelOutcome::NotFound => Err(ApiError::NotFound("no such payment".into())),
    }
}

/// The Idempotency-Key header, if sent; more than one is a client error.
fn idempotency_key<B>(request: &Request<B>) -> Result<Option<String>, ApiError> {
    let mut values = request.headers().get_all(IDEMPOTENCY_KEY).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::BadRequest(
            "send one Idempotency-Key header, not several".into(),
        ));
    }
    Ok(Some(check_idempotency_key(first.as_bytes())?))
}

fn validate(body: NewPayment, membership: &Membership) -> Result<PaymentRequest, ApiError> {
    let payee = check_payee("payee", &body.payee)?;
    let amount_minor = check_amount("amount_minor", body.amount_minor)?;
    let reference = check_text("reference", &body.reference, 0, 140)?;
    if body.currency != membership.account.currency {
        return Err(Invalid::new(
            "currency",
            format!(
                "must be the account's currency, {}",
                membership.account.currency
            ),
        )
        .into());
    }
    Ok(PaymentRequest {
        account_id: membership.account.id.to_string(),
        payee,
        amount_minor,
        currency: body.currency,
        reference,
    })
}

pub async fn create(
    app: &App,
    principal: &Principal,
    membership: &Membership,
    request: Request<impl RequestBody>,
) -> Result<Response<Body>, ApiError> {
    let key = idempotency_key(&request)?;
    let body: NewPayment =
        read_json(request, app.config.max_body, app.config.client_timeout).await?;
    let wanted = validate(body, membership)?;
    if let Some(limit) = app.config.step_up_amount {
        if wanted.amount_minor > limit && !principal.has_second_factor() {
            return Err(ApiError::SecondFactorRequired(format!(
                "payments above {limit} (minor units) need a second factor: log in with a TOTP \
                 code (X-TOTP) and use that token"
            )));
        }
    }
    // The id and time are the store's to assign, in commit order.
    let payment = Payment {
        id: Uuid::nil(),
        account_id: membership.account.id,
        payee: wanted.payee.clone(),
        amount_minor: wanted.amount_minor,
        currency: wanted.currency.clone(),
        reference: wanted.reference.clone(),
        status: PaymentStatus::Pending,
        created_by: principal.username.clone(),
        created_at: 0,
        cancelled_at: None,
    };
    let keyed = match key {
        None => None,
        Some(key) => {
            let canonical = serde_json::to_vec(&wanted)
                .map_err(|e| ApiError::Internal(format!("serialising a payment request: {e}")))?;
            let mut request_hash = [0u8; 32];
            request_hash.copy_from_slice(digest::digest(&digest::SHA256, &canonical).as_ref());
            Some(KeyedRequest {
                user: principal.user_id,
                key,
                request_hash,
            })
        }
    };
    match app
        .store
        .create_payment(payment, principal.user_id, keyed, created_answer)
        .await?
    {
        PaymentCreation::Created(answer) => stored_response(&answer, false),
        PaymentCreation::Earlier(EarlierUse::Replay(stored)) => stored_response(&stored, true),
        PaymentCreation::Earlier(EarlierUse::InFlight) => Err(in_flight()),
        PaymentCreation::Earlier(EarlierUse::Mismatch) => Err(ApiError::IdempotencyMismatch),
    }
}

/// The 201 answer for a payment just created, as it is sent and stored for replays.
fn created_answer(payment: &Payment) -> Result<StoredResponse, StoreError> {
    Ok(StoredResponse {
        status: StatusCode::CREATED.as_u16(),
        body: serde_json::to_string(&PaymentBody::from(payment))
            .map_err(|e| StoreError::Corrupt(format!("serialising a payment: {e}")))?,
        location: Some(location(payment)),
    })
}

fn in_flight() -> ApiError {
    ApiError::Conflict(
        Conflict::IdempotencyInFlight,
        "a request with this Idempotency-Key is still being processed; retry later".into(),
    )
}

fn stored_response(stored: &StoredResponse, replayed: bool) -> Result<Response<Body>, ApiError> {
    let status = StatusCode::from_u16(stored.status)
        .map_err(|_| ApiError::Internal(format!("stored status {} is invalid", stored.status)))?;
    let mut response = response_with(status, stored.body.clone());
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if replayed {
        headers.insert(IDEMPOTENCY_REPLAYED, HeaderValue::from_static("true"));
    }
    if let Some(location) = &stored.location {
        set_location(&mut response, location);
    }
    Ok(response)
}
