//! `GET /metrics`: this worker's live series and its siblings' recent snapshots, in the
//! Prometheus text format. Admin role, or a client on loopback (see `crate::metrics`).

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use crate::app::App;
use crate::http::{response_with, ApiError, Body};

pub async fn get(app: &App) -> Result<Response<Body>, ApiError> {
    let mut samples = app.metrics.snapshot(app.audit.metrics());
    let (dir, instance) = (
        app.config.data_dir.clone(),
        app.metrics.instance().to_owned(),
    );
    let siblings =
        tokio::task::spawn_blocking(move || crate::metrics::sibling_samples(&dir, &instance))
            .await
            .map_err(|_| ApiError::Internal("reading metrics snapshots panicked".into()))?;
    samples.extend(siblings);
    let mut response = response_with(StatusCode::OK, crate::metrics::render(&samples));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    Ok(response)
}
