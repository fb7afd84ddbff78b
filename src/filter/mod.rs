//! The filter chain: every request passes these stages, in this order, before a handler
//! runs. This file is the whole security story of a request; read [`handle`] top to bottom.
//!
//! ```text
//! TLS ─▶ authenticate ─▶ access control ─▶ handler
//!        (never rejects)  (may 401/403/404)
//! ```
//!
//! TLS is terminated by the server before a request exists (`crate::server`). Each stage
//! lives in its own module; this one only wires them together.

pub mod access;
pub mod authenticate;

use std::net::SocketAddr;

use crate::http::RequestBody;
use http::{Request, Response};
use uuid::Uuid;

use crate::api;
use crate::app::App;
use crate::http::{finish, Body};
use crate::routes;

/// Runs one request through the chain and returns the response to send.
pub async fn handle(
    app: &App,
    _peer: SocketAddr,
    request: Request<impl RequestBody>,
) -> Response<Body> {
    // Every response, error or not, carries this id in X-Request-Id.
    let request_id = Uuid::new_v4();
    // Which operation is asked for (pure parsing; unknown routes become a 404/405 to send).
    let route = routes::resolve(request.method(), request.uri().path());
    // Authenticate: label the request with who it proves to be; never rejects.
    let identity = authenticate::identify(app, request.headers()).await;
    // Access control: the only stage here that refuses (401/403/404).
    let result = match access::authorize(app, identity, route.requirement()).await {
        // The handler runs only with the grant access control issued.
        Ok(grant) => api::dispatch(app, route, grant, request).await,
        Err(refusal) => Err(refusal),
    };
    finish(result, request_id)
}
