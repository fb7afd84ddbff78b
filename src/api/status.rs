//! `GET /apiStatus`: liveness for load balancers and operators. Public, and deliberately
//! free of anything an attacker could use (no build details beyond the version).

use http::{Response, StatusCode};
use serde_json::json;

use crate::http::{json, ApiError, Body};

pub fn get() -> Result<Response<Body>, ApiError> {
    json(
        StatusCode::OK,
        &json!({ "status": "ok", "version": env!("CARGO_PKG_VERSION") }),
    )
}
