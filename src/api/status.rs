//! `GET /apiStatus`: liveness for load balancers and operators. Public, and deliberately
//! free of anything an attacker could use (no build details beyond the version). On a
//! shared PostgreSQL database it also says whether the database answers: a node that
//! cannot reach it answers 503, so a load balancer knows it can decide nothing.

use http::{Response, StatusCode};
use serde_json::json;

use crate::app::App;
use crate::http::{json, ApiError, Body};
use crate::store::Store;

pub async fn get(app: &App) -> Result<Response<Body>, ApiError> {
    let database = match &app.store {
        Store::Sqlite(_) => "sqlite",
        Store::Postgres(store) => {
            store.ping().await?;
            "reachable"
        }
    };
    json(
        StatusCode::OK,
        &json!({ "status": "ok", "version": env!("CARGO_PKG_VERSION"), "database": database }),
    )
}
