//! `GET /openapi.yaml`: the OpenAPI 3.1 description of this API (the repository's
//! `openapi.yaml`, built into the binary), so that a client can import it from the server
//! it talks to. Public, like the API's shape it describes.

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use crate::http::{response_with, ApiError, Body};

/// The description, as committed; `tests/openapi.rs` checks it against the routes.
pub const OPENAPI_YAML: &str = include_str!("../../openapi.yaml");

pub fn get() -> Result<Response<Body>, ApiError> {
    let mut response = response_with(StatusCode::OK, OPENAPI_YAML);
    // RFC 9512 registers application/yaml.
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/yaml"),
    );
    Ok(response)
}
