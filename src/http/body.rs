//! Reading a JSON request body without trusting the client: the content type must say JSON,
//! the size limit is enforced while reading (a declared or streamed oversize body is refused
//! without buffering it), a slow sender hits a deadline, and the JSON must match the target
//! type exactly (unknown fields are rejected by the types themselves).

use std::time::Duration;

use http::{header, HeaderMap, Request};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::de::DeserializeOwned;

use super::ApiError;

/// Errors a request body can fail with.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// What the chain needs of a request body: hyper's `Incoming` in the server, any buffered
/// body in tests and benches.
pub trait RequestBody:
    hyper::body::Body<Data = bytes::Bytes, Error: Into<BodyError>> + Send
{
}

impl<B> RequestBody for B where
    B: hyper::body::Body<Data = bytes::Bytes, Error: Into<BodyError>> + Send
{
}

/// Whether the request declares a JSON body (`application/json`, any parameters).
fn declares_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
}

/// Reads and parses the body as `T`.
pub async fn read_json<T: DeserializeOwned>(
    request: Request<impl RequestBody>,
    max_bytes: usize,
    deadline: Duration,
) -> Result<T, ApiError> {
    if !declares_json(request.headers()) {
        return Err(ApiError::UnsupportedMediaType);
    }
    let body = request.into_body();
    if hyper::body::Body::size_hint(&body).lower() > max_bytes as u64 {
        return Err(ApiError::PayloadTooLarge(max_bytes));
    }
    let bytes = match tokio::time::timeout(deadline, Limited::new(body, max_bytes).collect()).await
    {
        Err(_) => return Err(ApiError::BodyTimeout),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return Err(ApiError::PayloadTooLarge(max_bytes))
        }
        Ok(Err(e)) => {
            return Err(ApiError::BadRequest(format!(
                "could not read the body: {e}"
            )))
        }
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::BadRequest(format!("the body is not valid JSON for this request: {e}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::Full;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)] // fields are read through Debug only
    struct Thing {
        name: String,
        count: u32,
    }

    fn request(content_type: Option<&str>, body: &str) -> Request<Full<Bytes>> {
        let mut builder = Request::post("/");
        if let Some(ct) = content_type {
            builder = builder.header("content-type", ct);
        }
        builder
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap()
    }

    async fn read(content_type: Option<&str>, body: &str) -> Result<Thing, ApiError> {
        read_json(request(content_type, body), 64, Duration::from_secs(5)).await
    }

    #[tokio::test]
    async fn accepts_json_with_parameters() {
        let ok = read(
            Some("Application/JSON; charset=utf-8"),
            r#"{"name":"a","count":1}"#,
        )
        .await;
        assert!(ok.is_ok(), "{ok:?}");
    }

    #[tokio::test]
    async fn each_failure_has_its_status() {
        let status = |r: Result<Thing, ApiError>| r.unwrap_err().status().as_u16();
        assert_eq!(status(read(None, "{}").await), 415);
        assert_eq!(status(read(Some("text/plain"), "{}").await), 415);
        assert_eq!(
            status(read(Some("application/json"), &"x".repeat(65)).await),
            413
        );
        assert_eq!(status(read(Some("application/json"), "{").await), 400);
        assert_eq!(status(read(Some("application/json"), "").await), 400);
        assert_eq!(
            status(read(Some("application/json"), r#"{"name":"a","count":-1}"#).await),
            400
        );
        assert_eq!(
            status(read(Some("application/json"), r#"{"name":"a","count":1,"x":2}"#).await),
            400
        );
    }
}
